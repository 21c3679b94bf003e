//! Counting locks under a prefix of queue keys, for lock quotas and `/metrics` (which also
//! counts holders by the grant rule).
//!
//! A lock's queue keys sit together in key order (`.../q/<lock>/<lease>`), so locks are
//! counted from pages of key names, each page starting past the last lock of the one before:
//! no answer grows past gRPC's message size limit (4 MiB, about 30,000 names), and a lock
//! with many waiters costs one page rather than one per thousand of them.

use super::Inner;
use super::call::EtcdError;
use super::keys::Entry;
use super::rule;
use crate::server::store::Mode;
use etcd_client::GetOptions;

/// What the whole store holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Census {
    /// Locks somebody holds or waits for.
    pub locks: u64,
    /// Holders over all locks (lock-delays aside: a first in line held back by one counts).
    pub holders: u64,
    /// Entries in line over all locks, holders included.
    pub entries: u64,
}

/// The holders among one lock's entries, given as (create revision, mode) in key order.
fn holders_of(entries: &mut [(i64, Mode)]) -> u64 {
    entries.sort_unstable_by_key(|(revision, _)| *revision);
    rule::holding(entries, &[]) as u64
}

/// Key names per page: far below the message size limit.
const PAGE: i64 = 1000;

/// The first key after every key that starts with `prefix` (etcd's range end for it).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// The lock a queue key belongs to: the key up to its last `/`.
fn lock_of(key: &[u8]) -> &[u8] {
    key.iter()
        .rposition(|&b| b == b'/')
        .map_or(key, |end| &key[..end])
}

impl Inner {
    /// How many locks have queue keys under `prefix`, counting no further than `enough`;
    /// all of it read at one revision.
    pub(super) async fn count_locks(
        &self,
        what: &'static str,
        prefix: &[u8],
        enough: u64,
    ) -> Result<u64, EtcdError> {
        let end = prefix_end(prefix);
        let mut start = prefix.to_vec();
        let mut revision = 0;
        let mut locks = 0;
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_keys_only()
                .with_limit(PAGE)
                .with_revision(revision);
            let page = self.etcd.get(what, &start, Some(options)).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let mut last: Option<&[u8]> = None;
            for kv in page.kvs() {
                let lock = lock_of(kv.key());
                if last != Some(lock) {
                    locks += 1;
                    last = Some(lock);
                }
            }
            let Some(last) = last else {
                return Ok(locks);
            };
            if !page.more() || locks >= enough {
                return Ok(locks);
            }
            // Past the rest of the last lock's keys: `<lock>/` ends just before `<lock>0`.
            let mut lock_keys = last.to_vec();
            lock_keys.push(b'/');
            start = prefix_end(&lock_keys);
        }
    }
}

impl Inner {
    /// Locks, holders and entries under `prefix`, all read at one revision, in pages of
    /// entries with their values (the grant rule needs their modes).
    pub(super) async fn census(
        &self,
        what: &'static str,
        prefix: &[u8],
    ) -> Result<Census, EtcdError> {
        let end = prefix_end(prefix);
        let mut start = prefix.to_vec();
        let mut revision = 0;
        let mut census = Census::default();
        // The lock being counted (its keys may span pages), and its entries.
        let mut lock: Vec<u8> = Vec::new();
        let mut entries: Vec<(i64, Mode)> = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(rule::PAGE as i64)
                .with_revision(revision);
            let mut page = self.etcd.get(what, &start, Some(options)).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            for kv in &kvs {
                if lock_of(kv.key()) != lock.as_slice() {
                    census.holders += holders_of(&mut entries);
                    entries.clear();
                    lock = lock_of(kv.key()).to_vec();
                    census.locks += 1;
                }
                entries.push((kv.create_revision(), Entry::decode(kv.value()).mode()));
                census.entries += 1;
            }
            let Some(last) = kvs.last() else { break };
            if !more {
                break;
            }
            start = last.key().to_vec();
            start.push(0);
        }
        census.holders += holders_of(&mut entries);
        Ok(census)
    }
}

#[cfg(test)]
mod tests {
    use super::super::store_for_tests;
    use super::{PAGE, lock_of, prefix_end};
    use etcd_client::{GetOptions, Txn, TxnOp};

    /// One lock with more waiters than a page holds, and more key names than one gRPC
    /// answer can carry (4 MiB); then small locks, and a neighbour prefix that must not
    /// count.
    #[tokio::test]
    async fn locks_are_counted_across_pages() {
        let (etcd, store) = store_for_tests().await;
        let mut direct = etcd.client().await;
        let big = 20 * PAGE as usize + 10;
        let long = "0".repeat(200);
        let mut keys: Vec<String> = (0..big).map(|i| format!("t/q/aa/{long}{i:05}")).collect();
        keys.extend((0..150).map(|i| format!("t/q/b{i:03}/1")));
        keys.push("t/q0/cc/1".into());
        for chunk in keys.chunks(100) {
            let puts = chunk.iter().map(|k| TxnOp::put(k.as_str(), "", None));
            direct
                .txn(Txn::new().and_then(puts.collect::<Vec<_>>()))
                .await
                .unwrap();
        }
        let all_names = GetOptions::new().with_prefix().with_keys_only();
        let at_once = direct.get("t/q/", Some(all_names)).await;
        assert!(
            at_once.is_err(),
            "the names fit one answer: the test proves nothing"
        );
        let count = |enough| store.inner.count_locks("test", b"t/q/", enough);
        assert_eq!(count(u64::MAX).await.unwrap(), 151);
        // Counting stops once it has enough (within a page).
        assert!((10..=151).contains(&count(10).await.unwrap()));
    }

    #[test]
    fn prefix_ends_are_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"a/q/"), b"a/q0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(lock_of(b"/p/70/q/6c/1f"), b"/p/70/q/6c");
    }
}
