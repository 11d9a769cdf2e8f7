//! TLS towards the central API: the system trust store (rustls with the platform's native
//! roots) plus the PEM certificates of `central.ca_file`, for a central API behind an
//! internal CA; and failures that say which file or which host is the problem.

use std::path::{Path, PathBuf};

/// `central.ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("central.ca_file {path}: cannot read it: {source}; point central.ca_file at a readable PEM file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("central.ca_file {path}: {message}; it must hold PEM certificates (-----BEGIN CERTIFICATE-----)")]
    Invalid { path: PathBuf, message: String },
    #[error("central.ca_file {path}: holds no certificate; it must hold PEM certificates (-----BEGIN CERTIFICATE-----)")]
    Empty { path: PathBuf },
}

/// The certificates in the PEM file `path`, to be trusted besides the system's.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| CaFileError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// When `e` failed in the TLS handshake, what went wrong, said for an operator.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    find_rustls(e).map(explain)
}

/// The rustls error somewhere in `e`'s chain. The TLS connector wraps it in an
/// `io::Error` (twice, by the HTTPS connector), and `io::Error::source` skips the error
/// it wraps, so each `io::Error` is opened with `get_ref` as well.
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(tls) = find_rustls(inner) {
            return Some(tls);
        }
    }
    e.source().and_then(find_rustls)
}

fn explain(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let fix = match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the server's certificate is not signed by a CA this agent trusts; \
             add that CA (PEM) to central.ca_file or to the system trust store"
        }
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name this host; \
             use the host name the certificate was issued for in central.url"
        }
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "the server's certificate is outside its validity period (check both clocks)",
        rustls::Error::InvalidCertificate(_) => {
            "the server's certificate was refused; check central.ca_file and the server's certificate"
        }
        _ => "the TLS handshake failed; check that central.url is an https:// server",
    };
    format!("{e}: {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = load_ca_file(&missing).expect_err("missing");
        assert!(matches!(e, CaFileError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = load_ca_file(&empty).expect_err("empty");
        assert!(matches!(e, CaFileError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("empty.pem"), "{e}");
        assert!(e.to_string().contains("no certificate"), "{e}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = load_ca_file(&broken).expect_err("broken");
        assert!(e.to_string().contains("broken.pem"), "{e}");
    }

    #[test]
    fn explains_an_unknown_issuer() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let msg = tls_failure(&io).expect("a TLS failure");
        assert!(msg.contains("central.ca_file"), "{msg}");
        // As the HTTPS connector hands it over: wrapped once more.
        let twice = std::io::Error::other(io);
        let msg = tls_failure(&twice).expect("a wrapped TLS failure");
        assert!(msg.contains("UnknownIssuer"), "{msg}");
        let plain = std::io::Error::other("connection refused");
        assert_eq!(tls_failure(&plain), None);
    }
}
