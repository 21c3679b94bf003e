//! Elections on etcd: the leader of a name is its exclusive holder under the grant rule (the
//! head of the queue, in exclusive mode, with no earlier holder's lock-delay running); its
//! value lives in its queue entry.
//!
//! * **Proclaim** reads the caller's entry, then rewrites its value in one transaction that
//!   holds only while the caller still holds: its queue key with the same create revision,
//!   etcd lease and last write, its request key, nobody ahead of it, and no delay key but its
//!   own. The lease, the create revision (fencing token) and everything else stay.
//! * **Observe** replays the queue's history: it reads the queue as it was at the revision
//!   the observer last saw (etcd keeps history until a compaction), then watches the queue's
//!   keys from the next revision, working out the leader after each revision, so no leader
//!   is missed however briefly it led. The one change a queue watch cannot see is an ended
//!   leader's lock-delay running out (its delay key goes when its etcd lease ends, under
//!   another prefix) while an exclusive waiter is first in line: the observer then finds the
//!   exact revision from the delay keys' history (binary search by reads at revisions), before
//!   the next queue event, or by looking every 100 ms while the queue is quiet. One watch per
//!   waiting observe call; observers do not share.

use super::Inner;
use super::call::{EtcdError, first, first_since, get, kvs, queue_oldest, revision, under};
use super::census::prefix_end;
use super::keys::{DelayMark, Entry, LeaseId, LockKeys, from_unix_ms};
use super::rule::PAGE;
use crate::id::Id;
use crate::server::store::{LeaderView, Mode, Observation, Proclaimed, Project};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// Rounds a proclaim may take when its entry changes under it (a grant's time being noted).
const PROCLAIM_ATTEMPTS: usize = 4;

/// How often an observer looks whether a lock-delay that holds the first in line back has
/// run out, while the queue is quiet.
const DELAY_LOOK_EVERY: Duration = Duration::from_millis(100);

/// Why a non-exclusive lease may not proclaim.
fn not_alone(name: &str, mode: Mode) -> String {
    let how = match mode {
        Mode::Shared => "in shared (read) mode".to_owned(),
        Mode::Permit(n) => format!("as one of a semaphore's {n} permits"),
        Mode::Exclusive => "exclusively".to_owned(),
    };
    format!("this lease holds {name:?} {how}; only the exclusive holder (the leader) can proclaim")
}

/// The leader, if the head of the queue (`revision`, `entry`) holds alone: exclusive, and no
/// ended lease's lock-delay ahead of it (`delays`: the tokens of the lock's delay keys).
fn leader_of(head: Option<(i64, &Entry)>, delays: &[i64]) -> Option<LeaderView> {
    let (revision, entry) = head?;
    if entry.mode() != Mode::Exclusive || delays.iter().any(|&token| token < revision) {
        return None;
    }
    Some(LeaderView {
        fencing_token: revision as u64,
        value: entry.value.clone().unwrap_or_default(),
        label: entry.label.clone(),
        acquired_at: from_unix_ms(entry.granted.unwrap_or(entry.at)),
    })
}

/// The same leadership state: the same leader with the same value.
fn same(a: &Option<LeaderView>, b: &Option<LeaderView>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.fencing_token == b.fencing_token && a.value == b.value,
        _ => false,
    }
}

/// An observer's replay of a lock's queue.
struct Replay {
    keys: LockKeys,
    /// The revision the replay stands at.
    at: i64,
    /// Entries in line by create revision: key, and the entry once read (the head's always).
    queue: BTreeMap<i64, (Vec<u8>, Option<Entry>)>,
    by_key: HashMap<Vec<u8>, i64>,
    /// Tokens of the lock's delay keys, as of the last read (kept exact while the head is
    /// exclusive, the only time they matter).
    delays: Vec<i64>,
    /// The leadership state last reported (or found at the start).
    leader: Option<LeaderView>,
}

impl Replay {
    fn head(&self) -> Option<(i64, &Entry)> {
        let (revision, (_, entry)) = self.queue.first_key_value()?;
        Some((*revision, entry.as_ref()?))
    }

    fn leader(&self) -> Option<LeaderView> {
        leader_of(self.head(), &self.delays)
    }

    /// An exclusive first in line held back only by lock-delays: it leads once they end.
    fn held_back(&self) -> bool {
        self.head().is_some_and(|(revision, entry)| {
            entry.mode() == Mode::Exclusive && self.delays.iter().any(|&t| t < revision)
        })
    }

    /// A new state, if the leadership changed: recorded as reported.
    fn changed(&mut self, revision: i64) -> Option<Observation> {
        let leader = self.leader();
        if same(&leader, &self.leader) {
            return None;
        }
        self.leader = leader.clone();
        Some(Observation {
            revision: revision as u64,
            leader,
        })
    }

    fn insert(&mut self, kv: &KeyValue) {
        let revision = kv.create_revision();
        if let Some(old) = self.by_key.insert(kv.key().to_vec(), revision)
            && old != revision
        {
            // A reused key name: the old place was deleted (an event this replay saw).
            self.queue.remove(&old);
        }
        self.queue.insert(
            revision,
            (kv.key().to_vec(), Some(Entry::decode(kv.value()))),
        );
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(revision) = self.by_key.remove(key) {
            self.queue.remove(&revision);
        }
    }
}

impl Inner {
    /// Sets the election value of a lease that holds its lock exclusively.
    pub(super) async fn proclaim(
        &self,
        project: &Project,
        name: &str,
        id: Id,
        value: String,
    ) -> Result<Proclaimed, EtcdError> {
        let keys = self.keys(project, name);
        let Some(lease) = LeaseId::from_id(id) else {
            return Ok(Proclaimed::Gone(None));
        };
        let key = keys.queue_key(lease.etcd);
        let request_key = lease.request_key(&keys);
        let own_delay = keys.delay_key(lease.etcd);
        for _ in 0..PROCLAIM_ATTEMPTS {
            let mut reads = vec![
                get(key.clone()),
                queue_oldest(keys.queue(), 1),
                under(keys.delays()),
            ];
            reads.extend(request_key.clone().map(get));
            let answer = self
                .etcd
                .txn("proclaim", Txn::new().and_then(reads))
                .await?;
            let attached = |kv: &KeyValue| kv.lease() == lease.etcd;
            let own = first(&answer, 0).filter(|kv| lease.names(kv));
            let proven = request_key.is_none() || first(&answer, 3).filter(attached).is_some();
            let (Some(own), true) = (own, proven) else {
                // Not held under this id: why, if its ended key says.
                let why = self.ended_why(&[Some((lease, keys.clone()))]).await?;
                return Ok(Proclaimed::Gone(why.first().copied().flatten()));
            };
            let mut entry = Entry::decode(own.value());
            if entry.mode() != Mode::Exclusive {
                return Err(EtcdError::Conflict(not_alone(name, entry.mode())));
            }
            let first_in_line = first(&answer, 1)
                .is_some_and(|head| head.create_revision() == own.create_revision());
            let held_back = kvs(&answer, 2)
                .iter()
                .any(|kv| kv.key() != own_delay.as_slice());
            if !first_in_line || held_back {
                // In line but not holding: a lease id this store never handed out for it.
                return Ok(Proclaimed::Gone(None));
            }
            entry.value = Some(value.clone());
            let mut past_own = own_delay.clone();
            past_own.push(0);
            let mut when = lease.holds(&keys);
            when.extend([
                Compare::create_revision(key.clone(), CompareOp::Equal, own.create_revision()),
                // Nothing wrote the entry since it was read (a grant's time being noted):
                // this write keeps all of it but the value.
                Compare::mod_revision(key.clone(), CompareOp::Equal, own.mod_revision()),
                // Still first in line,
                first_since(keys.queue(), own.create_revision()),
                // and no delay key but its own: no earlier holder's lock-delay.
                Compare::create_revision(keys.delays(), CompareOp::Equal, 0)
                    .with_range(own_delay.clone()),
                Compare::create_revision(past_own, CompareOp::Equal, 0)
                    .with_range(prefix_end(keys.delays())),
            ]);
            let txn = Txn::new().when(when).and_then(vec![super::call::put(
                key.clone(),
                entry.encode(),
                lease.etcd,
            )]);
            if self.etcd.txn("proclaim", txn).await?.succeeded() {
                return Ok(Proclaimed::Done);
            }
        }
        Err(EtcdError::Unavailable(
            "the lock kept changing during the proclaim; retry".into(),
        ))
    }

    /// The leadership of an election (see the module's description).
    pub(super) async fn observe(
        &self,
        project: &Project,
        name: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<Observation>, EtcdError> {
        let keys = self.keys(project, name);
        let deadline = Instant::now() + wait;
        let Some(after) = after else {
            return Ok(vec![self.observe_now(&keys).await?]);
        };
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut replay = match self.replay_at(&keys, after).await {
            Ok(replay) => replay,
            Err(EtcdError::Compacted) => return Ok(vec![self.observe_now(&keys).await?]),
            // A revision etcd has not reached (another cluster's?): nothing can have changed
            // between now and then; changes after it are reported.
            Err(EtcdError::FutureRevision) => {
                let mut replay = self.replay_at(&keys, 0).await?;
                replay.at = after;
                replay
            }
            Err(e) => return Err(e),
        };
        match self.replay(&mut replay, deadline).await {
            Err(EtcdError::Compacted) => Ok(vec![self.observe_now(&keys).await?]),
            other => other,
        }
    }

    /// The current leadership, as of the read's revision (not the revision it began at, which
    /// would need the history).
    async fn observe_now(&self, keys: &LockKeys) -> Result<Observation, EtcdError> {
        let answer = self
            .etcd
            .txn(
                "observe",
                Txn::new().and_then(vec![queue_oldest(keys.queue(), 1), under(keys.delays())]),
            )
            .await?;
        let head = first(&answer, 0).map(|kv| (kv.create_revision(), Entry::decode(kv.value())));
        let delays = tokens(&kvs(&answer, 1));
        Ok(Observation {
            revision: revision(&answer) as u64,
            leader: leader_of(head.as_ref().map(|(r, e)| (*r, e)), &delays),
        })
    }

    /// The queue as it was at `at` (0: now): its entries' names, the head's entry and the
    /// delay keys, in one transaction reading at that revision (further pages of names, for a
    /// queue of more than a page, after it).
    async fn replay_at(&self, keys: &LockKeys, at: i64) -> Result<Replay, EtcdError> {
        let names = |after: i64, at: i64| {
            GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_min_create_revision(after + 1)
                .with_limit(PAGE as i64)
                .with_revision(at)
        };
        let head = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_revision(at);
        let delays = GetOptions::new().with_prefix().with_revision(at);
        let answer = self
            .etcd
            .txn(
                "observe",
                Txn::new().and_then(vec![
                    TxnOp::get(keys.queue(), Some(names(0, at))),
                    TxnOp::get(keys.queue(), Some(head)),
                    TxnOp::get(keys.delays(), Some(delays)),
                ]),
            )
            .await?;
        let at = if at == 0 { revision(&answer) } else { at };
        let mut replay = Replay {
            keys: keys.clone(),
            at,
            queue: BTreeMap::new(),
            by_key: HashMap::new(),
            delays: tokens(&kvs(&answer, 2)),
            leader: None,
        };
        let mut page = kvs(&answer, 0);
        loop {
            for kv in &page {
                replay
                    .by_key
                    .insert(kv.key().to_vec(), kv.create_revision());
                replay
                    .queue
                    .insert(kv.create_revision(), (kv.key().to_vec(), None));
            }
            let after = match page.last() {
                Some(last) if page.len() == PAGE => last.create_revision(),
                _ => break,
            };
            let mut more = self
                .etcd
                .get("observe", keys.queue(), Some(names(after, at)))
                .await?;
            page = more.take_kvs();
        }
        if let Some(head) = first(&answer, 1)
            && let Some((_, entry)) = replay.queue.get_mut(&head.create_revision())
        {
            *entry = Some(Entry::decode(head.value()));
        }
        replay.leader = replay.leader();
        Ok(replay)
    }

    /// Reads the head's entry as it was at `at`, if not known yet.
    async fn read_head(&self, replay: &mut Replay, at: i64) -> Result<(), EtcdError> {
        let Some((&revision, (key, None))) = replay.queue.first_key_value() else {
            return Ok(());
        };
        let options = GetOptions::new().with_revision(at);
        let found = self.etcd.get("observe", key, Some(options)).await?;
        let entry = found
            .kvs()
            .iter()
            .find(|kv| kv.create_revision() == revision)
            .map(|kv| Entry::decode(kv.value()));
        match entry {
            Some(entry) => {
                if let Some((_, known)) = replay.queue.get_mut(&revision) {
                    *known = Some(entry);
                }
            }
            // Not there at `at`: the replay went wrong (it cannot); forget the name rather
            // than name a leader from nothing.
            None => {
                let key = key.clone();
                replay.remove(&key);
            }
        }
        Ok(())
    }

    /// The tokens of the lock's delay keys at revision `at`.
    async fn delays_at(&self, keys: &LockKeys, at: i64) -> Result<Vec<i64>, EtcdError> {
        let options = GetOptions::new().with_prefix().with_revision(at);
        let found = self
            .etcd
            .get("observe", keys.delays(), Some(options))
            .await?;
        Ok(tokens(found.kvs()))
    }

    /// Watches the queue from the revision after the replay's and reports the leadership
    /// states after it, as soon as there is one, or none by `deadline`.
    async fn replay(
        &self,
        replay: &mut Replay,
        deadline: Instant,
    ) -> Result<Vec<Observation>, EtcdError> {
        let mut out = Vec::new();
        let mut pause = Duration::from_millis(10);
        loop {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(replay.at + 1);
            let opened = tokio::time::timeout_at(
                deadline,
                self.etcd
                    .client
                    .watch_client()
                    .watch(replay.keys.queue().to_vec(), Some(options)),
            )
            .await;
            let mut stream = match opened {
                Err(_) => return Ok(out),
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "observe: opening the watch failed; again");
                    tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                    if Instant::now() >= deadline {
                        return Ok(out);
                    }
                    continue;
                }
            };
            loop {
                let look = replay
                    .held_back()
                    .then(|| (Instant::now() + DELAY_LOOK_EVERY).min(deadline));
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = tokio::time::sleep_until(deadline) => return Ok(out),
                    _ = tokio::time::sleep_until(look.unwrap_or(deadline)), if look.is_some() => {
                        out.extend(self.delay_over(replay).await?);
                        if !out.is_empty() {
                            return Ok(out);
                        }
                        continue;
                    }
                };
                let message = match message {
                    Ok(Some(message)) => message,
                    // The stream ended or failed: open it again from where the replay is.
                    Ok(None) | Err(_) => break,
                };
                if message.canceled() {
                    if message.compact_revision() > 0 {
                        return match out.is_empty() {
                            true => Err(EtcdError::Compacted),
                            false => Ok(out),
                        };
                    }
                    break;
                }
                // Events come in revision order; a revision's events come together.
                let events = message.events();
                let mut i = 0;
                while i < events.len() {
                    let Some(revision) = events[i].kv().map(|kv| kv.mod_revision()) else {
                        i += 1;
                        continue;
                    };
                    let mut j = i;
                    while j < events.len()
                        && events[j]
                            .kv()
                            .is_some_and(|kv| kv.mod_revision() == revision)
                    {
                        j += 1;
                    }
                    out.extend(self.apply(replay, revision, &events[i..j]).await?);
                    i = j;
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            if Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    /// Applies one revision's events to the replay: the states it brings, in order (a
    /// lock-delay that ran out before it, then its own).
    async fn apply(
        &self,
        replay: &mut Replay,
        revision: i64,
        events: &[etcd_client::Event],
    ) -> Result<Vec<Observation>, EtcdError> {
        let mut out = Vec::new();
        if revision <= replay.at {
            // Before where the replay stands (see `delay_over`): keys put and deleted behind
            // an exclusive first in line held back, which change no leadership.
            for event in events {
                match (event.event_type(), event.kv()) {
                    (EventType::Put, Some(kv)) => replay.insert(kv),
                    (EventType::Delete, Some(kv)) => replay.remove(kv.key()),
                    _ => {}
                }
            }
            return Ok(out);
        }
        if replay.held_back() {
            out.extend(self.delay_over_by(replay, revision - 1).await?);
        }
        let head_before = replay.queue.first_key_value().map(|(r, _)| *r);
        let mut deleted = false;
        for event in events {
            match (event.event_type(), event.kv()) {
                (EventType::Put, Some(kv)) => replay.insert(kv),
                (EventType::Delete, Some(kv)) => {
                    replay.remove(kv.key());
                    deleted = true;
                }
                _ => {}
            }
        }
        replay.at = revision;
        let head_now = replay.queue.first_key_value().map(|(r, _)| *r);
        if head_now != head_before || deleted {
            self.read_head(replay, revision).await?;
            // A holder that left may have left a lock-delay; only an exclusive head cares.
            if replay
                .head()
                .is_some_and(|(_, e)| e.mode() == Mode::Exclusive)
            {
                replay.delays = self.delays_at(&replay.keys, revision).await?;
            }
        }
        out.extend(replay.changed(revision));
        Ok(out)
    }

    /// While the queue is quiet: whether the lock-delays holding the first in line back
    /// have run out, and then at which revision (only once the queue at the revision read
    /// is what the replay has: else queue events before it are still on their way, and are
    /// replayed first).
    async fn delay_over(&self, replay: &mut Replay) -> Result<Option<Observation>, EtcdError> {
        let options = GetOptions::new().with_prefix();
        let found = self
            .etcd
            .get("observe", replay.keys.delays(), Some(options))
            .await?;
        let now = found.header().map_or(0, |h| h.revision());
        let delays = tokens(found.kvs());
        let Some((head, _)) = replay.head() else {
            return Ok(None);
        };
        if delays.iter().any(|&t| t < head) || now <= replay.at {
            return Ok(None);
        }
        // The queue's names and create revisions at `now` against the replay's: values may
        // differ (a grant's time noted), not who is in line.
        let mut names = Vec::new();
        let mut after = 0;
        loop {
            let options = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_min_create_revision(after + 1)
                .with_limit(PAGE as i64)
                .with_revision(now);
            let mut page = self
                .etcd
                .get("observe", replay.keys.queue(), Some(options))
                .await?;
            let page = page.take_kvs();
            let full = page.len() == PAGE;
            names.extend(page.iter().map(|kv| kv.create_revision()));
            match page.last() {
                Some(last) if full => after = last.create_revision(),
                _ => break,
            }
        }
        if !names.iter().copied().eq(replay.queue.keys().copied()) {
            return Ok(None);
        }
        self.delay_over_by(replay, now).await
    }

    /// If the lock-delays that hold the first in line back are over by revision `by` (with no
    /// queue change since the replay's revision), the state from the revision they ended at.
    async fn delay_over_by(
        &self,
        replay: &mut Replay,
        by: i64,
    ) -> Result<Option<Observation>, EtcdError> {
        let Some((head, _)) = replay.head() else {
            return Ok(None);
        };
        if by <= replay.at {
            return Ok(None);
        }
        let blocking = |delays: &[i64]| delays.iter().any(|&t| t < head);
        let at_by = self.delays_at(&replay.keys, by).await?;
        if blocking(&at_by) {
            replay.delays = at_by;
            return Ok(None);
        }
        // Held back at `replay.at`, not at `by`: delay keys only go in between (a new one
        // needs a queue event), so the revision they all went is found by halving.
        let (mut held, mut free, mut free_delays) = (replay.at, by, at_by);
        while free - held > 1 {
            let mid = held + (free - held) / 2;
            let delays = self.delays_at(&replay.keys, mid).await?;
            if blocking(&delays) {
                held = mid;
            } else {
                (free, free_delays) = (mid, delays);
            }
        }
        replay.delays = free_delays;
        replay.at = free;
        Ok(replay.changed(free))
    }
}

/// The tokens of delay keys.
fn tokens(delays: &[KeyValue]) -> Vec<i64> {
    delays
        .iter()
        .map(|kv| DelayMark::decode(kv.value()).token)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(mode: Mode, value: Option<&str>) -> Entry {
        let mut entry = Entry {
            value: value.map(str::to_owned),
            ..Entry::default()
        };
        entry.set_mode(mode);
        entry
    }

    #[test]
    fn the_leader_is_an_exclusive_head_no_lock_delay_holds_back() {
        let x = entry(Mode::Exclusive, Some("a"));
        assert_eq!(leader_of(Some((7, &x)), &[]).unwrap().value, "a");
        assert_eq!(leader_of(Some((7, &x)), &[7, 9]).unwrap().fencing_token, 7);
        assert!(leader_of(Some((7, &x)), &[3]).is_none(), "held back");
        assert!(leader_of(Some((7, &entry(Mode::Shared, None))), &[]).is_none());
        assert!(leader_of(Some((7, &entry(Mode::Permit(1), None))), &[]).is_none());
        assert_eq!(
            leader_of(Some((7, &entry(Mode::Exclusive, None))), &[])
                .unwrap()
                .value,
            ""
        );
        assert!(leader_of(None, &[]).is_none());
    }

    #[test]
    fn only_a_new_leader_or_value_is_a_new_state() {
        let a = leader_of(Some((7, &entry(Mode::Exclusive, Some("a")))), &[]);
        let mut a_later = a.clone();
        if let Some(view) = &mut a_later {
            view.acquired_at = from_unix_ms(99);
        }
        assert!(same(&a, &a_later), "a noted grant time is no new state");
        let b = leader_of(Some((7, &entry(Mode::Exclusive, Some("b")))), &[]);
        assert!(!same(&a, &b));
        assert!(!same(&a, &None));
    }
}
