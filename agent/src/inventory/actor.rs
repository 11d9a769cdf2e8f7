//! The inventory actor: a `SyncArbiter` of worker threads over the blocking
//! [`Inventory`], so sled and file removal never run on an event loop.

use actix::prelude::*;

use super::{DestroyOutcome, Inventory, VolumeRecord};
use crate::planner::LocalVolume;
use crate::reconciler::messages::{DestroyDone, DestroyVolume, Orphans, Snapshot, StoreFailure};

pub struct InventoryActor {
    inventory: Inventory,
}

impl InventoryActor {
    /// Starts `threads` workers over one shared inventory.
    pub fn start(inventory: Inventory, threads: usize) -> Addr<InventoryActor> {
        SyncArbiter::start(threads.max(1), move || InventoryActor {
            inventory: inventory.clone(),
        })
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
