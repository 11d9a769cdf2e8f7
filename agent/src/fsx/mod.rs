//! `fsx`: the one fd-relative file layer every walk of a volume tree goes through.
//!
//! A [`Dir`] is an open directory handle. The only path-taking opens are
//! [`Dir::open_root`] (a volume's data root or another directory the agent made, opened
//! `O_DIRECTORY|O_NOFOLLOW`) and [`Dir::open_host`] (an operator-given import source,
//! which is followed like baggageclaim's `os.Stat`). Everything else is relative to an open
//! handle: directories are opened with `O_NOFOLLOW|O_DIRECTORY` relative to their parent
//! and refused when they sit on another mount than their parent (statx `STATX_MNT_ID`),
//! every other call is an `*at` call with the last component never followed, and names
//! are [`Name`]s, which cannot hold `/`, NUL, `.` or `..`. So no path inside a volume is
//! ever resolved again after the volume's root is open, and a symlink or rename made by
//! code running inside the volume can never send an operation outside it.
//!
//! Errors are one type, [`FsxError`], carrying the operation and the path of the entry
//! relative to the root the walk started from.
//!
//! Built on `rustix`; no other module of the agent calls `libc` or `rustix` file-system
//! functions for a volume's contents.

mod data;
mod dir;
pub mod host;
mod name;
mod walk;

pub use data::{copy_data, copy_xattrs, CopyMethod};
pub use dir::{
    chmod_fd, chown_fd, fsync_fd, meta_fd, set_times_fd, Beneath, Dir, Entry, Journal, Kind,
    Listing, Meta, Node, Placement, Timestamp,
};
pub use name::{Name, NameBuf};
pub use walk::{walk, walk_from, Descend, Visitor, MAX_DEPTH};

pub use rustix::io::Errno;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What an [`FsxError`] was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Stat,
    List,
    Mkdir,
    Create,
    Symlink,
    Readlink,
    Link,
    Mknod,
    Unlink,
    Rmdir,
    Rename,
    Chown,
    Chmod,
    SetTimes,
    Xattr,
    Read,
    Write,
    Copy,
    Sync,
    Walk,
    Follow,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "opening",
            Op::Stat => "reading the status of",
            Op::List => "listing",
            Op::Mkdir => "making directory",
            Op::Create => "creating",
            Op::Symlink => "making symlink",
            Op::Readlink => "reading symlink",
            Op::Link => "making hard link",
            Op::Mknod => "making special file",
            Op::Unlink => "removing",
            Op::Rmdir => "removing directory",
            Op::Rename => "renaming",
            Op::Chown => "changing the owner of",
            Op::Chmod => "changing the mode of",
            Op::SetTimes => "setting the times of",
            Op::Xattr => "copying extended attributes of",
            Op::Read => "reading",
            Op::Write => "writing",
            Op::Copy => "copying",
            Op::Sync => "syncing",
            Op::Walk => "walking",
            Op::Follow => "following symlink",
        })
    }
}

/// A failed file-system operation: what, on which entry (relative to the walk's root;
/// `.` is the root itself), and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", display_rel(.path))]
pub struct FsxError {
    pub op: Op,
    /// The entry, relative to the root the walk started from.
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn display_rel(p: &Path) -> std::path::Display<'_> {
    if p.as_os_str().is_empty() {
        Path::new(".").display()
    } else {
        p.display()
    }
}

/// The error for a directory that sits on another mount than its parent.
#[derive(Debug, thiserror::Error)]
#[error(
    "another file system is mounted here, so it was not entered; unmount it (nothing \
     inside a volume may be a mount point), then retry"
)]
pub struct CrossesMount;

/// The error for a walk deeper than [`MAX_DEPTH`].
#[derive(Debug, thiserror::Error)]
#[error("the tree is deeper than {MAX_DEPTH} directories; flatten it, then retry")]
pub struct TooDeep;

/// The error for an entry that is not what the operation needs (a non-regular file where
/// a regular one was expected, a symlink where its mode was to be set).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongKind(pub &'static str);

impl FsxError {
    pub(crate) fn new(op: Op, path: PathBuf, source: io::Error) -> Self {
        FsxError { op, path, source }
    }

    /// The system error number, when the failure was a system call's.
    pub fn errno(&self) -> Option<Errno> {
        self.source.raw_os_error().map(Errno::from_raw_os_error)
    }

    /// Whether the system call failed with `errno`.
    pub fn is(&self, errno: Errno) -> bool {
        self.errno() == Some(errno)
    }

    /// Whether the entry does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        self.is(Errno::NOENT)
    }

    /// Whether the entry is not (or no longer) what was expected: a symlink or other
    /// non-directory where a directory was opened, or a non-regular file where a regular
    /// one was.
    pub fn is_wrong_kind(&self) -> bool {
        self.is(Errno::LOOP)
            || self.is(Errno::NOTDIR)
            || self.source.get_ref().is_some_and(|e| e.is::<WrongKind>())
    }

    /// Whether the walk stopped at a mount point inside the tree.
    pub fn is_mount_point(&self) -> bool {
        self.source
            .get_ref()
            .is_some_and(|e| e.is::<CrossesMount>())
    }

    /// Whether the disk (or the inode table) is full.
    pub fn is_no_space(&self) -> bool {
        self.is(Errno::NOSPC) || self.is(Errno::DQUOT)
    }

    /// The same error with its path put under `root` (for messages naming the real place).
    pub fn under(mut self, root: &Path) -> Self {
        self.path = if self.path.as_os_str().is_empty() {
            root.to_owned()
        } else {
            root.join(&self.path)
        };
        self
    }
}

pub type Result<T> = std::result::Result<T, FsxError>;

/// Retries a call interrupted by a signal.
pub(crate) fn retry<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests;
