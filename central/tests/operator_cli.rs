//! The operator's commands over the HTTP API (`workers`, `volumes --worker W [--tree]`,
//! `why H`, each with `--json`), run as the real binary against a server with
//! credentials on and an operator token in a file.

mod common;

use std::process::{Command, Output};

use common::*;
use volume_central::auth::{self, Subject};

const BIN: &str = env!("CARGO_BIN_EXE_volume-central");

fn run(args: &[&str], url: &str, token_file: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).args(["--url", url]);
    if let Some(t) = token_file {
        cmd.arg("--token-file").arg(t);
    }
    cmd.output().expect("run volume-central")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_show_workers_volumes_as_a_tree_and_why() {
    let (mut config, db) = fresh_db_with_auth().await;
    // The server's GC loop runs a pass as it starts: the unowned parent and its owned
    // child exist before that, so the child keeps the parent (no race with the pass).
    config.gc_interval = std::time::Duration::from_secs(3600);
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c1").await;
    initialized(&db, "w1", "base", None, None).await;
    initialized(&db, "w1", "kid", Some("base"), Some("c1")).await;
    // The server refuses to start with credentials on and none issued.
    let issued = auth::issue(&db, &Subject::Operator).await.expect("issue");
    let server = start_server(&config).await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("operator.token");
    std::fs::write(&token, format!("{}\n", issued.token)).expect("token");

    let out = tokio::task::spawn_blocking({
        let (url, token) = (url.clone(), token.clone());
        move || {
            (
                run(&["workers"], &url, Some(&token)),
                run(&["volumes", "--worker", "w1", "--tree"], &url, Some(&token)),
                run(&["why", "base"], &url, Some(&token)),
                run(&["why", "kid", "--json"], &url, Some(&token)),
                run(&["workers"], &url, None),
                run(&["why", "nope"], &url, Some(&token)),
            )
        }
    })
    .await
    .expect("commands");
    let (workers, tree, why, why_json, anonymous, unknown) = out;

    let workers = stdout(&workers);
    assert!(
        workers
            .lines()
            .any(|l| l.starts_with("w1 ") && l.contains("never")),
        "{workers}"
    );

    let tree = stdout(&tree);
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("base "), "{tree}");
    assert!(
        lines[1].starts_with("  kid ") && lines[1].contains("container c1"),
        "{tree}"
    );

    let why = stdout(&why);
    assert!(why.contains("Kept by child volume kid"), "{why}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&why_json)).expect("json");
    assert_eq!(v["status"], "kept");
    assert_eq!(v["owners"][0]["kind"], "container");

    assert!(!anonymous.status.success());
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(err.contains("401") && err.contains("credential"), "{err}");
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("404") && err.contains("nope"), "{err}");
}

#[test]
fn an_unreachable_replica_is_named_with_the_fix() {
    let out = run(&["workers"], "http://127.0.0.1:9", None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:9") && err.contains("--url"),
        "{err}"
    );
}
