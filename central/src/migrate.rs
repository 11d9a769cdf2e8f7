//! Checked-in migrations (`central/migrations/*.sql`), applied in order, each once.

use crate::db::Db;
use crate::error::{Error, Result};

/// `(version, name, sql)` of every migration this build knows, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "seed", include_str!("../migrations/0001_seed.sql")),
    (
        2,
        "credentials",
        include_str!("../migrations/0002_credentials.sql"),
    ),
    (
        3,
        "revision_without_join",
        include_str!("../migrations/0003_revision_without_join.sql"),
    ),
    (
        4,
        "operator_view",
        include_str!("../migrations/0004_operator_view.sql"),
    ),
    (
        5,
        "retention",
        include_str!("../migrations/0005_retention.sql"),
    ),
];

/// The highest migration version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Advisory lock key taken while migrating, so replicas that migrate at once take turns.
const MIGRATE_LOCK: i64 = 0x766f_6c6d_6967; // "volmig"

/// Applies every migration not applied yet. Safe to run again and from several replicas at
/// once. Returns the versions applied by this call.
pub async fn migrate(db: &Db) -> Result<Vec<i32>> {
    let mut client = db.client().await?;
    // The lock comes first: `CREATE TABLE IF NOT EXISTS` is not atomic against itself,
    // two replicas racing on it collide on the catalog (table, row type or index name).
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let result = create_bookkeeping(&client).await;
    let result = match result {
        Ok(()) => apply_pending(&mut client).await,
        Err(err) => Err(err),
    };
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn create_bookkeeping(client: &deadpool_postgres::Object) -> Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS central_schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .or_else(ignore_concurrent_create)
}

/// A replica of an older build that creates the bookkeeping table without the lock can
/// still race with us: the table, its row type or its index then already exist.
fn ignore_concurrent_create(err: tokio_postgres::Error) -> Result<()> {
    match crate::error::sql_state(&err).map(|s| s.code()) {
        Some("23505") | Some("42P07") | Some("42710") => Ok(()),
        _ => Err(err.into()),
    }
}

async fn apply_pending(client: &mut deadpool_postgres::Object) -> Result<Vec<i32>> {
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM central_schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(sql).await.map_err(|err| {
            Error::Database(format!(
                "migration {version} ({name}) failed: {}",
                Error::from(err)
            ))
        })?;
        tx.execute(
            "INSERT INTO central_schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied.push(version);
    }
    Ok(applied)
}

/// The highest migration applied to the database (0 for none).
pub async fn current_version(db: &Db) -> Result<i32> {
    let client = db.client().await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('central_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM central_schema_migrations", &[])
        .await?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Fails with [`Error::SchemaBehind`] unless every migration of this build is applied.
pub async fn check_current(db: &Db) -> Result<()> {
    let found = current_version(db).await?;
    let needed = latest_version();
    if found < needed {
        return Err(Error::SchemaBehind { found, needed });
    }
    Ok(())
}
