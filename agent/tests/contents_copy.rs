//! On xfs the copy-on-write copy hands subtrees to other walker threads: what must stay
//! true when parts of one tree are copied side by side (hard links between subtrees, the
//! depth bound, a mount point found by any walker, every entry once). Each test runs on
//! the temporary directory's file system (one walker there unless it is xfs) and on an
//! xfs loop image (one walker per core), which it skips with a printed reason where it
//! cannot be made (needs root, xfsprogs, loop devices).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use volume_agent::contents::copy::copy_tree;

#[path = "xfs_support.rs"]
mod xfs;

/// Runs `test` in a fresh directory on the temporary directory's file system, then on a
/// fresh xfs image.
fn on_both(test: impl Fn(&Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    test(dir.path());
    let tmp = tempfile::tempdir().expect("tempdir");
    match xfs::XfsImage::make(tmp.path()) {
        Ok(img) => test(&img.mnt),
        Err(e) => println!("skipped the xfs half: {e}"),
    }
}

/// Every entry under `root` (relative path → its status), directories included.
fn entries(root: &Path) -> HashMap<PathBuf, std::fs::Metadata> {
    let mut out = HashMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.insert(p.strip_prefix(root).expect("rel").to_path_buf(), m);
        }
    }
    out
}

/// Groups of relative paths that are one inode (hard links), each group sorted.
fn link_groups(all: &HashMap<PathBuf, std::fs::Metadata>) -> Vec<Vec<PathBuf>> {
    let mut by_ino: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    for (p, m) in all {
        if m.is_file() && m.nlink() > 1 {
            by_ino.entry(m.ino()).or_default().push(p.clone());
        }
    }
    let mut groups: Vec<_> = by_ino
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

#[test]
fn copy_keeps_hard_links_between_subtrees_that_different_walkers_copy() {
    on_both(hard_links_between_subtrees);
}

fn hard_links_between_subtrees(base: &Path) {
    let src = base.join("src");
    let dirs = 24;
    for d in 0..dirs {
        let sub = src.join(format!("d{d}/inner"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..20 {
            std::fs::write(sub.join(format!("f{f}")), format!("{d}/{f}")).expect("write");
        }
    }
    // Each subtree links a file of the next one, and one inode has a name in every third.
    for d in 0..dirs {
        let next = (d + 1) % dirs;
        std::fs::hard_link(
            src.join(format!("d{next}/inner/f0")),
            src.join(format!("d{d}/from-next")),
        )
        .expect("link");
    }
    std::fs::write(src.join("d0/shared"), b"shared").expect("write");
    for d in (3..dirs).step_by(3) {
        std::fs::hard_link(src.join("d0/shared"), src.join(format!("d{d}/shared"))).expect("link");
    }

    let dst = base.join("dst");
    let stats = copy_tree(&src, &dst).expect("copy");

    let (want, got) = (entries(&src), entries(&dst));
    let mut names: Vec<_> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<_> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "every entry copied once");
    assert_eq!(
        link_groups(&got),
        link_groups(&want),
        "the same names share an inode in the copy"
    );
    for (p, m) in &want {
        if m.is_file() {
            assert_eq!(
                std::fs::read(dst.join(p)).expect("read copy"),
                std::fs::read(src.join(p)).expect("read source"),
                "{}",
                p.display()
            );
        }
    }
    // 24 × 20 files and `d0/shared` are copied; every other name is a link to one of them.
    assert_eq!(stats.files, 24 * 20 + 1);
    assert_eq!(stats.others, 24 + 7);
    assert_eq!(stats.dirs, 1 + 24 * 2);
}

#[test]
fn copy_of_a_tree_deeper_than_the_walk_bound_fails_whichever_walker_gets_there() {
    on_both(too_deep);
}

fn too_deep(base: &Path) {
    let src = base.join("src");
    let mut deep = src.clone();
    for i in 0..volume_agent::fsx::MAX_DEPTH + 2 {
        deep.push(if i % 2 == 0 { "a" } else { "b" });
    }
    std::fs::create_dir_all(&deep).expect("mkdir");
    // Siblings at every level, so subtrees are handed to other walkers all the way down.
    let mut level = src.clone();
    for i in 0..volume_agent::fsx::MAX_DEPTH + 2 {
        std::fs::create_dir(level.join("side")).expect("mkdir");
        std::fs::write(level.join("side/f"), b"x").expect("write");
        level.push(if i % 2 == 0 { "a" } else { "b" });
    }
    let err = copy_tree(&src, &base.join("dst")).expect_err("too deep");
    assert!(err.to_string().contains("deeper than"), "{err}");
}

/// A tmpfs mounted on `target`, detached when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn copy_refuses_a_mount_point_in_any_subtree_and_names_it() {
    on_both(mount_point_in_a_subtree);
}

fn mount_point_in_a_subtree(base: &Path) {
    let src = base.join("src");
    for d in 0..16 {
        let sub = src.join(format!("d{d}/inner"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..30 {
            std::fs::write(sub.join(format!("f{f}")), b"x").expect("write");
        }
    }
    let mnt = src.join("d11/inner/mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        println!("skipped: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    }
    let _guard = Tmpfs(mnt.clone());
    std::fs::write(mnt.join("other-fs"), b"never copied").expect("write");

    let err = copy_tree(&src, &base.join("dst")).expect_err("stops at the mount");
    assert!(err.is_mount_point(), "{err}");
    assert!(err.to_string().contains("d11/inner/mnt"), "{err}");
    assert!(
        !base.join("dst/d11/inner/mnt/other-fs").exists(),
        "nothing of the other file system is copied"
    );
}
