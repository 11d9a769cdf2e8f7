//! The seed's race on a real PostgreSQL: many concurrent attempts to create a
//! copy-on-write child while the GC marks its parent (and the parent's subtree)
//! `destroying`. Never both succeed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use volume_central::gc::{self, PassOutcome};
use volume_central::{store, Db, Error};

const ATTEMPTS: usize = 100;
const ROUNDS: usize = 8;

/// Children created under `handle` (any depth).
async fn live_descendants(db: &Db, handle: &str) -> i64 {
    let client = db.client().await.expect("client");
    client
        .query_one(
            "WITH RECURSIVE sub(id) AS (
                 SELECT id FROM volumes WHERE handle = $1
                 UNION SELECT v.id FROM volumes v JOIN sub ON v.parent_id = sub.id)
             SELECT count(*) FROM volumes v JOIN sub USING (id)
              WHERE v.handle <> $1 AND v.state <> 'destroying'",
            &[&handle],
        )
        .await
        .expect("descendants")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn child_inserts_racing_the_gc_never_both_succeed() {
    let (_config, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    let (mut gc_won, mut children_won, mut skipped) = (0, 0, 0);
    for round in 0..ROUNDS {
        // A garbage chain grand -> parent; children race the GC under either of them.
        let gone = format!("gone{round}");
        let live = format!("live{round}");
        container(&db, "w1", &gone).await;
        container(&db, "w1", &live).await;
        let grand = format!("grand{round}");
        let parent = format!("parent{round}");
        initialized(&db, "w1", &grand, None, Some(&gone)).await;
        initialized(&db, "w1", &parent, Some(&grand), Some(&gone)).await;
        store::delete_container(&db, "w1", &gone)
            .await
            .expect("delete");

        let barrier = Arc::new(tokio::sync::Barrier::new(ATTEMPTS + 2));
        let mut tasks = Vec::new();
        for i in 0..ATTEMPTS {
            let (db, barrier, live) = (db.clone(), barrier.clone(), live.clone());
            let under = if i % 2 == 0 {
                parent.clone()
            } else {
                grand.clone()
            };
            let child = format!("r{round}-c{i}");
            // Staggered starts, later in some rounds, so that some children start before,
            // some during and some after the GC's marking transaction.
            let delay = Duration::from_millis([0, 4, 8, 16][round % 4])
                + Duration::from_micros(i as u64 * 100);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                tokio::time::sleep(delay).await;
                let res = volume(&db, "w1", &child, Some(&under), Some(&live)).await;
                (child, under, res)
            }));
        }
        let mut gcs = Vec::new();
        for _ in 0..2 {
            let (db, barrier) = (db.clone(), barrier.clone());
            gcs.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut outcomes = Vec::new();
                for _ in 0..3 {
                    outcomes.push(gc::run_pass(&db, Duration::from_secs(3600)).await);
                    tokio::task::yield_now().await;
                }
                outcomes
            }));
        }
        let mut created = Vec::new();
        for t in tasks {
            let (child, under, res) = t.await.expect("task");
            match res {
                Ok(row) => {
                    assert_eq!(row.state.as_str(), "creating");
                    created.push((child, under));
                }
                Err(Error::Conflict(msg)) => {
                    assert!(
                        msg.contains("being destroyed") || msg.contains("not initialized"),
                        "{msg}"
                    );
                }
                Err(other) => panic!("unexpected error creating {child}: {other}"),
            }
        }
        for g in gcs {
            for outcome in g.await.expect("gc task") {
                match outcome {
                    Ok(PassOutcome::Ran(stats)) => skipped += stats.skipped,
                    Ok(PassOutcome::Locked) => {}
                    Err(err) => panic!("GC pass failed: {err}"),
                }
            }
        }
        // One more quiet pass: whatever can be marked now is.
        gc::run_pass(&db, Duration::from_secs(3600))
            .await
            .expect("final pass");

        // No live row points at a destroying parent, and parent_state always matches.
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM volumes c JOIN volumes p ON p.id = c.parent_id
                  WHERE p.state = 'destroying' AND c.state <> 'destroying'"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM volumes c JOIN volumes p ON p.id = c.parent_id
                  WHERE c.parent_state <> p.state"
            )
            .await,
            0
        );
        // Every created child exists and is live; its ancestors were not marked.
        for (child, under) in &created {
            assert_eq!(
                state_of(&db, child).await.as_deref(),
                Some("creating"),
                "{child}"
            );
            assert_ne!(
                state_of(&db, under).await.as_deref(),
                Some("destroying"),
                "{under}"
            );
        }
        let grand_state = state_of(&db, &grand).await;
        let parent_state = state_of(&db, &parent).await;
        if grand_state.as_deref() == Some("destroying") {
            assert_eq!(live_descendants(&db, &grand).await, 0);
            assert!(created.is_empty());
            assert_eq!(parent_state.as_deref(), Some("destroying"));
            gc_won += 1;
        } else {
            // A child was created first: the subtree has a live descendant and stays.
            assert!(!created.is_empty());
            if parent_state.as_deref() == Some("destroying") {
                assert_eq!(live_descendants(&db, &parent).await, 0);
                assert!(created.iter().all(|(_, under)| *under == grand));
            }
            children_won += 1;
        }
    }
    println!(
        "rounds: GC first {gc_won}, children first {children_won}; subtrees skipped after a lost race: {skipped}"
    );
}

/// Over HTTP the loser of the race gets 409.
#[tokio::test]
async fn creating_a_child_of_a_destroying_parent_is_409() {
    let (config, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    initialized(&db, "w1", "p", None, Some("c")).await;
    volume(&db, "w1", "creating-parent", None, Some("c"))
        .await
        .expect("volume");
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    gc::run_pass(&db, Duration::from_secs(3600))
        .await
        .expect("pass");
    assert_eq!(state_of(&db, "p").await.as_deref(), Some("destroying"));
    let server = start_server(&config).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/workers/w1/volumes", server.url());
    for (parent, expect) in [("p", 409), ("creating-parent", 409), ("nope", 404)] {
        let resp = client
            .post(&url)
            .json(&serde_json::json!({"handle": format!("child-of-{parent}"), "parent": parent}))
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status().as_u16(), expect, "parent {parent}");
    }
    server.stop().await;
}

/// Waits until some backend waits on a lock (the other side of the race is blocked).
async fn wait_for_lock_waiter(db: &Db) {
    for _ in 0..6000 {
        let n = count(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .await;
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nobody waited on a lock within a minute");
}

/// The child insert holds its parent's key-share lock when the GC's marking starts; it
/// commits first, so the GC's transaction fails at commit and the subtree is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_committing_first_makes_the_gc_skip_the_subtree() {
    let (_config, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "gone").await;
    container(&db, "w1", "live").await;
    initialized(&db, "w1", "grand", None, Some("gone")).await;
    initialized(&db, "w1", "parent", Some("grand"), Some("gone")).await;
    initialized(&db, "w1", "other", None, Some("gone")).await;
    store::delete_container(&db, "w1", "gone")
        .await
        .expect("delete");
    let mut client = db.client().await.expect("client");
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO volumes (handle, worker_name, parent_id, parent_state, container_id)
         SELECT 'child', 'w1', p.id, 'initialized', c.id
           FROM volumes p, containers c WHERE p.handle = 'parent' AND c.handle = 'live'",
        &[],
    )
    .await
    .expect("insert child");
    let gc_db = db.clone();
    let gc = tokio::spawn(async move { gc::mark_garbage(&gc_db, Duration::from_secs(3600)).await });
    wait_for_lock_waiter(&db).await;
    tx.commit().await.expect("child commits first");
    let (marked, skipped) = gc.await.expect("gc task").expect("gc");
    assert_eq!(
        (marked, skipped),
        (1, 0),
        "the fallback sees the live child, keeps its subtree and marks the other garbage"
    );
    assert_eq!(state_of(&db, "other").await.as_deref(), Some("destroying"));
    assert_eq!(state_of(&db, "grand").await.as_deref(), Some("initialized"));
    assert_eq!(
        state_of(&db, "parent").await.as_deref(),
        Some("initialized")
    );
    assert_eq!(state_of(&db, "child").await.as_deref(), Some("creating"));
}

/// The GC's marking transaction holds the parent when the child insert starts; the GC
/// commits first, so the insert fails with 409 (Conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_committing_first_makes_the_child_insert_conflict() {
    let (_config, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "gone").await;
    container(&db, "w1", "live").await;
    initialized(&db, "w1", "grand", None, Some("gone")).await;
    initialized(&db, "w1", "parent", Some("grand"), Some("gone")).await;
    store::delete_container(&db, "w1", "gone")
        .await
        .expect("delete");
    // What a GC pass does for this subtree, held open.
    let mut client = db.client().await.expect("client");
    let tx = client.transaction().await.expect("begin");
    tx.batch_execute(
        "SET CONSTRAINTS volumes_parent_fkey DEFERRED;
         UPDATE volumes SET state = 'destroying' WHERE handle IN ('grand', 'parent');
         UPDATE volumes SET parent_state = 'destroying' WHERE handle = 'parent';",
    )
    .await
    .expect("mark");
    let child_db = db.clone();
    let child = tokio::spawn(async move {
        volume(&child_db, "w1", "child", Some("parent"), Some("live")).await
    });
    wait_for_lock_waiter(&db).await;
    tx.commit().await.expect("GC commits first");
    match child.await.expect("task") {
        Err(Error::Conflict(msg)) => assert!(msg.contains("being destroyed"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(state_of(&db, "child").await, None);
}
