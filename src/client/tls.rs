//! HTTPS for the SDK: rustls with the ring provider, passed explicitly so that no
//! process-wide default provider is needed (or disturbed).

use crate::error::Error;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::sync::Arc;

/// What the builder collected about certificates.
#[derive(Debug, Clone)]
pub(crate) struct TlsSettings {
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub built_in_roots: bool,
    pub accept_invalid: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            extra_roots: Vec::new(),
            built_in_roots: true,
            accept_invalid: false,
        }
    }
}

/// Parses every certificate in a PEM bundle.
pub(crate) fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("root certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid("root certificate PEM holds no certificate"));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for these settings, offering `h2` (or `http/1.1`).
pub(crate) fn client_config(
    settings: &TlsSettings,
    http1_only: bool,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::invalid(format!("TLS setup: {e}")))?;
    let mut config = if settings.accept_invalid {
        tracing::warn!(
            "TLS certificate verification is OFF (danger_accept_invalid_certificates): anyone on the network path can impersonate the lock server"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        if settings.built_in_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in &settings.extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| Error::invalid(format!("root certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::invalid(
                "no root certificates: built-in roots are off and none were added",
            ));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![if http1_only {
        b"http/1.1".to_vec()
    } else {
        b"h2".to_vec()
    }];
    Ok(Arc::new(config))
}

/// The server name to verify for `host`.
pub(crate) fn server_name(host: &str) -> std::io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// A TLS handshake failed: the certificate, the name, or the protocol. Not worth retrying.
#[derive(Debug)]
pub(crate) struct TlsFailure(pub String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// The verifier behind `danger_accept_invalid_certificates`: any certificate, any name.
/// Handshake signatures are still checked, so the session is at least with whoever holds
/// the presented certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
