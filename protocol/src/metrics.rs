//! What both binaries share for `GET /metrics`: the exposition is encoded by
//! `prometheus-client` in the Prometheus text format 0.0.4 (what every Prometheus
//! scrapes; counters end in `_total`, help and label values are escaped by the encoder).
//! No I/O: each binary builds its own registry and serves the text.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A gauge of counts and byte figures.
pub type U64Gauge = Gauge<u64, AtomicU64>;

/// A gauge of seconds (durations, Unix times with a fraction).
pub type F64Gauge = Gauge<f64, AtomicU64>;

/// The whole exposition of `registry`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
