//! The parallel removal engine.
//!
//! Every directory is a task on a LIFO stack shared by a few threads. A task opens its
//! directory relative to its parent's open handle (`O_NOFOLLOW | O_DIRECTORY`), checks it is
//! on the root's mount, pushes its subdirectories as new tasks and unlinks everything else
//! relative to its own handle. A directory keeps a count of unfinished children; whoever
//! finishes the last one removes the directory and walks on to its parent. The LIFO order
//! keeps the number of open handles near depth × threads.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::rate::{Meter, RateLimit};
use super::RemoveError;
use crate::fsx::{self, Errno, FsxError, Kind, Listing, Name, NameBuf};

/// Size of the buffer each thread reads directory entries into.
const DIRENT_BUF: usize = 64 * 1024;
/// How often a directory that keeps gaining entries is scanned again before giving up.
const MAX_RESCANS: u32 = 16;

/// An open directory inside the tree.
struct Dir {
    /// `None` for the root, whose parent handle is [`Engine::top`].
    parent: Option<Arc<Dir>>,
    name: NameBuf,
    fd: fsx::Dir,
    /// 1 while this directory's own scan is running, plus one per unfinished subdirectory.
    pending: AtomicUsize,
    rescans: AtomicU32,
    /// Set once we gave ourselves write access (non-root, read-only directory).
    unlocked: AtomicBool,
}

enum Task {
    /// Open and scan the subdirectory `name` of `parent`.
    Open { parent: Arc<Dir>, name: NameBuf },
    /// Scan an already open directory again (its removal found it not empty).
    Rescan(Arc<Dir>),
}

struct Queue {
    tasks: Vec<Task>,
    idle: usize,
    done: bool,
}

pub(super) struct Engine<'a> {
    /// The directory holding the root, whose path error paths start from.
    top_path: &'a Path,
    top: fsx::Dir,
    rate: Option<&'a RateLimit>,
    count_bytes: bool,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Set with `Queue::done`, readable without the lock.
    stop: AtomicBool,
    error: Mutex<Option<RemoveError>>,
}

/// What one thread did.
#[derive(Default)]
pub(super) struct Tally {
    pub entries: u64,
    pub bytes: u64,
    pub throttled: Duration,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.throttled += other.throttled;
    }
}

struct Worker<'e> {
    listing: Listing,
    counts: Counts<'e>,
}

struct Counts<'e> {
    meter: Meter<'e>,
    entries: u64,
    bytes: u64,
}

impl Dir {
    fn name(&self) -> Name<'_> {
        self.name.as_name()
    }
}

impl<'a> Engine<'a> {
    /// Runs the removal of the directory `root` (open, and named `name` in `top`, which is
    /// at `top_path`).
    pub(super) fn run(
        top_path: &'a Path,
        top: fsx::Dir,
        name: NameBuf,
        root: fsx::Dir,
        threads: usize,
        rate: Option<&'a RateLimit>,
        count_bytes: bool,
    ) -> Result<Tally, RemoveError> {
        let root = Arc::new(Dir {
            parent: None,
            name,
            fd: root,
            pending: AtomicUsize::new(1),
            rescans: AtomicU32::new(0),
            unlocked: AtomicBool::new(false),
        });
        let engine = Engine {
            top_path,
            top,
            rate,
            count_bytes,
            queue: Mutex::new(Queue {
                tasks: vec![Task::Rescan(root)],
                idle: 0,
                done: false,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        };
        let mut total = Tally::default();
        if threads <= 1 {
            total += engine.work();
        } else {
            std::thread::scope(|s| {
                let helpers: Vec<_> = (1..threads).map(|_| s.spawn(|| engine.work())).collect();
                total += engine.work();
                for h in helpers {
                    match h.join() {
                        Ok(t) => total += t,
                        // Only a bug panics; the guard in `work` already stopped the others.
                        Err(_) => engine.fail(RemoveError {
                            path: top_path.to_owned(),
                            source: io::Error::other("a removal thread panicked (a bug)"),
                        }),
                    }
                }
            });
        }
        let failed = engine
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match failed {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// The removal error for a failed file operation (its path made absolute).
    fn err(&self, e: FsxError) -> RemoveError {
        RemoveError {
            path: self.top_path.join(&e.path),
            source: e.source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_task(&self) -> Option<Task> {
        let mut q = self.lock();
        loop {
            if q.done {
                return None;
            }
            if let Some(t) = q.tasks.pop() {
                return Some(t);
            }
            q.idle += 1;
            q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            q.idle -= 1;
        }
    }

    fn push(&self, tasks: impl IntoIterator<Item = Task>) {
        let mut q = self.lock();
        let before = q.tasks.len();
        q.tasks.extend(tasks);
        let added = q.tasks.len() - before;
        if q.idle > 0 && added > 0 {
            if added > 1 {
                self.wake.notify_all();
            } else {
                self.wake.notify_one();
            }
        }
    }

    fn finish_all(&self) {
        let mut q = self.lock();
        self.stop.store(true, Ordering::Release);
        q.done = true;
        q.tasks.clear();
        self.wake.notify_all();
    }

    fn fail(&self, e: RemoveError) {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(e);
        self.finish_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn work(&self) -> Tally {
        /// Stops the other threads if this one panics, so they do not wait forever.
        struct StopOnPanic<'g, 'a>(&'g Engine<'a>);
        impl Drop for StopOnPanic<'_, '_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.finish_all();
                }
            }
        }
        let _guard = StopOnPanic(self);
        let mut w = Worker {
            listing: Listing::with_capacity(DIRENT_BUF),
            counts: Counts {
                meter: Meter::new(self.rate),
                entries: 0,
                bytes: 0,
            },
        };
        while let Some(task) = self.next_task() {
            let res = match task {
                Task::Open { parent, name } => self.open(&mut w, parent, name),
                Task::Rescan(dir) => dir
                    .fd
                    .rewind()
                    .map_err(|e| self.err(e))
                    .and_then(|()| self.scan(&mut w, dir)),
            };
            if let Err(e) = res {
                self.fail(e);
            }
        }
        Tally {
            entries: w.counts.entries,
            bytes: w.counts.bytes,
            throttled: w.counts.meter.throttled,
        }
    }

    fn parent_of<'d>(&'d self, dir: &'d Dir) -> &'d fsx::Dir {
        match &dir.parent {
            Some(p) => &p.fd,
            None => &self.top,
        }
    }

    /// Opens the subdirectory `name` of `parent` and scans it.
    fn open(&self, w: &mut Worker<'_>, parent: Arc<Dir>, name: NameBuf) -> Result<(), RemoveError> {
        let fd = match open_subdir(&parent.fd, name.as_name()) {
            Ok(Some(fd)) => fd,
            // Gone already, or no longer a directory and unlinked: the child is finished.
            Ok(None) => return self.child_done(&mut w.counts, parent),
            Err(e) => return Err(self.err(e)),
        };
        let dir = Arc::new(Dir {
            parent: Some(parent),
            name,
            fd,
            pending: AtomicUsize::new(1),
            rescans: AtomicU32::new(0),
            unlocked: AtomicBool::new(false),
        });
        self.scan(w, dir)
    }

    /// Lists `dir`: pushes its subdirectories as tasks and unlinks everything else.
    fn scan(&self, w: &mut Worker<'_>, dir: Arc<Dir>) -> Result<(), RemoveError> {
        let mut children = Vec::new();
        loop {
            let more = dir.fd.read_batch(&mut w.listing).map_err(|e| self.err(e))?;
            if !more {
                break;
            }
            // Subdirectories first, so idle threads get work while we unlink the files.
            let dirs = w.listing.iter().filter(|&(_, k)| k == Kind::Dir);
            children.extend(dirs.map(|(name, _)| name.to_owned()));
            self.schedule(&dir, &mut children);
            for (name, kind) in w.listing.iter() {
                if kind != Kind::Dir && self.unlink_entry(&mut w.counts, &dir, name)? {
                    children.push(name.to_owned());
                }
            }
            self.schedule(&dir, &mut children);
            if self.stopped() {
                return Ok(());
            }
        }
        if dir.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.remove_dir(&mut w.counts, dir)?;
        }
        Ok(())
    }

    /// Pushes the subdirectories `names` of `dir` as tasks.
    fn schedule(&self, dir: &Arc<Dir>, names: &mut Vec<NameBuf>) {
        if names.is_empty() {
            return;
        }
        dir.pending.fetch_add(names.len(), Ordering::AcqRel);
        self.push(names.drain(..).map(|name| Task::Open {
            parent: Arc::clone(dir),
            name,
        }));
    }

    /// Unlinks the non-directory `name` in `dir`. Returns `true` when it turned out to be a
    /// directory (the filesystem did not report types), which the caller then schedules.
    fn unlink_entry(
        &self,
        w: &mut Counts<'_>,
        dir: &Dir,
        name: Name<'_>,
    ) -> Result<bool, RemoveError> {
        w.meter.take_one();
        let freed = if self.count_bytes {
            match dir.fd.stat(name) {
                Ok(m) if m.is_dir() => return Ok(true),
                Ok(m) if m.nlink <= 1 => m.disk_bytes(),
                Ok(_) => 0,
                Err(e) if e.is_not_found() => return Ok(false),
                Err(e) => return Err(self.err(e)),
            }
        } else {
            0
        };
        loop {
            match dir.fd.unlink(name) {
                Ok(()) => {
                    w.entries += 1;
                    w.bytes += freed;
                    return Ok(false);
                }
                Err(e) if e.is_not_found() => return Ok(false),
                Err(e) if e.is(Errno::ISDIR) => return Ok(true),
                Err(e) if e.is(Errno::ACCESS) && self.unlock(dir) => continue,
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// Gives us write access to `dir` the first time it refuses us. Returns whether a retry
    /// may now succeed.
    fn unlock(&self, dir: &Dir) -> bool {
        !dir.unlocked.swap(true, Ordering::AcqRel) && dir.fd.chmod_self(0o700).is_ok()
    }

    /// One subdirectory of `parent` is finished.
    fn child_done(&self, w: &mut Counts<'_>, parent: Arc<Dir>) -> Result<(), RemoveError> {
        if parent.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.remove_dir(w, parent)
        } else {
            Ok(())
        }
    }

    /// Removes the now empty `dir`, then every ancestor this leaves finished.
    fn remove_dir(&self, w: &mut Counts<'_>, mut dir: Arc<Dir>) -> Result<(), RemoveError> {
        loop {
            w.meter.take_one();
            let parent = self.parent_of(&dir);
            let res = loop {
                match parent.rmdir(dir.name()) {
                    Err(e) if e.is(Errno::ACCESS) => {
                        if let Some(p) = &dir.parent {
                            if self.unlock(p) {
                                continue;
                            }
                        }
                        break Err(e);
                    }
                    other => break other,
                }
            };
            match res {
                Ok(()) => w.entries += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is(Errno::NOTEMPTY) || e.is(Errno::EXIST) => {
                    // Entries appeared (or a listing missed some): scan it again.
                    if dir.rescans.fetch_add(1, Ordering::AcqRel) >= MAX_RESCANS {
                        return Err(RemoveError {
                            path: self.top_path.join(dir.fd.rel()),
                            source: io::Error::other(
                                "the directory keeps getting new entries while being removed; \
                                 stop whatever writes into it, then retry",
                            ),
                        });
                    }
                    dir.pending.store(1, Ordering::Release);
                    self.push([Task::Rescan(dir)]);
                    return Ok(());
                }
                Err(e) => return Err(self.err(e)),
            }
            match dir.parent.clone() {
                None => {
                    self.finish_all();
                    return Ok(());
                }
                Some(parent) => {
                    drop(dir);
                    if parent.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
                        return Ok(());
                    }
                    dir = parent;
                }
            }
        }
    }
}

/// Opens the directory `name` in `parent` for removal. `None` when it is gone, or was
/// replaced by a non-directory (which is then unlinked). When it cannot be read (not root,
/// mode 0), gives the owner access first, after checking it is on `parent`'s mount.
pub(super) fn open_subdir(parent: &fsx::Dir, name: Name<'_>) -> Result<Option<fsx::Dir>, FsxError> {
    let mut chmodded = false;
    loop {
        match parent.open_dir(name) {
            Ok(d) => return Ok(Some(d)),
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) if e.is_wrong_kind() => {
                // Replaced by a symlink or a file since it was listed: unlink that.
                return match parent.unlink(name) {
                    Err(e) if !e.is_not_found() => Err(e),
                    _ => Ok(None),
                };
            }
            Err(e) if e.is(Errno::ACCESS) && !chmodded => {
                chmodded = true;
                let path_only = parent.open_dir_path(name)?;
                path_only.chmod_self(0o700).map_err(|_| e)?;
            }
            Err(e) => return Err(e),
        }
    }
}
