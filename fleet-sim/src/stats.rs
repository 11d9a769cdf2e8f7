//! What the simulation records: one event per request (time, worker, kind, status,
//! latency), one sample per second of the database and the CPU, the ground truth of the
//! scheduler's volumes, and every invariant violation seen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::Handle;

/// What a request was and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Desired set answered 304.
    Desired304,
    /// Desired set answered 200 with a body.
    DesiredFull,
    /// Desired set failed (status in `code`, 0 for no answer).
    DesiredError,
    /// Report answered 204.
    Report,
    /// Report failed (status in `code`, 0 for no answer).
    ReportError,
    /// A scheduler call answered 2xx.
    Scheduler,
    /// A scheduler call failed.
    SchedulerError,
}

impl Kind {
    /// A request of an agent (not the scheduler's).
    pub fn is_agent(self) -> bool {
        !matches!(self, Kind::Scheduler | Kind::SchedulerError)
    }
    /// A successful desired-set poll.
    pub fn is_poll_ok(self) -> bool {
        matches!(self, Kind::Desired304 | Kind::DesiredFull)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Seconds since the start of the run, at the request's end.
    pub t: f64,
    pub worker: u32,
    pub kind: Kind,
    pub code: u16,
    /// Milliseconds.
    pub ms: f64,
}

/// One sample per second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub t: f64,
    pub rows: i64,
    pub destroying: i64,
    pub pg_connections: i64,
    /// Cumulative CPU seconds of the central replicas' threads, of the simulated fleet's
    /// threads, and of PostgreSQL (when its processes are visible).
    pub cpu_central: f64,
    pub cpu_sim: f64,
    pub cpu_pg: Option<f64>,
    /// Longest last GC pass among the replicas (seconds), 0 before one ran.
    pub gc_last_pass: f64,
}

/// The life of a volume the scheduler created (or seeded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Life {
    /// Still used by a build or a seeded container: must not be destroyed.
    Held,
    /// Released at this many seconds since the start.
    Released(f64),
    /// Destroyed on its worker, this many seconds after its release.
    Gone(f64),
}

pub struct Recorder {
    pub start: Instant,
    events: Mutex<Vec<Event>>,
    samples: Mutex<Vec<Sample>>,
    truth: Mutex<HashMap<Handle, Life>>,
    violations: Mutex<Vec<String>>,
    pub violation_count: AtomicU64,
    pub destroyed_total: AtomicU64,
    /// Named events shown on the picture (restart, outage...).
    marks: Mutex<Vec<(f64, String)>>,
    /// The first requests that got no answer, with what the client said (what a
    /// status code cannot tell: a timeout, a reset, a closed connection).
    unanswered: Mutex<Vec<(f64, Kind, String)>>,
}

const MAX_VIOLATION_MESSAGES: usize = 50;
/// How many unanswered requests are kept with their message.
const MAX_UNANSWERED: usize = 20;

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            events: Mutex::new(Vec::with_capacity(1 << 16)),
            samples: Mutex::new(Vec::new()),
            truth: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            violation_count: AtomicU64::new(0),
            destroyed_total: AtomicU64::new(0),
            marks: Mutex::new(Vec::new()),
            unanswered: Mutex::new(Vec::new()),
        }
    }

    /// Records a request of `kind` that got no answer (status 0), keeping the first
    /// [`MAX_UNANSWERED`] messages.
    pub fn unanswered(&self, worker: u32, kind: Kind, took: Duration, message: String) {
        self.event(worker, kind, 0, took);
        let mut u = lock(&self.unanswered);
        if u.len() < MAX_UNANSWERED {
            u.push((self.now(), kind, message));
        }
    }

    /// The unanswered requests kept, with their messages.
    pub fn unanswered_messages(&self) -> Vec<(f64, Kind, String)> {
        lock(&self.unanswered).clone()
    }

    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn event(&self, worker: u32, kind: Kind, code: u16, took: Duration) {
        let e = Event {
            t: self.now(),
            worker,
            kind,
            code,
            ms: took.as_secs_f64() * 1e3,
        };
        lock(&self.events).push(e);
    }

    pub fn sample(&self, s: Sample) {
        lock(&self.samples).push(s);
    }

    pub fn mark(&self, what: &str) {
        let t = self.now();
        println!("[{t:7.1}s] {what}");
        lock(&self.marks).push((t, what.to_string()));
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }

    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).clone()
    }

    pub fn marks(&self) -> Vec<(f64, String)> {
        lock(&self.marks).clone()
    }

    pub fn violation(&self, what: String) {
        self.violation_count.fetch_add(1, Relaxed);
        let mut v = lock(&self.violations);
        if v.len() < MAX_VIOLATION_MESSAGES {
            eprintln!("INVARIANT VIOLATED: {what}");
            v.push(what);
        }
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// The scheduler holds these volumes (created, or seeded).
    pub fn hold(&self, handles: impl IntoIterator<Item = Handle>) {
        let mut t = lock(&self.truth);
        for h in handles {
            t.insert(h, Life::Held);
        }
    }

    /// The scheduler released these volumes now.
    pub fn release(&self, handles: &[Handle]) {
        let now = self.now();
        let mut t = lock(&self.truth);
        for h in handles {
            if let Some(l @ Life::Held) = t.get_mut(h) {
                *l = Life::Released(now);
            }
        }
    }

    /// A simulated worker destroyed `handle`: a violation unless it was released.
    pub fn destroyed(&self, worker: &str, handle: &Handle) {
        self.destroyed_total.fetch_add(1, Relaxed);
        let now = self.now();
        let verdict = {
            let mut t = lock(&self.truth);
            match t.get_mut(handle) {
                Some(l @ Life::Released(_)) => {
                    if let Life::Released(at) = *l {
                        *l = Life::Gone(now - at);
                    }
                    None
                }
                Some(Life::Held) => Some("a volume still in use (desired) was destroyed"),
                Some(Life::Gone(_)) => Some("a volume was destroyed twice"),
                None => Some("a volume the scheduler never created was destroyed"),
            }
        };
        if let Some(why) = verdict {
            self.violation(format!("{worker}: {handle}: {why}"));
        }
    }

    /// (released and not yet gone, release-to-gone seconds of those gone).
    pub fn release_figures(&self) -> (Vec<Handle>, Vec<f64>) {
        let t = lock(&self.truth);
        let mut pending = Vec::new();
        let mut gone = Vec::new();
        for (h, l) in t.iter() {
            match l {
                Life::Released(_) => pending.push(h.clone()),
                Life::Gone(s) => gone.push(*s),
                Life::Held => {}
            }
        }
        (pending, gone)
    }

    /// Every handle ever released (gone or not).
    pub fn released_handles(&self) -> Vec<String> {
        lock(&self.truth)
            .iter()
            .filter(|(_, l)| !matches!(l, Life::Held))
            .map(|(h, _)| h.as_str().to_string())
            .collect()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `p` quantile (0..=1) of `v`, sorted in place; 0 when empty.
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

/// Latencies (ms) of events of `kind` within `[from, to)`.
pub fn latencies(events: &[Event], kind: Kind, from: f64, to: f64) -> Vec<f64> {
    events
        .iter()
        .filter(|e| e.kind == kind && e.t >= from && e.t < to)
        .map(|e| e.ms)
        .collect()
}

/// Agent requests per second in each whole second of `[from, to)`.
pub fn per_second(events: &[Event], from: f64, to: f64, agent_only: bool) -> Vec<f64> {
    let n = ((to - from).max(0.0)).ceil() as usize;
    let mut buckets = vec![0.0; n.max(1)];
    for e in events {
        if e.t >= from && e.t < to && (!agent_only || e.kind.is_agent()) {
            let i = ((e.t - from) as usize).min(buckets.len() - 1);
            buckets[i] += 1.0;
        }
    }
    buckets
}

/// Counts the events counted by `(kind, code)` within `[from, to)`.
pub fn codes(events: &[Event], from: f64, to: f64) -> Vec<((Kind, u16), u64)> {
    let mut m: HashMap<(Kind, u16), u64> = HashMap::new();
    for e in events.iter().filter(|e| e.t >= from && e.t < to) {
        *m.entry((e.kind, e.code)).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by_key(|((k, c), _)| (format!("{k:?}"), *c));
    v
}

/// What an agent request was, finer than [`Kind`]: the classes a per-second breakdown
/// counts (so a peak can be told apart: cheap refused connects, full answers, reports).
pub const CLASSES: [&str; 8] = [
    "poll_304",
    "poll_full",
    "poll_no_answer",
    "poll_503",
    "poll_other_error",
    "report",
    "report_no_answer",
    "report_error",
];

/// The index in [`CLASSES`] of an agent event; `None` for the scheduler's.
pub fn class(e: &Event) -> Option<usize> {
    Some(match (e.kind, e.code) {
        (Kind::Desired304, _) => 0,
        (Kind::DesiredFull, _) => 1,
        (Kind::DesiredError, 0) => 2,
        (Kind::DesiredError, 503) => 3,
        (Kind::DesiredError, _) => 4,
        (Kind::Report, _) => 5,
        (Kind::ReportError, 0) => 6,
        (Kind::ReportError, _) => 7,
        (Kind::Scheduler | Kind::SchedulerError, _) => return None,
    })
}

/// Agent requests in each whole second of `[from, to)`, counted by [`CLASSES`].
pub fn per_second_by_class(events: &[Event], from: f64, to: f64) -> Vec<[u32; CLASSES.len()]> {
    let n = ((to - from).max(0.0)).ceil() as usize;
    let mut buckets = vec![[0u32; CLASSES.len()]; n.max(1)];
    for e in events {
        if e.t >= from && e.t < to {
            if let Some(c) = class(e) {
                let i = ((e.t - from) as usize).min(buckets.len() - 1);
                buckets[i][c] += 1;
            }
        }
    }
    buckets
}

/// The highest mean of `w` consecutive values (the whole mean when there are fewer).
pub fn peak_of_window(v: &[f64], w: usize) -> f64 {
    let w = w.max(1);
    if v.len() <= w {
        return v.iter().sum::<f64>() / v.len().max(1) as f64;
    }
    v.windows(w)
        .map(|s| s.iter().sum::<f64>() / w as f64)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, kind: Kind, code: u16) -> Event {
        Event {
            t,
            worker: 0,
            kind,
            code,
            ms: 1.0,
        }
    }

    #[test]
    fn breakdown_tells_refused_connects_from_answers_and_reports() {
        let events = [
            ev(0.1, Kind::DesiredError, 0),
            ev(0.2, Kind::DesiredError, 503),
            ev(1.5, Kind::Desired304, 304),
            ev(1.6, Kind::DesiredFull, 200),
            ev(1.7, Kind::Report, 204),
            ev(1.8, Kind::Scheduler, 200),
        ];
        let b = per_second_by_class(&events, 0.0, 2.0);
        assert_eq!(b[0], [0, 0, 1, 1, 0, 0, 0, 0]);
        assert_eq!(b[1], [1, 1, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn peak_of_window_is_the_highest_moving_mean() {
        let v = [1.0, 9.0, 1.0, 1.0, 5.0, 5.0];
        assert_eq!(peak_of_window(&v, 1), 9.0);
        assert_eq!(peak_of_window(&v, 2), 5.0);
        assert_eq!(peak_of_window(&v, 10), 22.0 / 6.0);
    }
}
