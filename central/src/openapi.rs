//! The OpenAPI 3 document of volume-central's scheduler and operator API (workers,
//! volumes, containers, resource configs and caches, retention, `why`) and its health and
//! metrics routes, generated from the types the handlers decode and answer.
//! `central/openapi.json` is the checked-in copy; a test fails when the two disagree (run
//! it with `UPDATE_OPENAPI=1` to rewrite it), and another when a route [`crate::http`]
//! registers is in neither this document nor the agent-facing one
//! (`protocol/openapi.json`, the native dialect).
#![allow(dead_code)] // the functions below exist only to carry `#[utoipa::path]`.

use protocol::local::ErrorBody;
use protocol::{Handle, VolumeState};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::{ContainerBody, ContainerRef, Created, StateBody, WorkerBody};
use crate::store::{
    CacheRetention, CacheVolume, CacheWorker, CreateResourceCache, CreateResourceConfig,
    CreateVolume, Retention, SetRetention, SetWorkerRetention, VolumeRow, WorkerFigures,
    WorkerRetention, WorkerRow,
};
use crate::why::{EvictionFacts, Owner, Status, Why};

#[utoipa::path(post, path = "/api/v1/workers", tag = "scheduler", request_body = WorkerBody,
    responses((status = 201, body = WorkerBody, description = "Registered"),
              (status = 200, body = WorkerBody, description = "Already registered"),
              (status = 400, body = ErrorBody)))]
fn post_worker() {}

#[utoipa::path(get, path = "/api/v1/workers", tag = "scheduler",
    responses((status = 200, body = Vec<WorkerRow>,
               description = "Every registered worker with what its last report said")))]
fn list_workers() {}

#[utoipa::path(post, path = "/api/v1/workers/{worker}/volumes", tag = "scheduler",
    params(("worker" = String, Path)), request_body = CreateVolume,
    responses((status = 201, body = VolumeRow, description = "Recorded `creating`"),
              (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "Unknown worker, container, cache or type"),
              (status = 409, body = ErrorBody,
               description = "The parent is not `initialized`, or is being destroyed")))]
fn post_volume() {}

#[utoipa::path(get, path = "/api/v1/workers/{worker}/volumes", tag = "scheduler",
    params(("worker" = String, Path)),
    responses((status = 200, body = Vec<VolumeRow>), (status = 404, body = ErrorBody)))]
fn list_volumes() {}

#[utoipa::path(post, path = "/api/v1/workers/{worker}/containers", tag = "scheduler",
    params(("worker" = String, Path)), request_body = ContainerBody,
    responses((status = 201, body = ContainerRef, description = "Created"),
              (status = 200, body = ContainerRef, description = "Already there"),
              (status = 404, body = ErrorBody)))]
fn post_container() {}

#[utoipa::path(delete, path = "/api/v1/workers/{worker}/containers/{handle}", tag = "scheduler",
    params(("worker" = String, Path), ("handle" = String, Path)),
    responses((status = 204, description = "Gone (its volumes lose it); idempotent"),
              (status = 404, body = ErrorBody, description = "Unknown worker")))]
fn delete_container() {}

#[utoipa::path(put, path = "/api/v1/volumes/{handle}/state", tag = "scheduler",
    params(("handle" = Handle, Path)), request_body = StateBody,
    responses((status = 200, body = VolumeRow),
              (status = 400, body = ErrorBody,
               description = "`destroying` is the GC's to set"),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Not a forward move")))]
fn put_state() {}

#[utoipa::path(get, path = "/api/v1/volumes/{handle}/why", tag = "scheduler",
    params(("handle" = Handle, Path)),
    responses((status = 200, body = Why,
               description = "Every owner that keeps the volume, or why it is garbage or being destroyed"),
              (status = 404, body = ErrorBody)))]
fn get_why() {}

#[utoipa::path(post, path = "/api/v1/resource-configs", tag = "scheduler",
    request_body = CreateResourceConfig,
    responses((status = 201, body = Created, description = "Found or created"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn post_resource_config() {}

#[utoipa::path(post, path = "/api/v1/resource-caches", tag = "scheduler",
    request_body = CreateResourceCache,
    responses((status = 201, body = Created,
               description = "Found or created, with the use of `build` when given"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn post_resource_cache() {}

#[utoipa::path(post, path = "/api/v1/resource-caches/{id}/uses/{build}", tag = "scheduler",
    params(("id" = i64, Path), ("build" = i64, Path)),
    responses((status = 204, description = "The build uses the cache (a retained cache is revived)"),
              (status = 404, body = ErrorBody)))]
fn post_cache_use() {}

#[utoipa::path(delete, path = "/api/v1/resource-caches/{id}/uses/{build}", tag = "scheduler",
    params(("id" = i64, Path), ("build" = i64, Path)),
    responses((status = 204,
               description = "The use is gone; with the last one the cache is retained. Idempotent")))]
fn delete_cache_use() {}

#[utoipa::path(get, path = "/api/v1/resource-caches/{id}/workers", tag = "retention",
    params(("id" = i64, Path)),
    responses((status = 200, body = CacheRetention,
               description = "The cache's retention state and the workers holding it, the ones with an `initialized` volume first"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn get_cache_workers() {}

#[utoipa::path(put, path = "/api/v1/resource-caches/{id}/retention", tag = "retention",
    params(("id" = i64, Path)), request_body = SetRetention,
    responses((status = 200, body = CacheRetention),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn put_cache_retention() {}

#[utoipa::path(get, path = "/api/v1/workers/{worker}/retention", tag = "retention",
    params(("worker" = String, Path)),
    responses((status = 200, body = WorkerRetention), (status = 404, body = ErrorBody)))]
fn get_worker_retention() {}

#[utoipa::path(put, path = "/api/v1/workers/{worker}/retention", tag = "retention",
    params(("worker" = String, Path)), request_body = SetWorkerRetention,
    responses((status = 200, body = WorkerRetention,
               description = "Bytes; null or absent: the `[retention]` default of the config"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn put_worker_retention() {}

#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = String, content_type = "text/plain",
               description = "The process answers")))]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = String, content_type = "text/plain",
               description = "The database answers and its schema is current"),
              (status = 503, body = String, content_type = "text/plain",
               description = "`not ready: ` and why")))]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, body = String, content_type = "text/plain",
               description = "Prometheus text format 0.0.4")))]
fn metrics() {}

/// Every `/api` route takes `Authorization: Bearer <token>` (a scheduler's or operator's
/// credential; which routes each may call is in SECURITY.md).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "volume-central",
        description = "The scheduler's and operator's API of volume-central: workers, volumes, containers, resource caches and their retention and budgets, `why`. The agent-facing native dialect is described in protocol/openapi.json."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    paths(
        post_worker,
        list_workers,
        post_volume,
        list_volumes,
        post_container,
        delete_container,
        put_state,
        get_why,
        post_resource_config,
        post_resource_cache,
        post_cache_use,
        delete_cache_use,
        get_cache_workers,
        put_cache_retention,
        get_worker_retention,
        put_worker_retention,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        Handle,
        VolumeState,
        ErrorBody,
        WorkerBody,
        WorkerRow,
        WorkerFigures,
        CreateVolume,
        VolumeRow,
        ContainerBody,
        ContainerRef,
        StateBody,
        Created,
        CreateResourceConfig,
        CreateResourceCache,
        Retention,
        SetRetention,
        CacheVolume,
        CacheWorker,
        CacheRetention,
        SetWorkerRetention,
        WorkerRetention,
        Why,
        Status,
        Owner,
        EvictionFacts
    ))
)]
pub struct ApiDoc;

/// The document as checked in (pretty JSON, version "1").
pub fn document() -> String {
    protocol::openapi::checked_in_json(ApiDoc::openapi())
}
