//! One simulated worker: the agent's own central client, poll timing (jitter, backoff)
//! and staleness check, and the agent's planner over an in-memory volume set, destroying
//! children first and reporting what it has and what it destroyed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use protocol::native::VolumeReport;
use protocol::native::{BaseResourceType, BlockedVolume, ReportedVolume, ResourceTypesReport};
use protocol::{Handle, VolumeState};
use rand::Rng;
use tokio::sync::watch;
use volume_agent::central::actor::{poll_delay, stale};
use volume_agent::central::{CentralClient, ClientError, DesiredAnswer};
use volume_agent::planner::{self, Desired, LocalVolume, Policy};

use crate::stats::{lock, Kind, Recorder};

/// What a worker shares with the scheduler driver: its volumes on "disk".
pub struct Shared {
    pub index: u32,
    pub name: String,
    pub local: Mutex<HashMap<Handle, LocalVolume>>,
    /// Something changed locally since the last report (a volume was created).
    pub dirty: AtomicBool,
    /// Volumes created so far (each create's number), and the highest number a
    /// successful report included: the scheduler waits for its volume to be reported
    /// (which makes its row `created`) before it makes it `initialized`.
    created: AtomicU64,
    reported: watch::Sender<u64>,
}

impl Shared {
    pub fn new(index: u32, name: String) -> Self {
        Shared {
            index,
            name,
            local: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            created: AtomicU64::new(0),
            reported: watch::Sender::new(0),
        }
    }

    /// Waits until a report that includes create number `n` succeeded; false on timeout.
    pub async fn reported(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.reported.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The container runtime created a volume on this worker; returns its create number.
    pub fn create(&self, handle: Handle, parent: Option<Handle>) -> u64 {
        let v = LocalVolume {
            handle: handle.clone(),
            parent,
            state: VolumeState::Initialized,
            created_at: Utc::now(),
            missing: false,
        };
        let mut local = lock(&self.local);
        local.insert(handle, v);
        let n = self.created.fetch_add(1, Relaxed) + 1;
        drop(local);
        self.dirty.store(true, Relaxed);
        n
    }
}

/// The agent's timing knobs, as in its config.
#[derive(Debug, Clone)]
pub struct Timing {
    pub poll_interval: Duration,
    pub report_interval: Duration,
    pub max_backoff: Duration,
}

/// The resource types every simulated worker reports at start, as an agent does.
pub fn resource_types() -> ResourceTypesReport {
    ResourceTypesReport {
        resource_types: vec![BaseResourceType {
            name: "git".into(),
            image: "/usr/share/volume-agent/resource-types/git/rootfs.tgz".into(),
            version: "1.0.0".into(),
            privileged: false,
            unique_version_history: false,
        }],
    }
}

/// Records a failed request: its status, or with no answer what the client said.
fn failed(rec: &Recorder, me: u32, kind: Kind, e: &ClientError, took: Duration) {
    match code(e) {
        0 => rec.unanswered(me, kind, took, e.to_string()),
        c => rec.event(me, kind, c, took),
    }
}

fn code(e: &ClientError) -> u16 {
    match e {
        ClientError::Status { status, .. } => status.as_u16(),
        _ => 0,
    }
}

/// Sleeps `d` unless the run stops first; false when it stopped.
async fn nap(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Runs one worker until `stop` turns true.
pub async fn run(
    shared: Arc<Shared>,
    client: CentralClient,
    timing: Timing,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let me = shared.index;
    // A fleet does not boot at once: each worker starts somewhere in the first interval.
    let first = rand::thread_rng().gen_range(0.0..1.0);
    if !nap(timing.poll_interval.mul_f64(first), &mut stop).await {
        return;
    }
    // At start-up the agent reports its base resource types (retried with backoff).
    let mut errors = 0u32;
    loop {
        let t = Instant::now();
        match client.put_resource_types(&resource_types()).await {
            Ok(()) => {
                rec.event(me, Kind::Report, 204, t.elapsed());
                break;
            }
            Err(e) => {
                failed(&rec, me, Kind::ReportError, &e, t.elapsed());
                errors += 1;
                if !nap(
                    poll_delay(timing.poll_interval, timing.max_backoff, errors),
                    &mut stop,
                )
                .await
                {
                    return;
                }
            }
        }
    }

    let policy = Policy::default();
    let mut etag: Option<String> = None;
    let mut highest: Option<u64> = None;
    let mut desired: Option<Desired> = None;
    let mut errors = 0u32;
    let mut pending_destroyed: Vec<Handle> = Vec::new();
    // What the last pass left for the reports (blocked, missing, refused), as the agent's
    // reporter keeps it between passes.
    let mut last = PassOutcome::default();
    // As the agent: polls on their own timer (jitter, backoff after failures), and the
    // reporter on a timer of its own, every report interval from the agent's start, poll
    // failures or not; a pass that changed something reports at once.
    let mut next_poll = Instant::now();
    let mut next_report = Instant::now() + timing.report_interval;
    loop {
        let wake = next_poll.min(next_report);
        if !nap(wake.saturating_duration_since(Instant::now()), &mut stop).await {
            return;
        }
        let mut report_now = false;
        if Instant::now() >= next_report {
            report_now = true;
            next_report += timing.report_interval;
            if next_report <= Instant::now() {
                next_report = Instant::now() + timing.report_interval;
            }
        }
        if Instant::now() >= next_poll {
            let t = Instant::now();
            let answer = client.get_desired(etag.as_deref()).await;
            let took = t.elapsed();
            match answer {
                Err(e) => {
                    failed(&rec, me, Kind::DesiredError, &e, took);
                    errors = errors.saturating_add(1);
                }
                Ok(DesiredAnswer::NotModified) => {
                    rec.event(me, Kind::Desired304, 304, took);
                    errors = 0;
                }
                Ok(DesiredAnswer::UnknownWorker) => {
                    rec.event(me, Kind::DesiredError, 404, took);
                    errors = 0;
                    etag = None;
                    desired = None;
                }
                Ok(DesiredAnswer::Fresh { set, etag: tag }) => {
                    rec.event(me, Kind::DesiredFull, 200, took);
                    errors = 0;
                    if let Some(why) = stale(&set, &shared.name, highest) {
                        rec.violation(format!("{}: stale answer: {why}", shared.name));
                    } else {
                        highest = Some(highest.map_or(set.revision, |h| h.max(set.revision)));
                        etag = tag;
                        desired = Some(Desired::Native {
                            keep: set.volumes.into_iter().map(|v| v.handle).collect(),
                            destroying: set.destroying,
                            as_of: set.as_of,
                        });
                    }
                }
            }
            if errors == 0 {
                if let Some(d) = &desired {
                    let outcome = pass(&shared, d, &policy, &rec, &mut pending_destroyed);
                    report_now |= outcome.changed
                        || outcome.blocked != last.blocked
                        || outcome.missing != last.missing;
                    last = outcome;
                }
            }
            next_poll =
                Instant::now() + poll_delay(timing.poll_interval, timing.max_backoff, errors);
        }
        // A volume created since the last report: the scheduler waits for it to be
        // reported (its row `created`) before it goes on with the build.
        report_now |= shared.dirty.swap(false, Relaxed);
        if report_now {
            let (report, upto) = build_report(&shared, highest, &pending_destroyed, &last);
            let t = Instant::now();
            match client.put_report(&report).await {
                Ok(()) => {
                    shared.reported.send_if_modified(|r| {
                        let newer = upto > *r;
                        *r = (*r).max(upto);
                        newer
                    });
                    rec.event(me, Kind::Report, 204, t.elapsed());
                    pending_destroyed.clear();
                }
                Err(e) => {
                    failed(&rec, me, Kind::ReportError, &e, t.elapsed());
                    // Still unreported: the next report carries it.
                    if upto > *shared.reported.borrow() {
                        shared.dirty.store(true, Relaxed);
                    }
                }
            }
        }
    }
}

/// What a pass leaves for the report.
#[derive(Default)]
struct PassOutcome {
    changed: bool,
    blocked: Vec<BlockedVolume>,
    missing: Vec<Handle>,
    refused: Option<String>,
}

/// One reconcile pass: plans with the agent's planner and destroys, children first,
/// checking the invariants at each destroy.
fn pass(
    shared: &Shared,
    desired: &Desired,
    policy: &Policy,
    rec: &Recorder,
    destroyed: &mut Vec<Handle>,
) -> PassOutcome {
    let mut local = lock(&shared.local);
    let snapshot: Vec<LocalVolume> = local.values().cloned().collect();
    let plan = planner::plan(&snapshot, desired, Utc::now(), policy);
    let mut changed = false;
    for d in &plan.destroy {
        if let Some(child) = local
            .values()
            .find(|v| v.parent.as_ref() == Some(&d.handle))
        {
            rec.violation(format!(
                "{}: parent {} destroyed before its child {}",
                shared.name, d.handle, child.handle
            ));
        }
        local.remove(&d.handle);
        rec.destroyed(&shared.name, &d.handle);
        destroyed.push(d.handle.clone());
        changed = true;
    }
    for h in &plan.already_gone {
        if !destroyed.contains(h) {
            destroyed.push(h.clone());
            changed = true;
        }
    }
    PassOutcome {
        changed,
        blocked: plan
            .blocked
            .into_iter()
            .map(|b| BlockedVolume {
                handle: b.handle,
                by_children: b.by_children,
            })
            .collect(),
        missing: plan.missing,
        refused: plan.refused.map(|r| r.to_string()),
    }
}

fn build_report(
    shared: &Shared,
    revision_seen: Option<u64>,
    destroyed: &[Handle],
    outcome: &PassOutcome,
) -> (VolumeReport, u64) {
    let local = lock(&shared.local);
    let upto = shared.created.load(Relaxed);
    let volumes = local
        .values()
        .map(|v| ReportedVolume {
            handle: v.handle.clone(),
            parent: v.parent.clone(),
            state: v.state,
            bytes: None,
        })
        .collect();
    drop(local);
    let report = VolumeReport {
        revision_seen,
        volumes,
        destroyed: destroyed.to_vec(),
        failed: Vec::new(),
        blocked: outcome.blocked.clone(),
        missing: outcome.missing.clone(),
        disk: None,
        refused: outcome.refused.clone(),
    };
    (report, upto)
}
