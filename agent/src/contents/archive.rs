//! Tar streams into and out of a volume, never touching anything outside it.
//!
//! Blocking functions, on [`crate::fsx`] (no file-system calls of their own). Every path
//! is walked one component at a time from an open directory with `O_NOFOLLOW` (never onto
//! another mount), so a symlink (made by the stream itself or already in the volume) is
//! never followed while writing or reading. Entries named absolutely or with
//! `..`, hard links to such names, and relative symlinks that climb out of the volume are
//! refused. Absolute symlink targets are stored as they are: they name paths inside the
//! container that mounts the volume, and are never followed here.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use crate::contents::IdMap;
use crate::fsx::{self, Dir, Errno, FsxError, Kind, Meta, Name, NameBuf, Timestamp};

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

/// The I/O error an [`FsxError`] carries: the entry's name comes from the tar, not from
/// the walk, so only the system's reason is kept.
fn src(e: FsxError) -> io::Error {
    e.source
}

/// One path component as an entry name; `components` has already refused every component
/// that is not one (`..`, NUL), so this fails only on a caller's own mistake.
fn name_of(c: &[u8]) -> io::Result<NameBuf> {
    NameBuf::new(c)
}

/// Refuses a NUL byte in a symlink target (what a C string cannot hold).
fn no_nul(s: &[u8]) -> io::Result<()> {
    if s.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in a name",
        ));
    }
    Ok(())
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

/// Walks `comps` from `root` without following symlinks (each directory opened with
/// `O_NOFOLLOW` relative to its parent, never on another mount); creates missing
/// directories when `create` is set, calling `made(i)` when component `i` was made. A
/// component that is a symlink or not a directory is refused.
fn walk(
    root: &Dir,
    comps: &[&[u8]],
    create: bool,
    ids: IdMap,
    mut made: impl FnMut(usize),
) -> io::Result<Dir> {
    let mut cur = root.try_clone().map_err(src)?;
    for (i, c) in comps.iter().enumerate() {
        let name = name_of(c)?;
        let name = name.as_name();
        let next = match cur.open_dir(name) {
            Err(e) if e.is_not_found() && create => {
                let fresh = match cur.mkdir(name, 0o755) {
                    Ok(()) => true,
                    Err(e) if e.is(Errno::EXIST) => false,
                    Err(e) => return Err(src(e)),
                };
                let dir = cur.open_dir(name).map_err(src)?;
                if fresh {
                    made(i);
                    // A folder made here belongs to the volume's root, as the volume's own
                    // root does (mapped in an unprivileged volume).
                    if let Some((uid, gid)) = ids.mapped_root() {
                        dir.chown_self(uid, gid).map_err(src)?;
                    }
                }
                dir
            }
            other => other.map_err(src)?,
        };
        cur = next;
    }
    Ok(cur)
}

fn is_escape(e: &io::Error) -> bool {
    let errno = e.raw_os_error();
    errno == Some(Errno::LOOP.raw_os_error()) || errno == Some(Errno::NOTDIR.raw_os_error())
}

/// Sets the exact mode of the special file (device node or fifo) `name` in `dir`, never
/// following a symlink: `mknodat` applies the process umask (0022 under systemd), so a
/// `crw-rw-rw-` /dev/null in an image would land as `crw-r--r--`. The node is pinned with
/// an `O_PATH | O_NOFOLLOW` handle ([`Dir::open_node`]), checked, and changed through it.
fn chmod_special(dir: &Dir, name: Name<'_>, mode: u32) -> io::Result<()> {
    let node = dir.open_node(name).map_err(src)?;
    let kind = node.meta().kind;
    if !(kind.is_device() || kind == Kind::Fifo) {
        // Replaced (by a symlink, say) since it was made: leave it alone.
        return Err(Errno::LOOP.into());
    }
    node.chmod(mode).map_err(src)
}

/// Sets the owner, then the exact mode (the `chown` cleared the set-id bits), of an open
/// file or directory.
fn chown_mode(fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    fsx::chown_fd(fd, uid, gid)?;
    fsx::chmod_fd(fd, mode)
}

fn set_mtime(fd: BorrowedFd<'_>, mtime: u64) -> io::Result<()> {
    let t = Timestamp {
        secs: i64::try_from(mtime).unwrap_or(i64::MAX),
        nanos: 0,
    };
    fsx::set_times_fd(fd, t, t)
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
/// Most times an entry is made again after its name was taken between the clear and the
/// make (see [`Extractor::replace`]).
const MAKE_TRIES: usize = 8;

/// Extracts the uncompressed tar `input` into the directory `dest` (components under the
/// volume's data directory `root`, made when missing), as `opts` says.
///
/// On any failure, everything the extraction made is removed again (entries it replaced
/// are gone: a stream that overwrites files and then fails leaves those files removed).
pub fn extract(
    root: &Dir,
    dest: &[&[u8]],
    input: impl Read,
    opts: &ExtractOptions,
) -> Result<Extracted, ArchiveError> {
    let mut x = Extractor {
        root,
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
    root: &Dir,
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

struct Extractor<'a> {
    root: &'a Dir,
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

impl Extractor<'_> {
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
        let dest_dir =
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
        let mut cached: Option<(Vec<u8>, Dir)> = None;
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
                    chown_mode(dest_dir.as_fd(), uid, gid, mode)
                        .map_err(|e| self.io_err(&raw, e))?;
                }
                continue;
            };
            let parent_key = join(parents);
            let parent = match cached.take() {
                Some((k, dir)) if k == parent_key => dir,
                _ => {
                    let mut fresh = Vec::new();
                    let dir = walk(&dest_dir, parents, true, self.opts.ids, |i| fresh.push(i))
                        .map_err(|e| self.io_err(&raw, e))?;
                    for i in fresh {
                        let path: Vec<&[u8]> = dest.iter().chain(&parents[..=i]).copied().collect();
                        self.made(&path, true);
                    }
                    dir
                }
            };
            let full: Vec<&[u8]> = dest.iter().chain(comps.iter()).copied().collect();
            self.entry(&mut entry, &raw, &dest_dir, &parent, last, &full)?;
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
    match source.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::LOOP) | Some(Errno::NOTDIR) => {
            unsafe_entry(raw, "goes through a symlink or a non-directory")
        }
        Some(Errno::NAMETOOLONG) => {
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

impl Extractor<'_> {
    /// Writes one entry named `last` into `parent`; `full` is its path from the root.
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        dest: &Dir,
        parent: &Dir,
        last: &[u8],
        full: &[&[u8]],
    ) -> Result<(), ArchiveError> {
        let kind = entry.header().entry_type();
        let (uid, gid, mode) = self.owner_mode(entry, raw)?;
        let name = name_of(last).map_err(|e| self.io_err(raw, e))?;
        let name = name.as_name();
        let err = |e: io::Error| entry_io(raw, e);
        let ferr = |e: FsxError| entry_io(raw, src(e));
        match kind {
            EntryType::Directory => {
                let fresh = match parent.mkdir(name, 0o700) {
                    Ok(()) => true,
                    Err(e) if e.is(Errno::EXIST) => {
                        let st = parent.stat(name).map_err(ferr)?;
                        if st.is_dir() {
                            false
                        } else {
                            self.replace(parent, name, raw, || parent.mkdir(name, 0o700))?;
                            true
                        }
                    }
                    Err(e) => return Err(ferr(e)),
                };
                if fresh {
                    self.made(full, true);
                }
                let d = parent.open_dir(name).map_err(ferr)?;
                chown_mode(d.as_fd(), uid, gid, mode).map_err(err)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let file = self.replace(parent, name, raw, || parent.create_file(name, 0o600))?;
                self.made(full, false);
                self.copy_data(entry, &file, raw)?;
                chown_mode(file.as_fd(), uid, gid, mode).map_err(|e| self.io_err(raw, e))?;
                if let Ok(m) = entry.header().mtime() {
                    set_mtime(file.as_fd(), m).map_err(|e| self.io_err(raw, e))?;
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
                no_nul(&target).map_err(err)?;
                self.replace(parent, name, raw, || {
                    parent.symlink(name, OsStr::from_bytes(&target))
                })?;
                self.made(full, false);
                parent.chown(name, uid, gid).map_err(ferr)?;
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
                let tdir = match walk(dest, tparents, false, self.opts.ids, |_| {}) {
                    Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                        return Err(missing())
                    }
                    other => other.map_err(err)?,
                };
                let tname = name_of(tlast).map_err(err)?;
                let st = match tdir.stat(tname.as_name()) {
                    Err(e) if e.is_not_found() => return Err(missing()),
                    other => other.map_err(ferr)?,
                };
                if st.is_dir() {
                    return Err(invalid_entry(
                        raw,
                        format!("is a hard link to the directory {shown:?}; hard links to directories are not possible"),
                    ));
                }
                if !self.opts.devices && st.kind.is_device() {
                    return Err(ArchiveError::Device {
                        name: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
                if join(&tcomps) == join(&full[self.dest.len()..]) {
                    // A link to itself: it is already there.
                    return Ok(());
                }
                // `linkat` without `AT_SYMLINK_FOLLOW`: a symlink is linked, never followed.
                self.replace(parent, name, raw, || {
                    tdir.hard_link(tname.as_name(), parent, name)
                })?;
                self.made(full, false);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if kind != EntryType::Fifo && !self.opts.devices {
                    return Err(ArchiveError::Device {
                        name: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
                let node = match kind {
                    EntryType::Char => Kind::CharDevice,
                    EntryType::Block => Kind::BlockDevice,
                    _ => Kind::Fifo,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.replace(parent, name, raw, || {
                    parent.mknod(name, node, mode, rustix::fs::makedev(major, minor))
                })?;
                self.made(full, false);
                parent.chown(name, uid, gid).map_err(ferr)?;
                // After the chown, which clears set-id bits.
                chmod_special(parent, name, mode).map_err(err)?;
            }
            // Metadata entries the reader already applied, and types we do not store.
            _ => {}
        }
        Ok(())
    }

    /// Makes room for the new entry `name` ([`Extractor::clear`]) and makes it with `make`.
    /// When the name was taken again in between (`EEXIST`: another stream into the same
    /// volume writing the same name at the same moment), clears and makes it again, at most
    /// [`MAKE_TRIES`] times, so the last writer wins as it does without the race.
    fn replace<T>(
        &self,
        dir: &Dir,
        name: Name<'_>,
        raw: &[u8],
        mut make: impl FnMut() -> fsx::Result<T>,
    ) -> Result<T, ArchiveError> {
        let mut tries = 1;
        loop {
            self.clear(dir, name, raw)?;
            match make() {
                Err(e) if e.is(Errno::EXIST) && tries < MAKE_TRIES => tries += 1,
                made => return made.map_err(|e| self.io_err(raw, src(e))),
            }
        }
    }

    /// Makes room for a new entry `name`: removes a non-directory or an empty directory
    /// (a symlink is removed, never followed); a non-empty directory is the caller's mistake.
    fn clear(&self, dir: &Dir, name: Name<'_>, raw: &[u8]) -> Result<(), ArchiveError> {
        let st = match dir.stat(name) {
            Err(e) if e.is_not_found() => return Ok(()),
            other => other.map_err(|e| self.io_err(raw, src(e)))?,
        };
        let removed = if st.is_dir() {
            dir.rmdir(name)
        } else {
            dir.unlink(name)
        };
        match removed {
            // Removed meanwhile (by another stream into the same volume): room is made.
            Err(e) if e.is_not_found() => Ok(()),
            Ok(()) => Ok(()),
            Err(e) if e.is(Errno::NOTEMPTY) || e.is(Errno::EXIST) => {
                Err(invalid_entry(
                    raw,
                    "is not a directory, but the volume has a non-empty directory of that name; remove the directory first or rename the entry",
                ))
            }
            Err(e) => Err(self.io_err(raw, src(e))),
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
            dir: Dir,
            via_link: bool,
        }
        let mut frames = vec![Frame {
            dir: self.root.try_clone().map_err(|_| GONE)?,
            via_link: false,
        }];
        for c in link_dir {
            let top = &frames.last().ok_or(GONE)?.dir;
            let name = name_of(c).map_err(|_| GONE)?;
            let dir = top.open_dir(name.as_name()).map_err(|_| GONE)?;
            frames.push(Frame {
                dir,
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
                    let top = &frames.last().ok_or(GONE)?.dir;
                    // Only a NUL byte can make a name of `items` invalid.
                    let name =
                        name_of(&n).map_err(|_| "is a symlink whose target has a NUL byte")?;
                    let name = name.as_name();
                    let st = match top.stat(name) {
                        Ok(st) => st,
                        Err(e) if e.is_not_found() => {
                            virtual_depth = 1;
                            continue;
                        }
                        Err(_) => return Err("is a symlink whose target cannot be checked"),
                    };
                    match st.kind {
                        Kind::Dir => {
                            let dir = top.open_dir(name).map_err(|_| GONE)?;
                            frames.push(Frame {
                                dir,
                                via_link: false,
                            });
                        }
                        Kind::Symlink => {
                            hops += 1;
                            if hops > MAX_LINK_HOPS {
                                return Err("is a symlink through more than 40 symlinks");
                            }
                            let link = top.readlink(name).map_err(|_| GONE)?.into_vec();
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

/// Removes `name` in `dir` and everything below it, relative to open directories, never
/// following a symlink or crossing into another file system ([`Dir::open_dir`] refuses a
/// mount); iterative (no recursion).
fn remove_all_at(dir: &Dir, name: &[u8]) -> io::Result<()> {
    let name = name_of(name)?;
    let st = match dir.stat(name.as_name()) {
        Err(e) if e.is_not_found() => return Ok(()),
        other => other.map_err(src)?,
    };
    if !st.is_dir() {
        return dir.unlink(name.as_name()).map_err(src);
    }
    // Each frame: an open directory and its name in the frame below (the first: in `dir`).
    let mut stack: Vec<(Dir, NameBuf)> = vec![(dir.open_dir(name.as_name()).map_err(src)?, name)];
    while let Some((top, _)) = stack.last() {
        let mut descend = None;
        for entry in top.entries().map_err(src)? {
            let n = entry.name.as_name();
            let st = match top.stat(n) {
                Err(e) if e.is_not_found() => continue,
                other => other.map_err(src)?,
            };
            if st.is_dir() {
                descend = Some((top.open_dir(n).map_err(src)?, entry.name.clone()));
                break;
            }
            match top.unlink(n) {
                Err(e) if !e.is_not_found() => return Err(src(e)),
                _ => {}
            }
        }
        if let Some(frame) = descend {
            stack.push(frame);
            continue;
        }
        let Some((done, done_name)) = stack.pop() else {
            break;
        };
        drop(done);
        let parent = stack.last().map(|(d, _)| d).unwrap_or(dir);
        match parent.rmdir(done_name.as_name()) {
            Err(e) if !e.is_not_found() => return Err(src(e)),
            _ => {}
        }
    }
    Ok(())
}

/// What `path` names inside a volume, opened for streaming out.
pub enum Source {
    /// A directory: streamed as `./...` entries.
    Dir(Dir),
    /// Anything else: one entry named by its base name, read from `parent`.
    Single { parent: Dir, name: NameBuf },
}

/// Opens `path` (relative to the volume's data dir `root`) for streaming out, never
/// through a symlink. A missing path is [`ArchiveError::NotFound`].
pub fn open_source(root: &Path, path: &str) -> Result<Source, ArchiveError> {
    let comps =
        components(path.as_bytes(), true).map_err(|_| ArchiveError::BadPath(path.to_owned()))?;
    let io_err = |source: io::Error| match source.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::NOENT) => ArchiveError::NotFound,
        Some(Errno::LOOP) | Some(Errno::NOTDIR) => ArchiveError::BadPath(path.to_owned()),
        _ => ArchiveError::Io {
            path: root.join(path),
            source,
        },
    };
    let fsx_err = |e: FsxError| io_err(src(e));
    let root_dir = Dir::open_root(root).map_err(fsx_err)?;
    let Some((last, parents)) = comps.split_last() else {
        return Ok(Source::Dir(root_dir));
    };
    let parent = walk(&root_dir, parents, false, IdMap::IDENTITY, |_| {}).map_err(io_err)?;
    let name = name_of(last).map_err(io_err)?;
    let st = parent.stat(name.as_name()).map_err(fsx_err)?;
    if st.is_dir() {
        return Ok(Source::Dir(
            parent.open_dir(name.as_name()).map_err(fsx_err)?,
        ));
    }
    Ok(Source::Single { parent, name })
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
        let path = self.root.join(OsStr::from_bytes(name));
        move |source| write_failed(&path, source)
    }

    /// Like [`Packer::err`], for a failed [`fsx`] call.
    fn fsx_err(&self, name: &[u8]) -> impl Fn(FsxError) -> ArchiveError + '_ {
        let err = self.err(name);
        move |e| err(src(e))
    }

    fn header(&self, st: &Meta, kind: EntryType) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.mode & 0o7777);
        let (u, g) = self.ids.from_disk(st.uid, st.gid);
        h.set_uid(u64::from(u));
        h.set_gid(u64::from(g));
        h.set_mtime(u64::try_from(st.mtime.secs).unwrap_or(0));
        h.set_size(0);
        h
    }

    /// Appends the entry `name` (archive name) for `st`, read at `dir`/`base`; a directory
    /// is returned open, with the prefix of its children, for the caller to walk.
    fn entry(
        &mut self,
        dir: &Dir,
        base: Name<'_>,
        name: Vec<u8>,
        st: &Meta,
    ) -> Result<Option<(Dir, Vec<u8>)>, ArchiveError> {
        if !st.is_dir() && st.nlink > 1 {
            let key = (st.dev, st.ino);
            if let Some(first) = self.links.get(&key).cloned() {
                let mut h = self.header(st, EntryType::Link);
                return append(&mut self.b, &mut h, &name, Some(&first), io::empty())
                    .map(|()| None)
                    .map_err(self.err(&name));
            }
            self.links.insert(key, name.clone());
        }
        let done: Result<(), ArchiveError> = match st.kind {
            Kind::Dir => {
                let mut h = self.header(st, EntryType::Directory);
                let mut dname = name.clone();
                if dname.last() != Some(&b'/') {
                    dname.push(b'/');
                }
                append(&mut self.b, &mut h, &dname, None, io::empty()).map_err(self.err(&name))?;
                let sub = dir.open_dir(base).map_err(self.fsx_err(&name))?;
                return Ok(Some((sub, dname)));
            }
            Kind::File => {
                // Refused when no longer a regular file: a fifo swapped in is never waited on.
                let (file, _) = dir.open_file(base).map_err(self.fsx_err(&name))?;
                let mut h = self.header(st, EntryType::Regular);
                let size = st.size;
                h.set_size(size);
                // A file that shrinks while read would corrupt the stream: pad with zeros.
                let data = file.take(size).chain(io::repeat(0)).take(size);
                append(&mut self.b, &mut h, &name, None, data).map_err(self.err(&name))
            }
            Kind::Symlink => {
                let target = dir.readlink(base).map_err(self.fsx_err(&name))?.into_vec();
                let mut h = self.header(st, EntryType::Symlink);
                append(&mut self.b, &mut h, &name, Some(&target), io::empty())
                    .map_err(self.err(&name))
            }
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                let kind = match st.kind {
                    Kind::CharDevice => EntryType::Char,
                    Kind::BlockDevice => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let mut h = self.header(st, kind);
                if st.kind.is_device() {
                    h.set_device_major(rustix::fs::major(st.rdev))
                        .map_err(self.err(&name))?;
                    h.set_device_minor(rustix::fs::minor(st.rdev))
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
    fn tree(&mut self, top: Dir, prefix: Vec<u8>) -> Result<(), ArchiveError> {
        struct Frame {
            dir: Dir,
            prefix: Vec<u8>,
            names: std::vec::IntoIter<NameBuf>,
        }
        let list = |p: &Self, dir: &Dir, prefix: &[u8]| -> Result<_, ArchiveError> {
            let mut names: Vec<NameBuf> = dir
                .entries()
                .map_err(p.fsx_err(prefix))?
                .into_iter()
                .map(|e| e.name)
                .collect();
            names.sort_unstable_by(|a, b| a.as_name().as_bytes().cmp(b.as_name().as_bytes()));
            Ok(names.into_iter())
        };
        let names = list(self, &top, &prefix)?;
        let mut stack = vec![Frame {
            dir: top,
            prefix,
            names,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(n) = frame.names.next() else {
                stack.pop();
                continue;
            };
            let base = n.as_name();
            let mut name = frame.prefix.clone();
            name.extend_from_slice(base.as_bytes());
            let st = match frame.dir.stat(base) {
                Ok(st) => st,
                // Removed while we listed: skip, as GNU tar warns and goes on.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(self.fsx_err(&name)(e)),
            };
            if let Some((dir, prefix)) = self.entry(&frame.dir, base, name, &st)? {
                let names = list(self, &dir, &prefix)?;
                stack.push(Frame { dir, prefix, names });
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
        Source::Dir(dir) => {
            let st = dir.meta().map_err(p.fsx_err(b"."))?;
            let mut h = p.header(&st, EntryType::Directory);
            append(&mut p.b, &mut h, b"./", None, io::empty()).map_err(p.err(b"."))?;
            let top = dir.try_clone().map_err(p.fsx_err(b"."))?;
            p.tree(top, b"./".to_vec())?;
        }
        Source::Single { parent, name } => {
            let base = name.as_name();
            let st = parent.stat(base).map_err(|e| {
                if e.is_not_found() {
                    ArchiveError::NotFound
                } else {
                    p.fsx_err(base.as_bytes())(e)
                }
            })?;
            if st.is_dir() {
                return Err(ArchiveError::NotFound);
            }
            p.entry(parent, base, base.as_bytes().to_vec(), &st)?;
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
