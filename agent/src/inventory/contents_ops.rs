//! The inventory's operations on volume contents: creates with a baggageclaim strategy
//! (copy-on-write child, import), and the privilege flip. Each runs under the volume's
//! lock with its state checked inside; the file work itself is in [`crate::contents`].

use std::io;
use std::path::Path;

use protocol::local::{CreateVolumeRequest, Strategy};

use super::{CreateSpec, Handle, Inventory, InventoryError, Populate, VolumeRecord, VolumeState};
use crate::contents::{import, shift, sync, IdMap};
use crate::fsx::Dir;

fn populate_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// Changes owners under `data` from what `from` stores to what `to` stores, then makes
/// that durable file by file (never a `syncfs`, which would wait for every container's
/// dirty data on the file system while the volume's lock is held).
fn shift_data(data: &Path, from: IdMap, to: IdMap) -> io::Result<()> {
    let root = Dir::open_root(data).map_err(populate_err)?;
    shift::shift_tree(&root, from, to).map_err(populate_err)?;
    sync::sync_tree(&root).map_err(populate_err)
}

impl Inventory {
    /// Creates the volume a local-API request asks for, in `initial_state`: an empty
    /// volume (its root owned by the volume's root), a copy-on-write child (owners shifted
    /// when its privilege differs from its parent's), or an import of a directory or
    /// `.tgz` on the worker. Blocking.
    pub fn create_volume(
        &self,
        req: CreateVolumeRequest,
        initial_state: VolumeState,
    ) -> Result<VolumeRecord, InventoryError> {
        let ids = IdMap::for_volume(req.privileged);
        // An empty volume made by an async create (`initialized` at once) is what Concourse
        // streams into, P2P included.
        let open_to_peers =
            matches!(req.strategy, Strategy::Empty) && initial_state == VolumeState::Initialized;
        let (parent, populate): (Option<Handle>, Option<Populate>) = match req.strategy {
            // The data root the driver made belongs to the volume's (mapped) root.
            Strategy::Empty if !req.privileged => (
                None,
                Some(Box::new(move |data: &Path| {
                    let root = Dir::open_root(data).map_err(populate_err)?;
                    ids.own_root(&root).map_err(populate_err)?;
                    root.fsync().map_err(populate_err)
                })),
            ),
            Strategy::Empty => (None, None),
            Strategy::Cow { volume } => {
                let shift: Option<Populate> = match self.get(&volume)? {
                    Some(p) if p.privileged != req.privileged => {
                        let from = IdMap::for_volume(p.privileged);
                        Some(Box::new(move |data: &Path| shift_data(data, from, ids)))
                    }
                    _ => None,
                };
                (Some(volume), shift)
            }
            Strategy::Import {
                path,
                follow_symlinks,
            } => {
                let source = import::source(&path).map_err(InventoryError::Import)?;
                let fill: Populate = Box::new(move |data: &Path| {
                    import::import(&source, data, follow_symlinks, ids)
                        .map(drop)
                        .map_err(populate_err)
                });
                (None, Some(fill))
            }
        };
        self.create(CreateSpec {
            open_to_peers,
            handle: req.handle,
            parent,
            properties: req.properties,
            privileged: req.privileged,
            initial_state,
            populate,
        })
    }

    /// Sets whether the volume is privileged, re-owning its data first (root stored as
    /// the highest id in an unprivileged volume, as itself in a privileged one). Under the
    /// volume's lock, so no destroy or other flip runs meanwhile; refused for a volume
    /// being created or destroyed.
    pub fn set_privileged(&self, h: &Handle, privileged: bool) -> Result<(), InventoryError> {
        // Running streams read the old privilege: cut them first (see `streams`).
        let _streams = self.close_streams(h)?;
        let _guard = self.lock(h);
        let Some(cur) = self.inner.store.get(h)? else {
            return Err(InventoryError::NotFound(h.clone()));
        };
        if matches!(cur.state, VolumeState::Creating | VolumeState::Destroying) {
            return Err(InventoryError::Busy {
                handle: h.clone(),
                state: cur.state,
            });
        }
        if cur.privileged == privileged {
            return Ok(());
        }
        let data = self.inner.layout.data(h);
        if !super::layout::exists(&data) {
            // No data on disk (a detached overlay child): nothing to re-own.
            return self
                .update_locked(h, "setting privileged", |rec| {
                    rec.privileged = privileged;
                    Ok(true)
                })
                .map(drop);
        }
        shift_data(
            &data,
            IdMap::for_volume(cur.privileged),
            IdMap::for_volume(privileged),
        )
        .map_err(super::io_err(&data))?;
        self.update_locked(h, "setting privileged", |rec| {
            let changed = rec.privileged != privileged;
            rec.privileged = privileged;
            Ok(changed)
        })
        .map(drop)
    }
}
