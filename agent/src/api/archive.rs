//! Tar streams into and out of a volume, never touching anything outside it.
//!
//! Blocking functions. Every path is walked one component at a time from an open
//! directory with `O_NOFOLLOW`, so a symlink (made by the stream itself or already in the
//! volume) is never followed while writing or reading. Entries named absolutely or with
//! `..`, hard links to such names, and relative symlinks that climb out of the volume are
//! refused. Absolute symlink targets are stored as they are: they name paths inside the
//! container that mounts the volume, and are never followed here.

use std::collections::HashMap;
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

fn unsafe_entry(name: &[u8], why: &'static str) -> ArchiveError {
    ArchiveError::Unsafe {
        name: String::from_utf8_lossy(name).into_owned(),
        why,
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
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Whether a relative symlink target, resolved from directory `depth` levels below the
/// root, stays inside the root.
fn symlink_stays_inside(depth: usize, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return true;
    }
    let mut level = depth as isize;
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            _ => level += 1,
        }
    }
    true
}

/// Walks `comps` from `root` without following symlinks; creates missing directories when
/// `create` is set. A component that is a symlink or not a directory is refused.
fn walk(root: RawFd, comps: &[&[u8]], create: bool, ids: IdMap) -> io::Result<OwnedFd> {
    // SAFETY: dup of a valid fd gives an fd we own.
    let mut cur =
        unsafe { OwnedFd::from_raw_fd(cvt(libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0))?) };
    for c in comps {
        let name = cstr(c)?;
        let next = match open_dir_at(cur.as_raw_fd(), &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                // SAFETY: valid fd and NUL-terminated name.
                let made =
                    match cvt(unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) }) {
                        Ok(_) => true,
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                        Err(e) => return Err(e),
                    };
                let fd = open_dir_at(cur.as_raw_fd(), &name)?;
                // A folder made here belongs to the volume's root, as the volume's own
                // root does (mapped in an unprivileged volume).
                if let (true, Some((uid, gid))) = (made, ids.mapped_root()) {
                    // SAFETY: valid fd.
                    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
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

/// Removes a non-directory at `name` (a symlink is removed, never followed).
fn remove_non_dir(dir: RawFd, name: &CStr) -> io::Result<()> {
    match lstat_at(dir, name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
        Ok(st) if is_dir(&st) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        // SAFETY: valid fd and NUL-terminated name.
        Ok(_) => cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) }).map(drop),
    }
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
    pub bytes: u64,
}

/// Extracts the uncompressed tar `input` under `dest` (a directory inside the volume,
/// opened by the caller), owners mapped with `ids`.
pub fn extract(dest: &OwnedFd, input: impl Read, ids: IdMap) -> Result<Extracted, ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut done = Extracted::default();
    // The parent directory of the previous entry, reused while entries share it.
    let mut cached: Option<(Vec<u8>, OwnedFd)> = None;
    let entries = archive.entries().map_err(ArchiveError::Malformed)?;
    for entry in entries {
        let mut entry = entry.map_err(ArchiveError::Malformed)?;
        let raw = entry.path_bytes().into_owned();
        let comps = components(&raw, false).map_err(|why| unsafe_entry(&raw, why))?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(ArchiveError::Malformed)?;
        let (uid, gid) = (
            header.uid().map_err(ArchiveError::Malformed)?,
            header.gid().map_err(ArchiveError::Malformed)?,
        );
        let (uid, gid) = ids.to_disk(
            u32::try_from(uid).unwrap_or(u32::MAX),
            u32::try_from(gid).unwrap_or(u32::MAX),
        );
        let io_err = |source: io::Error| {
            if is_escape(&source) {
                unsafe_entry(&raw, "goes through a symlink or a non-directory")
            } else {
                ArchiveError::Io {
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(&raw)),
                    source,
                }
            }
        };
        let Some((last, parents)) = comps.split_last() else {
            // The destination itself (`./`): take its mode and owner.
            if kind == EntryType::Directory {
                fchown_mode(dest.as_raw_fd(), uid, gid, mode).map_err(io_err)?;
            }
            continue;
        };
        let parent_key = parents.join(&b'/');
        let parent = match cached.take() {
            Some((k, fd)) if k == parent_key => fd,
            _ => walk(dest.as_raw_fd(), parents, true, ids).map_err(io_err)?,
        };
        let pfd = parent.as_raw_fd();
        let name = cstr(last).map_err(io_err)?;
        match kind {
            EntryType::Directory => {
                // SAFETY: valid fd and NUL-terminated name.
                match cvt(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) }) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let st = lstat_at(pfd, &name).map_err(io_err)?;
                        if !is_dir(&st) {
                            remove_non_dir(pfd, &name).map_err(io_err)?;
                            // SAFETY: as above.
                            cvt(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) })
                                .map_err(io_err)?;
                        }
                    }
                    Err(e) => return Err(io_err(e)),
                }
                let d = open_dir_at(pfd, &name).map_err(io_err)?;
                fchown_mode(d.as_raw_fd(), uid, gid, mode).map_err(io_err)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_non_dir(pfd, &name).map_err(io_err)?;
                let fd = open_at(
                    pfd,
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(io_err)?;
                let mut file = File::from(fd);
                done.bytes += copy_entry(&mut entry, &mut file, &raw)?;
                fchown_mode(file.as_raw_fd(), uid, gid, mode).map_err(io_err)?;
                if let Ok(m) = header.mtime() {
                    set_mtime(file.as_raw_fd(), m).map_err(io_err)?;
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| unsafe_entry(&raw, "is a symlink without a target"))?;
                if !symlink_stays_inside(parents.len(), &target) {
                    return Err(unsafe_entry(
                        &raw,
                        "is a symlink pointing outside the volume",
                    ));
                }
                let t = cstr(&target).map_err(io_err)?;
                remove_non_dir(pfd, &name).map_err(io_err)?;
                // SAFETY: NUL-terminated strings and a valid fd.
                cvt(unsafe { libc::symlinkat(t.as_ptr(), pfd, name.as_ptr()) }).map_err(io_err)?;
                chown_at(pfd, &name, uid, gid).map_err(io_err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| unsafe_entry(&raw, "is a hard link without a target"))?;
                let tcomps = components(&target, false).map_err(|_| {
                    unsafe_entry(&raw, "is a hard link pointing outside the volume")
                })?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(unsafe_entry(&raw, "is a hard link to a directory"));
                };
                let tdir = walk(dest.as_raw_fd(), tparents, false, ids).map_err(io_err)?;
                let tname = cstr(tlast).map_err(io_err)?;
                remove_non_dir(pfd, &name).map_err(io_err)?;
                // SAFETY: valid fds and NUL-terminated names; no AT_SYMLINK_FOLLOW.
                cvt(unsafe {
                    libc::linkat(tdir.as_raw_fd(), tname.as_ptr(), pfd, name.as_ptr(), 0)
                })
                .map_err(io_err)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ft = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                remove_non_dir(pfd, &name).map_err(io_err)?;
                // SAFETY: valid fd and NUL-terminated name.
                cvt(unsafe {
                    libc::mknodat(
                        pfd,
                        name.as_ptr(),
                        ft | (mode & 0o7777) as libc::mode_t,
                        libc::makedev(major, minor),
                    )
                })
                .map_err(io_err)?;
                chown_at(pfd, &name, uid, gid).map_err(io_err)?;
                // After the chown, which clears set-id bits.
                chmod_special_at(pfd, &name, mode).map_err(io_err)?;
            }
            // Metadata entries the reader already applied, and types we do not store.
            _ => {}
        }
        done.entries += 1;
        cached = Some((parent_key, parent));
    }
    Ok(done)
}

/// Copies an entry's data; read errors are the stream's fault, write errors the disk's.
fn copy_entry(from: &mut impl Read, to: &mut File, name: &[u8]) -> Result<u64, ArchiveError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::Malformed(e)),
        };
        to.write_all(&buf[..n]).map_err(|source| ArchiveError::Io {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(name)),
            source,
        })?;
        total += n as u64;
    }
}

/// Decompresses `input` and extracts it (see [`extract`]).
pub fn extract_compressed(
    dest: &OwnedFd,
    input: impl Read,
    encoding: Encoding,
    ids: IdMap,
) -> Result<Extracted, ArchiveError> {
    match encoding {
        Encoding::Gzip => extract(dest, flate2::read::MultiGzDecoder::new(input), ids),
        Encoding::Zstd => {
            let d = zstd::stream::read::Decoder::new(input).map_err(ArchiveError::Malformed)?;
            extract(dest, d, ids)
        }
        Encoding::Raw => extract(dest, input, ids),
    }
}

/// Opens (making it when missing) the directory `comps` under the volume's data dir
/// `root`, never through a symlink. Folders it makes are owned by the volume's root
/// (`ids` maps it).
pub fn open_dest(root: &Path, comps: &[&[u8]], ids: IdMap) -> Result<OwnedFd, ArchiveError> {
    let shown = || String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
    let rootfd = open_dir(root).map_err(|source| ArchiveError::Io {
        path: root.to_owned(),
        source,
    })?;
    walk(rootfd.as_raw_fd(), comps, true, ids).map_err(|source| {
        if is_escape(&source) {
            ArchiveError::BadPath(shown())
        } else {
            ArchiveError::Io {
                path: root.join(shown()),
                source,
            }
        }
    })
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
    let parent = walk(rootfd.as_raw_fd(), parents, false, IdMap::IDENTITY).map_err(io_err)?;
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
        move |source| ArchiveError::Io {
            path: path.clone(),
            source,
        }
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

    /// Appends the entry `name` (archive name) for `st`, read at `dir`/`base`.
    fn entry(
        &mut self,
        dir: RawFd,
        base: &CStr,
        name: Vec<u8>,
        st: &libc::stat,
    ) -> Result<(), ArchiveError> {
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key).cloned() {
                let mut h = self.header(st, EntryType::Link);
                return append(&mut self.b, &mut h, &name, Some(&first), io::empty())
                    .map_err(self.err(&name));
            }
            self.links.insert(key, name.clone());
        }
        match fmt {
            libc::S_IFDIR => {
                let mut h = self.header(st, EntryType::Directory);
                let mut dname = name.clone();
                if dname.last() != Some(&b'/') {
                    dname.push(b'/');
                }
                append(&mut self.b, &mut h, &dname, None, io::empty()).map_err(self.err(&name))?;
                let fd = open_dir_at(dir, base).map_err(self.err(&name))?;
                self.dir(&fd, &dname)
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
        }
    }

    /// Appends the children of the open directory `fd`, named under `prefix` (ends in `/`).
    fn dir(&mut self, fd: &OwnedFd, prefix: &[u8]) -> Result<(), ArchiveError> {
        let listing = Path::new("/proc/self/fd").join(fd.as_raw_fd().to_string());
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(&listing)
            .and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                    .collect::<io::Result<_>>()
            })
            .map_err(self.err(prefix))?;
        names.sort();
        for n in names {
            let base = cstr(&n).map_err(self.err(&n))?;
            let mut name = prefix.to_vec();
            name.extend_from_slice(&n);
            let st = match lstat_at(fd.as_raw_fd(), &base) {
                Ok(st) => st,
                // Removed while we listed: skip, as GNU tar warns and goes on.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(self.err(&name)(e)),
            };
            self.entry(fd.as_raw_fd(), &base, name, &st)?;
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
            p.dir(fd, b"./")?;
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
    b.into_inner().map_err(|source| ArchiveError::Io {
        path: root.to_owned(),
        source,
    })
}

/// Packs `source` and compresses it into `out`.
pub fn pack_compressed<W: Write>(
    source: &Source,
    out: W,
    encoding: Encoding,
    ids: IdMap,
    root: &Path,
) -> Result<W, ArchiveError> {
    let io_err = |source: io::Error| ArchiveError::Io {
        path: root.to_owned(),
        source,
    };
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
