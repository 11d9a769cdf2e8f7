//! Cache retention, per-worker budgets and pressure eviction on a real PostgreSQL: a
//! cache whose last use goes is retained, a new use revives it, `drop` deletes it, the GC
//! evicts least recently used retained caches from a worker under pressure or over its
//! budget (never one in use or with a live child), an eviction racing a new use never
//! destroys the revived cache, and `why` and the lookup explain it all.

mod common;

use std::time::Duration;

use common::*;
use protocol::native::{DiskReport, ReportedVolume, VolumeReport};
use protocol::VolumeState;
use serde_json::{json, Value};
use volume_central::gc::{self, Budgets, EvictReason, GcSettings, GcStats};
use volume_central::store::{self, CreateVolume, Retention, SetWorkerRetention};
use volume_central::Db;

const HOUR: Duration = Duration::from_secs(3600);

async fn pass_with(db: &Db, budgets: Budgets) -> GcStats {
    gc_pass_with(
        db,
        &GcSettings {
            missing_grace: HOUR,
            budgets,
        },
    )
    .await
}

async fn pass(db: &Db) -> GcStats {
    pass_with(db, Budgets::default()).await
}

/// A report from `worker` measuring `volumes` (handle, bytes), with its disk figures.
async fn report(db: &Db, worker: &str, volumes: &[(&str, u64)], free: u64, pressure: bool) {
    let report = VolumeReport {
        revision_seen: None,
        volumes: volumes
            .iter()
            .map(|(handle, bytes)| ReportedVolume {
                handle: h(handle),
                parent: None,
                state: VolumeState::Initialized,
                bytes: Some(*bytes),
            })
            .collect(),
        disk: Some(DiskReport {
            total_bytes: 1 << 30,
            free_bytes: free,
            free_inodes: 1000,
            pressure,
            min_free_bytes: None,
        }),
        ..VolumeReport::default()
    };
    store::apply_report(db, worker, &report)
        .await
        .expect("report");
    store::record_report_figures(db, worker, &store::ReportFigures::new(&report))
        .await
        .expect("figures");
}

async fn set_budgets(db: &Db, worker: &str, cache_budget: Option<u64>, min_free: Option<u64>) {
    store::set_worker_retention(
        db,
        worker,
        &SetWorkerRetention {
            cache_budget,
            min_free,
        },
        &Budgets::default(),
    )
    .await
    .expect("budgets");
}

/// Makes `cache` look last used `minutes` ago.
async fn last_used(db: &Db, cache: i64, minutes: i32) {
    let client = db.client().await.expect("client");
    client
        .execute(
            "UPDATE resource_caches SET last_used_at = now() - make_interval(mins => $2)
              WHERE id = $1",
            &[&cache, &minutes],
        )
        .await
        .expect("age cache");
}

async fn cache_of(db: &Db, handle: &str) -> Option<i64> {
    let client = db.client().await.expect("client");
    client
        .query_one(
            "SELECT resource_cache_id FROM volumes WHERE handle = $1",
            &[&handle],
        )
        .await
        .expect("volume")
        .get(0)
}

async fn retained_since_set(db: &Db, cache: i64) -> Option<bool> {
    let client = db.client().await.expect("client");
    client
        .query_opt(
            "SELECT retained_since IS NOT NULL FROM resource_caches WHERE id = $1",
            &[&cache],
        )
        .await
        .expect("cache")
        .map(|r| r.get(0))
}

/// Retained bytes on `worker` counted from the rows (not the GC's figure).
async fn retained_bytes(db: &Db, worker: &str) -> i64 {
    let client = db.client().await.expect("client");
    client
        .query_one(
            "SELECT COALESCE(sum(v.bytes), 0)::bigint FROM volumes v
               JOIN resource_caches rc ON rc.id = v.resource_cache_id
              WHERE v.worker_name = $1 AND v.state <> 'destroying'
                AND rc.retained_since IS NOT NULL",
            &[&worker],
        )
        .await
        .expect("retained bytes")
        .get(0)
}

#[tokio::test]
async fn retains_cache_after_last_use_goes() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    let c = cache(&db, "v1", Some(7)).await;
    cache_volume(&db, "w1", "cached", c).await;
    assert_eq!(retained_since_set(&db, c).await, Some(false), "in use");
    store::delete_cache_use(&db, c, 7).await.expect("use goes");
    assert_eq!(retained_since_set(&db, c).await, Some(true), "retained");
    let stats = pass(&db).await;
    assert_eq!(
        stats,
        GcStats::default(),
        "nothing to evict without a limit"
    );
    assert_eq!(cache_of(&db, "cached").await, Some(c));
    assert_eq!(
        state_of(&db, "cached").await.as_deref(),
        Some("initialized")
    );
}

#[tokio::test]
async fn new_use_revives_retained_cache() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    let c = cache(&db, "v1", Some(7)).await;
    cache_volume(&db, "w1", "cached", c).await;
    store::delete_cache_use(&db, c, 7).await.expect("use goes");
    last_used(&db, c, 60).await;
    pass(&db).await;
    store::add_cache_use(&db, c, 8).await.expect("new use");
    assert_eq!(retained_since_set(&db, c).await, Some(false), "revived");
    let fresh = count(
        &db,
        &format!(
            "SELECT count(*) FROM resource_caches WHERE id = {c} AND last_used_at > now() - interval '1 minute'"
        ),
    )
    .await;
    assert_eq!(fresh, 1, "a new use updates last-used");
    // Two uses going at once: the cache is retained once both are gone, whatever the order.
    store::add_cache_use(&db, c, 9).await.expect("use");
    let (a, b) = tokio::join!(
        store::delete_cache_use(&db, c, 8),
        store::delete_cache_use(&db, c, 9)
    );
    a.expect("delete 8");
    b.expect("delete 9");
    assert_eq!(retained_since_set(&db, c).await, Some(true));
}

#[tokio::test]
async fn drop_mark_deletes_at_next_pass() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    let c = cache(&db, "v1", Some(7)).await;
    cache_volume(&db, "w1", "cached", c).await;
    report(&db, "w1", &[("cached", 4096)], 1 << 29, false).await;
    store::set_cache_retention(&db, c, Retention::Drop)
        .await
        .expect("drop");
    assert_eq!(pass(&db).await, GcStats::default(), "in use: stays");
    store::delete_cache_use(&db, c, 7).await.expect("use goes");
    let stats = pass(&db).await;
    assert_eq!(stats.caches_deleted, 1);
    assert_eq!(stats.marked, 1);
    assert_eq!(stats.evicted.dropped.caches, 1);
    assert_eq!(stats.evicted.dropped.bytes, 4096);
    assert_eq!(state_of(&db, "cached").await.as_deref(), Some("destroying"));
    assert_eq!(count(&db, "SELECT count(*) FROM resource_caches").await, 0);
    // A retained cache no volume holds any more goes too (nothing left to retain).
    let empty = cache(&db, "v2", None).await;
    assert_eq!(retained_since_set(&db, empty).await, Some(true));
    assert_eq!(pass(&db).await.caches_deleted, 1);
}

#[tokio::test]
async fn evicts_lru_retained_caches_under_pressure_until_free_above_min_free() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    register(&db, "w2", "1.0").await;
    let mut caches = Vec::new();
    for i in 0..5 {
        let c = cache(&db, &format!("v{i}"), None).await;
        cache_volume(&db, "w1", &format!("a{i}"), c).await;
        // The same cache on a worker with room: it stays there.
        cache_volume(&db, "w2", &format!("b{i}"), c).await;
        // a0 is the least recently used, a4 the most.
        last_used(&db, c, 100 - i).await;
        caches.push(c);
    }
    let vols: Vec<(String, u64)> = (0..5).map(|i| (format!("a{i}"), 100)).collect();
    let vols: Vec<(&str, u64)> = vols.iter().map(|(h, b)| (h.as_str(), *b)).collect();
    set_budgets(&db, "w1", None, Some(300)).await;
    // 50 free, 300 wanted: 250 must go, so the three oldest (100 bytes each).
    report(&db, "w1", &vols, 50, true).await;
    report(&db, "w2", &[("b0", 100)], 1 << 29, false).await;
    let stats = pass(&db).await;
    assert_eq!(stats.evicted.pressure.caches, 3, "{stats:?}");
    assert_eq!(stats.evicted.pressure.bytes, 300);
    assert_eq!(stats.evicted.budget.caches, 0);
    for i in 0..3 {
        let hd = format!("a{i}");
        assert_eq!(
            state_of(&db, &hd).await.as_deref(),
            Some("destroying"),
            "{hd}"
        );
    }
    for (i, c) in caches.iter().enumerate().skip(3) {
        let hd = format!("a{i}");
        assert_eq!(
            state_of(&db, &hd).await.as_deref(),
            Some("initialized"),
            "{hd}"
        );
        assert_eq!(cache_of(&db, &hd).await, Some(*c));
    }
    for i in 0..5 {
        let hd = format!("b{i}");
        assert_eq!(
            state_of(&db, &hd).await.as_deref(),
            Some("initialized"),
            "{hd}"
        );
    }
    // The caches themselves stay: w2 still holds them.
    assert_eq!(count(&db, "SELECT count(*) FROM resource_caches").await, 5);
    // Until the worker reports the space back, what it is destroying counts as freed:
    // the next pass evicts nothing more.
    assert_eq!(pass(&db).await.evicted, Default::default());
    // The worker destroys them and reports free space above min_free: nothing more goes.
    let report_done = VolumeReport {
        destroyed: vec![h("a0"), h("a1"), h("a2")],
        disk: Some(DiskReport {
            total_bytes: 1 << 30,
            free_bytes: 350,
            free_inodes: 1000,
            pressure: false,
            min_free_bytes: None,
        }),
        ..VolumeReport::default()
    };
    store::apply_report(&db, "w1", &report_done)
        .await
        .expect("report");
    let cleared = store::record_report_figures(&db, "w1", &store::ReportFigures::new(&report_done))
        .await
        .expect("figures");
    assert!(cleared.is_some(), "the report clears the pressure");
    assert_eq!(pass(&db).await.evicted, Default::default());
    assert_eq!(state_of(&db, "a3").await.as_deref(), Some("initialized"));
    let view = store::worker_retention(&db, "w1", &Budgets::default())
        .await
        .expect("view");
    assert_eq!(view.retained_bytes, Some(200));
    assert_eq!(view.evictions, 3);
    assert_eq!(view.evicted_bytes, 300);
    assert_eq!(view.effective_min_free, Some(300));
    assert_eq!(view.pressure_since, None);
}

#[tokio::test]
async fn never_evicts_cache_in_use_or_with_live_child() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "task").await;
    let in_use = cache(&db, "in-use", Some(1)).await;
    cache_volume(&db, "w1", "used", in_use).await;
    let parent = cache(&db, "parent", None).await;
    cache_volume(&db, "w1", "with-child", parent).await;
    initialized(&db, "w1", "child", Some("with-child"), Some("task")).await;
    let held = cache(&db, "held", None).await;
    store::create_volume(
        &db,
        "w1",
        &CreateVolume {
            handle: h("in-container"),
            parent: None,
            container: Some("task".into()),
            resource_cache: Some(held),
            base_resource_type: None,
        },
    )
    .await
    .expect("volume");
    force_state(&db, "in-container", "initialized").await;
    let plain = cache(&db, "plain", None).await;
    cache_volume(&db, "w1", "plain", plain).await;
    for c in [in_use, parent, held, plain] {
        last_used(&db, c, 60).await;
    }
    // Everything is wanted: 1 TiB free asked for on a full disk.
    set_budgets(&db, "w1", Some(0), Some(1 << 40)).await;
    report(
        &db,
        "w1",
        &[
            ("used", 10),
            ("with-child", 10),
            ("in-container", 10),
            ("plain", 10),
        ],
        0,
        true,
    )
    .await;
    let stats = pass(&db).await;
    assert_eq!(stats.evicted.pressure.caches, 1, "{stats:?}");
    assert_eq!(state_of(&db, "plain").await.as_deref(), Some("destroying"));
    for hd in ["used", "with-child", "child", "in-container"] {
        assert_eq!(
            state_of(&db, hd).await.as_deref(),
            Some("initialized"),
            "{hd}"
        );
    }
    assert_eq!(cache_of(&db, "used").await, Some(in_use));
    assert_eq!(cache_of(&db, "with-child").await, Some(parent));
    assert_eq!(cache_of(&db, "in-container").await, Some(held));
    // Once the child goes, its parent's cache may go too.
    store::delete_container(&db, "w1", "task")
        .await
        .expect("container goes");
    pass(&db).await;
    assert_eq!(state_of(&db, "child").await.as_deref(), Some("destroying"));
    let stats = pass(&db).await;
    assert!(stats.evicted.pressure.caches >= 1, "{stats:?}");
    assert_eq!(
        state_of(&db, "with-child").await.as_deref(),
        Some("destroying")
    );
    assert_eq!(state_of(&db, "used").await.as_deref(), Some("initialized"));
}

#[tokio::test]
async fn budget_holds_across_100_builds() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    const BUDGET: i64 = 1_000;
    let budgets = Budgets {
        cache_budget: Some(BUDGET as u64),
        min_free: None,
    };
    let mut reused = None;
    for build in 0..100i64 {
        // Every fifth build reuses the cache of the one before (revived, then retained
        // again as the most recently used); the others fetch a version of their own.
        let (c, fresh) = match (build % 5, reused) {
            (0, Some(c)) if cache_of_any(&db, c).await => {
                store::add_cache_use(&db, c, build).await.expect("reuse");
                (c, false)
            }
            _ => (cache(&db, &format!("v{build}"), Some(build)).await, true),
        };
        if fresh {
            let handle = format!("v{build}");
            cache_volume(&db, "w1", &handle, c).await;
            report(&db, "w1", &[(handle.as_str(), 150)], 1 << 29, false).await;
        }
        store::delete_cache_use(&db, c, build)
            .await
            .expect("build ends");
        reused = Some(c);
        let stats = pass_with(&db, budgets).await;
        assert_eq!(stats.evicted.pressure.caches, 0);
        let held = retained_bytes(&db, "w1").await;
        assert!(held <= BUDGET, "after build {build}: {held} retained bytes");
        assert!(
            build < 10 || held > BUDGET - 150,
            "after build {build}: only {held} retained; the budget evicts no more than needed"
        );
        if let Some(c) = reused {
            assert!(
                cache_of_any(&db, c).await,
                "after build {build}: the most recently used cache {c} was evicted"
            );
        }
    }
    let view = store::worker_retention(&db, "w1", &budgets)
        .await
        .expect("view");
    assert!(view.retained_bytes.unwrap_or(0) <= BUDGET);
    assert_eq!(view.effective_cache_budget, Some(BUDGET));
}

/// Whether any live volume still holds `cache`.
async fn cache_of_any(db: &Db, cache: i64) -> bool {
    count(
        db,
        &format!(
            "SELECT count(*) FROM volumes WHERE resource_cache_id = {cache} AND state <> 'destroying'"
        ),
    )
    .await
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_racing_new_use_never_destroys_revived_cache() {
    let (_c, db) = fresh_db().await;
    register(&db, "w1", "1.0").await;
    container(&db, "w1", "task").await;
    set_budgets(&db, "w1", Some(0), Some(1 << 50)).await;

    // A use that comes between the decision and its application: nothing is evicted.
    let c = cache(&db, "between", None).await;
    cache_volume(&db, "w1", "between", c).await;
    report(&db, "w1", &[("between", 100)], 0, true).await;
    let decided = gc::decide_evictions(&db, &Budgets::default())
        .await
        .expect("decide");
    assert_eq!(decided.len(), 1);
    store::add_cache_use(&db, c, 1).await.expect("use");
    let done = gc::apply_evictions(&db, &decided).await.expect("apply");
    assert_eq!(done, Default::default());
    assert_eq!(cache_of(&db, "between").await, Some(c));

    // A use whose transaction is still open during a whole pass: skipped, then kept.
    store::delete_cache_use(&db, c, 1).await.expect("use goes");
    let mut holder = db.client().await.expect("client");
    let tx = holder.transaction().await.expect("tx");
    tx.execute(
        "INSERT INTO resource_cache_uses (resource_cache_id, build_id) VALUES ($1, 2)",
        &[&c],
    )
    .await
    .expect("use");
    let stats = pass(&db).await;
    assert_eq!(stats.evicted, Default::default(), "{stats:?}");
    tx.commit().await.expect("commit");
    assert_eq!(pass(&db).await.evicted, Default::default());
    assert_eq!(cache_of(&db, "between").await, Some(c));
    assert_eq!(
        state_of(&db, "between").await.as_deref(),
        Some("initialized")
    );

    // Many times at once: a pass, and a build that revives the cache and starts a
    // copy-on-write child of its volume.
    let mut outcomes = [0usize; 3];
    for i in 0..60i64 {
        let c = cache(&db, &format!("race{i}"), Some(10_000 + i)).await;
        let vol = format!("race{i}");
        cache_volume(&db, "w1", &vol, c).await;
        report(&db, "w1", &[(vol.as_str(), 100)], 0, true).await;
        store::delete_cache_use(&db, c, 10_000 + i)
            .await
            .expect("use goes");
        let gc_db = db.clone();
        let gc = tokio::spawn(async move { pass(&gc_db).await });
        let b_db = db.clone();
        let child = format!("child{i}");
        let vol2 = vol.clone();
        let build = tokio::spawn(async move {
            let used = store::add_cache_use(&b_db, c, 20_000 + i).await;
            let child_made = match &used {
                Ok(()) => store::create_volume(
                    &b_db,
                    "w1",
                    &CreateVolume {
                        handle: h(&child),
                        parent: Some(h(&vol2)),
                        container: Some("task".into()),
                        resource_cache: None,
                        base_resource_type: None,
                    },
                )
                .await
                .is_ok(),
                Err(_) => false,
            };
            (used.is_ok(), child_made)
        });
        gc.await.expect("gc task");
        let (used, child_made) = build.await.expect("build task");
        // Let the GC see the end state too.
        pass(&db).await;
        let state = state_of(&db, &vol).await;
        let holder = cache_of(&db, &vol).await;
        // Never: a volume that still holds its cache is destroyed.
        if holder.is_some() {
            assert_ne!(state.as_deref(), Some("destroying"), "iteration {i}");
            assert!(used, "iteration {i}: a kept cache came from a use");
        }
        // Never: a volume with a live child is destroyed (the seed's race).
        if child_made {
            assert_ne!(state.as_deref(), Some("destroying"), "iteration {i}");
        }
        // A use that succeeded revived a cache that still exists.
        if used {
            assert_eq!(
                retained_since_set(&db, c).await,
                Some(false),
                "iteration {i}"
            );
        }
        outcomes[match (holder.is_some(), child_made) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        }] += 1;
        // The build ends: the child goes, the cache is retained again and evicted.
        let _ = store::delete_cache_use(&db, c, 20_000 + i).await;
    }
    assert_eq!(outcomes.iter().sum::<usize>(), 60);
    eprintln!("kept with cache / held by child / evicted first: {outcomes:?}");
}

async fn serve() -> (volume_central::Server, String, Db) {
    let (mut config, db) = fresh_db().await;
    config.gc_interval = HOUR;
    let server = start_server(&config).await;
    let base = server.url();
    register(&db, "w1", "1.0").await;
    register(&db, "w2", "1.0").await;
    register(&db, "w3", "1.0").await;
    (server, base, db)
}

#[tokio::test]
async fn why_explains_eviction() {
    let (_server, base, db) = serve().await;
    let c = cache(&db, "v1", Some(1)).await;
    cache_volume(&db, "w1", "cached", c).await;
    report(&db, "w1", &[("cached", 2048)], 0, true).await;
    store::delete_cache_use(&db, c, 1).await.expect("use goes");
    let v: Value = reqwest::get(format!("{base}/api/v1/volumes/cached/why"))
        .await
        .expect("why")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "kept", "{v}");
    assert!(v["owners"][0]["retained_since"].is_string(), "{v}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("retained since"),
        "{v}"
    );
    let stats = pass(&db).await;
    assert_eq!(stats.evicted.get(EvictReason::Pressure).caches, 1);
    let v: Value = reqwest::get(format!("{base}/api/v1/volumes/cached/why"))
        .await
        .expect("why")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "destroying", "{v}");
    assert_eq!(v["eviction"]["reason"], "pressure", "{v}");
    assert_eq!(v["eviction"]["resource_cache"], c, "{v}");
    assert_eq!(v["eviction"]["bytes"], 2048, "{v}");
    assert!(v["eviction"]["at"].is_string(), "{v}");
    let text = v["explanation"].as_str().unwrap_or_default();
    for part in [
        "evicted under disk pressure on worker w1",
        "2048 bytes",
        &format!("resource cache {c}"),
    ] {
        assert!(text.contains(part), "{part}: {v}");
    }
}

#[tokio::test]
async fn lookup_answers_workers_holding_cache() {
    let (_server, base, db) = serve().await;
    let c = cache(&db, "v1", Some(1)).await;
    store::create_volume(
        &db,
        "w1",
        &CreateVolume {
            handle: h("on-w1"),
            parent: None,
            container: None,
            resource_cache: Some(c),
            base_resource_type: None,
        },
    )
    .await
    .expect("creating volume");
    cache_volume(&db, "w2", "on-w2", c).await;
    cache_volume(&db, "w3", "on-w3", c).await;
    force_state(&db, "on-w3", "destroying").await;
    report(&db, "w2", &[("on-w2", 777)], 1 << 29, false).await;
    let http = reqwest::Client::new();
    let v: Value = http
        .get(format!("{base}/api/v1/resource-caches/{c}/workers"))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(v["resource_cache"], c, "{v}");
    assert_eq!(v["retention"], "auto");
    assert_eq!(v["uses"], 1);
    assert!(v["retained_since"].is_null(), "in use: {v}");
    let workers: Vec<&str> = v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["worker"].as_str())
        .collect();
    // The worker with an initialized volume first; a volume being destroyed is not held.
    assert_eq!(workers, ["w2", "w1"], "{v}");
    assert_eq!(v["workers"][0]["bytes"], 777);
    assert_eq!(v["workers"][0]["volumes"][0]["handle"], "on-w2");

    // The scheduler's mark.
    let resp = http
        .put(format!("{base}/api/v1/resource-caches/{c}/retention"))
        .json(&json!({"retention": "keep"}))
        .send()
        .await
        .expect("mark");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["retention"], "keep");
    let resp = http
        .put(format!("{base}/api/v1/resource-caches/{c}/retention"))
        .json(&json!({"retention": "forever"}))
        .send()
        .await
        .expect("bad mark");
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap_or_default();
    assert!(text.contains("keep") && text.contains("drop"), "{text}");

    // Errors name the thing and the fix.
    let resp = http
        .get(format!("{base}/api/v1/resource-caches/999999/workers"))
        .send()
        .await
        .expect("unknown");
    assert_eq!(resp.status().as_u16(), 404);
    let text = resp.text().await.unwrap_or_default();
    assert!(
        text.contains("999999") && text.contains("POST /api/v1/resource-caches"),
        "{text}"
    );
    let resp = http
        .get(format!("{base}/api/v1/resource-caches/abc/workers"))
        .send()
        .await
        .expect("not a number");
    assert_eq!(resp.status().as_u16(), 400);

    // A worker's budgets.
    let resp = http
        .put(format!("{base}/api/v1/workers/w1/retention"))
        .json(&json!({"cache_budget": 5000, "min_free": 100}))
        .send()
        .await
        .expect("budgets");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = http
        .get(format!("{base}/api/v1/workers/w1/retention"))
        .send()
        .await
        .expect("view")
        .json()
        .await
        .expect("json");
    assert_eq!(v["cache_budget"], 5000, "{v}");
    assert_eq!(v["effective_min_free"], 100, "{v}");
    let resp = http
        .put(format!("{base}/api/v1/workers/nope/retention"))
        .json(&json!({"cache_budget": 1}))
        .send()
        .await
        .expect("unknown worker");
    assert_eq!(resp.status().as_u16(), 404);
    let resp = http
        .put(format!("{base}/api/v1/workers/w1/retention"))
        .json(&json!({"cache_budget": -1}))
        .send()
        .await
        .expect("negative");
    assert_eq!(resp.status().as_u16(), 400);
}
