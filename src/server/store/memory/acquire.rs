//! An acquire: what must be durable first, the lock's answer under the shard lock, and the
//! long poll for a grant.

use super::lock_state::{Ask, Begun, LeaseLimits, News};
use super::shard::ShardState;
use super::waiting::PendingWait;
use super::{Shared, lock_key};
use crate::server::state_file::Generation;
use crate::server::store::{AcquireOutcome, AcquireSpec, StoreError};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How the part under the shard lock ended.
enum Step {
    Done(AcquireOutcome),
    /// Wait on the receiver; the lease clock of a grant is compared to the second field.
    Wait(oneshot::Receiver<News>, u64),
}

pub(super) async fn acquire(
    shared: &Shared,
    spec: AcquireSpec,
) -> Result<AcquireOutcome, StoreError> {
    // The wait and the poll count from the request's arrival, also when the state file kept
    // it a moment.
    let arrived = Instant::now();
    let key = lock_key(spec.project.id, &spec.name);
    let fingerprint = shared.fingerprint(&key);
    // Before the shard lock: these may wait for the state file. Tokens last, as close to the
    // grant as can be.
    // The HTTP layer bounds leases to 24 h, far below u32::MAX ms.
    let lease_ms = u32::try_from(spec.lease.as_millis()).unwrap_or(u32::MAX);
    shared.note_lease(lease_ms).await?;
    shared.tokens_ready().await?;
    let (step, record) = shared.begin_acquire(&spec, &key, fingerprint, lease_ms)?;
    if let (Some(generation), Some(file)) = (record, &shared.state_file)
        && let Err(e) = file.durable(generation).await
    {
        // The long lease's record did not reach the disk: a crash could forget it, so
        // nothing may be answered. The client retries with the same request id.
        shared.withdraw(&key, fingerprint, spec.request_id);
        return Err(StoreError::Unavailable(format!(
            "cannot record the long lease: {e}"
        )));
    }
    let (rx, started) = match step {
        Step::Done(outcome) => return Ok(outcome),
        Step::Wait(rx, started) => (rx, started),
    };
    let mut pending = PendingWait::new(shared, key, fingerprint, spec.request_id, rx, started);
    let poll = spec.wait.map_or(spec.poll, |w| w.min(spec.poll));
    let timed_out = spec.wait.is_some_and(|w| w <= spec.poll);
    match tokio::time::timeout_at(arrived + poll, pending.wait()).await {
        Ok(Some(News::Granted(grant))) => Ok(AcquireOutcome::Granted(grant)),
        // Answered at once, so that the client knows before it releases the lease ahead.
        Ok(Some(News::Next(next))) => Ok(AcquireOutcome::StillWaiting {
            position: 0,
            next: Some(next),
        }),
        // Superseded by a newer poll of the same request: that one answers the grant.
        Ok(None) => Ok(pending.finish(false)),
        Err(_) => Ok(pending.finish(timed_out)),
    }
}

impl Shared {
    /// The part of an acquire under the shard lock: its grant, its place in line, or why
    /// not; and the state file's generation to await first, if its lease is recorded there.
    fn begin_acquire(
        &self,
        spec: &AcquireSpec,
        key: &[u8],
        fingerprint: u64,
        lease_ms: u32,
    ) -> Result<(Step, Option<Generation>), StoreError> {
        // Under the lock: see the shard task.
        let mut state = self.shard(self.shard_index(fingerprint));
        let now = self.now();
        if self.is_tombstoned(fingerprint, &spec.request_id, now) {
            // A late attempt of an acquire that has ended: it must create nothing.
            return Ok((Step::Done(AcquireOutcome::Ended), None));
        }
        let ShardState { locks, books } = &mut *state;
        if !locks.contains_key(key) {
            self.check_lock_quota(spec.project.id, spec.quota)?;
            locks.insert(key.into(), Default::default());
            self.count_lock(key, true);
        }
        let Some(lock) = locks.get_mut(key) else {
            return Err(StoreError::Unavailable("the lock table lost a lock".into()));
        };
        let max_waiters =
            spec.quota
                .max_waiters_per_lock
                .map_or(self.config.max_waiters_per_lock, |q| {
                    usize::try_from(q).map_or(self.config.max_waiters_per_lock, |q| {
                        q.min(self.config.max_waiters_per_lock)
                    })
                });
        let (tx, rx) = oneshot::channel();
        let ask = Ask {
            name: &spec.name,
            request_id: spec.request_id,
            lease_ms,
            limits: LeaseLimits::new(spec.max_hold, spec.lock_delay),
            mode: spec.mode,
            label: spec.label.as_deref(),
            value: spec.value.as_deref(),
            client: spec.client.map_or(0, client_tag),
            listener: tx,
            no_wait: spec.wait == Some(Duration::ZERO),
            max_waiters,
            held_back_until: self.held_back(&spec.project, &spec.name, now),
        };
        let begun = self.bookkept(
            books,
            key,
            Some(fingerprint),
            lock,
            now,
            |lock, tick, fx| lock.acquire(ask, tick, fx),
        );
        let step = match begun {
            // Recorded under the shard lock, before anything is answered.
            Ok(Begun::Granted(grant)) => Ok((
                Step::Done(AcquireOutcome::Granted(grant)),
                self.record_long_lease(spec, key),
            )),
            Ok(Begun::Waiting) => Ok((Step::Wait(rx, now), self.record_long_lease(spec, key))),
            Ok(Begun::TimedOut) => Ok((
                Step::Done(AcquireOutcome::TimedOut {
                    holder: lock
                        .holders()
                        .first()
                        .map(|h| h.view(now, self.origin_wall)),
                }),
                None,
            )),
            Err(refused) => Err(refused),
        };
        if lock.is_empty() {
            self.remove_lock(locks, key);
        }
        step
    }
}

/// A client's tag in the lock table: 8 bytes of its `client_id`, never 0 (which means none).
/// Two clients of one project with the same tag (one chance in 2^64, or one copying
/// another's id) only make the server reserve a lock to a waiter whose client cannot use
/// the reservation: that client waits for its grant as any waiter does.
fn client_tag(id: crate::id::Id) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(bytes).max(1)
}
