//! The central side of a run: PostgreSQL (a throwaway cluster, or a given database),
//! volume-central replicas started in-process on the `central` runtime, the workers'
//! credentials, and the seeded volumes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use chrono::Utc;
use futures::StreamExt as _;
use protocol::{Handle, VolumeState};
use tokio::runtime::Handle as Runtime;
use volume_agent::planner::LocalVolume;
use volume_central::auth::{self, Subject};
use volume_central::testing::PgCluster;
use volume_central::{AuthMode, Config, Db, Server};

use crate::stats::lock;
use crate::worker::Shared;

/// Settings of the central side.
#[derive(Debug, Clone)]
pub struct CentralSettings {
    pub replicas: usize,
    pub gc_interval: Duration,
    pub pool_size: usize,
    pub http_workers: usize,
    pub database_url: Option<String>,
    /// `shared_buffers` of the throwaway cluster.
    pub shared_buffers: String,
}

/// PostgreSQL connections in use.
const CONNECTIONS_SQL: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'";

pub struct Replica {
    config: Config,
    server: Option<Server>,
}

pub struct Fleet {
    pub pg: Option<PgCluster>,
    pub url: String,
    /// The simulator's own pool: seeding, sampling, checks.
    pub db: Db,
    pub replicas: Vec<Replica>,
    pub central: Runtime,
    pub scheduler_token: String,
    pub worker_tokens: Vec<String>,
    pub workers: Arc<Vec<Arc<Shared>>>,
}

pub fn worker_name(i: usize) -> String {
    format!("sim-{i:05}")
}

fn free_addr() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Runs the future `make` builds to completion on the central runtime, from a thread of
/// its own (so the future need not be `Send`); whatever it spawns lands on that runtime.
async fn on_runtime<T, F, Fut>(rt: &Runtime, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let rt = rt.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("central-start".into())
        .spawn(move || {
            let _ = tx.send(rt.block_on(make()));
        })?;
    rx.await
        .map_err(|_| anyhow!("the central runtime's thread panicked"))
}

impl Fleet {
    /// PostgreSQL up and migrated, credentials issued; replicas not started yet.
    pub async fn prepare(
        settings: &CentralSettings,
        workers: usize,
        central: Runtime,
    ) -> Result<Fleet> {
        let (pg, url) = match &settings.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let buffers = settings.shared_buffers.clone();
                let pg = tokio::task::spawn_blocking(move || {
                    PgCluster::start_with(&[("shared_buffers", buffers.as_str())])
                })
                .await?
                .context("starting a throwaway PostgreSQL")?;
                let url = pg.create_database().context("creating the database")?;
                (Some(pg), url)
            }
        };
        let mut base = Config::with_database_url(url.clone());
        base.auth = AuthMode::Credentials;
        volume_central::migrate(&base)
            .await
            .map_err(|e| anyhow!("migrate: {e}"))?;
        let db = Db::connect(&url, 16).map_err(|e| anyhow!("connect: {e}"))?;
        let scheduler_token = auth::issue(&db, &Subject::Scheduler)
            .await
            .map_err(|e| anyhow!("issue the scheduler's credential: {e}"))?
            .token;
        // One credential per worker (this also registers the worker).
        let started = Instant::now();
        let mut tokens: Vec<(usize, String)> = futures::stream::iter(0..workers)
            .map(|i| {
                let db = db.clone();
                async move {
                    let issued = auth::issue(&db, &Subject::Worker(worker_name(i))).await;
                    issued.map(|c| (i, c.token))
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("issue a worker's credential: {e}"))?;
        tokens.sort();
        println!(
            "issued {workers} worker credentials in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let mut replicas = Vec::new();
        for _ in 0..settings.replicas.max(1) {
            let mut config = Config::with_database_url(url.clone());
            config.listen = free_addr()?;
            config.gc_interval = settings.gc_interval;
            config.pool_size = settings.pool_size;
            config.http_workers = settings.http_workers;
            config.shutdown_timeout = Duration::from_secs(1);
            replicas.push(Replica {
                config,
                server: None,
            });
        }
        let shared = (0..workers)
            .map(|i| Arc::new(Shared::new(i as u32, worker_name(i))))
            .collect();
        Ok(Fleet {
            pg,
            url,
            db,
            replicas,
            central,
            scheduler_token,
            worker_tokens: tokens.into_iter().map(|(_, t)| t).collect(),
            workers: Arc::new(shared),
        })
    }

    pub fn replica_url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i].config.listen)
    }

    pub fn replica_urls(&self) -> Vec<String> {
        (0..self.replicas.len())
            .map(|i| self.replica_url(i))
            .collect()
    }

    /// Starts replica `i` (on its fixed address) on the central runtime.
    pub async fn start_replica(&mut self, i: usize) -> Result<()> {
        let config = self.replicas[i].config.clone();
        let mut tries = 0;
        let server = loop {
            let c = config.clone();
            match on_runtime(&self.central, move || async move {
                volume_central::start(&c).await
            })
            .await?
            {
                Ok(s) => break s,
                // The old socket may linger a moment after a stop.
                Err(e) if tries < 50 => {
                    tries += 1;
                    if tries == 1 {
                        println!("replica {i} not started yet ({e}); retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow!("start replica {i}: {e}")),
            }
        };
        self.replicas[i].server = Some(server);
        Ok(())
    }

    pub async fn stop_replica(&mut self, i: usize) -> Result<()> {
        if let Some(s) = self.replicas[i].server.take() {
            on_runtime(&self.central, move || async move { s.stop().await }).await?;
        }
        Ok(())
    }

    /// The longest last GC pass among the running replicas (seconds).
    pub fn gc_last_pass(&self) -> f64 {
        self.replicas
            .iter()
            .filter_map(|r| r.server.as_ref())
            .map(|s| s.metrics().gc_last_pass_seconds.get())
            .fold(0.0, f64::max)
    }

    /// Stops PostgreSQL (only a throwaway cluster).
    pub async fn stop_postgres(&mut self) -> Result<()> {
        let mut pg = self.pg.take().ok_or_else(|| {
            anyhow!("stopping PostgreSQL needs the simulator's own cluster (no --database-url)")
        })?;
        let pg = tokio::task::spawn_blocking(move || {
            pg.stop();
            pg
        })
        .await?;
        self.pg = Some(pg);
        Ok(())
    }

    pub async fn start_postgres(&mut self) -> Result<()> {
        let mut pg = self.pg.take().ok_or_else(|| anyhow!("no cluster"))?;
        let (pg, res) = tokio::task::spawn_blocking(move || {
            let r = pg.restart();
            (pg, r)
        })
        .await?;
        self.pg = Some(pg);
        res.context("restarting PostgreSQL")?;
        Ok(())
    }

    /// The postmaster's data directory, to read its pid (for CPU figures).
    pub async fn data_directory(&self) -> Option<PathBuf> {
        let c = self.db.client().await.ok()?;
        let row = c.query_one("SHOW data_directory", &[]).await.ok()?;
        Some(PathBuf::from(row.get::<_, String>(0)))
    }

    /// Seeds `per_worker` volumes on each worker, in chains of depth 5 owned by one
    /// container per worker named `<prefix>-<worker>` with handles `<prefix><w>-<j>`,
    /// in the database (one statement) and on the workers (as already on disk).
    /// With `garbage_every = Some(g)`, every g-th chain has no owner (garbage). Returns
    /// the handles (held, garbage).
    pub async fn seed(
        &self,
        prefix: &str,
        per_worker: usize,
        garbage_every: Option<usize>,
    ) -> Result<(Vec<Handle>, Vec<Handle>)> {
        const DEPTH: usize = 5;
        let workers = self.workers.len();
        if per_worker == 0 || workers == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let started = Instant::now();
        let client = self.db.client().await.map_err(|e| anyhow!("{e}"))?;
        let base: i64 = client
            .query_one("SELECT coalesce(max(id), 0) FROM volumes", &[])
            .await?
            .get(0);
        let g = garbage_every.unwrap_or(0) as i64;
        let sql = format!(
            "INSERT INTO containers (worker_name, handle)
                  SELECT 'sim-' || lpad(w::text, 5, '0'), '{prefix}-' || w
                    FROM generate_series(0, {workers} - 1) w;
             INSERT INTO volumes (id, handle, worker_name, state, parent_id, parent_state, container_id)
             SELECT {base} + w * {per_worker} + j + 1, '{prefix}' || w || '-' || j,
                    'sim-' || lpad(w::text, 5, '0'), 'initialized',
                    CASE WHEN j % {DEPTH} > 0 THEN {base} + w * {per_worker} + j END,
                    CASE WHEN j % {DEPTH} > 0 THEN 'initialized' END,
                    CASE WHEN {g} > 0 AND (j / {DEPTH}) % {g} = 0 THEN NULL ELSE c.id END
               FROM generate_series(0, {workers} - 1) w
               CROSS JOIN generate_series(0, {per_worker} - 1) j
               JOIN containers c ON c.handle = '{prefix}-' || w
              ORDER BY 1;
             SELECT setval('volumes_id_seq', (SELECT max(id) FROM volumes));
             ANALYZE volumes;"
        );
        client
            .batch_execute(&sql)
            .await
            .context("seeding volumes")?;
        let created_at = Utc::now() - chrono::Duration::hours(1);
        let (mut held, mut garbage) = (Vec::new(), Vec::new());
        for (w, shared) in self.workers.iter().enumerate() {
            let mut local = lock(&shared.local);
            let mut map = HashMap::with_capacity(per_worker);
            for j in 0..per_worker {
                let h = Handle::new(format!("{prefix}{w}-{j}"))?;
                let parent = (j % DEPTH > 0)
                    .then(|| Handle::new(format!("{prefix}{w}-{}", j - 1)))
                    .transpose()?;
                if g > 0 && ((j / DEPTH) as i64) % g == 0 {
                    garbage.push(h.clone());
                } else {
                    held.push(h.clone());
                }
                map.insert(
                    h.clone(),
                    LocalVolume {
                        handle: h,
                        parent,
                        state: VolumeState::Initialized,
                        created_at,
                        missing: false,
                    },
                );
            }
            local.extend(map);
        }
        println!(
            "seeded {} volumes ({prefix}) on {workers} workers in {:.1} s",
            workers * per_worker,
            started.elapsed().as_secs_f64()
        );
        Ok((held, garbage))
    }

    /// Rows of `volumes`, of them `destroying`, and PostgreSQL connections in use.
    pub async fn counts(&self) -> Option<(i64, i64, i64)> {
        let c = self.db.client().await.ok()?;
        let row = c
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM volumes),
                            (SELECT count(*) FROM volumes WHERE state = 'destroying'),
                            ({CONNECTIONS_SQL})"
                ),
                &[],
            )
            .await
            .ok()?;
        Some((row.get(0), row.get(1), row.get(2)))
    }

    /// PostgreSQL connections in use (cheap: no scan of `volumes`).
    pub async fn connections(&self) -> Option<i64> {
        let c = self.db.client().await.ok()?;
        let row = c.query_one(CONNECTIONS_SQL, &[]).await.ok()?;
        Some(row.get(0))
    }

    /// How many of `handles` still have a row.
    pub async fn rows_left(&self, handles: &[String]) -> Result<i64> {
        let c = self.db.client().await.map_err(|e| anyhow!("{e}"))?;
        Ok(c.query_one(
            "SELECT count(*) FROM volumes WHERE handle = ANY($1)",
            &[&handles],
        )
        .await?
        .get(0))
    }

    /// How many rows have a handle starting with `prefix`.
    pub async fn rows_with_prefix(&self, prefix: &str) -> Result<i64> {
        let c = self.db.client().await.map_err(|e| anyhow!("{e}"))?;
        let pattern = format!("{prefix}%");
        Ok(c.query_one(
            "SELECT count(*) FROM volumes WHERE handle LIKE $1",
            &[&pattern],
        )
        .await?
        .get(0))
    }

    /// Stops every replica and PostgreSQL.
    pub async fn shutdown(mut self) {
        for i in 0..self.replicas.len() {
            let _ = self.stop_replica(i).await;
        }
        if let Some(pg) = self.pg.take() {
            let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
        }
    }
}
