//! The reconciler actor: holds the latest answer, runs one pass at a time, remembers
//! failures, and hands what happened to its [`Outlet`] (the reporter, as `daemon.rs`
//! connects it). It asks the inventory actor for snapshots and destroys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::local::{PlanView, PlannedAction};
use protocol::native::{BlockedVolume, FailedVolume};
use protocol::Handle;
use tracing::{info, warn};

use super::backoff::Backoff;
use super::execute::{self, lock, Busy, Outcome};
use crate::inventory::actor::{DestroyDone, DestroyVolume, Orphans, Snapshot, StoreFailure};
use crate::metrics::Metrics;
use crate::outlet::Outlet;
use crate::planner::{self, Desired, LocalVolume, Plan, Policy, Reason, WaitReason};

/// A new answer from the central side, or `None` when it does not know this worker (then
/// nothing is destroyed until it does).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DesiredUpdate {
    pub desired: Option<Desired>,
    pub revision: Option<u64>,
}

/// Run a pass with the answer held (after a 304, on a timer, after drift).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reconcile;

/// Ask for the plan the next pass would run, destroying nothing.
#[derive(Message)]
#[rtype(result = "Result<protocol::local::PlanView, StoreFailure>")]
pub struct GetPlan;

/// Stop starting destroys and wait (bounded) for in-flight ones to finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Liveness probe: answered at once by a healthy actor (feeds the systemd watchdog).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping;

/// What a pass did, for the reporter.
#[derive(Debug, Clone, Default)]
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

/// How the reconciler runs destroys.
#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    pub policy: Policy,
    pub max_in_flight: usize,
    pub destroy_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// Where the reconciler is between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A pass runs.
    Running,
    /// A pass runs and another was asked for meanwhile: it starts when this one ends.
    RunningThenAgain,
    /// Shutting down: no pass starts again.
    Draining,
}

pub struct ReconcilerActor {
    settings: ReconcilerSettings,
    snapshot: Recipient<Snapshot>,
    destroyer: Recipient<DestroyVolume>,
    passes: Outlet<PassReport>,
    orphans: Option<Recipient<Orphans>>,
    metrics: Arc<Metrics>,
    desired: Option<Desired>,
    revision: Option<u64>,
    backoff: Backoff,
    /// Since when each volume named to go has been blocked by live children (for
    /// `volume_agent_blocked_longest_seconds`).
    blocked_since: HashMap<Handle, Instant>,
    busy: Busy,
    phase: Phase,
}

impl ReconcilerActor {
    pub fn new(
        settings: ReconcilerSettings,
        snapshot: Recipient<Snapshot>,
        destroyer: Recipient<DestroyVolume>,
        passes: Outlet<PassReport>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backoff = Backoff::new(settings.backoff_base, settings.backoff_cap);
        ReconcilerActor {
            settings,
            snapshot,
            destroyer,
            passes,
            orphans: None,
            metrics,
            desired: None,
            revision: None,
            backoff,
            blocked_since: HashMap::new(),
            busy: Busy::default(),
            phase: Phase::Idle,
        }
    }

    /// Where `gc plan` gets the quarantined directories from.
    pub fn with_orphans(mut self, orphans: Recipient<Orphans>) -> Self {
        self.orphans = Some(orphans);
        self
    }

    fn start_pass(&mut self, ctx: &mut Context<Self>) {
        match self.phase {
            Phase::Draining | Phase::RunningThenAgain => return,
            Phase::Running => {
                self.phase = Phase::RunningThenAgain;
                return;
            }
            Phase::Idle => {}
        }
        let Some(desired) = self.desired.clone() else {
            return;
        };
        self.phase = Phase::Running;
        let now = Instant::now();
        let mut skip: HashSet<Handle> = lock(&self.busy).clone();
        let snapshot = self.snapshot.clone();
        let destroyer = self.destroyer.clone();
        let busy = self.busy.clone();
        let settings = self.settings.clone();
        let backoff = self.backoff.clone();
        let fut = async move {
            let local = snapshot
                .send(Snapshot)
                .await
                .map_err(|e| StoreFailure(format!("inventory unavailable: {e}")))??;
            let plan = planner::plan(&local, &desired, chrono::Utc::now(), &settings.policy);
            skip.extend(
                plan.destroy
                    .iter()
                    .filter(|d| backoff.waiting(&d.handle, now))
                    .map(|d| d.handle.clone()),
            );
            let results = execute::run(
                &plan.destroy,
                &skip,
                &destroyer,
                &busy,
                settings.max_in_flight,
                settings.destroy_timeout,
            )
            .await;
            Ok::<_, StoreFailure>((local, plan, results))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            match res {
                Ok((local, plan, results)) => act.finish_pass(local, plan, results),
                Err(e) => warn!(error = %e, "reconcile pass could not read the inventory"),
            }
            match act.phase {
                Phase::Draining => {}
                Phase::RunningThenAgain => {
                    act.phase = Phase::Idle;
                    act.start_pass(ctx);
                }
                Phase::Running | Phase::Idle => act.phase = Phase::Idle,
            }
        }));
    }

    fn finish_pass(&mut self, local: Vec<LocalVolume>, plan: Plan, results: Vec<execute::Result>) {
        let m = &self.metrics;
        m.reconcile_passes_total.inc();
        let now = Instant::now();
        let mut destroyed: Vec<Handle> = plan.already_gone.clone();
        for r in &results {
            match &r.outcome {
                Outcome::Done(done) => {
                    self.backoff.succeeded(&r.handle);
                    m.destroys_total.inc();
                    m.destroy_duration.observe(r.took.as_secs_f64());
                    info!(handle = %r.handle, reason = r.reason.as_str(), took_ms = r.took.as_millis() as u64,
                        already_gone = matches!(done, DestroyDone::AlreadyGone), "destroyed volume");
                    destroyed.push(r.handle.clone());
                }
                Outcome::Failed(error) => {
                    m.destroys_failed_total.inc();
                    let attempts = self.backoff.failed(&r.handle, error.clone(), now);
                    warn!(handle = %r.handle, attempts, %error, "destroy failed; will retry with backoff");
                }
                Outcome::TimedOut(after) => {
                    m.destroys_failed_total.inc();
                    let error = format!(
                        "destroy timed out after {}",
                        humantime::format_duration(*after)
                    );
                    let attempts = self.backoff.failed(&r.handle, error.clone(), now);
                    warn!(handle = %r.handle, attempts, %error, "destroy timed out; it keeps running and will be checked again");
                }
            }
        }
        // Forget failures of volumes that are no longer here.
        let present: HashSet<&Handle> = local.iter().map(|v| &v.handle).collect();
        let gone: HashSet<&Handle> = destroyed.iter().collect();
        self.backoff
            .retain(|h| present.contains(h) && !gone.contains(h));

        let blocked: Vec<BlockedVolume> = plan
            .blocked
            .iter()
            .filter(|b| b.reason == Reason::Named)
            .map(|b| BlockedVolume {
                handle: b.handle.clone(),
                by_children: b.by_children.clone(),
            })
            .collect();
        m.blocked_volumes.set(blocked.len() as u64);
        let still: HashSet<&Handle> = blocked.iter().map(|b| &b.handle).collect();
        self.blocked_since.retain(|h, _| still.contains(h));
        for b in &blocked {
            self.blocked_since.entry(b.handle.clone()).or_insert(now);
        }
        m.set_blocked_since(self.blocked_since.values().min().copied());
        let refused = plan.refused.as_ref().map(|r| {
            m.plans_refused_total.inc();
            warn!(would_destroy = r.would_destroy, total = r.total, "{r}");
            r.to_string()
        });
        let remaining: Vec<LocalVolume> = local
            .into_iter()
            .filter(|v| !gone.contains(&v.handle))
            .collect();
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        for v in &remaining {
            *by_state.entry(v.state.as_str().to_string()).or_default() += 1;
        }
        m.set_volumes_by_state(by_state);
        m.missing_volumes
            .set(remaining.iter().filter(|v| v.missing).count() as u64);
        // A missing record dropped in this pass is reported destroyed, not missing.
        let missing: Vec<Handle> = plan
            .missing
            .iter()
            .filter(|h| !gone.contains(h))
            .cloned()
            .collect();
        self.passes.send(PassReport {
            revision: self.revision,
            destroyed,
            failed: self.backoff.report(),
            blocked,
            missing,
            refused,
            remaining,
        });
    }
}

impl Actor for ReconcilerActor {
    type Context = Context<Self>;
}

impl Handler<DesiredUpdate> for ReconcilerActor {
    type Result = ();
    fn handle(&mut self, msg: DesiredUpdate, ctx: &mut Context<Self>) {
        self.desired = msg.desired;
        self.revision = msg.revision.or(self.revision);
        self.start_pass(ctx);
    }
}

impl Handler<Reconcile> for ReconcilerActor {
    type Result = ();
    fn handle(&mut self, _: Reconcile, ctx: &mut Context<Self>) {
        self.start_pass(ctx);
    }
}

impl Handler<GetPlan> for ReconcilerActor {
    type Result = ResponseFuture<Result<PlanView, StoreFailure>>;
    fn handle(&mut self, _: GetPlan, _: &mut Context<Self>) -> Self::Result {
        let snapshot = self.snapshot.clone();
        let desired = self.desired.clone();
        let policy = self.settings.policy.clone();
        let revision = self.revision;
        let orphans = self.orphans.clone();
        Box::pin(async move {
            let quarantined: Vec<String> = match orphans {
                Some(o) => o
                    .send(Orphans)
                    .await
                    .map_err(|e| StoreFailure(format!("inventory unavailable: {e}")))??
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                None => Vec::new(),
            };
            let local = snapshot
                .send(Snapshot)
                .await
                .map_err(|e| StoreFailure(format!("inventory unavailable: {e}")))??;
            let Some(desired) = desired else {
                return Ok(PlanView {
                    revision,
                    refused: Some(
                        "no answer from the central API yet: nothing will be destroyed".into(),
                    ),
                    actions: local
                        .iter()
                        .map(|v| action(&v.handle, "keep", "no desired set yet"))
                        .collect(),
                    quarantined,
                });
            };
            let plan = planner::plan(&local, &desired, chrono::Utc::now(), &policy);
            let mut view = view(&local, &plan, revision);
            view.quarantined = quarantined;
            Ok(view)
        })
    }
}

impl Handler<Ping> for ReconcilerActor {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

impl Handler<Drain> for ReconcilerActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.phase = Phase::Draining;
        let busy = self.busy.clone();
        let limit = self.settings.destroy_timeout;
        Box::pin(async move {
            let started = Instant::now();
            while !lock(&busy).is_empty() && started.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

fn action(handle: &Handle, action: &str, reason: &str) -> PlannedAction {
    PlannedAction {
        handle: handle.clone(),
        action: action.to_string(),
        reason: reason.to_string(),
    }
}

/// The plan as `gc plan` shows it: one line per local volume (and per named ghost).
pub fn view(local: &[LocalVolume], plan: &Plan, revision: Option<u64>) -> PlanView {
    let mut actions = Vec::new();
    let mut explained = HashSet::new();
    let gone: HashSet<&Handle> = local
        .iter()
        .filter(|v| v.missing)
        .map(|v| &v.handle)
        .collect();
    for d in &plan.destroy {
        explained.insert(d.handle.clone());
        let mut why = d.reason.as_str().to_string();
        if gone.contains(&d.handle) {
            why.push_str("; its data directory is gone: only the record (and any leftovers) goes");
        }
        if !d.after.is_empty() {
            let after: Vec<&str> = d.after.iter().map(Handle::as_str).collect();
            why.push_str(&format!("; after its children {}", after.join(", ")));
        }
        actions.push(action(&d.handle, "destroy", &why));
    }
    for b in &plan.blocked {
        explained.insert(b.handle.clone());
        let kids: Vec<&str> = b.by_children.iter().map(Handle::as_str).collect();
        let mut why = format!(
            "{}, but children stay: {}",
            b.reason.as_str(),
            kids.join(", ")
        );
        if gone.contains(&b.handle) {
            why.push_str("; its data directory is gone (reported missing)");
        }
        actions.push(action(&b.handle, "blocked", &why));
    }
    for (h, w) in &plan.waiting {
        explained.insert(h.clone());
        let mut why = match w {
            WaitReason::Young { remaining } => format!(
                "unknown to the central side; may go in {}",
                humantime::format_duration(Duration::from_secs(remaining.as_secs()))
            ),
            WaitReason::InProgress(st) => {
                format!("unknown to the central side but {st}: never destroyed by absence")
            }
            WaitReason::Guard => "kept: the mass-destroy guard refused this pass".to_string(),
        };
        if gone.contains(h) {
            why.push_str("; its data directory is gone (reported missing)");
        }
        actions.push(action(h, "wait", &why));
    }
    for h in &plan.already_gone {
        actions.push(action(
            h,
            "report-destroyed",
            "named destroying; not on this worker",
        ));
    }
    for h in plan.missing.iter().filter(|h| !gone.contains(h)) {
        actions.push(action(h, "missing", "desired but not on this worker"));
    }
    for v in local {
        if explained.contains(&v.handle) {
            continue;
        }
        if v.missing {
            actions.push(action(
                &v.handle,
                "missing",
                "its data directory is gone: reported missing and kept while the central side wants it",
            ));
        } else {
            actions.push(action(&v.handle, "keep", "desired by the central side"));
        }
    }
    PlanView {
        revision,
        refused: plan.refused.as_ref().map(ToString::to_string),
        actions,
        quarantined: Vec::new(),
    }
}
