//! Thin wrappers over the `*at` system calls the removal engine uses. Every call works
//! relative to an open directory handle and never follows a symlink in the last component.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Retries a call that failed with `EINTR`.
fn retry<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    retry(|| {
        // SAFETY: `name` is a valid NUL-terminated string and `dir` an open descriptor.
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Opens the directory `name` inside `dir` for reading; fails with `ELOOP`/`ENOTDIR` when it
/// is a symlink or not a directory.
pub(super) fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// Opens the directory `name` inside `dir` as a path handle: needs no read permission on it.
pub(super) fn open_dir_path_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH | libc::O_DIRECTORY)
}

/// `unlinkat(dir, name, flags)`: `flags` is 0 for a non-directory, `AT_REMOVEDIR` for one.
pub(super) fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    retry(|| {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
    })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `struct stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    retry(|| {
        // SAFETY: valid descriptor, NUL-terminated name, `st` is writable.
        cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    })?;
    Ok(st)
}

/// Which filesystem mount an open file lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placement {
    pub dev: u64,
    /// The mount id; `None` where the kernel cannot tell (no `statx` or no `STATX_MNT_ID`),
    /// in which case only `dev` is compared.
    pub mnt_id: Option<u64>,
}

impl Placement {
    /// True when `other` is on a different mount (a different filesystem, or a bind mount of
    /// the same one).
    pub fn differs_from(&self, other: &Placement) -> bool {
        if self.dev != other.dev {
            return true;
        }
        matches!((self.mnt_id, other.mnt_id), (Some(a), Some(b)) if a != b)
    }
}

/// The device and mount id of an open descriptor.
pub(super) fn placement(fd: BorrowedFd<'_>) -> io::Result<Placement> {
    // SAFETY: all-zero is a valid `struct statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let res = retry(|| {
        // SAFETY: valid descriptor, empty NUL-terminated path with AT_EMPTY_PATH, writable buffer.
        cvt(unsafe {
            libc::statx(
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_TYPE | libc::STATX_MNT_ID,
                &mut stx,
            )
        })
    });
    match res {
        Ok(_) => Ok(Placement {
            dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            mnt_id: (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            // SAFETY: all-zero is a valid `struct stat`.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor and writable buffer.
            cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
            Ok(Placement {
                dev: st.st_dev,
                mnt_id: None,
            })
        }
        Err(e) => Err(e),
    }
}

/// Gives the owner full access to the open directory `fd` (used when not running as root and
/// a directory inside the tree is read-only).
pub(super) fn make_owner_writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid descriptor.
    retry(|| cvt(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) }).map(drop))
}

/// Like [`make_owner_writable`] for a path handle (`O_PATH`), through its `/proc/self/fd`
/// link, which names exactly the opened inode.
pub(super) fn make_owner_writable_path(fd: BorrowedFd<'_>) -> io::Result<()> {
    let link = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(io::Error::other)?;
    // SAFETY: NUL-terminated path.
    retry(|| cvt(unsafe { libc::chmod(link.as_ptr(), 0o700) }).map(drop))
}

/// Seeks a directory handle back to its first entry.
pub(super) fn rewind(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid descriptor.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads the next batch of directory entries into `buf`; returns the bytes filled, 0 at the end.
pub(super) fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(usize::try_from(n).unwrap_or(0))
        }
    })
}

/// The entries in a buffer filled by [`getdents`], without `.` and `..`.
pub(super) struct Dirents<'a> {
    buf: &'a [u8],
}

impl<'a> Dirents<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dirents { buf }
    }
}

// struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
const RECLEN_AT: usize = 16;
const TYPE_AT: usize = 18;
const NAME_AT: usize = 19;

impl<'a> Iterator for Dirents<'a> {
    /// The entry's name and its `d_type` (`DT_UNKNOWN` where the filesystem does not say).
    type Item = (&'a CStr, u8);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let header = self.buf.get(..NAME_AT)?;
            let reclen = usize::from(u16::from_ne_bytes([
                header[RECLEN_AT],
                header[RECLEN_AT + 1],
            ]));
            let d_type = header[TYPE_AT];
            let record = self.buf.get(..reclen.max(NAME_AT))?;
            self.buf = &self.buf[record.len()..];
            let name = CStr::from_bytes_until_nul(&record[NAME_AT..]).ok()?;
            match name.to_bytes() {
                b"." | b".." => continue,
                _ => return Some((name, d_type)),
            }
        }
    }
}
