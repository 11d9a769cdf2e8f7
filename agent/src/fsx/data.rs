//! Copying a regular file's data between two open files at the file system's speed:
//! a reflink (`FICLONE`) where the file system shares extents (xfs, btrfs),
//! `copy_file_range` otherwise (in-kernel, no user-space buffer), `read`/`write` as the last
//! resort; holes are skipped (`SEEK_DATA`/`SEEK_HOLE`), so a sparse file stays sparse.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::{self as rfs, SeekFrom};
use rustix::io::Errno;

use super::retry;

/// How a file's data was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared with the source (`FICLONE`): no data written.
    Reflink,
    /// `copy_file_range`, hole by hole.
    CopyRange,
    /// `read`/`write`, hole by hole.
    ReadWrite,
}

/// Errors that mean "this way of copying does not work here", not "the copy failed".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(
            Errno::OPNOTSUPP
                | Errno::XDEV
                | Errno::INVAL
                | Errno::NOTTY
                | Errno::NOSYS
                | Errno::BADF
                | Errno::PERM
        )
    )
}

/// Copies all data of `src` into the new, empty `dst`. `reflink` says whether to try
/// `FICLONE` first (callers stop trying after the file system said no once).
pub fn copy_data(src: &File, dst: &File, reflink: bool) -> io::Result<CopyMethod> {
    if reflink {
        match retry(|| rfs::ioctl_ficlone(dst, src)) {
            Ok(()) => return Ok(CopyMethod::Reflink),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let mut method = CopyMethod::CopyRange;
    let mut pos = 0u64;
    // Where the data written to `dst` ends (its length).
    let mut written = 0u64;
    loop {
        let start = match retry(|| rfs::seek(src, SeekFrom::Data(pos))) {
            Ok(at) => at,
            // No data at or after `pos`: the rest is a hole (or the end).
            Err(e) if e.raw_os_error() == Some(Errno::NXIO.raw_os_error()) => break,
            // No SEEK_DATA here: copy everything as data.
            Err(e) if unsupported(&e) => pos,
            Err(e) => return Err(e),
        };
        let end = match retry(|| rfs::seek(src, SeekFrom::Hole(start))) {
            Ok(at) => at,
            Err(e) if unsupported(&e) => u64::MAX,
            Err(e) => return Err(e),
        };
        let copied = copy_range(src, dst, start, end, &mut method)?;
        pos = start + copied;
        if copied > 0 {
            written = pos;
        }
        if copied == 0 || pos < end {
            // The end of the file (it may have shrunk meanwhile).
            break;
        }
    }
    // A trailing hole, or a source that shrank while copied: the exact size. Skipped when
    // the data already ends there (most files): a truncate to the current size is a wasted
    // call, and LazyFS (the power-cut tests' file system) answers it with a stale errno.
    let size = u64::try_from(rfs::fstat(src).map_err(io::Error::from)?.st_size).unwrap_or(0);
    if size != written {
        dst.set_len(size)?;
    }
    Ok(method)
}

/// Copies `[start, end)` (or to the end of the file) at the same offsets; returns the
/// bytes copied, fewer when the file ended first.
fn copy_range(
    src: &File,
    dst: &File,
    start: u64,
    end: u64,
    method: &mut CopyMethod,
) -> io::Result<u64> {
    let mut done = 0u64;
    while start + done < end {
        let want = usize::try_from((end - start - done).min(1 << 30)).unwrap_or(1 << 30);
        let n = if *method == CopyMethod::CopyRange {
            let mut off_in = start + done;
            let mut off_out = off_in;
            match retry(|| {
                rfs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            }) {
                Ok(n) => n,
                Err(e) if unsupported(&e) => {
                    *method = CopyMethod::ReadWrite;
                    continue;
                }
                Err(e) => return Err(e),
            }
        } else {
            read_write(src, dst, start + done, want)?
        };
        if n == 0 {
            break;
        }
        done += n as u64;
    }
    Ok(done)
}

/// One buffer's worth of `pread`/`pwrite` at `at`.
fn read_write(src: &File, dst: &File, at: u64, want: usize) -> io::Result<usize> {
    let mut buf = vec![0u8; want.min(1 << 20)];
    let n = loop {
        match src.read_at(&mut buf, at) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    dst.write_all_at(&buf[..n], at)?;
    Ok(n)
}

/// One side of an extended-attribute copy: an open file, or an entry named by a path
/// whose last component is never followed (a symlink's own attributes).
#[derive(Clone, Copy)]
pub(super) enum XattrSide<'a> {
    Fd(std::os::fd::BorrowedFd<'a>),
    /// A `/proc/self/fd/<dir>/<name>` path: the directory is the open handle's inode, the
    /// name one component looked up in it, so nothing is resolved again.
    NoFollow(&'a std::ffi::CStr),
}

impl XattrSide<'_> {
    fn list(self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            XattrSide::Fd(fd) => retry(|| rfs::flistxattr(fd, &mut *buf)),
            XattrSide::NoFollow(p) => retry(|| rfs::llistxattr(p, &mut *buf)),
        }
    }

    fn list_len(self) -> io::Result<usize> {
        match self {
            XattrSide::Fd(fd) => retry(|| rfs::flistxattr_query(fd)),
            XattrSide::NoFollow(p) => retry(|| rfs::llistxattr_query(p)),
        }
    }

    fn get(self, name: &std::ffi::CStr, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            XattrSide::Fd(fd) => retry(|| rfs::fgetxattr(fd, name, &mut *buf)),
            XattrSide::NoFollow(p) => retry(|| rfs::lgetxattr(p, name, &mut *buf)),
        }
    }

    fn get_len(self, name: &std::ffi::CStr) -> io::Result<usize> {
        match self {
            XattrSide::Fd(fd) => retry(|| rfs::fgetxattr_query(fd, name)),
            XattrSide::NoFollow(p) => retry(|| rfs::lgetxattr_query(p, name)),
        }
    }

    fn set(self, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
        let flags = rfs::XattrFlags::empty();
        match self {
            XattrSide::Fd(fd) => retry(|| rfs::fsetxattr(fd, name, value, flags)),
            XattrSide::NoFollow(p) => retry(|| rfs::lsetxattr(p, name, value, flags)),
        }
    }
}

/// Copies every extended attribute of the open file `src` to the open file `dst`. A file
/// system without extended attributes on either side copies nothing; a name the target
/// refuses (`EPERM`, `ENOTSUP` for that namespace) is skipped.
pub fn copy_xattrs(src: &impl std::os::fd::AsFd, dst: &impl std::os::fd::AsFd) -> io::Result<()> {
    copy_xattrs_between(XattrSide::Fd(src.as_fd()), XattrSide::Fd(dst.as_fd()))
}

/// [`copy_xattrs`] between any two sides.
pub(super) fn copy_xattrs_between(src: XattrSide<'_>, dst: XattrSide<'_>) -> io::Result<()> {
    let skip = |e: &io::Error| {
        matches!(
            e.raw_os_error().map(Errno::from_raw_os_error),
            Some(Errno::OPNOTSUPP | Errno::PERM | Errno::NODATA)
        )
    };
    let mut names = vec![0u8; 1024];
    let len = loop {
        match src.list(&mut names[..]) {
            Ok(n) => break n,
            Err(e) if e.raw_os_error() == Some(Errno::RANGE.raw_os_error()) => {
                let want = src.list_len()?;
                names.resize(want.max(names.len() * 2), 0);
            }
            Err(e) if skip(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    let mut value = vec![0u8; 4096];
    for name in names[..len.min(names.len())].split(|&b| b == 0) {
        if name.is_empty() {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let n = loop {
            match src.get(cname.as_c_str(), &mut value[..]) {
                Ok(n) => break Some(n),
                Err(e) if e.raw_os_error() == Some(Errno::RANGE.raw_os_error()) => {
                    let want = src.get_len(cname.as_c_str())?;
                    value.resize(want.max(value.len() * 2), 0);
                }
                Err(e) if skip(&e) => break None,
                Err(e) => return Err(e),
            }
        };
        let Some(n) = n else { continue };
        match dst.set(cname.as_c_str(), &value[..n]) {
            Err(e) if !skip(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
