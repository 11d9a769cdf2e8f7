//! volume-central's Prometheus metrics on `prometheus-client`, served on `/metrics`.
//! Every label family with fixed label values is created whole at start, so each series
//! exists (at 0) from the first scrape. The rows by state and each worker's figures from
//! its last report are read at scrape time (`http.rs`); README.md's "Metrics" section
//! lists every name.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::metrics::{F64Gauge, U64Gauge};
use protocol::VolumeState;

use crate::store::WorkerRow;

/// Upper bounds (seconds) of the desired-set answer histogram.
const DESIRED_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds (seconds) of the GC pass histogram.
const GC_PASS_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Upper bounds (seconds) of the time a worker spends under pressure.
const PRESSURE_BUCKETS: [f64; 12] = [
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

/// Each registered worker's figures from its last report (one series per worker).
#[derive(Debug, Default)]
struct WorkerFamilies {
    volume_bytes: Family<WorkerLabels, U64Gauge>,
    disk_total_bytes: Family<WorkerLabels, U64Gauge>,
    disk_free_bytes: Family<WorkerLabels, U64Gauge>,
    pressure: Family<WorkerLabels, U64Gauge>,
    revision_lag: Family<WorkerLabels, U64Gauge>,
    last_report: Family<WorkerLabels, F64Gauge>,
    retained_bytes: Family<WorkerLabels, U64Gauge>,
    evicted_bytes: Family<WorkerLabels, U64Gauge>,
}

/// How one GC tick ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcOutcome {
    /// This replica ran a pass.
    Ran,
    /// Another replica held the lock.
    Locked,
    /// The pass failed.
    Error,
}

impl GcOutcome {
    const ALL: [GcOutcome; 3] = [GcOutcome::Ran, GcOutcome::Locked, GcOutcome::Error];

    fn as_str(self) -> &'static str {
        match self {
            GcOutcome::Ran => "ran",
            GcOutcome::Locked => "locked",
            GcOutcome::Error => "error",
        }
    }
}

/// The HTTP status classes counted.
const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Every metric of one service instance.
#[derive(Debug)]
pub struct Metrics {
    http_responses: Family<ClassLabels, Counter>,
    desired_answers: Family<KindLabels, Counter>,
    /// Time to answer one desired-set request (authenticated), 304s included.
    pub desired_duration: Histogram,
    pub reports: Counter,
    pub reported_destroyed_deleted: Counter,
    pub reported_failed: Counter,
    pub reported_blocked: Counter,
    auth_refused: Family<StatusLabels, Counter>,
    pub db_unavailable: Counter,
    gc_passes: Family<OutcomeLabels, Counter>,
    pub gc_marked: Counter,
    pub gc_skipped: Counter,
    pub gc_caches_deleted: Counter,
    pub gc_last_pass_seconds: F64Gauge,
    pub gc_pass_duration: Histogram,
    pub gc_last_success_timestamp_seconds: F64Gauge,
    pub gc_interval_seconds: F64Gauge,
    /// 1 when the last database access succeeded, 0 when it failed.
    pub db_up: Gauge,
    /// 1 when the service runs with `auth = "none"`.
    pub auth_disabled: Gauge,
    volumes: Family<StateLabels, U64Gauge>,
    workers: WorkerFamilies,
    evictions: Family<ReasonLabels, Counter>,
    evicted_bytes: Family<ReasonLabels, Counter>,
    /// How long workers were under pressure, observed when a report clears it.
    pub pressure_cleared_seconds: Histogram,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            http_responses: Family::default(),
            desired_answers: Family::default(),
            desired_duration: Histogram::new(DESIRED_BUCKETS),
            reports: Counter::default(),
            reported_destroyed_deleted: Counter::default(),
            reported_failed: Counter::default(),
            reported_blocked: Counter::default(),
            auth_refused: Family::default(),
            db_unavailable: Counter::default(),
            gc_passes: Family::default(),
            gc_marked: Counter::default(),
            gc_skipped: Counter::default(),
            gc_caches_deleted: Counter::default(),
            gc_last_pass_seconds: F64Gauge::default(),
            gc_pass_duration: Histogram::new(GC_PASS_BUCKETS),
            gc_last_success_timestamp_seconds: F64Gauge::default(),
            gc_interval_seconds: F64Gauge::default(),
            db_up: Gauge::default(),
            auth_disabled: Gauge::default(),
            volumes: Family::default(),
            workers: WorkerFamilies::default(),
            evictions: Family::default(),
            evicted_bytes: Family::default(),
            pressure_cleared_seconds: Histogram::new(PRESSURE_BUCKETS),
            registry: Registry::default(),
        };
        for reason in crate::gc::EvictReason::ALL {
            let l = ReasonLabels {
                reason: reason.as_str(),
            };
            let _ = m.evictions.get_or_create_owned(&l);
            let _ = m.evicted_bytes.get_or_create_owned(&l);
        }
        for class in CLASSES {
            let _ = m.http_responses.get_or_create_owned(&ClassLabels { class });
        }
        for kind in ["full", "not_modified"] {
            let _ = m.desired_answers.get_or_create_owned(&KindLabels { kind });
        }
        for status in ["401", "403"] {
            let _ = m.auth_refused.get_or_create_owned(&StatusLabels { status });
        }
        for outcome in GcOutcome::ALL {
            let _ = m.gc_passes.get_or_create_owned(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        m.with_registry()
    }

    /// Registers every metric (names as README.md lists them; the encoder adds
    /// `_total` to counters).
    fn with_registry(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "volume_central_http_responses",
            "HTTP responses by status class",
            self.http_responses.clone(),
        );
        r.register(
            "volume_central_desired_answers",
            "Desired-set answers by kind",
            self.desired_answers.clone(),
        );
        r.register(
            "volume_central_desired_duration_seconds",
            "Time to answer one desired-set request, 304s included",
            self.desired_duration.clone(),
        );
        r.register(
            "volume_central_reports",
            "Volume reports applied",
            self.reports.clone(),
        );
        r.register(
            "volume_central_reported_destroyed_rows_deleted",
            "Rows deleted because their worker reported them destroyed",
            self.reported_destroyed_deleted.clone(),
        );
        r.register(
            "volume_central_reported_failed",
            "Volumes workers reported as failing to destroy",
            self.reported_failed.clone(),
        );
        r.register(
            "volume_central_reported_blocked",
            "Volumes workers reported as blocked by live children",
            self.reported_blocked.clone(),
        );
        r.register(
            "volume_central_auth_refused",
            "API requests refused: 401 without a valid credential, 403 outside its scope",
            self.auth_refused.clone(),
        );
        r.register(
            "volume_central_db_unavailable",
            "Requests or passes that failed because the database was unreachable",
            self.db_unavailable.clone(),
        );
        r.register(
            "volume_central_gc_passes",
            "GC ticks by outcome: ran a pass, another replica held the lock, failed",
            self.gc_passes.clone(),
        );
        r.register(
            "volume_central_gc_marked_volumes",
            "Volumes the GC marked destroying",
            self.gc_marked.clone(),
        );
        r.register(
            "volume_central_gc_skipped_subtrees",
            "Subtrees the GC skipped because a child still used them",
            self.gc_skipped.clone(),
        );
        r.register(
            "volume_central_gc_deleted_caches",
            "Resource caches the GC deleted",
            self.gc_caches_deleted.clone(),
        );
        r.register(
            "volume_central_gc_last_pass_seconds",
            "Duration of the last GC pass this replica ran",
            self.gc_last_pass_seconds.clone(),
        );
        r.register(
            "volume_central_gc_pass_duration_seconds",
            "Duration of the GC passes this replica ran",
            self.gc_pass_duration.clone(),
        );
        r.register(
            "volume_central_gc_last_success_timestamp_seconds",
            "Unix time the last GC pass this replica ran succeeded (0: none yet)",
            self.gc_last_success_timestamp_seconds.clone(),
        );
        r.register(
            "volume_central_gc_interval_seconds",
            "The configured gc_interval",
            self.gc_interval_seconds.clone(),
        );
        r.register(
            "volume_central_db_up",
            "Whether the last database access succeeded",
            self.db_up.clone(),
        );
        r.register(
            "volume_central_auth_disabled",
            "1 when the API runs without authentication (auth = \"none\")",
            self.auth_disabled.clone(),
        );
        r.register(
            "volume_central_volumes",
            "Volume rows by state, counted at scrape time",
            self.volumes.clone(),
        );
        r.register(
            "volume_central_gc_evictions",
            "Retained resource caches the GC took from a worker, by reason (pressure, budget, dropped)",
            self.evictions.clone(),
        );
        r.register(
            "volume_central_gc_evicted_bytes",
            "Bytes the evicted caches held on their workers (last reported), by reason",
            self.evicted_bytes.clone(),
        );
        r.register(
            "volume_central_pressure_cleared_seconds",
            "Time from a worker first reporting pressure to a report clearing it",
            self.pressure_cleared_seconds.clone(),
        );
        let w = &self.workers;
        r.register(
            "volume_central_worker_retained_bytes",
            "Bytes of retained resource caches on a worker, as the last GC pass counted them",
            w.retained_bytes.clone(),
        );
        r.register(
            "volume_central_worker_evicted_bytes",
            "Bytes of caches evicted from a worker since it was registered (all replicas)",
            w.evicted_bytes.clone(),
        );
        r.register(
            "volume_central_worker_volume_bytes",
            "Bytes of a worker's volumes, from its last report",
            w.volume_bytes.clone(),
        );
        r.register(
            "volume_central_worker_disk_total_bytes",
            "Size of a worker's volumes file system, from its last report",
            w.disk_total_bytes.clone(),
        );
        r.register(
            "volume_central_worker_disk_free_bytes",
            "Free bytes on a worker's volumes file system, from its last report",
            w.disk_free_bytes.clone(),
        );
        r.register(
            "volume_central_worker_pressure",
            "1 when a worker's last report said its disk was below gc.min_free",
            w.pressure.clone(),
        );
        r.register(
            "volume_central_worker_revision_lag",
            "Desired-set revisions a worker had not applied at its last report",
            w.revision_lag.clone(),
        );
        r.register(
            "volume_central_worker_last_report_timestamp_seconds",
            "Unix time of a worker's last report",
            w.last_report.clone(),
        );
        self
    }

    /// Counts a response by status class.
    pub fn count_status(&self, status: u16) {
        let class = match status {
            200..=299 => CLASSES[0],
            300..=399 => CLASSES[1],
            400..=499 => CLASSES[2],
            _ => CLASSES[3],
        };
        self.http_responses
            .get_or_create(&ClassLabels { class })
            .inc();
    }

    /// Counts a desired-set answer: a full set or a 304.
    pub fn desired_answer(&self, full: bool) {
        let kind = if full { "full" } else { "not_modified" };
        self.desired_answers
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Desired-set answers of this instance: full sets, or 304s.
    pub fn desired_answers(&self, full: bool) -> u64 {
        let kind = if full { "full" } else { "not_modified" };
        self.desired_answers
            .get_or_create(&KindLabels { kind })
            .get()
    }

    /// Counts an `/api` request refused with 401 or 403.
    pub fn auth_refused(&self, forbidden: bool) {
        let status = if forbidden { "403" } else { "401" };
        self.auth_refused
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    /// Counts one GC tick.
    pub fn gc_pass(&self, outcome: GcOutcome) {
        self.gc_passes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// GC ticks of this replica that ended so.
    pub fn gc_passes(&self, outcome: GcOutcome) -> u64 {
        self.gc_passes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// Counts the evictions of one GC pass.
    pub fn evictions(&self, e: &crate::gc::Evictions) {
        for reason in crate::gc::EvictReason::ALL {
            let t = e.get(reason);
            let l = ReasonLabels {
                reason: reason.as_str(),
            };
            self.evictions.get_or_create(&l).inc_by(t.caches);
            self.evicted_bytes.get_or_create(&l).inc_by(t.bytes);
        }
    }

    /// Caches evicted by this replica for `reason`.
    pub fn evicted(&self, reason: crate::gc::EvictReason) -> u64 {
        self.evictions
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// The rows by state (every state exported, 0 when absent); `None` when they could
    /// not be counted, which removes the series rather than leave old figures.
    pub fn set_volumes_by_state(&self, counts: Option<&BTreeMap<String, u64>>) {
        let Some(counts) = counts else {
            self.volumes.clear();
            return;
        };
        for st in VolumeState::ALL {
            let n = counts.get(st.as_str()).copied().unwrap_or(0);
            self.volumes
                .get_or_create(&StateLabels { state: st.as_str() })
                .set(n);
        }
    }

    /// Each worker's figures from its last report (workers that have not reported yet
    /// have no series); `None` when they could not be read, which removes them all.
    pub fn set_workers(&self, rows: Option<&[WorkerRow]>) {
        let w = &self.workers;
        for family in [
            &w.volume_bytes,
            &w.disk_total_bytes,
            &w.disk_free_bytes,
            &w.pressure,
            &w.revision_lag,
            &w.retained_bytes,
            &w.evicted_bytes,
        ] {
            family.clear();
        }
        w.last_report.clear();
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        for row in rows.unwrap_or_default() {
            let l = WorkerLabels {
                worker: row.name.clone(),
            };
            w.retained_bytes
                .get_or_create(&l)
                .set(u(row.retained_bytes.unwrap_or(0)));
            w.evicted_bytes.get_or_create(&l).set(u(row.evicted_bytes));
            let Some(r) = &row.last_report else {
                continue;
            };
            w.volume_bytes.get_or_create(&l).set(u(r.volume_bytes));
            if let Some(total) = r.disk_total_bytes {
                w.disk_total_bytes.get_or_create(&l).set(u(total));
            }
            if let Some(free) = r.disk_free_bytes {
                w.disk_free_bytes.get_or_create(&l).set(u(free));
            }
            if let Some(p) = r.pressure {
                w.pressure.get_or_create(&l).set(u64::from(p));
            }
            w.revision_lag
                .get_or_create(&l)
                .set(u(row.revision - r.revision_seen.unwrap_or(0)));
            w.last_report
                .get_or_create(&l)
                .set(r.at.timestamp_millis() as f64 / 1000.0);
        }
    }

    /// The Prometheus text exposition, encoded by prometheus-client.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        protocol::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_label_families_exist_from_the_start() {
        let text = Metrics::new().render().expect("render");
        for line in [
            "volume_central_http_responses_total{class=\"5xx\"} 0",
            "volume_central_desired_answers_total{kind=\"not_modified\"} 0",
            "volume_central_auth_refused_total{status=\"403\"} 0",
            "volume_central_gc_passes_total{outcome=\"locked\"} 0",
            "volume_central_reports_total 0",
            "volume_central_db_up 0",
            "volume_central_desired_duration_seconds_count 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("volume_central_volumes{"), "{text}");
    }

    #[test]
    fn rows_by_state_cover_every_state_and_go_when_uncounted() {
        let m = Metrics::new();
        let counts = BTreeMap::from([("destroying".to_string(), 3)]);
        m.set_volumes_by_state(Some(&counts));
        let text = m.render().expect("render");
        assert!(text.contains("volume_central_volumes{state=\"destroying\"} 3"));
        assert!(text.contains("volume_central_volumes{state=\"creating\"} 0"));
        m.set_volumes_by_state(None);
        assert!(!m.render().expect("render").contains("state=\"destroying\""));
    }
}
