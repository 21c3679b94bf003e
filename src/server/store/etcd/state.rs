//! What a lock's keys say: who holds it under the grant rule (`rule.rs`), who waits first,
//! and which ended leases' lock-delays still run. For inspection, revocation and listing.

use super::Inner;
use super::call::{EtcdError, count_of, kvs, queue_oldest, revision, under};
use super::keys::{DelayMark, Entry, LockKeys};
use super::rule::{self, PAGE};
use crate::server::store::Mode;
use etcd_client::{GetOptions, KeyValue, SortOrder, SortTarget, Txn};

/// A lock as one revision of etcd shows it.
#[derive(Debug, Default)]
pub(super) struct LockState {
    /// The holders, oldest first.
    pub holders: Vec<KeyValue>,
    /// The first entry in line that waits.
    pub first_waiter: Option<KeyValue>,
    /// Every entry in line, holders included.
    pub in_line: i64,
    /// Delay keys of ended leases (phantoms) among or before the holders and the first
    /// waiter: while they exist, they hold grants back.
    pub phantoms: Vec<KeyValue>,
    /// Every delay key of the lock, phantoms or not.
    pub delays: Vec<KeyValue>,
}

impl LockState {
    /// The delay key of the entry whose create revision (fencing token) is `token`, if it
    /// asked for a lock-delay.
    pub fn delay_of(&self, token: i64) -> Option<&KeyValue> {
        self.delays
            .iter()
            .find(|kv| DelayMark::decode(kv.value()).token == token)
    }

    /// The holders' mode, else the first waiter's.
    pub fn mode(&self) -> Mode {
        self.holders
            .first()
            .or(self.first_waiter.as_ref())
            .map_or(Mode::Exclusive, |kv| Entry::decode(kv.value()).mode())
    }
}

/// The delay keys among `delays` that belong to no entry of `entries` (oldest first), up to
/// `upto` (a create revision), as (token, mode), oldest first, with their keys.
pub(super) fn phantoms_among(
    delays: &[KeyValue],
    entries: &[KeyValue],
    upto: i64,
) -> Vec<(i64, Mode, KeyValue)> {
    let mut phantoms: Vec<(i64, Mode, KeyValue)> = delays
        .iter()
        .map(|kv| {
            let mark = DelayMark::decode(kv.value());
            (mark.token, mark.mode(), kv.clone())
        })
        .filter(|(token, _, _)| {
            *token <= upto
                && entries
                    .binary_search_by_key(token, |e| e.create_revision())
                    .is_err()
        })
        .collect();
    phantoms.sort_by_key(|(token, _, _)| *token);
    phantoms
}

impl Inner {
    /// Reads the lock's queue from its head (a page, and more only while every entry read
    /// holds) and its delay keys, all at one revision.
    pub(super) async fn lock_state(
        &self,
        what: &'static str,
        keys: &LockKeys,
    ) -> Result<LockState, EtcdError> {
        let answer = self
            .etcd
            .txn(
                what,
                Txn::new().and_then(vec![
                    queue_oldest(keys.queue(), PAGE as i64),
                    under(keys.delays()),
                ]),
            )
            .await?;
        let at = revision(&answer);
        let in_line = count_of(&answer, 0);
        let mut entries = kvs(&answer, 0);
        let delays = kvs(&answer, 1);
        let mut complete = entries.len() < PAGE;
        loop {
            let upto = match entries.last() {
                Some(last) if !complete => last.create_revision(),
                _ => i64::MAX,
            };
            let phantoms = phantoms_among(&delays, &entries, upto);
            let live: Vec<(i64, Mode)> = entries
                .iter()
                .map(|kv| (kv.create_revision(), Entry::decode(kv.value()).mode()))
                .collect();
            let seats: Vec<(i64, Mode)> = phantoms.iter().map(|(t, m, _)| (*t, *m)).collect();
            let holding = rule::holding(&live, &seats);
            if holding == entries.len() && !complete {
                // Every entry read holds (readers, permits): the rest may too.
                let Some(last) = entries.last().map(|kv| kv.create_revision()) else {
                    break;
                };
                let options = GetOptions::new()
                    .with_prefix()
                    .with_revision(at)
                    .with_min_create_revision(last + 1)
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(PAGE as i64);
                let mut page = self.etcd.get(what, keys.queue(), Some(options)).await?;
                let page = page.take_kvs();
                complete = page.len() < PAGE;
                entries.extend(page);
                continue;
            }
            let first_waiter = entries.get(holding).cloned();
            entries.truncate(holding);
            return Ok(LockState {
                holders: entries,
                first_waiter,
                in_line,
                phantoms: phantoms.into_iter().map(|(_, _, kv)| kv).collect(),
                delays,
            });
        }
        Ok(LockState {
            in_line,
            phantoms: phantoms_among(&delays, &[], i64::MAX)
                .into_iter()
                .map(|(_, _, kv)| kv)
                .collect(),
            delays,
            ..LockState::default()
        })
    }
}
