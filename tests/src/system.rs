//! The whole system in one process: volume-central (one or more replicas, in process) on
//! a fresh database of the shared throwaway PostgreSQL cluster, and real agents pointed
//! at it. What a scheduler would do (containers, resource caches, volume rows) goes
//! through volume-central's scheduler API; what a build would do on the worker goes
//! through the agent's local API, so disk and database match.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use volume_central::auth::Subject;
use volume_central::testing::PgCluster;

use crate::{eventually, Agent, AgentSettings, Local};

/// One volume-central instance. Several instances on one database are replicas.
/// Authentication is on: the harness holds a scheduler's and an operator's credential,
/// and each [`Worker`] gets its own.
pub struct Central {
    pub server: volume_central::Server,
    config: volume_central::Config,
    http: reqwest::Client,
    scheduler: String,
    operator: String,
}

impl Central {
    /// A fresh, migrated database and a first instance on it: GC every 300 ms, a 2 s
    /// missing grace.
    pub async fn start() -> Central {
        let url = PgCluster::shared()
            .create_database()
            .expect("a fresh database");
        let mut config = volume_central::Config::with_database_url(url);
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.gc_interval = Duration::from_millis(300);
        config.missing_grace = Duration::from_secs(2);
        config.http_workers = 1;
        volume_central::migrate(&config).await.expect("migrate");
        let db = volume_central::Db::connect(&config.resolve_database_url().expect("url"), 1)
            .expect("pool");
        let scheduler = issue(&db, Subject::Scheduler).await;
        let operator = issue(&db, Subject::Operator).await;
        Central::on(config, scheduler, operator).await
    }

    /// Another instance on the same database, on its own port.
    pub async fn replica(&self) -> Central {
        Central::on(
            self.config.clone(),
            self.scheduler.clone(),
            self.operator.clone(),
        )
        .await
    }

    async fn on(config: volume_central::Config, scheduler: String, operator: String) -> Central {
        let server = volume_central::start(&config)
            .await
            .expect("start volume-central");
        Central {
            server,
            config,
            http: reqwest::Client::new(),
            scheduler,
            operator,
        }
    }

    /// Issues worker `name`'s credential (which registers the worker); its token.
    pub async fn worker_token(&self, name: &str) -> String {
        issue(self.server.db(), Subject::Worker(name.into())).await
    }

    /// The base URL agents are pointed at.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server.url())
    }

    /// One request; the status and the JSON body (`Null` when there is none).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.api(path))
            .bearer_auth(&self.scheduler);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("central request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("central response body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// One request that must succeed; its JSON body.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let what = format!("{method} {path}");
        let (status, body) = self.call(method, path, body).await;
        assert!((200..300).contains(&status), "{what}: {status} {body}");
        body
    }

    pub async fn container(&self, worker: &str, handle: &str) {
        self.ok(
            Method::POST,
            &format!("/workers/{worker}/containers"),
            Some(json!({ "handle": handle })),
        )
        .await;
    }

    /// The container goes (its build ended): its volumes lose it.
    pub async fn end_container(&self, worker: &str, handle: &str) {
        self.ok(
            Method::DELETE,
            &format!("/workers/{worker}/containers/{handle}"),
            None,
        )
        .await;
    }

    /// A resource config on a base resource type; its id.
    pub async fn resource_config(&self, base_type: &str, source_hash: &str) -> i64 {
        let body = self
            .ok(
                Method::POST,
                "/resource-configs",
                Some(json!({"base_resource_type": base_type, "source_hash": source_hash})),
            )
            .await;
        body["id"].as_i64().expect("config id")
    }

    /// A resource cache with its first use by `build`; its id.
    pub async fn resource_cache(&self, config: i64, version: &str, build: i64) -> i64 {
        let body = self
            .ok(
                Method::POST,
                "/resource-caches",
                Some(json!({"resource_config": config, "version": version, "build": build})),
            )
            .await;
        body["id"].as_i64().expect("cache id")
    }

    pub async fn add_cache_use(&self, cache: i64, build: i64) {
        self.ok(
            Method::POST,
            &format!("/resource-caches/{cache}/uses/{build}"),
            None,
        )
        .await;
    }

    pub async fn end_cache_use(&self, cache: i64, build: i64) {
        self.ok(
            Method::DELETE,
            &format!("/resource-caches/{cache}/uses/{build}"),
            None,
        )
        .await;
    }

    /// The worker's volume rows, as the scheduler API lists them.
    pub async fn rows(&self, worker: &str) -> Vec<Value> {
        let body = self
            .ok(Method::GET, &format!("/workers/{worker}/volumes"), None)
            .await;
        body.as_array().cloned().unwrap_or_default()
    }

    /// The handles of the worker's rows, sorted.
    pub async fn handles(&self, worker: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .rows(worker)
            .await
            .iter()
            .filter_map(|r| r["handle"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    pub async fn row(&self, worker: &str, handle: &str) -> Option<Value> {
        self.rows(worker)
            .await
            .into_iter()
            .find(|r| r["handle"] == handle)
    }

    pub async fn state_of(&self, worker: &str, handle: &str) -> Option<String> {
        self.row(worker, handle)
            .await
            .and_then(|r| r["state"].as_str().map(str::to_string))
    }

    /// The agent-facing desired set: status, ETag and body.
    pub async fn desired(
        &self,
        worker: &str,
        if_none_match: Option<&str>,
    ) -> (u16, Option<String>, Value) {
        let mut req = self
            .http
            .get(self.api(&format!("/workers/{worker}/volumes/desired")))
            .bearer_auth(&self.operator);
        if let Some(tag) = if_none_match {
            req = req.header("If-None-Match", tag);
        }
        let resp = req.send().await.expect("desired request");
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.expect("desired body");
        (
            status,
            etag,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The version of base resource type `name` the database holds for `worker`.
    pub async fn base_type_version(&self, worker: &str, name: &str) -> Option<String> {
        let client = self.server.db().client().await.expect("db client");
        client
            .query_opt(
                "SELECT b.version FROM worker_base_resource_types w
                   JOIN base_resource_types b ON b.id = w.base_resource_type_id
                  WHERE w.worker_name = $1 AND b.name = $2",
                &[&worker, &name],
            )
            .await
            .expect("base resource type query")
            .map(|r| r.get(0))
    }

    /// The ids of the resource caches in the database, sorted.
    pub async fn resource_cache_ids(&self) -> Vec<i64> {
        let client = self.server.db().client().await.expect("db client");
        client
            .query("SELECT id FROM resource_caches ORDER BY id", &[])
            .await
            .expect("resource caches query")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// This instance's `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .expect("central /metrics")
            .text()
            .await
            .expect("central /metrics text")
    }

    /// The value of one series of [`Central::metrics`] (`name{labels}` exactly as exported).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        crate::series_value(&self.metrics().await, series)
    }

    /// GC passes this instance ran (not counting the ones another instance held the lock for).
    pub fn gc_passes(&self) -> u64 {
        self.server
            .metrics()
            .gc_passes(volume_central::GcOutcome::Ran)
    }

    /// Volumes this instance's GC marked `destroying`.
    pub fn gc_marked(&self) -> u64 {
        self.server.metrics().gc_marked.get()
    }

    /// Waits until this instance has run `n` more GC passes.
    pub async fn wait_gc_passes(&self, n: u64) {
        let target = self.gc_passes() + n;
        eventually(&format!("{n} more GC passes"), || async {
            self.gc_passes() >= target
        })
        .await;
    }
}

/// What keeps a volume row alive in the seed design.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    Container(&'a str),
    ResourceCache(i64),
    /// The worker's base resource type of that name (its current version).
    BaseResourceType(&'a str),
}

/// Issues a credential for `subject`; its token.
async fn issue(db: &volume_central::Db, subject: Subject) -> String {
    volume_central::auth::issue(db, &subject)
        .await
        .expect("issue a volume-central credential")
        .token
}

/// A worker: the real agent process and a client for its local API.
pub struct Worker {
    pub name: String,
    pub agent: Agent,
    pub local: Local,
    /// Holds the worker's credential file.
    _token_dir: tempfile::TempDir,
}

impl Worker {
    /// Registers worker `name` by issuing its credential, and starts its agent against
    /// `central` with that token (polls every 200 ms, reports every 300 ms, resource types
    /// rescanned and drift scanned every 200 ms).
    pub async fn start(central: &Central, name: &str) -> Worker {
        Worker::start_with(central, name, "").await
    }

    /// [`Worker::start`] with `gc_extra` added to the agent's `[gc]` section (e.g.
    /// `min_free = "100%"`).
    pub async fn start_with(central: &Central, name: &str, gc_extra: &str) -> Worker {
        Worker::start_on(central, name, gc_extra, None).await
    }

    /// [`Worker::start_with`] with the agent's `state/` and `volumes/` under `data_dir`
    /// (e.g. a small file system mounted at `<data_dir>/volumes`).
    pub async fn start_on(
        central: &Central,
        name: &str,
        gc_extra: &str,
        data_dir: Option<PathBuf>,
    ) -> Worker {
        let token_dir = tempfile::tempdir().expect("tempdir");
        let token_file = token_dir.path().join("token");
        std::fs::write(&token_file, central.worker_token(name).await).expect("write token");
        let settings = AgentSettings {
            worker: name.into(),
            poll_interval: "200ms",
            report_interval: "300ms",
            token_file: Some(token_file),
            scan_interval: Some("200ms"),
            extra: gc_extra.into(),
            data_dir,
            ..AgentSettings::default()
        };
        let agent = Agent::start(&central.url(), &settings);
        let local = Local::new(&agent);
        Worker {
            name: name.into(),
            agent,
            local,
            _token_dir: token_dir,
        }
    }

    /// Writes `<types>/<name>/resource_metadata.json` (and an empty `rootfs.tgz`).
    pub fn set_base_resource_type(&self, name: &str, version: &str) {
        let dir = self.agent.types_dir().join(name);
        std::fs::create_dir_all(&dir).expect("type folder");
        std::fs::write(dir.join("rootfs.tgz"), b"").expect("write rootfs.tgz");
        let meta = json!({"type": name, "version": version,
                          "privileged": false, "unique_version_history": false});
        // Write then rename, so a rescan never reads half a file.
        let tmp = dir.join("resource_metadata.json.tmp");
        std::fs::write(&tmp, meta.to_string()).expect("write metadata");
        std::fs::rename(&tmp, dir.join("resource_metadata.json")).expect("rename metadata");
    }

    /// A volume as a build makes it: the scheduler records it (`creating`), the worker
    /// makes it through the local API (a copy-on-write child when `parent` is set), the
    /// agent's report confirms it (`created`), the build initializes it.
    pub async fn volume(
        &self,
        central: &Central,
        handle: &str,
        parent: Option<&str>,
        owner: Owner<'_>,
    ) {
        let mut body = json!({ "handle": handle, "parent": parent });
        match owner {
            Owner::Container(c) => body["container"] = json!(c),
            Owner::ResourceCache(id) => body["resource_cache"] = json!(id),
            Owner::BaseResourceType(t) => body["base_resource_type"] = json!(t),
        }
        let (status, row) = central
            .call(
                Method::POST,
                &format!("/workers/{}/volumes", self.name),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "scheduler creates {handle}: {row}");
        self.local.make(handle, parent).await;
        eventually(&format!("{handle} confirmed created"), || async {
            central.state_of(&self.name, handle).await.as_deref() == Some("created")
        })
        .await;
        central
            .ok(
                Method::PUT,
                &format!("/volumes/{handle}/state"),
                Some(json!({"state": "initialized"})),
            )
            .await;
    }

    /// The volume directories under `<root>/live/`, sorted.
    pub fn live_on_disk(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.agent.root().join("live"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Entries left under `<root>/dead/` (volumes half destroyed).
    pub fn dead_on_disk(&self) -> usize {
        std::fs::read_dir(self.agent.root().join("dead"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The data file [`Local::make`] wrote into the volume, when it is still there.
    pub fn data_of(&self, handle: &str) -> Option<String> {
        let path: PathBuf = self
            .agent
            .root()
            .join("live")
            .join(handle)
            .join("volume")
            .join(format!("{handle}.txt"));
        std::fs::read_to_string(path).ok()
    }

    /// Writes a file of `bytes` bytes named `name` into volume `handle` on disk (as a
    /// build would fill it).
    pub fn fill(&self, handle: &str, name: &str, bytes: usize) {
        let path = self
            .agent
            .root()
            .join("live")
            .join(handle)
            .join("volume")
            .join(name);
        std::fs::write(&path, vec![0x5a_u8; bytes])
            .unwrap_or_else(|e| panic!("write {bytes} bytes into {handle}: {e}"));
    }

    /// The handles the agent logged as destroyed, in order.
    pub fn destroyed_in_order(&self) -> Vec<String> {
        self.agent
            .log()
            .lines()
            .filter_map(|l| l.split_once("destroyed volume handle="))
            .filter_map(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Asserts that `order` (children before parents) is how the agent destroyed them,
    /// each exactly once.
    pub fn assert_destroyed_in_order(&self, order: &[&str]) {
        let log = self.destroyed_in_order();
        let mut positions = Vec::new();
        for h in order {
            let at: Vec<usize> = (0..log.len()).filter(|&i| log[i] == *h).collect();
            assert_eq!(
                at.len(),
                1,
                "{h} destroyed once on {}; destroyed: {log:?}",
                self.name
            );
            positions.push(at[0]);
        }
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "destroyed out of order on {}: expected {order:?}, got {log:?}",
            self.name
        );
    }

    /// The highest desired-set revision the agent applied.
    pub async fn applied_revision(&self) -> Option<u64> {
        self.local
            .metric("volume_agent_desired_revision ")
            .await
            .map(|v| v as u64)
    }
}
