//! The one background task per client: renews every due lease in batched requests, releases
//! dropped guards, withdraws dropped acquires, and declares leases lost.
//!
//! The task owns the lease table; guards talk to it through a mailbox (`mailbox.rs`), so
//! `Drop` never needs a runtime. It ends when every sender (the client and all guards) is
//! gone.

use crate::client::lease_state::{LostReason, Published, StateSender};
use crate::client::mailbox::{Commands, Inbox, mailbox};
use crate::client::retry;
use crate::client::successors::Successors;
use crate::client::transport::{Attempts, Route, Transport};
use crate::protocol::{
    CancelRequest, GoneReason, Id, LeaseRef, MAX_RENEW_BATCH, RenewRequest, RenewResponse,
    RenewResult,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Messages to the renewer.
pub(crate) enum Command {
    /// Start tracking a lease; the renewer first acts on it at `first`.
    Track {
        key: u64,
        lease: TrackedLease,
        first: Instant,
    },
    /// The guard was dropped: stop renewing and release the lease on the server.
    Release(u64),
    /// The guard released the lease itself: stop renewing.
    Forget(u64),
    /// An acquire was dropped mid-wait: withdraw its waiter (or undo a grant that raced).
    Cancel { name: Arc<str>, request_id: Id },
}

/// A lease as the renewer tracks it.
pub(crate) struct TrackedLease {
    pub name: Arc<str>,
    pub lease_id: Id,
    pub length: Duration,
    pub margin: Duration,
    pub auto_renew: bool,
    /// The latest local deadline `max_hold` allows, if one was set: renewals never extend
    /// the lease past it (the server enforces the same bound, from its later clock).
    pub hold_end: Option<Instant>,
    /// The server answered a renewal with less than the lease: it is counting down to its
    /// own `max_hold` bound, and no renewal can extend the lease any more.
    pub held_to_the_end: bool,
    /// Local deadline; also published to the guard through `state`. While `confirming`,
    /// the last moment the server could still hold the lease instead.
    pub deadline: Instant,
    /// From when the guard reports jeopardy, unless a renewal is confirmed before.
    pub jeopardy_at: Instant,
    pub state: StateSender,
    /// A grant that arrived too late to hand over as it is: its acquire waits until a
    /// renewal confirms it (or it is found lost) before it gives the guard to the caller.
    pub confirming: bool,
}

impl TrackedLease {
    /// When the lease must be presumed lost, counted from when a grant or renewal was sent:
    /// the server started its own clock later than that, so this is always earlier than its.
    pub fn deadline_after(sent: Instant, length: Duration, margin: Duration) -> Instant {
        sent + length.saturating_sub(margin)
    }

    /// Sets the deadline for a grant or renewal of `length` counted from `base` (see
    /// [`TrackedLease::deadline_after`]), capped by `max_hold`, and when jeopardy begins:
    /// once the renewal due a third into the lease is a sixth of the lease late.
    pub fn extend(&mut self, base: Instant, length: Duration) {
        if self.hold_end.is_some() && length < self.length {
            self.held_to_the_end = true;
        }
        let deadline = TrackedLease::deadline_after(base, length, self.margin);
        self.deadline = self.hold_end.map_or(deadline, |end| deadline.min(end));
        self.jeopardy_at = if self.renews() {
            (base + length / 2).min(self.deadline)
        } else {
            self.deadline
        };
    }

    /// Whether renewals can still extend the lease: auto-renewed, and short of `max_hold`.
    fn renews(&self) -> bool {
        self.auto_renew
            && !self.held_to_the_end
            && self.hold_end.is_none_or(|end| self.deadline < end)
    }

    /// When the renewer must next act on a lease granted or renewed by a request sent at
    /// `sent`: its next renewal, or when renewals cannot extend it, its deadline.
    pub fn next_event(&self, sent: Instant) -> Instant {
        if self.renews() {
            (sent + self.length / 3).min(self.deadline)
        } else {
            self.deadline
        }
    }

    /// Why the lease ends if its deadline passes with no news.
    fn ends(&self) -> LostReason {
        if self.held_to_the_end || self.hold_end == Some(self.deadline) {
            LostReason::MaxHold
        } else {
            LostReason::Expired
        }
    }

    /// What the guard (and its signals) must know: the deadline in force.
    fn held(&self) -> Published {
        Published::Held {
            deadline: self.deadline,
            jeopardy_at: self.jeopardy_at,
            ends: self.ends(),
        }
    }

    /// Tells the guard (and its signals) the deadline in force.
    pub fn publish(&self) {
        self.state.send_replace(self.held());
    }

    /// Sets the first deadline of a lease whose guard does not exist yet, without a change
    /// notification: no receiver can be waiting for one, and a notification locks every
    /// shard of the channel's waiter list (about 1.5 % of a busy client's CPU in a
    /// profile). The guard's receiver sees the value, with no change pending.
    pub fn publish_first(&self) {
        let first = self.held();
        self.state.send_if_modified(|state| {
            *state = first;
            false
        });
    }

    /// Tells the guard its lease has ended, and why; nothing when no guard, signal or lease
    /// copy is left to hear it (a guard released or dropped without any: the common case).
    fn publish_lost(&self, reason: LostReason) {
        if self.state.receiver_count() == 0 {
            return;
        }
        self.state.send_replace(Published::Lost {
            reason,
            at: Instant::now().min(self.deadline),
        });
    }
}

struct Tracked {
    lease: TrackedLease,
    /// The queue entry of this lease, absent while a renewal is in flight.
    queued: Option<Instant>,
}

struct BatchOutcome {
    sent: Instant,
    keys: Vec<u64>,
    results: Option<Vec<RenewResult>>,
}

/// Longest pause between two ticks that renew; a thirtieth of the lease when shorter.
const TICK_GAP: Duration = Duration::from_millis(25);

/// Where a lease's local deadline is counted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseClock {
    /// From when the request was sent: always earlier than the server's clock starts.
    FromSend,
    /// From when the answer arrived: the naive (wrong) way, kept only so that the fault
    /// tests can show their checks catch a late loss signal.
    FromAnswer,
}

impl LeaseClock {
    pub fn base(self, sent: Instant) -> Instant {
        match self {
            LeaseClock::FromSend => sent,
            LeaseClock::FromAnswer => Instant::now(),
        }
    }
}

pub(crate) struct Renewer {
    lease_clock: LeaseClock,
    transport: Arc<Transport>,
    leases: HashMap<u64, Tracked>,
    /// Leases presumed lost whose guards live on: the server may still hold them until
    /// their deadline plus margin (longer, if a renewal reached it whose answer came too
    /// late), so a guard's drop or release still releases them, best effort.
    lost: HashMap<u64, TrackedLease>,
    /// Next event of each lease: its renewal for auto-renewed leases, its deadline otherwise.
    queue: BTreeSet<(Instant, u64)>,
    in_flight: JoinSet<BatchOutcome>,
    /// Longest renewal interval among tracked leases: how far ahead a tick looks to batch.
    longest_interval: Duration,
    failures: Box<dyn Iterator<Item = Duration> + Send>,
    /// The client's reserved successors (docs/protocol.md §3.16): one waiting behind a
    /// lease found lost goes back to polling the server for its grant.
    successors: Arc<Successors>,
}

/// Starts the renewer on the current runtime.
pub(crate) fn spawn(
    transport: Arc<Transport>,
    lease_clock: LeaseClock,
    successors: Arc<Successors>,
) -> Commands {
    let (tx, rx) = mailbox();
    let renewer = Renewer {
        lease_clock,
        transport,
        leases: HashMap::new(),
        lost: HashMap::new(),
        queue: BTreeSet::new(),
        in_flight: JoinSet::new(),
        longest_interval: Duration::ZERO,
        failures: Box::new(retry::delays()),
        successors,
    };
    tokio::spawn(renewer.run(rx));
    tx
}

impl Renewer {
    async fn run(mut self, inbox: Inbox) {
        let mut last_tick = Instant::now();
        loop {
            // Read before taking the commands: a sender leaves its last command before it
            // goes, so once none is left, this take sees every command there will be.
            let abandoned = inbox.abandoned();
            for command in inbox.take() {
                self.handle(command);
            }
            if abandoned {
                // Every guard and client is gone (their last commands are handled above):
                // nothing is left to renew.
                break;
            }
            // Ticks are spaced a little, so that leases granted one after another (and
            // already due, when acquires waited long) share a request instead of one each.
            let wake = self.queue.first().map(|&(at, key)| {
                let gap = self
                    .leases
                    .get(&key)
                    .map_or(Duration::ZERO, |t| (t.lease.length / 30).min(TICK_GAP));
                at.max(last_tick + gap)
            });
            if !inbox.plan(wake) {
                continue;
            }
            tokio::select! {
                _ = inbox.woken() => {}
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    if let Ok(outcome) = done {
                        self.finish(outcome);
                    }
                }
                _ = sleep_until_opt(wake) => {
                    last_tick = Instant::now();
                    self.tick();
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Track { key, lease, first } => {
                self.longest_interval = self.longest_interval.max(lease.length / 3);
                self.queue.insert((first, key));
                self.leases.insert(
                    key,
                    Tracked {
                        lease,
                        queued: Some(first),
                    },
                );
            }
            Command::Release(key) => {
                let lease = match self.forget(key) {
                    Some(lease) => {
                        lease.publish_lost(LostReason::Released);
                        Some(lease)
                    }
                    // Lost before: its signals keep the reason they saw.
                    None => self.lost.remove(&key),
                };
                if let Some(lease) = lease {
                    self.release_on_server(lease);
                }
            }
            Command::Forget(key) => {
                if let Some(lease) = self.forget(key) {
                    lease.publish_lost(LostReason::Released);
                }
                self.lost.remove(&key);
            }
            Command::Cancel { name, request_id } => {
                let transport = self.transport.clone();
                tokio::spawn(async move {
                    let body = CancelRequest {
                        name: name.to_string(),
                        request_id,
                    };
                    let attempts = Attempts {
                        deadline: Instant::now() + Duration::from_secs(5),
                        per_attempt: Duration::from_secs(2),
                        first_contact: false,
                    };
                    let _ = transport
                        .post(Route::Cancel, Some(&body.name), json(&body), attempts)
                        .await;
                });
            }
        }
    }

    fn forget(&mut self, key: u64) -> Option<TrackedLease> {
        let tracked = self.leases.remove(&key)?;
        if let Some(at) = tracked.queued {
            self.queue.remove(&(at, key));
        }
        Some(tracked.lease)
    }

    /// Best-effort release, so that the next waiter need not wait for expiry. Worth trying
    /// until the earliest moment the server could expire the lease by itself.
    fn release_on_server(&self, lease: TrackedLease) {
        let cutoff = lease.deadline + lease.margin;
        if cutoff <= Instant::now() {
            return;
        }
        let transport = self.transport.clone();
        tokio::spawn(async move {
            let body = LeaseRef {
                name: lease.name.to_string(),
                lease_id: lease.lease_id,
            };
            let attempts = Attempts {
                deadline: cutoff,
                per_attempt: Duration::from_secs(2),
                first_contact: false,
            };
            let _ = transport
                .post(Route::Release, Some(&body.name), json(&body), attempts)
                .await;
        });
    }

    /// Tells the guard its lease is lost. Nothing is sent yet: the application may still be
    /// stopping its work, and the margin is its time to do so before anyone else can get
    /// the lock. The guard's drop or release sends the release. `gone`: the server said so.
    fn lose(&mut self, key: u64, reason: LostReason, gone: bool) {
        if let Some(lease) = self.forget(key) {
            tracing::warn!(lock = %lease.name, %reason, "lease lost");
            lease.publish_lost(reason);
            self.successors.lease_ended(lease.lease_id, None);
            if !gone {
                self.lost.insert(key, lease);
            }
        }
    }

    /// Declares overdue leases lost and sends every renewal that is due, or nearly due, in
    /// batches: renewing a little early lets leases acquired at different times share requests.
    fn tick(&mut self) {
        let now = Instant::now();
        self.lost
            .retain(|_, lease| lease.deadline + lease.margin > now);
        let horizon = now + self.longest_interval / 2;
        let mut due = Vec::new();
        while let Some(&(at, key)) = self.queue.first() {
            if at > horizon {
                break;
            }
            let Some(tracked) = self.leases.get(&key) else {
                self.queue.pop_first();
                continue;
            };
            let lease = &tracked.lease;
            if lease.deadline <= now {
                let reason = lease.ends();
                self.lose(key, reason, false);
                continue;
            }
            // Only leases within half an interval of their own due time ride along. A grant
            // to confirm is renewed once even without auto-renewal.
            if !(lease.renews() || lease.confirming) || at > now + lease.length / 6 {
                break;
            }
            self.queue.pop_first();
            if let Some(tracked) = self.leases.get_mut(&key) {
                tracked.queued = None;
            }
            due.push(key);
        }
        for batch in due.chunks(MAX_RENEW_BATCH) {
            self.send_batch(batch.to_vec(), now);
        }
    }

    fn send_batch(&mut self, keys: Vec<u64>, sent: Instant) {
        let mut leases = Vec::with_capacity(keys.len());
        let mut earliest = None::<Instant>;
        for key in &keys {
            let lease = &self.leases[key].lease;
            leases.push(LeaseRef {
                name: lease.name.to_string(),
                lease_id: lease.lease_id,
            });
            earliest = Some(earliest.map_or(lease.deadline, |e| e.min(lease.deadline)));
        }
        let deadline = earliest.unwrap_or(sent);
        let body = json(&RenewRequest { leases });
        let transport = self.transport.clone();
        self.in_flight.spawn(async move {
            // With another server to fail over to, half the time left goes to this one; with
            // one server, a slow answer is worth waiting for: abandoning it only makes the
            // server do the same work again (a large batch on a busy etcd-backed server can
            // take a second).
            let left = deadline.saturating_duration_since(sent);
            let share = if transport.endpoint_count() > 1 {
                left / 2
            } else {
                left
            };
            let attempts = Attempts {
                deadline,
                per_attempt: share.max(Duration::from_millis(50)),
                first_contact: false,
            };
            let mut sent = sent;
            let results = match transport.post(Route::Renew, None, body, attempts).await {
                Ok(reply) if reply.status.is_success() => {
                    // Count from the attempt that was answered (see `Reply::sent`).
                    sent = reply.sent;
                    reply
                        .json::<RenewResponse>()
                        .ok()
                        .map(|r| r.results)
                        .filter(|r| r.len() == keys.len())
                }
                Ok(reply) => {
                    tracing::warn!(error = %reply.into_error(), "renewal refused");
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "renewal failed");
                    None
                }
            };
            BatchOutcome {
                sent,
                keys,
                results,
            }
        });
    }

    fn finish(&mut self, outcome: BatchOutcome) {
        let now = Instant::now();
        let retry_at = match outcome.results {
            Some(_) => {
                self.failures = Box::new(retry::delays());
                None
            }
            None => Some(now + self.failures.next().unwrap_or(Duration::from_millis(500))),
        };
        let results = outcome.results.unwrap_or_default();
        for (i, key) in outcome.keys.into_iter().enumerate() {
            let Some(tracked) = self.leases.get_mut(&key) else {
                continue; // released meanwhile
            };
            let lease = &mut tracked.lease;
            // A lease past its deadline stays lost even if a late answer renewed it: its
            // guard may have said so already. (The clock is read again for each lease, so
            // that none is revived just after its deadline passed.)
            if lease.deadline <= Instant::now() {
                let reason = lease.ends();
                self.lose(key, reason, false);
                continue;
            }
            let next = match (results.get(i), retry_at) {
                (Some(RenewResult::Renewed { lease_ms }), _) => {
                    let length =
                        Duration::from_millis((*lease_ms).min(crate::protocol::MAX_LEASE_MS));
                    let base = self.lease_clock.base(outcome.sent);
                    lease.extend(base, length);
                    lease.confirming = false;
                    lease.publish();
                    lease.next_event(outcome.sent)
                }
                (Some(RenewResult::Gone { reason }), _) => {
                    let reason = match reason {
                        Some(GoneReason::MaxHold) => LostReason::MaxHold,
                        Some(GoneReason::Revoked) => LostReason::Revoked,
                        _ => LostReason::Expired,
                    };
                    self.lose(key, reason, true);
                    continue;
                }
                (None, retry_at) => {
                    // A failed renewal puts the lease in jeopardy until one gets through.
                    // (A grant being confirmed hears only of success or loss.)
                    if !lease.confirming && lease.jeopardy_at > now {
                        lease.jeopardy_at = now;
                        lease.publish();
                    }
                    retry_at.unwrap_or(now).min(lease.deadline)
                }
            };
            tracked.queued = Some(next);
            self.queue.insert((next, key));
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value)
        .expect("wire types always serialize")
        .into()
}
