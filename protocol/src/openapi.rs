//! The OpenAPI 3 document of the native dialect and the local volume API, generated from
//! the types in this crate. `protocol/openapi.json` is the checked-in copy; a test fails
//! when the two disagree (run with `UPDATE_OPENAPI=1` to rewrite it).
#![allow(dead_code)] // the functions below exist only to carry `#[utoipa::path]`.

use utoipa::OpenApi;

use crate::local::{
    CreateVolumeRequest, ErrorBody, PlanView, PlannedAction, SetPrivilegedRequest,
    SetPropertyRequest, SetStateRequest, Strategy, VolumeFuture, VolumeJson,
};
use crate::native::{
    BaseResourceType, BlockedVolume, DesiredSet, DesiredVolume, DiskReport, FailedVolume,
    ReportedVolume, ResourceTypesReport, VolumeReport,
};
use crate::{Handle, VolumeState};

#[utoipa::path(put, path = "/api/v1/workers/{worker}/base-resource-types", tag = "native",
    params(("worker" = String, Path)), request_body = ResourceTypesReport,
    responses((status = 204, description = "Accepted")))]
fn put_base_resource_types() {}

#[utoipa::path(get, path = "/api/v1/workers/{worker}/volumes/desired", tag = "native",
    params(("worker" = String, Path),
           ("If-None-Match" = Option<String>, Header, description = "ETag of the answer held")),
    responses((status = 200, body = DesiredSet, headers(("ETag" = String))),
              (status = 304, description = "Nothing changed"),
              (status = 404, description = "Unknown worker")))]
fn get_desired() {}

#[utoipa::path(put, path = "/api/v1/workers/{worker}/volumes/report", tag = "native",
    params(("worker" = String, Path)), request_body = VolumeReport,
    responses((status = 204, description = "Accepted")))]
fn put_report() {}

#[utoipa::path(post, path = "/volumes", tag = "local", request_body = CreateVolumeRequest,
    responses((status = 201, body = VolumeJson), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
fn create_volume() {}

#[utoipa::path(get, path = "/volumes", tag = "local",
    params(("properties" = Option<std::collections::BTreeMap<String, String>>, Query,
            description = "Every key=value pair must match")),
    responses((status = 200, body = Vec<VolumeJson>,
               description = "As baggageclaim: volumes being created or destroyed, and missing ones, are left out")))]
fn list_volumes() {}

#[utoipa::path(get, path = "/volumes/{handle}", tag = "local", params(("handle" = Handle, Path)),
    responses((status = 200, body = VolumeJson),
              (status = 404, body = ErrorBody, description = "Unknown, or being created or destroyed, or missing (as baggageclaim)")))]
fn get_volume() {}

#[utoipa::path(get, path = "/inventory", tag = "local",
    params(("properties" = Option<std::collections::BTreeMap<String, String>>, Query,
            description = "Every key=value pair must match")),
    responses((status = 200, body = Vec<VolumeJson>, description = "Every record, whatever its state")))]
fn list_inventory() {}

#[utoipa::path(get, path = "/inventory/{handle}", tag = "local", params(("handle" = Handle, Path)),
    responses((status = 200, body = VolumeJson), (status = 404, body = ErrorBody)))]
fn get_inventory() {}

#[utoipa::path(get, path = "/p2p-url", tag = "local",
    responses((status = 200, body = String, content_type = "text/plain",
               description = "`http://HOST:PORT` of this worker's P2P listener"),
              (status = 404, body = ErrorBody, description = "P2P streaming is off (`p2p.listen` unset)")))]
fn p2p_url() {}

#[utoipa::path(put, path = "/volumes/{handle}/stream-p2p-out", tag = "local",
    params(("handle" = Handle, Path), ("path" = String, Query), ("encoding" = String, Query),
           ("streamInURL" = String, Query, description = "The peer's stream-in URL")),
    responses((status = 200, description = "The peer answered 204"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 502, body = ErrorBody, description = "The peer failed or refused")))]
fn stream_p2p_out() {}

#[utoipa::path(delete, path = "/volumes/{handle}", tag = "local", params(("handle" = Handle, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
fn destroy_volume() {}

#[utoipa::path(delete, path = "/volumes/destroy", tag = "local", request_body = Vec<Handle>,
    responses((status = 204), (status = 409, body = ErrorBody)))]
fn destroy_volumes() {}

#[utoipa::path(put, path = "/volumes/{handle}/properties/{key}", tag = "local",
    params(("handle" = Handle, Path), ("key" = String, Path)), request_body = SetPropertyRequest,
    responses((status = 204), (status = 404, body = ErrorBody)))]
fn set_property() {}

#[utoipa::path(put, path = "/volumes/{handle}/state", tag = "local",
    params(("handle" = Handle, Path)), request_body = SetStateRequest,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
fn set_state() {}

#[utoipa::path(get, path = "/volumes/{handle}/privileged", tag = "local",
    params(("handle" = Handle, Path)), responses((status = 200, body = bool)))]
fn get_privileged() {}

#[utoipa::path(put, path = "/volumes/{handle}/privileged", tag = "local",
    params(("handle" = Handle, Path)), request_body = SetPrivilegedRequest,
    responses((status = 204), (status = 404, body = ErrorBody)))]
fn set_privileged() {}

#[utoipa::path(post, path = "/volumes-async", tag = "local", request_body = CreateVolumeRequest,
    responses((status = 201, body = VolumeFuture), (status = 400, body = ErrorBody)))]
fn create_volume_async() {}

#[utoipa::path(get, path = "/volumes-async/{handle}", tag = "local",
    params(("handle" = Handle, Path)),
    responses((status = 200, body = VolumeJson), (status = 204, description = "Pending"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
fn get_volume_future() {}

#[utoipa::path(delete, path = "/volumes-async/{handle}", tag = "local",
    params(("handle" = Handle, Path)), responses((status = 204)))]
fn delete_volume_future() {}

#[utoipa::path(get, path = "/gc/plan", tag = "local", responses((status = 200, body = PlanView)))]
fn gc_plan() {}

#[utoipa::path(post, path = "/gc/reset-revision", tag = "local",
    responses((status = 204, description = "The highest applied revision is forgotten; nothing is destroyed")))]
fn gc_reset_revision() {}

#[utoipa::path(get, path = "/healthz", tag = "local",
    responses((status = 200, description = "The process answers")))]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "local",
    responses((status = 200, description = "Recovery finished and the first call to the central API ended"),
              (status = 503, body = ErrorBody, description = "Not ready yet; `error` says what it waits for")))]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "local",
    responses((status = 200, body = String, content_type = "text/plain",
               description = "Prometheus text format 0.0.4")))]
fn metrics() {}

/// The whole document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "volume-agent",
        description = "Native central API dialect and the worker-local volume API"
    ),
    paths(
        put_base_resource_types,
        get_desired,
        put_report,
        create_volume,
        list_volumes,
        get_volume,
        list_inventory,
        get_inventory,
        p2p_url,
        stream_p2p_out,
        destroy_volume,
        destroy_volumes,
        set_property,
        set_state,
        get_privileged,
        set_privileged,
        create_volume_async,
        get_volume_future,
        delete_volume_future,
        gc_plan,
        gc_reset_revision,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        Handle,
        VolumeState,
        BaseResourceType,
        ResourceTypesReport,
        DesiredVolume,
        DesiredSet,
        ReportedVolume,
        FailedVolume,
        BlockedVolume,
        DiskReport,
        VolumeReport,
        Strategy,
        CreateVolumeRequest,
        VolumeJson,
        SetPropertyRequest,
        SetPrivilegedRequest,
        SetStateRequest,
        VolumeFuture,
        ErrorBody,
        PlannedAction,
        PlanView
    ))
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline, as checked in.
pub fn document() -> String {
    checked_in_json(ApiDoc::openapi())
}

/// An OpenAPI document as it is checked in: version "1" (the crate version would make
/// it change on every release), pretty JSON, a trailing newline.
pub fn checked_in_json(mut doc: utoipa::openapi::OpenApi) -> String {
    doc.info.version = "1".to_string();
    let mut s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
