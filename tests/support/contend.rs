//! Clients that take turns on a lock, recording what they see, for the fault suites.

use super::history::{ClientKind, Clients, Hold, Resource};
use leasehold::{DistributedLock, LockGuard};
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

/// What a contending client takes each turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// `lock(name)`, and it writes the resource under its token.
    Lock,
    /// `read_lock(name)`: it only reads.
    Read,
    /// `write_lock(name)`, and it writes.
    Write,
    /// One of this many permits of `semaphore(name, n)`; it only counts.
    Permits(u32),
    /// Leadership of `election(name)`, proclaiming a new value each turn, and it writes.
    Lead,
}

impl Take {
    /// How the grant holds, for the offline checks.
    pub fn hold(self) -> Hold {
        match self {
            Take::Lock | Take::Write | Take::Lead => Hold::Exclusive,
            Take::Read => Hold::Shared,
            Take::Permits(n) => Hold::Permit(n),
        }
    }
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
    contend_as(dl, client, lock, Take::Lock, lease, patience, shared, seed)
}

/// One turn's grant: a guard, or leadership (which proclaims).
pub enum Turn {
    Guard(LockGuard),
    Leader(leasehold::Leadership),
}

impl Turn {
    pub fn guard(&self) -> &LockGuard {
        match self {
            Turn::Guard(guard) => guard,
            Turn::Leader(leadership) => leadership.guard(),
        }
    }

    pub async fn release(self) -> Result<(), leasehold::Error> {
        match self {
            Turn::Guard(guard) => guard.release().await,
            Turn::Leader(leadership) => leadership.resign().await,
        }
    }
}

/// Takes `take` of `name`: leadership campaigns with `value`.
pub async fn take_turn(
    dl: &DistributedLock,
    name: &str,
    take: Take,
    value: &str,
    lease: Duration,
    timeout: Duration,
    auto_renew: bool,
) -> Result<Turn, leasehold::Error> {
    match take {
        Take::Lead => {
            let campaign = (dl.election(name).campaign(value))
                .expires_in(lease)
                .timeout(timeout)
                .auto_renew(auto_renew);
            campaign.await.map(Turn::Leader)
        }
        take => {
            let request = match take {
                Take::Read => dl.read_lock(name),
                Take::Write => dl.write_lock(name),
                Take::Permits(n) => dl.semaphore(name, n),
                _ => dl.lock(name),
            };
            (request
                .expires_in(lease)
                .timeout(timeout)
                .auto_renew(auto_renew)
                .await)
                .map(Turn::Guard)
        }
    }
}

/// A client that takes `take` of `lock` in turns until `stop`, as [`contend`] does.
#[allow(clippy::too_many_arguments)]
pub fn contend_as(
    dl: DistributedLock,
    client: String,
    lock: String,
    take: Take,
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
        let name = lock.as_str();
        while !stop.load(Ordering::SeqCst) {
            let turn = take_turn(&dl, name, take, &client, lease, patience, true).await;
            let Ok(turn) = turn else {
                continue;
            };
            let token = turn.guard().fencing_token();
            clients.record(&client, &lock, ClientKind::Acquired(token));
            for round in 0..rng.usize(1..4) {
                if !turn.guard().is_held() {
                    clients.record(&client, &lock, ClientKind::Lost(token));
                    break;
                }
                match take.hold() {
                    Hold::Exclusive => {
                        clients.record(&client, &lock, ClientKind::Held(token));
                        resource.write(&lock, &client, token);
                    }
                    // Readers and permit holders do not write one shared record.
                    hold => clients.record(&client, &lock, ClientKind::HeldAs(token, hold)),
                }
                if let Turn::Leader(leadership) = &turn {
                    // A lost leadership may refuse; what counts is that it never changes
                    // another leader's value, which the server checks atomically.
                    let _ = leadership.proclaim(format!("{client}/{round}")).await;
                }
                // The work done under the lock.
                tokio::time::sleep(Duration::from_millis(rng.u64(1..30))).await;
            }
            let _ = turn.release().await;
        }
    })
}

/// Every other kind at once: three clients on a semaphore of two permits, readers and a
/// writer on one read-write lock, and two candidates in an election.
pub const KINDS: [(&str, Take); 8] = [
    ("pool", Take::Permits(2)),
    ("config", Take::Read),
    ("leader", Take::Lead),
    ("pool", Take::Permits(2)),
    ("config", Take::Read),
    ("leader", Take::Lead),
    ("pool", Take::Permits(2)),
    ("config", Take::Write),
];

/// The names of `clients`, each once, with how to take it.
pub fn names(clients: &[(&'static str, Take)]) -> Vec<(&'static str, Take)> {
    let mut names: Vec<(&str, Take)> = Vec::new();
    for &(name, take) in clients {
        if !names.iter().any(|(n, _)| *n == name) {
            names.push((name, take));
        }
    }
    names
}

/// A negative control on a clean run: the same claims, checked as if the semaphore had one
/// permit fewer and readers were writers, must show overlaps. It proves the run really had
/// several holders at once, so that the clean check meant something.
pub fn assert_kinds_overlapped(scenario: &str, shared: &Shared) {
    let stricter = super::history::stricter(shared.clients.events());
    let report = super::history::check(&[], &stricter, &[]);
    for lock in ["pool", "config"] {
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.starts_with(&format!("{lock}:"))),
            "{scenario}: {lock} never had several holders at once, so the check proved little"
        );
    }
}
