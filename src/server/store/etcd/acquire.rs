//! Acquire on etcd: take a place in line (or find the one a request already has), then
//! wait for the key just ahead to go, keeping the place's lease alive while the poll lasts.

use super::Inner;
use super::call::{
    self, EtcdError, absent, ahead_of, count, count_of, delete, empty, first, first_since, get,
    kvs, put, queue_newest, queue_oldest, revision,
};
use super::keys::{Entry, LeaseId, LockKeys, Slot, project_queues, unix_ms};
use super::leases::ttl_for;
use crate::server::store::{AcquireOutcome, AcquireSpec, Grant};
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, WatchFilterType, WatchOptions,
};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// An acquire's place in a lock's queue.
#[derive(Debug, Clone)]
pub(super) struct Place {
    pub lease: LeaseId,
    /// The create revision of its key: its order in line, and its fencing token.
    pub revision: i64,
    pub entry: Entry,
    pub key: Vec<u8>,
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
    /// In line; where it stands, if known already.
    Waiting(Place, Option<Standing>),
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
    pub(super) async fn acquire(&self, spec: AcquireSpec) -> Result<AcquireOutcome, EtcdError> {
        let arrived = Instant::now();
        let poll = spec.wait.map_or(spec.poll, |w| w.min(spec.poll));
        let last_poll = spec.wait.is_some_and(|w| w <= spec.poll);
        let keys = self.keys(&spec.project, &spec.name);
        let (place, standing) = match self.find_or_queue(&spec, &keys).await? {
            Placed::Done(outcome) => return Ok(outcome),
            Placed::Waiting(place, standing) => (place, standing),
        };
        self.wait(&keys, place, standing, arrived + poll, last_poll)
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
        let key = keys.key(slot);
        let try_once = spec.wait == Some(Duration::ZERO);
        // A key whose lease just ran out, or a spare that did, costs a round; a few suffice.
        for _ in 0..4 {
            if spec.quota.max_locks.is_some() {
                self.check_lock_quota(spec, keys).await?;
            }
            let lease = self.leases.take(ask).await?;
            let entry = Entry {
                request_id: spec.request_id.to_string(),
                ttl: lease.ttl,
                ask,
                at: unix_ms(SystemTime::now()),
                granted: None,
                label: spec.label.clone(),
            };
            let mut when = vec![absent(key.clone())];
            if try_once {
                when.push(empty(keys.queue()));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(vec![
                    put(key.clone(), entry.encode(), lease.id),
                    // The new key and the one just ahead of it (if any).
                    queue_newest(keys.queue(), 2),
                ])
                .or_else(vec![get(key.clone()), queue_oldest(keys.queue(), 1)]);
            // A spare is refreshed at the same time, so that it runs a full TTL from now; a
            // fresh lease was granted for this request.
            let (answer, kept) = tokio::join!(self.etcd.txn("queue", txn), async {
                if lease.fresh {
                    Ok(())
                } else {
                    self.etcd.keep_alive(lease.id).await
                }
            });
            let answer = match answer {
                // The spare ran out before the transaction: nothing was written.
                Err(EtcdError::LeaseGone) => continue,
                other => other?,
            };
            if !answer.succeeded() {
                if kept.is_ok() {
                    self.leases.put_back(ask, lease);
                }
                match first(&answer, 0) {
                    Some(existing) => match self.resume(spec, &existing).await? {
                        Some(place) => return Ok(Placed::Waiting(place, None)),
                        // Its lease ran out: etcd is deleting the key. Look again.
                        None => continue,
                    },
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
                // The spare ran out between the write and the keep-alive: so did the key.
                Err(EtcdError::LeaseGone) => continue,
                Err(e) => {
                    // Unknown whether the spare still runs: give the place up.
                    self.give_up(&Place {
                        lease: LeaseId {
                            slot,
                            etcd: lease.id,
                        },
                        revision: revision(&answer),
                        entry,
                        key,
                    });
                    return Err(e);
                }
            }
            let place = Place {
                lease: LeaseId {
                    slot,
                    etcd: lease.id,
                },
                revision: revision(&answer),
                entry,
                key,
            };
            let in_line = count_of(&answer, 1);
            let Some(predecessor) = kvs(&answer, 1).get(1).map(|kv| kv.key().to_vec()) else {
                return Ok(Placed::Done(AcquireOutcome::Granted(place.grant())));
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
            };
            return Ok(Placed::Waiting(place, Some(standing)));
        }
        Err(EtcdError::Unavailable(
            "could not queue the acquire (leases kept running out)".into(),
        ))
    }

    /// The place a request already has, refreshed with a keep-alive; `None` if its lease
    /// has run out.
    async fn resume(&self, spec: &AcquireSpec, kv: &KeyValue) -> Result<Option<Place>, EtcdError> {
        let entry = Entry::decode(kv.value());
        if entry.request_id != spec.request_id.to_string() {
            // Two request ids with the same 64-bit slot: astronomically rare.
            return Err(EtcdError::Unavailable(
                "request id collision; retry with a new request id".into(),
            ));
        }
        match self.etcd.keep_alive(kv.lease()).await {
            Ok(()) => {}
            Err(EtcdError::LeaseGone) => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(Some(Place {
            lease: LeaseId {
                slot: Slot::of(spec.request_id),
                etcd: kv.lease(),
            },
            revision: kv.create_revision(),
            entry,
            key: kv.key().to_vec(),
        }))
    }

    /// Leaves the line off the caller's path: deletes the key if it is still attached to the
    /// place's etcd lease, and only then revokes that lease. (Had the key gone another way,
    /// a release may have handed the etcd lease to a new acquire meanwhile.)
    fn give_up(&self, place: &Place) {
        let txn = Txn::new()
            .when(vec![Compare::lease(
                place.key.clone(),
                CompareOp::Equal,
                place.lease.etcd,
            )])
            .and_then(vec![delete(place.key.clone())]);
        let etcd = self.etcd.clone();
        let lease = place.lease.etcd;
        tokio::spawn(async move {
            if let Ok(answer) = etcd.txn("give up", txn).await
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
                "lock quota",
                Txn::new().and_then(vec![count(keys.queue()), count(&project)]),
            )
            .await?;
        if count_of(&answer, 0) > 0 || (count_of(&answer, 1) as u64) < max {
            // The lock exists already, or the project has fewer keys than locks allowed.
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
        let locks = super::count_locks(all.kvs());
        if locks >= max {
            return Err(EtcdError::Full(format!(
                "the project has {locks} locks held or waited for, the most allowed"
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
                    get(place.key.clone()),
                    ahead_of(keys.queue(), place.revision, 1),
                ]),
            )
            .await?;
        if first(&answer, 0).is_none_or(|kv| kv.lease() != place.lease.etcd) {
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
        mut known: Option<Standing>,
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
            let standing = match known.take() {
                Some(standing) => standing,
                None => {
                    match tokio::time::timeout_at(poll_end, self.standing(keys, &place)).await {
                        Ok(standing) => standing?,
                        Err(_) => break,
                    }
                }
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
            // Watch the key just ahead (and our own, to see a cancel) for deletion, from just
            // after the revision we looked at: nothing in between is missed.
            let watch = async {
                let options = || {
                    WatchOptions::new()
                        .with_start_revision(at + 1)
                        .with_filters([WatchFilterType::NoPut])
                };
                let mut client = self.etcd.client.watch_client();
                let mut stream = client.watch(predecessor, Some(options())).await?;
                stream.watch(place.key.clone(), Some(options())).await?;
                Ok::<_, etcd_client::Error>(stream)
            };
            let mut stream = match tokio::time::timeout_at(poll_end, watch).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "etcd watch failed; looking again");
                    let pause = Instant::now() + Duration::from_millis(100);
                    tokio::time::sleep_until(poll_end.min(pause)).await;
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
            let mine = Compare::lease(place.key.clone(), CompareOp::Equal, place.lease.etcd);
            let txn = Txn::new()
                .when(vec![
                    mine.clone(),
                    first_since(keys.queue(), place.revision),
                ])
                .or_else(vec![
                    // Leave the line, if still in it under this lease.
                    TxnOp::txn(
                        Txn::new()
                            .when(vec![mine])
                            .and_then(vec![delete(place.key.clone())]),
                    ),
                    queue_oldest(keys.queue(), 1),
                ]);
            let answer = self.etcd.txn("end wait", txn).await?;
            if answer.succeeded() {
                self.note_granted(&place);
                return Ok(AcquireOutcome::Granted(place.grant()));
            }
            // Revoke the etcd lease only if this left the line: had the key gone another way
            // (say, granted through another server and released), a release may have handed
            // the etcd lease to a new acquire meanwhile.
            if call::nested_succeeded(&answer, 0) {
                self.etcd.revoke_later(place.lease.etcd);
            }
            let holder = match first(&answer, 1) {
                Some(kv) => self.holder_view(&kv).await?,
                None => None,
            };
            return Ok(AcquireOutcome::TimedOut { holder });
        }
        let txn = Txn::new().and_then(vec![
            get(place.key.clone()),
            ahead_of(keys.queue(), place.revision, 0),
        ]);
        let (answer, kept) = tokio::join!(
            self.etcd.txn("end poll", txn),
            self.etcd.keep_alive(place.lease.etcd)
        );
        let answer = answer?;
        let mine = first(&answer, 0).is_some_and(|kv| kv.lease() == place.lease.etcd);
        match kept {
            Ok(()) if mine => {}
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

    /// Records, in the background, when a waiter got the lock, for inspection. Skipped when
    /// it waited less than a second: the time it queued is then close enough, and a busy
    /// lock's hand-overs do not each cost an extra write.
    fn note_granted(&self, place: &Place) {
        let now = unix_ms(SystemTime::now());
        if place.entry.granted.is_some() || now.saturating_sub(place.entry.at) < 1000 {
            return;
        }
        let entry = Entry {
            granted: Some(now),
            ..place.entry.clone()
        };
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                place.key.clone(),
                CompareOp::Equal,
                place.revision,
            )])
            .and_then(vec![put(
                place.key.clone(),
                entry.encode(),
                place.lease.etcd,
            )]);
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            let _ = etcd.txn("note grant", txn).await;
        });
    }
}
