//! The recent leadership states of observed elections, for `observe`.
//!
//! Leadership (the single exclusive holder of a name) changes at every exclusive grant and
//! release, and nearly all of those are plain mutexes nobody observes. So a name's changes
//! are recorded only once someone has observed it, and only until a minute after its last
//! observation ([`KEEP`]) while nobody waits on it: a name nobody observes costs one check
//! of an empty map per change. A history outlives its lock, so that an observer re-polling
//! right after an answer misses no state, however briefly a leader led.
//!
//! Memory is bounded: at most [`STATES_PER_NAME`] states per name, none older than [`KEEP`]
//! (the latest state is always the lock's current one, which needs no record), and at most
//! [`NAMES_PER_SHARD`] names per shard. An observer whose revision is older than what is
//! kept gets the current state alone, and goes on from there.

use crate::server::store::{LeaderView, Observation};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

/// Most states kept per name: far more than change between an answer and its re-poll.
pub(super) const STATES_PER_NAME: usize = 64;

/// Most observed names per shard. When full, the one whose observers left longest ago and
/// that nobody waits on is forgotten.
pub(super) const NAMES_PER_SHARD: usize = 1024;

/// How long a name is recorded after its last observation, and a state kept, µs.
pub(super) const KEEP: u64 = 60_000_000;

/// The store's revision numbers: `max(previous + 1, wall-clock µs since 2025)`, so that they
/// also grow across restarts (as long as the clock does not step back). An observer's
/// revision from before a restart is then older than anything the new process keeps.
#[derive(Debug)]
pub(super) struct Revisions(AtomicU64);

impl Revisions {
    pub fn new(wall_us: u64) -> Revisions {
        Revisions(AtomicU64::new(wall_us))
    }

    /// A revision above every one issued before.
    pub fn next(&self, wall_us: u64) -> u64 {
        let issued = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(last.saturating_add(1).max(wall_us))
            });
        match issued {
            Ok(last) | Err(last) => last.saturating_add(1).max(wall_us),
        }
    }
}

/// What an observer gets now.
#[derive(Debug)]
pub(super) enum Answer {
    Ready(Vec<Observation>),
    /// Nothing after its revision yet: wait for a change on this receiver.
    Wait(watch::Receiver<()>),
}

/// The histories of one shard's observed names, by lock key.
#[derive(Debug, Default)]
pub(super) struct Leadership {
    names: HashMap<Box<[u8]>, History>,
}

#[derive(Debug)]
struct History {
    /// Oldest first.
    states: VecDeque<(u64, Observation)>,
    /// Every change after this revision is in `states`: the revision when the name was
    /// first observed, or of the last state dropped.
    complete_after: u64,
    /// Recorded until this (µs since origin), and after while an observer waits.
    keep_until: u64,
    /// Bumped at every recorded state; each waiting observer holds a receiver.
    changed: watch::Sender<()>,
}

impl History {
    fn latest(&self) -> u64 {
        self.states
            .back()
            .map_or(self.complete_after, |(_, state)| state.revision)
    }

    fn observed(&self) -> bool {
        self.changed.receiver_count() > 0
    }
}

impl Leadership {
    /// Records a change of `key`'s leadership at `now` if the name is observed: `revision`
    /// and `leader` are only called then.
    pub fn record(
        &mut self,
        key: &[u8],
        now: u64,
        revision: impl FnOnce() -> u64,
        leader: impl FnOnce() -> Option<LeaderView>,
    ) {
        if self.names.is_empty() {
            return;
        }
        let Some(history) = self.names.get_mut(key) else {
            return;
        };
        let leader = leader();
        if history
            .states
            .back()
            .is_some_and(|(_, last)| last.leader == leader)
        {
            return;
        }
        let revision = revision();
        history
            .states
            .push_back((now, Observation { revision, leader }));
        while history.states.len() > STATES_PER_NAME {
            if let Some((_, dropped)) = history.states.pop_front() {
                history.complete_after = dropped.revision;
            }
        }
        history.changed.send_replace(());
    }

    /// What an observer of `key` gets now: with `after` `None`, the current state; else
    /// every state after revision `after`, or the current state alone if some of those are
    /// no longer kept, or a receiver to wait on if there is none yet. Starts recording the
    /// name if it was not; `revision` gives it its first revision then, and `current` is the
    /// lock's leader now.
    pub fn answer(
        &mut self,
        key: &[u8],
        after: Option<u64>,
        now: u64,
        revision: impl FnOnce() -> u64,
        current: impl FnOnce() -> Option<LeaderView>,
    ) -> Answer {
        if !self.names.contains_key(key) {
            if self.names.len() >= NAMES_PER_SHARD {
                self.forget_one();
            }
            // A revision of its own: above every revision an observer may hold from an
            // earlier history of this name, whose changes since were not recorded.
            let first = revision();
            self.names.insert(
                key.into(),
                History {
                    states: VecDeque::new(),
                    complete_after: first,
                    keep_until: 0,
                    changed: watch::Sender::new(()),
                },
            );
        }
        let Some(history) = self.names.get_mut(key) else {
            return Answer::Ready(Vec::new());
        };
        history.keep_until = now.saturating_add(KEEP);
        match after {
            Some(after) if after >= history.complete_after => {
                let newer: Vec<Observation> = history
                    .states
                    .iter()
                    .filter(|(_, state)| state.revision > after)
                    .map(|(_, state)| state.clone())
                    .collect();
                if newer.is_empty() {
                    Answer::Wait(history.changed.subscribe())
                } else {
                    Answer::Ready(newer)
                }
            }
            _ => Answer::Ready(vec![Observation {
                revision: history.latest(),
                leader: current(),
            }]),
        }
    }

    /// Drops states older than [`KEEP`] and the names nobody observed for that long.
    pub fn expire(&mut self, now: u64) {
        self.names.retain(|_, history| {
            while history
                .states
                .front()
                .is_some_and(|&(at, _)| at.saturating_add(KEEP) <= now)
            {
                if let Some((_, dropped)) = history.states.pop_front() {
                    history.complete_after = dropped.revision;
                }
            }
            history.keep_until > now || history.observed()
        });
        if self.names.capacity() > 4 * self.names.len() + 64 {
            self.names.shrink_to(2 * self.names.len());
        }
    }

    /// Forgets the name observed longest ago that nobody waits on, to make room.
    fn forget_one(&mut self) {
        let oldest = self
            .names
            .iter()
            .filter(|(_, history)| !history.observed())
            .min_by_key(|(_, history)| history.keep_until)
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.names.remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn leader(token: u64, value: &str) -> Option<LeaderView> {
        Some(LeaderView {
            fencing_token: token,
            value: value.into(),
            label: None,
            acquired_at: SystemTime::UNIX_EPOCH,
        })
    }

    fn states(answer: Answer) -> Vec<(u64, Option<u64>)> {
        match answer {
            Answer::Ready(states) => states
                .into_iter()
                .map(|s| (s.revision, s.leader.map(|l| l.fencing_token)))
                .collect(),
            Answer::Wait(_) => panic!("waits"),
        }
    }

    #[test]
    fn revisions_increase_and_follow_the_wall_clock() {
        let revisions = Revisions::new(1_000);
        assert_eq!(revisions.next(500), 1_001);
        assert_eq!(revisions.next(500), 1_002);
        assert_eq!(revisions.next(5_000), 5_000, "a restart later starts above");
        assert_eq!(revisions.next(0), 5_001);
    }

    #[test]
    fn only_observed_names_are_recorded() {
        let mut leadership = Leadership::default();
        let mut calls = 0;
        leadership.record(
            b"k",
            0,
            || 1,
            || {
                calls += 1;
                leader(1, "")
            },
        );
        assert_eq!(calls, 0, "nothing is built for a name nobody observes");
        assert_eq!(
            states(leadership.answer(b"k", None, 0, || 10, || leader(1, ""))),
            [(10, Some(1))],
            "the current state, with the name's first revision"
        );
        leadership.record(b"other", 0, || panic!("not observed"), || None);
        leadership.record(b"k", 1, || 11, || None);
        leadership.record(b"k", 2, || 12, || leader(2, "b"));
        assert_eq!(
            states(leadership.answer(b"k", Some(10), 3, || 99, || leader(2, "b"))),
            [(11, None), (12, Some(2))]
        );
        assert_eq!(
            states(leadership.answer(b"k", Some(11), 3, || 99, || leader(2, "b"))),
            [(12, Some(2))]
        );
        assert!(matches!(
            leadership.answer(b"k", Some(12), 3, || 99, || leader(2, "b")),
            Answer::Wait(_)
        ));
    }

    #[test]
    fn a_waiting_observer_is_woken_by_the_change() {
        let mut leadership = Leadership::default();
        leadership.answer(b"k", None, 0, || 10, || None);
        let Answer::Wait(rx) = leadership.answer(b"k", Some(10), 0, || 99, || None) else {
            panic!("nothing recorded yet")
        };
        assert!(!rx.has_changed().unwrap());
        leadership.record(b"k", 1, || 11, || leader(1, "a"));
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn the_same_state_twice_is_recorded_once() {
        let mut leadership = Leadership::default();
        leadership.answer(b"k", None, 0, || 10, || None);
        leadership.record(b"k", 1, || 11, || leader(1, "a"));
        leadership.record(b"k", 1, || 12, || leader(1, "a"));
        leadership.record(b"k", 1, || 13, || leader(1, "b"));
        assert_eq!(
            states(leadership.answer(b"k", Some(10), 2, || 99, || None)),
            [(11, Some(1)), (13, Some(1))]
        );
    }

    #[test]
    fn an_observer_behind_what_is_kept_gets_the_current_state() {
        let mut leadership = Leadership::default();
        leadership.answer(b"k", None, 0, || 10, || None);
        for n in 0..(STATES_PER_NAME as u64 + 6) {
            leadership.record(b"k", n, || 11 + n, || leader(n + 1, ""));
        }
        // States 11..=16 were dropped: an observer at 10 may have missed them.
        assert_eq!(
            states(leadership.answer(b"k", Some(10), 80, || 99, || leader(70, ""))),
            [(80, Some(70))]
        );
        // One at 16 has missed nothing.
        let kept = states(leadership.answer(b"k", Some(16), 80, || 99, || None));
        assert_eq!(kept.len(), STATES_PER_NAME);
        assert_eq!(kept[0].0, 17);
        // A revision from before the name was observed (another process, or an earlier
        // history) gets the current state.
        let mut fresh = Leadership::default();
        assert_eq!(
            states(fresh.answer(b"k", Some(5), 0, || 20, || leader(3, ""))),
            [(20, Some(3))]
        );
    }

    #[test]
    fn histories_expire_unless_observed() {
        let mut leadership = Leadership::default();
        leadership.answer(b"a", None, 0, || 10, || None);
        let Answer::Wait(rx) = leadership.answer(b"b", Some(u64::MAX - 1), 0, || 11, || None)
        else {
            panic!("waits")
        };
        leadership.record(b"a", 5, || 12, || leader(1, ""));
        leadership.expire(KEEP - 1);
        assert_eq!(leadership.len(), 2);
        leadership.expire(KEEP + 10);
        assert_eq!(leadership.len(), 1, "b's observer still waits");
        drop(rx);
        leadership.expire(KEEP + 10);
        assert_eq!(leadership.len(), 0);
        // Old states go, the name stays while observed.
        leadership.answer(b"a", None, 0, || 20, || None);
        leadership.record(b"a", 1, || 21, || leader(2, ""));
        leadership.answer(b"a", None, KEEP, || 99, || None);
        leadership.expire(KEEP + 5);
        assert_eq!(
            states(leadership.answer(b"a", Some(20), KEEP + 5, || 99, || leader(2, ""))),
            [(21, Some(2))],
            "state 21 is gone: the current state, at its revision"
        );
    }

    #[test]
    fn names_per_shard_are_bounded() {
        let mut leadership = Leadership::default();
        let mut revision = 0;
        for n in 0..(NAMES_PER_SHARD as u64 + 10) {
            leadership.answer(
                &n.to_be_bytes(),
                None,
                n,
                || {
                    revision += 1;
                    revision
                },
                || None,
            );
        }
        assert_eq!(leadership.len(), NAMES_PER_SHARD);
        assert!(
            !leadership.names.contains_key(&0u64.to_be_bytes()[..]),
            "the oldest went first"
        );
    }
}
