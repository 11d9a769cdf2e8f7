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
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migrations [1]"));
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
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool_sise"), "{err}");
}

#[test]
fn run_serves_until_sigterm() {
    let url = PgCluster::shared().create_database().expect("database");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\ndatabase_url = {url:?}\ngc_interval = \"1s\"\n"),
    );
    let status = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .status()
        .expect("migrate");
    assert!(status.success());
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ready = runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(resp) = client
                .get(format!("http://127.0.0.1:{port}/readyz"))
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
