//! The drift actor: every `volumes.scan_interval`, runs the inventory's drift scan on an
//! inventory thread, publishes the number of missing volumes, and tells its [`Outlet`]
//! (a reconcile pass, as `daemon.rs` connects it) when the missing set changed, so the
//! report and the plan follow at once. The scan at
//! start runs inside `Inventory::open`; this actor runs the ones after it.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, warn};

use super::DriftScan;
use crate::inventory::actor::InventoryHandle;
use crate::metrics::Metrics;
use crate::outlet::Outlet;

/// The drift actor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A scan runs on an inventory thread; a tick meanwhile is skipped.
    Scanning,
}

pub struct DriftActor {
    inventory: InventoryHandle,
    interval: Duration,
    metrics: Arc<Metrics>,
    changed: Outlet<()>,
    phase: Phase,
}

impl DriftActor {
    pub fn new(
        inventory: InventoryHandle,
        interval: Duration,
        metrics: Arc<Metrics>,
        changed: Outlet<()>,
    ) -> Self {
        DriftActor {
            inventory,
            interval,
            metrics,
            changed,
            phase: Phase::Idle,
        }
    }

    fn scan(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Scanning {
            return;
        }
        self.phase = Phase::Scanning;
        let inventory = self.inventory.clone();
        let work = async move { inventory.call(|inv| inv.scan_drift()).await };
        ctx.spawn(work.into_actor(self).map(|res, act, _| {
            act.phase = Phase::Idle;
            match res {
                Ok(Ok(scan)) => act.publish(&scan),
                Ok(Err(e)) => {
                    warn!(error = %e, "drift scan failed; the missing volumes stay as last found")
                }
                Err(e) => debug!(error = %e, "drift scan skipped"),
            }
        }));
    }

    fn publish(&self, scan: &DriftScan) {
        debug!(
            checked = scan.checked,
            missing = scan.missing.len(),
            "drift scan"
        );
        self.metrics.missing_volumes.set(scan.missing.len() as u64);
        if scan.changed() {
            self.changed.send(());
        }
    }
}

impl Actor for DriftActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.scan(ctx));
    }
}
