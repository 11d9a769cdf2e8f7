//! The inventory actor: a `SyncArbiter` of worker threads over the blocking
//! [`Inventory`], so sled, file removal and tree copies never run on an event loop.
//!
//! It is the one way the rest of the agent reaches the inventory: the reconciler and the
//! reporter send the messages below; the local API, the accounting and drift actors run a
//! closure with [`InventoryHandle::call`]. Its thread count is the one bound on blocking
//! inventory work (`gc.max_in_flight` destroys plus [`API_THREADS`] for everything else);
//! a call waits in the actor's mailbox while every thread is busy. Streams are the one
//! exception: each runs on a thread of the stream pool (`api.max_streams`) and calls the
//! `Inventory` there directly (`hold_for_stream`, `stream_in`, `open_stream_out`), so a
//! long upload never takes one of these threads.

use actix::dev::MessageResponse;
use actix::prelude::*;

use super::{DestroyOutcome, Inventory, VolumeRecord};
use crate::planner::{LocalVolume, Reason};
use protocol::Handle;

/// Threads beyond `gc.max_in_flight` for the local API, accounting and drift scans.
pub const API_THREADS: usize = 8;

/// A failure of the store or the disk, as text for reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreFailure(pub String);

/// The volumes as the planner sees them.
#[derive(Message)]
#[rtype(result = "Result<Vec<LocalVolume>, StoreFailure>")]
pub struct Snapshot;

/// Destroy one volume (intent flushed first; already gone is success).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<DestroyDone, StoreFailure>")]
pub struct DestroyVolume {
    pub handle: Handle,
    pub reason: Reason,
}

/// What a destroy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestroyDone {
    Destroyed,
    AlreadyGone,
}

/// Directories found on disk without a record, kept in quarantine.
#[derive(Message)]
#[rtype(result = "Result<Vec<std::path::PathBuf>, StoreFailure>")]
pub struct Orphans;

/// Run a closure on one of the actor's threads ([`InventoryHandle::call`]).
pub struct Call<R: Send + 'static>(Box<dyn FnOnce(&Inventory) -> R + Send>);

impl<R: Send + 'static> Message for Call<R> {
    type Result = R;
}

pub struct InventoryActor {
    inventory: Inventory,
}

impl InventoryActor {
    /// Starts `threads` workers over one shared inventory.
    pub fn start(inventory: Inventory, threads: usize) -> InventoryHandle {
        let addr = SyncArbiter::start(threads.max(1), move || InventoryActor {
            inventory: inventory.clone(),
        });
        InventoryHandle { addr }
    }
}

impl Actor for InventoryActor {
    type Context = SyncContext<Self>;
}

/// The planner's view of a record.
pub fn local_volume(r: &VolumeRecord) -> LocalVolume {
    LocalVolume {
        handle: r.handle.clone(),
        parent: r.parent.clone(),
        state: r.state,
        created_at: r.created_at,
        missing: r.missing,
    }
}

impl Handler<Snapshot> for InventoryActor {
    type Result = Result<Vec<LocalVolume>, StoreFailure>;
    fn handle(&mut self, _: Snapshot, _: &mut SyncContext<Self>) -> Self::Result {
        self.inventory
            .list()
            .map(|records| records.iter().map(local_volume).collect())
            .map_err(|e| StoreFailure(e.to_string()))
    }
}

impl Handler<DestroyVolume> for InventoryActor {
    type Result = Result<DestroyDone, StoreFailure>;
    fn handle(&mut self, msg: DestroyVolume, _: &mut SyncContext<Self>) -> Self::Result {
        match self.inventory.destroy(&msg.handle) {
            Ok(DestroyOutcome::Destroyed) => Ok(DestroyDone::Destroyed),
            Ok(DestroyOutcome::AlreadyGone) => Ok(DestroyDone::AlreadyGone),
            Err(e) => Err(StoreFailure(e.to_string())),
        }
    }
}

impl Handler<Orphans> for InventoryActor {
    type Result = Result<Vec<std::path::PathBuf>, StoreFailure>;
    fn handle(&mut self, _: Orphans, _: &mut SyncContext<Self>) -> Self::Result {
        self.inventory
            .orphans()
            .map_err(|e| StoreFailure(e.to_string()))
    }
}

impl<R: Send + 'static> Handler<Call<R>> for InventoryActor
where
    R: MessageResponse<InventoryActor, Call<R>>,
{
    type Result = R;
    fn handle(&mut self, msg: Call<R>, _: &mut SyncContext<Self>) -> R {
        (msg.0)(&self.inventory)
    }
}

/// The inventory actor stopped (the agent is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the inventory is shutting down")]
pub struct InventoryGone;

/// How the rest of the agent reaches the inventory; cheap to clone.
#[derive(Clone)]
pub struct InventoryHandle {
    addr: Addr<InventoryActor>,
}

impl InventoryHandle {
    /// Runs `f` on one of the inventory's threads and answers what it returned.
    pub async fn call<R, F>(&self, f: F) -> Result<R, InventoryGone>
    where
        F: FnOnce(&Inventory) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.addr
            .send(Call(Box::new(move |inv: &Inventory| Answer(f(inv)))))
            .await
            .map(|Answer(r)| r)
            .map_err(|_| InventoryGone)
    }

    pub fn snapshot(&self) -> Recipient<Snapshot> {
        self.addr.clone().recipient()
    }

    pub fn destroyer(&self) -> Recipient<DestroyVolume> {
        self.addr.clone().recipient()
    }

    pub fn orphans(&self) -> Recipient<Orphans> {
        self.addr.clone().recipient()
    }
}

/// Any value, answered as is by a [`Call`] (actix needs the answer type to implement
/// `MessageResponse`).
pub struct Answer<R>(pub R);

impl<R: Send + 'static> MessageResponse<InventoryActor, Call<Answer<R>>> for Answer<R> {
    fn handle(
        self,
        _: &mut SyncContext<InventoryActor>,
        tx: Option<actix::dev::OneshotSender<Answer<R>>>,
    ) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}
