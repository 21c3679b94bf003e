//! A lock server over HTTPS and a client that trusts its private CA.
//!
//! Run with `cargo run --example tls`. The certificates are made on the fly (rcgen); in
//! production, point `--tls-cert`/`--tls-key` at real files and give clients the CA with
//! `add_root_certificate`.

use leasehold::server::Server;
use leasehold::{DistributedLock, Error};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

#[tokio::main]
async fn main() -> Result<(), Error> {
    // A private CA and a server certificate for "localhost".
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA").pem();
    let server_key = KeyPair::generate().expect("key");
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &Issuer::new(ca_params, ca_key))
        .expect("certificate");
    let dir = std::env::temp_dir().join(format!("leasehold-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, server_cert.pem()).expect("write");
    std::fs::write(&key, server_key.serialize_pem()).expect("write");

    let server = Server::builder()
        .bind("127.0.0.1:0")
        .tls(&cert, &key)
        .start()
        .await?;
    let url = format!("https://localhost:{}", server.local_addr().port());
    println!("lock server on {url}");

    let dl = DistributedLock::builder("my-project-key")
        .endpoint(&url)
        .add_root_certificate(ca_pem.as_bytes())
        .build()?;
    let v = dl.with_lock("over-tls", || async { 42 }).await?;
    println!("with_lock over HTTPS returned {v}");

    // Without the CA, the certificate is refused.
    let untrusting = DistributedLock::builder("my-project-key")
        .endpoint(&url)
        .build()?;
    match untrusting.lock("over-tls").await {
        Err(error @ Error::Tls { .. }) => println!("a client without the CA: {error}"),
        other => println!("unexpected: {other:?}"),
    }

    server.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
