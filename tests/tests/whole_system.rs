//! The whole system on a real PostgreSQL: volume-central (in process) and the real agent
//! binary. A build makes a container and a chain of volumes; the container goes; the GC
//! marks the whole chain in one pass; the agent destroys it child first; the rows go.

use std::time::Duration;

use e2e::*;
use serde_json::{json, Value};
use volume_central::testing::PgCluster;

struct Central {
    server: volume_central::Server,
    http: reqwest::Client,
}

impl Central {
    async fn start() -> Central {
        let url = PgCluster::shared()
            .create_database()
            .expect("a fresh database");
        let mut config = volume_central::Config::with_database_url(url);
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.gc_interval = Duration::from_millis(300);
        config.missing_grace = Duration::from_secs(2);
        volume_central::migrate(&config).await.expect("migrate");
        let server = volume_central::start(&config)
            .await
            .expect("start volume-central");
        Central {
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server.url())
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> u16 {
        self.http
            .request(method, self.url(path))
            .json(&body)
            .send()
            .await
            .expect("central request")
            .status()
            .as_u16()
    }

    async fn rows(&self, worker: &str) -> Vec<Value> {
        self.http
            .get(self.url(&format!("/workers/{worker}/volumes")))
            .send()
            .await
            .expect("list rows")
            .json()
            .await
            .expect("rows json")
    }

    async fn state_of(&self, worker: &str, handle: &str) -> Option<String> {
        self.rows(worker)
            .await
            .iter()
            .find(|r| r["handle"] == handle)
            .and_then(|r| r["state"].as_str().map(str::to_string))
    }
}

fn fast_agent() -> AgentSettings {
    AgentSettings {
        poll_interval: "200ms",
        report_interval: "300ms",
        ..AgentSettings::default()
    }
}

/// A build on worker w1: the scheduler records each volume (`creating`), the worker makes
/// it, the agent's report confirms it (`created`), the build initializes it.
async fn build_chain(central: &Central, local: &Local, names: &[String], container: &str) {
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;
    for (i, name) in names.iter().enumerate() {
        let parent = (i > 0).then(|| names[i - 1].clone());
        let status = central
            .send(
                post.clone(),
                "/workers/w1/volumes",
                json!({"handle": name, "parent": parent, "container": container}),
            )
            .await;
        assert_eq!(status, 201, "scheduler creates {name}");
        local.make(name, parent.as_deref()).await;
        eventually(&format!("{name} confirmed created"), || async {
            central.state_of("w1", name).await.as_deref() == Some("created")
        })
        .await;
        let status = central
            .send(
                put.clone(),
                &format!("/volumes/{name}/state"),
                json!({"state": "initialized"}),
            )
            .await;
        assert!(
            status == 200 || status == 204,
            "initialize {name}: {status}"
        );
    }
}

#[actix_rt::test]
async fn chain_of_depth_ten_is_collected_child_first_from_disk_and_database() {
    let central = Central::start().await;
    let agent = Agent::start(&central.server.url(), &fast_agent());
    let local = Local::new(&agent);
    let status = central
        .send(
            reqwest::Method::POST,
            "/workers/w1/containers",
            json!({"handle": "c1"}),
        )
        .await;
    assert_eq!(status, 201);
    let names: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    build_chain(&central, &local, &names, "c1").await;
    assert_eq!(local.handles().await.len(), 10);

    // The build ends: its container goes, and the whole chain is garbage.
    let status = central
        .http
        .delete(central.url("/workers/w1/containers/c1"))
        .send()
        .await
        .expect("delete container")
        .status();
    assert!(status.is_success(), "{status}");

    eventually("the chain is gone from disk and database", || async {
        local.handles().await.is_empty() && central.rows("w1").await.is_empty()
    })
    .await;
    let log = agent.log();
    let pos = |h: &str| {
        log.find(&format!("destroyed volume handle={h} "))
            .unwrap_or_else(|| panic!("no destroy line for {h}:\n{log}"))
    };
    for i in 1..10 {
        assert!(
            pos(&format!("v{i}")) < pos(&format!("v{}", i - 1)),
            "v{i} went after its parent"
        );
    }
    // One pass: the agent saw all ten named in a single answer.
    let passes = log.matches("destroyed volume handle=").count();
    assert_eq!(passes, 10);
}

#[actix_rt::test]
async fn volume_deleted_by_hand_is_reported_missing_and_its_row_cleaned_up() {
    let central = Central::start().await;
    let agent = Agent::start(&central.server.url(), &fast_agent());
    let local = Local::new(&agent);
    central
        .send(
            reqwest::Method::POST,
            "/workers/w1/containers",
            json!({"handle": "c1"}),
        )
        .await;
    build_chain(&central, &local, &["solo".to_string()], "c1").await;
    // Someone removes the volume behind the agent's back: through the local API, as a
    // runtime cleaning up by hand would.
    let status = local
        .http
        .delete(format!("{}/volumes/solo", local.base))
        .send()
        .await
        .expect("delete")
        .status();
    assert_eq!(status, 204);
    eventually("the row is cleaned up after the missing grace", || async {
        central.rows("w1").await.is_empty()
    })
    .await;
}

#[actix_rt::test]
async fn desired_set_keeps_a_live_chain_and_blocks_nothing() {
    let central = Central::start().await;
    let agent = Agent::start(&central.server.url(), &fast_agent());
    let local = Local::new(&agent);
    central
        .send(
            reqwest::Method::POST,
            "/workers/w1/containers",
            json!({"handle": "c1"}),
        )
        .await;
    let names = vec!["base".to_string(), "kid".to_string()];
    build_chain(&central, &local, &names, "c1").await;
    // Several GC intervals and polls later, nothing in use has gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(local.handles().await, ["base", "kid"]);
    assert_eq!(central.rows("w1").await.len(), 2);
    // A child the scheduler tries to make from a volume that is not initialized: 409/422.
    let status = central
        .send(
            reqwest::Method::POST,
            "/workers/w1/volumes",
            json!({"handle": "x", "parent": "ghost", "container": "c1"}),
        )
        .await;
    assert!(status == 404 || status == 409 || status == 422, "{status}");
}
