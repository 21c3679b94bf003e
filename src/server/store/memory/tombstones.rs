//! Ids of what has ended, remembered for a while: request ids of ended acquires, so that a
//! late attempt of one creates nothing, and lease ids of leases that ended without a
//! release, so that a late renewal can say why.
//!
//! Each shard keeps at most [`TOMBSTONES_PER_SHARD`] of each; when full, its oldest is
//! dropped (a late attempt of that id is then a new acquire again, as without tombstones).

use crate::id::Id;
use crate::server::store::Ended;
use std::collections::{HashMap, VecDeque};

/// Tombstones kept per shard at most: about 64 bytes each (map entry and queue entry), so
/// the default 16 shards hold at most about 4 MiB of them.
pub const TOMBSTONES_PER_SHARD: usize = 4096;

/// Ids by id: (fingerprint of the lock key, expiry µs, a tag saying why).
#[derive(Debug, Default)]
pub(super) struct Tombstones {
    by_id: HashMap<Id, (u64, u64, u8)>,
    /// Insertion order, for expiry and eviction: (expiry µs, id).
    order: VecDeque<(u64, Id)>,
}

impl Tombstones {
    pub fn insert(&mut self, id: Id, lock: u64, now: u64, ttl: u64) {
        self.insert_tagged(id, lock, now, ttl, 0);
    }

    /// Inserts with a tag. Entries may have different TTLs: one that expires early behind a
    /// later one is dropped only when it reaches the front (or by the bound), and `tag`
    /// ignores it once expired.
    pub fn insert_tagged(&mut self, id: Id, lock: u64, now: u64, ttl: u64, tag: u8) {
        self.expire(now);
        while self.order.len() >= TOMBSTONES_PER_SHARD {
            self.pop_oldest();
        }
        let expires = now.saturating_add(ttl);
        self.by_id.insert(id, (lock, expires, tag));
        self.order.push_back((expires, id));
    }

    pub fn contains(&self, id: &Id, lock: u64, now: u64) -> bool {
        self.tag(id, lock, now).is_some()
    }

    /// The tag of a live tombstone of `id` on `lock`.
    pub fn tag(&self, id: &Id, lock: u64, now: u64) -> Option<u8> {
        self.by_id
            .get(id)
            .filter(|&&(l, expires, _)| l == lock && expires > now)
            .map(|&(_, _, tag)| tag)
    }

    fn expire(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|&(expires, _)| expires <= now)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((expires, id)) = self.order.pop_front()
            // A newer tombstone of the same id has its own entry further back.
            && self.by_id.get(&id).is_some_and(|&(_, e, _)| e == expires)
        {
            self.by_id.remove(&id);
        }
    }
}

/// Why a lease ended, as a tombstone's tag.
pub(super) fn tag_of(why: Ended) -> u8 {
    match why {
        Ended::Expired => 1,
        Ended::MaxHold => 2,
        Ended::Revoked => 3,
    }
}

/// Why a lease ended, from a tombstone's tag.
pub(super) fn ended_of(tag: u8) -> Option<Ended> {
    match tag {
        1 => Some(Ended::Expired),
        2 => Some(Ended::MaxHold),
        3 => Some(Ended::Revoked),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Id {
        Id(n.to_be_bytes())
    }

    #[test]
    fn tombstones_are_scoped_to_their_lock_and_expire() {
        let mut tombs = Tombstones::default();
        tombs.insert(id(1), 7, 0, 100);
        assert!(tombs.contains(&id(1), 7, 99));
        assert!(!tombs.contains(&id(1), 8, 99), "another lock");
        assert!(!tombs.contains(&id(1), 7, 100), "expired");
        tombs.insert(id(2), 7, 150, 100);
        assert!(!tombs.by_id.contains_key(&id(1)), "dropped when it expired");
    }

    #[test]
    fn tombstones_stay_within_their_bound() {
        let mut tombs = Tombstones::default();
        for n in 0..(TOMBSTONES_PER_SHARD as u128 * 3) {
            // The same id now and then: its newer tombstone outlives the older entry.
            tombs.insert(id(n % 5_000), 1, n as u64, 1_000_000);
        }
        assert!(tombs.order.len() <= TOMBSTONES_PER_SHARD);
        assert!(tombs.by_id.len() <= TOMBSTONES_PER_SHARD);
        // The newest are kept, the oldest dropped.
        let last = TOMBSTONES_PER_SHARD as u128 * 3 - 1;
        assert!(tombs.contains(&id(last % 5_000), 1, last as u64));
        // Id 3000 was last inserted at 8000, before the newest 4,096 (8192 to 12,287).
        assert!(!tombs.contains(&id(3000), 1, last as u64));
    }

    #[test]
    fn tags_say_why_a_lease_ended() {
        for why in [Ended::Expired, Ended::MaxHold, Ended::Revoked] {
            assert_eq!(ended_of(tag_of(why)), Some(why));
        }
        assert_eq!(ended_of(0), None, "a request's tombstone says nothing");
    }
}
