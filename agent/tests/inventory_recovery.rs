//! Recovery: lost and corrupt stores, drift between disk and store, failures injected at
//! every step of create and destroy, and a full disk.

#[path = "inventory_support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use support::{assert_consistent, child, config, h, initialized_root, open};
use volume_agent::inventory::{
    CreateSpec, DestroyOutcome, DriverChoice, Inventory, InventoryConfig, InventoryError, Step,
    VolumeState,
};

/// Makes `r` (initialized, property cache=yes), children `c1`, `c2` and a lone root `x`.
fn populated(cfg: &InventoryConfig) {
    let inv = open(cfg);
    initialized_root(&inv, "r", &[("f", "root")]);
    inv.set_property(&h("r"), "cache", "yes").expect("prop");
    child(&inv, "c1", "r");
    child(&inv, "c2", "r");
    inv.set_state(&h("c2"), VolumeState::Initializing)
        .expect("state");
    inv.create(CreateSpec::empty(h("x"))).expect("create");
}

fn assert_populated(inv: &Inventory) {
    let r = inv.get(&h("r")).expect("get").expect("r");
    assert_eq!(r.state, VolumeState::Initialized);
    assert_eq!(r.properties.get("cache").map(String::as_str), Some("yes"));
    assert_eq!(
        inv.children(&h("r")).expect("children"),
        vec![h("c1"), h("c2")]
    );
    assert_eq!(
        inv.get(&h("c2")).expect("get").expect("c2").state,
        VolumeState::Initializing
    );
    assert_eq!(std::fs::read(r.path.join("f")).expect("data"), b"root");
    assert!(
        matches!(
            inv.mark_destroying(&h("r")),
            Err(InventoryError::HasChildren { .. })
        ),
        "rebuilt child counts still pin the parent"
    );
    assert_consistent(inv);
}

fn db_dir(cfg: &InventoryConfig) -> std::path::PathBuf {
    cfg.state_dir.join("inventory.db")
}

#[test]
fn a_fresh_store_is_not_reported_as_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_inv, report) = Inventory::open(&config(dir.path(), DriverChoice::Naive)).expect("open");
    assert!(!report.rebuilt_from_disk);
    assert_eq!(report, Default::default());
}

#[test]
fn reopening_a_clean_store_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    populated(&cfg);
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert_eq!(report, Default::default());
    assert_populated(&inv);
}

#[test]
fn a_lost_store_is_rebuilt_from_the_metadata_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    populated(&cfg);
    std::fs::remove_dir_all(db_dir(&cfg)).expect("lose the store");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert!(report.rebuilt_from_disk);
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    assert_populated(&inv);
}

#[test]
fn a_corrupt_store_is_moved_aside_and_rebuilt_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    populated(&cfg);
    let db_file = db_dir(&cfg).join("db");
    let len = std::fs::metadata(&db_file).expect("db").len() as usize;
    std::fs::write(&db_file, vec![0xA5u8; len.max(4096)]).expect("corrupt");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert!(report.rebuilt_from_disk);
    let aside: Vec<_> = std::fs::read_dir(&cfg.state_dir)
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("inventory.db.broken-"))
        .collect();
    assert_eq!(aside.len(), 1, "broken store kept for inspection");
    assert_populated(&inv);
}

#[test]
fn a_directory_without_a_record_is_adopted_from_its_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    let backup = dir.path().join("state-backup");
    {
        let inv = open(&cfg);
        initialized_root(&inv, "a", &[]);
    }
    copy_dir(&cfg.state_dir, &backup);
    {
        let inv = open(&cfg);
        child(&inv, "b", "a");
    }
    // The store goes back to the backup, which does not know `b`.
    std::fs::remove_dir_all(&cfg.state_dir).expect("rm");
    std::fs::rename(&backup, &cfg.state_dir).expect("restore");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert_eq!(report.adopted, vec![h("b")]);
    assert!(!report.rebuilt_from_disk);
    assert_eq!(inv.children(&h("a")).expect("children"), vec![h("b")]);
    assert_consistent(&inv);
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

#[test]
fn a_directory_without_record_or_metadata_is_quarantined_not_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    drop(open(&cfg));
    let stray = cfg.volumes_root.join("live/stray");
    std::fs::create_dir_all(stray.join("volume")).expect("mkdir");
    std::fs::write(stray.join("volume/precious"), b"keep").expect("write");
    std::fs::create_dir(cfg.volumes_root.join("live/bad name")).expect("mkdir");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert_eq!(report.quarantined.len(), 2, "{:?}", report.quarantined);
    assert_eq!(inv.orphans().expect("orphans"), {
        let mut q = report.quarantined.clone();
        q.sort();
        q
    });
    let kept = report
        .quarantined
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("stray."))
        })
        .expect("stray quarantined");
    assert_eq!(
        std::fs::read(kept.join("volume/precious")).expect("kept"),
        b"keep"
    );
    assert_consistent(&inv);
}

#[test]
fn a_child_whose_parent_is_gone_from_disk_is_quarantined_on_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    {
        let inv = open(&cfg);
        initialized_root(&inv, "p", &[]);
        child(&inv, "c", "p");
    }
    std::fs::remove_dir_all(cfg.volumes_root.join("live/p")).expect("drift");
    std::fs::remove_dir_all(db_dir(&cfg)).expect("lose the store");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert!(report.rebuilt_from_disk);
    assert_eq!(report.quarantined.len(), 1);
    assert!(inv.list().expect("list").is_empty());
    assert_consistent(&inv);
}

#[test]
fn a_record_whose_directory_vanished_is_reported_and_can_still_be_destroyed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    drop({
        let inv = open(&cfg);
        inv.create(CreateSpec::empty(h("a"))).expect("create");
        inv
    });
    std::fs::remove_dir_all(cfg.volumes_root.join("live/a")).expect("drift");
    let (inv, report) = Inventory::open(&cfg).expect("open");
    assert_eq!(report.missing_on_disk, vec![h("a")]);
    assert_eq!(
        inv.destroy(&h("a")).expect("destroy"),
        DestroyOutcome::Destroyed
    );
    assert_consistent(&inv);
}

fn fail_at(inv: &Inventory, at: Step) {
    inv.set_step_hook(Some(Arc::new(move |step, _h| {
        if step == at {
            Err(std::io::Error::other(format!(
                "injected failure at {step:?}"
            )))
        } else {
            Ok(())
        }
    })));
}

#[test]
fn a_create_failing_at_any_step_leaves_nothing_behind() {
    for step in Step::ALL
        .into_iter()
        .filter(|s| format!("{s:?}").starts_with("Create"))
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let inv = open(&config(dir.path(), DriverChoice::Naive));
        initialized_root(&inv, "p", &[("f", "x")]);
        fail_at(&inv, step);
        let err = inv
            .create(CreateSpec::child(h("c"), h("p")))
            .expect_err("injected");
        assert!(err.to_string().contains("injected"), "{step:?}: {err}");
        assert!(inv.get(&h("c")).expect("get").is_none(), "{step:?}");
        assert!(
            inv.children(&h("p")).expect("children").is_empty(),
            "{step:?}"
        );
        assert_consistent(&inv);
        inv.set_step_hook(None);
        inv.destroy(&h("p")).expect("parent is free again");
    }
}

#[test]
fn a_destroy_failing_at_any_step_is_finished_by_a_retry_or_by_recovery() {
    for step in Step::ALL
        .into_iter()
        .filter(|s| format!("{s:?}").starts_with("Destroy"))
    {
        for finish_by_reopen in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = config(dir.path(), DriverChoice::Naive);
            let inv = open(&cfg);
            initialized_root(&inv, "p", &[("f", "x")]);
            child(&inv, "c", "p");
            fail_at(&inv, step);
            inv.destroy(&h("c")).expect_err("injected");
            assert_eq!(
                inv.get(&h("c")).expect("get").expect("record kept").state,
                VolumeState::Destroying,
                "{step:?}"
            );
            assert!(
                matches!(
                    inv.destroy(&h("p")),
                    Err(InventoryError::HasChildren { .. })
                ),
                "a half-destroyed child still pins its parent"
            );
            inv.set_step_hook(None);
            let inv = if finish_by_reopen {
                drop(inv);
                let (inv, report) = Inventory::open(&cfg).expect("reopen");
                assert_eq!(report.destroys_finished, vec![h("c")], "{step:?}");
                inv
            } else {
                assert_eq!(
                    inv.destroy(&h("c")).expect("retry"),
                    DestroyOutcome::Destroyed
                );
                inv
            };
            assert!(inv.get(&h("c")).expect("get").is_none(), "{step:?}");
            assert_consistent(&inv);
        }
    }
}

#[test]
fn destroy_frees_the_disk_even_when_the_final_record_delete_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = open(&config(dir.path(), DriverChoice::Naive));
    let rec = initialized_root(&inv, "a", &[("big", &"x".repeat(1 << 20))]);
    fail_at(&inv, Step::DestroyRemoved);
    inv.destroy(&h("a")).expect_err("record delete fails");
    assert!(!rec.path.exists(), "data removed before the record delete");
    assert!(!inv.volumes_root().join("dead/a").exists());
    inv.set_step_hook(None);
    assert_eq!(
        inv.destroy(&h("a")).expect("retry cleans the record"),
        DestroyOutcome::Destroyed
    );
    assert!(inv.get(&h("a")).expect("get").is_none());
    assert_consistent(&inv);
}

/// A small tmpfs holding both the store and the volumes (needs root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            other => {
                println!("SKIP: cannot mount a {size} tmpfs here ({other:?}); the full-disk test needs root");
                None
            }
        }
    }
    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.dir.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes into `path` until the disk says ENOSPC.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![7u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let mut small = [7u8; 512];
    while f.write_all(&small).is_ok() {
        small = [7u8; 512];
    }
    let _ = f.sync_all();
}

#[test]
fn destroy_works_on_a_completely_full_disk() {
    let Some(disk) = SmallDisk::mount("4m") else {
        return;
    };
    let cfg = config(disk.dir.path(), DriverChoice::Naive);
    let inv = open(&cfg);
    let rec = inv.create(CreateSpec::empty(h("big"))).expect("create");
    let keep = inv.create(CreateSpec::empty(h("keep"))).expect("create");
    std::fs::write(keep.path.join("f"), b"kept").expect("write");
    fill(&rec.path.join("filler"));
    assert_eq!(disk.free(), 0, "disk is full");
    assert!(
        std::fs::write(rec.path.join("more"), b"x").is_err(),
        "nothing more fits"
    );
    assert_eq!(
        inv.destroy(&h("big")).expect("destroy on a full disk"),
        DestroyOutcome::Destroyed
    );
    assert!(disk.free() > 1 << 20, "space freed: {}", disk.free());
    assert!(inv.get(&h("big")).expect("get").is_none());
    drop(inv);
    let (inv, report) = Inventory::open(&cfg).expect("reopen");
    assert!(report.destroys_finished.is_empty());
    assert_eq!(std::fs::read(keep.path.join("f")).expect("read"), b"kept");
    assert_consistent(&inv);
}

#[test]
fn destroy_of_a_volume_already_marked_needs_no_store_write_before_removing() {
    let Some(disk) = SmallDisk::mount("4m") else {
        return;
    };
    let cfg = config(disk.dir.path(), DriverChoice::Naive);
    let inv = open(&cfg);
    let rec = inv.create(CreateSpec::empty(h("big"))).expect("create");
    inv.mark_destroying(&h("big"))
        .expect("mark while there is room");
    let _ = std::fs::remove_file(cfg.state_dir.join("reserve"));
    fill(&rec.path.join("filler"));
    assert_eq!(disk.free(), 0, "disk is full, reserve gone");
    assert_eq!(
        inv.destroy(&h("big")).expect("destroy"),
        DestroyOutcome::Destroyed
    );
    assert!(disk.free() > 1 << 20);
    assert!(inv.get(&h("big")).expect("get").is_none());
    assert_consistent(&inv);
}
