//! The HTTP routes (actix-web): the agent-facing native dialect, the scheduler-facing
//! API, and `/healthz`, `/readyz`, `/metrics`.
//!
//! Every `/api` request passes [`authenticate`] (a middleware: 401 before the body is
//! read) and then the [`Caller`] extractor of its handler, whose policy type says who may
//! call the route (403 otherwise). JSON bodies larger than [`INLINE_DECODE`] are decoded
//! on the blocking pool, never on the event loop that also answers `/healthz`.

use std::sync::Arc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use protocol::native::{FailedVolume, ResourceTypesReport, VolumeReport};
use protocol::{Handle, VolumeState};
use serde::{Deserialize, Serialize};

use crate::auth::{
    Authenticator, Caller, OwnWorker, OwnWorkerOrOperator, SchedulerOnly, SchedulerOrOperator,
};
use crate::db::Db;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::{
    self, CreateResourceCache, CreateResourceConfig, CreateVolume, Desired, ReportSets,
    SetRetention, SetWorkerRetention,
};

/// Largest request body accepted (a report of a very large worker).
pub const MAX_BODY: usize = 64 << 20;

/// Bodies up to this size are decoded inline; larger ones on the blocking pool.
pub const INLINE_DECODE: usize = 256 << 10;

/// What every handler shares.
pub struct AppState {
    pub db: Db,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    /// Most handles one report may name.
    pub max_report_handles: usize,
    /// The `[retention]` defaults of the per-worker budgets.
    pub budgets: crate::gc::Budgets,
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::Unavailable(_) | Error::Busy(_) | Error::SchemaBehind { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!("{self}");
        }
        let mut resp = HttpResponse::build(status);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.insert_header((header::RETRY_AFTER, "5"));
        }
        resp.json(serde_json::json!({ "error": self.to_string() }))
    }
}

type Reply = Result<HttpResponse, Error>;

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, Error> {
    protocol::decode(what, body).map_err(|err| Error::BadRequest(err.to_string()))
}

/// Runs `work` on `body`: inline when the body is small, else on the blocking pool.
async fn off_loop<T: Send + 'static>(
    body: web::Bytes,
    work: impl FnOnce(web::Bytes) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    if body.len() <= INLINE_DECODE {
        return work(body);
    }
    web::block(move || work(body))
        .await
        .map_err(|err| Error::Database(format!("request decoding was cancelled: {err}")))?
}

fn worker_of(path: &web::Path<String>) -> Result<&str, Error> {
    store::check_worker_name(path.as_str())?;
    Ok(path.as_str())
}

async fn put_resource_types(
    _: Caller<OwnWorker>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let worker = worker_of(&worker)?;
    let report: ResourceTypesReport = off_loop(body, |b| decode("base resource types", &b)).await?;
    store::put_resource_types(&st.db, worker, &report).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn get_desired(
    _: Caller<OwnWorkerOrOperator>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    req: HttpRequest,
) -> Reply {
    let worker = worker_of(&worker)?;
    let inm = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    let started = std::time::Instant::now();
    let answer = store::desired(&st.db, worker, inm).await;
    st.metrics
        .desired_duration
        .observe(started.elapsed().as_secs_f64());
    match answer? {
        Desired::NotModified { etag } => {
            st.metrics.desired_answer(false);
            Ok(HttpResponse::NotModified()
                .insert_header((header::ETAG, etag))
                .finish())
        }
        Desired::Full { set, etag } => {
            st.metrics.desired_answer(true);
            let body = serde_json::to_vec(&set)
                .map_err(|err| Error::Database(format!("cannot encode desired set: {err}")))?;
            Ok(HttpResponse::Ok()
                .insert_header((header::ETAG, etag))
                .content_type("application/json")
                .body(body))
        }
        Desired::UnknownWorker => Err(store::unknown_worker(worker)),
    }
}

/// What a report handler keeps after the body is reduced (off the event loop).
struct ReducedReport {
    sets: ReportSets,
    figures: store::ReportFigures,
    failed: Vec<FailedVolume>,
    blocked: usize,
}

fn reduce_report(body: &[u8], limit: usize) -> Result<ReducedReport, Error> {
    let report: VolumeReport = decode("volume report", body)?;
    let n = store::report_handle_count(&report);
    if n > limit {
        return Err(Error::TooLarge(format!(
            "the report names {n} handles, more than max_report_handles = {limit}; raise max_report_handles in the volume-central config if this worker really has that many volumes"
        )));
    }
    Ok(ReducedReport {
        sets: ReportSets::new(&report),
        figures: store::ReportFigures::new(&report),
        blocked: report.blocked.len(),
        failed: report.failed,
    })
}

async fn put_report(
    _: Caller<OwnWorker>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let worker = worker_of(&worker)?;
    let limit = st.max_report_handles;
    let report = off_loop(body, move |b| reduce_report(&b, limit)).await?;
    let out = store::apply_report_sets(&st.db, worker, &report.sets).await?;
    let cleared = store::record_report_figures(&st.db, worker, &report.figures).await?;
    let m = &st.metrics;
    if let Some(took) = cleared {
        m.pressure_cleared_seconds.observe(took.as_secs_f64());
    }
    m.reports.inc();
    m.reported_destroyed_deleted.inc_by(out.deleted);
    m.reported_failed.inc_by(report.failed.len() as u64);
    m.reported_blocked.inc_by(report.blocked as u64);
    for f in &report.failed {
        tracing::warn!(worker, handle = %f.handle, attempts = f.attempts, "worker cannot destroy volume: {}", f.error);
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/workers` body, and its answer.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkerBody {
    name: String,
}

async fn post_worker(_: Caller<SchedulerOnly>, st: web::Data<AppState>, body: web::Bytes) -> Reply {
    let req: WorkerBody = decode("worker", &body)?;
    let created = store::register_worker(&st.db, &req.name).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(req))
}

async fn list_workers(_: Caller<SchedulerOrOperator>, st: web::Data<AppState>) -> Reply {
    Ok(HttpResponse::Ok().json(store::list_workers(&st.db).await?))
}

async fn post_volume(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let worker = worker_of(&worker)?;
    let req: CreateVolume = decode("volume", &body)?;
    let row = store::create_volume(&st.db, worker, &req).await?;
    Ok(HttpResponse::Created().json(row))
}

async fn list_volumes(
    _: Caller<SchedulerOrOperator>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
) -> Reply {
    let worker = worker_of(&worker)?;
    Ok(HttpResponse::Ok().json(store::list_volumes(&st.db, worker).await?))
}

/// `GET /api/v1/volumes/{h}/why`: every owner that keeps the volume, or why it is
/// garbage and since when ([`crate::why`]).
async fn get_why(
    _: Caller<SchedulerOrOperator>,
    st: web::Data<AppState>,
    handle: web::Path<String>,
) -> Reply {
    let handle = Handle::new(handle.into_inner()).map_err(|e| Error::BadRequest(e.to_string()))?;
    Ok(HttpResponse::Ok().json(crate::why::why(&st.db, &handle).await?))
}

/// `PUT /api/v1/volumes/{h}/state` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateBody {
    state: VolumeState,
}

async fn put_state(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    handle: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let handle = Handle::new(handle.into_inner()).map_err(|e| Error::BadRequest(e.to_string()))?;
    let req: StateBody = decode("state", &body)?;
    if req.state == VolumeState::Destroying {
        return Err(Error::BadRequest(
            "`destroying` is set by the GC when nothing uses the volume; delete its container or cache use instead".into(),
        ));
    }
    Ok(HttpResponse::Ok().json(store::set_state(&st.db, &handle, req.state).await?))
}

/// `POST /api/v1/workers/{w}/containers` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContainerBody {
    handle: String,
}

/// A container as `POST /api/v1/workers/{w}/containers` answers it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ContainerRef<'a> {
    handle: &'a str,
    worker: &'a str,
}

/// The id of what `POST /api/v1/resource-configs` or `/resource-caches` found or made.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Created {
    id: i64,
}

async fn post_container(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let worker = worker_of(&worker)?;
    let req: ContainerBody = decode("container", &body)?;
    let created = store::create_container(&st.db, worker, &req.handle).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(ContainerRef {
        handle: &req.handle,
        worker,
    }))
}

async fn delete_container(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Reply {
    let (worker, handle) = path.into_inner();
    store::check_worker_name(&worker)?;
    store::delete_container(&st.db, &worker, &handle).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn post_resource_config(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    body: web::Bytes,
) -> Reply {
    let req: CreateResourceConfig = decode("resource config", &body)?;
    let id = store::create_resource_config(&st.db, &req).await?;
    Ok(HttpResponse::Created().json(Created { id }))
}

async fn post_resource_cache(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    body: web::Bytes,
) -> Reply {
    let req: CreateResourceCache = decode("resource cache", &body)?;
    let id = store::create_resource_cache(&st.db, &req).await?;
    Ok(HttpResponse::Created().json(Created { id }))
}

async fn post_cache_use(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    path: web::Path<(i64, i64)>,
) -> Reply {
    let (cache, build) = path.into_inner();
    store::add_cache_use(&st.db, cache, build).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn delete_cache_use(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    path: web::Path<(i64, i64)>,
) -> Reply {
    let (cache, build) = path.into_inner();
    store::delete_cache_use(&st.db, cache, build).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A resource cache id from the URL path, with the fix when it is not one.
fn cache_id(raw: &str) -> Result<i64, Error> {
    raw.parse::<i64>().map_err(|_| {
        Error::BadRequest(format!(
            "resource cache id {:?} is not a number; use the id POST /api/v1/resource-caches answered",
            raw.chars().take(40).collect::<String>()
        ))
    })
}

/// `GET /api/v1/resource-caches/{id}/workers`: the cache's retention state and the
/// workers holding a volume of it, so the scheduler can place the next build there.
async fn get_cache_workers(
    _: Caller<SchedulerOrOperator>,
    st: web::Data<AppState>,
    id: web::Path<String>,
) -> Reply {
    let id = cache_id(&id)?;
    Ok(HttpResponse::Ok().json(store::cache_retention(&st.db, id).await?))
}

/// `PUT /api/v1/resource-caches/{id}/retention` `{"retention": "auto"|"keep"|"drop"}`.
async fn put_cache_retention(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let id = cache_id(&id)?;
    let req: SetRetention = decode("retention", &body)?;
    Ok(HttpResponse::Ok().json(store::set_cache_retention(&st.db, id, req.retention).await?))
}

/// `GET /api/v1/workers/{w}/retention`: the worker's budgets and retained bytes.
async fn get_worker_retention(
    _: Caller<SchedulerOrOperator>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
) -> Reply {
    let worker = worker_of(&worker)?;
    Ok(HttpResponse::Ok().json(store::worker_retention(&st.db, worker, &st.budgets).await?))
}

/// `PUT /api/v1/workers/{w}/retention` `{"cache_budget": N|null, "min_free": N|null}`.
async fn put_worker_retention(
    _: Caller<SchedulerOnly>,
    st: web::Data<AppState>,
    worker: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let worker = worker_of(&worker)?;
    let req: SetWorkerRetention = decode("worker retention", &body)?;
    Ok(HttpResponse::Ok()
        .json(store::set_worker_retention(&st.db, worker, &req, &st.budgets).await?))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

async fn readyz(st: web::Data<AppState>) -> HttpResponse {
    let check = async {
        st.db.ping().await?;
        crate::migrate::check_current(&st.db).await
    };
    match check.await {
        Ok(()) => {
            st.metrics.db_up.set(1);
            HttpResponse::Ok().body("ready\n")
        }
        Err(err) => {
            if err.is_unavailable() {
                st.metrics.db_up.set(0);
            }
            HttpResponse::ServiceUnavailable().body(format!("not ready: {err}\n"))
        }
    }
}

/// How long a scrape waits for the rows by state and the workers' figures before
/// answering without them.
const COUNT_ROWS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The exposition; the rows by state are counted and the workers' figures read now (left
/// out when the database cannot answer within [`COUNT_ROWS_TIMEOUT`];
/// `volume_central_db_up` shows an unreachable one).
async fn metrics(st: web::Data<AppState>) -> HttpResponse {
    let read = async {
        let counts = store::volumes_by_state(&st.db).await?;
        let workers = store::list_workers(&st.db).await?;
        Ok::<_, Error>((counts, workers))
    };
    match tokio::time::timeout(COUNT_ROWS_TIMEOUT, read).await {
        Ok(Ok((counts, workers))) => {
            st.metrics.db_up.set(1);
            st.metrics.set_volumes_by_state(Some(&counts));
            st.metrics.set_workers(Some(&workers));
        }
        Ok(Err(err)) => {
            if err.is_unavailable() {
                st.metrics.db_up.set(0);
            }
            tracing::debug!("cannot read the volume rows and workers for /metrics: {err}");
            st.metrics.set_volumes_by_state(None);
            st.metrics.set_workers(None);
        }
        Err(_) => {
            tracing::debug!(
                "reading the volume rows and workers for /metrics took over {COUNT_ROWS_TIMEOUT:?}"
            );
            st.metrics.set_volumes_by_state(None);
            st.metrics.set_workers(None);
        }
    }
    match st.metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type(protocol::metrics::CONTENT_TYPE)
            .body(text),
        Err(err) => {
            HttpResponse::InternalServerError().body(format!("cannot encode the metrics: {err}\n"))
        }
    }
}

/// Authenticates every `/api` request (before its body is read): 401 without a valid
/// credential; else the caller's identity goes into the request for [`Caller`].
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(st) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Err(actix_web::error::ErrorInternalServerError(
            "volume-central state missing",
        ));
    };
    match st
        .auth
        .authenticate(req.headers().get(header::AUTHORIZATION))
        .await
    {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            Ok(next.call(req).await?.map_into_boxed_body())
        }
        Err(err) => {
            tracing::debug!(method = %req.method(), path = req.path(), "refused: {err}");
            let resp = err.error_response();
            Ok(req.into_response(resp))
        }
    }
}

/// Counts every response by status class.
pub(crate) async fn count_responses(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|st| st.metrics.clone());
    let resp = next.call(req).await?.map_into_boxed_body();
    if let Some(m) = metrics {
        let status = resp.status();
        m.count_status(status.as_u16());
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            m.auth_refused(status == StatusCode::FORBIDDEN);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            m.db_unavailable.inc();
        }
    }
    Ok(resp)
}

/// Registers every route on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_BODY))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .service(
            web::scope("/api/v1")
                .wrap(from_fn(authenticate))
                .route("/workers", web::post().to(post_worker))
                .route("/workers", web::get().to(list_workers))
                .route(
                    "/workers/{w}/base-resource-types",
                    web::put().to(put_resource_types),
                )
                .route("/workers/{w}/volumes/desired", web::get().to(get_desired))
                .route("/workers/{w}/volumes/report", web::put().to(put_report))
                .route("/workers/{w}/volumes", web::post().to(post_volume))
                .route("/workers/{w}/volumes", web::get().to(list_volumes))
                .route("/workers/{w}/containers", web::post().to(post_container))
                .route(
                    "/workers/{w}/containers/{h}",
                    web::delete().to(delete_container),
                )
                .route("/volumes/{h}/state", web::put().to(put_state))
                .route("/volumes/{h}/why", web::get().to(get_why))
                .route("/resource-configs", web::post().to(post_resource_config))
                .route("/resource-caches", web::post().to(post_resource_cache))
                .route(
                    "/resource-caches/{id}/uses/{build}",
                    web::post().to(post_cache_use),
                )
                .route(
                    "/resource-caches/{id}/uses/{build}",
                    web::delete().to(delete_cache_use),
                )
                .route(
                    "/resource-caches/{id}/workers",
                    web::get().to(get_cache_workers),
                )
                .route(
                    "/resource-caches/{id}/retention",
                    web::put().to(put_cache_retention),
                )
                .route(
                    "/workers/{w}/retention",
                    web::get().to(get_worker_retention),
                )
                .route(
                    "/workers/{w}/retention",
                    web::put().to(put_worker_retention),
                ),
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadlock_or_serialization_failure_answers_503_with_retry_after_not_500() {
        let resp = Error::Busy("deadlock detected (40P01)".into()).error_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("5")
        );
        assert_eq!(
            Error::Database("x".into()).status_code(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
