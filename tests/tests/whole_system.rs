//! The whole system on a real PostgreSQL: volume-central (in process, one or two
//! replicas) and the real agent binary on real files. Builds make containers, resource
//! caches and volumes; when nothing uses a volume any more the GC marks it (a whole
//! subtree at once), the agent destroys it child first, and the rows go.
//! Harness: `e2e::system`.

use e2e::system::{Central, Owner, Worker};
use e2e::*;
use futures::future::join;
use reqwest::Method;
use serde_json::{json, Value};

#[actix_rt::test]
async fn chain_of_depth_ten_is_collected_child_first_from_disk_and_database() {
    let central = Central::start().await;
    let w = Worker::start(&central, "w1").await;
    central.container("w1", "c1").await;
    let names: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| names[p].as_str());
        w.volume(&central, name, parent, Owner::Container("c1"))
            .await;
    }
    assert_eq!(w.local.handles().await.len(), 10);

    // The build ends: its container goes, and the whole chain is garbage.
    central.end_container("w1", "c1").await;
    eventually("the chain is gone from disk and database", || async {
        w.local.handles().await.is_empty() && central.rows("w1").await.is_empty()
    })
    .await;
    let child_first: Vec<&str> = names.iter().rev().map(String::as_str).collect();
    w.assert_destroyed_in_order(&child_first);
    assert_eq!(w.destroyed_in_order().len(), 10);
    assert!(w.live_on_disk().is_empty());
}

#[actix_rt::test]
async fn volume_deleted_by_hand_is_reported_missing_and_its_row_cleaned_up() {
    let central = Central::start().await;
    let w = Worker::start(&central, "w1").await;
    central.container("w1", "c1").await;
    w.volume(&central, "solo", None, Owner::Container("c1"))
        .await;
    // Someone removes the volume behind the agent's back: through the local API, as a
    // runtime cleaning up by hand would.
    let status = w
        .local
        .http
        .delete(format!("{}/volumes/solo", w.local.base))
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
    let w = Worker::start(&central, "w1").await;
    central.container("w1", "c1").await;
    w.volume(&central, "base", None, Owner::Container("c1"))
        .await;
    w.volume(&central, "kid", Some("base"), Owner::Container("c1"))
        .await;
    // Three GC passes later, with the agent on the current answer, nothing in use has gone.
    central.wait_gc_passes(3).await;
    let (_, _, set) = central.desired("w1", None).await;
    let revision = set["revision"].as_u64();
    eventually("the agent applied the current answer", || async {
        w.applied_revision().await == revision
    })
    .await;
    assert_eq!(w.local.handles().await, ["base", "kid"]);
    assert_eq!(central.handles("w1").await, ["base", "kid"]);
    assert!(w.destroyed_in_order().is_empty());
    // A child the scheduler tries to make from a volume that does not exist.
    let (status, _) = central
        .call(
            Method::POST,
            "/workers/w1/volumes",
            Some(json!({"handle": "x", "parent": "ghost", "container": "c1"})),
        )
        .await;
    assert!(status == 404 || status == 409 || status == 422, "{status}");
}

/// The worker's agent has reported base resource type `name` at `version`.
async fn wait_base_type(central: &Central, worker: &str, name: &str, version: &str) {
    eventually(
        &format!("{worker} reports {name} {version} to the central side"),
        || async { central.base_type_version(worker, name).await.as_deref() == Some(version) },
    )
    .await;
}

#[actix_rt::test]
async fn base_resource_type_version_change_retires_the_old_volume_child_first() {
    let central = Central::start().await;
    let w = Worker::start(&central, "w1").await;
    w.set_base_resource_type("git", "1.0");
    wait_base_type(&central, "w1", "git", "1.0").await;
    // The scheduler imports git 1.0 on the worker, and a running container has a
    // copy-on-write child of it.
    w.volume(&central, "git-1.0", None, Owner::BaseResourceType("git"))
        .await;
    let row = central.row("w1", "git-1.0").await.expect("row");
    assert_eq!(row["kept_by"], json!(["base resource type git 1.0"]));
    central.container("w1", "c1").await;
    w.volume(
        &central,
        "git-1.0-cow",
        Some("git-1.0"),
        Owner::Container("c1"),
    )
    .await;

    // The version on disk changes; the agent reports it without a restart.
    let changed = std::time::Instant::now();
    w.set_base_resource_type("git", "2.0");
    wait_base_type(&central, "w1", "git", "2.0").await;
    let took = changed.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "new version reported after {took:?}"
    );
    let row = central.row("w1", "git-1.0").await.expect("row");
    assert_eq!(
        row["kept_by"],
        json!([]),
        "the old import is garbage: {row}"
    );
    w.volume(&central, "git-2.0", None, Owner::BaseResourceType("git"))
        .await;
    let row = central.row("w1", "git-2.0").await.expect("row");
    assert_eq!(row["base_resource_type"], "git 2.0");

    // While the container runs, GC passes leave the old import alone: its child is live.
    central.wait_gc_passes(3).await;
    assert_eq!(
        central.state_of("w1", "git-1.0").await.as_deref(),
        Some("initialized")
    );
    assert_eq!(w.live_on_disk(), ["git-1.0", "git-1.0-cow", "git-2.0"]);

    // The container goes: the old import and its child are garbage, destroyed child first.
    central.end_container("w1", "c1").await;
    eventually(
        "the old version's volumes are gone from disk and DB",
        || async {
            w.local.handles().await == ["git-2.0"] && central.handles("w1").await == ["git-2.0"]
        },
    )
    .await;
    w.assert_destroyed_in_order(&["git-1.0-cow", "git-1.0"]);
    assert_eq!(w.destroyed_in_order().len(), 2);
    assert_eq!(w.live_on_disk(), ["git-2.0"]);
    assert_eq!(w.dead_on_disk(), 0);
    assert_eq!(w.data_of("git-2.0").as_deref(), Some("git-2.0"));
    let row = central.row("w1", "git-2.0").await.expect("row");
    assert_eq!(row["state"], "initialized");
    assert_eq!(row["kept_by"], json!(["base resource type git 2.0"]));
}

#[actix_rt::test]
async fn resource_cache_losing_its_last_use_is_retained_then_collected_when_dropped() {
    let central = Central::start().await;
    let w = Worker::start_with(&central, "w1", "min_free = \"0%\"\n").await;
    w.set_base_resource_type("git", "1.0");
    wait_base_type(&central, "w1", "git", "1.0").await;
    // Two versions of one resource: v1 used by build 1, v2 by builds 2 and 3. Build 1's
    // container has a copy-on-write child of the v1 cache volume.
    let config = central.resource_config("git", "repo").await;
    let old = central.resource_cache(config, "v1", 1).await;
    let new = central.resource_cache(config, "v2", 2).await;
    central.add_cache_use(new, 3).await;
    w.volume(&central, "cache-v1", None, Owner::ResourceCache(old))
        .await;
    w.volume(&central, "cache-v2", None, Owner::ResourceCache(new))
        .await;
    central.container("w1", "build-1").await;
    w.volume(
        &central,
        "build-1-src",
        Some("cache-v1"),
        Owner::Container("build-1"),
    )
    .await;

    // Build 2 ends (v2 keeps build 3's use), then build 1 ends: its container and its
    // cache use go, and v1 has no use left: it is retained while the worker has room
    // (the agent's floor is 0 %), its container's child goes.
    central.end_cache_use(new, 2).await;
    central.end_container("w1", "build-1").await;
    central.end_cache_use(old, 1).await;
    eventually(
        "the container's volume is gone from disk and DB",
        || async {
            w.local.handles().await == ["cache-v1", "cache-v2"]
                && central.handles("w1").await == ["cache-v1", "cache-v2"]
        },
    )
    .await;
    central.wait_gc_passes(3).await;
    assert_eq!(central.handles("w1").await, ["cache-v1", "cache-v2"]);
    assert_eq!(central.resource_cache_ids().await, [old, new]);
    // The scheduler lets v1 go: the next pass deletes it and the worker destroys it.
    central
        .ok(
            Method::PUT,
            &format!("/resource-caches/{old}/retention"),
            Some(json!({"retention": "drop"})),
        )
        .await;
    eventually(
        "the dropped cache's volumes are gone from disk and DB",
        || async {
            w.local.handles().await == ["cache-v2"] && central.handles("w1").await == ["cache-v2"]
        },
    )
    .await;
    // The GC ran after every change above, so what is left is what it keeps.
    assert_eq!(central.resource_cache_ids().await, [new]);
    w.assert_destroyed_in_order(&["build-1-src", "cache-v1"]);
    assert_eq!(w.destroyed_in_order().len(), 2);
    assert_eq!(w.live_on_disk(), ["cache-v2"]);
    assert_eq!(w.dead_on_disk(), 0);
    assert_eq!(w.data_of("cache-v2").as_deref(), Some("cache-v2"));
    let row = central.row("w1", "cache-v2").await.expect("row");
    assert_eq!(row["state"], "initialized");
    assert_eq!(row["kept_by"], json!([format!("resource cache {new}")]));
}

/// On worker `w`, scheduled through `sched`: a live volume, a garbage chain, and a
/// garbage parent kept by its live child. Returns the handles that must survive, sorted.
async fn split_workload(w: &Worker, sched: &Central) -> Vec<String> {
    let n = w.name.as_str();
    let (live, done) = (format!("{n}-live"), format!("{n}-done"));
    sched.container(n, &live).await;
    sched.container(n, &done).await;
    let h = |s: &str| format!("{n}-{s}");
    w.volume(sched, &h("keep"), None, Owner::Container(&live))
        .await;
    w.volume(sched, &h("old"), None, Owner::Container(&done))
        .await;
    w.volume(
        sched,
        &h("old-kid"),
        Some(&h("old")),
        Owner::Container(&done),
    )
    .await;
    w.volume(sched, &h("base"), None, Owner::Container(&done))
        .await;
    w.volume(
        sched,
        &h("base-kid"),
        Some(&h("base")),
        Owner::Container(&live),
    )
    .await;
    sched.end_container(n, &done).await;
    vec![h("base"), h("base-kid"), h("keep")]
}

/// `(handle, parent)` of the desired set's volumes, sorted.
fn desired_volumes(set: &Value) -> Vec<(String, Option<String>)> {
    let mut v: Vec<(String, Option<String>)> = set["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            (
                v["handle"].as_str().expect("handle").to_string(),
                v["parent"].as_str().map(str::to_string),
            )
        })
        .collect();
    v.sort();
    v
}

#[actix_rt::test]
async fn agents_split_between_two_replicas_converge() {
    let one = Central::start().await;
    let two = one.replica().await;
    let a = Worker::start(&one, "wa").await;
    let b = Worker::start(&two, "wb").await;
    // Each worker's builds are scheduled through the other replica.
    let (keep_a, keep_b) = join(split_workload(&a, &two), split_workload(&b, &one)).await;

    eventually("both workers keep only their live volumes", || async {
        a.local.handles().await == keep_a
            && b.local.handles().await == keep_b
            && one.handles("wa").await == keep_a
            && two.handles("wb").await == keep_b
    })
    .await;
    for w in [&a, &b] {
        let n = &w.name;
        w.assert_destroyed_in_order(&[&format!("{n}-old-kid"), &format!("{n}-old")]);
        assert_eq!(w.destroyed_in_order().len(), 2, "{n}");
        assert_eq!(w.dead_on_disk(), 0, "{n}");
        assert_eq!(w.data_of(&format!("{n}-keep")), Some(format!("{n}-keep")));
    }
    assert_eq!(a.live_on_disk(), keep_a);
    assert_eq!(b.live_on_disk(), keep_b);
    // Whichever replica held the GC lock marked each garbage volume exactly once.
    assert_eq!(one.gc_marked() + two.gc_marked(), 4);
    let served = |c: &Central| {
        let m = c.server.metrics();
        (m.desired_answers(true), m.reports.get())
    };
    for (i, c) in [&one, &two].into_iter().enumerate() {
        let (full, reports) = served(c);
        assert!(full > 0 && reports > 0, "replica {i} served its agent");
    }

    // Both replicas give each worker the same answer and tag, and the agent has applied it.
    for (w, keep) in [(&a, &keep_a), (&b, &keep_b)] {
        let n = w.name.as_str();
        let (s1, tag1, set1) = one.desired(n, None).await;
        let (s2, tag2, set2) = two.desired(n, None).await;
        assert_eq!((s1, s2), (200, 200), "{n}");
        let revision = set1["revision"].as_u64().expect("revision");
        assert_eq!(tag1, Some(format!("\"r{revision}\"")), "{n}");
        assert_eq!(tag1, tag2, "{n}");
        assert_eq!(set1["revision"], set2["revision"], "{n}");
        for set in [&set1, &set2] {
            assert_eq!(set["worker"], n);
            assert_eq!(set["destroying"], json!([]), "{n}");
            assert_eq!(
                desired_volumes(set),
                [
                    (keep[0].clone(), None),
                    (keep[1].clone(), Some(keep[0].clone())),
                    (keep[2].clone(), None),
                ],
                "{n}"
            );
        }
        // One replica's tag is current on the other; an older one is not.
        assert_eq!(two.desired(n, tag1.as_deref()).await.0, 304, "{n}");
        assert_eq!(one.desired(n, tag2.as_deref()).await.0, 304, "{n}");
        let stale = format!("\"r{}\"", revision - 1);
        assert_eq!(one.desired(n, Some(&stale)).await.0, 200, "{n}");
        eventually(&format!("{n} applied revision {revision}"), || async {
            w.applied_revision().await == Some(revision)
        })
        .await;
    }
}

#[actix_rt::test]
async fn volume_whose_directory_vanished_is_reported_missing_and_its_row_goes_after_the_grace() {
    let central = Central::start().await;
    let w = Worker::start(&central, "w1").await;
    central.container("w1", "c1").await;
    central.container("w1", "c2").await;
    w.volume(&central, "solo", None, Owner::Container("c1"))
        .await;
    w.volume(&central, "kept", None, Owner::Container("c1"))
        .await;
    // A parent whose directory goes too, under a naive child (a full copy) still in use.
    w.volume(&central, "base", None, Owner::Container("c1"))
        .await;
    w.volume(&central, "kid", Some("base"), Owner::Container("c2"))
        .await;

    // Removed behind the agent's back while it runs.
    let live = w.agent.root().join("live");
    std::fs::remove_dir_all(live.join("solo")).expect("remove solo");
    std::fs::remove_dir_all(live.join("base")).expect("remove base");
    eventually("the central side hears solo is missing", || async {
        match central.row("w1", "solo").await {
            Some(row) => !row["missing_since"].is_null(),
            None => true,
        }
    })
    .await;
    // After missing_grace (2 s here) the central side marks solo destroying; the agent
    // drops the record (nothing left to remove) and reports it destroyed; the row goes.
    eventually("solo's row and record are gone", || async {
        central.row("w1", "solo").await.is_none()
            && !w.local.handles().await.iter().any(|h| h == "solo")
    })
    .await;
    assert!(w.destroyed_in_order().iter().any(|h| h == "solo"));

    // base is missing too, and longer than the grace by now, but a live child stands on
    // it: neither side lets it go before the child.
    central.wait_gc_passes(3).await;
    assert_eq!(central.handles("w1").await, ["base", "kept", "kid"]);
    let flags: Vec<(String, bool)> = w
        .local
        .list()
        .await
        .into_iter()
        .map(|v| (v.handle.to_string(), v.missing))
        .collect();
    assert_eq!(
        flags,
        [
            ("base".to_string(), true),
            ("kept".to_string(), false),
            ("kid".to_string(), false),
        ]
    );
    assert_eq!(w.data_of("kid").as_deref(), Some("kid"));

    // The child's build ends: child first, then the missing parent's record.
    central.end_container("w1", "c2").await;
    eventually("kid and base are gone from both sides", || async {
        central.handles("w1").await == ["kept"] && w.local.handles().await == ["kept"]
    })
    .await;
    w.assert_destroyed_in_order(&["kid", "base"]);
    assert_eq!(w.data_of("kept").as_deref(), Some("kept"));
}
