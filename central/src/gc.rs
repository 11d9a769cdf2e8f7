//! The seed's volume GC, one replica at a time (a PostgreSQL advisory lock).
//!
//! A pass: first [`evict`] retained resource caches on workers under disk pressure or over
//! their cache budget (least recently used first, whole subtrees only, never a volume in
//! use or with a live child), then [`delete_unused_caches`] (caches the scheduler marked
//! `drop` once no build uses them, and retained caches no volume holds any more), then
//! mark every *candidate* subtree `destroying` in one transaction. A candidate is a
//! volume not yet `destroying` that is garbage (`resource_cache_id`,
//! `worker_base_resource_type_id` and `container_id` all NULL) or missing from its worker
//! for longer than `missing_grace`. A candidate is marked only when none of its
//! descendants is live (neither a candidate nor `destroying`); its children's
//! `parent_state` moves along with it under a deferred constraint; the row records when
//! and why (`destroying_since`, `destroy_reason`: `unowned` or `missing`). Every step is
//! idempotent: repeating a pass, or running it after a crash, changes nothing more.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

use crate::db::Db;
use crate::error::{sql_state, Error, Result};

/// Advisory lock key held for the length of a pass.
pub const GC_LOCK: i64 = 0x766f_6c67_6363; // "volgcc"

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcStats {
    pub caches_deleted: u64,
    /// Volumes newly marked `destroying`.
    pub marked: u64,
    /// Subtrees skipped because a concurrent change gave them a live child.
    pub skipped: u64,
    /// Retained caches taken from workers, by reason.
    pub evicted: Evictions,
}

/// Why a retained cache left a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// The worker reported `pressure`, or free bytes below its `min_free`.
    Pressure,
    /// The worker's retained caches held more than its `cache_budget`.
    Budget,
    /// The scheduler marked the cache `drop`.
    Dropped,
}

impl EvictReason {
    pub const ALL: [EvictReason; 3] = [
        EvictReason::Pressure,
        EvictReason::Budget,
        EvictReason::Dropped,
    ];

    /// The word stored in `volumes.evict_reason` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Pressure => "pressure",
            EvictReason::Budget => "budget",
            EvictReason::Dropped => "dropped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Caches taken from workers (one per cache and worker) and the bytes they held there,
/// as last reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub caches: u64,
    pub bytes: u64,
}

/// [`Tally`] by [`EvictReason`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    pub pressure: Tally,
    pub budget: Tally,
    pub dropped: Tally,
}

impl Evictions {
    pub fn get(&self, reason: EvictReason) -> Tally {
        match reason {
            EvictReason::Pressure => self.pressure,
            EvictReason::Budget => self.budget,
            EvictReason::Dropped => self.dropped,
        }
    }

    fn add(&mut self, reason: EvictReason, bytes: u64) {
        let t = match reason {
            EvictReason::Pressure => &mut self.pressure,
            EvictReason::Budget => &mut self.budget,
            EvictReason::Dropped => &mut self.dropped,
        };
        t.caches += 1;
        t.bytes += bytes;
    }
}

/// Fleet-wide defaults of the per-worker budgets (`[retention]` in the config); a
/// worker's own setting (`PUT /api/v1/workers/{w}/retention`) wins.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Most bytes of retained caches a worker keeps; `None`: no limit.
    pub cache_budget: Option<u64>,
    /// Free bytes a worker keeps on its volumes file system; `None`: only the worker's
    /// own `pressure` flag starts an eviction.
    pub min_free: Option<u64>,
}

/// What the GC needs besides the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    pub missing_grace: Duration,
    pub budgets: Budgets,
}

/// The outcome of [`run_pass`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassOutcome {
    Ran(GcStats),
    /// Another replica holds the GC lock.
    Locked,
}

/// Candidate predicate on the `volumes` row aliased `v`; `$1` is the grace in seconds.
/// Never NULL, so `NOT` of it is the live predicate.
fn candidate(v: &str) -> String {
    format!(
        "({v}.state <> 'destroying' AND (
          ({v}.resource_cache_id IS NULL AND {v}.worker_base_resource_type_id IS NULL
           AND {v}.container_id IS NULL)
          OR COALESCE({v}.missing_since < now() - make_interval(secs => $1::float8), false)))"
    )
}

/// `cand` (every candidate with its parent), `tainted` (candidates with a live
/// descendant) and `markable` (candidates without one), as the head of a `WITH RECURSIVE`
/// statement. The candidates are read once, through the two partial indexes
/// (`volumes_garbage_idx`, `volumes_missing_idx`), and everything after works on that
/// set: the climb from a live child to its candidate ancestors joins `cand`, never the
/// whole table (at 1,000,000 rows a climb over `volumes` took seconds per level).
fn markable_ctes() -> String {
    let ck = candidate("k");
    format!(
        "WITH RECURSIVE
     cand AS MATERIALIZED (
         SELECT v.id, v.parent_id FROM volumes v
          WHERE v.resource_cache_id IS NULL AND v.worker_base_resource_type_id IS NULL
            AND v.container_id IS NULL AND v.state <> 'destroying'
         UNION
         SELECT v.id, v.parent_id FROM volumes v
          WHERE v.missing_since < now() - make_interval(secs => $1::float8)
            AND v.state <> 'destroying'
     ),
     tainted(id, parent_id) AS (
         -- candidates with a live child (neither destroying nor a candidate)
         -- (`OFFSET 0` keeps each a probe of the parent index, not a hash of the table)
         SELECT c.id, c.parent_id FROM cand c
          WHERE EXISTS (SELECT 1 FROM volumes k
                         WHERE k.parent_id = c.id AND k.state <> 'destroying' AND NOT {ck}
                        OFFSET 0)
         UNION
         -- and their candidate ancestors
         SELECT p.id, p.parent_id FROM tainted t JOIN cand p ON p.id = t.parent_id
     ),
     -- `DISTINCT`: the planner's estimate of a recursive CTE grows without bound (13
     -- billion rows for 80,000 at 1,000,000 volumes), which sized the anti join's hash
     -- for that and spilled it into 8,192 batches; over a `DISTINCT` it assumes 200.
     markable AS MATERIALIZED (
         SELECT c.id, c.parent_id FROM cand c
          WHERE NOT EXISTS (SELECT 1 FROM (SELECT DISTINCT id FROM tainted) t WHERE t.id = c.id)
     )"
    )
}

/// Moves the rows of `marked` (a CTE of ids) to `destroying` and their children's
/// `parent_state` along; returns per row whether it was newly marked.
fn mark_update(marked: &str) -> String {
    format!(
        "changes AS (
             SELECT id, bool_or(mark) AS mark, bool_or(move_parent) AS move_parent FROM (
                 SELECT m.id, true AS mark, false AS move_parent FROM {marked} m
                 UNION ALL
                 SELECT c.id, false, true FROM {marked} m
                  CROSS JOIN LATERAL (SELECT k.id FROM volumes k WHERE k.parent_id = m.id
                                      OFFSET 0) c
             ) x GROUP BY id
         )
         UPDATE volumes v SET
             state = CASE WHEN ch.mark THEN 'destroying' ELSE v.state END,
             parent_state = CASE WHEN ch.move_parent THEN 'destroying' ELSE v.parent_state END,
             destroying_since = CASE WHEN ch.mark THEN now() ELSE v.destroying_since END,
             destroy_reason = CASE WHEN NOT ch.mark THEN v.destroy_reason
                                   WHEN v.resource_cache_id IS NULL
                                    AND v.worker_base_resource_type_id IS NULL
                                    AND v.container_id IS NULL THEN 'unowned'
                                   ELSE 'missing' END
           FROM changes ch
          WHERE ch.id = v.id"
    )
}

/// The bulk mark statement (`$1`: the missing grace in seconds), public for the benchmark's
/// `EXPLAIN`.
pub fn mark_all_sql() -> String {
    format!(
        "{},
         {}
         RETURNING ch.mark",
        markable_ctes(),
        mark_update("markable")
    )
}

fn roots_sql() -> String {
    format!(
        "{}
         SELECT m.id FROM markable m
          WHERE m.parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM markable p WHERE p.id = m.parent_id)",
        markable_ctes()
    )
}

/// Marks the subtree of `$2` when it still has no live descendant.
fn mark_subtree_sql() -> String {
    let cv = candidate("v");
    format!(
        "WITH RECURSIVE
         sub(id) AS (SELECT $2::bigint UNION SELECT v.id FROM volumes v JOIN sub s ON v.parent_id = s.id),
         live AS (SELECT 1 FROM volumes v JOIN sub s ON s.id = v.id
                   WHERE v.state <> 'destroying' AND NOT {cv}),
         root AS (SELECT 1 FROM volumes v WHERE v.id = $2 AND v.state <> 'destroying'),
         picked AS MATERIALIZED (
             SELECT v.id FROM sub s JOIN volumes v ON v.id = s.id
              WHERE v.state <> 'destroying'
                AND NOT EXISTS (SELECT 1 FROM live) AND EXISTS (SELECT 1 FROM root)
         ),
         {}
         RETURNING ch.mark",
        mark_update("picked")
    )
}

fn grace_secs(grace: Duration) -> f64 {
    grace.as_secs_f64()
}

/// Whether `err` means "a concurrent change gave the subtree a live child".
fn is_race(err: &tokio_postgres::Error) -> bool {
    matches!(sql_state(err), Some(s) if *s == SqlState::FOREIGN_KEY_VIOLATION
        || *s == SqlState::T_R_DEADLOCK_DETECTED
        || *s == SqlState::T_R_SERIALIZATION_FAILURE)
}

async fn defer(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute("SET CONSTRAINTS volumes_parent_fkey DEFERRED")
        .await
}

/// Retained caches that may leave: no build uses them (`retained_since` is set in the
/// same transaction as the last use goes, cleared in the same one as a use comes) and no
/// custom resource type's config is built on them. On `resource_caches rc`. Checked again
/// under the row lock: `retained_since` is a column of the locked row, so a use committed
/// between the snapshot and the lock excludes the row (PostgreSQL re-checks the locked
/// row's newest version), and the uses subquery catches the rest.
const RETAINED: &str = "rc.retained_since IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM resource_cache_uses u WHERE u.resource_cache_id = rc.id)
    AND NOT EXISTS (SELECT 1 FROM resource_configs c WHERE c.resource_cache_id = rc.id)";

/// A volume `v` a retained cache may lose: not in use by anything else (container, base
/// resource type), not being built, and without a live child.
const EVICTABLE_VOLUME: &str = "(v.state IN ('created', 'initialized')
    AND v.container_id IS NULL AND v.worker_base_resource_type_id IS NULL
    AND NOT EXISTS (SELECT 1 FROM volumes k WHERE k.parent_id = v.id AND k.state <> 'destroying'))";

/// Deletes the caches the scheduler marked `drop` once no build uses them (their volumes
/// record why, then lose the cache and become garbage), and retained caches that no
/// volume holds any more (nothing left to retain), unless marked `keep`. Caches locked by
/// a concurrent use are skipped until the next pass. Returns the caches deleted and the
/// dropped caches' volumes by worker.
pub async fn delete_unused_caches(db: &Db) -> Result<u64> {
    Ok(delete_unused(db).await?.0)
}

async fn delete_unused(db: &Db) -> Result<(u64, Evictions)> {
    let mut client = db.client().await?;
    let work = async {
        let tx = client.transaction().await?;
        let locked: Vec<i64> = tx
            .query(
                &format!(
                    "SELECT rc.id FROM resource_caches rc
                      WHERE {RETAINED}
                        AND (rc.retention = 'drop'
                             OR (rc.retention = 'auto' AND NOT EXISTS (
                                   SELECT 1 FROM volumes v WHERE v.resource_cache_id = rc.id
                                      AND v.state <> 'destroying')))
                      ORDER BY rc.id
                      FOR UPDATE OF rc SKIP LOCKED"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if locked.is_empty() {
            tx.commit().await?;
            return Ok((0, Evictions::default()));
        }
        // The dropped caches' volumes say why they lost their cache, per worker with the
        // bytes the cache held there.
        let rows = tx
            .query(
                "WITH per AS (
                     SELECT v.worker_name, v.resource_cache_id AS cache,
                            sum(COALESCE(v.bytes, 0))::bigint AS bytes
                       FROM volumes v
                      WHERE v.resource_cache_id = ANY($1) AND v.state <> 'destroying'
                      GROUP BY 1, 2),
                 upd AS (
                     UPDATE volumes v SET evicted_cache_id = per.cache, evict_reason = 'dropped',
                                          evicted_at = now(), evicted_cache_bytes = per.bytes
                       FROM per
                      WHERE v.resource_cache_id = per.cache AND v.worker_name = per.worker_name
                        AND v.state <> 'destroying'
                     RETURNING 1)
                 SELECT worker_name, bytes FROM per",
                &[&locked],
            )
            .await?;
        let mut dropped = Evictions::default();
        let mut by_worker: Vec<(String, i64)> = Vec::new();
        for r in &rows {
            let bytes: i64 = r.get(1);
            dropped.add(EvictReason::Dropped, u64::try_from(bytes).unwrap_or(0));
            by_worker.push((r.get(0), bytes));
        }
        record_worker_evictions(&tx, &by_worker).await?;
        let n = tx
            .execute("DELETE FROM resource_caches WHERE id = ANY($1)", &[&locked])
            .await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>((n, dropped))
    };
    match work.await {
        Ok(done) => Ok(done),
        Err(err) if is_race(&err) => {
            tracing::info!("a cache got a use while the GC deleted it; retrying next pass: {err}");
            Ok((0, Evictions::default()))
        }
        Err(err) => Err(err.into()),
    }
}

/// Adds evictions to the workers' all-time figures.
async fn record_worker_evictions(
    tx: &Transaction<'_>,
    by_worker: &[(String, i64)],
) -> Result<(), tokio_postgres::Error> {
    if by_worker.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = by_worker.iter().map(|(w, _)| w.as_str()).collect();
    let bytes: Vec<i64> = by_worker.iter().map(|(_, b)| *b).collect();
    tx.execute(
        "UPDATE workers w SET evicted_bytes = w.evicted_bytes + e.bytes,
                              evictions = w.evictions + e.n
           FROM (SELECT name, sum(bytes)::bigint AS bytes, count(*) AS n
                   FROM unnest($1::text[], $2::bigint[]) AS t(name, bytes) GROUP BY name) e
          WHERE w.name = e.name",
        &[&names, &bytes],
    )
    .await?;
    Ok(())
}

/// One eviction the GC decided: cache `cache` leaves `worker`, where it held `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub worker: String,
    pub cache: i64,
    pub bytes: i64,
    pub reason: EvictReason,
}

/// The eviction decision, one set-based statement: per worker, how many bytes must go
/// (under pressure: up to `min_free` free — the worker's own setting, else the floor its
/// agent reports, else the config's default — less what the worker is destroying or has
/// had evicted already and
/// has not reported freed; over budget: down to `cache_budget`), and, in eviction order
/// (`drop` marks first, then `auto`, then `keep`; least recently used first), a running
/// sum of each retained cache's bytes on the worker: a cache is evicted while the sum
/// before it is below what must go. `keep` caches leave only under pressure. A worker
/// under pressure whose need is unknown (no `min_free`) or covered by what it is
/// destroying already loses one cache per pass while nothing is in flight.
/// `$1` the default `min_free`, `$2` the default `cache_budget` (NULL: none).
const DECIDE: &str = "
WITH per AS MATERIALIZED (
    SELECT v.worker_name, v.resource_cache_id AS cache, rc.retention, rc.last_used_at,
           sum(COALESCE(v.bytes, 0))::bigint AS bytes, bool_and({EVICTABLE}) AS evictable
      FROM volumes v JOIN resource_caches rc ON rc.id = v.resource_cache_id
     WHERE v.state <> 'destroying' AND {RETAINED}
     GROUP BY v.worker_name, v.resource_cache_id, rc.retention, rc.last_used_at),
tot AS (SELECT worker_name, sum(bytes)::bigint AS bytes FROM per GROUP BY 1),
pending AS (
    SELECT v.worker_name, sum(COALESCE(v.bytes, 0))::bigint AS bytes
      FROM volumes v WHERE v.state = 'destroying' OR v.evict_reason IS NOT NULL GROUP BY 1),
need AS MATERIALIZED (
    SELECT w.name,
           CASE WHEN COALESCE(w.pressure, false)
                  OR w.disk_free_bytes < COALESCE(w.min_free, w.reported_min_free, $1::bigint)
                THEN GREATEST(COALESCE(COALESCE(w.min_free, w.reported_min_free, $1::bigint) - w.disk_free_bytes, 0)
                                - COALESCE(p.bytes, 0),
                              CASE WHEN COALESCE(p.bytes, 0) = 0 THEN 1 ELSE 0 END)
                ELSE 0 END AS need_free,
           GREATEST(t.bytes - COALESCE(w.cache_budget, $2::bigint), 0) AS need_budget
      FROM tot t JOIN workers w ON w.name = t.worker_name
      LEFT JOIN pending p ON p.worker_name = w.name),
ranked AS (
    SELECT p.worker_name, p.cache, p.bytes, p.retention, n.need_free, n.need_budget,
           sum(p.bytes) OVER (PARTITION BY p.worker_name COLLATE \"C\"
                              ORDER BY CASE p.retention WHEN 'drop' THEN 0 WHEN 'auto' THEN 1 ELSE 2 END,
                                       p.last_used_at, p.cache
                              ROWS UNBOUNDED PRECEDING) - p.bytes AS before
      FROM per p JOIN need n ON n.name = p.worker_name
     WHERE p.evictable AND (n.need_free > 0 OR n.need_budget > 0))
SELECT worker_name, cache, bytes,
       CASE WHEN before < need_free THEN 'pressure' ELSE 'budget' END
  FROM ranked
 WHERE before < need_free OR (retention <> 'keep' AND before < need_budget)";

/// The decision statement (`$1` default `min_free`, `$2` default `cache_budget`), for
/// the benchmark's query plan.
pub fn decide_sql() -> String {
    DECIDE
        .replace("{RETAINED}", RETAINED)
        .replace("{EVICTABLE}", EVICTABLE_VOLUME)
}

/// Settings of the set-based GC statements (eviction and marking): the planner's
/// estimates over CTEs are far too high, which turned JIT compilation on (over a second
/// of a 100,000-cache decision, 1.3 s of a 1,000,000-row mark spent compiling), and the
/// default `work_mem` spilled their sorts and hashes to disk.
pub const SET_LOCAL: &str = "SET LOCAL jit = off; SET LOCAL work_mem = '64MB'";

/// The bulk mark's own setting. Its estimates are far off (billions of rows for the
/// climb), and with them the planner joined the climb's levels with the candidates by
/// sorting all 180,000 candidates again on every level. Without merge joins the marking
/// pass at 1,000,000 volumes took 7.5 s instead of 9.9 s (`gc-1m`, same machine, one run
/// each).
pub const MARK_SET_LOCAL: &str = "SET LOCAL enable_mergejoin = off";

fn opt_i64(n: Option<u64>) -> Option<i64> {
    n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// What must leave which worker now ([`DECIDE`]), read without locking anything.
pub async fn decide_evictions(db: &Db, budgets: &Budgets) -> Result<Vec<Eviction>> {
    let mut client = db.client().await?;
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(SET_LOCAL).await?;
    let rows = tx
        .query(
            &decide_sql(),
            &[&opt_i64(budgets.min_free), &opt_i64(budgets.cache_budget)],
        )
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|r| {
            let reason: &str = r.get(3);
            Ok(Eviction {
                worker: r.get(0),
                cache: r.get(1),
                bytes: r.get(2),
                reason: EvictReason::parse(reason)
                    .ok_or_else(|| Error::Database(format!("unknown eviction reason {reason}")))?,
            })
        })
        .collect()
}

/// Applies `decided` in one transaction: locks the caches (`FOR UPDATE SKIP LOCKED`: one
/// a concurrent use holds is left for the next pass), checks again that no build uses
/// them, and takes each from its worker's volumes that are still evictable, recording
/// on them which cache left, why, when and the bytes it held there. The volumes, now
/// unowned, are marked `destroying` by the rest of the pass. A use that comes after the
/// commit revives the cache (on the workers that still hold it).
pub async fn apply_evictions(db: &Db, decided: &[Eviction]) -> Result<Evictions> {
    if decided.is_empty() {
        return Ok(Evictions::default());
    }
    let workers: Vec<&str> = decided.iter().map(|e| e.worker.as_str()).collect();
    let caches: Vec<i64> = decided.iter().map(|e| e.cache).collect();
    let bytes: Vec<i64> = decided.iter().map(|e| e.bytes).collect();
    let reasons: Vec<&str> = decided.iter().map(|e| e.reason.as_str()).collect();
    let mut client = db.client().await?;
    let work = async {
        let tx = client.transaction().await?;
        tx.batch_execute(SET_LOCAL).await?;
        let rows = tx
            .query(
                &format!(
                    "WITH d AS (
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[])
                                AS d(worker, cache, bytes, reason)),
                     locked AS MATERIALIZED (
                         SELECT rc.id FROM resource_caches rc
                          WHERE rc.id IN (SELECT cache FROM d) AND {RETAINED}
                          ORDER BY rc.id
                          FOR UPDATE OF rc SKIP LOCKED),
                     upd AS (
                         UPDATE volumes v SET resource_cache_id = NULL, evicted_cache_id = d.cache,
                                evict_reason = d.reason, evicted_at = now(),
                                evicted_cache_bytes = d.bytes
                           FROM d JOIN locked l ON l.id = d.cache
                          WHERE v.resource_cache_id = d.cache AND v.worker_name = d.worker
                            AND v.state <> 'destroying' AND {EVICTABLE_VOLUME}
                         RETURNING d.worker, d.cache)
                     SELECT DISTINCT d.worker, d.cache, d.bytes, d.reason
                       FROM d JOIN upd u ON u.worker = d.worker AND u.cache = d.cache"
                ),
                &[&workers, &caches, &bytes, &reasons],
            )
            .await?;
        let mut done = Evictions::default();
        let mut by_worker = Vec::with_capacity(rows.len());
        for r in &rows {
            let b: i64 = r.get(2);
            let reason = EvictReason::parse(r.get(3)).unwrap_or(EvictReason::Pressure);
            done.add(reason, u64::try_from(b).unwrap_or(0));
            by_worker.push((r.get::<_, String>(0), b));
        }
        record_worker_evictions(&tx, &by_worker).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(done)
    };
    match work.await {
        Ok(done) => Ok(done),
        Err(err) if is_race(&err) => {
            tracing::info!("an eviction raced a concurrent change; retrying next pass: {err}");
            Ok(Evictions::default())
        }
        Err(err) => Err(err.into()),
    }
}

/// [`decide_evictions`] then [`apply_evictions`].
pub async fn evict(db: &Db, budgets: &Budgets) -> Result<Evictions> {
    let decided = decide_evictions(db, budgets).await?;
    apply_evictions(db, &decided).await
}

/// Counts each worker's bytes of retained caches again (`workers.retained_bytes`, read by
/// `/metrics` and the retention view); rows change only where the figure did.
pub async fn refresh_retained_bytes(db: &Db) -> Result<()> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(SET_LOCAL).await?;
    tx.execute(
        &format!(
            "UPDATE workers w SET retained_bytes = COALESCE(t.bytes, 0)
                   FROM workers w2 LEFT JOIN (
                        SELECT v.worker_name, sum(COALESCE(v.bytes, 0))::bigint AS bytes
                          FROM volumes v JOIN resource_caches rc ON rc.id = v.resource_cache_id
                         WHERE v.state <> 'destroying' AND {RETAINED}
                         GROUP BY 1) t ON t.worker_name = w2.name
                  WHERE w.name = w2.name
                    AND w.retained_bytes IS DISTINCT FROM COALESCE(t.bytes, 0)"
        ),
        &[],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Marks every candidate subtree without a live descendant `destroying`: all of them in
/// one transaction; when a concurrent child insert makes that fail, subtree by subtree,
/// skipping the ones that now have a live child. Returns `(marked, skipped)`.
pub async fn mark_garbage(db: &Db, missing_grace: Duration) -> Result<(u64, u64)> {
    let grace = grace_secs(missing_grace);
    let mut client = db.client().await?;
    let bulk = async {
        let tx = client.transaction().await?;
        defer(&tx).await?;
        tx.batch_execute(SET_LOCAL).await?;
        tx.batch_execute(MARK_SET_LOCAL).await?;
        let rows = tx.query(&mark_all_sql(), &[&grace]).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64)
    };
    match bulk.await {
        Ok(n) => return Ok((n, 0)),
        Err(err) if is_race(&err) => {
            tracing::info!("GC bulk mark raced a child insert; marking subtree by subtree: {err}");
        }
        Err(err) => return Err(err.into()),
    }
    let roots: Vec<i64> = client
        .query(&roots_sql(), &[&grace])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stmt = mark_subtree_sql();
    let (mut marked, mut skipped) = (0, 0);
    for root in roots {
        let one = async {
            let tx = client.transaction().await?;
            defer(&tx).await?;
            let n: u64 = tx
                .query(&stmt, &[&grace, &root])
                .await?
                .iter()
                .filter(|r| r.get::<_, bool>(0))
                .count() as u64;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(n)
        };
        match one.await {
            Ok(n) => marked += n,
            Err(err) if is_race(&err) => {
                tracing::info!(root, "a child still uses this volume; skipped: {err}");
                skipped += 1;
            }
            Err(err) => return Err(Error::from(err)),
        }
    }
    Ok((marked, skipped))
}

/// One GC pass under the advisory lock, without fleet-wide budget defaults (a worker's
/// own settings and `pressure` still apply). [`PassOutcome::Locked`] when another
/// replica is running one.
pub async fn run_pass(db: &Db, missing_grace: Duration) -> Result<PassOutcome> {
    run_pass_with(
        db,
        &GcSettings {
            missing_grace,
            budgets: Budgets::default(),
        },
    )
    .await
}

/// One GC pass under the advisory lock: evictions first (a worker under pressure waits
/// for nothing else), then unused caches, then marking, then the retained bytes.
pub async fn run_pass_with(db: &Db, settings: &GcSettings) -> Result<PassOutcome> {
    let missing_grace = settings.missing_grace;
    let client = db.client().await?;
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&GC_LOCK])
        .await?
        .get(0);
    if !got {
        return Ok(PassOutcome::Locked);
    }
    // The lock lives in this connection's session: if this future is dropped mid-pass,
    // the guard closes the connection instead of returning it to the pool, which
    // releases the lock.
    let guard = LockGuard(Some(client));
    let result = async {
        let mut evicted = evict(db, &settings.budgets).await?;
        let (caches_deleted, dropped) = delete_unused(db).await?;
        evicted.dropped = dropped.dropped;
        let (marked, skipped) = mark_garbage(db, missing_grace).await?;
        refresh_retained_bytes(db).await?;
        Ok::<_, Error>(GcStats {
            caches_deleted,
            marked,
            skipped,
            evicted,
        })
    }
    .await;
    guard.unlock().await;
    result.map(PassOutcome::Ran)
}

struct LockGuard(Option<deadpool_postgres::Object>);

impl LockGuard {
    async fn unlock(mut self) {
        if let Some(client) = self.0.take() {
            match client
                .query_one("SELECT pg_advisory_unlock($1)", &[&GC_LOCK])
                .await
            {
                Ok(_) => drop(client),
                Err(err) => {
                    tracing::warn!("cannot release the GC lock; closing its connection: {err}");
                    drop(deadpool_postgres::Object::take(client));
                }
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}
