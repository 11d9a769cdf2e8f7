//! Tar streams into and out of a volume, run under a hold on the volume.
//!
//! A stream takes a [`StreamHold`] before it touches the volume: the volume's state is
//! checked under its lock (not `creating` or `destroying`), and its privilege — hence the
//! owner map and whether device nodes may be made — is read there, once, for the whole
//! stream.
//!
//! **A destroy or a privilege change cuts the running streams of its volume.** It first
//! closes the volume to new streams (they answer 409), then signals the running ones, which
//! stop at their next read or write, remove what they wrote (stream-in), and release their
//! hold; the destroy or change waits for that, at most [`CUT_WAIT`], and fails (409, to be
//! retried) when a stream did not stop in time. Cutting, not waiting, because a stream's
//! length is the client's to choose: an upload stalled for a minute must not hold up a
//! destroy central asked for, and a stream into a volume being destroyed is useless anyway.
//! Because a change cuts every stream that read the old privilege, the owner map a stream
//! uses is never stale.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Handle, Inventory, InventoryError, VolumeRecord, VolumeState};
use crate::contents::archive::{
    self, ArchiveError, Encoding, ExtractOptions, Extracted, Source, Stopped,
};
use crate::fsx::Dir;

/// Longest a destroy or a privilege change waits for the streams it cut to stop.
pub const CUT_WAIT: Duration = Duration::from_secs(30);

/// Optional limits of one stream-in (`api.stream_in_max_bytes` / `_entries`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamInLimits {
    pub max_bytes: Option<u64>,
    pub max_entries: Option<u64>,
}

struct HoldEntry {
    /// Streams holding the volume.
    streams: usize,
    /// Destroys or privilege changes waiting or running: no new stream may start.
    closing: usize,
    /// Set to `true` to cut the running streams.
    cut: watch::Sender<bool>,
}

/// The streams running per volume, and the changes that wait for them to stop.
#[derive(Default)]
pub(crate) struct Holds {
    map: Mutex<HashMap<Handle, HoldEntry>>,
    released: Condvar,
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, HashMap<Handle, HoldEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(map: &'a mut HashMap<Handle, HoldEntry>, h: &Handle) -> &'a mut HoldEntry {
        map.entry(h.clone()).or_insert_with(|| HoldEntry {
            streams: 0,
            closing: 0,
            cut: watch::channel(false).0,
        })
    }

    /// Forgets `h` once nothing holds or closes it (so the next stream starts uncut).
    fn tidy(map: &mut HashMap<Handle, HoldEntry>, h: &Handle) {
        if map.get(h).is_some_and(|e| e.streams == 0 && e.closing == 0) {
            map.remove(h);
        }
    }
}

/// A running stream's claim on its volume; released when dropped.
pub struct StreamHold {
    inv: Inventory,
    /// The volume as it was when the stream started (its privilege holds for the stream).
    pub record: VolumeRecord,
    cut: watch::Receiver<bool>,
}

impl StreamHold {
    /// Becomes `true` when a destroy or privilege change cuts this stream.
    pub fn cut_signal(&self) -> watch::Receiver<bool> {
        self.cut.clone()
    }

    fn check(&self) -> io::Result<()> {
        if *self.cut.borrow() {
            return Err(Stopped::Cut(self.record.handle.to_string()).into_io());
        }
        Ok(())
    }
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        let holds = &self.inv.inner.holds;
        let mut map = holds.lock();
        if let Some(e) = map.get_mut(&self.record.handle) {
            e.streams = e.streams.saturating_sub(1);
        }
        Holds::tidy(&mut map, &self.record.handle);
        holds.released.notify_all();
    }
}

/// Closes a volume to streams while a destroy or privilege change runs; reopens on drop.
pub(crate) struct Closed<'a> {
    inv: &'a Inventory,
    handle: Handle,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut map = self.inv.inner.holds.lock();
        if let Some(e) = map.get_mut(&self.handle) {
            e.closing = e.closing.saturating_sub(1);
        }
        Holds::tidy(&mut map, &self.handle);
    }
}

/// Reads `inner`, failing once the hold is cut.
struct CutReader<'a, R> {
    inner: R,
    hold: &'a StreamHold,
}

impl<R: Read> Read for CutReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.hold.check()?;
        // A read that failed because the stream was cut reports the cut.
        self.inner.read(buf).or_else(|e| {
            self.hold.check()?;
            Err(e)
        })
    }
}

/// Writes `inner`, failing once the hold is cut.
pub struct CutWriter<'a, W> {
    inner: W,
    hold: &'a StreamHold,
}

impl<W: Write> Write for CutWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hold.check()?;
        self.inner.write(data).or_else(|e| {
            self.hold.check()?;
            Err(e)
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        self.hold.check()?;
        self.inner.flush()
    }
}

/// Which way a stream goes, and who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// A stream-in from the local API.
    In,
    /// A stream-out (local, or the source side of a P2P stream).
    Out,
    /// A stream-in from another worker, through the P2P listener.
    PeerIn,
}

/// Whether another worker may write into a volume: only one nothing has read yet, so no
/// peer can change what a build, a copy-on-write child or another worker already saw.
/// That is a volume still `created` or `initializing` in the agent's lifecycle, or an
/// empty volume an async create made `initialized` at once (what Concourse streams into)
/// that has no children and was never streamed out.
pub(crate) fn peer_may_write(stored: &super::store::Stored) -> bool {
    match stored.state {
        VolumeState::Created | VolumeState::Initializing => true,
        VolumeState::Initialized => stored.open_to_peers && stored.children == 0,
        VolumeState::Creating | VolumeState::Destroying => false,
    }
}

/// Opens a live volume's data directory (the agent's own path, not the volume's content).
fn open_data(rec: &VolumeRecord) -> Result<Dir, ArchiveError> {
    Dir::open_root(&rec.path).map_err(|e| ArchiveError::Io {
        path: rec.path.clone(),
        source: e.source,
    })
}

impl Inventory {
    /// Takes a hold on `h` for a stream of `kind`: 404 when unknown, 409 while it is being
    /// created, destroyed or having its privilege changed, and for a peer's stream-in,
    /// 409 unless [`peer_may_write`] says yes. A stream out closes the volume to peers for
    /// good (durably, once). Blocking (a store read; a store write the first time a volume
    /// open to peers is read).
    pub fn hold_for_stream(
        &self,
        h: &Handle,
        kind: StreamKind,
    ) -> Result<StreamHold, InventoryError> {
        let _guard = self.lock(h);
        let stored = self
            .inner
            .store
            .get(h)?
            .ok_or_else(|| InventoryError::NotFound(h.clone()))?;
        if kind == StreamKind::PeerIn && !peer_may_write(&stored) {
            return Err(InventoryError::Streaming {
                handle: h.clone(),
                why: format!(
                    "{}{}; a peer may stream only into a volume nothing has read yet (created or \
                     initializing, or made empty by POST /volumes-async and not yet streamed out \
                     or used as a parent)",
                    stored.state,
                    if stored.children > 0 {
                        " with children"
                    } else {
                        ""
                    }
                ),
            });
        }
        if kind == StreamKind::Out && stored.open_to_peers {
            self.update_locked(h, "closing a volume to peers", |rec| {
                Ok(std::mem::take(&mut rec.open_to_peers))
            })?;
        }
        let rec = self.record(h, stored);
        if matches!(rec.state, VolumeState::Creating | VolumeState::Destroying) {
            return Err(InventoryError::Streaming {
                handle: h.clone(),
                why: format!(
                    "{}; stream into or out of a volume that is not being created or destroyed",
                    rec.state
                ),
            });
        }
        let mut map = self.inner.holds.lock();
        let e = Holds::entry(&mut map, h);
        if e.closing > 0 {
            let busy = InventoryError::Streaming {
                handle: h.clone(),
                why: "being destroyed or having its privilege changed; stream again once that is done".into(),
            };
            Holds::tidy(&mut map, h);
            return Err(busy);
        }
        e.streams += 1;
        let cut = e.cut.subscribe();
        Ok(StreamHold {
            inv: self.clone(),
            record: rec,
            cut,
        })
    }

    /// Closes `h` to new streams, cuts the running ones and waits (at most [`CUT_WAIT`])
    /// until they stopped. Called by destroy and privilege changes before they lock `h`.
    pub(crate) fn close_streams(&self, h: &Handle) -> Result<Closed<'_>, InventoryError> {
        let holds = &self.inner.holds;
        let mut map = holds.lock();
        let e = Holds::entry(&mut map, h);
        e.closing += 1;
        let closed = Closed {
            inv: self,
            handle: h.clone(),
        };
        if e.streams > 0 {
            e.cut.send_replace(true);
            tracing::info!(handle = %h, streams = e.streams, "cutting the volume's running streams");
        }
        let deadline = Instant::now() + CUT_WAIT;
        loop {
            let running = map.get(h).map(|e| e.streams).unwrap_or(0);
            if running == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(map);
                return Err(InventoryError::Streaming {
                    handle: h.clone(),
                    why: format!(
                        "still streaming: {running} cut stream(s) did not stop within {CUT_WAIT:?}; try again"
                    ),
                });
            }
            map = holds
                .released
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(map);
        Ok(closed)
    }

    /// Extracts the tar `input` (compressed as `encoding`) into the directory `path` of
    /// the held volume (made when missing). On any failure — a refused entry, a limit, a
    /// broken or cut stream — what it wrote is removed again. Blocking.
    pub fn stream_in(
        &self,
        hold: &StreamHold,
        path: &str,
        input: impl Read,
        encoding: Encoding,
        limits: StreamInLimits,
    ) -> Result<Extracted, ArchiveError> {
        let comps = archive::components(path.as_bytes(), true)
            .map_err(|_| ArchiveError::BadPath(path.to_owned()))?;
        let root = open_data(&hold.record)?;
        let opts = ExtractOptions {
            max_bytes: limits.max_bytes,
            max_entries: limits.max_entries,
            ..ExtractOptions::for_volume(hold.record.privileged)
        };
        let input = CutReader { inner: input, hold };
        archive::extract_compressed(&root, &comps, input, encoding, &opts)
    }

    /// Opens `path` of the held volume for [`Self::stream_out`]; a missing path is
    /// [`ArchiveError::NotFound`]. Blocking.
    pub fn open_stream_out(&self, hold: &StreamHold, path: &str) -> Result<Source, ArchiveError> {
        hold.check().map_err(|e| match Stopped::find(&e) {
            Some(s) => ArchiveError::Stopped(s),
            None => ArchiveError::Malformed(e),
        })?;
        archive::open_source(&hold.record.path, path)
    }

    /// Writes `source` as a tar compressed as `encoding` into `out`, owners mapped back as
    /// the held volume's privilege says; fails once the hold is cut. Blocking.
    pub fn stream_out<W: Write>(
        &self,
        hold: &StreamHold,
        source: &Source,
        out: W,
        encoding: Encoding,
    ) -> Result<(), ArchiveError> {
        let ids = crate::contents::IdMap::for_volume(hold.record.privileged);
        let out = CutWriter { inner: out, hold };
        let mut out = archive::pack_compressed(source, out, encoding, ids, &hold.record.path)?;
        out.flush().map_err(|source| match Stopped::find(&source) {
            Some(s) => ArchiveError::Stopped(s),
            None => ArchiveError::Io {
                path: hold.record.path.clone(),
                source,
            },
        })
    }
}
