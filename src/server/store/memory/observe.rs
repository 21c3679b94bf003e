//! `observe`: an election's leadership states, at once or as soon as one is new.

use super::Shared;
use super::leadership::Answer;
use super::shard::ShardState;
use crate::server::store::{Observation, StoreError};
use std::time::Duration;
use tokio::time::Instant;

pub(super) async fn observe(
    shared: &Shared,
    key: Box<[u8]>,
    after: Option<u64>,
    wait: Duration,
) -> Result<Vec<Observation>, StoreError> {
    let now = Instant::now();
    // A wait too long to count is a wait without end (a year is one here).
    let until = now
        .checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let fingerprint = shared.fingerprint(&key);
    loop {
        let (answer, leader_ends) = shared.observe_now(&key, fingerprint, after);
        let mut changed = match answer {
            Answer::Ready(states) => return Ok(states),
            Answer::Wait(changed) => changed,
        };
        if Instant::now() >= until {
            return Ok(Vec::new());
        }
        // A leader whose lease runs out without a release or a waiter is otherwise noticed
        // only by the shard's sweep: look again then.
        let wake = leader_ends.map_or(until, |at| {
            until.min(shared.origin + Duration::from_micros(at.saturating_add(1)))
        });
        let _ = tokio::time::timeout_at(wake, changed.changed()).await;
    }
}

impl Shared {
    /// The answer for an observer of `key` now, after bringing the lock up to date; and
    /// when the current leader's lease ends (µs since origin), if there is one.
    fn observe_now(
        &self,
        key: &[u8],
        fingerprint: u64,
        after: Option<u64>,
    ) -> (Answer, Option<u64>) {
        let mut state = self.shard(self.shard_index(fingerprint));
        let now = self.now();
        let ShardState { locks, books } = &mut *state;
        let lock = locks.get_mut(key);
        if let Some(lock) = lock {
            self.bookkept(
                books,
                key,
                Some(fingerprint),
                lock,
                now,
                |lock, tick, fx| lock.settle(tick, fx),
            );
        }
        let leader = locks.get(key).and_then(|lock| lock.leader());
        let answer = books.leadership.answer(
            key,
            after,
            now,
            || self.next_revision(),
            || leader.map(|h| h.leader_view(self.origin_wall)),
        );
        let ends = leader.map(|h| h.deadline());
        if locks.get(key).is_some_and(|lock| lock.is_empty()) {
            self.remove_lock(locks, key);
        }
        (answer, ends)
    }
}
