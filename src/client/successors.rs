//! Successor reservations on the client's side (docs/protocol.md §3.16): a lock handed from
//! one of this client's guards to the next of its waiters without a round trip.
//!
//! Why: when tasks of one process take turns on a lock, each hand-over through the server
//! costs a release sent and a grant back, one round trip between two idle processes. When
//! the server has reserved the lock to a waiter of this client behind a lease this client
//! holds, the waiter needs no answer: the server starts the reserved lease when the lease
//! ahead ends, which is no earlier than this client sends its release. So the guard that
//! releases hands the lock over here, at once, and the server catches up a round trip later.
//!
//! A waiter told of its reservation registers here under the lease ahead; a guard that ends
//! (released, dropped) takes its successor's registration and tells it when its lease ended
//! here and until when this client still counted it held.

use crate::protocol::Id;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A lock handed over in this client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handover {
    /// When the lease ahead ended here, before its release was sent: the server starts the
    /// reserved lease no earlier.
    pub at: Instant,
    /// The lease ahead's local deadline then. Past it, the lease ahead may have ended on the
    /// server without this client's word (a server restart forgets both leases, and its
    /// restart hold-back covers only the one it granted), so the successor's own count
    /// must not run beyond it before the server confirms its lease by a renewal.
    pub valid_until: Instant,
}

/// A successor waiting behind a lease.
#[derive(Debug)]
struct Successor {
    request_id: Id,
    /// Its reserved lease.
    lease_id: Id,
    handover: oneshot::Sender<Handover>,
}

/// One lease: held by a guard of this client (`live`), or not yet known to be, and the
/// successor waiting behind it, if one does.
#[derive(Debug, Default)]
struct Entry {
    live: bool,
    behind: Option<Successor>,
}

/// This client's leases, and the leases its reserved successors wait behind, by id.
#[derive(Debug, Default)]
pub(crate) struct Successors {
    leases: Mutex<HashMap<Id, Entry>>,
}

impl Successors {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Entry>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many successors wait.
    pub fn len(&self) -> usize {
        self.table().values().filter(|e| e.behind.is_some()).count()
    }

    /// A guard of this client holds the lease `lease_id` now: a successor may wait behind
    /// it until [`Successors::lease_ended`].
    pub fn held(&self, lease_id: Id) {
        self.table().entry(lease_id).or_default().live = true;
    }

    /// Whether a guard of this client holds the lease `lease_id`.
    pub fn is_held(&self, lease_id: Id) -> bool {
        self.table().get(&lease_id).is_some_and(|entry| entry.live)
    }

    /// Registers the acquire `request_id`, reserved the lease `lease_id`, as the successor
    /// of the lease `after`: the receiver gets the lock if this client ends that lease while
    /// it holds it, and fails if it ends it otherwise. A lease no guard of this client holds
    /// may be one whose grant has yet to reach its guard (the server answers that grant and
    /// this reservation together), or one that ended here before, or another client's: the
    /// waiter asks the server for its grant meanwhile ([`Successors::is_held`]).
    pub fn wait_for(&self, after: Id, request_id: Id, lease_id: Id) -> oneshot::Receiver<Handover> {
        let (tx, rx) = oneshot::channel();
        let mut leases = self.table();
        leases.entry(after).or_default().behind = Some(Successor {
            request_id,
            lease_id,
            handover: tx,
        });
        rx
    }

    /// Withdraws the registration of `request_id` behind `after`. False if it was taken
    /// first: whatever the lease ahead's end decided is then in the receiver already.
    pub fn withdraw(&self, after: Id, request_id: Id) -> bool {
        let mut leases = self.table();
        let Some(entry) = leases.get_mut(&after) else {
            return false;
        };
        if !entry
            .behind
            .as_ref()
            .is_some_and(|successor| successor.request_id == request_id)
        {
            return false;
        }
        entry.behind = None;
        if !entry.live {
            leases.remove(&after);
        }
        true
    }

    /// The lease `lease_id` ends here (released, dropped or lost). `valid_until`: its local
    /// deadline if it is still held, `None` if it is not: its successor then asks the
    /// server for its grant, which comes no earlier than the server ends the lease.
    pub fn lease_ended(&self, lease_id: Id, valid_until: Option<Instant>) {
        let at = Instant::now();
        let mut leases = self.table();
        let Some(Entry {
            behind: Some(successor),
            ..
        }) = leases.remove(&lease_id)
        else {
            return;
        };
        // Sent under the lock, so that a waiter whose registration is gone finds the
        // outcome in its receiver.
        if let Some(valid_until) = valid_until.filter(|&until| at < until)
            && successor
                .handover
                .send(Handover { at, valid_until })
                .is_ok()
        {
            // Held here from now on, before its waiter's task even runs: the next
            // successor, told of its reservation a round trip from now, may wait behind it.
            // A waiter that is dropped with the lock unclaimed ends it (`Reserved`'s drop).
            leases.entry(successor.lease_id).or_default().live = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lease_hands_over_and_a_lost_one_does_not() {
        let successors = Successors::default();
        let (ahead, waiter) = (Id::fresh(), Id::fresh());
        let until = Instant::now() + std::time::Duration::from_secs(5);
        // Registered before the guard ahead exists (its grant and this reservation come
        // together): handed over once it is held and released.
        let next = Id::fresh();
        let rx = successors.wait_for(ahead, waiter, next);
        assert!(!successors.is_held(ahead));
        successors.held(ahead);
        assert!(successors.is_held(ahead));
        assert_eq!(successors.len(), 1);
        successors.lease_ended(ahead, Some(until));
        assert_eq!(successors.len(), 0);
        let handed = rx.await.expect("handed over");
        assert_eq!(handed.valid_until, until);
        assert!(!successors.withdraw(ahead, waiter), "taken");
        assert!(
            successors.is_held(next),
            "the successor holds it from the hand-over"
        );

        successors.held(ahead);
        let rx = successors.wait_for(ahead, waiter, Id::fresh());
        successors.lease_ended(ahead, None);
        assert!(rx.await.is_err(), "a lost lease hands nothing over");

        successors.held(ahead);
        let rx = successors.wait_for(ahead, waiter, Id::fresh());
        assert!(
            !successors.withdraw(ahead, Id::fresh()),
            "not its registration"
        );
        assert!(successors.withdraw(ahead, waiter));
        successors.lease_ended(ahead, Some(until));
        assert!(rx.await.is_err(), "withdrawn first");

        // Behind a lease never held here: withdrawing leaves nothing behind.
        let other = Id::fresh();
        let _rx = successors.wait_for(other, waiter, Id::fresh());
        assert!(successors.withdraw(other, waiter));
        assert!(successors.table().get(&other).is_none());
    }
}
