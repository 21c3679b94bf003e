//! The original library's three scenarios, against an in-process server.
//!
//! Run with `cargo run --example quickstart`.

use leasehold::server::Server;
use leasehold::{DistributedLock, Error};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Error> {
    // An embedded server on a free port; in production, run `leasehold-server`.
    let server = Server::builder().bind("127.0.0.1:0").start().await?;
    println!("lock server listening on {}", server.url());

    let dl = DistributedLock::builder("my-project-key")
        .endpoint(server.url())
        .build()?;

    // 1. Closure style: take the lock, run the closure, release, return its value.
    let v = dl.with_lock("my-lock", || async { 10 }).await?;
    println!("1. with_lock returned {v}");

    // 2. A 20 s expiry, guard style: the lease is renewed while the guard lives.
    let guard = dl
        .lock("my-lock")
        .expires_in(Duration::from_secs(20))
        .await?;
    println!(
        "2. holding {:?} with a 20 s lease, fencing token {}",
        guard.name(),
        guard.fencing_token()
    );

    // 3. Another client waits at most 500 ms while the lock is held: a Timeout error.
    let other = DistributedLock::builder("my-project-key")
        .endpoint(server.url())
        .build()?;
    match other
        .lock("my-lock")
        .timeout(Duration::from_millis(500))
        .with_lock(|| async { unreachable!("the lock is held by the first client") })
        .await
    {
        Err(error @ Error::Timeout { .. }) => println!("3. second client: {error}"),
        other => println!("3. unexpected: {other:?}"),
    }

    guard.release().await?;
    println!("released; the second client can now take it:");
    let token = other
        .lock("my-lock")
        .timeout(Duration::from_secs(1))
        .with_lock(|| async { "done" })
        .await?;
    println!("   second client ran its closure: {token}");

    server.shutdown().await;
    Ok(())
}
