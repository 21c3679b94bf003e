//! The etcd backend: every lock, waiter and lease lives in etcd, so any number of servers
//! can serve the same locks, and a server that dies loses nothing.
//!
//! The recipe is etcd's own mutex (`concurrency/mutex.go`), one etcd lease per acquire:
//!
//! * **Queue.** An acquire writes its queue key under the lock's prefix, attached to its own
//!   etcd lease, in one transaction with a request key (request id -> lease id). The key
//!   with the lowest create revision holds the lock; the others wait in create-revision
//!   order (FIFO). The fencing token is the holder's create revision.
//! * **Waiting.** A waiter watches only the key just before it (and its own key, to notice
//!   a cancel), and re-checks when that key is deleted. While a server serves a waiter's long
//!   poll it keeps the waiter's lease alive; after the poll, the waiter keeps its place for
//!   its TTL, the etcd backend's grace period.
//! * **Leases.** The etcd lease's TTL is the lease length rounded up to whole seconds (etcd
//!   may raise it to its minimum); the answer reports what etcd granted. Renew = keep-alive,
//!   then a linearizable read confirming the key still exists under that lease. Release and
//!   cancel revoke the lease, which deletes both keys.
//! * **Idempotency.** A re-poll or retried acquire, on any server, finds the request key and
//!   resumes the same place, or returns the same grant.

mod call;
mod keys;
mod leases;

use super::{
    AcquireOutcome, AcquireSpec, Grant, HolderView, LockStore, LockView, Project, Release,
    StoreError, StoreFuture, StoreStats,
};
use crate::id::Id;
use call::{
    EtcdError, absent, ahead_of, count, count_of, delete, empty, exists, first, first_since, get,
    kvs, put, queue_oldest, revision,
};
use etcd_client::{
    Client, ConnectOptions, GetOptions, KeyValue, Txn, WatchFilterType, WatchOptions,
};
use keys::{Entry, LeaseId, LockKeys, from_unix_ms, unix_ms};
use leases::{Leases, ttl_for};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Settings of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// etcd client URLs, such as `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix (default `/distributed-lock`), so one etcd cluster
    /// can serve several independent deployments.
    pub prefix: String,
    /// Most waiters one lock may have.
    pub max_waiters_per_lock: usize,
    /// Longest time one store operation may wait for etcd (all retries included) before the
    /// request fails with a retryable `503`.
    pub call_timeout: Duration,
}

impl EtcdConfig {
    /// Settings for these endpoints, with defaults for the rest.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/distributed-lock".into(),
            max_waiters_per_lock: 100_000,
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd [`LockStore`].
#[derive(Debug)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    etcd: call::Etcd,
    leases: Arc<Leases>,
    prefix: String,
    max_waiters_per_lock: usize,
    stats: Mutex<(Option<Instant>, StoreStats)>,
    refreshing: AtomicBool,
}

impl EtcdStore {
    /// Connects to etcd. Fails only on malformed settings: an unreachable etcd is reported
    /// by each request (`503`) until it can be reached.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoint given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd client: {e}")))?;
        let etcd = call::Etcd {
            client,
            timeout: config.call_timeout,
        };
        let prefix = config.prefix.trim_end_matches('/').to_owned();
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                leases: Arc::new(Leases::new(etcd.clone())),
                etcd,
                prefix,
                max_waiters_per_lock: config.max_waiters_per_lock,
                stats: Mutex::new((None, StoreStats::default())),
                refreshing: AtomicBool::new(false),
            }),
        })
    }
}

/// An acquire's place in a lock's queue.
#[derive(Debug, Clone)]
struct Place {
    lease: LeaseId,
    /// The create revision of its queue key: its order in line, and its fencing token.
    revision: i64,
    entry: Entry,
    queue_key: Vec<u8>,
    request_key: Vec<u8>,
}

impl Place {
    fn grant(&self) -> Grant {
        Grant {
            lease_id: self.lease.to_id(),
            fencing_token: self.revision as u64,
            lease: self.entry.lease(),
        }
    }
}

enum Placed {
    Done(AcquireOutcome),
    Waiting(Place),
}

/// Where a waiter stands.
enum Standing {
    /// Its key is gone (cancelled, or its lease ran out).
    Gone,
    /// First in line: it holds the lock.
    Head,
    /// Behind `predecessor`, as of `revision`.
    Behind { predecessor: Vec<u8>, revision: i64 },
}

impl Inner {
    fn keys(&self, project: &Project, name: &str) -> LockKeys {
        LockKeys::new(&self.prefix, &project.name, name)
    }

    async fn acquire(&self, spec: AcquireSpec) -> Result<AcquireOutcome, EtcdError> {
        let arrived = Instant::now();
        let poll = spec.wait.map_or(spec.poll, |w| w.min(spec.poll));
        let last_poll = spec.wait.is_some_and(|w| w <= spec.poll);
        let keys = self.keys(&spec.project, &spec.name);
        let place = match self.find_or_queue(&spec, &keys).await? {
            Placed::Done(outcome) => return Ok(outcome),
            Placed::Waiting(place) => place,
        };
        self.wait(&keys, place, arrived + poll, last_poll).await
    }

    /// Resumes the request's place, or queues it (granting at once if the lock is free).
    async fn find_or_queue(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
    ) -> Result<Placed, EtcdError> {
        let ttl = ttl_for(spec.lease);
        let request_key = keys.request_key(spec.request_id);
        let try_once = spec.wait == Some(Duration::ZERO);
        // A stale request key or a spare lease that ran out costs a round; a few suffice.
        for _ in 0..4 {
            if spec.quota.max_locks.is_some() {
                self.check_lock_quota(spec, keys).await?;
            }
            let lease = self.leases.take(ttl).await?;
            let id = LeaseId {
                etcd: lease.id,
                secret: rand::random(),
            };
            let queue_key = keys.queue_key(id);
            let entry = Entry {
                ttl: lease.ttl,
                at: unix_ms(SystemTime::now()),
                granted: None,
                label: spec.label.clone(),
            };
            let mut when = vec![absent(request_key.clone())];
            if try_once {
                when.push(empty(keys.queue()));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(vec![
                    put(queue_key.clone(), entry.encode(), lease.id),
                    put(request_key.clone(), id.request_value(), lease.id),
                    count(keys.queue()),
                ])
                .or_else(vec![
                    get(request_key.clone()),
                    queue_oldest(keys.queue(), 1),
                ]);
            // A spare lease is refreshed at the same time, so that it runs a full TTL from
            // now; a fresh one was granted for this request.
            let (answer, kept) = tokio::join!(self.etcd.txn("queue", txn), async {
                if lease.fresh {
                    Ok(())
                } else {
                    self.etcd.keep_alive(lease.id).await
                }
            });
            let answer = match answer {
                // The spare expired before the transaction: nothing was written.
                Err(EtcdError::LeaseGone) => continue,
                other => other?,
            };
            if !answer.succeeded() {
                if kept.is_ok() {
                    self.leases.put_back(ttl, lease);
                }
                match first(&answer, 0) {
                    Some(request) => {
                        if let Some(placed) = self.resume(keys, &request).await? {
                            return Ok(placed);
                        }
                        // The request key outlived its place; forget it and queue anew.
                        self.forget_request(&request).await?;
                        continue;
                    }
                    None => {
                        // Tried once, and the lock is taken.
                        let holder = match first(&answer, 1) {
                            Some(kv) => self.holder_view(&kv).await?,
                            None => None,
                        };
                        return Ok(Placed::Done(AcquireOutcome::TimedOut { holder }));
                    }
                }
            }
            match kept {
                Ok(()) => {}
                // The spare ran out between the write and the keep-alive: so did our keys.
                Err(EtcdError::LeaseGone) => continue,
                Err(e) => {
                    // Unknown whether the spare still runs: give the place up.
                    self.etcd.revoke_later(lease.id);
                    return Err(e);
                }
            }
            let place = Place {
                lease: id,
                revision: revision(&answer),
                entry,
                queue_key,
                request_key,
            };
            let in_line = count_of(&answer, 2);
            if in_line <= 1 {
                return Ok(Placed::Done(AcquireOutcome::Granted(place.grant())));
            }
            let max_waiters = spec
                .quota
                .max_waiters_per_lock
                .map_or(self.max_waiters_per_lock as u64, |q| {
                    q.min(self.max_waiters_per_lock as u64)
                });
            if in_line as u64 - 1 > max_waiters {
                self.etcd.revoke_later(lease.id);
                return Err(EtcdError::Full(format!(
                    "lock already has {} waiters, the most allowed",
                    in_line - 2
                )));
            }
            return Ok(Placed::Waiting(place));
        }
        Err(EtcdError::Unavailable(
            "could not queue the acquire (leases kept vanishing)".into(),
        ))
    }

    /// The place a request key points to, refreshed with a keep-alive; `None` if the place
    /// is gone (released, cancelled, expired).
    async fn resume(
        &self,
        keys: &LockKeys,
        request: &KeyValue,
    ) -> Result<Option<Placed>, EtcdError> {
        let Some(id) = LeaseId::from_request_value(request.value()) else {
            return Ok(None);
        };
        let queue_key = keys.queue_key(id);
        let (found, kept) = tokio::join!(
            self.etcd.get("resume", &queue_key, None),
            self.etcd.keep_alive(id.etcd)
        );
        match kept {
            Ok(()) => {}
            Err(EtcdError::LeaseGone) => return Ok(None),
            Err(e) => return Err(e),
        }
        let Some(kv) = found?.take_kvs().into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(Placed::Waiting(Place {
            lease: id,
            revision: kv.create_revision(),
            entry: Entry::decode(kv.value()),
            queue_key,
            request_key: request.key().to_vec(),
        })))
    }

    /// Deletes a request key whose place is gone (unless it changed meanwhile).
    async fn forget_request(&self, request: &KeyValue) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when(vec![etcd_client::Compare::mod_revision(
                request.key(),
                etcd_client::CompareOp::Equal,
                request.mod_revision(),
            )])
            .and_then(vec![delete(request.key().to_vec())]);
        self.etcd.txn("forget request", txn).await.map(drop)
    }

    /// Refuses a new lock beyond the project's lock quota. Checked before queueing, so two
    /// servers creating locks at the same moment may both pass.
    async fn check_lock_quota(&self, spec: &AcquireSpec, keys: &LockKeys) -> Result<(), EtcdError> {
        let Some(max) = spec.quota.max_locks else {
            return Ok(());
        };
        let project = keys::project_queues(&self.prefix, &spec.project.name);
        let answer = self
            .etcd
            .txn(
                "lock quota",
                Txn::new().and_then(vec![count(keys.queue()), count(&project)]),
            )
            .await?;
        if count_of(&answer, 0) > 0 || (count_of(&answer, 1) as u64) < max {
            // The lock exists already, or the project has fewer keys than the quota.
            return Ok(());
        }
        // Count locks, not keys: a lock with waiters has several.
        let all = self
            .etcd
            .get(
                "lock quota",
                &project,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let mut locks: Vec<&[u8]> = all
            .kvs()
            .iter()
            .filter_map(|kv| lock_of(kv.key()))
            .collect();
        locks.dedup();
        if locks.len() as u64 >= max {
            return Err(EtcdError::Full(format!(
                "the project has {} locks held or waited for, the most allowed",
                locks.len()
            )));
        }
        Ok(())
    }

    /// Where a waiter stands now.
    async fn standing(&self, keys: &LockKeys, place: &Place) -> Result<Standing, EtcdError> {
        let answer = self
            .etcd
            .txn(
                "standing",
                Txn::new().and_then(vec![
                    get(place.queue_key.clone()),
                    ahead_of(keys.queue(), place.revision, 1),
                ]),
            )
            .await?;
        if first(&answer, 0).is_none() {
            return Ok(Standing::Gone);
        }
        Ok(match first(&answer, 1) {
            None => Standing::Head,
            Some(predecessor) => Standing::Behind {
                predecessor: predecessor.key().to_vec(),
                revision: revision(&answer),
            },
        })
    }

    /// Waits in line until granted, or until the poll ends.
    async fn wait(
        &self,
        keys: &LockKeys,
        place: Place,
        poll_end: Instant,
        last_poll: bool,
    ) -> Result<AcquireOutcome, EtcdError> {
        // The lease was refreshed as this request began; keep it alive while the poll lasts.
        let keep_alive_every = Duration::from_secs(place.entry.ttl.max(1) as u64) / 3;
        let mut next_keep_alive = Instant::now() + keep_alive_every;
        'check: loop {
            if Instant::now() >= poll_end {
                break;
            }
            let standing =
                match tokio::time::timeout_at(poll_end, self.standing(keys, &place)).await {
                    Ok(standing) => standing?,
                    Err(_) => break,
                };
            let (predecessor, at) = match standing {
                Standing::Gone => return self.withdrawn(keys).await,
                Standing::Head => {
                    self.note_granted(&place);
                    return Ok(AcquireOutcome::Granted(place.grant()));
                }
                Standing::Behind {
                    predecessor,
                    revision,
                } => (predecessor, revision),
            };
            // Watch the predecessor (and our own key, to see a cancel) for deletion, from
            // just after the revision we looked at: nothing in between is missed.
            let watch = async {
                let options = || {
                    WatchOptions::new()
                        .with_start_revision(at + 1)
                        .with_filters([WatchFilterType::NoPut])
                };
                let mut client = self.etcd.client.watch_client();
                let mut stream = client.watch(predecessor, Some(options())).await?;
                stream
                    .watch(place.queue_key.clone(), Some(options()))
                    .await?;
                Ok::<_, etcd_client::Error>(stream)
            };
            let mut stream = match tokio::time::timeout_at(poll_end, watch).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "etcd watch failed; checking again");
                    tokio::time::sleep_until(
                        poll_end.min(Instant::now() + Duration::from_millis(100)),
                    )
                    .await;
                    continue 'check;
                }
                Err(_) => break,
            };
            loop {
                tokio::select! {
                    message = stream.message() => match message {
                        // The watches' creation acknowledgements.
                        Ok(Some(m)) if m.events().is_empty() && !m.canceled() => {}
                        // A deletion, a cancelled watch or a broken stream: look again.
                        _ => continue 'check,
                    },
                    _ = tokio::time::sleep_until(next_keep_alive) => {
                        next_keep_alive = Instant::now() + keep_alive_every;
                        let kept = self.etcd.keep_alive(place.lease.etcd);
                        match tokio::time::timeout_at(poll_end, kept).await {
                            Ok(Ok(())) => {}
                            Ok(Err(EtcdError::LeaseGone)) => continue 'check,
                            Ok(Err(e)) => {
                                tracing::warn!(error = ?e, "keeping a waiter alive failed")
                            }
                            Err(_) => break 'check,
                        }
                    }
                    _ = tokio::time::sleep_until(poll_end) => break 'check,
                }
            }
        }
        self.end_poll(keys, place, last_poll).await
    }

    /// The poll is over: a grant that raced wins; else the waiter leaves the line
    /// (`last_poll`) or keeps its place for its TTL, counted from now.
    async fn end_poll(
        &self,
        keys: &LockKeys,
        place: Place,
        last_poll: bool,
    ) -> Result<AcquireOutcome, EtcdError> {
        if last_poll {
            let txn = Txn::new()
                .when(vec![first_since(keys.queue(), place.revision)])
                .and_then(vec![get(place.queue_key.clone())])
                .or_else(vec![
                    delete(place.queue_key.clone()),
                    delete(place.request_key.clone()),
                    queue_oldest(keys.queue(), 1),
                ]);
            let answer = self.etcd.txn("end wait", txn).await?;
            if answer.succeeded() && first(&answer, 0).is_some() {
                self.note_granted(&place);
                return Ok(AcquireOutcome::Granted(place.grant()));
            }
            self.etcd.revoke_later(place.lease.etcd);
            let holder = match first(&answer, 2) {
                Some(kv) => self.holder_view(&kv).await?,
                None => None,
            };
            return Ok(AcquireOutcome::TimedOut { holder });
        }
        let txn = Txn::new().and_then(vec![
            get(place.queue_key.clone()),
            ahead_of(keys.queue(), place.revision, 0),
        ]);
        let (answer, kept) = tokio::join!(
            self.etcd.txn("end poll", txn),
            self.etcd.keep_alive(place.lease.etcd)
        );
        let answer = answer?;
        match kept {
            Ok(()) if first(&answer, 0).is_some() => {}
            Ok(()) | Err(EtcdError::LeaseGone) => return self.withdrawn(keys).await,
            Err(e) => return Err(e),
        }
        let ahead = kvs(&answer, 1).len() as u64;
        if ahead == 0 {
            self.note_granted(&place);
            return Ok(AcquireOutcome::Granted(place.grant()));
        }
        Ok(AcquireOutcome::StillWaiting {
            position: ahead - 1,
        })
    }

    /// The answer to a waiter withdrawn meanwhile (cancelled, or out of time).
    async fn withdrawn(&self, keys: &LockKeys) -> Result<AcquireOutcome, EtcdError> {
        let answer = self
            .etcd
            .txn(
                "holder",
                Txn::new().and_then(vec![queue_oldest(keys.queue(), 1)]),
            )
            .await?;
        let holder = match first(&answer, 0) {
            Some(kv) => self.holder_view(&kv).await?,
            None => None,
        };
        Ok(AcquireOutcome::TimedOut { holder })
    }

    /// Records, in the background, when a waiter got the lock (for inspection).
    fn note_granted(&self, place: &Place) {
        if place.entry.granted.is_some() {
            return;
        }
        let entry = Entry {
            granted: Some(unix_ms(SystemTime::now())),
            ..place.entry.clone()
        };
        let txn = Txn::new()
            .when(vec![etcd_client::Compare::create_revision(
                place.queue_key.clone(),
                etcd_client::CompareOp::Equal,
                place.revision,
            )])
            .and_then(vec![put(
                place.queue_key.clone(),
                entry.encode(),
                place.lease.etcd,
            )]);
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            let _ = etcd.txn("note grant", txn).await;
        });
    }

    /// What inspection shows of the holder whose queue key this is.
    async fn holder_view(&self, kv: &KeyValue) -> Result<Option<HolderView>, EtcdError> {
        let Some(lease) = LeaseId::from_queue_key(kv.key()) else {
            return Ok(None);
        };
        let Some(left) = self.etcd.time_to_live(lease.etcd).await? else {
            return Ok(None);
        };
        let entry = Entry::decode(kv.value());
        Ok(Some(HolderView {
            fencing_token: kv.create_revision() as u64,
            acquired_at: from_unix_ms(entry.granted.unwrap_or(entry.at)),
            expires_in: Duration::from_secs(left as u64),
            label: entry.label,
        }))
    }

    async fn renew(
        &self,
        project: &Project,
        leases: Vec<(String, Id)>,
    ) -> Result<Vec<Option<Duration>>, EtcdError> {
        let targets: Vec<Option<(LeaseId, Vec<u8>)>> = leases
            .iter()
            .map(|(name, id)| {
                let lease = LeaseId::from_id(*id)?;
                Some((lease, self.keys(project, name).queue_key(lease)))
            })
            .collect();
        // 1. Which leases hold their lock (a foreign or made-up id names no key).
        let before = self.read_keys(&targets).await?;
        // 2. Keep those alive.
        let mut alive = vec![false; targets.len()];
        let mut tasks = tokio::task::JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        for (i, target) in targets.iter().enumerate() {
            if let (Some((lease, _)), Some(_)) = (target, &before[i]) {
                let etcd = self.etcd.clone();
                let lease = lease.etcd;
                let limit = limit.clone();
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    (i, etcd.keep_alive(lease).await)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((i, result)) = done else { continue };
            match result {
                Ok(()) => alive[i] = true,
                Err(EtcdError::LeaseGone) => {}
                Err(e) => return Err(e),
            }
        }
        // 3. A keep-alive alone is not proof: etcd 3.4 can answer one for a lease whose keys
        //    its revocation is deleting. The key must still be there, afterwards.
        let kept: Vec<Option<(LeaseId, Vec<u8>)>> = targets
            .into_iter()
            .zip(&alive)
            .map(|(t, &a)| t.filter(|_| a))
            .collect();
        let after = self.read_keys(&kept).await?;
        Ok(before
            .into_iter()
            .zip(after)
            .map(|(b, a)| match (b, a) {
                (Some((rev, _)), Some((rev_after, entry))) if rev == rev_after => {
                    Some(entry.lease())
                }
                _ => None,
            })
            .collect())
    }

    /// Reads queue keys in a few transactions: (create revision, entry) of those that exist.
    async fn read_keys(
        &self,
        targets: &[Option<(LeaseId, Vec<u8>)>],
    ) -> Result<Vec<Option<(i64, Entry)>>, EtcdError> {
        let mut out = vec![None; targets.len()];
        let wanted: Vec<(usize, &Vec<u8>)> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|(_, key)| (i, key)))
            .collect();
        // etcd allows 128 operations per transaction by default.
        for chunk in wanted.chunks(100) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|(_, key)| get((*key).clone()))
                    .collect::<Vec<_>>(),
            );
            let answer = self.etcd.txn("read leases", txn).await?;
            for (j, (i, _)) in chunk.iter().enumerate() {
                out[*i] =
                    first(&answer, j).map(|kv| (kv.create_revision(), Entry::decode(kv.value())));
            }
        }
        Ok(out)
    }

    async fn release(&self, project: &Project, name: &str, id: Id) -> Result<Release, EtcdError> {
        let keys = self.keys(project, name);
        let lease = LeaseId::from_id(id);
        let held = lease.map(|l| keys.queue_key(l));
        let txn = match &held {
            Some(key) => Txn::new()
                .when(vec![exists(key.clone())])
                .or_else(vec![count(keys.queue())]),
            None => Txn::new()
                .when(vec![empty(keys.queue())])
                .or_else(vec![count(keys.queue())]),
        };
        let answer = self.etcd.txn("release", txn).await?;
        match (lease, answer.succeeded()) {
            (Some(lease), true) => match self.etcd.revoke(lease.etcd).await {
                Ok(()) => Ok(Release::Released),
                Err(EtcdError::LeaseGone) => Ok(Release::Gone),
                Err(e) => Err(e),
            },
            (None, true) => Ok(Release::NoSuchLock),
            (_, false) if count_of(&answer, 0) > 0 => Ok(Release::Gone),
            (_, false) => Ok(Release::NoSuchLock),
        }
    }

    async fn cancel(
        &self,
        project: &Project,
        name: &str,
        request_id: Id,
    ) -> Result<bool, EtcdError> {
        let keys = self.keys(project, name);
        let found = self
            .etcd
            .get("cancel", &keys.request_key(request_id), None)
            .await?;
        let Some(lease) = found
            .kvs()
            .first()
            .and_then(|kv| LeaseId::from_request_value(kv.value()))
        else {
            return Ok(false);
        };
        match self.etcd.revoke(lease.etcd).await {
            Ok(()) => Ok(true),
            Err(EtcdError::LeaseGone) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn inspect(&self, project: &Project, name: &str) -> Result<Option<LockView>, EtcdError> {
        let keys = self.keys(project, name);
        let answer = self
            .etcd
            .txn(
                "inspect",
                Txn::new().and_then(vec![queue_oldest(keys.queue(), 2)]),
            )
            .await?;
        let in_line = count_of(&answer, 0);
        let oldest = kvs(&answer, 0);
        let Some(head) = oldest.first() else {
            return Ok(None);
        };
        let holder = self.holder_view(head).await?;
        let now = unix_ms(SystemTime::now());
        let view = LockView {
            waiters: in_line.saturating_sub(1) as u64,
            oldest_wait: oldest
                .get(1)
                .map(|kv| Duration::from_millis(now.saturating_sub(Entry::decode(kv.value()).at))),
            holder,
        };
        Ok((view.holder.is_some() || view.waiters > 0).then_some(view))
    }

    /// Counts held locks and waiters over the whole prefix (keys only).
    async fn count_all(&self) -> Result<StoreStats, EtcdError> {
        let all = self
            .etcd
            .get(
                "stats",
                &keys::all_projects(&self.prefix),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let mut queued = 0u64;
        let mut locks: Vec<&[u8]> = Vec::new();
        for kv in all.kvs() {
            if let Some(lock) = lock_of(kv.key()) {
                queued += 1;
                locks.push(lock);
            }
        }
        locks.dedup();
        Ok(StoreStats {
            held: locks.len() as u64,
            waiters: queued - locks.len() as u64,
            expirations: 0,
        })
    }
}

/// The lock part (`.../q/<name>/`) of a queue key; `None` for request keys.
fn lock_of(key: &[u8]) -> Option<&[u8]> {
    let end = key.iter().rposition(|&b| b == b'/')?;
    let lock = &key[..end];
    let name_start = lock.iter().rposition(|&b| b == b'/')?;
    lock[..name_start].ends_with(b"/q").then_some(lock)
}

/// How often the store-wide figures for `/metrics` may be recounted.
const STATS_EVERY: Duration = Duration::from_secs(5);

impl LockStore for EtcdStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, AcquireOutcome> {
        Box::pin(async move { Ok(self.inner.acquire(spec).await?) })
    }

    fn renew(
        &self,
        project: &Project,
        leases: Vec<(String, Id)>,
    ) -> StoreFuture<'_, Vec<Option<Duration>>> {
        let project = project.clone();
        Box::pin(async move { Ok(self.inner.renew(&project, leases).await?) })
    }

    fn release(&self, project: &Project, name: &str, lease_id: Id) -> StoreFuture<'_, Release> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move { Ok(self.inner.release(&project, &name, lease_id).await?) })
    }

    fn cancel(&self, project: &Project, name: &str, request_id: Id) -> StoreFuture<'_, bool> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move { Ok(self.inner.cancel(&project, &name, request_id).await?) })
    }

    fn inspect(&self, project: &Project, name: &str) -> StoreFuture<'_, Option<LockView>> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move { Ok(self.inner.inspect(&project, &name).await?) })
    }

    /// The last count of held locks and waiters in the whole store (all servers), refreshed
    /// in the background when older than a few seconds. Expirations are not counted.
    fn stats(&self) -> StoreStats {
        let (counted, stats) = *self.inner.stats.lock().unwrap_or_else(|p| p.into_inner());
        let stale = counted.is_none_or(|at| at.elapsed() >= STATS_EVERY);
        if stale
            && tokio::runtime::Handle::try_current().is_ok()
            && !self.inner.refreshing.swap(true, Ordering::AcqRel)
        {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Ok(fresh) = inner.count_all().await {
                    *inner.stats.lock().unwrap_or_else(|p| p.into_inner()) =
                        (Some(Instant::now()), fresh);
                }
                inner.refreshing.store(false, Ordering::Release);
            });
        }
        stats
    }

    fn shutdown(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.inner.leases.revoke_spares().await;
            Ok(())
        })
    }
}
