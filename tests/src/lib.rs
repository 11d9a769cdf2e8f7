//! Helpers shared by the end-to-end tests: the real `volume-agent` binary as a process,
//! a scriptable central API on wiremock, and a client for the agent's local API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use protocol::local::{CreateVolumeRequest, SetStateRequest, Strategy, VolumeJson};
use protocol::native::{DesiredSet, DesiredVolume, ResourceTypesReport, VolumeReport};
use protocol::{Handle, VolumeState};
use serde_json::Value;
use wiremock::{Request, Respond, ResponseTemplate};

pub use wiremock;

pub mod faults;
pub mod lazyfs;
pub mod metrics;
pub mod system;

/// How long a test waits for something that should happen within a few poll intervals.
/// A guard against hangs, not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `volume-agent` binary under test: its `main.rs` built in this package (see
/// `src/bin/agent-under-test.rs`). Integration tests pass `env!("CARGO_BIN_EXE_agent-under-test")`
/// through [`set_binary`]; the default finds it beside the test executable.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VOLUME_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps/, a binary of this package from
    // target/<profile>/; the agent sits in target/<profile>/ either way.
    let dir = exe.parent().expect("executable's directory");
    let beside = dir.join("agent-under-test");
    if beside.exists() {
        return beside;
    }
    dir.parent()
        .expect("target/<profile>")
        .join("agent-under-test")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// A loopback port that was free a moment ago, and never handed out before in this test
/// process: an agent stopped and started again keeps its port, and no other agent this
/// harness starts takes it in between.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free loopback port");
        if GIVEN.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return port;
        }
    }
}

/// What a test may change in the agent's configuration.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub worker: String,
    pub dialect: &'static str,
    pub poll_interval: &'static str,
    pub report_interval: &'static str,
    pub unknown_grace: &'static str,
    pub request_timeout: &'static str,
    pub max_body_bytes: u64,
    pub token_file: Option<PathBuf>,
    /// `api.max_body_bytes` (the local API's JSON body limit); `None` = the default.
    pub api_max_body_bytes: Option<u64>,
    /// `volumes.scan_interval` (how often records are compared with their directories);
    /// `None` = the agent's default.
    pub scan_interval: Option<&'static str>,
    /// Appended to the `[gc]` section.
    pub extra: String,
    /// Where `state/` and `volumes/` go; `None` = the agent's temporary directory (which
    /// keeps the config and the log either way).
    pub data_dir: Option<PathBuf>,
    /// Appended to the `[central]` section (e.g. `ca_file = "..."`).
    pub central_extra: String,
    /// Appended to the `[api]` section (e.g. `allowed_uids = [0, 65534]`).
    pub api_extra: String,
    /// `api.import_roots`; `None` = the agent's [`Agent::imports_dir`].
    pub import_roots: Option<Vec<PathBuf>>,
    /// Listen on a unix socket in the agent's directory instead of a loopback port.
    pub unix_socket: bool,
    /// The umask the agent process starts with; `None` = inherited.
    pub umask: Option<u32>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            worker: "w1".into(),
            dialect: "native",
            poll_interval: "200ms",
            report_interval: "500ms",
            unknown_grace: "5m",
            request_timeout: "2s",
            max_body_bytes: 1 << 20,
            token_file: None,
            api_max_body_bytes: None,
            scan_interval: None,
            extra: String::new(),
            data_dir: None,
            central_extra: String::new(),
            api_extra: String::new(),
            import_roots: None,
            unix_socket: false,
            umask: None,
        }
    }
}

/// A running `volume-agent run` process on temporary directories.
pub struct Agent {
    pub api: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Holds `state/` and `volumes/` (see [`AgentSettings::data_dir`]).
    data: PathBuf,
    umask: Option<u32>,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent against `central_url` and waits until its API is ready.
    pub fn start(central_url: &str, settings: &AgentSettings) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let data = settings
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().to_owned());
        let types = dir.path().join("resource-types");
        std::fs::create_dir_all(&types).expect("types dir");
        let imports = dir.path().join("imports");
        std::fs::create_dir_all(&imports).expect("imports dir");
        let import_roots = settings
            .import_roots
            .clone()
            .unwrap_or_else(|| vec![imports]);
        let (listen, api) = if settings.unix_socket {
            let sock = dir.path().join("api.sock");
            (
                format!("unix:{}", sock.display()),
                format!("unix:{}", sock.display()),
            )
        } else {
            (
                format!("127.0.0.1:{port}"),
                format!("http://127.0.0.1:{port}"),
            )
        };
        let config = format!(
            "worker_name = \"{worker}\"\n\
             [central]\nurl = \"{central_url}\"\ndialect = \"{dialect}\"\npoll_interval = \"{poll}\"\n\
             report_interval = \"{report}\"\n{token}request_timeout = \"{timeout}\"\nmax_body_bytes = {max_body}\nmax_backoff = \"2s\"\n{central_extra}\n\
             [volumes]\nroot = {root:?}\ndriver = \"naive\"\n{scan}[state]\ndir = {state:?}\n\
             [api]\nlisten = \"{listen}\"\nimport_roots = {import_roots:?}\n{api_limit}{api_extra}\n[resource_types]\ndir = {types:?}\nrescan_interval = \"200ms\"\n\
             [gc]\nunknown_grace = \"{grace}\"\n{extra}",
            worker = settings.worker,
            token = settings
                .token_file
                .as_ref()
                .map(|t| format!("token_file = {t:?}\n"))
                .unwrap_or_default(),
            dialect = settings.dialect,
            poll = settings.poll_interval,
            report = settings.report_interval,
            timeout = settings.request_timeout,
            max_body = settings.max_body_bytes,
            root = data.join("volumes"),
            scan = settings
                .scan_interval
                .map(|s| format!("scan_interval = \"{s}\"\n"))
                .unwrap_or_default(),
            state = data.join("state"),
            grace = settings.unknown_grace,
            api_limit = settings
                .api_max_body_bytes
                .map(|n| format!("max_body_bytes = {n}\n"))
                .unwrap_or_default(),
            extra = settings.extra,
            central_extra = settings.central_extra,
            api_extra = settings.api_extra,
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut agent = Agent {
            api,
            dir,
            config_path,
            data,
            umask: settings.umask,
            child: None,
        };
        agent.spawn();
        agent
    }

    /// Starts (again) the process on the same directories and waits for readiness.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("open agent log");
        let mut cmd = Command::new(agent_binary());
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,volume_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask(2) is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start volume-agent");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(resp) = probe::blocking_get(&self.api, "/readyz") {
                if resp == 200 {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("volume-agent exited early ({status}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "volume-agent not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn root(&self) -> PathBuf {
        self.data.join("volumes")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.data.join("state")
    }

    pub fn types_dir(&self) -> PathBuf {
        self.dir.path().join("resource-types")
    }

    /// The default `api.import_roots` of a test agent: import sources go beneath it.
    pub fn imports_dir(&self) -> PathBuf {
        self.dir.path().join("imports")
    }

    /// The API's unix socket, when it listens on one.
    pub fn socket(&self) -> Option<PathBuf> {
        self.api.strip_prefix("unix:").map(PathBuf::from)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        child.wait().ok().and_then(|s| s.code())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- volume-agent log ----\n{}", self.log());
        }
    }
}

mod probe {
    //! A tiny blocking HTTP/1.1 client for readiness checks (no runtime needed).
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// `GET path` from `base`: `http://HOST:PORT` or `unix:/PATH`.
    pub fn blocking_get(base: &str, path: &str) -> std::io::Result<u16> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut buf = String::new();
        if let Some(sock) = base.strip_prefix("unix:") {
            let mut s = UnixStream::connect(sock)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_string(&mut buf)?;
        } else {
            let mut s = TcpStream::connect(base.trim_start_matches("http://"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_string(&mut buf)?;
        }
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status line"))
    }
}

/// Client for the agent's local API.
pub struct Local {
    pub base: String,
    pub http: reqwest::Client,
}

impl Local {
    pub fn new(agent: &Agent) -> Local {
        match agent.socket() {
            Some(sock) => Local {
                base: "http://localhost".into(),
                http: reqwest::Client::builder()
                    .unix_socket(sock)
                    .build()
                    .expect("unix socket client"),
            },
            None => Local {
                base: agent.api.clone(),
                http: reqwest::Client::new(),
            },
        }
    }

    /// Creates a volume (cow when `parent` is set), puts a file in it, and initializes it.
    pub async fn make(&self, handle: &str, parent: Option<&str>) -> VolumeJson {
        let req = create_request(handle, parent);
        let resp = self
            .http
            .post(format!("{}/volumes", self.base))
            .json(&req)
            .send()
            .await
            .expect("create request");
        assert_eq!(
            resp.status(),
            201,
            "create {handle}: {}",
            resp.text().await.unwrap_or_default()
        );
        let v: VolumeJson = resp.json().await.expect("volume json");
        std::fs::write(Path::new(&v.path).join(format!("{handle}.txt")), handle)
            .expect("write data");
        let resp = self
            .http
            .put(format!("{}/volumes/{handle}/state", self.base))
            .json(&SetStateRequest {
                state: VolumeState::Initialized,
            })
            .send()
            .await
            .expect("state request");
        assert_eq!(resp.status(), 204, "initialize {handle}");
        v
    }

    /// `GET /inventory`: every record, whatever its state (baggageclaim's `GET /volumes`
    /// hides volumes being created or destroyed).
    pub async fn list(&self) -> Vec<VolumeJson> {
        self.http
            .get(format!("{}/inventory", self.base))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("list json")
    }

    pub async fn handles(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .list()
            .await
            .into_iter()
            .map(|v| v.handle.to_string())
            .collect();
        v.sort();
        v
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until the counter `series` reaches `at_least` (see [`eventually`]).
    pub async fn wait_counter(&self, what: &str, series: &str, at_least: f64) {
        eventually(what, || async {
            self.metric(series).await.unwrap_or(0.0) >= at_least
        })
        .await;
    }

    /// The value of one metric line (`name{labels}` exactly as exported).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        series_value(&self.metrics().await, series)
    }
}

/// The value of one series (`name{labels}` exactly as exported) in an exposition.
pub fn series_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// `POST /volumes` body for an unprivileged volume without properties: empty, or a
/// copy-on-write child of `parent`.
pub fn create_request(handle: &str, parent: Option<&str>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        handle: h(handle),
        strategy: match parent {
            None => Strategy::Empty,
            Some(p) => Strategy::Cow { volume: h(p) },
        },
        properties: Default::default(),
        privileged: false,
        ttl: None,
    }
}

pub fn h(s: &str) -> Handle {
    Handle::new(s).expect("test handle")
}

/// Waits until `check` holds, polling; panics with `what` after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A scriptable native-dialect desired set: tests change it while the agent polls.
#[derive(Clone)]
pub struct DesiredScript(pub Arc<Mutex<ScriptState>>);

pub struct ScriptState {
    pub worker: String,
    pub revision: u64,
    pub as_of: Option<DateTime<Utc>>,
    pub keep: Vec<DesiredVolume>,
    pub destroying: Vec<Handle>,
    /// When set, answered instead of the desired set.
    pub override_response: Option<ResponseTemplate>,
}

impl DesiredScript {
    pub fn new(worker: &str) -> DesiredScript {
        DesiredScript(Arc::new(Mutex::new(ScriptState {
            worker: worker.into(),
            revision: 1,
            as_of: None,
            keep: Vec::new(),
            destroying: Vec::new(),
            override_response: None,
        })))
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut ScriptState) -> R) -> R {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    /// Sets the set to keep and to destroy, and bumps the revision.
    pub fn set(&self, keep: &[(&str, Option<&str>)], destroying: &[&str]) {
        self.with(|s| {
            s.keep = keep
                .iter()
                .map(|(k, p)| DesiredVolume {
                    handle: h(k),
                    parent: p.map(h),
                })
                .collect();
            s.destroying = destroying.iter().map(|d| h(d)).collect();
            s.revision += 1;
        });
    }
}

impl Respond for DesiredScript {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.with(|s| {
            if let Some(r) = &s.override_response {
                return r.clone();
            }
            let etag = format!("\"{}\"", s.revision);
            let inm = req
                .headers
                .get("if-none-match")
                .and_then(|v| v.to_str().ok());
            if inm == Some(etag.as_str()) {
                return ResponseTemplate::new(304);
            }
            let set = DesiredSet {
                worker: s.worker.clone(),
                revision: s.revision,
                as_of: s.as_of.unwrap_or_else(Utc::now),
                volumes: s.keep.clone(),
                destroying: s.destroying.clone(),
            };
            ResponseTemplate::new(200)
                .insert_header("ETag", etag.as_str())
                .set_body_json(&set)
        })
    }
}

/// The native reports the central side received, in order.
pub async fn reports(server: &wiremock::MockServer) -> Vec<VolumeReport> {
    requests_to(server, "/volumes/report")
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect()
}

/// The resource type reports received, in order.
pub async fn type_reports(server: &wiremock::MockServer) -> Vec<ResourceTypesReport> {
    requests_to(server, "/base-resource-types")
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect()
}

pub async fn requests_to(server: &wiremock::MockServer, suffix: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path().ends_with(suffix))
        .collect()
}

/// Every handle reported destroyed, in order, over all reports.
pub async fn destroyed(server: &wiremock::MockServer) -> Vec<String> {
    reports(server)
        .await
        .into_iter()
        .flat_map(|r| r.destroyed)
        .map(String::from)
        .collect()
}

/// JSON of a request body.
pub fn body_json(r: &Request) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

// ---- baggageclaim's async creates (`POST /volumes-async`), as its client drives them ----

pub fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// `POST /volumes-async`, asserting the 201 `{"handle"}` answer.
pub async fn create_async(local: &Local, body: Value) {
    let resp = local
        .http
        .post(format!("{}/volumes-async", local.base))
        .json(&body)
        .send()
        .await
        .expect("create-async");
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    assert_eq!(content_type(&resp), "application/json");
    let v: Value = resp.json().await.expect("future json");
    assert_eq!(v, serde_json::json!({"handle": body["handle"]}));
}

/// Polls `GET /volumes-async/H` while it answers 204; returns the final status and body.
pub async fn poll(local: &Local, h: &str) -> (reqwest::StatusCode, String, Value) {
    loop {
        let resp = local
            .http
            .get(format!("{}/volumes-async/{h}", local.base))
            .send()
            .await
            .expect("poll");
        if resp.status() != reqwest::StatusCode::NO_CONTENT {
            let status = resp.status();
            let ct = content_type(&resp);
            let body = resp.json().await.unwrap_or(Value::Null);
            return (status, ct, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn cancel(local: &Local, h: &str) -> reqwest::StatusCode {
    local
        .http
        .delete(format!("{}/volumes-async/{h}", local.base))
        .send()
        .await
        .expect("cancel")
        .status()
}

/// Creates `h` the baggageclaim way and returns the volume JSON.
pub async fn make_async(local: &Local, h: &str, strategy: Value, privileged: bool) -> Value {
    let mut body = serde_json::json!({"handle": h, "strategy": strategy, "properties": null});
    if privileged {
        body["privileged"] = serde_json::json!(true);
    }
    create_async(local, body).await;
    let (status, _, v) = poll(local, h).await;
    assert_eq!(status, reqwest::StatusCode::OK, "create {h}: {v}");
    assert_eq!(cancel(local, h).await, reqwest::StatusCode::NO_CONTENT);
    v
}
