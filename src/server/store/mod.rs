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
    /// The client says it never sent `request_id` before (protocol `first`): the request
    /// can have no place yet, and a store may skip looking for one.
    pub first: bool,
    /// A label the holder shows in inspection (already validated).
    pub label: Option<String>,
    /// The project's limits.
    pub quota: Quota,
    /// Longest time the lease may be held from its grant, renewals included (validated).
    pub max_hold: Option<Duration>,
    /// Lock-delay: if the lease ends without a release, its holder keeps its place and mode
    /// until this long after its end: nobody is granted whom it would not admit (nobody after
    /// an exclusive holder, no writer after a reader; a semaphore's permit stays taken).
    /// Validated against the server's maximum.
    pub lock_delay: Option<Duration>,
    /// What the caller asks to hold: alone, shared with readers, or one of a semaphore's
    /// permits (validated: at least one permit).
    pub mode: Mode,
    /// An election value the holder shows as leader (already validated); changed later by
    /// [`LockStore::proclaim`].
    pub value: Option<String>,
    /// The client asking (protocol `client_id`), for successor reservations; stores that
    /// make none ignore it.
    pub client: Option<Id>,
}

/// What an acquire asks to hold. A lock's holders always share one mode: one `Exclusive`
/// holder, or any number of `Shared` holders, or up to `n` holders of `Permit(n)`.
///
/// A name is either a lock (`Exclusive` and `Shared` acquires, which meet as writers and
/// readers) or a semaphore of `n` permits, for as long as anyone holds or waits for it: an
/// acquire of the other kind, or of a different `n`, is refused with
/// [`StoreError::Conflict`] naming what is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Alone: a mutex, a write lock, or a campaign for leadership.
    #[default]
    Exclusive,
    /// Together with other `Shared` holders and nobody else: a read lock.
    Shared,
    /// One of up to this many holders at once: a semaphore (never 0).
    Permit(u32),
}

impl Mode {
    /// Whether a waiter of this mode may be granted next to `holders` holders of mode
    /// `held` (`None` when nobody holds): the one rule every store applies, in FIFO order,
    /// stopping at the first waiter it does not admit.
    pub fn admits(self, held: Option<Mode>, holders: usize) -> bool {
        match (self, held) {
            (_, None) => true,
            (Mode::Shared, Some(Mode::Shared)) => true,
            (Mode::Permit(n), Some(Mode::Permit(m))) => n == m && holders < n as usize,
            _ => false,
        }
    }

    /// Why an acquire of this mode may not queue for a name whose holders or waiters use
    /// `in_use`, or `None` if it may. The message names the lock and the count in use.
    pub fn conflict(self, name: &str, in_use: Mode) -> Option<String> {
        match (self, in_use) {
            (Mode::Exclusive | Mode::Shared, Mode::Exclusive | Mode::Shared) => None,
            (Mode::Permit(n), Mode::Permit(m)) if n == m => None,
            (Mode::Permit(n), Mode::Permit(m)) => Some(format!(
                "semaphore {name:?} is in use with {m} permits; this acquire asked for {n}"
            )),
            (Mode::Permit(n), _) => Some(format!(
                "{name:?} is in use as a lock (read-write); a semaphore of {n} permits cannot \
                 use the same name while anyone holds or waits for it"
            )),
            (_, Mode::Permit(m)) => Some(format!(
                "{name:?} is in use as a semaphore with {m} permits; a lock (read-write) \
                 cannot use the same name while anyone holds or waits for it"
            )),
        }
    }
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

/// A successor reservation (docs/protocol.md §3.16): the lease a waiter first in line holds
/// once the lease ahead of it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// The lease it will hold (renew and release accept it already).
    pub lease_id: Id,
    /// Its fencing token.
    pub fencing_token: u64,
    /// Its length, counted from when the lease ahead ends.
    pub lease: Duration,
    /// The lease ahead of it.
    pub after: Id,
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
        /// The lock is reserved to the caller next (docs/protocol.md §3.16).
        next: Option<Reserved>,
    },
    /// This request id's acquire has already ended (cancelled, timed out, or granted and
    /// then released or expired): a late attempt of it creates nothing.
    Ended,
}

/// What inspection shows of a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockView {
    /// Every current holder, oldest grant first: one for an exclusive lock, the readers of a
    /// shared one, the permit holders of a semaphore.
    pub holders: Vec<HolderView>,
    /// The mode the holders hold; with no holder, the mode of the first waiter (so a
    /// semaphore's permit count shows while it has only waiters).
    pub mode: Mode,
    /// Queued waiters.
    pub waiters: u64,
    /// How long the first in line has waited.
    pub oldest_wait: Option<Duration>,
    /// While nobody holds the lock and grants are held back, after a server restart or by an
    /// ended holder's lock-delay: when the hold-back ends (wall clock).
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
    /// The holder's election value, if it gave one (see [`LockStore::proclaim`]).
    pub value: Option<String>,
}

/// The leader of an election: the holder of its name's exclusive lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    /// Fencing token of the leader's grant.
    pub fencing_token: u64,
    /// Its election value (as last proclaimed); empty if it campaigned without one.
    pub value: String,
    /// Its label, if it gave one.
    pub label: Option<String>,
    /// When it was granted (wall clock).
    pub acquired_at: SystemTime,
}

/// One state of an election's leadership, as [`LockStore::observe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Where this state stands in the store's order of changes: later states have higher
    /// revisions. Pass the last one seen as `after` to get the changes since.
    pub revision: u64,
    /// The leader from this revision on; `None` while nobody holds the name exclusively.
    pub leader: Option<LeaderView>,
}

/// How a proclaim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proclaimed {
    /// The lease holds the name exclusively; its value is now the new one.
    Done,
    /// Not held under this id (why, if the store still remembers the lease); nothing changed.
    Gone(Option<Ended>),
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
        /// A shared (read) grant; absent for an exclusive or permit grant.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shared: bool,
        /// A semaphore grant: how many permits the name has; absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        permits: Option<u32>,
    },
    /// The exclusive holder changed its election value.
    Proclaimed {
        /// Fencing token of the lease.
        token: u64,
        /// The new value.
        value: String,
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
    /// The acquire does not fit how the name is in use (a semaphore acquire for a read-write
    /// lock, a different permit count, a proclaim by a shared holder); the message says what
    /// is in use. Retrying the same request does not help.
    #[error("{0}")]
    Conflict(String),
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

    /// Ends every current holder's lease of the lock now, as if it had expired (lock-delays
    /// apply): the next waiters may be granted. Returns the revoked leases' fencing tokens in
    /// ascending order, empty if nobody holds the lock. A revoked holder's renewals answer
    /// `Gone(Some(Ended::Revoked))` for at least its lease length.
    fn revoke(&self, project: &Project, name: &str) -> StoreFuture<'_, Vec<u64>>;

    /// Releases the lease if it is held (nothing changes otherwise).
    fn release(&self, project: &Project, name: &str, lease_id: Id) -> StoreFuture<'_, Release>;

    /// Withdraws the waiter with this request id, or releases the lease granted to it.
    fn cancel(&self, project: &Project, name: &str, request_id: Id) -> StoreFuture<'_, bool>;

    /// Sets the election value of the lease if it holds the lock exclusively, atomically with
    /// respect to every other operation on the lock: a lease that is no longer held changes
    /// nothing and answers `Gone`. A lease held in another mode is refused with
    /// [`StoreError::Conflict`].
    fn proclaim(
        &self,
        project: &Project,
        name: &str,
        lease_id: Id,
        value: String,
    ) -> StoreFuture<'_, Proclaimed>;

    /// The leadership of an election, for observers.
    ///
    /// With `after` `None`: the current state at once, as one observation. With `after`
    /// `Some(r)`: every state after revision `r`, in order, as soon as there is one (waiting
    /// up to `wait`, then answering an empty list). A state is recorded whenever the exclusive
    /// holder or its value changes, so no leader is missed, however briefly it led. If the
    /// store no longer knows the states since `r`, it answers the current one alone.
    fn observe(
        &self,
        project: &Project,
        name: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> StoreFuture<'_, Vec<Observation>>;

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

#[cfg(test)]
mod tests {
    use super::Mode;

    #[test]
    fn modes_admit_only_their_own_kind() {
        assert!(Mode::Exclusive.admits(None, 0));
        assert!(!Mode::Exclusive.admits(Some(Mode::Exclusive), 1));
        assert!(!Mode::Exclusive.admits(Some(Mode::Shared), 3));
        assert!(Mode::Shared.admits(Some(Mode::Shared), 3));
        assert!(!Mode::Shared.admits(Some(Mode::Exclusive), 1));
        assert!(Mode::Permit(2).admits(Some(Mode::Permit(2)), 1));
        assert!(!Mode::Permit(2).admits(Some(Mode::Permit(2)), 2));
        assert!(!Mode::Permit(3).admits(Some(Mode::Permit(2)), 1));
    }

    #[test]
    fn conflicts_name_the_count_in_use() {
        assert_eq!(Mode::Shared.conflict("c", Mode::Exclusive), None);
        assert_eq!(Mode::Permit(5).conflict("p", Mode::Permit(5)), None);
        let msg = Mode::Permit(3).conflict("p", Mode::Permit(5)).unwrap();
        assert!(
            msg.contains("5 permits") && msg.contains("asked for 3"),
            "{msg}"
        );
        let msg = Mode::Shared.conflict("p", Mode::Permit(5)).unwrap();
        assert!(msg.contains("semaphore with 5 permits"), "{msg}");
        let msg = Mode::Permit(2).conflict("c", Mode::Shared).unwrap();
        assert!(msg.contains("read-write"), "{msg}");
    }
}
