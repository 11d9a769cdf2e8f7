//! Helpers shared by the inventory tests (included with `#[path]`; also built on its own).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use volume_agent::inventory::{
    CreateSpec, DriverChoice, Handle, Inventory, InventoryConfig, VolumeRecord, VolumeState,
};

pub fn h(s: &str) -> Handle {
    Handle::new(s).expect("valid handle")
}

pub fn config(dir: &Path, driver: DriverChoice) -> InventoryConfig {
    InventoryConfig {
        state_dir: dir.join("state"),
        volumes_root: dir.join("volumes"),
        driver,
        cache_bytes: 4 << 20,
    }
}

pub fn open(cfg: &InventoryConfig) -> Inventory {
    Inventory::open(cfg).expect("inventory opens").0
}

/// A root volume in state `initialized`, with `files` written into it.
pub fn initialized_root(inv: &Inventory, name: &str, files: &[(&str, &str)]) -> VolumeRecord {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    inv.create(CreateSpec {
        open_to_peers: false,
        initial_state: VolumeState::Initialized,
        populate: Some(Box::new(move |dir: &Path| {
            for (name, body) in files {
                std::fs::write(dir.join(name), body)?;
            }
            Ok(())
        })),
        ..CreateSpec::empty(h(name))
    })
    .expect("root created")
}

pub fn child(inv: &Inventory, name: &str, parent: &str) -> VolumeRecord {
    inv.create(CreateSpec::child(h(name), h(parent)))
        .expect("child created")
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Disk and store agree: every record has its live dir and data dir, every live dir has a
/// record, no record is mid-create or mid-destroy, every child's parent exists, and
/// `init/` and `dead/` are empty.
pub fn assert_consistent(inv: &Inventory) {
    let root = inv.volumes_root().to_owned();
    let records: BTreeMap<Handle, VolumeRecord> = inv
        .list()
        .expect("list")
        .into_iter()
        .map(|r| (r.handle.clone(), r))
        .collect();
    let live = names(&root.join("live"));
    let recorded: BTreeSet<String> = records.keys().map(|h| h.to_string()).collect();
    assert_eq!(live, recorded, "live dirs and records differ");
    assert!(names(&root.join("init")).is_empty(), "init/ not empty");
    assert!(names(&root.join("dead")).is_empty(), "dead/ not empty");
    for r in records.values() {
        assert!(
            !matches!(r.state, VolumeState::Creating | VolumeState::Destroying),
            "{} left in {}",
            r.handle,
            r.state
        );
        assert!(r.path.is_dir(), "{} has no data dir {:?}", r.handle, r.path);
        if let Some(p) = &r.parent {
            assert!(
                records.contains_key(p),
                "child {} points at gone parent {p}",
                r.handle
            );
            assert!(
                inv.children(p).expect("children").contains(&r.handle),
                "children index misses {}",
                r.handle
            );
        }
    }
}

/// Whether overlay mounts work under `dir`; prints why not when they do not.
pub fn overlay_works_in(dir: &Path) -> bool {
    let probe = dir.join("overlay-probe");
    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir_all(probe.join(d)).expect("mkdir probe");
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            probe.join("l").display(),
            probe.join("u").display(),
            probe.join("w").display()
        ))
        .arg(probe.join("m"))
        .output();
    let ok = matches!(&status, Ok(o) if o.status.success());
    if ok {
        let _ = std::process::Command::new("umount")
            .arg(probe.join("m"))
            .status();
    } else {
        println!(
            "SKIP: overlay mount refused here ({status:?}); overlay tests need root and overlayfs"
        );
    }
    let _ = std::fs::remove_dir_all(&probe);
    ok
}

/// Mount points under `root` (from /proc/self/mountinfo).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Unmounts everything under `root` (test cleanup), deepest first.
pub fn unmount_all(root: &Path) {
    let mut m = mounts_under(root);
    m.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in m {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&p)
            .status();
    }
}

/// A local-API create request (as baggageclaim's client sends it).
pub fn create_request(
    handle: &str,
    strategy: protocol::local::Strategy,
    privileged: bool,
) -> protocol::local::CreateVolumeRequest {
    serde_json::from_value(serde_json::json!({
        "handle": handle,
        "strategy": strategy,
        "privileged": privileged,
    }))
    .expect("create request")
}

/// Whether the test runs as root (owners can be set).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
