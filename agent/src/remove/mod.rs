//! Removal of volume trees, in parallel and safely.
//!
//! Directories are independent tasks on a few threads; every entry is removed relative to an
//! open directory handle (`openat`/`unlinkat` with `O_NOFOLLOW`), so a path is never resolved
//! again and a symlink is never followed. A directory on another mount (another filesystem or
//! a bind mount) stops the removal with an error naming it, before anything under it is
//! touched. Removal writes nothing, so it works on a full disk. An optional [`RateLimit`]
//! keeps a removal (or several sharing the limit) from starving other work on the disk.
//!
//! These are blocking functions; in the daemon they run on the inventory actor's threads
//! (inside a destroy), never on an event loop.

mod engine;
mod rate;

pub use rate::RateLimit;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a removal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoveStats {
    /// Entries (files, links, directories) removed.
    pub entries: u64,
    /// Bytes of storage released by removed files that had no other hard link; only counted
    /// when [`RemoveOptions::count_bytes`] is set (it costs a `stat` per file).
    pub bytes_freed: Option<u64>,
    /// How long the removal waited on its [`RateLimit`], summed over its threads.
    pub throttled: Duration,
}

/// How to remove a tree. The default uses two threads per core and no rate limit.
#[derive(Debug, Clone, Default)]
pub struct RemoveOptions {
    /// Threads to use; capped at 4 per core. `0` means 2 per core.
    pub threads: usize,
    /// Budget of entries per second, shared with every other removal given a clone of it.
    pub rate: Option<RateLimit>,
    /// Fill [`RemoveStats::bytes_freed`].
    pub count_bytes: bool,
}

/// A tree that could not be removed (entirely).
#[derive(Debug, thiserror::Error)]
#[error("removing {path}: {source}")]
pub struct RemoveError {
    /// The entry that could not be removed (or the mount point that stopped the removal).
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl RemoveError {
    /// True when the removal stopped because `path` is a mount point inside the tree.
    pub fn is_mount_point(&self) -> bool {
        self.source
            .get_ref()
            .is_some_and(|e| e.is::<crate::fsx::CrossesMount>())
    }
}

/// Removes `path` and everything below it with default options (two threads per core, no
/// rate limit). A path that does not exist is already removed; a file or symlink is unlinked.
pub fn remove_tree(path: &Path) -> Result<RemoveStats, RemoveError> {
    remove_tree_with(path, &RemoveOptions::default())
}

/// Removes `path` and everything below it. A path that does not exist is already removed; a
/// file or symlink (even one to a directory) is unlinked, never followed.
pub fn remove_tree_with(path: &Path, opts: &RemoveOptions) -> Result<RemoveStats, RemoveError> {
    let err = |source| RemoveError {
        path: path.to_owned(),
        source,
    };
    let mut meter = rate::Meter::new(opts.rate.as_ref());
    let bytes_freed = |freed: u64| opts.count_bytes.then_some(freed);
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(RemoveStats {
                bytes_freed: bytes_freed(0),
                ..RemoveStats::default()
            })
        }
        Err(e) => return Err(err(e)),
        Ok(meta) => meta,
    };
    if !meta.is_dir() {
        meter.take_one();
        let freed = if meta.nlink() <= 1 {
            meta.blocks() * 512
        } else {
            0
        };
        return match std::fs::remove_file(path) {
            Ok(()) => Ok(RemoveStats {
                entries: 1,
                bytes_freed: bytes_freed(freed),
                throttled: meter.throttled,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RemoveStats {
                bytes_freed: bytes_freed(0),
                throttled: meter.throttled,
                ..RemoveStats::default()
            }),
            Err(e) => Err(err(e)),
        };
    }
    let name = match path.file_name() {
        Some(name) => crate::fsx::NameBuf::new(name.as_bytes()).map_err(err)?,
        None => {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this path has no last component to remove (it is `/`, or ends in `.` or \
                 `..`); give the directory by its name",
            )))
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The path up to the root is the caller's (followed); from the root down, nothing is.
    let top = crate::fsx::Dir::open_host(parent).map_err(|e| RemoveError {
        path: parent.to_owned(),
        source: e.source,
    })?;
    let root = match engine::open_subdir(&top, name.as_name()) {
        Ok(Some(root)) => root,
        Ok(None) => {
            // Vanished, or replaced by a non-directory that is now unlinked.
            return Ok(RemoveStats {
                bytes_freed: bytes_freed(0),
                throttled: meter.throttled,
                ..RemoveStats::default()
            });
        }
        Err(e) => {
            return Err(RemoveError {
                path: parent.join(&e.path),
                source: e.source,
            })
        }
    };
    let threads = match opts.threads {
        0 => max_threads() / 2,
        n => n.min(max_threads()),
    };
    let tally = engine::Engine::run(
        parent,
        top,
        name,
        root,
        threads,
        opts.rate.as_ref(),
        opts.count_bytes,
    )?;
    Ok(RemoveStats {
        entries: tally.entries,
        bytes_freed: bytes_freed(tally.bytes),
        throttled: tally.throttled + meter.throttled,
    })
}

/// The most threads a removal uses: removal mostly waits on the filesystem journal and the
/// disk rather than computing, so a few threads per core keep more operations in flight.
fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_tree_and_treats_missing_as_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/b/f"), b"x").expect("write");
        let stats = remove_tree(&root).expect("removes");
        assert!(!root.exists());
        assert_eq!(stats.entries, 4, "v, a, b and f");
        assert_eq!(
            remove_tree(&root).expect("already gone is success"),
            RemoveStats::default()
        );
    }

    /// A directory `outside` holding a file `keep`, which must survive.
    fn outside_with_a_file(dir: &Path) -> PathBuf {
        let outside = dir.join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");
        outside
    }

    #[test]
    fn does_not_follow_symlinks_out_of_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = outside_with_a_file(dir.path());
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("deep/er")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("deep/er/link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("keep"), root.join("deep/file-link"))
            .expect("symlink");
        remove_tree(&root).expect("removes");
        assert!(!root.exists());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn a_symlink_given_as_the_root_is_unlinked_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = outside_with_a_file(dir.path());
        let link = dir.path().join("v");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let stats = remove_tree(&link).expect("removes");
        assert_eq!(stats.entries, 1);
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn a_file_given_as_the_root_is_unlinked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, vec![7u8; 10_000]).expect("write");
        let opts = RemoveOptions {
            count_bytes: true,
            ..RemoveOptions::default()
        };
        let stats = remove_tree_with(&file, &opts).expect("removes");
        assert_eq!(stats.entries, 1);
        assert!(stats.bytes_freed.expect("counted") >= 10_000);
        assert!(!file.exists());
    }

    #[test]
    fn a_path_without_a_last_component_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("v")).expect("mkdir");
        let err = remove_tree(&dir.path().join("v/..")).expect_err("refused");
        assert_eq!(err.source.kind(), io::ErrorKind::InvalidInput);
        assert!(dir.path().join("v").exists());
    }

    #[test]
    fn counts_bytes_of_files_without_other_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::write(root.join("a/big"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::write(dir.path().join("kept"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::hard_link(dir.path().join("kept"), root.join("a/linked")).expect("link");
        let opts = RemoveOptions {
            count_bytes: true,
            ..RemoveOptions::default()
        };
        let stats = remove_tree_with(&root, &opts).expect("removes");
        let freed = stats.bytes_freed.expect("counted");
        assert!(
            (64 * 1024..128 * 1024).contains(&freed),
            "only the unshared file counts: {freed}"
        );
        assert!(dir.path().join("kept").exists());
        assert_eq!(stats.entries, 4);
    }

    #[test]
    fn read_only_directories_are_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("ro/inner")).expect("mkdir");
        std::fs::write(root.join("ro/inner/f"), b"x").expect("write");
        std::fs::write(root.join("ro/f"), b"x").expect("write");
        for d in ["ro/inner", "ro"] {
            std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o555))
                .expect("chmod");
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let stats = remove_tree(&root).expect("removes");
        assert_eq!(stats.entries, 5);
        assert!(!root.exists());
    }

    #[test]
    fn single_thread_and_many_threads_remove_the_same_tree() {
        for threads in [1, 2, 64] {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("v");
            let mut made = 1;
            for a in 0..8 {
                for b in 0..8 {
                    let d = root.join(format!("{a}/{b}"));
                    std::fs::create_dir_all(&d).expect("mkdir");
                    for f in 0..10 {
                        std::fs::write(d.join(f.to_string()), b"x").expect("write");
                    }
                    made += 11;
                }
                made += 1;
            }
            let opts = RemoveOptions {
                threads,
                ..RemoveOptions::default()
            };
            let stats = remove_tree_with(&root, &opts).expect("removes");
            assert_eq!(stats.entries, made, "threads={threads}");
            assert!(!root.exists());
        }
    }

    #[test]
    fn rate_limit_makes_removal_wait_for_budget() {
        use std::sync::atomic::Ordering;
        let clock = rate::tests::SimulatedClock::default();
        let limit = RateLimit::with_clock(1000, 50, Box::new(clock.clone()));
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        for f in 0..2_000 {
            std::fs::write(root.join("a").join(f.to_string()), b"").expect("write");
        }
        let opts = RemoveOptions {
            threads: 2,
            rate: Some(limit.clone()),
            count_bytes: false,
        };
        let stats = remove_tree_with(&root, &opts).expect("removes");
        assert_eq!(stats.entries, 2_002);
        // 2,002 entries at 1,000/s after a burst of 50 need at least 1.952 s of budget; the
        // simulated clock only moves while a thread waits, so all of it shows as throttling.
        let needed = (2_002.0 - 50.0) / 1000.0;
        assert!(
            stats.throttled.as_secs_f64() >= needed - 1e-6,
            "throttled {:?}",
            stats.throttled
        );
        assert_eq!(limit.throttled(), stats.throttled);
        let elapsed = std::time::Duration::from_nanos(clock.0.load(Ordering::SeqCst));
        assert!(
            stats.entries as f64 <= 50.0 + 1000.0 * elapsed.as_secs_f64() + 1e-6,
            "{} entries in {elapsed:?} of budget",
            stats.entries
        );
    }

    #[test]
    fn no_rate_limit_means_no_throttling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        for f in 0..100 {
            std::fs::write(root.join("a").join(f.to_string()), b"").expect("write");
        }
        let stats = remove_tree(&root).expect("removes");
        assert_eq!(stats.throttled, std::time::Duration::ZERO);
        assert_eq!(stats.entries, 102);
    }
}
