//! The HTTP client for the central API. Both dialects; timeouts, a bearer token, a body
//! size limit, and errors that say what went wrong with which request.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use protocol::concourse::{self, DestroyingList, ReportedHandles};
use protocol::native::{self, DesiredSet, ResourceTypesReport, VolumeReport};
use protocol::{decode, Handle};
use reqwest::{header, Method, StatusCode};

use super::tls;
use crate::config::Config;

/// A failed call to the central API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: cannot connect: {message}; check central.url and that the central API is up")]
    Connect {
        method: Method,
        url: String,
        message: String,
    },
    #[error("{method} {url}: TLS with {host} failed: {message}")]
    Tls {
        method: Method,
        url: String,
        host: String,
        message: String,
    },
    #[error("{method} {url}: no answer within the timeout")]
    Timeout { method: Method, url: String },
    #[error("{method} {url}: {message}")]
    Transport {
        method: Method,
        url: String,
        message: String,
    },
    #[error("{method} {url}: answered {status}: {body}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{method} {url}: the answer is larger than {limit} bytes (central.max_body_bytes)")]
    TooLarge {
        method: Method,
        url: String,
        limit: u64,
    },
    #[error("{method} {url}: {source}")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: protocol::DecodeError,
    },
    #[error("building the HTTP client: {0}")]
    Build(String),
}

impl ClientError {
    /// A short label for metrics: `connect`, `timeout`, `status_5xx`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Tls { .. } => "tls",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Transport { .. } => "transport",
            ClientError::Status { status, .. } if status.is_server_error() => "status_5xx",
            ClientError::Status { .. } => "status_4xx",
            ClientError::TooLarge { .. } => "too_large",
            ClientError::Decode { .. } => "malformed",
            ClientError::Build(_) => "build",
        }
    }
}

/// What a poll of the native desired set gave.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredAnswer {
    /// 200: a new answer, with its ETag if one was sent.
    Fresh {
        set: DesiredSet,
        etag: Option<String>,
    },
    /// 304: the answer held is still current.
    NotModified,
    /// 404: the central side does not know this worker (yet).
    UnknownWorker,
}

/// A client for one worker's calls to the central API.
#[derive(Clone)]
pub struct CentralClient {
    http: reqwest::Client,
    base: String,
    worker: String,
    token: Option<String>,
    max_body: u64,
}

impl CentralClient {
    /// Builds a client from the configuration (reads the token file and `central.ca_file`).
    pub fn from_config(config: &Config) -> Result<CentralClient, ClientError> {
        let token = config
            .token()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        CentralClient::new(
            &config.central.url,
            &config.worker_name,
            token,
            config.central.connect_timeout,
            config.central.request_timeout,
            config.central.max_body_bytes,
            config.central.ca_file.as_deref(),
        )
    }

    pub fn new(
        base: &str,
        worker: &str,
        token: Option<String>,
        connect_timeout: Duration,
        request_timeout: Duration,
        max_body: u64,
        ca_file: Option<&Path>,
    ) -> Result<CentralClient, ClientError> {
        let mut builder = CentralClient::http_builder(connect_timeout, request_timeout);
        if let Some(path) = ca_file {
            for cert in tls::load_ca_file(path).map_err(|e| ClientError::Build(e.to_string()))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| match ca_file {
            Some(path) => ClientError::Build(format!(
                "central.ca_file {}: a certificate in it cannot be used: {}",
                path.display(),
                error_chain(&e)
            )),
            None => ClientError::Build(error_chain(&e)),
        })?;
        Ok(CentralClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            worker: worker.to_string(),
            token,
            max_body,
        })
    }

    /// A client on an existing reqwest client, sharing its connection pool and settings
    /// (timeouts, user agent): many workers' calls from one process, as the fleet
    /// simulator makes them. Every request is the same as [`CentralClient::new`]'s.
    pub fn with_http(
        http: reqwest::Client,
        base: &str,
        worker: &str,
        token: Option<String>,
        max_body: u64,
    ) -> CentralClient {
        CentralClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            worker: worker.to_string(),
            token,
            max_body,
        }
    }

    /// The reqwest client builder [`CentralClient::new`] starts from: timeouts and the
    /// agent's user agent.
    pub fn http_builder(
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .user_agent(concat!("volume-agent/", env!("CARGO_PKG_VERSION")))
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        rb.send().await.map_err(|e| classify(method, url, e))
    }

    /// Reads the body, refusing more than the configured limit without buffering it.
    async fn body(
        &self,
        method: &Method,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<Vec<u8>, ClientError> {
        let too_large = || ClientError::TooLarge {
            method: method.clone(),
            url: url.to_string(),
            limit: self.max_body,
        };
        if resp.content_length().is_some_and(|n| n > self.max_body) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(method.clone(), url, e))?;
            if (body.len() + chunk.len()) as u64 > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn expect_success(
        &self,
        method: Method,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<(), ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = self.body(&method, url, resp).await.unwrap_or_default();
        Err(ClientError::Status {
            method,
            url: url.to_string(),
            status,
            body: snippet(&body),
        })
    }

    /// Native: `PUT .../base-resource-types`.
    pub async fn put_resource_types(
        &self,
        report: &ResourceTypesReport,
    ) -> Result<(), ClientError> {
        let url = self.url(&native::resource_types_path(&self.worker));
        let rb = self.request(Method::PUT, &url).json(report);
        let resp = self.send(Method::PUT, &url, rb).await?;
        self.expect_success(Method::PUT, &url, resp).await
    }

    /// Native: `GET .../volumes/desired`, conditional on `etag`.
    pub async fn get_desired(&self, etag: Option<&str>) -> Result<DesiredAnswer, ClientError> {
        let url = self.url(&native::desired_path(&self.worker));
        let mut rb = self.request(Method::GET, &url);
        if let Some(tag) = etag {
            rb = rb.header(header::IF_NONE_MATCH, native::quote_etag(tag));
        }
        let resp = self.send(Method::GET, &url, rb).await?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => Ok(DesiredAnswer::NotModified),
            StatusCode::NOT_FOUND => Ok(DesiredAnswer::UnknownWorker),
            s if s.is_success() => {
                let etag = resp
                    .headers()
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = self.body(&Method::GET, &url, resp).await?;
                let set = decode("desired set", &body).map_err(|source| ClientError::Decode {
                    method: Method::GET,
                    url: url.clone(),
                    source,
                })?;
                Ok(DesiredAnswer::Fresh { set, etag })
            }
            _ => {
                self.expect_success(Method::GET, &url, resp).await?;
                unreachable_status(&url)
            }
        }
    }

    /// Native: `PUT .../volumes/report`.
    pub async fn put_report(&self, report: &VolumeReport) -> Result<(), ClientError> {
        let url = self.url(&native::report_path(&self.worker));
        let rb = self.request(Method::PUT, &url).json(report);
        let resp = self.send(Method::PUT, &url, rb).await?;
        self.expect_success(Method::PUT, &url, resp).await
    }

    /// Concourse: `GET /api/v1/volumes/destroying?worker_name=W` (`null` is `[]`).
    pub async fn get_destroying(&self) -> Result<Vec<Handle>, ClientError> {
        let url = self.url(concourse::DESTROYING_PATH);
        let rb = self
            .request(Method::GET, &url)
            .query(&[("worker_name", &self.worker)]);
        let resp = self.send(Method::GET, &url, rb).await?;
        if !resp.status().is_success() {
            self.expect_success(Method::GET, &url, resp).await?;
            return unreachable_status(&url);
        }
        let body = self.body(&Method::GET, &url, resp).await?;
        let list: DestroyingList =
            decode("destroying list", &body).map_err(|source| ClientError::Decode {
                method: Method::GET,
                url: url.clone(),
                source,
            })?;
        Ok(list.0)
    }

    /// Concourse: `PUT /api/v1/volumes/report?worker_name=W` with every handle present.
    pub async fn put_concourse_report(&self, handles: Vec<Handle>) -> Result<(), ClientError> {
        let url = self.url(concourse::REPORT_PATH);
        let rb = self
            .request(Method::PUT, &url)
            .query(&[("worker_name", &self.worker)])
            .json(&ReportedHandles(handles));
        let resp = self.send(Method::PUT, &url, rb).await?;
        self.expect_success(Method::PUT, &url, resp).await
    }
}

fn unreachable_status<T>(url: &str) -> Result<T, ClientError> {
    Err(ClientError::Transport {
        method: Method::GET,
        url: url.to_string(),
        message: "unexpected answer".into(),
    })
}

fn classify(method: Method, url: &str, e: reqwest::Error) -> ClientError {
    let url = url.to_string();
    if let Some(message) = tls::tls_failure(&e) {
        let host = e
            .url()
            .and_then(|u| u.host_str())
            .unwrap_or("the central API")
            .to_string();
        ClientError::Tls {
            method,
            url,
            host,
            message,
        }
    } else if e.is_timeout() {
        ClientError::Timeout { method, url }
    } else if e.is_connect() {
        ClientError::Connect {
            method,
            url,
            message: error_chain(&e),
        }
    } else {
        ClientError::Transport {
            method,
            url,
            message: error_chain(&e),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}
