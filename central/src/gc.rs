//! The seed's volume GC, one replica at a time (a PostgreSQL advisory lock).
//!
//! A pass: delete resource caches without uses (their volumes lose `resource_cache_id`),
//! then mark every *candidate* subtree `destroying` in one transaction. A candidate is a
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

/// `tainted` (candidates with a live descendant) and `markable` (candidates without one),
/// as the head of a `WITH RECURSIVE` statement. Every lookup is a join on `volumes`
/// (primary key or `parent_id` index), never a correlated scan of a CTE.
fn markable_ctes() -> String {
    let (cv, cp) = (candidate("v"), candidate("p"));
    format!(
        "WITH RECURSIVE
         tainted(id) AS (
             -- candidates with a live child
             SELECT p.id FROM volumes v JOIN volumes p ON p.id = v.parent_id
              WHERE v.state <> 'destroying' AND NOT {cv} AND {cp}
             UNION
             -- and their candidate ancestors
             SELECT p.id FROM tainted t JOIN volumes c ON c.id = t.id
                                        JOIN volumes p ON p.id = c.parent_id
              WHERE {cp}
         ),
         markable AS MATERIALIZED (
             SELECT v.id, v.parent_id FROM volumes v
              WHERE {cv} AND NOT EXISTS (SELECT 1 FROM tainted t WHERE t.id = v.id)
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
                 SELECT c.id, false, true FROM {marked} m JOIN volumes c ON c.parent_id = m.id
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

fn mark_all_sql() -> String {
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

/// Deletes resource caches that no build uses. Caches locked by a concurrent use insert
/// are skipped until the next pass.
pub async fn delete_unused_caches(db: &Db) -> Result<u64> {
    let client = db.client().await?;
    let res = client
        .execute(
            "DELETE FROM resource_caches WHERE id IN (
                 SELECT rc.id FROM resource_caches rc
                  WHERE NOT EXISTS (SELECT 1 FROM resource_cache_uses u WHERE u.resource_cache_id = rc.id)
                    AND NOT EXISTS (SELECT 1 FROM resource_configs c WHERE c.resource_cache_id = rc.id)
                  FOR UPDATE SKIP LOCKED)",
            &[],
        )
        .await;
    match res {
        Ok(n) => Ok(n),
        Err(err) if is_race(&err) => {
            tracing::info!("a cache got a use while the GC deleted it; retrying next pass: {err}");
            Ok(0)
        }
        Err(err) => Err(err.into()),
    }
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

/// One GC pass under the advisory lock. [`PassOutcome::Locked`] when another replica
/// is running one.
pub async fn run_pass(db: &Db, missing_grace: Duration) -> Result<PassOutcome> {
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
        let caches_deleted = delete_unused_caches(db).await?;
        let (marked, skipped) = mark_garbage(db, missing_grace).await?;
        Ok::<_, Error>(GcStats {
            caches_deleted,
            marked,
            skipped,
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
