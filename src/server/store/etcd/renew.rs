//! Renewing on etcd: a keep-alive per lease, between two reads of the keys. A lease at its
//! `max_hold` is ended instead, and a gone lease's ended key says why it ended.

use super::Inner;
use super::call::{EtcdError, first, get};
use super::keys::{Entry, LeaseId, LockKeys, Proof, unix_ms};
use crate::id::Id;
use crate::server::store::{Ended, Project, Renewal};
use etcd_client::{KeyValue, Txn};
use std::sync::Arc;
use std::time::SystemTime;

impl Inner {
    pub(super) async fn renew(
        &self,
        project: &Project,
        leases: Vec<(String, Id)>,
    ) -> Result<Vec<Renewal>, EtcdError> {
        let targets: Vec<Option<(LeaseId, LockKeys)>> = leases
            .iter()
            .map(|(name, id)| Some((LeaseId::from_id(*id)?, self.keys(project, name))))
            .collect();
        // 1. Which leases hold their lock (a foreign or made-up id names no key).
        let mut before = self.read_keys(&targets).await?;
        // 1b. Those at their max_hold end now, whatever their etcd TTL says.
        let now = unix_ms(SystemTime::now());
        let mut at_max_hold = vec![false; targets.len()];
        for (i, found) in before.iter_mut().enumerate() {
            // Less than a millisecond left counts as over: there is no lease to report.
            let over = |until: u64| until <= now.saturating_add(1);
            let ended = found
                .as_ref()
                .filter(|(_, _, entry)| entry.hold_until().is_some_and(over));
            if let (Some((rev, lease, entry)), Some((id, keys))) = (ended, &targets[i]) {
                let key = keys.queue_key(id.etcd);
                self.end_lease(keys, key, *rev, *lease, entry, Ended::MaxHold)
                    .await?;
                at_max_hold[i] = true;
                *found = None;
            }
        }
        // 2. Keep the others alive, and their delay keys' leases after them (so that a
        //    delay key always outlives its holder's keys by the delay).
        let mut alive = vec![false; targets.len()];
        let mut tasks = tokio::task::JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        for (i, found) in before.iter().enumerate() {
            if let Some((_, lease, entry)) = found {
                let (etcd, lease, limit) = (self.etcd.clone(), *lease, limit.clone());
                let ttl = entry.ttl;
                let delay = entry.delay_lease.map(|d| (d, ttl + 1));
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let kept = etcd.keep_alive(lease, ttl).await;
                    if kept.is_ok()
                        && let Some((delay_lease, delay_ttl)) = delay
                        && let Err(e) = etcd.keep_alive(delay_lease, delay_ttl).await
                    {
                        // The delay then counts from the delay key's last keep-alive: it
                        // may end early, which no renewal can repair now.
                        tracing::debug!(error = ?e, "keeping a delay key alive failed");
                    }
                    (i, kept)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((i, result)) = done else { continue };
            match result {
                Ok(()) => alive[i] = true,
                Err(EtcdError::LeaseGone) => {}
                Err(e) => return Err(e),
            }
        }
        // 3. A keep-alive alone is no proof: etcd 3.4 can answer one for a lease whose keys
        //    its revocation is deleting. The key must still be there, afterwards.
        let kept: Vec<Option<(LeaseId, LockKeys)>> = targets
            .into_iter()
            .zip(&alive)
            .map(|(t, &a)| t.filter(|_| a))
            .collect();
        let after = self.read_keys(&kept).await?;
        let now = unix_ms(SystemTime::now());
        let mut results: Vec<Renewal> = before
            .into_iter()
            .zip(after)
            .map(|(b, a)| match (b, a) {
                (Some((rev, _, _)), Some((rev_after, _, entry))) if rev == rev_after => {
                    Renewal::Renewed(entry.lease_at(now))
                }
                _ => Renewal::Gone(None),
            })
            .collect();
        // 4. Why the gone ones ended, where their ended key says.
        let gone: Vec<Option<(LeaseId, LockKeys)>> = kept
            .into_iter()
            .zip(&results)
            .enumerate()
            .map(|(i, (_, r))| {
                let target = leases.get(i).and_then(|(name, id)| {
                    Some((LeaseId::from_id(*id)?, self.keys(project, name)))
                });
                target.filter(|_| matches!(r, Renewal::Gone(_)) && !at_max_hold[i])
            })
            .collect();
        let why = self.ended_why(&gone).await?;
        for (i, result) in results.iter_mut().enumerate() {
            if at_max_hold[i] {
                *result = Renewal::Gone(Some(Ended::MaxHold));
            } else if let Renewal::Gone(reason) = result {
                *reason = why[i];
            }
        }
        Ok(results)
    }

    /// Reads keys in a few transactions: (create revision, etcd lease, entry) of each
    /// acquire whose queue key its lease id names (see `LeaseId::holds`).
    async fn read_keys(
        &self,
        targets: &[Option<(LeaseId, LockKeys)>],
    ) -> Result<Vec<Option<(i64, i64, Entry)>>, EtcdError> {
        let mut out = vec![None; targets.len()];
        let wanted: Vec<(usize, LeaseId, &LockKeys)> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|(lease, keys)| (i, *lease, keys)))
            .collect();
        // etcd allows 128 operations per transaction by default; up to two reads per lease.
        for chunk in wanted.chunks(50) {
            let mut ops = Vec::new();
            let mut at = Vec::with_capacity(chunk.len());
            for (_, lease, keys) in chunk {
                at.push(ops.len());
                ops.push(get(keys.queue_key(lease.etcd)));
                ops.extend(lease.request_key(keys).map(get));
            }
            let answer = self
                .etcd
                .txn("read_leases", Txn::new().and_then(ops))
                .await?;
            for ((i, lease, _), at) in chunk.iter().zip(at) {
                let attached = |kv: &KeyValue| kv.lease() == lease.etcd;
                if matches!(lease.proof, Proof::Slot(_))
                    && first(&answer, at + 1).filter(attached).is_none()
                {
                    continue;
                }
                out[*i] = first(&answer, at)
                    .filter(|kv| lease.names(kv))
                    .map(|kv| (kv.create_revision(), kv.lease(), Entry::decode(kv.value())));
            }
        }
        Ok(out)
    }
}
