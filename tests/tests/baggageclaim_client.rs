//! Concourse's own baggageclaim Go client against the real agent: the driver in
//! `tests/baggageclaim-driver/` is built with the shared tools' `baggageclaim-client/build.sh`
//! (the client vendored there) and runs its checks against the agent's local API, the
//! peer-to-peer ones between two agents.
//!
//! Without Go or the shared tools folder the test prints why it is SKIPPED and passes,
//! unless `BAGGAGECLAIM_CLIENT_REQUIRED=1` (as in CI), when it fails.
//! `BAGGAGECLAIM_CLIENT_DIR` names the shared folder (default
//! `<repo>/../shared/tools/baggageclaim-client`). The driver and Go's build cache live
//! under the cargo target dir, and the driver is rebuilt only when a `.go` file is newer.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use e2e::wiremock::MockServer;
use e2e::*;

const REQUIRED: &str = "BAGGAGECLAIM_CLIENT_REQUIRED";

fn required() -> bool {
    std::env::var(REQUIRED).is_ok_and(|v| v == "1")
}

/// Skips (prints why and returns `None`), or fails when the client is required.
fn skip(why: &str) -> Option<PathBuf> {
    assert!(!required(), "{REQUIRED}=1 but {why}");
    eprintln!("SKIPPED concourse_go_client_drives_every_volume_call: {why}");
    None
}

fn client_dir() -> PathBuf {
    std::env::var_os("BAGGAGECLAIM_CLIENT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/baggageclaim-client")
        })
}

fn driver_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("baggageclaim-driver")
}

/// `target/baggageclaim-driver`: the test runs from `target/<profile>/deps/`.
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps/<test>")
        .join("baggageclaim-driver")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The driver binary, built when missing or older than a `.go` file; `None` = skipped.
fn driver() -> Option<PathBuf> {
    let tools = client_dir();
    let build_sh = tools.join("build.sh");
    if !build_sh.is_file() {
        return skip(&format!(
            "the shared baggageclaim-client folder is missing ({} has no build.sh; set BAGGAGECLAIM_CLIENT_DIR)",
            tools.display()
        ));
    }
    let dir = build_dir();
    let out = dir.join("driver");
    let built = modified(&out);
    let newest_source = std::fs::read_dir(driver_source())
        .expect("tests/baggageclaim-driver")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "go"))
        .filter_map(|p| modified(&p))
        .max();
    if built.is_some() && built >= newest_source {
        return Some(out);
    }
    std::fs::create_dir_all(&dir).expect("create the driver's build dir");
    // Built beside and renamed, so a concurrent run never executes half a binary.
    let partial = dir.join(format!("driver.{}.partial", std::process::id()));
    let gopath: OsString = dir.join("gopath").into();
    let started = std::time::Instant::now();
    eprintln!(
        "building the baggageclaim driver with {}",
        build_sh.display()
    );
    let res = Command::new("bash")
        .arg(&build_sh)
        .arg(driver_source())
        .arg(&partial)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", &gopath)
        .env("GOMODCACHE", dir.join("gopath/pkg/mod"))
        .output()
        .expect("run bash");
    if !res.status.success() {
        let _ = std::fs::remove_file(&partial);
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        // With Go present a failed build is the driver's fault; without, Go could not be installed.
        assert!(
            !on_path("go"),
            "building the baggageclaim driver failed ({}):\n{output}",
            res.status
        );
        return skip(&format!(
            "Go is not installed and build.sh could not install it ({}):\n{output}",
            res.status
        ));
    }
    std::fs::rename(&partial, &out).expect("move the built driver in place");
    eprintln!("built the baggageclaim driver in {:.0?}", started.elapsed());
    Some(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn concourse_go_client_drives_every_volume_call() {
    let Some(driver) = driver() else { return };
    // A central API that knows nothing (404 everywhere): the agent destroys nothing.
    let server = MockServer::start().await;
    // Two workers for the peer-to-peer checks: P2P listeners on two loopback addresses,
    // the second admitting the first.
    let with_p2p = |worker: &str, ip: &str| AgentSettings {
        worker: worker.into(),
        extra: format!("\n[p2p]\nlisten = \"{ip}:0\"\nallowed_networks = [\"127.0.0.2/32\"]\n"),
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &with_p2p("w1", "127.0.0.2"));
    let peer = Agent::start(&server.uri(), &with_p2p("w2", "127.0.0.3"));
    let imports = tempfile::tempdir_in(agent.imports_dir()).expect("import source dir");
    let out = tokio::process::Command::new(&driver)
        .arg("-url")
        .arg(&agent.api)
        .arg("-peer-url")
        .arg(&peer.api)
        .arg("-import-dir")
        .arg(imports.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), out)
        .await
        .expect("the driver finished within 5 minutes")
        .expect("run the driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("---- baggageclaim driver ----\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the baggageclaim driver failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.contains(" passed, 0 failed"),
        "no summary from the driver:\n{stdout}"
    );
    assert!(
        stdout.contains("ok p2p-stream-out-to-the-peer"),
        "the peer-to-peer checks did not run:\n{stdout}"
    );
}
