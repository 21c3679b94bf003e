//! The etcd backend: every lock, waiter and lease lives in etcd, so any number of servers
//! can serve the same locks, and a server that dies loses nothing.
//!
//! The recipe is etcd's own mutex (`concurrency/mutex.go`), with one etcd lease per acquire:
//!
//! * **Queue.** An acquire writes one queue key under the lock's prefix, attached to its own
//!   etcd lease. Who holds follows the grant rule over the keys in create-revision order
//!   (FIFO, `rule.rs`): the first key alone for a plain lock, consecutive readers together,
//!   a semaphore's first `n`. The fencing token is the holder's create revision.
//! * **Idempotency.** In the same transaction it writes a request key named after a hash of
//!   the request id, so a re-poll or a retried acquire, on any server, finds the same place
//!   or the same grant. (Queue keys are named after their reused etcd lease instead, so that
//!   a busy lock does not leave a trail of deleted names for every range to walk.)
//! * **Waiting.** A waiter watches only the keys ahead whose presence proves it must wait
//!   (the key just ahead of a writer, the nearest writer ahead of a reader, the `n` nearest
//!   of a semaphore's waiter) and its own, to notice a cancel, and looks again when one is
//!   deleted. While a server serves a waiter's long poll it keeps the waiter's lease alive;
//!   after the poll, the waiter keeps its place for its TTL: the etcd backend's grace period.
//! * **Elections** (`election.rs`): the leader is an exclusive holder; its value lives in its
//!   entry; observers replay the queue's history with a watch.
//! * **Leases.** The etcd TTL is the lease rounded up to whole seconds (etcd may raise it to
//!   its minimum); grants report what etcd granted. Renew = a keep-alive, then a
//!   linearizable read confirming that the keys are still there under that lease. Release
//!   deletes the keys if they are attached to the caller's etcd lease (one write; the next
//!   waiter's watch fires at once), and keeps the etcd lease for a later acquire.
//!
//! See `keys.rs` for the layout, `rule.rs` for who holds, `acquire.rs` and `wait.rs` for
//! acquiring, `leases.rs` for the leases.

mod acquire;
mod batch;
mod call;
mod census;
mod deletions;
mod election;
mod keepers;
mod keys;
mod leases;
mod limits;
mod listing;
mod metrics;
mod renew;
mod revoke;
mod rule;
mod security;
mod state;
mod wait;

/// Real etcd processes for the unit tests that need one (the integration tests' harness).
#[cfg(test)]
#[path = "../../../../tests/support/etcd.rs"]
#[allow(dead_code)]
mod etcd_harness;

/// A store over a new one-member etcd, for unit tests; etcd stops when the cluster drops.
#[cfg(test)]
async fn store_for_tests() -> (etcd_harness::EtcdCluster, EtcdStore) {
    let etcd = etcd_harness::EtcdCluster::start(1).await;
    let store = EtcdStore::connect(EtcdConfig::new(etcd.endpoints()))
        .await
        .expect("connects to etcd");
    (etcd, store)
}

/// A plain exclusive acquire of `name` for unit tests: a 10 s lease, tried once.
#[cfg(test)]
fn spec_for_tests(name: &str) -> super::AcquireSpec {
    super::AcquireSpec {
        project: Project {
            id: 0,
            name: "project".into(),
        },
        name: name.into(),
        lease: Duration::from_secs(10),
        wait: Some(Duration::ZERO),
        poll: Duration::from_secs(1),
        request_id: Id::random(),
        first: false,
        label: None,
        quota: Default::default(),
        max_hold: None,
        lock_delay: None,
        mode: Default::default(),
        value: None,
        client: None,
    }
}

/// The grant of an outcome that must be one.
#[cfg(test)]
fn granted(outcome: super::AcquireOutcome) -> super::Grant {
    match outcome {
        super::AcquireOutcome::Granted(grant) => grant,
        other => panic!("not granted: {other:?}"),
    }
}

pub(crate) use metrics::EtcdMetrics;
pub(crate) use security::TlsFiles;
pub use security::{EtcdTls, EtcdUser};

use super::{
    HolderView, ListPage, ListSpec, LockStore, LockView, Project, Release, Renewal, StoreError,
    StoreFuture, StoreStats,
};
use crate::error::Error;
use crate::id::Id;
use call::{EtcdError, count, count_of, delete, first, get, kvs};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, KeyValue, Txn};
use keys::{Entry, LeaseId, LockKeys, from_unix_ms, unix_ms};
use leases::Leases;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Settings of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// etcd client URLs, such as `http://10.0.0.1:2379`, or `https://etcd1:2379` for TLS.
    /// All of them use the same scheme.
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix (default `/leasehold`), so one etcd cluster
    /// can serve several independent deployments.
    pub prefix: String,
    /// Most waiters one lock may have.
    pub max_waiters_per_lock: usize,
    /// Longest time one store operation may wait for etcd (all retries included) before the
    /// request fails with a retryable `503`.
    pub call_timeout: Duration,
    /// TLS settings: a CA to trust and a client certificate (needs `https://` endpoints).
    /// `https://` endpoints without them trust Mozilla's root certificates.
    pub tls: Option<EtcdTls>,
    /// The etcd user to log in as, when etcd's authentication is on.
    pub user: Option<EtcdUser>,
}

impl EtcdConfig {
    /// Settings for these endpoints, with defaults for the rest.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/leasehold".into(),
            max_waiters_per_lock: 100_000,
            call_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
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
    /// Acquires and releases in flight together share transactions.
    batch: batch::Batcher,
    deletions: Arc<deletions::Deletions>,
    leases: Arc<Leases>,
    prefix: String,
    max_waiters_per_lock: usize,
    stats: Mutex<(Option<Instant>, StoreStats)>,
    refreshing: AtomicBool,
    /// The last health probe: when, and what it found.
    health: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl EtcdStore {
    /// Its etcd call figures, for the server's `/metrics`.
    pub(crate) fn metrics(&self) -> EtcdMetrics {
        self.inner.etcd.metrics.clone()
    }

    /// Connects to etcd. Fails on malformed settings ([`Error::Configuration`]), and, with
    /// TLS or a user, when etcd refuses them: [`Error::Tls`] for a certificate either side
    /// does not accept, [`Error::Configuration`] for a wrong password or missing
    /// permissions. An unreachable etcd is reported by each request (`503`) until it can be
    /// reached.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, Error> {
        let settings = |message: String| Error::Configuration { message };
        if config.endpoints.is_empty() {
            return Err(settings("no etcd endpoint given".into()));
        }
        let connect_timeout = Duration::from_secs(2);
        // etcd refuses client pings more often than every 5 s (--grpc-keepalive-min-time)
        // and pings on idle connections.
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false)
            .with_require_leader(true)
            // etcd ends tokens: simple ones after 5 idle minutes, and when a password changes.
            .with_auto_token_refresh(true);
        let (options, secure) = security::with_tls(
            options,
            &config.endpoints,
            config.tls.as_ref(),
            connect_timeout,
        )
        .map_err(settings)?;
        let login = match &config.user {
            Some(user) if user.name().is_empty() => {
                return Err(settings("the etcd user name is empty".into()));
            }
            Some(user) => {
                if !secure {
                    tracing::warn!(
                        user = user.name(),
                        "the etcd password goes over plain http://: use https:// endpoints"
                    );
                }
                Some(Arc::new(security::Login::new(user.clone())))
            }
            None => None,
        };
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| settings(format!("etcd client: {e}")))?;
        let etcd = call::Etcd {
            client,
            timeout: config.call_timeout,
            keepers: Default::default(),
            login,
            metrics: EtcdMetrics::default(),
        };
        let prefix = config.prefix.trim_end_matches('/').to_owned();
        if secure || config.user.is_some() {
            check_access(&etcd, &prefix).await?;
        }
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                leases: Arc::new(Leases::new(etcd.clone())),
                batch: batch::Batcher::start(etcd.clone(), "batch"),
                deletions: deletions::Deletions::start(etcd.clone(), keys::all_projects(&prefix)),
                etcd,
                prefix,
                max_waiters_per_lock: config.max_waiters_per_lock,
                stats: Mutex::new((None, StoreStats::default())),
                refreshing: AtomicBool::new(false),
                health: Mutex::new(None),
            }),
        })
    }
}

/// One read under the prefix, so that a certificate, password or permission that etcd
/// refuses stops the server at startup rather than failing every request. An etcd that
/// cannot be reached does not: requests get `503` until it can be.
async fn check_access(etcd: &call::Etcd, prefix: &str) -> Result<(), Error> {
    match etcd
        .get("access_check", &keys::all_projects(prefix), None)
        .await
    {
        Ok(_) => Ok(()),
        Err(EtcdError::Refused(refusal)) => Err(refusal.into_error()),
        Err(e) => {
            let e = StoreError::from(e);
            tracing::warn!(error = %e, "etcd not reachable at startup; requests get 503 until it is");
            Ok(())
        }
    }
}

/// True when `key` exists and is attached to the etcd lease `lease`.
fn held_by(key: Vec<u8>, lease: i64) -> Compare {
    Compare::lease(key, CompareOp::Equal, lease)
}

/// Lease reads at once for an inspection of many holders (readers, permits).
const HOLDER_READS: usize = 16;

/// What inspection shows of the holder whose key this is; `None` once its lease has ended.
async fn holder_view(etcd: &call::Etcd, kv: &KeyValue) -> Result<Option<HolderView>, EtcdError> {
    let Some(left) = etcd.time_to_live(kv.lease()).await? else {
        return Ok(None);
    };
    let entry = Entry::decode(kv.value());
    let now = unix_ms(SystemTime::now());
    let mut expires_in = Duration::from_secs(left as u64);
    if let Some(until) = entry.hold_until() {
        // It ends at its max_hold at the latest (see `limits.rs`).
        expires_in = expires_in.min(Duration::from_millis(until.saturating_sub(now)));
    }
    Ok(Some(HolderView {
        fencing_token: kv.create_revision() as u64,
        acquired_at: from_unix_ms(entry.granted.unwrap_or(entry.at)),
        expires_in,
        label: entry.label,
        value: entry.value,
    }))
}

/// `Gone` when the lock exists (someone else holds or waits), else `NoSuchLock`.
fn gone_or_missing(keys_in_line: i64) -> Release {
    if keys_in_line > 0 {
        Release::Gone
    } else {
        Release::NoSuchLock
    }
}

impl Inner {
    fn keys(&self, project: &Project, name: &str) -> LockKeys {
        LockKeys::new(&self.prefix, &project.name, name)
    }

    /// What inspection shows of the holder whose key this is.
    async fn holder_view(&self, kv: &KeyValue) -> Result<Option<HolderView>, EtcdError> {
        holder_view(&self.etcd, kv).await
    }

    /// What inspection shows of each of these holders, in order (`None` for one whose etcd
    /// lease is gone: it ended after its key was read): a lease read each, a few at a time.
    async fn holder_views(
        &self,
        holders: &[KeyValue],
    ) -> Result<Vec<Option<HolderView>>, EtcdError> {
        if let [one] = holders {
            return Ok(vec![self.holder_view(one).await?]);
        }
        let limit = Arc::new(tokio::sync::Semaphore::new(HOLDER_READS));
        let mut reads = tokio::task::JoinSet::new();
        for (i, kv) in holders.iter().enumerate() {
            let (etcd, kv, limit) = (self.etcd.clone(), kv.clone(), limit.clone());
            reads.spawn(async move {
                let _permit = limit.acquire_owned().await;
                (i, holder_view(&etcd, &kv).await)
            });
        }
        let mut views = vec![None; holders.len()];
        while let Some(done) = reads.join_next().await {
            // A read task only ends by finishing: the set is not aborted.
            let Ok((i, view)) = done else { continue };
            views[i] = view?;
        }
        Ok(views)
    }

    /// Deletes the holder's keys if this lease id names them (one write: the next waiter's
    /// watch fires at once), and keeps the etcd lease for a later acquire.
    async fn release(&self, project: &Project, name: &str, id: Id) -> Result<Release, EtcdError> {
        let keys = self.keys(project, name);
        let Some(lease) = LeaseId::from_id(id) else {
            return self.not_held(&keys).await;
        };
        let key = keys.queue_key(lease.etcd);
        // A release ends the lease cleanly: its delay key (if any) goes with it, in the same
        // write, so that nobody waits for a lock-delay.
        let mut ops = vec![
            get(key.clone()),
            delete(key),
            delete(keys.delay_key(lease.etcd)),
        ];
        ops.extend(lease.request_key(&keys).map(delete));
        let job = batch::Job {
            tag: keys.queue().to_vec(),
            when: lease.holds(&keys),
            ops,
            otherwise: vec![count(keys.queue()), get(keys.ended_key(lease.etcd))],
        };
        let outcome = self.batch.run(&self.etcd, "release", job).await?;
        let answers = outcome.answers;
        if !outcome.succeeded {
            if outcome.maybe_applied {
                // An earlier attempt (or a shared transaction) may have deleted the keys and
                // lost its answer: as the SDK does for its own retries, take the keys'
                // absence as this release's. The etcd lease is left to expire: had the keys
                // gone another way, a release may have handed it to a new acquire meanwhile.
                return Ok(Release::Released);
            }
            // A lease that ended early (revoked, max_hold) is gone, lock or no lock.
            let ended = answers.first(1).is_some();
            return Ok(gone_or_missing(answers.count_of(0) + i64::from(ended)));
        }
        Ok(self.released(&keys, lease.etcd, answers.first(0)))
    }

    /// After a release deleted the keys: the delay key's lease goes, and the etcd lease is
    /// kept for a later acquire. `queued`: the queue key as it was.
    fn released(&self, keys: &LockKeys, lease: i64, queued: Option<KeyValue>) -> Release {
        let entry = queued.map(|kv| Entry::decode(kv.value()));
        if let Some(delay_lease) = entry.as_ref().and_then(|e| e.delay_lease) {
            self.etcd.revoke_later(delay_lease);
        }
        match entry {
            Some(entry) => self.leases.put_back(
                entry.ask,
                leases::Lease {
                    id: lease,
                    ttl: entry.ttl,
                    slack: entry.slack,
                    fresh: false,
                    // Renewed by its holder about every third of its TTL.
                    until: Instant::now() + entry.lease() / 3,
                },
                keys.queue(),
            ),
            None => self.etcd.revoke_later(lease),
        }
        Release::Released
    }

    /// The answer for a lease id that names no key.
    async fn not_held(&self, keys: &LockKeys) -> Result<Release, EtcdError> {
        let answer = self
            .etcd
            .txn("release", Txn::new().and_then(vec![count(keys.queue())]))
            .await?;
        Ok(gone_or_missing(count_of(&answer, 0)))
    }

    /// Withdraws the request's waiter, or releases its grant, then revokes its etcd lease
    /// off the caller's path.
    async fn cancel(
        &self,
        project: &Project,
        name: &str,
        request_id: Id,
    ) -> Result<bool, EtcdError> {
        let keys = self.keys(project, name);
        let request_key = keys.request_key(keys::Slot::of(request_id));
        // The request's place: by its request key if it has one, else by its request id
        // among the entries in line (a first attempt's place has no request key).
        let read = Txn::new().and_then(vec![get(request_key.clone()), call::under(keys.queue())]);
        let found = self.etcd.txn("cancel", read).await?;
        let request = request_id.to_string();
        let (lease, when, request_key) = match first(&found, 0) {
            Some(kv) => (
                kv.lease(),
                held_by(request_key.clone(), kv.lease()),
                Some(request_key),
            ),
            None => {
                let Some(kv) = kvs(&found, 1).into_iter().find(|kv| {
                    Entry::decode(kv.value()).request.as_deref() == Some(request.as_str())
                }) else {
                    return Ok(false);
                };
                let key = kv.key().to_vec();
                let revision =
                    Compare::create_revision(key, CompareOp::Equal, kv.create_revision());
                (kv.lease(), revision, None)
            }
        };
        let mut ops = vec![
            delete(keys.queue_key(lease)),
            // A cancelled grant ends like a release: no lock-delay.
            delete(keys.delay_key(lease)),
        ];
        ops.extend(request_key.map(delete));
        let answer = self
            .etcd
            .txn("cancel", Txn::new().when(vec![when]).and_then(ops))
            .await?;
        if !answer.succeeded() {
            // Released or cancelled meanwhile.
            return Ok(false);
        }
        self.etcd.revoke_later(lease);
        Ok(true)
    }

    async fn inspect(&self, project: &Project, name: &str) -> Result<Option<LockView>, EtcdError> {
        let keys = self.keys(project, name);
        let state = self.lock_state("inspect", &keys).await?;
        let views = self.holder_views(&state.holders).await?;
        // An ended lease's lock-delay is shown while nobody holds the lock, as on the memory
        // store (protocol §3.5): with live holders, they are what keeps waiters out. A holder
        // whose lease etcd ended after the keys were read (its key read, its lease gone)
        // shows as none, and its delay key was read as its entry's, not as a phantom: it
        // counts as one here.
        let ended = state
            .holders
            .iter()
            .zip(&views)
            .filter(|(_, view)| view.is_none())
            .filter_map(|(kv, _)| state.delay_of(kv.create_revision()))
            .collect::<Vec<_>>();
        let holders: Vec<HolderView> = views.into_iter().flatten().collect();
        let mut held_back_until = None;
        if holders.is_empty() {
            for kv in state.phantoms.iter().chain(ended) {
                if let Some(left) = self.etcd.time_to_live(kv.lease()).await? {
                    // Whole seconds, rounded down: say the latest it may end.
                    let until = SystemTime::now() + Duration::from_secs(left as u64 + 1);
                    held_back_until = held_back_until.max(Some(until));
                }
            }
        }
        let now = unix_ms(SystemTime::now());
        let view = LockView {
            waiters: state.in_line.saturating_sub(state.holders.len() as i64) as u64,
            oldest_wait: state
                .first_waiter
                .as_ref()
                .map(|kv| Duration::from_millis(now.saturating_sub(Entry::decode(kv.value()).at))),
            mode: state.mode(),
            holders,
            held_back_until,
        };
        Ok(
            (!view.holders.is_empty() || view.waiters > 0 || view.held_back_until.is_some())
                .then_some(view),
        )
    }

    /// Whether etcd serves linearizable reads now (a leader and a quorum are reachable):
    /// one read of a single key, at most every `HEALTH_EVERY`, bounded by `HEALTH_BOUND`.
    async fn check(&self) -> Result<(), String> {
        if let Some((at, found)) = &*self.health.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < HEALTH_EVERY
        {
            return found.clone();
        }
        let key = format!("{}/health", self.prefix);
        let found = self
            .etcd
            .call_until("health", Instant::now() + HEALTH_BOUND, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await
            .map(drop)
            .map_err(|e| StoreError::from(e).to_string());
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), found.clone()));
        found
    }

    /// Counts held locks and waiters over the whole prefix.
    async fn count_all(&self) -> Result<StoreStats, EtcdError> {
        let all = keys::all_projects(&self.prefix);
        let census = self.census("stats", &all).await?;
        Ok(StoreStats {
            held: census.locks,
            waiters: census.entries.saturating_sub(census.holders),
            expirations: 0,
            state_file_writes: 0,
        })
    }
}

/// How long a health probe's finding is reused, and how long a probe may take.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const HEALTH_BOUND: Duration = Duration::from_secs(2);

/// How often the store-wide figures for `/metrics` may be recounted.
const STATS_EVERY: Duration = Duration::from_secs(5);

impl LockStore for EtcdStore {
    fn acquire(&self, spec: super::AcquireSpec) -> StoreFuture<'_, super::AcquireOutcome> {
        Box::pin(async move { Ok(self.inner.acquire(spec).await?) })
    }

    fn renew(&self, project: &Project, leases: Vec<(String, Id)>) -> StoreFuture<'_, Vec<Renewal>> {
        let project = project.clone();
        Box::pin(async move { Ok(self.inner.renew(&project, leases).await?) })
    }

    fn revoke(&self, project: &Project, name: &str) -> StoreFuture<'_, Vec<u64>> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move { Ok(self.inner.revoke(&project, &name).await?) })
    }

    fn proclaim(
        &self,
        project: &Project,
        name: &str,
        lease_id: Id,
        value: String,
    ) -> StoreFuture<'_, super::Proclaimed> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move {
            Ok(self
                .inner
                .proclaim(&project, &name, lease_id, value)
                .await?)
        })
    }

    fn observe(
        &self,
        project: &Project,
        name: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> StoreFuture<'_, Vec<super::Observation>> {
        let (project, name) = (project.clone(), name.to_owned());
        Box::pin(async move { Ok(self.inner.observe(&project, &name, after, wait).await?) })
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

    fn list(&self, project: &Project, spec: ListSpec) -> StoreFuture<'_, ListPage> {
        let project = project.clone();
        Box::pin(async move { Ok(self.inner.list(&project, &spec).await?) })
    }

    /// The last count of held locks and waiters in the whole store (all servers), recounted
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

    /// A linearizable read of one key (at most one a second): `Unavailable` while etcd has
    /// no leader or cannot be reached.
    fn check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.inner.check().await.map_err(StoreError::Unavailable) })
    }

    fn shutdown(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.inner.leases.revoke_spares().await;
            Ok(())
        })
    }
}
