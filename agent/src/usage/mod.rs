//! Disk accounting: real on-disk bytes per volume and the volumes filesystem's figures.
//!
//! Bytes are `st_blocks × 512`, hard links counted once, never crossing into another
//! filesystem, never following symlinks. An overlay child is measured by its own layer
//! (`upper/`), so data it shares with its parent is counted on the parent; a naive child is
//! a real copy and is measured whole. Measuring is incremental: each round measures a
//! bounded batch — volumes never measured first, then the longest unmeasured — so no pass
//! ever walks every volume.

pub mod actor;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use protocol::Handle;

use crate::inventory::{DriverKind, VolumeRecord};

/// Real on-disk bytes below `dir` (hard links once, same filesystem only).
pub fn measure(dir: &Path) -> io::Result<u64> {
    let root = std::fs::symlink_metadata(dir)?;
    let dev = root.dev();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut total = root.blocks() * 512;
    let mut stack: Vec<PathBuf> = Vec::new();
    if root.is_dir() {
        stack.push(dir.to_owned());
    }
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// The directory holding the bytes that belong to this volume alone.
pub fn own_data(record: &VolumeRecord) -> PathBuf {
    match (record.driver, &record.parent) {
        (DriverKind::Overlay, Some(_)) => record
            .path
            .parent()
            .map(|p| p.join("upper"))
            .unwrap_or_else(|| record.path.clone()),
        _ => record.path.clone(),
    }
}

/// The volumes filesystem: total and free bytes, free inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFigures {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub free_inodes: u64,
}

pub fn disk(path: &Path) -> io::Result<DiskFigures> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe_zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    };
    Ok(DiskFigures {
        total_bytes: st.f_blocks.saturating_mul(frsize),
        free_bytes: st.f_bavail.saturating_mul(frsize),
        free_inodes: st.f_favail,
    })
}

fn unsafe_zeroed() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Bytes per volume, as last measured, shared by the accounting actor (writer), the
/// reporter and the local API (readers).
#[derive(Debug, Clone, Default)]
pub struct Usage(Arc<RwLock<HashMap<Handle, (u64, Instant)>>>);

impl Usage {
    pub fn bytes(&self, h: &Handle) -> Option<u64> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(h)
            .map(|(b, _)| *b)
    }

    pub fn all(&self) -> HashMap<Handle, u64> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(h, (b, _))| (h.clone(), *b))
            .collect()
    }

    pub fn record(&self, h: Handle, bytes: u64, at: Instant) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h, (bytes, at));
    }

    /// Forgets volumes that are gone.
    pub fn retain(&self, present: &HashSet<&Handle>) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|h, _| present.contains(h));
    }

    /// The next `k` volumes to measure: never measured first, then the stalest.
    pub fn next_batch<'a>(&self, records: &'a [VolumeRecord], k: usize) -> Vec<&'a VolumeRecord> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut order: Vec<(Option<Instant>, &VolumeRecord)> = records
            .iter()
            .map(|r| (map.get(&r.handle).map(|(_, at)| *at), r))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.handle.cmp(&b.1.handle)));
        order.into_iter().take(k).map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("v");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("a"), vec![7u8; 64 * 1024]).expect("write");
        let one = measure(&d).expect("measure");
        std::fs::hard_link(d.join("a"), d.join("b")).expect("link");
        std::fs::hard_link(d.join("a"), d.join("c")).expect("link");
        assert_eq!(measure(&d).expect("measure"), one);
        std::fs::write(d.join("x"), vec![1u8; 64 * 1024]).expect("write");
        let two = measure(&d).expect("measure");
        assert!(two >= one + 64 * 1024, "{two} vs {one}");
    }

    #[test]
    fn counts_real_blocks_not_apparent_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("v");
        std::fs::create_dir(&d).expect("mkdir");
        let empty = measure(&d).expect("measure");
        let f = std::fs::File::create(d.join("sparse")).expect("create");
        f.set_len(1 << 30).expect("sparse 1 GiB");
        assert!(measure(&d).expect("measure") < empty + (1 << 20));
    }

    #[test]
    fn does_not_follow_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        std::fs::create_dir(&big).expect("mkdir");
        std::fs::write(big.join("f"), vec![1u8; 256 * 1024]).expect("write");
        let d = dir.path().join("v");
        std::fs::create_dir(&d).expect("mkdir");
        std::os::unix::fs::symlink(&big, d.join("link")).expect("symlink");
        assert!(measure(&d).expect("measure") < 256 * 1024);
    }

    #[test]
    fn disk_figures_are_sane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = disk(dir.path()).expect("statvfs");
        assert!(f.total_bytes > 0 && f.free_bytes <= f.total_bytes);
    }
}
