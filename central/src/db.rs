//! The connection pool (tokio-postgres behind deadpool-postgres).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

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
