//! The sled side of the inventory: trees, record encoding, transactions, durable flushes.
//!
//! Trees:
//! * `volumes`:  `<handle>` → [`Stored`] (JSON), the volume record with its child count;
//! * `children`: `<parent>/<child>` → empty, so a parent's children are one prefix scan;
//! * `pending`:  `<handle>` → `create` | `destroy`, the intents recovery must finish;
//! * `mounts`:   `<handle>` → depth (u32 BE), overlay children to re-mount on open, parents first;
//! * `names`:    `<handle>` → empty, every recorded handle: a small tree that open scans to
//!   compare the records with `live/` (much faster than scanning the records themselves);
//! * `meta`:     `format` → `1`, written once the store is fully initialized.
//!
//! sled 0.34 transactions cannot scan, so the "has children" check inside the transaction
//! reads the parent's child count, which every create and destroy keeps in step with the
//! `children` index in the same transaction.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::{DriverKind, InventoryError, StoreError};
use protocol::{Handle, VolumeState};

pub(crate) const INTENT_CREATE: &[u8] = b"create";
pub(crate) const INTENT_DESTROY: &[u8] = b"destroy";
const FORMAT_KEY: &[u8] = b"format";
/// Name of sled's directory inside the state directory.
pub(crate) const DB_DIR: &str = "inventory.db";

/// A volume record as stored (the handle is the key; the path is derived).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) state: VolumeState,
    pub(crate) parent: Option<Handle>,
    pub(crate) driver: DriverKind,
    #[serde(default)]
    pub(crate) properties: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) privileged: bool,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) changed_at: DateTime<Utc>,
    /// Number of children (any state); kept with the `children` index in one transaction.
    #[serde(default)]
    pub(crate) children: u64,
    /// A peer may still stream in over the P2P listener (see `CreateSpec::open_to_peers`);
    /// cleared for good when the volume is first read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) open_to_peers: bool,
}

impl Stored {
    /// Whether this volume is an overlay mount (an overlay child).
    pub(crate) fn is_overlay_child(&self) -> bool {
        self.driver == DriverKind::Overlay && self.parent.is_some()
    }
}

pub(crate) type TxResult<T> = Result<T, ConflictableTransactionError<InventoryError>>;

pub(crate) fn abort<T>(e: InventoryError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Stored, InventoryError> {
    serde_json::from_slice(bytes).map_err(|e| {
        InventoryError::Corrupt(format!(
            "record {:?} in the volume store does not decode ({e}); move the state directory's {DB_DIR} aside to rebuild it from the volume metadata files",
            String::from_utf8_lossy(key)
        ))
    })
}

pub(crate) fn encode(s: &Stored) -> Vec<u8> {
    // Serializing a struct of strings, maps and timestamps cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

pub(crate) fn child_key(parent: &Handle, child: &Handle) -> Vec<u8> {
    let mut k = Vec::with_capacity(parent.as_str().len() + child.as_str().len() + 1);
    k.extend_from_slice(parent.as_str().as_bytes());
    k.push(b'/');
    k.extend_from_slice(child.as_str().as_bytes());
    k
}

pub(crate) fn handle_from_key(key: &[u8]) -> Result<Handle, InventoryError> {
    let s = std::str::from_utf8(key)
        .map_err(|_| InventoryError::Corrupt(format!("non-UTF-8 key {key:?} in the volume store; move the state directory's {DB_DIR} aside to rebuild it")))?;
    Handle::new(s).map_err(|e| {
        InventoryError::Corrupt(format!(
            "key {s:?} in the volume store is not a handle ({e}); move the state directory's {DB_DIR} aside to rebuild it"
        ))
    })
}

/// The trees a transaction works on.
pub(crate) struct Tx<'a> {
    pub(crate) volumes: &'a TransactionalTree,
    pub(crate) children: &'a TransactionalTree,
    pub(crate) pending: &'a TransactionalTree,
    pub(crate) mounts: &'a TransactionalTree,
    pub(crate) names: &'a TransactionalTree,
}

fn unabortable(e: UnabortableTransactionError) -> ConflictableTransactionError<InventoryError> {
    e.into()
}

impl Tx<'_> {
    pub(crate) fn get(&self, h: &Handle) -> TxResult<Option<Stored>> {
        match self.volumes.get(h.as_str()).map_err(unabortable)? {
            None => Ok(None),
            Some(v) => match decode(h.as_str().as_bytes(), &v) {
                Ok(s) => Ok(Some(s)),
                Err(e) => abort(e),
            },
        }
    }
    /// Inserts a new volume's record.
    pub(crate) fn add(&self, h: &Handle, s: &Stored) -> TxResult<()> {
        self.names
            .insert(h.as_str(), &[][..])
            .map_err(unabortable)?;
        self.put(h, s)
    }
    pub(crate) fn put(&self, h: &Handle, s: &Stored) -> TxResult<()> {
        self.volumes
            .insert(h.as_str(), encode(s))
            .map_err(unabortable)?;
        Ok(())
    }
    /// Deletes a volume's record and every index entry about it, releasing its parent.
    pub(crate) fn delete(&self, h: &Handle) -> TxResult<()> {
        let Some(rec) = self.get(h)? else {
            self.pending.remove(h.as_str()).map_err(unabortable)?;
            return Ok(());
        };
        if let Some(p) = &rec.parent {
            self.children.remove(child_key(p, h)).map_err(unabortable)?;
            if let Some(mut prec) = self.get(p)? {
                prec.children = prec.children.saturating_sub(1);
                self.put(p, &prec)?;
            }
        }
        self.volumes.remove(h.as_str()).map_err(unabortable)?;
        self.pending.remove(h.as_str()).map_err(unabortable)?;
        self.mounts.remove(h.as_str()).map_err(unabortable)?;
        self.names.remove(h.as_str()).map_err(unabortable)?;
        Ok(())
    }
    pub(crate) fn mount_depth(&self, h: &Handle) -> TxResult<Option<u32>> {
        Ok(self
            .mounts
            .get(h.as_str())
            .map_err(unabortable)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes))
    }
}

pub(crate) struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) volumes: sled::Tree,
    pub(crate) children: sled::Tree,
    pub(crate) pending: sled::Tree,
    pub(crate) mounts: sled::Tree,
    pub(crate) names: sled::Tree,
    meta: sled::Tree,
    db_file: File,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub(crate) fn open(dir: &Path, cache_bytes: u64) -> Result<Store, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()?;
        let volumes = db.open_tree("volumes")?;
        let children = db.open_tree("children")?;
        let pending = db.open_tree("pending")?;
        let mounts = db.open_tree("mounts")?;
        let names = db.open_tree("names")?;
        let meta = db.open_tree("meta")?;
        let db_file = File::open(dir.join("db"))?;
        // sled 0.34 writes its `conf` file (storage parameters and format version, checked
        // on every open) only when it is missing, and never fsyncs it: after a power cut it
        // comes back empty, and sled opens without that check. Make it, and the entries of
        // the store directory and of its parent, durable.
        File::open(dir.join("conf"))?.sync_all()?;
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(Store {
            dir: dir.to_owned(),
            db,
            volumes,
            children,
            pending,
            mounts,
            names,
            meta,
            db_file,
        })
    }

    pub(crate) fn err(&self, what: &str, source: sled::Error) -> InventoryError {
        InventoryError::Store(StoreError {
            path: self.dir.clone(),
            what: what.to_owned(),
            source,
        })
    }

    /// Whether the store was fully initialized once (its format marker is present).
    pub(crate) fn is_initialized(&self) -> Result<bool, InventoryError> {
        self.meta
            .contains_key(FORMAT_KEY)
            .map_err(|e| self.err("reading the format marker", e))
    }

    pub(crate) fn mark_initialized(&self) -> Result<(), InventoryError> {
        self.meta
            .insert(FORMAT_KEY, &b"1"[..])
            .map_err(|e| self.err("writing the format marker", e))?;
        Ok(())
    }

    /// Runs `f` as one serializable sled transaction over all volume trees.
    pub(crate) fn tx<T>(
        &self,
        what: &str,
        f: impl Fn(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, InventoryError> {
        (
            &self.volumes,
            &self.children,
            &self.pending,
            &self.mounts,
            &self.names,
        )
            .transaction(|(volumes, children, pending, mounts, names)| {
                f(&Tx {
                    volumes,
                    children,
                    pending,
                    mounts,
                    names,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => self.err(what, e),
            })
    }

    /// Makes everything written so far durable: sled flush, then fsync of sled's db file
    /// (sled 0.34's flush alone uses sync_file_range).
    pub(crate) fn commit(&self) -> Result<(), InventoryError> {
        self.db
            .flush()
            .map_err(|e| self.err("flushing to disk", e))?;
        self.db_file.sync_all().map_err(|e| {
            self.err(
                "fsyncing the db file",
                sled::Error::Io(std::io::Error::new(e.kind(), e.to_string())),
            )
        })
    }

    pub(crate) fn get(&self, h: &Handle) -> Result<Option<Stored>, InventoryError> {
        match self
            .volumes
            .get(h.as_str())
            .map_err(|e| self.err("reading a volume record", e))?
        {
            None => Ok(None),
            Some(v) => decode(h.as_str().as_bytes(), &v).map(Some),
        }
    }

    pub(crate) fn children_of(&self, h: &Handle) -> Result<Vec<Handle>, InventoryError> {
        let mut prefix = h.as_str().as_bytes().to_vec();
        prefix.push(b'/');
        let mut out = Vec::new();
        for kv in self.children.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(|e| self.err("reading the children index", e))?;
            out.push(handle_from_key(&k[prefix.len()..])?);
        }
        Ok(out)
    }
}
