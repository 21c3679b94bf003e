//! Group commit: acquires and releases that arrive at a server while others are in flight
//! share one etcd transaction.
//!
//! Every etcd transaction has a fixed cost in etcd besides its keys: a gRPC call, a raft
//! entry, and (etcd 3.4) a copy of every write not yet committed to its database, made to
//! check the transaction's conditions. With many clients that cost dominated acquires and
//! releases (`BENCH_ONLY_DISTINCT` in `benches/etcd.rs`, etcd's CPU profile). So a request
//! that finds no other in flight goes alone, as before (a lone acquire or hand-over waits
//! for nobody), and the others are collected while up to `IN_FLIGHT` shared transactions
//! are in flight, then committed together (acquires and releases alike: one batcher for
//! both carried 4 % more pairs/s than one for each, in alternating runs).
//!
//! A shared transaction runs every request's operations on the condition that every one of
//! their conditions holds. If any does not, nothing happens and every request goes alone
//! (each then finds out for itself, with its own `else` branch). Two requests with the same
//! tag (the same lock) never share one: their keys would get one revision, and a lock's
//! places, fencing tokens and holders are told apart by revision.

use super::call::{Etcd, EtcdError};
use etcd_client::{Compare, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Shared transactions in flight at once (1, 2 and 4 measured alike).
const IN_FLIGHT: usize = 2;

/// etcd's default limit on a transaction's conditions, and on its operations
/// (`--max-txn-ops`); a shared transaction stays within both.
const MAX_TXN_OPS: usize = 128;

/// One request's transaction.
#[derive(Debug)]
pub(super) struct Job {
    /// Requests with the same tag never share a transaction (the lock's queue prefix).
    pub tag: Vec<u8>,
    pub when: Vec<Compare>,
    pub ops: Vec<TxnOp>,
    /// Its `else` branch: run only when it goes alone.
    pub otherwise: Vec<TxnOp>,
}

impl Job {
    /// Runs it alone, as the etcd call `what`.
    pub async fn alone(self, etcd: &Etcd, what: &'static str) -> Result<Outcome, EtcdError> {
        let txn = Txn::new()
            .when(self.when)
            .and_then(self.ops)
            .or_else(self.otherwise);
        let (answer, attempts) = etcd.txn_counted(what, txn).await?;
        Ok(Outcome {
            succeeded: answer.succeeded(),
            answers: Answers::of(&answer),
            maybe_applied: attempts > 1,
        })
    }
}

/// The answers to one request's operations.
#[derive(Debug)]
pub(super) struct Answers {
    /// The revision the transaction was served at (its writes' revision).
    pub revision: i64,
    ops: Vec<TxnOpResponse>,
}

impl Answers {
    pub fn of(response: &TxnResponse) -> Answers {
        Answers {
            revision: response.header().map_or(0, |h| h.revision()),
            ops: response.op_responses(),
        }
    }

    /// The key-value pairs of the `i`-th operation's range answer.
    pub fn kvs(&self, i: usize) -> Vec<KeyValue> {
        match self.ops.get(i) {
            Some(TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        }
    }

    /// The first key-value pair of the `i`-th operation's range answer.
    pub fn first(&self, i: usize) -> Option<KeyValue> {
        match self.ops.get(i) {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
            _ => None,
        }
    }

    /// The key count of the `i`-th operation's range answer (filters do not apply to it).
    pub fn count_of(&self, i: usize) -> i64 {
        match self.ops.get(i) {
            Some(TxnOpResponse::Get(get)) => get.count(),
            _ => 0,
        }
    }
}

/// How a request's transaction went.
#[derive(Debug)]
pub(super) struct Outcome {
    pub succeeded: bool,
    /// The answers of its `then` operations if it succeeded, else of its `else` branch.
    pub answers: Answers,
    /// An earlier attempt may have taken effect and lost its answer (a retried call, or a
    /// shared transaction whose outcome is unknown).
    pub maybe_applied: bool,
}

/// What a queued request does next.
#[derive(Debug)]
enum Batched {
    /// Its operations ran in a shared transaction that succeeded.
    Shared(Answers),
    /// Not settled: it goes alone (the job comes back for that). `maybe_applied` as in
    /// `Outcome`.
    Alone { job: Job, maybe_applied: bool },
}

struct Queued {
    job: Job,
    answer: oneshot::Sender<Batched>,
}

/// The server's batcher.
#[derive(Debug)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
    /// Requests in flight through `run`, alone or shared.
    in_flight: Arc<AtomicUsize>,
}

/// A request in flight; counted until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Batcher {
    /// Starts a batcher whose shared transactions are the etcd call `shared` (a task that
    /// ends with the store).
    pub fn start(etcd: Etcd, shared: &'static str) -> Batcher {
        let (queue, arrivals) = mpsc::unbounded_channel();
        tokio::spawn(collect(etcd, shared, arrivals));
        Batcher {
            queue,
            in_flight: Arc::default(),
        }
    }

    /// Runs `job`: in a shared transaction if other requests are in flight, else (or when
    /// that does not settle it) alone, as the etcd call `what`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves a queued job in its shared transaction, which may still
    /// commit, as a transaction already sent may.
    pub async fn run(
        &self,
        etcd: &Etcd,
        what: &'static str,
        job: Job,
    ) -> Result<Outcome, EtcdError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _counted = InFlight(self.in_flight.clone());
        if before == 0 {
            return job.alone(etcd, what).await;
        }
        match self.submit(job).await? {
            Batched::Shared(answers) => Ok(Outcome {
                succeeded: true,
                answers,
                maybe_applied: false,
            }),
            Batched::Alone { job, maybe_applied } => {
                let outcome = job.alone(etcd, what).await?;
                Ok(Outcome {
                    maybe_applied: outcome.maybe_applied || maybe_applied,
                    ..outcome
                })
            }
        }
    }

    async fn submit(&self, job: Job) -> Result<Batched, EtcdError> {
        let (answer, answered) = oneshot::channel();
        if let Err(refused) = self.queue.send(Queued { job, answer }) {
            return Ok(Batched::Alone {
                job: refused.0.job,
                maybe_applied: false,
            });
        }
        // Only a batch task that ended without answering (the runtime shutting down) drops
        // the job; it may have committed it.
        answered
            .await
            .map_err(|_| EtcdError::Unavailable("the server is shutting down".into()))
    }
}

/// Collects arrivals into batches while earlier batches are in flight.
async fn collect(etcd: Etcd, shared: &'static str, mut arrivals: mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match arrivals.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while waiting for a slot joins, within etcd's limits.
        let (mut when, mut ops) = (first.job.when.len(), first.job.ops.len());
        let mut batch = vec![first];
        while let Ok(more) = arrivals.try_recv() {
            when += more.job.when.len();
            ops += more.job.ops.len();
            if when > MAX_TXN_OPS || ops > MAX_TXN_OPS {
                next = Some(more);
                break;
            }
            batch.push(more);
        }
        let etcd = etcd.clone();
        tokio::spawn(async move {
            commit(&etcd, shared, batch).await;
            drop(slot);
        });
    }
}

/// Commits a batch in one transaction, or sends its requests back to go alone.
async fn commit(etcd: &Etcd, shared: &'static str, batch: Vec<Queued>) {
    let mut seen = HashSet::new();
    let (batch, twice): (Vec<Queued>, Vec<Queued>) = batch
        .into_iter()
        .partition(|q| seen.insert(q.job.tag.clone()));
    send_alone(twice, false);
    if batch.len() < 2 {
        return send_alone(batch, false);
    }
    // Copies: each job goes back whole should the shared transaction not settle it.
    let when: Vec<Compare> = batch.iter().flat_map(|q| q.job.when.clone()).collect();
    let ops: Vec<TxnOp> = batch.iter().flat_map(|q| q.job.ops.clone()).collect();
    let txn = Txn::new().when(when).and_then(ops);
    match etcd.txn_counted(shared, txn).await {
        Ok((answer, _)) if answer.succeeded() => {
            let revision = answer.header().map_or(0, |h| h.revision());
            let mut all = answer.op_responses().into_iter();
            for q in batch {
                let ops = all.by_ref().take(q.job.ops.len()).collect();
                let _ = q.answer.send(Batched::Shared(Answers { revision, ops }));
            }
        }
        Ok((_, attempts)) => send_alone(batch, attempts > 1),
        // Unknown whether it took effect.
        Err(_) => send_alone(batch, true),
    }
}

fn send_alone(queued: Vec<Queued>, maybe_applied: bool) {
    for Queued { job, answer } in queued {
        let _ = answer.send(Batched::Alone { job, maybe_applied });
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::LeaseId;
    use super::super::{granted, spec_for_tests as spec, store_for_tests};
    use crate::server::store::{AcquireSpec, Mode, Release};
    use futures_util::future::join_all;
    use std::collections::HashSet;
    use std::time::Duration;

    /// Releases in flight together share transactions, and each still answers for itself:
    /// every lock is released exactly once (a lease released twice at once included), one
    /// whose lease no longer holds is told so without holding the others back. Acquires
    /// share too, never two of one lock, and no etcd lease ends up serving two places.
    #[tokio::test]
    async fn requests_in_flight_together_share_transactions_and_each_answers_for_itself() {
        let (etcd, store) = store_for_tests().await;
        let inner = &store.inner;
        let names: Vec<String> = (0..12).map(|i| format!("lock{i}")).collect();
        let mut grants = Vec::new();
        for name in &names {
            grants.push(granted(inner.acquire(spec(name)).await.unwrap()));
        }
        let project = spec("").project;
        let release = |i: usize| inner.release(&project, &names[i], grants[i].lease_id);

        // Six at once, the fifth twice: the first goes alone, the others share.
        let batches_before = inner.etcd.metrics.calls("batch");
        let first_six = join_all((0..6).chain([4]).map(release)).await;
        let first_six: Vec<Release> = first_six.into_iter().map(Result::unwrap).collect();
        assert!(
            inner.etcd.metrics.calls("batch") > batches_before,
            "no shared transaction"
        );
        assert!(first_six[..4].iter().all(|r| *r == Release::Released));
        assert_eq!(first_six[5], Release::Released);
        let fifth: Vec<&Release> = [&first_six[4], &first_six[6]].into();
        assert_eq!(
            fifth.iter().filter(|r| ***r == Release::Released).count(),
            1,
            "a lease released twice at once is released once: {fifth:?}"
        );

        // Six more, one of them no longer held (its etcd lease revoked behind our back).
        let lost = LeaseId::from_id(grants[8].lease_id).unwrap().etcd;
        etcd.client().await.lease_revoke(lost).await.unwrap();
        let last_six = join_all((6..12).map(release)).await;
        for (i, released) in (6..12).zip(last_six) {
            let expected = if i == 8 {
                Release::NoSuchLock
            } else {
                Release::Released
            };
            assert_eq!(released.unwrap(), expected, "lock{i}");
        }

        // Every lock is free again. Acquires in flight together share transactions too, but
        // never two of one lock (three readers here): each keeps a revision, its fencing
        // token, of its own. And each new holder has an etcd lease of its own.
        let queue_batches = inner.etcd.metrics.calls("batch");
        let writers = names.iter().map(|name| AcquireSpec {
            wait: Some(Duration::from_secs(5)),
            ..spec(name)
        });
        let readers = (0..3).map(|_| AcquireSpec {
            mode: Mode::Shared,
            ..spec("readers")
        });
        let specs: Vec<AcquireSpec> = writers.chain(readers).collect();
        let grants = join_all(specs.iter().map(|s| inner.acquire(s.clone()))).await;
        assert!(
            inner.etcd.metrics.calls("batch") > queue_batches,
            "no shared acquire"
        );
        let mut leases = HashSet::new();
        let mut reader_tokens = HashSet::new();
        for (spec, outcome) in specs.iter().zip(grants) {
            let grant = granted(outcome.unwrap());
            let lease = LeaseId::from_id(grant.lease_id).unwrap().etcd;
            assert!(
                leases.insert(lease),
                "{} shares etcd lease {lease}",
                spec.name
            );
            if spec.mode == Mode::Shared {
                assert!(reader_tokens.insert(grant.fencing_token));
            }
        }
    }

    /// A shared transaction whose conditions fail writes nothing, and each of its requests
    /// then goes alone: here a late first attempt of an acquire (whose repeat wrote its request
    /// key) shares one with new acquires; the retry gets its first grant back, and each new one is granted once.
    #[tokio::test]
    async fn a_retry_in_a_shared_transaction_sends_everyone_alone_and_gets_its_grant_back() {
        let (_etcd, store) = store_for_tests().await;
        let inner = &store.inner;
        // Spares in the pool, so that every acquire below reaches the batcher at once.
        let project = &spec("").project;
        let warm: Vec<_> = (0..8).map(|i| spec(&format!("warm{i}"))).collect();
        let grants = join_all(warm.iter().map(|s| inner.acquire(s.clone()))).await;
        let releases = warm.iter().zip(grants).map(|(s, outcome)| {
            let grant = granted(outcome.unwrap());
            inner.release(project, &s.name, grant.lease_id)
        });
        for released in join_all(releases).await {
            assert_eq!(released.unwrap(), Release::Released);
        }
        let calls = |call| inner.etcd.metrics.calls(call);
        // Waiting allowed: an exclusive acquire tried once always goes alone.
        let first = AcquireSpec {
            wait: Some(Duration::from_secs(5)),
            ..spec("retried")
        };
        let grant = granted(inner.acquire(first.clone()).await.unwrap());

        let new: Vec<AcquireSpec> = (0..6)
            .map(|i| AcquireSpec {
                wait: Some(Duration::from_secs(5)),
                first: true,
                ..spec(&format!("new{i}"))
            })
            .collect();
        // The retry last, so that it joins the others' shared transaction. It comes as a first
        // attempt that took its time on the way, after a repeat of it was placed (with its
        // request key): it is the one attempt that writes in the shared transaction and fails.
        let late_first = AcquireSpec {
            first: true,
            ..first
        };
        let specs: Vec<AcquireSpec> = new.into_iter().chain([late_first]).collect();
        let (batches, alone) = (calls("batch"), calls("queue"));
        let outcomes = join_all(specs.iter().map(|s| inner.acquire(s.clone()))).await;
        assert!(calls("batch") > batches, "no shared transaction");
        // The first went alone at once; the six that shared went alone after it failed.
        assert!(
            calls("queue") - alone >= 7,
            "{} alone",
            calls("queue") - alone
        );
        let mut outcomes: Vec<_> = outcomes.into_iter().map(|o| granted(o.unwrap())).collect();
        let again = outcomes.pop().expect("the retry's outcome");
        assert_eq!(again.lease_id, grant.lease_id, "the retry's own lease");
        assert_eq!(again.fencing_token, grant.fencing_token);
        let leases: HashSet<_> = outcomes.iter().map(|g| g.lease_id).collect();
        assert_eq!(
            leases.len(),
            6,
            "each new acquire granted once, on a lease of its own"
        );
        assert!(!leases.contains(&grant.lease_id));
    }
}
