//! Clients that take turns on a lock, recording what they see, for the fault suites.

use super::history::{ClientKind, Clients, Resource};
use leasehold::DistributedLock;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What the contending clients of a scenario share.
#[derive(Clone)]
pub struct Shared {
    pub clients: Clients,
    pub resource: Resource,
    pub stop: Arc<AtomicBool>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            clients: Clients::default(),
            resource: Resource::new(true),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// A client that takes turns on `lock` until `stop`: acquire, check `is_held()` and write
/// with its token a few times, release. Everything it sees goes to `clients`.
pub fn contend(
    dl: DistributedLock,
    client: String,
    lock: String,
    lease: Duration,
    shared: &Shared,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    contend_waiting(
        dl,
        client,
        lock,
        lease,
        Duration::from_secs(3),
        shared,
        seed,
    )
}

/// [`contend`], giving up each acquire after `patience` (then trying again).
pub fn contend_waiting(
    dl: DistributedLock,
    client: String,
    lock: String,
    lease: Duration,
    patience: Duration,
    shared: &Shared,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let Shared {
        clients,
        resource,
        stop,
    } = shared.clone();
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        while !stop.load(Ordering::SeqCst) {
            let Ok(guard) = dl
                .lock(lock.as_str())
                .expires_in(lease)
                .timeout(patience)
                .await
            else {
                continue;
            };
            let token = guard.fencing_token();
            clients.record(&client, &lock, ClientKind::Acquired(token));
            for _ in 0..rng.usize(1..4) {
                if !guard.is_held() {
                    clients.record(&client, &lock, ClientKind::Lost(token));
                    break;
                }
                clients.record(&client, &lock, ClientKind::Held(token));
                resource.write(&lock, &client, token);
                // The work done under the lock.
                tokio::time::sleep(Duration::from_millis(rng.u64(1..30))).await;
            }
            let _ = guard.release().await;
        }
    })
}
