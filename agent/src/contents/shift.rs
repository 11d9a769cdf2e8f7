//! The owner shift of a volume's tree when its privilege changes (`PUT
//! /volumes/{h}/privileged`, or a copy-on-write child whose privilege differs from its
//! parent's): every entry's owner goes from what one [`IdMap`] stores to what the other
//! does, set-id bits put back after the `chown` that clears them.
//!
//! fd-relative: each entry is pinned with an `O_PATH` handle ([`fsx::Node`]) and changed
//! through that handle, so a rename or symlink swap inside the volume while it runs can
//! only make it miss or revisit an entry of the volume, never touch anything outside.

use crate::fsx::{self, Descend, Dir, Kind, Name, Visitor};

use super::IdMap;

/// What a shift changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShiftStats {
    pub entries: u64,
    pub changed: u64,
}

struct Shift {
    from: IdMap,
    to: IdMap,
    stats: ShiftStats,
}

impl Shift {
    fn one(&mut self, dir: &Dir, name: Name<'_>) -> fsx::Result<()> {
        let node = match dir.open_node(name) {
            Ok(n) => n,
            // Removed meanwhile: nothing to shift.
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let meta = *node.meta();
        self.stats.entries += 1;
        let (uid, gid) = self.to.shift_from(self.from, meta.uid, meta.gid);
        if (uid, gid) == (meta.uid, meta.gid) {
            return Ok(());
        }
        node.chown(uid, gid)?;
        if meta.kind != Kind::Symlink && meta.mode & 0o6000 != 0 {
            // chown cleared the set-id bits; put the exact mode back.
            node.chmod(meta.mode)?;
        }
        self.stats.changed += 1;
        Ok(())
    }
}

impl Visitor for Shift {
    type Error = fsx::FsxError;

    fn entry(&mut self, dir: &Dir, name: Name<'_>, _kind: Kind) -> fsx::Result<Descend> {
        self.one(dir, name)?;
        Ok(Descend::Yes)
    }

    fn changed(&mut self, _dir: &Dir, _name: Name<'_>, _err: fsx::FsxError) -> fsx::Result<()> {
        // Gone or no longer a directory: its own owner was already handled by `one`.
        Ok(())
    }
}

/// Changes owners of `root` and everything below it from what `from` stores to what
/// `to` stores. Never follows a symlink, never leaves `root`'s mount.
pub fn shift_tree(root: &Dir, from: IdMap, to: IdMap) -> fsx::Result<ShiftStats> {
    if from == to {
        return Ok(ShiftStats::default());
    }
    let meta = root.meta()?;
    let (uid, gid) = to.shift_from(from, meta.uid, meta.gid);
    if (uid, gid) != (meta.uid, meta.gid) {
        root.chown_self(uid, gid)?;
        root.chmod_self(meta.mode)?;
    }
    let mut shift = Shift {
        from,
        to,
        stats: ShiftStats {
            entries: 1,
            changed: 0,
        },
    };
    fsx::walk(root, &mut shift)?;
    Ok(shift.stats)
}
