//! Removal of volume trees.
//!
//! Entries are removed relative to open directory handles (std's `remove_dir_all` uses
//! `openat`/`unlinkat` on Linux and never follows symlinks). Removal frees space, so it
//! works on a full disk.

use std::io;
use std::path::{Path, PathBuf};

/// What a removal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoveStats {
    /// Entries (files, links, directories) removed.
    pub entries: u64,
}

/// A tree that could not be removed.
#[derive(Debug, thiserror::Error)]
#[error("removing {path}: {source}")]
pub struct RemoveError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Removes `path` and everything below it. A path that does not exist is already removed.
pub fn remove_tree(path: &Path) -> Result<RemoveStats, RemoveError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RemoveStats::default()),
        Err(source) => {
            return Err(RemoveError {
                path: path.to_owned(),
                source,
            })
        }
        Ok(meta) if !meta.is_dir() => {
            return std::fs::remove_file(path)
                .map(|()| RemoveStats { entries: 1 })
                .map_err(|source| RemoveError {
                    path: path.to_owned(),
                    source,
                })
        }
        Ok(_) => {}
    }
    std::fs::remove_dir_all(path)
        .map(|()| RemoveStats::default())
        .or_else(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Ok(RemoveStats::default())
            } else {
                Err(RemoveError {
                    path: path.to_owned(),
                    source,
                })
            }
        })
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
        remove_tree(&root).expect("removes");
        assert!(!root.exists());
        remove_tree(&root).expect("already gone is success");
    }

    #[test]
    fn does_not_follow_symlinks_out_of_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");
        let root = dir.path().join("v");
        std::fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        remove_tree(&root).expect("removes");
        assert!(outside.join("keep").exists());
    }
}
