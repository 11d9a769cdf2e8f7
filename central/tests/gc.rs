//! The GC on a real PostgreSQL: garbage, subtrees, caches, base resource types, missing
//! volumes, idempotence and the advisory lock.

mod common;

use std::time::Duration;

use common::*;
use volume_central::gc::{self, PassOutcome, GC_LOCK};
use volume_central::store::{self, CreateVolume};

const HOUR: Duration = Duration::from_secs(3600);

async fn pass(db: &volume_central::Db) -> gc::GcStats {
    match gc::run_pass(db, HOUR).await.expect("gc pass") {
        PassOutcome::Ran(stats) => stats,
        PassOutcome::Locked => panic!("GC lock unexpectedly held"),
    }
}

#[tokio::test]
async fn marks_garbage_and_keeps_volumes_something_uses() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c1").await;
    container(&db, "w1", "c2").await;
    initialized(&db, "w1", "kept", None, Some("c1")).await;
    initialized(&db, "w1", "orphan", None, Some("c2")).await;
    store::delete_container(&db, "w1", "c2")
        .await
        .expect("delete");
    let stats = pass(&db).await;
    assert_eq!(stats.marked, 1);
    assert_eq!(state_of(&db, "kept").await.as_deref(), Some("initialized"));
    assert_eq!(state_of(&db, "orphan").await.as_deref(), Some("destroying"));
}

#[tokio::test]
async fn marks_a_chain_of_depth_ten_in_one_pass() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    let mut parent: Option<String> = None;
    for i in 0..10 {
        let handle = format!("v{i}");
        initialized(&db, "w1", &handle, parent.as_deref(), Some("c")).await;
        parent = Some(handle);
    }
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    let rev = revision(&db, "w1").await;
    let stats = pass(&db).await;
    assert_eq!(stats.marked, 10);
    for (handle, state, parent_state, _) in snapshot(&db).await {
        assert_eq!(state, "destroying", "{handle}");
        if handle != "v0" {
            assert_eq!(parent_state.as_deref(), Some("destroying"), "{handle}");
        }
    }
    assert!(
        revision(&db, "w1").await > rev,
        "revision bumped with the marking"
    );
}

#[tokio::test]
async fn does_not_mark_a_subtree_with_a_live_descendant() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "gone").await;
    container(&db, "w1", "live").await;
    initialized(&db, "w1", "root", None, Some("gone")).await;
    initialized(&db, "w1", "mid", Some("root"), Some("gone")).await;
    initialized(&db, "w1", "dead-leaf", Some("mid"), Some("gone")).await;
    initialized(&db, "w1", "live-leaf", Some("mid"), Some("live")).await;
    initialized(&db, "w1", "side", Some("root"), Some("gone")).await;
    store::delete_container(&db, "w1", "gone")
        .await
        .expect("delete");
    let stats = pass(&db).await;
    // root and mid have a live descendant; dead-leaf and side are whole garbage subtrees.
    assert_eq!(stats.marked, 2);
    assert_eq!(state_of(&db, "root").await.as_deref(), Some("initialized"));
    assert_eq!(state_of(&db, "mid").await.as_deref(), Some("initialized"));
    assert_eq!(
        state_of(&db, "live-leaf").await.as_deref(),
        Some("initialized")
    );
    assert_eq!(
        state_of(&db, "dead-leaf").await.as_deref(),
        Some("destroying")
    );
    assert_eq!(state_of(&db, "side").await.as_deref(), Some("destroying"));
    // Once the live leaf's container goes, the rest follows in one pass.
    store::delete_container(&db, "w1", "live")
        .await
        .expect("delete");
    assert_eq!(pass(&db).await.marked, 3);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM volumes WHERE state <> 'destroying'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn every_gc_step_applied_twice_gives_the_same_end_state() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    container(&db, "w1", "keep").await;
    initialized(&db, "w1", "a", None, Some("c")).await;
    initialized(&db, "w1", "b", Some("a"), Some("c")).await;
    initialized(&db, "w1", "k", None, Some("keep")).await;
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    let first = pass(&db).await;
    let after_first = snapshot(&db).await;
    let rev = revision(&db, "w1").await;
    // Each step alone, again, then the whole pass again: nothing more changes.
    assert_eq!(gc::delete_unused_caches(&db).await.expect("caches"), 0);
    assert_eq!(gc::mark_garbage(&db, HOUR).await.expect("mark"), (0, 0));
    let second = pass(&db).await;
    assert_eq!(first.marked, 2);
    assert_eq!(second, gc::GcStats::default());
    assert_eq!(snapshot(&db).await, after_first);
    assert_eq!(
        revision(&db, "w1").await,
        rev,
        "no-op passes do not bump the revision"
    );
}

/// A cache whose last use goes is retained (its volume kept); marked `drop`, it is
/// deleted at the next pass and its volumes become garbage, marked in the same pass.
#[tokio::test]
async fn unused_resource_caches_marked_drop_are_deleted_and_their_volumes_become_garbage() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    let cache = cache(&db, "v1", Some(7)).await;
    store::create_volume(
        &db,
        "w1",
        &CreateVolume {
            handle: h("cached"),
            parent: None,
            container: None,
            resource_cache: Some(cache),
            base_resource_type: None,
        },
    )
    .await
    .expect("volume");
    assert_eq!(
        pass(&db).await,
        gc::GcStats::default(),
        "a used cache stays"
    );
    store::delete_cache_use(&db, cache, 7)
        .await
        .expect("delete use");
    assert_eq!(
        pass(&db).await,
        gc::GcStats::default(),
        "an unused cache is retained while there is room"
    );
    assert_eq!(state_of(&db, "cached").await.as_deref(), Some("creating"));
    store::set_cache_retention(&db, cache, store::Retention::Drop)
        .await
        .expect("drop");
    let stats = pass(&db).await;
    assert_eq!(stats.caches_deleted, 1);
    assert_eq!(stats.evicted.dropped.caches, 1);
    assert_eq!(stats.marked, 1);
    assert_eq!(state_of(&db, "cached").await.as_deref(), Some("destroying"));
    assert_eq!(count(&db, "SELECT count(*) FROM resource_caches").await, 0);
}

#[tokio::test]
async fn a_new_base_resource_type_version_makes_old_volumes_garbage() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    store::create_volume(
        &db,
        "w1",
        &CreateVolume {
            handle: h("git-import"),
            parent: None,
            container: None,
            resource_cache: None,
            base_resource_type: Some("git".into()),
        },
    )
    .await
    .expect("volume");
    register(&db, "w1", "1.0").await; // same version again: nothing changes
    assert_eq!(pass(&db).await.marked, 0);
    register(&db, "w1", "2.0").await;
    assert_eq!(pass(&db).await.marked, 1);
    assert_eq!(
        state_of(&db, "git-import").await.as_deref(),
        Some("destroying")
    );
}

#[tokio::test]
async fn a_missing_volume_is_marked_destroying_only_after_the_grace() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    initialized(&db, "w1", "lost", None, Some("c")).await;
    let report = protocol::native::VolumeReport {
        missing: vec![h("lost")],
        ..Default::default()
    };
    store::apply_report(&db, "w1", &report)
        .await
        .expect("report");
    assert_eq!(pass(&db).await.marked, 0, "within the grace");
    let client = db.client().await.expect("client");
    client
        .execute(
            "UPDATE volumes SET missing_since = now() - interval '2 hours' WHERE handle = 'lost'",
            &[],
        )
        .await
        .expect("age");
    assert_eq!(pass(&db).await.marked, 1);
    assert_eq!(state_of(&db, "lost").await.as_deref(), Some("destroying"));
}

#[tokio::test]
async fn a_held_gc_lock_makes_passes_skip_until_released() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    initialized(&db, "w1", "g", None, Some("c")).await;
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    let holder = db.client().await.expect("client");
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&GC_LOCK])
        .await
        .expect("lock");
    let other =
        volume_central::Db::connect(_c.database_url.as_deref().expect("url"), 2).expect("pool");
    assert_eq!(
        gc::run_pass(&other, HOUR).await.expect("pass"),
        PassOutcome::Locked
    );
    assert_eq!(state_of(&db, "g").await.as_deref(), Some("initialized"));
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&GC_LOCK])
        .await
        .expect("unlock");
    assert!(matches!(
        gc::run_pass(&other, HOUR).await.expect("pass"),
        PassOutcome::Ran(ref s) if s.marked == 1
    ));
}

/// Two service instances on one database: while another session holds the GC lock,
/// neither instance's GC loop runs a pass; once released, the garbage is marked exactly
/// once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_service_instances_run_one_gc_at_a_time() {
    let (mut config, db) = fresh_db().await;
    config.gc_interval = Duration::from_millis(20);
    config.http_workers = 1;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "c").await;
    for i in 0..20 {
        initialized(&db, "w1", &format!("g{i}"), None, Some("c")).await;
    }
    store::delete_container(&db, "w1", "c")
        .await
        .expect("delete");
    let holder = db.client().await.expect("client");
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&GC_LOCK])
        .await
        .expect("lock");
    let a = volume_central::start(&config).await.expect("start a");
    let b = volume_central::start(&config).await.expect("start b");
    use volume_central::GcOutcome;
    wait_until(|| {
        a.metrics().gc_passes(GcOutcome::Locked) >= 3
            && b.metrics().gc_passes(GcOutcome::Locked) >= 3
    })
    .await;
    assert_eq!(a.metrics().gc_passes(GcOutcome::Ran), 0);
    assert_eq!(b.metrics().gc_passes(GcOutcome::Ran), 0);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM volumes WHERE state = 'destroying'"
        )
        .await,
        0
    );
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&GC_LOCK])
        .await
        .expect("unlock");
    wait_until(|| {
        a.metrics().gc_passes(GcOutcome::Ran) + b.metrics().gc_passes(GcOutcome::Ran) >= 4
    })
    .await;
    let marked = a.metrics().gc_marked.get() + b.metrics().gc_marked.get();
    assert_eq!(marked, 20, "each volume marked once across both instances");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM volumes WHERE state = 'destroying'"
        )
        .await,
        20
    );
    a.stop().await;
    b.stop().await;
}
