//! `LockRequest`: the builder returned by `lock(name)`, awaited directly.

use crate::client::DistributedLock;
use crate::client::guard::LockGuard;
use crate::client::lease::LockFn;
use crate::client::lease_state::{LostReason, Published, StateReader};
use crate::client::mailbox::Commands;
use crate::client::renewer::{Command, TrackedLease, json};
use crate::client::successors::{Handover, Successors};
use crate::client::transport::{Attempts, Reply, Route};
use crate::error::Error;
use crate::protocol::{self, AcquireRequest, Granted, Id, LockMode};
use http::StatusCode;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Default lease length, as in the original JavaScript library.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(10);

/// How long one long poll may be held by the server before the client polls again.
const POLL: Duration = Duration::from_secs(20);
/// Extra time past the poll bound before an unanswered poll counts as a transport failure.
const POLL_SLACK: Duration = Duration::from_secs(5);

/// A request for a lock, configured with setters and started by `.await`.
///
/// Created by [`DistributedLock::lock`]. Awaiting it waits for the lock (in FIFO order, the
/// server doing the waiting) and yields a [`LockGuard`].
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// use std::time::Duration;
/// let dl = leasehold::DistributedLock::new("project-api-key");
/// let guard = dl
///     .lock("reports/nightly")
///     .expires_in(Duration::from_secs(20))
///     .timeout(Duration::from_secs(5))
///     .await?;
/// # drop(guard); Ok(()) }
/// ```
///
/// # What the returned guard promises
/// The guard is held when it is returned: [`LockGuard::is_held`] is true at that moment. A
/// busy client (a debug build, a loaded machine, thousands of acquires at once) can receive
/// a grant late, with little or none of its lease left by the client's own safe count; such
/// a grant is confirmed with an immediate renewal before it is handed over. If it cannot be
/// confirmed, it is released and the request waits in line again, within the same
/// `timeout`. The lease is counted from when the request left for the connection, not from
/// when it was queued inside the client.
///
/// # Cancel safety
/// Dropping the future while it waits withdraws the waiter from the server's queue. If the
/// lock was granted at the same moment, the grant is released at once, so it never stays
/// orphaned until its lease expires. Dropping it while a late grant is being confirmed
/// releases that grant.
#[must_use = "lock requests do nothing unless awaited"]
pub struct LockRequest {
    client: DistributedLock,
    name: String,
    expires_in: Duration,
    timeout: Option<Duration>,
    auto_renew: bool,
    metadata: Option<String>,
    max_hold: Option<Duration>,
    lock_delay: Option<Duration>,
    mode: LockMode,
    permits: Option<u32>,
    pub(crate) value: Option<String>,
}

/// What the renewer needs of a request's settings.
pub(crate) struct Terms {
    pub auto_renew: bool,
    pub max_hold: Option<Duration>,
}

impl LockRequest {
    pub(crate) fn new(client: DistributedLock, name: String) -> LockRequest {
        LockRequest {
            client,
            name,
            expires_in: DEFAULT_EXPIRES_IN,
            timeout: None,
            auto_renew: true,
            metadata: None,
            max_hold: None,
            lock_delay: None,
            mode: LockMode::Exclusive,
            permits: None,
            value: None,
        }
    }

    /// A request for one of `permits` permits of the semaphore `name`.
    pub(crate) fn semaphore(client: DistributedLock, name: String, permits: u32) -> LockRequest {
        LockRequest {
            mode: LockMode::Semaphore,
            permits: Some(permits),
            ..LockRequest::new(client, name)
        }
    }

    /// A request for a shared (read) hold of `name`.
    pub(crate) fn shared(client: DistributedLock, name: String) -> LockRequest {
        LockRequest {
            mode: LockMode::Shared,
            ..LockRequest::new(client, name)
        }
    }

    /// A label others see while this request holds the lock, in inspection and in their
    /// timeout errors: who you are, such as `host-a/job-42`. Same rules as lock names.
    pub fn metadata(mut self, label: impl Into<String>) -> LockRequest {
        self.metadata = Some(label.into());
        self
    }

    /// Lease length (default 10 s). With auto-renewal the lease is renewed about every third
    /// of this; it bounds how long the lock stays taken after a holder dies.
    pub fn expires_in(mut self, lease: Duration) -> LockRequest {
        self.expires_in = lease;
        self
    }

    /// Longest time to wait for the lock (default: no limit). After it the request fails
    /// with [`Error::Timeout`]. `Duration::ZERO` tries once and never waits.
    pub fn timeout(mut self, timeout: Duration) -> LockRequest {
        self.timeout = Some(timeout);
        self
    }

    /// Whether the guard renews its lease in the background (default `true`).
    ///
    /// With `false` the lock behaves like the original library's plain expiry: it frees
    /// itself `expires_in` after it was granted, even while the guard lives, and the guard
    /// reports the loss just before.
    pub fn auto_renew(mut self, auto_renew: bool) -> LockRequest {
        self.auto_renew = auto_renew;
        self
    }

    /// The longest the lock may be held, counted from the grant: renewals stop there,
    /// [`LockGuard::lost`] resolves with [`LostReason::MaxHold`](crate::LostReason::MaxHold)
    /// (a safety margin early, like any loss: at most half of `limit`), and the server frees
    /// the lock at that time even if the client keeps asking: it refuses renewals past it.
    /// Default: no limit.
    pub fn max_hold(mut self, limit: Duration) -> LockRequest {
        self.max_hold = Some(limit);
        self
    }

    /// Lock-delay: if this holder's lease ends without a release (it expires, reaches
    /// `max_hold`, or is revoked), nobody gets the lock for `delay` after that (for a read
    /// lock, no writer: readers may still join; for a semaphore, this holder's permit stays
    /// taken while the others keep working). A clean release frees it at once. For
    /// resources that cannot check fencing tokens: writes a paused holder still had in
    /// flight land before the next holder starts. The server caps it (`--max-lock-delay`,
    /// 60 s by default; more is [`Error::InvalidArgument`]).
    pub fn lock_delay(mut self, delay: Duration) -> LockRequest {
        self.lock_delay = Some(delay);
        self
    }

    /// Takes the lock if it can be granted at once, without waiting: nobody waits, and
    /// nobody holds it (for a read lock: only readers hold it; for a semaphore: a permit is
    /// free). `Ok(None)` otherwise. Same as `.timeout(Duration::ZERO)` with the timeout as
    /// `None`.
    ///
    /// # Cancel safety
    /// As for awaiting the request: a grant that raced the drop is released at once.
    pub async fn try_lock(self) -> Result<Option<LockGuard>, Error> {
        match self.timeout(Duration::ZERO).await {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::Timeout { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes the lock, runs `f`, releases the lock and returns what `f` returned.
    ///
    /// `f` is `|| async { .. }`, or `|lease: Lease| async move { .. }` to get the
    /// [`Lease`](crate::Lease): its fencing token for the resource, its deadline and its
    /// loss signal.
    ///
    /// If the lease is lost while `f` runs, `f`'s future is dropped at once and the call
    /// returns [`Error::LockLost`]: the closure never keeps running without the lock. If the
    /// server reports on release that the lease was already gone, the result is also
    /// [`Error::LockLost`]; other release failures are logged and the lease expires.
    ///
    /// # Cancel safety
    /// Dropping the future stops `f` and releases (or withdraws from) the lock.
    pub async fn with_lock<F, Args>(self, f: F) -> Result<F::Output, Error>
    where
        F: LockFn<Args>,
    {
        let guard = self.await?;
        let work = f.call(guard.lease());
        let value = tokio::select! {
            biased;
            reason = guard.lost() => {
                return Err(Error::LockLost { name: guard.name().to_owned(), reason });
            }
            value = work => value,
        };
        match guard.release().await {
            Err(lost @ Error::LockLost { .. }) => Err(lost),
            Err(error) => {
                tracing::warn!(%error, "releasing after with_lock failed; the lease will expire");
                Ok(value)
            }
            Ok(()) => Ok(value),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        protocol::validate_name(&self.name).map_err(Error::invalid)?;
        if let Some(permits) = self.permits
            && !(1..=protocol::MAX_PERMITS).contains(&permits)
        {
            return Err(Error::invalid(format!(
                "semaphore {:?} with {permits} permits; a semaphore has 1 to {}",
                self.name,
                protocol::MAX_PERMITS
            )));
        }
        if let Some(value) = &self.value {
            protocol::validate_value(value).map_err(Error::invalid)?;
        }
        if let Some(label) = &self.metadata {
            protocol::validate_name(label).map_err(|e| Error::invalid(format!("metadata: {e}")))?;
        }
        if self.expires_in.is_zero() {
            return Err(Error::invalid("expires_in must be longer than zero"));
        }
        if self
            .max_hold
            .is_some_and(|hold| hold < Duration::from_millis(1))
        {
            return Err(Error::invalid("max_hold must be at least 1 ms"));
        }
        if self.expires_in < Duration::from_millis(1)
            || self.expires_in > Duration::from_millis(protocol::MAX_LEASE_MS)
        {
            return Err(Error::invalid(format!(
                "expires_in is {:?}; it must be between 1 ms and {:?}",
                self.expires_in,
                Duration::from_millis(protocol::MAX_LEASE_MS)
            )));
        }
        Ok(())
    }

    async fn acquire(self) -> Result<LockGuard, Error> {
        self.validate()?;
        let client = self.client.inner.clone();
        client.usable()?;
        let started = Instant::now();
        // A timeout past what an `Instant` holds is no limit.
        let wait_deadline = self.timeout.and_then(|t| started.checked_add(t));
        let name: Arc<str> = self.name.as_str().into();
        loop {
            let (granted, sent, commands, cap) = self
                .wait_in_line(&client, &name, started, wait_deadline)
                .await?;
            let terms = Terms {
                auto_renew: self.auto_renew,
                max_hold: self.max_hold,
            };
            let held = client.hold(name.clone(), granted, sent, cap, &terms, commands);
            if let Some(guard) = held.confirmed().await {
                return Ok(guard);
            }
            // The grant arrived too late and no renewal could confirm it: it is given back
            // (the dropped guard releases it, where the server may still hold it), and the
            // wait goes on, in a new place in line, within the same timeout.
            tracing::debug!(lock = %name, "a late grant could not be confirmed; waiting again");
            if wait_deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout {
                    name: name.to_string(),
                    waited: started.elapsed(),
                    holder: None,
                });
            }
        }
    }

    /// Waits in the server's line (long polls under one request id) until granted, by the
    /// server or, once it has reserved the lock to this request next, by this client's own
    /// guard ahead of it (docs/protocol.md §3.16). Returns the grant, when its lease may
    /// have started at the earliest (when the answered request left the client, or the
    /// lease ahead ended here), the renewer's mailbox, and a bound on the lease's local
    /// deadline until a renewal confirms it.
    async fn wait_in_line(
        &self,
        client: &Arc<crate::client::Inner>,
        name: &Arc<str>,
        started: Instant,
        wait_deadline: Option<Instant>,
    ) -> Result<(Granted, Instant, Commands, Option<Instant>), Error> {
        let request_id = Id::fresh();
        let commands = client.renewer();
        let mut withdraw = WithdrawOnDrop {
            commands: Some(commands.clone()),
            name: name.clone(),
            request_id,
        };
        let lease_ms = self.expires_in.as_millis() as u64;
        // Set until the request id's first send is made: every later attempt (a retry, a
        // re-poll) may find a place the server already gave it.
        let unsent = std::sync::atomic::AtomicBool::new(true);
        // Exclusive acquires say who asks, so that the server may reserve the lock to one
        // behind a lease of this client.
        let client_id = (self.mode == LockMode::Exclusive).then_some(client.client_id);
        let mut reserved: Option<Reserved> = None;
        loop {
            let polled = Instant::now();
            // Each attempt asks for the wait that remains then, so that a retried request
            // does not keep the caller in line past its timeout.
            let body = || {
                json(&AcquireRequest {
                    name: name.to_string(),
                    lease_ms,
                    wait_ms: wait_deadline
                        .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
                    poll_ms: Some(POLL.as_millis() as u64),
                    request_id,
                    first: unsent.swap(false, std::sync::atomic::Ordering::Relaxed),
                    metadata: self.metadata.clone(),
                    max_hold_ms: self.max_hold.map(|hold| hold.as_millis() as u64),
                    lock_delay_ms: self.lock_delay.map(|delay| delay.as_millis() as u64),
                    mode: self.mode,
                    permits: self.permits,
                    value: self.value.clone(),
                    client_id,
                })
            };
            let attempts = Attempts {
                // Unreachable servers end the call at the caller's timeout, or after the
                // client's `unavailable_after` when it waits without limit (sooner if no
                // server was ever reached).
                deadline: wait_deadline
                    .unwrap_or_else(|| crate::client::later(polled, client.unavailable_after)),
                per_attempt: POLL + POLL_SLACK,
                first_contact: wait_deadline.is_none(),
            };
            let poll =
                client
                    .transport()
                    .post_each(Route::Acquire, Some(&self.name), body, attempts);
            let reply = match &mut reserved {
                None => poll.await?,
                Some(reservation) => match reservation.race(poll, wait_deadline).await {
                    Raced::Answered(reply) => reply?,
                    Raced::HandedOver(handover) => {
                        // The poll in flight is dropped: the server keeps the reservation
                        // (§3.16) and starts its lease when the release sent after the
                        // hand-over arrives.
                        withdraw.disarm();
                        let next = reservation.next;
                        let granted = Granted {
                            lease_id: next.lease_id,
                            fencing_token: next.fencing_token,
                            lease_ms: next.lease_ms,
                            waited_ms: 0,
                        };
                        return Ok((granted, handover.at, commands, Some(handover.valid_until)));
                    }
                    // Not handed over: withdrawn from the line by `withdraw`'s cancel (the
                    // server no longer ends a reserved wait by itself, nor names the holder).
                    Raced::TimedOut => {
                        let waited = started.elapsed();
                        return Err(Error::Timeout {
                            name: name.to_string(),
                            waited,
                            holder: client.holder_now(name).await,
                        });
                    }
                },
            };
            match reply.status {
                StatusCode::OK => {
                    let granted: Granted = reply.json()?;
                    withdraw.disarm();
                    return Ok((granted, reply.sent, commands, None));
                }
                StatusCode::ACCEPTED => {
                    // A reservation (§3.16), told once: wait for the lease ahead to end
                    // here too.
                    if let Ok(protocol::StillWaiting {
                        next: Some(next), ..
                    }) = reply.json()
                        && reserved.as_ref().is_none_or(|r| r.next != next)
                    {
                        // Any earlier registration goes first: its drop withdraws by the
                        // same request id.
                        drop(reserved.take());
                        reserved = Some(Reserved::register(client, next, request_id));
                    }
                    continue;
                }
                // Not queued, so nothing to cancel; but a reserved request stays in line
                // whatever a later poll is answered (§3.16): it is cancelled.
                StatusCode::CONFLICT => {
                    if reserved.is_none() {
                        withdraw.disarm();
                    }
                    return Err(refusal(reply, name, started.elapsed()));
                }
                _ => {
                    if reserved.is_none() {
                        withdraw.disarm();
                    }
                    return Err(reply.into_error());
                }
            }
        }
    }
}

/// The error for an acquire's `409`, by its code (docs/protocol.md §4): `timeout` (the
/// wait ended, with the holder if the server named one), `conflict` (the name is in use
/// another way), or, for a code this client does not know or no error body, the server's
/// answer as it came rather than a guess. A holder that does not decode is left out: the
/// timeout stands without it.
fn refusal(reply: Reply, name: &str, waited: Duration) -> Error {
    #[derive(serde::Deserialize)]
    struct Code {
        error: String,
    }
    match reply.json::<Code>() {
        Ok(code) if code.error == protocol::codes::TIMEOUT => Error::Timeout {
            name: name.to_string(),
            waited,
            holder: reply
                .json::<protocol::ErrorBody>()
                .ok()
                .and_then(|body| body.holder)
                .map(|h| Box::new(h.into())),
        },
        _ => reply.into_error(),
    }
}

/// A fresh grant's guard, or one whose lease must first be confirmed.
pub(crate) enum Held {
    /// At least a third of the lease is left: hand it over.
    Ready(LockGuard),
    /// The grant arrived after its local deadline or close to it (the request or its answer
    /// waited inside a busy client): the renewer renews it at once, and the guard is handed
    /// over only once that renewal confirms it.
    Confirming(LockGuard),
}

impl Held {
    /// The guard, once it is known held; `None` if its lease could not be confirmed (the
    /// guard is then dropped, which releases it).
    ///
    /// # Cancel safety
    /// Dropping the future drops the guard, which releases the lease.
    pub(crate) async fn confirmed(self) -> Option<LockGuard> {
        let mut guard = match self {
            Held::Ready(guard) => return Some(guard),
            Held::Confirming(guard) => guard,
        };
        let mut state = guard.state.0.clone();
        // The renewer answers by publishing a new deadline (renewed) or a loss; its end (the
        // runtime went away) leaves the lease unconfirmed.
        if state.changed().await.is_err() {
            return None;
        }
        if matches!(*state.borrow_and_update(), Published::Lost { .. }) {
            return None;
        }
        // Renewed, but the answer may itself have come late: held means held now.
        guard.unconfirmed = false;
        guard.is_held().then_some(guard)
    }
}

impl crate::client::Inner {
    /// Builds the guard for a grant and hands its lease to the renewer.
    fn hold(
        self: &Arc<Self>,
        name: Arc<str>,
        granted: Granted,
        sent: Instant,
        cap: Option<Instant>,
        terms: &Terms,
        commands: Commands,
    ) -> Held {
        // A server's figures are checked, not trusted: no lease beyond the protocol's
        // longest, and no start later than now.
        let length = Duration::from_millis(granted.lease_ms.min(protocol::MAX_LEASE_MS));
        // A `max_hold` shorter than the lease bounds the margin too, so that some of it is
        // left to hold.
        let margin = self.margin_for(terms.max_hold.map_or(length, |hold| hold.min(length)));
        // The lease started `waited_ms` after the server received the request, so no
        // earlier than that long after it was sent.
        let started = self
            .lease_clock
            .base(sent + Duration::from_millis(granted.waited_ms).min(sent.elapsed()));
        let now = Instant::now();
        let (state_tx, state_rx) = watch::channel(Published::Lost {
            reason: LostReason::Expired,
            at: now,
        });
        let mut lease = TrackedLease {
            name: name.clone(),
            lease_id: granted.lease_id,
            length,
            margin,
            auto_renew: terms.auto_renew,
            // The server counts `max_hold` from its grant, which is no earlier than `started`.
            hold_end: terms
                .max_hold
                .map(|hold| started + hold.saturating_sub(margin)),
            held_to_the_end: false,
            deadline: now,
            jeopardy_at: now,
            state: state_tx,
            confirming: false,
        };
        lease.extend(started, length);
        if let Some(cap) = cap {
            // Handed over in this client: held no longer than the lease ahead, until a
            // renewal confirms it (see `Handover::valid_until`).
            lease.deadline = lease.deadline.min(cap);
            lease.jeopardy_at = lease.jeopardy_at.min(cap);
        }
        // What is left must last a third of the lease (or of `max_hold`, if shorter);
        // otherwise the grant is confirmed first.
        let span = terms.max_hold.map_or(length, |hold| hold.min(length));
        let first = if lease.deadline.saturating_duration_since(now) < span / 3 {
            // Renewed at once; the server granted it no later than now, so it cannot hold
            // it past `now + length`: renewing is worth trying until then.
            lease.confirming = true;
            lease.deadline = now + length;
            lease.jeopardy_at = now;
            now
        } else {
            lease.next_event(started)
        };
        let confirming = lease.confirming;
        // Silent, so not pending as a change: a grant to confirm waits for the renewer's
        // next word, not for this one.
        lease.publish_first();
        // A successor of this client may wait behind it from now on.
        self.successors.held(granted.lease_id);
        let key = self.next_key();
        // The renewal task may have ended with its runtime while this acquire waited (a
        // client used from several runtimes): this acquire's runtime starts another.
        let commands = if commands.is_closed() {
            self.renewer()
        } else {
            commands
        };
        commands.send(Command::Track { key, lease, first }, Some(first));
        let guard = LockGuard {
            name,
            lease_id: granted.lease_id,
            fencing_token: granted.fencing_token,
            key,
            state: StateReader(state_rx),
            commands,
            transport: self.transport().clone(),
            margin,
            released: false,
            successors: self.successors.clone(),
            unconfirmed: confirming,
        };
        if confirming {
            Held::Confirming(guard)
        } else {
            Held::Ready(guard)
        }
    }
}

/// A reservation this acquire was told of (docs/protocol.md §3.16), registered with the
/// client under the lease ahead; withdrawn when dropped.
struct Reserved {
    next: protocol::NextGrant,
    request_id: Id,
    handover: tokio::sync::oneshot::Receiver<Handover>,
    successors: Arc<Successors>,
}

/// How a poll raced with a reservation's hand-over.
enum Raced {
    Answered(Result<Reply, Error>),
    HandedOver(Handover),
    /// The caller's timeout passed first, and the lock was not handed over.
    TimedOut,
}

impl Reserved {
    fn register(
        client: &crate::client::Inner,
        next: protocol::NextGrant,
        request_id: Id,
    ) -> Reserved {
        Reserved {
            next,
            request_id,
            handover: client
                .successors
                .wait_for(next.after, request_id, next.lease_id),
            successors: client.successors.clone(),
        }
    }

    /// Waits for the lease ahead to end here (handed over, or ended unheld, after which
    /// the server grants this request when it ends there), and meanwhile polls the server
    /// only while no guard of this client holds that lease: while one does, only its own
    /// release or loss can end it (or a revocation, which its next renewal finds). The
    /// caller's timeout ends the wait (the server no longer ends a reserved wait: the
    /// client does).
    async fn race(
        &mut self,
        poll: impl Future<Output = Result<Reply, Error>>,
        wait_deadline: Option<Instant>,
    ) -> Raced {
        let mut poll = std::pin::pin!(poll);
        let timeout = async {
            match wait_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let mut timeout = std::pin::pin!(timeout);
        loop {
            let open = !self.handover.is_terminated();
            let polling = !open || !self.successors.is_held(self.next.after);
            tokio::select! {
                // Else it ended here unheld: the server's grant comes when it ends there.
                handed = &mut self.handover, if open => if let Ok(handover) = handed {
                    return Raced::HandedOver(handover);
                },
                reply = &mut poll, if polling => return Raced::Answered(reply),
                () = &mut timeout => {
                    if self.successors.withdraw(self.next.after, self.request_id) {
                        return Raced::TimedOut;
                    }
                    // Taken just now: its outcome is in the receiver already.
                    return match self.handover.try_recv() {
                        Ok(handover) => Raced::HandedOver(handover),
                        Err(_) => Raced::TimedOut,
                    };
                }
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.successors.withdraw(self.next.after, self.request_id)
            && self.handover.try_recv().is_ok()
        {
            // Handed over, and dropped before it took the lock (its acquire was
            // cancelled, which cancels the lease on the server too): it ends here unheld.
            self.successors.lease_ended(self.next.lease_id, None);
        }
    }
}

/// Withdraws the waiter (or undoes a grant that raced) if the acquire future is dropped.
struct WithdrawOnDrop {
    commands: Option<Commands>,
    name: Arc<str>,
    request_id: Id,
}

impl WithdrawOnDrop {
    fn disarm(&mut self) {
        self.commands = None;
    }
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            commands.send(
                Command::Cancel {
                    name: self.name.clone(),
                    request_id: self.request_id,
                },
                None,
            );
        }
    }
}

impl fmt::Debug for LockRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockRequest")
            .field("name", &self.name)
            .field("expires_in", &self.expires_in)
            .field("timeout", &self.timeout)
            .field("auto_renew", &self.auto_renew)
            .field("metadata", &self.metadata)
            .field("max_hold", &self.max_hold)
            .field("lock_delay", &self.lock_delay)
            .field("mode", &self.mode)
            .field("permits", &self.permits)
            .field("value", &self.value)
            .finish()
    }
}

impl IntoFuture for LockRequest {
    type Output = Result<LockGuard, Error>;
    type IntoFuture = LockFuture;

    fn into_future(self) -> LockFuture {
        LockFuture(Box::pin(self.acquire()))
    }
}

/// The future of an awaited [`LockRequest`].
#[must_use = "futures do nothing unless polled"]
pub struct LockFuture(Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send>>);

impl Future for LockFuture {
    type Output = Result<LockGuard, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for LockFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockFuture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply_409(body: &'static str) -> Reply {
        Reply {
            status: StatusCode::CONFLICT,
            body: Bytes::from_static(body.as_bytes()),
            endpoint: Arc::from("/v1/acquire"),
            attempts: 1,
            retry_after: None,
            sent: Instant::now(),
        }
    }

    /// A `409` is a timeout only when its code says so: `conflict` says why nothing was
    /// queued, and a code this client does not know (or no error body at all) is reported
    /// as the server's answer, not passed off as a timeout.
    #[test]
    fn a_409_is_read_by_its_code() {
        let waited = Duration::from_millis(5);
        let timeout = reply_409(
            r#"{"error":"timeout","message":"the wait ended without the lock","holder":{"fencing_token":7,"acquired_at_ms":1,"expires_at_ms":2,"expires_in_ms":1,"metadata":null}}"#,
        );
        match refusal(timeout, "a", waited) {
            Error::Timeout {
                name,
                waited: w,
                holder,
            } => {
                assert_eq!((name.as_str(), w), ("a", waited));
                assert_eq!(holder.map(|h| h.fencing_token), Some(7));
            }
            other => panic!("{other:?}"),
        }
        // A holder this client cannot read does not hide the timeout.
        let odd_holder = reply_409(r#"{"error":"timeout","message":"m","holder":{"x":1}}"#);
        assert!(matches!(
            refusal(odd_holder, "a", waited),
            Error::Timeout { holder: None, .. }
        ));
        let conflict = reply_409(r#"{"error":"conflict","message":"a semaphore"}"#);
        assert!(matches!(
            refusal(conflict, "a", waited),
            Error::Conflict { .. }
        ));
        for body in [r#"{"error":"newer_code","message":"m"}"#, "not json"] {
            match refusal(reply_409(body), "a", waited) {
                Error::Server { status: 409, .. } => {}
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
