//! The scheduler driver: builds through the scheduler API. A build runs on one worker and
//! has a container owning an empty volume and a copy-on-write chain (a parent made
//! `initialized`, then its child); every third build also fetches a resource cache (a
//! volume owned by the cache, used by the build). A build is released after its lifetime:
//! its container deleted, its cache marked `drop` (not retained) and its use dropped, so
//! the GC makes its volumes garbage.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::Handle;
use rand::Rng;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use crate::stats::{lock, Kind, Recorder};
use crate::worker::Shared;

/// A scheduler's HTTP client over the replicas (tried in turn when one is down).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub bases: Arc<Vec<String>>,
    pub token: Option<String>,
    pub rec: Arc<Recorder>,
    next: Arc<AtomicU64>,
}

impl Api {
    /// `POST /api/v1/workers/{worker}/containers`: a build's container.
    pub async fn create_container(&self, worker: &str, handle: &str) -> Result<Value, u16> {
        self.call(
            Method::POST,
            format!("/api/v1/workers/{worker}/containers"),
            Some(json!({ "handle": handle })),
        )
        .await
    }

    /// Deletes container `handle` on `worker` (its volumes become garbage); true once it
    /// is gone (a 404 counts: deleted before), false when the API did not take it.
    pub async fn delete_container(&self, worker: &str, handle: &str) -> bool {
        let r = self
            .call(
                Method::DELETE,
                format!("/api/v1/workers/{worker}/containers/{handle}"),
                None,
            )
            .await;
        !matches!(r, Err(c) if c != 404)
    }

    pub fn new(bases: Vec<String>, token: Option<String>, rec: Arc<Recorder>) -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            bases: Arc::new(bases),
            token,
            rec,
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One call; on no answer it tries the next replica once. The status and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: impl Into<String>,
        body: Option<Value>,
    ) -> Result<Value, u16> {
        let path: String = path.into();
        let n = self.bases.len() as u64;
        let first = self.next.fetch_add(1, Relaxed);
        let mut last = 0;
        for k in 0..n.min(2) {
            let base = &self.bases[((first + k) % n) as usize];
            let mut rb = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(t) = &self.token {
                rb = rb.bearer_auth(t);
            }
            if let Some(b) = &body {
                rb = rb.json(b);
            }
            let t = Instant::now();
            match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let ok = resp.status().is_success();
                    let value = resp.json::<Value>().await.unwrap_or(Value::Null);
                    let kind = if ok {
                        Kind::Scheduler
                    } else {
                        Kind::SchedulerError
                    };
                    self.rec.event(u32::MAX, kind, status, t.elapsed());
                    return if ok { Ok(value) } else { Err(status) };
                }
                Err(_) => {
                    self.rec
                        .event(u32::MAX, Kind::SchedulerError, 0, t.elapsed());
                    last = 0;
                }
            }
        }
        Err(last)
    }
}

/// What must be undone to release a build.
struct Build {
    worker: String,
    container: String,
    cache_use: Option<(i64, i64)>,
    handles: Vec<Handle>,
    release_at: Instant,
}

#[derive(Debug, Clone)]
pub struct Churn {
    /// Volumes created (and as many released) per second.
    pub volumes_per_second: f64,
    pub build_lifetime: Duration,
    /// How long a build waits for its worker to report a new volume.
    pub confirm_timeout: Duration,
}

/// Counters of the driver.
#[derive(Default)]
pub struct Counts {
    pub builds: AtomicU64,
    pub failed_builds: AtomicU64,
    pub released: AtomicU64,
}

fn handle(s: String) -> Handle {
    Handle::new(s).unwrap_or_else(|e| panic!("simulator handle: {e}"))
}

/// Creates a build on `w`; on any failure, releases what it created.
async fn build(
    api: &Api,
    w: &Shared,
    n: u64,
    config: i64,
    lifetime: Duration,
    confirm: Duration,
) -> Option<(Build, bool)> {
    let container = format!("b{n}");
    let worker = w.name.clone();
    let wpath = format!("/api/v1/workers/{worker}");
    api.create_container(&worker, &container).await.ok()?;
    let mut b = Build {
        worker: worker.clone(),
        container: container.clone(),
        cache_use: None,
        handles: Vec::new(),
        release_at: Instant::now() + lifetime,
    };
    let steps = async {
        let vol = |h: &Handle, parent: Option<&Handle>, cache: Option<i64>| {
            let mut body = json!({"handle": h.as_str()});
            if let Some(p) = parent {
                body["parent"] = json!(p.as_str());
            }
            match cache {
                Some(c) => body["resource_cache"] = json!(c),
                None => body["container"] = json!(container),
            }
            api.call(Method::POST, format!("{wpath}/volumes"), Some(body))
        };
        // An empty volume.
        let e = handle(format!("b{n}-e"));
        vol(&e, None, None).await?;
        api.rec.hold([e.clone()]);
        w.create(e.clone(), None);
        b.handles.push(e);
        // A copy-on-write chain: the parent initialized, then its child.
        let p = handle(format!("b{n}-p"));
        vol(&p, None, None).await?;
        api.rec.hold([p.clone()]);
        let created = w.create(p.clone(), None);
        b.handles.push(p.clone());
        // `created` comes from the worker's report; only then can it be initialized.
        if !w.reported(created, confirm).await {
            return Err(0u16);
        }
        api.call(
            Method::PUT,
            format!("/api/v1/volumes/{p}/state"),
            Some(json!({"state": "initialized"})),
        )
        .await?;
        let c = handle(format!("b{n}-c"));
        vol(&c, Some(&p), None).await?;
        api.rec.hold([c.clone()]);
        w.create(c.clone(), Some(p.clone()));
        b.handles.push(c);
        // Every third build fetches a resource cache, used by this build.
        if n % 3 == 0 {
            let cache = api
                .call(
                    Method::POST,
                    "/api/v1/resource-caches",
                    Some(
                        json!({"resource_config": config, "version": format!("v{n}"), "build": n}),
                    ),
                )
                .await?;
            let id = cache["id"].as_i64().ok_or(0u16)?;
            b.cache_use = Some((id, n as i64));
            let k = handle(format!("b{n}-k"));
            vol(&k, None, Some(id)).await?;
            api.rec.hold([k.clone()]);
            w.create(k.clone(), None);
            b.handles.push(k);
        }
        Ok::<(), u16>(())
    };
    if steps.await.is_err() {
        // Release what exists; the caller retries the release until it is done.
        b.release_at = Instant::now();
        return Some((b, false));
    }
    Some((b, true))
}

/// Releases a build; false when the scheduler API did not take it (retried later).
async fn release(api: &Api, b: &Build) -> bool {
    api.rec.release(&b.handles);
    if !api.delete_container(&b.worker, &b.container).await {
        return false;
    }
    if let Some((cache, build)) = b.cache_use {
        // Dropped, not retained: a released chain must be gone at the end (retention would
        // keep the cache's volume while its worker has room).
        let r = api
            .call(
                Method::PUT,
                format!("/api/v1/resource-caches/{cache}/retention"),
                Some(json!({"retention": "drop"})),
            )
            .await;
        if matches!(r, Err(c) if c != 404) {
            return false;
        }
        let r = api
            .call(
                Method::DELETE,
                format!("/api/v1/resource-caches/{cache}/uses/{build}"),
                None,
            )
            .await;
        if matches!(r, Err(c) if c != 404) {
            return false;
        }
    }
    true
}

/// Creates the resource config the builds' caches use (retried until it answers).
pub async fn resource_config(api: &Api) -> i64 {
    loop {
        let r = api
            .call(
                Method::POST,
                "/api/v1/resource-configs",
                Some(json!({"base_resource_type": "git", "source_hash": "fleet-sim"})),
            )
            .await;
        if let Ok(v) = r {
            if let Some(id) = v["id"].as_i64() {
                return id;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Most builds being created or released at once (a build waits up to a poll interval
/// for its worker's report).
const IN_FLIGHT: usize = 4096;

/// Drives builds at the churn rate until `stop`, then releases every build left.
pub async fn drive(
    api: Api,
    workers: Arc<Vec<Arc<Shared>>>,
    churn: Churn,
    counts: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
) {
    if churn.volumes_per_second <= 0.0 || workers.is_empty() {
        return;
    }
    let config = resource_config(&api).await;
    // 3 volumes per build, 4 every third: 10/3 on average.
    let builds_per_second = churn.volumes_per_second * 3.0 / 10.0;
    let live: Arc<std::sync::Mutex<VecDeque<Build>>> = Arc::default();
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let started = Instant::now();
    let mut started_builds = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        // Start as many builds as the rate allows by now.
        let due = (started.elapsed().as_secs_f64() * builds_per_second) as u64;
        while started_builds < due {
            started_builds += 1;
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                counts.failed_builds.fetch_add(1, Relaxed);
                continue;
            };
            n += 1;
            let (api, live, counts) = (api.clone(), live.clone(), counts.clone());
            let w = workers[rand::thread_rng().gen_range(0..workers.len())].clone();
            let (lifetime, confirm) = (churn.build_lifetime, churn.confirm_timeout);
            tokio::spawn(async move {
                match build(&api, &w, n, config, lifetime, confirm).await {
                    Some((b, ok)) => {
                        let c = if ok {
                            &counts.builds
                        } else {
                            &counts.failed_builds
                        };
                        c.fetch_add(1, Relaxed);
                        lock(&live).push_back(b);
                    }
                    None => {
                        counts.failed_builds.fetch_add(1, Relaxed);
                    }
                }
                drop(permit);
            });
        }
        // Release the builds whose time is up (oldest first).
        let now = Instant::now();
        let mut ripe = Vec::new();
        {
            let mut l = lock(&live);
            let mut keep = VecDeque::new();
            while let Some(b) = l.pop_front() {
                if b.release_at <= now {
                    ripe.push(b);
                } else {
                    keep.push_back(b);
                }
            }
            *l = keep;
        }
        for b in ripe {
            let (api, live, counts, gate) =
                (api.clone(), live.clone(), counts.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                if release(&api, &b).await {
                    counts.released.fetch_add(b.handles.len() as u64, Relaxed);
                } else {
                    lock(&live).push_back(b);
                }
            });
        }
    }
    // Let builds in flight land, then release everything left.
    let _all = gate.acquire_many(IN_FLIGHT as u32).await;
    drop(_all);
    loop {
        let left: Vec<Build> = lock(&live).drain(..).collect();
        if left.is_empty() {
            break;
        }
        for b in left {
            if release(&api, &b).await {
                counts.released.fetch_add(b.handles.len() as u64, Relaxed);
            } else {
                lock(&live).push_back(b);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
