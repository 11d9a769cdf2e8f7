//! Wiring: opens the inventory, starts one actor per concern and the local API inside an
//! `actix::System`, and shuts down in order on SIGTERM/SIGINT.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{App, HttpServer};
use tracing::{error, info, warn};

use crate::api::{self, ApiState};
use crate::central::actor::{DesiredStateActor, Heard, PollNow, StopPolling};
use crate::central::{CentralClient, ClientError};
use crate::config::{Config, DriverName, Listen};
use crate::durable::revision;
use crate::inventory::actor::{InventoryActor, InventoryHandle};
use crate::inventory::drift::actor::DriftActor;
use crate::inventory::{DriverChoice, Inventory, InventoryConfig, InventoryError, RecoveryReport};
use crate::metrics::Metrics;
use crate::notify;
use crate::outlet::Outlet;
use crate::planner::Policy;
use crate::reconciler::actor::{DesiredUpdate, Drain, Ping, Reconcile, ReconcilerSettings};
use crate::reconciler::ReconcilerActor;
use crate::reporter::actor::{DiskFigures, PassDone};
use crate::reporter::ReporterActor;
use crate::resource_types::actor::ResourceTypesActor;
use crate::usage::actor::AccountingActor;
use crate::usage::Usage;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot listen on {addr} (api.listen): {source}; pick a free address")]
    Bind {
        addr: Listen,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (p2p.listen): {source}; pick a free address or leave p2p.listen empty")]
    P2pBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (metrics.listen): {source}; pick a free address or leave metrics.listen empty")]
    MetricsBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the HTTP client for P2P streams: {0}")]
    P2pClient(String),
    #[error("API socket {path}: cannot set its mode 0660 and group (api.group): {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a start-up task failed: {0}")]
    Task(String),
}

/// A running agent.
pub struct Daemon {
    /// Where the local API listens (the bound port when `api.listen` asked for port 0).
    pub api: Listen,
    pub metrics: Arc<Metrics>,
    pub recovery: RecoveryReport,
    inventory: InventoryHandle,
    server: actix_web::dev::ServerHandle,
    /// The P2P listener, when `p2p.listen` is set.
    p2p_server: Option<actix_web::dev::ServerHandle>,
    /// Where the P2P listener is bound.
    pub p2p: Option<std::net::SocketAddr>,
    /// The metrics listener, when `metrics.listen` is set.
    metrics_server: Option<actix_web::dev::ServerHandle>,
    desired: Addr<DesiredStateActor>,
    reconciler: Addr<ReconcilerActor>,
}

fn driver_choice(d: DriverName) -> DriverChoice {
    match d {
        DriverName::Naive => DriverChoice::Naive,
        DriverName::Overlay => DriverChoice::Overlay,
        DriverName::Detect => DriverChoice::Detect,
    }
}

/// Starts everything. Must run inside an `actix::System`.
pub async fn start(config: &Config) -> Result<Daemon, DaemonError> {
    let metrics = Arc::new(Metrics::new());
    metrics.set_worker(&config.worker_name);
    let inv_cfg = InventoryConfig {
        state_dir: config.state.dir.clone(),
        volumes_root: config.volumes.root.clone(),
        driver: driver_choice(config.volumes.driver),
        cache_bytes: config.state.cache_bytes,
    };
    let (inventory, recovery) = tokio::task::spawn_blocking(move || Inventory::open(&inv_cfg))
        .await
        .map_err(|e| DaemonError::Task(e.to_string()))??;
    log_recovery(&recovery);
    metrics
        .missing_volumes
        .set(recovery.missing_on_disk.len() as u64);
    let rate = crate::remove::RateLimit::per_second(config.gc.destroy_rate);
    inventory.set_remove_options(crate::remove::RemoveOptions {
        threads: 0,
        rate: rate.clone(),
        count_bytes: false,
    });

    let state_dir = config.state.dir.clone();
    let highest = tokio::task::spawn_blocking(move || revision::load(&state_dir))
        .await
        .map_err(|e| DaemonError::Task(e.to_string()))?
        .map_err(|source| DaemonError::State {
            path: config.state.dir.clone(),
            source,
        })?;

    let client = CentralClient::from_config(config)?;
    // The one bound on blocking inventory work: the destroys a pass runs at once, plus
    // threads for the local API, accounting and drift scans.
    let inv = InventoryActor::start(
        inventory.clone(),
        config.gc.max_in_flight + crate::inventory::actor::API_THREADS,
    );

    // The actors, and every one-way connection between them (an `Outlet` each).
    let usage = Usage::default();
    let reporter = ReporterActor::new(
        client.clone(),
        config.central.dialect,
        config.central.report_interval,
        inv.snapshot(),
        metrics.clone(),
        usage.clone(),
    )
    .start();
    let reconciler = ReconcilerActor::new(
        ReconcilerSettings {
            policy: Policy {
                unknown_grace: config.gc.unknown_grace,
                max_destroy_fraction: config.gc.max_destroy_fraction,
                ..Policy::default()
            },
            max_in_flight: config.gc.max_in_flight,
            destroy_timeout: config.gc.destroy_timeout,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
        },
        inv.snapshot(),
        inv.destroyer(),
        {
            let reporter = reporter.clone();
            Outlet::new(move |pass| reporter.do_send(PassDone(pass)))
        },
        metrics.clone(),
    )
    .with_orphans(inv.orphans())
    .start();
    DriftActor::new(
        inv.clone(),
        config.volumes.scan_interval,
        metrics.clone(),
        {
            let reconciler = reconciler.clone();
            Outlet::new(move |()| reconciler.do_send(Reconcile))
        },
    )
    .start();
    let desired = DesiredStateActor::new(
        client.clone(),
        config.central.dialect,
        config.central.poll_interval,
        config.central.max_backoff,
        config.state.dir.clone(),
        highest,
        {
            let reconciler = reconciler.clone();
            Outlet::new(move |heard| match heard {
                Heard::Answer { desired, revision } => {
                    reconciler.do_send(DesiredUpdate { desired, revision })
                }
                Heard::Unchanged => reconciler.do_send(Reconcile),
            })
        },
        metrics.clone(),
    )
    .start();
    AccountingActor::new(
        inv.clone(),
        config.volumes.root.clone(),
        config.gc.min_free,
        config.central.report_interval,
        usage.clone(),
        metrics.clone(),
        {
            let reporter = reporter.clone();
            Outlet::new(move |(report, measured_at)| {
                reporter.do_send(DiskFigures {
                    report,
                    measured_at,
                })
            })
        },
        {
            let desired = desired.clone();
            Outlet::new(move |()| desired.do_send(PollNow))
        },
    )
    .start();
    ResourceTypesActor::new(
        config.resource_types.dir.clone(),
        config.resource_types.rescan_interval,
        client,
        config.central.dialect,
        metrics.clone(),
    )
    .start();

    // Bound before the API state is made: `GET /p2p-url` announces the bound port.
    let p2p_listener = match config.p2p.listen.0 {
        None => None,
        Some(addr) => {
            let bind_error = |source| DaemonError::P2pBind { addr, source };
            let l = std::net::TcpListener::bind(addr).map_err(bind_error)?;
            let bound = l.local_addr().map_err(bind_error)?;
            if config.p2p.allowed_networks.is_empty() {
                warn!(listen = %bound, "p2p.allowed_networks is empty: every peer's stream-in is refused; list the workers' networks there");
            }
            Some((l, bound))
        }
    };
    let p2p_client = api::p2p::client(config.p2p.listen.0.map(|a| a.ip()))
        .map_err(|e| DaemonError::P2pClient(e.to_string()))?;
    let ready = Arc::new(AtomicBool::new(false));
    let state = ApiState {
        inventory: inv.clone(),
        streams_inventory: inventory.clone(),
        metrics: metrics.clone(),
        reconciler: Some(reconciler.clone()),
        desired: Some(desired.clone()),
        ready: ready.clone(),
        usage,
        max_body_bytes: usize::try_from(config.api.max_body_bytes).unwrap_or(usize::MAX),
        futures: Default::default(),
        import_roots: config.import_roots().into(),
        streams: api::stream::StreamSettings::new(
            config.api.max_streams,
            config.api.body_idle_timeout,
            crate::inventory::StreamInLimits {
                max_bytes: config.api.stream_in_max_bytes,
                max_entries: config.api.stream_in_max_entries,
            },
        ),
        p2p: p2p_listener
            .as_ref()
            .map(|(_, bound)| Arc::new(api::p2p::P2p::new(&config.p2p, *bound))),
        p2p_client,
    };
    let metrics_server = match config.metrics.listen.0 {
        None => None,
        Some(addr) => {
            let metrics_state = state.clone();
            let server = HttpServer::new(move || {
                App::new().configure(api::configure_metrics(metrics_state.clone()))
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(5)
            .bind(addr)
            .map_err(|source| DaemonError::MetricsBind { addr, source })?;
            let bound = server.addrs().first().copied().unwrap_or(addr);
            let server = server.run();
            let handle = server.handle();
            actix_rt::spawn(server);
            info!(listen = %bound, "metrics listener serving GET /metrics");
            Some(handle)
        }
    };
    let p2p_server = match p2p_listener {
        None => None,
        Some((listener, bound)) => {
            let peer_state = state.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(actix_web::middleware::from_fn(api::p2p::admit))
                    .configure(api::configure_peer(peer_state.clone()))
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(5)
            .listen(listener)
            .map_err(|source| DaemonError::P2pBind {
                addr: bound,
                source,
            })?
            .run();
            let handle = server.handle();
            actix_rt::spawn(server);
            info!(listen = %bound, "P2P listener serving stream-in to peers");
            Some((handle, bound))
        }
    };
    let trust = api::guard::Trust {
        allowed_uids: config.api.allowed_uids.clone(),
        allowed_groups: config.api.allowed_groups.clone(),
    };
    let listen = config.api.listen.clone();
    let bind_error = |source| DaemonError::Bind {
        addr: listen.clone(),
        source,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(actix_web::web::Data::new(trust.clone()))
            .wrap(actix_web::middleware::from_fn(api::guard::guard))
            .configure(api::configure(state.clone()))
    })
    .on_connect(api::guard::on_connect)
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5);
    let (server, api_at) = match &listen {
        Listen::Tcp(addr) => {
            let server = server.bind(addr).map_err(bind_error)?;
            let bound = server.addrs().first().copied().unwrap_or(*addr);
            (server, Listen::Tcp(bound))
        }
        Listen::Unix(path) => {
            prepare_socket_path(path).map_err(bind_error)?;
            // Bound here and handed over (`bind_uds` would skip `on_connect`, so no peer
            // credentials), with its mode set before the server accepts on it.
            let socket = std::os::unix::net::UnixListener::bind(path).map_err(bind_error)?;
            api::guard::secure_socket(path, &config.api.group).map_err(|source| {
                DaemonError::Socket {
                    path: path.clone(),
                    source,
                }
            })?;
            let server = server.listen_uds(socket).map_err(bind_error)?;
            (server, listen.clone())
        }
    };
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);

    if let Some(rate) = rate {
        // The budget is shared by every destroy; export how long they waited on it.
        let m = metrics.clone();
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                m.set_destroy_throttled(rate.throttled());
            }
        });
    }
    ready.store(true, Relaxed);
    metrics.ready.store(true, Relaxed);
    info!(api = %api_at, worker = %config.worker_name, central = %config.central.url,
        dialect = ?config.central.dialect, "volume-agent running");
    Ok(Daemon {
        api: api_at,
        metrics,
        recovery,
        inventory: inv,
        server: handle,
        p2p: p2p_server.as_ref().map(|(_, b)| *b),
        p2p_server: p2p_server.map(|(h, _)| h),
        metrics_server,
        desired,
        reconciler,
    })
}

/// Makes way for a unix socket at `path`: creates its directory, and removes a socket
/// left behind by an earlier run. Refuses when something else is there: a file that is
/// not a socket, or a socket another process still answers on.
fn prepare_socket_path(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if !meta.file_type().is_socket() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process answers on this socket",
        )),
        Ok(_) => std::fs::remove_file(path),
    }
}

fn log_recovery(r: &RecoveryReport) {
    if r.rebuilt_from_disk {
        warn!("the volume store was lost or corrupt and was rebuilt from the volumes on disk");
    }
    for h in &r.destroys_finished {
        info!(handle = %h, "recovery: finished an interrupted destroy");
    }
    for h in &r.creates_removed {
        info!(handle = %h, "recovery: removed an interrupted create");
    }
    for p in &r.quarantined {
        warn!(path = %p.display(), "recovery: quarantined a directory without a record");
    }
    for h in &r.missing_on_disk {
        warn!(handle = %h, "recovery: the volume's data directory is gone; it is reported missing");
    }
}

impl Daemon {
    /// Stops polling, lets in-flight destroys finish (bounded by `gc.destroy_timeout`),
    /// stops the API and flushes the store.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        if let Err(e) = notify::stopping() {
            warn!(error = %e, "cannot tell systemd we are stopping");
        }
        info!("stopping: no new polls; waiting for in-flight destroys");
        let _ = self.desired.send(StopPolling).await;
        let _ = self.reconciler.send(Drain).await;
        if let Some(p2p) = &self.p2p_server {
            p2p.stop(true).await;
        }
        if let Some(m) = &self.metrics_server {
            m.stop(true).await;
        }
        self.server.stop(true).await;
        if let Listen::Unix(path) = &self.api {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "cannot remove the API socket");
            }
        }
        self.inventory
            .call(|inv| inv.flush())
            .await
            .map_err(|e| DaemonError::Task(e.to_string()))??;
        info!("stopped");
        Ok(())
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
        }
        _ => {
            error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Pets the systemd watchdog while the actor system answers: each tick asks the
/// reconciler (on the system's event loop) for a ping first, so a wedged loop stops the
/// petting and systemd restarts the service.
async fn watchdog(reconciler: Addr<ReconcilerActor>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match tokio::time::timeout(every, reconciler.send(Ping)).await {
            Ok(Ok(())) => {
                if let Err(e) = notify::watchdog() {
                    warn!(error = %e, "cannot pet the systemd watchdog");
                }
            }
            _ => warn!("the reconciler did not answer a liveness ping; not petting the watchdog"),
        }
    }
}

/// `volume-agent run`: the whole daemon until a signal, inside an `actix::System`.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let system = actix::System::new();
    let result = system.block_on(async move {
        let daemon = start(&config).await?;
        if let Err(e) = notify::ready() {
            warn!(error = %e, "cannot tell systemd we are ready");
        }
        if let Some(every) = notify::watchdog_interval() {
            actix_rt::spawn(watchdog(daemon.reconciler.clone(), every));
        }
        wait_for_signal().await;
        daemon.shutdown().await
    });
    System::current().stop();
    result
}
