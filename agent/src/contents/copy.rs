//! Copying a tree into a volume: the naive driver's copy-on-write child (a whole copy of
//! the parent's data) and the `import` strategy's copy of a host directory share this.
//!
//! The source is walked with [`fsx::walk`] (fd-relative, never through a symlink unless
//! asked, never onto another mount); the destination is built fd-relative beside it.
//! Regular files are copied by [`fsx::copy_data`] (reflink, `copy_file_range`, read/write;
//! holes stay holes). Owners (mapped when asked), modes (set after `chown`, so set-id bits
//! survive), extended attributes and times are kept; hard links within the tree stay hard
//! links. Durability costs only the copy: each copied file and directory is handed to a
//! few threads that `fsync` it while the walk goes on, instead of one `syncfs` that would
//! wait for every other writer's dirty data on the same file system. On xfs
//! ([`Journal::Ordered`]) what carries no data of its own (directories, links, reflinked
//! files) is made durable by one log force after the last change instead; only files
//! whose data was written are synced one by one.
//!
//! When the source changes while it is copied (a container writing its volume), the copy
//! is of some mix of before and after, as `cp -a` would make, and never of anything outside
//! the source tree.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
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
    let out = dst.create_file(name, 0o600)?;
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
    let (uid, gid) = owners.map(meta);
    std::os::unix::fs::fchown(&out, Some(uid), Some(gid)).map_err(err(Op::Chown))?;
    out.set_permissions(std::fs::Permissions::from_mode(meta.mode))
        .map_err(err(Op::Chmod))?;
    fsx::copy_xattrs(src, &out).map_err(err(Op::Xattr))?;
    fsx::set_times_fd(out.as_fd(), meta.atime, meta.mtime).map_err(err(Op::SetTimes))?;
    shared.files.fetch_add(1, Ordering::Relaxed);
    shared.bytes.fetch_add(meta.size, Ordering::Relaxed);
    Ok((out, reflinked))
}

struct Copier<'r> {
    src_root: &'r Dir,
    /// Destination directories, the one being filled on top; the destination root first.
    dst: Vec<Level>,
    owners: Owners,
    follow: bool,
    /// Whether the root's own owner, mode and times are copied (not for an import,
    /// whose root the volume already owns).
    apply_root: bool,
    shared: Arc<Shared>,
    /// First copy of each multiply linked inode: `(dev, ino)` → its relative path.
    links: HashMap<(u64, u64), PathBuf>,
    syncer: Syncer,
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

fn name_of(rel: &Path) -> io::Result<NameBuf> {
    NameBuf::new(rel.file_name().map(|n| n.as_bytes()).unwrap_or_default())
}

impl Copier<'_> {
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

    /// Makes `name` a hard link to the first copy of the same inode, if it was copied
    /// already; remembers it otherwise. Returns whether it linked.
    fn link_existing(&mut self, meta: &Meta, rel: &Path, name: Name<'_>) -> fsx::Result<bool> {
        if meta.nlink <= 1 || meta.kind == Kind::Dir {
            return Ok(false);
        }
        let key = (meta.dev, meta.ino);
        let Some(first) = self.links.get(&key).cloned() else {
            self.links.insert(key, rel.to_owned());
            return Ok(false);
        };
        let root: &Dir = &self
            .dst
            .first()
            .ok_or_else(|| wrong(rel.to_owned(), "no destination"))?
            .dir;
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
        Ok(true)
    }

    /// Copies a regular file: on a file thread, or here when it has other hard links (a
    /// later link to it must find the copy made).
    fn copy_file(&mut self, src: File, meta: Meta, rel: &Path, name: Name<'_>) -> fsx::Result<()> {
        if self.link_existing(&meta, rel, name)? {
            return Ok(());
        }
        if self.syncer.failed() {
            return Err(threads_failed());
        }
        let level = self.level()?;
        if meta.nlink > 1 {
            let (out, reflinked) = copy_one(
                &src,
                &meta,
                rel,
                &level.dir,
                name,
                self.owners,
                &self.shared,
            )?;
            if !self.shared.claim_sync(reflinked) {
                return Ok(());
            }
            return self.syncer.push(out.into(), rel.to_owned());
        }
        let guard = level.pending.add();
        let dst = Arc::clone(&level.dir);
        let (owners, shared) = (self.owners, Arc::clone(&self.shared));
        let (rel, name) = (rel.to_owned(), name.to_owned());
        self.syncer.run(Box::new(move || {
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
        if self.link_existing(meta, &rel, name)? {
            return Ok(());
        }
        let dst = self.dst()?;
        if meta.kind == Kind::Symlink {
            let target = dir.readlink(name)?;
            dst.symlink(name, &target)?;
        } else {
            dst.mknod(name, meta.kind, meta.mode, meta.rdev)?;
        }
        let (uid, gid) = self.owners.map(meta);
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
        for _ in 0..MAX_RETRIES {
            let res = match kind {
                Kind::Dir => {
                    self.dst()?.mkdir(name, 0o700)?;
                    return Ok(Descend::Yes);
                }
                Kind::Symlink if self.follow => return self.follow_link(dir, name),
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
        match Dir::open_beneath(self.src_root, &rel) {
            Ok(Beneath::Dir(d)) => {
                self.dst()?.mkdir(name, 0o700)?;
                Ok(Descend::Into(d))
            }
            Ok(Beneath::File(f, meta)) => self.copy_file(f, meta, &rel, name).map(|()| Descend::No),
            Ok(Beneath::Other(meta)) => {
                // A fifo, socket or device the link leads to: made like it, in the link's place.
                let dst = self.dst()?;
                dst.mknod(name, meta.kind, meta.mode, meta.rdev)?;
                let (uid, gid) = self.owners.map(&meta);
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
        let (uid, gid) = self.owners.map(&meta);
        dst.chown_self(uid, gid)?;
        dst.chmod_self(meta.mode)?;
        fsx::copy_xattrs(src, dst)
            .map_err(|e| FsxError::new(Op::Xattr, src.rel().to_owned(), e))?;
        dst.set_times_self(meta.atime, meta.mtime)
    }
}

impl Visitor for Copier<'_> {
    type Error = FsxError;

    fn entry(&mut self, dir: &Dir, name: Name<'_>, kind: Kind) -> fsx::Result<Descend> {
        self.copy_entry(dir, name, kind)
    }

    fn enter(&mut self, _parent: &Dir, child: &Dir) -> fsx::Result<()> {
        let name =
            name_of(child.rel()).map_err(|e| FsxError::new(Op::Open, child.rel().into(), e))?;
        let d = self.dst()?.open_dir(name.as_name())?;
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
        if self.syncer.failed() {
            return Err(threads_failed());
        }
        if !is_root || self.apply_root {
            self.finish_dir(dir, &dst.dir)?;
        }
        self.stats.dirs += 1;
        if is_root {
            // Kept for the caller's last step; synced below.
            self.dst.push(dst);
            return Ok(());
        }
        if !self.shared.claim_sync(true) {
            return Ok(());
        }
        self.syncer
            .push(dst.dir.try_clone_fd()?, dir.rel().to_owned())
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
    let mut c = Copier {
        src_root: src,
        dst: vec![Level::new(dst)],
        owners,
        follow,
        apply_root,
        shared: Arc::new(Shared::new(journal)),
        links: HashMap::new(),
        syncer: Syncer::new(),
        stats: CopyStats::default(),
    };
    let walked = fsx::walk(src, &mut c);
    // The file threads' own failure first: the walk only saw that one happened.
    c.syncer.finish()?;
    walked?;
    for d in c.dst.drain(..) {
        match journal {
            // After the last change (the walk and every file thread are done): one log
            // force for everything not synced one by one, the root's entry included.
            Journal::Ordered => d.dir.force_log()?,
            Journal::PerFile => {
                c.stats.synced += 1;
                d.dir.fsync()?
            }
        }
    }
    let shared = &c.shared;
    c.stats.files += shared.files.load(Ordering::Relaxed);
    c.stats.bytes += shared.bytes.load(Ordering::Relaxed);
    c.stats.reflinked += shared.reflinked.load(Ordering::Relaxed);
    c.stats.synced += shared.synced.load(Ordering::Relaxed);
    Ok(c.stats)
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
