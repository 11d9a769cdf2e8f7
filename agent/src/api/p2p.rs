//! Worker-to-worker streaming, as Concourse uses it when P2P volume streaming is on.
//!
//! The ATC asks the destination worker where peers reach it (`GET /p2p-url` on its local
//! API), builds `<scheme>://<host>/volumes/<handle>/stream-in?path=P` from that answer
//! (only scheme and host are kept), and asks the source worker to send the volume there
//! (`PUT /volumes/{h}/stream-p2p-out?path=&encoding=&streamInURL=` on the source's local
//! API). The source streams its tar straight to the destination, chunk by chunk, never
//! whole in memory (baggageclaim buffers the whole archive first).
//!
//! Baggageclaim serves the peers' stream-in on its one API port, to anyone. The agent
//! serves it on a listener of its own (`p2p.listen`) that:
//! - serves nothing but `PUT /volumes/{handle}/stream-in` (every other path is 404);
//! - answers only peers whose address is in `p2p.allowed_networks` (403 otherwise, and
//!   to everyone while that list is empty) and no web browser;
//! - writes only into volumes nothing has read yet ([`crate::inventory::StreamKind::PeerIn`]),
//!   so no peer can change a volume a build, a child or another worker already used;
//! - applies the local stream-in's pool, limits and body idle timeout.
//!
//! Outgoing P2P streams leave from the listen address when it is a specific IP, so the
//! peer's `allowed_networks` can name the workers' P2P addresses exactly.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use ipnet::IpNet;
use serde::Deserialize;
use tracing::warn;

use super::guard::LogBudget;
use super::stream::{self, PathQuery};
use super::{ApiError, ApiState};
use crate::config::P2pConfig;
use crate::contents::archive::Encoding;
use crate::inventory::StreamKind;

/// How long a P2P stream-out waits to connect to the peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a peer's error answer kept for the message.
const PEER_ERROR_BYTES: usize = 4096;

/// Refused peers logged per minute at most.
static REFUSAL_LOG: LogBudget = LogBudget::new(20, Duration::from_secs(60));

/// The host `GET /p2p-url` announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announce {
    /// `p2p.address`, or the listen IP when it is specific.
    Host(String),
    /// `p2p.interface`: its first address, looked up on each call.
    Interface(String),
}

/// The P2P side of this worker, when `p2p.listen` is set.
#[derive(Clone, Debug)]
pub struct P2p {
    /// Where the peer listener is bound (its port is the one announced).
    pub bound: SocketAddr,
    pub announce: Announce,
    /// `p2p.allowed_networks`.
    pub allowed: Arc<[IpNet]>,
}

impl P2p {
    /// The P2P side for `config`, its listener bound at `bound`.
    pub fn new(config: &P2pConfig, bound: SocketAddr) -> P2p {
        let (address, interface) = (config.address.trim(), config.interface.trim());
        let announce = if !address.is_empty() {
            Announce::Host(address.to_owned())
        } else if !interface.is_empty() {
            Announce::Interface(interface.to_owned())
        } else {
            Announce::Host(bound.ip().to_string())
        };
        P2p {
            bound,
            announce,
            allowed: config.allowed_networks.clone().into(),
        }
    }

    /// The URL other workers stream into this one at: `http://HOST:PORT`.
    pub fn url(&self) -> Result<String, ApiError> {
        let host = match &self.announce {
            Announce::Host(h) => h.clone(),
            Announce::Interface(name) => interface_address(name)?.to_string(),
        };
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host,
        };
        Ok(format!("http://{host}:{}", self.bound.port()))
    }

    /// Whether a peer at `ip` may stream in.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed.iter().any(|n| n.contains(&ip))
    }
}

/// The first usable address of the interface `name`: IPv4 first, then a global IPv6.
fn interface_address(name: &str) -> Result<IpAddr, ApiError> {
    let addrs = if_addrs::get_if_addrs().map_err(|e| {
        ApiError::Internal(format!("listing network interfaces for p2p.interface: {e}"))
    })?;
    let mine: Vec<IpAddr> = addrs
        .iter()
        .filter(|i| i.name == name)
        .map(|i| i.ip())
        .collect();
    mine.iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| {
            mine.iter()
                .find(|ip| matches!(ip, IpAddr::V6(v6) if !v6.is_unicast_link_local()))
        })
        .copied()
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "p2p.interface {name:?} has no usable address (or no such interface exists); \
                 name an interface that has one, or set p2p.address instead"
            ))
        })
}

/// The client that sends P2P streams, leaving from `source` when it is a specific IP.
pub fn client(source: Option<IpAddr>) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        // A peer is a worker named by the ATC; no proxy between workers.
        .no_proxy();
    if let Some(ip) = source.filter(|ip| !ip.is_unspecified()) {
        b = b.local_address(ip);
    }
    b.build()
}

/// The local API's P2P routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/p2p-url", web::get().to(p2p_url)).route(
        "/volumes/{handle}/stream-p2p-out",
        web::put().to(stream_p2p_out),
    );
}

/// The peer listener's only route.
pub fn peer_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/volumes/{handle}/stream-in", web::put().to(peer_stream_in))
        .default_service(web::to(super::error::not_found));
}

fn off() -> ApiError {
    ApiError::NotFound(
        "worker-to-worker streaming is off on this worker; set p2p.listen (and p2p.address or \
         p2p.interface) in the agent's config to turn it on"
            .into(),
    )
}

/// `GET /p2p-url`: `http://HOST:PORT` as plain text, like baggageclaim.
async fn p2p_url(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let p2p = state.p2p.clone().ok_or_else(off)?;
    let url = web::block(move || p2p.url()).await??;
    Ok(HttpResponse::Ok().content_type("text/plain").body(url))
}

#[derive(Debug, Deserialize)]
struct P2pOutQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    encoding: String,
    #[serde(default, rename = "streamInURL")]
    stream_in_url: String,
}

/// `PUT /volumes/{h}/stream-p2p-out`: streams `path` of the volume to the peer's
/// stream-in URL; 200 with an empty body once the peer answered 204 (what baggageclaim
/// answers and its client expects), 502 naming the peer's answer otherwise.
async fn stream_p2p_out(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    query: web::Query<P2pOutQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    if q.path.is_empty() {
        return Err(ApiError::BadRequest(
            "the path query parameter is required (the directory or file of the volume to stream)"
                .into(),
        ));
    }
    let encoding = Encoding::parse(&q.encoding).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unsupported encoding {:?}; send gzip, zstd or raw",
            q.encoding
        ))
    })?;
    let url = reqwest::Url::parse(&q.stream_in_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "streamInURL {:?} is not an http(s) URL; pass the URL GetStreamInP2pUrl built",
                q.stream_in_url
            ))
        })?;
    let body = stream::produce(&state, &path, q.path, encoding).await?;
    let shown = without_query(&url);
    let resp = state
        .p2p_client
        .put(url)
        .header(header::CONTENT_ENCODING.as_str(), encoding.as_str())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(|e| {
            ApiError::BadGateway(format!(
                "streaming volume {} to the peer at {shown} failed: {e}",
                path.as_str()
            ))
        })?;
    let status = resp.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        tracing::debug!(handle = %path.as_str(), peer = %shown, "streamed to a peer");
        return Ok(HttpResponse::Ok().finish());
    }
    let said = peer_error(resp).await;
    Err(ApiError::BadGateway(format!(
        "the peer at {shown} refused volume {}: {status}{said}",
        path.as_str()
    )))
}

/// `scheme://host:port/path` of `url`, for messages.
fn without_query(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// The start of a peer's error answer (`: {"error": ...}`), bounded.
async fn peer_error(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= PEER_ERROR_BYTES {
            body.truncate(PEER_ERROR_BYTES);
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = serde_json::from_str::<protocol::local::ErrorBody>(&text)
        .map(|e| e.error)
        .unwrap_or_else(|_| text.trim().to_owned());
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `PUT /volumes/{handle}/stream-in` on the peer listener.
async fn peer_stream_in(
    state: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PathQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let sub = query.into_inner().path;
    stream::receive(&state, &req, &path, sub, body, StreamKind::PeerIn).await
}

/// Middleware in front of the peer listener: only peers in `p2p.allowed_networks`, no
/// web browsers.
pub async fn admit(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let p2p = req
        .app_data::<web::Data<ApiState>>()
        .and_then(|s| s.p2p.clone());
    let peer = req.peer_addr().map(|a| a.ip());
    let refusal = match (p2p, peer) {
        (None, _) => Some(off()),
        (Some(_), None) => Some(ApiError::Forbidden(
            "the peer's address is unknown; peers must connect over TCP".into(),
        )),
        (Some(p2p), Some(ip)) if !p2p.admits(ip) => Some(ApiError::Forbidden(format!(
            "peer {} may not stream into this worker: it is not in p2p.allowed_networks; add its \
             network there in this worker's config",
            ip.to_canonical()
        ))),
        _ => super::guard::browser_refusal(req.headers()),
    };
    if let Some(refusal) = refusal {
        if let Some(held_back) = REFUSAL_LOG.admit(std::time::Instant::now()) {
            warn!(peer = ?peer, path = %req.path(), held_back, "refused a P2P request: {refusal}");
        }
        return Err(refusal.into());
    }
    next.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p2p(listen: &str, address: &str, allowed: &[&str]) -> P2p {
        let config = P2pConfig {
            listen: crate::config::ListenOrOff(Some(listen.parse().expect("listen"))),
            address: address.into(),
            interface: String::new(),
            allowed_networks: allowed.iter().map(|n| n.parse().expect("net")).collect(),
        };
        P2p::new(&config, listen.parse().expect("bound"))
    }

    #[test]
    fn url_names_the_address_and_the_bound_port() {
        let p = p2p("0.0.0.0:7789", "10.1.2.3", &[]);
        assert_eq!(p.url().expect("url"), "http://10.1.2.3:7789");
        let p = p2p("127.0.0.2:4000", "", &[]);
        assert_eq!(p.url().expect("url"), "http://127.0.0.2:4000");
        let p = p2p("[::]:7789", "fd00::7", &[]);
        assert_eq!(p.url().expect("url"), "http://[fd00::7]:7789");
        let p = p2p("0.0.0.0:7789", "worker-3.ci.example", &[]);
        assert_eq!(p.url().expect("url"), "http://worker-3.ci.example:7789");
    }

    #[test]
    fn admits_only_peers_in_allowed_networks() {
        let p = p2p("0.0.0.0:7789", "10.1.2.3", &["10.0.0.0/8", "127.0.0.2/32"]);
        assert!(p.admits("10.9.8.7".parse().expect("ip")));
        assert!(p.admits("127.0.0.2".parse().expect("ip")));
        assert!(p.admits("::ffff:10.9.8.7".parse().expect("mapped ip")));
        assert!(!p.admits("127.0.0.1".parse().expect("ip")));
        assert!(!p.admits("192.168.1.1".parse().expect("ip")));
        let nobody = p2p("0.0.0.0:7789", "10.1.2.3", &[]);
        assert!(!nobody.admits("10.9.8.7".parse().expect("ip")));
    }

    #[test]
    fn loopback_interface_announces_its_ipv4_address() {
        let lo = if_addrs::get_if_addrs().ok().and_then(|a| {
            a.into_iter()
                .find(|i| i.ip().is_loopback() && i.ip().is_ipv4())
        });
        let Some(lo) = lo else {
            eprintln!("skipping: no IPv4 loopback interface here");
            return;
        };
        assert_eq!(interface_address(&lo.name).expect("lo address"), lo.ip());
        let err = interface_address("no-such-interface0").expect_err("unknown interface");
        assert!(err.to_string().contains("p2p.interface"), "{err}");
    }
}
