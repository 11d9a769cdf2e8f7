//! The scenarios: set up, run the fleet through the scenario's events, drain, and
//! compute the figures.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt as _;
use reqwest::Method;
use tokio::sync::watch;
use volume_agent::central::CentralClient;
use volume_central::auth::{self, Subject};

use crate::fleet::{worker_name, CentralSettings, Fleet};
use crate::plot::{self, Series};
use crate::real::{Real, RealAgent, RealSettings};
use crate::scheduler::{self, Api, Churn, Counts};
use crate::stats::{self, quantile, Kind, Recorder, Sample};
use crate::worker::{self, Timing};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The fleet polling and reporting, the scheduler churning: figures of a normal day.
    Steady,
    /// One replica stopped and started again, then every replica.
    ReplicaRestart,
    /// PostgreSQL stopped for `--down`, then started again.
    PgOutage,
    /// `--release-volumes` volumes released at once (a pipeline deleted).
    MassRelease,
    /// `--workers` × `--volumes-per-worker` rows (1,000,000 by default), a tenth of them
    /// garbage: the GC pass and the desired-set answers at that size.
    MillionRows,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Steady,
        Scenario::ReplicaRestart,
        Scenario::PgOutage,
        Scenario::MassRelease,
        Scenario::MillionRows,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::ReplicaRestart => "replica-restart",
            Scenario::PgOutage => "pg-outage",
            Scenario::MassRelease => "mass-release",
            Scenario::MillionRows => "million-rows",
        }
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|x| x.name()).collect();
                format!("unknown scenario {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Everything a run needs; [`Options::new`] gives the issue's full sizes.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub workers: usize,
    pub volumes_per_worker: usize,
    /// The measured steady window (the scenario's events come after it).
    pub duration: Duration,
    pub poll_interval: Duration,
    pub report_interval: Duration,
    pub max_backoff: Duration,
    pub gc_interval: Duration,
    /// Scheduler churn, volumes created (and released) per second.
    pub churn: f64,
    pub build_lifetime: Duration,
    /// How long a replica, every replica, or PostgreSQL stays down.
    pub down: Duration,
    /// Volumes released at once (mass-release).
    pub release_volumes: usize,
    pub replicas: usize,
    /// Per replica.
    pub pool_size: usize,
    pub http_workers: usize,
    pub database_url: Option<String>,
    /// `shared_buffers` of the throwaway PostgreSQL cluster (the README's sizing: the
    /// volumes table and its indexes, about 400 MB per 1,000,000 rows).
    pub pg_shared_buffers: String,
    /// Where the PNG and CSV go.
    pub out: Option<PathBuf>,
    /// Real `volume-agent` processes beside the simulated workers (0: none).
    pub real_agents: usize,
    /// The `volume-agent` binary for them; `None`: the one beside this executable.
    pub agent_binary: Option<PathBuf>,
}

impl Options {
    pub fn new(scenario: Scenario) -> Self {
        let (workers, per_worker) = match scenario {
            Scenario::MillionRows => (10_000, 100),
            _ => (10_000, 50),
        };
        Options {
            scenario,
            workers,
            volumes_per_worker: per_worker,
            duration: Duration::from_secs(120),
            poll_interval: Duration::from_secs(30),
            report_interval: Duration::from_secs(30),
            max_backoff: Duration::from_secs(300),
            gc_interval: Duration::from_secs(30),
            churn: 100.0,
            build_lifetime: Duration::from_secs(60),
            down: Duration::from_secs(60),
            release_volumes: 100_000,
            replicas: 2,
            pool_size: 16,
            http_workers: 1,
            database_url: None,
            pg_shared_buffers: "1GB".into(),
            out: None,
            real_agents: 0,
            agent_binary: None,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub violation_count: u64,
    /// (what, value) as printed.
    pub figures: Vec<(String, String)>,
    /// Volumes released during the run (builds, garbage, mass release).
    pub released: usize,
    /// Released volumes still on a worker, and still a row, at the end.
    pub released_left_on_workers: usize,
    pub released_rows_left: i64,
    /// Volumes the simulated workers destroyed.
    pub destroyed: u64,
    /// Builds the scheduler created.
    pub builds: u64,
    /// Statuses agents got while PostgreSQL was down (0: no answer), with counts.
    pub outage_statuses: Vec<(u16, u64)>,
    /// Workers without a successful poll by the end of the scenario's event.
    pub workers_not_back: usize,
    pub png: Option<PathBuf>,
    /// Builds made on the real agents, and their volume directories seen gone from disk.
    pub real_builds: u64,
    pub real_gone: u64,
}

/// Runs one scenario on runtimes of its own: `central-rt` (the replicas' GC loops, with
/// actix's own threads serving HTTP) and `sim` (workers, scheduler, sampling).
pub fn run(opts: Options) -> Result<Outcome> {
    let central = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("central-rt")
        .enable_all()
        .build()?;
    let sim = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim")
        .enable_all()
        .build()?;
    let out = sim.block_on(run_async(opts, central.handle().clone()));
    sim.shutdown_timeout(Duration::from_secs(2));
    central.shutdown_timeout(Duration::from_secs(2));
    out
}

struct Figures(Vec<(String, String)>);

impl Figures {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let (what, value) = (what.into(), value.into());
        println!("  {what:<58} {value}");
        self.0.push((what, value));
    }
}

/// Waits `d`, taking a sample every second.
async fn idle(fleet: &Fleet, rec: &Recorder, d: Duration, pg_pid: &mut Option<i64>) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        sample(fleet, rec, pg_pid).await;
        let left = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

/// How many samples (seconds) apart the rows of `volumes` are counted.
const COUNT_EVERY: usize = 5;

async fn sample(fleet: &Fleet, rec: &Recorder, pg_pid: &mut Option<i64>) {
    // Counting rows scans `volumes` twice (a parallel scan at 500,000 rows): done every
    // second, that was PostgreSQL CPU the fleet's requests waited behind and that the
    // figures counted as the central side's. Connections are counted every second.
    let samples = rec.samples();
    let last = samples.last().copied().unwrap_or_default();
    let limit = Duration::from_secs(2);
    let counts = if samples.len() % COUNT_EVERY == 0 {
        tokio::time::timeout(limit, fleet.counts())
            .await
            .ok()
            .flatten()
    } else {
        tokio::time::timeout(limit, fleet.connections())
            .await
            .ok()
            .flatten()
            .map(|conns| (last.rows, last.destroying, conns))
    };
    let (rows, destroying, conns) = counts.unwrap_or((last.rows, last.destroying, -1));
    let (cpu_central, cpu_sim) = crate::cpu::threads();
    if counts.is_some() {
        if let Some(dir) = fleet.data_directory().await {
            *pg_pid = crate::cpu::postmaster_pid(&dir).or(*pg_pid);
        }
    }
    rec.sample(Sample {
        t: rec.now(),
        rows,
        destroying,
        pg_connections: conns,
        cpu_central,
        cpu_sim,
        cpu_pg: pg_pid.and_then(crate::cpu::postgres),
        gc_last_pass: fleet.gc_last_pass(),
    });
}

fn fmt_ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// Figures of the window `[a, b)`.
fn window_figures(f: &mut Figures, rec: &Recorder, a: f64, b: f64, workers: usize) {
    let ev = rec.events();
    let span = (b - a).max(1e-9);
    let agent = ev
        .iter()
        .filter(|e| e.t >= a && e.t < b && e.kind.is_agent())
        .count();
    f.add(
        format!("window {a:.0}–{b:.0} s: agent requests/s"),
        format!("{:.1}", agent as f64 / span),
    );
    for (kind, what) in [
        (Kind::Desired304, "desired set 304"),
        (Kind::DesiredFull, "desired set 200 (full)"),
        (Kind::Report, "report (and resource types) 204"),
    ] {
        let mut l = stats::latencies(&ev, kind, a, b);
        let n = l.len();
        let p50 = quantile(&mut l, 0.5);
        let p99 = quantile(&mut l, 0.99);
        f.add(
            format!("{what}: p50 / p99 (n)"),
            format!("{} / {} ({n})", fmt_ms(p50), fmt_ms(p99)),
        );
    }
    let errors: Vec<String> = stats::codes(&ev, a, b)
        .into_iter()
        .filter(|((k, _), _)| {
            matches!(
                k,
                Kind::DesiredError | Kind::ReportError | Kind::SchedulerError
            )
        })
        .map(|((k, c), n)| format!("{k:?}/{c}×{n}"))
        .collect();
    f.add(
        "errors (kind/status×count; status 0: no answer)",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        },
    );
    for (t, kind, message) in rec.unanswered_messages() {
        if t >= a && t < b {
            println!("    no answer at {t:.1} s ({kind:?}): {message}");
        }
    }
    let sched = ev
        .iter()
        .filter(|e| e.t >= a && e.t < b && e.kind == Kind::Scheduler)
        .count();
    f.add(
        "scheduler requests/s",
        format!("{:.1}", sched as f64 / span),
    );
    let all = rec.samples();
    let samples: Vec<Sample> = all
        .iter()
        .copied()
        .filter(|s| s.t >= a && s.t < b)
        .collect();
    if let (Some(s0), Some(s1)) = (samples.first(), samples.last()) {
        let dt = (s1.t - s0.t).max(1e-9);
        let central = (s1.cpu_central - s0.cpu_central) / dt;
        let sim = (s1.cpu_sim - s0.cpu_sim) / dt;
        f.add(
            "central CPU (cores, both replicas' threads)",
            format!("{central:.3}"),
        );
        f.add(
            "central CPU per 1,000 workers (cores)",
            format!("{:.3}", central / (workers as f64 / 1000.0).max(1e-9)),
        );
        f.add(
            "simulator CPU (cores: workers, scheduler, sampling)",
            format!("{sim:.3}"),
        );
        if let (Some(p0), Some(p1)) = (s0.cpu_pg, s1.cpu_pg) {
            f.add(
                "PostgreSQL CPU (cores)",
                format!("{:.3}", (p1 - p0).max(0.0) / dt),
            );
        }
        let conns = samples.iter().map(|s| s.pg_connections).max().unwrap_or(0);
        f.add("PostgreSQL connections in use (max)", conns.to_string());
        f.add("rows in volumes (end of window)", s1.rows.to_string());
        // The gauge holds the last pass's time: only a value that changed inside the window
        // is a pass that ended in it (not one from before, say the fleet's first contact).
        let gc = all
            .windows(2)
            .filter(|w| w[1].t >= a && w[1].t < b && w[1].gc_last_pass != w[0].gc_last_pass)
            .map(|w| w[1].gc_last_pass)
            .fold(0.0, f64::max);
        f.add(
            "GC pass under load (longest ended in the window)",
            format!("{gc:.3} s"),
        );
    }
}

/// Per worker, the time of its first event matching `pred` at or after `from`; the
/// longest of those (seconds after `from`) and how many workers had none.
fn back_after(
    rec: &Recorder,
    from: f64,
    workers: usize,
    pred: impl Fn(Kind) -> bool,
) -> (f64, usize) {
    let mut first = vec![f64::NAN; workers];
    for e in rec.events() {
        if e.t >= from && pred(e.kind) {
            if let Some(slot) = first.get_mut(e.worker as usize) {
                if slot.is_nan() {
                    *slot = e.t - from;
                }
            }
        }
    }
    let missing = first.iter().filter(|x| x.is_nan()).count();
    let longest = first
        .iter()
        .filter(|x| !x.is_nan())
        .fold(0.0, |a: f64, &b| a.max(b));
    (longest, missing)
}

/// Waits (sampling) until every worker had an event matching `pred` since `from`, or
/// `limit` passed.
async fn wait_back(
    fleet: &Fleet,
    rec: &Recorder,
    from: f64,
    workers: usize,
    limit: Duration,
    pg_pid: &mut Option<i64>,
    pred: impl Fn(Kind) -> bool + Copy,
) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        idle(fleet, rec, Duration::from_secs(1), pg_pid).await;
        if back_after(rec, from, workers, pred).1 == 0 {
            return;
        }
    }
}

fn peak_rate(rec: &Recorder, a: f64, b: f64) -> f64 {
    stats::per_second(&rec.events(), a, b, true)
        .into_iter()
        .fold(0.0, f64::max)
}

/// What the peak after an event consists of, against the steady window `[a, b)`: the
/// peak second and the busiest 5 s after `from` (until `to`), each beside the steady
/// window's own, and the classes of requests in the peak second and in the first poll
/// interval after `from` beside the steady window's mean per interval.
fn describe_peak(
    f: &mut Figures,
    rec: &Recorder,
    steady: (f64, f64),
    from: f64,
    to: f64,
    interval: f64,
    what: &str,
) {
    let ev = rec.events();
    let (a, b) = steady;
    let rate_steady = stats::per_second(&ev, a, b, true);
    let rate_after = stats::per_second(&ev, from, to, true);
    let mean = rate_steady.iter().sum::<f64>() / rate_steady.len().max(1) as f64;
    for w in [1usize, 5] {
        let s = stats::peak_of_window(&rate_steady, w);
        let p = stats::peak_of_window(&rate_after, w);
        f.add(
            format!("{what}: busiest {w} s, agent requests/s"),
            format!(
                "{p:.0} = {:.2}× the steady mean {mean:.1}/s (the steady window's own busiest {w} s: {s:.0} = {:.2}×)",
                p / mean.max(1e-9),
                s / mean.max(1e-9)
            ),
        );
    }
    let by = stats::per_second_by_class(&ev, from, to);
    let peak_i = rate_after
        .iter()
        .enumerate()
        .fold((0, 0.0), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
        .0;
    let show = |counts: &[f64]| -> String {
        stats::CLASSES
            .iter()
            .zip(counts)
            .filter(|(_, &n)| n > 0.0)
            .map(|(c, n)| format!("{c} {n:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(peak) = by.get(peak_i) {
        let counts: Vec<f64> = peak.iter().map(|&n| f64::from(n)).collect();
        f.add(
            format!(
                "{what}: the peak second ({:.0} s after) held",
                peak_i as f64
            ),
            show(&counts),
        );
    }
    let sum = |v: &[[u32; stats::CLASSES.len()]], scale: f64| -> Vec<f64> {
        let mut out = vec![0.0; stats::CLASSES.len()];
        for row in v {
            for (o, &n) in out.iter_mut().zip(row) {
                *o += f64::from(n) * scale;
            }
        }
        out
    };
    let n = (interval.ceil() as usize).min(by.len());
    f.add(
        format!("{what}: the first poll interval after held"),
        show(&sum(&by[..n], 1.0)),
    );
    let st = stats::per_second_by_class(&ev, a, b);
    f.add(
        "the steady window held, per poll interval",
        show(&sum(&st, interval / (b - a).max(1e-9))),
    );
}

fn mean_rate(rec: &Recorder, a: f64, b: f64) -> f64 {
    let v = stats::per_second(&rec.events(), a, b, true);
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

async fn run_async(opts: Options, central: tokio::runtime::Handle) -> Result<Outcome> {
    let name = opts.scenario.name();
    println!(
        "fleet-sim {name}: {} workers × {} volumes, poll {:?}, GC {:?}, churn {}/s, {} replicas",
        opts.workers,
        opts.volumes_per_worker,
        opts.poll_interval,
        opts.gc_interval,
        opts.churn,
        opts.replicas
    );
    if opts.scenario == Scenario::PgOutage && opts.database_url.is_some() {
        return Err(anyhow!("pg-outage stops PostgreSQL: run it on the simulator's own cluster (without --database-url)"));
    }
    let settings = CentralSettings {
        replicas: opts.replicas,
        gc_interval: opts.gc_interval,
        pool_size: opts.pool_size,
        http_workers: opts.http_workers,
        database_url: opts.database_url.clone(),
        shared_buffers: opts.pg_shared_buffers.clone(),
    };
    let rec = Arc::new(Recorder::new());
    let mut f = Figures(Vec::new());
    let mut fleet = Fleet::prepare(&settings, opts.workers, central).await?;
    let garbage_every = (opts.scenario == Scenario::MillionRows).then_some(10);
    let (held, garbage) = fleet
        .seed("s", opts.volumes_per_worker, garbage_every)
        .await?;
    rec.hold(held);
    rec.hold(garbage.iter().cloned());
    let mut release_set = Vec::new();
    if opts.scenario == Scenario::MassRelease {
        let per = opts.release_volumes.div_ceil(opts.workers.max(1));
        let (h, _) = fleet.seed("r", per, None).await?;
        rec.hold(h.iter().cloned());
        release_set = h;
    }
    let rows = fleet.counts().await.map_or(0, |c| c.0);
    // The GC pass on its own at this row count, before the fleet starts.
    let grace = Duration::from_secs(300);
    for which in ["first", "second"] {
        let t = Instant::now();
        let outcome = volume_central::gc::run_pass(&fleet.db, grace)
            .await
            .map_err(|e| anyhow!("GC pass: {e}"))?;
        f.add(
            format!("GC pass over {rows} rows, fleet idle ({which})"),
            format!("{:.3} s ({outcome:?})", t.elapsed().as_secs_f64()),
        );
    }
    for i in 0..fleet.replicas.len() {
        fleet.start_replica(i).await?;
    }
    let urls = fleet.replica_urls();
    let mut pg_pid = None;

    // The seeded garbage (marked by the passes above) counts as released from here,
    // before any worker can poll.
    rec.release(&garbage);

    // The fleet.
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = CentralClient::http_builder(Duration::from_secs(5), Duration::from_secs(30))
        .build()
        .map_err(|e| anyhow!("HTTP client: {e}"))?;
    let timing = Timing {
        poll_interval: opts.poll_interval,
        report_interval: opts.report_interval,
        max_backoff: opts.max_backoff,
    };
    let mut tasks = Vec::new();
    for (i, w) in fleet.workers.iter().enumerate() {
        let client = CentralClient::with_http(
            http.clone(),
            &urls[i % urls.len()],
            &w.name,
            Some(fleet.worker_tokens[i].clone()),
            64 << 20,
        );
        tasks.push(tokio::spawn(worker::run(
            w.clone(),
            client,
            timing.clone(),
            rec.clone(),
            stop_rx.clone(),
        )));
    }
    let (sched_tx, sched_rx) = watch::channel(false);
    let real_stop = sched_rx.clone();
    let api = Api::new(
        urls.clone(),
        Some(fleet.scheduler_token.clone()),
        rec.clone(),
    );
    let counts = Arc::new(Counts::default());
    let sched = tokio::spawn(scheduler::drive(
        api.clone(),
        fleet.workers.clone(),
        Churn {
            volumes_per_second: opts.churn,
            build_lifetime: opts.build_lifetime,
            confirm_timeout: opts.poll_interval * 4,
        },
        counts.clone(),
        sched_rx,
    ));
    // Real agents, each its own worker with its own credential, and their driver.
    let real = Arc::new(Real::default());
    let mut real_agents = Vec::new();
    let mut real_tasks = Vec::new();
    if opts.real_agents > 0 {
        let binary = match opts.agent_binary.clone().or_else(crate::real::default_binary) {
            Some(b) => b,
            None => {
                return Err(anyhow!(
                    "--real-agents needs the volume-agent binary: build it (cargo build --release -p volume-agent) or pass --agent-binary"
                ))
            }
        };
        let settings = RealSettings {
            binary,
            poll_interval: opts.poll_interval,
            report_interval: opts.report_interval,
            max_backoff: opts.max_backoff,
        };
        let mut drivers = Vec::new();
        for i in 0..opts.real_agents {
            let name = format!("real-{i}");
            let token = auth::issue(&fleet.db, &Subject::Worker(name.clone()))
                .await
                .map_err(|e| anyhow!("issue {name}'s credential: {e}"))?
                .token;
            let agent = RealAgent::start(&settings, &name, &urls[i % urls.len()], &token).await?;
            drivers.push((name, agent.api.clone()));
            real_agents.push(agent);
        }
        println!("started {} real volume-agent processes", real_agents.len());
        real_tasks.push(tokio::spawn(crate::real::drive(
            api.clone(),
            fleet.db.clone(),
            drivers,
            real.clone(),
            opts.build_lifetime,
            opts.poll_interval * 4 + opts.report_interval,
            real_stop.clone(),
        )));
        let (real, rec, mut stop) = (real.clone(), rec.clone(), stop_rx.clone());
        real_tasks.push(tokio::spawn(async move {
            loop {
                real.watch(&rec);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    real.watch(&rec);
                    return;
                }
            }
        }));
    }
    rec.mark("fleet started");

    // Warm up: every worker's first poll (spread over one interval) and a little more.
    let warm = opts.poll_interval.mul_f64(1.2) + Duration::from_secs(1);
    idle(&fleet, &rec, warm, &mut pg_pid).await;
    // A large fleet's first contact (resource types, a full answer, a full report from
    // every worker) is a storm of its own: the steady window starts once it is over
    // (5 s without a 503 or an agent request over 1 s), or after 10 minutes.
    let settle_end = Instant::now() + Duration::from_secs(600);
    while Instant::now() < settle_end {
        let now = rec.now();
        let calm = rec
            .events()
            .iter()
            .rev()
            .take_while(|e| e.t >= now - 5.0)
            .all(|e| !e.kind.is_agent() || (e.ms < 1000.0 && e.code != 503 && e.code != 0));
        if calm {
            break;
        }
        idle(&fleet, &rec, Duration::from_secs(5), &mut pg_pid).await;
    }
    rec.mark("steady window starts");
    let a = rec.now();
    idle(&fleet, &rec, opts.duration, &mut pg_pid).await;
    let b = rec.now();
    println!("{name}: steady window");
    window_figures(&mut f, &rec, a, b, opts.workers);
    let steady_rate = mean_rate(&rec, a, b);
    let mut out = Outcome::default();

    match opts.scenario {
        Scenario::Steady | Scenario::MillionRows => {}
        Scenario::ReplicaRestart => {
            fleet.stop_replica(0).await?;
            rec.mark("replica 0 stopped");
            idle(&fleet, &rec, opts.down, &mut pg_pid).await;
            fleet.start_replica(0).await?;
            let up = rec.now();
            rec.mark("replica 0 started");
            let limit = opts.down * 4 + opts.poll_interval * 4;
            let interval = opts.poll_interval.as_secs_f64();
            // Back = polled successfully again. With the scheduler's churn most polls get
            // a full answer in steady state too (the worker's set changed), so a 304 is
            // not what every worker gets within any fixed time; both are printed.
            let ok = Kind::is_poll_ok;
            let is304 = |k| k == Kind::Desired304;
            wait_back(&fleet, &rec, up, opts.workers, limit, &mut pg_pid, ok).await;
            let (t_any, missing_any) = back_after(&rec, up, opts.workers, ok);
            let (t, missing) = back_after(&rec, up, opts.workers, is304);
            f.add(
                "one replica restarted: every worker polled successfully after",
                format!("{t_any:.1} s ({missing_any} workers not yet)"),
            );
            f.add(
                "one replica restarted: every worker had a 304 after",
                format!("{t:.1} s ({missing} workers not yet, their sets changed)"),
            );
            for i in 0..fleet.replicas.len() {
                fleet.stop_replica(i).await?;
            }
            rec.mark("every replica stopped");
            idle(&fleet, &rec, opts.down, &mut pg_pid).await;
            for i in 0..fleet.replicas.len() {
                fleet.start_replica(i).await?;
            }
            let up = rec.now();
            rec.mark("every replica started");
            wait_back(&fleet, &rec, up, opts.workers, limit, &mut pg_pid, ok).await;
            // Two poll intervals after the restart: the target's span.
            let two = up + 2.0 * interval;
            idle(
                &fleet,
                &rec,
                Duration::from_secs_f64((two - rec.now()).max(0.0)),
                &mut pg_pid,
            )
            .await;
            let settle = (rec.now() - up).max(2.0 * interval);
            let (t, missing) = back_after(&rec, up, opts.workers, is304);
            let (t_any, missing_any) = back_after(&rec, up, opts.workers, ok);
            let peak = peak_rate(&rec, up, up + settle);
            f.add(
                "every replica restarted: every worker polled successfully after",
                format!(
                    "{t_any:.1} s = {:.2} poll intervals ({missing_any} workers not yet)",
                    t_any / interval
                ),
            );
            f.add(
                "every replica restarted: every worker had a 304 after",
                format!(
                    "{t:.1} s = {:.2} poll intervals ({missing} workers not yet, their sets changed)",
                    t / interval
                ),
            );
            f.add(
                "every replica restarted: peak agent requests/s (1 s buckets)",
                format!(
                    "{peak:.0} = {:.2}× the steady mean of {steady_rate:.1}/s",
                    peak / steady_rate.max(1e-9)
                ),
            );
            describe_peak(
                &mut f,
                &rec,
                (a, b),
                up,
                up + settle,
                interval,
                "every replica restarted",
            );
            out.workers_not_back = missing_any;
        }
        Scenario::PgOutage => {
            let destroyed_before = rec.destroyed_total.load(Relaxed);
            fleet.stop_postgres().await?;
            let down = rec.now();
            rec.mark("PostgreSQL stopped");
            idle(&fleet, &rec, opts.down, &mut pg_pid).await;
            let destroyed_during = rec.destroyed_total.load(Relaxed) - destroyed_before;
            fleet.start_postgres().await?;
            let up = rec.now();
            rec.mark("PostgreSQL started");
            let ev = rec.events();
            let mut statuses: std::collections::BTreeMap<u16, u64> = Default::default();
            for e in ev
                .iter()
                .filter(|e| e.t >= down && e.t < up && e.kind.is_agent())
            {
                *statuses.entry(e.code).or_default() += 1;
            }
            f.add(
                "while PostgreSQL was down: agents got (status×count)",
                statuses
                    .iter()
                    .map(|(c, n)| format!("{c}×{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            f.add(
                "while PostgreSQL was down: volumes destroyed by workers",
                destroyed_during.to_string(),
            );
            out.outage_statuses = statuses.into_iter().collect();
            let limit = opts.down * 4 + opts.poll_interval * 4;
            let ok = Kind::is_poll_ok;
            wait_back(&fleet, &rec, up, opts.workers, limit, &mut pg_pid, ok).await;
            let (t, missing) = back_after(&rec, up, opts.workers, Kind::is_poll_ok);
            f.add(
                "after PostgreSQL returned: every worker polled successfully after",
                format!(
                    "{t:.1} s = {:.2} poll intervals ({missing} workers not yet)",
                    t / opts.poll_interval.as_secs_f64()
                ),
            );
            let span = (down, up);
            let rate_down = stats::per_second(&ev, span.0, span.1, true);
            f.add(
                "while PostgreSQL was down: agent requests/s",
                format!(
                    "{:.1} = {:.2}× the steady mean",
                    rate_down.iter().sum::<f64>() / rate_down.len().max(1) as f64,
                    rate_down.iter().sum::<f64>()
                        / rate_down.len().max(1) as f64
                        / steady_rate.max(1e-9)
                ),
            );
            let interval = opts.poll_interval.as_secs_f64();
            idle(
                &fleet,
                &rec,
                Duration::from_secs_f64((up + interval - rec.now()).max(0.0)),
                &mut pg_pid,
            )
            .await;
            describe_peak(
                &mut f,
                &rec,
                (a, b),
                up,
                rec.now().max(up + interval),
                interval,
                "after PostgreSQL returned",
            );
            out.workers_not_back = missing;
        }
        Scenario::MassRelease => {
            let started = Instant::now();
            rec.release(&release_set);
            let results: Vec<Result<serde_json::Value, u16>> =
                futures::stream::iter(0..opts.workers)
                    .map(|w| {
                        let api = api.clone();
                        async move {
                            let path =
                                format!("/api/v1/workers/{}/containers/r-{w}", worker_name(w));
                            api.call(Method::DELETE, path, None).await
                        }
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
            let failed = results.iter().filter(|r| r.is_err()).count();
            rec.mark("pipeline released");
            let t_rel = rec.now();
            f.add(
                format!(
                    "released {} volumes (one pipeline container per worker) in",
                    release_set.len()
                ),
                format!(
                    "{:.1} s ({failed} deletes failed)",
                    started.elapsed().as_secs_f64()
                ),
            );
            let limit = opts.gc_interval * 10 + opts.poll_interval * 3;
            let (mut disk, mut db) = (None, None);
            let end = Instant::now() + limit;
            while Instant::now() < end && (disk.is_none() || db.is_none()) {
                idle(&fleet, &rec, Duration::from_secs(1), &mut pg_pid).await;
                if disk.is_none() {
                    let (pending, _) = rec.release_figures();
                    if !pending.iter().any(|h| h.as_str().starts_with('r')) {
                        disk = Some(rec.now() - t_rel);
                    }
                }
                if db.is_none() && fleet.rows_with_prefix("r").await.unwrap_or(1) == 0 {
                    db = Some(rec.now() - t_rel);
                }
            }
            let gc = opts.gc_interval.as_secs_f64();
            let show = |x: Option<f64>| match x {
                Some(s) => format!("{s:.1} s = {:.2} GC intervals", s / gc),
                None => format!("not within {limit:?}"),
            };
            f.add("mass release: all gone from the workers after", show(disk));
            f.add("mass release: all gone from the database after", show(db));
            idle(&fleet, &rec, opts.poll_interval, &mut pg_pid).await;
        }
    }

    // Drain: the scheduler releases every build left; wait for all of it to go.
    let _ = sched_tx.send(true);
    while !sched.is_finished() {
        idle(&fleet, &rec, Duration::from_secs(1), &mut pg_pid).await;
    }
    let _ = sched.await;
    if let Some(driver) = real_tasks.first_mut() {
        while !driver.is_finished() {
            idle(&fleet, &rec, Duration::from_secs(1), &mut pg_pid).await;
        }
    }
    rec.mark("scheduler stopped; draining");
    let drain_limit = opts.gc_interval * 3 + opts.poll_interval * 3 + Duration::from_secs(30);
    let end = Instant::now() + drain_limit;
    let drain_start = rec.now();
    loop {
        idle(&fleet, &rec, Duration::from_secs(1), &mut pg_pid).await;
        let (pending, _) = rec.release_figures();
        let released = rec.released_handles();
        let rows_left = fleet.rows_left(&released).await.unwrap_or(-1);
        if (pending.is_empty() && rows_left == 0) || Instant::now() >= end {
            out.released = released.len();
            out.released_left_on_workers = pending.len();
            out.released_rows_left = rows_left;
            break;
        }
    }
    f.add(
        "drain after the scheduler stopped",
        format!("{:.1} s", rec.now() - drain_start),
    );
    let _ = stop_tx.send(true);
    for t in tasks.into_iter().chain(real_tasks) {
        let _ = t.await;
    }
    if !real_agents.is_empty() {
        out.real_builds = real.builds.load(Relaxed);
        out.real_gone = real.gone.load(Relaxed);
        f.add(
            format!("real agents ({}): builds made / failed", real_agents.len()),
            format!("{} / {}", out.real_builds, real.failed_builds.load(Relaxed)),
        );
        f.add(
            "real agents: volume directories gone from disk",
            out.real_gone.to_string(),
        );
        for a in &mut real_agents {
            a.stop();
        }
    }
    let t_end = rec.now();
    if out.released_left_on_workers > 0 {
        rec.violation(format!(
            "{} released volumes still on their workers after {drain_limit:?} of draining",
            out.released_left_on_workers
        ));
    }
    if out.released_rows_left != 0 {
        rec.violation(format!(
            "{} released volumes still have a row after {drain_limit:?} of draining",
            out.released_rows_left
        ));
    }
    let (_, mut gone) = rec.release_figures();
    let n = gone.len();
    f.add(
        "release to gone from the worker: p50 / p99 / max (n)",
        format!(
            "{:.1} / {:.1} / {:.1} s ({n})",
            quantile(&mut gone, 0.5),
            quantile(&mut gone, 0.99),
            quantile(&mut gone, 1.0)
        ),
    );
    out.builds = counts.builds.load(Relaxed);
    f.add(
        "builds created / failed, volumes released by the scheduler",
        format!(
            "{} / {}, {}",
            out.builds,
            counts.failed_builds.load(Relaxed),
            counts.released.load(Relaxed)
        ),
    );
    out.destroyed = rec.destroyed_total.load(Relaxed);
    out.violation_count = rec.violation_count.load(Relaxed);
    out.violations = rec.violations();
    f.add(
        "volumes destroyed by the simulated workers",
        out.destroyed.to_string(),
    );
    f.add("invariant violations", out.violation_count.to_string());

    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir)?;
        let ev = rec.events();
        let secs = t_end.ceil() as usize;
        let rate: Vec<(f64, f64)> = stats::per_second(&ev, 0.0, secs as f64, true)
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v))
            .collect();
        let mut p99 = Vec::with_capacity(secs);
        for i in 0..secs {
            let mut l: Vec<f64> = ev
                .iter()
                .filter(|e| e.kind.is_agent() && e.t >= i as f64 && e.t < (i + 1) as f64)
                .map(|e| e.ms)
                .collect();
            p99.push((i as f64, quantile(&mut l, 0.99)));
        }
        let destroying: Vec<(f64, f64)> = rec
            .samples()
            .iter()
            .map(|s| (s.t, s.destroying as f64))
            .collect();
        let panels = [
            Series {
                name: "agent_requests_per_s",
                points: rate,
            },
            Series {
                name: "agent_p99_ms",
                points: p99,
            },
            Series {
                name: "rows_destroying",
                points: destroying,
            },
        ];
        let marks: Vec<f64> = rec.marks().iter().map(|m| m.0).collect();
        let png = dir.join(format!("{name}.png"));
        plot::png(&png, &panels, &marks, t_end)?;
        plot::csv(&dir.join(format!("{name}.csv")), &panels)?;
        let mut kinds = format!("seconds,{}\n", stats::CLASSES.join(","));
        for (i, row) in stats::per_second_by_class(&ev, 0.0, secs as f64)
            .iter()
            .enumerate()
        {
            let cells: Vec<String> = row.iter().map(u32::to_string).collect();
            kinds.push_str(&format!("{i},{}\n", cells.join(",")));
        }
        std::fs::write(dir.join(format!("{name}.kinds.csv")), kinds)?;
        let marks_text: String = rec
            .marks()
            .iter()
            .map(|(t, m)| format!("{t:.1}\t{m}\n"))
            .collect();
        std::fs::write(dir.join(format!("{name}.marks.tsv")), marks_text)?;
        println!("  picture: {}", png.display());
        out.png = Some(png);
    }
    out.figures = f.0;
    fleet.shutdown().await;
    Ok(out)
}
