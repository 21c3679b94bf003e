//! TLS and user authentication towards etcd.
//!
//! Certificates and keys are checked when they are given, because tonic skips a certificate
//! it cannot parse: a bad CA file would otherwise surface as every handshake failing.
//! A user logs in on first use rather than at connect time, so that a server can start
//! while etcd is down, as it can without a user.

use crate::error::Error;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::OnceCell;

/// TLS towards etcd's `https://` endpoints: the certificates to trust, and a client
/// certificate for etcd's mutual TLS (`--client-cert-auth`).
///
/// Without a CA certificate, etcd's certificate must chain to one of Mozilla's root
/// certificates (built in); with one, only to that CA. etcd's certificate must name the host
/// of the endpoint URL (DNS name or IP address).
///
/// ```
/// # fn run(ca_pem: &str) -> Result<(), leasehold::Error> {
/// use leasehold::server::store::etcd::{EtcdConfig, EtcdTls};
/// let mut config = EtcdConfig::new(vec!["https://etcd1:2379".into()]);
/// config.tls = Some(EtcdTls::new().ca_certificate(ca_pem)?);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct EtcdTls {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Trusts Mozilla's root certificates, and presents no client certificate.
    pub fn new() -> EtcdTls {
        EtcdTls::default()
    }

    /// Trusts only the CA certificates in `pem` (one or more `CERTIFICATE` blocks) instead of
    /// Mozilla's roots. Fails when `pem` holds no certificate or one that does not parse.
    pub fn ca_certificate(self, pem: impl AsRef<[u8]>) -> Result<EtcdTls, Error> {
        self.with_ca(pem.as_ref())
            .map_err(|why| Error::Configuration {
                message: format!("etcd CA certificate: {why}"),
            })
    }

    /// Presents this client certificate chain and private key (PEM) to etcd, for mutual
    /// TLS. Fails when either does not parse, or when the key is not the certificate's.
    pub fn client_identity(
        self,
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Result<EtcdTls, Error> {
        self.with_identity(cert_pem.as_ref(), key_pem.as_ref())
            .map_err(|why| Error::Configuration {
                message: format!("etcd client certificate: {why}"),
            })
    }

    fn with_ca(mut self, pem: &[u8]) -> Result<EtcdTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(pem)? {
            roots
                .add(cert)
                .map_err(|e| format!("not a usable certificate: {e}"))?;
        }
        self.ca = Some(pem.to_vec());
        Ok(self)
    }

    fn with_identity(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<EtcdTls, String> {
        let certs = certificates(cert_pem)?;
        // The PEM error names a section marker at most, never key material.
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("no usable PEM private key in the key: {e}"))?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("the key does not fit the certificate: {e}"))?;
        self.identity = Some((cert_pem.to_vec(), key_pem.to_vec()));
        Ok(self)
    }

    /// The options for etcd-client (tonic), which uses rustls with the ring provider.
    fn options(&self, handshake_timeout: Duration) -> TlsOptions {
        let tls = TlsOptions::new().timeout(handshake_timeout);
        let tls = match &self.ca {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        match &self.identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

/// Shows which settings are made, never the key.
impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("custom_ca", &self.ca.is_some())
            .field("client_identity", &self.identity.is_some())
            .finish()
    }
}

/// An etcd user and its password, for etcd's authentication (`etcdctl auth enable`).
///
/// The server logs in on its first call to etcd, and logs in again whenever etcd says its
/// token expired. The user needs read and write permission on the key prefix
/// (`etcdctl role grant-permission ROLE --prefix=true readwrite /leasehold/`).
/// Its `Debug` output shows the name only.
#[derive(Clone)]
pub struct EtcdUser {
    name: String,
    password: String,
}

impl EtcdUser {
    /// An etcd user name and its password.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> EtcdUser {
        EtcdUser {
            name: name.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The server builder's PEM files for etcd TLS, read when the server starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// The TLS settings the files hold, `None` when no file is given.
    pub(crate) fn load(&self) -> Result<Option<EtcdTls>, Error> {
        if self.ca.is_none() && self.identity.is_none() {
            return Ok(None);
        }
        let mut tls = EtcdTls::new();
        if let Some(path) = &self.ca {
            tls = tls
                .with_ca(&read("CA certificate", path)?)
                .map_err(|why| in_file("CA certificate", path.display(), why))?;
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls
                .with_identity(
                    &read("client certificate", cert)?,
                    &read("client key", key)?,
                )
                .map_err(|why| {
                    let files = format!("{} and {}", cert.display(), key.display());
                    in_file("client certificate", files, why)
                })?;
        }
        Ok(Some(tls))
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        context: format!("cannot read the etcd {what} {}", path.display()),
        source,
    })
}

fn in_file(what: &str, files: impl fmt::Display, why: String) -> Error {
    Error::Configuration {
        message: format!("etcd {what} {files}: {why}"),
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in it (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// Checks that the endpoints' schemes fit the TLS settings, and adds TLS to `options` when
/// the endpoints are `https://`. Returns the options and whether they use TLS.
pub(super) fn with_tls(
    options: ConnectOptions,
    endpoints: &[String],
    tls: Option<&EtcdTls>,
    handshake_timeout: Duration,
) -> Result<(ConnectOptions, bool), String> {
    // Case-sensitive, as etcd-client reads them.
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    let plain = endpoints.iter().find(|e| e.starts_with("http://"));
    match (plain, tls.is_some(), https) {
        (Some(endpoint), true, _) => Err(format!(
            "etcd endpoint {endpoint} is http://, but TLS settings (a CA or client certificate) \
             need https:// endpoints"
        )),
        (Some(endpoint), false, true) => Err(format!(
            "etcd endpoints mix http:// ({endpoint}) and https://: use https:// for every one"
        )),
        (_, false, false) => Ok((options, false)),
        (_, _, _) => {
            let tls = tls.cloned().unwrap_or_default().options(handshake_timeout);
            Ok((options.with_tls(tls), true))
        }
    }
}

/// Logs in as an etcd user, once: etcd-client then sends the token with every request and
/// logs in again by itself when etcd answers that the token expired.
pub(super) struct Login {
    user: EtcdUser,
    done: OnceCell<()>,
}

impl Login {
    pub(super) fn new(user: EtcdUser) -> Login {
        Login {
            user,
            done: OnceCell::new(),
        }
    }

    /// Logs in unless done. Concurrent callers wait for one attempt.
    pub(super) async fn ensure(&self, client: &Client) -> Result<(), etcd_client::Error> {
        self.done
            .get_or_try_init(|| async {
                let user = (self.user.name.clone(), self.user.password.clone());
                client.clone().update_user(Some(user)).await
            })
            .await
            .map(drop)
    }

    pub(super) fn name(&self) -> &str {
        &self.user.name
    }
}

/// Why etcd refuses this server for good: what, and whether it is TLS (a certificate either
/// side does not accept) rather than the user or its permissions.
#[derive(Debug)]
pub(super) struct Refusal {
    pub reason: String,
    pub tls: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Refusal {
    /// The error an embedded server's start-up reports: TLS, or a configuration etcd
    /// refuses.
    pub(super) fn into_error(self) -> Error {
        let message = format!("etcd refused this server: {}", self.reason);
        if self.tls {
            Error::Tls {
                endpoint: "etcd".into(),
                message,
                source: None,
            }
        } else {
            Error::Configuration { message }
        }
    }
}

/// Why etcd refuses this server for good, when it does: its certificate or its client
/// certificate, its user, or its permissions. Retrying such a call only delays the answer.
pub(super) fn refusal(error: &etcd_client::Error) -> Option<Refusal> {
    let settings = |reason: String| Some(Refusal { reason, tls: false });
    if let etcd_client::Error::GRpcStatus(status) = error {
        let message = status.message();
        if message.contains("authentication failed") {
            return settings("authentication failed: wrong etcd user name or password".into());
        }
        if message.contains("authentication is not enabled") {
            return settings("an etcd user is configured, but etcd's authentication is off".into());
        }
        if message.contains("user name is empty") {
            return settings("etcd requires authentication: configure an etcd user".into());
        }
        if status.code() as i32 == PERMISSION_DENIED {
            return settings(format!(
                "the etcd user lacks permission on the key prefix ({message})"
            ));
        }
    }
    tls_refusal(error).map(|reason| Refusal { reason, tls: true })
}

/// The gRPC status code etcd answers when the user's roles do not cover a key.
const PERMISSION_DENIED: i32 = 7;

/// Why a TLS handshake with etcd failed, when it failed for a reason that lasts: etcd's
/// certificate is not trusted, or etcd sent a fatal alert (it refused ours, or has none).
fn tls_refusal(error: &etcd_client::Error) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = match error {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(e) => Some(e),
        etcd_client::Error::IoError(e) => Some(e),
        _ => None,
    };
    while let Some(e) = next {
        // io::Error hides the error it wraps from `source()`.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(why)) =
            e.downcast_ref::<rustls::Error>().or(wrapped)
        {
            return Some(format!(
                "TLS with etcd failed (invalid peer certificate: {why:?}): etcd's certificate is \
                 not trusted; check the etcd CA certificate, and that etcd's certificate names \
                 the endpoint's host"
            ));
        }
        // hyper passes an alert on as text only: rustls' "received fatal alert: ...".
        let text = e.to_string();
        if text.starts_with("received fatal alert") {
            return Some(format!(
                "TLS with etcd failed ({text}): etcd refused the handshake; it may require a \
                 client certificate signed by a CA it trusts"
            ));
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_password() {
        let user = EtcdUser::new("locks", "s3cret");
        let shown = format!("{user:?}");
        assert!(
            shown.contains("locks") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn the_endpoints_schemes_decide_tls() {
        let secure = |endpoints: &[&str], tls: Option<&EtcdTls>| {
            let endpoints: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
            let options = ConnectOptions::new();
            with_tls(options, &endpoints, tls, Duration::from_secs(1)).map(|(_, tls)| tls)
        };
        let custom = EtcdTls::new();
        assert_eq!(secure(&["http://a:2379", "b:2379"], None), Ok(false));
        assert_eq!(
            secure(&["https://a:2379", "https://b:2379"], None),
            Ok(true)
        );
        // etcd-client reads an endpoint without a scheme as https:// when TLS is set.
        assert_eq!(secure(&["a:2379"], Some(&custom)), Ok(true));
        let err = secure(&["https://a:2379", "http://b:2379"], Some(&custom)).unwrap_err();
        assert!(
            err.contains("http://b:2379") && err.contains("need https://"),
            "{err}"
        );
        let err = secure(&["https://a:2379", "http://b:2379"], None).unwrap_err();
        assert!(err.contains("mix"), "{err}");
    }
}
