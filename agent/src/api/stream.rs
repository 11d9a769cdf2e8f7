//! `PUT /volumes/{handle}/stream-in?path=P` and `PUT /volumes/{handle}/stream-out?path=P`:
//! compressed tar streams into and out of a volume, streamed both ways (the body goes
//! through a bounded channel into a blocking tar reader; the answer comes out of a
//! blocking tar writer through another), never whole in memory.

use std::io::{self, Read, Write};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::archive::{self, ArchiveError, Encoding};
use super::volumes::handle;
use super::{ApiError, ApiState};
use crate::contents::IdMap;
use crate::inventory::{InventoryError, VolumeRecord};

/// Chunks in flight between the HTTP side and the tar side.
const CHANNEL_CHUNKS: usize = 16;
/// Size of the chunks a stream-out sends.
const OUT_CHUNK: usize = 256 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/volumes/{handle}/stream-in", web::put().to(stream_in))
        .route("/volumes/{handle}/stream-out", web::put().to(stream_out));
}

#[derive(Debug, Deserialize)]
pub struct PathQuery {
    #[serde(default)]
    path: String,
}

impl From<ArchiveError> for ApiError {
    fn from(e: ArchiveError) -> Self {
        let msg = e.to_string();
        match e {
            ArchiveError::Unsafe { .. } | ArchiveError::BadPath(_) | ArchiveError::Malformed(_) => {
                ApiError::BadRequest(msg)
            }
            ArchiveError::NotFound => ApiError::NotFound(msg),
            ArchiveError::Io { .. } => ApiError::Internal(msg),
        }
    }
}

/// The live volume `raw` names (404 when unknown, 409 when not usable).
async fn live_volume(state: &ApiState, raw: &str) -> Result<VolumeRecord, ApiError> {
    let h = handle(raw)?;
    let found = {
        let h = h.clone();
        super::volumes::blocking(state, move |inv| inv.get(&h)).await?
    };
    let rec = found.ok_or_else(|| ApiError::from(InventoryError::NotFound(h.clone())))?;
    if matches!(
        rec.state,
        protocol::VolumeState::Creating | protocol::VolumeState::Destroying
    ) {
        return Err(ApiError::Conflict(format!(
            "volume {h} is {}; stream into or out of a volume that is not being created or destroyed",
            rec.state
        )));
    }
    Ok(rec)
}

/// Reads what the HTTP side sends through the channel, as a blocking `Read`.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.cur = chunk?,
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Writes into the channel the HTTP answer streams from, in chunks.
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(OUT_CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(OUT_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
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

async fn stream_in(
    state: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PathQuery>,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let encoding = encoding_of(&req, header::CONTENT_ENCODING)?;
    let rec = live_volume(&state, &path).await?;
    let sub = query.into_inner().path;
    let comps: Vec<Vec<u8>> = archive::components(sub.as_bytes(), true)
        .map_err(|_| ArchiveError::BadPath(sub.clone()))?
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let ids = IdMap::for_volume(rec.privileged);
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let root = rec.path.clone();
    let job = web::block(move || -> Result<archive::Extracted, ArchiveError> {
        let comps: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
        let dest = archive::open_dest(&root, &comps, ids)?;
        archive::extract_compressed(&dest, ChannelReader::new(rx), encoding, ids)
    });
    let mut tx = Some(tx);
    while let Some(chunk) = body.next().await {
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
    let done = job.await??;
    tracing::debug!(handle = %rec.handle, entries = done.entries, bytes = done.bytes, "streamed in");
    Ok(HttpResponse::NoContent().finish())
}

async fn stream_out(
    state: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let encoding = encoding_of(&req, header::ACCEPT_ENCODING)?;
    let rec = live_volume(&state, &path).await?;
    let sub = query.into_inner().path;
    let root = rec.path.clone();
    let source = {
        let root = root.clone();
        web::block(move || archive::open_source(&root, &sub)).await??
    };
    let ids = IdMap::for_volume(rec.privileged);
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let handle = rec.handle.clone();
    tokio::task::spawn_blocking(move || {
        let errors = tx.clone();
        let res = archive::pack_compressed(&source, ChannelWriter::new(tx), encoding, ids, &root)
            .and_then(|mut w| {
                w.flush().map_err(|source| ArchiveError::Io {
                    path: root.clone(),
                    source,
                })
            });
        if let Err(e) = res {
            tracing::warn!(handle = %handle, error = %e, "stream-out stopped");
            // Makes the answer end in an error instead of a short, valid-looking stream.
            let _ = errors.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_ENCODING, encoding.as_str()))
        .content_type("application/octet-stream")
        .streaming(body))
}
