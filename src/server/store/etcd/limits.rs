//! Lease limits on etcd: the stamp a grant with limits writes before it is answered, and
//! ending a lease early (`max_hold`, revocation). Whether a lock-delay holds a grant back is
//! the grant rule's business (`rule.rs`: delay keys are phantoms). The design is in
//! docs/etcd.md ("Lock-delay, max_hold and revocation").

use super::Inner;
use super::acquire::Place;
use super::call::{EtcdError, put};
use super::keys::{DelayMark, Entry, LockKeys, unix_ms};
use crate::server::store::Ended;
use etcd_client::{Compare, CompareOp, KeyValue, Txn};
use std::time::SystemTime;

/// Ended keys live at least this long (s), and at least the lease's TTL: a holder renewing
/// on time learns why its lease ended.
const ENDED_TTL_MIN: i64 = 60;

/// A lock-delay in whole etcd seconds, rounded up (never shorter than asked).
fn delay_ttl(delay_ms: u64) -> i64 {
    delay_ms.div_ceil(1000).max(1) as i64
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Expired => "expired",
            Ended::MaxHold => "max_hold",
            Ended::Revoked => "revoked",
        }
    }

    pub(super) fn parse(value: &[u8]) -> Option<Ended> {
        match value {
            b"expired" => Some(Ended::Expired),
            b"max_hold" => Some(Ended::MaxHold),
            b"revoked" => Some(Ended::Revoked),
            _ => None,
        }
    }
}

impl Inner {
    /// Writes what a grant with limits needs, before it is answered: its grant time (where
    /// its `max_hold` counts from) and its delay key, on an etcd lease that outlives the
    /// holder's by the delay (renewals keep both alive). False if the place is gone.
    /// `has_own_delay`: its delay key exists already (an earlier poll stamped it).
    pub(super) async fn stamp(
        &self,
        keys: &LockKeys,
        place: &mut Place,
        has_own_delay: bool,
    ) -> Result<bool, EtcdError> {
        let stamp_time = place.entry.max_hold_ms.is_some() && place.entry.granted.is_none();
        let delay_ms = place.entry.lock_delay_ms.filter(|_| !has_own_delay);
        if !stamp_time && delay_ms.is_none() {
            return Ok(true);
        }
        let mut entry = place.entry.clone();
        if stamp_time || entry.granted.is_none() {
            entry.granted = Some(unix_ms(SystemTime::now()));
        }
        let mut ops = Vec::new();
        let mut delay_lease = None;
        if let Some(delay_ms) = delay_ms {
            let lease = self.leases.grant(entry.ttl + delay_ttl(delay_ms)).await?;
            delay_lease = Some(lease.id);
            entry.delay_lease = Some(lease.id);
            let mark = DelayMark::new(place.revision, delay_ms, entry.mode());
            ops.push(put(
                keys.delay_key(place.lease.etcd),
                mark.encode(),
                lease.id,
            ));
        }
        ops.push(put(place.key.clone(), entry.encode(), place.lease.etcd));
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                place.key.clone(),
                CompareOp::Equal,
                place.revision,
            )])
            .and_then(ops);
        let answer = self.etcd.txn("stamp", txn).await;
        let stamped = answer.as_ref().is_ok_and(|a| a.succeeded());
        if !stamped && let Some(lease) = delay_lease {
            self.etcd.revoke_later(lease);
        }
        answer?;
        if stamped {
            place.entry = entry;
        }
        Ok(stamped)
    }

    /// [`Inner::end_lease`] for the holder whose queue key is `holder`.
    pub(super) async fn end_holder(
        &self,
        keys: &LockKeys,
        holder: &KeyValue,
        why: Ended,
    ) -> Result<bool, EtcdError> {
        let entry = Entry::decode(holder.value());
        let (key, revision) = (holder.key().to_vec(), holder.create_revision());
        self.end_lease(keys, key, revision, holder.lease(), &entry, why)
            .await
    }

    /// Ends the lease whose queue key is `key` (created at `revision`, on etcd lease `lease`)
    /// now, for `why`: writes the ended key, restarts its lock-delay from now (if it asked
    /// for one), then revokes its etcd lease, which deletes its keys. False if it was no
    /// longer there.
    pub(super) async fn end_lease(
        &self,
        keys: &LockKeys,
        key: Vec<u8>,
        revision: i64,
        lease: i64,
        entry: &Entry,
        why: Ended,
    ) -> Result<bool, EtcdError> {
        let marker = self.leases.grant(entry.ttl.max(ENDED_TTL_MIN)).await?;
        let mut fresh = vec![marker.id];
        let mut ops = vec![put(keys.ended_key(lease), why.as_str(), marker.id)];
        if let Some(delay_ms) = entry.lock_delay_ms {
            // Moved to a lease of the delay's length from now: the old one would outlive
            // the holder's by the delay counted from its last renewal's end.
            let delay = self.leases.grant(delay_ttl(delay_ms)).await?;
            fresh.push(delay.id);
            ops.push(put(
                keys.delay_key(lease),
                DelayMark::new(revision, delay_ms, entry.mode()).encode(),
                delay.id,
            ));
        }
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key,
                CompareOp::Equal,
                revision,
            )])
            .and_then(ops);
        let answer = self.etcd.txn("end_lease", txn).await;
        if !answer.as_ref().is_ok_and(|a| a.succeeded()) {
            for id in fresh {
                self.etcd.revoke_later(id);
            }
            return answer.map(|_| false);
        }
        match self.etcd.revoke(lease).await {
            Ok(()) | Err(EtcdError::LeaseGone) => {}
            Err(e) => return Err(e),
        }
        if let Some(old) = entry.delay_lease {
            // Its delay key is on the new lease now: this one holds nothing.
            self.etcd.revoke_later(old);
        }
        Ok(true)
    }
}
