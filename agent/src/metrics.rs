//! Prometheus metrics, kept in atomics and rendered in the text exposition format.
//! Hand-rolled: the agent exports a few dozen series and needs no registry machinery.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the destroy duration histogram.
const DESTROY_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; DESTROY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in DESTROY_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in DESTROY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Every metric the agent exports.
#[derive(Default)]
pub struct Metrics {
    pub destroys_total: AtomicU64,
    pub destroys_failed_total: AtomicU64,
    pub destroy_duration: Histogram,
    pub blocked_volumes: AtomicU64,
    /// Records whose data directory is gone (the drift scan's verdict).
    pub missing_volumes: AtomicU64,
    pub plans_refused_total: AtomicU64,
    pub stale_answers_total: AtomicU64,
    pub reconcile_passes_total: AtomicU64,
    pub last_sync_timestamp_seconds: AtomicU64,
    pub desired_revision: AtomicU64,
    pub destroy_throttled_micros: AtomicU64,
    pub disk_total_bytes: AtomicU64,
    pub disk_free_bytes: AtomicU64,
    pub disk_pressure: AtomicU64,
    pub ready: AtomicU64,
    /// Set once the first call to the central API ended: answered, or failed and being
    /// retried. Readiness waits for it.
    pub central_contacted: AtomicBool,
    volumes_by_state: Mutex<BTreeMap<String, u64>>,
    central_requests: Mutex<BTreeMap<(String, String), u64>>,
    resource_types: Mutex<Vec<(String, String)>>,
    volume_bytes: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Ready: recovery finished, the loop runs (`ready`), and the first call to the
    /// central API ended, answered or failed and being retried (`central_contacted`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) == 1 && self.central_contacted.load(Relaxed)
    }

    /// Counts one call to the central API: `endpoint` (`desired`, `report`, ...) and its
    /// outcome (`ok`, `not_modified`, `timeout`, `status_5xx`, ...).
    pub fn central_request(&self, endpoint: &str, outcome: &str) {
        *lock(&self.central_requests)
            .entry((endpoint.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    pub fn set_volumes_by_state(&self, counts: BTreeMap<String, u64>) {
        *lock(&self.volumes_by_state) = counts;
    }

    pub fn set_resource_types(&self, types: Vec<(String, String)>) {
        *lock(&self.resource_types) = types;
    }

    pub fn set_volume_bytes(&self, bytes: BTreeMap<String, u64>) {
        *lock(&self.volume_bytes) = bytes;
    }

    pub fn mark_synced_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_sync_timestamp_seconds.store(now, Relaxed);
    }

    /// The whole exposition, Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP volume_agent_volumes Local volumes by state.\n# TYPE volume_agent_volumes gauge"
        );
        let by_state = lock(&self.volumes_by_state).clone();
        for st in protocol::VolumeState::ALL {
            let n = by_state.get(st.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "volume_agent_volumes{{state=\"{st}\"}} {n}");
        }
        gauge(
            &mut out,
            "volume_agent_destroys_total",
            "Volumes destroyed.",
            "counter",
            self.destroys_total.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_destroys_failed_total",
            "Destroy attempts that failed or timed out.",
            "counter",
            self.destroys_failed_total.load(Relaxed),
        );
        self.destroy_duration.render(
            &mut out,
            "volume_agent_destroy_duration_seconds",
            "Time to destroy one volume.",
        );
        gauge(
            &mut out,
            "volume_agent_blocked_volumes",
            "Volumes asked to go that still have live children.",
            "gauge",
            self.blocked_volumes.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_missing_volumes",
            "Volumes whose data directory is gone (reported missing until the central side lets them go).",
            "gauge",
            self.missing_volumes.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_plans_refused_total",
            "Passes whose destroys by absence the mass-destroy guard refused.",
            "counter",
            self.plans_refused_total.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_stale_answers_total",
            "Desired sets ignored as stale or misrouted.",
            "counter",
            self.stale_answers_total.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_reconcile_passes_total",
            "Reconcile passes run.",
            "counter",
            self.reconcile_passes_total.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_last_sync_timestamp_seconds",
            "Unix time of the last successful answer from the central API.",
            "gauge",
            self.last_sync_timestamp_seconds.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_desired_revision",
            "Highest desired-set revision applied.",
            "gauge",
            self.desired_revision.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP volume_agent_destroy_throttled_seconds_total Time destroys waited on gc.destroy_rate.\n# TYPE volume_agent_destroy_throttled_seconds_total counter\nvolume_agent_destroy_throttled_seconds_total {}",
            self.destroy_throttled_micros.load(Relaxed) as f64 / 1e6
        );
        gauge(
            &mut out,
            "volume_agent_disk_total_bytes",
            "Size of the volumes filesystem.",
            "gauge",
            self.disk_total_bytes.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_disk_free_bytes",
            "Free bytes on the volumes filesystem.",
            "gauge",
            self.disk_free_bytes.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_disk_pressure",
            "1 when free space is below gc.min_free.",
            "gauge",
            self.disk_pressure.load(Relaxed),
        );
        gauge(
            &mut out,
            "volume_agent_ready",
            "1 once recovery finished and the first call to the central API ended.",
            "gauge",
            u64::from(self.is_ready()),
        );
        let _ = writeln!(
            out,
            "# HELP volume_agent_central_requests_total Calls to the central API by endpoint and outcome.\n# TYPE volume_agent_central_requests_total counter"
        );
        for ((endpoint, outcome), n) in lock(&self.central_requests).iter() {
            let _ = writeln!(
                out,
                "volume_agent_central_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP volume_agent_resource_type_info Base resource types found on this worker.\n# TYPE volume_agent_resource_type_info gauge"
        );
        for (name, version) in lock(&self.resource_types).iter() {
            let _ = writeln!(
                out,
                "volume_agent_resource_type_info{{type=\"{}\",version=\"{}\"}} 1",
                escape(name),
                escape(version)
            );
        }
        let _ = writeln!(
            out,
            "# HELP volume_agent_volume_bytes Real on-disk bytes per volume.\n# TYPE volume_agent_volume_bytes gauge"
        );
        for (handle, bytes) in lock(&self.volume_bytes).iter() {
            let _ = writeln!(
                out,
                "volume_agent_volume_bytes{{handle=\"{handle}\"}} {bytes}"
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_required_series() {
        let m = Metrics::new();
        m.destroy_duration.observe(Duration::from_millis(20));
        m.central_request("desired", "not_modified");
        let text = m.render();
        for name in [
            "volume_agent_volumes{state=\"initialized\"}",
            "volume_agent_destroys_total",
            "volume_agent_destroys_failed_total",
            "volume_agent_destroy_duration_seconds_bucket{le=\"0.05\"} 1",
            "volume_agent_blocked_volumes",
            "volume_agent_missing_volumes",
            "volume_agent_plans_refused_total",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"not_modified\"} 1",
            "volume_agent_last_sync_timestamp_seconds",
            "volume_agent_desired_revision",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
