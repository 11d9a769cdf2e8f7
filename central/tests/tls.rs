//! HTTPS serving with a certificate from a CA made in the test.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use reqwest::StatusCode;
use volume_central::auth::{self, Subject};
use volume_central::TlsConfig;

struct Pki {
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
    other_key: PathBuf,
}

/// A CA, a server certificate it signs for `localhost` and 127.0.0.1, and an unrelated key.
fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "volume-central test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    Pki {
        ca_pem: ca.pem(),
        cert: write("cert.pem", cert.pem()),
        key: write("key.pem", key.serialize_pem()),
        other_key: write(
            "other.pem",
            KeyPair::generate().expect("other key").serialize_pem(),
        ),
    }
}

#[tokio::test]
async fn serves_https_to_a_client_trusting_the_test_ca_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let (mut config, db) = fresh_db_with_auth().await;
    let token = auth::issue(&db, &Subject::Worker("w1".into()))
        .await
        .expect("issue")
        .token;
    config.tls = Some(TlsConfig {
        cert_file: pki.cert.clone(),
        key_file: pki.key.clone(),
    });
    let server = volume_central::start(&config).await.expect("start");
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("ca"))
        .tls_built_in_root_certs(false)
        .build()
        .expect("client");
    let resp = trusting
        .get(format!(
            "{}/api/v1/workers/w1/volumes/desired",
            server.url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request over TLS");
    assert_eq!(resp.status(), StatusCode::OK);
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .expect("client");
    let err = untrusting
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .expect_err("a client without the CA refuses the server");
    assert!(err.is_connect(), "{err:?}");
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr()))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.expect("plain").status().is_success(),
        "plain HTTP is not served"
    );
    server.stop().await;
}

#[tokio::test]
async fn tls_problems_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let (mut config, _db) = fresh_db().await;
    let cases = [
        (dir.path().join("absent.pem"), pki.key.clone(), "absent.pem"),
        (pki.key.clone(), pki.key.clone(), "no `BEGIN CERTIFICATE`"),
        (pki.cert.clone(), pki.cert.clone(), "holds no private key"),
        (pki.cert.clone(), pki.other_key.clone(), "other.pem"),
    ];
    for (cert, key, expect) in cases {
        config.tls = Some(TlsConfig {
            cert_file: cert,
            key_file: key,
        });
        let err = match volume_central::start(&config).await {
            Ok(_) => panic!("started with a bad TLS setup ({expect})"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains(expect) && err.contains("tls."), "{err}");
    }
}
