//! etcd leases: one per acquire, kept ready so that an acquire costs one write.
//!
//! Granting a lease is a raft write of its own, and so is revoking one. So a server keeps
//! spare leases per TTL: the etcd lease of a released lock (its key deleted) is kept for the
//! next acquire with the same TTL instead of being revoked, and when there is no spare, the
//! acquire grants one and another is granted in the background. An acquire refreshes its
//! spare with a keep-alive (leader-local, no disk write) at the same time as its
//! transaction, unless the slack (below) covers it. A lease serves one acquire at a time;
//! spares that get old are dropped and expire in etcd.
//!
//! Two measured costs shape the pool (`BENCH_ONLY_DISTINCT` in `benches/etcd.rs`, etcd's
//! own CPU profile):
//! - **A spare goes back to the lock it served.** A queue key is named after its etcd
//!   lease, and etcd keeps a deleted key's name in its index until a compaction; every range
//!   over a lock's queue walks those names. Handed out in any order, 64 spares soon left 64
//!   names under every busy lock (a fifth of etcd's CPU went to walking them). So a spare is
//!   tagged with the queue it left, and an acquire of that lock takes it first.
//! - **Spares run a second longer than they promise** (`SLACK`). The lease granted to a
//!   client is the etcd TTL less the slack, so a spare kept alive less than the slack ago
//!   (`Etcd::kept_since`) outlives any grant made with it now, and the acquire sends no
//!   keep-alive of its own (etcd answers each with a copy of its pending writes: 8 % of
//!   its CPU). A client that vanishes frees its lock up to the slack later.

use super::call::{Etcd, EtcdError};
use etcd_client::LeaseGrantOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Most spares kept per TTL; more are revoked.
const MAX_SPARES: usize = 64;

/// Seconds an acquire's etcd lease runs beyond the lease granted with it (see above).
pub(super) const SLACK: i64 = 1;

/// How much sooner than the slack runs out a spare still counts as kept alive: covers the
/// rates of the server's and etcd's clocks, with room to spare.
const SLACK_MARGIN: Duration = Duration::from_millis(200);

/// Longest a shutdown waits for its spares to be revoked.
const REVOKE_SPARES_BOUND: Duration = Duration::from_secs(2);

/// An etcd lease for one acquire.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub id: i64,
    /// The TTL etcd granted, in seconds (never less than asked; etcd may raise it to its
    /// minimum).
    pub ttl: i64,
    /// Seconds of `ttl` beyond the lease a grant with it promises: `SLACK`, or 0 for a lease
    /// whose entry was written before slack existed.
    pub slack: i64,
    /// True when it was granted for this acquire; a spare needs a keep-alive first.
    pub fresh: bool,
    /// A conservative guess of when etcd will expire it, unless kept alive.
    pub until: Instant,
}

/// The etcd TTL for a lease: whole seconds, rounded up.
pub(super) fn ttl_for(lease: Duration) -> i64 {
    let ms = lease.as_millis();
    ms.div_ceil(1000).max(1) as i64
}

impl Lease {
    /// Whether etcd keeps this lease, last kept alive at `kept`, at least the lease a grant
    /// with it promises from now, without another keep-alive.
    pub fn outlives_grant(&self, kept: Option<Instant>) -> bool {
        let slack = Duration::from_secs(self.slack.max(0) as u64);
        kept.is_some_and(|kept| kept.elapsed() + SLACK_MARGIN <= slack)
    }
}

/// A spare, with the lock queue it last served (a hash of its key prefix).
#[derive(Debug)]
struct Spare {
    lease: Lease,
    queue: u64,
}

/// Which lock queue a spare served, compared by hash (a collision only costs the index walk
/// the tag saves).
fn queue_tag(queue: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(queue)
}

#[derive(Debug)]
pub(super) struct Leases {
    etcd: Etcd,
    /// Spares by the TTL asked for.
    spares: Mutex<HashMap<i64, Vec<Spare>>>,
}

impl Leases {
    pub fn new(etcd: Etcd) -> Leases {
        Leases {
            etcd,
            spares: Mutex::new(HashMap::new()),
        }
    }

    /// A lease for an acquire asking `ttl` seconds, for the lock queue `queue`: a spare young
    /// enough to outlive the keep-alive sent with the acquire (the one that last served this
    /// queue, if any), else a new one (and a spare granted in the background).
    pub async fn take(self: &Arc<Self>, ttl: i64, queue: &[u8]) -> Result<Lease, EtcdError> {
        let tag = queue_tag(queue);
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let list = spares.entry(ttl).or_default();
            let young_enough = Instant::now() + Duration::from_millis(500);
            list.retain(|s| s.lease.until > young_enough);
            match list.iter().rposition(|s| s.queue == tag) {
                Some(at) => Some(list.remove(at)),
                None => list.pop(),
            }
        };
        if let Some(spare) = spare {
            return Ok(spare.lease);
        }
        let leases = self.clone();
        tokio::spawn(async move {
            if let Ok(lease) = leases.fresh(ttl).await {
                leases.put_back(ttl, lease, &[]);
            }
        });
        self.fresh(ttl).await
    }

    /// Keeps a lease that no key uses any more (it last served the lock queue `queue`) for a
    /// later acquire asking `ttl`.
    pub fn put_back(&self, ttl: i64, lease: Lease, queue: &[u8]) {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        let list = spares.entry(ttl).or_default();
        if list.len() < MAX_SPARES {
            list.push(Spare {
                lease: Lease {
                    fresh: false,
                    ..lease
                },
                queue: queue_tag(queue),
            });
        } else {
            self.etcd.revoke_later(lease.id);
        }
    }

    /// A new lease for an acquire asking `ttl` seconds: `SLACK` seconds longer.
    pub async fn fresh(&self, ttl: i64) -> Result<Lease, EtcdError> {
        let lease = self.grant(ttl + SLACK).await?;
        Ok(Lease {
            slack: SLACK,
            ..lease
        })
    }

    /// Grants a lease with a random id: the id is half of the secret clients hold.
    pub async fn grant(&self, ttl: i64) -> Result<Lease, EtcdError> {
        let sent = Instant::now();
        let answer = self
            .etcd
            .call("lease_grant", |mut c| async move {
                let id = loop {
                    let id = (rand::random::<u64>() >> 1) as i64;
                    if id != 0 {
                        break id;
                    }
                };
                c.lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(id)))
                    .await
            })
            .await?;
        let granted = answer.ttl().max(ttl);
        Ok(Lease {
            id: answer.id(),
            ttl: granted,
            slack: 0,
            fresh: true,
            until: sent + Duration::from_secs(granted as u64),
        })
    }

    /// Revokes the spares (at shutdown), so that they do not linger until they expire. All at
    /// once and bounded: with etcd out of reach they expire on their own, and a shutdown
    /// must not wait a call timeout per spare for that.
    pub async fn revoke_spares(&self) {
        let spares: Vec<Lease> = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            spares
                .drain()
                .flat_map(|(_, list)| list.into_iter().map(|s| s.lease))
                .collect()
        };
        let mut revokes = tokio::task::JoinSet::new();
        for lease in spares {
            let etcd = self.etcd.clone();
            revokes.spawn(async move {
                let _ = etcd.revoke(lease.id).await;
            });
        }
        let all = async { while revokes.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(REVOKE_SPARES_BOUND, all).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::LeaseId;
    use super::super::{granted, spec_for_tests as spec, store_for_tests};
    use super::{Lease, SLACK, ttl_for};
    use crate::server::store::{Grant, Release};
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_for(Duration::from_millis(10)), 1);
        assert_eq!(ttl_for(Duration::from_millis(1000)), 1);
        assert_eq!(ttl_for(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_for(Duration::from_secs(3600)), 3600);
    }

    /// A spare outlives a new grant without a keep-alive only within its slack (less the
    /// margin), and never without slack or without a known keep-alive.
    #[test]
    fn a_spare_needs_no_keep_alive_only_within_its_slack() {
        let lease = |slack| Lease {
            id: 1,
            ttl: 10 + slack,
            slack,
            fresh: false,
            until: Instant::now() + Duration::from_secs(5),
        };
        let ago = |ms| Some(Instant::now() - Duration::from_millis(ms));
        assert!(lease(SLACK).outlives_grant(ago(0)));
        assert!(lease(SLACK).outlives_grant(ago(500)));
        assert!(!lease(SLACK).outlives_grant(ago(900)));
        assert!(!lease(SLACK).outlives_grant(None));
        assert!(!lease(0).outlives_grant(ago(0)));
    }

    /// A released lock's etcd lease serves that lock again (not the spare put back last),
    /// and, kept alive moments ago, without a keep-alive of its own: etcd still runs it at
    /// least the granted lease from now.
    #[tokio::test]
    async fn a_spare_serves_its_own_lock_again_without_a_keep_alive() {
        let (etcd, store) = store_for_tests().await;
        let inner = &store.inner;
        let etcd_lease = |grant: &Grant| LeaseId::from_id(grant.lease_id).unwrap().etcd;
        let project = &spec("").project;
        let take_and_release = |name: &'static str| async move {
            let grant = granted(inner.acquire(spec(name)).await.unwrap());
            let released = inner.release(project, name, grant.lease_id).await;
            assert_eq!(released.unwrap(), Release::Released);
            grant
        };
        // Two locks' leases in the pool, "b"'s put back last.
        let a = granted(inner.acquire(spec("a")).await.unwrap());
        let b = granted(inner.acquire(spec("b")).await.unwrap());
        for (name, grant) in [("a", &a), ("b", &b)] {
            let released = inner.release(project, name, grant.lease_id).await;
            assert_eq!(released.unwrap(), Release::Released);
        }
        // "a" gets its own lease back (kept alive now: its stream opens).
        let window = Instant::now();
        let again = take_and_release("a").await;
        assert_eq!(etcd_lease(&again), etcd_lease(&a));

        let keep_alives = |inner: &super::super::Inner| {
            inner.etcd.metrics.calls("keep_alive") + inner.etcd.metrics.calls("keep_alive_stream")
        };
        let before = keep_alives(inner);
        let third = granted(inner.acquire(spec("a")).await.unwrap());
        assert_eq!(etcd_lease(&third), etcd_lease(&a));
        assert_eq!(third.lease, Duration::from_secs(10), "the lease asked for");
        let left = etcd
            .client()
            .await
            .lease_time_to_live(etcd_lease(&third), None)
            .await
            .unwrap()
            .ttl();
        // The keep-alive before was sent after `window` began. Within the slack less its
        // margin from then, the acquire needed none, and etcd (11 s from that keep-alive)
        // still runs the lease the whole 10 s grant. A machine too slow to get here in that
        // time leaves nothing to check: the acquire then had to keep the lease alive.
        if window.elapsed() < Duration::from_millis(800) {
            assert_eq!(keep_alives(inner), before, "no keep-alive within the slack");
            assert!(left >= 10, "etcd runs it {left} s more, under the grant");
        } else {
            eprintln!("slower than the slack window: {:?}", window.elapsed());
        }
    }
}
