//! Thin, safe wrappers over the few system calls the inventory needs that std lacks:
//! mount, umount, syncfs, statvfs, flock, mknod, lchown.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains a NUL byte", path.display()),
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts an overlay filesystem at `target` with the given option string.
pub(crate) fn mount_overlay(target: &Path, options: &str) -> io::Result<()> {
    let source = CString::new("overlay").map_err(io::Error::other)?;
    let fstype = CString::new("overlay").map_err(io::Error::other)?;
    let data = CString::new(options).map_err(io::Error::other)?;
    let target = cstr(target)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    check(rc)
}

/// Unmounts `target`. Not mounted (EINVAL) and missing (ENOENT) count as unmounted.
pub(crate) fn unmount(target: &Path) -> io::Result<()> {
    let c = cstr(target)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) };
    match check(rc) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(()),
        other => other,
    }
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub(crate) fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return false;
    };
    match (std::fs::symlink_metadata(path), std::fs::metadata(parent)) {
        (Ok(me), Ok(up)) => me.dev() != up.dev(),
        _ => false,
    }
}

/// Flushes the whole filesystem holding `path` to stable storage.
pub(crate) fn syncfs(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: the fd is open for the duration of the call.
    check(unsafe { libc::syncfs(f.as_raw_fd()) })
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub(crate) fn available_bytes(path: &Path) -> io::Result<u64> {
    let c = cstr(path)?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is valid and `st` is a valid out-pointer.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Takes an exclusive, non-blocking advisory lock on `file`.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call.
    check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) })
}

/// Makes a special file (fifo, socket, device) like the one described by `mode`/`rdev`.
pub(crate) fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is valid for the duration of the call.
    check(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
}

/// Sets the owner of `path` without following a symlink.
pub(crate) fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Whether `e` says the disk is full.
pub(crate) fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}
