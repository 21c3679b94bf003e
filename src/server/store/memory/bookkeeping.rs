//! What the store keeps about a lock outside its state machine, brought up to date around
//! each operation on it: the lock's timer, the held and waiting counts, and what the
//! operation reported ([`Effects`]) turned into events, tombstones and leadership records.

use super::leadership::Leadership;
use super::lock_state::{Effects, Happened, Holder, Tick};
use super::shard::{Books, ShardState};
use super::{Lock, Shared, name_of, project_of, short};
use crate::id::Id;
use crate::server::store::{Ended, EventKind, Mode, StoreEvent};
use std::sync::atomic::Ordering;

/// The store's side of one operation on one lock.
pub(super) struct Fx<'a> {
    shared: &'a Shared,
    key: &'a [u8],
    /// Computed when first needed: most operations of the sweep need none.
    fingerprint: Option<u64>,
    now: u64,
    leadership: &'a mut Leadership,
}

impl Fx<'_> {
    fn fingerprint(&mut self) -> u64 {
        *self
            .fingerprint
            .get_or_insert_with(|| self.shared.fingerprint(self.key))
    }
}

impl Effects for Fx<'_> {
    fn token(&mut self) -> Option<u64> {
        self.shared.next_token()
    }

    fn lease_id(&mut self) -> Id {
        Shared::new_lease_id()
    }

    fn request_ended(&mut self, request_id: Id) {
        let fingerprint = self.fingerprint();
        self.shared.tombstone(fingerprint, request_id, self.now);
    }

    fn lease_ended(&mut self, holder: &Holder, why: Ended) {
        let fingerprint = self.fingerprint();
        self.shared.lease_ended(
            fingerprint,
            holder.lease_id(),
            holder.lease_ms(),
            why,
            self.now,
        );
    }

    fn happened(&mut self, what: Happened<'_>) {
        let shared = self.shared;
        if let Happened::Expired(_) = what {
            shared.expirations.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(leader) = what.leadership() {
            self.leadership.record(
                self.key,
                self.now,
                || shared.next_revision(),
                || leader.map(|h| h.leader_view(shared.origin_wall)),
            );
        }
        shared.emit(self.key, self.now, || shared.event_of(what));
    }
}

impl Shared {
    /// Runs `op` on a lock, keeping what the shard knows of it in step: its timer (moved
    /// when its [`wake_at`](super::lock_state::LockState::wake_at) moves, put back if it was
    /// just fired), the held and waiting counts, and what `op` reports.
    pub(super) fn bookkept<T>(
        &self,
        books: &mut Books,
        key: &[u8],
        fingerprint: Option<u64>,
        lock: &mut Lock,
        now: u64,
        op: impl FnOnce(&mut Lock, Tick, &mut Fx<'_>) -> T,
    ) -> T {
        let (wake, held, waiting) = (lock.wake_at(), lock.is_held(), lock.waiters());
        let mut fx = Fx {
            shared: self,
            key,
            fingerprint,
            now,
            leadership: &mut books.leadership,
        };
        let out = op(lock, self.tick(now), &mut fx);
        match (held, lock.is_held()) {
            (false, true) => {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.held.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let now_waiting = lock.waiters();
        if now_waiting > waiting {
            self.waiting
                .fetch_add((now_waiting - waiting) as u64, Ordering::Relaxed);
        } else if now_waiting < waiting {
            self.waiting
                .fetch_sub((waiting - now_waiting) as u64, Ordering::Relaxed);
        }
        let next = lock.wake_at();
        if next != wake || next.is_some() {
            let fingerprint = fx.fingerprint();
            if let Some(at) = wake.filter(|_| next != wake) {
                books.timers.remove(&(at, fingerprint));
            }
            if let Some(at) = next {
                books
                    .timers
                    .entry((at, fingerprint))
                    .or_insert_with(|| key.into());
            }
        }
        out
    }

    /// Runs `op` on the lock's state if it exists, then drops the lock if it is empty.
    pub(super) fn on_lock<T>(
        &self,
        key: &[u8],
        fingerprint: u64,
        op: impl FnOnce(&mut Lock, Tick, &mut Fx<'_>) -> T,
    ) -> Option<T> {
        // Under the lock: see the shard task.
        let mut state = self.shard(self.shard_index(fingerprint));
        let now = self.now();
        let ShardState { locks, books } = &mut *state;
        let lock = locks.get_mut(key)?;
        let out = self.bookkept(books, key, Some(fingerprint), lock, now, op);
        if lock.is_empty() {
            self.remove_lock(locks, key);
        }
        Some(out)
    }

    /// Withdraws the waiter with this request id, or drops the grant made to it; true if
    /// there was one.
    pub(super) fn withdraw(&self, key: &[u8], fingerprint: u64, request_id: Id) -> bool {
        self.on_lock(key, fingerprint, |lock, tick, fx| {
            lock.withdraw(request_id, tick, fx)
        })
        .unwrap_or(false)
    }

    /// The audit trail's form of what happened.
    fn event_of(&self, what: Happened<'_>) -> EventKind {
        match what {
            Happened::Granted(h) => EventKind::Granted {
                token: h.token(),
                request: short(&h.request_id()),
                deadline_us: self.unix_us(h.deadline()),
                shared: h.mode() == Mode::Shared,
                permits: match h.mode() {
                    Mode::Permit(n) => Some(n),
                    _ => None,
                },
            },
            Happened::Deadline(h) => EventKind::Deadline {
                token: h.token(),
                deadline_us: self.unix_us(h.deadline()),
            },
            Happened::Released(h) => EventKind::Released { token: h.token() },
            Happened::CancelledGrant(h) => EventKind::Cancelled {
                token: Some(h.token()),
                request: short(&h.request_id()),
            },
            Happened::CancelledWaiter(request_id) => EventKind::Cancelled {
                token: None,
                request: short(&request_id),
            },
            Happened::Revoked(h) => EventKind::Revoked { token: h.token() },
            Happened::Expired(h) => EventKind::Expired {
                token: h.token(),
                deadline_us: self.unix_us(h.deadline()),
            },
            Happened::WaiterLeft {
                request_id,
                timed_out,
            } => EventKind::WaiterLeft {
                request: short(&request_id),
                reason: if timed_out { "timeout" } else { "abandoned" }.into(),
            },
            Happened::Proclaimed(h) => EventKind::Proclaimed {
                token: h.token(),
                value: h.value().unwrap_or_default().to_owned(),
            },
        }
    }

    /// Sends an event to the audit trail and the console, where configured.
    fn emit(&self, key: &[u8], now: u64, kind: impl FnOnce() -> EventKind) {
        let (trail, console) = (&self.config.events, &self.config.console_events);
        if trail.is_none() && console.is_none() {
            return;
        }
        let event = StoreEvent {
            at_us: self.unix_us(now),
            project: project_of(key).to_string(),
            lock: name_of(key).into_owned(),
            kind: kind(),
        };
        if let Some(console) = console {
            let _ = console.send(event.clone());
        }
        if let Some(trail) = trail {
            let _ = trail.send(event);
        }
    }
}
