//! Cache retention across the whole system: volume-central on a real PostgreSQL and the
//! real agent binary on real files. A cache whose build ended stays on its worker and the
//! next build reuses it there; a worker whose agent reports pressure (its floor above the
//! free space) gets its least recently used retained caches evicted and destroyed, never
//! the one in use. On a small tmpfs, real bytes cross the agent's `min_free` and
//! volume-central frees exactly the least recently used retained caches it needs.
//! Harness: `e2e::system`.

use std::time::Instant;

use e2e::faults::{statvfs, Tmpfs};
use e2e::system::{Central, Owner, Worker};
use e2e::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn holders(central: &Central, cache: i64) -> Vec<String> {
    let v: Value = central
        .ok(
            Method::GET,
            &format!("/resource-caches/{cache}/workers"),
            None,
        )
        .await;
    v["workers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w["worker"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Worker `w1` registers base resource type `git`; a resource config on it.
async fn git_config(central: &Central, w: &Worker) -> i64 {
    w.set_base_resource_type("git", "1.0");
    eventually("git registered", || async {
        central.base_type_version("w1", "git").await.as_deref() == Some("1.0")
    })
    .await;
    central.resource_config("git", "repo").await
}

#[actix_rt::test]
async fn retained_cache_is_reused_by_the_next_build_on_its_worker() {
    let central = Central::start().await;
    let w = Worker::start_with(&central, "w1", "min_free = \"0%\"\n").await;
    let config = git_config(&central, &w).await;
    let cache = central.resource_cache(config, "v1", 1).await;
    w.volume(&central, "cache-v1", None, Owner::ResourceCache(cache))
        .await;
    // Build 1 ends: the cache stays, on disk and in the lookup.
    central.end_cache_use(cache, 1).await;
    central.wait_gc_passes(3).await;
    assert_eq!(w.local.handles().await, ["cache-v1"]);
    assert_eq!(holders(&central, cache).await, ["w1"]);
    // Build 2 is placed where the cache is and starts from it (a copy-on-write child).
    central.add_cache_use(cache, 2).await;
    central.container("w1", "build-2").await;
    w.volume(
        &central,
        "build-2-src",
        Some("cache-v1"),
        Owner::Container("build-2"),
    )
    .await;
    central.end_container("w1", "build-2").await;
    central.end_cache_use(cache, 2).await;
    eventually("build 2's volume goes, the cache stays", || async {
        w.local.handles().await == ["cache-v1"] && central.handles("w1").await == ["cache-v1"]
    })
    .await;
    assert_eq!(w.data_of("cache-v1").as_deref(), Some("cache-v1"));
}

#[actix_rt::test]
async fn pressure_reported_by_the_agent_evicts_lru_retained_caches_never_one_in_use() {
    let central = Central::start().await;
    // Every disk is below a 100 % floor: the agent reports pressure and its floor (the
    // whole disk), so every retained cache must go, least recently used first.
    let w = Worker::start_with(&central, "w1", "min_free = \"100%\"\n").await;
    let config = git_config(&central, &w).await;
    let used = central.resource_cache(config, "in-use", 1).await;
    let old = central.resource_cache(config, "old", 2).await;
    w.volume(&central, "cache-used", None, Owner::ResourceCache(used))
        .await;
    w.volume(&central, "cache-old", None, Owner::ResourceCache(old))
        .await;
    eventually("pressure reported", || async {
        let v = central.ok(Method::GET, "/workers/w1/retention", None).await;
        v["pressure"] == json!(true) && v["effective_min_free"].as_i64().unwrap_or(0) > 0
    })
    .await;
    central.end_cache_use(old, 2).await;
    eventually("the retained cache is evicted and destroyed", || async {
        w.local.handles().await == ["cache-used"] && central.handles("w1").await == ["cache-used"]
    })
    .await;
    central.wait_gc_passes(3).await;
    assert_eq!(w.local.handles().await, ["cache-used"], "in use: kept");
    let v = central.ok(Method::GET, "/workers/w1/retention", None).await;
    assert_eq!(v["evictions"], 1, "{v}");
    assert_eq!(holders(&central, used).await, ["w1"]);
    // Evicted from its only worker, the cache has nothing left to retain: it is deleted.
    assert_eq!(central.resource_cache_ids().await, [used]);
}

const MIB: u64 = 1 << 20;

async fn retention_of(central: &Central, worker: &str) -> Value {
    central
        .ok(Method::GET, &format!("/workers/{worker}/retention"), None)
        .await
}

/// Bytes of `cache` on its first holder, as the agent last measured them.
async fn cache_bytes(central: &Central, cache: i64) -> u64 {
    let v: Value = central
        .ok(
            Method::GET,
            &format!("/resource-caches/{cache}/workers"),
            None,
        )
        .await;
    v["workers"][0]["bytes"].as_u64().unwrap_or(0)
}

#[actix_rt::test]
async fn pressure_on_a_small_tmpfs_evicts_lru_caches_until_free_above_min_free() {
    let central = Central::start().await;
    let data = tempfile::tempdir().expect("tempdir");
    // The agent's volumes root is a 64 MiB tmpfs; `disk` unmounts it when it drops, after
    // the worker (declared later, so dropped first), also when an assertion fails.
    let disk = match Tmpfs::mount(&data.path().join("volumes"), "64m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!(
                "skipped pressure_on_a_small_tmpfs_evicts_lru_caches_until_free_above_min_free: \
                 cannot mount a tmpfs here ({why}); it needs root"
            );
            return;
        }
    };
    let w = Worker::start_on(
        &central,
        "w1",
        "min_free = \"16MiB\"\n",
        Some(data.path().to_owned()),
    )
    .await;
    let config = git_config(&central, &w).await;

    // The least recently used of all: a retained cache (4 MiB) with a live child, the
    // copy-on-write volume of a build still running (a naive copy: 4 MiB more).
    let parent = central.resource_cache(config, "parent", 1).await;
    w.volume(&central, "cache-parent", None, Owner::ResourceCache(parent))
        .await;
    w.fill("cache-parent", "data", 4 << 20);
    central.container("w1", "build-child").await;
    w.volume(
        &central,
        "child",
        Some("cache-parent"),
        Owner::Container("build-child"),
    )
    .await;
    central.end_cache_use(parent, 1).await;
    // A cache build 2 uses for the whole test (6 MiB).
    let used = central.resource_cache(config, "used", 2).await;
    w.volume(&central, "cache-used", None, Owner::ResourceCache(used))
        .await;
    w.fill("cache-used", "data", 6 << 20);
    // Four caches of 6 MiB, made v1..v4; their builds end v3, v1, v4, v2: least recently
    // used first, v3 and v1.
    let mut caches = Vec::new();
    for (i, version) in ["v1", "v2", "v3", "v4"].into_iter().enumerate() {
        let build = 10 + i as i64;
        let id = central.resource_cache(config, version, build).await;
        let handle = format!("cache-{version}");
        w.volume(&central, &handle, None, Owner::ResourceCache(id))
            .await;
        w.fill(&handle, "data", 6 << 20);
        caches.push((id, build));
    }
    for i in [2, 0, 3, 1] {
        let (id, build) = caches[i];
        central.end_cache_use(id, build).await;
    }
    // 38 MiB used of 64: above the 16 MiB floor, every cache measured.
    eventually("every cache measured, no pressure", || async {
        let mut measured = cache_bytes(&central, parent).await >= 4 * MIB
            && cache_bytes(&central, used).await >= 6 * MIB;
        for (id, _) in &caches {
            measured = measured && cache_bytes(&central, *id).await >= 6 * MIB;
        }
        let v = retention_of(&central, "w1").await;
        measured && v["pressure"] == json!(false) && v["effective_min_free"] == json!(16 * MIB)
    })
    .await;
    central.wait_gc_passes(2).await;
    assert_eq!(retention_of(&central, "w1").await["evictions"], 0);

    // A build writes 20 MiB: about 6 MiB stay free, 10 MiB short of the floor.
    central.container("w1", "build-big").await;
    w.volume(&central, "scratch", None, Owner::Container("build-big"))
        .await;
    w.fill("scratch", "data", 20 << 20);
    let (_, free_after_write) = statvfs(&disk.path);
    assert!(free_after_write < 16 * MIB, "{free_after_write} bytes free");
    eventually("the agent reports pressure", || async {
        retention_of(&central, "w1").await["pressure"] == json!(true)
    })
    .await;
    let pressure_seen = Instant::now();
    let since: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(retention_of(&central, "w1").await["pressure_since"].clone())
            .expect("pressure_since while under pressure");
    eventually("space freed above min_free", || async {
        statvfs(&disk.path).1 >= 16 * MIB
    })
    .await;
    let freed = chrono::Utc::now() - since;
    eventually(
        "the LRU caches are destroyed and pressure clears",
        || async {
            let v = retention_of(&central, "w1").await;
            v["pressure"] == json!(false) && !w.local.handles().await.contains(&"cache-v1".into())
        },
    )
    .await;
    let cleared_seen = pressure_seen.elapsed();
    // Several more passes and reports: nothing else goes.
    central.wait_gc_passes(5).await;
    let reports = "volume_agent_central_requests_total{endpoint=\"report\",outcome=\"ok\"}";
    let sent = w.local.metric(reports).await.unwrap_or(0.0);
    w.local
        .wait_counter("3 more reports", reports, sent + 3.0)
        .await;
    central.wait_gc_passes(3).await;

    let kept = [
        "cache-parent",
        "cache-used",
        "cache-v2",
        "cache-v4",
        "child",
        "scratch",
    ];
    assert_eq!(w.local.handles().await, kept, "only v3 and v1 evicted");
    assert_eq!(central.handles("w1").await, kept);
    let mut destroyed = w.destroyed_in_order();
    destroyed.sort();
    assert_eq!(destroyed, ["cache-v1", "cache-v3"]);
    let (_, free) = statvfs(&disk.path);
    assert!(free >= 16 * MIB, "free space back above min_free: {free}");
    let v = retention_of(&central, "w1").await;
    assert_eq!(v["pressure"], json!(false), "{v}");
    assert_eq!(v["evictions"], 2, "{v}");
    assert_eq!(holders(&central, parent).await, ["w1"], "live child: kept");
    assert_eq!(holders(&central, used).await, ["w1"], "in use: kept");

    let cleared = "volume_central_pressure_cleared_seconds";
    let count = central.metric(&format!("{cleared}_count")).await;
    let sum = central.metric(&format!("{cleared}_sum")).await;
    assert!(count.unwrap_or(0.0) >= 1.0, "{cleared}: {count:?}");
    println!(
        "pressure reported -> space freed: {:.3} s; -> pressure cleared: {:.3} s by {cleared} \
         ({} episode(s)), {:.3} s seen by the test; GC interval 0.300 s, poll interval 0.200 s, \
         report interval 0.300 s; 12 MiB evicted (two 6 MiB caches) on a 64 MiB tmpfs, \
         min_free 16 MiB",
        freed.num_milliseconds() as f64 / 1000.0,
        sum.unwrap_or(0.0) / count.unwrap_or(1.0),
        count.unwrap_or(0.0),
        cleared_seen.as_secs_f64(),
    );
}
