//! Every read and write of the seed's tables, outside the GC.
//!
//! Each function is one transaction (or one statement) and safe to repeat.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use protocol::native::{DesiredSet, DesiredVolume, ResourceTypesReport, VolumeReport};
use protocol::{Handle, VolumeState};
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::IsolationLevel;

use crate::db::{self, Db};
use crate::error::{sql_state, Error, Result};

/// Longest worker name accepted.
pub const MAX_WORKER_NAME: usize = 255;

/// Checks a worker name from a URL path.
pub fn check_worker_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_WORKER_NAME || name.chars().any(char::is_control) {
        return Err(Error::BadRequest(format!(
            "worker name {:?} is invalid; use 1 to {MAX_WORKER_NAME} printable characters",
            name.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// The answer to a desired-set request.
#[derive(Debug)]
pub enum Desired {
    /// The `If-None-Match` tag still matches.
    NotModified { etag: String },
    /// A full answer and its tag.
    Full { set: DesiredSet, etag: String },
    /// The central side does not know this worker.
    UnknownWorker,
}

/// The ETag of revision `revision` (quoted, as it goes on the wire).
pub fn etag_of(revision: i64) -> String {
    format!("\"r{revision}\"")
}

/// Whether an `If-None-Match` header value matches `etag`.
pub fn if_none_match_matches(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| {
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag == etag
    })
}

/// `GET /api/v1/workers/{w}/volumes/desired`.
pub async fn desired(db: &Db, worker: &str, if_none_match: Option<&str>) -> Result<Desired> {
    let mut client = db.client().await?;
    if let Some(header) = if_none_match {
        let stmt = client
            .prepare_cached("SELECT revision FROM workers WHERE name = $1")
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&worker]).await? else {
            return Ok(Desired::UnknownWorker);
        };
        let etag = etag_of(row.get(0));
        if if_none_match_matches(header, &etag) {
            return Ok(Desired::NotModified { etag });
        }
    }
    // One snapshot for the revision, the rows and `as_of`: the revision is bumped in the
    // same transaction as every change to the rows, so the three agree.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head = tx
        .prepare_cached("SELECT revision, now() FROM workers WHERE name = $1")
        .await?;
    let Some(row) = tx.query_opt(&head, &[&worker]).await? else {
        return Ok(Desired::UnknownWorker);
    };
    let revision: i64 = row.get(0);
    let as_of: DateTime<Utc> = row.get(1);
    let rows_stmt = tx
        .prepare_cached(
            // Parents live on their child's worker: join the worker's rows with
            // themselves rather than with the whole table.
            "WITH w AS MATERIALIZED (
                 SELECT id, handle, parent_id, state FROM volumes WHERE worker_name = $1)
             SELECT v.handle, p.handle, v.state = 'destroying'
               FROM w v LEFT JOIN w p ON p.id = v.parent_id
              ORDER BY v.id",
        )
        .await?;
    let rows = tx.query(&rows_stmt, &[&worker]).await?;
    tx.commit().await?;
    let mut volumes = Vec::with_capacity(rows.len());
    let mut destroying = Vec::new();
    for row in rows {
        let handle = stored_handle(row.get(0))?;
        if row.get::<_, bool>(2) {
            destroying.push(handle);
        } else {
            let parent = row
                .get::<_, Option<String>>(1)
                .map(stored_handle)
                .transpose()?;
            volumes.push(DesiredVolume { handle, parent });
        }
    }
    let etag = etag_of(revision);
    Ok(Desired::Full {
        set: DesiredSet {
            worker: worker.to_string(),
            revision: u64::try_from(revision).unwrap_or(0),
            as_of,
            volumes,
            destroying,
        },
        etag,
    })
}

fn stored_handle(s: String) -> Result<Handle> {
    Handle::new(s).map_err(|err| Error::Database(format!("stored handle is invalid: {err}")))
}

/// Registers `worker` inside `tx`; whether it is new.
pub async fn register_worker_in(
    tx: &tokio_postgres::Transaction<'_>,
    worker: &str,
) -> Result<bool> {
    check_worker_name(worker)?;
    Ok(tx
        .execute(
            "INSERT INTO workers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            &[&worker],
        )
        .await?
        == 1)
}

/// `POST /api/v1/workers`: registers `worker` (idempotent); whether it is new. Workers
/// exist only once registered, here or by issuing their credential.
pub async fn register_worker(db: &Db, worker: &str) -> Result<bool> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let created = register_worker_in(&tx, worker).await?;
    tx.commit().await?;
    Ok(created)
}

/// The error for a URL naming a worker that was never registered.
pub fn unknown_worker(worker: &str) -> Error {
    Error::NotFound(format!(
        "worker {worker:?} is not registered; the scheduler registers it with POST /api/v1/workers {{\"name\": {worker:?}}}, or issuing its credential does (`volume-central credentials issue --worker {worker}`)"
    ))
}

/// Fails with 404 unless `worker` is registered; locks its row against deletion.
async fn require_worker(tx: &deadpool_postgres::Transaction<'_>, worker: &str) -> Result<()> {
    // Every report, create and container call runs it.
    db::q_opt(
        tx,
        "SELECT 1 FROM workers WHERE name = $1 FOR KEY SHARE",
        &[&worker],
    )
    .await?
    .ok_or_else(|| unknown_worker(worker))?;
    Ok(())
}

/// A registered worker as `GET /api/v1/workers` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub name: String,
    pub revision: i64,
    pub created_at: DateTime<Utc>,
    /// What the worker's last report said; absent before its first report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<WorkerFigures>,
    /// Bytes of retained caches on the worker as the last GC pass counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_bytes: Option<i64>,
    /// Bytes of caches evicted from the worker, all time.
    #[serde(default)]
    pub evicted_bytes: i64,
}

/// A worker's figures from its last volume report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct WorkerFigures {
    pub at: DateTime<Utc>,
    /// The highest desired-set revision the worker had applied; `revision` minus this is
    /// how far it lags.
    pub revision_seen: Option<i64>,
    pub volumes: i64,
    /// Sum of the bytes measured per volume (volumes not measured yet count 0).
    pub volume_bytes: i64,
    pub disk_total_bytes: Option<i64>,
    pub disk_free_bytes: Option<i64>,
    pub pressure: Option<bool>,
    pub failed: i32,
    pub blocked: i32,
}

/// `GET /api/v1/workers`.
pub async fn list_workers(db: &Db) -> Result<Vec<WorkerRow>> {
    let client = db.client().await?;
    Ok(client
        .query(
            "SELECT name, revision, created_at, last_report_at, revision_seen, volume_count,
                    volume_bytes, disk_total_bytes, disk_free_bytes, pressure, failed_count,
                    blocked_count, retained_bytes, evicted_bytes
               FROM workers ORDER BY name",
            &[],
        )
        .await?
        .iter()
        .map(|r| WorkerRow {
            name: r.get(0),
            revision: r.get(1),
            created_at: r.get(2),
            last_report: r
                .get::<_, Option<DateTime<Utc>>>(3)
                .map(|at| WorkerFigures {
                    at,
                    revision_seen: r.get(4),
                    volumes: r.get::<_, Option<i64>>(5).unwrap_or(0),
                    volume_bytes: r.get::<_, Option<i64>>(6).unwrap_or(0),
                    disk_total_bytes: r.get(7),
                    disk_free_bytes: r.get(8),
                    pressure: r.get(9),
                    failed: r.get::<_, Option<i32>>(10).unwrap_or(0),
                    blocked: r.get::<_, Option<i32>>(11).unwrap_or(0),
                }),
            retained_bytes: r.get(12),
            evicted_bytes: r.get(13),
        })
        .collect())
}

/// What a report says about its worker as a whole, kept for the operator's view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportFigures {
    pub revision_seen: Option<u64>,
    pub volumes: u64,
    pub volume_bytes: u64,
    pub disk: Option<protocol::native::DiskReport>,
    pub failed: usize,
    pub blocked: usize,
    /// Handles and bytes of the volumes the report measured.
    pub measured_handles: Vec<String>,
    pub measured_bytes: Vec<i64>,
}

impl ReportFigures {
    pub fn new(report: &VolumeReport) -> Self {
        let (measured_handles, measured_bytes) = report
            .volumes
            .iter()
            .filter_map(|v| Some((v.handle.as_str().to_string(), to_i64(v.bytes?))))
            .unzip();
        ReportFigures {
            measured_handles,
            measured_bytes,
            revision_seen: report.revision_seen,
            volumes: report.volumes.len() as u64,
            volume_bytes: report.volumes.iter().filter_map(|v| v.bytes).sum(),
            disk: report.disk.clone(),
            failed: report.failed.len(),
            blocked: report.blocked.len(),
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records the figures of a report `worker` sent (one row; after the report applied),
/// and the measured bytes of its resource cache volumes (the bytes retention weighs;
/// only rows whose figure changed are written). Returns how long the worker was under
/// pressure when this report clears it.
pub async fn record_report_figures(
    db: &Db,
    worker: &str,
    f: &ReportFigures,
) -> Result<Option<std::time::Duration>> {
    // Both statements run on every report: prepared once per connection.
    let client = db.client().await?;
    if !f.measured_handles.is_empty() {
        db::exec(
            &client,
            "UPDATE volumes v SET bytes = t.bytes
               FROM unnest($2::text[], $3::bigint[]) AS t(handle, bytes)
              WHERE v.worker_name = $1 AND v.handle = t.handle
                AND v.resource_cache_id IS NOT NULL
                AND v.bytes IS DISTINCT FROM t.bytes",
            &[&worker, &f.measured_handles, &f.measured_bytes],
        )
        .await?;
    }
    let disk = f.disk.as_ref();
    let row = db::q_opt(
        &client,
        "UPDATE workers SET last_report_at = now(), revision_seen = $2, volume_count = $3,
                    volume_bytes = $4, disk_total_bytes = $5, disk_free_bytes = $6,
                    pressure = $7, failed_count = $8, blocked_count = $9,
                    reported_min_free = $10,
                    pressure_since = CASE WHEN $7::bool IS NULL THEN workers.pressure_since
                                          WHEN $7::bool THEN COALESCE(workers.pressure_since, now())
                                     END
               FROM (SELECT pressure_since AS since FROM workers WHERE name = $1) old
              WHERE name = $1
             RETURNING CASE WHEN NOT $7::bool
                            THEN extract(epoch FROM now() - old.since)::float8
                       END",
        &[
            &worker,
            &f.revision_seen.map(to_i64),
            &to_i64(f.volumes),
            &to_i64(f.volume_bytes),
            &disk.map(|d| to_i64(d.total_bytes)),
            &disk.map(|d| to_i64(d.free_bytes)),
            &disk.map(|d| d.pressure),
            &i32::try_from(f.failed).unwrap_or(i32::MAX),
            &i32::try_from(f.blocked).unwrap_or(i32::MAX),
            &disk.and_then(|d| d.min_free_bytes).map(to_i64),
        ],
    )
    .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<f64>>(0))
        .map(|secs| std::time::Duration::from_secs_f64(secs.max(0.0))))
}

/// Volume rows by state, for `volume_central_volumes`.
pub async fn volumes_by_state(db: &Db) -> Result<std::collections::BTreeMap<String, u64>> {
    let client = db.client().await?;
    Ok(client
        .query("SELECT state, count(*) FROM volumes GROUP BY state", &[])
        .await?
        .iter()
        .map(|r| {
            let n: i64 = r.get(1);
            (r.get(0), u64::try_from(n).unwrap_or(0))
        })
        .collect())
}

/// `PUT /api/v1/workers/{w}/base-resource-types`: the registered worker's types. A
/// type whose version changed loses its old `worker_base_resource_types` row, so volumes
/// built on the old version become garbage.
pub async fn put_resource_types(db: &Db, worker: &str, report: &ResourceTypesReport) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for t in &report.resource_types {
        if t.name.is_empty() || t.version.is_empty() {
            return Err(Error::BadRequest(
                "resource type with an empty `type` or `version`; both are required".into(),
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::BadRequest(format!(
                "resource type {:?} is listed twice; send each type once with its current version",
                t.name
            )));
        }
    }
    let names: Vec<&str> = report
        .resource_types
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let versions: Vec<&str> = report
        .resource_types
        .iter()
        .map(|t| t.version.as_str())
        .collect();
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    require_worker(&tx, worker).await?;
    tx.execute(
        "INSERT INTO base_resource_types (name, version)
         SELECT * FROM unnest($1::text[], $2::text[])
         ORDER BY 1, 2
         ON CONFLICT (name, version) DO NOTHING",
        &[&names, &versions],
    )
    .await?;
    let ids: Vec<i64> = tx
        .query(
            "SELECT b.id FROM base_resource_types b
               JOIN unnest($1::text[], $2::text[]) AS t(name, version)
                 ON b.name = t.name AND b.version = t.version",
            &[&names, &versions],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let removed = tx
        .execute(
            "DELETE FROM worker_base_resource_types
              WHERE worker_name = $1 AND base_resource_type_id <> ALL($2)",
            &[&worker, &ids],
        )
        .await?;
    tx.execute(
        "INSERT INTO worker_base_resource_types (worker_name, base_resource_type_id)
         SELECT $1, unnest($2::bigint[])
         ON CONFLICT (worker_name, base_resource_type_id) DO NOTHING",
        &[&worker, &ids],
    )
    .await?;
    tx.commit().await?;
    if removed > 0 {
        tracing::info!(
            worker,
            removed,
            "base resource types changed; volumes on old versions are now garbage"
        );
    }
    Ok(())
}

/// What a report changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportOutcome {
    pub confirmed: u64,
    pub deleted: u64,
    pub marked_missing: u64,
    pub cleared_missing: u64,
    /// Handles reported destroyed whose rows still have children: kept for now.
    pub kept_with_children: u64,
}

/// A report reduced to what the database needs: three lists of handles, each without
/// duplicates, `missing` without the handles also reported present. Built in time linear
/// in the report's size (hash sets), so the HTTP layer can build it off the event loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportSets {
    pub present: Vec<String>,
    pub destroyed: Vec<String>,
    pub missing: Vec<String>,
}

impl ReportSets {
    pub fn new(report: &VolumeReport) -> Self {
        let mut seen = HashSet::with_capacity(report.volumes.len());
        let present: Vec<String> = report
            .volumes
            .iter()
            .map(|v| v.handle.as_str())
            .filter(|h| seen.insert(*h))
            .map(str::to_string)
            .collect();
        // `missing` skips what is present (the volume is there after all); `destroyed`
        // is independent of both.
        let missing = unique_handles(&report.missing, &mut seen);
        let destroyed = unique_handles(&report.destroyed, &mut HashSet::new());
        ReportSets {
            present,
            destroyed,
            missing,
        }
    }
}

fn unique_handles<'a>(handles: &'a [Handle], seen: &mut HashSet<&'a str>) -> Vec<String> {
    handles
        .iter()
        .map(Handle::as_str)
        .filter(|h| seen.insert(h))
        .map(str::to_string)
        .collect()
}

/// How many handles a report names (the figure `max_report_handles` bounds).
pub fn report_handle_count(report: &VolumeReport) -> usize {
    report.volumes.len()
        + report.destroyed.len()
        + report.missing.len()
        + report.failed.len()
        + report
            .blocked
            .iter()
            .map(|b| 1 + b.by_children.len())
            .sum::<usize>()
}

/// `PUT /api/v1/workers/{w}/volumes/report`.
pub async fn apply_report(db: &Db, worker: &str, report: &VolumeReport) -> Result<ReportOutcome> {
    apply_report_sets(db, worker, &ReportSets::new(report)).await
}

/// [`apply_report`] on a report already reduced to [`ReportSets`]: a fixed number of
/// statements, each matching a handle array with the worker's rows (`= ANY`: hashed in a
/// scan or probed in the handle index, never a nested loop over the array), so the time is linear in the report's size whatever its
/// shape, and the present handles, most of a report, are matched in memory against the
/// few rows they can change.
pub async fn apply_report_sets(db: &Db, worker: &str, sets: &ReportSets) -> Result<ReportOutcome> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_apply_report(db, worker, sets).await {
            Err(Error::Conflict(msg) | Error::Busy(msg)) if attempt < 3 => {
                tracing::debug!(
                    worker,
                    attempt,
                    "report raced a concurrent change: {msg}; retrying"
                );
            }
            other => return other,
        }
    }
}

async fn try_apply_report(db: &Db, worker: &str, sets: &ReportSets) -> Result<ReportOutcome> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    require_worker(&tx, worker).await?;
    let mut out = ReportOutcome::default();
    if !sets.present.is_empty() {
        // The rows a present handle can change are few (new creates to confirm, rows
        // marked missing), and two partial indexes find them, so only those cross the
        // wire again, not every handle the worker has. A row that turns `creating` after
        // this read is confirmed by the next report.
        let candidates = db::q(
            &tx,
            "SELECT handle, state = 'creating', missing_since IS NOT NULL FROM volumes
              WHERE worker_name = $1 AND (state = 'creating' OR missing_since IS NOT NULL)",
            &[&worker],
        )
        .await?;
        if !candidates.is_empty() {
            let mut creating = HashSet::new();
            let mut missing = HashSet::new();
            for row in &candidates {
                let handle: &str = row.get(0);
                if row.get::<_, bool>(1) {
                    creating.insert(handle);
                }
                if row.get::<_, bool>(2) {
                    missing.insert(handle);
                }
            }
            let (mut confirm, mut clear) = (Vec::new(), Vec::new());
            for h in &sets.present {
                if creating.contains(h.as_str()) {
                    confirm.push(h.as_str());
                }
                if missing.contains(h.as_str()) {
                    clear.push(h.as_str());
                }
            }
            if !confirm.is_empty() {
                out.confirmed = tx
                    .execute(
                        "UPDATE volumes SET state = 'created'
                          WHERE worker_name = $1 AND handle = ANY($2) AND state = 'creating'",
                        &[&worker, &confirm],
                    )
                    .await?;
            }
            if !clear.is_empty() {
                out.cleared_missing = tx
                    .execute(
                        "UPDATE volumes SET missing_since = NULL
                          WHERE worker_name = $1 AND handle = ANY($2)
                            AND missing_since IS NOT NULL",
                        &[&worker, &clear],
                    )
                    .await?;
            }
        }
    }
    if !sets.missing.is_empty() {
        out.marked_missing = tx
            .execute(
                "UPDATE volumes SET missing_since = now()
                  WHERE handle = ANY($2) AND worker_name = $1 AND missing_since IS NULL
                    AND state NOT IN ('creating', 'destroying')",
                &[&worker, &sets.missing],
            )
            .await?;
    }
    if !sets.destroyed.is_empty() {
        // One statement, deepest rows included: a reported row is deleted when no row
        // below it is kept. Kept are the rows not reported, and every reported ancestor
        // of one (found by walking up from each kept row's parent). It answers how many
        // reported rows it deleted and how many it kept (they still have children).
        let stmt = "WITH RECURSIVE
                 r AS MATERIALIZED (
                     SELECT v.id, v.parent_id FROM volumes v
                      WHERE v.handle = ANY($2) AND v.worker_name = $1),
                 held (id) AS (
                     SELECT c.parent_id FROM r JOIN volumes c ON c.parent_id = r.id
                      WHERE NOT EXISTS (SELECT 1 FROM r AS o WHERE o.id = c.id)
                     UNION
                     SELECT r.parent_id FROM r JOIN held ON r.id = held.id
                      WHERE r.parent_id IS NOT NULL),
                 gone AS (
                     DELETE FROM volumes v USING r
                      WHERE v.id = r.id AND NOT EXISTS (SELECT 1 FROM held WHERE held.id = r.id)
                     RETURNING 1)
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM r) - (SELECT count(*) FROM gone)";
        let row = tx
            .query_one(stmt, &[&worker, &sets.destroyed])
            .await
            .map_err(|err| restrict_to_conflict(err, "a reported volume got a new child"))?;
        out.deleted = row.get::<_, i64>(0).try_into().unwrap_or(0);
        out.kept_with_children = row.get::<_, i64>(1).try_into().unwrap_or(0);
    }
    tx.commit()
        .await
        .map_err(|err| restrict_to_conflict(err, "a reported volume changed concurrently"))?;
    Ok(out)
}

fn restrict_to_conflict(err: tokio_postgres::Error, what: &str) -> Error {
    match sql_state(&err) {
        Some(s)
            if *s == SqlState::FOREIGN_KEY_VIOLATION
                || *s == SqlState::T_R_DEADLOCK_DETECTED
                || *s == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            Error::Conflict(format!("{what}: {err}"))
        }
        _ => err.into(),
    }
}

/// `POST /api/v1/workers/{w}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub handle: Handle,
    #[serde(default)]
    pub parent: Option<Handle>,
    /// Handle of the container that uses the volume.
    #[serde(default)]
    pub container: Option<String>,
    /// Id of the resource cache the volume holds.
    #[serde(default)]
    pub resource_cache: Option<i64>,
    /// Name of the worker's base resource type the volume was imported from.
    #[serde(default)]
    pub base_resource_type: Option<String>,
}

/// A volume row as the scheduler API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeRow {
    pub handle: Handle,
    pub worker: String,
    pub state: VolumeState,
    pub parent: Option<Handle>,
    pub container: Option<String>,
    pub resource_cache: Option<i64>,
    pub base_resource_type: Option<String>,
    pub created_at: DateTime<Utc>,
    pub missing_since: Option<DateTime<Utc>>,
    /// Why the volume is kept (`container`, `resource cache`, `base resource type`), or
    /// empty when it is garbage.
    pub kept_by: Vec<String>,
}

const ROW_SELECT: &str = "
SELECT v.handle, v.worker_name, v.state, p.handle, c.handle, v.resource_cache_id,
       b.name || ' ' || b.version, v.created_at, v.missing_since
  FROM volumes v
  LEFT JOIN volumes p ON p.id = v.parent_id
  LEFT JOIN containers c ON c.id = v.container_id
  LEFT JOIN worker_base_resource_types w ON w.id = v.worker_base_resource_type_id
  LEFT JOIN base_resource_types b ON b.id = w.base_resource_type_id";

fn volume_row(row: &tokio_postgres::Row) -> Result<VolumeRow> {
    let state: String = row.get(2);
    let state: VolumeState = state.parse().map_err(Error::Database)?;
    let container: Option<String> = row.get(4);
    let resource_cache: Option<i64> = row.get(5);
    let base_resource_type: Option<String> = row.get(6);
    let mut kept_by = Vec::new();
    if let Some(c) = &container {
        kept_by.push(format!("container {c}"));
    }
    if let Some(id) = resource_cache {
        kept_by.push(format!("resource cache {id}"));
    }
    if let Some(b) = &base_resource_type {
        kept_by.push(format!("base resource type {b}"));
    }
    Ok(VolumeRow {
        handle: stored_handle(row.get(0))?,
        worker: row.get(1),
        state,
        parent: row
            .get::<_, Option<String>>(3)
            .map(stored_handle)
            .transpose()?,
        container,
        resource_cache,
        base_resource_type,
        created_at: row.get(7),
        missing_since: row.get(8),
        kept_by,
    })
}

/// Inserts a `creating` volume. A copy-on-write child is inserted with
/// `parent_state = 'initialized'`: when the parent is not initialized or is being
/// destroyed, the foreign key refuses it and the caller gets [`Error::Conflict`].
pub async fn create_volume(db: &Db, worker: &str, req: &CreateVolume) -> Result<VolumeRow> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    require_worker(&tx, worker).await?;
    let container_id: Option<i64> = match &req.container {
        None => None,
        Some(h) => Some(
            db::q_opt(&tx,
                "SELECT id FROM containers WHERE handle = $1 AND worker_name = $2",
                &[h, &worker],
            )
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "container {h:?} is unknown on worker {worker:?}; create it with POST /api/v1/workers/{worker}/containers"
                ))
            })?
            .get(0),
        ),
    };
    if let Some(id) = req.resource_cache {
        db::q_opt(&tx, "SELECT 1 FROM resource_caches WHERE id = $1", &[&id])
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "resource cache {id} is unknown; create it with POST /api/v1/resource-caches"
                ))
            })?;
    }
    let wbrt_id: Option<i64> = match &req.base_resource_type {
        None => None,
        Some(name) => Some(
            db::q_opt(&tx,
                "SELECT w.id FROM worker_base_resource_types w
                   JOIN base_resource_types b ON b.id = w.base_resource_type_id
                  WHERE w.worker_name = $1 AND b.name = $2",
                &[&worker, name],
            )
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "worker {worker:?} has no base resource type {name:?}; its agent reports them with PUT /api/v1/workers/{worker}/base-resource-types"
                ))
            })?
            .get(0),
        ),
    };
    let parent_id: Option<i64> = match &req.parent {
        None => None,
        Some(p) => {
            let row = db::q_opt(
                &tx,
                "SELECT id, worker_name, state FROM volumes WHERE handle = $1",
                &[&p.as_str()],
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("parent volume {p} is unknown")))?;
            let pw: String = row.get(1);
            if pw != worker {
                return Err(Error::Conflict(format!(
                    "parent volume {p} is on worker {pw:?}, not {worker:?}; a copy-on-write child lives beside its parent"
                )));
            }
            let state: String = row.get(2);
            if state != "initialized" {
                return Err(parent_conflict(p, &state));
            }
            Some(row.get(0))
        }
    };
    let parent_state: Option<&str> = parent_id.map(|_| "initialized");
    let inserted = db::exec(
        &tx,
        "INSERT INTO volumes (handle, worker_name, state, parent_id, parent_state,
                                  resource_cache_id, worker_base_resource_type_id, container_id)
             VALUES ($1, $2, 'creating', $3, $4, $5, $6, $7)",
        &[
            &req.handle.as_str(),
            &worker,
            &parent_id,
            &parent_state,
            &req.resource_cache,
            &wbrt_id,
            &container_id,
        ],
    )
    .await;
    if let Err(err) = inserted {
        return Err(insert_error(err, req));
    }
    let row = db::q_one(
        &tx,
        &format!("{ROW_SELECT} WHERE v.handle = $1"),
        &[&req.handle.as_str()],
    )
    .await?;
    tx.commit().await.map_err(|err| insert_error(err, req))?;
    volume_row(&row)
}

fn parent_conflict(parent: &Handle, state: &str) -> Error {
    if state == "destroying" {
        Error::Conflict(format!(
            "parent volume {parent} is being destroyed; create the child from another volume"
        ))
    } else {
        Error::Conflict(format!(
            "parent volume {parent} is {state}, not initialized; a copy-on-write child needs an initialized parent"
        ))
    }
}

fn insert_error(err: tokio_postgres::Error, req: &CreateVolume) -> Error {
    let Some(db) = err.as_db_error() else {
        return err.into();
    };
    match (db.code(), db.constraint()) {
        (c, _) if *c == SqlState::UNIQUE_VIOLATION => Error::Conflict(format!(
            "volume {} already exists; pick a new handle",
            req.handle
        )),
        (c, Some("volumes_parent_fkey")) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            match &req.parent {
                Some(p) => Error::Conflict(format!(
                    "parent volume {p} is being destroyed or is no longer initialized; create the child from another volume"
                )),
                None => Error::Conflict("parent volume changed concurrently".into()),
            }
        }
        (c, Some(name)) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::NotFound(format!(
            "a referenced row was deleted concurrently ({name}); retry with a current container, cache or type"
        )),
        _ => err.into(),
    }
}

/// `PUT /api/v1/volumes/{h}/state`: forward only, as the agent's state route.
pub async fn set_state(db: &Db, handle: &Handle, to: VolumeState) -> Result<VolumeRow> {
    let from: Vec<&str> = VolumeState::ALL
        .into_iter()
        .filter(|s| s.may_advance_to(to))
        .map(VolumeState::as_str)
        .collect();
    let client = db.client().await?;
    let n = db::exec(
        &client,
        "UPDATE volumes SET state = $2 WHERE handle = $1 AND state = ANY($3)",
        &[&handle.as_str(), &to.as_str(), &from],
    )
    .await
    .map_err(|err| restrict_to_conflict(err, "the volume has children"))?;
    let row = db::q_opt(
        &client,
        &format!("{ROW_SELECT} WHERE v.handle = $1"),
        &[&handle.as_str()],
    )
    .await?
    .ok_or_else(|| Error::NotFound(format!("volume {handle} is unknown")))?;
    let row = volume_row(&row)?;
    if n == 0 && row.state != to {
        return Err(Error::Conflict(format!(
            "volume {handle} is {}; it cannot move to {to} (states move forward only, and `created` comes from the agent's report)",
            row.state
        )));
    }
    Ok(row)
}

/// `GET /api/v1/workers/{w}/volumes`.
pub async fn list_volumes(db: &Db, worker: &str) -> Result<Vec<VolumeRow>> {
    let client = db.client().await?;
    if client
        .query_opt("SELECT 1 FROM workers WHERE name = $1", &[&worker])
        .await?
        .is_none()
    {
        return Err(unknown_worker(worker));
    }
    let rows = client
        .query(
            &format!("{ROW_SELECT} WHERE v.worker_name = $1 ORDER BY v.id"),
            &[&worker],
        )
        .await?;
    rows.iter().map(volume_row).collect()
}

/// `POST /api/v1/workers/{w}/containers`: idempotent for the same worker.
pub async fn create_container(db: &Db, worker: &str, handle: &str) -> Result<bool> {
    if handle.is_empty() || handle.len() > 255 {
        return Err(Error::BadRequest(
            "container handle must be 1 to 255 characters".into(),
        ));
    }
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    require_worker(&tx, worker).await?;
    let created = db::exec(
        &tx,
        "INSERT INTO containers (worker_name, handle) VALUES ($1, $2)
             ON CONFLICT (handle) DO NOTHING",
        &[&worker, &handle],
    )
    .await?
        == 1;
    if !created {
        let owner: String = db::q_one(
            &tx,
            "SELECT worker_name FROM containers WHERE handle = $1",
            &[&handle],
        )
        .await?
        .get(0);
        if owner != worker {
            return Err(Error::Conflict(format!(
                "container {handle:?} exists on worker {owner:?}"
            )));
        }
    }
    tx.commit().await?;
    Ok(created)
}

/// `DELETE /api/v1/workers/{w}/containers/{h}`: its volumes lose their container and may
/// become garbage. Idempotent; 404 only for an unregistered worker.
pub async fn delete_container(db: &Db, worker: &str, handle: &str) -> Result<()> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    require_worker(&tx, worker).await?;
    db::exec(
        &tx,
        "DELETE FROM containers WHERE worker_name = $1 AND handle = $2",
        &[&worker, &handle],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `POST /api/v1/resource-configs`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResourceConfig {
    /// A base resource type's name (its most recently registered version is used)...
    #[serde(default)]
    pub base_resource_type: Option<String>,
    /// ...or the cache of a custom resource type.
    #[serde(default)]
    pub resource_cache: Option<i64>,
    pub source_hash: String,
    #[serde(default)]
    pub params_hash: String,
}

/// Finds or creates a resource config; returns its id.
pub async fn create_resource_config(db: &Db, req: &CreateResourceConfig) -> Result<i64> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let (brt, rc): (Option<i64>, Option<i64>) = match (&req.base_resource_type, req.resource_cache)
    {
        (Some(name), None) => {
            let id: i64 = tx
                .query_opt(
                    "SELECT id FROM base_resource_types WHERE name = $1 ORDER BY id DESC LIMIT 1",
                    &[name],
                )
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "base resource type {name:?} is unknown; no worker has reported it"
                    ))
                })?
                .get(0);
            (Some(id), None)
        }
        (None, Some(cache)) => {
            tx.query_opt("SELECT 1 FROM resource_caches WHERE id = $1", &[&cache])
                .await?
                .ok_or_else(|| Error::NotFound(format!("resource cache {cache} is unknown")))?;
            (None, Some(cache))
        }
        _ => {
            return Err(Error::BadRequest(
                "set exactly one of `base_resource_type` and `resource_cache`".into(),
            ))
        }
    };
    let existing = tx
        .query_opt(
            "SELECT id FROM resource_configs
              WHERE base_resource_type_id IS NOT DISTINCT FROM $1
                AND resource_cache_id IS NOT DISTINCT FROM $2
                AND source_hash = $3 AND params_hash = $4
              LIMIT 1",
            &[&brt, &rc, &req.source_hash, &req.params_hash],
        )
        .await?;
    let id = match existing {
        Some(row) => row.get(0),
        None => tx
            .query_one(
                "INSERT INTO resource_configs
                   (base_resource_type_id, resource_cache_id, source_hash, params_hash)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&brt, &rc, &req.source_hash, &req.params_hash],
            )
            .await?
            .get(0),
    };
    tx.commit().await?;
    Ok(id)
}

/// `POST /api/v1/resource-caches`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResourceCache {
    pub resource_config: i64,
    pub version: String,
    /// A build that uses the cache: the use is created in the same transaction, so the
    /// GC cannot delete the new cache before its first use exists.
    #[serde(default)]
    pub build: Option<i64>,
}

/// Finds or creates a resource cache (and its first use); returns its id.
pub async fn create_resource_cache(db: &Db, req: &CreateResourceCache) -> Result<i64> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO resource_caches (resource_config_id, version)
             SELECT id, $2 FROM resource_configs WHERE id = $1
             ON CONFLICT (resource_config_id, version) DO UPDATE SET version = EXCLUDED.version
             RETURNING id",
            &[&req.resource_config, &req.version],
        )
        .await
        .map_err(|err| not_found_on_fk(err, "resource config", req.resource_config))?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "resource config {} is unknown; create it with POST /api/v1/resource-configs",
                req.resource_config
            ))
        })?;
    let id: i64 = row.get(0);
    if let Some(build) = req.build {
        tx.execute(
            "INSERT INTO resource_cache_uses (resource_cache_id, build_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
            &[&id, &build],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

fn not_found_on_fk(err: tokio_postgres::Error, what: &str, id: i64) -> Error {
    if sql_state(&err) == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        Error::NotFound(format!("{what} {id} is unknown (deleted concurrently)"))
    } else {
        err.into()
    }
}

/// `POST /api/v1/resource-caches/{id}/uses/{build}`. Idempotent.
pub async fn add_cache_use(db: &Db, cache: i64, build: i64) -> Result<()> {
    let client = db.client().await?;
    let n = client
        .execute(
            "INSERT INTO resource_cache_uses (resource_cache_id, build_id)
             SELECT id, $2 FROM resource_caches WHERE id = $1
             ON CONFLICT DO NOTHING",
            &[&cache, &build],
        )
        .await
        .map_err(|err| not_found_on_fk(err, "resource cache", cache))?;
    if n == 0
        && client
            .query_opt("SELECT 1 FROM resource_caches WHERE id = $1", &[&cache])
            .await?
            .is_none()
    {
        return Err(Error::NotFound(format!(
            "resource cache {cache} is unknown"
        )));
    }
    Ok(())
}

/// `DELETE /api/v1/resource-caches/{id}/uses/{build}`. Idempotent.
pub async fn delete_cache_use(db: &Db, cache: i64, build: i64) -> Result<()> {
    let client = db.client().await?;
    client
        .execute(
            "DELETE FROM resource_cache_uses WHERE resource_cache_id = $1 AND build_id = $2",
            &[&cache, &build],
        )
        .await?;
    Ok(())
}

/// The scheduler's mark on a resource cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// Retained while its workers have room once no build uses it; evicted least
    /// recently used first under pressure or over a worker's cache budget.
    Auto,
    /// Kept for reuse: never evicted for a budget, only under disk pressure (after every
    /// `auto` cache of the worker).
    Keep,
    /// Deleted at the next GC pass once no build uses it.
    Drop,
}

impl Retention {
    pub fn as_str(self) -> &'static str {
        match self {
            Retention::Auto => "auto",
            Retention::Keep => "keep",
            Retention::Drop => "drop",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Retention::Auto),
            "keep" => Ok(Retention::Keep),
            "drop" => Ok(Retention::Drop),
            other => Err(Error::Database(format!("unknown retention {other:?}"))),
        }
    }
}

/// `PUT /api/v1/resource-caches/{id}/retention`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRetention {
    pub retention: Retention,
}

/// One volume of a cache on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheVolume {
    pub handle: Handle,
    pub state: VolumeState,
    /// Real bytes from the worker's last report that measured it.
    pub bytes: Option<i64>,
}

/// A worker holding a cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheWorker {
    pub worker: String,
    pub volumes: Vec<CacheVolume>,
    /// Sum of the volumes' measured bytes.
    pub bytes: i64,
}

/// A resource cache's retention state and the workers that hold it
/// (`GET /api/v1/resource-caches/{id}/workers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheRetention {
    pub resource_cache: i64,
    pub version: String,
    pub retention: Retention,
    /// Builds using it now; 0 when it is retained.
    pub uses: i64,
    /// Since when no build uses it (absent while one does).
    pub retained_since: Option<DateTime<Utc>>,
    pub last_used_at: DateTime<Utc>,
    /// Workers with a volume of the cache that is not being destroyed, the ones with an
    /// `initialized` volume first (a build can start there now), then by name.
    pub workers: Vec<CacheWorker>,
}

fn unknown_cache(id: i64) -> Error {
    Error::NotFound(format!(
        "resource cache {id} is unknown (never created, or deleted after its last use went); create it with POST /api/v1/resource-caches"
    ))
}

/// `GET /api/v1/resource-caches/{id}/workers`: one snapshot.
pub async fn cache_retention(db: &Db, id: i64) -> Result<CacheRetention> {
    let mut client = db.client().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let row = tx
        .query_opt(
            "SELECT rc.version, rc.retention, rc.retained_since, rc.last_used_at,
                    (SELECT count(*) FROM resource_cache_uses u WHERE u.resource_cache_id = rc.id)
               FROM resource_caches rc WHERE rc.id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| unknown_cache(id))?;
    let vols = tx
        .query(
            "SELECT worker_name, handle, state, bytes FROM volumes
              WHERE resource_cache_id = $1 AND state <> 'destroying'
              ORDER BY worker_name, handle",
            &[&id],
        )
        .await?;
    tx.commit().await?;
    let mut workers: Vec<CacheWorker> = Vec::new();
    for v in &vols {
        let worker: String = v.get(0);
        let state: String = v.get(2);
        let vol = CacheVolume {
            handle: stored_handle(v.get(1))?,
            state: state.parse().map_err(Error::Database)?,
            bytes: v.get(3),
        };
        match workers.last_mut() {
            Some(w) if w.worker == worker => {
                w.bytes += vol.bytes.unwrap_or(0);
                w.volumes.push(vol);
            }
            _ => workers.push(CacheWorker {
                worker,
                bytes: vol.bytes.unwrap_or(0),
                volumes: vec![vol],
            }),
        }
    }
    workers.sort_by_key(|w| {
        !w.volumes
            .iter()
            .any(|v| v.state == VolumeState::Initialized)
    });
    Ok(CacheRetention {
        resource_cache: id,
        version: row.get(0),
        retention: Retention::parse(row.get(1))?,
        retained_since: row.get(2),
        last_used_at: row.get(3),
        uses: row.get(4),
        workers,
    })
}

/// `PUT /api/v1/resource-caches/{id}/retention`.
pub async fn set_cache_retention(db: &Db, id: i64, retention: Retention) -> Result<CacheRetention> {
    let client = db.client().await?;
    let n = client
        .execute(
            "UPDATE resource_caches SET retention = $2 WHERE id = $1",
            &[&id, &retention.as_str()],
        )
        .await?;
    if n == 0 {
        return Err(unknown_cache(id));
    }
    drop(client);
    cache_retention(db, id).await
}

/// `PUT /api/v1/workers/{w}/retention`: the worker's own budgets (absent or null: the
/// config's `[retention]` default).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetWorkerRetention {
    #[serde(default)]
    pub cache_budget: Option<u64>,
    #[serde(default)]
    pub min_free: Option<u64>,
}

/// A worker's budgets and what retention does on it (`GET /api/v1/workers/{w}/retention`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerRetention {
    pub worker: String,
    /// Its own settings (absent: the default applies).
    pub cache_budget: Option<i64>,
    pub min_free: Option<i64>,
    /// The free-space floor its agent reported (`gc.min_free` in bytes).
    pub reported_min_free: Option<i64>,
    /// What the GC applies: its own setting, else (for `min_free`) the floor its agent
    /// reports, else the config's default; absent: no limit.
    pub effective_cache_budget: Option<i64>,
    pub effective_min_free: Option<i64>,
    /// Bytes of retained caches on it as the last GC pass counted them.
    pub retained_bytes: Option<i64>,
    /// From its last report.
    pub disk_free_bytes: Option<i64>,
    pub pressure: Option<bool>,
    /// Since when its reports say `pressure`.
    pub pressure_since: Option<DateTime<Utc>>,
    /// Caches evicted from it and the bytes they held, all time.
    pub evictions: i64,
    pub evicted_bytes: i64,
}

/// `GET /api/v1/workers/{w}/retention`.
pub async fn worker_retention(
    db: &Db,
    worker: &str,
    defaults: &crate::gc::Budgets,
) -> Result<WorkerRetention> {
    let client = db.client().await?;
    let r = client
        .query_opt(
            "SELECT cache_budget, min_free, retained_bytes, disk_free_bytes, pressure,
                    pressure_since, evictions, evicted_bytes, reported_min_free
               FROM workers WHERE name = $1",
            &[&worker],
        )
        .await?
        .ok_or_else(|| unknown_worker(worker))?;
    let budget: Option<i64> = r.get(0);
    let min_free: Option<i64> = r.get(1);
    let reported_min_free: Option<i64> = r.get(8);
    let d = |n: Option<u64>| n.map(to_i64);
    Ok(WorkerRetention {
        worker: worker.to_string(),
        cache_budget: budget,
        min_free,
        effective_cache_budget: budget.or(d(defaults.cache_budget)),
        reported_min_free,
        effective_min_free: min_free.or(reported_min_free).or(d(defaults.min_free)),
        retained_bytes: r.get(2),
        disk_free_bytes: r.get(3),
        pressure: r.get(4),
        pressure_since: r.get(5),
        evictions: r.get(6),
        evicted_bytes: r.get(7),
    })
}

/// `PUT /api/v1/workers/{w}/retention`.
pub async fn set_worker_retention(
    db: &Db,
    worker: &str,
    req: &SetWorkerRetention,
    defaults: &crate::gc::Budgets,
) -> Result<WorkerRetention> {
    let client = db.client().await?;
    let n = client
        .execute(
            "UPDATE workers SET cache_budget = $2, min_free = $3 WHERE name = $1",
            &[
                &worker,
                &req.cache_budget.map(to_i64),
                &req.min_free.map(to_i64),
            ],
        )
        .await?;
    if n == 0 {
        return Err(unknown_worker(worker));
    }
    drop(client);
    worker_retention(db, worker, defaults).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let tag = etag_of(7);
        assert!(if_none_match_matches("\"r7\"", &tag));
        assert!(if_none_match_matches("\"r6\", W/\"r7\"", &tag));
        assert!(if_none_match_matches("*", &tag));
        assert!(!if_none_match_matches("\"r6\"", &tag));
        assert!(!if_none_match_matches("r7", &tag));
    }

    #[test]
    fn worker_names_refuse_empty_and_control_characters() {
        assert!(check_worker_name("worker-0").is_ok());
        assert!(check_worker_name("").is_err());
        assert!(check_worker_name("a\nb").is_err());
        assert!(check_worker_name(&"w".repeat(256)).is_err());
    }
}
