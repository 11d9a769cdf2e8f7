//! The `volume-central` binary: `migrate` (twice), config errors, `run` until SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use volume_central::testing::PgCluster;

const BIN: &str = env!("CARGO_BIN_EXE_volume-central");

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("central.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

/// `volume-central run --config CONFIG` in the background, output discarded.
fn spawn_run(config: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run")
}

/// `volume-central ARGS --config CONFIG`, which must exit with `code`; its stderr.
fn stderr_of_failed(args: &[&str], config: &std::path::Path, code: i32) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("volume-central");
    assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `credentials issue ARGS` against `config`; the token it prints.
fn issue(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["credentials", "issue", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("credentials issue");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// A migrated database and a config naming it (listening on a free port).
fn migrated_config(dir: &std::path::Path, extra: &str) -> (std::path::PathBuf, u16) {
    let url = PgCluster::shared().create_database().expect("database");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = write_config(
        dir,
        &format!("listen = \"127.0.0.1:{port}\"\ndatabase_url = {url:?}\n{extra}"),
    );
    let status = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .status()
        .expect("migrate");
    assert!(status.success());
    (config, port)
}

#[test]
fn without_credentials_run_refuses_to_start_unless_auth_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = migrated_config(dir.path(), "");
    // A configuration error (no credential): the unit does not restart it.
    let err = stderr_of_failed(&["run"], &config, volume_central::EX_CONFIG);
    assert!(
        err.contains("no credential is issued")
            && err.contains("credentials issue")
            && err.contains("auth = \"none\""),
        "{err}"
    );
}

#[test]
fn auth_none_warns_at_start_and_shows_in_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = migrated_config(dir.path(), "auth = \"none\"\n");
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let metrics = runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(resp) = client
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
            {
                return resp.text().await.unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        String::new()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(
        metrics.contains("volume_central_auth_disabled 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(
        log.contains("WARN") && log.contains("auth = \"none\": the API accepts every request"),
        "{log}"
    );
}

#[test]
fn credentials_issue_list_revoke_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = migrated_config(dir.path(), "");
    let w = issue(&config, &["--worker", "w1"]);
    let s = issue(&config, &["--scheduler"]);
    assert!(w.starts_with("vc1_") && s.starts_with("vc1_") && w != s);
    let refused = Command::new(BIN)
        .args(["credentials", "issue", "--config"])
        .arg(&config)
        .args(["--scheduler", "--operator"])
        .output()
        .expect("issue");
    assert!(!refused.status.success(), "two kinds at once");
    let list = |config: &std::path::Path| {
        let out = Command::new(BIN)
            .args(["credentials", "list", "--config"])
            .arg(config)
            .output()
            .expect("list");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let before = list(&config);
    assert!(
        !before.contains(&w) && !before.contains(&s),
        "tokens never listed"
    );
    let line1 = before
        .lines()
        .find(|l| l.contains("w1"))
        .expect("w1 listed");
    assert!(
        line1.trim_start().starts_with("1 ") && line1.contains("worker"),
        "{before}"
    );
    let out = Command::new(BIN)
        .args(["credentials", "revoke", "1", "--config"])
        .arg(&config)
        .output()
        .expect("revoke");
    assert!(out.status.success(), "{out:?}");
    let after = list(&config);
    let line1 = after.lines().find(|l| l.contains("w1")).expect("w1 listed");
    assert!(
        !line1.trim_end().ends_with('-'),
        "revoked time shown: {after}"
    );
    let out = Command::new(BIN)
        .args(["credentials", "revoke", "99", "--config"])
        .arg(&config)
        .output()
        .expect("revoke");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("credentials list"));
}

#[test]
fn migrate_twice_then_the_schema_is_current() {
    let url = PgCluster::shared().create_database().expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, format!("{url}\n")).expect("write url");
    let config = write_config(
        dir.path(),
        &format!("database_url_file = {:?}\n", url_file.display().to_string()),
    );
    let first = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .expect("run migrate");
    assert!(first.status.success(), "{first:?}");
    let every: Vec<i32> = volume_central::migrate::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains(&format!("applied migrations {every:?}")),
        "{stdout}"
    );
    let second = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .expect("run migrate");
    assert!(second.status.success(), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stdout).contains("schema is current"));
}

#[test]
fn an_unknown_config_key_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "database_url = \"x\"\npool_sise = 3\n");
    let err = stderr_of_failed(&["run"], &config, volume_central::EX_CONFIG);
    assert!(err.contains("pool_sise"), "{err}");
}

#[test]
fn an_unreachable_database_is_not_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "database_url = \"host=127.0.0.1 port=9 user=nobody dbname=none\"\n",
    );
    let err = stderr_of_failed(&["credentials", "list"], &config, 1);
    assert!(err.contains("database unavailable"), "{err}");
}

#[test]
fn generate_manpages_writes_the_page_of_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["generate", "manpages"])
        .arg(dir.path())
        .output()
        .expect("generate manpages");
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(dir.path().join("volume-central.1")).expect("page");
    assert!(page.contains(".TH volume-central 1"), "{page}");
    let run = std::fs::read_to_string(dir.path().join("volume-central-run.1")).expect("run page");
    assert!(run.contains("migrate"), "{run}");
    assert!(
        !dir.path().join("volume-central-generate.1").exists(),
        "the hidden command got a page"
    );
}

#[test]
fn run_serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = migrated_config(dir.path(), "gc_interval = \"1s\"\n");
    let token = issue(&config, &["--scheduler"]);
    let mut child = spawn_run(&config);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ready = runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(resp) = client
                .get(format!("http://127.0.0.1:{port}/api/v1/workers"))
                .bearer_auth(&token)
                .send()
                .await
            {
                if resp.status().is_success() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let exit = child.wait().expect("wait");
    assert!(ready, "volume-central never became ready");
    assert!(exit.success(), "exit after SIGTERM: {exit:?}");
}

/// SIGTERM while a large report is in flight: the process stops (after at most the
/// shutdown timeout for the request), it does not hang on the report.
#[test]
fn sigterm_stops_the_service_even_mid_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = migrated_config(
        dir.path(),
        "auth = \"none\"\nshutdown_timeout = \"1s\"\nhttp_workers = 1\n",
    );
    let mut child = spawn_run(&config);
    let base = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut registered = false;
        for _ in 0..600 {
            if let Ok(resp) = client
                .post(format!("{base}/api/v1/workers"))
                .json(&serde_json::json!({"name": "w1"}))
                .send()
                .await
            {
                registered = resp.status().is_success();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(registered, "volume-central never answered");
        let missing: Vec<String> = (0..300_000).map(|i| format!("volume-{i:08}")).collect();
        let body = serde_json::json!({"revision_seen": null, "volumes": [], "missing": missing});
        let report = tokio::spawn(
            client
                .put(format!("{base}/api/v1/workers/w1/volumes/report"))
                .json(&body)
                .send(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
        // The report either finished before the stop or was cut; both are fine.
        let _ = report.await;
    });
    let mut exited = None;
    for _ in 0..600 {
        if let Some(status) = child.try_wait().expect("try_wait") {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if exited.is_none() {
        let _ = child.kill();
    }
    let status = exited.expect("volume-central still running a minute after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_role_the_database_refuses_stops_run_naming_the_fix() {
    let url = PgCluster::shared().create_database().expect("database");
    let url = url.replace("user=postgres", "user=no_such_role");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!("database_url = {url:?}\nauth = \"none\"\nlisten = \"127.0.0.1:0\"\n"),
    );
    // Not a configuration error of this file: the unit may restart it (the DBA may be
    // creating the role right now).
    let err = stderr_of_failed(&["run", "--migrate"], &config, 1);
    assert!(
        err.contains("no_such_role") && err.contains("pg_hba.conf"),
        "{err}"
    );
}
