//! Messages between the reconciler, the inventory, the desired-state poller and the reporter.

use actix::Message;
use protocol::native::{BlockedVolume, FailedVolume};
use protocol::Handle;

use crate::planner::{Desired, LocalVolume, Reason};

/// A failure of the store or the disk, as text for reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreFailure(pub String);

/// Inventory: the volumes as the planner sees them.
#[derive(Message)]
#[rtype(result = "Result<Vec<LocalVolume>, StoreFailure>")]
pub struct Snapshot;

/// Inventory: destroy one volume (intent flushed first; already gone is success).
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

/// Desired state: a new answer, or `None` when the central side does not know this
/// worker (then nothing is destroyed until it does).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DesiredUpdate {
    pub desired: Option<Desired>,
    pub revision: Option<u64>,
}

/// Run a pass with the answer held (after a 304, on a timer, under disk pressure).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reconcile;

/// What a pass did, for the reporter.
#[derive(Message, Debug, Clone, Default)]
#[rtype(result = "()")]
pub struct PassReport {
    pub revision: Option<u64>,
    /// Destroyed in this pass, or named but already gone.
    pub destroyed: Vec<Handle>,
    /// Every volume whose last destroy attempt failed.
    pub failed: Vec<FailedVolume>,
    /// Volumes the central side asked to destroy that still have live children.
    pub blocked: Vec<BlockedVolume>,
    /// Desired volumes this worker does not have.
    pub missing: Vec<Handle>,
    /// The mass-destroy guard's refusal, if it tripped.
    pub refused: Option<String>,
    /// The volumes left after the pass.
    pub remaining: Vec<LocalVolume>,
}

impl PassReport {
    /// Whether the pass changed anything the central side should hear about at once.
    pub fn changed(&self) -> bool {
        !self.destroyed.is_empty() || !self.failed.is_empty() || self.refused.is_some()
    }
}

/// Ask for the plan the next pass would run, destroying nothing.
#[derive(Message)]
#[rtype(result = "Result<protocol::local::PlanView, StoreFailure>")]
pub struct GetPlan;

/// Forget the highest applied revision (the operator's `gc reset-revision`).
#[derive(Message)]
#[rtype(result = "Result<(), StoreFailure>")]
pub struct ResetRevision;

/// Stop starting destroys and wait (bounded) for in-flight ones to finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Liveness probe: answered at once by a healthy actor (feeds the systemd watchdog).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping;

/// Inventory: directories found on disk without a record, kept in quarantine.
#[derive(Message)]
#[rtype(result = "Result<Vec<std::path::PathBuf>, StoreFailure>")]
pub struct Orphans;
