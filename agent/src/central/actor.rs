//! The desired-state actor: polls the central API (conditional GET, jitter, backoff),
//! drops stale or misrouted answers, keeps the highest applied revision durable, and
//! hands each new answer to the reconciler.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use protocol::native::DesiredSet;
use rand::Rng;
use tracing::{info, warn};

use super::client::{CentralClient, ClientError, DesiredAnswer};
use crate::config::Dialect;
use crate::durable::revision;
use crate::metrics::Metrics;
use crate::outlet::Outlet;
use crate::planner::Desired;

/// Poll now instead of waiting for the timer (disk pressure, tests).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PollNow;

/// Stop polling (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPolling;

/// Forget the highest applied revision (the operator's `gc reset-revision`).
#[derive(Message)]
#[rtype(result = "Result<(), RevisionFailure>")]
pub struct ResetRevision;

/// The applied revision could not be changed on disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RevisionFailure(pub String);

/// What a poll learned, sent to the [`Outlet`] `daemon.rs` connects (the reconciler).
#[derive(Debug, Clone)]
pub enum Heard {
    /// A new answer, or `desired: None` when the central side does not know this worker
    /// (then nothing is destroyed until it does).
    Answer {
        desired: Option<Desired>,
        revision: Option<u64>,
    },
    /// The answer held is still current (a 304): time for a pass with it.
    Unchanged,
}

/// Failed polls retried at the steady pace (0.9 to 1 interval after the failure) before
/// the wait starts to grow.
pub const STEADY_RETRIES: u32 = 4;

/// The wait before the next poll: the interval with ±10% jitter; after `errors`
/// consecutive failures, see [`poll_delay_at`]. Pure but for the random draw, so a fleet
/// simulator polls exactly as the agent does.
pub fn poll_delay(interval: Duration, max_backoff: Duration, errors: u32) -> Duration {
    poll_delay_at(
        interval,
        max_backoff,
        errors,
        rand::thread_rng().gen_range(0.0..1.0),
    )
}

/// [`poll_delay`] for the draw `r` in `[0, 1)`.
///
/// Without errors: `interval` × (0.9 + 0.2 r). After each of the first
/// [`STEADY_RETRIES`] failures: 0.9 to 1 interval, the steady pace but never later than
/// one interval, so an agent whose central side comes back within that time is back
/// within one interval. A poll fails at the agent's own poll time, so a fleet's failures
/// are already spread as its polls are; keeping each agent on its own pace keeps them
/// spread. (A wider jitter, half to one interval, pulled the retries earlier on average:
/// the fleet polled a third faster during an outage and its retries piled up on the
/// recovery, 2× the steady poll rate in the busiest second after every replica
/// restarted.) After that the ceiling doubles per failure up to `max_backoff` (never
/// below the interval) and the wait is spread over half to all of it, never below 0.9
/// interval: a long outage is not polled at full rate by the whole fleet, and no agent
/// ever polls faster than it does when all is well.
pub fn poll_delay_at(interval: Duration, max_backoff: Duration, errors: u32, r: f64) -> Duration {
    let r = r.clamp(0.0, 1.0);
    if errors == 0 {
        return interval.mul_f64(0.9 + 0.2 * r);
    }
    let steady_floor = interval.mul_f64(0.9);
    if errors <= STEADY_RETRIES {
        return steady_floor + (interval - steady_floor).mul_f64(r);
    }
    let doublings = (errors - STEADY_RETRIES).min(16);
    let ceiling = interval
        .saturating_mul(2u32.pow(doublings))
        .min(max_backoff.max(interval));
    let floor = (ceiling / 2).max(steady_floor);
    floor + (ceiling - floor).mul_f64(r)
}

/// Why a fresh desired set must be ignored: it is for another worker, or its revision
/// is lower than `highest`, the highest applied. `None`: apply it.
pub fn stale(set: &DesiredSet, worker: &str, highest: Option<u64>) -> Option<String> {
    if set.worker != worker {
        return Some(format!(
            "it is for worker {:?}, this is {worker:?}",
            set.worker
        ));
    }
    match highest {
        Some(h) if set.revision < h => Some(format!(
            "revision {} is older than {h}, the highest applied; if the central database was restored from a backup, run `volume-agent gc reset-revision`",
            set.revision
        )),
        _ => None,
    }
}

pub struct DesiredStateActor {
    client: CentralClient,
    dialect: Dialect,
    interval: Duration,
    max_backoff: Duration,
    state_dir: PathBuf,
    heard: Outlet<Heard>,
    metrics: Arc<Metrics>,
    etag: Option<String>,
    highest: Option<u64>,
    errors: u32,
    polling: bool,
    /// A poll was asked for while one was in flight: run another right after it.
    again: bool,
    stopped: bool,
    timer: Option<SpawnHandle>,
}

impl DesiredStateActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: CentralClient,
        dialect: Dialect,
        interval: Duration,
        max_backoff: Duration,
        state_dir: PathBuf,
        highest: Option<u64>,
        heard: Outlet<Heard>,
        metrics: Arc<Metrics>,
    ) -> Self {
        if let Some(r) = highest {
            metrics.desired_revision.set(r);
        }
        DesiredStateActor {
            client,
            dialect,
            interval,
            max_backoff,
            state_dir,
            heard,
            metrics,
            etag: None,
            highest,
            errors: 0,
            polling: false,
            again: false,
            stopped: false,
            timer: None,
        }
    }

    fn next_delay(&self) -> Duration {
        poll_delay(self.interval, self.max_backoff, self.errors)
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        if let Some(t) = self.timer.take() {
            ctx.cancel_future(t);
        }
        let delay = self.next_delay();
        self.timer = Some(ctx.run_later(delay, |act, ctx| act.poll(ctx)));
    }

    /// After a poll: another at once if one was asked for meanwhile, else on the timer.
    fn next(&mut self, ctx: &mut Context<Self>) {
        if std::mem::take(&mut self.again) && self.errors == 0 {
            self.poll(ctx);
        } else {
            self.schedule(ctx);
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        if self.polling {
            self.again = true;
            return;
        }
        self.polling = true;
        let client = self.client.clone();
        match self.dialect {
            Dialect::Native => {
                let etag = self.etag.clone();
                let fut = async move { client.get_desired(etag.as_deref()).await };
                ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
                    act.polling = false;
                    act.metrics.central_contacted.store(true, Relaxed);
                    act.on_native(res, ctx);
                    act.next(ctx);
                }));
            }
            Dialect::Concourse => {
                let fut = async move { client.get_destroying().await };
                ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
                    act.polling = false;
                    act.metrics.central_contacted.store(true, Relaxed);
                    match res {
                        Ok(destroying) => {
                            act.ok("destroying", "ok");
                            act.heard.send(Heard::Answer {
                                desired: Some(Desired::Concourse { destroying }),
                                revision: None,
                            });
                        }
                        Err(e) => act.failed("destroying", &e),
                    }
                    act.next(ctx);
                }));
            }
        }
    }

    fn ok(&mut self, endpoint: &str, outcome: &str) {
        self.errors = 0;
        self.metrics.central_request(endpoint, outcome);
        self.metrics.mark_synced_now();
    }

    fn failed(&mut self, endpoint: &str, e: &ClientError) {
        self.errors = self.errors.saturating_add(1);
        self.metrics.central_request(endpoint, e.kind());
        warn!(error = %e, consecutive = self.errors, "polling the central API failed; nothing is destroyed by absence until it answers");
    }

    fn on_native(&mut self, res: Result<DesiredAnswer, ClientError>, ctx: &mut Context<Self>) {
        match res {
            Err(e) => self.failed("desired", &e),
            Ok(DesiredAnswer::NotModified) => {
                self.ok("desired", "not_modified");
                self.heard.send(Heard::Unchanged);
            }
            Ok(DesiredAnswer::UnknownWorker) => {
                self.ok("desired", "unknown_worker");
                warn!(
                    worker = self.client.worker(),
                    "the central API does not know this worker; destroying nothing"
                );
                self.etag = None;
                self.heard.send(Heard::Answer {
                    desired: None,
                    revision: None,
                });
            }
            Ok(DesiredAnswer::Fresh { set, etag }) => {
                if let Some(why) = self.stale(&set) {
                    self.metrics.stale_answers_total.inc();
                    self.metrics.central_request("desired", "stale");
                    warn!(revision = set.revision, worker = %set.worker, "ignoring desired set: {why}");
                    return;
                }
                self.ok("desired", "ok");
                self.apply(set, etag, ctx);
            }
        }
    }

    fn stale(&self, set: &DesiredSet) -> Option<String> {
        stale(set, self.client.worker(), self.highest)
    }

    fn apply(&mut self, set: DesiredSet, etag: Option<String>, ctx: &mut Context<Self>) {
        let revision = set.revision;
        let newer = self.highest.is_none_or(|h| revision > h);
        let named = set.destroying.clone();
        let update = Heard::Answer {
            desired: Some(Desired::Native {
                keep: set.volumes.into_iter().map(|v| v.handle).collect(),
                destroying: set.destroying,
                as_of: set.as_of,
            }),
            revision: Some(revision),
        };
        if !newer {
            self.etag = etag;
            self.heard.send(update);
            return;
        }
        info!(revision, "new desired set");
        // The revision is made durable before anything is destroyed by absence on its
        // word; only then is it the highest applied, and its ETag the one we send.
        let dir = self.state_dir.clone();
        let fut = async move {
            tokio::task::spawn_blocking(move || revision::store(&dir, revision)).await
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            let error = match res {
                Ok(Ok(())) => {
                    act.highest = Some(revision);
                    act.etag = etag;
                    act.metrics.desired_revision.set(revision);
                    act.heard.send(update);
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            // Typically ENOSPC. Destroying what the central side names can only free
            // space, so that still happens; nothing goes by absence, and the whole answer
            // is asked for again on the next poll.
            warn!(revision, %error, "cannot record the applied revision; acting only on the volumes it names destroying");
            act.heard.send(Heard::Answer {
                desired: Some(Desired::Concourse { destroying: named }),
                revision: None,
            });
        }));
    }
}

impl Actor for DesiredStateActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.poll(ctx);
    }
}

impl Handler<PollNow> for DesiredStateActor {
    type Result = ();
    fn handle(&mut self, _: PollNow, ctx: &mut Context<Self>) {
        self.poll(ctx);
    }
}

impl Handler<StopPolling> for DesiredStateActor {
    type Result = ();
    fn handle(&mut self, _: StopPolling, ctx: &mut Context<Self>) {
        self.stopped = true;
        if let Some(t) = self.timer.take() {
            ctx.cancel_future(t);
        }
    }
}

impl Handler<ResetRevision> for DesiredStateActor {
    type Result = ResponseActFuture<Self, Result<(), RevisionFailure>>;
    fn handle(&mut self, _: ResetRevision, _: &mut Context<Self>) -> Self::Result {
        let dir = self.state_dir.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || revision::clear(&dir)).await }
                .into_actor(self)
                .map(|res, act, _| match res {
                    Ok(Ok(())) => {
                        info!(previous = ?act.highest, "forgot the highest applied revision");
                        act.highest = None;
                        act.etag = None;
                        act.metrics.desired_revision.set(0);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(RevisionFailure(e.to_string())),
                    Err(e) => Err(RevisionFailure(e.to_string())),
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(30);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn polls_every_interval_with_ten_percent_jitter_when_all_is_well() {
        assert_eq!(poll_delay_at(I, MAX, 0, 0.0), Duration::from_secs(27));
        assert_eq!(poll_delay_at(I, MAX, 0, 1.0), Duration::from_secs(33));
    }

    #[test]
    fn first_failures_retry_at_the_steady_pace_and_never_later_than_one_interval() {
        for errors in 1..=STEADY_RETRIES {
            assert_eq!(poll_delay_at(I, MAX, errors, 0.0), Duration::from_secs(27));
            assert_eq!(poll_delay_at(I, MAX, errors, 1.0), I);
        }
    }

    #[test]
    fn later_failures_double_the_ceiling_up_to_max_backoff() {
        let at = |errors| poll_delay_at(I, MAX, errors, 1.0);
        assert_eq!(at(STEADY_RETRIES + 1), Duration::from_secs(60));
        assert_eq!(at(STEADY_RETRIES + 2), Duration::from_secs(120));
        assert_eq!(at(STEADY_RETRIES + 3), Duration::from_secs(240));
        assert_eq!(at(STEADY_RETRIES + 4), MAX);
        assert_eq!(at(u32::MAX), MAX);
        assert_eq!(poll_delay_at(I, MAX, u32::MAX, 0.0), MAX / 2);
    }

    #[test]
    fn max_backoff_below_the_interval_never_polls_faster_than_the_steady_pace() {
        let small = Duration::from_secs(5);
        assert_eq!(poll_delay_at(I, small, 10, 1.0), I);
        assert_eq!(poll_delay_at(I, small, 10, 0.0), Duration::from_secs(27));
    }

    #[test]
    fn a_fleet_whose_central_side_restarts_comes_back_without_a_herd() {
        use rand::{Rng as _, SeedableRng as _};
        // 3,000 agents polling every 30 s at their own phases; the central side answers
        // nothing for 20 s, then everything. Each agent follows `poll_delay_at`.
        const N: usize = 3000;
        let (down, up) = (100.0, 120.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut polls = Vec::new();
        let mut back_after: f64 = 0.0;
        for i in 0..N {
            let mut t = 30.0 * i as f64 / N as f64;
            let mut errors = 0u32;
            let mut first_ok = None;
            while t < up + 90.0 {
                polls.push(t);
                if (down..up).contains(&t) {
                    errors += 1;
                } else {
                    errors = 0;
                    if t >= up && first_ok.is_none() {
                        first_ok = Some(t - up);
                    }
                }
                t += poll_delay_at(I, MAX, errors, rng.gen_range(0.0..1.0)).as_secs_f64();
            }
            back_after = back_after.max(first_ok.unwrap_or(f64::INFINITY));
        }
        let per_second = |from: f64| {
            let mut b = vec![0u32; 90];
            for &p in &polls {
                if p >= from && p < from + 90.0 {
                    b[(p - from) as usize] += 1;
                }
            }
            b
        };
        let busiest_5s = |b: &[u32]| {
            b.windows(5)
                .map(|w| f64::from(w.iter().sum::<u32>()) / 5.0)
                .fold(0.0, f64::max)
        };
        let steady = N as f64 / 30.0;
        let after = busiest_5s(&per_second(up));
        assert!(
            after <= 1.5 * steady,
            "busiest 5 s after the restart: {after}/s, steady {steady}/s"
        );
        assert!(
            back_after <= 30.0,
            "the last agent was back after {back_after} s"
        );
        // During the outage the fleet polls no faster than when all is well.
        let during = polls.iter().filter(|&&p| (down..up).contains(&p)).count() as f64 / 20.0;
        assert!(
            during <= 1.1 * steady,
            "{during}/s while down, steady {steady}/s"
        );
    }
}
