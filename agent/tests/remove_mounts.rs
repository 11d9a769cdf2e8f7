//! Removal across mount points and on a full filesystem, with real mounts (needs root; each
//! test skips with a printed reason where the kernel refuses the mount).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use volume_agent::remove::{remove_tree, remove_tree_with, RemoveOptions};

/// A mount that is detached when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).expect("path");
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<Mounted> {
    let c = |s: &[u8]| CString::new(s).expect("no NUL");
    let source = c(source.as_bytes());
    let target_c = c(target.as_os_str().as_bytes());
    let fstype = fstype.map(|s| c(s.as_bytes()));
    let data = data.map(|s| c(s.as_bytes()));
    // SAFETY: NUL-terminated strings or null pointers, as mount(2) allows.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    if ret == 0 {
        Ok(Mounted(target.to_owned()))
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bind(source: &Path, target: &Path) -> io::Result<Mounted> {
    mount(
        source.to_str().expect("utf-8 temp path"),
        target,
        None,
        libc::MS_BIND,
        None,
    )
}

fn tmpfs(target: &Path, size: &str) -> io::Result<Mounted> {
    mount(
        "tmpfs",
        target,
        Some("tmpfs"),
        0,
        Some(&format!("size={size}")),
    )
}

/// A tree `v` with files and subdirectories around the directory `v/a/b/mnt`.
fn tree_with_mount_point(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("v");
    let mnt = root.join("a/b/mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    for d in ["", "a", "a/b", "c", "c/d"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
        std::fs::write(root.join(d).join("file"), b"x").expect("write");
    }
    (root, mnt)
}

#[test]
fn a_bind_mount_inside_stops_the_removal_and_its_content_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).expect("mkdir");
    std::fs::write(outside.join("keep"), b"precious").expect("write");
    std::fs::write(outside.join("sub/keep"), b"precious").expect("write");
    let (root, mnt) = tree_with_mount_point(dir.path());
    let _mounted = match bind(&outside, &mnt) {
        Ok(m) => m,
        Err(e) => {
            println!("skipped: bind mount refused: {e}");
            return;
        }
    };
    let err = remove_tree(&root).expect_err("a mount point inside must stop the removal");
    assert!(err.is_mount_point(), "{err}");
    assert_eq!(err.path, mnt, "the error names the mount point: {err}");
    assert!(err.to_string().contains("unmount"), "says the fix: {err}");
    assert_eq!(
        std::fs::read(outside.join("keep")).expect("kept"),
        b"precious"
    );
    assert_eq!(
        std::fs::read(outside.join("sub/keep")).expect("kept"),
        b"precious"
    );
    assert!(
        mnt.join("sub/keep").exists(),
        "still visible through the mount"
    );
}

#[test]
fn another_filesystem_mounted_inside_stops_the_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, mnt) = tree_with_mount_point(dir.path());
    let _mounted = match tmpfs(&mnt, "1m") {
        Ok(m) => m,
        Err(e) => {
            println!("skipped: tmpfs mount refused: {e}");
            return;
        }
    };
    std::fs::create_dir(mnt.join("inner")).expect("mkdir");
    std::fs::write(mnt.join("inner/keep"), b"precious").expect("write");
    let opts = RemoveOptions {
        threads: 1,
        ..RemoveOptions::default()
    };
    let err = remove_tree_with(&root, &opts).expect_err("refused");
    assert!(err.is_mount_point(), "{err}");
    assert_eq!(err.path, mnt);
    assert_eq!(
        std::fs::read(mnt.join("inner/keep")).expect("kept"),
        b"precious"
    );
}

#[test]
fn removal_succeeds_on_a_full_filesystem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _mounted = match tmpfs(dir.path(), "2m") {
        Ok(m) => m,
        Err(e) => {
            println!("skipped: tmpfs mount refused: {e}");
            return;
        }
    };
    let root = dir.path().join("v");
    std::fs::create_dir(&root).expect("mkdir");
    // Fill the filesystem with small files in nested directories until it refuses more.
    let full = 'fill: {
        for a in 0..100 {
            let d = root.join(a.to_string());
            if let Err(e) = std::fs::create_dir(&d) {
                break 'fill e;
            }
            for f in 0..100 {
                if let Err(e) = std::fs::write(d.join(f.to_string()), [0u8; 4096]) {
                    break 'fill e;
                }
            }
        }
        panic!("2 MiB tmpfs never filled up");
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
    let again = std::fs::write(root.join("one-more"), [0u8; 4096]);
    assert_eq!(
        again.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOSPC),
        "the disk is full before removing"
    );
    let made = count_entries(&root);
    let stats = remove_tree(&root).expect("removal needs no space");
    assert!(!root.exists());
    assert_eq!(stats.entries, made);
}

/// `path` and everything below it.
fn count_entries(path: &Path) -> u64 {
    let mut n = 1;
    if std::fs::symlink_metadata(path).expect("stat").is_dir() {
        for entry in std::fs::read_dir(path).expect("list") {
            n += count_entries(&entry.expect("entry").path());
        }
    }
    n
}
