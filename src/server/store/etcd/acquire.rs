//! Acquire on etcd: take a place in line, or find the one a request already has (the
//! waiting itself is in `wait.rs`).

use super::Inner;
use super::batch;
use super::call::{
    EtcdError, absent, count, delete, empty, first, get, kvs, put, queue_newest, queue_oldest,
    under,
};
use super::keys::{
    Entry, LeaseId, LockKeys, Proof, Slot, project_queues, read_request_value, request_value,
    unix_ms,
};
use super::leases::ttl_for;
use super::rule;
use super::wait::{Standing, standing_from};
use crate::server::store::{AcquireOutcome, AcquireSpec, Grant, Mode};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
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
    /// Its request key, if it has one (a place queued by a repeated attempt).
    pub request_key: Option<Vec<u8>>,
}

impl Place {
    /// The place of `queued`, a queue key without a request key (a first attempt's).
    fn without_request_key(queued: &KeyValue) -> Place {
        Place {
            lease: LeaseId {
                proof: Proof::Revision(queued.create_revision()),
                etcd: queued.lease(),
            },
            revision: queued.create_revision(),
            entry: Entry::decode(queued.value()),
            key: queued.key().to_vec(),
            request_key: None,
        }
    }

    /// A transaction that deletes this place's keys if they are still this place's (same
    /// create revision: the key name is reused), followed by `more` in the same success
    /// branch.
    pub(super) fn leave(&self, more: Vec<TxnOp>) -> Txn {
        let mut ops = vec![delete(self.key.clone())];
        ops.extend(self.request_key.iter().map(|key| delete(key.clone())));
        ops.extend(more);
        Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.revision,
            )])
            .and_then(ops)
    }

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

// Returned once per acquire and unpacked at once: boxing the place would only allocate.
#[allow(clippy::large_enum_variant)]
enum Placed {
    Done(AcquireOutcome),
    /// In line; where it stands, if known already.
    Waiting(Place, Option<Standing>),
}

/// The earliest of `entries` queued for the request id `request`.
fn earliest_of(entries: &[KeyValue], request: &str) -> Option<KeyValue> {
    entries
        .iter()
        .filter(|kv| Entry::decode(kv.value()).request.as_deref() == Some(request))
        .min_by_key(|kv| kv.create_revision())
        .cloned()
}

/// Why `mode` may not queue behind the entries read (the head first, then the nearest
/// ahead), if it may not: the message of the first conflicting one.
fn conflict<'a>(
    name: &str,
    mode: Mode,
    entries: impl IntoIterator<Item = &'a KeyValue>,
) -> Option<String> {
    entries
        .into_iter()
        .find_map(|kv| mode.conflict(name, Entry::decode(kv.value()).mode()))
}

impl Inner {
    pub(super) async fn acquire(&self, mut spec: AcquireSpec) -> Result<AcquireOutcome, EtcdError> {
        let arrived = Instant::now();
        // The HTTP layer refuses 0 permits; were one to get here, it is what every server
        // reads the entry as (see `Entry::mode`), not a semaphore nobody can hold.
        if let Mode::Permit(0) = spec.mode {
            spec.mode = Mode::Permit(1);
        }
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

    /// Resumes the request's place, or queues it (granting at once if the rule admits it).
    async fn find_or_queue(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
    ) -> Result<Placed, EtcdError> {
        let ask = ttl_for(spec.lease);
        let slot = Slot::of(spec.request_id);
        let request_key = keys.request_key(slot);
        let try_once = spec.wait == Some(Duration::ZERO);
        let window = rule::window(spec.mode);
        // A key whose lease just ran out, or a spare that did, costs a round; a few suffice.
        // After a spare that ran out, fresh leases only: the others may be as old.
        let mut spares_stale = false;
        // With a lock quota, the queueing transaction also counts the project's keys.
        let quota = spec
            .quota
            .max_locks
            .map(|max| (max, project_queues(&self.prefix, &spec.project.name)));
        let request = spec.request_id.to_string();
        for _ in 0..4 {
            // A repeated attempt looks for the place its request id may have already (a first
            // attempt cannot have one: it skips the look, and the request key).
            if !spec.first
                && let Some(place) = self.find_place(spec, keys, &request_key).await?
            {
                return Ok(Placed::Waiting(place, None));
            }
            let lease = if spares_stale {
                self.leases.fresh(ask).await?
            } else {
                self.leases.take(ask, keys.queue()).await?
            };
            let key = keys.queue_key(lease.id);
            let mut entry = Entry {
                ttl: lease.ttl,
                slack: lease.slack,
                ask,
                at: unix_ms(SystemTime::now()),
                label: spec.label.clone(),
                max_hold_ms: spec.max_hold.map(|d| d.as_millis() as u64),
                lock_delay_ms: spec.lock_delay.map(|d| d.as_millis() as u64),
                value: spec.value.clone(),
                request: Some(request.clone()),
                ..Entry::default()
            };
            entry.set_mode(spec.mode);
            let mut when = vec![absent(request_key.clone()), absent(key.clone())];
            // Tried once, a writer needs an empty queue: no write when the lock is taken.
            // Readers and permits may be admitted next to holders, so they queue and look.
            let only_if_free = try_once && spec.mode == Mode::Exclusive;
            if only_if_free {
                when.push(empty(keys.queue()));
            }
            let mut place_ops = vec![
                put(key.clone(), entry.encode(), lease.id),
                // The new key and the nearest ahead of it (what the rule needs first), the
                // head (for conflicts) and the lock's delay keys.
                queue_newest(keys.queue(), window as i64 + 1),
                queue_oldest(keys.queue(), 1),
                under(keys.delays()),
            ];
            if let Some((_, project)) = &quota {
                place_ops.push(count(project));
            }
            // A repeat writes its request key (so that a first attempt still on its way
            // finds this place), and reads the whole line (to find a first attempt placed
            // since it looked, which it then leaves this place for).
            let whole_line = place_ops.len() + 1;
            if !spec.first {
                place_ops.push(put(
                    request_key.clone(),
                    request_value(&request, None),
                    lease.id,
                ));
                place_ops.push(under(keys.queue()));
            }
            let job = batch::Job {
                tag: keys.queue().to_vec(),
                when,
                ops: place_ops,
                otherwise: vec![
                    get(request_key.clone()),
                    queue_oldest(keys.queue(), 1),
                    get(key.clone()),
                ],
            };
            // Tried once, a writer's transaction fails whenever the lock is taken, and would
            // fail a shared one with it: it goes alone.
            let queued = async {
                if only_if_free {
                    job.alone(&self.etcd, "queue").await
                } else {
                    self.batch.run(&self.etcd, "queue", job).await
                }
            };
            // A spare is refreshed at the same time, so that it runs a full TTL from now, unless
            // its slack already covers that (kept alive moments ago); a fresh lease was
            // granted for this request.
            let (answer, kept) = tokio::join!(queued, async {
                if lease.fresh || lease.outlives_grant(self.etcd.kept_since(lease.id)) {
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
            let succeeded = answer.succeeded;
            let answer = answer.answers;
            if !succeeded {
                // A first attempt finds its own key when an earlier try of this transaction
                // was applied and its answer lost (a repeat finds its request key instead).
                if spec.first
                    && let Some(own) = answer.first(2).filter(|kv| {
                        kv.lease() == lease.id
                            && Entry::decode(kv.value()).request.as_deref()
                                == Some(request.as_str())
                    })
                {
                    return Ok(Placed::Waiting(Place::without_request_key(&own), None));
                }
                // A queue key under this etcd lease's name means the lease serves another
                // acquire: never hand it out again.
                let name_taken = answer.first(2).is_some();
                if kept.is_ok() && !name_taken {
                    self.leases.put_back(ask, lease, keys.queue());
                }
                if let Some(existing) = answer.first(0) {
                    match self.resume(spec, keys, &existing).await? {
                        Some(place) => return Ok(Placed::Waiting(place, None)),
                        // Its lease ran out: etcd is deleting the keys. Look again.
                        None => continue,
                    }
                }
                if only_if_free && let Some(head) = answer.first(1) {
                    if let Some(message) = conflict(&spec.name, spec.mode, [&head]) {
                        return Err(EtcdError::Conflict(message));
                    }
                    // Tried once, and the lock is taken.
                    let holder = self.holder_view(&head).await?;
                    return Ok(Placed::Done(AcquireOutcome::TimedOut { holder }));
                }
                continue;
            }
            let proof = if spec.first {
                Proof::Revision(answer.revision)
            } else {
                Proof::Slot(slot)
            };
            let mut place = Place {
                lease: LeaseId {
                    proof,
                    etcd: lease.id,
                },
                revision: answer.revision,
                entry,
                key,
                request_key: (!spec.first).then(|| request_key.clone()),
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
            if !spec.first
                && let Some(earlier) = earliest_of(&answer.kvs(whole_line), &request)
                && earlier.create_revision() < place.revision
            {
                let moved = match self.move_to(&place, &earlier, &request).await? {
                    true => {
                        self.leases.put_back(ask, lease, &[]);
                        self.resume_marked(spec, &earlier, &request_key).await?
                    }
                    // The earlier place, or this one, is gone already.
                    false => {
                        self.leave_refused(&place, ask, lease).await?;
                        self.resume_entry(spec, &earlier).await?
                    }
                };
                match moved {
                    Some(place) => return Ok(Placed::Waiting(place, None)),
                    None => continue,
                }
            }
            let in_line = answer.count_of(1);
            // A new lock (its queue holds only this key) within the project's lock quota,
            // counted at this very revision: of two new locks racing for the last one, the
            // later sees the earlier, so new locks of different names never overshoot it.
            // (One race is left, documented in docs/etcd.md: an acquire of the same name
            // queued behind this one, should it be refused, holds a lock not counted.)
            if let Some((max, project)) = &quota
                && in_line <= 1
                && !self
                    .within_lock_quota(*max, project, answer.count_of(4))
                    .await?
            {
                self.leave_refused(&place, ask, lease).await?;
                return Err(EtcdError::Full(format!(
                    "the project holds or waits for {max} locks, the most allowed"
                )));
            }
            let nearest: Vec<KeyValue> = answer
                .kvs(1)
                .into_iter()
                .filter(|kv| kv.create_revision() < place.revision)
                .collect();
            let complete = nearest.len() < window;
            let head = answer
                .first(2)
                .filter(|kv| kv.create_revision() < place.revision);
            // A name is a read-write lock or a semaphore of `n` permits while anyone holds or
            // waits for it: an acquire of the other kind leaves at once, refused. Checked
            // after placing, against the head and the nearest ahead, so that of two acquires
            // placed at once by different servers the earlier one (the lower create
            // revision) is the one that stays.
            if let Some(message) = conflict(&spec.name, spec.mode, head.iter().chain(&nearest)) {
                self.leave_refused(&place, ask, lease).await?;
                return Err(EtcdError::Conflict(message));
            }
            let own_delay = keys.delay_key(lease.id);
            let standing = standing_from(
                spec.mode,
                place.revision,
                &own_delay,
                &nearest,
                complete,
                &answer.kvs(3),
                place.revision,
            );
            let blocked = match standing {
                Some(Standing::Admitted { own_delay }) => {
                    if self.stamp(keys, &mut place, own_delay).await? {
                        // The lease was refreshed (or granted) after this call began.
                        return Ok(Placed::Done(AcquireOutcome::Granted(
                            place.grant(Duration::ZERO),
                        )));
                    }
                    continue;
                }
                Some(Standing::Blocked(blocked)) => blocked,
                // More entries ahead to read: `wait` does.
                Some(Standing::Gone) | None => return Ok(Placed::Waiting(place, None)),
            };
            if try_once {
                self.give_up(&place);
                let holder = match head {
                    Some(head) => self.holder_view(&head).await?,
                    None => None,
                };
                return Ok(Placed::Done(AcquireOutcome::TimedOut { holder }));
            }
            let max_waiters = spec
                .quota
                .max_waiters_per_lock
                .map_or(self.max_waiters_per_lock as u64, |q| {
                    q.min(self.max_waiters_per_lock as u64)
                });
            // Holders are not waiters. Exact when every entry ahead was read; else a lock has
            // one, a semaphore up to its permits, and readers are counted as one (the others
            // are not read here), so a lock held by many readers reaches the limit early by
            // their number.
            let holders = if complete {
                let ahead: Vec<(i64, Mode)> = nearest
                    .iter()
                    .rev()
                    .map(|kv| (kv.create_revision(), Entry::decode(kv.value()).mode()))
                    .collect();
                rule::holding(&ahead, &[]) as i64
            } else {
                match spec.mode {
                    Mode::Permit(n) => (n as i64).min(in_line - 1),
                    Mode::Exclusive | Mode::Shared => 1,
                }
            };
            let waiters = (in_line - holders).max(0) as u64;
            if waiters > max_waiters {
                self.give_up(&place);
                return Err(EtcdError::Full(format!(
                    "lock already has {} waiters, the most allowed",
                    waiters - 1
                )));
            }
            return Ok(Placed::Waiting(place, Some(Standing::Blocked(blocked))));
        }
        Err(EtcdError::Unavailable(
            "could not queue the acquire (leases kept running out)".into(),
        ))
    }

    /// Takes a refused acquire out of line before answering, so that nothing is left behind
    /// and a retry of the same request id queues anew; its etcd lease, alive and no longer
    /// used, is kept for a later acquire.
    async fn leave_refused(
        &self,
        place: &Place,
        ask: i64,
        lease: super::leases::Lease,
    ) -> Result<(), EtcdError> {
        let txn = place.leave(Vec::new());
        if self.etcd.txn("refused", txn).await?.succeeded() {
            // Not tagged with its queue: the lock it was refused may not be used again.
            self.leases.put_back(ask, lease, &[]);
        }
        Ok(())
    }

    /// Leaves a repeat's new place for `earlier`, the same request's place ahead of it, and
    /// in the same transaction points the request key at `earlier` (a mark, attached to its
    /// etcd lease). An attempt that resumed the new place by its request key meanwhile (a
    /// third attempt of the request) then learns where the request went when its place goes
    /// (`wait.rs`, `gone`), rather than being told its wait is over. False, and nothing
    /// written, if either place has gone already.
    async fn move_to(
        &self,
        place: &Place,
        earlier: &KeyValue,
        request: &str,
    ) -> Result<bool, EtcdError> {
        let (Some(request_key), revision) = (&place.request_key, earlier.create_revision()) else {
            return Ok(false);
        };
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(place.key.clone(), CompareOp::Equal, place.revision),
                Compare::create_revision(earlier.key().to_vec(), CompareOp::Equal, revision),
            ])
            .and_then(vec![
                delete(place.key.clone()),
                put(
                    request_key.clone(),
                    request_value(request, Some(revision)),
                    earlier.lease(),
                ),
            ]);
        Ok(self.etcd.txn("moved", txn).await?.succeeded())
    }

    /// The place of `queued`, which `request_key` now marks, refreshed with a keep-alive;
    /// `None` if its lease has run out. Its lease id carries the request key's slot, so that
    /// a release takes the mark with it.
    async fn resume_marked(
        &self,
        spec: &AcquireSpec,
        queued: &KeyValue,
        request_key: &[u8],
    ) -> Result<Option<Place>, EtcdError> {
        let Some(mut place) = self.resume_entry(spec, queued).await? else {
            return Ok(None);
        };
        place.lease.proof = Proof::Slot(Slot::of(spec.request_id));
        place.request_key = Some(request_key.to_vec());
        Ok(Some(place))
    }

    /// The place a request already has (`request` is its request key), refreshed with a
    /// keep-alive; `None` if its lease has run out.
    async fn resume(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
        request: &KeyValue,
    ) -> Result<Option<Place>, EtcdError> {
        let (id, marks) = read_request_value(request.value());
        if id != spec.request_id.to_string().as_bytes() {
            // Two request ids with the same 63-bit slot: astronomically rare.
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
        // revision, unless the request key is a mark, which names it. A queue key under the
        // same name with another revision belongs to a later acquire that reuses the etcd
        // lease (this request was released meanwhile).
        let revision = marks.unwrap_or(request.create_revision());
        let Some(queued) = queued?
            .take_kvs()
            .into_iter()
            .find(|kv| kv.lease() == lease && kv.create_revision() == revision)
        else {
            // The place is gone, and so should the request key be: it outlives its place
            // when a mark's place was released under a lease id without the slot (granted to
            // an attempt that found it by its entry), or while etcd ends the lease. Left,
            // it would turn every later attempt of the request back.
            let stale = Txn::new()
                .when(vec![Compare::mod_revision(
                    request.key().to_vec(),
                    CompareOp::Equal,
                    request.mod_revision(),
                )])
                .and_then(vec![delete(request.key().to_vec())]);
            self.etcd.txn("stale_request", stale).await?;
            return Ok(None);
        };
        Ok(Some(Place {
            lease: LeaseId {
                proof: Proof::Slot(Slot::of(spec.request_id)),
                etcd: lease,
            },
            revision: queued.create_revision(),
            entry: Entry::decode(queued.value()),
            key,
            request_key: Some(request.key().to_vec()),
        }))
    }

    /// For a repeated attempt: the place the request already has, by its request key or
    /// else by its request id among the entries in line, refreshed with a keep-alive; `None`
    /// if it has none (or its lease has run out).
    async fn find_place(
        &self,
        spec: &AcquireSpec,
        keys: &LockKeys,
        request_key: &[u8],
    ) -> Result<Option<Place>, EtcdError> {
        let read = Txn::new().and_then(vec![get(request_key.to_vec()), under(keys.queue())]);
        let answer = self.etcd.txn("find", read).await?;
        if let Some(existing) = first(&answer, 0) {
            return self.resume(spec, keys, &existing).await;
        }
        let request = spec.request_id.to_string();
        match earliest_of(&kvs(&answer, 1), &request) {
            Some(queued) => self.resume_entry(spec, &queued).await,
            None => Ok(None),
        }
    }

    /// The place of `queued`, an entry without a request key, refreshed with a keep-alive;
    /// `None` if its lease has run out.
    async fn resume_entry(
        &self,
        spec: &AcquireSpec,
        queued: &KeyValue,
    ) -> Result<Option<Place>, EtcdError> {
        match self
            .etcd
            .keep_alive(queued.lease(), ttl_for(spec.lease))
            .await
        {
            Ok(()) => {}
            Err(EtcdError::LeaseGone) => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(Some(Place::without_request_key(queued)))
    }

    /// Gives a first attempt's place that is still waiting as its poll ends a request key (a
    /// mark, attached to its etcd lease), so that its re-polls find it by name rather than by
    /// reading the whole line. Best effort: without it, they still find it that way.
    pub(super) async fn mark(&self, keys: &LockKeys, place: &Place) {
        let (Proof::Revision(revision), Some(request)) = (place.lease.proof, &place.entry.request)
        else {
            return;
        };
        let Some(id) = crate::id::Id::parse_hex(request) else {
            return;
        };
        let request_key = keys.request_key(Slot::of(id));
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(place.key.clone(), CompareOp::Equal, revision),
                absent(request_key.clone()),
            ])
            .and_then(vec![put(
                request_key,
                request_value(request, Some(revision)),
                place.lease.etcd,
            )]);
        if let Err(e) = self.etcd.txn("mark", txn).await {
            tracing::debug!(error = ?e, "marking a waiting place failed");
        }
    }

    /// Leaves the line off the caller's path: deletes the place's keys if they are still
    /// there, and only then revokes its etcd lease. (Had the keys gone another way, a
    /// release may have handed the etcd lease to a new acquire meanwhile.)
    pub(super) fn give_up(&self, place: &Place) {
        let txn = place.leave(Vec::new());
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

    /// Whether the project's locks, one just placed among them, are within `max`: `keys`
    /// (its queue keys when it was placed) is enough to tell when no more than `max`; else
    /// its locks are counted (a lock with waiters has several keys). Counted now, which
    /// includes every lock placed before this one.
    async fn within_lock_quota(
        &self,
        max: u64,
        project: &[u8],
        keys: i64,
    ) -> Result<bool, EtcdError> {
        if keys as u64 <= max {
            return Ok(true);
        }
        Ok(self.count_locks("lock_quota", project, max + 1).await? <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::{LeaseId, Slot};
    use super::super::{granted, spec_for_tests, store_for_tests};
    use crate::server::store::{AcquireSpec, Grant, Release};

    fn spec() -> AcquireSpec {
        spec_for_tests("lock")
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
