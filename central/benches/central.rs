//! volume-central benchmark (harness = false): prints figures, asserts nothing.
//!
//! * Desired-set 304 answers over HTTP (answers/s, p50/p99) against the floor: the same
//!   revision read straight from PostgreSQL with tokio-postgres.
//! * Full 5,000-volume desired-set answers over HTTP against the same rows read straight
//!   from PostgreSQL.
//! * One GC pass over 100,000 volumes on 1,000 workers against an ATC-style GC that marks
//!   one tree level per pass (run until nothing changes).
//! * Credential checks: 304 answers for 8 workers, each client with its own worker's
//!   token, against the same without authentication (`auth = "none"`), same run.
//! * A 300,000-volume report (plus 50,000 destroyed and 50,000 missing handles) applied
//!   over HTTP, with `/healthz` latency measured while it runs: once as a worker sends it
//!   (1 % of the listed volumes are new creates to confirm), once in the worst case (a
//!   third of them new).
//!
//! * One GC pass over 1,000,000 volumes on 10,000 workers (100,000 to mark).
//! * The eviction decision for 100,000 retained caches on 1,000 workers, every worker
//!   under pressure, then the whole GC pass that applies it.
//!
//! Run with `cargo bench -p volume-central --bench central`; a word after `--` runs only
//! the sections whose name contains it (`desired`, `credentials`, `report`, `gc`,
//! `gc-1m`, `eviction`; `gc` runs both GC sections). `EXPLAIN=1` prints the plans of the
//! GC statements;
//! `CENTRAL_BENCH_SHARED_BUFFERS` sets PostgreSQL's `shared_buffers` (default 1GB).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use volume_central::auth::{self, Subject};
use volume_central::testing::PgCluster;
use volume_central::{gc, AuthMode, Config, Db};

const CONCURRENCY: usize = 8;
const NOT_MODIFIED_REQUESTS: usize = 20_000;
const FULL_REQUESTS: usize = 300;
const WORKERS: i64 = 1_000;
const CHAINS_PER_WORKER: i64 = 20;
const DEPTH: i64 = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

impl Figures {
    fn print(&self, what: &str) {
        println!(
            "{what:<44} {:>9.0} answers/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
            self.per_sec,
            ms(self.p50),
            ms(self.p99)
        );
    }
}

/// Runs `total` calls of `op` from `concurrency` tasks; per-call latency and throughput.
async fn load<F, Fut>(total: usize, concurrency: usize, op: F) -> Figures
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total / concurrency);
            for _ in 0..total / concurrency {
                let t = Instant::now();
                op().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    let elapsed = start.elapsed();
    all.sort();
    Figures {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

/// 1,000 workers × 20 chains of depth 5 (100,000 volumes). Chain k of a worker: k % 10
/// == 0 is garbage throughout; k % 10 == 1 is garbage except a live leaf; the rest live.
async fn seed_gc_dataset(db: &Db) {
    seed_gc_workers(db, WORKERS).await;
}

/// [`seed_gc_dataset`] with `workers` workers.
async fn seed_gc_workers(db: &Db, workers: i64) {
    let client = db.client().await.expect("client");
    client
        .batch_execute(&format!(
            "INSERT INTO workers (name) SELECT 'w' || w FROM generate_series(0, {workers} - 1) w;
             INSERT INTO containers (id, worker_name, handle)
                  SELECT w + 1, 'w' || w, 'c' || w FROM generate_series(0, {workers} - 1) w;
             INSERT INTO volumes (id, handle, worker_name, state, parent_id, parent_state, container_id)
             SELECT id, 'v' || id, 'w' || w, 'initialized',
                    CASE WHEN d > 0 THEN id - 1 END, CASE WHEN d > 0 THEN 'initialized' END,
                    CASE WHEN k % 10 = 0 THEN NULL
                         WHEN k % 10 = 1 AND d < {DEPTH} - 1 THEN NULL
                         ELSE w + 1 END
               FROM (SELECT w, k, d, w * {CHAINS_PER_WORKER} * {DEPTH} + k * {DEPTH} + d + 1 AS id
                       FROM generate_series(0, {workers} - 1) w,
                            generate_series(0, {CHAINS_PER_WORKER} - 1) k,
                            generate_series(0, {DEPTH} - 1) d) s
              ORDER BY id;
             SELECT setval('volumes_id_seq', (SELECT max(id) FROM volumes));
             SELECT setval('containers_id_seq', (SELECT max(id) FROM containers));
             ANALYZE;"
        ))
        .await
        .expect("seed GC dataset");
}

/// The ATC's way: each pass marks garbage volumes that have no child left that is not
/// destroying (one tree level per pass). Returns (passes, marked, time).
async fn atc_style_gc(db: &Db) -> (u32, u64, Duration) {
    let client = db.client().await.expect("client");
    let start = Instant::now();
    let (mut passes, mut marked) = (0, 0);
    loop {
        passes += 1;
        let n = client
            .execute(
                "UPDATE volumes v SET state = 'destroying'
                  WHERE v.state <> 'destroying' AND v.resource_cache_id IS NULL
                    AND v.worker_base_resource_type_id IS NULL AND v.container_id IS NULL
                    AND NOT EXISTS (SELECT 1 FROM volumes c WHERE c.parent_id = v.id)",
                &[],
            )
            .await;
        // With the seed's constraint, a parent cannot change state while a child points
        // at it: the ATC deletes destroyed children first. Emulate the worker's report
        // between passes by deleting the rows just marked.
        match n {
            Ok(0) => break,
            Ok(n) => {
                marked += n;
                client
                    .execute("DELETE FROM volumes WHERE state = 'destroying'", &[])
                    .await
                    .expect("delete marked");
            }
            Err(err) => panic!("ATC-style pass failed: {err}"),
        }
    }
    (passes, marked, start.elapsed())
}

async fn new_db(cluster: &PgCluster) -> (Config, Db) {
    let url = cluster.create_database().expect("database");
    let mut config = Config::with_database_url(url.clone());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_workers = 2;
    config.pool_size = CONCURRENCY;
    config.gc_interval = Duration::from_secs(3600);
    config.auth = AuthMode::None;
    volume_central::migrate(&config).await.expect("migrate");
    (config, Db::connect(&url, CONCURRENCY).expect("pool"))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // PostgreSQL's 128 MB default is sized for a laptop: at 1,000,000 volumes the table
    // and its indexes do not fit, and a GC pass spends its time evicting its own pages.
    let shared_buffers =
        std::env::var("CENTRAL_BENCH_SHARED_BUFFERS").unwrap_or_else(|_| "1GB".to_owned());
    let cluster =
        PgCluster::start_with(&[("shared_buffers", shared_buffers.as_str())]).expect("PostgreSQL");
    // `cargo bench` passes `--bench`; any other word selects sections.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let wanted = |name: &str| name.contains(filter.as_str());
    println!(
        "volume-central benchmark ({CONCURRENCY} concurrent clients, PostgreSQL on a unix socket, shared_buffers {shared_buffers})"
    );
    runtime.block_on(async {
        if wanted("desired") {
            desired(&cluster).await;
        }
        if wanted("credentials") {
            credential_checks(&cluster).await;
        }
        if wanted("report") {
            large_report(&cluster, REPORT_VOLUMES / 100).await;
            large_report(&cluster, REPORT_VOLUMES / 3).await;
        }
        if wanted("gc") && filter != "gc-1m" {
            gc_pass(&cluster).await;
        }
        if wanted("gc-1m") {
            gc_million(&cluster).await;
        }
        if wanted("eviction") {
            eviction(&cluster).await;
        }
    });
    drop(cluster);
}

/// 304 and full desired-set answers for a worker with 5,000 volumes.
async fn desired(cluster: &PgCluster) {
    let (config, db) = new_db(cluster).await;
    // A worker with 5,000 volumes (chains of 5) for full answers, and its revision for 304s.
    db.client()
        .await
        .expect("client")
        .batch_execute(
            "INSERT INTO workers (name) VALUES ('big');
             INSERT INTO containers (id, worker_name, handle) VALUES (1, 'big', 'c');
             INSERT INTO volumes (id, handle, worker_name, state, parent_id, parent_state, container_id)
             SELECT i, 'vol-' || i, 'big', 'initialized',
                    CASE WHEN i % 5 <> 1 THEN i - 1 END, CASE WHEN i % 5 <> 1 THEN 'initialized' END, 1
               FROM generate_series(1, 5000) i ORDER BY i;
             SELECT setval('volumes_id_seq', 5000);
             SELECT setval('containers_id_seq', 1);
             ANALYZE;",
        )
        .await
        .expect("seed big worker");
    let server = volume_central::start(&config).await.expect("start");
    let url = format!("{}/api/v1/workers/big/volumes/desired", server.url());
    let http = reqwest::Client::new();
    let first = http.get(&url).send().await.expect("desired");
    let etag = first.headers()["etag"].to_str().expect("etag").to_string();
    let size = first.bytes().await.expect("body").len();

    // 304s over HTTP vs the revision read straight from the database.
    let (h, u, e) = (http.clone(), url.clone(), etag.clone());
    let not_modified = load(NOT_MODIFIED_REQUESTS, CONCURRENCY, move || {
        let req = h.get(&u).header("If-None-Match", &e).send();
        async move {
            let resp = req.await.expect("desired");
            assert_eq!(resp.status().as_u16(), 304);
        }
    })
    .await;
    let d = db.clone();
    let raw_revision = load(NOT_MODIFIED_REQUESTS, CONCURRENCY, move || {
        let d = d.clone();
        async move {
            let c = d.client().await.expect("client");
            let stmt = c
                .prepare_cached("SELECT revision FROM workers WHERE name = $1")
                .await
                .expect("prepare");
            c.query_one(&stmt, &[&"big"]).await.expect("revision");
        }
    })
    .await;
    not_modified.print("desired 304 over HTTP");
    raw_revision.print("  floor: revision read, tokio-postgres");
    println!(
        "  ratio HTTP/floor throughput {:.2} (target >= 2,000/s, p99 <= 5 ms)",
        not_modified.per_sec / raw_revision.per_sec
    );

    // Full 5,000-volume answers.
    let (h, u) = (http.clone(), url.clone());
    let full = load(FULL_REQUESTS, 2, move || {
        let req = h.get(&u).send();
        async move {
            let resp = req.await.expect("desired");
            assert_eq!(resp.status().as_u16(), 200);
            resp.bytes().await.expect("body");
        }
    })
    .await;
    let d = db.clone();
    let raw_rows = load(FULL_REQUESTS, 2, move || {
        let d = d.clone();
        async move {
            let c = d.client().await.expect("client");
            let rows = c
                .query(
                    "WITH w AS MATERIALIZED (
                         SELECT id, handle, parent_id, state FROM volumes WHERE worker_name = $1)
                     SELECT v.handle, p.handle, v.state = 'destroying'
                       FROM w v LEFT JOIN w p ON p.id = v.parent_id ORDER BY v.id",
                    &[&"big"],
                )
                .await
                .expect("rows");
            assert_eq!(rows.len(), 5000);
        }
    })
    .await;
    full.print(&format!(
        "desired full answer, 5,000 volumes ({} KiB)",
        size / 1024
    ));
    raw_rows.print("  floor: same rows, tokio-postgres");
    println!(
        "  ratio HTTP/floor p99 {:.2} (target p99 <= 50 ms)",
        ms(full.p99) / ms(raw_rows.p99).max(1e-9)
    );
    server.stop().await;
}

/// Two GC passes one after the other (5 min grace), each with its time.
async fn two_passes(db: &Db) -> ((gc::PassOutcome, Duration), (gc::PassOutcome, Duration)) {
    let mut passes = Vec::with_capacity(2);
    for _ in 0..2 {
        let t = Instant::now();
        let outcome = gc::run_pass(db, Duration::from_secs(300))
            .await
            .expect("gc pass");
        passes.push((outcome, t.elapsed()));
    }
    let second = passes.pop().expect("two passes");
    let first = passes.pop().expect("two passes");
    (first, second)
}

/// A GC pass over 100,000 volumes on 1,000 workers, against an ATC-style GC.
async fn gc_pass(cluster: &PgCluster) {
    let (_c, gc_db) = new_db(cluster).await;
    seed_gc_dataset(&gc_db).await;
    let ((outcome, first_pass), (again, second_pass)) = two_passes(&gc_db).await;
    println!(
        "GC pass, 100,000 volumes / 1,000 workers: {:.1} ms ({outcome:?}); idle pass {:.1} ms ({again:?}) (target <= 2 s)",
        ms(first_pass),
        ms(second_pass)
    );
    let (_c, atc_db) = new_db(cluster).await;
    seed_gc_dataset(&atc_db).await;
    let (passes, marked, atc_time) = atc_style_gc(&atc_db).await;
    println!(
        "  ATC-style GC (one level per pass, rows deleted between passes): {passes} passes, {marked} marked, {:.1} ms; ratio one-pass/ATC-style time {:.2}",
        ms(atc_time),
        first_pass.as_secs_f64() / atc_time.as_secs_f64()
    );
}

/// The same shape as [`gc_pass`] on 10,000 workers: 1,000,000 volumes, 100,000 of them
/// garbage to mark, 20,000 more garbage kept by a live leaf. With `EXPLAIN` set, prints
/// the mark statement's plan (run and rolled back) first.
async fn gc_million(cluster: &PgCluster) {
    let (_c, db) = new_db(cluster).await;
    let t = Instant::now();
    seed_gc_workers(&db, 10 * WORKERS).await;
    println!(
        "GC pass, 1,000,000 volumes / 10,000 workers (seeded in {:.1} s):",
        t.elapsed().as_secs_f64()
    );
    if std::env::var_os("EXPLAIN").is_some() {
        let mut client = db.client().await.expect("client");
        let tx = client.transaction().await.expect("tx");
        tx.batch_execute(gc::SET_LOCAL).await.expect("settings");
        tx.batch_execute(gc::MARK_SET_LOCAL)
            .await
            .expect("settings");
        let plan = tx
            .query(
                &format!("EXPLAIN (ANALYZE, BUFFERS) {}", gc::mark_all_sql()),
                &[&300.0f64],
            )
            .await
            .expect("explain");
        for row in plan {
            println!("{}", row.get::<_, String>(0));
        }
        tx.rollback().await.expect("rollback");
    }
    let ((outcome, first), (again, idle)) = two_passes(&db).await;
    println!(
        "  marking pass {:.1} ms ({outcome:?}) (target <= 10 s)",
        ms(first)
    );
    println!("  idle pass {:.1} ms ({again:?})", ms(idle));
    // The idle pass phase by phase.
    let budgets = gc::Budgets::default();
    let t = Instant::now();
    gc::evict(&db, &budgets).await.expect("evict");
    let evict = t.elapsed();
    let t = Instant::now();
    gc::delete_unused_caches(&db).await.expect("delete");
    let delete = t.elapsed();
    let t = Instant::now();
    gc::mark_garbage(&db, Duration::from_secs(300))
        .await
        .expect("mark");
    let mark = t.elapsed();
    let t = Instant::now();
    gc::refresh_retained_bytes(&db).await.expect("refresh");
    let refresh = t.elapsed();
    println!(
        "  its phases: evict {:.1} ms, unused caches {:.1} ms, mark {:.1} ms, retained bytes {:.1} ms",
        ms(evict),
        ms(delete),
        ms(mark),
        ms(refresh)
    );
}

const RETAINED_PER_WORKER: i64 = 100;
const MIB: i64 = 1 << 20;

/// 1,000 workers × 100 retained caches of 1 MiB each (one volume per cache), every
/// worker reporting pressure with no free space and `min_free` 50 MiB: the decision picks
/// the 50 least recently used caches of each worker (50,000 evictions).
async fn eviction(cluster: &PgCluster) {
    let (_c, db) = new_db(cluster).await;
    let client = db.client().await.expect("client");
    client
        .batch_execute(&format!(
            "INSERT INTO workers (name, disk_total_bytes, disk_free_bytes, pressure, min_free)
                  SELECT 'w' || w, 1 << 40, 0, true, 50 * {MIB}
                    FROM generate_series(0, {WORKERS} - 1) w;
             INSERT INTO base_resource_types (id, name, version) VALUES (1, 'git', '1');
             INSERT INTO resource_configs (id, base_resource_type_id, source_hash) VALUES (1, 1, 's');
             INSERT INTO resource_caches (id, resource_config_id, version, last_used_at, retained_since)
                  SELECT i, 1, 'v' || i, now() - make_interval(secs => i), now()
                    FROM generate_series(1, {WORKERS} * {RETAINED_PER_WORKER}) i;
             INSERT INTO volumes (id, handle, worker_name, state, resource_cache_id, bytes)
                  SELECT i, 'rv' || i, 'w' || (i % {WORKERS}), 'initialized', i, {MIB}
                    FROM generate_series(1, {WORKERS} * {RETAINED_PER_WORKER}) i;
             -- 1 % more caches, in use (a build holds each), never evicted.
             INSERT INTO resource_caches (id, resource_config_id, version, retained_since)
                  SELECT i, 1, 'v' || i, NULL
                    FROM generate_series({WORKERS} * {RETAINED_PER_WORKER} + 1,
                                         {WORKERS} * {RETAINED_PER_WORKER} + {WORKERS}) i;
             INSERT INTO resource_cache_uses (resource_cache_id, build_id)
                  SELECT i, i FROM generate_series({WORKERS} * {RETAINED_PER_WORKER} + 1,
                                                   {WORKERS} * {RETAINED_PER_WORKER} + {WORKERS}) i;
             INSERT INTO volumes (id, handle, worker_name, state, resource_cache_id, bytes)
                  SELECT i, 'rv' || i, 'w' || (i % {WORKERS}), 'initialized', i, {MIB}
                    FROM generate_series({WORKERS} * {RETAINED_PER_WORKER} + 1,
                                         {WORKERS} * {RETAINED_PER_WORKER} + {WORKERS}) i;
             SELECT setval('volumes_id_seq', (SELECT max(id) FROM volumes));
             SELECT setval('resource_caches_id_seq', (SELECT max(id) FROM resource_caches));
             ANALYZE;"
        ))
        .await
        .expect("seed retained caches");
    if std::env::var_os("EXPLAIN").is_some() {
        client
            .batch_execute("SET jit = off; SET work_mem = '64MB'")
            .await
            .expect("settings");
        let plan = client
            .query(
                &format!("EXPLAIN (ANALYZE, BUFFERS) {}", gc::decide_sql()),
                &[&None::<i64>, &None::<i64>],
            )
            .await
            .expect("explain");
        for row in plan {
            println!("{}", row.get::<_, String>(0));
        }
    }
    drop(client);
    let budgets = gc::Budgets::default();
    let t = Instant::now();
    let decided = gc::decide_evictions(&db, &budgets).await.expect("decide");
    let decide = t.elapsed();
    let t = Instant::now();
    let applied = gc::apply_evictions(&db, &decided).await.expect("apply");
    let apply = t.elapsed();
    let settings = gc::GcSettings {
        missing_grace: Duration::from_secs(300),
        budgets,
    };
    let t = Instant::now();
    let outcome = gc::run_pass_with(&db, &settings).await.expect("pass");
    let pass = t.elapsed();
    let t = Instant::now();
    let again = gc::run_pass_with(&db, &settings).await.expect("pass");
    let idle = t.elapsed();
    let marked = match &outcome {
        gc::PassOutcome::Ran(s) => s.marked,
        gc::PassOutcome::Locked => 0,
    };
    println!(
        "eviction decision, 100,000 retained caches / 1,000 workers under pressure: {:.1} ms, {} evictions decided (target <= 1 s)",
        ms(decide),
        decided.len()
    );
    println!(
        "  applying it (lock, re-check, take {} caches from their workers): {:.1} ms; the GC pass after (marks {marked} volumes destroying): {:.1} ms; next pass (space in flight, nothing more evicted) {:.1} ms ({again:?})",
        applied.pressure.caches,
        ms(apply),
        ms(pass),
        ms(idle)
    );
}

const AUTH_WORKERS: usize = 8;

/// 304s for 8 workers: without authentication, then each client with its own worker's
/// token, on the same database and the same rows.
async fn credential_checks(cluster: &PgCluster) {
    let (mut config, db) = new_db(cluster).await;
    let mut tokens = Vec::new();
    for i in 0..AUTH_WORKERS {
        tokens.push(
            auth::issue(&db, &Subject::Worker(format!("w{i}")))
                .await
                .expect("issue")
                .token,
        );
    }
    let http = reqwest::Client::new();
    let mut figures = Vec::new();
    for mode in [AuthMode::None, AuthMode::Credentials] {
        config.auth = mode;
        let server = volume_central::start(&config).await.expect("start");
        let urls: Vec<String> = (0..AUTH_WORKERS)
            .map(|i| format!("{}/api/v1/workers/w{i}/volumes/desired", server.url()))
            .collect();
        let etag = http
            .get(&urls[0])
            .bearer_auth(&tokens[0])
            .send()
            .await
            .expect("desired")
            .headers()["etag"]
            .to_str()
            .expect("etag")
            .to_string();
        let (h, u, t) = (http.clone(), Arc::new(urls), Arc::new(tokens.clone()));
        let next = Arc::new(AtomicUsize::new(0));
        let with_token = mode == AuthMode::Credentials;
        let f = load(NOT_MODIFIED_REQUESTS, CONCURRENCY, move || {
            let i = next.fetch_add(1, Ordering::Relaxed) % AUTH_WORKERS;
            let mut req = h.get(&u[i]).header("If-None-Match", &etag);
            if with_token {
                req = req.bearer_auth(&t[i]);
            }
            let req = req.send();
            async move {
                let resp = req.await.expect("desired");
                assert_eq!(resp.status().as_u16(), 304);
            }
        })
        .await;
        server.stop().await;
        figures.push(f);
    }
    figures[0].print("desired 304, 8 workers, auth = \"none\"");
    figures[1].print("desired 304, 8 workers, per-worker tokens");
    println!(
        "  ratio per-worker tokens / no auth throughput {:.2} (target >= 0.90)",
        figures[1].per_sec / figures[0].per_sec
    );
}

const REPORT_VOLUMES: i64 = 300_000;
const REPORT_EXTRA: i64 = 50_000;

/// One report of 300,000 volumes, `creating` of them new (rows still `creating`, to be
/// confirmed), 50,000 destroyed and 50,000 missing, with `/healthz` polled by one client
/// while it is applied (and idle, before, for comparison).
async fn large_report(cluster: &PgCluster, creating: i64) {
    let (config, db) = new_db(cluster).await;
    db.client()
        .await
        .expect("client")
        .batch_execute(&format!(
            "INSERT INTO workers (name) VALUES ('huge');
             INSERT INTO containers (id, worker_name, handle) VALUES (1, 'huge', 'c');
             INSERT INTO volumes (handle, worker_name, state, container_id)
             SELECT 'vol-' || i, 'huge', CASE WHEN i <= {creating} THEN 'creating' ELSE 'initialized' END, 1
               FROM generate_series(1, {REPORT_VOLUMES} + {REPORT_EXTRA}) i;
             ANALYZE;"
        ))
        .await
        .expect("seed huge worker");
    let volumes: Vec<serde_json::Value> = (1..=REPORT_VOLUMES)
        .map(|i| serde_json::json!({"handle": format!("vol-{i}"), "parent": null, "state": "initialized"}))
        .collect();
    let destroyed: Vec<String> = (REPORT_VOLUMES + 1..=REPORT_VOLUMES + REPORT_EXTRA)
        .map(|i| format!("vol-{i}"))
        .collect();
    let missing: Vec<String> = (0..REPORT_EXTRA).map(|i| format!("gone-{i}")).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "revision_seen": null, "volumes": volumes, "destroyed": destroyed, "missing": missing
    }))
    .expect("encode");
    let size = body.len();
    let server = volume_central::start(&config).await.expect("start");
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", server.url());
    let idle = load(2_000, 1, {
        let (h, u) = (http.clone(), health.clone());
        move || {
            let req = h.get(&u).send();
            async move {
                req.await.expect("healthz");
            }
        }
    })
    .await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (h, u, done) = (http.clone(), health.clone(), done.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let resp = h.get(&u).send().await.expect("healthz");
                assert!(resp.status().is_success());
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat
        })
    };
    let start = Instant::now();
    let resp = http
        .put(format!(
            "{}/api/v1/workers/huge/volumes/report",
            server.url()
        ))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("report");
    let applied = start.elapsed();
    assert_eq!(resp.status().as_u16(), 204);
    done.store(true, Ordering::Relaxed);
    let mut lat = poller.await.expect("poller");
    lat.sort();
    server.stop().await;
    println!(
        "report of {REPORT_VOLUMES} volumes ({creating} new) + {REPORT_EXTRA} destroyed + {REPORT_EXTRA} missing ({} MiB) applied in {:.0} ms (target <= 2,000 ms)",
        size >> 20,
        ms(applied)
    );
    println!(
        "  /healthz while it ran: {} answers, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (target p99 <= 50 ms); idle: p50 {:.3} ms, p99 {:.3} ms",
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        ms(idle.p50),
        ms(idle.p99)
    );
}
