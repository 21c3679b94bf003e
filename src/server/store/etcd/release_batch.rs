//! Group commit for releases: releases that arrive at a server while others are in flight
//! share one etcd transaction.
//!
//! Every etcd transaction has a fixed cost in etcd besides its keys: a gRPC call, a raft
//! entry, and (etcd 3.4) a copy of every write not yet committed to its database, made to
//! check the transaction's conditions. With many clients that cost dominated the release
//! (`BENCH_ONLY_DISTINCT` in `benches/etcd.rs`, etcd's CPU profile). So a release that
//! finds no other release in flight goes alone, as before (a lone hand-over is not delayed),
//! and the others are collected while up to `IN_FLIGHT` shared transactions are in flight,
//! then committed together.
//!
//! A shared transaction deletes each release's keys on the condition that every one of them
//! is still held by its etcd lease. If any is not, nothing happens, and every release of the
//! batch goes alone (each then finds out for itself). Two releases of the same lease never
//! share one: the second goes alone, so that a lease is freed, and reused, once.

use super::call::{Etcd, delete, first, get};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Shared transactions in flight at once.
const IN_FLIGHT: usize = 2;

/// Most releases in one transaction: four operations each, within etcd's default limit of
/// 128 operations per transaction (`--max-txn-ops`).
const MOST_PER_BATCH: usize = 16;

/// What a release does next.
#[derive(Debug)]
pub(super) enum Batched {
    /// Released by a shared transaction; the queue key as it was just before.
    Released(Option<KeyValue>),
    /// Not settled: release alone. `maybe_applied`: an earlier attempt of a shared
    /// transaction may have taken effect and lost its answer (so keys found missing were
    /// released by it).
    Alone { maybe_applied: bool },
}

/// One release's keys.
#[derive(Debug)]
pub(super) struct Job {
    pub key: Vec<u8>,
    pub request_key: Vec<u8>,
    pub delay_key: Vec<u8>,
    pub lease: i64,
}

struct Queued {
    job: Job,
    answer: oneshot::Sender<Batched>,
}

/// The server's release batcher.
#[derive(Debug)]
pub(super) struct ReleaseBatch {
    queue: mpsc::UnboundedSender<Queued>,
    /// Releases in flight through `release`, alone or shared.
    in_flight: Arc<AtomicUsize>,
}

/// A release in flight; counted until dropped.
pub(super) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReleaseBatch {
    /// Starts the batcher (a task that ends with the store).
    pub fn start(etcd: Etcd) -> ReleaseBatch {
        let (queue, arrivals) = mpsc::unbounded_channel();
        tokio::spawn(collect(etcd, arrivals));
        ReleaseBatch {
            queue,
            in_flight: Arc::default(),
        }
    }

    /// Counts a release in flight until the guard is dropped, and says whether it goes alone
    /// (no other release is in flight) or through `submit`.
    pub fn begin(&self) -> (InFlight, bool) {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        (InFlight(self.in_flight.clone()), before == 0)
    }

    /// Queues a release for the next shared transaction.
    pub async fn submit(&self, job: Job) -> Batched {
        let (answer, answered) = oneshot::channel();
        if self.queue.send(Queued { job, answer }).is_err() {
            return Batched::Alone {
                maybe_applied: false,
            };
        }
        // A batch task that ended without answering (the runtime shutting down) may have
        // committed it.
        answered.await.unwrap_or(Batched::Alone {
            maybe_applied: true,
        })
    }
}

/// Collects arrivals into batches while earlier batches are in flight.
async fn collect(etcd: Etcd, mut arrivals: mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = arrivals.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while waiting for a slot joins.
        let mut batch = vec![first];
        while batch.len() < MOST_PER_BATCH {
            match arrivals.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let etcd = etcd.clone();
        tokio::spawn(async move {
            commit(&etcd, batch).await;
            drop(slot);
        });
    }
}

/// Commits a batch in one transaction, or sends its releases back to go alone.
async fn commit(etcd: &Etcd, batch: Vec<Queued>) {
    let mut seen = HashSet::new();
    let (shared, twice): (Vec<Queued>, Vec<Queued>) = batch
        .into_iter()
        .partition(|q| seen.insert(q.job.key.clone()));
    let alone = |queued: Vec<Queued>, maybe_applied: bool| {
        for q in queued {
            let _ = q.answer.send(Batched::Alone { maybe_applied });
        }
    };
    alone(twice, false);
    if shared.len() < 2 {
        return alone(shared, false);
    }
    let held_by = |key: &[u8], lease| Compare::lease(key.to_vec(), CompareOp::Equal, lease);
    let mut when = Vec::with_capacity(2 * shared.len());
    let mut ops: Vec<TxnOp> = Vec::with_capacity(OPS_PER_RELEASE * shared.len());
    for Queued { job, .. } in &shared {
        when.push(held_by(&job.request_key, job.lease));
        when.push(held_by(&job.key, job.lease));
        // As in a lone release: the entry as it was, then the keys and the delay key.
        ops.extend([
            get(job.key.clone()),
            delete(job.key.clone()),
            delete(job.request_key.clone()),
            delete(job.delay_key.clone()),
        ]);
    }
    let txn = Txn::new().when(when).and_then(ops);
    match etcd.txn_counted("release_batch", txn).await {
        Ok((answer, _)) if answer.succeeded() => {
            for (i, q) in shared.into_iter().enumerate() {
                let entry = first(&answer, OPS_PER_RELEASE * i);
                let _ = q.answer.send(Batched::Released(entry));
            }
        }
        Ok((_, attempts)) => alone(shared, attempts > 1),
        // Unknown whether it took effect.
        Err(_) => alone(shared, true),
    }
}

/// Operations per release in a shared transaction.
const OPS_PER_RELEASE: usize = 4;

#[cfg(test)]
mod tests {
    use super::super::keys::LeaseId;
    use super::super::{granted, spec_for_tests as spec, store_for_tests};
    use crate::server::store::Release;
    use futures_util::future::join_all;
    use std::collections::HashSet;

    /// Releases in flight together share transactions, and each still answers for itself:
    /// every lock is released exactly once (a lease released twice at once included), one
    /// whose lease no longer holds is told so without holding the others back, and no etcd
    /// lease ends up serving two locks.
    #[tokio::test]
    async fn releases_in_flight_together_share_transactions_and_each_answers_for_itself() {
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
        let batches_before = inner.etcd.metrics.calls("release_batch");
        let first_six = join_all((0..6).chain([4]).map(release)).await;
        let first_six: Vec<Release> = first_six.into_iter().map(Result::unwrap).collect();
        assert!(
            inner.etcd.metrics.calls("release_batch") > batches_before,
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

        // Every lock is free again, and each new holder has an etcd lease of its own.
        let regrants = join_all(names.iter().map(|n| inner.acquire(spec(n)))).await;
        let mut leases = HashSet::new();
        for (name, outcome) in names.iter().zip(regrants) {
            let grant = granted(outcome.unwrap());
            let lease = LeaseId::from_id(grant.lease_id).unwrap().etcd;
            assert!(leases.insert(lease), "{name} shares etcd lease {lease}");
        }
    }
}
