//! TLS: certificates made in the test (rcgen), verified by default, custom CA, the loud
//! opt-out, and the handshake timeout.

mod support;

use leasehold::DistributedLock;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::PathBuf;
use std::time::Duration;
use support::{TestServer, within};
use tokio::io::AsyncReadExt;

const BOUND: Duration = Duration::from_secs(10);

/// A throwaway CA and a server certificate for `localhost` and 127.0.0.1, as PEM files.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("dl-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server_cert =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&server_key, &issuer)
                .unwrap();
        std::fs::write(dir.join("cert.pem"), server_cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), server_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca_cert.pem(),
        }
    }

    async fn server(&self) -> TestServer {
        let (cert, key) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
        TestServer::start_with(move |b| {
            b.tls(cert, key)
                .handshake_timeout(Duration::from_millis(300))
        })
        .await
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn https(server: &TestServer) -> String {
    format!("https://localhost:{}", server.addr.port())
}

#[tokio::test]
async fn a_client_trusting_the_ca_locks_over_https_and_http2() {
    let pki = Pki::new("trusted");
    let server = pki.server().await;
    assert!(server.url().starts_with("https://"));
    let dl = DistributedLock::builder("k")
        .endpoint(https(&server))
        .add_root_certificate(&pki.ca_pem)
        .build()
        .unwrap();
    let guard = dl.lock("secure").await.unwrap();
    assert!(guard.is_held());
    guard.release().await.unwrap();
    // HTTP/1.1 by ALPN works as well.
    let h1 = DistributedLock::builder("k")
        .endpoint(https(&server))
        .add_root_certificate(&pki.ca_pem)
        .http1_only()
        .build()
        .unwrap();
    assert_eq!(h1.with_lock("secure", || async { 1 }).await.unwrap(), 1);
}

#[tokio::test]
async fn certificates_are_verified_by_default() {
    let pki = Pki::new("untrusted");
    let server = pki.server().await;
    let dl = DistributedLock::builder("k")
        .endpoint(https(&server))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = dl
        .lock("secure")
        .timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, leasehold::Error::Tls { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // Not retried until the 5 s timeout: a certificate problem does not heal by itself.
    assert!(started.elapsed() < Duration::from_secs(5) / 2);
    // The wrong name fails too, even with the right CA.
    let by_other_name = DistributedLock::builder("k")
        .endpoint(format!("https://127.0.0.2:{}", server.addr.port()))
        .add_root_certificate(&pki.ca_pem)
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let err = by_other_name
        .lock("secure")
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err}");
}

#[tokio::test]
async fn accepting_invalid_certificates_takes_an_explicit_dangerous_opt_in() {
    let pki = Pki::new("danger");
    let server = pki.server().await;
    let dl = DistributedLock::builder("k")
        .endpoint(https(&server))
        .danger_accept_invalid_certificates()
        .build()
        .unwrap();
    assert_eq!(dl.with_lock("x", || async { 2 }).await.unwrap(), 2);
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_closed() {
    let pki = Pki::new("handshake");
    let server = pki.server().await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let connected = tokio::time::Instant::now();
    // Say nothing: the server closes the connection after its 300 ms handshake timeout.
    let read = within(BOUND, tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        connected.elapsed() >= Duration::from_millis(250),
        "{:?}",
        connected.elapsed()
    );
}

#[tokio::test]
async fn bad_pem_is_reported_at_build_and_start() {
    let err = DistributedLock::builder("k")
        .add_root_certificate("not a certificate")
        .build()
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let dir = std::env::temp_dir().join(format!("dl-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    let err = leasehold::server::Server::builder()
        .bind("127.0.0.1:0")
        .tls(dir.join("empty.pem"), dir.join("empty.pem"))
        .start()
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
