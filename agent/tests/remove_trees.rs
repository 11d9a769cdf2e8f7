//! Removal of large trees, and of read-only trees by a user who is not root.

use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use volume_agent::remove::{remove_tree, remove_tree_with, RemoveOptions};

/// A scratch tmpfs with room for `inodes` entries, unmounted on drop; `None` (with the reason
/// printed) where mounting is refused, and the test then uses the temp dir's filesystem.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(inodes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size=2g,nr_inodes={inodes}"))
            .arg("tmpfs")
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs(dir)),
            other => {
                println!("no tmpfs ({other:?}): using the temp dir's filesystem instead");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn one_directory_with_a_million_entries() {
    const ENTRIES: u32 = 1_000_000;
    // A tmpfs keeps this quick (and off a shared disk) where the test may mount one.
    let tmpfs = Tmpfs::mount(u64::from(ENTRIES) + 1_000);
    let fallback = tempfile::tempdir().expect("tempdir");
    let base = tmpfs.as_ref().map_or(fallback.path(), |t| t.0.path());
    let root = base.join("v");
    let big = root.join("big");
    std::fs::create_dir_all(&big).expect("mkdir");
    let mut name = big.join("entry");
    for i in 0..ENTRIES {
        name.set_file_name(format!("entry-{i:07}"));
        std::fs::File::create(&name).expect("create");
    }
    let opts = RemoveOptions {
        threads: 2,
        ..RemoveOptions::default()
    };
    let stats = remove_tree_with(&root, &opts).expect("removes");
    assert_eq!(stats.entries, u64::from(ENTRIES) + 2);
    assert!(!root.exists());
}

/// Environment variable naming the tree the child process removes.
const CHILD_TREE: &str = "REMOVE_TEST_TREE_AS_NON_ROOT";
const NOBODY: u32 = 65534;

#[test]
fn a_user_who_is_not_root_removes_read_only_and_unreadable_directories() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to create a tree owned by another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("v");
    for d in ["ro/inner", "unreadable/inner", "write-only/inner", "plain"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
        std::fs::write(root.join(d).join("f"), b"x").expect("write");
        std::fs::write(root.join(d).join("../g"), b"x").expect("write");
    }
    chown_tree(dir.path());
    for (d, mode) in [
        ("ro/inner", 0o555),
        ("ro", 0o555),
        ("unreadable/inner", 0o000),
        ("unreadable", 0o000),
        ("write-only", 0o300),
        ("", 0o555),
    ] {
        std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "removes_the_tree_named_in_the_environment",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_TREE, &root)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run the test binary as nobody");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() && log.contains("Permission denied") && log.contains("current_exe") {
        println!("skipped: the test binary is not executable by an unprivileged user");
        return;
    }
    assert!(out.status.success(), "child failed: {log}");
    assert!(log.contains("removed 16 entries"), "{log}");
    assert!(!root.exists());
}

/// Run by the test above in a process that is not root; ignored when run alone.
#[test]
#[ignore = "helper run by a_user_who_is_not_root_removes_read_only_and_unreadable_directories"]
fn removes_the_tree_named_in_the_environment() {
    let tree = std::env::var_os(CHILD_TREE).expect("tree to remove in the environment");
    // SAFETY: geteuid has no preconditions.
    assert_ne!(unsafe { libc::geteuid() }, 0, "must run unprivileged");
    let stats = remove_tree(Path::new(&tree)).expect("removes as non-root");
    println!("removed {} entries", stats.entries);
}

fn chown_tree(path: &Path) {
    chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
    if std::fs::symlink_metadata(path).expect("stat").is_dir() {
        for entry in std::fs::read_dir(path).expect("list") {
            chown_tree(&entry.expect("entry").path());
        }
    }
}
