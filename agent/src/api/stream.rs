//! `PUT /volumes/{handle}/stream-in?path=P` and `PUT /volumes/{handle}/stream-out?path=P`:
//! compressed tar streams into and out of a volume, streamed both ways (the body goes
//! through a bounded channel into a blocking tar reader; the answer comes out of a
//! blocking tar writer through another), never whole in memory. HTTP only: the tar work
//! is [`crate::inventory::Inventory::stream_in`] / `stream_out`, under a hold on the volume.
//!
//! Streams run on threads of their own, at most `api.max_streams` at once (not on the
//! blocking pool the inventory's other work uses); a stream beyond that is answered 503
//! with `Retry-After` before its body is read. An upload whose body sends nothing for
//! `api.body_idle_timeout` is cut (408) and its slot freed; so is a stream-out whose client
//! reads nothing for that long.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::volumes::handle;
use super::{ApiError, ApiState};
use crate::contents::archive::{ArchiveError, Encoding, Stopped};
use crate::inventory::{Inventory, StreamHold, StreamInLimits, StreamKind};

/// Chunks in flight between the HTTP side and the tar side.
const CHANNEL_CHUNKS: usize = 16;
/// How long the rest of a refused upload is read while it keeps coming.
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Size of the chunks a stream-out sends.
const OUT_CHUNK: usize = 256 * 1024;

/// How streams run: their pool, the body idle timeout and the stream-in limits.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// One permit per running stream (`api.max_streams`).
    pool: Arc<Semaphore>,
    max: usize,
    /// `api.body_idle_timeout`.
    pub idle: Duration,
    pub limits: StreamInLimits,
}

impl StreamSettings {
    pub fn new(max_streams: usize, idle: Duration, limits: StreamInLimits) -> Self {
        let max = max_streams.max(1);
        StreamSettings {
            pool: Arc::new(Semaphore::new(max)),
            max,
            idle,
            limits,
        }
    }

    /// A slot for one stream, or 503 when all are taken.
    fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.pool.clone().try_acquire_owned().map_err(|_| {
            ApiError::Full(format!(
                "all {} stream slots are busy (api.max_streams); retry shortly",
                self.max
            ))
        })
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings::new(64, Duration::from_secs(60), StreamInLimits::default())
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/volumes/{handle}/stream-in", web::put().to(stream_in))
        .route("/volumes/{handle}/stream-out", web::put().to(stream_out));
}

#[derive(Debug, Deserialize)]
pub struct PathQuery {
    #[serde(default)]
    pub path: String,
}

impl From<ArchiveError> for ApiError {
    fn from(e: ArchiveError) -> Self {
        let msg = e.to_string();
        match e {
            ArchiveError::Unsafe { .. }
            | ArchiveError::Invalid { .. }
            | ArchiveError::Device { .. }
            | ArchiveError::BadPath(_)
            | ArchiveError::Malformed(_) => ApiError::BadRequest(msg),
            ArchiveError::TooLarge { .. } => ApiError::TooLarge(msg),
            ArchiveError::Stopped(Stopped::Idle(_) | Stopped::Unread(_)) => ApiError::Timeout(msg),
            ArchiveError::Stopped(Stopped::Cut(_)) => ApiError::Conflict(msg),
            ArchiveError::NotFound => ApiError::NotFound(msg),
            ArchiveError::Io { .. } => ApiError::Internal(msg),
        }
    }
}

/// Resolves when `cut` turns true; never when its sender is gone (nothing can cut then).
async fn cut_happens(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads what the HTTP side sends through the channel, as a blocking `Read`; wakes up
/// when the stream is cut. A channel closed before the body ended is an error, so a
/// client that went away never looks like a complete tar.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    complete: Arc<AtomicBool>,
    cut: watch::Receiver<bool>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            let (rx, cut) = (&mut self.rx, &mut self.cut);
            let next = futures::executor::block_on(async {
                tokio::select! {
                    biased;
                    _ = cut_happens(cut) => Some(Err(io::Error::other("the stream was cut"))),
                    item = rx.recv() => item,
                }
            });
            match next {
                None if self.complete.load(Ordering::SeqCst) => return Ok(0),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the request body ended early (the client went away)",
                    ))
                }
                Some(chunk) => self.cur = chunk?,
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Writes into the channel the HTTP answer streams from, in chunks; wakes up when the
/// stream is cut, even while the client reads nothing.
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    cut: watch::Receiver<bool>,
    /// The HTTP worker's runtime, for the idle timer.
    rt: tokio::runtime::Handle,
    idle: Duration,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(OUT_CHUNK),
        ));
        let (tx, cut, idle) = (&self.tx, &mut self.cut, self.idle);
        self.rt.block_on(async {
            tokio::select! {
                biased;
                _ = cut_happens(cut) => Err(io::Error::other("the stream was cut")),
                sent = tokio::time::timeout(idle, tx.send(Ok(chunk))) => match sent {
                    Err(_) => Err(Stopped::Unread(idle).into_io()),
                    Ok(sent) => sent.map_err(|_| {
                        io::Error::new(io::ErrorKind::BrokenPipe, "the client went away")
                    }),
                },
            }
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(OUT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= OUT_CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn encoding_of(req: &HttpRequest, name: header::HeaderName) -> Result<Encoding, ApiError> {
    let value = req
        .headers()
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Encoding::parse(value).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unsupported {name} {value:?}; send gzip, zstd or raw"
        ))
    })
}

/// Runs `work` on a thread of the stream pool, holding `slot` until it returns. `work`
/// takes the hold on `handle` first and reports through `ready` whether it got it.
fn spawn_stream(
    slot: OwnedSemaphorePermit,
    inv: Inventory,
    raw_handle: &str,
    kind: StreamKind,
    work: impl FnOnce(&Inventory, StreamHold, oneshot::Sender<Result<(), ApiError>>) + Send + 'static,
) -> Result<oneshot::Receiver<Result<(), ApiError>>, ApiError> {
    let h = handle(raw_handle)?;
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("stream".into())
        .spawn(move || {
            let _slot = slot;
            match inv.hold_for_stream(&h, kind) {
                Ok(hold) => work(&inv, hold, ready_tx),
                Err(e) => drop(ready_tx.send(Err(e.into()))),
            }
        })
        .map_err(|e| ApiError::Internal(format!("could not start a stream thread: {e}")))?;
    Ok(ready_rx)
}

fn thread_gone() -> ApiError {
    ApiError::Internal("the stream thread stopped unexpectedly".into())
}

async fn stream_in(
    state: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PathQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    receive(
        &state,
        &req,
        &path,
        query.into_inner().path,
        body,
        StreamKind::In,
    )
    .await
}

/// Extracts the request's compressed tar into `sub` of the volume `raw_handle`, on the
/// stream pool, for a caller of `kind` (the local API, or a peer through the P2P listener).
pub(super) async fn receive(
    state: &ApiState,
    req: &HttpRequest,
    raw_handle: &str,
    sub: String,
    mut body: web::Payload,
    kind: StreamKind,
) -> Result<HttpResponse, ApiError> {
    let encoding = encoding_of(req, header::CONTENT_ENCODING)?;
    let slot = state.streams.slot()?;
    let limits = state.streams.limits;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let complete = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = oneshot::channel();
    let ready = {
        let complete = complete.clone();
        spawn_stream(
            slot,
            state.streams_inventory.clone(),
            raw_handle,
            kind,
            move |inv, hold, ready| {
                let _ = ready.send(Ok(()));
                let input = ChannelReader {
                    rx,
                    cur: Bytes::new(),
                    complete,
                    cut: hold.cut_signal(),
                };
                let res = inv.stream_in(&hold, &sub, input, encoding, limits);
                let handle = hold.record.handle.clone();
                drop(hold);
                let _ = done_tx.send((handle, res));
            },
        )?
    };
    ready.await.map_err(|_| thread_gone())??;
    let idle = state.streams.idle;
    let mut tx = Some(tx);
    let mut done_rx = done_rx;
    let mut finished = None;
    loop {
        // Once the tar side failed, the rest of the body is only read while it keeps coming
        // (so the client sees the answer), not waited for.
        let wait = if matches!(finished, Some((_, Err(_)))) {
            idle.min(DRAIN_IDLE)
        } else {
            idle
        };
        let next = tokio::select! {
            biased;
            done = &mut done_rx, if finished.is_none() => {
                finished = Some(done.map_err(|_| thread_gone())?);
                tx = None;
                continue;
            }
            next = tokio::time::timeout(wait, body.next()) => next,
        };
        let chunk = match next {
            Err(_) => {
                // Stalled: cut the upload, stop reading, free the slot.
                if let Some(sender) = tx.take() {
                    let _ = sender.send(Err(Stopped::Idle(idle).into_io())).await;
                }
                break;
            }
            Ok(None) => {
                complete.store(true, Ordering::SeqCst);
                break;
            }
            Ok(Some(chunk)) => chunk,
        };
        let Some(sender) = tx.as_ref() else {
            // The tar side stopped (done or refused): read the rest so the client sees
            // the answer instead of a reset connection.
            continue;
        };
        let item = chunk.map_err(|e| io::Error::other(format!("reading the request body: {e}")));
        let failed = item.is_err();
        if sender.send(item).await.is_err() || failed {
            tx = None;
        }
    }
    drop(tx);
    let (h, res) = match finished {
        Some(done) => done,
        None => done_rx.await.map_err(|_| thread_gone())?,
    };
    let done = res?;
    tracing::debug!(handle = %h, entries = done.entries, bytes = done.bytes, "streamed in");
    Ok(HttpResponse::NoContent().finish())
}

async fn stream_out(
    state: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let encoding = encoding_of(&req, header::ACCEPT_ENCODING)?;
    let body = produce(&state, &path, query.into_inner().path, encoding).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_ENCODING, encoding.as_str()))
        .content_type("application/octet-stream")
        .streaming(body))
}

/// Starts packing `sub` of the volume `raw_handle` as a tar compressed as `encoding`, on
/// the stream pool; answers once the source is open (a missing path is a 404 then), with
/// the stream of compressed bytes, which ends in an error if packing fails midway.
pub(super) async fn produce(
    state: &ApiState,
    raw_handle: &str,
    sub: String,
    encoding: Encoding,
) -> Result<impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static, ApiError> {
    let slot = state.streams.slot()?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let rt = tokio::runtime::Handle::current();
    let idle = state.streams.idle;
    let ready = spawn_stream(
        slot,
        state.streams_inventory.clone(),
        raw_handle,
        StreamKind::Out,
        move |inv, hold, ready| {
            let source = match inv.open_stream_out(&hold, &sub) {
                Ok(s) => s,
                Err(e) => return drop(ready.send(Err(e.into()))),
            };
            let _ = ready.send(Ok(()));
            let errors = tx.clone();
            let out = ChannelWriter {
                tx,
                buf: Vec::with_capacity(OUT_CHUNK),
                cut: hold.cut_signal(),
                rt: rt.clone(),
                idle,
            };
            if let Err(e) = inv.stream_out(&hold, &source, out, encoding) {
                tracing::warn!(handle = %hold.record.handle, error = %e, "stream-out stopped");
                drop(hold);
                // Makes the answer end in an error instead of a short, valid-looking stream.
                let _ = rt.block_on(tokio::time::timeout(
                    idle,
                    errors.send(Err(io::Error::other(e.to_string()))),
                ));
            }
        },
    )?;
    ready.await.map_err(|_| thread_gone())??;
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}
