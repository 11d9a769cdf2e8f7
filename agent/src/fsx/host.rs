//! The few host-level file-system calls the agent makes on its own directories (not
//! inside a volume's tree): overlay mounts, free space, the state directory's lock.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{self as rfs, FlockOperation};
use rustix::io::Errno;
use rustix::mount::{self as rmount, MountFlags, UnmountFlags};

use super::retry;

/// Mounts an overlay file system at `target` with the given option string.
pub fn mount_overlay(target: &Path, options: &str) -> io::Result<()> {
    let data = std::ffi::CString::new(options)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    retry(|| {
        rmount::mount(
            "overlay",
            target,
            "overlay",
            MountFlags::empty(),
            data.as_c_str(),
        )
    })
}

/// Unmounts `target` (never following a symlink). Not mounted (`EINVAL`) and missing
/// (`ENOENT`) count as unmounted.
pub fn unmount(target: &Path) -> io::Result<()> {
    match retry(|| rmount::unmount(target, UnmountFlags::NOFOLLOW)) {
        Err(e)
            if e.raw_os_error() == Some(Errno::INVAL.raw_os_error())
                || e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return false;
    };
    match (std::fs::symlink_metadata(path), std::fs::metadata(parent)) {
        (Ok(me), Ok(up)) => me.dev() != up.dev(),
        _ => false,
    }
}

/// A file system's size and free room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFigures {
    pub total_bytes: u64,
    /// Bytes available to unprivileged writers.
    pub free_bytes: u64,
    pub free_inodes: u64,
}

/// The figures of the file system holding `path`.
pub fn disk(path: &Path) -> io::Result<DiskFigures> {
    let st = retry(|| rfs::statvfs(path))?;
    let frsize = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    };
    Ok(DiskFigures {
        total_bytes: st.f_blocks.saturating_mul(frsize),
        free_bytes: st.f_bavail.saturating_mul(frsize),
        free_inodes: st.f_favail,
    })
}

/// Takes an exclusive, non-blocking advisory lock on `file`.
pub fn try_lock_exclusive(file: &File) -> io::Result<()> {
    retry(|| rfs::flock(file, FlockOperation::NonBlockingLockExclusive))
}

/// Whether `e` says the disk is full.
pub fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::NOSPC.raw_os_error())
}
