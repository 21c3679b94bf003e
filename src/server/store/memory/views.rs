//! What inspection and listing show of locks.

use super::{Lock, Shared, lock_key, name_of};
use crate::server::store::{ListPage, ListSpec, LockView, Project};
use std::collections::BTreeMap;
use std::time::Duration;

impl Shared {
    /// What inspection shows of a lock, after bringing it up to date; `None` if nobody holds
    /// or waits for it and its grants are not held back.
    pub(super) fn inspect(&self, project: &Project, name: &str) -> Option<LockView> {
        let key = lock_key(project.id, name);
        let fingerprint = self.fingerprint(&key);
        self.on_lock(&key, fingerprint, |lock, tick, fx| {
            lock.settle(tick, fx);
            let held_back = self.held_back(project, name, tick.now);
            self.view(lock, held_back, tick.now)
        })
        // A lock whose holder just expired, with nobody waiting and no lock-delay running,
        // no longer exists.
        .filter(|view| {
            !view.holders.is_empty() || view.waiters > 0 || view.held_back_until.is_some()
        })
        .or_else(|| {
            // Nobody holds or waits, but grants are held back after a restart: say until
            // when, so that an operator sees why the first acquire will wait.
            let until = self.held_back(project, name, self.now())?;
            Some(LockView {
                held_back_until: Some(self.origin_wall + Duration::from_micros(until)),
                ..LockView::default()
            })
        })
    }

    /// What inspection shows of a lock as it is; a holder whose lease ran out without
    /// anybody noticing yet holds nothing.
    fn view(&self, lock: &Lock, held_back: Option<u64>, now: u64) -> LockView {
        let holders: Vec<_> = lock
            .holders()
            .iter()
            .filter(|h| h.deadline() > now)
            .map(|h| h.view(now, self.origin_wall))
            .collect();
        // A lock-delay (or a restart's hold-back) the lock keeps.
        let delayed = lock.held_back_until().filter(|&until| until > now);
        let held_back = held_back.max(delayed);
        LockView {
            mode: lock.mode(),
            waiters: lock.waiters() as u64,
            oldest_wait: lock
                .first_queued_at()
                .map(|at| Duration::from_micros(now.saturating_sub(at))),
            held_back_until: held_back
                .filter(|_| holders.is_empty())
                .map(|until| self.origin_wall + Duration::from_micros(until)),
            holders,
        }
    }

    /// A page of a project's locks: one pass over every shard (each locked in turn), keeping
    /// the `limit + 1` smallest names that qualify.
    pub(super) fn list(&self, project: &Project, spec: &ListSpec) -> ListPage {
        let limit = spec.limit.max(1);
        let start = lock_key(project.id, &spec.prefix);
        let after = spec.after.as_deref().map(|a| lock_key(project.id, a));
        let mut found: BTreeMap<Box<[u8]>, LockView> = BTreeMap::new();
        for index in 0..self.shards.len() {
            let state = self.shard(index);
            let now = self.now();
            for (key, lock) in &state.locks {
                if !key.starts_with(&start)
                    || after.as_ref().is_some_and(|a| key <= a)
                    || (found.len() > limit && found.last_key_value().is_some_and(|(l, _)| key > l))
                {
                    continue;
                }
                let name = name_of(key);
                let view = self.view(lock, self.held_back(project, &name, now), now);
                if view.holders.is_empty() && view.waiters == 0 {
                    continue;
                }
                found.insert(key.clone(), view);
                if found.len() > limit + 1 {
                    found.pop_last();
                }
            }
        }
        let more = found.len() > limit;
        if more {
            found.pop_last();
        }
        let locks: Vec<(String, LockView)> = found
            .into_iter()
            .map(|(key, view)| (name_of(&key).into_owned(), view))
            .collect();
        let next = more
            .then(|| locks.last().map(|(name, _)| name.clone()))
            .flatten();
        ListPage { locks, next }
    }
}
