//! Owner mapping of unprivileged volumes, as baggageclaim does it: in a volume with
//! `privileged: false`, host uid/gid 0 is stored as the highest valid id of
//! `/proc/self/uid_map` / `gid_map` (usually 4294967294); every other id is unchanged. A
//! privileged volume keeps ids as they are.

use std::fs;
use std::path::Path;

use crate::fsx;

/// The highest id baggageclaim falls back to when the map cannot be read.
const FALLBACK_MAX_ID: u32 = 4_294_967_294;

/// How ids of one volume relate to the ids a tar stream (or the caller) speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// `Some((uid, gid))`: the on-disk ids that stand for root; `None`: identity.
    root_as: Option<(u32, u32)>,
}

impl IdMap {
    /// No mapping (a privileged volume).
    pub const IDENTITY: IdMap = IdMap { root_as: None };

    /// Root is stored as `(uid, gid)`.
    pub fn root_as(uid: u32, gid: u32) -> IdMap {
        IdMap {
            root_as: Some((uid, gid)),
        }
    }

    /// The mapping of a volume with the given privilege on this host.
    pub fn for_volume(privileged: bool) -> IdMap {
        if privileged {
            IdMap::IDENTITY
        } else {
            IdMap::root_as(max_valid_id("uid_map"), max_valid_id("gid_map"))
        }
    }

    /// The on-disk ids that stand for root, when they differ from root's own.
    pub fn mapped_root(&self) -> Option<(u32, u32)> {
        self.root_as
    }

    /// Re-owns the directory `dir` itself (not its contents) as this map stores its
    /// current owner: a new volume's data root, made by the agent as root, becomes the
    /// mapped root in an unprivileged volume, as baggageclaim does.
    pub fn own_root(&self, dir: &fsx::Dir) -> fsx::Result<()> {
        let meta = dir.meta()?;
        let (uid, gid) = self.to_disk(meta.uid, meta.gid);
        if (uid, gid) != (meta.uid, meta.gid) {
            dir.chown_self(uid, gid)?;
            dir.chmod_self(meta.mode)?;
        }
        Ok(())
    }

    /// The on-disk ids under this map for ids stored under `from`.
    pub fn shift_from(&self, from: IdMap, uid: u32, gid: u32) -> (u32, u32) {
        let (u, g) = from.from_disk(uid, gid);
        self.to_disk(u, g)
    }

    /// Ids as written to disk for ids `(uid, gid)` of a stream.
    pub fn to_disk(&self, uid: u32, gid: u32) -> (u32, u32) {
        match self.root_as {
            None => (uid, gid),
            Some((ru, rg)) => (
                if uid == 0 { ru } else { uid },
                if gid == 0 { rg } else { gid },
            ),
        }
    }

    /// Ids as streamed out for on-disk ids `(uid, gid)`.
    pub fn from_disk(&self, uid: u32, gid: u32) -> (u32, u32) {
        match self.root_as {
            None => (uid, gid),
            Some((ru, rg)) => (
                if uid == ru { 0 } else { uid },
                if gid == rg { 0 } else { gid },
            ),
        }
    }
}

/// The highest id a map file of `/proc/self` allows (`inside + count - 1` over its lines).
fn max_valid_id(file: &str) -> u32 {
    fs::read_to_string(Path::new("/proc/self").join(file))
        .ok()
        .and_then(|s| parse_max_id(&s))
        .unwrap_or(FALLBACK_MAX_ID)
}

/// Parses an id map (`inside outside count` per line) into its highest valid inside id.
pub fn parse_max_id(map: &str) -> Option<u32> {
    map.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace().map(str::parse::<u64>);
            let inside = it.next()?.ok()?;
            let _outside = it.next()?.ok()?;
            let count = it.next()?.ok()?;
            (count > 0).then(|| inside + count - 1)
        })
        .max()
        .map(|m| u32::try_from(m).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_id_of_the_initial_namespace_is_one_below_the_top() {
        assert_eq!(
            parse_max_id("         0          0 4294967295\n"),
            Some(4_294_967_294)
        );
        assert_eq!(parse_max_id("0 1000 1\n1 100000 65536\n"), Some(65536));
        assert_eq!(parse_max_id(""), None);
    }

    #[test]
    fn unprivileged_maps_only_root_both_ways() {
        let m = IdMap::root_as(65534, 65533);
        assert_eq!(m.to_disk(0, 0), (65534, 65533));
        assert_eq!(m.to_disk(1000, 0), (1000, 65533));
        assert_eq!(m.from_disk(65534, 65533), (0, 0));
        assert_eq!(m.from_disk(1000, 1000), (1000, 1000));
        assert_eq!(IdMap::IDENTITY.to_disk(0, 0), (0, 0));
    }
}
