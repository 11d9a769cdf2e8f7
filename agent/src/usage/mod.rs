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

use crate::fsx;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use protocol::Handle;

use crate::inventory::{DriverKind, VolumeRecord};

/// Real on-disk bytes below `dir` (hard links once, same file system only, never through
/// a symlink): an fd-relative walk ([`fsx::walk`]), so a container renaming or swapping
/// directories meanwhile can only make it count some of its own entries twice or not at
/// all, never anything outside. A directory that vanishes meanwhile counts as empty.
pub fn measure(dir: &Path) -> io::Result<u64> {
    let root = match fsx::Dir::open_root(dir) {
        Ok(r) => r,
        Err(e) if e.is_wrong_kind() => {
            // A file or a symlink: its own blocks.
            return std::fs::symlink_metadata(dir).map(|m| m.blocks() * 512);
        }
        Err(e) => return Err(e.source),
    };
    let mut m = Measure {
        seen: HashSet::new(),
        total: root.meta().map_err(|e| e.source)?.disk_bytes(),
    };
    fsx::walk(&root, &mut m).map_err(|e| io::Error::new(e.source.kind(), e))?;
    Ok(m.total)
}

struct Measure {
    seen: HashSet<u64>,
    total: u64,
}

impl fsx::Visitor for Measure {
    type Error = fsx::FsxError;

    fn entry(
        &mut self,
        dir: &fsx::Dir,
        name: fsx::Name<'_>,
        _kind: fsx::Kind,
    ) -> fsx::Result<fsx::Descend> {
        let meta = match dir.stat(name) {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Ok(fsx::Descend::No),
            Err(e) => return Err(e),
        };
        if meta.dev != dir.placement().dev
            || (meta.nlink > 1 && !meta.is_dir() && !self.seen.insert(meta.ino))
        {
            return Ok(fsx::Descend::No);
        }
        self.total += meta.disk_bytes();
        Ok(fsx::Descend::Yes)
    }

    fn changed(
        &mut self,
        _dir: &fsx::Dir,
        _name: fsx::Name<'_>,
        _err: fsx::FsxError,
    ) -> fsx::Result<()> {
        // Gone, replaced, or a mount point: nothing (more) of this volume's to count.
        Ok(())
    }
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

pub use fsx::host::DiskFigures;

/// The figures of the file system holding `path`.
pub fn disk(path: &Path) -> io::Result<DiskFigures> {
    fsx::host::disk(path)
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
