//! Identities: credentials, their tokens, and who may call which route.
//!
//! Three kinds of credential (design: central.md, "Identities"):
//! * a **worker's** reaches only the agent routes of its own worker;
//! * the **scheduler's** reaches the scheduler routes;
//! * an **operator's** reaches read-only views.
//!
//! A token is 32 bytes from the operating system's CSPRNG, shown once when issued. The
//! database keeps only its SHA-256. A slow password hash (argon2, bcrypt) protects
//! low-entropy secrets against guessing; a 256-bit random token cannot be guessed
//! whatever the hash costs, so a fast hash loses nothing, keeps the per-request check
//! cheap, and lets the lookup be one indexed equality on the hash.
//!
//! [`Authenticator`] checks a request's bearer token against the database through a
//! short-lived cache (`credential_cache`, default 2 s): a revocation, done by any process
//! (the CLI, another replica), reaches every replica within that time, without a restart.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::db::Db;
use crate::error::{Error, Result};
use crate::store;

/// What every token starts with (lets secret scanners recognise a leaked one).
pub const TOKEN_PREFIX: &str = "vc1_";

/// The kind of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Worker,
    Scheduler,
    Operator,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Worker => "worker",
            Kind::Scheduler => "scheduler",
            Kind::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Result<Kind> {
        match s {
            "worker" => Ok(Kind::Worker),
            "scheduler" => Ok(Kind::Scheduler),
            "operator" => Ok(Kind::Operator),
            other => Err(Error::Database(format!(
                "unknown credential kind {other:?}"
            ))),
        }
    }
}

/// Whom a new credential is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The agent of this worker (registers the worker when it is new).
    Worker(String),
    Scheduler,
    Operator,
}

/// A credential as `credentials list` shows it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub id: i64,
    pub kind: Kind,
    pub worker: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A credential just issued, with its token (shown this once).
#[derive(Debug, Clone)]
pub struct Issued {
    pub credential: Credential,
    pub token: String,
}

/// Who is calling, once the token is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Worker {
        id: i64,
        name: String,
    },
    Scheduler {
        id: i64,
    },
    Operator {
        id: i64,
    },
    /// `auth = "none"`: every route is open.
    Anonymous,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Worker { id, name } => write!(f, "credential {id} (worker {name:?})"),
            Identity::Scheduler { id } => write!(f, "credential {id} (scheduler)"),
            Identity::Operator { id } => write!(f, "credential {id} (operator)"),
            Identity::Anonymous => f.write_str("anonymous caller"),
        }
    }
}

/// A fresh random token: [`TOKEN_PREFIX`] and 64 hex digits (256 bits from the OS).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 64);
    token.push_str(TOKEN_PREFIX);
    for b in bytes {
        token.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        token.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    token
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn credential_row(row: &tokio_postgres::Row) -> Result<Credential> {
    Ok(Credential {
        id: row.get(0),
        kind: Kind::parse(row.get(1))?,
        worker: row.get(2),
        created_at: row.get(3),
        last_used_at: row.get(4),
        revoked_at: row.get(5),
    })
}

const CREDENTIAL_COLUMNS: &str = "id, kind, worker_name, created_at, last_used_at, revoked_at";

/// Issues a credential. A worker credential registers its worker in the same transaction.
pub async fn issue(db: &Db, subject: &Subject) -> Result<Issued> {
    let (kind, worker) = match subject {
        Subject::Worker(name) => {
            store::check_worker_name(name)?;
            (Kind::Worker, Some(name.as_str()))
        }
        Subject::Scheduler => (Kind::Scheduler, None),
        Subject::Operator => (Kind::Operator, None),
    };
    let token = new_token();
    let hash = token_hash(&token);
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    if let Some(name) = worker {
        store::register_worker_in(&tx, name).await?;
    }
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO credentials (kind, worker_name, token_sha256) VALUES ($1, $2, $3)
                 RETURNING {CREDENTIAL_COLUMNS}"
            ),
            &[&kind.as_str(), &worker, &hash.as_slice()],
        )
        .await?;
    tx.commit().await?;
    Ok(Issued {
        credential: credential_row(&row)?,
        token,
    })
}

/// Every credential, revoked ones included, oldest first.
pub async fn list(db: &Db) -> Result<Vec<Credential>> {
    let client = db.client().await?;
    client
        .query(
            &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY id"),
            &[],
        )
        .await?
        .iter()
        .map(credential_row)
        .collect()
}

/// Revokes credential `id` (again is a no-op); its token stops working on every replica
/// within the credential cache period.
pub async fn revoke(db: &Db, id: i64) -> Result<Credential> {
    let client = db.client().await?;
    let row = client
        .query_opt(
            &format!(
                "UPDATE credentials SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
                 RETURNING {CREDENTIAL_COLUMNS}"
            ),
            &[&id],
        )
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "credential {id} does not exist; `volume-central credentials list` shows the ids"
            ))
        })?;
    credential_row(&row)
}

/// How many credentials are not revoked.
pub async fn count_active(db: &Db) -> Result<i64> {
    let client = db.client().await?;
    Ok(client
        .query_one(
            "SELECT count(*) FROM credentials WHERE revoked_at IS NULL",
            &[],
        )
        .await?
        .get(0))
}

/// What the database says about a token hash.
enum Lookup {
    Active(Identity),
    Revoked { id: i64, at: DateTime<Utc> },
    Unknown,
}

async fn lookup(db: &Db, hash: &[u8; 32]) -> Result<Lookup> {
    let client = db.client().await?;
    // One statement: answers whether the credential is active, and marks it used at most
    // once a minute (so `credential_cache = "0s"` does not turn every request into a write).
    let stmt = client
        .prepare_cached(
            "WITH c AS (
                 SELECT id, kind, worker_name, revoked_at, last_used_at
                   FROM credentials WHERE token_sha256 = $1),
             used AS (
                 UPDATE credentials SET last_used_at = now() FROM c
                  WHERE credentials.id = c.id AND c.revoked_at IS NULL
                    AND (c.last_used_at IS NULL OR c.last_used_at < now() - interval '1 minute'))
             SELECT id, kind, worker_name, revoked_at FROM c",
        )
        .await?;
    let Some(row) = client.query_opt(&stmt, &[&hash.as_slice()]).await? else {
        return Ok(Lookup::Unknown);
    };
    let id: i64 = row.get(0);
    if let Some(at) = row.get::<_, Option<DateTime<Utc>>>(3) {
        return Ok(Lookup::Revoked { id, at });
    }
    Ok(Lookup::Active(match Kind::parse(row.get(1))? {
        Kind::Worker => Identity::Worker {
            id,
            name: row
                .get::<_, Option<String>>(2)
                .ok_or_else(|| Error::Database(format!("credential {id} has no worker")))?,
        },
        Kind::Scheduler => Identity::Scheduler { id },
        Kind::Operator => Identity::Operator { id },
    }))
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this route needs a credential: send `Authorization: Bearer <token>`; an operator issues one with `volume-central credentials issue --worker NAME | --scheduler | --operator`")]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`; send the token issued by `volume-central credentials issue` with the Bearer scheme")]
    Malformed,
    #[error("the bearer token is not a volume-central credential; use the token printed by `volume-central credentials issue` (check for a truncated or stale copy)")]
    Unknown,
    #[error("credential {id} was revoked at {at}; ask the operator for a new one (`volume-central credentials issue`)")]
    Revoked { id: i64, at: DateTime<Utc> },
    #[error("{who} may not {what}; {needs}")]
    Forbidden {
        who: String,
        what: String,
        needs: String,
    },
    #[error(transparent)]
    Unavailable(Error),
}

impl AuthError {
    /// The label of the refusal counter in `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Malformed => "missing",
            AuthError::Unknown => "unknown",
            AuthError::Revoked { .. } => "revoked",
            AuthError::Forbidden { .. } => "forbidden",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

impl ResponseError for AuthError {
    fn status_code(&self) -> StatusCode {
        match self {
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AuthError::Unavailable(err) => err.status_code(),
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let AuthError::Unavailable(err) = self {
            return err.error_response();
        }
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            AuthError::Missing | AuthError::Malformed => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"volume-central\""));
            }
            AuthError::Unknown | AuthError::Revoked { .. } => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"volume-central\", error=\"invalid_token\"",
                ));
            }
            _ => {}
        }
        resp.json(serde_json::json!({ "error": self.to_string() }))
    }
}

/// The token of an `Authorization` header: scheme `Bearer` in any case, one or more
/// spaces, the token.
pub fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// Largest number of cached credentials before the cache is emptied (a flood of distinct
/// valid tokens cannot grow memory without bound).
const CACHE_LIMIT: usize = 100_000;

/// Checks bearer tokens against the database, through a short-lived cache.
pub struct Authenticator {
    db: Db,
    /// False with `auth = "none"`.
    enabled: bool,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

/// A checked credential and when the database last confirmed it.
type Cached = (Arc<Identity>, Instant);

impl Authenticator {
    pub fn new(db: Db, enabled: bool, ttl: Duration) -> Self {
        Authenticator {
            db,
            enabled,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether requests need a credential (`auth` is not `"none"`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who sends `authorization` (the header's value, when present).
    pub async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Arc<Identity>, AuthError> {
        if !self.enabled {
            return Ok(Arc::new(Identity::Anonymous));
        }
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = bearer_token(value).ok_or(AuthError::Malformed)?;
        let hash = token_hash(token);
        if !self.ttl.is_zero() {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((id, at)) = cache.get(&hash) {
                if at.elapsed() < self.ttl {
                    return Ok(id.clone());
                }
            }
        }
        match lookup(&self.db, &hash).await {
            Ok(Lookup::Active(identity)) => {
                let identity = Arc::new(identity);
                if !self.ttl.is_zero() {
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(hash, (identity.clone(), Instant::now()));
                }
                Ok(identity)
            }
            Ok(Lookup::Revoked { id, at }) => {
                self.forget(&hash);
                Err(AuthError::Revoked { id, at })
            }
            Ok(Lookup::Unknown) => {
                self.forget(&hash);
                Err(AuthError::Unknown)
            }
            Err(err) => Err(AuthError::Unavailable(err)),
        }
    }

    fn forget(&self, hash: &[u8; 32]) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash);
    }
}

/// Who may call a route. `worker` is the route's `{w}`, when it has one.
pub trait Policy {
    /// `Err(what the route needs)` when `identity` may not call it.
    fn check(identity: &Identity, worker: Option<&str>) -> Result<(), String>;
}

/// An agent route that changes state: only the worker's own credential.
pub struct OwnWorker;
/// An agent route that reads (the desired set): the worker's own credential or an operator.
pub struct OwnWorkerOrOperator;
/// A scheduler route that changes state.
pub struct SchedulerOnly;
/// A read-only view: the scheduler or an operator.
pub struct SchedulerOrOperator;

fn own_worker(identity: &Identity, worker: Option<&str>) -> bool {
    matches!((identity, worker), (Identity::Worker { name, .. }, Some(w)) if name == w)
}

impl Policy for OwnWorker {
    fn check(identity: &Identity, worker: Option<&str>) -> Result<(), String> {
        if own_worker(identity, worker) {
            return Ok(());
        }
        Err(format!(
            "this route takes the credential of worker {:?} only (`volume-central credentials issue --worker {}`)",
            worker.unwrap_or_default(),
            worker.unwrap_or_default()
        ))
    }
}

impl Policy for OwnWorkerOrOperator {
    fn check(identity: &Identity, worker: Option<&str>) -> Result<(), String> {
        if own_worker(identity, worker) || matches!(identity, Identity::Operator { .. }) {
            return Ok(());
        }
        Err(format!(
            "this route takes the credential of worker {:?} or an operator's",
            worker.unwrap_or_default()
        ))
    }
}

impl Policy for SchedulerOnly {
    fn check(identity: &Identity, _: Option<&str>) -> Result<(), String> {
        if matches!(identity, Identity::Scheduler { .. }) {
            return Ok(());
        }
        Err("this route takes the scheduler's credential (`volume-central credentials issue --scheduler`)".into())
    }
}

impl Policy for SchedulerOrOperator {
    fn check(identity: &Identity, _: Option<&str>) -> Result<(), String> {
        if matches!(
            identity,
            Identity::Scheduler { .. } | Identity::Operator { .. }
        ) {
            return Ok(());
        }
        Err("this read-only view takes the scheduler's or an operator's credential".into())
    }
}

/// An extractor: the caller, allowed by policy `P` on this route. The identity comes from
/// the authentication middleware ([`crate::http`]); without it the request is refused.
pub struct Caller<P> {
    pub identity: Arc<Identity>,
    policy: PhantomData<P>,
}

impl<P: Policy> FromRequest for Caller<P> {
    type Error = AuthError;
    type Future = std::future::Ready<Result<Self, AuthError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(authorize::<P>(req))
    }
}

fn authorize<P: Policy>(req: &HttpRequest) -> Result<Caller<P>, AuthError> {
    let identity = req
        .extensions()
        .get::<Arc<Identity>>()
        .cloned()
        .ok_or(AuthError::Missing)?;
    if *identity == Identity::Anonymous {
        return Ok(Caller {
            identity,
            policy: PhantomData,
        });
    }
    match P::check(&identity, req.match_info().get("w")) {
        Ok(()) => Ok(Caller {
            identity,
            policy: PhantomData,
        }),
        Err(needs) => {
            tracing::warn!(%identity, method = %req.method(), path = req.path(), "refused: wrong scope");
            Err(AuthError::Forbidden {
                who: identity.to_string(),
                what: format!("{} {}", req.method(), req.path()),
                needs,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_hex_of_256_bits_and_differ() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        let hex = a.strip_prefix(TOKEN_PREFIX).expect("prefix");
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t", "bearer t", "BEARER t", "bEaReR   t"] {
            assert_eq!(bearer_token(&HeaderValue::from_static(v)), Some("t"), "{v}");
        }
        for v in ["Basic dTpw", "Bearer", "Bearer ", "Bearert", "Bearer a b"] {
            assert_eq!(bearer_token(&HeaderValue::from_static(v)), None, "{v}");
        }
    }

    #[test]
    fn policies_scope_each_kind() {
        let w1 = Identity::Worker {
            id: 1,
            name: "w1".into(),
        };
        let s = Identity::Scheduler { id: 2 };
        let o = Identity::Operator { id: 3 };
        assert!(OwnWorker::check(&w1, Some("w1")).is_ok());
        assert!(OwnWorker::check(&w1, Some("w2")).is_err());
        assert!(OwnWorker::check(&s, Some("w1")).is_err());
        assert!(OwnWorker::check(&o, Some("w1")).is_err());
        assert!(OwnWorkerOrOperator::check(&o, Some("w1")).is_ok());
        assert!(OwnWorkerOrOperator::check(&w1, Some("w2")).is_err());
        assert!(SchedulerOnly::check(&s, None).is_ok());
        assert!(SchedulerOnly::check(&o, None).is_err());
        assert!(SchedulerOnly::check(&w1, Some("w1")).is_err());
        assert!(SchedulerOrOperator::check(&o, None).is_ok());
        assert!(SchedulerOrOperator::check(&w1, Some("w1")).is_err());
    }
}
