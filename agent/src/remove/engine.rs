//! The parallel removal engine.
//!
//! Every directory is a task on a LIFO stack shared by a few threads. A task opens its
//! directory relative to its parent's open handle (`O_NOFOLLOW | O_DIRECTORY`), checks it is
//! on the root's mount, pushes its subdirectories as new tasks and unlinks everything else
//! relative to its own handle. A directory keeps a count of unfinished children; whoever
//! finishes the last one removes the directory and walks on to its parent. The LIFO order
//! keeps the number of open handles near depth × threads.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::rate::{Meter, RateLimit};
use super::sys;
use super::{MountPointInside, RemoveError};

/// Size of the buffer each thread reads directory entries into.
const DIRENT_BUF: usize = 64 * 1024;
/// How often a directory that keeps gaining entries is scanned again before giving up.
const MAX_RESCANS: u32 = 16;

/// An open directory inside the tree.
struct Dir {
    /// `None` for the root, whose parent handle is [`Engine::top`].
    parent: Option<Arc<Dir>>,
    name: CString,
    fd: OwnedFd,
    /// 1 while this directory's own scan is running, plus one per unfinished subdirectory.
    pending: AtomicUsize,
    rescans: AtomicU32,
    /// Set once we gave ourselves write access (non-root, read-only directory).
    unlocked: AtomicBool,
}

enum Task {
    /// Open and scan the subdirectory `name` of `parent`.
    Open { parent: Arc<Dir>, name: CString },
    /// Scan an already open directory again (its removal found it not empty).
    Rescan(Arc<Dir>),
}

struct Queue {
    tasks: Vec<Task>,
    idle: usize,
    done: bool,
}

pub(super) struct Engine<'a> {
    root_path: &'a Path,
    /// The directory holding the root.
    top: OwnedFd,
    root_place: sys::Placement,
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
    buf: Vec<u8>,
    counts: Counts<'e>,
}

struct Counts<'e> {
    meter: Meter<'e>,
    entries: u64,
    bytes: u64,
}

fn is(e: &io::Error, errno: libc::c_int) -> bool {
    e.raw_os_error() == Some(errno)
}

fn os(name: &CStr) -> &OsStr {
    OsStr::from_bytes(name.to_bytes())
}

impl Dir {
    /// The path of this directory, for error messages.
    fn path(&self, root: &Path) -> PathBuf {
        let mut names = Vec::new();
        let mut at = Some(self);
        while let Some(d) = at {
            if d.parent.is_some() {
                names.push(os(&d.name));
            }
            at = d.parent.as_deref();
        }
        let mut path = root.to_path_buf();
        path.extend(names.iter().rev());
        path
    }

    fn child_path(&self, root: &Path, name: &CStr) -> PathBuf {
        let mut path = self.path(root);
        path.push(os(name));
        path
    }
}

impl<'a> Engine<'a> {
    /// Runs the removal of the directory `name` in `top` (already opened as `root_fd`).
    pub(super) fn run(
        root_path: &'a Path,
        top: OwnedFd,
        name: CString,
        root_fd: OwnedFd,
        threads: usize,
        rate: Option<&'a RateLimit>,
        count_bytes: bool,
    ) -> Result<Tally, RemoveError> {
        let err = |source| RemoveError {
            path: root_path.to_owned(),
            source,
        };
        let root_place = sys::placement(root_fd.as_fd()).map_err(err)?;
        let root = Arc::new(Dir {
            parent: None,
            name,
            fd: root_fd,
            pending: AtomicUsize::new(1),
            rescans: AtomicU32::new(0),
            unlocked: AtomicBool::new(false),
        });
        let engine = Engine {
            root_path,
            top,
            root_place,
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
                            path: root_path.to_owned(),
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
            buf: vec![0; DIRENT_BUF],
            counts: Counts {
                meter: Meter::new(self.rate),
                entries: 0,
                bytes: 0,
            },
        };
        while let Some(task) = self.next_task() {
            let res = match task {
                Task::Open { parent, name } => self.open(&mut w, parent, name),
                Task::Rescan(dir) => sys::rewind(dir.fd.as_fd())
                    .map_err(|source| RemoveError {
                        path: dir.path(self.root_path),
                        source,
                    })
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

    fn parent_fd<'d>(&'d self, dir: &'d Dir) -> BorrowedFd<'d> {
        match &dir.parent {
            Some(p) => p.fd.as_fd(),
            None => self.top.as_fd(),
        }
    }

    /// Opens the subdirectory `name` of `parent` and scans it.
    fn open(&self, w: &mut Worker<'_>, parent: Arc<Dir>, name: CString) -> Result<(), RemoveError> {
        let fd = match self.open_child(&parent, &name) {
            Ok(Some(fd)) => fd,
            // Gone already, or no longer a directory and unlinked: the child is finished.
            Ok(None) => return self.child_done(&mut w.counts, parent),
            Err(e) => return Err(e),
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

    fn open_child(&self, parent: &Dir, name: &CStr) -> Result<Option<OwnedFd>, RemoveError> {
        let err = |source| RemoveError {
            path: parent.child_path(self.root_path, name),
            source,
        };
        let mut chmodded = false;
        let fd = loop {
            match sys::open_dir_at(parent.fd.as_fd(), name) {
                Ok(fd) => break fd,
                Err(e) if is(&e, libc::ENOENT) => return Ok(None),
                Err(e) if is(&e, libc::ELOOP) || is(&e, libc::ENOTDIR) => {
                    // Replaced by a symlink or a file since it was listed: unlink that.
                    return match sys::unlink_at(parent.fd.as_fd(), name, 0) {
                        Ok(()) => Ok(None),
                        Err(e) if is(&e, libc::ENOENT) => Ok(None),
                        Err(e) => Err(err(e)),
                    };
                }
                Err(e) if is(&e, libc::EACCES) && !chmodded => {
                    // Not root and the directory is unreadable: open it as a path handle,
                    // make sure it is on our mount, then give ourselves access.
                    chmodded = true;
                    let path_fd = sys::open_dir_path_at(parent.fd.as_fd(), name).map_err(err)?;
                    self.check_same_mount(parent, name, path_fd.as_fd())?;
                    sys::make_owner_writable_path(path_fd.as_fd()).map_err(|_| err(e))?;
                }
                Err(e) => return Err(err(e)),
            }
        };
        self.check_same_mount(parent, name, fd.as_fd())?;
        Ok(Some(fd))
    }

    fn check_same_mount(
        &self,
        parent: &Dir,
        name: &CStr,
        fd: BorrowedFd<'_>,
    ) -> Result<(), RemoveError> {
        let path = || parent.child_path(self.root_path, name);
        let place = sys::placement(fd).map_err(|source| RemoveError {
            path: path(),
            source,
        })?;
        if place.differs_from(&self.root_place) {
            return Err(RemoveError {
                path: path(),
                source: io::Error::other(MountPointInside),
            });
        }
        Ok(())
    }

    /// Lists `dir`: pushes its subdirectories as tasks and unlinks everything else.
    fn scan(&self, w: &mut Worker<'_>, dir: Arc<Dir>) -> Result<(), RemoveError> {
        let fd = dir.fd.as_fd();
        let mut children = Vec::new();
        loop {
            let n = sys::getdents(fd, &mut w.buf).map_err(|source| RemoveError {
                path: dir.path(self.root_path),
                source,
            })?;
            if n == 0 {
                break;
            }
            // Subdirectories first, so idle threads get work while we unlink the files.
            let dirs = sys::Dirents::new(&w.buf[..n]).filter(|&(_, t)| t == libc::DT_DIR);
            children.extend(dirs.map(|(name, _)| name.to_owned()));
            self.schedule(&dir, &mut children);
            for (name, d_type) in sys::Dirents::new(&w.buf[..n]) {
                if d_type != libc::DT_DIR && self.unlink_entry(&mut w.counts, &dir, name)? {
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
    fn schedule(&self, dir: &Arc<Dir>, names: &mut Vec<CString>) {
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
        name: &CStr,
    ) -> Result<bool, RemoveError> {
        let fd = dir.fd.as_fd();
        let err = |source| RemoveError {
            path: dir.child_path(self.root_path, name),
            source,
        };
        w.meter.take_one();
        let freed = if self.count_bytes {
            match sys::lstat_at(fd, name) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return Ok(true),
                Ok(st) if st.st_nlink <= 1 => u64::try_from(st.st_blocks).unwrap_or(0) * 512,
                Ok(_) => 0,
                Err(e) if is(&e, libc::ENOENT) => return Ok(false),
                Err(e) => return Err(err(e)),
            }
        } else {
            0
        };
        loop {
            match sys::unlink_at(fd, name, 0) {
                Ok(()) => {
                    w.entries += 1;
                    w.bytes += freed;
                    return Ok(false);
                }
                Err(e) if is(&e, libc::ENOENT) => return Ok(false),
                Err(e) if is(&e, libc::EISDIR) => return Ok(true),
                Err(e) if is(&e, libc::EACCES) && self.unlock(dir) => continue,
                Err(e) => return Err(err(e)),
            }
        }
    }

    /// Gives us write access to `dir` the first time it refuses us. Returns whether a retry
    /// may now succeed.
    fn unlock(&self, dir: &Dir) -> bool {
        !dir.unlocked.swap(true, Ordering::AcqRel)
            && sys::make_owner_writable(dir.fd.as_fd()).is_ok()
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
            let parent_fd = self.parent_fd(&dir);
            let res = loop {
                match sys::unlink_at(parent_fd, &dir.name, libc::AT_REMOVEDIR) {
                    Err(e) if is(&e, libc::EACCES) => {
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
                Err(e) if is(&e, libc::ENOENT) => {}
                Err(e) if is(&e, libc::ENOTEMPTY) || is(&e, libc::EEXIST) => {
                    // Entries appeared (or a listing missed some): scan it again.
                    if dir.rescans.fetch_add(1, Ordering::AcqRel) >= MAX_RESCANS {
                        return Err(RemoveError {
                            path: dir.path(self.root_path),
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
                Err(source) => {
                    return Err(RemoveError {
                        path: dir.path(self.root_path),
                        source,
                    })
                }
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
