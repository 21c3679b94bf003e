//! Revoking on etcd, and the reasons late renewals are given.

use super::Inner;
use super::call::{EtcdError, first, get};
use super::keys::{LeaseId, LockKeys};
use crate::server::store::{Ended, Project};
use etcd_client::Txn;
use std::sync::Arc;

/// Holders ended at once: readers may be many, and each costs a lease grant, a write and a
/// revocation.
const AT_ONCE: usize = 16;

/// Rounds a revocation may take when the holders change under it.
const ATTEMPTS: usize = 4;

impl Inner {
    /// Ends every holder's lease (the holders by the grant rule: a first in line held back by
    /// an earlier holder's lock-delay holds nothing). Their fencing tokens, ascending; empty
    /// if nobody holds the lock.
    pub(super) async fn revoke(
        self: &Arc<Self>,
        project: &Project,
        name: &str,
    ) -> Result<Vec<u64>, EtcdError> {
        let keys = self.keys(project, name);
        for _ in 0..ATTEMPTS {
            let state = self.lock_state("revoke", &keys).await?;
            if state.holders.is_empty() {
                return Ok(Vec::new());
            }
            let limit = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
            let mut ends = tokio::task::JoinSet::new();
            for holder in state.holders {
                let (inner, keys, limit) = (self.clone(), keys.clone(), limit.clone());
                ends.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let ended = inner.end_holder(&keys, &holder, Ended::Revoked).await;
                    ended.map(|ended| ended.then_some(holder.create_revision() as u64))
                });
            }
            let mut tokens = Vec::new();
            let mut failed = None;
            while let Some(done) = ends.join_next().await {
                // A task only ends by finishing: the set is not aborted.
                let Ok(ended) = done else { continue };
                match ended {
                    Ok(token) => tokens.extend(token),
                    // The others still end theirs: an error is reported after.
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if !tokens.is_empty() {
                tokens.sort_unstable();
                return Ok(tokens);
            }
            // Every holder read had left meanwhile; others may hold now.
        }
        Err(EtcdError::Unavailable(
            "the holders kept changing during the revocation; retry".into(),
        ))
    }

    /// Why each lease ended early, if its ended key is still there (`None` entries are
    /// skipped).
    pub(super) async fn ended_why(
        &self,
        leases: &[Option<(LeaseId, LockKeys)>],
    ) -> Result<Vec<Option<Ended>>, EtcdError> {
        let mut out = vec![None; leases.len()];
        let wanted: Vec<(usize, Vec<u8>)> = leases
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                t.as_ref()
                    .map(|(lease, keys)| (i, keys.ended_key(lease.etcd)))
            })
            .collect();
        // etcd allows 128 operations per transaction by default.
        for chunk in wanted.chunks(100) {
            let ops: Vec<_> = chunk.iter().map(|(_, key)| get(key.clone())).collect();
            let answer = self.etcd.txn("ended_why", Txn::new().and_then(ops)).await?;
            for (j, (i, _)) in chunk.iter().enumerate() {
                out[*i] = first(&answer, j).and_then(|kv| Ended::parse(kv.value()));
            }
        }
        Ok(out)
    }
}
