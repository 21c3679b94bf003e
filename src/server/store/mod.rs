//! Lock storage behind the HTTP layer: the `LockStore` trait and its backends.
//!
//! A store knows projects, names, leases and waiters; it never sees HTTP or wire types.

pub mod memory;

use crate::id::Id;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future borrowing the store.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Identifies a project: locks of different projects never meet.
pub type ProjectId = u32;

/// One acquire (or re-poll of the same acquire).
#[derive(Debug, Clone)]
pub struct AcquireSpec {
    /// The caller's project.
    pub project: ProjectId,
    /// Lock name (already validated).
    pub name: String,
    /// Lease length.
    pub lease: Duration,
    /// Longest total wait from now; `None` waits without limit.
    pub wait: Option<Duration>,
    /// Longest time this call may wait before answering `StillWaiting`.
    pub poll: Duration,
    /// The caller's request id: repeating it resumes the same place in line or returns the
    /// same grant.
    pub request_id: Id,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Secret naming the lease.
    pub lease_id: Id,
    /// Fencing token of the grant.
    pub fencing_token: u64,
    /// Lease length, counted from when the store granted (or re-confirmed) it.
    pub lease: Duration,
}

/// How an acquire call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The lock is the caller's.
    Granted(Grant),
    /// The total wait ran out; the caller is no longer in line.
    TimedOut,
    /// This call's poll bound ran out; the caller keeps its place for the store's grace
    /// period and should call again with the same request id.
    StillWaiting {
        /// Waiters ahead of the caller.
        position: u64,
    },
}

/// What inspection shows of a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockView {
    /// The holder's fencing token and time left on its lease.
    pub holder: Option<(u64, Duration)>,
    /// Queued waiters.
    pub waiters: u64,
}

/// Store-wide figures for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    /// Locks with a holder.
    pub held: u64,
    /// Queued waiters over all locks.
    pub waiters: u64,
    /// Leases that ran out without being released, since start.
    pub expirations: u64,
}

/// Why a store refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A limit was reached (waiters per lock, ...); the caller may retry later.
    #[error("{0}")]
    Full(String),
    /// The store cannot serve now (shutting down, backend unreachable); retry.
    #[error("{0}")]
    Unavailable(String),
}

/// The operations the HTTP layer needs. Every method is atomic with respect to the others
/// on the same lock.
pub trait LockStore: Send + Sync + 'static {
    /// Grants the lock if it is free (or already granted to this request id), else queues
    /// the caller in FIFO order and waits up to `spec.poll`.
    ///
    /// Dropping the future detaches the waiter: it keeps its place for the grace period, and
    /// a grant made to it meanwhile is kept for it only that long.
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, AcquireOutcome>;

    /// Extends each lease that is still held under its id, by its own lease length from now.
    /// Returns, in order, the lease length for renewed leases and `None` for gone ones.
    fn renew(
        &self,
        project: ProjectId,
        leases: Vec<(String, Id)>,
    ) -> StoreFuture<'_, Vec<Option<Duration>>>;

    /// Releases the lease if it is held; false if it is not (nothing changes then).
    fn release(&self, project: ProjectId, name: &str, lease_id: Id) -> StoreFuture<'_, bool>;

    /// Withdraws the waiter with this request id, or releases the lease granted to it.
    fn cancel(&self, project: ProjectId, name: &str, request_id: Id) -> StoreFuture<'_, bool>;

    /// Shows a lock without changing it.
    fn inspect(&self, project: ProjectId, name: &str) -> StoreFuture<'_, LockView>;

    /// Store-wide figures.
    fn stats(&self) -> StoreStats;

    /// Called once when the server shuts down gracefully.
    fn shutdown(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
