//! The drift actor: every `volumes.scan_interval`, runs the inventory's drift scan on a
//! blocking thread, publishes the number of missing volumes, and asks for a reconcile pass
//! when the missing set changed (so the report and the plan follow at once). The scan at
//! start runs inside `Inventory::open`; this actor runs the ones after it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, warn};

use super::DriftScan;
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::reconciler::messages::Reconcile;

/// The drift actor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A scan runs on a blocking thread; a tick meanwhile is skipped.
    Scanning,
}

pub struct DriftActor {
    inventory: Inventory,
    interval: Duration,
    metrics: Arc<Metrics>,
    reconcile: Recipient<Reconcile>,
    phase: Phase,
}

impl DriftActor {
    pub fn new(
        inventory: Inventory,
        interval: Duration,
        metrics: Arc<Metrics>,
        reconcile: Recipient<Reconcile>,
    ) -> Self {
        DriftActor {
            inventory,
            interval,
            metrics,
            reconcile,
            phase: Phase::Idle,
        }
    }

    fn scan(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Scanning {
            return;
        }
        self.phase = Phase::Scanning;
        let inventory = self.inventory.clone();
        let work = async move { tokio::task::spawn_blocking(move || inventory.scan_drift()).await };
        ctx.spawn(work.into_actor(self).map(|res, act, _| {
            act.phase = Phase::Idle;
            match res {
                Ok(Ok(scan)) => act.publish(&scan),
                Ok(Err(e)) => {
                    warn!(error = %e, "drift scan failed; the missing volumes stay as last found")
                }
                Err(e) => warn!(error = %e, "drift scan task failed"),
            }
        }));
    }

    fn publish(&self, scan: &DriftScan) {
        debug!(
            checked = scan.checked,
            missing = scan.missing.len(),
            "drift scan"
        );
        self.metrics
            .missing_volumes
            .store(scan.missing.len() as u64, Relaxed);
        if scan.changed() {
            self.reconcile.do_send(Reconcile);
        }
    }
}

impl Actor for DriftActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.scan(ctx));
    }
}
