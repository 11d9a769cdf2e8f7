//! Volume contents against a container that fights back: a "swapper" thread exchanges a
//! directory inside a volume with a symlink to a decoy host tree, in a loop
//! (`renameat2(RENAME_EXCHANGE)`), while the agent copies, re-owns, imports, destroys or
//! measures that volume. After every attempt: no decoy byte or owner in what the agent
//! made, and the decoy tree is exactly as it was (contents, owners, modes, nothing gone).
//!
//! `CONTENTS_RACE_ATTEMPTS` sets the attempts per operation (default 200).

#[path = "inventory_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use protocol::local::Strategy;
use rustix::fs::{renameat_with, RenameFlags, CWD};
use support::{config, create_request, h, is_root, open, overlay_works_in, unmount_all};
use volume_agent::contents::IdMap;
use volume_agent::inventory::{DriverChoice, Inventory, VolumeState};

const MARKER: &[u8] = b"DECOY-HOST-BYTES-7f3a";
/// An owner only the decoy has.
const DECOY_UID: u32 = 4242;

fn attempts() -> usize {
    std::env::var("CONTENTS_RACE_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// What a decoy entry looks like: kind+mode, owner, contents (or link target).
type Snapshot = BTreeMap<PathBuf, (u32, u32, u32, Vec<u8>)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("decoy entry");
        let body = if m.is_file() {
            std::fs::read(&p).expect("read decoy")
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .expect("readlink")
                .into_os_string()
                .into_encoded_bytes()
        } else {
            for e in std::fs::read_dir(&p).expect("list decoy") {
                stack.push(e.expect("entry").path());
            }
            Vec::new()
        };
        out.insert(p, (m.mode(), m.uid(), m.gid(), body));
    }
    out
}

/// A host tree the volume must never reach: root-owned, `DECOY_UID`-owned and
/// highest-id-owned files (the ids a privilege shift changes), a set-uid file, a subdir.
fn make_decoy(dir: &Path) -> (PathBuf, Snapshot) {
    let decoy = dir.join("decoy");
    std::fs::create_dir_all(decoy.join("sub")).expect("mkdir decoy");
    let max = IdMap::for_volume(false)
        .mapped_root()
        .unwrap_or((65534, 65534));
    let files = [
        ("root-secret", (0, 0), 0o600),
        ("sub/uid-secret", (DECOY_UID, DECOY_UID), 0o640),
        ("mapped-secret", max, 0o644),
        ("setuid-tool", (0, 0), 0o4755),
    ];
    for (name, (uid, gid), mode) in files {
        let p = decoy.join(name);
        let mut body = MARKER.to_vec();
        body.extend(vec![b'z'; 256 * 1024]);
        std::fs::write(&p, body).expect("write decoy");
        if is_root() {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown decoy");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let snap = snapshot(&decoy);
    (decoy, snap)
}

/// Exchanges `dir/d` (a directory) with `dir/swap` (a symlink to the decoy) until stopped.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    /// Fills `dir/d` with a few files and subdirectories and starts swapping.
    fn start(dir: &Path, decoy: &Path) -> Swapper {
        let d = dir.join("d");
        std::fs::create_dir_all(d.join("inner")).expect("mkdir d");
        for i in 0..8 {
            std::fs::write(d.join(format!("f{i}")), b"volume bytes").expect("write");
            std::fs::write(d.join("inner").join(format!("g{i}")), b"volume bytes").expect("write");
        }
        std::os::unix::fs::symlink(decoy, dir.join("swap")).expect("symlink");
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let (a, b) = (d, dir.join("swap"));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if renameat_with(CWD, &a, CWD, &b, RenameFlags::EXCHANGE).is_ok() {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        };
        Swapper {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("swapper thread");
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fails when anything under `tree` holds decoy bytes or a decoy-only owner, or is a
/// set-uid file the volume never had.
fn assert_no_decoy_in(tree: &Path, what: &str) {
    let mut stack = vec![tree.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        assert_ne!(
            m.uid(),
            DECOY_UID,
            "{what}: {} has the decoy's owner",
            p.display()
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("list") {
                stack.push(e.expect("entry").path());
            }
        } else if m.is_file() {
            let body = std::fs::read(&p).expect("read");
            assert!(
                !body.windows(MARKER.len()).any(|w| w == MARKER),
                "{what}: {} holds bytes of the decoy host tree",
                p.display()
            );
        }
    }
}

fn assert_decoy_intact(decoy: &Path, before: &Snapshot, what: &str, attempt: usize) {
    let now = snapshot(decoy);
    assert!(
        now == *before,
        "{what}, attempt {attempt}: the decoy host tree changed (read/written/re-owned/removed)"
    );
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    inv: Inventory,
    decoy: PathBuf,
    snap: Snapshot,
}

fn setup(driver: DriverChoice) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let (decoy, snap) = make_decoy(&root);
    let inv = open(&config(&root, driver));
    Setup {
        _dir: dir,
        root,
        inv,
        decoy,
        snap,
    }
}

fn raced_parent(s: &Setup, privileged: bool) -> (PathBuf, Swapper) {
    let rec = s
        .inv
        .create_volume(
            create_request("parent", Strategy::Empty, privileged),
            VolumeState::Initialized,
        )
        .expect("parent");
    let swapper = Swapper::start(&rec.path, &s.decoy);
    (rec.path, swapper)
}

fn cow_create_races(driver: DriverChoice, what: &str) {
    let s = setup(driver);
    let (_parent, swapper) = raced_parent(&s, false);
    let (mut made, mut failed) = (0, 0);
    for i in 0..attempts() {
        let child = format!("child-{i}");
        let req = create_request(
            &child,
            Strategy::Cow {
                volume: h("parent"),
            },
            // Every other child with the other privilege: the owner shift races too.
            i % 2 == 1,
        );
        match s.inv.create_volume(req, VolumeState::Created) {
            Ok(rec) => {
                made += 1;
                let own = match rec.driver {
                    volume_agent::inventory::DriverKind::Overlay => {
                        rec.path.parent().expect("volume dir").join("upper")
                    }
                    _ => rec.path.clone(),
                };
                assert_no_decoy_in(&own, what);
                s.inv.destroy(&h(&child)).expect("destroy child");
            }
            Err(_) => failed += 1,
        }
        assert_decoy_intact(&s.decoy, &s.snap, what, i);
    }
    let swaps = swapper.stop();
    println!("{what}: {made} children made, {failed} refused mid-swap, {swaps} swaps");
    assert!(made > 0, "{what}: no child was ever made");
    assert!(swaps > 0, "{what}: the swapper never swapped");
}

#[test]
fn naive_copy_on_write_never_copies_the_host_through_a_swapped_symlink() {
    cow_create_races(DriverChoice::Naive, "naive copy-on-write create");
}

#[test]
fn overlay_copy_on_write_never_copies_the_host_through_a_swapped_symlink() {
    let probe = tempfile::tempdir().expect("tempdir");
    if !overlay_works_in(probe.path()) {
        println!("SKIP: overlay mounts do not work here (not root, or no overlayfs)");
        return;
    }
    cow_create_races(DriverChoice::Overlay, "overlay copy-on-write create");
    unmount_all(probe.path());
}

#[test]
fn privilege_flips_never_reown_the_host() {
    let s = setup(DriverChoice::Naive);
    let (_parent, swapper) = raced_parent(&s, false);
    let mut flips = 0;
    for i in 0..attempts() {
        if s.inv.set_privileged(&h("parent"), i % 2 == 0).is_ok() {
            flips += 1;
        }
        assert_decoy_intact(&s.decoy, &s.snap, "privilege flip", i);
    }
    let swaps = swapper.stop();
    println!("privilege flip: {flips} flips both ways, {swaps} swaps");
    assert!(flips > 0);
}

#[test]
fn imports_never_copy_the_host_through_a_swapped_symlink() {
    let s = setup(DriverChoice::Naive);
    let source = s.root.join("import-source");
    std::fs::create_dir(&source).expect("mkdir");
    let swapper = Swapper::start(&source, &s.decoy);
    let (mut made, mut failed) = (0, 0);
    for i in 0..attempts() {
        let handle = format!("import-{i}");
        let req = create_request(
            &handle,
            Strategy::Import {
                path: source.to_string_lossy().into_owned(),
                follow_symlinks: false,
            },
            false,
        );
        match s.inv.create_volume(req, VolumeState::Initialized) {
            Ok(rec) => {
                made += 1;
                assert_no_decoy_in(&rec.path, "import");
                s.inv.destroy(&h(&handle)).expect("destroy");
            }
            Err(_) => failed += 1,
        }
        assert_decoy_intact(&s.decoy, &s.snap, "import", i);
    }
    let swaps = swapper.stop();
    println!("import: {made} made, {failed} refused mid-swap, {swaps} swaps");
    assert!(made > 0);
}

#[test]
fn destroys_never_remove_the_host() {
    let s = setup(DriverChoice::Naive);
    let mut swaps = 0;
    for i in 0..attempts() {
        let handle = format!("doomed-{i}");
        let rec = s
            .inv
            .create_volume(
                create_request(&handle, Strategy::Empty, true),
                VolumeState::Created,
            )
            .expect("create");
        let swapper = Swapper::start(&rec.path, &s.decoy);
        let res = s.inv.destroy(&h(&handle));
        swaps += swapper.stop();
        if res.is_err() {
            // Entries kept appearing: the retry (as the reconciler would) finishes it.
            s.inv.destroy(&h(&handle)).expect("destroy retried");
        }
        assert!(!rec.path.exists(), "the volume is gone");
        assert_decoy_intact(&s.decoy, &s.snap, "destroy", i);
    }
    println!("destroy: {} volumes destroyed, {swaps} swaps", attempts());
}

#[test]
fn usage_never_counts_the_host() {
    let s = setup(DriverChoice::Naive);
    let (parent, swapper) = raced_parent(&s, true);
    let decoy_bytes = volume_agent::usage::measure(&s.decoy).expect("measure decoy");
    for i in 0..attempts() {
        let bytes = volume_agent::usage::measure(&parent).expect("measure");
        assert!(
            bytes < decoy_bytes,
            "attempt {i}: measured {bytes} bytes, the decoy alone holds {decoy_bytes}"
        );
        assert_decoy_intact(&s.decoy, &s.snap, "usage", i);
    }
    let swaps = swapper.stop();
    println!("usage: {} measurements, {swaps} swaps", attempts());
}
