//! Copying a tree into a volume: the naive driver's copy-on-write child (a whole copy of
//! the parent's data) and the `import` strategy's copy of a host directory share this.
//!
//! The source is walked with [`fsx::walk`] (fd-relative, never through a symlink unless
//! asked, never onto another mount); the destination is built fd-relative beside it.
//! Regular files are copied by [`fsx::copy_data`] (reflink, `copy_file_range`, read/write;
//! holes stay holes). Owners (mapped when asked), modes (set after `chown`, so set-id bits
//! survive), extended attributes and times are kept; hard links within the tree stay hard
//! links. On xfs the tree is walked by one thread per core (at most `MAX_WALKERS`): a
//! walker about to descend into a directory hands it to the others while they have too
//! little queued (`Pool`), so wide trees are copied on every core at once.
//!
//! Durability costs only the copy: each copied file and directory is handed to a few
//! threads that `fsync` it while the walk goes on, instead of one `syncfs` that would
//! wait for every other writer's dirty data on the same file system. On xfs
//! ([`Journal::Ordered`]) the walkers copy each file themselves, and what carries no data
//! of its own (directories, links, reflinked files) is made durable by one log force
//! after the last change instead; only files whose data was written are synced one by
//! one.
//!
//! When the source changes while it is copied (a container writing its volume), the copy
//! is of some mix of before and after, as `cp -a` would make, and never of anything outside
//! the source tree.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::fsx::{
    self, Beneath, CopyMethod, Descend, Dir, Errno, FsxError, Journal, Kind, Meta, Name, NameBuf,
    Op, Visitor, WrongKind,
};

use super::sync::Syncer;
use super::IdMap;

/// How often an entry that keeps changing kind while copied is looked at again.
const MAX_RETRIES: u32 = 3;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    /// Symlinks, hard links to an earlier entry and special files.
    pub others: u64,
    /// Apparent bytes of the regular files copied.
    pub bytes: u64,
    /// Files whose data was shared by reflink (no data written).
    pub reflinked: u64,
    /// Files and directories `fsync`ed one by one (on xfs only files whose data was
    /// written; the rest rides on one log force).
    pub synced: u64,
}

/// How owners are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// As in the source.
    Same,
    /// Source ids are as `IdMap` stores them on disk for a stream's ids (an import:
    /// host ids in, mapped as the volume stores them).
    ToDisk(IdMap),
}

impl Owners {
    fn map(self, m: &Meta) -> (u32, u32) {
        match self {
            Owners::Same => (m.uid, m.gid),
            Owners::ToDisk(ids) => ids.to_disk(m.uid, m.gid),
        }
    }
}

/// Figures the file threads add to, whether reflinks still work here, and how the
/// destination's file system makes what is copied durable.
struct Shared {
    no_reflink: AtomicBool,
    files: AtomicU64,
    bytes: AtomicU64,
    reflinked: AtomicU64,
    synced: AtomicU64,
    journal: Journal,
}

impl Shared {
    fn new(journal: Journal) -> Shared {
        Shared {
            no_reflink: AtomicBool::new(false),
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reflinked: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            journal,
        }
    }

    /// Whether a copied entry needs its own `fsync` (`metadata_only`: a directory, or a
    /// file whose data was shared by reflink), counting it in `synced` when it does.
    fn claim_sync(&self, metadata_only: bool) -> bool {
        if metadata_only && self.journal == Journal::Ordered {
            // The log force at the end covers it.
            return false;
        }
        self.synced.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Files of one destination directory still being copied on the file threads; the
/// directory's own owner, mode and times are set once none is left (a file made after
/// would change its times).
#[derive(Default)]
struct Pending {
    n: Mutex<usize>,
    zero: Condvar,
}

impl Pending {
    fn add(self: &Arc<Self>) -> PendingGuard {
        *self.n.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        PendingGuard(Arc::clone(self))
    }

    fn wait(&self) {
        let mut n = self.n.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = self.zero.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Held by a file's job; dropped when the job ran or was dropped unrun.
struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut n = self.0.n.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

/// A destination directory being filled.
struct Level {
    dir: Arc<Dir>,
    pending: Arc<Pending>,
}

impl Level {
    fn new(dir: Dir) -> Level {
        Level {
            dir: Arc::new(dir),
            pending: Arc::default(),
        }
    }
}

/// Copies the regular file `src` (`meta`) as `name` in `dst`: data, owner, mode (after
/// the owner, so set-id bits survive), extended attributes, times. Returns the copy and
/// whether its data was shared by reflink.
fn copy_one(
    src: &File,
    meta: &Meta,
    rel: &Path,
    dst: &Dir,
    name: Name<'_>,
    owners: Owners,
    shared: &Shared,
) -> fsx::Result<(File, bool)> {
    let err = |op| move |source| FsxError::new(op, rel.to_owned(), source);
    // Made with its final permission bits (the umask may take some away): the directory
    // it is made in stays 0700 until it is finished, so nobody else reaches it meanwhile.
    let out = dst.create_file(name, meta.mode & 0o777)?;
    let reflink = !shared.no_reflink.load(Ordering::Relaxed);
    let reflinked = match fsx::copy_data(src, &out, reflink).map_err(err(Op::Copy))? {
        CopyMethod::Reflink => {
            shared.reflinked.fetch_add(1, Ordering::Relaxed);
            true
        }
        _ => {
            shared.no_reflink.store(true, Ordering::Relaxed);
            false
        }
    };
    // `chown` and `chmod` only where the new file differs (each is a transaction of its
    // own); most files are owned by the copier, with the usual modes.
    let (uid, gid) = owners.map(meta);
    let made = fsx::meta_fd(out.as_fd()).map_err(err(Op::Stat))?;
    if (made.uid, made.gid) != (uid, gid) {
        fsx::chown_fd(out.as_fd(), uid, gid).map_err(err(Op::Chown))?;
    }
    // After the `chown`, which clears set-id bits (none were set at creation, so it
    // changed no mode bit the check below relies on).
    if made.mode & 0o7777 != meta.mode & 0o7777 {
        fsx::chmod_fd(out.as_fd(), meta.mode).map_err(err(Op::Chmod))?;
    }
    fsx::copy_xattrs(src, &out).map_err(err(Op::Xattr))?;
    fsx::set_times_fd(out.as_fd(), meta.atime, meta.mtime).map_err(err(Op::SetTimes))?;
    shared.files.fetch_add(1, Ordering::Relaxed);
    shared.bytes.fetch_add(meta.size, Ordering::Relaxed);
    Ok((out, reflinked))
}

/// The most threads that walk one copy's subtrees side by side.
const MAX_WALKERS: usize = 8;

/// How many threads walk one copy: on xfs, where the walkers copy the files themselves,
/// one per core (at most [`MAX_WALKERS`]); elsewhere one, whose files go to the sync
/// threads (on ext4 a second walker made the copy slower: 6.1-6.9 s against 3.1-3.8 s
/// for 10,000 files).
fn walkers(journal: Journal) -> usize {
    match journal {
        Journal::Ordered => std::thread::available_parallelism()
            .map_or(2, std::num::NonZeroUsize::get)
            .clamp(1, MAX_WALKERS),
        Journal::PerFile => 1,
    }
}

/// A directory whose copy was handed to another walker: its source, its (empty) copy,
/// and how deep its parent is in the tree (for [`fsx::walk_from`]).
struct Subtree {
    src: Dir,
    dst: Dir,
    depth: usize,
}

/// Subtrees waiting for a walker, and how the walkers stand.
struct PoolState {
    queue: Vec<Subtree>,
    /// Walkers waiting for a subtree.
    idle: usize,
    /// Walkers walking (each starts busy with its first task).
    busy: usize,
    /// The first failure; once set, the walkers stop and queued subtrees are dropped.
    first: Option<FsxError>,
}

/// Hands subtrees to other walkers. A walker about to descend into a directory queues it
/// instead while the queue is shorter than the number of walkers, so the copy of a wide
/// tree runs on every core without handing each file to another thread (on xfs that
/// hand-off and the contention of many threads in one directory cost more than the copy
/// gained).
struct Pool {
    state: Mutex<PoolState>,
    wake: Condvar,
}

impl Pool {
    fn new(walkers: usize) -> Pool {
        Pool {
            state: Mutex::new(PoolState {
                queue: Vec::new(),
                idle: 0,
                busy: walkers,
                first: None,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether there are other walkers and fewer subtrees are queued than there are
    /// walkers (so one that runs out of work finds more without waiting for the others
    /// to reach a directory).
    fn wants(&self) -> bool {
        let st = self.lock();
        let walkers = st.idle + st.busy;
        st.first.is_none() && walkers > 1 && st.queue.len() < walkers
    }

    fn offer(&self, t: Subtree) {
        self.lock().queue.push(t);
        self.wake.notify_one();
    }

    fn failed(&self) -> bool {
        self.lock().first.is_some()
    }

    fn record(st: &mut PoolState, res: fsx::Result<()>) {
        if let Err(e) = res {
            // Only the first counts; the others are mostly [`stopped`] answers to it.
            st.first.get_or_insert(e);
        }
    }

    /// Ends the caller's own task with `res`, then walks queued subtrees with `walk`
    /// until none is queued and no walker is busy (so none can queue another).
    fn help(&self, res: fsx::Result<()>, walk: impl Fn(Subtree) -> fsx::Result<()>) {
        let mut st = self.lock();
        Self::record(&mut st, res);
        st.busy = st.busy.saturating_sub(1);
        st.idle += 1;
        loop {
            if let Some(t) = st.queue.pop() {
                if st.first.is_some() {
                    continue;
                }
                st.idle -= 1;
                st.busy += 1;
                drop(st);
                let res = walk(t);
                st = self.lock();
                Self::record(&mut st, res);
                st.busy -= 1;
                st.idle += 1;
                continue;
            }
            if st.busy == 0 {
                self.wake.notify_all();
                return;
            }
            st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A walker that never started: nothing waits for it.
    fn retire(&self) {
        let mut st = self.lock();
        st.busy = st.busy.saturating_sub(1);
        drop(st);
        self.wake.notify_all();
    }

    fn into_first(self) -> Option<FsxError> {
        self.state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .first
    }
}

/// What every walker of one copy shares.
struct Ctx<'r> {
    /// The source root (a followed symlink must stay beneath it).
    src_root: &'r Dir,
    /// The destination root (hard links are made relative to it).
    dst_root: Arc<Dir>,
    owners: Owners,
    follow: bool,
    shared: Arc<Shared>,
    /// First copy of each multiply linked inode: `(dev, ino)` → its relative path. Held
    /// while such an inode is copied or linked, so a later link always finds the copy.
    links: Mutex<Links>,
    syncer: Syncer,
    pool: Pool,
    /// Directories and other entries, added by each walker when it ends.
    counts: Mutex<CopyStats>,
}

/// One walker's copy of a tree or subtree.
struct Copier<'c, 'r> {
    ctx: &'c Ctx<'r>,
    /// Destination directories, the one being filled on top; this walk's root first.
    dst: Vec<Level>,
    /// Whether this walk's root is the copy's root (whose last step is the caller's).
    top: bool,
    /// Whether the walk's root gets its source's owner, mode and times (not for an
    /// import, whose root the volume already owns).
    apply_root: bool,
    stats: CopyStats,
}

fn wrong(rel: PathBuf, what: &'static str) -> FsxError {
    FsxError {
        op: Op::Copy,
        path: rel,
        source: io::Error::other(WrongKind(what)),
    }
}

fn threads_failed() -> FsxError {
    FsxError::new(
        Op::Copy,
        PathBuf::new(),
        io::Error::other("a file's copy failed on a copy thread"),
    )
}

/// What a walker answers once another failed (the other's failure is the one reported).
fn stopped() -> FsxError {
    FsxError::new(
        Op::Copy,
        PathBuf::new(),
        io::Error::other("stopped: another part of the copy failed"),
    )
}

fn name_of(rel: &Path) -> io::Result<NameBuf> {
    NameBuf::new(rel.file_name().map(|n| n.as_bytes()).unwrap_or_default())
}

type Links = HashMap<(u64, u64), PathBuf>;

/// What [`Copier::link_or_hold`] did.
enum Linked<'c> {
    /// The name is now a hard link to the inode's first copy.
    Done,
    /// The name is to be made here; while `Some`, the link table is held until it is.
    Make(Option<std::sync::MutexGuard<'c, Links>>),
}

impl<'c, 'r> Copier<'c, 'r> {
    fn new(ctx: &'c Ctx<'r>, dst: Level, top: bool, apply_root: bool) -> Self {
        Copier {
            ctx,
            dst: vec![dst],
            top,
            apply_root,
            stats: CopyStats::default(),
        }
    }

    fn level(&self) -> fsx::Result<&Level> {
        self.dst.last().ok_or_else(|| {
            FsxError::new(
                Op::Copy,
                PathBuf::new(),
                io::Error::other("copy stack empty (a bug)"),
            )
        })
    }

    fn dst(&self) -> fsx::Result<&Dir> {
        Ok(&self.level()?.dir)
    }

    /// Opens the copy of the source directory `child` (made by `entry` in the directory
    /// being filled).
    fn dst_child(&self, child: &Dir) -> fsx::Result<Dir> {
        let name =
            name_of(child.rel()).map_err(|e| FsxError::new(Op::Open, child.rel().into(), e))?;
        self.dst()?.open_dir(name.as_name())
    }

    /// For an inode with other names: makes `name` a hard link to its first copy when
    /// one was made ([`Linked::Done`]); otherwise remembers `rel` as its first copy and
    /// holds the link table until the caller made it.
    fn link_or_hold(&mut self, meta: &Meta, rel: &Path, name: Name<'_>) -> fsx::Result<Linked<'c>> {
        if meta.nlink <= 1 {
            return Ok(Linked::Make(None));
        }
        let ctx = self.ctx;
        let mut links = ctx.links.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (meta.dev, meta.ino);
        let Some(first) = links.get(&key).cloned() else {
            links.insert(key, rel.to_owned());
            return Ok(Linked::Make(Some(links)));
        };
        let root: &Dir = &ctx.dst_root;
        // Walk to the first copy's directory from the destination root, fd-relative.
        let mut holder: Option<Dir> = None;
        let comps: Vec<_> = first
            .parent()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        for c in comps {
            let n = NameBuf::new(c.as_bytes())
                .map_err(|e| FsxError::new(Op::Link, first.clone(), e))?;
            let next = holder.as_ref().unwrap_or(root).open_dir(n.as_name())?;
            holder = Some(next);
        }
        let old = name_of(&first).map_err(|e| FsxError::new(Op::Link, first.clone(), e))?;
        holder
            .as_ref()
            .unwrap_or(root)
            .hard_link(old.as_name(), self.dst()?, name)?;
        self.stats.others += 1;
        Ok(Linked::Done)
    }

    /// Copies a regular file: here on xfs (nothing to wait for; other walkers keep the
    /// other cores busy) and when it has other hard links (a later link to it must find
    /// the copy made); on a file thread otherwise, which also `fsync`s it.
    fn copy_file(&mut self, src: File, meta: Meta, rel: &Path, name: Name<'_>) -> fsx::Result<()> {
        if self.ctx.syncer.failed() {
            return Err(threads_failed());
        }
        let ctx = self.ctx;
        let Linked::Make(links) = self.link_or_hold(&meta, rel, name)? else {
            return Ok(());
        };
        let level = self.level()?;
        if links.is_some() || ctx.shared.journal == Journal::Ordered {
            let (out, reflinked) =
                copy_one(&src, &meta, rel, &level.dir, name, ctx.owners, &ctx.shared)?;
            drop(links);
            if !ctx.shared.claim_sync(reflinked) {
                return Ok(());
            }
            return ctx.syncer.push(out.into(), rel.to_owned());
        }
        let guard = level.pending.add();
        let dst = Arc::clone(&level.dir);
        let (owners, shared) = (ctx.owners, Arc::clone(&ctx.shared));
        let (rel, name) = (rel.to_owned(), name.to_owned());
        ctx.syncer.run(Box::new(move || {
            let _guard = guard;
            let (out, reflinked) =
                copy_one(&src, &meta, &rel, &dst, name.as_name(), owners, &shared)?;
            if !shared.claim_sync(reflinked) {
                return Ok(());
            }
            fsx::fsync_fd(out.as_fd()).map_err(|e| FsxError::new(Op::Sync, rel, e))
        }))
    }

    /// Makes a symlink, fifo, socket or device node like `meta` (of `name` in `dir`).
    fn make_other(&mut self, dir: &Dir, name: Name<'_>, meta: &Meta) -> fsx::Result<()> {
        let rel = dir.rel_of(name);
        let Linked::Make(links) = self.link_or_hold(meta, &rel, name)? else {
            return Ok(());
        };
        let dst = self.dst()?;
        if meta.kind == Kind::Symlink {
            let target = dir.readlink(name)?;
            dst.symlink(name, &target)?;
        } else {
            dst.mknod(name, meta.kind, meta.mode, meta.rdev)?;
        }
        drop(links);
        let (uid, gid) = self.ctx.owners.map(meta);
        dst.chown(name, uid, gid)?;
        if meta.kind != Kind::Symlink {
            dst.open_node(name)?.chmod(meta.mode)?;
        }
        dir.copy_xattrs_of(name, dst, name)?;
        dst.set_times(name, meta.atime, meta.mtime)?;
        self.stats.others += 1;
        Ok(())
    }

    /// Copies `name` (listed as `kind`), looking again when it changed kind meanwhile.
    fn copy_entry(&mut self, dir: &Dir, name: Name<'_>, mut kind: Kind) -> fsx::Result<Descend> {
        if self.ctx.pool.failed() {
            return Err(stopped());
        }
        for _ in 0..MAX_RETRIES {
            let res = match kind {
                Kind::Dir => {
                    self.dst()?.mkdir(name, 0o700)?;
                    return Ok(Descend::Yes);
                }
                Kind::Symlink if self.ctx.follow => return self.follow_link(dir, name),
                Kind::File => match dir.open_file(name) {
                    Ok((src, meta)) => {
                        let rel = dir.rel_of(name);
                        return self.copy_file(src, meta, &rel, name).map(|()| Descend::No);
                    }
                    Err(e) => Err(e),
                },
                _ => match dir.stat(name) {
                    Ok(meta) if meta.kind == kind => {
                        return self.make_other(dir, name, &meta).map(|()| Descend::No)
                    }
                    Ok(meta) => {
                        kind = meta.kind;
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match res {
                Err(e) if e.is_not_found() => return Ok(Descend::No),
                Err(e) if e.is_wrong_kind() => {
                    kind = match dir.stat(name) {
                        Ok(m) => m.kind,
                        Err(e) if e.is_not_found() => return Ok(Descend::No),
                        Err(e) => return Err(e),
                    };
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(Descend::No),
            }
        }
        Err(wrong(
            dir.rel_of(name),
            "keeps changing between a file and a directory while being copied; stop \
             whatever changes it, then retry",
        ))
    }

    /// Follows the symlink `name` (an import with `follow_symlinks`), staying beneath
    /// the import root.
    fn follow_link(&mut self, dir: &Dir, name: Name<'_>) -> fsx::Result<Descend> {
        let rel = dir.rel_of(name);
        match Dir::open_beneath(self.ctx.src_root, &rel) {
            Ok(Beneath::Dir(d)) => {
                self.dst()?.mkdir(name, 0o700)?;
                Ok(Descend::Into(d))
            }
            Ok(Beneath::File(f, meta)) => self.copy_file(f, meta, &rel, name).map(|()| Descend::No),
            Ok(Beneath::Other(meta)) => {
                // A fifo, socket or device the link leads to: made like it, in the link's place.
                let dst = self.dst()?;
                dst.mknod(name, meta.kind, meta.mode, meta.rdev)?;
                let (uid, gid) = self.ctx.owners.map(&meta);
                dst.chown(name, uid, gid)?;
                dst.open_node(name)?.chmod(meta.mode)?;
                self.stats.others += 1;
                Ok(Descend::No)
            }
            // A dangling link is copied as the link it is.
            Err(e) if e.is_not_found() => match dir.stat(name) {
                Ok(meta) => self.make_other(dir, name, &meta).map(|()| Descend::No),
                Err(e) if e.is_not_found() => Ok(Descend::No),
                Err(e) => Err(e),
            },
            Err(e) if e.is(Errno::XDEV) => Err(FsxError::new(
                Op::Follow,
                rel,
                io::Error::other(
                    "it leads outside the imported directory (or onto another mount), and \
                     follow_symlinks only follows links that stay inside it; import with \
                     follow_symlinks false to copy links as links",
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// Sets a copied directory's owner, mode, attributes and times from its source.
    fn finish_dir(&self, src: &Dir, dst: &Dir) -> fsx::Result<()> {
        let meta = src.meta()?;
        let (uid, gid) = self.ctx.owners.map(&meta);
        dst.chown_self(uid, gid)?;
        dst.chmod_self(meta.mode)?;
        fsx::copy_xattrs(src, dst)
            .map_err(|e| FsxError::new(Op::Xattr, src.rel().to_owned(), e))?;
        dst.set_times_self(meta.atime, meta.mtime)
    }
}

impl Visitor for Copier<'_, '_> {
    type Error = FsxError;

    fn entry(&mut self, dir: &Dir, name: Name<'_>, kind: Kind) -> fsx::Result<Descend> {
        self.copy_entry(dir, name, kind)
    }

    /// Queues `child` for another walker while fewer are queued than there are walkers.
    fn hand_off(&mut self, _parent: &Dir, child: Dir, depth: usize) -> fsx::Result<Option<Dir>> {
        if !self.ctx.pool.wants() {
            return Ok(Some(child));
        }
        let dst = self.dst_child(&child)?;
        self.ctx.pool.offer(Subtree {
            src: child,
            dst,
            depth,
        });
        Ok(None)
    }

    fn enter(&mut self, _parent: &Dir, child: &Dir) -> fsx::Result<()> {
        let d = self.dst_child(child)?;
        self.dst.push(Level::new(d));
        Ok(())
    }

    fn changed(&mut self, dir: &Dir, name: Name<'_>, err: FsxError) -> fsx::Result<()> {
        if err.is_mount_point() {
            return Err(err);
        }
        // Listed as a directory, made as one, then gone or replaced before it was opened:
        // undo the empty copy and copy what is there now.
        self.dst()?.rmdir(name)?;
        match dir.stat(name) {
            Ok(m) if m.kind != Kind::Dir => self.copy_entry(dir, name, m.kind).map(drop),
            Ok(_) => Err(wrong(
                dir.rel_of(name),
                "keeps changing between a file and a directory while being copied; stop \
                 whatever changes it, then retry",
            )),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn leave(&mut self, dir: &Dir) -> fsx::Result<()> {
        let is_root = self.dst.len() == 1;
        let Some(dst) = self.dst.pop() else {
            return Err(wrong(dir.rel().to_owned(), "copy stack empty (a bug)"));
        };
        // Its files first: their creation changes the directory's times.
        dst.pending.wait();
        if self.ctx.syncer.failed() {
            return Err(threads_failed());
        }
        if !is_root || self.apply_root {
            self.finish_dir(dir, &dst.dir)?;
        }
        self.stats.dirs += 1;
        // The copy's root is made durable by the caller's last step.
        if (is_root && self.top) || !self.ctx.shared.claim_sync(true) {
            return Ok(());
        }
        self.ctx
            .syncer
            .push(dst.dir.try_clone_fd()?, dir.rel().to_owned())
    }
}

impl Ctx<'_> {
    /// Walks `t` (a subtree another walker handed over).
    fn walk_subtree(&self, t: Subtree) -> fsx::Result<()> {
        let mut c = Copier::new(self, Level::new(t.dst), false, true);
        let res = fsx::walk_from(&t.src, t.depth, &mut c);
        self.count(c.stats);
        res
    }

    fn count(&self, s: CopyStats) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.dirs += s.dirs;
        c.others += s.others;
    }
}

/// `journal`: the destination's file system's ([`Dir::journal`]).
fn run(
    src: &Dir,
    dst: Dir,
    journal: Journal,
    owners: Owners,
    follow: bool,
    apply_root: bool,
) -> fsx::Result<CopyStats> {
    let dst = Arc::new(dst);
    let n = walkers(journal);
    let mut ctx = Ctx {
        src_root: src,
        dst_root: Arc::clone(&dst),
        owners,
        follow,
        shared: Arc::new(Shared::new(journal)),
        links: Mutex::default(),
        syncer: Syncer::new(),
        pool: Pool::new(n),
        counts: Mutex::default(),
    };
    std::thread::scope(|scope| {
        let ctx = &ctx;
        for _ in 1..n {
            let helper = std::thread::Builder::new()
                .name("copy-walker".into())
                .spawn_scoped(scope, move || {
                    ctx.pool.help(Ok(()), |t| ctx.walk_subtree(t))
                });
            if helper.is_err() {
                // No thread to be had: fewer walkers, the copy goes on.
                ctx.pool.retire();
            }
        }
        let root = Level {
            dir: Arc::clone(&dst),
            pending: Arc::default(),
        };
        let mut c = Copier::new(ctx, root, true, apply_root);
        let res = fsx::walk(src, &mut c);
        ctx.count(c.stats);
        ctx.pool.help(res, |t| ctx.walk_subtree(t));
    });
    // The file threads' own failure first: the walkers only saw that one happened.
    ctx.syncer.finish()?;
    let Ctx {
        pool,
        counts,
        shared,
        ..
    } = ctx;
    if let Some(e) = pool.into_first() {
        return Err(e);
    }
    // After the last change (every walker and file thread is done): one log force on xfs
    // for everything not synced one by one, the root's entry included; the root's own
    // sync elsewhere.
    let mut stats = counts.into_inner().unwrap_or_else(PoisonError::into_inner);
    match journal {
        Journal::Ordered => dst.force_log()?,
        Journal::PerFile => {
            stats.synced += 1;
            dst.fsync()?
        }
    }
    stats.files += shared.files.load(Ordering::Relaxed);
    stats.bytes += shared.bytes.load(Ordering::Relaxed);
    stats.reflinked += shared.reflinked.load(Ordering::Relaxed);
    stats.synced += shared.synced.load(Ordering::Relaxed);
    Ok(stats)
}
/// Copies the tree at `from` to the new directory `to` (which must not exist), with
/// owners, modes, extended attributes, times and hard links; everything copied is on
/// stable storage when it returns, `to`'s entry in its parent included. Errors name the
/// entry relative to `from`.
pub fn copy_tree(from: &Path, to: &Path) -> fsx::Result<CopyStats> {
    let src = Dir::open_root(from)?;
    let bad_target = |e| FsxError::new(Op::Copy, to.to_owned(), e);
    let parent = Dir::open_root(to.parent().unwrap_or(Path::new("/")))?;
    let name = name_of(to).map_err(bad_target)?;
    parent.mkdir(name.as_name(), 0o700)?;
    let dst = parent.open_dir(name.as_name())?;
    let journal = parent.journal();
    let stats = run(&src, dst, journal, Owners::Same, false, true)?;
    if journal == Journal::PerFile {
        // (On xfs the copy's log force came after the `mkdir` and covers it.)
        parent.fsync()?;
    }
    Ok(stats)
}

/// Copies the children of `src` (a host directory being imported) into the existing
/// `dst` (a new volume's data root), owners mapped with `ids`. With `follow`, symlinks
/// are followed as long as they stay beneath `src` (see [`Dir::open_beneath`]); without,
/// they are copied as links. Everything copied is on stable storage when it returns.
pub fn copy_into(src: &Dir, dst: Dir, follow: bool, ids: IdMap) -> fsx::Result<CopyStats> {
    let journal = dst.journal();
    run(src, dst, journal, Owners::ToDisk(ids), follow, false)
}
