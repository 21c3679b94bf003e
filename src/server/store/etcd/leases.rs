//! etcd leases: one per acquire, granted ahead of need so that an acquire costs one write.
//!
//! Granting a lease is a raft write of its own. A small pool of spare leases per TTL keeps
//! that write off the acquire's path: an acquire takes a spare, refreshes it with a
//! keep-alive (leader-local, no disk write) at the same time as its transaction, and a
//! background task grants the next spare. A spare never serves two acquires, and spares
//! that get old are left to expire.

use super::call::{Etcd, EtcdError};
use etcd_client::LeaseGrantOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Spares kept per TTL.
const SPARES: usize = 2;

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
    /// Per requested TTL: the spares, and how many grants for it are in flight.
    spares: Mutex<HashMap<i64, Spares>>,
}

#[derive(Debug, Default)]
struct Spares {
    ready: Vec<Lease>,
    granting: usize,
}

impl Leases {
    pub fn new(etcd: Etcd) -> Leases {
        Leases {
            etcd,
            spares: Mutex::new(HashMap::new()),
        }
    }

    /// A lease of at least `ttl` seconds: a spare if one is young enough, else a new one.
    pub async fn take(self: &Arc<Self>, ttl: i64) -> Result<Lease, EtcdError> {
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let spares = spares.entry(ttl).or_default();
            // A spare must outlive the keep-alive sent with the acquire's transaction.
            let fresh_enough = Instant::now() + Duration::from_millis(500);
            spares.ready.retain(|l| l.until > fresh_enough);
            spares.ready.pop()
        };
        self.refill(ttl);
        match spare {
            Some(lease) => Ok(lease),
            None => self.grant(ttl).await,
        }
    }

    /// Puts back a lease taken but not used (it has no keys).
    pub fn put_back(&self, ttl: i64, lease: Lease) {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        let spares = spares.entry(ttl).or_default();
        if spares.ready.len() < SPARES {
            spares.ready.push(Lease {
                fresh: false,
                ..lease
            });
        } else {
            self.etcd.revoke_later(lease.id);
        }
    }

    /// Grants a spare in the background unless there are enough (or enough coming).
    fn refill(self: &Arc<Self>, ttl: i64) {
        {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let spares = spares.entry(ttl).or_default();
            if spares.ready.len() + spares.granting >= SPARES {
                return;
            }
            spares.granting += 1;
        }
        let leases = self.clone();
        tokio::spawn(async move {
            let granted = leases.grant(ttl).await;
            if let Some(spares) = leases
                .spares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&ttl)
            {
                spares.granting -= 1;
            }
            if let Ok(lease) = granted {
                leases.put_back(ttl, lease);
            }
        });
    }

    /// Grants a lease with a random id: the id is half of the secret clients hold.
    pub async fn grant(&self, ttl: i64) -> Result<Lease, EtcdError> {
        let sent = Instant::now();
        let answer = self
            .etcd
            .call("lease grant", |mut c| async move {
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

    /// Revokes the spares (at shutdown), so that they do not linger until they expire.
    pub async fn revoke_spares(&self) {
        let spares: Vec<Lease> = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            spares.drain().flat_map(|(_, s)| s.ready).collect()
        };
        for lease in spares {
            let _ = self.etcd.revoke(lease.id).await;
        }
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
