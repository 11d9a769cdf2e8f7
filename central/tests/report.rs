//! Report handling: created-confirmation, destroyed rows (children first), missing.

mod common;

use common::*;
use protocol::native::{ReportedVolume, VolumeReport};
use protocol::{Handle, VolumeState};
use volume_central::{store, Error};

fn reported(handle: &str, state: VolumeState) -> ReportedVolume {
    ReportedVolume {
        handle: h(handle),
        parent: None,
        state,
        bytes: None,
    }
}

#[tokio::test]
async fn report_confirms_creating_rows_as_created() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    volume(&db, "w1", "a", None, Some("c")).await.expect("a");
    volume(&db, "w1", "b", None, Some("c")).await.expect("b");
    let rev = revision(&db, "w1").await;
    let report = VolumeReport {
        volumes: vec![reported("a", VolumeState::Created)],
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(out.confirmed, 1);
    assert_eq!(state_of(&db, "a").await.as_deref(), Some("created"));
    assert_eq!(state_of(&db, "b").await.as_deref(), Some("creating"));
    assert!(
        revision(&db, "w1").await > rev,
        "a confirmed create changes the desired set's revision"
    );
}

/// The update trigger once joined its transition tables, which have no statistics; a
/// nested-loop plan made a report confirming 100,000 creates run for minutes (the figure
/// is the benchmark's, `cargo bench -p volume-central -- report`). Its rewrite (migration
/// 3) must keep what the join did: the worker whose rows changed, and only it, gets a new
/// revision, and an update that changes nothing bumps none.
#[tokio::test]
async fn confirming_thousands_of_creates_bumps_only_that_workers_revision() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    register(&db, "w2", "1.0").await;
    container(&db, "w1", "c").await;
    container(&db, "w2", "c2").await;
    volume(&db, "w2", "other", None, Some("c2"))
        .await
        .expect("other");
    const N: usize = 5_000;
    db.client()
        .await
        .expect("client")
        .batch_execute(&format!(
            "INSERT INTO volumes (handle, worker_name, state, container_id)
             SELECT 'v-' || i, 'w1', 'creating', (SELECT id FROM containers WHERE handle = 'c')
               FROM generate_series(1, {N}) i"
        ))
        .await
        .expect("seed");
    let (rev1, rev2) = (revision(&db, "w1").await, revision(&db, "w2").await);
    let report = VolumeReport {
        volumes: (1..=N)
            .map(|i| reported(&format!("v-{i}"), VolumeState::Created))
            .collect(),
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(out.confirmed, N as u64);
    assert_eq!(
        count(&db, "SELECT count(*) FROM volumes WHERE state = 'created'").await,
        N as i64
    );
    assert!(revision(&db, "w1").await > rev1, "w1's rows changed");
    assert_eq!(revision(&db, "w2").await, rev2, "w2's rows did not change");
    // The same report again changes nothing, so the revision stays.
    let rev1 = revision(&db, "w1").await;
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("again");
    assert_eq!(out.confirmed, 0);
    assert_eq!(revision(&db, "w1").await, rev1);
}

#[tokio::test]
async fn report_deletes_destroyed_rows_children_first() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    initialized(&db, "w1", "root", None, Some("c")).await;
    initialized(&db, "w1", "mid", Some("root"), Some("c")).await;
    initialized(&db, "w1", "leaf", Some("mid"), Some("c")).await;
    initialized(&db, "w1", "other-root", None, Some("c")).await;
    initialized(&db, "w1", "other-child", Some("other-root"), Some("c")).await;
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    volume_central::gc::run_pass(&db, std::time::Duration::from_secs(3600))
        .await
        .expect("gc");
    let rev = revision(&db, "w1").await;
    // Parents listed before their children; other-root's child is not reported yet.
    let report = VolumeReport {
        destroyed: vec![h("root"), h("mid"), h("leaf"), h("other-root")],
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(out.deleted, 3);
    assert_eq!(out.kept_with_children, 1);
    for gone in ["root", "mid", "leaf"] {
        assert_eq!(state_of(&db, gone).await, None, "{gone}");
    }
    assert_eq!(
        state_of(&db, "other-root").await.as_deref(),
        Some("destroying")
    );
    assert!(revision(&db, "w1").await > rev);
    // The same report again changes nothing; the child's report then frees its parent.
    let after = snapshot(&db).await;
    let again = store::apply_report(&db, "w1", &report)
        .await
        .expect("again");
    assert_eq!(again.deleted, 0);
    assert_eq!(snapshot(&db).await, after);
    let report = VolumeReport {
        destroyed: vec![h("other-root"), h("other-child")],
        ..Default::default()
    };
    assert_eq!(
        store::apply_report(&db, "w1", &report)
            .await
            .expect("r")
            .deleted,
        2
    );
    assert_eq!(count(&db, "SELECT count(*) FROM volumes").await, 0);
}

#[tokio::test]
async fn missing_sets_missing_since_except_for_creating_rows_and_is_cleared_when_seen() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    initialized(&db, "w1", "gone", None, Some("c")).await;
    volume(&db, "w1", "young", None, Some("c"))
        .await
        .expect("young");
    let rev = revision(&db, "w1").await;
    let report = VolumeReport {
        missing: vec![h("gone"), h("young")],
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(out.marked_missing, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM volumes WHERE missing_since IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        revision(&db, "w1").await,
        rev,
        "missing_since alone is not in the desired set"
    );
    // Reported again: the first missing_since stays (the grace counts from it).
    let first = count(
        &db,
        "SELECT (extract(epoch FROM missing_since) * 1e6)::bigint FROM volumes WHERE handle = 'gone'",
    )
    .await;
    store::apply_report(&db, "w1", &report)
        .await
        .expect("again");
    let second = count(
        &db,
        "SELECT (extract(epoch FROM missing_since) * 1e6)::bigint FROM volumes WHERE handle = 'gone'",
    )
    .await;
    assert_eq!(first, second);
    // Seen again: cleared.
    let report = VolumeReport {
        volumes: vec![reported("gone", VolumeState::Initialized)],
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report).await.expect("seen");
    assert_eq!(out.cleared_missing, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM volumes WHERE missing_since IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn report_from_an_unknown_worker_is_not_found_and_creates_nothing() {
    let (_c, db) = fresh_db().await;
    let err = store::apply_report(&db, "stranger", &VolumeReport::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(count(&db, "SELECT count(*) FROM workers").await, 0);
}

/// A report of 50,000 present and 50,000 missing handles (the issue's stall) against
/// 50,000 rows, on one HTTP worker thread: `/healthz` keeps answering meanwhile and the
/// report is applied in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_a_large_report_is_applied() {
    let (mut config, db) = fresh_db().await;
    config.http_workers = 1;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    db.client()
        .await
        .expect("client")
        .batch_execute(
            "INSERT INTO volumes (handle, worker_name, state, container_id)
             SELECT 'v' || i, 'w1', 'initialized', (SELECT id FROM containers)
               FROM generate_series(1, 50000) i",
        )
        .await
        .expect("seed");
    let server = start_server(&config).await;
    let volumes: Vec<serde_json::Value> = (1..=50_000)
        .map(|i| serde_json::json!({"handle": format!("v{i}"), "parent": null, "state": "initialized"}))
        .collect();
    let missing: Vec<String> = (50_001..=100_000).map(|i| format!("m{i}")).collect();
    let body = serde_json::json!({"revision_seen": null, "volumes": volumes, "missing": missing});
    let client = reqwest::Client::new();
    let report = client
        .put(format!("{}/api/v1/workers/w1/volumes/report", server.url()))
        .json(&body)
        .send();
    let health = async {
        let mut answers = Vec::new();
        for _ in 0..20 {
            let resp = client
                .get(format!("{}/healthz", server.url()))
                .send()
                .await
                .expect("healthz");
            answers.push(resp.status().as_u16());
        }
        answers
    };
    let (report, answers) = tokio::join!(report, health);
    assert_eq!(report.expect("report").status().as_u16(), 204);
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM volumes WHERE worker_name = 'w1'").await,
        50_000
    );
    server.stop().await;
}

/// A chain 2,000 deep reported destroyed at once goes in one report (one statement, not
/// one per level), and a reported parent whose child was not reported stays.
#[tokio::test]
async fn a_deep_chain_reported_destroyed_is_deleted_in_one_report() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    db.client()
        .await
        .expect("client")
        .batch_execute(
            "INSERT INTO volumes (id, handle, worker_name, state, parent_id, parent_state)
             SELECT i, 'd' || i, 'w1', 'destroying',
                    CASE WHEN i > 1 THEN i - 1 END, CASE WHEN i > 1 THEN 'destroying' END
               FROM generate_series(1, 2000) i ORDER BY i;
             INSERT INTO volumes (id, handle, worker_name, state, parent_id, parent_state)
             VALUES (3000, 'kept-parent', 'w1', 'destroying', NULL, NULL),
                    (3001, 'live-child', 'w1', 'destroying', 3000, 'destroying');
             SELECT setval('volumes_id_seq', 3001);",
        )
        .await
        .expect("seed");
    let mut destroyed: Vec<Handle> = (1..=2000).map(|i| h(&format!("d{i}"))).collect();
    destroyed.push(h("kept-parent"));
    let report = VolumeReport {
        destroyed,
        ..Default::default()
    };
    let out = store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(out.deleted, 2000);
    assert_eq!(out.kept_with_children, 1);
    assert_eq!(
        snapshot(&db)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        ["kept-parent", "live-child"]
    );
}
