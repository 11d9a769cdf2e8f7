//! The connection pool (tokio-postgres behind deadpool-postgres).

use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::error::{Error, Result};

/// How long a request waits for a connection, or for one to be made, before it fails
/// with 503.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of PostgreSQL connections. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    /// Builds a pool for `url` (`postgres://...` or `host=... user=...`; a `host` that is a
    /// directory means a unix socket). Connections are made lazily, so this succeeds while
    /// the database is down.
    pub fn connect(url: &str, pool_size: usize) -> Result<Self> {
        let mut pg: tokio_postgres::Config = url.parse().map_err(|err| {
            Error::BadRequest(format!(
                "invalid database_url: {err}; use postgres://user@host/db or `host=... dbname=...`"
            ))
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(POOL_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("volume-central");
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|err| Error::BadRequest(format!("cannot build connection pool: {err}")))?;
        Ok(Db { pool })
    }

    /// A connection from the pool; [`Error::Unavailable`] when none can be had.
    pub async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Whether a trivial query succeeds.
    pub async fn ping(&self) -> Result<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

// Statements the hot paths run (reports, the scheduler's creates and container calls)
// go through the connection's statement cache: parsed and planned once per connection,
// where `query("...")` sends its text to be parsed, described and planned on every call.
// Only for statements whose text is fixed (the cache keeps every text it is given).

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// `query` through the statement cache.
pub async fn q<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(sql).await?;
    c.query(&stmt, params).await
}

/// `query_opt` through the statement cache.
pub async fn q_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(sql).await?;
    c.query_opt(&stmt, params).await
}

/// `query_one` through the statement cache.
pub async fn q_one<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Row, tokio_postgres::Error> {
    let stmt = c.prepare_cached(sql).await?;
    c.query_one(&stmt, params).await
}

/// `execute` through the statement cache.
pub async fn exec<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = c.prepare_cached(sql).await?;
    c.execute(&stmt, params).await
}
