//! Where the etcd backend keeps things: the key layout and the values.
//!
//! ```text
//! <prefix>/p/<hex project>/q/<hex lock name>/<hex etcd lease id>   the acquire's place in line
//! <prefix>/r/<hex project>/<hex lock name>/<hex slot>              a repeated acquire's request id
//! <prefix>/x/<hex project>/<hex lock name>/<hex etcd lease id>   a holder's lock-delay
//! <prefix>/g/<hex project>/<hex lock name>/<hex etcd lease id>   why a lease ended early
//! ```
//!
//! The last two serve lock-delay, `max_hold` and revocation (see `limits.rs` and
//! docs/etcd.md): a *delay key* is written when a holder that asked for a lock-delay is
//! granted, on an etcd lease of its own that outlives the holder's by the delay; a release
//! deletes it with the holder's keys, so it outlives the holder only when the lease ended
//! without a release, and while it exists nobody else is granted the lock. An *ended key*
//! says `revoked` or `max_hold` to the holder's late renewals.
//!
//! An acquire writes its queue key, attached to its own etcd lease. The *queue key* orders
//! the lock's acquires by create revision and holds the entry: TTL, label, limits, the
//! request id, and the mode (reader, semaphore of `n`; absent for exclusive) and election
//! value. A delay key's value holds the ended holder's fencing token and mode, which the
//! grant rule needs (`rule.rs`). It is named after the etcd lease, which serves one
//! acquire at a time and is reused by later ones: a lock's queue keys come from a small set
//! of names. That matters because etcd keeps a deleted key's name in its index until a
//! compaction, and every range over the queue walks those names; with a name per acquire a
//! busy lock's acquires got slower by about 25 µs per thousand acquires since the last
//! compaction. Since a name is reused, the create revision, not the name, identifies a place.
//!
//! Acquires are idempotent: a re-poll or a retried acquire, on any server, finds the place
//! its request id already has. A *first attempt* (protocol `first: true`: the request id
//! was never sent before) cannot have one, so it writes its queue key alone, on the
//! condition that the request key below is absent. Any other attempt looks first: for its
//! request key, then for its request id among the queue's entries; if it finds neither, it
//! writes a *request key* with its queue key, in the same transaction, attached to the same
//! etcd lease. Its *slot* is the first 8 bytes of the SHA-256 of the request id (the top bit
//! cleared), and the full request id is its value, to tell the 2^-63 collision apart. Of two
//! attempts placed at once, then, exactly one stays: a first attempt placed after a repeat
//! finds the repeat's request key and resumes its place; a repeat placed after a first
//! attempt reads the whole queue in its placing transaction, finds the earlier entry with its
//! request id, and leaves. The request key is only ever read by name, never ranged, so its
//! deleted names cost nothing; first attempts, nearly every acquire, write none (it was a
//! third of etcd's work per acquire and release, docs/performance.md). A first attempt's
//! place that is still waiting when its poll ends gets a request key then, a *mark* whose
//! value also names the place's create revision, so that its re-polls find it by name and
//! not by reading the whole line.
//!
//! The lease id clients hold is 16 bytes: first the *proof* that the place is theirs, then
//! the etcd lease id. For a place with a request key, the proof is the slot: renew and
//! release check that the request key is attached to that etcd lease. For a place without
//! one, it is the create revision of the queue key with the top bit set: renew and release
//! check that the queue key under the etcd lease's name was created at that revision (the
//! name is reused, the revision never). The etcd lease id is random (63 bits) and never shown
//! to other clients (holders are shown by fencing token), so lease ids cannot be guessed, and
//! a made-up, foreign or stale one names no key.
//!
//! Hex has no `/`, and every hex field is followed by a `/` (or ends the key), so no
//! project, lock name or slot can alias another: project `a` (`61/`) is not a prefix of
//! project `ab` (`6162/`), and lock names containing `/` stay one segment.

use crate::id::Id;
use crate::server::store::Mode;
use etcd_client::{Compare, CompareOp, KeyValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
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
    /// `<prefix>/r/<project>/<name>/`: the request keys of the lock's acquires.
    requests: Vec<u8>,
    /// `<prefix>/x/<project>/<name>/`: the lock's delay keys.
    delays: Vec<u8>,
    /// `<prefix>/g/<project>/<name>/`: why leases of the lock ended early.
    ended: Vec<u8>,
}

impl LockKeys {
    pub fn new(prefix: &str, project: &str, name: &str) -> LockKeys {
        let (project, name) = (hex(project.as_bytes()), hex(name.as_bytes()));
        LockKeys {
            queue: format!("{prefix}/p/{project}/q/{name}/").into_bytes(),
            requests: format!("{prefix}/r/{project}/{name}/").into_bytes(),
            delays: format!("{prefix}/x/{project}/{name}/").into_bytes(),
            ended: format!("{prefix}/g/{project}/{name}/").into_bytes(),
        }
    }

    /// The prefix under which the lock's delay keys live.
    pub fn delays(&self) -> &[u8] {
        &self.delays
    }

    /// The delay key of the holder on etcd lease `lease`.
    pub fn delay_key(&self, lease: i64) -> Vec<u8> {
        named(&self.delays, &lease.to_be_bytes())
    }

    /// The key saying why the lease on etcd lease `lease` ended early.
    pub fn ended_key(&self, lease: i64) -> Vec<u8> {
        named(&self.ended, &lease.to_be_bytes())
    }

    /// The prefix under which the lock's queue keys live.
    pub fn queue(&self) -> &[u8] {
        &self.queue
    }

    /// The queue key of the acquire that holds etcd lease `lease`.
    pub fn queue_key(&self, lease: i64) -> Vec<u8> {
        named(&self.queue, &lease.to_be_bytes())
    }

    /// The request key of the acquire in `slot`.
    pub fn request_key(&self, slot: Slot) -> Vec<u8> {
        named(&self.requests, &slot.0)
    }
}

/// The key under `prefix` named after `id` in hex.
fn named(prefix: &[u8], id: &[u8]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(hex(id).as_bytes());
    key
}

/// Where a request's key lives: the first 8 bytes of the SHA-256 of its request id, the top
/// bit cleared (set, the same 8 bytes of a lease id are a [`Proof::Revision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot(pub [u8; 8]);

impl Slot {
    pub fn of(request_id: Id) -> Slot {
        let digest = Sha256::digest(request_id.0);
        let mut slot: [u8; 8] = digest[..8].try_into().expect("8 bytes");
        slot[0] &= 0x7f;
        Slot(slot)
    }
}

/// The value of a request key: the request id, and for a *mark* (a request key written after
/// its place, see the module's description) the place's create revision after an `@`.
pub(super) fn request_value(request: &str, marks: Option<i64>) -> String {
    match marks {
        Some(revision) => format!("{request}@{revision}"),
        None => request.to_string(),
    }
}

/// The request id in a request key's value, and the create revision of the place it marks
/// (`None`: the place written with it, in the same transaction, so of the same revision).
pub(super) fn read_request_value(value: &[u8]) -> (&[u8], Option<i64>) {
    match value.iter().position(|&b| b == b'@') {
        Some(at) => {
            let revision = std::str::from_utf8(&value[at + 1..])
                .ok()
                .and_then(|r| r.parse().ok());
            (&value[..at], revision)
        }
        None => (value, None),
    }
}

/// What shows that a lease id's place is the client's (see the module's description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proof {
    /// The place has a request key, in this slot.
    Slot(Slot),
    /// The place has none: its queue key's create revision.
    Revision(i64),
}

const REVISION_FLAG: u64 = 1 << 63;

/// The lease id clients see: the proof that the place is theirs, and its etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LeaseId {
    pub proof: Proof,
    /// The etcd lease (positive).
    pub etcd: i64,
}

impl LeaseId {
    pub fn to_id(self) -> Id {
        let mut bytes = [0u8; 16];
        match self.proof {
            Proof::Slot(slot) => bytes[..8].copy_from_slice(&slot.0),
            Proof::Revision(revision) => {
                bytes[..8].copy_from_slice(&(revision as u64 | REVISION_FLAG).to_be_bytes())
            }
        }
        bytes[8..].copy_from_slice(&self.etcd.to_be_bytes());
        Id(bytes)
    }

    /// `None` for ids this backend never hands out.
    pub fn from_id(id: Id) -> Option<LeaseId> {
        let first = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
        let proof = if first & REVISION_FLAG == 0 {
            Proof::Slot(Slot(first.to_be_bytes()))
        } else {
            let revision = (first & !REVISION_FLAG) as i64;
            if revision == 0 {
                return None;
            }
            Proof::Revision(revision)
        };
        let etcd = i64::from_be_bytes(id.0[8..].try_into().expect("8 bytes"));
        (etcd > 0).then_some(LeaseId { proof, etcd })
    }

    /// The request key of the place, if it has one.
    pub fn request_key(&self, keys: &LockKeys) -> Option<Vec<u8>> {
        match self.proof {
            Proof::Slot(slot) => Some(keys.request_key(slot)),
            Proof::Revision(_) => None,
        }
    }

    /// The conditions under which the queue key under this lease's name is this lease's
    /// place: it is attached to the etcd lease and, for a slot, so is the request key; for a
    /// revision, it was created at that revision.
    pub fn holds(&self, keys: &LockKeys) -> Vec<Compare> {
        let key = keys.queue_key(self.etcd);
        let attached = |key: Vec<u8>| super::held_by(key, self.etcd);
        match self.proof {
            Proof::Slot(slot) => vec![attached(keys.request_key(slot)), attached(key)],
            Proof::Revision(revision) => vec![
                attached(key.clone()),
                Compare::create_revision(key, CompareOp::Equal, revision),
            ],
        }
    }

    /// Whether `queued` (the queue key under this lease's name, as read) is this lease's
    /// place; for a slot, the request key must also be checked.
    pub fn names(&self, queued: &KeyValue) -> bool {
        queued.lease() == self.etcd
            && match self.proof {
                Proof::Slot(_) => true,
                Proof::Revision(revision) => queued.create_revision() == revision,
            }
    }
}

/// The value of a queue key. Fields beyond the first three are omitted when empty, so an
/// exclusive acquire without limits stays as short as before modes existed, and entries
/// written before them read as exclusive acquires without a value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Entry {
    /// The etcd lease's TTL in seconds, as granted.
    pub ttl: i64,
    /// Seconds of `ttl` beyond the lease granted to the client (`leases::SLACK`); absent in
    /// entries written before slack existed, whose grants were the whole TTL.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slack: i64,
    /// The TTL asked for (the lease length rounded up), under which a released etcd lease is
    /// kept for reuse.
    pub ask: i64,
    /// When the acquire was queued (Unix ms).
    pub at: u64,
    /// When a waiter was seen to get the lock (Unix ms), if that happened after it queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The acquire's `max_hold`, ms: the lease ends at `granted` plus this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_ms: Option<u64>,
    /// The acquire's lock-delay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay_ms: Option<u64>,
    /// The etcd lease of the holder's delay key, once written (kept alive with the lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_lease: Option<i64>,
    /// A shared (read) acquire; absent for exclusive and semaphore acquires.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// A semaphore acquire: the name's number of permits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// The election value (set at the acquire, changed by a proclaim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The acquire's request id, by which a repeated attempt finds the place (absent in
    /// entries written before first attempts skipped the request key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("entries always serialize")
    }

    /// A value this backend did not write reads as an exclusive entry with a 1 s TTL and no
    /// label.
    pub fn decode(value: &[u8]) -> Entry {
        serde_json::from_slice(value).unwrap_or(Entry {
            ttl: 1,
            ask: 1,
            ..Entry::default()
        })
    }

    /// What the acquire asked to hold.
    pub fn mode(&self) -> Mode {
        match (self.permits, self.shared) {
            // `max(1)`: a permit count of 0 was never written by this backend; read as 1 it
            // admits one holder, never more.
            (Some(n), _) => Mode::Permit(n.max(1)),
            (None, true) => Mode::Shared,
            (None, false) => Mode::Exclusive,
        }
    }

    pub fn set_mode(&mut self, mode: Mode) {
        (self.shared, self.permits) = match mode {
            Mode::Exclusive => (false, None),
            Mode::Shared => (true, None),
            Mode::Permit(n) => (false, Some(n)),
        };
    }

    /// The lease granted with this entry: its etcd TTL less the slack.
    pub fn lease(&self) -> Duration {
        Duration::from_secs((self.ttl - self.slack.max(0)).max(1) as u64)
    }

    /// When the lease's `max_hold` ends (Unix ms), once it has been granted.
    pub fn hold_until(&self) -> Option<u64> {
        Some(self.granted?.saturating_add(self.max_hold_ms?))
    }

    /// The lease length to report at `now` (Unix ms): never past the hold's end.
    pub fn lease_at(&self, now: u64) -> Duration {
        match self.hold_until() {
            Some(until) => self
                .lease()
                .min(Duration::from_millis(until.saturating_sub(now))),
            None => self.lease(),
        }
    }
}

/// The value of a delay key: the ended holder's fencing token (its queue key's create
/// revision, which places it in line) and mode. While the key exists, the ended lease keeps
/// its place for the grant rule, so that nobody is granted next to it whom it would not have
/// admitted. Keys written before modes existed read as exclusive; a value this backend did
/// not write reads as an exclusive holder ahead of everyone (it holds every grant back).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct DelayMark {
    #[serde(default)]
    pub token: i64,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
}

impl DelayMark {
    pub fn new(token: i64, delay_ms: u64, mode: Mode) -> DelayMark {
        let mut entry = Entry::default();
        entry.set_mode(mode);
        DelayMark {
            token,
            delay_ms,
            shared: entry.shared,
            permits: entry.permits,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("delay marks always serialize")
    }

    pub fn decode(value: &[u8]) -> DelayMark {
        serde_json::from_slice(value).unwrap_or_default()
    }

    pub fn mode(&self) -> Mode {
        Entry {
            shared: self.shared,
            permits: self.permits,
            ..Entry::default()
        }
        .mode()
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

    #[test]
    fn projects_and_names_never_alias() {
        let slot = Slot::of(Id([7; 16]));
        let a = LockKeys::new("/dl", "a", "b/c");
        let ab = LockKeys::new("/dl", "ab", "/c");
        let a2 = LockKeys::new("/dl", "a", "b");
        // No lock's prefix is a prefix of another lock's keys, and request keys are apart.
        for (x, y) in [(&a, &ab), (&ab, &a), (&a, &a2), (&a2, &a)] {
            assert!(!y.queue_key(9).starts_with(x.queue()));
            assert_ne!(y.request_key(slot), x.request_key(slot));
        }
        assert!(!ab.queue_key(9).starts_with(&project_queues("/dl", "a")));
        assert!(a.queue_key(9).starts_with(&project_queues("/dl", "a")));
        assert!(a.queue_key(9).starts_with(&all_projects("/dl")));
        assert!(!a.request_key(slot).starts_with(&all_projects("/dl")));
        // The project's prefix, then the lock's: plain hex segments.
        assert_eq!(a.queue(), b"/dl/p/61/q/622f63/");
        assert_eq!(a.queue_key(0x1f), b"/dl/p/61/q/622f63/000000000000001f");
        assert!(a.request_key(slot).starts_with(b"/dl/r/61/622f63/"));
    }

    #[test]
    fn lease_ids_round_trip_and_name_their_key() {
        let keys = LockKeys::new("/x", "p", "n");
        let slot = Slot::of(Id([1; 16]));
        assert_ne!(slot, Slot::of(Id([2; 16])));
        let lease = LeaseId {
            proof: Proof::Slot(slot),
            etcd: 0x1234_5678_9abc_def0,
        };
        assert_eq!(LeaseId::from_id(lease.to_id()), Some(lease));
        assert!(keys.request_key(slot).ends_with(hex(&slot.0).as_bytes()));
        // A slot never reads as a revision, whatever the request id's digest.
        for i in 0..=255u8 {
            assert_eq!(Slot::of(Id([i; 16])).0[0] & 0x80, 0);
        }
        let by_revision = LeaseId {
            proof: Proof::Revision(0x7000_0000_0000_0001),
            etcd: 7,
        };
        assert_eq!(LeaseId::from_id(by_revision.to_id()), Some(by_revision));
        assert_ne!(
            by_revision.to_id(),
            LeaseId {
                proof: Proof::Revision(1),
                etcd: 7
            }
            .to_id()
        );
        // Ids with a non-positive etcd lease, or revision 0, are never ours.
        assert_eq!(LeaseId::from_id(Id([0; 16])), None);
        assert_eq!(LeaseId::from_id(Id([0xff; 16])), None);
        let mut no_revision = [0u8; 16];
        no_revision[0] = 0x80;
        no_revision[15] = 1;
        assert_eq!(LeaseId::from_id(Id(no_revision)), None);
    }

    #[test]
    fn entries_round_trip() {
        let entry = Entry {
            ttl: 3,
            ask: 2,
            at: 42,
            label: Some("host/1".into()),
            ..Entry::default()
        };
        let back = Entry::decode(&entry.encode());
        assert_eq!(
            (back.ttl, back.ask, back.at, back.label),
            (3, 2, 42, entry.label)
        );
        assert_eq!(Entry::decode(b"junk").ttl, 1);
        assert_eq!(Entry::decode(b"junk").mode(), Mode::Exclusive);
    }

    /// Modes and values cost nothing for an exclusive acquire, and entries written before
    /// modes existed read as exclusive acquires without a value.
    #[test]
    fn modes_and_values_are_compact_and_backwards_compatible() {
        let old = br#"{"ttl":5,"ask":5,"at":1000,"label":"x"}"#;
        let entry = Entry::decode(old);
        assert_eq!(
            (entry.mode(), entry.value.as_deref()),
            (Mode::Exclusive, None)
        );
        assert_eq!(
            Entry::decode(&entry.encode()).encode(),
            old.to_vec(),
            "nothing added"
        );
        for mode in [Mode::Exclusive, Mode::Shared, Mode::Permit(7)] {
            let mut entry = Entry::decode(old);
            entry.set_mode(mode);
            entry.value = Some("v".into());
            let back = Entry::decode(&entry.encode());
            assert_eq!((back.mode(), back.value.as_deref()), (mode, Some("v")));
        }
        let mut shared = Entry::decode(old);
        shared.set_mode(Mode::Shared);
        assert!(
            String::from_utf8(shared.encode())
                .unwrap()
                .ends_with(r#","shared":true}"#)
        );

        // Delay keys: the old form (token and delay only) is an exclusive holder.
        let mark = DelayMark::decode(br#"{"token":12,"delay_ms":3000}"#);
        assert_eq!((mark.token, mark.mode()), (12, Mode::Exclusive));
        let mark = DelayMark::decode(&DelayMark::new(9, 1000, Mode::Permit(3)).encode());
        assert_eq!((mark.token, mark.mode()), (9, Mode::Permit(3)));
        let junk = DelayMark::decode(b"junk");
        assert_eq!((junk.token, junk.mode()), (0, Mode::Exclusive));
    }

    #[test]
    fn the_hold_caps_the_lease_once_granted() {
        let mut entry = Entry::decode(b"{\"ttl\":5,\"ask\":5,\"at\":1000,\"max_hold_ms\":7000}");
        assert_eq!(entry.hold_until(), None, "not granted yet");
        assert_eq!(entry.lease_at(2000), Duration::from_secs(5));
        entry.granted = Some(2000);
        assert_eq!(entry.hold_until(), Some(9000));
        assert_eq!(entry.lease_at(3000), Duration::from_secs(5));
        assert_eq!(entry.lease_at(6500), Duration::from_millis(2500));
        assert_eq!(entry.lease_at(9500), Duration::ZERO);
    }
}
