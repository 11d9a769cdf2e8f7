//! The local volume inventory: the only code that changes volumes.
//!
//! A plain, blocking, thread-safe library: [`Inventory`] is `Clone + Send + Sync` (an `Arc`
//! inside); async callers reach it through the inventory actor ([`actor::InventoryHandle`]). Records live in sled (see `store`),
//! data under the volumes root (see `layout`), made by a driver (see `driver`).
//!
//! Crash safety: every create and destroy writes its intent to sled and makes it durable
//! before touching the disk, and every step can be repeated; [`Inventory::open`] finishes
//! or undoes whatever a crash interrupted (see `recovery`).
//!
//! Invariants, each checked and applied in one sled transaction:
//! * a copy-on-write child is only made from an `initialized` parent, and pins it from its
//!   first moment (`creating`);
//! * a volume with a child in any state cannot be marked `destroying`;
//! * so creating a child and destroying its parent never both succeed.
//!
//! Drift (see `drift`): a record whose data directory is gone is flagged missing by a scan
//! at open and every `volumes.scan_interval`, never silently kept as a volume.

pub mod actor;
mod contents_ops;
pub mod drift;
mod driver;
mod layout;
mod recovery;
mod store;
mod streams;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use driver::DriverError;
pub use protocol::{Handle, VolumeState};
pub use streams::{StreamHold, StreamInLimits, StreamKind, CUT_WAIT};

use driver::{driver, ParentView};
use layout::{exists, fsync_dir, Layout, META_FILE, UPPER_DIR};
use store::{abort, Store, Stored, INTENT_CREATE, INTENT_DESTROY};

/// Which driver new volumes are made with (configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    Naive,
    Overlay,
    /// Overlay when a test mount works under the volumes root, else naive.
    Detect,
}

/// What a volume was made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Naive,
    Overlay,
}

/// Where the inventory keeps its store and volumes.
#[derive(Clone, Debug)]
pub struct InventoryConfig {
    /// Directory of the sled store (`<state_dir>/inventory.db`), a lock file and a reserve file.
    pub state_dir: PathBuf,
    /// Directory holding `init/`, `live/`, `dead/` and `quarantine/`.
    pub volumes_root: PathBuf,
    pub driver: DriverChoice,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
}

/// A volume as callers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub handle: Handle,
    pub state: VolumeState,
    pub parent: Option<Handle>,
    pub driver: DriverKind,
    /// Absolute path of the data directory the caller mounts.
    pub path: PathBuf,
    pub properties: BTreeMap<String, String>,
    pub privileged: bool,
    pub created_at: DateTime<Utc>,
    pub changed_at: DateTime<Utc>,
    /// The last drift scan found the data directory gone (see `drift`).
    pub missing: bool,
}

/// Fills a new volume's data directory while it is still `creating`.
pub type Populate = Box<dyn FnOnce(&Path) -> io::Result<()> + Send>;

/// What to create.
pub struct CreateSpec {
    pub handle: Handle,
    /// `Some` = copy-on-write child of an `initialized` parent.
    pub parent: Option<Handle>,
    pub properties: BTreeMap<String, String>,
    pub privileged: bool,
    /// `Created` (local API) or `Initialized` (baggageclaim async creates); `Initializing`
    /// is accepted too.
    pub initial_state: VolumeState,
    /// Fills the data dir while still `creating` (import, id shifting); `None` = leave as made.
    pub populate: Option<Populate>,
    /// A peer may stream into the new volume over the P2P listener even once it is
    /// `initialized`, until it is first read (see [`Inventory::hold_for_peer_stream`]):
    /// baggageclaim's async creates of empty volumes, which Concourse streams into.
    pub open_to_peers: bool,
}

impl CreateSpec {
    /// An empty root volume in state `created`.
    pub fn empty(handle: Handle) -> Self {
        CreateSpec {
            open_to_peers: false,
            handle,
            parent: None,
            properties: BTreeMap::new(),
            privileged: false,
            initial_state: VolumeState::Created,
            populate: None,
        }
    }
    /// A copy-on-write child of `parent` in state `created`.
    pub fn child(handle: Handle, parent: Handle) -> Self {
        CreateSpec {
            open_to_peers: false,
            parent: Some(parent),
            ..CreateSpec::empty(handle)
        }
    }
}

impl std::fmt::Debug for CreateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSpec")
            .field("handle", &self.handle)
            .field("parent", &self.parent)
            .field("properties", &self.properties)
            .field("privileged", &self.privileged)
            .field("initial_state", &self.initial_state)
            .field("populate", &self.populate.is_some())
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestroyOutcome {
    Destroyed,
    /// The handle was not in the inventory.
    AlreadyGone,
}

/// What [`Inventory::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecoveryReport {
    /// Destroys a crash interrupted, now finished.
    pub destroys_finished: Vec<Handle>,
    /// Creates a crash interrupted, now undone (record and directories removed).
    pub creates_removed: Vec<Handle>,
    /// Overlay children mounted again (parents first).
    pub remounted: Vec<Handle>,
    /// Directories without a usable record, moved to `<volumes_root>/quarantine/`.
    pub quarantined: Vec<PathBuf>,
    /// The store was lost or corrupt and was rebuilt from the metadata files on disk.
    pub rebuilt_from_disk: bool,
    /// Directories found under `live/` without a record and adopted from their metadata file.
    pub adopted: Vec<Handle>,
    /// Records whose data directory is gone, as the drift scan at open found them: flagged
    /// missing (reported so, and dropped once the central side no longer wants them).
    pub missing_on_disk: Vec<Handle>,
}

/// A sled failure, with the store's path and what was being done.
#[derive(Debug, thiserror::Error)]
#[error(
    "volume store {path}: {what}: {source}; check the state directory's disk (space, permissions)"
)]
pub struct StoreError {
    pub path: PathBuf,
    pub what: String,
    #[source]
    pub source: sled::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("volume {0} not found; list the volumes to see which handles exist")]
    NotFound(Handle),
    #[error(
        "volume {0} already exists; choose another handle or destroy the existing volume first"
    )]
    AlreadyExists(Handle),
    #[error("parent volume {0} not found; create the parent first or use the empty strategy")]
    ParentNotFound(Handle),
    #[error("parent volume {parent} is {state}; a copy-on-write child can only be made from an initialized volume: set the parent's state to initialized first")]
    ParentNotInitialized { parent: Handle, state: VolumeState },
    #[error(
        "parent volume {0} is being destroyed; a child cannot be made from it (make a new parent)"
    )]
    ParentDestroying(Handle),
    #[error("parent volume {0} is missing: its data directory is gone (see `volume-agent volumes list`); make a new parent")]
    ParentMissing(Handle),
    #[error("volume {handle} still has children {children:?}; destroy the children first")]
    HasChildren {
        handle: Handle,
        children: Vec<Handle>,
    },
    #[error("volume {handle} cannot move from {from} to {to}; states only move forward (created → initializing → initialized), and creating or destroying volumes cannot be changed")]
    InvalidTransition {
        handle: Handle,
        from: VolumeState,
        to: VolumeState,
    },
    #[error(transparent)]
    Store(StoreError),
    #[error("{path}: {source}; check the volumes root's disk (space, permissions)")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Remove(#[from] crate::remove::RemoveError),
    #[error("filling volume {handle}: {source}")]
    Populate {
        handle: Handle,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Import(crate::contents::import::ImportError),
    #[error("volume {handle} is {state}; wait until it is created, or make a new volume")]
    Busy { handle: Handle, state: VolumeState },
    /// A stream cannot start, or streams did not stop for a destroy or privilege change.
    #[error("volume {handle} is {why}")]
    Streaming { handle: Handle, why: String },
    #[error("state directory {0} is locked by another process; stop the other volume-agent (sled allows one process) and retry")]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InventoryError + '_ {
    move |source| InventoryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A step of create or destroy, reported to a [`StepHook`] right after it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The `creating` record is durable; nothing is on disk yet.
    CreateIntentDurable,
    /// `init/<h>` is made by the driver (empty, copied, or upper/work made).
    CreateMade,
    /// The data is populated and the metadata file written, still in `init/`.
    CreateFilled,
    /// `init/<h>` was renamed to `live/<h>`.
    CreateRenamedLive,
    /// The overlay child is mounted (also reported for volumes that need no mount).
    CreateAttached,
    /// The `destroying` record is durable.
    DestroyIntentDurable,
    /// `live/<h>` was renamed to `dead/<h>`.
    DestroyRenamedDead,
    /// The overlay mount (if any) is gone.
    DestroyDetached,
    /// The tree is removed from disk; only the record is left.
    DestroyRemoved,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::CreateIntentDurable,
        Step::CreateMade,
        Step::CreateFilled,
        Step::CreateRenamedLive,
        Step::CreateAttached,
        Step::DestroyIntentDurable,
        Step::DestroyRenamedDead,
        Step::DestroyDetached,
        Step::DestroyRemoved,
    ];
}

/// Called after each [`Step`]; an error makes the operation fail there as if that step's
/// I/O had failed. A seam for crash and fault-injection tests (e.g. SIGKILL at a step).
pub type StepHook = Arc<dyn Fn(Step, &Handle) -> io::Result<()> + Send + Sync>;

/// Bytes kept in `<state_dir>/reserve` so the store can still record a destroy when the
/// disk is full: the file is deleted before a write when free space is low.
const RESERVE_BYTES: u64 = 512 * 1024;
const LOCK_STRIPES: usize = 64;

struct Inner {
    store: Store,
    layout: Layout,
    state_dir: PathBuf,
    new_kind: DriverKind,
    stripes: Vec<Mutex<()>>,
    /// Records the last drift scan found without their data directory.
    missing: RwLock<BTreeSet<Handle>>,
    hook: RwLock<Option<StepHook>>,
    /// How destroys remove trees (threads, `gc.destroy_rate`).
    remove: RwLock<crate::remove::RemoveOptions>,
    reserve: PathBuf,
    /// Running streams per volume (see `streams`).
    holds: streams::Holds,
    _lock: File,
}

/// The volume inventory. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Inventory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("state_dir", &self.inner.state_dir)
            .field("volumes_root", &self.inner.layout.root)
            .field("driver", &self.inner.new_kind)
            .finish()
    }
}

fn lock_stripe(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inventory {
    /// Opens the inventory and runs recovery (see the module docs).
    pub fn open(cfg: &InventoryConfig) -> Result<(Inventory, RecoveryReport), InventoryError> {
        recovery::open(cfg)
    }

    fn record(&self, h: &Handle, s: Stored) -> VolumeRecord {
        VolumeRecord {
            handle: h.clone(),
            state: s.state,
            parent: s.parent,
            driver: s.driver,
            path: self.inner.layout.data(h),
            properties: s.properties,
            privileged: s.privileged,
            created_at: s.created_at,
            changed_at: s.changed_at,
            missing: self.is_missing(h),
        }
    }

    fn stripe(&self, h: &Handle) -> &Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        h.hash(&mut hasher);
        &self.inner.stripes[(hasher.finish() as usize) % LOCK_STRIPES]
    }

    fn lock(&self, h: &Handle) -> MutexGuard<'_, ()> {
        lock_stripe(self.stripe(h))
    }

    /// The volume's lock if nobody holds it now.
    fn try_lock(&self, h: &Handle) -> Option<MutexGuard<'_, ()>> {
        match self.stripe(h).try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn step(&self, step: Step, h: &Handle) -> io::Result<()> {
        let hook = self
            .inner
            .hook
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match hook {
            Some(f) => f(step, h),
            None => Ok(()),
        }
    }

    fn step_or(&self, step: Step, h: &Handle, path: &Path) -> Result<(), InventoryError> {
        self.step(step, h).map_err(io_err(path))
    }

    /// Sets how destroys remove trees: threads and the shared `gc.destroy_rate` budget.
    pub fn set_remove_options(&self, opts: crate::remove::RemoveOptions) {
        *self.inner.remove.write().unwrap_or_else(|p| p.into_inner()) = opts;
    }

    /// Installs (or removes) a hook called after each create/destroy step.
    pub fn set_step_hook(&self, hook: Option<StepHook>) {
        *self.inner.hook.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The driver new volumes are made with (after `detect`).
    pub fn driver(&self) -> DriverKind {
        self.inner.new_kind
    }

    pub fn volumes_root(&self) -> &Path {
        &self.inner.layout.root
    }

    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Frees the reserve file when the disk is nearly full, so the store can write.
    fn make_room(&self) {
        let low = crate::fsx::host::disk(&self.inner.state_dir)
            .map(|d| d.free_bytes)
            .map(|free| free < 2 * RESERVE_BYTES)
            .unwrap_or(false);
        if low && exists(&self.inner.reserve) {
            tracing::warn!(path = %self.inner.reserve.display(), "state disk nearly full; releasing the reserve file so the volume store can record changes");
            let _ = std::fs::remove_file(&self.inner.reserve);
        }
    }

    /// Puts the reserve file back when there is room for it (best effort).
    fn restore_reserve(&self) {
        if exists(&self.inner.reserve) {
            return;
        }
        let roomy = crate::fsx::host::disk(&self.inner.state_dir)
            .map(|d| d.free_bytes)
            .map(|free| free > 4 * RESERVE_BYTES)
            .unwrap_or(false);
        if !roomy {
            return;
        }
        let tmp = self.inner.reserve.with_extension("tmp");
        let res = (|| -> io::Result<()> {
            let mut f = layout::create_private(&tmp)?;
            f.write_all(&vec![0u8; RESERVE_BYTES as usize])?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.inner.reserve)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "could not write the reserve file yet");
        }
    }

    /// Creates a volume (see [`CreateSpec`]). Answers once it exists on disk in
    /// `spec.initial_state`; on failure nothing is left behind.
    pub fn create(&self, spec: CreateSpec) -> Result<VolumeRecord, InventoryError> {
        let CreateSpec {
            handle,
            parent,
            properties,
            privileged,
            initial_state,
            populate,
            open_to_peers,
        } = spec;
        if !matches!(
            initial_state,
            VolumeState::Created | VolumeState::Initializing | VolumeState::Initialized
        ) {
            return Err(InventoryError::InvalidTransition {
                handle,
                from: VolumeState::Creating,
                to: initial_state,
            });
        }
        if let Some(p) = parent.as_ref().filter(|p| self.is_missing(p)) {
            return Err(InventoryError::ParentMissing(p.clone()));
        }
        let _guard = self.lock(&handle);
        let now = Utc::now();
        let stored = Stored {
            state: VolumeState::Creating,
            parent: parent.clone(),
            driver: self.inner.new_kind,
            properties,
            privileged,
            created_at: now,
            changed_at: now,
            children: 0,
            open_to_peers,
        };
        // No make_room here: the reserve is for destroys, which free space; a create on a
        // full disk must fail rather than eat the room the next destroy needs.
        let store = &self.inner.store;
        store.tx("recording a create", |tx| {
            if tx.get(&handle)?.is_some() {
                return abort(InventoryError::AlreadyExists(handle.clone()));
            }
            let mut depth = None;
            if let Some(p) = &parent {
                let Some(mut prec) = tx.get(p)? else {
                    return abort(InventoryError::ParentNotFound(p.clone()));
                };
                match prec.state {
                    VolumeState::Initialized => {}
                    VolumeState::Destroying => {
                        return abort(InventoryError::ParentDestroying(p.clone()))
                    }
                    state => {
                        return abort(InventoryError::ParentNotInitialized {
                            parent: p.clone(),
                            state,
                        })
                    }
                }
                prec.children += 1;
                tx.put(p, &prec)?;
                tx.children.insert(store::child_key(p, &handle), &[][..])?;
                if stored.is_overlay_child() {
                    depth = Some(tx.mount_depth(p)?.unwrap_or(0) + 1);
                }
            }
            tx.add(&handle, &stored)?;
            tx.pending.insert(handle.as_str(), INTENT_CREATE)?;
            if let Some(d) = depth {
                tx.mounts.insert(handle.as_str(), &d.to_be_bytes()[..])?;
            }
            Ok(())
        })?;
        if let Err(e) = store.commit() {
            // The record may or may not be durable; undo it if we can, else recovery will.
            self.undo_create(&handle);
            return Err(e);
        }
        let mut meta = stored.clone();
        meta.state = initial_state;
        let built = self
            .step_or(
                Step::CreateIntentDurable,
                &handle,
                &self.inner.layout.init(&handle),
            )
            .and_then(|()| self.build(&handle, &meta, populate));
        if let Err(e) = built {
            tracing::warn!(handle = %handle, error = %e, "create failed; removing what was made");
            self.undo_create(&handle);
            return Err(e);
        }
        let changed = Utc::now();
        let rec = store.tx("recording a finished create", |tx| {
            let Some(mut rec) = tx.get(&handle)? else {
                return abort(InventoryError::NotFound(handle.clone()));
            };
            rec.state = initial_state;
            rec.changed_at = changed;
            tx.put(&handle, &rec)?;
            tx.pending.remove(handle.as_str())?;
            Ok(rec)
        });
        let rec = match rec.and_then(|r| store.commit().map(|()| r)) {
            Ok(r) => r,
            Err(e) => {
                self.undo_create(&handle);
                return Err(e);
            }
        };
        // A new volume under the handle of one that went missing is there.
        self.forget_missing(&handle);
        Ok(self.record(&handle, rec))
    }

    /// What a child of `p` is made from.
    fn parent_view(&self, p: &Handle) -> Result<ParentView, InventoryError> {
        let mut layers = Vec::new();
        let mut cur = p.clone();
        loop {
            let rec = self
                .inner
                .store
                .get(&cur)?
                .ok_or_else(|| InventoryError::ParentNotFound(cur.clone()))?;
            if rec.is_overlay_child() {
                layers.push(self.inner.layout.live(&cur).join(UPPER_DIR));
                match rec.parent {
                    Some(next) => cur = next,
                    None => break,
                }
            } else {
                layers.push(self.inner.layout.data(&cur));
                break;
            }
        }
        Ok(ParentView {
            data: self.inner.layout.data(p),
            layers,
        })
    }

    /// Overlay layers for a volume if it is an overlay child.
    fn layers_of(&self, s: &Stored) -> Result<Option<Vec<PathBuf>>, InventoryError> {
        match (&s.parent, s.is_overlay_child()) {
            (Some(p), true) => Ok(Some(self.parent_view(p)?.layers)),
            _ => Ok(None),
        }
    }

    /// The disk part of a create: `init/<h>` → driver → populate → meta → `live/<h>` → attach.
    fn build(
        &self,
        h: &Handle,
        meta: &Stored,
        populate: Option<Populate>,
    ) -> Result<(), InventoryError> {
        let layout = &self.inner.layout;
        let init = layout.init(h);
        let live = layout.live(h);
        let d = driver(meta.driver);
        // Leftovers of an earlier attempt with this handle.
        d.detach(&init)?;
        crate::remove::remove_tree(&init)?;
        std::fs::create_dir(&init).map_err(io_err(&init))?;
        fsync_dir(&layout.init_dir()).map_err(io_err(&layout.init_dir()))?;
        let parent_view = match &meta.parent {
            Some(p) => Some(self.parent_view(p)?),
            None => None,
        };
        d.make(&init, parent_view.as_ref())?;
        self.step_or(Step::CreateMade, h, &init)?;
        let layers = parent_view.as_ref().map(|v| v.layers.as_slice());
        if let Some(fill) = populate {
            d.attach(&init, layers)?;
            let filled =
                fill(&init.join(layout::DATA_DIR)).map_err(|source| InventoryError::Populate {
                    handle: h.clone(),
                    source,
                });
            d.detach(&init)?;
            filled?;
        }
        // The driver's copy and `populate` made what they wrote durable themselves.
        write_meta(&init, h, meta)?;
        fsync_dir(&init).map_err(io_err(&init))?;
        self.step_or(Step::CreateFilled, h, &init)?;
        std::fs::rename(&init, &live).map_err(io_err(&live))?;
        fsync_dir(&layout.live_dir()).map_err(io_err(&layout.live_dir()))?;
        fsync_dir(&layout.init_dir()).map_err(io_err(&layout.init_dir()))?;
        self.step_or(Step::CreateRenamedLive, h, &live)?;
        d.attach(&live, layers)?;
        self.step_or(Step::CreateAttached, h, &live)?;
        Ok(())
    }

    /// Removes whatever a failed create made and its record (best effort; recovery finishes).
    pub(crate) fn undo_create(&self, h: &Handle) {
        let res = (|| -> Result<(), InventoryError> {
            let Some(rec) = self.inner.store.get(h)? else {
                return Ok(());
            };
            if rec.state != VolumeState::Creating {
                return Ok(());
            }
            let layout = &self.inner.layout;
            let d = driver(rec.driver);
            for dir in [layout.live(h), layout.init(h)] {
                d.detach(&dir)?;
                crate::remove::remove_tree(&dir)?;
            }
            fsync_dir(&layout.live_dir()).map_err(io_err(&layout.live_dir()))?;
            self.inner
                .store
                .tx("removing an unfinished create", |tx| match tx.get(h)? {
                    Some(r) if r.state == VolumeState::Creating => tx.delete(h),
                    _ => Ok(()),
                })?;
            self.inner.store.commit()
        })();
        if let Err(e) = res {
            tracing::error!(handle = %h, error = %e, "could not undo a failed create; the next start will finish it");
        }
    }

    pub fn get(&self, h: &Handle) -> Result<Option<VolumeRecord>, InventoryError> {
        Ok(self.inner.store.get(h)?.map(|s| self.record(h, s)))
    }

    /// Every volume, in handle order.
    pub fn list(&self) -> Result<Vec<VolumeRecord>, InventoryError> {
        let store = &self.inner.store;
        let mut out = Vec::new();
        for kv in store.volumes.iter() {
            let (k, v) = kv.map_err(|e| store.err("listing volumes", e))?;
            let h = store::handle_from_key(&k)?;
            let s = store::decode(&k, &v)?;
            out.push(self.record(&h, s));
        }
        Ok(out)
    }

    /// Children of `h` in any state (one prefix lookup in the children index).
    pub fn children(&self, h: &Handle) -> Result<Vec<Handle>, InventoryError> {
        self.inner.store.children_of(h)
    }

    /// Moves `h` forward (see [`VolumeState::may_advance_to`]); the current state again is a no-op.
    pub fn set_state(&self, h: &Handle, to: VolumeState) -> Result<VolumeRecord, InventoryError> {
        let rec = self.update(h, "changing a state", |rec| {
            if !rec.state.may_advance_to(to) {
                return Err(InventoryError::InvalidTransition {
                    handle: h.clone(),
                    from: rec.state,
                    to,
                });
            }
            let changed = rec.state != to;
            rec.state = to;
            Ok(changed)
        })?;
        Ok(self.record(h, rec))
    }

    /// Applies `f` to `h`'s record in one transaction; writes (durably) only when `f` says
    /// it changed something. Returns the record as it now is.
    fn update(
        &self,
        h: &Handle,
        what: &str,
        f: impl Fn(&mut Stored) -> Result<bool, InventoryError>,
    ) -> Result<Stored, InventoryError> {
        let _guard = self.lock(h);
        self.update_locked(h, what, f)
    }

    /// [`Self::update`] with the volume's lock already held.
    fn update_locked(
        &self,
        h: &Handle,
        what: &str,
        f: impl Fn(&mut Stored) -> Result<bool, InventoryError>,
    ) -> Result<Stored, InventoryError> {
        let now = Utc::now();
        let (rec, changed) = self.inner.store.tx(what, |tx| {
            let Some(mut rec) = tx.get(h)? else {
                return abort(InventoryError::NotFound(h.clone()));
            };
            match f(&mut rec) {
                Err(e) => return abort(e),
                Ok(false) => return Ok((rec, false)),
                Ok(true) => {}
            }
            rec.changed_at = now;
            tx.put(h, &rec)?;
            Ok((rec, true))
        })?;
        if changed {
            self.inner.store.commit()?;
            self.refresh_meta(h, &rec);
        }
        Ok(rec)
    }

    pub fn set_property(&self, h: &Handle, key: &str, value: &str) -> Result<(), InventoryError> {
        self.update(h, "setting a property", |rec| {
            if rec.properties.get(key).map(String::as_str) == Some(value) {
                return Ok(false);
            }
            rec.properties.insert(key.to_owned(), value.to_owned());
            Ok(true)
        })
        .map(drop)
    }

    /// Rewrites the metadata file of a live volume (best effort: sled is the truth, the
    /// file only serves a rebuild after the store is lost).
    fn refresh_meta(&self, h: &Handle, rec: &Stored) {
        let live = self.inner.layout.live(h);
        if !exists(&live) {
            return;
        }
        if let Err(e) = write_meta(&live, h, rec) {
            tracing::warn!(handle = %h, error = %e, "could not update the volume's metadata file");
        }
    }

    /// Marks `h` `destroying`, durably. Fails with [`InventoryError::HasChildren`] while any
    /// child exists; a volume still `creating` cannot be marked. Repeating it is fine.
    pub fn mark_destroying(&self, h: &Handle) -> Result<DestroyOutcome, InventoryError> {
        let _guard = self.lock(h);
        self.mark_destroying_locked(h)
    }

    fn mark_destroying_locked(&self, h: &Handle) -> Result<DestroyOutcome, InventoryError> {
        let store = &self.inner.store;
        // Already destroying: no write at all (works on a full disk).
        match store.get(h)? {
            None => return Ok(DestroyOutcome::AlreadyGone),
            Some(r) if r.state == VolumeState::Destroying => return Ok(DestroyOutcome::Destroyed),
            Some(_) => {}
        }
        self.make_room();
        let now = Utc::now();
        let res = store.tx("recording a destroy", |tx| {
            let Some(mut rec) = tx.get(h)? else {
                return Ok(DestroyOutcome::AlreadyGone);
            };
            if rec.state == VolumeState::Destroying {
                return Ok(DestroyOutcome::Destroyed);
            }
            if rec.children > 0 {
                return abort(InventoryError::HasChildren {
                    handle: h.clone(),
                    children: Vec::new(),
                });
            }
            if rec.state == VolumeState::Creating {
                return abort(InventoryError::InvalidTransition {
                    handle: h.clone(),
                    from: VolumeState::Creating,
                    to: VolumeState::Destroying,
                });
            }
            rec.state = VolumeState::Destroying;
            rec.changed_at = now;
            tx.put(h, &rec)?;
            tx.pending.insert(h.as_str(), INTENT_DESTROY)?;
            Ok(DestroyOutcome::Destroyed)
        });
        match res {
            Err(InventoryError::HasChildren { handle, .. }) => {
                let children = store.children_of(&handle)?;
                Err(InventoryError::HasChildren { handle, children })
            }
            Err(e) => Err(e),
            Ok(outcome) => {
                store.commit()?;
                Ok(outcome)
            }
        }
    }

    /// Destroys `h`: marks it `destroying`, moves it to `dead/`, unmounts, removes the tree,
    /// deletes the record. The disk removal goes ahead even when the store cannot write the
    /// final delete (a full disk); the record is cleaned by the next attempt or by recovery.
    pub fn destroy(&self, h: &Handle) -> Result<DestroyOutcome, InventoryError> {
        let _streams = self.close_streams(h)?;
        let _guard = self.lock(h);
        if self.mark_destroying_locked(h)? == DestroyOutcome::AlreadyGone {
            return Ok(DestroyOutcome::AlreadyGone);
        }
        let rec = self
            .inner
            .store
            .get(h)?
            .ok_or_else(|| InventoryError::NotFound(h.clone()))?;
        self.step_or(Step::DestroyIntentDurable, h, &self.inner.layout.live(h))?;
        self.remove_from_disk(h, &rec)?;
        self.step_or(Step::DestroyRemoved, h, &self.inner.layout.dead(h))?;
        self.finish_destroy(h)?;
        self.restore_reserve();
        Ok(DestroyOutcome::Destroyed)
    }

    /// `live/<h>` → `dead/<h>` → detach → remove. Repeatable.
    fn remove_from_disk(&self, h: &Handle, rec: &Stored) -> Result<(), InventoryError> {
        let layout = &self.inner.layout;
        let live = layout.live(h);
        let dead = layout.dead(h);
        let d = driver(rec.driver);
        if exists(&live) {
            match std::fs::rename(&live, &dead) {
                Ok(()) => {
                    fsync_dir(&layout.dead_dir()).map_err(io_err(&layout.dead_dir()))?;
                    fsync_dir(&layout.live_dir()).map_err(io_err(&layout.live_dir()))?;
                }
                Err(e) if exists(&dead) || crate::fsx::host::is_enospc(&e) => {
                    // No room for a new entry in dead/ (or a stale one is there): remove in
                    // place; the `destroying` record tells recovery to finish it.
                    tracing::warn!(handle = %h, error = %e, "could not move the volume to dead/; removing it in place");
                    d.detach(&live)?;
                    crate::remove::remove_tree(&live)?;
                }
                Err(e) => return Err(io_err(&live)(e)),
            }
        }
        self.step_or(Step::DestroyRenamedDead, h, &dead)?;
        d.detach(&dead)?;
        self.step_or(Step::DestroyDetached, h, &dead)?;
        let opts = self
            .inner
            .remove
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        crate::remove::remove_tree_with(&dead, &opts)?;
        Ok(())
    }

    fn finish_destroy(&self, h: &Handle) -> Result<(), InventoryError> {
        let store = &self.inner.store;
        store.tx("deleting a destroyed volume's record", |tx| tx.delete(h))?;
        store.commit()?;
        self.forget_missing(h);
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), InventoryError> {
        self.inner.store.commit()
    }

    /// Directories in `<volumes_root>/quarantine/` (found without a usable record).
    pub fn orphans(&self) -> Result<Vec<PathBuf>, InventoryError> {
        let q = self.inner.layout.quarantine_dir();
        let mut out: Vec<PathBuf> = Layout::entries(&q)
            .map_err(io_err(&q))?
            .into_iter()
            .map(|n| q.join(n))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The metadata file written into each volume dir.
#[derive(Serialize, Deserialize)]
pub(crate) struct DiskMeta {
    pub(crate) handle: Handle,
    #[serde(flatten)]
    pub(crate) record: Stored,
}

fn write_meta(dir: &Path, h: &Handle, rec: &Stored) -> Result<(), InventoryError> {
    let mut rec = rec.clone();
    rec.children = 0;
    let meta = DiskMeta {
        handle: h.clone(),
        record: rec,
    };
    let bytes = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    (|| -> io::Result<()> {
        let mut f = layout::create_private(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })()
    .map_err(io_err(&path))
}
