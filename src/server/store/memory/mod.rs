//! The in-memory backend: sharded lock table, FIFO queue per lock, timers only where waiters
//! wait.
//!
//! * A lock exists in the table only while it has a holder, waiters or a lock-delay running.
//!   What may be granted when is decided by its state machine (`lock_state`), pure and
//!   tested on its own; the rest of this module is the store around it: shards and their
//!   tasks (`shard`), what each operation leaves behind (`bookkeeping`), acquires and their
//!   long polls (`acquire`, `waiting`), inspection (`views`) and elections (`leadership`,
//!   `observe`).
//! * A holder's expiry needs a timer only when someone waits for it; otherwise an expired
//!   holder is noticed by the next operation on the lock or by the shard's sweep.
//! * Waiters wait on a oneshot channel. A waiter whose long poll ended (or whose connection
//!   dropped) stays in line, detached, for the grace period; a grant made to a detached
//!   waiter is kept for it for the grace period too.
//! * Request ids whose acquire has ended (cancelled, timed out, released, expired after it was
//!   answered) are remembered for a while as tombstones, so that a late attempt of one (a
//!   retry that arrives after its client gave up) is refused instead of creating a place in
//!   line or a grant nobody polls (`tombstones`).
//! * With a state file, no grant is answered before what it depends on is durable: its
//!   fencing token's reservation (`tokens`), its lease length (up to the crash hold-back
//!   bound), or its lock's record if the lease is longer (see `state_file`).

mod acquire;
mod bookkeeping;
mod leadership;
mod lock_state;
mod observe;
mod shard;
mod tokens;
mod tombstones;
mod views;
mod waiting;

pub use tombstones::TOMBSTONES_PER_SHARD;

use super::{
    AcquireOutcome, AcquireSpec, Ended, EventSink, ListPage, ListSpec, LockStore, LockView,
    Observation, Proclaimed, Project, ProjectId, Quota, Release, Renewal, StoreError, StoreFuture,
    StoreStats,
};
use crate::id::Id;
use crate::server::state_file::{
    Boot, DEFAULT_CRASH_HOLD_BACK, Generation, LongLease, StateFile, wall_micros,
};
use leadership::Revisions;
use lock_state::{LockState, Tick};
use rand::RngCore;
use shard::{Shard, ShardHasher, ShardState};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokens::Tokens;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tombstones::Tombstones;

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

/// The in-memory [`LockStore`].
#[derive(Debug)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

/// A lock as the store keeps it: its waiters' grants go through oneshot channels.
type Lock = LockState<oneshot::Sender<lock_state::News>>;

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
    /// Numbers the states of observed elections.
    revisions: Revisions,
    state_file: Option<StateFile>,
    max_lease_noted: AtomicU64,
    expirations: AtomicU64,
    held: AtomicU64,
    waiting: AtomicU64,
    config: MemoryConfig,
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A request id as events show it: its first half.
fn short(id: &Id) -> String {
    id.to_string()[..16].to_owned()
}

fn project_of(key: &[u8]) -> ProjectId {
    match key {
        [a, b, c, d, ..] => ProjectId::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// The name part of a lock key.
fn name_of(key: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(key.get(4..).unwrap_or_default())
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
            revisions: Revisions::new(wall_micros(SystemTime::now())),
            state_file,
            max_lease_noted: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            held: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            config,
        });
        for index in 0..shared.shards.len() {
            tokio::spawn(shard::shard_task(
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

impl Shared {
    fn now(&self) -> u64 {
        micros(self.origin.elapsed())
    }

    /// The operation's moment for the lock state machine.
    fn tick(&self, now: u64) -> Tick {
        Tick {
            now,
            grace: micros(self.config.grace),
            held_back_until: self.hold_back_until,
        }
    }

    /// A lock key's hash: picks its shard, tells its tombstones and timers apart.
    fn fingerprint(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard_index(&self, fingerprint: u64) -> usize {
        (fingerprint % self.shards.len() as u64) as usize
    }

    /// The revision of a new leadership state.
    fn next_revision(&self) -> u64 {
        self.revisions.next(wall_micros(SystemTime::now()))
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

    /// The tombstones `pick` chooses of the shard of the lock with this fingerprint.
    fn tombs(
        &self,
        fingerprint: u64,
        pick: impl FnOnce(&Shard) -> &Mutex<Tombstones>,
    ) -> std::sync::MutexGuard<'_, Tombstones> {
        let shard = &self.shards[self.shard_index(fingerprint)];
        pick(shard).lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that the acquire `request_id` on the lock with this fingerprint has ended.
    fn tombstone(&self, fingerprint: u64, request_id: Id, now: u64) {
        let ttl = micros(self.config.tombstone_ttl);
        self.tombs(fingerprint, |s| &s.tombstones)
            .insert(request_id, fingerprint, now, ttl);
    }

    /// Whether the acquire `request_id` on the lock with this fingerprint has ended.
    fn is_tombstoned(&self, fingerprint: u64, request_id: &Id, now: u64) -> bool {
        self.tombs(fingerprint, |s| &s.tombstones)
            .contains(request_id, fingerprint, now)
    }

    /// Remembers why a lease ended without a release, for at least its length (a holder
    /// that renews on time learns why), and at least the tombstone TTL.
    fn lease_ended(&self, fingerprint: u64, lease_id: Id, lease_ms: u32, why: Ended, now: u64) {
        let ttl = micros(self.config.tombstone_ttl).max(u64::from(lease_ms) * 1000);
        self.tombs(fingerprint, |s| &s.ended).insert_tagged(
            lease_id,
            fingerprint,
            now,
            ttl,
            tombstones::tag_of(why),
        );
    }

    /// Why the lease `lease_id` of the lock with this fingerprint ended, if that is
    /// remembered.
    fn ended_why(&self, fingerprint: u64, lease_id: &Id, now: u64) -> Option<Ended> {
        self.tombs(fingerprint, |s| &s.ended)
            .tag(lease_id, fingerprint, now)
            .and_then(tombstones::ended_of)
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

    /// Unix microseconds of a store instant.
    fn unix_us(&self, micros_since_origin: u64) -> u64 {
        let wall = self.origin_wall + Duration::from_micros(micros_since_origin);
        wall.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64
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
    fn remove_lock(&self, locks: &mut HashMap<Box<[u8]>, Box<Lock>>, key: &[u8]) {
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

    fn stats(&self) -> StoreStats {
        StoreStats {
            held: self.held.load(Ordering::Relaxed),
            waiters: self.waiting.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            state_file_writes: self.state_file.as_ref().map_or(0, StateFile::writes),
        }
    }
}

impl LockStore for MemoryStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, AcquireOutcome> {
        Box::pin(acquire::acquire(&self.shared, spec))
    }

    fn renew(&self, project: &Project, leases: Vec<(String, Id)>) -> StoreFuture<'_, Vec<Renewal>> {
        let shared = &*self.shared;
        let renewed = leases
            .iter()
            .map(|(name, lease_id)| {
                let key = lock_key(project.id, name);
                let fingerprint = shared.fingerprint(&key);
                shared
                    .on_lock(&key, fingerprint, |lock, tick, fx| {
                        lock.renew(*lease_id, tick, fx)
                    })
                    .flatten()
                    .map_or_else(
                        || Renewal::Gone(shared.ended_why(fingerprint, lease_id, shared.now())),
                        |left| left.map_or(Renewal::Gone(Some(Ended::MaxHold)), Renewal::Renewed),
                    )
            })
            .collect();
        Box::pin(async move { Ok(renewed) })
    }

    fn revoke(&self, project: &Project, name: &str) -> StoreFuture<'_, Vec<u64>> {
        let key = lock_key(project.id, name);
        let fingerprint = self.shared.fingerprint(&key);
        let tokens = self
            .shared
            .on_lock(&key, fingerprint, |lock, tick, fx| lock.revoke(tick, fx))
            .unwrap_or_default();
        Box::pin(async move { Ok(tokens) })
    }

    fn release(&self, project: &Project, name: &str, lease_id: Id) -> StoreFuture<'_, Release> {
        let shared = &*self.shared;
        let key = lock_key(project.id, name);
        let fingerprint = shared.fingerprint(&key);
        let outcome = match shared.on_lock(&key, fingerprint, |lock, tick, fx| {
            lock.release(lease_id, tick, fx)
        }) {
            Some(true) => Release::Released,
            Some(false) => Release::Gone,
            // The lock went with the lease: a lease that ended without a release (still
            // remembered) is `Gone` rather than a lock that never was.
            None => match shared.ended_why(fingerprint, &lease_id, shared.now()) {
                Some(_) => Release::Gone,
                None => Release::NoSuchLock,
            },
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn cancel(&self, project: &Project, name: &str, request_id: Id) -> StoreFuture<'_, bool> {
        let shared = &*self.shared;
        let key = lock_key(project.id, name);
        let fingerprint = shared.fingerprint(&key);
        let cancelled = shared.withdraw(&key, fingerprint, request_id);
        // Also when nothing matched: the cancel may have overtaken its acquire.
        shared.tombstone(fingerprint, request_id, shared.now());
        Box::pin(async move { Ok(cancelled) })
    }

    fn proclaim(
        &self,
        project: &Project,
        name: &str,
        lease_id: Id,
        value: String,
    ) -> StoreFuture<'_, Proclaimed> {
        let shared = &*self.shared;
        let key = lock_key(project.id, name);
        let fingerprint = shared.fingerprint(&key);
        let outcome = match shared.on_lock(&key, fingerprint, |lock, tick, fx| {
            lock.proclaim(name, lease_id, value, tick, fx)
        }) {
            Some(Ok(true)) => Ok(Proclaimed::Done),
            Some(Err(conflict)) => Err(conflict),
            Some(Ok(false)) | None => Ok(Proclaimed::Gone(shared.ended_why(
                fingerprint,
                &lease_id,
                shared.now(),
            ))),
        };
        Box::pin(async move { outcome })
    }

    fn observe(
        &self,
        project: &Project,
        name: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> StoreFuture<'_, Vec<Observation>> {
        let key = lock_key(project.id, name);
        Box::pin(observe::observe(&self.shared, key, after, wait))
    }

    fn inspect(&self, project: &Project, name: &str) -> StoreFuture<'_, Option<LockView>> {
        let view = self.shared.inspect(project, name);
        Box::pin(async move { Ok(view) })
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
                    for holder in lock
                        .holders()
                        .iter()
                        .filter(|h| !file.is_long(Duration::from_millis(u64::from(h.lease_ms()))))
                    {
                        latest = latest.max(holder.deadline().saturating_sub(now));
                    }
                }
            }
            file.clean_shutdown(SystemTime::now() + Duration::from_micros(latest))
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot write the state file: {e}")))
        })
    }
}
