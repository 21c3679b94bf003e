//! Waiting in line on etcd: wait until the key just ahead goes (woken by the server's shared
//! watch, `deletions.rs`), keep the place's lease alive while the poll lasts, and settle the
//! poll when it ends.

use super::Inner;
use super::acquire::{Place, Standing};
use super::call::{
    self, EtcdError, ahead_of, delete, first, first_since, get, kvs, put, queue_oldest, revision,
};
use super::keys::{Entry, LockKeys, unix_ms};
use super::limits::Gate;
use crate::server::log_limit::LogLimit;
use crate::server::store::{AcquireOutcome, Ended};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How often a waiter looks at the queue while the shared watch is down.
const WATCH_DOWN_LOOK_EVERY: Duration = Duration::from_millis(250);

/// How often the first in line looks whether a lock-delay that holds it back has ended.
const HELD_BACK_LOOK_EVERY: Duration = Duration::from_millis(100);

/// How a waiter's keep-alive went.
enum Kept {
    Alive,
    /// Its etcd lease has ended.
    Gone,
    /// etcd did not answer properly (logged); the next keep-alive may.
    Failed,
    PollOver,
}

impl Inner {
    /// Where a waiter stands now.
    async fn standing(&self, keys: &LockKeys, place: &Place) -> Result<Standing, EtcdError> {
        let answer = self
            .etcd
            .txn(
                "standing",
                Txn::new().and_then(vec![
                    get(place.key.clone()),
                    ahead_of(keys.queue(), place.revision, 1),
                    queue_oldest(keys.queue(), 1),
                ]),
            )
            .await?;
        if first(&answer, 0).is_none_or(|kv| kv.create_revision() != place.revision) {
            return Ok(Standing::Gone);
        }
        Ok(match first(&answer, 1) {
            None => Standing::Head,
            Some(predecessor) => Standing::Behind {
                predecessor: predecessor.key().to_vec(),
                revision: revision(&answer),
                head: first(&answer, 2).map(Box::new),
            },
        })
    }

    /// Waits in line until granted, or until the poll ends.
    pub(super) async fn wait(
        &self,
        keys: &LockKeys,
        mut place: Place,
        mut known: Option<Standing>,
        arrived: Instant,
        poll_end: Instant,
        last_poll: bool,
    ) -> Result<AcquireOutcome, EtcdError> {
        // The lease was refreshed after this request arrived; keep it alive while the poll
        // lasts. `refreshed` is when the last keep-alive that etcd confirmed was sent: etcd
        // ends the lease no earlier than a TTL after it, which is what a grant reports.
        let keep_alive_every = Duration::from_secs(place.entry.ttl.max(1) as u64) / 3;
        let mut next_keep_alive = Instant::now() + keep_alive_every;
        let mut refreshed = arrived;
        // When the holder just ahead reaches its max_hold, and its key.
        let mut hold_end: Option<(Instant, Box<etcd_client::KeyValue>)>;
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
                Standing::Head => match self.gate(keys, &mut place).await? {
                    Gate::Open => {
                        self.note_granted(&place);
                        return Ok(AcquireOutcome::Granted(place.grant(refreshed - arrived)));
                    }
                    Gate::Gone => return self.withdrawn(keys).await,
                    Gate::HeldBack => {
                        // A previous holder's delay key goes when its etcd lease ends, which
                        // no watch here sees: look again shortly, keeping the place alive.
                        let look = poll_end.min(Instant::now() + HELD_BACK_LOOK_EVERY);
                        if next_keep_alive <= look {
                            tokio::time::sleep_until(next_keep_alive).await;
                            let sent = Instant::now();
                            next_keep_alive = sent + keep_alive_every;
                            match self.keep_waiter_alive(&place, poll_end).await {
                                Kept::Alive => refreshed = sent,
                                Kept::Gone | Kept::Failed => {}
                                Kept::PollOver => break 'check,
                            }
                        } else {
                            tokio::time::sleep_until(look).await;
                        }
                        continue 'check;
                    }
                },
                Standing::Behind {
                    predecessor,
                    revision,
                    head,
                } => {
                    // The holder just ahead ends at its max_hold, renewed or not: this
                    // waiter (the one that wants the lock next) ends it then.
                    hold_end = head
                        .filter(|head| head.key() == predecessor.as_slice())
                        .and_then(|head| {
                            let until = Entry::decode(head.value()).hold_until()?;
                            let left = until.saturating_sub(unix_ms(SystemTime::now()));
                            Some((Instant::now() + Duration::from_millis(left), head))
                        });
                    (predecessor, revision)
                }
            };
            // Wait for the key just ahead (or our own: a cancel) to go. Deletions up to the
            // shared watch's revision have passed already: if that is beyond what we looked
            // at, look again.
            let deleted = self.deletions.subscribe(&predecessor, &place.key);
            if deleted.from.is_none_or(|from| from > at) {
                match tokio::time::timeout_at(poll_end, self.standing(keys, &place)).await {
                    Ok(Ok(Standing::Behind {
                        predecessor: ahead, ..
                    })) if ahead == predecessor => {}
                    Ok(standing) => {
                        known = Some(standing?);
                        continue 'check;
                    }
                    Err(_) => break 'check,
                }
            }
            // While the watch is down, look every so often.
            let look_again = match deleted.from {
                Some(_) => poll_end,
                None => poll_end.min(Instant::now() + WATCH_DOWN_LOOK_EVERY),
            };
            loop {
                let hold_over = hold_end.as_ref().map_or(poll_end, |(at, _)| *at);
                tokio::select! {
                    () = deleted.woken() => continue 'check,
                    _ = tokio::time::sleep_until(look_again) => continue 'check,
                    _ = tokio::time::sleep_until(hold_over), if hold_end.is_some() => {
                        if let Some((_, head)) = hold_end.take() {
                            self.end_holder(keys, &head, Ended::MaxHold).await?;
                        }
                        continue 'check;
                    }
                    _ = tokio::time::sleep_until(next_keep_alive) => {
                        let sent = Instant::now();
                        next_keep_alive = sent + keep_alive_every;
                        match self.keep_waiter_alive(&place, poll_end).await {
                            Kept::Alive => refreshed = sent,
                            Kept::Gone => continue 'check,
                            Kept::Failed => {}
                            Kept::PollOver => break 'check,
                        }
                    }
                    _ = tokio::time::sleep_until(poll_end) => break 'check,
                }
            }
        }
        self.end_poll(keys, place, refreshed - arrived, last_poll)
            .await
    }

    /// One keep-alive of a waiter's lease, bounded by the poll's end.
    async fn keep_waiter_alive(&self, place: &Place, poll_end: Instant) -> Kept {
        let kept = self.etcd.keep_alive(place.lease.etcd, place.entry.ttl);
        match tokio::time::timeout_at(poll_end, kept).await {
            Ok(Ok(())) => Kept::Alive,
            Ok(Err(EtcdError::LeaseGone)) => Kept::Gone,
            Ok(Err(e)) => {
                // One line per waiter would flood the log during an etcd outage with many
                // waiters.
                static FAILED: LogLimit = LogLimit::new();
                if FAILED.allow().is_some() {
                    tracing::warn!(error = ?e, "keeping a waiter alive failed")
                }
                Kept::Failed
            }
            Err(_) => Kept::PollOver,
        }
    }

    /// The poll is over: a grant that raced wins; else the waiter leaves the line
    /// (`last_poll`) or keeps its place for its TTL, counted from now.
    /// `waited`: how long after the call began the lease was last kept alive.
    async fn end_poll(
        &self,
        keys: &LockKeys,
        mut place: Place,
        waited: Duration,
        last_poll: bool,
    ) -> Result<AcquireOutcome, EtcdError> {
        if last_poll {
            let mine =
                Compare::create_revision(place.key.clone(), CompareOp::Equal, place.revision);
            let txn = Txn::new()
                .when(vec![
                    mine.clone(),
                    first_since(keys.queue(), place.revision),
                ])
                .or_else(vec![
                    // Leave the line, if still in it.
                    TxnOp::txn(Txn::new().when(vec![mine]).and_then(vec![
                        delete(place.key.clone()),
                        delete(place.request_key.clone()),
                    ])),
                    queue_oldest(keys.queue(), 1),
                ]);
            let answer = self.etcd.txn("end_wait", txn).await?;
            if answer.succeeded() {
                return match self.gate(keys, &mut place).await? {
                    Gate::Open => {
                        self.note_granted(&place);
                        Ok(AcquireOutcome::Granted(place.grant(waited)))
                    }
                    Gate::HeldBack => {
                        // First in line, but the wait is over before the delay: leave.
                        self.give_up(&place);
                        Ok(AcquireOutcome::TimedOut { holder: None })
                    }
                    Gate::Gone => self.withdrawn(keys).await,
                };
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
        // This keep-alive is sent after `waited`: reporting `waited` stays on the safe side.
        let (answer, kept) = tokio::join!(
            self.etcd.txn("end_poll", txn),
            self.etcd.keep_alive(place.lease.etcd, place.entry.ttl)
        );
        let answer = answer?;
        let mine = first(&answer, 0).is_some_and(|kv| kv.create_revision() == place.revision);
        match kept {
            Ok(()) if mine => {}
            Ok(()) | Err(EtcdError::LeaseGone) => return self.withdrawn(keys).await,
            Err(e) => return Err(e),
        }
        let ahead = kvs(&answer, 1).len() as u64;
        if ahead == 0 {
            return match self.gate(keys, &mut place).await? {
                Gate::Open => {
                    self.note_granted(&place);
                    Ok(AcquireOutcome::Granted(place.grant(waited)))
                }
                Gate::HeldBack => Ok(AcquireOutcome::StillWaiting { position: 0 }),
                Gate::Gone => self.withdrawn(keys).await,
            };
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
            let _ = etcd.txn("note_grant", txn).await;
        });
    }
}
