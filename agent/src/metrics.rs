//! The agent's Prometheus metrics, on `prometheus-client`: typed counters, gauges and
//! histograms in one registry, label families, and a collector for the volume sizes.
//! The exposition (text format 0.0.4) is the encoder's (`protocol::metrics::encode`);
//! README.md's "Metrics" section lists every name, and a test holds the two together.
//!
//! Per-volume bytes are bounded: the [`LARGEST_VOLUMES`] largest volumes by handle, and
//! one size histogram of every volume, so a worker with 100,000 volumes exports the same
//! few dozen series as one with ten.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use protocol::metrics::{F64Gauge, U64Gauge};

/// Upper bounds (seconds) of the destroy duration histogram.
const DESTROY_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// How many of the largest volumes get a series of their own.
pub const LARGEST_VOLUMES: usize = 10;

/// Upper bounds (bytes) of the volume size histogram: 1 MiB to 64 GiB, ×4 each.
const SIZE_BUCKETS: [f64; 9] = [
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
    68719476736.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceTypeLabels {
    r#type: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandleLabels {
    handle: String,
}

/// Every metric the agent exports. Other modules update the public metrics directly
/// (`inc`, `set`, `observe`); the rest change through methods.
#[derive(Debug)]
pub struct Metrics {
    pub destroys_total: Counter,
    pub destroys_failed_total: Counter,
    pub destroy_duration: Histogram,
    pub blocked_volumes: U64Gauge,
    /// Records whose data directory is gone (the drift scan's verdict).
    pub missing_volumes: U64Gauge,
    pub plans_refused_total: Counter,
    pub stale_answers_total: Counter,
    pub reconcile_passes_total: Counter,
    pub last_sync_timestamp_seconds: F64Gauge,
    pub desired_revision: U64Gauge,
    pub disk_total_bytes: U64Gauge,
    pub disk_free_bytes: U64Gauge,
    pub disk_pressure: U64Gauge,
    /// Set once recovery finished and the loop runs.
    pub ready: AtomicBool,
    /// Set once the first call to the central API ended: answered, or failed and being
    /// retried. Readiness waits for it.
    pub central_contacted: AtomicBool,
    destroy_throttled: Counter<f64, std::sync::atomic::AtomicU64>,
    ready_gauge: U64Gauge,
    /// Since when the longest-blocked volume of the last pass has been blocked.
    blocked_since: Mutex<Option<Instant>>,
    blocked_longest: F64Gauge,
    volumes_by_state: Family<StateLabels, U64Gauge>,
    central_requests: Family<RequestLabels, Counter>,
    resource_types: Family<ResourceTypeLabels, U64Gauge>,
    worker: Family<WorkerLabels, U64Gauge>,
    sizes: Arc<VolumeSizes>,
    registry: Registry,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            destroys_total: Counter::default(),
            destroys_failed_total: Counter::default(),
            destroy_duration: Histogram::new(DESTROY_BUCKETS),
            blocked_volumes: U64Gauge::default(),
            missing_volumes: U64Gauge::default(),
            plans_refused_total: Counter::default(),
            stale_answers_total: Counter::default(),
            reconcile_passes_total: Counter::default(),
            last_sync_timestamp_seconds: F64Gauge::default(),
            desired_revision: U64Gauge::default(),
            disk_total_bytes: U64Gauge::default(),
            disk_free_bytes: U64Gauge::default(),
            disk_pressure: U64Gauge::default(),
            ready: AtomicBool::new(false),
            central_contacted: AtomicBool::new(false),
            destroy_throttled: Counter::default(),
            ready_gauge: U64Gauge::default(),
            blocked_since: Mutex::new(None),
            blocked_longest: F64Gauge::default(),
            volumes_by_state: Family::default(),
            central_requests: Family::default(),
            resource_types: Family::default(),
            worker: Family::default(),
            sizes: Arc::default(),
            registry: Registry::default(),
        };
        m.set_volumes_by_state(BTreeMap::new());
        m.with_registry()
    }

    /// Registers every metric (names as README.md lists them; the encoder adds
    /// `_total` to counters).
    fn with_registry(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "volume_agent_volumes",
            "Local volumes by state",
            self.volumes_by_state.clone(),
        );
        r.register(
            "volume_agent_destroys",
            "Volumes destroyed",
            self.destroys_total.clone(),
        );
        r.register(
            "volume_agent_destroys_failed",
            "Destroy attempts that failed or timed out",
            self.destroys_failed_total.clone(),
        );
        r.register(
            "volume_agent_destroy_duration_seconds",
            "Time to destroy one volume",
            self.destroy_duration.clone(),
        );
        r.register(
            "volume_agent_blocked_volumes",
            "Volumes asked to go that still have live children",
            self.blocked_volumes.clone(),
        );
        r.register(
            "volume_agent_blocked_longest_seconds",
            "How long the volume blocked longest has been blocked by live children (0 when none is)",
            self.blocked_longest.clone(),
        );
        r.register(
            "volume_agent_missing_volumes",
            "Volumes whose data directory is gone (reported missing until the central side lets them go)",
            self.missing_volumes.clone(),
        );
        r.register(
            "volume_agent_plans_refused",
            "Passes whose destroys by absence the mass-destroy guard refused",
            self.plans_refused_total.clone(),
        );
        r.register(
            "volume_agent_stale_answers",
            "Desired sets ignored as stale or misrouted",
            self.stale_answers_total.clone(),
        );
        r.register(
            "volume_agent_reconcile_passes",
            "Reconcile passes run",
            self.reconcile_passes_total.clone(),
        );
        r.register(
            "volume_agent_last_sync_timestamp_seconds",
            "Unix time of the last successful answer from the central API",
            self.last_sync_timestamp_seconds.clone(),
        );
        r.register(
            "volume_agent_desired_revision",
            "Highest desired-set revision applied",
            self.desired_revision.clone(),
        );
        r.register(
            "volume_agent_destroy_throttled_seconds",
            "Time destroys waited on gc.destroy_rate",
            self.destroy_throttled.clone(),
        );
        r.register(
            "volume_agent_disk_total_bytes",
            "Size of the volumes filesystem",
            self.disk_total_bytes.clone(),
        );
        r.register(
            "volume_agent_disk_free_bytes",
            "Free bytes on the volumes filesystem",
            self.disk_free_bytes.clone(),
        );
        r.register(
            "volume_agent_disk_pressure",
            "1 when free space is below gc.min_free",
            self.disk_pressure.clone(),
        );
        r.register(
            "volume_agent_ready",
            "1 once recovery finished and the first call to the central API ended",
            self.ready_gauge.clone(),
        );
        r.register(
            "volume_agent_central_requests",
            "Calls to the central API by endpoint and outcome",
            self.central_requests.clone(),
        );
        r.register(
            "volume_agent_resource_type_info",
            "Base resource types found on this worker",
            self.resource_types.clone(),
        );
        r.register(
            "volume_agent_worker_info",
            "The worker this agent serves (worker_name)",
            self.worker.clone(),
        );
        r.register_collector(Box::new(self.sizes.clone()));
        self
    }

    /// Ready: recovery finished, the loop runs (`ready`), and the first call to the
    /// central API ended, answered or failed and being retried (`central_contacted`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) && self.central_contacted.load(Relaxed)
    }

    /// Names the worker (`volume_agent_worker_info{worker}`).
    pub fn set_worker(&self, name: &str) {
        self.worker.clear();
        self.worker
            .get_or_create(&WorkerLabels {
                worker: name.to_string(),
            })
            .set(1);
    }

    /// Counts one call to the central API: `endpoint` (`desired`, `report`, ...) and its
    /// outcome (`ok`, `not_modified`, `timeout`, `status_5xx`, ...).
    pub fn central_request(&self, endpoint: &str, outcome: &str) {
        self.central_requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Volumes by state; every state is exported, 0 when absent from `counts`.
    pub fn set_volumes_by_state(&self, counts: BTreeMap<String, u64>) {
        for st in protocol::VolumeState::ALL {
            let n = counts.get(st.as_str()).copied().unwrap_or(0);
            self.volumes_by_state
                .get_or_create(&StateLabels { state: st.as_str() })
                .set(n);
        }
    }

    pub fn set_resource_types(&self, types: Vec<(String, String)>) {
        self.resource_types.clear();
        for (name, version) in types {
            self.resource_types
                .get_or_create(&ResourceTypeLabels {
                    r#type: name,
                    version,
                })
                .set(1);
        }
    }

    /// The measured size of every volume: kept as the [`LARGEST_VOLUMES`] largest and a
    /// size histogram, never one series per volume.
    pub fn set_volume_bytes(&self, bytes: impl IntoIterator<Item = (String, u64)>) {
        let summary = SizeSummary::of(bytes);
        *lock(&self.sizes.0) = summary;
    }

    /// The total time destroys have waited on `gc.destroy_rate` so far.
    pub fn set_destroy_throttled(&self, total: Duration) {
        let seen = self.destroy_throttled.get();
        let now = total.as_secs_f64();
        if now > seen {
            self.destroy_throttled.inc_by(now - seen);
        }
    }

    /// Since when the longest-blocked volume has been blocked (`None`: nothing blocked).
    pub fn set_blocked_since(&self, since: Option<Instant>) {
        *lock(&self.blocked_since) = since;
    }

    pub fn mark_synced_now(&self) {
        self.last_sync_timestamp_seconds
            .set(protocol::metrics::unix_now());
    }

    /// The whole exposition, encoded by prometheus-client. Gauges derived from other
    /// state (`ready`, how long a volume has been blocked) are set first.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        self.ready_gauge.set(u64::from(self.is_ready()));
        let blocked = lock(&self.blocked_since).map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.blocked_longest.set(blocked);
        protocol::metrics::encode(&self.registry)
    }
}

/// The volume sizes as exported: a snapshot replaced by each accounting round.
#[derive(Debug, Default)]
struct VolumeSizes(Mutex<SizeSummary>);

#[derive(Debug, Default, PartialEq)]
struct SizeSummary {
    /// The largest volumes, largest first (ties by handle).
    largest: Vec<(String, u64)>,
    /// Volumes per bucket of [`SIZE_BUCKETS`] (not cumulative; larger ones only in `count`).
    buckets: [u64; SIZE_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl SizeSummary {
    fn of(bytes: impl IntoIterator<Item = (String, u64)>) -> SizeSummary {
        let mut s = SizeSummary::default();
        let mut all: Vec<(String, u64)> = Vec::new();
        for (handle, b) in bytes {
            s.count += 1;
            s.sum += b as f64;
            if let Some(i) = SIZE_BUCKETS.iter().position(|bound| b as f64 <= *bound) {
                s.buckets[i] += 1;
            }
            all.push((handle, b));
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(LARGEST_VOLUMES);
        s.largest = all;
        s
    }
}

impl Collector for VolumeSizes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = lock(&self.0);
        {
            let mut largest = encoder.encode_descriptor(
                "volume_agent_volume_bytes",
                "Real on-disk bytes of the largest volumes (at most 10, by handle).",
                None,
                MetricType::Gauge,
            )?;
            for (handle, bytes) in &s.largest {
                let labels = HandleLabels {
                    handle: handle.clone(),
                };
                largest.encode_family(&labels)?.encode_gauge(bytes)?;
            }
        }
        let buckets: Vec<(f64, u64)> = SIZE_BUCKETS.iter().copied().zip(s.buckets).collect();
        encoder
            .encode_descriptor(
                "volume_agent_volume_size_bytes",
                "Real on-disk bytes of every volume as last measured: a snapshot, not cumulative (use without rate()).",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(s.sum, s.count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(m: &Metrics) -> String {
        m.render().expect("render")
    }

    #[test]
    fn renders_every_required_series() {
        let m = Metrics::new();
        m.destroy_duration.observe(0.02);
        m.central_request("desired", "not_modified");
        let text = render(&m);
        for name in [
            "volume_agent_volumes{state=\"initialized\"} 0",
            "volume_agent_destroys_total 0",
            "volume_agent_destroys_failed_total 0",
            "volume_agent_destroy_duration_seconds_bucket{le=\"0.05\"} 1",
            "volume_agent_blocked_volumes 0",
            "volume_agent_missing_volumes 0",
            "volume_agent_plans_refused_total 0",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"not_modified\"} 1",
            "volume_agent_last_sync_timestamp_seconds",
            "volume_agent_desired_revision 0",
            "# TYPE volume_agent_volume_size_bytes histogram",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn per_volume_bytes_are_the_largest_ten_and_a_histogram_of_all() {
        let m = Metrics::new();
        let sizes = (0..1000u64).map(|i| (format!("v{i:04}"), i * 1024 * 1024));
        m.set_volume_bytes(sizes);
        let text = render(&m);
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("volume_agent_volume_bytes{"))
            .collect();
        assert_eq!(series.len(), LARGEST_VOLUMES, "{text}");
        assert_eq!(
            series[0],
            format!(
                "volume_agent_volume_bytes{{handle=\"v0999\"}} {}",
                999 * 1024 * 1024
            )
        );
        assert!(
            text.contains("volume_agent_volume_size_bytes_count 1000"),
            "{text}"
        );
        // v0000 and v0001 are at most 1 MiB; v0002..v0004 at most 4 MiB.
        assert!(
            text.contains("volume_agent_volume_size_bytes_bucket{le=\"1.048576e+06\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("volume_agent_volume_size_bytes_bucket{le=\"4.194304e+06\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("volume_agent_volume_size_bytes_bucket{le=\"+Inf\"} 1000"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.set_resource_types(vec![("we\"ird\\".into(), "1\n2".into())]);
        let text = render(&m);
        assert!(
            text.contains(
                "volume_agent_resource_type_info{type=\"we\\\"ird\\\\\",version=\"1\\n2\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn ready_needs_recovery_and_a_first_central_call() {
        let m = Metrics::new();
        m.ready.store(true, Relaxed);
        assert!(render(&m).contains("volume_agent_ready 0"));
        m.central_contacted.store(true, Relaxed);
        assert!(render(&m).contains("volume_agent_ready 1"));
    }
}
