//! `Lease`: what a `with_lock` closure gets of the guard it runs under, and the closure
//! shapes `with_lock` accepts.

use crate::client::lease_state::{GuardState, LostReason, LostSignal, StateReader};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A view of a held lease, handed to a [`with_lock`](crate::DistributedLock::with_lock)
/// closure that takes one: its fencing token for the resource, and its deadline and loss
/// for long work. It does not keep the lock; the `with_lock` call does.
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// use leasehold::Lease;
/// let dl = leasehold::DistributedLock::new("project-api-key");
/// let token = dl
///     .with_lock("invoices", |lease: Lease| async move {
///         // Send the token with every write, so the store can refuse a paused holder.
///         lease.fencing_token()
///     })
///     .await?;
/// # let _ = token; Ok(()) }
/// ```
///
/// The closure's parameter needs its type (`|lease: Lease|`): `with_lock` accepts closures
/// with and without it, and Rust cannot tell which one a bare `|lease|` means.
#[derive(Clone)]
pub struct Lease {
    pub(crate) name: Arc<str>,
    pub(crate) fencing_token: u64,
    pub(crate) state: StateReader,
}

impl Lease {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant (see [`LockGuard::fencing_token`](crate::LockGuard::fencing_token)).
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Time left before the lease is presumed lost; zero once it is.
    pub fn remaining(&self) -> Duration {
        remaining(&self.state)
    }

    /// The instant the lease is presumed lost unless renewed before.
    pub fn valid_until(&self) -> Instant {
        self.state.valid_until()
    }

    /// Where the lease stands now.
    pub fn state(&self) -> GuardState {
        self.state.state()
    }

    /// True while the lease is held.
    pub fn is_held(&self) -> bool {
        self.state.is_held()
    }

    /// Resolves when the lease is lost, with why.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future has no effect on the lease.
    pub async fn lost(&self) -> LostReason {
        self.state.lost().await
    }

    /// A cloneable signal of the lease's loss, for other tasks.
    pub fn lost_signal(&self) -> LostSignal {
        LostSignal {
            state: self.state.clone(),
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("fencing_token", &self.fencing_token)
            .field("state", &self.state())
            .finish()
    }
}

/// Time left until `valid_until`, zero once the lease is lost.
pub(crate) fn remaining(state: &StateReader) -> Duration {
    if state.is_held() {
        state
            .valid_until()
            .saturating_duration_since(Instant::now())
    } else {
        Duration::ZERO
    }
}

/// The closures [`with_lock`](crate::DistributedLock::with_lock) runs: `|| async { .. }`, or
/// `|lease: Lease| async move { .. }` to use the fencing token or the deadline.
///
/// `Args` only tells the two shapes apart; it is `()` or `(Lease,)`. Sealed: implemented
/// for those closures only.
pub trait LockFn<Args>: sealed::Sealed<Args> {
    /// What the closure's future yields.
    type Output;
    /// The closure's future.
    type Future: Future<Output = Self::Output>;

    /// Calls the closure.
    #[doc(hidden)]
    fn call(self, lease: Lease) -> Self::Future;
}

impl<F, Fut> LockFn<()> for F
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    type Output = Fut::Output;
    type Future = Fut;

    fn call(self, _: Lease) -> Fut {
        self()
    }
}

impl<F, Fut> LockFn<(Lease,)> for F
where
    F: FnOnce(Lease) -> Fut,
    Fut: Future,
{
    type Output = Fut::Output;
    type Future = Fut;

    fn call(self, lease: Lease) -> Fut {
        self(lease)
    }
}

mod sealed {
    use super::Lease;
    pub trait Sealed<Args> {}
    impl<F, Fut> Sealed<()> for F where F: FnOnce() -> Fut {}
    impl<F, Fut> Sealed<(Lease,)> for F where F: FnOnce(Lease) -> Fut {}
}
