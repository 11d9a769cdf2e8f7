//! Durability of a copy-on-write copy on xfs, where the copy syncs no reflinked file and
//! no directory one by one but forces the log once after its last change
//! (`fsx::Journal::Ordered`). The crash is xfs's own: `xfs_io -x -c shutdown` stops the file
//! system at once without writing its in-memory log (what a power cut loses), then a
//! fresh mount replays what reached the on-disk log. Needs root, `mkfs.xfs` and `xfs_io`
//! (xfsprogs) and loop devices; skips with a printed reason otherwise.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use volume_agent::contents::copy::copy_tree;

#[path = "xfs_support.rs"]
mod xfs;
use xfs::{path, run, XfsImage};

/// A parent volume's data: nested directories, files with distinct contents, owners, modes
/// (set-id bits included), a symlink, an empty file, an extended attribute.
fn fill(root: &Path) {
    std::fs::create_dir(root).expect("root");
    for d in 0..12 {
        let dir = root.join(format!("d{d}")).join("sub");
        std::fs::create_dir_all(&dir).expect("dir");
        for f in 0..25 {
            let p = dir.join(format!("f{f}"));
            let mut file = File::create(&p).expect("file");
            let line = format!("{d}/{f} ");
            file.write_all(line.repeat(200 + f * 37).as_bytes())
                .expect("write");
            std::os::unix::fs::chown(&p, Some(1000 + d), Some(2000 + f as u32)).expect("chown");
        }
    }
    let special = root.join("d0/setuid");
    std::fs::write(&special, b"#!/bin/sh\n").expect("setuid file");
    std::fs::set_permissions(&special, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    File::create(root.join("d1/empty")).expect("empty");
    symlink("../d0/sub/f3", root.join("d2/link")).expect("symlink");
    xattr_set(&root.join("d3/sub/f1"), "user.origin", b"parent");
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path(p)).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: NUL-terminated strings and a buffer of the length passed.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path(p)).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of the length passed.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(r).ok().map(|n| buf[..n].to_vec())
}

/// What is compared of an entry: kind and mode, uid, gid, contents (a file's bytes, a
/// link's target), the `user.origin` attribute.
type Seen = (u32, u32, u32, Vec<u8>, Option<Vec<u8>>);

/// Every entry below `root` by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).expect("read")
            };
            let x = xattr_get(&p, "user.origin");
            let rel = p.strip_prefix(root).expect("below root").to_owned();
            out.insert(rel, (m.mode(), m.uid(), m.gid(), body, x));
        }
    }
    out
}

#[test]
fn reflinked_copy_on_xfs_survives_a_shutdown_that_drops_the_unforced_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = match XfsImage::make(tmp.path()) {
        Ok(i) => i,
        Err(why) => {
            eprintln!("SKIP: no xfs loop image here ({why}); needs root, xfsprogs, loop devices");
            return;
        }
    };
    let parent = img.mnt.join("parent");
    fill(&parent);
    // The parent is an initialized volume: durable before anything copies it.
    let root = File::open(&img.mnt).expect("open mount");
    // SAFETY: a valid descriptor.
    assert_eq!(
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) },
        0
    );
    drop(root);
    let before = snapshot(&parent);

    let child = img.mnt.join("child");
    let stats = copy_tree(&parent, &child).expect("copy");
    assert_eq!(
        stats.reflinked, stats.files,
        "every file reflinked: {stats:?}"
    );
    assert_eq!(
        stats.synced, 0,
        "nothing synced one by one on xfs: {stats:?}"
    );
    // A control: made after the copy and never synced, so the shutdown must lose it
    // (proof that the shutdown drops what the log force did not cover).
    std::fs::write(img.mnt.join("control"), b"unsynced").expect("control");

    run("xfs_io", &["-x", "-c", "shutdown", path(&img.mnt)]).expect("xfs shutdown");
    img.unmount().expect("unmount after shutdown");
    img.mount().expect("mount again (log recovery)");

    assert!(
        !img.mnt.join("control").exists(),
        "the shutdown kept a file nobody synced: it did not simulate a crash"
    );
    assert!(child.is_dir(), "the copy's root is gone after the crash");
    let after = snapshot(&child);
    let missing: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(missing.is_empty(), "lost in the crash: {missing:?}");
    for (rel, want) in &before {
        assert_eq!(
            after.get(rel),
            Some(want),
            "{} differs after the crash",
            rel.display()
        );
    }
    assert_eq!(after.len(), before.len());
}
