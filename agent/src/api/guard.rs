//! The local API's door: who may call it and what `import` may read.
//!
//! The agent is root next to untrusted code, so its API serves only trusted local callers
//! (see "Trust model" in the design and SECURITY.md):
//! - every connection's peer is identified by the kernel when it is accepted
//!   ([`on_connect`], [`crate::peercred`]) and every request is checked against
//!   `api.allowed_uids` / `api.allowed_groups` before any route runs ([`guard`]);
//! - a request carrying `Origin` or `Sec-Fetch-Site` comes from a web browser and is
//!   refused, so no web page can drive the API through a loopback port;
//! - `import` reads only beneath `api.import_roots` ([`confine_import`]).
//!
//! Groups: a uid passes through `api.allowed_groups` when its primary group or one of its
//! supplementary groups, as the user database lists them (`getpwuid_r` +
//! `getgrouplist`), is allowed; on the unix socket the peer's gid from `SO_PEERCRED`
//! counts too. TCP reports only a uid, so the database is all there is there.

use std::any::Any;
use std::ffi::CStr;
use std::io;
use std::path::{Component, Path, PathBuf};

use actix_web::body::MessageBody;
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use protocol::local::{CreateVolumeRequest, Strategy};
use tracing::warn;

use super::ApiError;
use crate::peercred::{self, PeerCred};

/// Who may call the API: `api.allowed_uids` and `api.allowed_groups`.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub allowed_uids: Vec<u32>,
    pub allowed_groups: Vec<u32>,
}

/// Headers only web browsers send; their presence refuses a request.
const BROWSER_HEADERS: [&str; 2] = ["origin", "sec-fetch-site"];

/// Refusals logged per minute at most: a local user looping on the API must not flood
/// the journal. Those left out are counted in the next line logged.
const REFUSALS_LOGGED_PER_MINUTE: u32 = 20;

/// A budget of log lines per window; what it holds back is counted, not lost.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>,
}

impl LogBudget {
    pub const fn new(per_window: u32, window: std::time::Duration) -> Self {
        LogBudget {
            per_window,
            window,
            state: std::sync::Mutex::new((None, 0, 0)),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` the lines held back before it;
    /// `None` when this one is held back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, used, held) = &mut *st;
        if start.is_none_or(|s| now.duration_since(s) >= self.window) {
            *start = Some(now);
            *used = 0;
        }
        if *used >= self.per_window {
            *held += 1;
            return None;
        }
        *used += 1;
        Some(std::mem::take(held))
    }
}

static REFUSAL_LOG: LogBudget = LogBudget::new(
    REFUSALS_LOGGED_PER_MINUTE,
    std::time::Duration::from_secs(60),
);

/// `HttpServer::on_connect`: records the peer of a new connection, as the kernel reports
/// it, in the connection's data.
pub fn on_connect(conn: &dyn Any, data: &mut Extensions) {
    let cred = if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        match (tcp.local_addr(), tcp.peer_addr()) {
            (Ok(local), Ok(peer)) => peercred::tcp_peer(local, peer),
            (Err(e), _) | (_, Err(e)) => PeerCred::Unknown {
                reason: format!("the connection's addresses: {e}"),
            },
        }
    } else if let Some(unix) = conn.downcast_ref::<actix_web::rt::net::UnixStream>() {
        peercred::unix_peer(unix)
    } else {
        PeerCred::Unknown {
            reason: "a transport without peer credentials".into(),
        }
    };
    data.insert(cred);
}

/// Middleware (`middleware::from_fn`) in front of every route: refuses browsers and peers
/// the [`Trust`] (in the app data) does not name, with a 403 JSON error.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let trust = req
        .app_data::<web::Data<Trust>>()
        .map(|t| t.get_ref().clone())
        .unwrap_or_default();
    let cred = req
        .conn_data::<PeerCred>()
        .cloned()
        .unwrap_or(PeerCred::Unknown {
            reason: "no peer credentials were recorded for the connection".into(),
        });
    let (method, path) = (req.method().clone(), req.path().to_string());
    if let Err(refusal) = admit(&trust, &cred).await {
        if let Some(held_back) = REFUSAL_LOG.admit(std::time::Instant::now()) {
            warn!(peer = ?cred, %method, %path, held_back, "refused a local API caller: {refusal}");
        }
        return Err(refusal.into());
    }
    if let Some(refusal) = browser_refusal(req.headers()) {
        if let Some(held_back) = REFUSAL_LOG.admit(std::time::Instant::now()) {
            warn!(%method, %path, held_back, "refused a request sent by a web browser: {refusal}");
        }
        return Err(refusal.into());
    }
    next.call(req).await
}

/// A 403 for a request that carries a header only web browsers send.
pub fn browser_refusal(headers: &actix_web::http::header::HeaderMap) -> Option<ApiError> {
    BROWSER_HEADERS
        .iter()
        .find(|h| headers.contains_key(**h))
        .map(|h| {
            ApiError::Forbidden(format!(
                "requests carrying a {h} header come from a web browser and are refused; \
                 the volume-agent API is for the worker's container runtime"
            ))
        })
}

/// Whether `cred` may use the API under `trust`.
async fn admit(trust: &Trust, cred: &PeerCred) -> Result<(), ApiError> {
    let (uid, gid) = match cred {
        PeerCred::Known { uid, gid, .. } => (*uid, *gid),
        PeerCred::Unknown { reason } => {
            return Err(ApiError::Forbidden(format!(
                "the caller's identity cannot be established ({reason}); \
                 connect over loopback or the unix socket from a live process"
            )))
        }
    };
    if trust.allowed_uids.contains(&uid) {
        return Ok(());
    }
    if !trust.allowed_groups.is_empty() {
        let mut groups = web::block(move || user_groups(uid))
            .await
            .map_err(ApiError::from)?
            .unwrap_or_default();
        groups.extend(gid);
        if groups.iter().any(|g| trust.allowed_groups.contains(g)) {
            return Ok(());
        }
    }
    Err(ApiError::Forbidden(format!(
        "uid {uid} may not use the volume-agent API; to allow it, add {uid} to \
         api.allowed_uids or one of its groups to api.allowed_groups in the agent's config"
    )))
}

/// The primary and supplementary groups of `uid` in the user database; empty for a uid
/// without an entry. Blocking (NSS may read files or ask a service).
pub fn user_groups(uid: u32) -> io::Result<Vec<u32>> {
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: every pointer is valid for the length given; `result` says if `pwd` is set.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        break;
    }
    if result.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points at a NUL-terminated name in `buf`.
    let name: &CStr = unsafe { CStr::from_ptr(pwd.pw_name) };
    let primary = pwd.pw_gid;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `n` entries; getgrouplist sets `n` to the count it needs.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), primary, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(usize::try_from(n).unwrap_or(0));
            return Ok(groups);
        }
        let need = usize::try_from(n).unwrap_or(0);
        if need <= groups.len() || need > 1 << 16 {
            return Ok(vec![primary]);
        }
        groups.resize(need, 0);
    }
}

/// Sets the API socket at `path` to mode 0660 (whatever the umask was when it was bound)
/// and, when `group` (a name or a number) is set, to that group.
pub fn secure_socket(path: &Path, group: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !group.is_empty() {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}

/// A group name or number as a gid.
fn resolve_group(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in api.group"))?;
    // SAFETY: a zeroed group is a valid out-parameter; getgrnam_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: every pointer is valid for the length given.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("api.group {group:?}: no such group"),
            ));
        }
        return Ok(grp.gr_gid);
    }
}

/// Confines an `import` create to `roots`: the path, resolved, must lie beneath one of
/// them; the request then carries the resolved path, so what is read is what was checked.
/// Other strategies pass unchanged.
pub async fn confine_import(
    mut req: CreateVolumeRequest,
    roots: &[PathBuf],
) -> Result<CreateVolumeRequest, ApiError> {
    if let Strategy::Import { path, .. } = &mut req.strategy {
        let asked = PathBuf::from(path.as_str());
        let roots = roots.to_vec();
        let resolved = web::block(move || import_source(&asked, &roots)).await??;
        *path = resolved.into_os_string().into_string().map_err(|p| {
            ApiError::Forbidden(format!(
                "import path {path} resolves to {}, which is not UTF-8",
                Path::new(&p).display()
            ))
        })?;
    }
    Ok(req)
}

/// The real path `asked` names, when it lies beneath one of `roots` (compared by whole
/// path components after resolving symlinks and `..` in both). A path that does not
/// exist (yet) is resolved as far as it exists; the rest must be plain names. Blocking.
pub fn import_source(asked: &Path, roots: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let refuse = |why: &str| {
        ApiError::Forbidden(format!(
            "import path {} {why}; imports are read only beneath api.import_roots ({}); \
             add a directory there to allow it",
            asked.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    if !asked.is_absolute() {
        return Err(refuse("is not absolute"));
    }
    let resolved = resolve_existing_prefix(asked).ok_or_else(|| refuse("cannot be resolved"))?;
    let inside = roots
        .iter()
        .any(|root| std::fs::canonicalize(root).is_ok_and(|root| resolved.starts_with(&root)));
    if !inside {
        return Err(refuse(&format!(
            "(resolved: {}) is outside them",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// `canonicalize` of the longest existing ancestor of `path`, with the remaining plain
/// names appended; `None` when a `..` or `.` would follow a missing directory.
fn resolve_existing_prefix(path: &Path) -> Option<PathBuf> {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        match std::fs::canonicalize(at) {
            Ok(mut real) => {
                for name in missing.iter().rev() {
                    real.push(name);
                }
                return Some(real);
            }
            Err(_) => {
                match at.components().next_back()? {
                    Component::Normal(name) => missing.push(name.to_owned()),
                    _ => return None,
                }
                at = at.parent()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_log_holds_back_a_flood_and_counts_it_in_the_next_line() {
        use std::time::{Duration, Instant};
        let budget = LogBudget::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let first: Vec<_> = (0..10).map(|_| budget.admit(t0)).collect();
        assert_eq!(&first[..3], &[Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none), "{first:?}");
        // The next window logs again, saying how many lines it held back.
        assert_eq!(budget.admit(t0 + Duration::from_secs(60)), Some(7));
        assert_eq!(budget.admit(t0 + Duration::from_secs(61)), Some(0));
    }

    #[test]
    fn import_is_confined_to_the_roots_by_whole_components() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("types");
        std::fs::create_dir_all(root.join("git/rootfs")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("types-evil")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("outside")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("escape"))
            .expect("symlink");
        std::os::unix::fs::symlink(root.join("git"), dir.path().join("outside/in"))
            .expect("symlink");
        let roots = vec![root.clone()];
        let real_root = std::fs::canonicalize(&root).expect("canon");

        let ok = import_source(&root.join("git/rootfs"), &roots).expect("inside");
        assert_eq!(ok, real_root.join("git/rootfs"));
        // A symlink from outside into the roots resolves inside: allowed, and the
        // resolved path is what gets read.
        let via = import_source(&dir.path().join("outside/in/rootfs"), &roots).expect("in");
        assert_eq!(via, real_root.join("git/rootfs"));
        // Missing beneath a root: allowed here, the create then fails as missing.
        let missing = import_source(&root.join("git/nope.tgz"), &roots).expect("missing");
        assert_eq!(missing, real_root.join("git/nope.tgz"));

        for bad in [
            dir.path().join("types-evil"),
            root.join("escape"),
            root.join("../outside"),
            root.join("nope/../../outside"),
            PathBuf::from("/etc"),
            PathBuf::from("relative/path"),
        ] {
            let err = import_source(&bad, &roots).expect_err(&bad.display().to_string());
            assert!(matches!(err, ApiError::Forbidden(_)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&bad.display().to_string()), "{msg}");
            assert!(msg.contains("api.import_roots"), "{msg}");
        }
        // A root that does not exist admits nothing.
        let err = import_source(Path::new("/etc"), &[dir.path().join("gone")]).expect_err("gone");
        assert!(matches!(err, ApiError::Forbidden(_)));
    }

    #[actix_rt::test]
    async fn admits_allowed_uids_and_members_of_allowed_groups_only() {
        let trust = Trust {
            allowed_uids: vec![0],
            allowed_groups: vec![],
        };
        let known = |uid, gid| PeerCred::Known {
            uid,
            gid,
            transport: peercred::Transport::Tcp,
        };
        assert!(admit(&trust, &known(0, None)).await.is_ok());
        let err = admit(&trust, &known(65534, None))
            .await
            .expect_err("nobody");
        let msg = err.to_string();
        assert!(msg.contains("uid 65534"), "{msg}");
        assert!(msg.contains("api.allowed_uids"), "{msg}");
        assert!(msg.contains("api.allowed_groups"), "{msg}");
        let unknown = PeerCred::Unknown {
            reason: "gone".into(),
        };
        assert!(admit(&trust, &unknown).await.is_err());

        // The peer's gid (unix socket) counts; so do the user database's groups of uid 0.
        let by_gid = Trust {
            allowed_uids: vec![],
            allowed_groups: vec![4242],
        };
        assert!(admit(&by_gid, &known(65534, Some(4242))).await.is_ok());
        assert!(admit(&by_gid, &known(65534, Some(1))).await.is_err());
        let root_groups = user_groups(0).expect("groups of root");
        assert!(root_groups.contains(&0), "{root_groups:?}");
        let by_db = Trust {
            allowed_uids: vec![],
            allowed_groups: vec![0],
        };
        assert!(admit(&by_db, &known(0, None)).await.is_ok());
        assert!(user_groups(4_000_000_000).expect("no entry").is_empty());
    }
}
