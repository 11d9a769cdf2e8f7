//! The accounting actor: every interval, measures a bounded batch of volumes and the
//! volumes filesystem on an inventory thread, publishes bytes and disk figures, and under
//! disk pressure asks for a poll at once (it never destroys a desired volume on its own).
//! Both go to [`Outlet`]s that `daemon.rs` connects (the reporter, the poller).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::native::DiskReport;
use tracing::{debug, warn};

use super::{disk, measure, own_data, Usage};
use crate::config::MinFree;
use crate::inventory::actor::InventoryHandle;
use crate::metrics::Metrics;
use crate::outlet::Outlet;

/// Volumes measured per round, at most.
pub const BATCH: usize = 64;

/// Where the accounting actor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A round runs on an inventory thread; a tick meanwhile is skipped.
    Measuring,
}

pub struct AccountingActor {
    inventory: InventoryHandle,
    root: PathBuf,
    min_free: MinFree,
    interval: Duration,
    usage: Usage,
    metrics: Arc<Metrics>,
    /// Each round's disk figures and when they were read (the reporter).
    figures: Outlet<(DiskReport, Instant)>,
    /// Told once when pressure begins (the poller: poll now).
    pressure_began: Outlet<()>,
    phase: Phase,
    under_pressure: bool,
}

impl AccountingActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inventory: InventoryHandle,
        root: PathBuf,
        min_free: MinFree,
        interval: Duration,
        usage: Usage,
        metrics: Arc<Metrics>,
        figures: Outlet<(DiskReport, Instant)>,
        pressure_began: Outlet<()>,
    ) -> Self {
        AccountingActor {
            inventory,
            root,
            min_free,
            interval,
            usage,
            metrics,
            figures,
            pressure_began,
            phase: Phase::Idle,
            under_pressure: false,
        }
    }

    fn round(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Measuring {
            return;
        }
        self.phase = Phase::Measuring;
        let inventory = self.inventory.clone();
        let usage = self.usage.clone();
        let root = self.root.clone();
        let work = move |inventory: &crate::inventory::Inventory| {
            let mut records = inventory.list().map_err(|e| e.to_string())?;
            // A missing volume has nothing to measure (and is not reported as a volume).
            records.retain(|r| !r.missing);
            let present: HashSet<&protocol::Handle> = records.iter().map(|r| &r.handle).collect();
            usage.retain(&present);
            for r in usage.next_batch(&records, BATCH) {
                match measure(&own_data(r)) {
                    Ok(bytes) => usage.record(r.handle.clone(), bytes, Instant::now()),
                    Err(e) => debug!(handle = %r.handle, error = %e, "cannot measure volume"),
                }
            }
            let at = Instant::now();
            disk(&root)
                .map(|f| (f, at))
                .map_err(|e| format!("statvfs {}: {e}", root.display()))
        };
        let fut = async move { inventory.call(work).await };
        ctx.spawn(fut.into_actor(self).map(|res, act, _| {
            act.phase = Phase::Idle;
            let (figures, measured_at) = match res {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return warn!(error = %e, "disk accounting failed"),
                Err(e) => return debug!(error = %e, "disk accounting skipped"),
            };
            act.metrics
                .set_volume_bytes(act.usage.all().into_iter().map(|(h, b)| (h.to_string(), b)));
            let pressure = act.min_free.is_below(figures.free_bytes, figures.total_bytes);
            act.metrics.disk_total_bytes.set(figures.total_bytes);
            act.metrics.disk_free_bytes.set(figures.free_bytes);
            act.metrics.disk_pressure.set(u64::from(pressure));
            if pressure && !act.under_pressure {
                // Once, when pressure begins: a poll now rather than at the next interval.
                // Polling on every round would hammer a central API that is failing.
                warn!(free_bytes = figures.free_bytes, total_bytes = figures.total_bytes,
                    "the volumes disk is below gc.min_free: polling the central API now (desired volumes are never destroyed for space)");
                act.pressure_began.send(());
            } else if !pressure && act.under_pressure {
                warn!(free_bytes = figures.free_bytes, "the volumes disk is above gc.min_free again");
            }
            act.under_pressure = pressure;
            act.figures.send((
                DiskReport {
                    total_bytes: figures.total_bytes,
                    free_bytes: figures.free_bytes,
                    free_inodes: figures.free_inodes,
                    pressure,
                    min_free_bytes: Some(act.min_free.bytes_of(figures.total_bytes)),
                },
                measured_at,
            ));
        }));
    }
}

impl Actor for AccountingActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.round(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.round(ctx));
    }
}
