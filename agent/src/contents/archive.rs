//! Tar streams into and out of a volume, never touching anything outside it.
//!
//! Blocking functions. Every path is walked one component at a time from an open
//! directory with `O_NOFOLLOW`, so a symlink (made by the stream itself or already in the
//! volume) is never followed while writing or reading. Entries named absolutely or with
//! `..`, hard links to such names, and relative symlinks that climb out of the volume are
//! refused. Absolute symlink targets are stored as they are: they name paths inside the
//! container that mounts the volume, and are never followed here.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use crate::contents::IdMap;

/// How a tar stream is compressed (`Content-Encoding` / `Accept-Encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Zstd,
    /// A plain, uncompressed tar (baggageclaim's `raw`).
    Raw,
}

impl Encoding {
    /// Parses a header value; `None` when it is none of `gzip`, `zstd` and `raw`.
    pub fn parse(value: &str) -> Option<Encoding> {
        value.split(',').find_map(|v| {
            match v
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
                .as_str()
            {
                "gzip" | "x-gzip" => Some(Encoding::Gzip),
                "zstd" => Some(Encoding::Zstd),
                "raw" => Some(Encoding::Raw),
                _ => None,
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
            Encoding::Raw => "raw",
        }
    }
}

/// Why a stream in or out failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The stream tried to leave the volume; nothing of that entry was written.
    #[error("tar entry {name:?} {why}; entries must stay inside the volume")]
    Unsafe { name: String, why: &'static str },
    /// The caller's tar has an entry that cannot be written as it is.
    #[error("tar entry {name:?} {why}")]
    Invalid { name: String, why: String },
    /// The entry is a device node and the volume is unprivileged.
    #[error("tar entry {name:?} is a device node; device nodes can only be streamed into a privileged volume (an unprivileged volume's tar runs in a user namespace, where they cannot be made)")]
    Device { name: String },
    /// A configured limit was reached; what the stream wrote was removed.
    #[error("the tar stream has more than {limit} = {value} {unit}; nothing of it was kept: send less, or raise {limit}")]
    TooLarge {
        limit: &'static str,
        value: u64,
        unit: &'static str,
    },
    /// The stream was stopped from outside (see [`Stopped`]); what it wrote was removed.
    #[error("{0}")]
    Stopped(Stopped),
    /// The `path` parameter is not a path inside the volume.
    #[error("path {0:?} is not inside the volume: use a relative path without `..`")]
    BadPath(String),
    /// The exact message baggageclaim's client maps to file-not-found.
    #[error("no such file or directory")]
    NotFound,
    /// The request body is not a readable compressed tar.
    #[error("reading the tar stream: {0}; send a tar, gzip or zstd compressed or raw as Content-Encoding says")]
    Malformed(io::Error),
    /// The volume's disk failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a stream was stopped from outside: carried inside the `io::Error` its reader or
/// writer returns, so the tar code can tell it from a broken stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Stopped {
    /// The request body sent nothing for this long.
    #[error("the request body sent nothing for {0:?} (api.body_idle_timeout); the stream was cut and nothing of it was kept: send the body without pauses, or raise the timeout")]
    Idle(std::time::Duration),
    /// The client of a stream-out read nothing for this long.
    #[error("the client read nothing of the stream for {0:?} (api.body_idle_timeout); the stream was cut")]
    Unread(std::time::Duration),
    /// A destroy or a privilege change of the volume cut the stream.
    #[error("volume {0} is being destroyed or its privilege changed, which cuts its running streams; nothing of this stream was kept: stream again once the change is done")]
    Cut(String),
}

impl Stopped {
    /// The `io::Error` a reader or writer returns for this stop.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The stop `e` carries, anywhere in its chain of causes.
    pub fn find(e: &io::Error) -> Option<Stopped> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = e
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        while let Some(err) = cur {
            if let Some(s) = err.downcast_ref::<Stopped>() {
                return Some(s.clone());
            }
            if let Some(s) = err.downcast_ref::<io::Error>().and_then(Stopped::find) {
                return Some(s);
            }
            cur = err.source();
        }
        None
    }
}

/// A read of the stream failed: stopped from outside, or a broken stream.
fn read_failed(e: io::Error) -> ArchiveError {
    match Stopped::find(&e) {
        Some(s) => ArchiveError::Stopped(s),
        None => ArchiveError::Malformed(e),
    }
}

/// A write (or a read of the volume while packing) failed: stopped from outside, or the
/// disk's or the client's fault.
fn write_failed(path: &Path, source: io::Error) -> ArchiveError {
    match Stopped::find(&source) {
        Some(s) => ArchiveError::Stopped(s),
        None => ArchiveError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

fn unsafe_entry(name: &[u8], why: &'static str) -> ArchiveError {
    ArchiveError::Unsafe {
        name: String::from_utf8_lossy(name).into_owned(),
        why,
    }
}

fn invalid_entry(name: &[u8], why: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid {
        name: String::from_utf8_lossy(name).into_owned(),
        why: why.into(),
    }
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a name"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned fd is owned by us alone.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            libc::c_uint::from(mode),
        )
    })?;
    // SAFETY: `fd` was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Opens the directory `path` (the volume's data dir, ours to trust).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is NUL-terminated; the fd is owned by us alone.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed `stat` is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, valid out pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Longest name of one path component on Linux file systems.
const NAME_MAX: usize = 255;
const TOO_LONG: &str =
    "has a name component longer than 255 bytes, which no Linux file system stores; shorten it";

/// Splits a tar or query path into its components: `.` and empty ones dropped; `..` and
/// (unless `allow_absolute`) a leading `/` refused.
pub fn components(raw: &[u8], allow_absolute: bool) -> Result<Vec<&[u8]>, &'static str> {
    if !allow_absolute && raw.first() == Some(&b'/') {
        return Err("is absolute");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("contains `..`"),
            c if c.contains(&0) => return Err("contains a NUL byte"),
            c if c.len() > NAME_MAX => return Err(TOO_LONG),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Walks `comps` from `root` without following symlinks; creates missing directories when
/// `create` is set, calling `made(i)` when component `i` was made. A component that is a
/// symlink or not a directory is refused.
fn walk(
    root: RawFd,
    comps: &[&[u8]],
    create: bool,
    ids: IdMap,
    mut made: impl FnMut(usize),
) -> io::Result<OwnedFd> {
    // SAFETY: dup of a valid fd gives an fd we own.
    let mut cur =
        unsafe { OwnedFd::from_raw_fd(cvt(libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0))?) };
    for (i, c) in comps.iter().enumerate() {
        let name = cstr(c)?;
        let next = match open_dir_at(cur.as_raw_fd(), &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                // SAFETY: valid fd and NUL-terminated name.
                let fresh =
                    match cvt(unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) }) {
                        Ok(_) => true,
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                        Err(e) => return Err(e),
                    };
                let fd = open_dir_at(cur.as_raw_fd(), &name)?;
                if fresh {
                    made(i);
                    // A folder made here belongs to the volume's root, as the volume's own
                    // root does (mapped in an unprivileged volume).
                    if let Some((uid, gid)) = ids.mapped_root() {
                        // SAFETY: valid fd.
                        cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
                    }
                }
                fd
            }
            other => other?,
        };
        cur = next;
    }
    Ok(cur)
}

fn is_escape(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
}

fn chown_at(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// Sets the exact mode of the special file (device node or fifo) `name` in `dir`, never
/// following a symlink: `mknodat` applies the process umask (0022 under systemd), so a
/// `crw-rw-rw-` /dev/null in an image would land as `crw-r--r--`. `fchmodat` cannot refuse
/// symlinks on every libc, and `fchmod` refuses `O_PATH` descriptors, so the node is pinned
/// with an `O_PATH | O_NOFOLLOW` descriptor, checked, and changed through /proc/self/fd.
fn chmod_special_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    let fd = open_at(dir, name, libc::O_PATH, 0)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd; `st` is written by fstat before it is read.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialized.
    let kind = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    if !matches!(kind, libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO) {
        // Replaced (by a symlink, say) since it was made: leave it alone.
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    let path = cstr(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::chmod(path.as_ptr(), (mode & 0o7777) as libc::mode_t) }).map(drop)
}

fn fchown_mode(fd: RawFd, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchown(fd, uid, gid) })?;
    // chown clears set-id bits; put the exact mode back.
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd, (mode & 0o7777) as libc::mode_t) }).map(drop)
}

fn set_mtime(fd: RawFd, mtime: u64) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid fd, a two-element array.
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    pub entries: u64,
    /// Bytes of file data, holes included (the files' apparent sizes).
    pub bytes: u64,
}

/// How one extraction treats the caller's tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Owners as the volume stores them.
    pub ids: IdMap,
    /// Device nodes are made (privileged volumes); otherwise they are refused.
    pub devices: bool,
    /// `api.stream_in_max_bytes`: most bytes of file data (apparent sizes, holes included).
    pub max_bytes: Option<u64>,
    /// `api.stream_in_max_entries`: most tar entries.
    pub max_entries: Option<u64>,
}

impl ExtractOptions {
    /// No limits; devices only in a privileged volume, owners mapped as its privilege says.
    pub fn for_volume(privileged: bool) -> Self {
        ExtractOptions {
            ids: IdMap::for_volume(privileged),
            devices: privileged,
            max_bytes: None,
            max_entries: None,
        }
    }
}

/// Size of the buffer file data is copied through.
const COPY_BUF: usize = 256 * 1024;
/// Runs of zeros this long (and aligned) are left as holes instead of written.
const HOLE_BLOCK: usize = 4096;
/// Most symlinks followed while checking one relative symlink (the kernel's own limit).
const MAX_LINK_HOPS: usize = 40;

/// Extracts the uncompressed tar `input` into the directory `dest` (components under the
/// volume's data directory `root`, made when missing), as `opts` says.
///
/// On any failure, everything the extraction made is removed again (entries it replaced
/// are gone: a stream that overwrites files and then fails leaves those files removed).
pub fn extract(
    root: &OwnedFd,
    dest: &[&[u8]],
    input: impl Read,
    opts: &ExtractOptions,
) -> Result<Extracted, ArchiveError> {
    let mut x = Extractor {
        root: root.as_raw_fd(),
        dest: dest.iter().map(|c| c.to_vec()).collect(),
        opts: *opts,
        made_dirs: HashSet::new(),
        undo: Vec::new(),
        done: Extracted::default(),
        buf: Vec::new(),
    };
    let res = x.run(input);
    if res.is_err() {
        x.undo();
    }
    res
}

/// Decompresses `input` and extracts it (see [`extract`]).
pub fn extract_compressed(
    root: &OwnedFd,
    dest: &[&[u8]],
    input: impl Read,
    encoding: Encoding,
    opts: &ExtractOptions,
) -> Result<Extracted, ArchiveError> {
    match encoding {
        Encoding::Gzip => extract(root, dest, flate2::read::MultiGzDecoder::new(input), opts),
        Encoding::Zstd => {
            let d = zstd::stream::read::Decoder::new(input).map_err(read_failed)?;
            extract(root, dest, d, opts)
        }
        Encoding::Raw => extract(root, dest, input, opts),
    }
}

struct Extractor {
    root: RawFd,
    dest: Vec<Vec<u8>>,
    opts: ExtractOptions,
    /// Directories this extraction made (paths from the root, `/`-joined).
    made_dirs: HashSet<Vec<u8>>,
    /// The topmost entries this extraction made, in order: removed again on failure.
    undo: Vec<Vec<u8>>,
    done: Extracted,
    buf: Vec<u8>,
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

impl Extractor {
    /// Notes that the entry at `path` (components from the root) was made by this stream.
    fn made(&mut self, path: &[&[u8]], dir: bool) {
        let Some((_, parent)) = path.split_last() else {
            return;
        };
        let full = join(path);
        if !self.made_dirs.contains(&join(parent)) {
            self.undo.push(full.clone());
        }
        if dir {
            self.made_dirs.insert(full);
        }
    }

    fn run(&mut self, input: impl Read) -> Result<Extracted, ArchiveError> {
        let dest_owned = self.dest.clone();
        let dest: Vec<&[u8]> = dest_owned.iter().map(Vec::as_slice).collect();
        let mut fresh = Vec::new();
        let dest_fd =
            walk(self.root, &dest, true, self.opts.ids, |i| fresh.push(i)).map_err(|source| {
                if is_escape(&source) {
                    ArchiveError::BadPath(String::from_utf8_lossy(&join(&dest)).into_owned())
                } else {
                    ArchiveError::Io {
                        path: PathBuf::from(std::ffi::OsStr::from_bytes(&join(&dest))),
                        source,
                    }
                }
            })?;
        for i in fresh {
            self.made(&dest[..=i], true);
        }
        let mut archive = tar::Archive::new(input);
        // The parent directory of the previous entry, reused while entries share it.
        let mut cached: Option<(Vec<u8>, OwnedFd)> = None;
        for entry in archive.entries().map_err(read_failed)? {
            let mut entry = entry.map_err(read_failed)?;
            self.done.entries += 1;
            if let Some(max) = self.opts.max_entries {
                if self.done.entries > max {
                    return Err(ArchiveError::TooLarge {
                        limit: "api.stream_in_max_entries",
                        value: max,
                        unit: "entries",
                    });
                }
            }
            let raw = entry.path_bytes().into_owned();
            let comps = components(&raw, false).map_err(|why| {
                if why == TOO_LONG {
                    invalid_entry(&raw, why)
                } else {
                    unsafe_entry(&raw, why)
                }
            })?;
            let Some((last, parents)) = comps.split_last() else {
                // The destination itself (`./`): take its mode and owner.
                if entry.header().entry_type() == EntryType::Directory {
                    let (uid, gid, mode) = self.owner_mode(&entry, &raw)?;
                    fchown_mode(dest_fd.as_raw_fd(), uid, gid, mode)
                        .map_err(|e| self.io_err(&raw, e))?;
                }
                continue;
            };
            let parent_key = join(parents);
            let parent = match cached.take() {
                Some((k, fd)) if k == parent_key => fd,
                _ => {
                    let mut fresh = Vec::new();
                    let fd = walk(dest_fd.as_raw_fd(), parents, true, self.opts.ids, |i| {
                        fresh.push(i)
                    })
                    .map_err(|e| self.io_err(&raw, e))?;
                    for i in fresh {
                        let path: Vec<&[u8]> = dest.iter().chain(&parents[..=i]).copied().collect();
                        self.made(&path, true);
                    }
                    fd
                }
            };
            let full: Vec<&[u8]> = dest.iter().chain(comps.iter()).copied().collect();
            self.entry(&mut entry, &raw, &dest_fd, &parent, last, &full)?;
            cached = Some((parent_key, parent));
        }
        Ok(self.done)
    }

    fn owner_mode<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
    ) -> Result<(u32, u32, u32), ArchiveError> {
        let header = entry.header();
        let bad =
            |what: &str, e: io::Error| invalid_entry(raw, format!("has an unreadable {what}: {e}"));
        let mode = header.mode().map_err(|e| bad("mode", e))?;
        let uid = header.uid().map_err(|e| bad("uid", e))?;
        let gid = header.gid().map_err(|e| bad("gid", e))?;
        let (uid, gid) = self.opts.ids.to_disk(
            u32::try_from(uid).unwrap_or(u32::MAX),
            u32::try_from(gid).unwrap_or(u32::MAX),
        );
        Ok((uid, gid, mode))
    }

    /// Maps a failed system call on entry `raw`: the caller's mistakes are 400s naming it.
    fn io_err(&self, raw: &[u8], source: io::Error) -> ArchiveError {
        entry_io(raw, source)
    }
}

/// A failed system call on entry `raw`: the caller's mistakes are 400s naming it.
fn entry_io(raw: &[u8], source: io::Error) -> ArchiveError {
    match source.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
            unsafe_entry(raw, "goes through a symlink or a non-directory")
        }
        Some(libc::ENAMETOOLONG) => {
            invalid_entry(raw, "has a name too long for the file system; shorten it")
        }
        None if source.kind() == io::ErrorKind::InvalidInput => {
            invalid_entry(raw, source.to_string())
        }
        _ => ArchiveError::Io {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(raw)),
            source,
        },
    }
}

impl Extractor {
    /// Writes one entry named `last` into `parent`; `full` is its path from the root.
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        dest: &OwnedFd,
        parent: &OwnedFd,
        last: &[u8],
        full: &[&[u8]],
    ) -> Result<(), ArchiveError> {
        let kind = entry.header().entry_type();
        let (uid, gid, mode) = self.owner_mode(entry, raw)?;
        let pfd = parent.as_raw_fd();
        let name = cstr(last).map_err(|e| self.io_err(raw, e))?;
        let err = |e: io::Error| entry_io(raw, e);
        match kind {
            EntryType::Directory => {
                // SAFETY: valid fd and NUL-terminated name.
                let fresh = match cvt(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) }) {
                    Ok(_) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let st = lstat_at(pfd, &name).map_err(err)?;
                        if is_dir(&st) {
                            false
                        } else {
                            self.clear(pfd, &name, raw)?;
                            // SAFETY: as above.
                            cvt(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) })
                                .map_err(err)?;
                            true
                        }
                    }
                    Err(e) => return Err(err(e)),
                };
                if fresh {
                    self.made(full, true);
                }
                let d = open_dir_at(pfd, &name).map_err(err)?;
                fchown_mode(d.as_raw_fd(), uid, gid, mode).map_err(err)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear(pfd, &name, raw)?;
                let fd = open_at(
                    pfd,
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(err)?;
                self.made(full, false);
                let file = File::from(fd);
                self.copy_data(entry, &file, raw)?;
                fchown_mode(file.as_raw_fd(), uid, gid, mode).map_err(|e| self.io_err(raw, e))?;
                if let Ok(m) = entry.header().mtime() {
                    set_mtime(file.as_raw_fd(), m).map_err(|e| self.io_err(raw, e))?;
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| invalid_entry(raw, "is a symlink without a target"))?;
                if target.first() != Some(&b'/') {
                    let (_, link_dir) = full.split_last().unwrap_or((&last, &[]));
                    self.check_symlink(link_dir, &target)
                        .map_err(|why| unsafe_entry(raw, why))?;
                }
                let t = cstr(&target).map_err(err)?;
                self.clear(pfd, &name, raw)?;
                // SAFETY: NUL-terminated strings and a valid fd.
                cvt(unsafe { libc::symlinkat(t.as_ptr(), pfd, name.as_ptr()) }).map_err(err)?;
                self.made(full, false);
                chown_at(pfd, &name, uid, gid).map_err(err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| invalid_entry(raw, "is a hard link without a target"))?;
                let shown = String::from_utf8_lossy(&target).into_owned();
                let tcomps = components(&target, false)
                    .map_err(|_| unsafe_entry(raw, "is a hard link pointing outside the volume"))?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(invalid_entry(
                        raw,
                        "is a hard link to the destination directory; hard links to directories are not possible",
                    ));
                };
                let missing = || {
                    invalid_entry(
                        raw,
                        format!("is a hard link to {shown:?}, which is neither earlier in the tar nor in the volume; list the target before its links"),
                    )
                };
                let tdir = match walk(dest.as_raw_fd(), tparents, false, self.opts.ids, |_| {}) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
                    other => other.map_err(err)?,
                };
                let tname = cstr(tlast).map_err(err)?;
                let st = match lstat_at(tdir.as_raw_fd(), &tname) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
                    other => other.map_err(err)?,
                };
                let fmt = st.st_mode & libc::S_IFMT;
                if fmt == libc::S_IFDIR {
                    return Err(invalid_entry(
                        raw,
                        format!("is a hard link to the directory {shown:?}; hard links to directories are not possible"),
                    ));
                }
                if !self.opts.devices && matches!(fmt, libc::S_IFCHR | libc::S_IFBLK) {
                    return Err(ArchiveError::Device {
                        name: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
                if join(&tcomps) == join(&full[self.dest.len()..]) {
                    // A link to itself: it is already there.
                    return Ok(());
                }
                self.clear(pfd, &name, raw)?;
                // SAFETY: valid fds and NUL-terminated names; no AT_SYMLINK_FOLLOW.
                match cvt(unsafe {
                    libc::linkat(tdir.as_raw_fd(), tname.as_ptr(), pfd, name.as_ptr(), 0)
                }) {
                    Ok(_) => self.made(full, false),
                    Err(e) => return Err(err(e)),
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if kind != EntryType::Fifo && !self.opts.devices {
                    return Err(ArchiveError::Device {
                        name: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
                let ft = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.clear(pfd, &name, raw)?;
                // SAFETY: valid fd and NUL-terminated name.
                cvt(unsafe {
                    libc::mknodat(
                        pfd,
                        name.as_ptr(),
                        ft | (mode & 0o7777) as libc::mode_t,
                        libc::makedev(major, minor),
                    )
                })
                .map_err(err)?;
                self.made(full, false);
                chown_at(pfd, &name, uid, gid).map_err(err)?;
                // After the chown, which clears set-id bits.
                chmod_special_at(pfd, &name, mode).map_err(err)?;
            }
            // Metadata entries the reader already applied, and types we do not store.
            _ => {}
        }
        Ok(())
    }

    /// Makes room for a new entry `name`: removes a non-directory or an empty directory
    /// (a symlink is removed, never followed); a non-empty directory is the caller's mistake.
    fn clear(&self, dir: RawFd, name: &CStr, raw: &[u8]) -> Result<(), ArchiveError> {
        let st = match lstat_at(dir, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            other => other.map_err(|e| self.io_err(raw, e))?,
        };
        let flags = if is_dir(&st) { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid fd and NUL-terminated name.
        match cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                Err(invalid_entry(
                    raw,
                    "is not a directory, but the volume has a non-empty directory of that name; remove the directory first or rename the entry",
                ))
            }
            Err(e) => Err(self.io_err(raw, e)),
        }
    }

    /// Counts `n` more bytes of file data against `api.stream_in_max_bytes`.
    fn charge(&mut self, n: u64) -> Result<(), ArchiveError> {
        self.done.bytes += n;
        match self.opts.max_bytes {
            Some(max) if self.done.bytes > max => Err(ArchiveError::TooLarge {
                limit: "api.stream_in_max_bytes",
                value: max,
                unit: "bytes of file data",
            }),
            _ => Ok(()),
        }
    }

    /// Copies an entry's data into `file`, leaving aligned blocks of zeros as holes (so the
    /// holes of a sparse entry stay holes). Read errors are the stream's fault, write
    /// errors the disk's.
    fn copy_data(
        &mut self,
        from: &mut impl Read,
        file: &File,
        raw: &[u8],
    ) -> Result<(), ArchiveError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(COPY_BUF, 0);
        let res = self.copy_with(from, file, raw, &mut buf);
        self.buf = buf;
        res
    }

    fn copy_with(
        &mut self,
        from: &mut impl Read,
        file: &File,
        raw: &[u8],
        buf: &mut [u8],
    ) -> Result<(), ArchiveError> {
        use std::os::unix::fs::FileExt;
        let mut pos = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match from.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(read_failed(e)),
                }
            }
            if n == 0 {
                break;
            }
            self.charge(n as u64)?;
            let data = &buf[..n];
            let mut i = 0;
            while i < n {
                let end = (i + HOLE_BLOCK).min(n);
                if is_zero(&data[i..end]) {
                    i = end;
                    continue;
                }
                let mut j = end;
                while j < n {
                    let next = (j + HOLE_BLOCK).min(n);
                    if is_zero(&data[j..next]) {
                        break;
                    }
                    j = next;
                }
                file.write_all_at(&data[i..j], pos + i as u64)
                    .map_err(|e| self.io_err(raw, e))?;
                i = j;
            }
            pos += n as u64;
            if n < buf.len() {
                break;
            }
        }
        // A trailing hole (or a file of zeros only) still has its size.
        file.set_len(pos).map_err(|e| self.io_err(raw, e))
    }

    /// Checks that the relative symlink `target`, made in the directory `link_dir`
    /// (components from the root), resolves inside the volume through the tree as it is
    /// now, following the symlinks already in the volume (fd-relative, never by path).
    ///
    /// A `..` may only climb out of a real directory reached by name: a `..` after a
    /// symlink, or after a name that is missing or not a directory, is refused, because a
    /// later entry (or the container) could change what it climbs out of.
    fn check_symlink(&self, link_dir: &[&[u8]], target: &[u8]) -> Result<(), &'static str> {
        const GONE: &str = "is a symlink in a folder that changed while it was checked";
        enum Item {
            Name(Vec<u8>),
            Up,
            /// The end of a symlink's target: its result may not be climbed out of.
            EndLink,
        }
        fn items(target: &[u8]) -> impl Iterator<Item = Item> + '_ {
            target.split(|b| *b == b'/').filter_map(|c| match c {
                b"" | b"." => None,
                b".." => Some(Item::Up),
                c => Some(Item::Name(c.to_vec())),
            })
        }
        struct Frame {
            fd: OwnedFd,
            via_link: bool,
        }
        let dup = |fd: RawFd| -> Result<OwnedFd, &'static str> {
            // SAFETY: dup of a valid fd gives an fd we own.
            let n = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) }).map_err(|_| GONE)?;
            // SAFETY: just made.
            Ok(unsafe { OwnedFd::from_raw_fd(n) })
        };
        let mut frames = vec![Frame {
            fd: dup(self.root)?,
            via_link: false,
        }];
        for c in link_dir {
            let top = frames.last().map(|f| f.fd.as_raw_fd()).ok_or(GONE)?;
            let fd = open_dir_at(top, &cstr(c).map_err(|_| GONE)?).map_err(|_| GONE)?;
            frames.push(Frame {
                fd,
                via_link: false,
            });
        }
        let mut queue: std::collections::VecDeque<Item> = items(target).collect();
        // Names below the last real directory that are missing or not directories.
        let mut virtual_depth = 0usize;
        let mut hops = 0usize;
        while let Some(item) = queue.pop_front() {
            match item {
                Item::Name(n) => {
                    if virtual_depth > 0 {
                        virtual_depth += 1;
                        continue;
                    }
                    let top = frames.last().map(|f| f.fd.as_raw_fd()).ok_or(GONE)?;
                    let name = cstr(&n).map_err(|_| "is a symlink whose target has a NUL byte")?;
                    let st = match lstat_at(top, &name) {
                        Ok(st) => st,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            virtual_depth = 1;
                            continue;
                        }
                        Err(_) => return Err("is a symlink whose target cannot be checked"),
                    };
                    match st.st_mode & libc::S_IFMT {
                        libc::S_IFDIR => {
                            let fd = open_dir_at(top, &name).map_err(|_| GONE)?;
                            frames.push(Frame {
                                fd,
                                via_link: false,
                            });
                        }
                        libc::S_IFLNK => {
                            hops += 1;
                            if hops > MAX_LINK_HOPS {
                                return Err("is a symlink through more than 40 symlinks");
                            }
                            let link = readlink_at(top, &name).map_err(|_| GONE)?;
                            if link.first() == Some(&b'/') {
                                // An absolute target names a path of the container; it is
                                // never followed here, and neither is what comes after it.
                                return Ok(());
                            }
                            let mut spliced: Vec<Item> = items(&link).collect();
                            spliced.push(Item::EndLink);
                            for it in spliced.into_iter().rev() {
                                queue.push_front(it);
                            }
                        }
                        _ => virtual_depth = 1,
                    }
                }
                Item::Up => {
                    if virtual_depth > 0 {
                        return Err("is a symlink whose target climbs with `..` out of a name that is not a directory in the volume");
                    }
                    let top = frames.pop().ok_or(GONE)?;
                    if top.via_link {
                        return Err(
                            "is a symlink whose target climbs with `..` out of another symlink",
                        );
                    }
                    if frames.is_empty() {
                        return Err("is a symlink pointing outside the volume");
                    }
                }
                Item::EndLink => {
                    if virtual_depth == 0 {
                        if let Some(top) = frames.last_mut() {
                            top.via_link = true;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes what this extraction made (best effort, never through a symlink).
    fn undo(&self) {
        for path in self.undo.iter().rev() {
            let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
            let Some((last, parents)) = comps.split_last() else {
                continue;
            };
            let res = walk(self.root, parents, false, IdMap::IDENTITY, |_| {})
                .and_then(|dir| remove_all_at(&dir, last));
            if let Err(e) = res {
                tracing::warn!(entry = %String::from_utf8_lossy(path), error = %e, "could not remove what a failed stream-in wrote");
            }
        }
    }
}

fn is_zero(block: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: any bit pattern is a valid u64.
        unsafe { block.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

fn readlink_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: valid fd, NUL-terminated name, buffer of the given length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Names in the open directory `fd` (without `.` and `..`).
fn names_in(fd: RawFd) -> io::Result<Vec<Vec<u8>>> {
    let listing = Path::new("/proc/self/fd").join(fd.to_string());
    std::fs::read_dir(&listing)?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect()
}

fn dev_of(fd: RawFd) -> io::Result<libc::dev_t> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd; `st` is written by fstat before it is read.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded.
    Ok(unsafe { st.assume_init() }.st_dev)
}

/// Removes `name` in `dir` and everything below it, relative to open directories, never
/// following a symlink or crossing into another file system; iterative (no recursion).
fn remove_all_at(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let cname = cstr(name)?;
    let st = match lstat_at(dir.as_raw_fd(), &cname) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        other => other?,
    };
    if !is_dir(&st) {
        // SAFETY: valid fd and NUL-terminated name.
        return cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), cname.as_ptr(), 0) }).map(drop);
    }
    let dev = dev_of(dir.as_raw_fd())?;
    // Each frame: an open directory and its name in the frame below (the first: in `dir`).
    let mut stack: Vec<(OwnedFd, CString)> = vec![(open_dir_at(dir.as_raw_fd(), &cname)?, cname)];
    while let Some(fd) = stack.last().map(|(fd, _)| fd.as_raw_fd()) {
        if dev_of(fd)? != dev {
            return Err(io::Error::other(
                "another file system is mounted inside; unmount it first",
            ));
        }
        let mut descended = false;
        for n in names_in(fd)? {
            let c = cstr(&n)?;
            let st = match lstat_at(fd, &c) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                other => other?,
            };
            if is_dir(&st) {
                let sub = open_dir_at(fd, &c)?;
                stack.push((sub, c));
                descended = true;
                break;
            }
            // SAFETY: valid fd and NUL-terminated name.
            match cvt(unsafe { libc::unlinkat(fd, c.as_ptr(), 0) }) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
                _ => {}
            }
        }
        if descended {
            continue;
        }
        let Some((done, done_name)) = stack.pop() else {
            break;
        };
        drop(done);
        let parent = stack
            .last()
            .map(|(fd, _)| fd.as_raw_fd())
            .unwrap_or(dir.as_raw_fd());
        // SAFETY: valid fd and NUL-terminated name.
        match cvt(unsafe { libc::unlinkat(parent, done_name.as_ptr(), libc::AT_REMOVEDIR) }) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// What `path` names inside a volume, opened for streaming out.
pub enum Source {
    /// A directory: streamed as `./...` entries.
    Dir(OwnedFd),
    /// Anything else: one entry named by its base name, read from `parent`.
    Single { parent: OwnedFd, name: Vec<u8> },
}

/// Opens `path` (relative to the volume's data dir `root`) for streaming out, never
/// through a symlink. A missing path is [`ArchiveError::NotFound`].
pub fn open_source(root: &Path, path: &str) -> Result<Source, ArchiveError> {
    let comps =
        components(path.as_bytes(), true).map_err(|_| ArchiveError::BadPath(path.to_owned()))?;
    let io_err = |source: io::Error| match source.raw_os_error() {
        Some(libc::ENOENT) => ArchiveError::NotFound,
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => ArchiveError::BadPath(path.to_owned()),
        _ => ArchiveError::Io {
            path: root.join(path),
            source,
        },
    };
    let rootfd = open_dir(root).map_err(io_err)?;
    let Some((last, parents)) = comps.split_last() else {
        return Ok(Source::Dir(rootfd));
    };
    let parent =
        walk(rootfd.as_raw_fd(), parents, false, IdMap::IDENTITY, |_| {}).map_err(io_err)?;
    let name = cstr(last).map_err(io_err)?;
    let st = lstat_at(parent.as_raw_fd(), &name).map_err(io_err)?;
    if is_dir(&st) {
        return Ok(Source::Dir(
            open_dir_at(parent.as_raw_fd(), &name).map_err(io_err)?,
        ));
    }
    Ok(Source::Single {
        parent,
        name: last.to_vec(),
    })
}

/// Writes raw `name` (and `link`) into `header`, with GNU long-name entries when longer
/// than the header fields, then appends the entry with `data`.
fn append<W: Write>(
    b: &mut tar::Builder<W>,
    header: &mut Header,
    name: &[u8],
    link: Option<&[u8]>,
    data: impl Read,
) -> io::Result<()> {
    fn long<W: Write>(b: &mut tar::Builder<W>, kind: EntryType, value: &[u8]) -> io::Result<()> {
        let mut h = Header::new_gnu();
        if let Some(g) = h.as_gnu_mut() {
            g.name[..13].copy_from_slice(b"././@LongLink");
        }
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_size(value.len() as u64 + 1);
        h.set_cksum();
        b.append(&h, value.chain(&[0u8][..]))
    }
    let old = header.as_old_mut();
    if name.len() > old.name.len() {
        long(b, EntryType::GNULongName, name)?;
    }
    let n = name.len().min(old.name.len());
    let old = header.as_old_mut();
    old.name = [0; 100];
    old.name[..n].copy_from_slice(&name[..n]);
    if let Some(link) = link {
        if link.len() > old.linkname.len() {
            long(b, EntryType::GNULongLink, link)?;
        }
        let old = header.as_old_mut();
        let n = link.len().min(old.linkname.len());
        old.linkname = [0; 100];
        old.linkname[..n].copy_from_slice(&link[..n]);
    }
    header.set_cksum();
    b.append(header, data)
}

struct Packer<'a, W: Write> {
    b: tar::Builder<W>,
    ids: IdMap,
    links: HashMap<(u64, u64), Vec<u8>>,
    root: &'a Path,
}

impl<W: Write> Packer<'_, W> {
    fn err(&self, name: &[u8]) -> impl Fn(io::Error) -> ArchiveError + '_ {
        let path = self.root.join(std::ffi::OsStr::from_bytes(name));
        move |source| write_failed(&path, source)
    }

    fn header(&self, st: &libc::stat, kind: EntryType) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        let (u, g) = self.ids.from_disk(st.st_uid, st.st_gid);
        h.set_uid(u64::from(u));
        h.set_gid(u64::from(g));
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        h.set_size(0);
        h
    }

    /// Appends the entry `name` (archive name) for `st`, read at `dir`/`base`; a directory
    /// is returned open, with the prefix of its children, for the caller to walk.
    fn entry(
        &mut self,
        dir: RawFd,
        base: &CStr,
        name: Vec<u8>,
        st: &libc::stat,
    ) -> Result<Option<(OwnedFd, Vec<u8>)>, ArchiveError> {
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key).cloned() {
                let mut h = self.header(st, EntryType::Link);
                return append(&mut self.b, &mut h, &name, Some(&first), io::empty())
                    .map(|()| None)
                    .map_err(self.err(&name));
            }
            self.links.insert(key, name.clone());
        }
        let done: Result<(), ArchiveError> = match fmt {
            libc::S_IFDIR => {
                let mut h = self.header(st, EntryType::Directory);
                let mut dname = name.clone();
                if dname.last() != Some(&b'/') {
                    dname.push(b'/');
                }
                append(&mut self.b, &mut h, &dname, None, io::empty()).map_err(self.err(&name))?;
                let fd = open_dir_at(dir, base).map_err(self.err(&name))?;
                return Ok(Some((fd, dname)));
            }
            libc::S_IFREG => {
                let fd = open_at(dir, base, libc::O_RDONLY, 0).map_err(self.err(&name))?;
                let file = File::from(fd);
                let mut h = self.header(st, EntryType::Regular);
                let size = u64::try_from(st.st_size).unwrap_or(0);
                h.set_size(size);
                // A file that shrinks while read would corrupt the stream: pad with zeros.
                let data = file.take(size).chain(io::repeat(0)).take(size);
                append(&mut self.b, &mut h, &name, None, data).map_err(self.err(&name))
            }
            libc::S_IFLNK => {
                let mut buf = vec![0u8; 4096];
                // SAFETY: valid fd, NUL-terminated name, buffer of the given length.
                let n = unsafe {
                    libc::readlinkat(dir, base.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    return Err(self.err(&name)(io::Error::last_os_error()));
                }
                buf.truncate(n as usize);
                let mut h = self.header(st, EntryType::Symlink);
                append(&mut self.b, &mut h, &name, Some(&buf), io::empty()).map_err(self.err(&name))
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                let kind = match fmt {
                    libc::S_IFCHR => EntryType::Char,
                    libc::S_IFBLK => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let mut h = self.header(st, kind);
                if fmt != libc::S_IFIFO {
                    h.set_device_major(libc::major(st.st_rdev))
                        .map_err(self.err(&name))?;
                    h.set_device_minor(libc::minor(st.st_rdev))
                        .map_err(self.err(&name))?;
                }
                append(&mut self.b, &mut h, &name, None, io::empty()).map_err(self.err(&name))
            }
            // Sockets are not archived (as GNU tar).
            _ => Ok(()),
        };
        done.map(|()| None)
    }

    /// Appends everything below the open directory `top`, named under `prefix` (ends in
    /// `/`), depth first in name order; iterative, one open directory per level.
    fn tree(&mut self, top: OwnedFd, prefix: Vec<u8>) -> Result<(), ArchiveError> {
        struct Frame {
            fd: OwnedFd,
            prefix: Vec<u8>,
            names: std::vec::IntoIter<Vec<u8>>,
        }
        let list = |p: &Self, fd: &OwnedFd, prefix: &[u8]| -> Result<_, ArchiveError> {
            let mut names = names_in(fd.as_raw_fd()).map_err(p.err(prefix))?;
            names.sort();
            Ok(names.into_iter())
        };
        let names = list(self, &top, &prefix)?;
        let mut stack = vec![Frame {
            fd: top,
            prefix,
            names,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(n) = frame.names.next() else {
                stack.pop();
                continue;
            };
            let dir = frame.fd.as_raw_fd();
            let base = cstr(&n).map_err(self.err(&n))?;
            let mut name = frame.prefix.clone();
            name.extend_from_slice(&n);
            let st = match lstat_at(dir, &base) {
                Ok(st) => st,
                // Removed while we listed: skip, as GNU tar warns and goes on.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(self.err(&name)(e)),
            };
            if let Some((fd, prefix)) = self.entry(dir, &base, name, &st)? {
                let names = list(self, &fd, &prefix)?;
                stack.push(Frame { fd, prefix, names });
            }
        }
        Ok(())
    }
}

/// Writes `source` as an uncompressed tar into `out`, owners mapped back with `ids`.
/// `root` only names paths in errors.
pub fn pack<W: Write>(source: &Source, out: W, ids: IdMap, root: &Path) -> Result<W, ArchiveError> {
    let mut p = Packer {
        b: tar::Builder::new(out),
        ids,
        links: HashMap::new(),
        root,
    };
    match source {
        Source::Dir(fd) => {
            // SAFETY: zeroed `stat` is a valid out-parameter; valid fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }).map_err(p.err(b"."))?;
            let mut h = p.header(&st, EntryType::Directory);
            append(&mut p.b, &mut h, b"./", None, io::empty()).map_err(p.err(b"."))?;
            let top = open_dir_at(fd.as_raw_fd(), c".").map_err(p.err(b"."))?;
            p.tree(top, b"./".to_vec())?;
        }
        Source::Single { parent, name } => {
            let base = cstr(name).map_err(p.err(name))?;
            let st = lstat_at(parent.as_raw_fd(), &base).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => ArchiveError::NotFound,
                _ => p.err(name)(e),
            })?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(ArchiveError::NotFound);
            }
            p.entry(parent.as_raw_fd(), &base, name.clone(), &st)?;
        }
    }
    let Packer { b, .. } = p;
    b.into_inner().map_err(|source| write_failed(root, source))
}

/// Packs `source` and compresses it into `out`.
pub fn pack_compressed<W: Write>(
    source: &Source,
    out: W,
    encoding: Encoding,
    ids: IdMap,
    root: &Path,
) -> Result<W, ArchiveError> {
    let io_err = |source: io::Error| write_failed(root, source);
    match encoding {
        Encoding::Gzip => {
            let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            pack(source, gz, ids, root)?.finish().map_err(io_err)
        }
        Encoding::Zstd => {
            let z = zstd::stream::write::Encoder::new(out, 3).map_err(io_err)?;
            pack(source, z, ids, root)?.finish().map_err(io_err)
        }
        Encoding::Raw => pack(source, out, ids, root),
    }
}

#[cfg(test)]
mod tests;
