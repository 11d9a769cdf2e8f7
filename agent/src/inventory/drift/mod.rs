//! Drift: every record compared with the directory it describes.
//!
//! The agent is not the only thing on a worker that removes directories: an operator
//! cleaning up by hand, a disk replaced or not mounted, a restore from an old backup. A
//! record whose data directory is gone is flagged *missing*: the reporter moves it from the
//! report's volumes to the native dialect's `missing` list, `volumes list`, `gc plan` and
//! the `volume_agent_missing_volumes` gauge show it, and once the central side no longer
//! wants it the planner sends it through the ordinary destroy, which finds nothing (or only
//! leftovers such as the metadata file) to remove and drops the record, children first.
//!
//! The verdict is recomputed, never stored: [`Inventory::scan_drift`] runs at the end of
//! [`Inventory::open`] (so the first report after a restart already has it) and then every
//! `volumes.scan_interval` (`actor.rs`). A directory that comes back (a disk mounted again)
//! is a volume again at the next scan.
//!
//! What is checked, for each record in a settled state (`created`, `initializing`,
//! `initialized`; a `creating` or `destroying` record is mid-move by design):
//! * `live/<h>` opened (`O_PATH|O_NOFOLLOW`) relative to `live/`, opened once per scan,
//!   and `volume` looked at (`statx`, never followed) relative to that, through `fsx`:
//!   never a path walk, no symlink followed on the way; gone, or not a directory, is
//!   missing;
//! * an overlay child's data directory must be a mount (another device than `live/`): after
//!   a restart whose re-mount failed it is an empty directory with none of the data;
//! * an overlay child stacked on a missing volume (its parent, or the parent's parent
//!   through a chain of overlay children, down to the root layer) is missing too: its
//!   lower layer is gone, so its contents are incomplete and it cannot be mounted again.
//!
//! A volumes root without `live/` (a volumes disk not mounted at all) fails the scan,
//! loudly, and keeps the last verdicts: that is an operator's matter, not drift of single
//! volumes to report to the central side.
//!
//! A suspect is confirmed under the volume's lock, so a create or destroy moving its
//! directories is never taken for drift; a volume whose lock is busy, or whose look-up
//! fails for another reason (`EACCES`, `EIO`), keeps its previous verdict.

pub mod actor;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;

use protocol::{Handle, VolumeState};

use super::layout::{DATA_DIR, LIVE_DIR};
use super::store;
use super::{io_err, Inventory, InventoryError};
use crate::fsx::{Dir, Errno, FsxError, Kind, NameBuf};

/// What one scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftScan {
    /// Records checked (those in a settled state).
    pub checked: usize,
    /// Every record now missing, in handle order.
    pub missing: Vec<Handle>,
    /// Missing now, not after the scan before.
    pub newly_missing: Vec<Handle>,
    /// Missing after the scan before, there again now.
    pub back: Vec<Handle>,
}

impl DriftScan {
    /// Whether the set of missing records changed.
    pub fn changed(&self) -> bool {
        !self.newly_missing.is_empty() || !self.back.is_empty()
    }
}

/// Why a data directory counts as gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// Nothing there (or `live/<h>` itself is gone).
    Absent,
    /// Something else than a directory (a file, a symlink) took its name.
    NotADirectory,
    /// An overlay child's data directory is not mounted.
    NotMounted,
    /// An overlay layer it is stacked on belongs to a missing volume.
    StackedOnMissing,
}

impl Gone {
    fn as_str(self) -> &'static str {
        match self {
            Gone::Absent => "its data directory is gone",
            Gone::NotADirectory => "its data directory was replaced by something else",
            Gone::NotMounted => "its overlay mount is not there (its data directory is empty)",
            Gone::StackedOnMissing => {
                "a volume it is stacked on (an overlay lower layer) is missing"
            }
        }
    }
}

/// Whether the drift scan checks records in this state.
fn settled(state: VolumeState) -> bool {
    matches!(
        state,
        VolumeState::Created | VolumeState::Initializing | VolumeState::Initialized
    )
}

/// The volumes root's `live/` opened once per scan; every look-up is relative to it.
pub(crate) struct RootDir {
    live: Dir,
    /// The device of `live/`: an overlay mount below it has another one.
    live_dev: u64,
    /// `volume`, the data directory's name in `live/<h>/`.
    data: NameBuf,
}

impl RootDir {
    pub(crate) fn open(root: &Path) -> io::Result<RootDir> {
        // `live/` is the agent's own directory: a symlink in its place is refused
        // (`O_NOFOLLOW`), and so is anything but a directory.
        let live = Dir::open_root(&root.join(LIVE_DIR)).map_err(|e| e.source)?;
        let live_dev = live.meta().map_err(|e| e.source)?.dev;
        Ok(RootDir {
            live,
            live_dev,
            data: NameBuf::new(DATA_DIR)?,
        })
    }

    /// `live/<h>` opened relative to `live/` (never through a symlink), then `volume` looked
    /// at relative to it, not following a symlink in its place. `None`: the data directory
    /// is there (and, when `mount` is set, is a mount).
    pub(crate) fn check(&self, h: &Handle, mount: bool) -> io::Result<Option<Gone>> {
        let name = NameBuf::new(h.as_str())?;
        let gone = |e: &FsxError| {
            if e.is(Errno::NOENT) || e.is(Errno::NOTDIR) {
                Some(Gone::Absent)
            } else if e.is(Errno::LOOP) {
                // A symlink took `live/<h>`'s name: never followed.
                Some(Gone::NotADirectory)
            } else {
                None
            }
        };
        let vol = match self.live.open_dir_path(name.as_name()) {
            Ok(d) => d,
            Err(e) => return gone(&e).map(Some).ok_or(e.source),
        };
        match vol.stat(self.data.as_name()) {
            Err(e) if e.is(Errno::NOENT) || e.is(Errno::NOTDIR) => Ok(Some(Gone::Absent)),
            Err(e) => Err(e.source),
            Ok(st) if st.kind != Kind::Dir => Ok(Some(Gone::NotADirectory)),
            Ok(st) if mount && st.dev == self.live_dev => Ok(Some(Gone::NotMounted)),
            Ok(_) => Ok(None),
        }
    }
}

/// What the propagation needs to know about a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) parent: Option<Handle>,
    pub(crate) overlay_child: bool,
    pub(crate) settled: bool,
}

/// The settled overlay children stacked on a volume in `direct`: the volumes their mount
/// reads from are the ancestors up to and including the first one that is not an overlay
/// child. Pure; a parent cycle (impossible in a sound store) ends the walk.
pub(crate) fn stacked_on_missing(
    nodes: &HashMap<Handle, Node>,
    direct: &BTreeSet<Handle>,
) -> BTreeSet<Handle> {
    let mut out = BTreeSet::new();
    for (h, n) in nodes {
        if !n.overlay_child || !n.settled || direct.contains(h) {
            continue;
        }
        let mut cur = n.parent.as_ref();
        for _ in 0..nodes.len() {
            let Some(p) = cur else { break };
            if direct.contains(p) {
                out.insert(h.clone());
                break;
            }
            match nodes.get(p) {
                Some(pn) if pn.overlay_child => cur = pn.parent.as_ref(),
                _ => break,
            }
        }
    }
    out
}

impl Inventory {
    /// Whether the last drift scan found `h`'s data directory gone.
    pub fn is_missing(&self, h: &Handle) -> bool {
        self.missing_set().contains(h)
    }

    /// Every record the last drift scan found missing, in handle order.
    pub fn missing(&self) -> Vec<Handle> {
        self.missing_set().iter().cloned().collect()
    }

    fn missing_set(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<Handle>> {
        self.inner.missing.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A record left the inventory (destroyed) or was made anew: it is not missing.
    pub(crate) fn forget_missing(&self, h: &Handle) {
        let mut set = self
            .inner
            .missing
            .write()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(h);
    }

    /// Compares every settled record with its data directory (see the module docs),
    /// replaces the missing set, and logs each change. Blocking.
    pub fn scan_drift(&self) -> Result<DriftScan, InventoryError> {
        let store = &self.inner.store;
        let root_path = &self.inner.layout.root;
        let mut nodes: HashMap<Handle, Node> = HashMap::new();
        for kv in store.volumes.iter() {
            let (k, v) = kv.map_err(|e| store.err("listing volumes", e))?;
            let s = store::decode(&k, &v)?;
            nodes.insert(
                store::handle_from_key(&k)?,
                Node {
                    overlay_child: s.is_overlay_child(),
                    settled: settled(s.state),
                    parent: s.parent,
                },
            );
        }
        let root = RootDir::open(root_path).map_err(io_err(root_path))?;
        let before: BTreeSet<Handle> = self.missing_set().clone();
        let mut direct = BTreeSet::new();
        let mut why: HashMap<Handle, Gone> = HashMap::new();
        let mut suspects = Vec::new();
        let mut checked = 0;
        let keep_verdict = |h: &Handle, direct: &mut BTreeSet<Handle>| {
            if before.contains(h) {
                direct.insert(h.clone());
            }
        };
        for (h, n) in &nodes {
            if !n.settled {
                continue;
            }
            checked += 1;
            match root.check(h, n.overlay_child) {
                Ok(None) => {}
                Ok(Some(_)) => suspects.push(h.clone()),
                Err(e) => {
                    tracing::warn!(handle = %h, error = %e, "drift scan: cannot look at the volume's data directory; keeping its last verdict");
                    keep_verdict(h, &mut direct);
                }
            }
        }
        // Confirm under the volume's lock: a create or destroy holding it is moving its
        // directories on purpose.
        for h in suspects {
            let Some(_guard) = self.try_lock(&h) else {
                keep_verdict(&h, &mut direct);
                continue;
            };
            let Some(s) = store.get(&h)? else { continue };
            if !settled(s.state) {
                continue;
            }
            match root.check(&h, s.is_overlay_child()) {
                Ok(None) => {}
                Ok(Some(gone)) => {
                    why.insert(h.clone(), gone);
                    direct.insert(h);
                }
                Err(_) => keep_verdict(&h, &mut direct),
            }
        }
        let mut missing = direct.clone();
        for h in stacked_on_missing(&nodes, &direct) {
            why.entry(h.clone()).or_insert(Gone::StackedOnMissing);
            missing.insert(h);
        }
        // A volume destroyed while the scan ran has no record to flag any more.
        let mut gone_meanwhile = Vec::new();
        for h in &missing {
            if store.get(h)?.is_none() {
                gone_meanwhile.push(h.clone());
            }
        }
        for h in gone_meanwhile {
            missing.remove(&h);
        }
        *self
            .inner
            .missing
            .write()
            .unwrap_or_else(|p| p.into_inner()) = missing.clone();

        let newly_missing: Vec<Handle> = missing.difference(&before).cloned().collect();
        let back: Vec<Handle> = before
            .difference(&missing)
            .filter(|h| nodes.contains_key(*h))
            .cloned()
            .collect();
        for h in &newly_missing {
            let reason = why
                .get(h)
                .map_or("its data directory is gone", |g| g.as_str());
            tracing::error!(handle = %h, dir = %self.inner.layout.data(h).display(), reason,
                "volume is missing: {reason}; reporting it missing, and its record goes once the central side no longer wants it");
        }
        for h in &back {
            tracing::warn!(handle = %h, "volume's data directory is there again; it is no longer missing");
        }
        Ok(DriftScan {
            checked,
            missing: missing.into_iter().collect(),
            newly_missing,
            back,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Handle {
        Handle::new(s).expect("test handle")
    }

    fn node(parent: Option<&str>, overlay_child: bool) -> Node {
        Node {
            parent: parent.map(h),
            overlay_child,
            settled: true,
        }
    }

    /// The overlay children `stacked_on_missing` adds when `gone` is directly missing.
    fn stacked(nodes: Vec<(&str, Node)>, gone: &str) -> Vec<Handle> {
        let nodes: HashMap<Handle, Node> = nodes.into_iter().map(|(k, v)| (h(k), v)).collect();
        let direct: BTreeSet<Handle> = [h(gone)].into();
        stacked_on_missing(&nodes, &direct).into_iter().collect()
    }

    #[test]
    fn overlay_children_stacked_on_a_missing_volume_are_missing() {
        // root <- o1 (overlay) <- o2 (overlay); root <- n (naive copy); other <- o3 (overlay)
        let nodes = vec![
            ("root", node(None, false)),
            ("o1", node(Some("root"), true)),
            ("o2", node(Some("o1"), true)),
            ("n", node(Some("root"), false)),
            ("other", node(None, false)),
            ("o3", node(Some("other"), true)),
        ];
        assert_eq!(stacked(nodes, "root"), [h("o1"), h("o2")]);
    }

    #[test]
    fn a_naive_volume_between_stops_the_stack() {
        // gone <- mid (naive copy, its own full data) <- top (overlay on mid's data)
        let nodes = vec![
            ("gone", node(None, false)),
            ("mid", node(Some("gone"), false)),
            ("top", node(Some("mid"), true)),
        ];
        assert!(stacked(nodes, "gone").is_empty());
    }

    #[test]
    fn unsettled_children_and_cycles_are_left_alone() {
        let mut creating = node(Some("gone"), true);
        creating.settled = false;
        let nodes = vec![
            ("gone", node(None, false)),
            ("creating", creating),
            ("a", node(Some("b"), true)),
            ("b", node(Some("a"), true)),
        ];
        assert!(stacked(nodes, "gone").is_empty());
    }
}
