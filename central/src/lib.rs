//! volume-central: the seed's volume GC on PostgreSQL, serving volume-agent's native
//! dialect of the central API.
//!
//! * [`Config`]: the configuration file.
//! * [`migrate`]: applies the checked-in migrations (idempotent).
//! * [`start`] / [`run`]: the HTTP service and its GC loop; [`start`] returns a
//!   [`Server`] that tests drive in-process on a random port.
//! * [`store`] and [`gc`]: every database operation, callable without HTTP.
//! * [`auth`]: credentials (issue, list, revoke) and who may call which route.
//! * [`tls`]: the optional HTTPS listener's certificate and key.
//! * [`why`]: why a volume is kept or going, for the operator; [`ctl`]: the operator's
//!   commands over the HTTP API.
//! * [`openapi`]: the scheduler API's OpenAPI document (`central/openapi.json`).
//! * [`notify`]: READY, WATCHDOG and STOPPING for systemd (`Type=notify`).
//! * `testing` (feature `testing`): a throwaway PostgreSQL cluster for tests.

pub mod auth;
pub mod config;
pub mod ctl;
pub mod db;
pub mod error;
pub mod gc;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod notify;
pub mod openapi;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod why;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};

pub use config::{AuthMode, ByteSize, Config, ConfigError, RetentionConfig, TlsConfig};
pub use db::Db;
pub use error::Error;
pub use metrics::{GcOutcome, Metrics};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Database(#[from] Error),
    #[error("cannot start on the database named by `database_url`: {0}. Check that its role and database exist and that pg_hba.conf lets the role in (the packaged config connects as the role volume-central, the service's user, by peer authentication)")]
    DatabaseRefused(Error),
    #[error("cannot listen on {addr}: {source}; pick a free address with `listen`")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("refusing to start: no credential is issued, so every API request would be refused. Issue the scheduler's and each worker's credential against this database (`volume-central credentials issue --scheduler`, `... --worker NAME`), or set `auth = \"none\"` in the config to run without authentication (never where workers or the network are untrusted)")]
    NoCredentials,
}

impl StartError {
    /// Whether only a change of the configuration (or of the credentials it expects) can
    /// fix this, so restarting the service is pointless: the binary exits with
    /// [`EX_CONFIG`] for these, which the unit's `RestartPreventExitStatus=` names.
    pub fn is_config(&self) -> bool {
        match self {
            StartError::Config(_) | StartError::Tls(_) | StartError::NoCredentials => true,
            // The only bad request at start is an unparsable `database_url`.
            StartError::Database(err) => matches!(err, Error::BadRequest(_)),
            StartError::DatabaseRefused(_) | StartError::Bind { .. } | StartError::Serve(_) => {
                false
            }
        }
    }
}

/// Exit status for a configuration error (`EX_CONFIG` of sysexits.h).
pub const EX_CONFIG: i32 = 78;

/// How often the warning about `auth = "none"` is repeated.
pub const AUTH_NONE_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

const AUTH_NONE_WARNING: &str = "auth = \"none\": the API accepts every request without a credential; any caller can act as any worker or the scheduler. Issue credentials (`volume-central credentials issue`) and remove `auth = \"none\"`";

/// Applies every pending migration to the configured database; returns the versions
/// applied now (empty when the schema was current).
pub async fn migrate(config: &Config) -> Result<Vec<i32>, StartError> {
    let db = Db::connect(&config.resolve_database_url()?, 2)?;
    Ok(migrate::migrate(&db).await?)
}

/// A running service: HTTP server plus GC loop.
pub struct Server {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
    gc: tokio::task::JoinHandle<()>,
    warn: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    db: Db,
    https: bool,
}

impl Server {
    /// The address it listens on (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, or `https://addr` with `[tls]`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stops the GC loop and the HTTP server gracefully.
    pub async fn stop(self) {
        self.gc.abort();
        if let Some(w) = &self.warn {
            w.abort();
        }
        self.handle.stop(true).await;
        let _ = self.serve.await;
    }

    /// Waits until the HTTP server stops (on [`Server::stop`] from a clone of the handle,
    /// or a signal in [`run`]).
    async fn wait(self) -> Result<(), StartError> {
        let res = self.serve.await;
        self.gc.abort();
        if let Some(w) = &self.warn {
            w.abort();
        }
        match res {
            Ok(r) => r.map_err(StartError::Serve),
            Err(join) => Err(StartError::Serve(std::io::Error::other(join.to_string()))),
        }
    }
}

/// Starts the HTTP service and the GC loop on the current tokio runtime. The database
/// need not be reachable yet: requests answer 503 until it is. With `auth =
/// "credentials"` (the default) and a reachable, migrated database holding no active
/// credential, it refuses to start ([`StartError::NoCredentials`]).
pub async fn start(config: &Config) -> Result<Server, StartError> {
    let db = Db::connect(&config.resolve_database_url()?, config.pool_size)?;
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let auth_on = config.auth == AuthMode::Credentials;
    if auth_on {
        check_credentials_exist(&db).await?;
    }
    let metrics = Arc::new(Metrics::default());
    metrics.auth_disabled.set(i64::from(!auth_on));
    metrics
        .gc_interval_seconds
        .set(config.gc_interval.as_secs_f64());
    let budgets = config.retention.budgets();
    let state = web::Data::new(http::AppState {
        db: db.clone(),
        auth: auth::Authenticator::new(db.clone(), auth_on, config.credential_cache),
        metrics: metrics.clone(),
        max_report_handles: config.max_report_handles,
        budgets,
    });
    let listener =
        std::net::TcpListener::bind(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(from_fn(http::count_responses))
            .configure(http::configure)
    })
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout.as_secs().max(1));
    if config.http_workers > 0 {
        server = server.workers(config.http_workers);
    }
    let bind_err = |source| StartError::Bind {
        addr: config.listen,
        source,
    };
    let https = tls.is_some();
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls).map_err(bind_err)?,
        None => server.listen(listener).map_err(bind_err)?,
    }
    .run();
    let handle = server.handle();
    let serve = tokio::spawn(server);
    let gc = tokio::spawn(gc_loop(
        db.clone(),
        config.gc_interval,
        gc::GcSettings {
            missing_grace: config.missing_grace,
            budgets,
        },
        metrics.clone(),
    ));
    let warn = (!auth_on).then(|| {
        tokio::spawn(async {
            let mut tick = tokio::time::interval(AUTH_NONE_WARNING_EVERY);
            loop {
                tick.tick().await;
                tracing::warn!("{AUTH_NONE_WARNING}");
            }
        })
    });
    let scheme = if https { "https" } else { "http" };
    tracing::info!(%addr, scheme, auth = ?config.auth, "volume-central listening");
    Ok(Server {
        addr,
        handle,
        serve,
        gc,
        warn,
        metrics,
        db,
        https,
    })
}

/// Refuses to start when the database is reachable and migrated but holds no active
/// credential. When it cannot tell (database down, schema behind), it starts: every
/// request then fails closed (503 or 401) until the database answers.
async fn check_credentials_exist(db: &Db) -> Result<(), StartError> {
    let checked = async {
        migrate::check_current(db).await?;
        auth::count_active(db).await
    };
    match checked.await {
        Ok(0) => Err(StartError::NoCredentials),
        Ok(_) => Ok(()),
        Err(err) => {
            tracing::warn!("cannot count credentials at start ({err}); requests are refused until the database answers");
            Ok(())
        }
    }
}

/// How [`run`] starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Apply pending migrations before serving (`run --migrate`), as `migrate` would.
    pub migrate: bool,
}

/// Runs the service until SIGINT or SIGTERM. First it waits for the database (see
/// [`wait_for_database`]), then it starts the server and tells systemd `READY=1`; the
/// watchdog is petted from the start (see [`notify`]), and `STOPPING=1` is sent when a
/// signal starts the stop.
pub async fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    let mut signals = StopSignals::listen();
    let every = notify::watchdog_interval();
    // Two connections: the watchdog's check must not wait behind a long migration.
    let early = Db::connect(&config.resolve_database_url()?, 2)?;
    let pet = every.map(|every| tokio::spawn(notify::watchdog(early.clone(), every)));
    let starting = async {
        wait_for_database(&early, options, STARTUP_RETRY_MAX).await?;
        start(&config).await
    };
    // A stop asked for while it still waits for the database ends it cleanly too.
    let started = tokio::select! {
        started = starting => Some(started),
        () = signals.recv() => None,
    };
    if let Some(pet) = &pet {
        pet.abort();
    }
    let Some(started) = started else {
        notify::stopping();
        tracing::info!("stopped before the database answered");
        return Ok(());
    };
    let server = started?;
    let pet = every.map(|every| tokio::spawn(notify::watchdog(server.db.clone(), every)));
    notify::ready(&format!(
        "serving {} (schema at migration {})",
        server.url(),
        migrate::latest_version()
    ));
    let handle = server.handle.clone();
    tokio::spawn(async move {
        signals.recv().await;
        notify::stopping();
        tracing::info!("stopping");
        handle.stop(true).await;
    });
    let result = server.wait().await;
    if let Some(pet) = pet {
        pet.abort();
    }
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// The longest pause between two attempts of [`wait_for_database`].
pub const STARTUP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Returns once the database answers with a current schema: with `options.migrate`,
/// after applying the pending migrations. While the database is unreachable (or, without
/// `migrate`, its schema is behind) it logs why and tries again, pausing twice as long
/// each time up to `retry_max`. Any other error (a migration that fails, a refused login)
/// is returned.
pub async fn wait_for_database(
    db: &Db,
    options: RunOptions,
    retry_max: std::time::Duration,
) -> Result<(), StartError> {
    let mut pause = std::time::Duration::from_millis(250).min(retry_max);
    loop {
        let attempt = async {
            if options.migrate {
                migrate::migrate(db).await?;
            }
            migrate::check_current(db).await
        };
        let why = match attempt.await {
            Ok(()) => return Ok(()),
            Err(err @ Error::Unavailable(_)) => err.to_string(),
            Err(err @ Error::SchemaBehind { .. }) if !options.migrate => {
                format!("{err} (or start with `volume-central run --migrate`)")
            }
            Err(err) => return Err(StartError::DatabaseRefused(err)),
        };
        tracing::warn!(
            "waiting for the database before serving: {why}; next try in {}",
            humantime::format_duration(pause)
        );
        notify::status(&format!("waiting for the database: {why}"));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(retry_max);
    }
}

/// SIGTERM and SIGINT, caught from the moment [`StopSignals::listen`] is called until
/// the value is dropped, so that none is lost between two waits.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Returns when one of the signals arrives (never when neither could be caught).
    async fn recv(&mut self) {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => {}
            () = one(&mut self.int) => {}
        }
    }
}

async fn gc_loop(
    db: Db,
    interval: std::time::Duration,
    settings: gc::GcSettings,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        match gc::run_pass_with(&db, &settings).await {
            Ok(gc::PassOutcome::Ran(stats)) => {
                let took = started.elapsed().as_secs_f64();
                metrics.db_up.set(1);
                metrics.gc_pass(GcOutcome::Ran);
                metrics.gc_marked.inc_by(stats.marked);
                metrics.gc_skipped.inc_by(stats.skipped);
                metrics.gc_caches_deleted.inc_by(stats.caches_deleted);
                metrics.evictions(&stats.evicted);
                metrics.gc_last_pass_seconds.set(took);
                metrics.gc_pass_duration.observe(took);
                metrics
                    .gc_last_success_timestamp_seconds
                    .set(protocol::metrics::unix_now());
                if stats != gc::GcStats::default() {
                    tracing::info!(?stats, "GC pass");
                }
            }
            Ok(gc::PassOutcome::Locked) => metrics.gc_pass(GcOutcome::Locked),
            Err(err) => {
                if err.is_unavailable() {
                    metrics.db_up.set(0);
                    metrics.db_unavailable.inc();
                }
                metrics.gc_pass(GcOutcome::Error);
                tracing::warn!("GC pass failed; retrying next interval: {err}");
            }
        }
    }
}
