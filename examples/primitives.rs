//! Semaphores, read-write locks and leader election, against an in-process server.
//!
//! Run with `cargo run --example primitives`.

use leasehold::server::Server;
use leasehold::{DistributedLock, Error, LockMode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let server = Server::builder().bind("127.0.0.1:0").start().await?;
    let dl = DistributedLock::builder("my-project-key")
        .endpoint(server.url())
        .build()?;

    // 1. A semaphore: ten workers, at most three inside at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (dl, inside, most) = (dl.clone(), inside.clone(), most.clone());
        workers.spawn(async move {
            dl.semaphore("payments-api", 3)
                .with_lock(|| async {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
                .await
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("worker")?;
    }
    println!(
        "1. ten workers, at most {} inside at once",
        most.load(Ordering::SeqCst)
    );

    // 2. A read-write lock: readers share, a writer waits for them.
    let first = dl.read_lock("config").await?;
    let second = dl.read_lock("config").await?;
    let info = dl.inspect("config").await?;
    assert_eq!(info.mode, LockMode::Shared);
    println!("2. {} readers hold \"config\" at once", info.holders.len());
    let writer = {
        let dl = dl.clone();
        tokio::spawn(async move { dl.write_lock("config").await })
    };
    first.release().await?;
    second.release().await?;
    let writer = writer.await.expect("writer task")?;
    println!(
        "   then the writer, alone: fencing token {}",
        writer.fencing_token()
    );
    writer.release().await?;

    // 3. Leader election: A leads, B stands by; an observer sees every change.
    let election = dl.election("scheduler");
    let mut watch = election.observe();
    println!("3. leader at first: {:?}", watch.next().await?);
    let a = election.campaign("host-a:8080").await?;
    let b = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("host-b:8080").await })
    };
    a.proclaim("host-a:9090").await?;
    a.resign().await?;
    let b = b.await.expect("campaign task")?;
    // A, A's new value, perhaps a moment without a leader, then B.
    loop {
        match watch.next().await? {
            Some(leader) => {
                println!("   {} leads (token {})", leader.value, leader.fencing_token);
                if leader.fencing_token == b.fencing_token() {
                    break;
                }
            }
            None => println!("   nobody leads"),
        }
    }
    b.resign().await?;

    server.shutdown().await;
    Ok(())
}
