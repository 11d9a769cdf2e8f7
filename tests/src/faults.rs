//! Helpers for the fault, chaos and soak tests: a seeded RNG, process figures from `/proc`,
//! an inotify recorder of what enters and leaves the volume directories, content snapshots
//! of volumes, a raw-TCP central API that can misbehave in every way a network can, and a
//! tmpfs mount guard.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::native::{DesiredSet, DesiredVolume, VolumeReport};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Agent;

/// A number from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A seeded RNG: `seed_var` from the environment, else a fresh seed. The seed is printed
/// so a failing run can be repeated with `<seed_var>=<seed>`.
pub fn seeded_rng(seed_var: &str) -> (StdRng, u64) {
    let seed = std::env::var(seed_var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("seed: {seed_var}={seed}");
    (StdRng::seed_from_u64(seed), seed)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
    })
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Whether `pid` is running (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// The agent's pid, asserting it runs.
pub fn running_pid(agent: &Agent) -> u32 {
    let pid = agent.pid().expect("the agent process was started");
    assert!(alive(pid), "the agent died:\n{}", agent.log());
    pid
}

/// `/healthz` answers 200.
pub async fn healthy(agent: &Agent) -> bool {
    reqwest::Client::new()
        .get(format!("{}/healthz", agent.api))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Total and available bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> (u64, u64) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: an all-zero statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a valid out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let frsize = s.f_frsize as u64;
    (s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize)
}

/// Every regular file below `dir`, by relative path, with its bytes. Symlinks are recorded
/// as `-> target`.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).to_path_buf();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    out.insert(rel.join(""), Vec::new());
                    walk(base, &p, out);
                }
                Ok(m) if m.file_type().is_symlink() => {
                    let t = std::fs::read_link(&p).unwrap_or_default();
                    out.insert(rel, format!("-> {}", t.display()).into_bytes());
                }
                Ok(_) => {
                    out.insert(rel, std::fs::read(&p).unwrap_or_default());
                }
                Err(_) => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Names of the entries of `dir` (empty when it does not exist), sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Which watched directory an event happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Init,
    Live,
    Dead,
}

/// What happened to an entry of a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created or moved in.
    Arrived,
    /// Deleted or moved out.
    Left,
}

#[derive(Debug, Clone)]
pub struct DirEvent {
    pub area: Area,
    pub change: Change,
    pub name: String,
}

/// Records, in the order the kernel queued them, the entries arriving in and leaving
/// `init/`, `live/` and `dead/` of a volumes root. One inotify instance holds the three
/// watches, so the events of all three share one queue and one order. It watches the
/// directories themselves, independent of the agent process, so it keeps recording
/// across SIGKILLs and restarts.
pub struct DirWatch {
    events: Arc<Mutex<Vec<DirEvent>>>,
    overflowed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirWatch {
    pub fn new(root: &Path) -> DirWatch {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let mut wds = Vec::new();
        for (area, name) in [
            (Area::Init, "init"),
            (Area::Live, "live"),
            (Area::Dead, "dead"),
        ] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).expect("make watched dir");
            let c = CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
            let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
            // SAFETY: valid fd and C string.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
            assert!(
                wd >= 0,
                "inotify_add_watch: {}",
                std::io::Error::last_os_error()
            );
            wds.push((wd, area));
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let overflowed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, of, st) = (events.clone(), overflowed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                // SAFETY: reading into our own buffer.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    continue;
                }
                let mut off = 0usize;
                let mut batch = Vec::new();
                while off + 16 <= n as usize {
                    let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
                    let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().expect("4"));
                    let len =
                        u32::from_ne_bytes(buf[off + 12..off + 16].try_into().expect("4")) as usize;
                    let raw = &buf[off + 16..off + 16 + len];
                    let name =
                        String::from_utf8_lossy(raw.split(|b| *b == 0).next().unwrap_or(&[]))
                            .into_owned();
                    off += 16 + len;
                    if mask & libc::IN_Q_OVERFLOW != 0 {
                        of.store(true, Ordering::SeqCst);
                        continue;
                    }
                    let Some(area) = wds.iter().find(|(w, _)| *w == wd).map(|(_, a)| *a) else {
                        continue;
                    };
                    let change = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                        Change::Arrived
                    } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                        Change::Left
                    } else {
                        continue;
                    };
                    batch.push(DirEvent { area, change, name });
                }
                ev.lock().unwrap_or_else(|p| p.into_inner()).extend(batch);
            }
            // SAFETY: closing our own fd once.
            unsafe { libc::close(fd) };
        });
        DirWatch {
            events,
            overflowed,
            stop,
            thread: Some(thread),
        }
    }

    /// Every event so far, in order. Panics if the kernel queue overflowed (order lost).
    pub fn events(&self) -> Vec<DirEvent> {
        assert!(
            !self.overflowed.load(Ordering::SeqCst),
            "the inotify queue overflowed: the recorded order is incomplete"
        );
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many events so far.
    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A tmpfs mounted on a fresh directory; unmounted (lazily) on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"16m"`) at `path`, or says why it could not.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// How the raw central API answers, for every endpoint, until changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The desired set as scripted (304 on a matching ETag), 204 for reports.
    Good,
    /// `500` with a short body.
    Status500,
    /// Accepts the connection and closes it with a TCP reset before reading anything.
    ResetOnAccept,
    /// Reads the request, then resets the connection.
    ResetAfterRequest,
    /// Reads the request and answers nothing for this long, then closes.
    Hang(Duration),
    /// `200` whose body is cut off in the middle of the JSON.
    Malformed,
    /// `200` with a body of this many bytes, streamed with chunked encoding (no length).
    HugeChunked(u64),
    /// `200` announcing `Content-Length` of this many bytes, then streaming them.
    HugeWithLength(u64),
    /// `200` with half the headers, then a reset.
    HalfHeaders,
    /// The desired set with a revision this much lower than the current one, naming
    /// `destroying` every handle in `keep`.
    StaleRevision(u64),
    /// Another worker's set (higher revision), naming every kept handle `destroying`.
    OtherWorker,
    /// An empty desired set with the next revision and `as_of` an hour ahead (so every
    /// volume is old enough to go by absence): the mass-destroy guard must refuse it. The
    /// test bumps the scripted revision past it before answering well again.
    EmptySet,
    /// `404`: this worker is unknown.
    UnknownWorker,
}

/// The scripted truth of the raw central API.
#[derive(Debug, Clone)]
pub struct Truth {
    pub worker: String,
    pub revision: u64,
    pub keep: Vec<DesiredVolume>,
    pub destroying: Vec<protocol::Handle>,
    pub mode: Mode,
}

/// A central API on a raw TCP listener: every answer is written by hand, so it can close,
/// reset, stall, lie about lengths, or stream 100 MiB without holding it.
pub struct RawCentral {
    pub url: String,
    pub truth: Arc<Mutex<Truth>>,
    pub reports: Arc<Mutex<Vec<VolumeReport>>>,
    /// Requests to the desired set served per mode name.
    pub served: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Bytes of huge bodies written before the client went away.
    pub huge_bytes_sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawCentral {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mode_name(m: &Mode) -> String {
    let s = format!("{m:?}");
    s.split('(').next().unwrap_or(&s).to_string()
}

impl RawCentral {
    pub async fn start(worker: &str) -> RawCentral {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw central");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let truth = Arc::new(Mutex::new(Truth {
            worker: worker.to_string(),
            revision: 1,
            keep: Vec::new(),
            destroying: Vec::new(),
            mode: Mode::Good,
        }));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(BTreeMap::new()));
        let huge_bytes_sent = Arc::new(AtomicU64::new(0));
        let (t, r, s, hb) = (
            truth.clone(),
            reports.clone(),
            served.clone(),
            huge_bytes_sent.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (t, r, s, hb) = (t.clone(), r.clone(), s.clone(), hb.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, t, r, s, hb).await;
                });
            }
        });
        RawCentral {
            url,
            truth,
            reports,
            served,
            huge_bytes_sent,
            task,
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Truth) -> R) -> R {
        f(&mut self.truth.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set_mode(&self, mode: Mode) {
        self.with(|t| t.mode = mode);
    }

    /// Desired-set requests served so far in modes named like `mode`.
    pub fn served(&self, mode: &Mode) -> u64 {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&mode_name(mode))
            .copied()
            .unwrap_or(0)
    }

    pub fn reports(&self) -> Vec<VolumeReport> {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every handle reported destroyed so far.
    pub fn destroyed(&self) -> Vec<String> {
        self.reports()
            .into_iter()
            .flat_map(|r| r.destroyed)
            .map(String::from)
            .collect()
    }
}

const CHUNK: usize = 64 * 1024;

/// Makes the coming close of `sock` a TCP reset (`SO_LINGER` zero: nothing blocks).
fn abortive_close(sock: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    truth: Arc<Mutex<Truth>>,
    reports: Arc<Mutex<Vec<VolumeReport>>>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    huge: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mode = truth.lock().unwrap_or_else(|p| p.into_inner()).mode.clone();
    if mode == Mode::ResetOnAccept {
        *served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(mode_name(&mode))
            .or_default() += 1;
        abortive_close(&sock);
        return Ok(());
    }
    // Read the head and the body (by Content-Length).
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..].to_vec();
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let desired = method == "GET" && path.ends_with("/volumes/desired");
    if desired {
        *served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(mode_name(&mode))
            .or_default() += 1;
    }
    let respond = |status: &str, extra: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    let out = match &mode {
        Mode::ResetOnAccept | Mode::ResetAfterRequest => {
            abortive_close(&sock);
            return Ok(());
        }
        Mode::Hang(d) => {
            tokio::time::sleep(*d).await;
            return Ok(());
        }
        Mode::Status500 => respond("500 Internal Server Error", "", b"boom"),
        Mode::HalfHeaders => {
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: applic")
                .await?;
            abortive_close(&sock);
            return Ok(());
        }
        Mode::UnknownWorker if desired => respond(
            "404 Not Found",
            "Content-Type: application/json\r\n",
            b"{\"error\":\"no such worker\"}",
        ),
        Mode::Malformed if desired => respond(
            "200 OK",
            "Content-Type: application/json\r\n",
            b"{\"worker\": \"w1\", \"revision\": 99999, \"volumes\": [{\"handle\": ",
        ),
        Mode::HugeChunked(total) | Mode::HugeWithLength(total) if desired => {
            let chunked = matches!(mode, Mode::HugeChunked(_));
            let headers = if chunked {
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n")
            };
            sock.write_all(headers.as_bytes()).await?;
            let block = vec![b' '; CHUNK];
            let mut sent = 0u64;
            while sent < *total {
                let n = CHUNK.min((*total - sent) as usize);
                let res = if chunked {
                    let mut framed = format!("{n:x}\r\n").into_bytes();
                    framed.extend_from_slice(&block[..n]);
                    framed.extend_from_slice(b"\r\n");
                    sock.write_all(&framed).await
                } else {
                    sock.write_all(&block[..n]).await
                };
                if res.is_err() {
                    break;
                }
                sent += n as u64;
                huge.fetch_add(n as u64, Ordering::Relaxed);
            }
            if chunked && sent >= *total {
                let _ = sock.write_all(b"0\r\n\r\n").await;
            }
            return Ok(());
        }
        _ if desired => {
            let t = truth.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let all_kept: Vec<protocol::Handle> = t.keep.iter().map(|v| v.handle.clone()).collect();
            let set = match &mode {
                Mode::StaleRevision(back) => DesiredSet {
                    worker: t.worker.clone(),
                    revision: t.revision.saturating_sub(*back),
                    as_of: chrono::Utc::now(),
                    volumes: Vec::new(),
                    destroying: all_kept,
                },
                Mode::OtherWorker => DesiredSet {
                    worker: format!("{}-other", t.worker),
                    revision: t.revision + 1000,
                    as_of: chrono::Utc::now(),
                    volumes: Vec::new(),
                    destroying: all_kept,
                },
                Mode::EmptySet => DesiredSet {
                    worker: t.worker.clone(),
                    revision: t.revision + 1,
                    as_of: chrono::Utc::now() + chrono::Duration::hours(1),
                    volumes: Vec::new(),
                    destroying: Vec::new(),
                },
                _ => DesiredSet {
                    worker: t.worker.clone(),
                    revision: t.revision,
                    as_of: chrono::Utc::now(),
                    volumes: t.keep.clone(),
                    destroying: t.destroying.clone(),
                },
            };
            let etag = format!("\"{}-{}\"", mode_name(&mode), set.revision);
            if header("if-none-match").as_deref() == Some(etag.as_str()) {
                respond("304 Not Modified", &format!("ETag: {etag}\r\n"), b"")
            } else {
                let json = serde_json::to_vec(&set).unwrap_or_default();
                respond(
                    "200 OK",
                    &format!("Content-Type: application/json\r\nETag: {etag}\r\n"),
                    &json,
                )
            }
        }
        _ => {
            if method == "PUT" && path.ends_with("/volumes/report") {
                if let Ok(r) = serde_json::from_slice::<VolumeReport>(&body) {
                    reports.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            }
            respond("204 No Content", "", b"")
        }
    };
    sock.write_all(&out).await?;
    sock.flush().await?;
    let _ = sock.shutdown().await;
    // Drain what the client still sends so the close is orderly.
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), sock.read(&mut sink)).await;
    Ok(())
}

/// A synchronous GET of `url`'s status through a fresh connection (no runtime needed).
pub fn blocking_status(url: &str) -> Option<u16> {
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// A wiremock central API serving `script` as worker `w1`'s desired set, taking reports
/// and resource types with 204.
pub async fn mock_central(script: &crate::DesiredScript) -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/workers/w1/volumes/desired"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    for p in [
        "/api/v1/workers/w1/volumes/report",
        "/api/v1/workers/w1/base-resource-types",
    ] {
        Mock::given(method("PUT"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;
    }
    server
}

/// `POST /volumes` for `handle` (copy-on-write from `parent` when set); its data
/// directory, or the status and body of the refusal.
pub async fn try_create(
    local: &crate::Local,
    handle: &str,
    parent: Option<&str>,
) -> Result<PathBuf, String> {
    use protocol::local::VolumeJson;
    let req = crate::create_request(handle, parent);
    let resp = local
        .http
        .post(format!("{}/volumes", local.base))
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status != 201 {
        return Err(format!("{status}: {text}"));
    }
    let v: VolumeJson = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(PathBuf::from(v.path))
}

/// `PUT /volumes/{handle}/state` to `initialized`.
pub async fn try_initialize(local: &crate::Local, handle: &str) -> Result<(), String> {
    let resp = local
        .http
        .put(format!("{}/volumes/{handle}/state", local.base))
        .json(&protocol::local::SetStateRequest {
            state: protocol::VolumeState::Initialized,
        })
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match resp.status().as_u16() {
        204 => Ok(()),
        s => Err(format!(
            "initialize {handle}: {s}: {}",
            resp.text().await.unwrap_or_default()
        )),
    }
}

/// Creates `handle` (copy-on-write from `parent` when set), writes `files` into its data
/// directory, initializes it, and returns its data directory.
pub async fn create_with_files(
    local: &crate::Local,
    handle: &str,
    parent: Option<&str>,
    files: &[(String, Vec<u8>)],
) -> PathBuf {
    let data = try_create(local, handle, parent)
        .await
        .unwrap_or_else(|e| panic!("create {handle}: {e}"));
    for (name, bytes) in files {
        let p = data.join(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).expect("mkdir in volume");
        }
        std::fs::write(&p, bytes).expect("write volume file");
    }
    try_initialize(local, handle)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    data
}

/// `text` without ANSI colour escapes (the agent's human log lines carry them).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
