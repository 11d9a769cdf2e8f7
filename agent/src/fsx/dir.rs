//! Open directory handles and everything done relative to them.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, SeekFrom, StatxFlags, Timestamps, CWD,
};
use rustix::io::Errno;

use super::{retry, CrossesMount, FsxError, Name, NameBuf, Op, Result, WrongKind};

/// What kind of entry a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    /// The file system did not say (only from listings; [`Dir::stat`] always knows).
    Unknown,
}

impl Kind {
    fn from_type(t: FileType) -> Kind {
        match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            _ => Kind::Unknown,
        }
    }

    fn file_type(self) -> Option<FileType> {
        Some(match self {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
            Kind::Symlink => FileType::Symlink,
            Kind::Fifo => FileType::Fifo,
            Kind::Socket => FileType::Socket,
            Kind::CharDevice => FileType::CharacterDevice,
            Kind::BlockDevice => FileType::BlockDevice,
            Kind::Unknown => return None,
        })
    }

    /// Whether this is a device node (character or block).
    pub fn is_device(self) -> bool {
        matches!(self, Kind::CharDevice | Kind::BlockDevice)
    }
}

/// A point in time as the file system stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    fn timespec(self) -> rustix::fs::Timespec {
        rustix::fs::Timespec {
            tv_sec: self.secs,
            tv_nsec: self.nanos.into(),
        }
    }
}

/// The status of an entry (`lstat` semantics: a symlink's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with set-id and sticky bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    /// Apparent size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    pub dev: u64,
    pub ino: u64,
    /// The device number a device node stands for.
    pub rdev: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    /// The mount the entry is on, where the kernel tells.
    pub mnt_id: Option<u64>,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    /// Real bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.blocks.saturating_mul(512)
    }

    /// Where the entry lives.
    pub fn placement(&self) -> Placement {
        Placement {
            dev: self.dev,
            mnt_id: self.mnt_id,
        }
    }

    fn from_statx(s: &rfs::Statx) -> Meta {
        let ts = |t: rfs::StatxTimestamp| Timestamp {
            secs: t.tv_sec,
            nanos: t.tv_nsec,
        };
        Meta {
            kind: Kind::from_type(FileType::from_raw_mode(s.stx_mode.into())),
            mode: u32::from(s.stx_mode) & 0o7777,
            uid: s.stx_uid,
            gid: s.stx_gid,
            nlink: s.stx_nlink.into(),
            size: s.stx_size,
            blocks: s.stx_blocks,
            dev: rfs::makedev(s.stx_dev_major, s.stx_dev_minor),
            ino: s.stx_ino,
            rdev: rfs::makedev(s.stx_rdev_major, s.stx_rdev_minor),
            atime: ts(s.stx_atime),
            mtime: ts(s.stx_mtime),
            mnt_id: (s.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(s.stx_mnt_id),
        }
    }

    fn from_stat(s: &rfs::Stat) -> Meta {
        let ts = |secs: i64, nanos: u64| Timestamp {
            secs,
            nanos: u32::try_from(nanos).unwrap_or(0),
        };
        Meta {
            kind: Kind::from_type(FileType::from_raw_mode(s.st_mode)),
            mode: s.st_mode & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            nlink: s.st_nlink,
            size: u64::try_from(s.st_size).unwrap_or(0),
            blocks: u64::try_from(s.st_blocks).unwrap_or(0),
            dev: s.st_dev,
            ino: s.st_ino,
            rdev: s.st_rdev,
            atime: ts(s.st_atime, s.st_atime_nsec),
            mtime: ts(s.st_mtime, s.st_mtime_nsec),
            mnt_id: None,
        }
    }
}

/// The status of `name` in `dir` (of `dir` itself when `name` is empty), never following
/// a symlink. `statx` where the kernel has it, `fstatat` otherwise.
fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Meta> {
    let mut flags = AtFlags::SYMLINK_NOFOLLOW;
    if name.is_empty() {
        flags |= AtFlags::EMPTY_PATH;
    }
    match retry(|| {
        rfs::statx(
            dir,
            name,
            flags,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
        )
    }) {
        Ok(s) => Ok(Meta::from_statx(&s)),
        Err(e) if e.raw_os_error() == Some(Errno::NOSYS.raw_os_error()) => {
            retry(|| rfs::statat(dir, name, flags)).map(|s| Meta::from_stat(&s))
        }
        Err(e) => Err(e),
    }
}

/// Which mount an open file lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub dev: u64,
    /// `None` where the kernel cannot tell; then only `dev` is compared.
    pub mnt_id: Option<u64>,
}

impl Placement {
    /// True when `other` is on a different mount (another file system, or a bind mount of
    /// the same one).
    pub fn differs_from(&self, other: &Placement) -> bool {
        self.dev != other.dev || matches!((self.mnt_id, other.mnt_id), (Some(a), Some(b)) if a != b)
    }
}

/// An entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: NameBuf,
    pub kind: Kind,
}

/// A reusable buffer for listing a directory batch by batch (see [`Dir::read_batch`]).
pub struct Listing {
    buf: Vec<MaybeUninit<u8>>,
    names: Vec<u8>,
    items: Vec<(usize, Kind)>,
}

impl Default for Listing {
    fn default() -> Self {
        Listing::with_capacity(64 * 1024)
    }
}

impl Listing {
    /// A listing reading `bytes` of directory entries per system call.
    pub fn with_capacity(bytes: usize) -> Listing {
        Listing {
            buf: vec![MaybeUninit::uninit(); bytes.max(1024)],
            names: Vec::new(),
            items: Vec::new(),
        }
    }

    /// The entries of the last batch (never `.` or `..`).
    pub fn iter(&self) -> impl Iterator<Item = (Name<'_>, Kind)> + '_ {
        self.items.iter().filter_map(|&(at, kind)| {
            let name = CStr::from_bytes_until_nul(self.names.get(at..)?).ok()?;
            Some((Name::trusted(name), kind))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// An open directory inside a tree.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    place: Placement,
    /// The path from the walk's root (empty for the root).
    rel: PathBuf,
    /// Opened `O_PATH` (no reading, no `fchmod`).
    path_only: bool,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // No NUL can be in a formatted number.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Sets the mode of the exact inode `fd` refers to (an `O_PATH` handle included) through
/// its `/proc/self/fd` link, which resolves to that inode and nothing else.
fn chmod_via_proc(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let link = proc_fd_path(fd);
    retry(|| {
        rfs::chmodat(
            CWD,
            link.as_c_str(),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
    })
}

impl Dir {
    fn err(&self, op: Op, name: Option<Name<'_>>) -> impl FnOnce(io::Error) -> FsxError + '_ {
        let path = match name {
            Some(n) => self.rel.join(n.as_path()),
            None => self.rel.clone(),
        };
        move |source| FsxError::new(op, path, source)
    }

    fn from_fd(fd: OwnedFd, rel: PathBuf, path_only: bool) -> io::Result<Dir> {
        let place = stat_at(fd.as_fd(), c"")?.placement();
        Ok(Dir {
            fd,
            place,
            rel,
            path_only,
        })
    }

    /// Opens the directory at `path` as the root of a tree (`O_NOFOLLOW`: a symlink as its
    /// last component is refused). The only path-taking open of a volume: its data root, or
    /// a directory of the agent's own layout.
    pub fn open_root(path: &Path) -> Result<Dir> {
        let err = |source| FsxError::new(Op::Open, path.to_owned(), source);
        let fd = retry(|| rfs::openat(CWD, path, DIR_FLAGS, Mode::empty())).map_err(err)?;
        Dir::from_fd(fd, PathBuf::new(), false).map_err(err)
    }

    /// Opens the directory at `path`, following symlinks all the way (as baggageclaim's
    /// `os.Stat` of an import path does). Only for a path the operator gave, never for
    /// anything inside a volume.
    pub fn open_host(path: &Path) -> Result<Dir> {
        let err = |source| FsxError::new(Op::Open, path.to_owned(), source);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = retry(|| rfs::openat(CWD, path, flags, Mode::empty())).map_err(err)?;
        Dir::from_fd(fd, PathBuf::new(), false).map_err(err)
    }

    /// The path of this directory relative to the root it was reached from.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// The path of `name` in this directory relative to the root.
    pub fn rel_of(&self, name: Name<'_>) -> PathBuf {
        self.rel.join(name.as_path())
    }

    /// The mount this directory is on.
    pub fn placement(&self) -> Placement {
        self.place
    }

    fn check_mount(&self, child: &Placement, name: Name<'_>) -> Result<()> {
        if child.differs_from(&self.place) {
            return Err(FsxError::new(
                Op::Open,
                self.rel_of(name),
                io::Error::other(CrossesMount),
            ));
        }
        Ok(())
    }

    fn open_child(&self, name: Name<'_>, flags: OFlags) -> Result<Dir> {
        let err = self.err(Op::Open, Some(name));
        let fd =
            retry(|| rfs::openat(&self.fd, name.as_c_str(), flags, Mode::empty())).map_err(err)?;
        let child = Dir::from_fd(fd, self.rel_of(name), flags.contains(OFlags::PATH))
            .map_err(self.err(Op::Stat, Some(name)))?;
        self.check_mount(&child.place, name)?;
        Ok(child)
    }

    /// Opens the subdirectory `name`: refused (`ELOOP`/`ENOTDIR`, see
    /// [`FsxError::is_wrong_kind`]) when it is a symlink or not a directory, and
    /// ([`FsxError::is_mount_point`]) when it is on another mount.
    pub fn open_dir(&self, name: Name<'_>) -> Result<Dir> {
        self.open_child(name, DIR_FLAGS)
    }

    /// Like [`Dir::open_dir`] as an `O_PATH` handle: needs no read permission on it; only
    /// good for [`Dir::chmod_self`] and as a parent of `*at` calls.
    pub fn open_dir_path(&self, name: Name<'_>) -> Result<Dir> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        self.open_child(name, flags)
    }

    /// The status of `name` (a symlink's own).
    pub fn stat(&self, name: Name<'_>) -> Result<Meta> {
        stat_at(self.fd.as_fd(), name.as_c_str()).map_err(self.err(Op::Stat, Some(name)))
    }

    /// The status of this directory.
    pub fn meta(&self) -> Result<Meta> {
        stat_at(self.fd.as_fd(), c"").map_err(self.err(Op::Stat, None))
    }

    /// Seeks back to the first entry.
    pub fn rewind(&self) -> Result<()> {
        retry(|| rfs::seek(&self.fd, SeekFrom::Start(0)))
            .map(drop)
            .map_err(self.err(Op::List, None))
    }

    /// Reads the next batch of entries into `listing` (one `getdents` buffer). Returns
    /// `false` at the end (with an empty listing).
    pub fn read_batch(&self, listing: &mut Listing) -> Result<bool> {
        listing.names.clear();
        listing.items.clear();
        let mut raw = RawDir::new(&self.fd, &mut listing.buf);
        loop {
            match raw.next() {
                None => return Ok(false),
                Some(Err(Errno::INTR)) => continue,
                Some(Err(e)) => return Err(self.err(Op::List, None)(e.into())),
                Some(Ok(e)) => {
                    let name = e.file_name();
                    if !matches!(name.to_bytes(), b"." | b"..") {
                        listing
                            .items
                            .push((listing.names.len(), Kind::from_type(e.file_type())));
                        listing.names.extend_from_slice(name.to_bytes_with_nul());
                    }
                }
            }
            if raw.is_buffer_empty() {
                return Ok(true);
            }
        }
    }

    /// Every entry, from the first (rewinds first).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        self.rewind()?;
        let mut listing = Listing::with_capacity(32 * 1024);
        let mut out = Vec::new();
        loop {
            let more = self.read_batch(&mut listing)?;
            out.extend(listing.iter().map(|(name, kind)| Entry {
                name: name.to_owned(),
                kind,
            }));
            if !more {
                return Ok(out);
            }
        }
    }

    /// Makes the directory `name` (mode subject to the umask; set it after).
    pub fn mkdir(&self, name: Name<'_>, mode: u32) -> Result<()> {
        retry(|| rfs::mkdirat(&self.fd, name.as_c_str(), Mode::from_raw_mode(mode)))
            .map_err(self.err(Op::Mkdir, Some(name)))
    }

    /// Creates the new regular file `name` for writing (`O_EXCL`: an existing entry, a
    /// symlink included, is refused with `EEXIST`).
    pub fn create_file(&self, name: Name<'_>, mode: u32) -> Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        retry(|| rfs::openat(&self.fd, name.as_c_str(), flags, Mode::from_raw_mode(mode)))
            .map(File::from)
            .map_err(self.err(Op::Create, Some(name)))
    }

    /// Opens the regular file `name` for reading. Refused when it is a symlink, not a
    /// regular file (a fifo is never waited on, a device never read) or on another
    /// file system. Returns its status too.
    pub fn open_file(&self, name: Name<'_>) -> Result<(File, Meta)> {
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = retry(|| rfs::openat(&self.fd, name.as_c_str(), flags, Mode::empty()))
            .map_err(self.err(Op::Open, Some(name)))?;
        let meta = stat_at(fd.as_fd(), c"").map_err(self.err(Op::Stat, Some(name)))?;
        if meta.kind != Kind::File {
            return Err(self.err(Op::Open, Some(name))(io::Error::other(WrongKind(
                "not a regular file (it changed while being read?)",
            ))));
        }
        if meta.dev != self.place.dev {
            return Err(self.err(Op::Open, Some(name))(io::Error::other(
                CrossesMount,
            )));
        }
        Ok((File::from(fd), meta))
    }

    /// Opens `name` whatever it is, as an `O_PATH` handle that pins the inode: its owner
    /// and mode can then be changed without the name being looked up again.
    pub fn open_node(&self, name: Name<'_>) -> Result<Node> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = retry(|| rfs::openat(&self.fd, name.as_c_str(), flags, Mode::empty()))
            .map_err(self.err(Op::Open, Some(name)))?;
        let meta = stat_at(fd.as_fd(), c"").map_err(self.err(Op::Stat, Some(name)))?;
        if meta.dev != self.place.dev {
            return Err(self.err(Op::Open, Some(name))(io::Error::other(
                CrossesMount,
            )));
        }
        Ok(Node {
            fd,
            meta,
            rel: self.rel_of(name),
        })
    }

    /// Makes the symlink `name` pointing at `target` (never resolved here).
    pub fn symlink(&self, name: Name<'_>, target: &std::ffi::OsStr) -> Result<()> {
        retry(|| rfs::symlinkat(target, &self.fd, name.as_c_str()))
            .map_err(self.err(Op::Symlink, Some(name)))
    }

    /// The target of the symlink `name`.
    pub fn readlink(&self, name: Name<'_>) -> Result<OsString> {
        retry(|| rfs::readlinkat(&self.fd, name.as_c_str(), Vec::new()))
            .map(|c| OsString::from_vec(c.into_bytes()))
            .map_err(self.err(Op::Readlink, Some(name)))
    }

    /// Makes `new` in `new_dir` a hard link to `old` in this directory (a symlink `old`
    /// is linked itself, never followed).
    pub fn hard_link(&self, old: Name<'_>, new_dir: &Dir, new: Name<'_>) -> Result<()> {
        retry(|| {
            rfs::linkat(
                &self.fd,
                old.as_c_str(),
                &new_dir.fd,
                new.as_c_str(),
                AtFlags::empty(),
            )
        })
        .map_err(|source| FsxError::new(Op::Link, new_dir.rel_of(new), source))
    }

    /// Makes the special file `name` (fifo, socket, device).
    pub fn mknod(&self, name: Name<'_>, kind: Kind, mode: u32, rdev: u64) -> Result<()> {
        let Some(ft) = kind
            .file_type()
            .filter(|_| !matches!(kind, Kind::Dir | Kind::File))
        else {
            return Err(self.err(Op::Mknod, Some(name))(io::Error::other(
                WrongKind("only fifos, sockets and devices are made with mknod"),
            )));
        };
        retry(|| {
            rfs::mknodat(
                &self.fd,
                name.as_c_str(),
                ft,
                Mode::from_raw_mode(mode & 0o7777),
                rdev,
            )
        })
        .map_err(self.err(Op::Mknod, Some(name)))
    }

    /// Removes the non-directory `name`.
    pub fn unlink(&self, name: Name<'_>) -> Result<()> {
        retry(|| rfs::unlinkat(&self.fd, name.as_c_str(), AtFlags::empty()))
            .map_err(self.err(Op::Unlink, Some(name)))
    }

    /// Removes the empty directory `name`.
    pub fn rmdir(&self, name: Name<'_>) -> Result<()> {
        retry(|| rfs::unlinkat(&self.fd, name.as_c_str(), AtFlags::REMOVEDIR))
            .map_err(self.err(Op::Rmdir, Some(name)))
    }

    /// Renames `old` in this directory to `new` in `new_dir` (replacing what is there, as
    /// `rename(2)` does).
    pub fn rename(&self, old: Name<'_>, new_dir: &Dir, new: Name<'_>) -> Result<()> {
        retry(|| rfs::renameat(&self.fd, old.as_c_str(), &new_dir.fd, new.as_c_str()))
            .map_err(self.err(Op::Rename, Some(old)))
    }

    /// Sets the owner of `name` (a symlink's own; never followed).
    pub fn chown(&self, name: Name<'_>, uid: u32, gid: u32) -> Result<()> {
        retry(|| {
            rfs::chownat(
                &self.fd,
                name.as_c_str(),
                Some(rfs::Uid::from_raw(uid)),
                Some(rfs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
        })
        .map_err(self.err(Op::Chown, Some(name)))
    }

    /// Copies the extended attributes of `name` here to `dst_name` in `dst`, never
    /// following either (a symlink's own attributes: `trusted.*`, `security.*`), through
    /// each directory's `/proc/self/fd` link and one name component in it. Skips what the
    /// target refuses, as [`super::copy_xattrs`].
    pub fn copy_xattrs_of(&self, name: Name<'_>, dst: &Dir, dst_name: Name<'_>) -> Result<()> {
        let at = |dir: &Dir, n: Name<'_>| {
            let mut p = proc_fd_path(dir.fd.as_fd()).into_bytes();
            p.push(b'/');
            p.extend_from_slice(n.as_c_str().to_bytes());
            // `Name` holds no NUL.
            CString::new(p).unwrap_or_default()
        };
        let (src_path, dst_path) = (at(self, name), at(dst, dst_name));
        super::data::copy_xattrs_between(
            super::data::XattrSide::NoFollow(&src_path),
            super::data::XattrSide::NoFollow(&dst_path),
        )
        .map_err(self.err(Op::Xattr, Some(name)))
    }

    /// Sets the owner of this directory.
    pub fn chown_self(&self, uid: u32, gid: u32) -> Result<()> {
        chown_fd(self.fd.as_fd(), uid, gid).map_err(self.err(Op::Chown, None))
    }

    /// Sets the mode (`& 0o7777`) of this directory.
    pub fn chmod_self(&self, mode: u32) -> Result<()> {
        let res = if self.path_only {
            chmod_via_proc(self.fd.as_fd(), mode)
        } else {
            retry(|| rfs::fchmod(&self.fd, Mode::from_raw_mode(mode & 0o7777)))
        };
        res.map_err(self.err(Op::Chmod, None))
    }

    /// Sets the access and modification times of `name` (a symlink's own).
    pub fn set_times(&self, name: Name<'_>, atime: Timestamp, mtime: Timestamp) -> Result<()> {
        let times = Timestamps {
            last_access: atime.timespec(),
            last_modification: mtime.timespec(),
        };
        retry(|| rfs::utimensat(&self.fd, name.as_c_str(), &times, AtFlags::SYMLINK_NOFOLLOW))
            .map_err(self.err(Op::SetTimes, Some(name)))
    }

    /// Sets the access and modification times of this directory.
    pub fn set_times_self(&self, atime: Timestamp, mtime: Timestamp) -> Result<()> {
        set_times_fd(self.fd.as_fd(), atime, mtime).map_err(self.err(Op::SetTimes, None))
    }

    /// Flushes this directory's entries to stable storage.
    pub fn fsync(&self) -> Result<()> {
        retry(|| rfs::fsync(&self.fd)).map_err(self.err(Op::Sync, None))
    }

    /// How the file system holding this directory makes metadata durable (see [`Journal`]).
    pub fn journal(&self) -> Journal {
        match rfs::fstatfs(&self.fd) {
            Ok(st) if is_xfs(st.f_type) => Journal::Ordered,
            _ => Journal::PerFile,
        }
    }

    /// On a file system whose journal is [`Journal::Ordered`], makes every change committed
    /// on it before the call durable with one log force: creates an unnamed file here
    /// (`O_TMPFILE`, itself a logged change, committed after all of them), `fsync`s it
    /// (which forces the log up to that change, and so through every earlier one) and
    /// closes it (the file system frees it; after a crash, log recovery does). Data still
    /// in the page cache is not covered: files whose data was written must be synced
    /// themselves.
    pub fn force_log(&self) -> Result<()> {
        let fd = retry(|| {
            rfs::openat(
                &self.fd,
                c".",
                OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })
        .map_err(self.err(Op::Sync, None))?;
        retry(|| rfs::fsync(&fd)).map_err(self.err(Op::Sync, None))
    }

    /// Resolves the symlink `name` in this directory, which is `rel` below `root` (the
    /// directory the walk started from), with the kernel keeping every step beneath `root`
    /// (`openat2` `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`): a link
    /// leading out of `root` (by `..`, an absolute target, or a directory swapped for a
    /// link meanwhile) or onto another mount fails with `EXDEV`, never opens anything
    /// outside. What it leads to is opened as what it is.
    pub fn open_beneath(root: &Dir, rel: &Path) -> Result<Beneath> {
        let err = |op| move |source| FsxError::new(op, rel.to_owned(), source);
        let how = rfs::ResolveFlags::BENEATH
            | rfs::ResolveFlags::NO_MAGICLINKS
            | rfs::ResolveFlags::NO_XDEV;
        let pin = retry(|| {
            rfs::openat2(
                &root.fd,
                rel,
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                how,
            )
        })
        .map_err(err(Op::Follow))?;
        let meta = stat_at(pin.as_fd(), c"").map_err(err(Op::Stat))?;
        match meta.kind {
            Kind::Dir => {
                let fd = retry(|| rfs::openat(&pin, c".", DIR_FLAGS, Mode::empty()))
                    .map_err(err(Op::Open))?;
                Ok(Beneath::Dir(Dir {
                    fd,
                    place: meta.placement(),
                    rel: rel.to_owned(),
                    path_only: false,
                }))
            }
            Kind::File => {
                let link = proc_fd_path(pin.as_fd());
                let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
                let fd = retry(|| rfs::openat(CWD, link.as_c_str(), flags, Mode::empty()))
                    .map_err(err(Op::Open))?;
                Ok(Beneath::File(File::from(fd), meta))
            }
            _ => Ok(Beneath::Other(meta)),
        }
    }

    /// Flushes the whole file system holding this directory (for the rare operations that
    /// change too many inodes to sync one by one: an owner shift, an archive import).
    pub fn syncfs(&self) -> Result<()> {
        retry(|| rfs::syncfs(&self.fd)).map_err(self.err(Op::Sync, None))
    }

    /// Gives up the handle (to sync it elsewhere, say).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A second handle on this directory (for syncing it later, elsewhere).
    pub fn try_clone_fd(&self) -> Result<OwnedFd> {
        self.fd.try_clone().map_err(self.err(Op::Open, None))
    }

    /// A second [`Dir`] on this directory (`dup`: the same open directory, so listings
    /// through either share one position; [`Dir::entries`] rewinds first), for a walk that
    /// starts here while the caller keeps its own handle.
    pub fn try_clone(&self) -> Result<Dir> {
        let fd = self.try_clone_fd()?;
        Ok(Dir {
            fd,
            place: self.place,
            rel: self.rel.clone(),
            path_only: self.path_only,
        })
    }
}

/// Whether `statfs`'s `f_type` is xfs's (the field's type differs by architecture).
#[allow(clippy::useless_conversion)]
fn is_xfs(f_type: rustix::fs::FsWord) -> bool {
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    i64::from(f_type) == XFS_SUPER_MAGIC
}

/// What it takes to make a tree of changes durable on a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// Every metadata change (an entry, an inode's owner, mode, times, attributes, a
    /// reflink's shared extents) is logged in the order it was committed, and forcing the
    /// log up to one change makes every earlier one durable: xfs. A tree made of metadata
    /// only (directories, links, reflinked files) then needs one log force
    /// ([`Dir::force_log`]) after the last change, not an `fsync` per entry, each of which
    /// costs a cache flush of the device once the log is already forced.
    Ordered,
    /// Anything else (ext4's journal orders metadata too, but its files carry delayed data
    /// and there are no reflinks to save; btrfs logs per inode): each file and directory is
    /// synced itself.
    PerFile,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a symlink followed with [`Dir::open_beneath`] leads to.
#[derive(Debug)]
pub enum Beneath {
    Dir(Dir),
    File(File, Meta),
    /// A fifo, socket or device node (never opened).
    Other(Meta),
}

/// The status of an open file or directory.
pub fn meta_fd(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    stat_at(fd, c"")
}

/// `fchown` of an open file.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    retry(|| {
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(uid)),
            Some(rfs::Gid::from_raw(gid)),
        )
    })
}

/// `fchmod` of an open file or directory (`mode & 0o7777`, set-id and sticky bits
/// included; not for an `O_PATH` handle, see [`Node::chmod`]). After [`chown_fd`], which
/// clears the set-id bits.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    retry(|| rfs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777)))
}

/// Flushes an open file or directory to stable storage.
pub fn fsync_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry(|| rfs::fsync(fd))
}

/// `futimens` of an open file.
pub fn set_times_fd(fd: BorrowedFd<'_>, atime: Timestamp, mtime: Timestamp) -> io::Result<()> {
    let times = Timestamps {
        last_access: atime.timespec(),
        last_modification: mtime.timespec(),
    };
    retry(|| rfs::futimens(fd, &times))
}

/// Any entry, pinned by an `O_PATH` handle (see [`Dir::open_node`]).
#[derive(Debug)]
pub struct Node {
    fd: OwnedFd,
    meta: Meta,
    rel: PathBuf,
}

impl Node {
    /// The status taken when it was opened.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Sets the owner of exactly this inode (a symlink's own).
    pub fn chown(&self, uid: u32, gid: u32) -> Result<()> {
        retry(|| {
            rfs::chownat(
                &self.fd,
                c"",
                Some(rfs::Uid::from_raw(uid)),
                Some(rfs::Gid::from_raw(gid)),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|source| FsxError::new(Op::Chown, self.rel.clone(), source))
    }

    /// Sets the mode (`& 0o7777`) of exactly this inode; refused for a symlink (whose mode
    /// means nothing and cannot be set).
    pub fn chmod(&self, mode: u32) -> Result<()> {
        let err = |source| FsxError::new(Op::Chmod, self.rel.clone(), source);
        if self.meta.kind == Kind::Symlink {
            return Err(err(io::Error::other(WrongKind(
                "a symlink has no mode to set",
            ))));
        }
        chmod_via_proc(self.fd.as_fd(), mode & 0o7777).map_err(err)
    }
}
