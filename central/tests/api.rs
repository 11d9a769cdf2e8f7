//! The HTTP service in-process on a random port, against a real PostgreSQL.

mod common;

use common::*;
use protocol::native::DesiredSet;
use reqwest::StatusCode;
use serde_json::json;
use volume_central::testing::PgCluster;

fn types(version: &str) -> serde_json::Value {
    json!({"resource_types": [{"type": "git", "image": "/t/git/rootfs.tgz", "version": version}]})
}

async fn desired(
    client: &reqwest::Client,
    base: &str,
    worker: &str,
    etag: Option<&str>,
) -> reqwest::Response {
    let mut req = client.get(format!("{base}/api/v1/workers/{worker}/volumes/desired"));
    if let Some(tag) = etag {
        req = req.header("If-None-Match", tag);
    }
    req.send().await.expect("desired")
}

#[tokio::test]
async fn desired_set_answers_with_etag_then_304_until_a_change() {
    let (config, db) = fresh_db().await;
    let server = start_server(&config).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let resp = desired(&client, &base, "w1", None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "unknown worker");
    let resp = client
        .post(format!("{base}/api/v1/workers"))
        .json(&json!({"name": "w1"}))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), StatusCode::CREATED);

    let resp = client
        .put(format!("{base}/api/v1/workers/w1/base-resource-types"))
        .json(&types("1.0"))
        .send()
        .await
        .expect("types");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let before = chrono::Utc::now();
    let resp = desired(&client, &base, "w1", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let etag = resp.headers()["etag"].to_str().expect("etag").to_string();
    let body = resp.bytes().await.expect("body");
    let set: DesiredSet = protocol::decode("desired set", &body).expect("decode");
    assert_eq!(set.worker, "w1");
    assert!(set.volumes.is_empty() && set.destroying.is_empty());
    assert!(set.as_of >= before - chrono::Duration::seconds(5));

    let resp = desired(&client, &base, "w1", Some(&etag)).await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(resp.headers()["etag"].to_str().expect("etag"), etag);

    // A change: a container, a parent and a child.
    for (path, body) in [
        ("containers", json!({"handle": "c1"})),
        ("volumes", json!({"handle": "p", "container": "c1"})),
    ] {
        let resp = client
            .post(format!("{base}/api/v1/workers/w1/{path}"))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::CREATED, "{path}");
    }
    force_state(&db, "p", "initialized").await;
    let resp = client
        .post(format!("{base}/api/v1/workers/w1/volumes"))
        .json(&json!({"handle": "c", "parent": "p", "container": "c1"}))
        .send()
        .await
        .expect("child");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = desired(&client, &base, "w1", Some(&etag)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let new_etag = resp.headers()["etag"].to_str().expect("etag").to_string();
    assert_ne!(new_etag, etag);
    let changed: DesiredSet =
        protocol::decode("desired set", &resp.bytes().await.expect("b")).expect("decode");
    assert!(changed.revision > set.revision);
    assert_eq!(changed.volumes.len(), 2);
    assert_eq!(
        changed.volumes[1].parent.as_ref().map(|p| p.as_str()),
        Some("p")
    );

    // The container goes; the GC marks both; they move to `destroying`.
    let resp = client
        .delete(format!("{base}/api/v1/workers/w1/containers/c1"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // The server's own start-up pass may still hold the GC lock on a loaded machine:
    // run ours until it ran (a `Locked` pass marks nothing).
    gc_pass(&db, config.missing_grace).await;
    let resp = desired(&client, &base, "w1", Some(&new_etag)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let marked: DesiredSet =
        protocol::decode("desired set", &resp.bytes().await.expect("b")).expect("decode");
    assert!(marked.volumes.is_empty());
    assert_eq!(marked.destroying.len(), 2);
    let metrics = metrics_text(&client, &base).await;
    assert!(
        metrics.contains("volume_central_volumes{state=\"destroying\"} 2")
            && metrics.contains("volume_central_volumes{state=\"initialized\"} 0")
            && metrics.contains("volume_central_desired_duration_seconds_count 5"),
        "{metrics}"
    );

    // The agent reports them destroyed: rows deleted, the set is empty again.
    let resp = client
        .put(format!("{base}/api/v1/workers/w1/volumes/report"))
        .json(&json!({"revision_seen": marked.revision, "volumes": [], "destroyed": ["p", "c"]}))
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(count(&db, "SELECT count(*) FROM volumes").await, 0);

    let metrics = metrics_text(&client, &base).await;
    assert!(
        metrics.contains("volume_central_desired_answers_total{kind=\"not_modified\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("volume_central_reported_destroyed_rows_deleted_total 2"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn scheduler_api_answers_201_404_409_and_moves_state_forward_only() {
    let (config, db) = fresh_db().await;
    let server = start_server(&config).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let post = |path: String, body: serde_json::Value| {
        let client = client.clone();
        async move {
            let resp = client.post(path).json(&body).send().await.expect("post");
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let vols = format!("{base}/api/v1/workers/w1/volumes");
    volume_central::store::register_worker(&db, "w1")
        .await
        .expect("register w1");
    volume_central::store::register_worker(&db, "w2")
        .await
        .expect("register w2");
    client
        .put(format!("{base}/api/v1/workers/w1/base-resource-types"))
        .json(&types("1.0"))
        .send()
        .await
        .expect("types");
    assert_eq!(
        post(
            format!("{base}/api/v1/workers/w1/containers"),
            json!({"handle": "c"})
        )
        .await
        .0,
        201
    );
    assert_eq!(
        post(
            format!("{base}/api/v1/workers/w1/containers"),
            json!({"handle": "c"})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(
            format!("{base}/api/v1/workers/w2/containers"),
            json!({"handle": "c"})
        )
        .await
        .0,
        409
    );

    assert_eq!(
        post(vols.clone(), json!({"handle": "x", "container": "nope"}))
            .await
            .0,
        404
    );
    assert_eq!(
        post(vols.clone(), json!({"handle": "x", "resource_cache": 99}))
            .await
            .0,
        404
    );
    assert_eq!(
        post(
            vols.clone(),
            json!({"handle": "x", "base_resource_type": "svn"})
        )
        .await
        .0,
        404
    );
    let (status, body) = post(vols.clone(), json!({"handle": "../x"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("handle"),
        "{body}"
    );
    let (status, body) = post(vols.clone(), json!({"handle": "x", "colour": "red"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("colour"),
        "{body}"
    );

    let (status, row) = post(
        vols.clone(),
        json!({"handle": "git", "base_resource_type": "git"}),
    )
    .await;
    assert_eq!(status, 201, "{row}");
    assert_eq!(row["state"], "creating");
    assert_eq!(
        post(vols.clone(), json!({"handle": "git", "container": "c"}))
            .await
            .0,
        409
    );
    // A child of a `creating` parent: 409.
    assert_eq!(
        post(
            vols.clone(),
            json!({"handle": "kid", "parent": "git", "container": "c"})
        )
        .await
        .0,
        409
    );

    // Resource config, cache with its first use, a volume holding it.
    let (status, cfg) = post(
        format!("{base}/api/v1/resource-configs"),
        json!({"base_resource_type": "git", "source_hash": "abc"}),
    )
    .await;
    assert_eq!(status, 201, "{cfg}");
    let (status, cache) = post(
        format!("{base}/api/v1/resource-caches"),
        json!({"resource_config": cfg["id"], "version": "v1", "build": 1}),
    )
    .await;
    assert_eq!(status, 201, "{cache}");
    let cache_id = cache["id"].as_i64().expect("id");
    assert_eq!(
        post(
            vols.clone(),
            json!({"handle": "cached", "resource_cache": cache_id})
        )
        .await
        .0,
        201
    );
    let uses = format!("{base}/api/v1/resource-caches/{cache_id}/uses/2");
    assert_eq!(
        client
            .post(&uses)
            .send()
            .await
            .expect("use")
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        client
            .delete(&uses)
            .send()
            .await
            .expect("unuse")
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        client
            .post(format!("{base}/api/v1/resource-caches/999/uses/2"))
            .send()
            .await
            .expect("use")
            .status()
            .as_u16(),
        404
    );

    // State route: creating cannot move (the agent confirms `created`).
    let state = |h: &str, s: &str| {
        let client = client.clone();
        let url = format!("{base}/api/v1/volumes/{h}/state");
        let body = json!({"state": s});
        async move {
            client
                .put(url)
                .json(&body)
                .send()
                .await
                .expect("state")
                .status()
                .as_u16()
        }
    };
    assert_eq!(state("git", "initialized").await, 409);
    client
        .put(format!("{base}/api/v1/workers/w1/volumes/report"))
        .json(&json!({"revision_seen": null, "volumes": [{"handle": "git", "parent": null, "state": "created"}]}))
        .send()
        .await
        .expect("report");
    assert_eq!(state("git", "initializing").await, 200);
    assert_eq!(state("git", "initialized").await, 200);
    assert_eq!(
        state("git", "initialized").await,
        200,
        "same state again is a no-op"
    );
    assert_eq!(state("git", "created").await, 409, "never backwards");
    assert_eq!(state("git", "destroying").await, 400);
    assert_eq!(state("nope", "initialized").await, 404);
    assert_eq!(
        post(
            vols.clone(),
            json!({"handle": "kid", "parent": "git", "container": "c"})
        )
        .await
        .0,
        201
    );

    let list: Vec<serde_json::Value> = client
        .get(&vols)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let kid = list.iter().find(|v| v["handle"] == "kid").expect("kid");
    assert_eq!(kid["parent"], "git");
    assert_eq!(kid["kept_by"], json!(["container c"]));
    let git = list.iter().find(|v| v["handle"] == "git").expect("git");
    assert_eq!(git["kept_by"], json!(["base resource type git 1.0"]));
    assert_eq!(
        client
            .get(format!("{base}/api/v1/workers/nobody/volumes"))
            .send()
            .await
            .expect("list")
            .status()
            .as_u16(),
        404
    );
    assert_eq!(count(&db, "SELECT count(*) FROM volumes").await, 3);
    server.stop().await;
}

#[tokio::test]
async fn readyz_is_false_until_migrations_are_current() {
    let url = PgCluster::shared().create_database().expect("database");
    let mut config = volume_central::Config::with_database_url(url);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_workers = 1;
    let server = start_server(&config).await;
    let client = reqwest::Client::new();
    let readyz = format!("{}/readyz", server.url());
    let resp = client.get(&readyz).send().await.expect("readyz");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp
        .text()
        .await
        .expect("text")
        .contains("volume-central migrate"));
    volume_central::migrate(&config).await.expect("migrate");
    assert_eq!(
        client.get(&readyz).send().await.expect("readyz").status(),
        StatusCode::OK
    );
    server.stop().await;
}

/// PostgreSQL goes away: requests answer 503 and readyz is false; it comes back: the
/// service recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_database_answers_503_and_recovers_by_itself() {
    let mut cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .expect("join")
        .expect("own cluster");
    let url = cluster.create_database().expect("database");
    let mut config = volume_central::Config::with_database_url(url);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_workers = 1;
    config.pool_size = 4;
    config.auth = volume_central::AuthMode::None;
    volume_central::migrate(&config).await.expect("migrate");
    let server = start_server(&config).await;
    volume_central::store::register_worker(server.db(), "w1")
        .await
        .expect("register");
    let base = server.url();
    let client = reqwest::Client::new();
    let put = || {
        client
            .put(format!("{base}/api/v1/workers/w1/base-resource-types"))
            .json(&types("1"))
            .send()
    };
    assert_eq!(put().await.expect("put").status(), StatusCode::NO_CONTENT);
    assert_eq!(
        desired(&client, &base, "w1", None).await.status(),
        StatusCode::OK
    );

    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .expect("join");
    assert_eq!(
        desired(&client, &base, "w1", None).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        put().await.expect("put").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().expect("restart");
        cluster
    })
    .await
    .expect("join");
    let mut recovered = false;
    for _ in 0..600 {
        let resp = desired(&client, &base, "w1", None).await;
        if resp.status() == StatusCode::OK {
            recovered = true;
            break;
        }
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "service did not recover after PostgreSQL came back"
    );
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    server.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("join");
}
