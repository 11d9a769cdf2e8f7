//! Opening the inventory: lock, open (or set aside and rebuild) the store, then finish or
//! undo whatever a crash interrupted and bring disk and store back into agreement.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use protocol::{Handle, VolumeState};

use super::driver::{self, driver};
use super::layout::{exists, fsync_dir, Layout, META_FILE};
use super::store::{self, Store, Stored, DB_DIR, INTENT_CREATE};
use super::{
    io_err, DiskMeta, DriverChoice, DriverKind, Inner, Inventory, InventoryConfig, InventoryError,
    RecoveryReport, LOCK_STRIPES,
};

/// How often to try the state dir lock, 20 ms apart.
const LOCK_TRIES: u32 = 100;

pub(super) fn open(cfg: &InventoryConfig) -> Result<(Inventory, RecoveryReport), InventoryError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(io_err(&cfg.state_dir))?;
    std::fs::create_dir_all(&cfg.volumes_root).map_err(io_err(&cfg.volumes_root))?;
    // Private to root, also on an install made before this rule (see `layout::private_dir`).
    super::layout::private_dir(&cfg.state_dir).map_err(io_err(&cfg.state_dir))?;
    super::layout::private_dir(&cfg.volumes_root).map_err(io_err(&cfg.volumes_root))?;
    let state_dir = cfg
        .state_dir
        .canonicalize()
        .map_err(io_err(&cfg.state_dir))?;
    let root = cfg
        .volumes_root
        .canonicalize()
        .map_err(io_err(&cfg.volumes_root))?;
    let lock_path = state_dir.join("inventory.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(super::layout::PRIVATE_FILE)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // A lock can be held for a moment by a process that is exiting, or by a child forked
    // from this one that has not exec'd yet (it shares the open file): wait briefly.
    let mut tries = 0;
    while crate::fsx::host::try_lock_exclusive(&lock).is_err() {
        tries += 1;
        if tries > LOCK_TRIES {
            return Err(InventoryError::Locked(state_dir));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let layout = Layout::new(root.clone());
    layout.ensure().map_err(io_err(&root))?;

    let db_dir = state_dir.join(DB_DIR);
    let existed = exists(&db_dir.join("db"));
    let started = std::time::Instant::now();
    let (store, set_aside) = open_store(&db_dir, existed, cfg.cache_bytes)?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "opened the volume store"
    );
    let live_count = if existed {
        0
    } else {
        Layout::entries(&layout.live_dir())
            .map_err(io_err(&layout.live_dir()))?
            .len()
    };
    let lost = live_count > 0;
    if lost {
        tracing::error!(
            path = %db_dir.display(),
            volumes = live_count,
            "the volume store is missing but {live_count} volumes exist under {}; rebuilding the inventory from their metadata files",
            layout.live_dir().display()
        );
    }

    let new_kind = match cfg.driver {
        DriverChoice::Naive => DriverKind::Naive,
        DriverChoice::Overlay => DriverKind::Overlay,
        DriverChoice::Detect => {
            if driver::overlay_works(&root) {
                DriverKind::Overlay
            } else {
                DriverKind::Naive
            }
        }
    };

    let inv = Inventory {
        inner: Arc::new(Inner {
            store,
            layout,
            reserve: state_dir.join("reserve"),
            state_dir,
            new_kind,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            missing: RwLock::new(Default::default()),
            hook: RwLock::new(None),
            remove: RwLock::new(crate::remove::RemoveOptions::default()),
            holds: Default::default(),
            _lock: lock,
        }),
    };
    let mut report = RecoveryReport::default();
    if set_aside || lost {
        inv.rebuild_from_disk(&mut report)?;
        report.rebuilt_from_disk = true;
    }
    inv.recover(&mut report)?;
    // Drift: records whose data directory is gone (after the re-mounts above).
    report.missing_on_disk = inv.scan_drift()?.missing;
    if !inv.inner.store.is_initialized()? {
        inv.inner.store.mark_initialized()?;
        inv.inner.store.commit()?;
    }
    inv.restore_reserve();
    tracing::info!(
        root = %inv.volumes_root().display(),
        driver = ?inv.inner.new_kind,
        destroys_finished = report.destroys_finished.len(),
        creates_removed = report.creates_removed.len(),
        remounted = report.remounted.len(),
        quarantined = report.quarantined.len(),
        missing = report.missing_on_disk.len(),
        rebuilt_from_disk = report.rebuilt_from_disk,
        "volume inventory open"
    );
    Ok((inv, report))
}

/// Opens the store. A store that is unreadable, or that exists but was never fully
/// initialized, is moved aside and a fresh one opened: returns `(store, set_aside)`.
fn open_store(db_dir: &Path, existed: bool, cache: u64) -> Result<(Store, bool), InventoryError> {
    let attempt = std::panic::catch_unwind(|| {
        let mut tries = 0;
        loop {
            match Store::open(db_dir, cache) {
                // sled's own file lock, held for a moment by a forked child (see above).
                Err(sled::Error::Io(e))
                    if tries < LOCK_TRIES && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        }
    });
    let problem = match attempt {
        Ok(Ok(store)) => {
            if !existed || store.is_initialized()? {
                return Ok((store, false));
            }
            drop(store);
            "it exists but holds no format marker (never fully initialized, or overwritten)"
                .to_owned()
        }
        Ok(Err(sled::Error::Io(e)))
            if !matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Err(InventoryError::Store(super::StoreError {
                path: db_dir.to_owned(),
                what: "opening".to_owned(),
                source: sled::Error::Io(e),
            }))
        }
        Ok(Err(e)) => format!("it cannot be read: {e}"),
        Err(_) => "reading it panicked inside sled".to_owned(),
    };
    let aside = db_dir.with_file_name(format!(
        "{DB_DIR}.broken-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
    ));
    tracing::error!(
        path = %db_dir.display(),
        moved_to = %aside.display(),
        "the volume store is corrupt ({problem}); moving it aside and rebuilding the inventory from the volume metadata files on disk"
    );
    std::fs::rename(db_dir, &aside).map_err(io_err(db_dir))?;
    if let Some(parent) = db_dir.parent() {
        fsync_dir(parent).map_err(io_err(parent))?;
    }
    let store = Store::open(db_dir, cache).map_err(|source| {
        InventoryError::Store(super::StoreError {
            path: db_dir.to_owned(),
            what: "creating a fresh store".to_owned(),
            source,
        })
    })?;
    Ok((store, true))
}

fn read_meta(dir: &Path) -> Result<DiskMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

impl Inventory {
    /// Moves `dir` into `quarantine/` (never deletes it), logging why.
    fn quarantine(&self, dir: &Path, name: &str, why: &str, report: &mut RecoveryReport) {
        let q = self.inner.layout.quarantine_dir();
        let dest = q.join(format!("{name}.{}", chrono::Utc::now().timestamp()));
        let _ = driver(DriverKind::Overlay).detach(dir);
        match std::fs::rename(dir, &dest) {
            Ok(()) => {
                let _ = fsync_dir(&q);
                if let Some(p) = dir.parent() {
                    let _ = fsync_dir(p);
                }
                tracing::warn!(from = %dir.display(), to = %dest.display(), reason = why, "quarantined a volume directory without a usable record; inspect it and delete it by hand when sure");
                report.quarantined.push(dest);
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, reason = why, "could not quarantine a volume directory");
            }
        }
    }

    /// Inserts records for `metas` whose parent is known (an initialized record, or itself
    /// in `metas`), parents first, with child counts, the children index and overlay mount
    /// depths; returns the handles placed and those that could not be placed (with why).
    ///
    /// `bulk` (a rebuild into an empty, not yet initialized store) writes with one batch
    /// per tree: a crash midway leaves the store without its format marker, so the next
    /// open sets it aside and rebuilds again. Otherwise everything is one transaction.
    fn insert_from_meta(
        &self,
        mut metas: BTreeMap<Handle, Stored>,
        bulk: bool,
    ) -> Result<(Vec<Handle>, BTreeMap<Handle, String>), InventoryError> {
        let store = &self.inner.store;
        let mut by_parent: HashMap<Handle, Vec<Handle>> = HashMap::new();
        let mut queue = Vec::new();
        // Parents already in the store: (their mount depth, new children).
        let mut outside: BTreeMap<Handle, (u32, u64)> = BTreeMap::new();
        for (h, rec) in &metas {
            match &rec.parent {
                None => queue.push(h.clone()),
                Some(p) if metas.contains_key(p) => {
                    by_parent.entry(p.clone()).or_default().push(h.clone())
                }
                Some(p) => {
                    if matches!(store.get(p)?, Some(pr) if pr.state == VolumeState::Initialized) {
                        let depth = store
                            .mounts
                            .get(p.as_str())
                            .map_err(|e| store.err("reading the mounts index", e))?
                            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
                            .map(u32::from_be_bytes)
                            .unwrap_or(0);
                        outside.entry(p.clone()).or_insert((depth, 0)).1 += 1;
                        queue.push(h.clone());
                    }
                }
            }
        }
        // Parents first; depth of each placed handle's own mount (0 = not a mount).
        let mut depth: HashMap<Handle, u32> = HashMap::new();
        let mut placed: Vec<(Handle, Stored, Option<u32>)> = Vec::new();
        while let Some(h) = queue.pop() {
            let Some(mut rec) = metas.remove(&h) else {
                continue;
            };
            let kids = by_parent.remove(&h).unwrap_or_default();
            rec.children = kids.len() as u64;
            if matches!(rec.state, VolumeState::Creating | VolumeState::Destroying) {
                rec.state = VolumeState::Created;
            }
            let parent_depth = rec.parent.as_ref().map(|p| {
                depth
                    .get(p)
                    .copied()
                    .or_else(|| outside.get(p).map(|o| o.0))
                    .unwrap_or(0)
            });
            let mount = match (rec.is_overlay_child(), parent_depth) {
                (true, Some(d)) => Some(d + 1),
                _ => None,
            };
            depth.insert(h.clone(), mount.unwrap_or(0));
            queue.extend(kids);
            placed.push((h, rec, mount));
        }
        if bulk {
            let mut v = sled::Batch::default();
            let mut c = sled::Batch::default();
            let mut m = sled::Batch::default();
            let mut n = sled::Batch::default();
            for (h, rec, mount) in &placed {
                v.insert(h.as_str(), store::encode(rec));
                n.insert(h.as_str(), &[][..]);
                if let Some(p) = &rec.parent {
                    c.insert(store::child_key(p, h), &[][..]);
                }
                if let Some(d) = mount {
                    m.insert(h.as_str(), &d.to_be_bytes()[..]);
                }
            }
            let werr = |e| store.err("rebuilding the store", e);
            store.volumes.apply_batch(v).map_err(werr)?;
            store.children.apply_batch(c).map_err(werr)?;
            store.mounts.apply_batch(m).map_err(werr)?;
            store.names.apply_batch(n).map_err(werr)?;
        } else if !placed.is_empty() {
            store.tx("adopting volumes", |tx| {
                for (p, (_, added)) in &outside {
                    let Some(mut prec) = tx.get(p)? else {
                        return store::abort(InventoryError::ParentNotFound(p.clone()));
                    };
                    prec.children += added;
                    tx.put(p, &prec)?;
                }
                for (h, rec, mount) in &placed {
                    tx.add(h, rec)?;
                    if let Some(p) = &rec.parent {
                        tx.children.insert(store::child_key(p, h), &[][..])?;
                    }
                    if let Some(d) = mount {
                        tx.mounts.insert(h.as_str(), &d.to_be_bytes()[..])?;
                    }
                }
                Ok(())
            })?;
        }
        let unplaced = metas
            .into_iter()
            .map(|(h, r)| {
                let why = match r.parent {
                    Some(p) => format!("its parent {p} is not an initialized volume here"),
                    None => "it could not be placed".to_owned(),
                };
                (h, why)
            })
            .collect();
        Ok((placed.into_iter().map(|(h, _, _)| h).collect(), unplaced))
    }

    /// Fills an empty store from the `meta.json` files under `live/`.
    fn rebuild_from_disk(&self, report: &mut RecoveryReport) -> Result<(), InventoryError> {
        let live_dir = self.inner.layout.live_dir();
        let names = Layout::entries(&live_dir).map_err(io_err(&live_dir))?;
        let placed = self.adopt(names, true, report)?;
        tracing::warn!(volumes = placed.len(), "rebuilt the volume store from disk");
        Ok(())
    }

    /// Makes records for the `live/` dirs `names` from their metadata files (parents
    /// first); quarantines those that cannot be placed. Returns the adopted handles.
    fn adopt(
        &self,
        names: impl IntoIterator<Item = String>,
        bulk: bool,
        report: &mut RecoveryReport,
    ) -> Result<Vec<Handle>, InventoryError> {
        let live_dir = self.inner.layout.live_dir();
        let mut metas = BTreeMap::new();
        for name in names {
            let dir = live_dir.join(&name);
            match (Handle::new(name.clone()), read_meta(&dir)) {
                (Ok(h), Ok(m)) if m.handle == h => {
                    metas.insert(h, m.record);
                }
                (Ok(_), Ok(m)) => self.quarantine(
                    &dir,
                    &name,
                    &format!("its metadata file names another handle ({})", m.handle),
                    report,
                ),
                (Err(e), _) => self.quarantine(&dir, &name, &format!("not a handle: {e}"), report),
                (_, Err(e)) => self.quarantine(
                    &dir,
                    &name,
                    &format!("no record and unreadable metadata: {e}"),
                    report,
                ),
            }
        }
        if metas.is_empty() {
            return Ok(Vec::new());
        }
        let (placed, unplaced) = self.insert_from_meta(metas, bulk)?;
        for (h, why) in unplaced {
            let dir = self.inner.layout.live(&h);
            self.quarantine(&dir, h.as_str(), &why, report);
        }
        self.inner.store.commit()?;
        Ok(placed)
    }

    /// Finishes interrupted destroys, undoes interrupted creates, reconciles `live/` with
    /// the records, and re-mounts overlay children (parents first).
    fn recover(&self, report: &mut RecoveryReport) -> Result<(), InventoryError> {
        let store = &self.inner.store;
        let layout = &self.inner.layout;

        // 1. Intents.
        let mut intents = Vec::new();
        for kv in store.pending.iter() {
            let (k, v) = kv.map_err(|e| store.err("reading pending intents", e))?;
            intents.push((store::handle_from_key(&k)?, v.to_vec()));
        }
        let dirty = !intents.is_empty();
        for (h, intent) in intents {
            let Some(rec) = store.get(&h)? else {
                store.tx("dropping a stale intent", |tx| tx.delete(&h))?;
                continue;
            };
            if intent == INTENT_CREATE && rec.state == VolumeState::Creating {
                tracing::warn!(handle = %h, "removing a create that a crash interrupted");
                let d = driver(rec.driver);
                for dir in [layout.live(&h), layout.init(&h)] {
                    d.detach(&dir)?;
                    crate::remove::remove_tree(&dir)?;
                }
                store.tx("removing an interrupted create", |tx| tx.delete(&h))?;
                report.creates_removed.push(h);
            } else if rec.state == VolumeState::Destroying {
                tracing::warn!(handle = %h, "finishing a destroy that a crash interrupted");
                self.remove_from_disk(&h, &rec)?;
                store.tx("deleting a destroyed volume's record", |tx| tx.delete(&h))?;
                report.destroys_finished.push(h);
            } else {
                store.tx("dropping a stale intent", |tx| {
                    tx.pending.remove(h.as_str())?;
                    Ok(())
                })?;
            }
        }
        if dirty {
            store.commit()?;
        }

        let t = std::time::Instant::now();
        // 2. Leftovers in dead/ and init/: after step 1 no record wants them (a create or
        //    destroy always has its intent recorded before it touches the disk).
        for (dir, finished) in [(layout.dead_dir(), true), (layout.init_dir(), false)] {
            for name in Layout::entries(&dir).map_err(io_err(&dir))? {
                let path = dir.join(&name);
                let Ok(h) = Handle::new(name.clone()) else {
                    self.quarantine(&path, &name, "not a handle", report);
                    continue;
                };
                tracing::warn!(dir = %path.display(), "removing a leftover directory of an unfinished create or destroy");
                driver(DriverKind::Overlay).detach(&path)?;
                crate::remove::remove_tree(&path)?;
                let list = if finished {
                    &mut report.destroys_finished
                } else {
                    &mut report.creates_removed
                };
                if !list.contains(&h) {
                    list.push(h);
                }
            }
        }

        tracing::debug!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "recovery: leftovers"
        );
        let t = std::time::Instant::now();
        // 3. live/ against the records.
        // Reading the directory and the names tree are both mostly waiting: overlap them.
        let live_dir = layout.live_dir();
        let (on_disk, names) = std::thread::scope(|scope| {
            let names = scope.spawn(|| -> Result<Vec<sled::IVec>, InventoryError> {
                store
                    .names
                    .iter()
                    .keys()
                    .map(|k| k.map_err(|e| store.err("listing volume names", e)))
                    .collect()
            });
            let on_disk = Layout::entries(&live_dir).map_err(io_err(&live_dir));
            let names = names
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (on_disk, names)
        });
        // Records without a directory are the drift scan's to flag (after the re-mounts).
        let mut on_disk: HashSet<String> = on_disk?.into_iter().collect();
        for k in names? {
            on_disk.remove(String::from_utf8_lossy(&k).as_ref());
        }
        let placed = self.adopt(on_disk, false, report)?;
        for h in &placed {
            tracing::warn!(handle = %h, "adopted a volume directory that had no record");
        }
        report.adopted.extend(placed);

        tracing::debug!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "recovery: live dirs against records"
        );
        let t = std::time::Instant::now();
        // 4. Re-mount overlay children, parents first.
        let mut mounts = Vec::new();
        for kv in store.mounts.iter() {
            let (k, v) = kv.map_err(|e| store.err("reading the mounts index", e))?;
            let depth = <[u8; 4]>::try_from(v.as_ref())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            mounts.push((depth, store::handle_from_key(&k)?));
        }
        mounts.sort();
        for (_, h) in mounts {
            let Some(rec) = store.get(&h)? else { continue };
            let dir = layout.live(&h);
            if !exists(&dir) {
                continue;
            }
            let attached = self
                .layers_of(&rec)
                .and_then(|layers| Ok(driver(rec.driver).attach(&dir, layers.as_deref())?));
            match attached {
                Ok(true) => report.remounted.push(h),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(handle = %h, error = %e, "could not re-mount an overlay volume");
                }
            }
        }
        tracing::debug!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "recovery: re-mounts"
        );
        Ok(())
    }
}
