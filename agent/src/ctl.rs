//! The operator commands that talk to the running daemon's local API.

use std::path::Path;
use std::time::Duration;

use protocol::local::{ErrorBody, PlanView, VolumeJson};

use crate::config::{ApiConfig, Config};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the volume-agent daemon at {url}: {message}; is it running (`systemctl status volume-agent`)? Use --api to point elsewhere")]
    Unreachable { url: String, message: String },
    #[error("{url}: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: unexpected answer: {message}")]
    Malformed { url: String, message: String },
}

/// Where the daemon listens: `--api`, else the config's `api.listen`, else the default.
/// Either `http://HOST:PORT` or `unix:/PATH` (a unix socket).
pub fn api_base(explicit: Option<&str>, config: &Path) -> String {
    if let Some(url) = explicit {
        return url.trim_end_matches('/').to_string();
    }
    std::fs::read_to_string(config)
        .ok()
        .and_then(|text| Config::parse(&text, config, std::env::vars()).ok())
        .map(|c| c.api.listen)
        .unwrap_or(ApiConfig::default().listen)
        .api_base()
}

pub struct Ctl {
    /// What messages show: the URL, or `unix:/PATH` for a socket.
    base: String,
    /// What requests go to: the URL, or `http://localhost` over the socket.
    url_base: String,
    http: reqwest::Client,
}

impl Ctl {
    /// `base` is `http://HOST:PORT` or `unix:/PATH`.
    pub fn new(base: String) -> Result<Ctl, CtlError> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        let url_base = match base.strip_prefix("unix:") {
            Some(path) => {
                builder = builder.unix_socket(Path::new(path));
                "http://localhost".to_string()
            }
            None => base.clone(),
        };
        let http = builder.build().map_err(|e| CtlError::Unreachable {
            url: base.clone(),
            message: e.to_string(),
        })?;
        Ok(Ctl {
            base,
            url_base,
            http,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Vec<u8>, CtlError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .request(method, format!("{}{}", self.url_base, path))
            .send()
            .await
            .map_err(|e| CtlError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| CtlError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(CtlError::Refused {
                url,
                status: status.as_u16(),
                message,
            });
        }
        Ok(body.to_vec())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        let body = self.call(reqwest::Method::GET, path).await?;
        serde_json::from_slice(&body).map_err(|e| CtlError::Malformed {
            url: format!("{}{}", self.base, path),
            message: e.to_string(),
        })
    }

    pub async fn list(&self) -> Result<Vec<VolumeJson>, CtlError> {
        self.get_json("/inventory").await
    }

    /// Bytes per volume; empty when the daemon has not measured yet.
    pub async fn usage(&self) -> Result<std::collections::BTreeMap<String, u64>, CtlError> {
        self.get_json("/usage").await
    }

    pub async fn inspect(&self, handle: &str) -> Result<VolumeJson, CtlError> {
        self.get_json(&format!("/inventory/{handle}")).await
    }

    pub async fn plan(&self) -> Result<PlanView, CtlError> {
        self.get_json("/gc/plan").await
    }

    pub async fn reset_revision(&self) -> Result<(), CtlError> {
        self.call(reqwest::Method::POST, "/gc/reset-revision")
            .await
            .map(|_| ())
    }
}

/// A fixed-width table of volumes, with their measured bytes where known.
pub fn volumes_table(
    volumes: &[VolumeJson],
    usage: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut rows = vec![[
        "HANDLE".to_string(),
        "STATE".to_string(),
        "PARENT".to_string(),
        "BYTES".to_string(),
        "PATH".to_string(),
    ]];
    for v in volumes {
        let state = if v.missing {
            format!("{} (missing)", v.state)
        } else {
            v.state.to_string()
        };
        rows.push([
            v.handle.to_string(),
            state,
            v.parent
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into()),
            usage
                .get(v.handle.as_str())
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into()),
            v.path.clone(),
        ]);
    }
    table(&rows)
}

/// The plan, one line per volume.
pub fn plan_table(plan: &PlanView) -> String {
    let mut out = String::new();
    if let Some(r) = plan.revision {
        out.push_str(&format!("desired-set revision: {r}\n"));
    }
    if let Some(refused) = &plan.refused {
        out.push_str(&format!("note: {refused}\n"));
    }
    let mut rows = vec![[
        "HANDLE".to_string(),
        "ACTION".to_string(),
        "WHY".to_string(),
    ]];
    for a in &plan.actions {
        rows.push([a.handle.to_string(), a.action.clone(), a.reason.clone()]);
    }
    out.push_str(&table(&rows));
    for q in &plan.quarantined {
        out.push_str(&format!(
            "quarantined (no record; kept, never deleted by the agent): {q}\n"
        ));
    }
    out
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == N {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
