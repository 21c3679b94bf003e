//! Ids of what has ended, remembered for a while: request ids of ended acquires, so that a
//! late attempt of one creates nothing, and lease ids of leases that ended without a
//! release, so that a late renewal can say why.
//!
//! Each shard keeps at most [`TOMBSTONES_PER_SHARD`] of each, in two generations: inserts
//! go to the young one, and when it is full, the old one is dropped whole and the young one
//! takes its place. So at least the newest half of the bound are kept (a late attempt of an
//! older id is then a new acquire again, as without tombstones). Dropping a generation
//! whole costs no lookup per eviction: evicting the oldest one by one looked up an id
//! inserted long before, out of the caches, on every insert (3 % of a busy server's CPU).

use crate::id::Id;
use crate::server::store::Ended;
use std::collections::HashMap;

/// Tombstones kept per shard at most, of each kind: two generations of half as many (each
/// fills a map of 4,096 slots, 41 bytes per slot, exactly), so the default 16 shards hold
/// at most about 5.1 MiB of each kind (one generation of 4,096 with an eviction queue
/// took about 6.6 MiB: a map of 8,192 slots and 24 bytes of queue per entry).
pub const TOMBSTONES_PER_SHARD: usize = 7168;

/// Tombstones per generation: the newest this many are always kept (until they expire).
const GENERATION: usize = TOMBSTONES_PER_SHARD / 2;

/// What a tombstone records: (fingerprint of the lock key, expiry µs, a tag saying why).
type Record = (u64, u64, u8);

/// Ids by id, young and old.
#[derive(Debug, Default)]
pub(super) struct Tombstones {
    young: HashMap<Id, Record>,
    old: HashMap<Id, Record>,
    /// The latest expiry in each generation: once it has passed, the whole generation has.
    young_until: u64,
    old_until: u64,
}

impl Tombstones {
    pub fn insert(&mut self, id: Id, lock: u64, now: u64, ttl: u64) {
        self.insert_tagged(id, lock, now, ttl, 0);
    }

    /// Inserts with a tag. Entries may have different TTLs: `tag` ignores one once expired,
    /// and it is dropped with its generation.
    pub fn insert_tagged(&mut self, id: Id, lock: u64, now: u64, ttl: u64, tag: u8) {
        self.expire(now);
        if self.young.len() >= GENERATION {
            self.age();
        }
        let expires = now.saturating_add(ttl);
        self.young.insert(id, (lock, expires, tag));
        self.young_until = self.young_until.max(expires);
    }

    pub fn contains(&self, id: &Id, lock: u64, now: u64) -> bool {
        self.tag(id, lock, now).is_some()
    }

    /// The tag of a live tombstone of `id` on `lock`.
    pub fn tag(&self, id: &Id, lock: u64, now: u64) -> Option<u8> {
        // The young generation has the newer tombstone of an id in both.
        self.young
            .get(id)
            .or_else(|| self.old.get(id))
            .filter(|&&(l, expires, _)| l == lock && expires > now)
            .map(|&(_, _, tag)| tag)
    }

    /// How many are kept, live or expired.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Drops the generations whose every tombstone has expired.
    fn expire(&mut self, now: u64) {
        if !self.young.is_empty() && self.young_until <= now {
            self.age();
        }
        if !self.old.is_empty() && self.old_until <= now {
            self.old.clear();
        }
    }

    /// Drops the old generation; the young one becomes the old (both keep their maps'
    /// memory, so that a busy shard does not allocate anew every generation).
    fn age(&mut self) {
        std::mem::swap(&mut self.young, &mut self.old);
        self.young.clear();
        self.old_until = self.young_until;
        self.young_until = 0;
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
        assert_eq!(tombs.len(), 1, "dropped when it expired");
    }

    #[test]
    fn tombstones_stay_within_their_bound() {
        let mut tombs = Tombstones::default();
        for n in 0..(TOMBSTONES_PER_SHARD as u128 * 3) {
            // The same id now and then: its newer tombstone outlives the older entry.
            tombs.insert(id(n % 10_000), 1, n as u64, 1_000_000);
            assert!(tombs.len() <= TOMBSTONES_PER_SHARD);
        }
        // The newest generation's worth is always kept, the oldest dropped.
        let last = TOMBSTONES_PER_SHARD as u128 * 3 - 1;
        for n in last + 1 - GENERATION as u128..=last {
            assert!(tombs.contains(&id(n % 10_000), 1, last as u64), "{n}");
        }
        // Id 3000 was last inserted at 13,000, before the two generations kept (14,336 to
        // 21,503: each began when the one before held 3,584).
        assert!(!tombs.contains(&id(3000), 1, last as u64));
    }

    /// An id tombstoned again is judged by its newer tombstone, even while the older one
    /// is still kept in the old generation.
    #[test]
    fn the_newest_tombstone_of_an_id_wins() {
        let mut tombs = Tombstones::default();
        tombs.insert(id(1), 7, 0, 1_000);
        for n in 2..(GENERATION as u128 + 2) {
            tombs.insert(id(n), 7, 0, 1_000);
        }
        assert!(
            tombs.old.contains_key(&id(1)),
            "aged into the old generation"
        );
        tombs.insert(id(1), 8, 10, 1_000);
        assert!(tombs.contains(&id(1), 8, 10));
        assert!(
            !tombs.contains(&id(1), 7, 10),
            "the older tombstone, on another lock"
        );
    }

    /// A generation whose every tombstone has expired is dropped at the next insert, so a
    /// quiet shard does not keep them.
    #[test]
    fn expired_generations_are_dropped() {
        let mut tombs = Tombstones::default();
        tombs.insert(id(1), 7, 0, 100);
        tombs.insert(id(2), 7, 50, 100);
        tombs.insert(id(3), 7, 160, 100);
        assert_eq!(tombs.len(), 1, "both earlier ones had expired by 160");
        assert!(tombs.contains(&id(3), 7, 200));
    }

    #[test]
    fn tags_say_why_a_lease_ended() {
        for why in [Ended::Expired, Ended::MaxHold, Ended::Revoked] {
            assert_eq!(ended_of(tag_of(why)), Some(why));
        }
        assert_eq!(ended_of(0), None, "a request's tombstone says nothing");
    }
}
