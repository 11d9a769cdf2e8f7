//! Cache retention across the whole system: volume-central on a real PostgreSQL and the
//! real agent binary on real files. A cache whose build ended stays on its worker and the
//! next build reuses it there; a worker whose agent reports pressure (its floor above the
//! free space) gets its least recently used retained caches evicted and destroyed, never
//! the one in use. Harness: `e2e::system`.

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

#[actix_rt::test]
async fn retained_cache_is_reused_by_the_next_build_on_its_worker() {
    let central = Central::start().await;
    let w = Worker::start_with(&central, "w1", "min_free = \"0%\"\n").await;
    w.set_base_resource_type("git", "1.0");
    eventually("git registered", || async {
        central.base_type_version("w1", "git").await.as_deref() == Some("1.0")
    })
    .await;
    let config = central.resource_config("git", "repo").await;
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
    w.set_base_resource_type("git", "1.0");
    eventually("git registered", || async {
        central.base_type_version("w1", "git").await.as_deref() == Some("1.0")
    })
    .await;
    let config = central.resource_config("git", "repo").await;
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
