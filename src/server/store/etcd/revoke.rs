//! Revoking on etcd, and the reasons late renewals are given.

use super::Inner;
use super::call::{EtcdError, first, get, kvs};
use super::keys::{LeaseId, LockKeys};
use crate::server::store::{Ended, Project};
use etcd_client::Txn;

/// Rounds a revocation may take when the holder changes under it.
const ATTEMPTS: usize = 4;

impl Inner {
    /// Ends the holder's lease (the first in line, unless a lock-delay holds it back: then
    /// nobody holds the lock). Its fencing token, `None` if nobody holds the lock.
    pub(super) async fn revoke(
        &self,
        project: &Project,
        name: &str,
    ) -> Result<Option<u64>, EtcdError> {
        let keys = self.keys(project, name);
        for _ in 0..ATTEMPTS {
            let answer = self.head_and_delays("revoke", &keys, 1).await?;
            let Some(head) = first(&answer, 0) else {
                return Ok(None);
            };
            let own = keys.delay_key(head.lease());
            if kvs(&answer, 1).iter().any(|kv| kv.key() != own.as_slice()) {
                // First in line, but held back by an earlier holder's delay: not granted.
                return Ok(None);
            }
            let ended = self.end_holder(&keys, &head, Ended::Revoked).await?;
            if ended {
                return Ok(Some(head.create_revision() as u64));
            }
        }
        Err(EtcdError::Unavailable(
            "the holder kept changing during the revocation; retry".into(),
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
