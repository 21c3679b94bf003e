//! Memory per held lock in the memory store, and what idle locks cost.
//!
//! `cargo bench --bench memory` holds `BENCH_LOCKS` locks (default 1,000,000) in a memory
//! store, through the same `LockStore` calls the HTTP layer makes, and reads the process's
//! resident set size (`/proc/self/statm`) before and after. The HTTP layer keeps nothing per
//! lock, so this is the server's cost per held lock. Then it releases every lock and shows
//! that the table is empty again.

use leasehold::server::store::memory::{MemoryConfig, MemoryStore};
use leasehold::server::store::{
    AcquireOutcome, AcquireSpec, Id, LockStore, Project, Quota, Release,
};
use std::time::{Duration, Instant};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let n: u64 = std::env::var("BENCH_LOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = MemoryStore::open(MemoryConfig::default()).unwrap();
        let project = Project {
            id: 1,
            name: "bench".into(),
        };
        // Names like a real deployment's: "jobs/<n>" (9 to 12 bytes).
        let names: Vec<String> = (0..n).map(|i| format!("jobs/{i}")).collect();
        let before = rss_bytes();
        let started = Instant::now();
        let mut leases = Vec::with_capacity(n as usize);
        for name in &names {
            let spec = AcquireSpec {
                project: project.clone(),
                name: name.clone(),
                lease: Duration::from_secs(3600),
                wait: Some(Duration::ZERO),
                poll: Duration::ZERO,
                request_id: Id::random(),
                first: true,
                label: None,
                quota: Quota::default(),
                max_hold: None,
                lock_delay: None,
                mode: Default::default(),
                value: None,
                client: None,
            };
            match store.acquire(spec).await.unwrap() {
                AcquireOutcome::Granted(grant) => leases.push(grant.lease_id),
                other => panic!("not granted: {other:?}"),
            }
        }
        let took = started.elapsed();
        let after = rss_bytes();
        // The lease ids kept here for the release below are the client's, not the server's.
        let client_side = (leases.capacity() * std::mem::size_of::<Id>()) as u64;
        let per_lock = (after - before - client_side) as f64 / n as f64;
        println!(
            "{n} held locks: {:.1} MiB resident for the store, {per_lock:.0} bytes per lock ({took:?} to acquire, in-process)",
            (after - before - client_side) as f64 / (1 << 20) as f64
        );
        println!("held locks reported by the store: {}", store.stats().held);

        for (name, lease_id) in names.iter().zip(&leases) {
                        assert_eq!(store.release(&project, name, *lease_id).await.unwrap(), Release::Released);
        }
        drop(leases);
        // Each shard's sweep (once a second) shrinks its table after the burst.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        println!(
            "after releasing all and one sweep: {} held, {} waiters, {:.1} MiB resident above the start",
            store.stats().held,
            store.stats().waiters,
            (rss_bytes().saturating_sub(before)) as f64 / (1 << 20) as f64
        );
    });
}
