//! etcd leases: one per acquire, kept ready so that an acquire costs one write.
//!
//! Granting a lease is a raft write of its own, and so is revoking one. So a server keeps
//! spare leases per TTL: the etcd lease of a released lock (its key deleted) is kept for the
//! next acquire with the same TTL instead of being revoked, and when there is no spare, the
//! acquire grants one and another is granted in the background. An acquire refreshes its
//! spare with a keep-alive (leader-local, no disk write) at the same time as its
//! transaction. A lease serves one acquire at a time; spares that get old are dropped and
//! expire in etcd.

use super::call::{Etcd, EtcdError};
use etcd_client::LeaseGrantOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Most spares kept per TTL; more are revoked.
const MAX_SPARES: usize = 64;

/// Longest a shutdown waits for its spares to be revoked.
const REVOKE_SPARES_BOUND: Duration = Duration::from_secs(2);

/// An etcd lease for one acquire.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub id: i64,
    /// The TTL etcd granted, in seconds (never less than asked; etcd may raise it to its
    /// minimum).
    pub ttl: i64,
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

#[derive(Debug)]
pub(super) struct Leases {
    etcd: Etcd,
    /// Spares by the TTL asked for.
    spares: Mutex<HashMap<i64, Vec<Lease>>>,
}

impl Leases {
    pub fn new(etcd: Etcd) -> Leases {
        Leases {
            etcd,
            spares: Mutex::new(HashMap::new()),
        }
    }

    /// A lease of at least `ttl` seconds: a spare young enough to outlive the keep-alive
    /// sent with the acquire, else a new one (and a spare granted in the background).
    pub async fn take(self: &Arc<Self>, ttl: i64) -> Result<Lease, EtcdError> {
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let list = spares.entry(ttl).or_default();
            let young_enough = Instant::now() + Duration::from_millis(500);
            list.retain(|l| l.until > young_enough);
            list.pop()
        };
        if let Some(lease) = spare {
            return Ok(lease);
        }
        let leases = self.clone();
        tokio::spawn(async move {
            if let Ok(lease) = leases.grant(ttl).await {
                leases.put_back(ttl, lease);
            }
        });
        self.grant(ttl).await
    }

    /// Keeps a lease that no key uses any more for a later acquire asking `ttl`.
    pub fn put_back(&self, ttl: i64, lease: Lease) {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        let list = spares.entry(ttl).or_default();
        if list.len() < MAX_SPARES {
            list.push(Lease {
                fresh: false,
                ..lease
            });
        } else {
            self.etcd.revoke_later(lease.id);
        }
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
            spares.drain().flat_map(|(_, list)| list).collect()
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
    use super::ttl_for;
    use std::time::Duration;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_for(Duration::from_millis(10)), 1);
        assert_eq!(ttl_for(Duration::from_millis(1000)), 1);
        assert_eq!(ttl_for(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_for(Duration::from_secs(3600)), 3600);
    }
}
