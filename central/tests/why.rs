//! `GET /api/v1/volumes/{h}/why` against a real PostgreSQL: every kind of owner that keeps
//! a volume, and why a volume is garbage or being destroyed, since when.

mod common;

use std::time::Duration;

use common::*;
use protocol::native::{DiskReport, ReportedVolume, VolumeReport};
use protocol::VolumeState;
use serde_json::Value;
use volume_central::store::{self, CreateVolume};
use volume_central::Db;

async fn why(base: &str, handle: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{base}/api/v1/volumes/{handle}/why"))
        .await
        .expect("why");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn kinds(v: &Value) -> Vec<&str> {
    v["owners"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["kind"].as_str()).collect())
        .unwrap_or_default()
}

/// One GC pass of this test's own (the server's GC loop may hold the lock a moment).
async fn pass(db: &Db, grace: Duration) {
    gc_pass(db, grace).await;
}

/// A server on a fresh database with worker `w1` (base resource type `git` 1.0), its GC
/// loop idle: the tests run each pass themselves, where they assert what comes before one.
async fn serve() -> (volume_central::Server, String, Db) {
    let (mut config, db) = fresh_db().await;
    config.gc_interval = Duration::from_secs(3600);
    let server = start_server(&config).await;
    let base = server.url();
    register(&db, "w1", "1.0").await;
    (server, base, db)
}

#[tokio::test]
async fn why_names_every_kind_of_owner_then_says_since_when_it_is_garbage() {
    let (_server, base, db) = serve().await;
    container(&db, "w1", "c1").await;

    // A container.
    initialized(&db, "w1", "used", None, Some("c1")).await;
    let (status, v) = why(&base, "used").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "kept");
    assert_eq!(kinds(&v), ["container"]);
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("container c1"),
        "{v}"
    );

    // A resource cache with a build's use.
    let cache = cache(&db, "v1", Some(42)).await;
    cache_volume(&db, "w1", "cached", cache).await;
    let (_, v) = why(&base, "cached").await;
    assert_eq!(v["status"], "kept", "{v}");
    assert_eq!(v["owners"][0]["kind"], "resource_cache");
    assert_eq!(v["owners"][0]["uses"], 1);
    assert_eq!(v["owners"][0]["builds"], serde_json::json!([42]));

    // A base resource type the worker reports.
    store::create_volume(
        &db,
        "w1",
        &CreateVolume {
            handle: h("image"),
            parent: None,
            container: None,
            resource_cache: None,
            base_resource_type: Some("git".into()),
        },
    )
    .await
    .expect("type volume");
    force_state(&db, "image", "initialized").await;
    let (_, v) = why(&base, "image").await;
    assert_eq!(kinds(&v), ["base_resource_type"], "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("git 1.0"),
        "{v}"
    );

    // A live child keeps an unowned parent.
    initialized(&db, "w1", "parent", None, None).await;
    initialized(&db, "w1", "kid", Some("parent"), Some("c1")).await;
    let (_, v) = why(&base, "parent").await;
    assert_eq!(v["status"], "kept", "{v}");
    assert_eq!(kinds(&v), ["child"]);
    assert_eq!(v["owners"][0]["handle"], "kid");

    // The container goes (ON DELETE SET NULL): its volumes are garbage since then.
    store::delete_container(&db, "w1", "c1")
        .await
        .expect("delete container");
    let (_, v) = why(&base, "used").await;
    assert_eq!(v["status"], "garbage", "{v}");
    assert!(v["since"].is_string(), "the time the last owner went: {v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("next GC pass"),
        "{v}"
    );

    // The build's use goes: the cache is retained while there is room; once the
    // scheduler marks it `drop`, the next GC pass deletes it.
    store::delete_cache_use(&db, cache, 42)
        .await
        .expect("delete use");
    let (_, v) = why(&base, "cached").await;
    assert_eq!(v["status"], "kept", "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("retained since"),
        "{v}"
    );
    store::set_cache_retention(&db, cache, store::Retention::Drop)
        .await
        .expect("drop");
    let (_, v) = why(&base, "cached").await;
    assert_eq!(v["status"], "kept", "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("deletes the cache"),
        "{v}"
    );

    // A new version of the type: the old image is garbage.
    register(&db, "w1", "2.0").await;
    let (_, v) = why(&base, "image").await;
    assert_eq!(v["status"], "garbage", "{v}");

    // A GC pass marks all of them, saying why and since when; the parent goes with its
    // child, which is marked too.
    pass(&db, Duration::from_secs(3600)).await;
    for handle in ["used", "cached", "image", "parent", "kid"] {
        let (_, v) = why(&base, handle).await;
        assert_eq!(v["status"], "destroying", "{handle}: {v}");
        assert!(v["since"].is_string(), "{handle}: {v}");
        assert!(
            v["explanation"]
                .as_str()
                .unwrap_or_default()
                .contains("nothing owned it"),
            "{handle}: {v}"
        );
    }
    let (_, v) = why(&base, "parent").await;
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("after its children"),
        "{v}"
    );

    let (status, v) = why(&base, "nope").await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = why(&base, "..").await;
    assert!(status == 400 || status == 404);
}

#[tokio::test]
async fn why_says_a_volume_missing_beyond_the_grace_is_destroyed_for_that() {
    let (_server, base, db) = serve().await;
    container(&db, "w1", "c1").await;
    initialized(&db, "w1", "lost", None, Some("c1")).await;
    store::apply_report(
        &db,
        "w1",
        &VolumeReport {
            missing: vec![h("lost")],
            ..VolumeReport::default()
        },
    )
    .await
    .expect("report");
    let (_, v) = why(&base, "lost").await;
    assert_eq!(v["status"], "kept", "{v}");
    assert!(v["missing_since"].is_string(), "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("missing"),
        "{v}"
    );
    pass(&db, Duration::ZERO).await;
    let (_, v) = why(&base, "lost").await;
    assert_eq!(v["status"], "destroying", "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("missing grace"),
        "{v}"
    );
}

#[tokio::test]
async fn workers_list_shows_each_workers_last_report() {
    let (_server, base, db) = serve().await;
    register(&db, "w2", "1.0").await;
    initialized(&db, "w1", "a", None, None).await;
    let report = VolumeReport {
        revision_seen: Some(1),
        volumes: vec![ReportedVolume {
            handle: h("a"),
            parent: None,
            state: VolumeState::Initialized,
            bytes: Some(4096),
        }],
        disk: Some(DiskReport {
            total_bytes: 1000,
            free_bytes: 50,
            free_inodes: 10,
            pressure: true,
            min_free_bytes: None,
        }),
        ..VolumeReport::default()
    };
    let resp = reqwest::Client::new()
        .put(format!("{base}/api/v1/workers/w1/volumes/report"))
        .json(&report)
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status().as_u16(), 204);
    let workers: Value = reqwest::get(format!("{base}/api/v1/workers"))
        .await
        .expect("workers")
        .json()
        .await
        .expect("json");
    let w1 = &workers[0];
    assert_eq!(w1["name"], "w1");
    let last = &w1["last_report"];
    assert_eq!(last["volumes"], 1, "{workers}");
    assert_eq!(last["volume_bytes"], 4096);
    assert_eq!(last["revision_seen"], 1);
    assert_eq!(last["pressure"], true);
    assert_eq!(last["disk_free_bytes"], 50);
    assert!(
        workers[1].get("last_report").is_none(),
        "w2 never reported: {workers}"
    );
}
