//! Optional HTTPS serving (`[tls]`): the certificate chain and key are read once at
//! start; every problem names the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read tls.{key} {path}: {source}; point tls.{key} at a readable PEM file")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.{key} {path} {problem}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("tls.cert_file {cert} and tls.key_file {key} cannot serve: {reason}; use the key the certificate was issued for")]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_problem(key: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Pem {
        key,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// The rustls server configuration for `tls` (ring provider, TLS 1.2 and 1.3, HTTP/1.1
/// and HTTP/2 by ALPN).
pub fn server_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    let cert_pem = read("cert_file", &tls.cert_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            pem_problem(
                "cert_file",
                &tls.cert_file,
                format!("is not valid PEM: {err}"),
            )
        })?;
    if certs.is_empty() {
        return Err(pem_problem(
            "cert_file",
            &tls.cert_file,
            "holds no `BEGIN CERTIFICATE` block; put the server certificate (then its intermediates) there in PEM",
        ));
    }
    let key_pem = read("key_file", &tls.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => pem_problem(
            "key_file",
            &tls.key_file,
            "holds no private key (`BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)",
        ),
        other => pem_problem("key_file", &tls.key_file, format!("is not valid PEM: {other}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rejected = |err: rustls::Error| TlsError::Rejected {
        cert: tls.cert_file.clone(),
        key: tls.key_file.clone(),
        reason: err.to_string(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rejected)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
