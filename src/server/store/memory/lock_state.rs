//! One lock's state machine: its holders, its FIFO line of waiters, and when the line moves.
//!
//! Pure: no runtime, no clock, no I/O. Every operation is given the time ([`Tick`]) and
//! reports what it did through [`Effects`]; the store turns that into events, tombstones,
//! leadership records, counters and timers (`bookkeeping`). Waiters are told of their grant
//! through a [`Listener`], a oneshot channel in the store and a plain cell in the tests.
//!
//! The grant rule: walking the line in FIFO order, each waiter that [`Mode::admits`] next to
//! the current holders is granted, and the walk stops at the first one it does not admit. So
//! readers at the head are admitted together, a reader behind a waiting writer waits (writers
//! never starve), and a semaphore admits up to its count.
//!
//! Lock-delays apply per holder, as in the etcd store: a holder that asked for one and ended
//! without a release (expired, reached its `max_hold`, was revoked) keeps its place and its
//! mode for the rule until its delay runs out, as a holder nobody can renew or see ([`Delay`]).
//! So nobody is granted next to it whom it would not have admitted while it held: nobody
//! after an exclusive holder, no writer after a reader (readers still join), and a
//! semaphore's ended holder keeps its permit. It does not make the name in use for kinds
//! ([`Mode::conflict`]): an acquire of another kind queues and waits for the delay. A
//! restart's hold-back stops every grant while it runs.
//!
//! Every public operation settles the lock before and after its work (expires overdue
//! holders, grants whom the rule admits): what it looks at is current, and what it leaves
//! needs nothing more until the next deadline ([`LockState::wake_at`]).

use crate::id::Id;
use crate::server::store::wait_queue::WaitQueue;
use crate::server::store::{Ended, Grant, HolderView, LeaderView, Mode, Reserved, StoreError};
use std::num::NonZeroU64;
use std::time::{Duration, SystemTime};

/// When an operation happens, and the store-wide timings that apply then. All times are µs
/// since the store's origin.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tick {
    pub now: u64,
    /// How long a grant nobody is listening for is kept for a returning poll.
    pub grace: u64,
    /// No lock is granted before this: the store's hold-back after a restart.
    pub held_back_until: u64,
}

/// What a waiter's long poll is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum News {
    /// Its grant.
    Granted(Grant),
    /// The lock is reserved to it next (docs/protocol.md §3.16).
    Next(Reserved),
}

/// Where a waiter's grant goes while its poll is attached.
pub(super) trait Listener {
    /// Hands over the grant (or a reservation); false if nobody is listening any more.
    fn deliver(self, news: News) -> bool;
    /// Whether the poll behind it has gone.
    fn is_closed(&self) -> bool;
}

/// What the lock needs from, and tells, the store around it.
pub(super) trait Effects {
    /// A fencing token for a grant now, or `None` while none may be issued (the waiters then
    /// keep their places; an immediate grant is refused as unavailable).
    fn token(&mut self) -> Option<u64>;
    /// A fresh lease id (a secret).
    fn lease_id(&mut self) -> Id;
    /// The acquire `request_id` has ended: a late attempt of it must create nothing.
    fn request_ended(&mut self, request_id: Id);
    /// The holder's lease ended without a release, for this reason: a late renewal may
    /// learn why.
    fn lease_ended(&mut self, holder: &Holder, why: Ended);
    /// For the audit trail, the console and elections' observers.
    fn happened(&mut self, what: Happened<'_>);
}

/// What happened to a lock.
#[derive(Debug, Clone, Copy)]
pub(super) enum Happened<'a> {
    Granted(&'a Holder),
    /// The lease's end moved (renewal, re-poll, or a grant nobody collected cut short).
    Deadline(&'a Holder),
    Released(&'a Holder),
    /// A cancel undid this grant.
    CancelledGrant(&'a Holder),
    /// A cancel withdrew this waiter.
    CancelledWaiter(Id),
    Revoked(&'a Holder),
    Expired(&'a Holder),
    /// A waiter left the line without the lock: its wait ran out, or it was abandoned.
    WaiterLeft {
        request_id: Id,
        timed_out: bool,
    },
    /// The exclusive holder set its election value.
    Proclaimed(&'a Holder),
}

impl<'a> Happened<'a> {
    /// How this changes the leadership of the name (its single exclusive holder), if it
    /// does: `Some(Some(h))` when `h` leads from now on, `Some(None)` when nobody does.
    pub fn leadership(&self) -> Option<Option<&'a Holder>> {
        match *self {
            Happened::Granted(h) | Happened::Proclaimed(h) if h.is_exclusive() => Some(Some(h)),
            Happened::Released(h)
            | Happened::CancelledGrant(h)
            | Happened::Revoked(h)
            | Happened::Expired(h)
                if h.is_exclusive() =>
            {
                Some(None)
            }
            _ => None,
        }
    }
}

/// What an acquire asked of its lease beyond its length.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseLimits {
    /// Longest hold from the grant, µs (`u64::MAX` for none).
    max_hold: u64,
    /// Lock-delay, ms (0 for none).
    lock_delay_ms: u32,
}

impl LeaseLimits {
    pub fn new(max_hold: Option<Duration>, lock_delay: Option<Duration>) -> LeaseLimits {
        LeaseLimits {
            max_hold: max_hold.map_or(u64::MAX, |d| d.as_micros() as u64),
            // The HTTP layer bounds the delay to the server's maximum, at most 24 h.
            lock_delay_ms: lock_delay
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        }
    }
}

/// A new acquire, or a re-poll of one.
#[derive(Debug)]
pub(super) struct Ask<'a, L> {
    /// The lock's name, for conflict messages.
    pub name: &'a str,
    pub request_id: Id,
    pub lease_ms: u32,
    pub limits: LeaseLimits,
    pub mode: Mode,
    pub label: Option<&'a str>,
    pub value: Option<&'a str>,
    /// The asking client's tag (from its `client_id`; 0 for none), for successor
    /// reservations.
    pub client: u64,
    pub listener: L,
    /// The caller would not wait at all: no place in line.
    pub no_wait: bool,
    pub max_waiters: usize,
    /// No grant of this lock before this (a restart's hold-back, its own or the store's).
    pub held_back_until: Option<u64>,
}

/// How an acquire began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Begun {
    Granted(Grant),
    /// In line; the grant will come through the listener.
    Waiting,
    /// Not grantable now, and the caller would not wait.
    TimedOut,
}

/// How a poll whose time ran out ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PollEnd {
    /// A grant that raced with the end of the poll.
    Granted(Grant),
    /// Still in line, this many waiters ahead (and its reservation, if it is next).
    StillWaiting(u64, Option<Reserved>),
    /// Out of line: its wait ran out, or it was withdrawn meanwhile.
    TimedOut,
}

/// The mode of a holder, packed into bytes that would otherwise be padding: a `Mode` field
/// would add 8 bytes to every held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exclusive,
    Shared,
    Permit,
}

/// A holder's label and election value, boxed so that the many holders without either pay
/// a thin pointer.
#[derive(Debug, Clone, Default)]
struct Texts {
    label: Option<String>,
    value: Option<String>,
}

impl Texts {
    fn boxed(label: Option<&str>, value: Option<&str>) -> Option<Box<Texts>> {
        (label.is_some() || value.is_some()).then(|| {
            Box::new(Texts {
                label: label.map(str::to_owned),
                value: value.map(str::to_owned),
            })
        })
    }
}

/// What a lease is granted on: the same for a waiter and, once granted, its holder.
#[derive(Debug)]
struct Terms {
    request_id: Id,
    lease_ms: u32,
    limits: LeaseLimits,
    mode: Mode,
    texts: Option<Box<Texts>>,
    /// The asking client's tag (0 for none).
    client: u64,
}

/// One current holder of a lock.
#[derive(Debug)]
pub(super) struct Holder {
    /// Never zero, so that the holders of a lock need no extra tag.
    token: NonZeroU64,
    /// Lease end, µs since origin.
    deadline: u64,
    /// Grant time, µs since origin.
    acquired: u64,
    /// The lease never runs past this (µs since origin; `u64::MAX` without a `max_hold`).
    hold_until: u64,
    lease_ms: u32,
    /// Lock-delay applied if the lease ends without a release (ms; 0 for none).
    lock_delay_ms: u32,
    /// With `kind`: the mode.
    permits: u32,
    kind: Kind,
    /// Whether an acquire was answered with this grant: only then does its end leave a
    /// tombstone (a grant nobody collected may still be collected by a slow re-poll, or the
    /// re-poll may join the line again).
    answered: bool,
    /// Granted from a successor reservation: its client may hold it without any answer,
    /// so its lease runs whole, whether or not a poll collects it.
    reserved: bool,
    /// The acquiring client's tag (0 for none), for successor reservations.
    client: u64,
    lease_id: Id,
    request_id: Id,
    texts: Option<Box<Texts>>,
}

impl Holder {
    fn new(token: u64, lease_id: Id, terms: Terms, now: u64) -> Holder {
        let hold_until = now.saturating_add(terms.limits.max_hold);
        let (kind, permits) = match terms.mode {
            Mode::Exclusive => (Kind::Exclusive, 0),
            Mode::Shared => (Kind::Shared, 0),
            Mode::Permit(n) => (Kind::Permit, n),
        };
        Holder {
            token: NonZeroU64::new(token).unwrap_or(NonZeroU64::MIN),
            deadline: now
                .saturating_add(u64::from(terms.lease_ms) * 1000)
                .min(hold_until),
            acquired: now,
            hold_until,
            lease_ms: terms.lease_ms,
            lock_delay_ms: terms.limits.lock_delay_ms,
            permits,
            kind,
            answered: true,
            reserved: false,
            client: terms.client,
            lease_id,
            request_id: terms.request_id,
            texts: terms.texts,
        }
    }

    pub fn token(&self) -> u64 {
        self.token.get()
    }

    pub fn request_id(&self) -> Id {
        self.request_id
    }

    pub fn lease_id(&self) -> Id {
        self.lease_id
    }

    pub fn lease_ms(&self) -> u32 {
        self.lease_ms
    }

    /// Lease end, µs since origin.
    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Exclusive => Mode::Exclusive,
            Kind::Shared => Mode::Shared,
            Kind::Permit => Mode::Permit(self.permits),
        }
    }

    pub fn is_exclusive(&self) -> bool {
        self.kind == Kind::Exclusive
    }

    pub fn value(&self) -> Option<&str> {
        self.texts.as_ref()?.value.as_deref()
    }

    pub fn label(&self) -> Option<&str> {
        self.texts.as_ref()?.label.as_deref()
    }

    /// The grant as the acquire call that began at `call_started` sees it; the lease's
    /// clock (re)started at `lease_started`. The lease reported is what is left of it then,
    /// which is less than its length when its `max_hold` is near.
    fn grant(&self, call_started: u64, lease_started: u64) -> Grant {
        Grant {
            lease_id: self.lease_id,
            fencing_token: self.token.get(),
            lease: Duration::from_millis(self.deadline.saturating_sub(lease_started) / 1000),
            waited: Duration::from_micros(lease_started.saturating_sub(call_started)),
        }
    }

    /// Runs the lease its length from `now`, but never past its `max_hold`.
    fn extend(&mut self, now: u64) {
        self.deadline = now
            .saturating_add(u64::from(self.lease_ms) * 1000)
            .min(self.hold_until);
    }

    /// Why the lease ends if it ends at its deadline.
    fn ends_by(&self) -> Ended {
        if self.deadline >= self.hold_until {
            Ended::MaxHold
        } else {
            Ended::Expired
        }
    }

    /// What inspection shows of it; `origin` is the wall-clock time of the store's origin.
    pub fn view(&self, now: u64, origin: SystemTime) -> HolderView {
        HolderView {
            fencing_token: self.token.get(),
            acquired_at: origin + Duration::from_micros(self.acquired),
            expires_in: Duration::from_micros(self.deadline.saturating_sub(now)),
            label: self.label().map(str::to_owned),
            value: self.value().map(str::to_owned),
        }
    }

    /// What observers of an election see of it as the leader.
    pub fn leader_view(&self, origin: SystemTime) -> LeaderView {
        LeaderView {
            fencing_token: self.token.get(),
            value: self.value().unwrap_or_default().to_owned(),
            label: self.label().map(str::to_owned),
            acquired_at: origin + Duration::from_micros(self.acquired),
        }
    }
}

/// A lock's holders, oldest grant first. The common single holder is kept inline, so that
/// a held mutex costs no more than it did before locks could have several holders.
#[derive(Debug, Default)]
enum Holders {
    #[default]
    None,
    One(Holder),
    /// Two or more.
    Many(Vec<Holder>),
}

impl Holders {
    fn as_slice(&self) -> &[Holder] {
        match self {
            Holders::None => &[],
            Holders::One(holder) => std::slice::from_ref(holder),
            Holders::Many(all) => all,
        }
    }

    fn find_mut(&mut self, mut matches: impl FnMut(&Holder) -> bool) -> Option<&mut Holder> {
        match self {
            Holders::None => None,
            Holders::One(holder) => matches(holder).then_some(holder),
            Holders::Many(all) => all.iter_mut().find(|h| matches(h)),
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, holder: Holder) {
        *self = match std::mem::take(self) {
            Holders::None => Holders::One(holder),
            Holders::One(first) => Holders::Many(vec![first, holder]),
            Holders::Many(mut all) => {
                all.push(holder);
                Holders::Many(all)
            }
        };
    }

    /// Takes out the first holder that matches.
    fn take(&mut self, mut matches: impl FnMut(&Holder) -> bool) -> Option<Holder> {
        let index = self.as_slice().iter().position(&mut matches)?;
        let mut all = std::mem::take(self).into_vec();
        let taken = all.remove(index);
        *self = Holders::from_vec(all);
        Some(taken)
    }

    /// Takes out every holder that matches, in order.
    fn take_all(&mut self, matches: impl FnMut(&Holder) -> bool) -> Vec<Holder> {
        let (taken, kept): (Vec<Holder>, Vec<Holder>) = std::mem::take(self)
            .into_vec()
            .into_iter()
            .partition(matches);
        *self = Holders::from_vec(kept);
        taken
    }

    fn into_vec(self) -> Vec<Holder> {
        match self {
            Holders::None => Vec::new(),
            Holders::One(holder) => vec![holder],
            Holders::Many(all) => all,
        }
    }

    fn from_vec(mut all: Vec<Holder>) -> Holders {
        match all.len() {
            0 => Holders::None,
            1 => all.pop().map_or(Holders::None, Holders::One),
            _ => Holders::Many(all),
        }
    }
}

#[derive(Debug)]
struct Waiter<L> {
    terms: Terms,
    /// The long poll waiting for this waiter's grant; `None` while detached.
    notify: Option<L>,
    /// When it was detached (µs since origin).
    detached_at: u64,
    /// When it joined the line (µs since origin).
    queued_at: u64,
    /// When the long poll now attached began (µs since origin).
    poll_started: u64,
}

/// A holder that ended without a release while its lock-delay runs: until then it keeps
/// its place and mode for the grant rule. Every holder was granted before every waiter now
/// in line, so its place is simply among the holders.
#[derive(Debug, Clone, Copy)]
struct Delay {
    /// When the delay runs out (µs since origin).
    until: u64,
    mode: Mode,
}

/// The first waiter's successor reservation (docs/protocol.md §3.16), made when it waits
/// first in line behind the single exclusive holder and both were asked for by one client.
/// Its lease id and token are fixed from then on, and the client may take the lock the
/// moment it releases the lease ahead, before the server hears of it: so the waiter leaves
/// the line only by a cancel of its request or a release of its lease, never because its
/// wait ran out, its poll went or the grace period passed.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    request_id: Id,
    lease_id: Id,
    token: u64,
    lease_ms: u32,
    /// The lease ahead of it.
    after: Id,
    /// Whether a poll of it has been told.
    told: bool,
}

impl Reservation {
    fn next(&self) -> Reserved {
        Reserved {
            lease_id: self.lease_id,
            fencing_token: self.token,
            lease: Duration::from_millis(u64::from(self.lease_ms)),
            after: self.after,
        }
    }
}

/// What a lock has only while someone waits for it, an ended holder's lock-delay runs, or
/// its grants are held back after a restart: most held locks have none of these, and pay
/// one pointer for it.
#[derive(Debug)]
struct Queue<L> {
    waiters: WaitQueue<Waiter<L>>,
    /// The ended holders whose lock-delay runs, in the order they ended.
    delays: Vec<Delay>,
    /// No grant before this (µs since origin): a long lease from before a restart. 0 once
    /// over.
    held_back_until: u64,
    /// The first waiter's successor reservation, if it has one.
    reserved: Option<Reservation>,
}

impl<L> Queue<L> {
    /// The reservation of `request_id`, if it is the reserved first waiter.
    fn reservation_of(&self, request_id: &Id) -> Option<Reservation> {
        self.reserved.filter(|r| r.request_id == *request_id)
    }
}

impl<L> Default for Queue<L> {
    fn default() -> Queue<L> {
        Queue {
            waiters: WaitQueue::default(),
            delays: Vec::new(),
            held_back_until: 0,
            reserved: None,
        }
    }
}

/// One lock: it exists while it has a holder, a waiter, or a lock-delay running.
#[derive(Debug)]
pub(super) struct LockState<L> {
    holders: Holders,
    queue: Option<Box<Queue<L>>>,
}

impl<L> Default for LockState<L> {
    fn default() -> LockState<L> {
        LockState {
            holders: Holders::None,
            queue: None,
        }
    }
}

impl<L: Listener> LockState<L> {
    /// Nothing left to keep: no holder, no waiter, no delay.
    pub fn is_empty(&self) -> bool {
        self.holders.len() == 0 && self.queue.is_none()
    }

    /// Current holders, oldest grant first (after a settle, none is overdue).
    pub fn holders(&self) -> &[Holder] {
        self.holders.as_slice()
    }

    pub fn is_held(&self) -> bool {
        self.holders.len() > 0
    }

    pub fn waiters(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.waiters.len())
    }

    /// When the first in line joined it (µs since origin).
    pub fn first_queued_at(&self) -> Option<u64> {
        Some(self.queue.as_ref()?.waiters.front()?.queued_at)
    }

    /// When this lock's own hold-back ends, if one runs: the last ended holder's lock-delay,
    /// or this lock's hold-back after a restart (a long lease from before it), whichever ends
    /// later.
    pub fn held_back_until(&self) -> Option<u64> {
        let queue = self.queue.as_ref()?;
        let delays = queue.delays.iter().map(|d| d.until).max().unwrap_or(0);
        Some(queue.held_back_until.max(delays)).filter(|&until| until > 0)
    }

    /// The mode the holders hold; with no holder, the first waiter's (so a semaphore's
    /// count shows while it has only waiters).
    pub fn mode(&self) -> Mode {
        self.mode_in_use().unwrap_or_default()
    }

    /// The election's leader: the single exclusive holder.
    pub fn leader(&self) -> Option<&Holder> {
        match self.holders.as_slice() {
            [holder] if holder.is_exclusive() => Some(holder),
            _ => None,
        }
    }

    fn held_mode(&self) -> Option<Mode> {
        self.holders.as_slice().first().map(Holder::mode)
    }

    /// What the grant rule admits next to: the mode held and by how many, counting the ended
    /// holders whose lock-delay runs (all of one mode with the live holders: nobody is
    /// granted next to one whom it would not admit).
    fn seats(&self) -> (Option<Mode>, usize) {
        let delays = self.queue.as_ref().map_or(&[][..], |q| &q.delays[..]);
        seats(&self.holders, delays)
    }

    fn mode_in_use(&self) -> Option<Mode> {
        self.held_mode().or_else(|| {
            let first = self.queue.as_ref()?.waiters.front()?;
            Some(first.terms.mode)
        })
    }

    /// When time alone next changes something somebody waits for: while waiters wait, the
    /// earliest holder's deadline, lock-delay end or hold-back end (after which one may be
    /// granted); else the end of the last delay or hold-back (after which the lock may be
    /// dropped). A function of the state only, so that the store can tell when its timer for
    /// the lock must move.
    pub fn wake_at(&self) -> Option<u64> {
        let queue = self.queue.as_ref()?;
        let hold_back = (queue.held_back_until > 0).then_some(queue.held_back_until);
        let delays = queue.delays.iter().map(|d| d.until);
        if queue.waiters.is_empty() {
            return delays.max().max(hold_back);
        }
        let expiry = self.holders.as_slice().iter().map(|h| h.deadline).min();
        [expiry, delays.min(), hold_back]
            .into_iter()
            .flatten()
            .min()
    }

    /// Brings the lock up to date: ends overdue leases and lock-delays, then grants in FIFO
    /// order whom the rule admits, unless grants are held back after a restart.
    pub fn settle(&mut self, tick: Tick, fx: &mut impl Effects) {
        let now = tick.now;
        if self.holders.as_slice().iter().any(|h| h.deadline <= now) {
            for holder in self.holders.take_all(|h| h.deadline <= now) {
                if holder.answered {
                    fx.request_ended(holder.request_id);
                }
                fx.lease_ended(&holder, holder.ends_by());
                fx.happened(Happened::Expired(&holder));
                // The delay counts from when the lease ended, not from when that was noticed.
                self.keep_delayed(&holder, holder.deadline, now);
            }
        }
        if let Some(queue) = &mut self.queue {
            queue.delays.retain(|d| d.until > now);
            if queue.held_back_until <= now {
                queue.held_back_until = 0;
            }
        }
        if !self.held_back(now, tick.held_back_until) {
            self.grant_admitted(tick, fx);
        }
        self.reserve_next(tick, fx);
        if self
            .queue
            .as_ref()
            .is_some_and(|q| q.waiters.is_empty() && q.delays.is_empty() && q.held_back_until == 0)
        {
            self.queue = None;
        }
    }

    /// Whether a restart's hold-back (the store's, or this lock's) stops every grant.
    fn held_back(&self, now: u64, store_held_back_until: u64) -> bool {
        now < store_held_back_until || self.queue.as_ref().is_some_and(|q| now < q.held_back_until)
    }

    fn grant_admitted(&mut self, tick: Tick, fx: &mut impl Effects) {
        let Some(queue) = &mut self.queue else {
            return;
        };
        while let Some(first) = queue.waiters.front() {
            let (held, holders) = seats(&self.holders, &queue.delays);
            if !first.terms.mode.admits(held, holders) {
                break;
            }
            let reserved = queue.reservation_of(&first.terms.request_id);
            // No token, no grant: the waiters keep their places until the state file takes
            // the next reservation (a sweep tries again). A reserved waiter has its own.
            let Some((token, lease_id)) = reserved
                .map(|r| (r.token, r.lease_id))
                .or_else(|| Some((fx.token()?, fx.lease_id())))
            else {
                break;
            };
            let Some(waiter) = queue.waiters.pop_front() else {
                break;
            };
            let mut holder = Holder::new(token, lease_id, waiter.terms, tick.now);
            let grant = holder.grant(waiter.poll_started, tick.now);
            let delivered = waiter
                .notify
                .is_some_and(|tx| tx.deliver(News::Granted(grant)));
            if reserved.is_some() {
                // Its client may already hold it (it took it when it released the lease
                // ahead): the lease runs whole.
                queue.reserved = None;
                holder.reserved = true;
                holder.answered = true;
            } else {
                holder.answered = delivered;
                if !delivered {
                    // Nobody is listening right now: keep the grant for a returning poll
                    // only briefly.
                    holder.deadline = holder.deadline.min(tick.now.saturating_add(tick.grace));
                }
            }
            fx.happened(Happened::Granted(&holder));
            self.holders.push(holder);
        }
    }

    /// Reserves the lock to the first waiter next (docs/protocol.md §3.16) when the single
    /// holder is exclusive, the waiter asks to be, and one client asked for both; tells its
    /// poll, if one is attached. Without a token now (the state file), a later settle tries
    /// again.
    fn reserve_next(&mut self, tick: Tick, fx: &mut impl Effects) {
        let Holders::One(holder) = &self.holders else {
            return;
        };
        let Some(queue) = &mut self.queue else {
            return;
        };
        if queue.reserved.is_some() || holder.client == 0 || !holder.is_exclusive() {
            return;
        }
        let Some(first) = queue.waiters.front_mut() else {
            return;
        };
        if first.terms.client != holder.client || first.terms.mode != Mode::Exclusive {
            return;
        }
        let Some(token) = fx.token() else {
            return;
        };
        let mut reservation = Reservation {
            request_id: first.terms.request_id,
            lease_id: fx.lease_id(),
            token,
            lease_ms: first.terms.lease_ms,
            after: holder.lease_id,
            told: false,
        };
        if let Some(poll) = first.notify.take() {
            reservation.told = poll.deliver(News::Next(reservation.next()));
            first.detached_at = tick.now;
        }
        queue.reserved = Some(reservation);
    }

    /// Keeps the place and mode of `holder`, whose lease ended at `ended_at` without a
    /// release, for its lock-delay, if it asked for one and it has not run out by `now`. Kept
    /// in the queue, which stays while the delay runs even with nobody waiting.
    fn keep_delayed(&mut self, holder: &Holder, ended_at: u64, now: u64) {
        let until = ended_at.saturating_add(u64::from(holder.lock_delay_ms) * 1000);
        if holder.lock_delay_ms == 0 || until <= now {
            return;
        }
        let queue = self.queue.get_or_insert_with(Default::default);
        queue.delays.push(Delay {
            until,
            mode: holder.mode(),
        });
    }

    /// Settles, runs `op`, settles again.
    fn around<F: Effects, T>(
        &mut self,
        tick: Tick,
        fx: &mut F,
        op: impl FnOnce(&mut Self, &mut F) -> T,
    ) -> T {
        self.settle(tick, fx);
        let out = op(self, fx);
        self.settle(tick, fx);
        out
    }

    /// An acquire: the same request again finds its grant or its place in line; a new one is
    /// granted at once if the line is empty and the rule admits it, else joins the line.
    pub fn acquire(
        &mut self,
        ask: Ask<'_, L>,
        tick: Tick,
        fx: &mut impl Effects,
    ) -> Result<Begun, StoreError> {
        self.around(tick, fx, |lock, fx| lock.join(ask, tick, fx))
    }

    fn join(
        &mut self,
        ask: Ask<'_, L>,
        tick: Tick,
        fx: &mut impl Effects,
    ) -> Result<Begun, StoreError> {
        let now = tick.now;
        if let Some(holder) = self.holders.find_mut(|h| h.request_id == ask.request_id) {
            holder.extend(now);
            holder.answered = true;
            fx.happened(Happened::Deadline(holder));
            return Ok(Begun::Granted(holder.grant(now, now)));
        }
        if let Some(queue) = self.queue.as_deref_mut()
            && let Some(waiter) = queue.waiters.get_mut(&ask.request_id)
        {
            if let Some(reserved) = &mut queue.reserved
                && reserved.request_id == ask.request_id
                && !reserved.told
            {
                // Its earlier polls never heard of the reservation: this one does, now.
                reserved.told = ask.listener.deliver(News::Next(reserved.next()));
                waiter.notify = None;
                waiter.detached_at = now;
                return Ok(Begun::Waiting);
            }
            waiter.notify = Some(ask.listener);
            waiter.poll_started = now;
            return Ok(Begun::Waiting);
        }
        if let Some(conflict) = self
            .mode_in_use()
            .and_then(|in_use| ask.mode.conflict(ask.name, in_use))
        {
            return Err(StoreError::Conflict(conflict));
        }
        let terms = Terms {
            request_id: ask.request_id,
            lease_ms: ask.lease_ms,
            limits: ask.limits,
            mode: ask.mode,
            texts: Texts::boxed(ask.label, ask.value),
            client: ask.client,
        };
        let held_back = ask.held_back_until.filter(|&until| until > now);
        let (held, holders) = self.seats();
        if self.waiters() == 0
            && held_back.is_none()
            && !self.held_back(now, tick.held_back_until)
            && ask.mode.admits(held, holders)
        {
            let Some(token) = fx.token() else {
                return Err(StoreError::Unavailable(
                    "no fencing token is reserved in the state file yet; retry".into(),
                ));
            };
            let holder = Holder::new(token, fx.lease_id(), terms, now);
            fx.happened(Happened::Granted(&holder));
            let grant = holder.grant(now, now);
            self.holders.push(holder);
            return Ok(Begun::Granted(grant));
        }
        if ask.no_wait {
            return Ok(Begun::TimedOut);
        }
        let waiters = self.waiters();
        if waiters >= ask.max_waiters {
            return Err(StoreError::Full(format!(
                "lock already has {waiters} waiters, the most allowed"
            )));
        }
        let queue = self.queue.get_or_insert_with(Default::default);
        queue.waiters.push_back(
            ask.request_id,
            Waiter {
                terms,
                notify: Some(ask.listener),
                detached_at: 0,
                queued_at: now,
                poll_started: now,
            },
        );
        if let Some(until) = held_back {
            queue.held_back_until = queue.held_back_until.max(until);
        }
        Ok(Begun::Waiting)
    }

    /// Extends the lease `lease_id` by its length from now (never past its `max_hold`):
    /// `None` if no holder has it, `Some(None)` if it had less than a millisecond left before
    /// its `max_hold` (it ends now, for that reason), else what is left of it.
    pub fn renew(
        &mut self,
        lease_id: Id,
        tick: Tick,
        fx: &mut impl Effects,
    ) -> Option<Option<Duration>> {
        let now = tick.now;
        self.around(tick, fx, |lock, fx| {
            let Some(holder) = lock.holders.find_mut(|h| h.lease_id == lease_id) else {
                // A reserved lease (§3.16) is renewed as it is: its clock starts when the
                // lease ahead ends, which is no earlier than this renewal's send.
                let reserved = lock.queue.as_ref()?.reserved?;
                return (reserved.lease_id == lease_id)
                    .then(|| Some(Duration::from_millis(u64::from(reserved.lease_ms))));
            };
            holder.extend(now);
            if holder.deadline < now.saturating_add(1000) {
                // No lease to report: it ends at the settle that follows, by its max_hold.
                holder.hold_until = now;
                holder.deadline = now;
            }
            fx.happened(Happened::Deadline(holder));
            let left = holder.deadline.saturating_sub(now) / 1000;
            Some((left > 0).then(|| Duration::from_millis(left)))
        })
    }

    /// Releases the lease `lease_id`; false if no holder has it.
    pub fn release(&mut self, lease_id: Id, tick: Tick, fx: &mut impl Effects) -> bool {
        self.around(tick, fx, |lock, fx| {
            let Some(holder) = lock.holders.take(|h| h.lease_id == lease_id) else {
                // A reserved lease (§3.16) released before it began: its waiter leaves.
                let Some(queue) = &mut lock.queue else {
                    return false;
                };
                let Some(reserved) = queue.reserved.filter(|r| r.lease_id == lease_id) else {
                    return false;
                };
                queue.reserved = None;
                queue.waiters.remove(&reserved.request_id);
                fx.request_ended(reserved.request_id);
                fx.happened(Happened::CancelledWaiter(reserved.request_id));
                return true;
            };
            fx.request_ended(holder.request_id);
            fx.happened(Happened::Released(&holder));
            true
        })
    }

    /// Withdraws the waiter `request_id`, or undoes the grant made to it; false if there was
    /// neither.
    pub fn withdraw(&mut self, request_id: Id, tick: Tick, fx: &mut impl Effects) -> bool {
        self.around(tick, fx, |lock, fx| {
            if let Some(queue) = &mut lock.queue
                && queue.waiters.remove(&request_id).is_some()
            {
                if queue.reservation_of(&request_id).is_some() {
                    queue.reserved = None;
                }
                fx.happened(Happened::CancelledWaiter(request_id));
                true
            } else if let Some(holder) = lock.holders.take(|h| h.request_id == request_id) {
                fx.happened(Happened::CancelledGrant(&holder));
                true
            } else {
                false
            }
        })
    }

    /// Ends every holder's lease now, as if it had expired (each with its lock-delay), and
    /// returns their tokens in ascending order.
    pub fn revoke(&mut self, tick: Tick, fx: &mut impl Effects) -> Vec<u64> {
        let now = tick.now;
        self.around(tick, fx, |lock, fx| {
            let revoked = std::mem::take(&mut lock.holders).into_vec();
            let mut tokens = Vec::with_capacity(revoked.len());
            let reserved_after = lock
                .queue
                .as_ref()
                .and_then(|q| q.reserved)
                .map(|r| r.after);
            for holder in &revoked {
                // A late re-poll of its acquire must not find the grant again.
                fx.request_ended(holder.request_id);
                fx.lease_ended(holder, Ended::Revoked);
                fx.happened(Happened::Revoked(holder));
                lock.keep_delayed(holder, now, now);
                if reserved_after == Some(holder.lease_id) && holder.deadline > now {
                    // Its client, which does not know of the revocation yet, may hand the
                    // lock to the reserved successor when it releases this lease, for as
                    // long as it thinks this lease runs: the successor starts no earlier
                    // than the lease would have ended.
                    let queue = lock.queue.get_or_insert_with(Default::default);
                    queue.delays.push(Delay {
                        until: holder.deadline,
                        mode: holder.mode(),
                    });
                }
                tokens.push(holder.token.get());
            }
            tokens.sort_unstable();
            tokens
        })
    }

    /// Sets the election value of the lease `lease_id` if it holds the lock exclusively:
    /// `Ok(false)` if no holder has it, a conflict if it holds it in another mode.
    pub fn proclaim(
        &mut self,
        name: &str,
        lease_id: Id,
        value: String,
        tick: Tick,
        fx: &mut impl Effects,
    ) -> Result<bool, StoreError> {
        self.around(tick, fx, |lock, fx| {
            let Some(holder) = lock.holders.find_mut(|h| h.lease_id == lease_id) else {
                return Ok(false);
            };
            let held_as = match holder.mode() {
                Mode::Exclusive => {
                    holder.texts.get_or_insert_with(Default::default).value = Some(value);
                    fx.happened(Happened::Proclaimed(holder));
                    return Ok(true);
                }
                Mode::Shared => "shared (a read lock)".to_owned(),
                Mode::Permit(n) => format!("as one of the {n} permits of a semaphore"),
            };
            Err(StoreError::Conflict(format!(
                "only an exclusive holder can proclaim a value: this lease holds {name:?} {held_as}"
            )))
        })
    }

    /// Ends the poll of `request_id` whose time ran out, for a call that began at
    /// `call_started`: a grant that raced wins; else the waiter leaves the line
    /// (`timed_out`, its whole wait is over) or stays, detached if its poll has gone.
    pub fn finish_poll(
        &mut self,
        request_id: Id,
        timed_out: bool,
        call_started: u64,
        tick: Tick,
        fx: &mut impl Effects,
    ) -> PollEnd {
        let now = tick.now;
        self.around(tick, fx, |lock, fx| {
            if let Some(holder) = lock.holders.find_mut(|h| h.request_id == request_id) {
                holder.extend(now);
                holder.answered = true;
                fx.happened(Happened::Deadline(holder));
                return PollEnd::Granted(holder.grant(call_started, now));
            }
            let Some(queue) = &mut lock.queue else {
                return PollEnd::TimedOut;
            };
            let Some(position) = queue.waiters.position(&request_id) else {
                // Withdrawn meanwhile (cancelled, or gone past its grace period).
                return PollEnd::TimedOut;
            };
            let reserved = queue.reservation_of(&request_id).map(|r| r.next());
            if timed_out && reserved.is_none() {
                queue.waiters.remove(&request_id);
                fx.request_ended(request_id);
                fx.happened(Happened::WaiterLeft {
                    request_id,
                    timed_out: true,
                });
                return PollEnd::TimedOut;
            }
            if let Some(waiter) = queue.waiters.get_mut(&request_id) {
                detach_if_gone(waiter, now);
            }
            PollEnd::StillWaiting(position, reserved)
        })
    }

    /// The poll of `request_id` went away before it answered. A grant it was handed
    /// (`delivered`, its token) is kept for a retry only briefly; a waiter stays in line,
    /// detached.
    pub fn poll_dropped(
        &mut self,
        request_id: Id,
        delivered: Option<u64>,
        tick: Tick,
        fx: &mut impl Effects,
    ) {
        let now = tick.now;
        self.around(tick, fx, |lock, fx| {
            if let Some(token) = delivered {
                if let Some(holder) = lock
                    .holders
                    .find_mut(|h| h.token.get() == token && !h.reserved)
                {
                    holder.deadline = holder.deadline.min(now.saturating_add(tick.grace));
                    holder.answered = false;
                    fx.happened(Happened::Deadline(holder));
                }
            } else if let Some(queue) = &mut lock.queue
                && let Some(waiter) = queue.waiters.get_mut(&request_id)
            {
                detach_if_gone(waiter, now);
            }
        });
    }

    /// Drops the detached waiters whose grace period is over (nobody will come back for
    /// them), then settles. The sweep runs it on every lock of the table: one settle, and
    /// the line is walked only where someone waits.
    pub fn drop_abandoned(&mut self, tick: Tick, fx: &mut impl Effects) {
        if let Some(queue) = &mut self.queue {
            let reserved = queue.reserved.map(|r| r.request_id);
            queue.waiters.retain(|w| {
                let stays = w.notify.is_some()
                    || reserved == Some(w.terms.request_id)
                    || tick.now < w.detached_at.saturating_add(tick.grace);
                if !stays {
                    fx.happened(Happened::WaiterLeft {
                        request_id: w.terms.request_id,
                        timed_out: false,
                    });
                }
                stays
            });
        }
        self.settle(tick, fx);
    }
}

/// The mode held and by how many, for the grant rule: the live holders and the ended holders
/// whose lock-delay runs.
fn seats(holders: &Holders, delays: &[Delay]) -> (Option<Mode>, usize) {
    let held = holders
        .as_slice()
        .first()
        .map(Holder::mode)
        .or_else(|| delays.first().map(|d| d.mode));
    (held, holders.len() + delays.len())
}

/// A waiter whose poll has gone keeps its place, detached, for the grace period.
fn detach_if_gone<L: Listener>(waiter: &mut Waiter<L>, now: u64) {
    if waiter.notify.as_ref().is_some_and(L::is_closed) {
        waiter.notify = None;
        waiter.detached_at = now;
    }
}

#[cfg(test)]
mod tests;
