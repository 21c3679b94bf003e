//! Calls to etcd: each bounded in time, retried while etcd is unreachable or electing a
//! leader, and mapped to the store's errors.

use super::keepers::{Keepers, Kept};
use super::metrics::{CallError, EtcdMetrics};
use super::security::{self, Login};
use crate::server::store::StoreError;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, KeyValue, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// gRPC status codes worth another attempt: CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, ABORTED,
/// INTERNAL, UNAVAILABLE (etcd's "no leader", "leader changed", "request timed out").
const RETRYABLE_CODES: [i32; 6] = [1, 2, 4, 10, 13, 14];

/// Why an etcd call failed.
#[derive(Debug)]
pub(super) enum EtcdError {
    /// The etcd lease does not exist (expired or revoked).
    LeaseGone,
    /// etcd could not be reached, or refused, within the call's time.
    Unavailable(String),
    /// etcd refuses this server's settings: its certificate, its user or its permissions.
    /// Retrying does not help until the settings or etcd's are changed.
    Refused(security::Refusal),
    /// A store limit.
    Full(String),
    /// The acquire does not fit how the name is in use (see `Mode::conflict`), or a proclaim
    /// by a holder that does not hold alone.
    Conflict(String),
    /// A read at a revision etcd has compacted away.
    Compacted,
    /// A read at a revision etcd has not reached yet.
    FutureRevision,
}

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> StoreError {
        match e {
            EtcdError::LeaseGone => StoreError::Unavailable("etcd lease vanished; retry".into()),
            EtcdError::Unavailable(message) => {
                StoreError::Unavailable(format!("etcd unavailable: {message}"))
            }
            EtcdError::Refused(refusal) => {
                StoreError::Unavailable(format!("etcd refused this server: {refusal}"))
            }
            EtcdError::Full(message) => StoreError::Full(message),
            EtcdError::Conflict(message) => StoreError::Conflict(message),
            // Reads at a revision answer these only to the code that asked for one, which
            // handles them; should one escape, it is worth a retry.
            EtcdError::Compacted | EtcdError::FutureRevision => {
                StoreError::Unavailable("etcd revision out of range; retry".into())
            }
        }
    }
}

/// How a failed attempt goes on.
enum Failure {
    Gone,
    Compacted,
    FutureRevision,
    Retry(String),
    Fatal(String),
    Refused(security::Refusal),
}

fn classify(error: etcd_client::Error) -> Failure {
    if let Some(reason) = security::refusal(&error) {
        return Failure::Refused(reason);
    }
    match &error {
        etcd_client::Error::GRpcStatus(status) => {
            if status.message().contains("lease not found") {
                return Failure::Gone;
            }
            // OUT_OF_RANGE, with etcd's mvcc messages.
            if status
                .message()
                .contains("required revision has been compacted")
            {
                return Failure::Compacted;
            }
            if status
                .message()
                .contains("required revision is a future revision")
            {
                return Failure::FutureRevision;
            }
            if RETRYABLE_CODES.contains(&(status.code() as i32)) {
                Failure::Retry(error.to_string())
            } else {
                Failure::Fatal(error.to_string())
            }
        }
        etcd_client::Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            Failure::Gone
        }
        _ => Failure::Retry(error.to_string()),
    }
}

/// The etcd client with the backend's call discipline.
#[derive(Clone)]
pub(super) struct Etcd {
    pub client: Client,
    /// Longest time one logical call (all its attempts) may take.
    pub timeout: Duration,
    pub keepers: Arc<Keepers>,
    /// The etcd user to log in as before the first call, if any.
    pub login: Option<Arc<Login>>,
    pub metrics: EtcdMetrics,
}

impl Etcd {
    /// Runs `attempt` until it succeeds, fails for good, or the call's time is up.
    pub async fn call<T, F, Fut>(&self, what: &'static str, attempt: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_until(what, Instant::now() + self.timeout, attempt)
            .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or `deadline` passes.
    pub async fn call_until<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Instant,
        attempt: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let outcome = self.attempts(what, deadline, attempt).await;
        self.metrics.took(what, started.elapsed());
        outcome
    }

    async fn attempts<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = Duration::from_millis(10);
        loop {
            let once = async {
                if let Some(login) = &self.login {
                    login.ensure(&self.client).await?;
                }
                attempt(self.client.clone()).await
            };
            let outcome = tokio::time::timeout_at(deadline, once).await;
            let reason = match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => match classify(error) {
                    Failure::Gone => return Err(EtcdError::LeaseGone),
                    Failure::Compacted => return Err(EtcdError::Compacted),
                    Failure::FutureRevision => return Err(EtcdError::FutureRevision),
                    Failure::Fatal(reason) => {
                        self.metrics.failed(what, CallError::Unavailable);
                        return Err(EtcdError::Unavailable(format!("{what}: {reason}")));
                    }
                    Failure::Refused(reason) => {
                        self.metrics.failed(what, CallError::Refused);
                        return Err(EtcdError::Refused(reason));
                    }
                    Failure::Retry(reason) => reason,
                },
                Err(_) => "no answer in time".to_owned(),
            };
            if Instant::now() + delay >= deadline {
                self.metrics.failed(what, CallError::Unavailable);
                return Err(EtcdError::Unavailable(format!("{what}: {reason}")));
            }
            self.metrics.failed(what, CallError::Retried);
            tracing::debug!(what, %reason, "etcd call failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    pub async fn txn(&self, what: &'static str, txn: Txn) -> Result<TxnResponse, EtcdError> {
        self.txn_counted(what, txn).await.map(|(answer, _)| answer)
    }

    /// A transaction, and how many attempts it took: after more than one, an earlier attempt
    /// may have taken effect and lost its answer.
    pub async fn txn_counted(
        &self,
        what: &'static str,
        txn: Txn,
    ) -> Result<(TxnResponse, u32), EtcdError> {
        let mut attempts = 0;
        let answer = self
            .call(what, |mut c| {
                attempts += 1;
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok((answer, attempts))
    }

    pub async fn get(
        &self,
        what: &'static str,
        key: &[u8],
        options: Option<GetOptions>,
    ) -> Result<GetResponse, EtcdError> {
        self.call(what, |mut c| {
            let options = options.clone();
            async move { c.get(key, options).await }
        })
        .await
    }

    /// Revokes an etcd lease, deleting every key attached to it. `LeaseGone` if it had
    /// already ended.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.keepers.close(lease);
        self.call("revoke", |mut c| async move { c.lease_revoke(lease).await })
            .await
            .map(drop)
    }

    /// Revokes in the background (best effort): the keys go now rather than at expiry.
    pub fn revoke_later(&self, lease: i64) {
        let etcd = self.clone();
        tokio::spawn(async move {
            let _ = etcd.revoke(lease).await;
        });
    }

    /// One keep-alive of a lease whose TTL is `ttl` seconds. `LeaseGone` if the lease has
    /// ended (etcd answered a TTL of 0 or less). Uses the lease's open stream if it has one,
    /// and keeps a new one open for the next time.
    pub async fn keep_alive(&self, lease: i64, ttl: i64) -> Result<(), EtcdError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        // Half the time for the open stream: a broken one leaves time to open another.
        let kept = self.keepers.keep_alive(lease, self.timeout / 2).await;
        if let Some(Kept::Alive | Kept::Gone) = kept {
            self.metrics.took("keep_alive", started.elapsed());
        }
        match kept {
            Some(Kept::Alive) => return Ok(()),
            Some(Kept::Gone) => return Err(EtcdError::LeaseGone),
            Some(Kept::Broken) => self.metrics.failed("keep_alive", CallError::Retried),
            None => {}
        }
        let (keeper, answers) = self
            .call_until("keep_alive_stream", deadline, |mut c| async move {
                // The first answer is checked by etcd-client: a TTL <= 0 is "lease not found".
                c.lease_keep_alive(lease).await
            })
            .await?;
        let ttl = Duration::from_secs(ttl.max(1) as u64);
        self.keepers.hold(keeper, answers, ttl, started);
        Ok(())
    }

    /// When the last keep-alive of `lease` that etcd confirmed through this server was sent
    /// (so etcd runs it at least its TTL from then), if known.
    pub fn kept_since(&self, lease: i64) -> Option<Instant> {
        self.keepers.kept_since(lease)
    }

    /// Remaining TTL of a lease in whole seconds (rounded down), `None` once it has ended.
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let answer = self
            .call("time_to_live", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await?;
        Ok((answer.ttl() >= 0).then_some(answer.ttl()))
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("timeout", &self.timeout)
            .field("user", &self.login.as_ref().map(|l| l.name()))
            .finish_non_exhaustive()
    }
}

// Small builders, so the recipe reads as the recipe.

pub(super) fn put(key: Vec<u8>, value: impl Into<Vec<u8>>, lease: i64) -> TxnOp {
    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))
}

pub(super) fn get(key: Vec<u8>) -> TxnOp {
    TxnOp::get(key, None)
}

pub(super) fn delete(key: Vec<u8>) -> TxnOp {
    TxnOp::delete(key, None::<DeleteOptions>)
}

/// Every key of a lock's queue, oldest first (`limit` 0: all).
pub(super) fn queue_oldest(prefix: &[u8], limit: i64) -> TxnOp {
    TxnOp::get(
        prefix,
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(limit),
        ),
    )
}

/// The newest keys of a lock's queue, newest first. The count of the answer is the whole
/// queue's.
pub(super) fn queue_newest(prefix: &[u8], limit: i64) -> TxnOp {
    TxnOp::get(
        prefix,
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(limit),
        ),
    )
}

/// How many keys a prefix holds.
pub(super) fn count(prefix: &[u8]) -> TxnOp {
    TxnOp::get(
        prefix,
        Some(GetOptions::new().with_prefix().with_count_only()),
    )
}

/// The queue keys created before `revision`, newest first (`limit` 0: all). The answer's
/// count is the whole queue's, not theirs: etcd counts before filtering.
pub(super) fn ahead_of(prefix: &[u8], revision: i64, limit: i64) -> TxnOp {
    TxnOp::get(prefix, Some(ahead_options(revision, limit)))
}

/// [`ahead_of`], names only.
pub(super) fn names_ahead_of(prefix: &[u8], revision: i64) -> TxnOp {
    TxnOp::get(prefix, Some(ahead_options(revision, 0).with_keys_only()))
}

pub(super) fn ahead_options(revision: i64, limit: i64) -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_max_create_revision(revision - 1)
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(limit)
}

/// Every key under a prefix (a lock's delay keys, say).
pub(super) fn under(prefix: &[u8]) -> TxnOp {
    TxnOp::get(prefix, Some(GetOptions::new().with_prefix()))
}

/// True when the key does not exist.
pub(super) fn absent(key: Vec<u8>) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, 0)
}

/// True when no key has the prefix.
pub(super) fn empty(prefix: &[u8]) -> Compare {
    Compare::create_revision(prefix, CompareOp::Equal, 0).with_prefix()
}

/// True when every key with the prefix was created at `revision` or later: the key created
/// at `revision` is first in line (or gone).
pub(super) fn first_since(prefix: &[u8], revision: i64) -> Compare {
    Compare::create_revision(prefix, CompareOp::Greater, revision - 1).with_prefix()
}

/// The range answer of the `i`-th operation of a transaction.
pub(super) fn range(response: &TxnResponse, i: usize) -> Option<GetResponse> {
    match response.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(get)) => Some(get),
        _ => None,
    }
}

/// The key-value pairs of the `i`-th operation's range answer.
pub(super) fn kvs(response: &TxnResponse, i: usize) -> Vec<KeyValue> {
    range(response, i).map_or_else(Vec::new, |mut r| r.take_kvs())
}

/// The first key-value pair of the `i`-th operation's range answer.
pub(super) fn first(response: &TxnResponse, i: usize) -> Option<KeyValue> {
    kvs(response, i).into_iter().next()
}

/// The key count of the `i`-th operation's range answer (filters do not apply to it).
pub(super) fn count_of(response: &TxnResponse, i: usize) -> i64 {
    range(response, i).map_or(0, |r| r.count())
}

/// The revision a response was served at.
pub(super) fn revision(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}
