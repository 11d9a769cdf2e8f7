//! Drift: records compared with their directories, at open and by the periodic scan (the
//! drift actor), on a real sled store and real directories.

#[path = "inventory_support.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use support::{assert_consistent, config, h, initialized_root, open};
use volume_agent::inventory::actor::InventoryActor;
use volume_agent::inventory::drift::actor::DriftActor;
use volume_agent::inventory::{
    CreateSpec, DestroyOutcome, DriverChoice, Inventory, InventoryError,
};
use volume_agent::metrics::Metrics;
use volume_agent::outlet::Outlet;

/// Waits (bounded, a guard against hangs, not a timing assertion) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn finds_volume_whose_directory_was_removed_missing_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    drop({
        let inv = open(&cfg);
        initialized_root(&inv, "whole", &[("f", "x")]);
        initialized_root(&inv, "data-only", &[("f", "x")]);
        initialized_root(&inv, "swapped", &[]);
        initialized_root(&inv, "fine", &[("f", "x")]);
        inv
    });
    let live = cfg.volumes_root.join("live");
    // The whole volume directory; only its data directory; the data directory replaced
    // by a symlink to a directory that exists (never followed).
    std::fs::remove_dir_all(live.join("whole")).expect("remove volume dir");
    std::fs::remove_dir_all(live.join("data-only/volume")).expect("remove data dir");
    std::fs::remove_dir_all(live.join("swapped/volume")).expect("remove data dir");
    std::os::unix::fs::symlink(live.join("fine/volume"), live.join("swapped/volume"))
        .expect("symlink");

    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert_eq!(
        report.missing_on_disk,
        [h("data-only"), h("swapped"), h("whole")]
    );
    assert_eq!(inv.missing(), report.missing_on_disk);
    let flags: Vec<(String, bool)> = inv
        .list()
        .expect("list")
        .into_iter()
        .map(|r| (r.handle.to_string(), r.missing))
        .collect();
    assert_eq!(
        flags,
        [
            ("data-only".to_string(), true),
            ("fine".to_string(), false),
            ("swapped".to_string(), true),
            ("whole".to_string(), true),
        ]
    );
    assert!(
        inv.get(&h("whole"))
            .expect("get")
            .expect("record kept")
            .missing
    );
}

#[test]
fn destroying_a_missing_volume_drops_its_record_and_its_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    let inv = open(&cfg);
    initialized_root(&inv, "whole", &[]);
    initialized_root(&inv, "data-only", &[]);
    let live = cfg.volumes_root.join("live");
    std::fs::remove_dir_all(live.join("whole")).expect("remove volume dir");
    std::fs::remove_dir_all(live.join("data-only/volume")).expect("remove data dir");
    let scan = inv.scan_drift().expect("scan");
    assert_eq!(scan.newly_missing, [h("data-only"), h("whole")]);

    for v in ["whole", "data-only"] {
        assert_eq!(
            inv.destroy(&h(v)).expect("destroy"),
            DestroyOutcome::Destroyed
        );
        assert!(inv.get(&h(v)).expect("get").is_none());
    }
    // The metadata file left in live/data-only went too: a restart adopts nothing back.
    assert!(!live.join("data-only").exists());
    assert!(inv.missing().is_empty());
    assert_consistent(&inv);
    drop(inv);
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert!(report.adopted.is_empty() && report.missing_on_disk.is_empty());
    assert!(inv.list().expect("list").is_empty());
}

#[test]
fn missing_parent_is_not_dropped_before_its_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    let inv = open(&cfg);
    initialized_root(&inv, "p", &[("f", "parent")]);
    inv.create(CreateSpec::child(h("kid"), h("p")))
        .expect("naive child (a full copy)");
    std::fs::remove_dir_all(cfg.volumes_root.join("live/p")).expect("remove parent dir");
    inv.scan_drift().expect("scan");
    // The child is a full copy: still a volume.
    assert_eq!(inv.missing(), [h("p")]);
    let err = inv.destroy(&h("p")).expect_err("parent with a child");
    assert!(
        matches!(err, InventoryError::HasChildren { ref children, .. } if *children == [h("kid")]),
        "{err}"
    );
    assert!(inv.get(&h("p")).expect("get").is_some());
    // Nothing new is made from it.
    let err = inv
        .create(CreateSpec::child(h("kid2"), h("p")))
        .expect_err("child of a missing parent");
    assert!(
        matches!(err, InventoryError::ParentMissing(ref p) if *p == h("p")),
        "{err}"
    );
    inv.destroy(&h("kid")).expect("child first");
    inv.destroy(&h("p")).expect("then the parent");
    assert!(inv.list().expect("list").is_empty());
}

#[actix_rt::test]
async fn finds_removed_directory_by_the_periodic_scan_and_sees_it_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    let inv = open(&cfg);
    initialized_root(&inv, "v", &[("f", "x")]);
    initialized_root(&inv, "other", &[]);
    let metrics = Arc::new(Metrics::new());
    // Counts the reconcile passes the drift actor asks for.
    let passes = Arc::new(AtomicUsize::new(0));
    let counter = passes.clone();
    let changed = Outlet::new(move |()| {
        counter.fetch_add(1, Relaxed);
    });
    DriftActor::new(
        InventoryActor::start(inv.clone(), 1),
        Duration::from_millis(50),
        metrics.clone(),
        changed,
    )
    .start();

    let live = cfg.volumes_root.join("live");
    let aside = dir.path().join("aside");
    std::fs::rename(live.join("v"), &aside).expect("move the volume away");
    eventually("the periodic scan flags v missing", || {
        inv.is_missing(&h("v")) && metrics.missing_volumes.get() == 1
    })
    .await;
    assert!(passes.load(Relaxed) >= 1, "a reconcile pass was asked for");
    assert!(!inv.is_missing(&h("other")));
    assert!(inv.get(&h("v")).expect("get").expect("kept").missing);

    // The directory comes back (a disk mounted again): a volume again.
    let asked = passes.load(Relaxed);
    std::fs::rename(&aside, live.join("v")).expect("move it back");
    eventually("v is a volume again", || {
        !inv.is_missing(&h("v")) && metrics.missing_volumes.get() == 0
    })
    .await;
    assert!(passes.load(Relaxed) > asked);
    assert_consistent(&inv);
}
