//! Helpers shared by the integration tests: a fresh database on the shared cluster.
#![allow(dead_code)]

use volume_central::testing::PgCluster;
use volume_central::{Config, Db};

/// A fresh, migrated database and a pool on it; the config runs without authentication
/// (`auth = "none"`: these tests are about the seed's rules; `tests/auth.rs` covers
/// credentials).
pub async fn fresh_db() -> (Config, Db) {
    let (mut config, db) = fresh_db_with_auth().await;
    config.auth = volume_central::AuthMode::None;
    (config, db)
}

/// A fresh, migrated database with the default `auth = "credentials"` (no credential
/// issued yet).
pub async fn fresh_db_with_auth() -> (Config, Db) {
    let url = PgCluster::shared()
        .create_database()
        .expect("create database");
    let mut config = Config::with_database_url(url.clone());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_workers = 2;
    config.pool_size = 8;
    volume_central::migrate(&config).await.expect("migrate");
    let db = Db::connect(&url, 32).expect("pool");
    (config, db)
}

/// Runs `sql` and returns the first column of the first row as i64.
pub async fn count(db: &Db, sql: &str) -> i64 {
    let client = db.client().await.expect("client");
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The state of volume `handle`, or None when the row is gone.
pub async fn state_of(db: &Db, handle: &str) -> Option<String> {
    let client = db.client().await.expect("client");
    client
        .query_opt("SELECT state FROM volumes WHERE handle = $1", &[&handle])
        .await
        .expect("query")
        .map(|r| r.get(0))
}

/// Sets a volume's state directly (test setup).
pub async fn force_state(db: &Db, handle: &str, state: &str) {
    let client = db.client().await.expect("client");
    client
        .execute(
            "UPDATE volumes SET state = $2 WHERE handle = $1",
            &[&handle, &state],
        )
        .await
        .expect("force state");
}

use protocol::native::{BaseResourceType, ResourceTypesReport};
use protocol::Handle;
use volume_central::store::{self, CreateResourceCache, CreateResourceConfig, CreateVolume};

pub fn h(s: &str) -> Handle {
    Handle::new(s).expect("handle")
}

/// Registers `worker` with one base resource type `git` at `version`.
pub async fn register(db: &Db, worker: &str, version: &str) {
    store::register_worker(db, worker)
        .await
        .expect("register worker");
    let report = ResourceTypesReport {
        resource_types: vec![BaseResourceType {
            name: "git".into(),
            image: "/types/git/rootfs.tgz".into(),
            version: version.into(),
            privileged: false,
            unique_version_history: false,
        }],
    };
    store::put_resource_types(db, worker, &report)
        .await
        .expect("base resource types");
}

/// Creates container `handle` on `worker`.
pub async fn container(db: &Db, worker: &str, handle: &str) {
    store::create_container(db, worker, handle)
        .await
        .expect("create container");
}

/// Creates a volume used by `container` (or no owner when None) under `parent`.
pub async fn volume(
    db: &Db,
    worker: &str,
    handle: &str,
    parent: Option<&str>,
    container: Option<&str>,
) -> Result<store::VolumeRow, volume_central::Error> {
    store::create_volume(
        db,
        worker,
        &CreateVolume {
            handle: h(handle),
            parent: parent.map(h),
            container: container.map(str::to_string),
            resource_cache: None,
            base_resource_type: None,
        },
    )
    .await
}

/// Creates an initialized volume used by `container` under `parent`.
pub async fn initialized(
    db: &Db,
    worker: &str,
    handle: &str,
    parent: Option<&str>,
    container: Option<&str>,
) {
    volume(db, worker, handle, parent, container)
        .await
        .expect("create volume");
    force_state(db, handle, "initialized").await;
}

/// `(handle, state, parent_state)` of every row, sorted: a whole-table snapshot.
pub async fn snapshot(db: &Db) -> Vec<(String, String, Option<String>, bool)> {
    let client = db.client().await.expect("client");
    client
        .query(
            "SELECT handle, state, parent_state, missing_since IS NOT NULL FROM volumes ORDER BY handle",
            &[],
        )
        .await
        .expect("snapshot")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// The revision of `worker`.
pub async fn revision(db: &Db, worker: &str) -> i64 {
    let client = db.client().await.expect("client");
    client
        .query_one("SELECT revision FROM workers WHERE name = $1", &[&worker])
        .await
        .expect("revision")
        .get(0)
}

/// Polls `cond` until it holds (gives up after a minute so a broken build fails).
pub async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached within a minute");
}

/// The `/metrics` text of the service at `base`.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// A resource cache (version `version` of one git config), used by `build` when given.
pub async fn cache(db: &Db, version: &str, build: Option<i64>) -> i64 {
    let config = store::create_resource_config(
        db,
        &CreateResourceConfig {
            base_resource_type: Some("git".into()),
            resource_cache: None,
            source_hash: "s".into(),
            params_hash: String::new(),
        },
    )
    .await
    .expect("config");
    store::create_resource_cache(
        db,
        &CreateResourceCache {
            resource_config: config,
            version: version.into(),
            build,
        },
    )
    .await
    .expect("cache")
}

/// An initialized volume of `cache` on `worker`.
pub async fn cache_volume(db: &Db, worker: &str, handle: &str, cache: i64) {
    store::create_volume(
        db,
        worker,
        &CreateVolume {
            handle: h(handle),
            parent: None,
            container: None,
            resource_cache: Some(cache),
            base_resource_type: None,
        },
    )
    .await
    .expect("cache volume");
    force_state(db, handle, "initialized").await;
}

/// One GC pass of the test's own, run again while another holds the GC lock (a server
/// under test runs a pass as it starts, and on its interval): a `Locked` pass does
/// nothing, so a test that ignored it would assert on a pass that never ran.
pub async fn gc_pass_with(
    db: &Db,
    settings: &volume_central::gc::GcSettings,
) -> volume_central::gc::GcStats {
    use volume_central::gc::{run_pass_with, PassOutcome};
    for _ in 0..3000 {
        match run_pass_with(db, settings).await.expect("gc pass") {
            PassOutcome::Ran(stats) => return stats,
            PassOutcome::Locked => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    panic!("the GC lock stayed held for a minute");
}

/// [`gc_pass_with`] with `missing_grace` and no fleet-wide budgets.
pub async fn gc_pass(db: &Db, missing_grace: std::time::Duration) -> volume_central::gc::GcStats {
    gc_pass_with(
        db,
        &volume_central::gc::GcSettings {
            missing_grace,
            budgets: Default::default(),
        },
    )
    .await
}

/// Starts a server on `config` and waits for the GC pass its loop runs as it starts, so
/// that pass cannot act on what a test is still building (an unowned parent before its
/// child is inserted, a resource cache before its first use is added).
pub async fn start_server(config: &Config) -> volume_central::Server {
    let server = volume_central::start(config).await.expect("start");
    first_gc_pass_done(&server.url()).await;
    server
}

/// Waits until the GC loop of the server at `base` has run (or tried) one pass.
pub async fn first_gc_pass_done(base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        let text = metrics_text(&client, base).await;
        let passes: f64 = text
            .lines()
            .filter(|l| l.starts_with("volume_central_gc_passes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if passes >= 1.0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the GC loop ran no pass within 30 s of start: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
