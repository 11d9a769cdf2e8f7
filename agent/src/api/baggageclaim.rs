//! Baggageclaim's asynchronous create (`POST /volumes-async`, `GET` and `DELETE
//! /volumes-async/{handle}`); the create itself is `Inventory::create_volume`.
//!
//! A future lives in memory only: after a restart the client's poll answers 404 and the
//! client fails the create, as it does when baggageclaim restarts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use protocol::local::{CreateVolumeRequest, ErrorBody, VolumeFuture, VolumeJson};
use protocol::{Handle, VolumeState};

use super::volumes::{blocking, handle, volume_json};
use super::{ApiError, ApiState};
use crate::inventory::VolumeRecord;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/volumes-async", web::post().to(create_async))
        .route("/volumes-async/{handle}", web::get().to(poll))
        .route("/volumes-async/{handle}", web::delete().to(cancel));
}

/// Most futures tracked at once (pending and finished); more creates answer 503.
pub const MAX_FUTURES: usize = 1024;
/// A finished future (done or failed) nobody deleted is forgotten after this long.
pub const FINISHED_TTL: Duration = Duration::from_secs(600);
/// Longest error message a failed future keeps (the rest is cut, never the caller's input
/// echoed whole).
pub const MAX_FAILURE_MESSAGE: usize = 512;

enum Status {
    Pending,
    Done(VolumeJson),
    Failed(StatusCode, String),
}

struct Entry {
    status: Status,
    /// When it finished (done or failed); pending futures never expire.
    finished: Option<Instant>,
    /// Set when the future is deleted while pending: the finished volume is destroyed.
    canceled: Arc<AtomicBool>,
}

/// The creates started by `POST /volumes-async`, by handle, until deleted or, once
/// finished, until [`FINISHED_TTL`] passed. At most `max` at once.
pub struct Futures {
    map: Mutex<HashMap<Handle, Entry>>,
    max: usize,
    ttl: Duration,
}

impl Default for Futures {
    fn default() -> Self {
        Futures::new(MAX_FUTURES, FINISHED_TTL)
    }
}

impl Futures {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Futures {
            map: Mutex::new(HashMap::new()),
            max,
            ttl,
        }
    }

    /// The table, with expired finished futures dropped.
    fn lock(&self) -> MutexGuard<'_, HashMap<Handle, Entry>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.ttl;
        map.retain(|_, e| e.finished.is_none_or(|at| at.elapsed() < ttl));
        map
    }

    /// Futures tracked now (after expiry).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `msg` cut to [`MAX_FAILURE_MESSAGE`] bytes (on a character boundary).
fn short(mut msg: String) -> String {
    if msg.len() > MAX_FAILURE_MESSAGE {
        let mut cut = MAX_FAILURE_MESSAGE;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push_str(" [...]");
    }
    msg
}

fn error_response(status: StatusCode, error: String) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error })
}

async fn create_async(
    state: web::Data<ApiState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut value = body.into_inner();
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object: {\"handle\", \"strategy\", \"properties\", \"privileged\"}".into(),
        ));
    }
    // Like baggageclaim, a create that names no handle (absent, null or "") gets a new
    // UUID, answered in the future's `handle`.
    let named = match value.get("handle") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "\"handle\" must be a string, not {other}"
            )))
        }
    };
    let h = match named {
        Some(raw) => handle(&raw)?,
        None => {
            let h = new_handle()?;
            value["handle"] = serde_json::Value::String(h.to_string());
            h
        }
    };
    let parsed = match serde_json::from_value::<CreateVolumeRequest>(value) {
        Ok(req) => Ok(super::guard::confine_import(req, &state.import_roots).await?),
        Err(e) => Err(e),
    };
    let canceled = Arc::new(AtomicBool::new(false));
    {
        let mut map = state.futures.lock();
        if map.contains_key(&h) {
            return Err(ApiError::Conflict(format!(
                "a create of volume {h} is already tracked; poll it, or DELETE /volumes-async/{h} first"
            )));
        }
        if map.len() >= state.futures.max {
            return Err(ApiError::Full(format!(
                "{} async creates are tracked, the most this agent keeps; poll and DELETE finished ones, then retry",
                state.futures.max
            )));
        }
        let (status, finished) = match &parsed {
            Ok(_) => (Status::Pending, None),
            Err(e) => (
                Status::Failed(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    short(format!("invalid create request: {e}; strategies are empty, cow (with \"volume\") and import (with \"path\")")),
                ),
                Some(Instant::now()),
            ),
        };
        map.insert(
            h.clone(),
            Entry {
                status,
                finished,
                canceled: canceled.clone(),
            },
        );
    }
    if let Ok(req) = parsed {
        let state = state.into_inner();
        let h = h.clone();
        actix_web::rt::spawn(async move {
            let res = blocking(&state, move |inv| {
                inv.create_volume(req, VolumeState::Initialized)
            })
            .await;
            finish(&state, &h, &canceled, res).await;
        });
    }
    Ok(HttpResponse::Created().json(VolumeFuture { handle: h }))
}

/// A random (version 4) UUID, as baggageclaim names a volume a create left unnamed.
fn new_handle() -> Result<Handle, ApiError> {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    // 36 characters of [0-9a-f-]: always a valid handle.
    Handle::new(&uuid).map_err(|e| ApiError::Internal(format!("generated handle {uuid}: {e}")))
}

/// Records the outcome of an async create; destroys the volume when the future was
/// deleted meanwhile (nobody will ever learn about it).
async fn finish(
    state: &ApiState,
    h: &Handle,
    canceled: &Arc<AtomicBool>,
    res: Result<VolumeRecord, ApiError>,
) {
    {
        let mut map = state.futures.lock();
        if !canceled.load(Ordering::SeqCst) {
            if let Some(entry) = map.get_mut(h) {
                if Arc::ptr_eq(&entry.canceled, canceled) {
                    entry.status = match &res {
                        Ok(rec) => Status::Done(volume_json(rec)),
                        Err(e) => Status::Failed(e.status_code(), short(e.to_string())),
                    };
                    entry.finished = Some(Instant::now());
                }
            }
            return;
        }
    }
    if res.is_ok() {
        let h = h.clone();
        match blocking(state, move |inv| inv.destroy(&h).map(|_| h)).await {
            Ok(h) => {
                tracing::info!(handle = %h, reason = "its async create was canceled", "destroyed volume")
            }
            Err(e) => tracing::warn!(error = %e, "could not destroy a canceled create"),
        }
    }
}

async fn poll(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&path)?;
    let map = state.futures.lock();
    match map.get(&h).map(|e| &e.status) {
        None => Err(ApiError::NotFound(format!(
            "no create of volume {h} is tracked; start one with POST /volumes-async"
        ))),
        Some(Status::Pending) => Ok(HttpResponse::NoContent().finish()),
        Some(Status::Done(v)) => Ok(HttpResponse::Ok().json(v)),
        Some(Status::Failed(code, msg)) => Ok(error_response(*code, msg.clone())),
    }
}

async fn cancel(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&path)?;
    let mut map = state.futures.lock();
    if let Some(entry) = map.remove(&h) {
        if matches!(entry.status, Status::Pending) {
            entry.canceled.store(true, Ordering::SeqCst);
        }
    }
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_creates_get_distinct_version_4_uuids() {
        let a = new_handle().expect("handle");
        let b = new_handle().expect("handle");
        assert_ne!(a, b);
        let s = a.as_str();
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert!(s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{s}");
        assert_eq!(s.as_bytes()[14], b'4', "version 4: {s}");
        assert!(
            matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "variant: {s}"
        );
    }
}
