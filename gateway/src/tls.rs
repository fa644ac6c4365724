//! TLS for the QUIC listener and the client: TLS 1.3 always (QUIC requires
//! it), a certificate from PEM files or, when none is configured, a
//! self-signed one made at start-up whose SHA-256 fingerprint is printed so
//! clients can pin it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("a fingerprint must be 64 hex digits (colons allowed), got '{0}'")]
    BadFingerprint(String),
    #[error("QUIC needs TLS 1.3 with an AEAD suite QUIC supports: {0}")]
    Quic(String),
    #[error("tls.client_ca: {0}")]
    ClientCa(String),
}

/// The server's certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// True when made at start-up rather than loaded.
    pub self_signed: bool,
    /// The leaf certificate as PEM, when made at start-up: clients can trust
    /// it with `--ca`.
    pub self_signed_pem: Option<String>,
}

impl Identity {
    /// Loads the chain and key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert.display().to_string(),
            });
        }
        let key_pem = read(key)?;
        let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|source| TlsError::Read {
                path: key.display().to_string(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey {
                path: key.display().to_string(),
            })?;
        Ok(Identity {
            chain,
            key: key_der,
            self_signed: false,
            self_signed_pem: None,
        })
    }

    /// Makes a self-signed certificate for `localhost`, 127.0.0.1 and ::1
    /// plus the given names.
    pub fn self_signed(extra_names: &[String]) -> Result<Self, TlsError> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        names.extend(extra_names.iter().cloned());
        let certified = rcgen::generate_simple_self_signed(names)?;
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        Ok(Identity {
            chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key),
            self_signed: true,
            self_signed_pem: Some(certified.cert.pem()),
        })
    }

    /// The leaf certificate's SHA-256 fingerprint.
    // An identity is made only with a non-empty chain (a PEM file without a
    // certificate is refused at load): a local invariant.
    #[allow(clippy::indexing_slicing)]
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }
}

/// A certificate's SHA-256 fingerprint as colon-separated upper-case hex.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_fingerprint(s: &str) -> Result<Vec<u8>, TlsError> {
    let hex: String = s
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(s.into()));
    }
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::BadFingerprint(s.into()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the CA certificates of a PEM file.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(roots)
}

/// A rustls server configuration: TLS 1.3, the given ALPN names, and with
/// `client_roots` client certificates required and verified against them
/// (chain, validity period, client-auth usage).
pub fn server_config(
    identity: &Identity,
    alpn: &[&[u8]],
    client_roots: Option<&Arc<rustls::RootCertStore>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // 0-RTT stays off (DESIGN.md, "Security and limits").
    config.max_early_data_size = 0;
    Ok(config)
}

/// How a client decides to trust the server.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Certificates (PEM) of the authorities to trust, e.g. the server's own
    /// self-signed certificate.
    CaFile(std::path::PathBuf),
    /// Accept exactly the certificate with this SHA-256 fingerprint, as the
    /// server prints it at start-up.
    Pinned(String),
    /// Accept any certificate. For testing only: anyone on the path can
    /// impersonate the server.
    Insecure,
}

/// The identity of a verified peer certificate chain: the leaf's first URI
/// subject alternative name (a SPIFFE ID, say), else its first DNS name,
/// else `sha256:` and its fingerprint.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = chain.first()?;
    let named = webpki::EndEntityCert::try_from(leaf).ok().and_then(|cert| {
        cert.valid_uri_names()
            .next()
            .or_else(|| cert.valid_dns_names().next())
            .map(str::to_owned)
    });
    Some(named.unwrap_or_else(|| format!("sha256:{}", fingerprint(leaf))))
}

/// A rustls client configuration for QUIC with the given trust and ALPN.
pub fn client_config(trust: &Trust, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(trust, alpn, None)
}

/// As [`client_config`], presenting `certificate` (chain and key) to a
/// server that asks for one (mTLS).
pub fn client_config_with(
    trust: &Trust,
    alpn: &[&[u8]],
    certificate: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        Trust::CaFile(path) => builder.with_root_certificates(load_roots(path)?),
        Trust::Pinned(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                pinned: Some(parse_fingerprint(fp)?),
                provider: provider(),
            })),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                pinned: None,
                provider: provider(),
            })),
    };
    let mut config = match certificate {
        None => builder.with_no_client_auth(),
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// Checks the leaf against a pinned fingerprint (or nothing, when insecure);
/// handshake signatures are still verified, so the peer must hold the key.
#[derive(Debug)]
struct Verifier {
    pinned: Option<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(pinned) = &self.pinned {
            let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
            if digest.as_ref() != pinned.as_slice() {
                return Err(rustls::Error::General(format!(
                    "server certificate fingerprint {} does not match the pinned one",
                    fingerprint(end_entity)
                )));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_the_parser() {
        let id = Identity::self_signed(&[]).expect("rcgen makes a certificate");
        let fp = id.fingerprint();
        assert_eq!(fp.len(), 32 * 3 - 1);
        let bytes = parse_fingerprint(&fp).expect("own format parses");
        let digest = ring::digest::digest(&ring::digest::SHA256, id.chain[0].as_ref());
        assert_eq!(bytes, digest.as_ref());
        assert!(parse_fingerprint("AB:CD").is_err());
    }

    #[test]
    fn leaf_pem_parses_back_to_the_same_certificate() {
        let id = Identity::self_signed(&[]).expect("rcgen makes a certificate");
        let pem = id.self_signed_pem.clone().expect("made at start-up");
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("valid PEM");
        assert_eq!(certs, id.chain);
    }
}
