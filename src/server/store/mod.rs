//! Lock storage behind the HTTP layer: the `LockStore` trait and its backends.
//!
//! A store knows projects, names, leases and waiters; it never sees HTTP or wire types.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;
mod wait_queue;

/// The request ids that [`AcquireSpec::request_id`] carries.
pub use crate::id::Id;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A boxed future borrowing the store.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A project's number on this server (dense, for compact tables).
pub type ProjectId = u32;

/// A project: locks of different projects never meet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Project {
    /// Dense number, stable for the life of this server process only.
    pub id: ProjectId,
    /// Stable name, the same on every server of a deployment: the key file's project name,
    /// or in open development mode the hex SHA-256 of the API key. Shared stores key on it.
    pub name: Arc<str>,
}

/// One acquire (or re-poll of the same acquire).
#[derive(Debug, Clone)]
pub struct AcquireSpec {
    /// The caller's project.
    pub project: Project,
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
    /// A label the holder shows in inspection (already validated).
    pub label: Option<String>,
    /// The project's limits.
    pub quota: Quota,
    /// Longest time the lease may be held from its grant, renewals included (validated).
    pub max_hold: Option<Duration>,
    /// Lock-delay: if the lease ends without a release, no grant until this long after its
    /// end (validated against the server's maximum).
    pub lock_delay: Option<Duration>,
}

/// How one lease of a renew fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Held: the lease now runs this long from the renewal (less than its length when its
    /// `max_hold` is near).
    Renewed(Duration),
    /// Not held under this id; why, if the store still remembers the lease.
    Gone(Option<Ended>),
}

/// Why a lease ended without a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It ran out without a renewal.
    Expired,
    /// It reached its `max_hold`.
    MaxHold,
    /// It was revoked.
    Revoked,
}

/// Per-project limits a store enforces; `None` leaves the store's own default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Most locks (held or waited for) the project may have at once.
    pub max_locks: Option<u64>,
    /// Most waiters one lock of the project may have.
    pub max_waiters_per_lock: Option<u64>,
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
    /// How long after this acquire call began the lease started (never more than the
    /// truth): a waiter granted after a long wait learns that its lease started late.
    pub waited: Duration,
}

/// How an acquire call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The lock is the caller's.
    Granted(Grant),
    /// The total wait ran out; the caller is no longer in line.
    TimedOut {
        /// Who held the lock when the wait ended.
        holder: Option<HolderView>,
    },
    /// This call's poll bound ran out; the caller keeps its place for the store's grace
    /// period and should call again with the same request id.
    StillWaiting {
        /// Waiters ahead of the caller.
        position: u64,
    },
    /// This request id's acquire has already ended (cancelled, timed out, or granted and
    /// then released or expired): a late attempt of it creates nothing.
    Ended,
}

/// What inspection shows of a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockView {
    /// The current holder.
    pub holder: Option<HolderView>,
    /// Queued waiters.
    pub waiters: u64,
    /// How long the first in line has waited.
    pub oldest_wait: Option<Duration>,
    /// While nobody holds the lock and grants are held back after a server restart: when
    /// the hold-back ends (wall clock).
    pub held_back_until: Option<SystemTime>,
}

/// What inspection shows of a holder (never its lease id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderView {
    /// Fencing token of the grant.
    pub fencing_token: u64,
    /// When the lock was granted (wall clock).
    pub acquired_at: SystemTime,
    /// Time left on the lease unless renewed.
    pub expires_in: Duration,
    /// The holder's label, if it gave one.
    pub label: Option<String>,
}

/// What happened to a lock, in the order the store saw it: an audit trail, used by the fault
/// tests to check every grant against every other.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreEvent {
    /// When, in Unix microseconds by the store's clock.
    pub at_us: u64,
    /// The project (its number on this server for the memory store).
    pub project: String,
    /// The lock.
    pub lock: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of [`StoreEvent`]. Request ids appear as their first 16 hex digits: enough to
/// follow a request, not enough to act for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The lock was granted; the lease ends at `deadline_us` unless renewed.
    Granted {
        /// Fencing token of the grant.
        token: u64,
        /// The acquire it was granted to.
        request: String,
        /// Lease end, Unix µs.
        deadline_us: u64,
    },
    /// The lease's end moved (renewal, re-poll, or a grant nobody collected being cut short).
    Deadline {
        /// Fencing token of the lease.
        token: u64,
        /// New lease end, Unix µs.
        deadline_us: u64,
    },
    /// The holder released the lease.
    Released {
        /// Fencing token of the lease.
        token: u64,
    },
    /// A cancel withdrew a waiter (`token` absent) or undid a grant.
    Cancelled {
        /// Fencing token of the undone grant, if it was one.
        token: Option<u64>,
        /// The acquire cancelled.
        request: String,
    },
    /// The lease was revoked (its holder did not release it).
    Revoked {
        /// Fencing token of the lease.
        token: u64,
    },
    /// The lease ran out at `deadline_us` (noticed at `at_us`).
    Expired {
        /// Fencing token of the lease.
        token: u64,
        /// When it ended, Unix µs.
        deadline_us: u64,
    },
    /// A waiter left the line without the lock.
    WaiterLeft {
        /// The acquire.
        request: String,
        /// `timeout` (its wait ran out) or `abandoned` (gone past its grace period).
        reason: String,
    },
}

/// Where a store sends its [`StoreEvent`]s.
pub type EventSink = tokio::sync::mpsc::UnboundedSender<StoreEvent>;

/// Which page of a project's locks [`LockStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListSpec {
    /// Only names starting with this (bytewise); empty for every lock.
    pub prefix: String,
    /// Only names after this one (bytewise): the previous page's cursor.
    pub after: Option<String>,
    /// Most locks in the page (at least 1).
    pub limit: usize,
}

/// One page of a project's locks, in bytewise name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Each lock somebody holds or waits for, with what inspection shows of it.
    pub locks: Vec<(String, LockView)>,
    /// Where the next page starts (pass it as [`ListSpec::after`]) if more locks may follow.
    pub next: Option<String>,
}

/// How a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The lease was held and is released.
    Released,
    /// The lock exists, but not under this lease (expired, released, or someone else's).
    Gone,
    /// The project has no such lock at all.
    NoSuchLock,
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
    /// Writes of the memory store's state file since start.
    pub state_file_writes: u64,
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

    /// Extends each lease that is still held under its id, by its own lease length from now
    /// (never past its `max_hold`). Returns how each fared, in order.
    fn renew(&self, project: &Project, leases: Vec<(String, Id)>) -> StoreFuture<'_, Vec<Renewal>>;

    /// Ends the current holder's lease of the lock now, as if it had expired (its lock-delay
    /// applies): the next waiter may be granted. Returns the revoked lease's fencing token,
    /// `None` if nobody holds the lock. The revoked holder's renewals answer
    /// `Gone(Some(Ended::Revoked))` for at least its lease length.
    fn revoke(&self, project: &Project, name: &str) -> StoreFuture<'_, Option<u64>>;

    /// Releases the lease if it is held (nothing changes otherwise).
    fn release(&self, project: &Project, name: &str, lease_id: Id) -> StoreFuture<'_, Release>;

    /// Withdraws the waiter with this request id, or releases the lease granted to it.
    fn cancel(&self, project: &Project, name: &str, request_id: Id) -> StoreFuture<'_, bool>;

    /// Shows a lock without changing it; `None` if nobody holds or waits for it.
    fn inspect(&self, project: &Project, name: &str) -> StoreFuture<'_, Option<LockView>>;

    /// A page of the project's locks that somebody holds or waits for, in bytewise name
    /// order: what [`inspect`](Self::inspect) shows of each, without changing any.
    fn list(&self, project: &Project, spec: ListSpec) -> StoreFuture<'_, ListPage>;

    /// Store-wide figures.
    fn stats(&self) -> StoreStats;

    /// Whether the store can serve now, for health checks: `Unavailable` says why not.
    fn check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Called once when the server shuts down gracefully.
    fn shutdown(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
