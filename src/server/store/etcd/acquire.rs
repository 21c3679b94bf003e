//! Acquire on etcd: take a place in line, or find the one a request already has (the
//! waiting itself is in `wait.rs`).

use super::Inner;
use super::call::{
    EtcdError, absent, count, count_of, delete, empty, first, get, kvs, put, queue_newest,
    queue_oldest, revision,
};
use super::keys::{Entry, LeaseId, LockKeys, Slot, project_queues, unix_ms};
use super::leases::ttl_for;
use super::limits::Gate;
use crate::server::store::{AcquireOutcome, AcquireSpec, Grant};
use etcd_client::{Compare, CompareOp, KeyValue, Txn};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// An acquire's place in a lock's queue.
#[derive(Debug, Clone)]
pub(super) struct Place {
    pub lease: LeaseId,
    /// The create revision of its queue key: its order in line, its fencing token, and
    /// what tells it from a later place under the same (reused) key name.
    pub revision: i64,
    pub entry: Entry,
    /// The queue key.
    pub key: Vec<u8>,
    pub request_key: Vec<u8>,
}

impl Place {
    /// The grant, to an acquire call whose lease was last kept alive `waited` after the
    /// call began (so etcd ends it no earlier than `waited + lease` after that).
    pub(super) fn grant(&self, waited: Duration) -> Grant {
        Grant {
            lease_id: self.lease.to_id(),
            fencing_token: self.revision as u64,
            lease: self.entry.lease_at(unix_ms(SystemTime::now())),
            waited,
        }
    }
}

enum Placed {
    Done(AcquireOutcome),
    /// In line; where it stands, if known already.
    Waiting(Place, Option<Standing>),
}

/// Where a waiter stands.
pub(super) enum Standing {
    /// Its key is gone (cancelled, or its lease ran out).
    Gone,
    /// First in line: it holds the lock.
    Head,
    /// Behind `predecessor`, as of `revision`. `head` is the first in line, when known: if
    /// it is the predecessor and has a `max_hold`, this waiter ends it when that is over.
    Behind {
        predecessor: Vec<u8>,
        revision: i64,
        head: Option<Box<KeyValue>>,
    },
}

impl Inner {
    pub(super) async fn acquire(&self, spec: AcquireSpec) -> Result<AcquireOutcome, EtcdError> {
        let arrived = Instant::now();
        let poll = spec.wait.map_or(spec.poll, |w| w.min(spec.poll));
        let last_poll = spec.wait.is_some_and(|w| w <= spec.poll);
        let keys = self.keys(&spec.project, &spec.name);
        let (place, standing) = match self.find_or_queue(&spec, &keys).await? {
            Placed::Done(outcome) => return Ok(outcome),
            Placed::Waiting(place, standing) => (place, standing),
        };
        self.wait(&keys, place, standing, arrived, arrived + poll, last_poll)
            .await
    }

    /// Resumes the request's place, or queues it (granting at once if the lock is free).
    async fn find_or_queue(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
    ) -> Result<Placed, EtcdError> {
        let ask = ttl_for(spec.lease);
        let slot = Slot::of(spec.request_id);
        let request_key = keys.request_key(slot);
        let try_once = spec.wait == Some(Duration::ZERO);
        // A key whose lease just ran out, or a spare that did, costs a round; a few suffice.
        // After a spare that ran out, fresh leases only: the others may be as old.
        let mut spares_stale = false;
        for _ in 0..4 {
            if spec.quota.max_locks.is_some() {
                self.check_lock_quota(spec, keys).await?;
            }
            let lease = if spares_stale {
                self.leases.grant(ask).await?
            } else {
                self.leases.take(ask).await?
            };
            let key = keys.queue_key(lease.id);
            let entry = Entry {
                ttl: lease.ttl,
                ask,
                at: unix_ms(SystemTime::now()),
                granted: None,
                label: spec.label.clone(),
                max_hold_ms: spec.max_hold.map(|d| d.as_millis() as u64),
                lock_delay_ms: spec.lock_delay.map(|d| d.as_millis() as u64),
                delay_lease: None,
            };
            let mut when = vec![absent(request_key.clone()), absent(key.clone())];
            if try_once {
                when.push(empty(keys.queue()));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(vec![
                    put(request_key.clone(), spec.request_id.to_string(), lease.id),
                    put(key.clone(), entry.encode(), lease.id),
                    // The new key and the one just ahead of it (if any).
                    queue_newest(keys.queue(), 2),
                    queue_oldest(keys.queue(), 1),
                ])
                .or_else(vec![
                    get(request_key.clone()),
                    queue_oldest(keys.queue(), 1),
                    get(key.clone()),
                ]);
            // A spare is refreshed at the same time, so that it runs a full TTL from now; a
            // fresh lease was granted for this request.
            let (answer, kept) = tokio::join!(self.etcd.txn("queue", txn), async {
                if lease.fresh {
                    Ok(())
                } else {
                    self.etcd.keep_alive(lease.id, lease.ttl).await
                }
            });
            let answer = match answer {
                // The spare ran out before the transaction: nothing was written.
                Err(EtcdError::LeaseGone) => {
                    spares_stale = true;
                    continue;
                }
                other => other?,
            };
            if !answer.succeeded() {
                // A queue key under this etcd lease's name means the lease serves another
                // acquire: never hand it out again.
                let name_taken = first(&answer, 2).is_some();
                if kept.is_ok() && !name_taken {
                    self.leases.put_back(ask, lease);
                }
                if let Some(existing) = first(&answer, 0) {
                    match self.resume(spec, keys, &existing).await? {
                        Some(place) => return Ok(Placed::Waiting(place, None)),
                        // Its lease ran out: etcd is deleting the keys. Look again.
                        None => continue,
                    }
                }
                if try_once && let Some(head) = first(&answer, 1) {
                    // Tried once, and the lock is taken.
                    let holder = self.holder_view(&head).await?;
                    return Ok(Placed::Done(AcquireOutcome::TimedOut { holder }));
                }
                continue;
            }
            let mut place = Place {
                lease: LeaseId {
                    slot,
                    etcd: lease.id,
                },
                revision: revision(&answer),
                entry,
                key,
                request_key: request_key.clone(),
            };
            match kept {
                Ok(()) => {}
                // The spare ran out between the write and the keep-alive: so did the key.
                Err(EtcdError::LeaseGone) => {
                    spares_stale = true;
                    continue;
                }
                // Unknown whether the spare still runs. The place stays: the client's retry
                // (on any server) resumes it with a keep-alive of its own, and if none comes,
                // it ends with its lease. Giving it up here could delete it after a retry
                // elsewhere was granted it.
                Err(e) => return Err(e),
            }
            let in_line = count_of(&answer, 2);
            let Some(predecessor) = kvs(&answer, 2).get(1).map(|kv| kv.key().to_vec()) else {
                return match self.gate(keys, &mut place).await? {
                    // The lease was refreshed (or granted) after this call began.
                    Gate::Open => Ok(Placed::Done(AcquireOutcome::Granted(
                        place.grant(Duration::ZERO),
                    ))),
                    Gate::HeldBack if try_once => {
                        self.give_up(&place);
                        Ok(Placed::Done(AcquireOutcome::TimedOut { holder: None }))
                    }
                    Gate::HeldBack => Ok(Placed::Waiting(place, Some(Standing::Head))),
                    Gate::Gone => continue,
                };
            };
            let max_waiters = spec
                .quota
                .max_waiters_per_lock
                .map_or(self.max_waiters_per_lock as u64, |q| {
                    q.min(self.max_waiters_per_lock as u64)
                });
            if in_line as u64 - 1 > max_waiters {
                self.give_up(&place);
                return Err(EtcdError::Full(format!(
                    "lock already has {} waiters, the most allowed",
                    in_line - 2
                )));
            }
            let standing = Standing::Behind {
                predecessor,
                revision: place.revision,
                head: first(&answer, 3).map(Box::new),
            };
            return Ok(Placed::Waiting(place, Some(standing)));
        }
        Err(EtcdError::Unavailable(
            "could not queue the acquire (leases kept running out)".into(),
        ))
    }

    /// The place a request already has (`request` is its request key), refreshed with a
    /// keep-alive; `None` if its lease has run out.
    async fn resume(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
        request: &KeyValue,
    ) -> Result<Option<Place>, EtcdError> {
        if request.value() != spec.request_id.to_string().as_bytes() {
            // Two request ids with the same 64-bit slot: astronomically rare.
            return Err(EtcdError::Unavailable(
                "request id collision; retry with a new request id".into(),
            ));
        }
        let lease = request.lease();
        let key = keys.queue_key(lease);
        let (queued, kept) = tokio::join!(
            self.etcd.get("resume", &key, None),
            self.etcd.keep_alive(lease, ttl_for(spec.lease))
        );
        match kept {
            Ok(()) => {}
            Err(EtcdError::LeaseGone) => return Ok(None),
            Err(e) => return Err(e),
        }
        // Both keys of a place are written in one transaction, so they share a create
        // revision. A queue key under the same name with another revision belongs to a later
        // acquire that reuses the etcd lease (this request was released meanwhile).
        let Some(queued) = queued?
            .take_kvs()
            .into_iter()
            .find(|kv| kv.lease() == lease && kv.create_revision() == request.create_revision())
        else {
            return Ok(None);
        };
        Ok(Some(Place {
            lease: LeaseId {
                slot: Slot::of(spec.request_id),
                etcd: lease,
            },
            revision: queued.create_revision(),
            entry: Entry::decode(queued.value()),
            key,
            request_key: request.key().to_vec(),
        }))
    }

    /// Leaves the line off the caller's path: deletes the place's keys if they are still
    /// there, and only then revokes its etcd lease. (Had the keys gone another way, a
    /// release may have handed the etcd lease to a new acquire meanwhile.)
    pub(super) fn give_up(&self, place: &Place) {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                place.key.clone(),
                CompareOp::Equal,
                place.revision,
            )])
            .and_then(vec![
                delete(place.key.clone()),
                delete(place.request_key.clone()),
            ]);
        let etcd = self.etcd.clone();
        let lease = place.lease.etcd;
        tokio::spawn(async move {
            if let Ok(answer) = etcd.txn("give_up", txn).await
                && answer.succeeded()
            {
                let _ = etcd.revoke(lease).await;
            }
        });
    }

    /// Refuses a new lock beyond the project's lock quota. Checked before queueing, so two
    /// servers creating locks at the same moment may both pass.
    async fn check_lock_quota(&self, spec: &AcquireSpec, keys: &LockKeys) -> Result<(), EtcdError> {
        let Some(max) = spec.quota.max_locks else {
            return Ok(());
        };
        let project = project_queues(&self.prefix, &spec.project.name);
        let answer = self
            .etcd
            .txn(
                "lock_quota",
                Txn::new().and_then(vec![count(keys.queue()), count(&project)]),
            )
            .await?;
        if count_of(&answer, 0) > 0 || (count_of(&answer, 1) as u64) < max {
            // The lock exists already, or the project has fewer keys than locks allowed.
            return Ok(());
        }
        // Count locks, not keys: a lock with waiters has several.
        let locks = self.count_locks("lock_quota", &project, max).await?;
        if locks >= max {
            return Err(EtcdError::Full(format!(
                "the project has {locks} locks held or waited for, the most allowed"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::{LeaseId, Slot};
    use super::super::store_for_tests;
    use crate::id::Id;
    use crate::server::store::{AcquireOutcome, AcquireSpec, Grant, Project, Release};
    use std::time::Duration;

    fn spec() -> AcquireSpec {
        AcquireSpec {
            project: Project {
                id: 0,
                name: "project".into(),
            },
            name: "lock".into(),
            lease: Duration::from_secs(10),
            wait: Some(Duration::ZERO),
            poll: Duration::from_secs(1),
            request_id: Id::random(),
            label: None,
            quota: Default::default(),
            max_hold: None,
            lock_delay: None,
            mode: Default::default(),
            value: None,
        }
    }

    fn granted(outcome: AcquireOutcome) -> Grant {
        match outcome {
            AcquireOutcome::Granted(grant) => grant,
            other => panic!("not granted: {other:?}"),
        }
    }

    /// Spares whose etcd leases ended in the pool (their holders stopped renewing long before
    /// releasing) cost an acquire one round, not a `503` after a round for each.
    #[tokio::test]
    async fn spares_that_ran_out_in_the_pool_cost_one_round() {
        let (etcd, store) = store_for_tests().await;
        let inner = &store.inner;
        let mut spares = Vec::new();
        let mut grants = Vec::new();
        for i in 0..4 {
            let spec = AcquireSpec {
                name: format!("lock{i}"),
                ..spec()
            };
            grants.push((spec.clone(), granted(inner.acquire(spec).await.unwrap())));
        }
        for (spec, grant) in grants {
            let released = inner
                .release(&spec.project, &spec.name, grant.lease_id)
                .await;
            assert_eq!(released.unwrap(), Release::Released);
            spares.push(LeaseId::from_id(grant.lease_id).unwrap().etcd);
        }
        let mut direct = etcd.client().await;
        for lease in spares {
            direct.lease_revoke(lease).await.unwrap();
        }
        granted(inner.acquire(spec()).await.expect("granted"));
    }

    /// A late attempt of a request that was granted and released meanwhile (through another
    /// server, say) finds its request key, read before the release, and a queue key of the
    /// same name: a later acquire's, which reuses the etcd lease. That place is not its own.
    #[tokio::test]
    async fn a_late_attempt_does_not_resume_a_later_acquire_on_the_same_etcd_lease() {
        let (_etcd, store) = store_for_tests().await;
        let inner = &store.inner;
        let a = spec();
        let keys = inner.keys(&a.project, &a.name);
        let grant_a = granted(inner.acquire(a.clone()).await.unwrap());
        let request_key = keys.request_key(Slot::of(a.request_id));
        let read_late = inner.etcd.get("test", &request_key, None).await.unwrap();
        let request = read_late.kvs().first().expect("A's request key").clone();

        let released = inner.release(&a.project, &a.name, grant_a.lease_id).await;
        assert_eq!(released.unwrap(), Release::Released);
        let grant_b = granted(inner.acquire(spec()).await.unwrap());
        let etcd_lease = |grant: &Grant| LeaseId::from_id(grant.lease_id).unwrap().etcd;
        assert_eq!(
            etcd_lease(&grant_b),
            etcd_lease(&grant_a),
            "B reuses A's etcd lease"
        );

        let resumed = inner.resume(&a, &keys, &request).await.unwrap();
        assert!(
            resumed.is_none(),
            "A's late attempt took B's place (fencing token {:?}, B's is {})",
            resumed.map(|p| p.revision),
            grant_b.fencing_token
        );
    }
}
