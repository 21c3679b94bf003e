//! What a guard knows of its lease, as the renewal task publishes it: the deadline, when a
//! late renewal puts it in jeopardy, and why it ended. `LockGuard`, `Lease` and
//! `LostSignal` all read it the same way, so `remaining()`, `state()`, `is_held()` and
//! `lost()` can never disagree.

use std::fmt;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a lease ended while (or before) its guard believed it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease ran out without a confirmed renewal: no server answered in time (a network
    /// fault, a paused or busy process, a server restart), `auto_renew(false)` let it run
    /// out, or the server no longer knew the lease.
    Expired,
    /// The lease reached the [`max_hold`](crate::LockRequest::max_hold) its request set.
    MaxHold,
    /// An operator revoked the lease (`leasehold revoke`, `POST /v1/revoke`, or
    /// `TestServer::revoke` of the `testing` feature, in tests).
    Revoked,
    /// The guard was released or dropped: the lock is no longer this holder's. Only
    /// [`LostSignal`] and [`Lease`](crate::Lease) copies that outlive their guard see it.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "the lease expired",
            LostReason::MaxHold => "the lease reached its max_hold",
            LostReason::Revoked => "the lease was revoked",
            LostReason::Released => "the lock was released",
        })
    }
}

/// Where a guard's lease stands, as [`LockGuard::state`](crate::LockGuard::state) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GuardState {
    /// Held, and the last renewal came in time.
    Held,
    /// Still held, but a renewal failed or is late: the lease may be lost at its deadline
    /// ([`remaining`](crate::LockGuard::remaining) says when) unless a renewal gets
    /// through first. A warning, like Chubby's jeopardy event: finish or checkpoint now.
    Jeopardy,
    /// No longer held, and why.
    Lost(LostReason),
}

/// The renewal task's view of a lease, published on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// Held until `deadline` unless a renewal extends it; in jeopardy from `jeopardy_at`
    /// (a renewal failed, or none was confirmed when one should have been). Once `deadline`
    /// passes with no news, the lease is lost for `ends`.
    Held {
        deadline: Instant,
        jeopardy_at: Instant,
        ends: LostReason,
    },
    /// Lost at `at` (never later than the deadline it had).
    Lost { reason: LostReason, at: Instant },
}

/// The sending half, kept by the renewal task.
pub(crate) type StateSender = watch::Sender<Published>;

/// A reader of a lease's state.
#[derive(Clone)]
pub(crate) struct StateReader(pub(crate) watch::Receiver<Published>);

impl StateReader {
    /// The deadline in force: after it the lease is presumed lost.
    pub fn valid_until(&self) -> Instant {
        match *self.0.borrow() {
            Published::Held { deadline, .. } => deadline,
            Published::Lost { at, .. } => at,
        }
    }

    pub fn state(&self) -> GuardState {
        let now = Instant::now();
        // Copied out: the watch's lock is not held while `has_changed` takes it again.
        let published = *self.0.borrow();
        match published {
            Published::Lost { reason, .. } => GuardState::Lost(reason),
            Published::Held { deadline, ends, .. } if now >= deadline => GuardState::Lost(ends),
            // The renewal task is gone (its runtime shut down): nobody renews the lease.
            Published::Held { .. } if self.0.has_changed().is_err() => {
                GuardState::Lost(LostReason::Expired)
            }
            Published::Held { jeopardy_at, .. } if now >= jeopardy_at => GuardState::Jeopardy,
            Published::Held { .. } => GuardState::Held,
        }
    }

    pub fn is_held(&self) -> bool {
        !matches!(self.state(), GuardState::Lost(_))
    }

    /// Resolves when the lease is lost, with why.
    pub async fn lost(&self) -> LostReason {
        let mut state = self.0.clone();
        loop {
            let published = *state.borrow_and_update();
            let (deadline, ends) = match published {
                Published::Lost { reason, .. } => return reason,
                Published::Held { deadline, ends, .. } => (deadline, ends),
            };
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        // The renewal task is gone without a word: nobody renews the lease.
                        return match *state.borrow() {
                            Published::Lost { reason, .. } => reason,
                            Published::Held { .. } => LostReason::Expired,
                        };
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if *state.borrow() == published {
                        return ends;
                    }
                }
            }
        }
    }
}

/// A cloneable handle that tells whether a guard's lease is lost, for workers that must stop
/// when it is while one owner keeps the [`LockGuard`](crate::LockGuard) and releases it.
///
/// Obtained from [`LockGuard::lost_signal`](crate::LockGuard::lost_signal). It does not keep
/// the lock: once the guard is released or dropped, the signal reports
/// [`LostReason::Released`] (unless the lease was lost before).
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// let dl = leasehold::DistributedLock::new("project-api-key");
/// let guard = dl.lock("ingest").await?;
/// let signal = guard.lost_signal();
/// let worker = tokio::spawn(async move {
///     tokio::select! {
///         reason = signal.lost() => eprintln!("stopping: {reason}"),
///         _ = async { /* work */ } => {}
///     }
/// });
/// # let _ = worker.await;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LostSignal {
    pub(crate) state: StateReader,
}

impl LostSignal {
    /// Resolves when the lease is lost (at once if it already is), with why.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future has no effect on the lease.
    pub async fn lost(&self) -> LostReason {
        self.state.lost().await
    }

    /// True once the lease is lost or released.
    pub fn is_lost(&self) -> bool {
        !self.state.is_held()
    }

    /// Where the lease stands now.
    pub fn state(&self) -> GuardState {
        self.state.state()
    }
}

impl fmt::Debug for LostSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostSignal")
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn held(deadline_in: u64, jeopardy_in: u64) -> (StateSender, StateReader) {
        let now = Instant::now();
        let (tx, rx) = watch::channel(Published::Held {
            deadline: now + Duration::from_millis(deadline_in),
            jeopardy_at: now + Duration::from_millis(jeopardy_in),
            ends: LostReason::MaxHold,
        });
        (tx, StateReader(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn held_then_jeopardy_then_lost_for_the_published_reason() {
        let (_tx, state) = held(300, 100);
        assert_eq!(state.state(), GuardState::Held);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(state.state(), GuardState::Jeopardy);
        assert!(state.is_held());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(state.state(), GuardState::Lost(LostReason::MaxHold));
        assert_eq!(state.lost().await, LostReason::MaxHold);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_waits_for_the_deadline_in_force() {
        let (tx, state) = held(300, 200);
        let started = Instant::now();
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.lost().await }
        });
        tokio::time::advance(Duration::from_millis(100)).await;
        // A renewal moves the deadline: `lost` follows it.
        tx.send_replace(Published::Held {
            deadline: started + Duration::from_millis(500),
            jeopardy_at: started + Duration::from_millis(400),
            ends: LostReason::Expired,
        });
        assert_eq!(waiter.await.unwrap(), LostReason::Expired);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_published_loss_wins_at_once() {
        let (tx, state) = held(300, 200);
        tx.send_replace(Published::Lost {
            reason: LostReason::Revoked,
            at: Instant::now(),
        });
        assert_eq!(state.state(), GuardState::Lost(LostReason::Revoked));
        assert_eq!(state.lost().await, LostReason::Revoked);
        assert_eq!(state.valid_until(), Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_renewal_task_means_expired() {
        let (tx, state) = held(300, 200);
        drop(tx);
        assert_eq!(state.state(), GuardState::Lost(LostReason::Expired));
        assert_eq!(state.lost().await, LostReason::Expired);
    }
}
