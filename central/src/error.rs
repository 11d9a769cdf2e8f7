//! The library's error type and its mapping from database errors.

use tokio_postgres::error::SqlState;

/// What went wrong, shaped by who must act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database cannot be reached (HTTP 503). Retry later; nothing was changed.
    #[error("database unavailable: {0}; retry when PostgreSQL is reachable again")]
    Unavailable(String),
    /// A named thing does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The request is larger than a configured bound (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// PostgreSQL aborted the transaction to resolve a clash with a concurrent one (a
    /// deadlock or a serialization failure, e.g. a report against a GC pass marking the
    /// same rows) (HTTP 503). Nothing was changed; the same request succeeds on a retry.
    #[error("the database aborted this request in a clash with a concurrent change ({0}); nothing was changed, retry it")]
    Busy(String),
    /// The database schema is older than this build (HTTP 503).
    #[error("database schema is at migration {found}, this build needs {needed}; run `volume-central migrate`")]
    SchemaBehind { found: i32, needed: i32 },
    /// Anything else the database refused (HTTP 500).
    #[error("database error: {0}")]
    Database(String),
}

impl Error {
    /// Whether the underlying problem is a lost or refused connection.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// The SQL state of a database error, if it is one.
pub(crate) fn sql_state(err: &tokio_postgres::Error) -> Option<&SqlState> {
    err.as_db_error().map(|db| db.code())
}

fn is_connection_state(code: &SqlState) -> bool {
    let c = code.code();
    // 08: connection exception; 57P: operator intervention (shutdown, crash recovery);
    // 53: insufficient resources (too many connections).
    c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            None => Error::Unavailable(err.to_string()),
            Some(db) if is_connection_state(db.code()) => Error::Unavailable(db.to_string()),
            Some(db)
                if *db.code() == SqlState::T_R_DEADLOCK_DETECTED
                    || *db.code() == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                Error::Busy(format!("{} ({})", db.message(), db.code().code()))
            }
            Some(db) => Error::Database(format!("{} ({})", db.message(), db.code().code())),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Unavailable(other.to_string()),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
