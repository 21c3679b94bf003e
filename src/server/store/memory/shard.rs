//! The store's shards: each a table of locks under one mutex, with the expiry timers of its
//! locks, the histories of its observed elections, its tombstones, and a task that fires the
//! timers and sweeps the table.

use super::leadership::Leadership;
use super::tombstones::Tombstones;
use super::{Lock, Shared, micros};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;

pub(super) type ShardHasher =
    std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A lock's timer in [`Books::timers`]: (when, the lock key's fingerprint). The
/// fingerprint tells apart locks whose timers fall in the same microsecond.
pub(super) type TimerKey = (u64, u64);

#[derive(Debug)]
pub(super) struct Shard {
    pub state: Mutex<ShardState>,
    pub wake: Arc<Notify>,
    /// Locked after `state` when both are.
    pub tombstones: Mutex<Tombstones>,
    /// Lease ids of leases that ended without a release, tagged with why, so that a late
    /// renewal can say why. Locked after `state` when both are.
    pub ended: Mutex<Tombstones>,
}

#[derive(Debug, Default)]
pub(super) struct ShardState {
    /// The state is boxed: the table grows by doubling, so up to half its slots are empty,
    /// and an empty slot of a boxed state costs a pointer, not a whole lock state.
    pub locks: HashMap<Box<[u8]>, Box<Lock>>,
    pub books: Books,
}

/// What a shard keeps about its locks beside them, kept in step by
/// [`Shared::bookkept`](super::Shared::bookkept).
#[derive(Debug, Default)]
pub(super) struct Books {
    /// One per lock whose [`wake_at`](super::lock_state::LockState::wake_at) is set: the
    /// lock key, by when it is due.
    pub timers: BTreeMap<TimerKey, Box<[u8]>>,
    pub leadership: Leadership,
}

/// A locked shard. When it drops, the shard's task is woken if an earlier timer was
/// scheduled meanwhile.
pub(super) struct Locked<'a> {
    state: MutexGuard<'a, ShardState>,
    first: Option<TimerKey>,
    wake: &'a Notify,
}

impl std::ops::Deref for Locked<'_> {
    type Target = ShardState;
    fn deref(&self) -> &ShardState {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut ShardState {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let first = self.state.books.timers.keys().next().copied();
        if first.is_some() && (self.first.is_none() || first < self.first) {
            self.wake.notify_one();
        }
    }
}

impl Shared {
    /// Locks a shard.
    pub(super) fn shard(&self, index: usize) -> Locked<'_> {
        let shard = &self.shards[index];
        let state = shard.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = state.books.timers.keys().next().copied();
        Locked {
            state,
            first,
            wake: &shard.wake,
        }
    }

    /// Settles the locks whose timers are due.
    fn fire_timers(&self, state: &mut ShardState, now: u64) {
        let ShardState { locks, books } = state;
        if books
            .timers
            .first_key_value()
            .is_none_or(|(&(at, _), _)| at > now)
        {
            return;
        }
        // Taken out first: settling a lock schedules its next timer, after `now`.
        let later = books.timers.split_off(&(now.saturating_add(1), 0));
        let due = std::mem::replace(&mut books.timers, later);
        for ((_, fingerprint), key) in due {
            let Some(lock) = locks.get_mut(&key) else {
                continue;
            };
            self.bookkept(
                books,
                &key,
                Some(fingerprint),
                lock,
                now,
                |lock, tick, fx| lock.settle(tick, fx),
            );
            if lock.is_empty() {
                self.remove_lock(locks, &key);
            }
        }
    }

    /// Drops what nobody will come back for: overdue holders, detached waiters past their
    /// grace period, and elections nobody observes any more.
    fn sweep(&self, state: &mut ShardState, now: u64) {
        let ShardState { locks, books } = state;
        locks.retain(|key, lock| {
            self.bookkept(books, key, None, lock, now, |lock, tick, fx| {
                lock.drop_abandoned(tick, fx)
            });
            if lock.is_empty() {
                self.lock_gone(key);
            }
            !lock.is_empty()
        });
        // Give back the table's memory after a burst: idle locks should cost nothing.
        if locks.capacity() > 4 * locks.len() + 1024 {
            locks.shrink_to(2 * locks.len());
        }
        books.leadership.expire(now);
    }
}

/// Fires expiry timers and sweeps one shard, until the store is dropped.
pub(super) async fn shard_task(shared: Weak<Shared>, index: usize, wake: Arc<Notify>) {
    // Spread the shards' sweeps over the interval.
    let mut next_sweep = 0u64;
    // Waiters queued during a hold-back are granted by a sweep right when it ends.
    let mut hold_back_over = false;
    loop {
        let next_wake = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if next_sweep == 0 {
                let n = shared.shards.len() as u64;
                next_sweep =
                    shared.now() + micros(shared.config.sweep_interval) * (index as u64 + 1) / n;
            }
            // The clock is read under the lock, so that `now` is never earlier than a poll
            // that registered before (a grant counted from it would end too early).
            let mut state = shared.shard(index);
            let now = shared.now();
            shared.fire_timers(&mut state, now);
            let hold_back_ends = !hold_back_over && now >= shared.hold_back_until;
            hold_back_over |= hold_back_ends;
            if now >= next_sweep || hold_back_ends {
                shared.sweep(&mut state, now);
                next_sweep = now + micros(shared.config.sweep_interval);
            }
            let mut at = next_sweep;
            if !hold_back_over {
                at = at.min(shared.hold_back_until);
            }
            if let Some(&(deadline, _)) = state.books.timers.keys().next() {
                at = at.min(deadline);
            }
            shared.origin + Duration::from_micros(at)
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next_wake) => {}
            _ = wake.notified() => {}
        }
    }
}
