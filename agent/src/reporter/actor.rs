//! The reporter: sends the report after every pass that changed something and at least
//! once per report interval. `destroyed` handles stay pending until a report carrying
//! them is accepted, so a failed report never loses the proof that a volume is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::native::{BlockedVolume, DiskReport, FailedVolume, ReportedVolume, VolumeReport};
use protocol::Handle;
use tracing::{debug, warn};

use super::pending::Pending;
use crate::central::CentralClient;
use crate::config::Dialect;
use crate::inventory::actor::Snapshot;
use crate::metrics::Metrics;
use crate::planner::LocalVolume;
use crate::reconciler::PassReport;
use crate::usage::Usage;

/// Disk figures to add to the next report (from the accounting actor), and when the
/// file system was asked for them.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DiskFigures {
    pub report: DiskReport,
    pub measured_at: Instant,
}

/// A reconcile pass finished: what it did goes into the next report, at once when it
/// changed something.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct PassDone(pub PassReport);

/// Whether a report is on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Sending,
    /// Sending, and something changed meanwhile: another report follows this one.
    SendingThenAgain,
}

pub struct ReporterActor {
    client: CentralClient,
    dialect: Dialect,
    interval: Duration,
    snapshot: Recipient<Snapshot>,
    metrics: Arc<Metrics>,
    usage: Usage,
    revision: Option<u64>,
    volumes: Vec<LocalVolume>,
    /// In the order they were destroyed (children first), without repeats.
    pending_destroyed: Pending,
    refused: Option<String>,
    failed: Vec<FailedVolume>,
    blocked: Vec<BlockedVolume>,
    missing: Vec<Handle>,
    disk: Option<DiskFigures>,
    /// When the last pass that destroyed volumes ended.
    destroyed_at: Option<Instant>,
    phase: Phase,
}

impl ReporterActor {
    pub fn new(
        client: CentralClient,
        dialect: Dialect,
        interval: Duration,
        snapshot: Recipient<Snapshot>,
        metrics: Arc<Metrics>,
        usage: Usage,
    ) -> Self {
        ReporterActor {
            client,
            dialect,
            interval,
            snapshot,
            metrics,
            usage,
            revision: None,
            volumes: Vec::new(),
            pending_destroyed: Pending::default(),
            refused: None,
            failed: Vec::new(),
            blocked: Vec::new(),
            missing: Vec::new(),
            disk: None,
            destroyed_at: None,
            phase: Phase::Idle,
        }
    }

    fn send_report(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Idle {
            self.phase = Phase::SendingThenAgain;
            return;
        }
        self.phase = Phase::Sending;
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let dialect = self.dialect;
        let destroyed: Vec<Handle> = self.pending_destroyed.to_vec();
        // A record whose data directory is gone is not a volume: it goes in `missing`.
        let mut missing = self.missing.clone();
        missing.extend(
            self.volumes
                .iter()
                .filter(|v| v.missing)
                .map(|v| v.handle.clone()),
        );
        missing.sort();
        missing.dedup();
        let report = VolumeReport {
            revision_seen: self.revision,
            volumes: self
                .volumes
                .iter()
                .filter(|v| !v.missing)
                .map(|v| ReportedVolume {
                    handle: v.handle.clone(),
                    parent: v.parent.clone(),
                    state: v.state,
                    bytes: self.usage.bytes(&v.handle),
                })
                .collect(),
            destroyed: destroyed.clone(),
            failed: self.failed.clone(),
            blocked: self.blocked.clone(),
            missing,
            disk: self.current_disk(),
            refused: self.refused.clone(),
        };
        // The ATC marks what a worker stops reporting missing by itself.
        let handles: Vec<Handle> = self
            .volumes
            .iter()
            .filter(|v| !v.missing)
            .map(|v| v.handle.clone())
            .collect();
        let fut = async move {
            let res = match dialect {
                Dialect::Native => client.put_report(&report).await,
                Dialect::Concourse => client.put_concourse_report(handles).await,
            };
            match &res {
                Ok(()) => metrics.central_request("report", "ok"),
                Err(e) => metrics.central_request("report", e.kind()),
            }
            res
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let again = act.phase == Phase::SendingThenAgain;
            act.phase = Phase::Idle;
            match res {
                Ok(()) => {
                    debug!(destroyed = destroyed.len(), "report accepted");
                    act.pending_destroyed.acknowledge(&destroyed);
                }
                Err(e) => warn!(error = %e, "report failed; it is sent again with the next one"),
            }
            if again {
                act.send_report(ctx);
            }
        }));
    }

    /// The disk figures, unless they were read before the last destroy: they would show
    /// the space of volumes this report says are gone as still taken, and the central API
    /// (which stops counting those volumes as being freed) would make that room again,
    /// evicting caches it need not. The next accounting round's figures go instead.
    fn current_disk(&self) -> Option<DiskReport> {
        disk_to_report(self.disk.as_ref(), self.destroyed_at)
    }

    fn periodic(&mut self, ctx: &mut Context<Self>) {
        let snapshot = self.snapshot.clone();
        ctx.spawn(
            async move { snapshot.send(Snapshot).await }
                .into_actor(self)
                .map(|res, act, ctx| {
                    match res {
                        Ok(Ok(volumes)) => act.volumes = volumes,
                        Ok(Err(e)) => warn!(error = %e, "report: cannot read the inventory"),
                        Err(e) => warn!(error = %e, "report: inventory unavailable"),
                    }
                    act.send_report(ctx);
                }),
        );
    }
}

/// `disk` unless it was read before `destroyed_at` (the end of the last pass that
/// destroyed volumes).
fn disk_to_report(disk: Option<&DiskFigures>, destroyed_at: Option<Instant>) -> Option<DiskReport> {
    disk.filter(|d| destroyed_at.is_none_or(|at| d.measured_at >= at))
        .map(|d| d.report.clone())
}

impl Actor for ReporterActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.periodic(ctx));
    }
}

impl Handler<PassDone> for ReporterActor {
    type Result = ();
    fn handle(&mut self, PassDone(msg): PassDone, ctx: &mut Context<Self>) {
        let changed = msg.changed() || msg.blocked != self.blocked || msg.missing != self.missing;
        self.revision = msg.revision.or(self.revision);
        if !msg.destroyed.is_empty() {
            self.destroyed_at = Some(Instant::now());
        }
        for h in msg.destroyed {
            self.pending_destroyed.add(h);
        }
        self.refused = msg.refused.clone();
        self.failed = msg.failed;
        self.blocked = msg.blocked;
        self.missing = msg.missing;
        self.volumes = msg.remaining;
        if changed {
            self.send_report(ctx);
        }
    }
}

impl Handler<DiskFigures> for ReporterActor {
    type Result = ();
    fn handle(&mut self, msg: DiskFigures, _: &mut Context<Self>) {
        self.disk = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(free_bytes: u64, measured_at: Instant) -> DiskFigures {
        DiskFigures {
            report: DiskReport {
                total_bytes: 100,
                free_bytes,
                free_inodes: 10,
                pressure: false,
                min_free_bytes: Some(10),
            },
            measured_at,
        }
    }

    #[test]
    fn disk_figures_read_before_the_last_destroying_pass_are_left_out() {
        let read = Instant::now();
        let later = read + Duration::from_millis(5);
        let f = figures(40, read);
        assert_eq!(
            disk_to_report(Some(&f), None).map(|d| d.free_bytes),
            Some(40)
        );
        assert_eq!(
            disk_to_report(Some(&f), Some(later)),
            None,
            "stale: left out"
        );
        let fresh = figures(70, later);
        assert_eq!(
            disk_to_report(Some(&fresh), Some(later)).map(|d| d.free_bytes),
            Some(70),
            "read after the pass: sent"
        );
        assert_eq!(disk_to_report(None, Some(read)), None);
    }
}
