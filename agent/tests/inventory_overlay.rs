//! The overlay driver with real overlay mounts (needs root; each test prints SKIP and
//! returns when the kernel refuses the mount).

#[path = "inventory_support.rs"]
mod support;

use std::path::{Path, PathBuf};

use support::{
    assert_consistent, child, config, h, initialized_root, mounts_under, open, overlay_works_in,
    unmount_all,
};
use volume_agent::inventory::{DestroyOutcome, DriverChoice, DriverKind, Inventory, VolumeState};

/// A temp dir whose mounts are undone when the test ends, even on panic.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Option<Sandbox> {
        let dir = tempfile::tempdir().expect("tempdir");
        overlay_works_in(dir.path()).then_some(Sandbox { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        unmount_all(self.dir.path());
    }
}

fn mounted(inv: &Inventory) -> Vec<PathBuf> {
    let mut m = mounts_under(inv.volumes_root());
    m.sort();
    m
}

#[test]
fn overlay_child_sees_parent_data_and_keeps_its_writes_apart() {
    let Some(sb) = Sandbox::new() else { return };
    let inv = open(&config(sb.path(), DriverChoice::Overlay));
    let p = initialized_root(&inv, "p", &[("f", "parent")]);
    assert_eq!(p.driver, DriverKind::Overlay);
    let c = child(&inv, "c", "p");
    assert_eq!(c.driver, DriverKind::Overlay);
    assert_eq!(
        mounted(&inv),
        vec![c.path.clone()],
        "child is a mount, the root is not"
    );
    assert_eq!(std::fs::read(c.path.join("f")).expect("read"), b"parent");
    std::fs::write(c.path.join("f"), b"child").expect("write");
    std::fs::write(c.path.join("new"), b"n").expect("write");
    assert_eq!(std::fs::read(p.path.join("f")).expect("read"), b"parent");
    assert!(!p.path.join("new").exists());
    assert_consistent(&inv);
}

#[test]
fn overlay_grandchild_sees_the_whole_parent_chain() {
    let Some(sb) = Sandbox::new() else { return };
    let inv = open(&config(sb.path(), DriverChoice::Overlay));
    initialized_root(&inv, "r", &[("root-file", "r")]);
    let a = child(&inv, "a", "r");
    std::fs::write(a.path.join("a-file"), b"a").expect("write");
    std::fs::remove_file(a.path.join("root-file")).expect("whiteout");
    inv.set_state(&h("a"), VolumeState::Initialized)
        .expect("init");
    let g = child(&inv, "g", "a");
    assert_eq!(std::fs::read(g.path.join("a-file")).expect("read"), b"a");
    assert!(
        !g.path.join("root-file").exists(),
        "the parent's deletion is inherited"
    );
    assert_eq!(mounted(&inv).len(), 2);
    assert_consistent(&inv);
}

#[test]
fn overlay_children_are_remounted_parents_first_after_restart() {
    let Some(sb) = Sandbox::new() else { return };
    let cfg = config(sb.path(), DriverChoice::Overlay);
    {
        let inv = open(&cfg);
        initialized_root(&inv, "r", &[("f", "r")]);
        let a = child(&inv, "a", "r");
        std::fs::write(a.path.join("a-file"), b"a").expect("write");
        inv.set_state(&h("a"), VolumeState::Initialized)
            .expect("init");
        child(&inv, "g", "a");
    }
    // A reboot: the mounts are gone, the store and directories remain.
    unmount_all(sb.path());
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert_eq!(report.remounted, vec![h("a"), h("g")], "parents first");
    let g = inv.get(&h("g")).expect("get").expect("exists");
    assert_eq!(std::fs::read(g.path.join("a-file")).expect("read"), b"a");
    assert_eq!(std::fs::read(g.path.join("f")).expect("read"), b"r");
    // Opening again with the mounts in place mounts nothing twice.
    drop(inv);
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert!(report.remounted.is_empty(), "{:?}", report.remounted);
    assert_eq!(mounted(&inv).len(), 2);
    assert_consistent(&inv);
}

#[test]
fn overlay_child_is_unmounted_before_removal_and_parent_data_survives() {
    let Some(sb) = Sandbox::new() else { return };
    let inv = open(&config(sb.path(), DriverChoice::Overlay));
    let p = initialized_root(&inv, "p", &[("f", "parent")]);
    let c = child(&inv, "c", "p");
    std::fs::remove_file(c.path.join("f")).expect("delete through the mount");
    assert_eq!(
        inv.destroy(&h("c")).expect("destroy"),
        DestroyOutcome::Destroyed
    );
    assert!(mounted(&inv).is_empty(), "mount gone");
    assert_eq!(std::fs::read(p.path.join("f")).expect("read"), b"parent");
    assert_eq!(
        inv.destroy(&h("p")).expect("destroy"),
        DestroyOutcome::Destroyed
    );
    assert_consistent(&inv);
}

#[test]
fn detect_chooses_overlay_where_a_test_mount_works() {
    let Some(sb) = Sandbox::new() else { return };
    let inv = open(&config(sb.path(), DriverChoice::Detect));
    assert_eq!(inv.driver(), DriverKind::Overlay);
    initialized_root(&inv, "p", &[("f", "x")]);
    let c = child(&inv, "c", "p");
    assert_eq!(c.driver, DriverKind::Overlay);
    assert_eq!(mounted(&inv), vec![c.path]);
    let leftovers: Vec<_> = std::fs::read_dir(inv.volumes_root())
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().contains("probe"))
        .collect();
    assert!(leftovers.is_empty(), "probe cleaned up: {leftovers:?}");
}

#[test]
fn a_store_made_with_overlay_keeps_working_after_switching_to_naive() {
    let Some(sb) = Sandbox::new() else { return };
    let root = sb.path().to_owned();
    {
        let inv = open(&config(&root, DriverChoice::Overlay));
        initialized_root(&inv, "p", &[("f", "x")]);
        child(&inv, "c", "p");
        inv.set_state(&h("c"), VolumeState::Initialized)
            .expect("init");
    }
    let inv = open(&config(&root, DriverChoice::Naive));
    let g = child(&inv, "g", "c");
    assert_eq!(g.driver, DriverKind::Naive);
    assert_eq!(
        std::fs::read(g.path.join("f")).expect("copied through the mount"),
        b"x"
    );
    inv.destroy(&h("g")).expect("destroy");
    inv.destroy(&h("c"))
        .expect("overlay child destroyed by its own driver");
    assert!(mounted(&inv).is_empty());
    assert_consistent(&inv);
}

#[test]
fn a_lost_store_with_overlay_children_is_rebuilt_and_remounted() {
    let Some(sb) = Sandbox::new() else { return };
    let cfg = config(sb.path(), DriverChoice::Overlay);
    {
        let inv = open(&cfg);
        initialized_root(&inv, "r", &[("f", "r")]);
        let a = child(&inv, "a", "r");
        std::fs::write(a.path.join("a-file"), b"a").expect("write");
        inv.set_state(&h("a"), VolumeState::Initialized)
            .expect("init");
        child(&inv, "g", "a");
    }
    unmount_all(sb.path());
    std::fs::remove_dir_all(cfg.state_dir.join("inventory.db")).expect("lose the store");
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert!(report.rebuilt_from_disk);
    assert_eq!(report.remounted, vec![h("a"), h("g")]);
    let g = inv.get(&h("g")).expect("get").expect("g");
    assert_eq!(std::fs::read(g.path.join("a-file")).expect("read"), b"a");
    assert!(matches!(
        inv.destroy(&h("a")),
        Err(volume_agent::inventory::InventoryError::HasChildren { .. })
    ));
    assert_consistent(&inv);
}

#[test]
fn overlay_child_stacked_on_a_missing_parent_is_missing_too() {
    let Some(sb) = Sandbox::new() else { return };
    let cfg = config(sb.path(), DriverChoice::Overlay);
    let inv = open(&cfg);
    initialized_root(&inv, "p", &[("f", "parent")]);
    child(&inv, "c", "p");
    initialized_root(&inv, "q", &[("f", "other")]);
    child(&inv, "d", "q");
    // A healthy overlay child (mounted) is a volume.
    assert!(inv.scan_drift().expect("scan").missing.is_empty());

    // The parent's directory goes while the child's mount still stacks on it.
    std::fs::remove_dir_all(cfg.volumes_root.join("live/p")).expect("remove the parent");
    let scan = inv.scan_drift().expect("scan");
    assert_eq!(scan.missing, [h("c"), h("p")]);

    // After a reboot the child cannot be mounted again: still missing, never an empty
    // directory taken for a volume. Its healthy neighbour comes back mounted.
    drop(inv);
    unmount_all(&cfg.volumes_root);
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert_eq!(report.missing_on_disk, [h("c"), h("p")]);
    assert!(!inv.is_missing(&h("d")));
    assert_eq!(
        std::fs::read_to_string(inv.get(&h("d")).expect("get").expect("d").path.join("f"))
            .expect("d reads its parent's file"),
        "other"
    );

    // Children first: the child's own layer goes with it, then the parent's record.
    assert_eq!(
        inv.destroy(&h("c")).expect("child"),
        DestroyOutcome::Destroyed
    );
    assert_eq!(
        inv.destroy(&h("p")).expect("parent"),
        DestroyOutcome::Destroyed
    );
    assert!(inv.missing().is_empty());
    assert_consistent(&inv);
}
