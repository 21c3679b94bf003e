//! `LockGuard`: proof of a held lease, renewed in the background while it lives.

use crate::client::lease::{Lease, remaining};
use crate::client::lease_state::{GuardState, LostReason, LostSignal, StateReader};
use crate::client::mailbox::Commands;
use crate::client::renewer::{Command, json};
use crate::client::successors::Successors;
use crate::client::transport::{Attempts, Route, Transport};
use crate::error::Error;
use crate::protocol::{Id, LeaseRef};
use http::StatusCode;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A held lock. While it lives, the client's renewal task keeps its lease alive.
///
/// Obtained by awaiting [`DistributedLock::lock`](crate::DistributedLock::lock). The guard is
/// `'static`, `Send` and `Sync`: move it into tasks, keep it in structs, pass it around.
///
/// # Lease loss
/// A lease can be lost even while the guard lives: the server was unreachable for longer than
/// the lease, the server restarted, or `auto_renew(false)` was set and the lease ran out.
/// The guard presumes the lease lost a safety margin *before* the server could expire it and
/// give the lock to someone else, so [`is_held`](LockGuard::is_held) turning false and
/// [`lost`](LockGuard::lost) resolving always come first. Pass
/// [`fencing_token`](LockGuard::fencing_token) to the resource you protect so that it can
/// reject writes from a holder that was paused past its lease.
///
/// # Drop behavior
/// Dropping the guard stops renewal and releases the lock on the server in the background,
/// through the runtime that runs the client's renewal task; the next waiter gets the lock
/// about one round trip later, or at once if it waits in the same
/// [`DistributedLock`](crate::DistributedLock) (or a clone) and the server has reserved the
/// lock to it next (docs/protocol.md §3.16). A lease presumed lost is released too, as long
/// as the server could still hold it: never earlier than the drop, so the safety margin stays the
/// application's time to stop its work. Drop never blocks and never panics. If no runtime is left to
/// send the release (for example after the runtime shut down), nothing is sent and the lease
/// simply expires on the server after at most `expires_in`. Use
/// [`release`](LockGuard::release) to wait for the release and see its errors.
#[must_use = "if unused the lock is released immediately"]
#[clippy::has_significant_drop]
pub struct LockGuard {
    pub(crate) name: Arc<str>,
    pub(crate) lease_id: Id,
    pub(crate) fencing_token: u64,
    pub(crate) key: u64,
    pub(crate) state: StateReader,
    pub(crate) commands: Commands,
    pub(crate) transport: Arc<Transport>,
    pub(crate) margin: Duration,
    pub(crate) released: bool,
    /// Where a waiter of this client reserved to take the lock after this lease waits.
    pub(crate) successors: Arc<Successors>,
    /// A late grant not yet confirmed by a renewal: its deadline is the latest the server
    /// could hold the lease, not the earliest, so it hands nothing over.
    pub(crate) unconfirmed: bool,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant: strictly greater than that of every earlier grant of
    /// the same lock name, across server restarts too.
    ///
    /// Send it with every write to the resource the lock protects, and have the resource
    /// reject any write whose token is lower than the highest it has seen.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// True while the lease is held: false once it is known lost, or once its local
    /// deadline ([`valid_until`](LockGuard::valid_until)) passed without a confirmed renewal.
    pub fn is_held(&self) -> bool {
        self.state.is_held()
    }

    /// Time left before the guard presumes its lease lost: until
    /// [`valid_until`](LockGuard::valid_until), zero once lost. Renewals push it back.
    ///
    /// The same deadline [`is_held`](LockGuard::is_held) and [`lost`](LockGuard::lost) use,
    /// so a check like this is sound before a step that must finish under the lock:
    ///
    /// ```no_run
    /// # async fn run(guard: leasehold::LockGuard) {
    /// # use std::time::Duration;
    /// if guard.remaining() > Duration::from_secs(2) {
    ///     // start a step that takes at most 2 s
    /// }
    /// # }
    /// ```
    pub fn remaining(&self) -> Duration {
        remaining(&self.state)
    }

    /// The instant after which the guard presumes its lease lost unless a renewal is
    /// confirmed before: a safety margin before the server could expire it. Once the lease
    /// is lost, the moment that happened.
    pub fn valid_until(&self) -> Instant {
        self.state.valid_until()
    }

    /// Where the lease stands: [`GuardState::Held`], [`GuardState::Jeopardy`] from the
    /// first failed or late renewal until one succeeds, or [`GuardState::Lost`] with why.
    pub fn state(&self) -> GuardState {
        self.state.state()
    }

    /// Resolves when the lease is lost (at once if it already is), with why. Use it in
    /// `tokio::select!` to stop work that must not continue without the lock.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future has no effect on the lease.
    pub async fn lost(&self) -> LostReason {
        self.state.lost().await
    }

    /// A `Clone + Send + 'static` handle on this lease's loss, for workers that must stop
    /// when it is lost while the guard stays with one owner. Once the guard is released or
    /// dropped, the signal reports [`LostReason::Released`].
    pub fn lost_signal(&self) -> LostSignal {
        LostSignal {
            state: self.state.clone(),
        }
    }

    /// The lease as a [`with_lock`](crate::DistributedLock::with_lock) closure sees it.
    pub(crate) fn lease(&self) -> Lease {
        Lease {
            name: self.name.clone(),
            fencing_token: self.fencing_token,
            state: self.state.clone(),
        }
    }

    /// Releases the lock and waits for the server to confirm.
    ///
    /// A waiter of the same client that the server reserved the lock to next gets it at
    /// once, before the server hears of the release (docs/protocol.md §3.16).
    ///
    /// Returns [`Error::LockLost`] if the lease was already lost (so the lock may have been
    /// someone else's for a while), or [`Error::Unavailable`] if no server answered before
    /// the lease would have expired anyway. A lost lease is still released in the
    /// background, best effort, so that the next waiter need not wait for its expiry: the
    /// server may hold it for up to the safety margin after the guard gave it up, or longer
    /// if a renewal reached it whose answer came too late. It is not waited for, since a
    /// lease is often lost because no server answers.
    ///
    /// # Cancel safety
    /// The guard is consumed at once. If the future is dropped before the server answered
    /// (say, a cancelled [`with_lock`](crate::DistributedLock::with_lock) call), the release
    /// goes on in the background, as for a dropped guard.
    pub async fn release(mut self) -> Result<(), Error> {
        self.hand_over();
        let deadline = match self.state.state() {
            GuardState::Held | GuardState::Jeopardy => self.state.valid_until(),
            GuardState::Lost(_) => {
                // The server may hold it a while yet (up to the safety margin, or longer
                // after a late renewal): the renewal task releases it while that is worth
                // it. Not waited for: a lease is often lost because no server answers.
                self.released = true;
                self.commands.send(Command::Release(self.key), None);
                return Err(self.lost_error());
            }
        };
        // Worth trying until the server could have expired the lease by itself.
        let cutoff = deadline + self.margin;
        let body = json(&LeaseRef {
            name: self.name.to_string(),
            lease_id: self.lease_id,
        });
        let attempts = Attempts {
            deadline: cutoff,
            per_attempt: Duration::from_secs(5),
            first_contact: false,
        };
        // The renewal task keeps the lease until the server answers: should this future be
        // dropped meanwhile, the guard's drop hands the release to it.
        let reply = self
            .transport
            .post(Route::Release, Some(&self.name), body, attempts)
            .await;
        self.released = true;
        self.commands.leave(Command::Forget(self.key));
        let reply = reply?;
        match reply.status {
            status if status.is_success() => Ok(()),
            // An earlier attempt may have released it and lost its answer (`404` once
            // nobody else holds or waits for the lock either).
            StatusCode::GONE | StatusCode::NOT_FOUND if reply.attempts > 1 => Ok(()),
            StatusCode::GONE | StatusCode::NOT_FOUND => Err(self.lost_error()),
            _ => Err(reply.into_error()),
        }
    }

    /// Hands the lock to this client's waiter reserved next (docs/protocol.md §3.16), if
    /// one waits and the lease is still held; called before the release is sent.
    fn hand_over(&self) {
        // A loss published between the two reads gives its moment, which is past: nothing
        // is handed over then.
        let held = !self.unconfirmed && self.state.is_held();
        self.successors
            .lease_ended(self.lease_id, held.then(|| self.state.valid_until()));
    }

    fn lost_error(&self) -> Error {
        let reason = match self.state.state() {
            // (`Released` is this release's own doing, seen after the server said `gone`.)
            GuardState::Lost(reason) if reason != LostReason::Released => reason,
            // The server no longer knew the lease although the guard thought it held.
            _ => LostReason::Expired,
        };
        Error::LockLost {
            name: self.name.to_string(),
            reason,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.hand_over();
            // An unbounded send needs no runtime; if the renewal task is gone it fails and
            // the lease expires on its own.
            self.commands.send(Command::Release(self.key), None);
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("fencing_token", &self.fencing_token)
            .field("held", &self.is_held())
            .finish_non_exhaustive()
    }
}
