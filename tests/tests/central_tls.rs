//! The agent as a TLS client of the central API: a test CA made here (rcgen), a small
//! TLS server answering the native dialect, and the real agent trusting the CA through
//! `central.ca_file` — or refusing a server it has no reason to trust, with an error that
//! names the host and the fix.

use std::sync::{Arc, Mutex};

use e2e::*;
use protocol::native::DesiredSet;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    Ca {
        pem: cert.pem(),
        cert,
        key,
    }
}

/// A TLS server on loopback with a certificate for 127.0.0.1 signed by `ca`, answering
/// the native dialect: an empty desired set, 204 to every report. Returns its URL and the
/// request lines it served.
async fn tls_central(ca: &Ca) -> (String, Arc<Mutex<Vec<String>>>) {
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("server certificate");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = log.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = serve_one(&mut tls, &log).await;
                }
            });
        }
    });
    (url, seen)
}

/// Reads one request (head and `Content-Length` body) and answers it, closing after.
async fn serve_one(
    tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = head.lines().next().unwrap_or("").to_string();
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(line.clone());
    let response = if line.starts_with("GET ") && line.contains("/volumes/desired") {
        let body = serde_json::to_string(&DesiredSet {
            worker: "w1".into(),
            revision: 1,
            as_of: chrono::Utc::now(),
            volumes: vec![],
            destroying: vec![],
        })
        .expect("json");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"1\"\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
    };
    tls.write_all(response.as_bytes()).await?;
    tls.shutdown().await
}

fn ca_file(agent_dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = agent_dir.join(name);
    std::fs::write(&path, pem).expect("write CA file");
    path
}

// Multi-threaded: the TLS server answers while `Agent::start` blocks on readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_talks_to_central_over_tls_trusting_central_ca_file() {
    let ca = ca("volume-agent test CA");
    let (url, seen) = tls_central(&ca).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = ca_file(dir.path(), "central-ca.pem", &ca.pem);
    let agent = Agent::start(
        &url,
        &AgentSettings {
            central_extra: format!("ca_file = {pem:?}\n"),
            ..AgentSettings::default()
        },
    );
    let local = Local::new(&agent);
    eventually("the agent polls and reports over TLS", || async {
        let lines = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lines.iter().any(|l| l.contains("/volumes/desired"))
            && lines
                .iter()
                .any(|l| l.starts_with("PUT ") && l.contains("/volumes/report"))
    })
    .await;
    let metrics = local.metrics().await;
    assert!(!metrics.contains("outcome=\"tls\""), "{metrics}");
}

// Multi-threaded: the TLS server answers while `Agent::start` blocks on readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_is_refused_naming_the_host_and_the_fix() {
    let trusted = ca("the CA the agent trusts");
    let other = ca("some other CA");
    let (url, seen) = tls_central(&other).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = ca_file(dir.path(), "central-ca.pem", &trusted.pem);
    // With the wrong CA in central.ca_file, and with the system trust store alone.
    for central_extra in [format!("ca_file = {pem:?}\n"), String::new()] {
        let agent = Agent::start(
            &url,
            &AgentSettings {
                central_extra,
                ..AgentSettings::default()
            },
        );
        let local = Local::new(&agent);
        local
            .wait_counter(
                "a desired-set poll fails on TLS",
                "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"tls\"}",
                1.0,
            )
            .await;
        let log = agent.log();
        let line = log
            .lines()
            .find(|l| l.contains("TLS with 127.0.0.1 failed"))
            .unwrap_or_else(|| panic!("no TLS error in the log:\n{log}"));
        assert!(line.contains("central.ca_file"), "{line}");
        assert!(line.contains("UnknownIssuer"), "{line}");
    }
    assert!(
        seen.lock().unwrap_or_else(|p| p.into_inner()).is_empty(),
        "no request reached the untrusted server"
    );
}

#[test]
fn an_unusable_ca_file_stops_the_agent_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("missing.pem", None, "cannot read it"),
        ("empty.pem", Some("no PEM here\n"), "holds no certificate"),
    ];
    for (name, contents, problem) in cases {
        let pem = dir.path().join(name);
        if let Some(text) = contents {
            std::fs::write(&pem, text).expect("write");
        }
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "worker_name = \"w1\"\n[central]\nurl = \"https://127.0.0.1:9\"\nca_file = {pem:?}\n\
                 [volumes]\nroot = {:?}\ndriver = \"naive\"\n[state]\ndir = {:?}\n\
                 [resource_types]\ndir = {:?}\n[api]\nlisten = \"127.0.0.1:{}\"\n",
                dir.path().join("volumes"),
                dir.path().join("state"),
                dir.path().join("types"),
                free_port(),
            ),
        )
        .expect("config");
        let out = std::process::Command::new(agent_binary())
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .expect("run agent");
        assert!(!out.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("central.ca_file"), "{stderr}");
        assert!(stderr.contains(name), "{stderr}");
        assert!(stderr.contains(problem), "{stderr}");
    }
}
