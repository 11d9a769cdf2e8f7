//! Counters exported as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Process-wide counters of one service instance.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests_2xx: AtomicU64,
    pub requests_3xx: AtomicU64,
    pub requests_4xx: AtomicU64,
    pub requests_5xx: AtomicU64,
    pub desired_full: AtomicU64,
    pub desired_not_modified: AtomicU64,
    pub reports: AtomicU64,
    pub reported_destroyed_deleted: AtomicU64,
    pub reported_failed: AtomicU64,
    pub reported_blocked: AtomicU64,
    pub db_unavailable: AtomicU64,
    pub gc_passes: AtomicU64,
    pub gc_locked: AtomicU64,
    pub gc_errors: AtomicU64,
    pub gc_marked: AtomicU64,
    pub gc_skipped: AtomicU64,
    pub gc_caches_deleted: AtomicU64,
    pub gc_last_pass_micros: AtomicU64,
    /// 1 when the last database access succeeded, 0 when it failed.
    pub db_up: AtomicI64,
    /// `/api` requests refused with 401 (no, unknown or revoked credential).
    pub auth_unauthorized: AtomicU64,
    /// `/api` requests refused with 403 (a valid credential outside its scope).
    pub auth_forbidden: AtomicU64,
    /// 1 when the service runs with `auth = "none"`.
    pub auth_disabled: AtomicI64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a response by status class.
    pub fn count_status(&self, status: u16) {
        let c = match status {
            200..=299 => &self.requests_2xx,
            300..=399 => &self.requests_3xx,
            400..=499 => &self.requests_4xx,
            _ => &self.requests_5xx,
        };
        Self::inc(c);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP volume_central_{name} {help}");
            let _ = writeln!(out, "# TYPE volume_central_{name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "volume_central_{name}{labels} {v}");
            }
        };
        counter(
            "http_responses_total",
            "HTTP responses by status class.",
            &[
                ("{class=\"2xx\"}", g(&self.requests_2xx)),
                ("{class=\"3xx\"}", g(&self.requests_3xx)),
                ("{class=\"4xx\"}", g(&self.requests_4xx)),
                ("{class=\"5xx\"}", g(&self.requests_5xx)),
            ],
        );
        counter(
            "desired_answers_total",
            "Desired-set answers by kind.",
            &[
                ("{kind=\"full\"}", g(&self.desired_full)),
                ("{kind=\"not_modified\"}", g(&self.desired_not_modified)),
            ],
        );
        counter(
            "reports_total",
            "Volume reports applied.",
            &[("", g(&self.reports))],
        );
        counter(
            "reported_destroyed_rows_deleted_total",
            "Rows deleted because their worker reported them destroyed.",
            &[("", g(&self.reported_destroyed_deleted))],
        );
        counter(
            "reported_failed_total",
            "Volumes workers reported as failing to destroy.",
            &[("", g(&self.reported_failed))],
        );
        counter(
            "reported_blocked_total",
            "Volumes workers reported as blocked by live children.",
            &[("", g(&self.reported_blocked))],
        );
        counter(
            "auth_refused_total",
            "API requests refused: 401 without a valid credential, 403 outside its scope.",
            &[
                ("{status=\"401\"}", g(&self.auth_unauthorized)),
                ("{status=\"403\"}", g(&self.auth_forbidden)),
            ],
        );
        counter(
            "db_unavailable_total",
            "Requests or passes that failed because the database was unreachable.",
            &[("", g(&self.db_unavailable))],
        );
        counter(
            "gc_passes_total",
            "GC passes by outcome.",
            &[
                ("{outcome=\"ran\"}", g(&self.gc_passes)),
                ("{outcome=\"locked\"}", g(&self.gc_locked)),
                ("{outcome=\"error\"}", g(&self.gc_errors)),
            ],
        );
        counter(
            "gc_marked_volumes_total",
            "Volumes the GC marked destroying.",
            &[("", g(&self.gc_marked))],
        );
        counter(
            "gc_skipped_subtrees_total",
            "Subtrees the GC skipped because a child still used them.",
            &[("", g(&self.gc_skipped))],
        );
        counter(
            "gc_deleted_caches_total",
            "Resource caches the GC deleted.",
            &[("", g(&self.gc_caches_deleted))],
        );
        let _ = writeln!(
            out,
            "# HELP volume_central_gc_last_pass_seconds Duration of the last GC pass this replica ran.\n# TYPE volume_central_gc_last_pass_seconds gauge\nvolume_central_gc_last_pass_seconds {}",
            g(&self.gc_last_pass_micros) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP volume_central_db_up Whether the last database access succeeded.\n# TYPE volume_central_db_up gauge\nvolume_central_db_up {}",
            self.db_up.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP volume_central_auth_disabled 1 when the API runs without authentication (auth = \"none\").\n# TYPE volume_central_auth_disabled gauge\nvolume_central_auth_disabled {}",
            self.auth_disabled.load(Ordering::Relaxed)
        );
        out
    }
}
