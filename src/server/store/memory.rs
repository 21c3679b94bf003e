//! The in-memory backend: sharded lock table, FIFO queue per lock, timers only where waiters
//! wait.
//!
//! * A lock exists in the table only while it has a holder or waiters.
//! * A holder's expiry needs a timer only when someone waits for it; otherwise an expired
//!   holder is noticed by the next operation on the lock or by the shard's sweep.
//! * Waiters wait on a oneshot channel. A waiter whose long poll ended (or whose connection
//!   dropped) stays in line, detached, for the grace period; a grant made to a detached
//!   waiter is kept for it for the grace period too.
//! * Request ids whose acquire has ended (cancelled, timed out, released, expired after it was
//!   answered) are remembered for a while as tombstones, so that a late attempt of one (a
//!   retry that arrives after its client gave up) is refused instead of creating a place in
//!   line or a grant nobody polls. Each shard keeps at most [`TOMBSTONES_PER_SHARD`], each for
//!   [`MemoryConfig::tombstone_ttl`]; when a shard is full, its oldest is dropped (a late
//!   attempt of that id is then a new acquire again, as without tombstones).
//! * With a state file, no grant is answered before what it depends on is durable: its
//!   fencing token's reservation, its lease length (up to the crash hold-back bound), or its
//!   lock's record if the lease is longer (see `state_file`).

use super::wait_queue::WaitQueue;
use super::{
    AcquireOutcome, AcquireSpec, Ended, EventKind, EventSink, Grant, HolderView, ListPage,
    ListSpec, LockStore, LockView, Mode, Observation, Proclaimed, Project, ProjectId, Quota,
    Release, Renewal, StoreError, StoreEvent, StoreFuture, StoreStats,
};
use crate::id::Id;
use crate::server::state_file::{
    Boot, DEFAULT_CRASH_HOLD_BACK, Generation, LongLease, MIN_FLUSH_INTERVAL, StateFile,
    wall_micros,
};
use rand::RngCore;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Settings of the memory backend.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Number of independently locked shards.
    pub shards: usize,
    /// How long a detached waiter keeps its place, and a grant made to it is kept for it.
    pub grace: Duration,
    /// Most waiters one lock may have.
    pub max_waiters_per_lock: usize,
    /// How often each shard drops expired holders and departed waiters nobody waits on.
    pub sweep_interval: Duration,
    /// Durable state for safe restarts; `None` keeps nothing (each start is a first start).
    pub state_file: Option<PathBuf>,
    /// Project ids below this have their lock count kept, for quotas.
    pub max_projects: u32,
    /// Where to send the audit trail of every grant, renewal, release and expiry.
    pub events: Option<EventSink>,
    /// A second sink for the same events: the server's console (live view).
    pub console_events: Option<EventSink>,
    /// After a crash, every lock waits at most this long (leases up to this long are
    /// covered); locks with a longer lease are recorded in the state file when it is
    /// granted, and only they wait for their own lease after a crash.
    pub crash_hold_back: Duration,
    /// How far ahead fencing tokens are reserved in the state file (a reservation is written
    /// when half of it is used, so about every half of this while grants happen).
    pub token_reserve: Duration,
    /// How long the request id of an ended acquire is remembered (see the module's notes);
    /// a few long polls.
    pub tombstone_ttl: Duration,
    /// Writes the state file on the task that needs it instead of on the background writer:
    /// only for deterministic simulations (see
    /// `ServerBuilder::state_file_inline_writes_for_simulations`).
    pub state_file_inline_writes: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            shards: 16,
            grace: Duration::from_secs(3),
            max_waiters_per_lock: 100_000,
            sweep_interval: Duration::from_secs(1),
            state_file: None,
            max_projects: 100_000,
            events: None,
            console_events: None,
            crash_hold_back: DEFAULT_CRASH_HOLD_BACK,
            token_reserve: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(60),
            state_file_inline_writes: false,
        }
    }
}

/// Fencing tokens: `max(previous + 1, wall-clock µs since 2025)`. They increase across
/// restarts as long as the clock does not step back; with a state file, also when it does,
/// because a run issues only tokens durably reserved in the file. While a reservation cannot
/// be written, no token (hence no grant) is issued.
#[derive(Debug)]
struct Tokens {
    last: AtomicU64,
    /// Reservation step, in token units (wall-clock µs): the configured step, plus the
    /// longest a write may wait for its turn, so that a reservation asked for now is not
    /// used up by the wall clock by the time it is written.
    reserve: u64,
}

/// Tombstones kept per shard at most: about 64 bytes each (map entry and queue entry), so
/// the default 16 shards hold at most about 4 MiB of them.
pub const TOMBSTONES_PER_SHARD: usize = 4096;

impl Tokens {
    fn new(first: u64, reserve: u64) -> Tokens {
        Tokens {
            last: AtomicU64::new(first.saturating_sub(1)),
            reserve: reserve.saturating_add(micros(MIN_FLUSH_INTERVAL)),
        }
    }

    /// The next token to issue, and whether the durable reservation covers it.
    fn candidate(&self, file: Option<&StateFile>) -> (u64, bool) {
        let next = (self.last.load(Ordering::Acquire) + 1).max(wall_micros(SystemTime::now()));
        (next, file.is_none_or(|f| next < f.durable_tokens()))
    }

    /// Issues a token, or `None` while the reservation that would cover it is not durable.
    /// Asks for the next reservation when half of the current one is used.
    fn next(&self, file: Option<&StateFile>) -> Option<u64> {
        let floor = wall_micros(SystemTime::now());
        let below = file.map_or(u64::MAX, StateFile::durable_tokens);
        let issued = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                let token = (last + 1).max(floor);
                (token < below).then_some(token)
            });
        let token = match issued {
            Ok(last) | Err(last) => (last + 1).max(floor),
        };
        if let Some(file) = file
            && token.saturating_add(self.reserve / 2) >= below
        {
            file.reserve_tokens(token.saturating_add(self.reserve));
        }
        issued.ok().map(|_| token)
    }
}

/// The in-memory [`LockStore`].
#[derive(Debug)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    shards: Box<[Shard]>,
    /// Fixed keys: a lock lands on the same shard in every run, so simulations replay
    /// exactly. The tables inside the shards keep random keys against hash flooding.
    hasher: ShardHasher,
    origin: Instant,
    /// The wall-clock time of `origin`, to show grant times.
    origin_wall: SystemTime,
    /// Locks (held or waited for) per project id.
    project_locks: Box<[AtomicU32]>,
    /// No grant before this (micros since `origin`): leases from before a restart may run.
    hold_back_until: u64,
    /// Locks whose long lease from before a restart may still run: (project name, lock
    /// name) -> no grant before this (micros since `origin`).
    lock_hold_backs: HashMap<(String, String), u64>,
    tokens: Tokens,
    state_file: Option<StateFile>,
    max_lease_noted: AtomicU64,
    expirations: AtomicU64,
    held: AtomicU64,
    waiting: AtomicU64,
    config: MemoryConfig,
}

#[derive(Debug)]
struct Shard {
    state: Mutex<ShardState>,
    wake: Arc<Notify>,
    /// Locked after `state` when both are.
    tombstones: Mutex<Tombstones>,
    /// Lease ids of leases that ended without a release, tagged with why (`Ended`), so
    /// that a late renewal can say why. Locked after `state` when both are.
    ended: Mutex<Tombstones>,
}

/// Request ids of ended acquires (or lease ids of ended leases), by id: (fingerprint of the
/// lock key, expiry µs, a tag saying why).
#[derive(Debug, Default)]
struct Tombstones {
    by_id: HashMap<Id, (u64, u64, u8)>,
    /// Insertion order, for expiry and eviction: (expiry µs, id).
    order: VecDeque<(u64, Id)>,
}

impl Tombstones {
    fn insert(&mut self, id: Id, lock: u64, now: u64, ttl: u64) {
        self.insert_tagged(id, lock, now, ttl, 0);
    }

    /// Inserts with a tag. Entries may have different TTLs: one that expires early behind a
    /// later one is dropped only when it reaches the front (or by the bound), and `tag`
    /// ignores it once expired.
    fn insert_tagged(&mut self, id: Id, lock: u64, now: u64, ttl: u64, tag: u8) {
        self.expire(now);
        while self.order.len() >= TOMBSTONES_PER_SHARD {
            self.pop_oldest();
        }
        self.by_id.insert(id, (lock, now + ttl, tag));
        self.order.push_back((now + ttl, id));
    }

    fn contains(&self, id: &Id, lock: u64, now: u64) -> bool {
        self.tag(id, lock, now).is_some()
    }

    /// The tag of a live tombstone of `id` on `lock`.
    fn tag(&self, id: &Id, lock: u64, now: u64) -> Option<u8> {
        self.by_id
            .get(id)
            .filter(|&&(l, expires, _)| l == lock && expires > now)
            .map(|&(_, _, tag)| tag)
    }

    fn expire(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|&(expires, _)| expires <= now)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((expires, id)) = self.order.pop_front()
            // A newer tombstone of the same id has its own entry further back.
            && self.by_id.get(&id).is_some_and(|&(_, e, _)| e == expires)
        {
            self.by_id.remove(&id);
        }
    }
}

#[derive(Debug, Default)]
struct ShardState {
    locks: HashMap<Box<[u8]>, LockState>,
    /// Expiry timers of held locks that have waiters: (deadline µs, token) -> lock key.
    timers: BTreeMap<(u64, u64), Box<[u8]>>,
}

#[derive(Debug, Default)]
struct LockState {
    holder: Option<Holder>,
    queue: Option<Box<Queue>>,
}

#[derive(Debug)]
struct Holder {
    /// Never zero, so that `Option<Holder>` needs no extra tag (8 bytes per lock).
    token: NonZeroU64,
    /// Lease end, µs since origin.
    deadline: u64,
    /// Grant time, µs since origin.
    acquired: u64,
    lease_ms: u32,
    /// The lease never runs past this (µs since origin; `u64::MAX` without a `max_hold`).
    hold_until: u64,
    /// Lock-delay applied if the lease ends without a release (ms; 0 for none).
    lock_delay_ms: u32,
    /// Whether an acquire was answered with this grant: only then does its end leave a
    /// tombstone (a grant nobody collected may still be collected by a slow re-poll, or the
    /// re-poll may join the line again).
    answered: bool,
    lease_id: Id,
    request_id: Id,
    /// Boxed twice so that a lock without a label pays one pointer.
    label: Option<Label>,
}

#[derive(Debug, Default)]
struct Queue {
    waiters: WaitQueue<Waiter>,
    /// The holder's expiry timer, or the end of the lock's hold-back after a restart, if
    /// scheduled: its key in `ShardState::timers`.
    timer: Option<(u64, u64)>,
    /// No grant before this (µs since origin): a long lease from before a restart may run.
    held_back_until: u64,
}

#[derive(Debug)]
struct Waiter {
    request_id: Id,
    lease_ms: u32,
    limits: LeaseLimits,
    label: Option<Label>,
    /// The long poll waiting for this waiter's grant; `None` while detached.
    notify: Option<oneshot::Sender<Grant>>,
    /// When it was detached (µs since origin).
    detached_at: u64,
    /// When it joined the line (µs since origin).
    queued_at: u64,
    /// When the long poll now attached began (µs since origin).
    poll_started: u64,
}

/// What an acquire asked of its lease beyond its length.
#[derive(Debug, Clone, Copy)]
struct LeaseLimits {
    /// Longest hold from the grant, µs (`u64::MAX` for none).
    max_hold: u64,
    /// Lock-delay, ms (0 for none).
    lock_delay_ms: u32,
}

impl LeaseLimits {
    fn of(spec: &AcquireSpec) -> LeaseLimits {
        LeaseLimits {
            max_hold: spec.max_hold.map_or(u64::MAX, micros),
            // The HTTP layer bounds the delay to the server's maximum, at most 24 h.
            lock_delay_ms: spec
                .lock_delay
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        }
    }
}

impl Holder {
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
        self.deadline = (now + u64::from(self.lease_ms) * 1000).min(self.hold_until);
    }

    /// Why the lease ends if it ends at its deadline.
    fn ends_by(&self) -> Ended {
        if self.deadline >= self.hold_until {
            Ended::MaxHold
        } else {
            Ended::Expired
        }
    }
}

impl Ended {
    fn tag(self) -> u8 {
        match self {
            Ended::Expired => 1,
            Ended::MaxHold => 2,
            Ended::Revoked => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Ended> {
        match tag {
            1 => Some(Ended::Expired),
            2 => Some(Ended::MaxHold),
            3 => Some(Ended::Revoked),
            _ => None,
        }
    }
}

impl LockState {
    fn is_empty(&self) -> bool {
        self.holder.is_none() && self.queue.is_none()
    }

    fn waiters(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.waiters.len())
    }
}

type ShardHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A holder's label, boxed twice so that the many locks without one pay a thin pointer
/// (8 bytes) rather than a `String` (24).
#[allow(clippy::box_collection)]
type Label = Box<String>;

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A request id as events show it: its first half.
fn short(id: &Id) -> String {
    id.to_string()[..16].to_owned()
}

fn project_of(key: &[u8]) -> ProjectId {
    ProjectId::from_be_bytes([key[0], key[1], key[2], key[3]])
}

fn lock_key(project: ProjectId, name: &str) -> Box<[u8]> {
    let mut key = Vec::with_capacity(4 + name.len());
    key.extend_from_slice(&project.to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key.into_boxed_slice()
}

impl MemoryStore {
    /// Opens the store (reading its state file, if configured) and starts its shard tasks on
    /// the current runtime.
    pub fn open(config: MemoryConfig) -> std::io::Result<MemoryStore> {
        let token_reserve = micros(config.token_reserve).max(1);
        let (state_file, boot) = match &config.state_file {
            Some(path) => {
                let (file, boot) = StateFile::open(
                    path,
                    config.crash_hold_back,
                    token_reserve,
                    config.state_file_inline_writes,
                )?;
                (Some(file), boot)
            }
            None => (
                None,
                Boot {
                    first_token: wall_micros(SystemTime::now()),
                    hold_back: Duration::ZERO,
                    long_leases: Vec::new(),
                },
            ),
        };
        if !boot.hold_back.is_zero() {
            tracing::warn!(
                hold_back = ?boot.hold_back,
                "restarted without knowing which leases are still held: no lock is granted until they could have expired"
            );
        }
        let mut lock_hold_backs = HashMap::new();
        for long in boot.long_leases {
            tracing::warn!(
                lock = %long.lock,
                hold_back = ?Duration::from_millis(long.lease_ms),
                "a long lease from before the restart may still be held: this lock is not granted until it could have expired"
            );
            let until = long.lease_ms.saturating_mul(1000);
            let entry = lock_hold_backs
                .entry((long.project, long.lock))
                .or_insert(0);
            *entry = until.max(*entry);
        }
        let shards = (0..config.shards.max(1))
            .map(|_| Shard {
                state: Mutex::new(ShardState::default()),
                wake: Arc::new(Notify::new()),
                tombstones: Mutex::new(Tombstones::default()),
                ended: Mutex::new(Tombstones::default()),
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            hasher: ShardHasher::default(),
            origin: Instant::now(),
            origin_wall: SystemTime::now(),
            project_locks: (0..config.max_projects)
                .map(|_| AtomicU32::new(0))
                .collect(),
            hold_back_until: micros(boot.hold_back),
            lock_hold_backs,
            tokens: Tokens::new(boot.first_token, token_reserve),
            state_file,
            max_lease_noted: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            held: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            config,
        });
        for index in 0..shared.shards.len() {
            tokio::spawn(shard_task(
                Arc::downgrade(&shared),
                index,
                shared.shards[index].wake.clone(),
            ));
        }
        Ok(MemoryStore { shared })
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        for shard in self.shared.shards.iter() {
            shard.wake.notify_one();
        }
    }
}

/// Fires expiry timers and sweeps one shard, until the store is dropped.
async fn shard_task(shared: Weak<Shared>, index: usize, wake: Arc<Notify>) {
    // Spread the shards' sweeps over the interval.
    let mut next_sweep = 0u64;
    // Waiters queued during a hold-back are granted by a sweep right when it ends.
    let mut hold_back_over = false;
    loop {
        let next_wake = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if next_sweep == 0 {
                let n = shared.shards.len() as u64;
                next_sweep =
                    shared.now() + micros(shared.config.sweep_interval) * (index as u64 + 1) / n;
            }
            // The clock is read under the lock, so that `now` is never earlier than a poll
            // that registered before (a grant counted from it would end too early).
            let mut state = shared.shard(index);
            let now = shared.now();
            shared.fire_timers(&mut state, now);
            let hold_back_ends = !hold_back_over && now >= shared.hold_back_until;
            hold_back_over |= hold_back_ends;
            if now >= next_sweep || hold_back_ends {
                shared.sweep(&mut state, now);
                next_sweep = now + micros(shared.config.sweep_interval);
            }
            let mut at = next_sweep;
            if !hold_back_over {
                at = at.min(shared.hold_back_until);
            }
            if let Some(&(deadline, _)) = state.timers.keys().next() {
                at = at.min(deadline);
            }
            shared.origin + Duration::from_micros(at)
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next_wake) => {}
            _ = wake.notified() => {}
        }
    }
}

impl Shared {
    fn now(&self) -> u64 {
        micros(self.origin.elapsed())
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// Locks a shard. When the guard drops, the shard's task is woken if an earlier expiry
    /// timer was scheduled meanwhile.
    fn shard(&self, index: usize) -> Locked<'_> {
        let shard = &self.shards[index];
        let state = shard.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = state.timers.keys().next().copied();
        Locked {
            state,
            first,
            wake: &shard.wake,
        }
    }

    fn next_token(&self) -> Option<u64> {
        self.tokens.next(self.state_file.as_ref())
    }

    /// Makes sure the next token is durably reserved, waiting for the reservation's write if
    /// it is not: while the state file cannot be written, acquires are refused (`503`).
    async fn tokens_ready(&self) -> Result<(), StoreError> {
        let Some(file) = &self.state_file else {
            return Ok(());
        };
        let (next, covered) = self.tokens.candidate(Some(file));
        if covered {
            return Ok(());
        }
        let generation = file.reserve_tokens(next.saturating_add(self.tokens.reserve));
        file.durable(generation).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot reserve fencing tokens, so no lock is granted: {e}"
            ))
        })
    }

    /// Records a lease longer than the crash hold-back bound for its lock, under the shard
    /// lock (so that the lock cannot be dropped, and its record forgotten, in between).
    /// Returns the generation to await before the lease may be answered.
    fn record_long_lease(&self, spec: &AcquireSpec, key: &[u8]) -> Option<Generation> {
        let file = self.state_file.as_ref()?;
        if !file.is_long(spec.lease) {
            return None;
        }
        Some(file.record_long_lease(
            key,
            LongLease {
                project: spec.project.name.to_string(),
                lock: spec.name.clone(),
                lease_ms: spec.lease.as_millis() as u64,
            },
        ))
    }

    /// When the lock may be granted again after a restart (µs since origin), if not yet.
    fn held_back(&self, project: &Project, name: &str, now: u64) -> Option<u64> {
        let lock = if self.lock_hold_backs.is_empty() {
            0
        } else {
            self.lock_hold_backs
                .get(&(project.name.to_string(), name.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        let until = lock.max(self.hold_back_until);
        (until > now).then_some(until)
    }

    /// Remembers that the acquire `request_id` on lock `key` has ended.
    fn tombstone(&self, key: &[u8], request_id: Id, now: u64) {
        let ttl = micros(self.config.tombstone_ttl);
        let (fingerprint, mut tombstones) = self.tombstones_of(key);
        tombstones.insert(request_id, fingerprint, now, ttl);
    }

    /// Whether the acquire `request_id` on lock `key` has ended.
    fn is_tombstoned(&self, key: &[u8], request_id: &Id, now: u64) -> bool {
        let (fingerprint, tombstones) = self.tombstones_of(key);
        tombstones.contains(request_id, fingerprint, now)
    }

    /// The tombstones of `key`'s shard, and the key's fingerprint in them.
    fn tombstones_of(&self, key: &[u8]) -> (u64, MutexGuard<'_, Tombstones>) {
        self.tombs_of(key, |shard| &shard.tombstones)
    }

    /// The tombstones `pick` chooses of `key`'s shard, and the key's fingerprint in them.
    fn tombs_of(
        &self,
        key: &[u8],
        pick: impl FnOnce(&Shard) -> &Mutex<Tombstones>,
    ) -> (u64, MutexGuard<'_, Tombstones>) {
        let fingerprint = self.hasher.hash_one(key);
        let shard = &self.shards[(fingerprint % self.shards.len() as u64) as usize];
        let tombstones = pick(shard).lock().unwrap_or_else(|p| p.into_inner());
        (fingerprint, tombstones)
    }

    /// Remembers why a lease ended without a release, for at least its length (a holder
    /// that renews on time learns why), and at least the tombstone TTL.
    fn lease_ended(&self, key: &[u8], holder: &Holder, why: Ended, now: u64) {
        let ttl = micros(self.config.tombstone_ttl).max(u64::from(holder.lease_ms) * 1000);
        let (fingerprint, mut ended) = self.tombs_of(key, |shard| &shard.ended);
        ended.insert_tagged(holder.lease_id, fingerprint, now, ttl, why.tag());
    }

    /// Why the lease `lease_id` of lock `key` ended, if that is remembered.
    fn ended_why(&self, key: &[u8], lease_id: &Id, now: u64) -> Option<Ended> {
        let (fingerprint, ended) = self.tombs_of(key, |shard| &shard.ended);
        ended
            .tag(lease_id, fingerprint, now)
            .and_then(Ended::from_tag)
    }

    /// Starts a lock-delay of `delay_ms` from `ended_at` (µs since origin), if it has not
    /// run out by `now`: no grant before it does. Kept in the lock's queue, which stays
    /// while the delay runs even with nobody waiting (`settle`).
    fn delay_grants(&self, lock: &mut LockState, ended_at: u64, delay_ms: u32, now: u64) {
        let until = ended_at.saturating_add(u64::from(delay_ms) * 1000);
        if delay_ms == 0 || until <= now {
            return;
        }
        let queue = lock.queue.get_or_insert_with(Default::default);
        queue.held_back_until = queue.held_back_until.max(until);
    }

    fn new_lease_id() -> Id {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Id(bytes)
    }

    /// Makes sure a restart would wait out a lease this long (up to the crash hold-back
    /// bound), before it is granted.
    async fn note_lease(&self, lease_ms: u32) -> Result<(), StoreError> {
        let ms = u64::from(lease_ms);
        let lease = Duration::from_millis(ms);
        if ms <= self.max_lease_noted.load(Ordering::Relaxed)
            // Recorded with its lock instead (`record_long_lease`).
            || self.state_file.as_ref().is_some_and(|f| f.is_long(lease))
        {
            return Ok(());
        }
        if let Some(file) = &self.state_file
            && let Some(generation) = file.note_lease(lease)
        {
            file.durable(generation).await.map_err(|e| {
                StoreError::Unavailable(format!("cannot record the lease length: {e}"))
            })?;
        }
        self.max_lease_noted.fetch_max(ms, Ordering::Relaxed);
        Ok(())
    }

    /// Brings a lock up to date: expires an overdue holder, grants to waiters while the lock
    /// is free, and keeps the holder's expiry timer iff someone waits.
    fn settle(
        &self,
        timers: &mut BTreeMap<(u64, u64), Box<[u8]>>,
        key: &[u8],
        lock: &mut LockState,
        now: u64,
    ) {
        if let Some(holder) = lock.holder.as_ref().filter(|h| h.deadline <= now) {
            let (token, deadline) = (holder.token.get(), holder.deadline);
            if holder.answered {
                self.tombstone(key, holder.request_id, now);
            }
            self.lease_ended(key, holder, holder.ends_by(), now);
            let delay_ms = holder.lock_delay_ms;
            self.emit(key, now, || EventKind::Expired {
                token,
                deadline_us: self.unix_us(deadline),
            });
            self.drop_holder(timers, lock);
            // The delay counts from when the lease ended, not from when that was noticed.
            self.delay_grants(lock, deadline, delay_ms, now);
            self.expirations.fetch_add(1, Ordering::Relaxed);
        }
        let held_back = now < self.hold_back_until
            || lock.queue.as_ref().is_some_and(|q| now < q.held_back_until);
        if lock.holder.is_none() && !held_back {
            self.grant_next(key, lock, now);
        }
        let delay_runs = lock.queue.as_ref().is_some_and(|q| now < q.held_back_until);
        if lock.waiters() == 0 && !delay_runs {
            if let Some(queue) = lock.queue.take()
                && let Some(timer) = queue.timer
            {
                timers.remove(&timer);
            }
        } else if let (Some(holder), Some(queue)) = (&lock.holder, &mut lock.queue)
            && queue.timer.is_none()
        {
            let timer = (holder.deadline, holder.token.get());
            timers.insert(timer, key.into());
            queue.timer = Some(timer);
        } else if let (None, Some(queue)) = (&lock.holder, &mut lock.queue)
            && queue.timer.is_none()
            && delay_runs
        {
            // Wake when the delay (or a restart's hold-back) ends: waiters are granted then,
            // or the lock is dropped. The key's hash tells apart locks whose delays end in
            // the same microsecond (a token would collide with no timer's: those are µs
            // since 2025, this is random).
            let timer = (queue.held_back_until, self.hasher.hash_one(key));
            timers.insert(timer, key.into());
            queue.timer = Some(timer);
        }
    }

    fn drop_holder(&self, timers: &mut BTreeMap<(u64, u64), Box<[u8]>>, lock: &mut LockState) {
        if lock.holder.take().is_some() {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(queue) = &mut lock.queue
            && let Some(timer) = queue.timer.take()
        {
            timers.remove(&timer);
        }
    }

    /// Gives a free lock to the first waiter in line.
    fn grant_next(&self, key: &[u8], lock: &mut LockState, now: u64) {
        let Some(queue) = &mut lock.queue else {
            return;
        };
        if queue.waiters.is_empty() {
            return;
        }
        // No token, no grant: the waiters keep their places until the state file takes the
        // next reservation (a sweep tries again).
        let Some(token) = self.next_token() else {
            return;
        };
        let Some(waiter) = queue.waiters.pop_front() else {
            return;
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let mut holder = self.new_holder(
            token,
            waiter.request_id,
            waiter.lease_ms,
            waiter.limits,
            waiter.label,
            now,
        );
        let grant = holder.grant(waiter.poll_started, now);
        let delivered = waiter.notify.is_some_and(|tx| tx.send(grant).is_ok());
        holder.answered = delivered;
        if !delivered {
            // Nobody is listening right now: keep the grant for a returning poll only briefly.
            holder.deadline = holder.deadline.min(now + micros(self.config.grace));
        }
        self.emit_granted(key, &holder, now);
        lock.holder = Some(holder);
    }

    fn emit_granted(&self, key: &[u8], holder: &Holder, now: u64) {
        self.emit(key, now, || EventKind::Granted {
            token: holder.token.get(),
            request: short(&holder.request_id),
            deadline_us: self.unix_us(holder.deadline),
            shared: false,
            permits: None,
        });
    }

    fn emit_deadline(&self, key: &[u8], holder: &Holder, now: u64) {
        self.emit(key, now, || EventKind::Deadline {
            token: holder.token.get(),
            deadline_us: self.unix_us(holder.deadline),
        });
    }

    /// Sends an event to the audit trail and the console, where configured.
    fn emit(&self, key: &[u8], now: u64, kind: impl FnOnce() -> EventKind) {
        let (trail, console) = (&self.config.events, &self.config.console_events);
        if trail.is_none() && console.is_none() {
            return;
        }
        let event = StoreEvent {
            at_us: self.unix_us(now),
            project: project_of(key).to_string(),
            lock: String::from_utf8_lossy(&key[4..]).into_owned(),
            kind: kind(),
        };
        if let Some(console) = console {
            let _ = console.send(event.clone());
        }
        if let Some(trail) = trail {
            let _ = trail.send(event);
        }
    }

    /// Unix microseconds of a store instant.
    fn unix_us(&self, micros_since_origin: u64) -> u64 {
        let wall = self.origin_wall + Duration::from_micros(micros_since_origin);
        wall.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64
    }

    fn new_holder(
        &self,
        token: u64,
        request_id: Id,
        lease_ms: u32,
        limits: LeaseLimits,
        label: Option<Label>,
        now: u64,
    ) -> Holder {
        self.held.fetch_add(1, Ordering::Relaxed);
        let hold_until = now.saturating_add(limits.max_hold);
        Holder {
            token: NonZeroU64::new(token).unwrap_or(NonZeroU64::MIN),
            deadline: (now + u64::from(lease_ms) * 1000).min(hold_until),
            acquired: now,
            lease_ms,
            hold_until,
            lock_delay_ms: limits.lock_delay_ms,
            answered: true,
            lease_id: Shared::new_lease_id(),
            request_id,
            label,
        }
    }

    fn holder_view(&self, holder: &Holder, now: u64) -> HolderView {
        HolderView {
            fencing_token: holder.token.get(),
            acquired_at: self.origin_wall + Duration::from_micros(holder.acquired),
            expires_in: Duration::from_micros(holder.deadline.saturating_sub(now)),
            label: holder.label.as_deref().cloned(),
            value: None,
        }
    }

    fn view(&self, lock: &LockState, held_back: Option<u64>, now: u64) -> LockView {
        let first = lock.queue.as_ref().and_then(|q| q.waiters.front());
        // A lock-delay (or a restart's hold-back) the lock's queue keeps.
        let delayed = lock
            .queue
            .as_ref()
            .map(|q| q.held_back_until)
            .filter(|&until| until > now);
        let held_back = held_back.max(delayed);
        LockView {
            holders: lock
                .holder
                .iter()
                .map(|h| self.holder_view(h, now))
                .collect(),
            mode: Mode::Exclusive,
            waiters: lock.waiters() as u64,
            oldest_wait: first.map(|w| Duration::from_micros(now.saturating_sub(w.queued_at))),
            held_back_until: held_back
                .filter(|_| lock.holder.is_none())
                .map(|until| self.origin_wall + Duration::from_micros(until)),
        }
    }

    /// A page of a project's locks: one pass over every shard (each locked in turn), keeping
    /// the `limit + 1` smallest names that qualify.
    fn list(&self, project: &Project, spec: &ListSpec) -> ListPage {
        let limit = spec.limit.max(1);
        let start = lock_key(project.id, &spec.prefix);
        let after = spec.after.as_deref().map(|a| lock_key(project.id, a));
        let mut found: BTreeMap<Box<[u8]>, LockView> = BTreeMap::new();
        for index in 0..self.shards.len() {
            let state = self.shard(index);
            let now = self.now();
            for (key, lock) in &state.locks {
                if !key.starts_with(&start)
                    || after.as_ref().is_some_and(|a| key <= a)
                    || (found.len() > limit && found.last_key_value().is_some_and(|(l, _)| key > l))
                {
                    continue;
                }
                let name = String::from_utf8_lossy(&key[4..]);
                let mut view = self.view(lock, self.held_back(project, &name, now), now);
                // An expired holder nobody has noticed yet holds nothing.
                if lock.holder.as_ref().is_some_and(|h| h.deadline <= now) {
                    view.holders.clear();
                }
                if view.holders.is_empty() && view.waiters == 0 {
                    continue;
                }
                found.insert(key.clone(), view);
                if found.len() > limit + 1 {
                    found.pop_last();
                }
            }
        }
        let more = found.len() > limit;
        if more {
            found.pop_last();
        }
        let locks: Vec<(String, LockView)> = found
            .into_iter()
            .map(|(key, view)| (String::from_utf8_lossy(&key[4..]).into_owned(), view))
            .collect();
        let next = more
            .then(|| locks.last().map(|(name, _)| name.clone()))
            .flatten();
        ListPage { locks, next }
    }

    /// Refuses a new lock beyond the project's quota.
    fn check_lock_quota(&self, project: ProjectId, quota: Quota) -> Result<(), StoreError> {
        let Some(max) = quota.max_locks else {
            return Ok(());
        };
        let count = self
            .project_locks
            .get(project as usize)
            .map_or(0, |c| u64::from(c.load(Ordering::Relaxed)));
        if count >= max {
            return Err(StoreError::Full(format!(
                "the project has {count} locks held or waited for, the most allowed"
            )));
        }
        Ok(())
    }

    /// Removes an empty lock from its shard, counting it off its project.
    fn remove_lock(&self, locks: &mut HashMap<Box<[u8]>, LockState>, key: &[u8]) {
        if locks.remove(key).is_some() {
            self.lock_gone(key);
        }
    }

    /// Accounts for a lock that left the table: nothing runs under it any more.
    fn lock_gone(&self, key: &[u8]) {
        self.count_lock(key, false);
        if let Some(file) = &self.state_file {
            file.forget_long_lease(key);
        }
    }

    fn count_lock(&self, key: &[u8], added: bool) {
        if let Some(count) = self.project_locks.get(project_of(key) as usize) {
            if added {
                count.fetch_add(1, Ordering::Relaxed);
            } else {
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn fire_timers(&self, state: &mut ShardState, now: u64) {
        let ShardState { locks, timers } = state;
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (timer, key) = entry.remove_entry();
            let Some(lock) = locks.get_mut(&key) else {
                continue;
            };
            if let Some(queue) = &mut lock.queue
                && queue.timer == Some(timer)
            {
                queue.timer = None;
            }
            self.settle(timers, &key, lock, now);
            if lock.is_empty() {
                self.remove_lock(locks, &key);
            }
        }
    }

    /// Drops what nobody will come back for: overdue holders without waiters, and detached
    /// waiters past their grace period.
    fn sweep(&self, state: &mut ShardState, now: u64) {
        let grace = micros(self.config.grace);
        let ShardState { locks, timers } = state;
        locks.retain(|key, lock| {
            if let Some(queue) = &mut lock.queue {
                queue.waiters.retain(|w| {
                    let stays = w.notify.is_some() || now < w.detached_at + grace;
                    if !stays {
                        self.waiting.fetch_sub(1, Ordering::Relaxed);
                        self.emit(key, now, || EventKind::WaiterLeft {
                            request: short(&w.request_id),
                            reason: "abandoned".into(),
                        });
                    }
                    stays
                });
            }
            self.settle(timers, key, lock, now);
            if lock.is_empty() {
                self.lock_gone(key);
            }
            !lock.is_empty()
        });
        // Give back the table's memory after a burst: idle locks should cost nothing.
        if locks.capacity() > 4 * locks.len() + 1024 {
            locks.shrink_to(2 * locks.len());
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            held: self.held.load(Ordering::Relaxed),
            waiters: self.waiting.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            state_file_writes: self.state_file.as_ref().map_or(0, StateFile::writes),
        }
    }
}

struct Locked<'a> {
    state: MutexGuard<'a, ShardState>,
    first: Option<(u64, u64)>,
    wake: &'a Notify,
}

impl std::ops::Deref for Locked<'_> {
    type Target = ShardState;
    fn deref(&self) -> &ShardState {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut ShardState {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let first = self.state.timers.keys().next().copied();
        if first.is_some() && (self.first.is_none() || first < self.first) {
            self.wake.notify_one();
        }
    }
}

/// The waiting half of an acquire. Dropping it (client gone) detaches the waiter, and hands
/// back a grant that was delivered but never answered.
struct PendingWait<'a> {
    shared: &'a Shared,
    shard: usize,
    key: Box<[u8]>,
    request_id: Id,
    rx: Option<oneshot::Receiver<Grant>>,
    /// When the store began this call (µs since origin).
    started: u64,
}

impl PendingWait<'_> {
    /// Ends the wait after its time ran out: a grant that raced wins, else the waiter leaves
    /// the line (`timed_out`) or detaches to wait for the next poll.
    fn finish(mut self, timed_out: bool) -> AcquireOutcome {
        self.rx = None;
        let now = self.shared.now();
        let mut state = self.shared.shard(self.shard);
        let ShardState { locks, timers } = &mut *state;
        let Some(lock) = locks.get_mut(&self.key) else {
            return AcquireOutcome::TimedOut { holder: None };
        };
        self.shared.settle(timers, &self.key, lock, now);
        let outcome = if let Some(holder) = lock
            .holder
            .as_mut()
            .filter(|h| h.request_id == self.request_id)
        {
            holder.extend(now);
            holder.answered = true;
            self.shared.emit_deadline(&self.key, holder, now);
            AcquireOutcome::Granted(holder.grant(self.started, now))
        } else if let Some(queue) = &mut lock.queue
            && let Some(pos) = queue.waiters.position(&self.request_id)
        {
            if timed_out {
                queue.waiters.remove(&self.request_id);
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                self.shared.tombstone(&self.key, self.request_id, now);
                self.shared.emit(&self.key, now, || EventKind::WaiterLeft {
                    request: short(&self.request_id),
                    reason: "timeout".into(),
                });
                AcquireOutcome::TimedOut {
                    holder: lock
                        .holder
                        .as_ref()
                        .map(|h| self.shared.holder_view(h, now)),
                }
            } else {
                if let Some(waiter) = queue.waiters.get_mut(&self.request_id)
                    && waiter.notify.as_ref().is_some_and(|tx| tx.is_closed())
                {
                    waiter.notify = None;
                    waiter.detached_at = now;
                }
                AcquireOutcome::StillWaiting { position: pos }
            }
        } else {
            // Withdrawn meanwhile (cancelled, or gone past its grace period).
            AcquireOutcome::TimedOut {
                holder: lock
                    .holder
                    .as_ref()
                    .map(|h| self.shared.holder_view(h, now)),
            }
        };
        self.shared.settle(timers, &self.key, lock, now);
        if lock.is_empty() {
            self.shared.remove_lock(locks, &self.key);
        }
        outcome
    }
}

impl Drop for PendingWait<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let delivered = rx.try_recv().ok();
        drop(rx);
        let now = self.shared.now();
        let mut state = self.shared.shard(self.shard);
        let ShardState { locks, timers } = &mut *state;
        let Some(lock) = locks.get_mut(&self.key) else {
            return;
        };
        if let Some(grant) = delivered {
            // Granted, but the answer never left: keep it for a retry only briefly.
            if let Some(holder) = lock
                .holder
                .as_mut()
                .filter(|h| h.token.get() == grant.fencing_token)
            {
                holder.deadline = holder.deadline.min(now + micros(self.shared.config.grace));
                holder.answered = false;
                self.shared.emit_deadline(&self.key, holder, now);
                // Re-arm the expiry timer for the earlier deadline.
                if let Some(queue) = &mut lock.queue
                    && let Some(timer) = queue.timer.take()
                {
                    timers.remove(&timer);
                }
                self.shared.settle(timers, &self.key, lock, now);
            }
        } else if let Some(queue) = &mut lock.queue
            && let Some(waiter) = queue.waiters.get_mut(&self.request_id)
            && waiter.notify.as_ref().is_some_and(|tx| tx.is_closed())
        {
            waiter.notify = None;
            waiter.detached_at = now;
        }
    }
}

enum Step {
    Done(AcquireOutcome),
    /// Wait on the receiver; the lease clock of a grant is compared to the second field.
    Wait(oneshot::Receiver<Grant>, u64),
}

impl MemoryStore {
    fn begin_acquire(
        &self,
        spec: &AcquireSpec,
        shard: usize,
        key: &[u8],
    ) -> Result<(Step, Option<Generation>), StoreError> {
        let shared = &*self.shared;
        // The HTTP layer bounds leases to 24 h, far below u32::MAX ms.
        let lease_ms = u32::try_from(spec.lease.as_millis()).unwrap_or(u32::MAX);
        // Under the lock: see the timer task.
        let mut state = shared.shard(shard);
        let now = shared.now();
        if shared.is_tombstoned(key, &spec.request_id, now) {
            // A late attempt of an acquire that has ended: it must create nothing.
            return Ok((Step::Done(AcquireOutcome::Ended), None));
        }
        let ShardState { locks, timers } = &mut *state;
        if !locks.contains_key(key) {
            shared.check_lock_quota(spec.project.id, spec.quota)?;
            locks.insert(key.into(), LockState::default());
            shared.count_lock(key, true);
        }
        let lock = locks.get_mut(key).expect("present: inserted above");
        shared.settle(timers, key, lock, now);
        let record = shared.record_long_lease(spec, key);

        // The same request again: its grant, or its place in line.
        if let Some(holder) = lock
            .holder
            .as_mut()
            .filter(|h| h.request_id == spec.request_id)
        {
            holder.extend(now);
            holder.answered = true;
            shared.emit_deadline(key, holder, now);
            let grant = holder.grant(now, now);
            return Ok((Step::Done(AcquireOutcome::Granted(grant)), record));
        }
        let (tx, rx) = oneshot::channel();
        if let Some(queue) = &mut lock.queue
            && let Some(waiter) = queue.waiters.get_mut(&spec.request_id)
        {
            waiter.notify = Some(tx);
            waiter.poll_started = now;
            return Ok((Step::Wait(rx, now), record));
        }

        let label = spec.label.clone().map(Box::new);
        let held_back = shared.held_back(&spec.project, &spec.name, now);
        if lock.holder.is_none() && lock.queue.is_none() && held_back.is_none() {
            let Some(token) = shared.next_token() else {
                if lock.is_empty() {
                    shared.remove_lock(locks, key);
                }
                return Err(StoreError::Unavailable(
                    "no fencing token is reserved in the state file yet; retry".into(),
                ));
            };
            let holder = shared.new_holder(
                token,
                spec.request_id,
                lease_ms,
                LeaseLimits::of(spec),
                label,
                now,
            );
            shared.emit_granted(key, &holder, now);
            let grant = holder.grant(now, now);
            lock.holder = Some(holder);
            return Ok((Step::Done(AcquireOutcome::Granted(grant)), record));
        }
        let max_waiters = spec
            .quota
            .max_waiters_per_lock
            .map_or(shared.config.max_waiters_per_lock, |q| {
                (q as usize).min(shared.config.max_waiters_per_lock)
            });
        let refusal = if spec.wait == Some(Duration::ZERO) {
            Ok(AcquireOutcome::TimedOut {
                holder: lock.holder.as_ref().map(|h| shared.holder_view(h, now)),
            })
        } else if lock.waiters() >= max_waiters {
            Err(StoreError::Full(format!(
                "lock already has {} waiters, the most allowed",
                lock.waiters()
            )))
        } else {
            let queue = lock.queue.get_or_insert_with(Default::default);
            queue.waiters.push_back(
                spec.request_id,
                Waiter {
                    request_id: spec.request_id,
                    lease_ms,
                    limits: LeaseLimits::of(spec),
                    label,
                    notify: Some(tx),
                    detached_at: 0,
                    queued_at: now,
                    poll_started: now,
                },
            );
            if let Some(until) = held_back.filter(|&until| until > queue.held_back_until) {
                // Wake the shard when the lock's own hold-back ends (the global one has
                // its own wake-up in the shard task).
                queue.held_back_until = until;
                if lock.holder.is_none() && queue.timer.is_none() {
                    timers.insert((until, 0), key.into());
                    queue.timer = Some((until, 0));
                }
            }
            shared.waiting.fetch_add(1, Ordering::Relaxed);
            shared.settle(timers, key, lock, now);
            return Ok((Step::Wait(rx, now), record));
        };
        if lock.is_empty() {
            shared.remove_lock(locks, key);
        }
        refusal.map(|outcome| (Step::Done(outcome), None))
    }

    /// Withdraws the waiter with this request id, or drops the grant made to it; true if
    /// there was one.
    fn withdraw(&self, project: ProjectId, name: &str, request_id: Id) -> bool {
        self.on_lock(project, name, |shared, key, lock, timers, now| {
            if let Some(queue) = &mut lock.queue
                && queue.waiters.remove(&request_id).is_some()
            {
                shared.waiting.fetch_sub(1, Ordering::Relaxed);
                shared.emit(key, now, || EventKind::Cancelled {
                    token: None,
                    request: short(&request_id),
                });
                true
            } else if let Some(holder) = lock.holder.as_ref().filter(|h| h.request_id == request_id)
            {
                let token = holder.token.get();
                shared.emit(key, now, || EventKind::Cancelled {
                    token: Some(token),
                    request: short(&request_id),
                });
                shared.drop_holder(timers, lock);
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }

    /// Runs `f` on the lock's state (if it exists), then settles and drops it if empty.
    fn on_lock<T>(
        &self,
        project: ProjectId,
        name: &str,
        f: impl FnOnce(&Shared, &[u8], &mut LockState, &mut BTreeMap<(u64, u64), Box<[u8]>>, u64) -> T,
    ) -> Option<T> {
        let shared = &*self.shared;
        let key = lock_key(project, name);
        let shard = shared.shard_of(&key);
        // Under the lock: see the timer task.
        let mut state = shared.shard(shard);
        let now = shared.now();
        let ShardState { locks, timers } = &mut *state;
        let lock = locks.get_mut(&key)?;
        shared.settle(timers, &key, lock, now);
        let out = f(shared, &key, lock, timers, now);
        shared.settle(timers, &key, lock, now);
        if lock.is_empty() {
            shared.remove_lock(locks, &key);
        }
        Some(out)
    }
}

impl LockStore for MemoryStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, AcquireOutcome> {
        Box::pin(async move {
            // The wait and the poll count from the request's arrival, also when the state
            // file kept it a moment.
            let arrived = Instant::now();
            let key = lock_key(spec.project.id, &spec.name);
            let shard = self.shared.shard_of(&key);
            // Before the shard lock: these may wait for the state file. Tokens last, as
            // close to the grant as can be.
            let lease_ms = u32::try_from(spec.lease.as_millis()).unwrap_or(u32::MAX);
            self.shared.note_lease(lease_ms).await?;
            self.shared.tokens_ready().await?;
            let (step, record) = self.begin_acquire(&spec, shard, &key)?;
            if let (Some(generation), Some(file)) = (record, &self.shared.state_file)
                && let Err(e) = file.durable(generation).await
            {
                // The long lease's record did not reach the disk: a crash could forget it,
                // so nothing may be answered. The client retries with the same request id.
                self.withdraw(spec.project.id, &spec.name, spec.request_id);
                return Err(StoreError::Unavailable(format!(
                    "cannot record the long lease: {e}"
                )));
            }
            let (rx, started) = match step {
                Step::Done(outcome) => return Ok(outcome),
                Step::Wait(rx, started) => (rx, started),
            };
            let mut pending = PendingWait {
                shared: &self.shared,
                shard,
                key,
                request_id: spec.request_id,
                rx: Some(rx),
                started,
            };
            let poll = spec.wait.map_or(spec.poll, |w| w.min(spec.poll));
            let timed_out = spec.wait.is_some_and(|w| w <= spec.poll);
            let rx = pending.rx.as_mut().expect("set above");
            match tokio::time::timeout_at(arrived + poll, rx).await {
                Ok(Ok(grant)) => {
                    pending.rx = None;
                    Ok(AcquireOutcome::Granted(grant))
                }
                // Superseded by a newer poll of the same request: that one answers the grant.
                Ok(Err(_)) => Ok(pending.finish(false)),
                Err(_) => Ok(pending.finish(timed_out)),
            }
        })
    }

    fn renew(&self, project: &Project, leases: Vec<(String, Id)>) -> StoreFuture<'_, Vec<Renewal>> {
        let shared = &*self.shared;
        let renewed = leases
            .iter()
            .map(|(name, lease_id)| {
                self.on_lock(project.id, name, |shared, key, lock, _, now| {
                    let holder = lock.holder.as_mut().filter(|h| h.lease_id == *lease_id)?;
                    holder.extend(now);
                    if holder.deadline < now + 1000 {
                        // Less than a millisecond left before its max_hold: no lease to
                        // report, so it ends now (`on_lock` settles it), for that reason.
                        holder.hold_until = now;
                        holder.deadline = now;
                    }
                    shared.emit_deadline(key, holder, now);
                    let left = holder.deadline.saturating_sub(now) / 1000;
                    Some((left > 0).then(|| Duration::from_millis(left)))
                })
                .flatten()
                .map_or_else(
                    || {
                        let key = lock_key(project.id, name);
                        Renewal::Gone(shared.ended_why(&key, lease_id, shared.now()))
                    },
                    |left| left.map_or(Renewal::Gone(Some(Ended::MaxHold)), Renewal::Renewed),
                )
            })
            .collect();
        Box::pin(async move { Ok(renewed) })
    }

    fn revoke(&self, project: &Project, name: &str) -> StoreFuture<'_, Vec<u64>> {
        let token = self
            .on_lock(project.id, name, |shared, key, lock, timers, now| {
                let holder = lock.holder.as_ref()?;
                let token = holder.token.get();
                // A late re-poll of its acquire must not find the grant again.
                shared.tombstone(key, holder.request_id, now);
                shared.lease_ended(key, holder, Ended::Revoked, now);
                let delay_ms = holder.lock_delay_ms;
                shared.emit(key, now, || EventKind::Revoked { token });
                shared.drop_holder(timers, lock);
                // `on_lock` settles next: the next waiter is granted unless this delays it.
                shared.delay_grants(lock, now, delay_ms, now);
                Some(token)
            })
            .flatten();
        Box::pin(async move { Ok(token.into_iter().collect()) })
    }

    fn release(&self, project: &Project, name: &str, lease_id: Id) -> StoreFuture<'_, Release> {
        let outcome = self
            .on_lock(project.id, name, |shared, key, lock, timers, now| {
                if let Some(holder) = lock.holder.as_ref().filter(|h| h.lease_id == lease_id) {
                    let token = holder.token.get();
                    shared.tombstone(key, holder.request_id, now);
                    shared.emit(key, now, || EventKind::Released { token });
                    shared.drop_holder(timers, lock);
                    Release::Released
                } else {
                    Release::Gone
                }
            })
            .unwrap_or_else(|| {
                // The lock went with the lease: a lease that ended without a release (still
                // remembered) is `Gone` rather than a lock that never was.
                let shared = &*self.shared;
                let key = lock_key(project.id, name);
                match shared.ended_why(&key, &lease_id, shared.now()) {
                    Some(_) => Release::Gone,
                    None => Release::NoSuchLock,
                }
            });
        Box::pin(async move { Ok(outcome) })
    }

    fn cancel(&self, project: &Project, name: &str, request_id: Id) -> StoreFuture<'_, bool> {
        let cancelled = self.withdraw(project.id, name, request_id);
        // Also when nothing matched: the cancel may have overtaken its acquire.
        let shared = &*self.shared;
        shared.tombstone(&lock_key(project.id, name), request_id, shared.now());
        Box::pin(async move { Ok(cancelled) })
    }

    fn inspect(&self, project: &Project, name: &str) -> StoreFuture<'_, Option<LockView>> {
        let view = self
            .on_lock(project.id, name, |shared, _, lock, _, now| {
                let held_back = shared.held_back(project, name, now);
                shared.view(lock, held_back, now)
            })
            // A lock whose holder just expired, with nobody waiting and no lock-delay
            // running, no longer exists.
            .filter(|view| {
                !view.holders.is_empty() || view.waiters > 0 || view.held_back_until.is_some()
            })
            .or_else(|| {
                // Nobody holds or waits, but grants are held back after a restart: say
                // until when, so that an operator sees why the first acquire will wait.
                let shared = &*self.shared;
                let until = shared.held_back(project, name, shared.now())?;
                Some(LockView {
                    held_back_until: Some(shared.origin_wall + Duration::from_micros(until)),
                    ..LockView::default()
                })
            });
        Box::pin(async move { Ok(view) })
    }

    fn proclaim(
        &self,
        _project: &Project,
        _name: &str,
        _lease_id: Id,
        _value: String,
    ) -> StoreFuture<'_, Proclaimed> {
        Box::pin(async { Err(StoreError::Unavailable("proclaim: not yet".into())) })
    }

    fn observe(
        &self,
        _project: &Project,
        _name: &str,
        _after: Option<u64>,
        _wait: Duration,
    ) -> StoreFuture<'_, Vec<Observation>> {
        Box::pin(async { Err(StoreError::Unavailable("observe: not yet".into())) })
    }

    fn list(&self, project: &Project, spec: ListSpec) -> StoreFuture<'_, ListPage> {
        let page = self.shared.list(project, &spec);
        Box::pin(async move { Ok(page) })
    }

    fn stats(&self) -> StoreStats {
        self.shared.stats()
    }

    fn shutdown(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let Some(file) = &self.shared.state_file else {
                return Ok(());
            };
            let now = self.shared.now();
            let mut latest = 0u64;
            for index in 0..self.shared.shards.len() {
                let state = self.shared.shard(index);
                for lock in state.locks.values() {
                    // Longer leases are in the state file with their lock: only that lock
                    // waits for them after the restart.
                    if let Some(h) = lock
                        .holder
                        .as_ref()
                        .filter(|h| !file.is_long(Duration::from_millis(u64::from(h.lease_ms))))
                    {
                        latest = latest.max(h.deadline.saturating_sub(now));
                    }
                }
            }
            file.clean_shutdown(SystemTime::now() + Duration::from_micros(latest))
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot write the state file: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Id {
        Id(n.to_be_bytes())
    }

    #[test]
    fn tombstones_are_scoped_to_their_lock_and_expire() {
        let mut tombs = Tombstones::default();
        tombs.insert(id(1), 7, 0, 100);
        assert!(tombs.contains(&id(1), 7, 99));
        assert!(!tombs.contains(&id(1), 8, 99), "another lock");
        assert!(!tombs.contains(&id(1), 7, 100), "expired");
        tombs.insert(id(2), 7, 150, 100);
        assert!(!tombs.by_id.contains_key(&id(1)), "dropped when it expired");
    }

    #[test]
    fn tombstones_stay_within_their_bound() {
        let mut tombs = Tombstones::default();
        for n in 0..(TOMBSTONES_PER_SHARD as u128 * 3) {
            // The same id now and then: its newer tombstone outlives the older entry.
            tombs.insert(id(n % 5_000), 1, n as u64, 1_000_000);
        }
        assert!(tombs.order.len() <= TOMBSTONES_PER_SHARD);
        assert!(tombs.by_id.len() <= TOMBSTONES_PER_SHARD);
        // The newest are kept, the oldest dropped.
        let last = TOMBSTONES_PER_SHARD as u128 * 3 - 1;
        assert!(tombs.contains(&id(last % 5_000), 1, last as u64));
        // Id 3000 was last inserted at 8000, before the newest 4,096 (8192 to 12,287).
        assert!(!tombs.contains(&id(3000), 1, last as u64));
    }
}
