//! Waiting in line on etcd: look at the entries ahead (the grant rule, `rule.rs`), wait until
//! one that keeps the waiter out goes (woken by the server's shared watch, `deletions.rs`),
//! keep the place's lease alive while the poll lasts, and settle the poll when it ends.

use super::Inner;
use super::acquire::Place;
use super::call::{
    EtcdError, ahead_of, ahead_options, first, get, kvs, names_ahead_of, put, queue_oldest,
    revision, under,
};
use super::keys::{DelayMark, Entry, LockKeys, read_request_value, unix_ms};
use super::rule::{self, PAGE, Verdict, Witnesses};
use crate::server::log_limit::LogLimit;
use crate::server::store::{AcquireOutcome, Ended, Mode};
use etcd_client::{Compare, CompareOp, KeyValue, Txn};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How often a waiter looks at the queue while the shared watch is down.
const WATCH_DOWN_LOOK_EVERY: Duration = Duration::from_millis(250);

/// How often a waiter held back by a lock-delay looks whether it has ended.
const HELD_BACK_LOOK_EVERY: Duration = Duration::from_millis(100);

/// Entries from the head read to tell how many waiters are ahead of a waiter at the end of
/// its poll; holders beyond them count as waiters.
const POSITION_HEAD: i64 = 256;

/// Where a waiter stands.
#[derive(Debug)]
pub(super) enum Standing {
    /// Its key is gone (cancelled, or its lease ran out).
    Gone,
    /// The rule admits it: it holds (once stamped, if it has limits). `own_delay`: its delay
    /// key exists already (stamped by an earlier poll).
    Admitted { own_delay: bool },
    /// It waits.
    Blocked(Blocked),
}

/// Why a waiter waits, as of `revision`.
#[derive(Debug)]
pub(super) struct Blocked {
    /// The entries ahead (key, create revision) that keep it out while they all exist, or
    /// `None`: any departure from the lock's queue may let it in.
    pub witnesses: Option<Vec<(Vec<u8>, i64)>>,
    pub revision: i64,
    /// Lock-delays are among the reasons: look again every so often.
    pub poll: bool,
    /// Holders ahead whose `max_hold` this waiter ends when it is over (renewed or not): the
    /// entry just ahead, or for a semaphore's first waiter every holder.
    pub ends: Vec<KeyValue>,
}

/// Judges the waiter at `own_revision`, of mode `own`, from the entries ahead of it (newest
/// first; `complete` when they are all of them) and the lock's delay keys. `None` when it
/// needs more entries ahead.
pub(super) fn standing_from(
    own: Mode,
    own_revision: i64,
    own_delay_key: &[u8],
    nearest: &[KeyValue],
    complete: bool,
    delays: &[KeyValue],
    revision: i64,
) -> Option<Standing> {
    let modes: Vec<Mode> = nearest
        .iter()
        .map(|kv| Entry::decode(kv.value()).mode())
        .collect();
    // Delay keys of ended leases ahead of it: not its own, not of an entry in line (a holder
    // ahead). Exact once every entry ahead is read, which is when the rule looks at them.
    let phantoms: Vec<Mode> = delays
        .iter()
        .filter(|kv| kv.key() != own_delay_key)
        .map(|kv| DelayMark::decode(kv.value()))
        .filter(|mark| {
            mark.token < own_revision && !nearest.iter().any(|e| e.create_revision() == mark.token)
        })
        .map(|mark| mark.mode())
        .collect();
    match rule::judge(own, &modes, complete, &phantoms) {
        Verdict::NeedMore => None,
        Verdict::Admitted => Some(Standing::Admitted {
            own_delay: delays.iter().any(|kv| kv.key() == own_delay_key),
        }),
        Verdict::Blocked(blocked) => {
            let witnesses = match blocked.witnesses {
                Witnesses::Keys(indexes) => Some(
                    indexes
                        .into_iter()
                        .filter_map(|i| nearest.get(i))
                        .map(|kv| (kv.key().to_vec(), kv.create_revision()))
                        .collect(),
                ),
                Witnesses::Lock => None,
            };
            let candidates = if blocked.end_all {
                nearest
            } else {
                &nearest[..nearest.len().min(1)]
            };
            let ends = candidates
                .iter()
                .filter(|kv| Entry::decode(kv.value()).hold_until().is_some())
                .cloned()
                .collect();
            Some(Standing::Blocked(Blocked {
                witnesses,
                revision,
                poll: blocked.poll,
                ends,
            }))
        }
    }
}

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
    /// Where a waiter stands now: one read of its key, the nearest entries ahead and the
    /// lock's delay keys; further pages ahead, at the same revision, only when the rule needs
    /// them (a reader behind many readers, a semaphore of many permits).
    pub(super) async fn look(&self, keys: &LockKeys, place: &Place) -> Result<Standing, EtcdError> {
        let own = place.entry.mode();
        let window = rule::window(own);
        let answer = self
            .etcd
            .txn(
                "standing",
                Txn::new().and_then(vec![
                    get(place.key.clone()),
                    ahead_of(keys.queue(), place.revision, window as i64),
                    under(keys.delays()),
                ]),
            )
            .await?;
        if first(&answer, 0).is_none_or(|kv| kv.create_revision() != place.revision) {
            return Ok(Standing::Gone);
        }
        let at = revision(&answer);
        let mut nearest = kvs(&answer, 1);
        let delays = kvs(&answer, 2);
        let mut complete = nearest.len() < window;
        let own_delay = keys.delay_key(place.lease.etcd);
        loop {
            let standing = standing_from(
                own,
                place.revision,
                &own_delay,
                &nearest,
                complete,
                &delays,
                at,
            );
            if let Some(standing) = standing {
                return Ok(standing);
            }
            let oldest = nearest
                .last()
                .map_or(place.revision, |kv| kv.create_revision());
            let options = ahead_options(oldest, PAGE as i64).with_revision(at);
            let mut page = self
                .etcd
                .get("standing", keys.queue(), Some(options))
                .await?;
            let page = page.take_kvs();
            complete = page.len() < PAGE;
            nearest.extend(page);
        }
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
        'check: loop {
            if Instant::now() >= poll_end {
                break;
            }
            let standing = match known.take() {
                Some(standing) => standing,
                None => match tokio::time::timeout_at(poll_end, self.look(keys, &place)).await {
                    Ok(standing) => standing?,
                    Err(_) => break,
                },
            };
            let mut blocked = match standing {
                Standing::Gone => return self.gone(keys, &place).await,
                Standing::Admitted { own_delay } => {
                    if !self.stamp(keys, &mut place, own_delay).await? {
                        return self.gone(keys, &place).await;
                    }
                    self.note_granted(&place);
                    return Ok(AcquireOutcome::Granted(place.grant(refreshed - arrived)));
                }
                Standing::Blocked(blocked) => blocked,
            };
            // Wait for a witness (or our own key: a cancel) to go. Deletions up to the shared
            // watch's revision have passed already: if that is beyond what we looked at, look
            // again, and go on waiting only if the same entries keep us out.
            let deleted = match &blocked.witnesses {
                Some(witnesses) => {
                    let mut watched: Vec<Vec<u8>> =
                        witnesses.iter().map(|(key, _)| key.clone()).collect();
                    watched.push(place.key.clone());
                    self.deletions.subscribe(watched, None)
                }
                None => self
                    .deletions
                    .subscribe(vec![place.key.clone()], Some(keys.queue())),
            };
            if deleted.from.is_none_or(|from| from > blocked.revision) {
                // The subscription covers what this look finds if it finds the same witnesses
                // (or is lock-wide): deletions since are ours to hear.
                match tokio::time::timeout_at(poll_end, self.look(keys, &place)).await {
                    Ok(Ok(Standing::Blocked(again))) if again.witnesses == blocked.witnesses => {
                        blocked = again;
                    }
                    Ok(standing) => {
                        known = Some(standing?);
                        continue 'check;
                    }
                    Err(_) => break 'check,
                }
            }
            // The earliest max_hold among the holders this waiter ends.
            let mut hold_end: Option<(Instant, KeyValue)> = blocked
                .ends
                .into_iter()
                .filter_map(|kv| {
                    let until = Entry::decode(kv.value()).hold_until()?;
                    let left = until.saturating_sub(unix_ms(SystemTime::now()));
                    Some((Instant::now() + Duration::from_millis(left), kv))
                })
                .min_by_key(|(at, _)| *at);
            // While the watch is down, or a lock-delay holds us back, look every so often.
            let look_again = match (deleted.from, blocked.poll) {
                (_, true) => poll_end.min(Instant::now() + HELD_BACK_LOOK_EVERY),
                (None, false) => poll_end.min(Instant::now() + WATCH_DOWN_LOOK_EVERY),
                (Some(_), false) => poll_end,
            };
            loop {
                let hold_over = hold_end.as_ref().map_or(poll_end, |(at, _)| *at);
                tokio::select! {
                    () = deleted.woken() => continue 'check,
                    _ = tokio::time::sleep_until(look_again) => continue 'check,
                    _ = tokio::time::sleep_until(hold_over), if hold_end.is_some() => {
                        if let Some((_, holder)) = hold_end.take() {
                            self.end_holder(keys, &holder, Ended::MaxHold).await?;
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
            let own_delay = match self.look(keys, &place).await? {
                Standing::Gone => return self.gone(keys, &place).await,
                Standing::Admitted { own_delay } => Some(own_delay),
                Standing::Blocked(_) => None,
            };
            if let Some(own_delay) = own_delay {
                if !self.stamp(keys, &mut place, own_delay).await? {
                    return self.gone(keys, &place).await;
                }
                self.note_granted(&place);
                return Ok(AcquireOutcome::Granted(place.grant(waited)));
            }
            // Leave the line, if still in it. Should the rule have admitted it since the look,
            // that grant was never answered: leaving then is a release nobody saw.
            let txn = place
                .leave(vec![queue_oldest(keys.queue(), 1)])
                .or_else(vec![queue_oldest(keys.queue(), 1)]);
            let answer = self.etcd.txn("end_wait", txn).await?;
            // Revoke the etcd lease only if this left the line: had the key gone another way
            // (say, granted through another server and released), a release may have handed
            // the etcd lease to a new acquire meanwhile.
            let head = if answer.succeeded() {
                self.etcd.revoke_later(place.lease.etcd);
                first(&answer, 2)
            } else {
                first(&answer, 0)
            };
            let holder = match head {
                Some(kv) => self.holder_view(&kv).await?,
                None => None,
            };
            return Ok(AcquireOutcome::TimedOut { holder });
        }
        // This keep-alive is sent after `waited`: reporting `waited` stays on the safe side.
        let (looked, kept) = tokio::join!(
            self.look(keys, &place),
            self.etcd.keep_alive(place.lease.etcd, place.entry.ttl)
        );
        let standing = looked?;
        match kept {
            Ok(()) if !matches!(standing, Standing::Gone) => {}
            Ok(()) | Err(EtcdError::LeaseGone) => return self.gone(keys, &place).await,
            Err(e) => return Err(e),
        }
        match standing {
            Standing::Gone => self.gone(keys, &place).await,
            Standing::Admitted { own_delay } => {
                if !self.stamp(keys, &mut place, own_delay).await? {
                    return self.gone(keys, &place).await;
                }
                self.note_granted(&place);
                Ok(AcquireOutcome::Granted(place.grant(waited)))
            }
            Standing::Blocked(_) => {
                self.mark(keys, &place).await;
                Ok(AcquireOutcome::StillWaiting {
                    position: self.waiters_ahead(keys, place.revision).await?,
                    next: None,
                })
            }
        }
    }

    /// How many waiters are ahead of a waiter: the entries ahead less the holders among them
    /// (counted in the first [`POSITION_HEAD`] in line; lock-delays aside, which hold no
    /// entry back here: a waiter held back only by one is told 0).
    async fn waiters_ahead(&self, keys: &LockKeys, revision: i64) -> Result<u64, EtcdError> {
        let answer = self
            .etcd
            .txn(
                "end_poll",
                Txn::new().and_then(vec![
                    names_ahead_of(keys.queue(), revision),
                    queue_oldest(keys.queue(), POSITION_HEAD),
                ]),
            )
            .await?;
        let ahead = kvs(&answer, 0).len();
        let head: Vec<(i64, Mode)> = kvs(&answer, 1)
            .iter()
            .filter(|kv| kv.create_revision() < revision)
            .map(|kv| (kv.create_revision(), Entry::decode(kv.value()).mode()))
            .collect();
        let holders = rule::holding(&head, &[]);
        Ok(ahead.saturating_sub(holders) as u64)
    }

    /// The answer to a waiter whose place is gone. If the request moved to an earlier place
    /// of its own (a repeat left the place for it, and its request key marks it now: see
    /// `acquire.rs`, `move_to`), it still waits: its next poll resumes that place. Else it
    /// was withdrawn meanwhile (cancelled, or out of time).
    async fn gone(&self, keys: &LockKeys, place: &Place) -> Result<AcquireOutcome, EtcdError> {
        if let Some(request_key) = &place.request_key {
            let marked = self.etcd.get("gone", request_key, None).await?;
            let moved_to = marked
                .kvs()
                .first()
                .and_then(|kv| read_request_value(kv.value()).1)
                .filter(|&revision| revision != place.revision);
            if let Some(revision) = moved_to {
                return Ok(AcquireOutcome::StillWaiting {
                    position: self.waiters_ahead(keys, revision).await?,
                    next: None,
                });
            }
        }
        self.withdrawn(keys).await
    }

    /// The answer to a waiter withdrawn meanwhile (cancelled, or out of time).
    pub(super) async fn withdrawn(&self, keys: &LockKeys) -> Result<AcquireOutcome, EtcdError> {
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
        // Unless the entry changed meanwhile: a proclaim right after the grant must not be
        // undone by this older copy.
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(place.key.clone(), CompareOp::Equal, place.revision),
                Compare::value(place.key.clone(), CompareOp::Equal, place.entry.encode()),
            ])
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
