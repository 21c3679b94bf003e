//! Where the etcd backend keeps things: the key layout and the values.
//!
//! ```text
//! <prefix>/p/<hex project name>/q/<hex lock name>/<hex lease id>    one per acquire (the queue)
//! <prefix>/p/<hex project name>/r/<hex lock name>/<hex request id>  request id -> lease id
//! ```
//!
//! Both keys of an acquire are written in one transaction and attached to the acquire's own
//! etcd lease, so they live and die together. Hex has no `/`, and every hex field is followed
//! by a `/`, so no project, lock name or id can alias another: project `a` (`61/`) is not a
//! prefix of project `ab` (`6162/`), and lock names containing `/` stay one segment.
//!
//! The queue key's name is the client's lease id: the etcd lease id (8 bytes) followed by a
//! random secret (8 bytes). Renew and release find the key from the lease id alone, and a
//! guessed or foreign lease id names a key that does not exist.

use crate::id::Id;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// The key prefix of every project (for store-wide figures).
pub(super) fn all_projects(prefix: &str) -> Vec<u8> {
    format!("{prefix}/p/").into_bytes()
}

/// The prefix of every queue key of a project (for its lock quota).
pub(super) fn project_queues(prefix: &str, project: &str) -> Vec<u8> {
    format!("{prefix}/p/{}/q/", hex(project.as_bytes())).into_bytes()
}

/// The keys of one lock.
#[derive(Debug, Clone)]
pub(super) struct LockKeys {
    /// `<prefix>/p/<project>/q/<name>/`: every acquire of the lock, ordered by create revision.
    queue: Vec<u8>,
    /// `<prefix>/p/<project>/r/<name>/`.
    requests: Vec<u8>,
}

impl LockKeys {
    pub fn new(prefix: &str, project: &str, name: &str) -> LockKeys {
        let project = hex(project.as_bytes());
        let name = hex(name.as_bytes());
        LockKeys {
            queue: format!("{prefix}/p/{project}/q/{name}/").into_bytes(),
            requests: format!("{prefix}/p/{project}/r/{name}/").into_bytes(),
        }
    }

    /// The prefix under which the lock's queue keys live.
    pub fn queue(&self) -> &[u8] {
        &self.queue
    }

    pub fn queue_key(&self, lease: LeaseId) -> Vec<u8> {
        let mut key = self.queue.clone();
        key.extend_from_slice(hex(&lease.to_id().0).as_bytes());
        key
    }

    pub fn request_key(&self, request_id: Id) -> Vec<u8> {
        let mut key = self.requests.clone();
        key.extend_from_slice(hex(&request_id.0).as_bytes());
        key
    }
}

/// The lease id clients see: the etcd lease id and a random secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LeaseId {
    /// The etcd lease (positive).
    pub etcd: i64,
    pub secret: u64,
}

impl LeaseId {
    pub fn to_id(self) -> Id {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.etcd.to_be_bytes());
        bytes[8..].copy_from_slice(&self.secret.to_be_bytes());
        Id(bytes)
    }

    /// `None` for ids this backend never hands out.
    pub fn from_id(id: Id) -> Option<LeaseId> {
        let etcd = i64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
        let secret = u64::from_be_bytes(id.0[8..].try_into().expect("8 bytes"));
        (etcd > 0).then_some(LeaseId { etcd, secret })
    }

    /// The lease id a queue key is named after.
    pub fn from_queue_key(key: &[u8]) -> Option<LeaseId> {
        let name = key.rsplit(|&b| b == b'/').next()?;
        let bytes: [u8; 16] = unhex(name)?.try_into().ok()?;
        LeaseId::from_id(Id(bytes))
    }

    /// Parses the value of a request key.
    pub fn from_request_value(value: &[u8]) -> Option<LeaseId> {
        let bytes: [u8; 16] = unhex(value)?.try_into().ok()?;
        LeaseId::from_id(Id(bytes))
    }

    pub fn request_value(self) -> String {
        hex(&self.to_id().0)
    }
}

/// The value of a queue key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    /// The etcd lease's TTL in seconds, as granted.
    pub ttl: i64,
    /// When the acquire was queued (Unix ms).
    pub at: u64,
    /// When a waiter was seen to get the lock (Unix ms), if that happened after it queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("entries always serialize")
    }

    /// A value this backend did not write reads as an entry with a 1 s TTL and no label.
    pub fn decode(value: &[u8]) -> Entry {
        serde_json::from_slice(value).unwrap_or(Entry {
            ttl: 1,
            at: 0,
            granted: None,
            label: None,
        })
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.ttl.max(1) as u64)
    }
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub(super) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts_with(key: &[u8], prefix: &[u8]) -> bool {
        key.starts_with(prefix)
    }

    #[test]
    fn projects_and_names_never_alias() {
        let a = LockKeys::new("/dl", "a", "b/c");
        let ab = LockKeys::new("/dl", "ab", "/c");
        let a2 = LockKeys::new("/dl", "a", "b");
        let lease = LeaseId { etcd: 7, secret: 9 };
        // No lock's queue prefix is a prefix of another's keys.
        for (x, y) in [(&a, &ab), (&ab, &a), (&a, &a2), (&a2, &a)] {
            assert!(!starts_with(&y.queue_key(lease), x.queue()));
            assert!(!starts_with(&y.queue_key(lease), &x.requests));
        }
        assert!(!starts_with(
            &ab.queue_key(lease),
            &project_queues("/dl", "a")
        ));
        assert!(starts_with(
            &a.queue_key(lease),
            &project_queues("/dl", "a")
        ));
        assert!(starts_with(&a.queue_key(lease), &all_projects("/dl")));
        // The project's prefix, then the lock's: plain hex segments.
        assert_eq!(a.queue(), b"/dl/p/61/q/622f63/");
    }

    #[test]
    fn lease_ids_round_trip_through_keys_and_values() {
        let keys = LockKeys::new("/x", "p", "n");
        let lease = LeaseId {
            etcd: 0x1234_5678_9abc_def0,
            secret: u64::MAX - 3,
        };
        assert_eq!(LeaseId::from_id(lease.to_id()), Some(lease));
        assert_eq!(LeaseId::from_queue_key(&keys.queue_key(lease)), Some(lease));
        assert_eq!(
            LeaseId::from_request_value(lease.request_value().as_bytes()),
            Some(lease)
        );
        // Ids with a non-positive etcd part are never ours.
        assert_eq!(LeaseId::from_id(Id([0; 16])), None);
        assert_eq!(LeaseId::from_id(Id([0xff; 16])), None);
        assert_eq!(LeaseId::from_request_value(b"zz"), None);
    }

    #[test]
    fn entries_round_trip() {
        let entry = Entry {
            ttl: 3,
            at: 42,
            granted: None,
            label: Some("host/1".into()),
        };
        let back = Entry::decode(&entry.encode());
        assert_eq!((back.ttl, back.at, back.label), (3, 42, entry.label));
        assert_eq!(Entry::decode(b"junk").ttl, 1);
    }
}
