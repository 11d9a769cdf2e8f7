//! Health, readiness, metrics and the operator's gc routes.

use std::sync::atomic::Ordering::Relaxed;

use actix_web::{web, HttpResponse};

use super::{ApiError, ApiState};
use crate::central::actor::ResetRevision;
use crate::reconciler::actor::GetPlan;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/gc/plan", web::get().to(gc_plan))
        .route("/gc/reset-revision", web::post().to(reset_revision))
        .route("/usage", web::get().to(usage));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<ApiState>) -> HttpResponse {
    let waiting = if !state.ready.load(Relaxed) {
        Some("recovery or start-up not finished")
    } else if !state.metrics.central_contacted.load(Relaxed) {
        Some("waiting for the first answer from the central API")
    } else {
        None
    };
    match waiting {
        None => HttpResponse::Ok().json(serde_json::json!({"ready": true})),
        Some(why) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"ready": false, "error": why})),
    }
}

pub(super) async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::Internal(format!("cannot encode the metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type(protocol::metrics::CONTENT_TYPE)
        .body(text))
}

async fn gc_plan(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let reconciler = state
        .reconciler
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the reconciler is not running".into()))?;
    let view = reconciler
        .send(GetPlan)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the reconciler stopped: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(view))
}

async fn reset_revision(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let desired = state
        .desired
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the desired-state poller is not running".into()))?;
    desired
        .send(ResetRevision)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the poller stopped: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::NoContent().finish())
}

/// Bytes per volume as last measured: `{"handle": bytes}`.
async fn usage(state: web::Data<ApiState>) -> HttpResponse {
    let map: std::collections::BTreeMap<String, u64> = state
        .usage
        .all()
        .into_iter()
        .map(|(h, b)| (h.to_string(), b))
        .collect();
    HttpResponse::Ok().json(map)
}
