//! One etcd watch per server over every queue key: waiters learn from it that a key they
//! wait for (or their own) is gone: the key just ahead of a writer, the nearest writer ahead
//! of a reader, the `n` nearest entries ahead of a semaphore's waiter (see `rule.rs`).
//!
//! Why not a watch per waiter, as etcd's own mutex does: a watch created while etcd is busy
//! can start "unsynced", and etcd then delivers its events only from a catch-up loop that
//! runs every 100 ms, which held hand-overs back by up to that (`cargo bench --bench etcd`:
//! p99 93 ms). One long-lived watch is synced once and stays so, and spares etcd a watch
//! stream per waiter.
//!
//! The rule a waiter follows: subscribe, then look at the queue again if the watch has
//! already passed the revision the waiter last looked at. Every deletion after the
//! subscription's revision wakes it; every earlier one is in what it looks at.

use super::call::Etcd;
use etcd_client::{EventType, WatchFilterType, WatchOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// The shared watch's state, as waiters see it.
#[derive(Debug)]
pub(super) struct Deletions {
    state: Mutex<State>,
    /// Dropped with the store: ends the watch task.
    _stop: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct State {
    /// Subscribers by the keys they wait on.
    by_key: HashMap<Vec<u8>, Vec<(u64, Arc<Notify>)>>,
    /// Subscribers woken by any deletion under a lock's queue prefix.
    by_lock: HashMap<Vec<u8>, Vec<(u64, Arc<Notify>)>>,
    /// Every subscriber, to wake them all when the watch goes down or comes back.
    all: HashMap<u64, Arc<Notify>>,
    next_id: u64,
    /// The revision up to which the watch has delivered deletions; `None` while it is down.
    seen: Option<i64>,
}

/// A waiter's interest in some keys (or a whole lock); dropping it ends the interest.
pub(super) struct Subscription {
    deletions: Arc<Deletions>,
    id: u64,
    keys: Vec<Vec<u8>>,
    lock: Option<Vec<u8>>,
    notify: Arc<Notify>,
    /// The watch's revision when subscribed; `None` if the watch was down.
    pub from: Option<i64>,
}

impl Subscription {
    /// Resolves when one of the keys is deleted, or the watch goes down or comes back.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.deletions.lock();
        let id = self.id;
        for key in &self.keys {
            unsubscribe(&mut state.by_key, key, id);
        }
        if let Some(lock) = &self.lock {
            unsubscribe(&mut state.by_lock, lock, id);
        }
        state.all.remove(&self.id);
    }
}

type Subscribers = HashMap<Vec<u8>, Vec<(u64, Arc<Notify>)>>;

fn unsubscribe(map: &mut Subscribers, key: &[u8], id: u64) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|(i, _)| *i != id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

/// The queue prefix of the lock a queue key belongs to: the key up to its last `/`,
/// included.
fn lock_of(key: &[u8]) -> &[u8] {
    key.iter()
        .rposition(|&b| b == b'/')
        .map_or(key, |slash| &key[..=slash])
}

impl Deletions {
    /// Starts watching deletions of every key under `prefix`.
    pub fn start(etcd: Etcd, prefix: Vec<u8>) -> Arc<Deletions> {
        let (stop, stopped) = oneshot::channel();
        let deletions = Arc::new(Deletions {
            state: Mutex::default(),
            _stop: stop,
        });
        let watched = Arc::downgrade(&deletions);
        tokio::spawn(async move {
            tokio::select! {
                () = watch(etcd, prefix, watched) => {}
                _ = stopped => {}
            }
        });
        deletions
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the subscriber when one of `keys` is deleted, or with `lock` (a lock's queue
    /// prefix, ending in `/`) any key of that lock.
    pub fn subscribe(self: &Arc<Self>, keys: Vec<Vec<u8>>, lock: Option<&[u8]>) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        for key in &keys {
            let list = state.by_key.entry(key.clone()).or_default();
            // A key given twice wakes once.
            if list.last().is_none_or(|(i, _)| *i != id) {
                list.push((id, notify.clone()));
            }
        }
        if let Some(lock) = lock {
            state
                .by_lock
                .entry(lock.to_vec())
                .or_default()
                .push((id, notify.clone()));
        }
        state.all.insert(id, notify.clone());
        Subscription {
            deletions: self.clone(),
            id,
            keys,
            lock: lock.map(<[u8]>::to_vec),
            notify,
            from: state.seen,
        }
    }

    /// The watch delivered deletions up to `revision`.
    fn deleted(&self, keys: &[&[u8]], revision: i64) {
        let mut state = self.lock();
        for key in keys {
            let by_key = state.by_key.get(*key).into_iter().flatten();
            let by_lock = state.by_lock.get(lock_of(key)).into_iter().flatten();
            for (_, notify) in by_key.chain(by_lock) {
                notify.notify_one();
            }
        }
        state.seen = Some(state.seen.map_or(revision, |seen| seen.max(revision)));
    }

    /// The watch is up from `revision` on (`Some`), or down (`None`): every subscriber must
    /// look again.
    fn set(&self, seen: Option<i64>) {
        let mut state = self.lock();
        state.seen = seen;
        for notify in state.all.values() {
            notify.notify_one();
        }
    }
}

/// Keeps the watch up while the store lives, and reports what it sees.
async fn watch(etcd: Etcd, prefix: Vec<u8>, deletions: Weak<Deletions>) {
    let mut pause = Duration::from_millis(10);
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_filters([WatchFilterType::NoPut]);
        let stream = etcd
            .client
            .watch_client()
            .watch(prefix.clone(), Some(options))
            .await;
        if let Ok(mut stream) = stream {
            while let Ok(Some(message)) = stream.message().await {
                let Some(deletions) = deletions.upgrade() else {
                    return;
                };
                if message.canceled() {
                    tracing::debug!(reason = message.cancel_reason(), "etcd watch cancelled");
                    break;
                }
                // Without its revision, a message cannot say how far the watch got (etcd
                // always sends it): start over.
                let Some(revision) = message.header().map(|h| h.revision()) else {
                    break;
                };
                if message.created() {
                    // Deletions after this revision will come.
                    deletions.set(Some(revision));
                    pause = Duration::from_millis(10);
                    continue;
                }
                let keys: Vec<&[u8]> = message
                    .events()
                    .iter()
                    .filter(|e| e.event_type() == EventType::Delete)
                    .filter_map(|e| e.kv().map(|kv| kv.key()))
                    .collect();
                deletions.deleted(&keys, revision);
            }
        }
        match deletions.upgrade() {
            Some(deletions) => deletions.set(None),
            None => return,
        }
        tracing::debug!("etcd watch of deletions down; opening it again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::lock_of;

    #[test]
    fn a_queue_key_belongs_to_the_prefix_before_its_last_slash() {
        assert_eq!(lock_of(b"/l/p/61/q/6c/00ff"), b"/l/p/61/q/6c/");
        assert_eq!(lock_of(b"none"), b"none");
    }
}
