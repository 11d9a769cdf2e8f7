//! The whole system on one machine: a throwaway PostgreSQL cluster, volume-central, two
//! agents on temporary volumes roots, and a short scripted build. Shows volumes appearing
//! and being collected, child first.
//!
//! `cargo run -p e2e --bin system-demo` (needs Debian's `postgresql` package installed).

use std::time::{Duration, Instant};

use e2e::{Agent, AgentSettings, Local};
use serde_json::{json, Value};
use volume_central::auth::{self, Subject};
use volume_central::testing::PgCluster;

fn main() -> anyhow::Result<()> {
    actix_rt::System::new().block_on(demo())
}

async fn rows(http: &reqwest::Client, base: &str, worker: &str) -> anyhow::Result<Vec<Value>> {
    Ok(http
        .get(format!("{base}/api/v1/workers/{worker}/volumes"))
        .send()
        .await?
        .json()
        .await?)
}

fn show(worker: &str, rows: &[Value]) {
    for r in rows {
        println!(
            "   {worker}  {:<12} {:<12} parent={:<10} kept by {}",
            r["handle"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["parent"].as_str().unwrap_or("-"),
            r["kept_by"]
        );
    }
}

async fn wait_for(
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("== starting PostgreSQL in a temporary directory");
    let cluster = PgCluster::start()?;
    let mut config = volume_central::Config::with_database_url(cluster.create_database()?);
    config.listen = "127.0.0.1:0".parse()?;
    config.gc_interval = Duration::from_millis(500);
    volume_central::migrate(&config).await?;
    // Credentials: the scheduler's (this demo's requests) and one per worker, each
    // issued the way `volume-central credentials issue` does it.
    let db = volume_central::Db::connect(&config.resolve_database_url()?, 1)?;
    let scheduler = auth::issue(&db, &Subject::Scheduler).await?.token;
    let tokens = tempfile::tempdir()?;
    let mut token_files = Vec::new();
    for w in ["w1", "w2"] {
        let path = tokens.path().join(w);
        std::fs::write(
            &path,
            auth::issue(&db, &Subject::Worker(w.into())).await?.token,
        )?;
        token_files.push(path);
    }
    let central = volume_central::start(&config).await?;
    let base = central.url();
    println!("== volume-central at {base} (GC every 500 ms), workers w1 and w2 registered with their own credentials");
    let settings = |w: &str, token: &std::path::Path| AgentSettings {
        worker: w.into(),
        poll_interval: "300ms",
        report_interval: "500ms",
        token_file: Some(token.to_path_buf()),
        ..AgentSettings::default()
    };
    let a1 = Agent::start(&base, &settings("w1", &token_files[0]));
    let a2 = Agent::start(&base, &settings("w2", &token_files[1]));
    println!("== two agents: w1 at {}, w2 at {}", a1.api, a2.api);
    let (l1, l2) = (Local::new(&a1), Local::new(&a2));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {scheduler}").parse()?,
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let api = |p: &str| format!("{base}/api/v1{p}");

    println!("\n== a build on w1: container c1 and a chain base <- child <- grandchild; w2 gets a volume for container c2");
    for (w, c) in [("w1", "c1"), ("w2", "c2")] {
        http.post(api(&format!("/workers/{w}/containers")))
            .json(&json!({"handle": c}))
            .send()
            .await?;
    }
    let plan: [(&str, &Local, &str, Option<&str>, &str); 4] = [
        ("w1", &l1, "base", None, "c1"),
        ("w1", &l1, "child", Some("base"), "c1"),
        ("w1", &l1, "grandchild", Some("child"), "c1"),
        ("w2", &l2, "other", None, "c2"),
    ];
    for (w, local, h, parent, c) in plan {
        let status = http
            .post(api(&format!("/workers/{w}/volumes")))
            .json(&json!({"handle": h, "parent": parent, "container": c}))
            .send()
            .await?
            .status();
        anyhow::ensure!(status.as_u16() == 201, "scheduler create {h}: {status}");
        local.make(h, parent).await;
        wait_for(&format!("{h} confirmed"), async || {
            Ok(rows(&http, &base, w)
                .await?
                .iter()
                .any(|r| r["handle"] == h && r["state"] == "created"))
        })
        .await?;
        http.put(api(&format!("/volumes/{h}/state")))
            .json(&json!({"state": "initialized"}))
            .send()
            .await?;
    }
    show("w1", &rows(&http, &base, "w1").await?);
    show("w2", &rows(&http, &base, "w2").await?);

    println!("\n== the build ends: container c1 is deleted; the GC marks the whole chain at once");
    http.delete(api("/workers/w1/containers/c1")).send().await?;
    wait_for("w1's chain collected", async || {
        Ok(l1.handles().await.is_empty() && rows(&http, &base, "w1").await?.is_empty())
    })
    .await?;
    println!("   the agent on w1 destroyed, in this order:");
    for line in a1.log().lines().filter(|l| l.contains("destroyed volume")) {
        if let Some(h) = line
            .split("handle=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            println!("     {h}");
        }
    }
    println!("   rows left in the database:");
    show("w1", &rows(&http, &base, "w1").await?);
    show("w2", &rows(&http, &base, "w2").await?);
    println!("   volumes on w2: {:?}", l2.handles().await);
    central.stop().await;
    drop(cluster);
    println!("\n== done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
