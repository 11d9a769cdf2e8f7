//! Real `volume-agent` processes beside the simulated workers: each on a temporary
//! directory of its own (volumes root, state, config, credential, log), polling and
//! reporting to a replica like any worker. A driver makes builds on them through the
//! scheduler API and the agent's local API (an empty volume made `initialized`, then a
//! copy-on-write child of it) and releases them after their lifetime. A watcher checks
//! the disk: a volume directory may go only once its build is released, never a parent
//! before its child, and every released one must be gone by the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use protocol::Handle;
use reqwest::Method;
use serde_json::json;
use tokio::sync::watch;
use volume_central::Db;

use crate::scheduler::Api;
use crate::stats::{lock, Recorder};

/// One real agent process and its directories.
pub struct RealAgent {
    pub name: String,
    /// `http://127.0.0.1:PORT`: its local API.
    pub api: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// How a real agent is configured, as the simulated workers are.
#[derive(Debug, Clone)]
pub struct RealSettings {
    pub binary: PathBuf,
    pub poll_interval: Duration,
    pub report_interval: Duration,
    pub max_backoff: Duration,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl RealAgent {
    /// Starts `volume-agent run` for worker `name` against `central` with `token`, and
    /// waits until its local API is ready.
    pub async fn start(
        settings: &RealSettings,
        name: &str,
        central: &str,
        token: &str,
    ) -> Result<RealAgent> {
        let dir = tempfile::Builder::new()
            .prefix("fleet-sim-agent-")
            .tempdir()
            .context("a temporary directory for a real agent")?;
        let d = dir.path();
        for sub in ["volumes", "state", "imports", "resource-types"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let token_file = d.join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        }
        let port = free_port()?;
        let dur = |x: Duration| humantime::format_duration(x).to_string();
        let config = format!(
            "worker_name = {name:?}\n\
             [central]\nurl = {central:?}\ndialect = \"native\"\ntoken_file = {token_file:?}\n\
             poll_interval = {poll:?}\nreport_interval = {report:?}\nmax_backoff = {backoff:?}\n\
             [volumes]\nroot = {root:?}\ndriver = \"naive\"\n\
             [state]\ndir = {state:?}\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\nimport_roots = [{imports:?}]\n\
             [resource_types]\ndir = {types:?}\n\
             [gc]\nmin_free = \"0%\"\n",
            poll = dur(settings.poll_interval),
            report = dur(settings.report_interval),
            backoff = dur(settings.max_backoff),
            root = d.join("volumes"),
            state = d.join("state"),
            imports = d.join("imports"),
            types = d.join("resource-types"),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(d.join("agent.log"))?;
        let child = Command::new(&settings.binary)
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", settings.binary.display()))?;
        let mut agent = RealAgent {
            name: name.to_string(),
            api: format!("http://127.0.0.1:{port}"),
            dir,
            child: Some(child),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{}/readyz", agent.api))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(agent);
            }
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(anyhow!(
                    "real agent {name} exited early ({status}):\n{}",
                    agent.log()
                ));
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("real agent {name} not ready:\n{}", agent.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("volumes")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Stops the process (SIGKILL: nothing of it is checked after the run).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A volume made on a real agent: where its directory is, its parent, and whether its
/// directory was seen gone.
struct Made {
    worker: String,
    handle: Handle,
    parent: Option<Handle>,
    path: PathBuf,
    gone: bool,
}

/// What the driver and the watcher share.
#[derive(Default)]
pub struct Real {
    made: Mutex<Vec<Made>>,
    pub builds: AtomicU64,
    pub failed_builds: AtomicU64,
    /// Volume directories seen gone from a real agent's disk.
    pub gone: AtomicU64,
}

impl Real {
    /// One pass of the watcher: every volume directory gone since the last pass is a
    /// destroy (a violation unless released, or while its child is still there).
    pub fn watch(&self, rec: &Recorder) {
        let mut made = lock(&self.made);
        let exists: Vec<bool> = made.iter().map(|m| m.path.exists()).collect();
        for i in 0..made.len() {
            if made[i].gone || exists[i] {
                continue;
            }
            let child_left = made.iter().zip(&exists).any(|(c, &e)| {
                e && c.worker == made[i].worker && c.parent.as_ref() == Some(&made[i].handle)
            });
            if child_left {
                rec.violation(format!(
                    "{}: parent {} gone from disk before its child",
                    made[i].worker, made[i].handle
                ));
            }
            made[i].gone = true;
            self.gone.fetch_add(1, Relaxed);
            rec.destroyed(&made[i].worker, &made[i].handle);
        }
    }
}

/// The local API: create a volume, then make it `initialized`. Its data path.
async fn local_create(
    http: &reqwest::Client,
    agent: &str,
    handle: &Handle,
    parent: Option<&Handle>,
) -> Result<PathBuf> {
    let strategy = match parent {
        Some(p) => json!({"type": "cow", "volume": p.as_str()}),
        None => json!({"type": "empty"}),
    };
    let resp = http
        .post(format!("{agent}/volumes"))
        .json(&json!({"handle": handle.as_str(), "strategy": strategy}))
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(anyhow!(
            "create {handle}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
    }
    let v: serde_json::Value = resp.json().await?;
    let path = PathBuf::from(v["path"].as_str().ok_or_else(|| anyhow!("no path"))?);
    std::fs::write(path.join("data.txt"), handle.as_str())?;
    let resp = http
        .put(format!("{agent}/volumes/{handle}/state"))
        .json(&json!({"state": "initialized"}))
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(anyhow!("initialize {handle}: {}", resp.status()));
    }
    Ok(path)
}

/// Waits until the agent's report made `handle`'s row leave `creating`.
async fn reported(db: &Db, handle: &Handle, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(c) = db.client().await {
            let state: Option<String> = c
                .query_opt(
                    "SELECT state::text FROM volumes WHERE handle = $1",
                    &[&handle.as_str()],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0));
            if state.as_deref().is_some_and(|s| s != "creating") {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// One build on a real agent: its container, an empty parent volume initialized, a
/// copy-on-write child. The handles made (to release), or an error after which what was
/// made is released.
async fn build(
    api: &Api,
    db: &Db,
    http: &reqwest::Client,
    real: &Real,
    (agent, worker): (&str, &str),
    n: u64,
    confirm: Duration,
) -> Result<()> {
    let container = format!("rb{n}");
    let wpath = format!("/api/v1/workers/{worker}");
    api.create_container(worker, &container)
        .await
        .map_err(|c| anyhow!("container: {c}"))?;
    let p = Handle::new(format!("rb{n}-p"))?;
    let c = Handle::new(format!("rb{n}-c"))?;
    api.call(
        Method::POST,
        format!("{wpath}/volumes"),
        Some(json!({"handle": p.as_str(), "container": container})),
    )
    .await
    .map_err(|s| anyhow!("volume row {p}: {s}"))?;
    // Held (and watched) once it exists on the agent: a create that failed leaves
    // nothing on disk to be gone.
    let path = local_create(http, agent, &p, None).await?;
    api.rec.hold([p.clone()]);
    lock(&real.made).push(Made {
        worker: worker.to_string(),
        handle: p.clone(),
        parent: None,
        path,
        gone: false,
    });
    if !reported(db, &p, confirm).await {
        return Err(anyhow!("{p} not reported within {confirm:?}"));
    }
    api.call(
        Method::PUT,
        format!("/api/v1/volumes/{p}/state"),
        Some(json!({"state": "initialized"})),
    )
    .await
    .map_err(|s| anyhow!("initialize row {p}: {s}"))?;
    api.call(
        Method::POST,
        format!("{wpath}/volumes"),
        Some(json!({"handle": c.as_str(), "parent": p.as_str(), "container": container})),
    )
    .await
    .map_err(|s| anyhow!("volume row {c}: {s}"))?;
    let path = local_create(http, agent, &c, Some(&p)).await?;
    api.rec.hold([c.clone()]);
    lock(&real.made).push(Made {
        worker: worker.to_string(),
        handle: c,
        parent: Some(p),
        path,
        gone: false,
    });
    Ok(())
}

/// Releases build `n` on `worker` (its container deleted); retried until it is taken.
async fn release(api: &Api, worker: &str, n: u64, handles: &[Handle]) {
    api.rec.release(handles);
    for _ in 0..100 {
        if api.delete_container(worker, &format!("rb{n}")).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Drives builds on the real agents, one at a time per agent, each held `lifetime`,
/// until `stop` (each releases its last build as it stops); failures are printed.
pub async fn drive(
    api: Api,
    db: Db,
    agents: Vec<(String, String)>,
    real: Arc<Real>,
    lifetime: Duration,
    confirm: Duration,
    stop: watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    let mut tasks = Vec::new();
    for (k, (worker, agent)) in agents.into_iter().enumerate() {
        let (api, db, http, real, stop) = (
            api.clone(),
            db.clone(),
            http.clone(),
            real.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = (k as u64) << 32;
            while !*stop.borrow() {
                n += 1;
                let result = build(&api, &db, &http, &real, (&agent, &worker), n, confirm).await;
                let handles = [
                    Handle::new(format!("rb{n}-p")),
                    Handle::new(format!("rb{n}-c")),
                ]
                .into_iter()
                .filter_map(Result::ok)
                .collect::<Vec<_>>();
                match result {
                    Ok(()) => {
                        real.builds.fetch_add(1, Relaxed);
                        let mut s = stop.clone();
                        tokio::select! {
                            () = tokio::time::sleep(lifetime) => {}
                            _ = s.changed() => {}
                        }
                    }
                    Err(e) => {
                        real.failed_builds.fetch_add(1, Relaxed);
                        println!("real agent {worker}: build rb{n} failed: {e:#}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                release(&api, &worker, n, &handles).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Where `volume-agent` is by default: beside this executable (`cargo build --release`
/// puts both in `target/release/`).
pub fn default_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("volume-agent");
    p.exists().then_some(p)
}
