//! The worker-local HTTP API: volumes (baggageclaim's wire shape), health, readiness,
//! metrics and the operator's `gc` routes. Handlers are thin: every change goes through
//! the inventory actor ([`InventoryHandle::call`]); streams run on the stream pool.

pub mod baggageclaim;
pub mod error;
pub mod guard;
pub mod ops;
pub mod p2p;
pub mod stream;
pub mod volumes;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix::Addr;
use actix_web::web;

use crate::central::actor::DesiredStateActor;
use crate::inventory::actor::InventoryHandle;
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::reconciler::ReconcilerActor;

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// Every inventory call but a stream's.
    pub inventory: InventoryHandle,
    /// The inventory as the stream pool uses it (a stream's thread holds its volume).
    pub streams_inventory: Inventory,
    pub metrics: Arc<Metrics>,
    pub reconciler: Option<Addr<ReconcilerActor>>,
    pub desired: Option<Addr<DesiredStateActor>>,
    /// Set once recovery finished and the loop runs.
    pub ready: Arc<AtomicBool>,
    /// Bytes per volume, as last measured.
    pub usage: crate::usage::Usage,
    /// Largest JSON body accepted.
    pub max_body_bytes: usize,
    /// Creates started by `POST /volumes-async`, until deleted.
    pub futures: Arc<baggageclaim::Futures>,
    /// Where `import` may read (see [`guard::confine_import`]).
    pub import_roots: Arc<[std::path::PathBuf]>,
    /// The stream pool, idle timeout and stream-in limits.
    pub streams: stream::StreamSettings,
    /// Worker-to-worker streaming, when `p2p.listen` is set.
    pub p2p: Option<Arc<p2p::P2p>>,
    /// Sends P2P streams (`stream-p2p-out`), from the P2P listen IP when it is specific.
    pub p2p_client: reqwest::Client,
}

/// Registers every route. The bulk destroy route is registered before `/volumes/{handle}`
/// so a volume named `destroy` cannot shadow it.
pub fn configure(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        let json = web::JsonConfig::default()
            .limit(state.max_body_bytes)
            .content_type_required(false)
            .error_handler(error::json_error);
        cfg.app_data(web::Data::new(state))
            .app_data(json)
            .app_data(web::PathConfig::default().error_handler(error::path_error))
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            .configure(ops::routes)
            .configure(volumes::routes)
            .configure(baggageclaim::routes)
            .configure(stream::routes)
            .configure(p2p::routes)
            .default_service(web::to(error::not_found));
    }
}

/// Registers the metrics listener's routes (`GET /metrics`, nothing else).
pub fn configure_metrics(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(state))
            .route("/metrics", web::get().to(ops::metrics))
            .default_service(web::to(error::not_found));
    }
}

/// Registers the P2P listener's routes (stream-in from peers, nothing else).
pub fn configure_peer(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(state))
            .app_data(web::PathConfig::default().error_handler(error::path_error))
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            .configure(p2p::peer_routes);
    }
}
