//! The memory backend's small durable state: what a restart needs to stay safe.
//!
//! Three facts survive a restart:
//! * a bound above every fencing token issued so far (tokens follow the wall clock in
//!   microseconds, and a run reserves them ahead in steps);
//! * the longest lease up to the crash hold-back bound (30 s by default) granted so far:
//!   after a crash every lock waits that long, at most the bound;
//! * each lock that has (or waits for) a lease longer than the bound, with its length: after
//!   a crash only those locks wait for their own lease.
//!
//! Writes are group-committed by one writer thread, never done on the request path. A
//! caller that needs a change durable (a token reservation, a long lease's record, a new
//! longest lease) changes the in-memory state, gets a generation number, and awaits
//! [`StateFile::durable`]. The writer writes whenever something changed, but at most once per
//! [`MIN_FLUSH_INTERVAL`] (the first write after a quiet second goes at once), so a burst of
//! any number of requests costs about one write per second, and every waiter of the burst is
//! answered by the same write.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The default bound of the hold-back after a crash: leases up to this long are covered by
/// one hold-back of every lock; longer ones are recorded per lock.
pub const DEFAULT_CRASH_HOLD_BACK: Duration = Duration::from_secs(30);

/// Least time between two writes of the state file: bounds writes (and fsyncs) to about
/// one per second, whatever the request rate.
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    /// Every token issued so far is below this.
    tokens_below: u64,
    /// Longest lease granted or renewed since the last start, up to the crash hold-back
    /// bound (files of older versions: of any length).
    max_lease_ms: u64,
    /// Set by a clean shutdown: wall-clock time (Unix ms) by which every lease up to the
    /// bound still held then has expired.
    #[serde(default)]
    clean_until_unix_ms: Option<u64>,
    /// Locks with a lease (granted or waited for) longer than the bound. Absent in files of
    /// older versions, whose `max_lease_ms` covers every lease.
    #[serde(default)]
    long_leases: Option<Vec<LongLease>>,
}

/// A lock whose lease may run longer than the crash hold-back bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongLease {
    /// The project's stable name.
    pub project: String,
    /// The lock's name.
    pub lock: String,
    /// The longest lease granted or waited for on it.
    pub lease_ms: u64,
}

/// What the previous run implies for this one.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Tokens of this run must be at least this.
    pub first_token: u64,
    /// Every grant must wait this long: leases issued before the restart may still be held.
    pub hold_back: Duration,
    /// These locks wait for their own lease length from now: a lease that long may still
    /// be held.
    pub long_leases: Vec<LongLease>,
}

/// A point in the sequence of changes: once the generation is durable, so is every change
/// made before it was handed out.
pub type Generation = u64;

/// The in-memory state and the writer's bookkeeping.
#[derive(Debug)]
struct State {
    tokens_below: u64,
    max_lease_ms: u64,
    /// Generation of the last change of `max_lease_ms`.
    max_lease_changed: Generation,
    clean_until_unix_ms: Option<u64>,
    /// Long leases of this run, by the store's lock key.
    long: HashMap<Box<[u8]>, (LongLease, Generation)>,
    /// Long leases of the previous run, until their hold-back has ended.
    carried: Vec<(LongLease, Instant)>,
    /// Generation of the latest change.
    changed: Generation,
    /// Generation of the last write attempted (successful or not).
    attempted: Generation,
    /// Generation of the last successful write.
    written: Generation,
    last_write: Option<Instant>,
    /// Write at once, ignoring the interval (a clean shutdown).
    urgent: bool,
    stop: bool,
}

impl State {
    fn snapshot(&self, now: Instant) -> Persisted {
        let mut long: Vec<LongLease> = self.long.values().map(|(l, _)| l.clone()).collect();
        long.extend(
            self.carried
                .iter()
                .filter(|(_, until)| *until > now)
                .map(|(l, _)| l.clone()),
        );
        Persisted {
            tokens_below: self.tokens_below,
            max_lease_ms: self.max_lease_ms,
            clean_until_unix_ms: self.clean_until_unix_ms,
            long_leases: Some(long),
        }
    }

    /// Records a change; the writer picks it up.
    fn change(&mut self) -> Generation {
        self.changed += 1;
        self.changed
    }

    /// The generation whose write makes the current state durable: the pending write's, or
    /// a new one if the last write failed.
    fn needed(&mut self) -> Generation {
        if self.changed > self.attempted {
            self.changed
        } else if self.written < self.changed {
            self.change()
        } else {
            self.written
        }
    }
}

/// What the writer has achieved, for waiters.
#[derive(Debug, Clone, Default)]
struct Durable {
    written: Generation,
    /// The last failed write: its generation and error.
    failed: Option<(Generation, String)>,
}

#[derive(Debug)]
struct Core {
    path: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
    /// Tokens below this are durably reserved.
    durable_tokens: AtomicU64,
    /// Long leases of this run (to skip the lock on the common path of removing a lock).
    long_count: AtomicUsize,
    writes: AtomicU64,
    /// The crash hold-back bound, in ms.
    bound_ms: u64,
}

/// Handle on the state file and its writer thread; dropping it stops the writer (changes not
/// yet written are lost, as in a crash: nobody was told they were durable).
#[derive(Debug)]
pub struct StateFile {
    core: Arc<Core>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// Microseconds since 2025-01-01T00:00:00Z: the floor of fencing tokens. Tokens stay below
/// 2^53 (exact in every JSON reader, JavaScript's doubles included) until the year 2310.
pub fn wall_micros(now: SystemTime) -> u64 {
    const JAN_2025_SECS: u64 = 1_735_689_600;
    (now.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64)
        .saturating_sub(JAN_2025_SECS * 1_000_000)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Rounds a lease length up to two significant digits (at most 10 % more): a client asking
/// for ever longer leases (1000, 1001, 1002 ms, ...) changes the recorded longest lease only
/// at 1000, 1100, 1200, ..., a few dozen times over the whole range.
fn round_up_lease_ms(ms: u64) -> u64 {
    let mut step = 1;
    while ms / step >= 100 {
        step *= 10;
    }
    ms.div_ceil(step) * step
}

impl StateFile {
    /// Reads the previous run's state (if any), reserves `token_reserve` tokens ahead, records
    /// the new state durably and starts the writer. Leases longer than `crash_bound` are
    /// recorded per lock.
    ///
    /// With `inline`, there is no writer thread: [`durable`](Self::durable) writes on the
    /// calling task, blocking it, ungrouped and without a rate limit. Only for deterministic
    /// simulations, whose simulated clock runs on while a real thread writes.
    pub fn open(
        path: &Path,
        crash_bound: Duration,
        token_reserve: u64,
        inline: bool,
    ) -> io::Result<(StateFile, Boot)> {
        let previous: Option<Persisted> = match std::fs::read(path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("state file {} is corrupt: {e}", path.display()),
                )
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let wall = wall_micros(now);
        let boot = match previous {
            None => Boot {
                first_token: wall,
                hold_back: Duration::ZERO,
                long_leases: Vec::new(),
            },
            Some(prev) => Boot {
                first_token: wall.max(prev.tokens_below),
                hold_back: match prev.clean_until_unix_ms {
                    Some(until) => Duration::from_millis(until.saturating_sub(unix_ms(now))),
                    // Crashed: any lease may have been renewed just before, so wait out the
                    // longest one covered by the bound. (The previous run kept
                    // `max_lease_ms` within its own bound; an older version's file may hold
                    // any length, which is then waited out in full.)
                    None => Duration::from_millis(prev.max_lease_ms),
                },
                long_leases: prev.long_leases.unwrap_or_default(),
            },
        };
        let started = Instant::now();
        let state = State {
            tokens_below: boot.first_token.saturating_add(token_reserve),
            // Leases of the previous run are still running during the hold-back; if this run
            // crashes early, the next must wait for them too.
            max_lease_ms: boot.hold_back.as_millis() as u64,
            max_lease_changed: 0,
            clean_until_unix_ms: None,
            long: HashMap::new(),
            carried: boot
                .long_leases
                .iter()
                .map(|l| (l.clone(), started + Duration::from_millis(l.lease_ms)))
                .collect(),
            changed: 0,
            attempted: 0,
            written: 0,
            // The write at start does not count against the interval: the first grants
            // after a start are not kept waiting for it.
            last_write: None,
            urgent: false,
            stop: false,
        };
        save(path, &state.snapshot(started))?;
        let core = Arc::new(Core {
            path: path.to_owned(),
            durable_tokens: AtomicU64::new(state.tokens_below),
            state: Mutex::new(state),
            wake: Condvar::new(),
            durable: watch::Sender::new(Durable::default()),
            long_count: AtomicUsize::new(0),
            writes: AtomicU64::new(1),
            bound_ms: crash_bound.as_millis() as u64,
        });
        let writer = if inline {
            None
        } else {
            let core = core.clone();
            Some(
                std::thread::Builder::new()
                    .name("leasehold-state".into())
                    .spawn(move || core.write_loop())?,
            )
        };
        Ok((StateFile { core, writer }, boot))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }

    /// Tokens below this are durably reserved: a run may issue them.
    pub fn durable_tokens(&self) -> u64 {
        self.core.durable_tokens.load(Ordering::Acquire)
    }

    /// Asks for tokens up to (not including) `below` to be reserved. Does not wait: the
    /// reservation is usable once [`durable_tokens`](Self::durable_tokens) covers it.
    pub fn reserve_tokens(&self, below: u64) -> Generation {
        let mut state = self.lock();
        let generation = if below > state.tokens_below {
            state.tokens_below = below;
            state.change()
        } else {
            state.needed()
        };
        drop(state);
        self.core.wake.notify_one();
        generation
    }

    /// Records that a lease this long (up to the bound; longer ones are recorded per lock)
    /// may be granted. Returns the generation to await before granting it, or `None` if
    /// nothing changed.
    pub fn note_lease(&self, lease: Duration) -> Option<Generation> {
        let ms = (lease.as_millis() as u64).min(self.core.bound_ms);
        let mut state = self.lock();
        if ms <= state.max_lease_ms {
            // Already recorded, but perhaps not yet durable.
            return (state.max_lease_changed > state.written).then(|| state.needed());
        }
        state.max_lease_ms = round_up_lease_ms(ms)
            .min(self.core.bound_ms)
            .max(state.max_lease_ms);
        let generation = state.change();
        state.max_lease_changed = generation;
        drop(state);
        self.core.wake.notify_one();
        Some(generation)
    }

    /// Whether a lease this long is recorded per lock rather than by the global hold-back.
    pub fn is_long(&self, lease: Duration) -> bool {
        lease.as_millis() as u64 > self.core.bound_ms
    }

    /// Records that the lock `key` has a lease this long (granted or waited for). Returns the
    /// generation to await before the lease is granted.
    pub fn record_long_lease(&self, key: &[u8], lease: LongLease) -> Generation {
        let mut state = self.lock();
        if let Some((recorded, generation)) = state.long.get(key)
            && recorded.lease_ms >= lease.lease_ms
        {
            let generation = *generation;
            return if generation <= state.written {
                generation
            } else {
                state.needed()
            };
        }
        let generation = state.change();
        if state.long.insert(key.into(), (lease, generation)).is_none() {
            self.core.long_count.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        self.core.wake.notify_one();
        generation
    }

    /// Forgets the long lease of lock `key`, if any: the lock is gone (no holder, no waiter).
    /// Written with the next write; nobody waits for it.
    pub fn forget_long_lease(&self, key: &[u8]) {
        if self.core.long_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut state = self.lock();
        if state.long.remove(key).is_some() {
            self.core.long_count.fetch_sub(1, Ordering::Relaxed);
            state.change();
            drop(state);
            self.core.wake.notify_one();
        }
    }

    /// Waits until `generation` is written durably; fails if the write that should have
    /// carried it failed.
    pub async fn durable(&self, generation: Generation) -> io::Result<()> {
        if self.writer.is_none() {
            return self.core.write_inline(generation);
        }
        let mut durable = self.core.durable.subscribe();
        let seen = durable
            .wait_for(|d| {
                d.written >= generation || d.failed.as_ref().is_some_and(|(g, _)| *g >= generation)
            })
            .await
            .map_err(|_| io::Error::other("the state file's writer has stopped"))?;
        if seen.written >= generation {
            return Ok(());
        }
        let message = seen.failed.as_ref().map_or("", |(_, e)| e.as_str());
        Err(io::Error::other(format!(
            "cannot write the state file {}: {message}",
            self.core.path.display()
        )))
    }

    /// Records a clean shutdown: every lease up to the bound still held ends by
    /// `leases_end` (longer ones are recorded per lock). Written at once.
    pub async fn clean_shutdown(&self, leases_end: SystemTime) -> io::Result<()> {
        let generation = {
            let mut state = self.lock();
            state.clean_until_unix_ms = Some(unix_ms(leases_end));
            state.urgent = true;
            state.change()
        };
        self.core.wake.notify_one();
        self.durable(generation).await
    }

    /// Writes of the state file since it was opened (the first included).
    pub fn writes(&self) -> u64 {
        self.core.writes.load(Ordering::Relaxed)
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.core.wake.notify_one();
        // A write in progress finishes first: a server started on the same file right after
        // must never see this one's writes land after its own.
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every change so far now, on the calling thread (inline mode). The state stays
    /// locked during the write, so that writes land in the order of their snapshots.
    fn write_inline(&self, generation: Generation) -> io::Result<()> {
        let mut state = self.lock();
        if state.written >= generation {
            return Ok(());
        }
        let now = Instant::now();
        state.carried.retain(|(_, until)| *until > now);
        let snapshot = state.snapshot(now);
        let result = save(&self.path, &snapshot);
        self.writes.fetch_add(1, Ordering::Relaxed);
        state.attempted = state.changed;
        state.last_write = Some(now);
        result?;
        state.written = state.changed;
        self.durable_tokens
            .fetch_max(snapshot.tokens_below, Ordering::AcqRel);
        Ok(())
    }

    /// The writer thread: waits for a change, keeps to the interval, writes a snapshot of
    /// every change so far, and tells the waiters.
    fn write_loop(&self) {
        loop {
            let (snapshot, generation) = {
                let mut state = self.lock();
                loop {
                    if state.stop {
                        return;
                    }
                    if state.changed > state.attempted {
                        let now = Instant::now();
                        let next = state
                            .last_write
                            .map_or(now, |last| last + MIN_FLUSH_INTERVAL);
                        if state.urgent || next <= now {
                            break;
                        }
                        state = self
                            .wake
                            .wait_timeout(state, next - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    } else {
                        state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                }
                state.urgent = false;
                let now = Instant::now();
                state.carried.retain(|(_, until)| *until > now);
                (state.snapshot(now), state.changed)
            };
            let result = save(&self.path, &snapshot);
            self.writes.fetch_add(1, Ordering::Relaxed);
            let mut state = self.lock();
            state.attempted = generation;
            state.last_write = Some(Instant::now());
            match result {
                Ok(()) => {
                    state.written = generation;
                    self.durable_tokens
                        .fetch_max(snapshot.tokens_below, Ordering::AcqRel);
                    drop(state);
                    self.durable.send_modify(|d| d.written = generation);
                }
                Err(e) => {
                    drop(state);
                    tracing::error!(error = %e, path = %self.path.display(), "cannot write the state file: no new grant until it is writable again");
                    self.durable
                        .send_modify(|d| d.failed = Some((generation, e.to_string())));
                }
            }
        }
    }
}

/// Writes the state to a temporary file, syncs it, and renames it over the state file.
fn save(path: &Path, state: &Persisted) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(30);

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dl-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("state.json")
    }

    #[test]
    fn rounding_keeps_two_digits() {
        assert_eq!(round_up_lease_ms(7), 7);
        assert_eq!(round_up_lease_ms(1000), 1000);
        assert_eq!(round_up_lease_ms(1001), 1100);
        assert_eq!(round_up_lease_ms(2000), 2000);
        assert_eq!(round_up_lease_ms(29_001), 30_000);
    }

    #[tokio::test]
    async fn epochs_grow_and_crashes_hold_back() {
        let path = temp("epochs");
        let (first, boot) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert_eq!(boot.hold_back, Duration::ZERO);
        let generation = first.note_lease(Duration::from_secs(7)).unwrap();
        first.durable(generation).await.unwrap();
        drop(first); // a crash: no clean_shutdown

        let (second, boot2) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert!(boot2.first_token >= boot.first_token + 1000);
        let generation = second.reserve_tokens(boot2.first_token + 1_000_000_000);
        second.durable(generation).await.unwrap();
        assert_eq!(boot2.hold_back, Duration::from_secs(7));
        second.clean_shutdown(SystemTime::now()).await.unwrap();
        drop(second);

        let (_third, boot3) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert!(boot3.first_token >= boot2.first_token + 1_000_000_000);
        assert!(boot3.hold_back <= Duration::from_millis(5));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn long_leases_are_kept_per_lock_and_the_global_hold_back_is_bounded() {
        let path = temp("long");
        let (first, _) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert!(first.is_long(Duration::from_secs(3600)));
        assert!(!first.is_long(BOUND));
        // The global longest lease never goes past the bound.
        assert!(first.note_lease(Duration::from_secs(3600)).is_some());
        let long = LongLease {
            project: "p".into(),
            lock: "long".into(),
            lease_ms: 3_600_000,
        };
        let generation = first.record_long_lease(b"k1", long.clone());
        first.durable(generation).await.unwrap();
        let forgotten = LongLease {
            lock: "gone".into(),
            ..long.clone()
        };
        first.record_long_lease(b"k2", forgotten);
        first.forget_long_lease(b"k2");
        let generation = first.reserve_tokens(0);
        first.durable(generation).await.unwrap();
        drop(first);

        let (second, boot) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert_eq!(boot.hold_back, BOUND);
        assert_eq!(boot.long_leases, vec![long.clone()]);
        drop(second);
        // Carried over: a second crash during the first's hold-back still knows the lock.
        let (_third, boot) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        assert_eq!(boot.long_leases, vec![long]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_to_its_waiters_and_retried() {
        let path = temp("failing");
        let (file, _) = StateFile::open(&path, BOUND, 1000, false).unwrap();
        // A directory where the temporary file goes: `File::create` fails even for root.
        let tmp = path.with_extension("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let generation = file.reserve_tokens(u64::MAX / 2);
        assert!(file.durable(generation).await.is_err());
        std::fs::remove_dir(&tmp).unwrap();
        let generation = file.reserve_tokens(u64::MAX / 2);
        file.durable(generation).await.unwrap();
        assert_eq!(file.durable_tokens(), u64::MAX / 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
