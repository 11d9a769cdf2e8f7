//! The operator's commands over the HTTP API: `volume-central workers`, `volumes --worker
//! W [--tree]` and `why HANDLE`, each also `--json`. [`Ctl`] makes the calls (an operator
//! or scheduler credential where credentials are on); the `*_text` functions (pure) lay
//! the answers out for a terminal.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::store::{VolumeRow, WorkerRow};
use crate::why::Why;

/// Why a command could not answer, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach volume-central at {url}: {message}; pass --url naming a running replica"
    )]
    Unreachable { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} answered something that is not the expected JSON: {message}")]
    Malformed { url: String, message: String },
    #[error("cannot read the token file {path}: {source}; pass --token-file with the operator credential `volume-central credentials issue --operator` printed")]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A client of one replica's API.
pub struct Ctl {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Ctl {
    /// A client of `base` (`http://127.0.0.1:8080`), sending the token in `token_file`
    /// when given.
    pub fn new(base: &str, token_file: Option<&std::path::Path>) -> Result<Ctl, CtlError> {
        let token = token_file
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|t| t.trim().to_string())
                    .map_err(|source| CtlError::TokenFile {
                        path: path.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        Ok(Ctl {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| CtlError::Unreachable {
                    url: base.to_string(),
                    message: e.to_string(),
                })?,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| CtlError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| CtlError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(CtlError::Refused {
                url,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| CtlError::Malformed {
            url,
            message: e.to_string(),
        })
    }

    pub async fn workers(&self) -> Result<Vec<WorkerRow>, CtlError> {
        self.get("/api/v1/workers").await
    }

    pub async fn volumes(&self, worker: &str) -> Result<Vec<VolumeRow>, CtlError> {
        self.get(&format!("/api/v1/workers/{worker}/volumes")).await
    }

    pub async fn why(&self, handle: &str) -> Result<Why, CtlError> {
        self.get(&format!("/api/v1/volumes/{handle}/why")).await
    }
}

fn bytes_text(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn age_text(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

/// `volume-central workers`: one line per worker (volumes, bytes, free disk, pressure,
/// last report, revision lag).
pub fn workers_text(workers: &[WorkerRow], now: DateTime<Utc>) -> String {
    let mut out = format!(
        "{:<24} {:>8} {:>10} {:>10} {:<8} {:<12} {:>5} {:>6} {:>7}\n",
        "WORKER",
        "VOLUMES",
        "BYTES",
        "DISK FREE",
        "PRESSURE",
        "LAST REPORT",
        "LAG",
        "FAILED",
        "BLOCKED"
    );
    for w in workers {
        let line = match &w.last_report {
            None => format!(
                "{:<24} {:>8} {:>10} {:>10} {:<8} {:<12} {:>5} {:>6} {:>7}",
                w.name, "-", "-", "-", "-", "never", "-", "-", "-"
            ),
            Some(r) => {
                let free = match (r.disk_free_bytes, r.disk_total_bytes) {
                    (Some(f), Some(t)) if t > 0 => {
                        format!("{:.0}%", f as f64 * 100.0 / t as f64)
                    }
                    _ => "-".into(),
                };
                let pressure = match r.pressure {
                    Some(true) => "YES",
                    Some(false) => "no",
                    None => "-",
                };
                let lag = r
                    .revision_seen
                    .map(|s| (w.revision - s).max(0).to_string())
                    .unwrap_or_else(|| "-".into());
                format!(
                    "{:<24} {:>8} {:>10} {:>10} {:<8} {:<12} {:>5} {:>6} {:>7}",
                    w.name,
                    r.volumes,
                    bytes_text(r.volume_bytes),
                    free,
                    pressure,
                    age_text(r.at, now),
                    lag,
                    r.failed,
                    r.blocked
                )
            }
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn volume_line(v: &VolumeRow) -> String {
    let kept = if v.kept_by.is_empty() {
        "garbage".to_string()
    } else {
        v.kept_by.join(", ")
    };
    let missing = if v.missing_since.is_some() {
        " (missing)"
    } else {
        ""
    };
    format!("{} {}{missing}  {kept}", v.handle, v.state)
}

/// `volume-central volumes --worker W`: one line per volume, or with `tree` each child
/// indented under its parent.
pub fn volumes_text(volumes: &[VolumeRow], tree: bool) -> String {
    let mut out = String::new();
    if !tree {
        for v in volumes {
            let parent = v
                .parent
                .as_ref()
                .map(|p| format!("  (child of {p})"))
                .unwrap_or_default();
            out.push_str(&format!("{}{parent}\n", volume_line(v)));
        }
        return out;
    }
    let known: std::collections::HashSet<&str> =
        volumes.iter().map(|v| v.handle.as_str()).collect();
    let mut children: BTreeMap<&str, Vec<&VolumeRow>> = BTreeMap::new();
    let mut roots = Vec::new();
    for v in volumes {
        match &v.parent {
            Some(p) if known.contains(p.as_str()) => {
                children.entry(p.as_str()).or_default().push(v)
            }
            _ => roots.push(v),
        }
    }
    // Depth-first with an explicit stack: a deep chain cannot overflow it.
    let mut stack: Vec<(&VolumeRow, usize)> = roots.into_iter().rev().map(|v| (v, 0)).collect();
    while let Some((v, depth)) = stack.pop() {
        out.push_str(&format!("{}{}\n", "  ".repeat(depth), volume_line(v)));
        if let Some(kids) = children.get(v.handle.as_str()) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    out
}

/// `volume-central why H`: the explanation, then the owners one per line.
pub fn why_text(w: &Why) -> String {
    let mut out = format!(
        "{} on worker {} ({}): {}\n",
        w.handle,
        w.worker,
        w.state,
        serde_json::to_value(w.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    out.push_str(&format!("{}\n", w.explanation));
    for o in &w.owners {
        let line = serde_json::to_value(o)
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push_str(&format!("  {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WorkerFigures;
    use protocol::{Handle, VolumeState};

    fn row(h: &str, parent: Option<&str>) -> VolumeRow {
        VolumeRow {
            handle: Handle::new(h).expect("handle"),
            worker: "w1".into(),
            state: VolumeState::Initialized,
            parent: parent.map(|p| Handle::new(p).expect("handle")),
            container: None,
            resource_cache: None,
            base_resource_type: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            missing_since: None,
            kept_by: Vec::new(),
        }
    }

    #[test]
    fn tree_indents_each_child_under_its_parent() {
        let vols = [
            row("a", None),
            row("b", Some("a")),
            row("c", Some("b")),
            row("d", None),
            row("e", Some("a")),
        ];
        let text = volumes_text(&vols, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("a "), "{text}");
        assert!(lines[1].starts_with("  b "), "{text}");
        assert!(lines[2].starts_with("    c "), "{text}");
        assert!(lines[3].starts_with("  e "), "{text}");
        assert!(lines[4].starts_with("d "), "{text}");
        assert!(lines[0].ends_with("garbage"), "{text}");
    }

    #[test]
    fn workers_table_shows_lag_pressure_and_never_reported() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(100);
        let workers = [
            WorkerRow {
                name: "w1".into(),
                revision: 9,
                created_at: DateTime::<Utc>::UNIX_EPOCH,
                last_report: Some(WorkerFigures {
                    at: DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(70),
                    revision_seen: Some(7),
                    volumes: 3,
                    volume_bytes: 3 << 20,
                    disk_total_bytes: Some(100),
                    disk_free_bytes: Some(5),
                    pressure: Some(true),
                    failed: 1,
                    blocked: 0,
                }),
                retained_bytes: None,
                evicted_bytes: 0,
            },
            WorkerRow {
                name: "w2".into(),
                revision: 1,
                created_at: DateTime::<Utc>::UNIX_EPOCH,
                last_report: None,
                retained_bytes: None,
                evicted_bytes: 0,
            },
        ];
        let text = workers_text(&workers, now);
        let w1 = text.lines().nth(1).expect("w1 line");
        for part in ["w1", "3.0 MiB", "5%", "YES", "30s ago", " 2 "] {
            assert!(w1.contains(part), "{part:?} in {w1:?}");
        }
        assert!(
            text.lines().nth(2).expect("w2 line").contains("never"),
            "{text}"
        );
    }
}
