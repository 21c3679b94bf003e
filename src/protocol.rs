//! Wire types of the HTTP/JSON protocol, shared by the SDK and the server.
//!
//! `docs/protocol.md` is the normative description; this module is its Rust form. It depends
//! on nothing else in the crate, so both sides agree by construction. It is private: the
//! document, not these structs, is the contract with other clients.

pub use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Longest lock name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest lease any server accepts (24 hours). Servers may configure a lower bound.
pub const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1000;
/// Most leases one renew request may carry.
pub const MAX_RENEW_BATCH: usize = 1000;

/// Path of the acquire endpoint.
pub const PATH_ACQUIRE: &str = "/v1/acquire";
/// Path of the batched renew endpoint.
pub const PATH_RENEW: &str = "/v1/renew";
/// Path of the release endpoint.
pub const PATH_RELEASE: &str = "/v1/release";
/// Path of the cancel endpoint (withdraw a waiter or undo its grant).
pub const PATH_CANCEL: &str = "/v1/cancel";
/// Prefix of the inspect endpoint; the percent-encoded lock name follows.
pub const PATH_LOCKS_PREFIX: &str = "/v1/locks/";
/// Revoke path (operators: ends the current holder's lease).
pub const PATH_REVOKE: &str = "/v1/revoke";
/// Path of the proclaim endpoint (a leader changes its election value).
pub const PATH_PROCLAIM: &str = "/v1/proclaim";
/// Path of the session endpoint: an HTTP/1.1 connection upgraded to framed lock operations.
pub const PATH_SESSION: &str = "/v1/session";
/// The `Upgrade` token of a session.
pub const SESSION_PROTOCOL: &str = "leasehold-session/1";
/// Prefix of the election endpoint (`GET`, query `after`, `wait_ms`); the percent-encoded
/// name follows.
pub const PATH_ELECTIONS_PREFIX: &str = "/v1/elections/";
/// Longest election value, in bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Most permits a semaphore may have.
pub const MAX_PERMITS: u32 = 1_000_000;
/// Path of the listing endpoint (`GET`, query `prefix`, `after`, `limit`).
pub const PATH_LOCKS: &str = "/v1/locks";
/// Locks per listing page when the request names no `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Most locks per listing page.
pub const MAX_LIST_LIMIT: usize = 1000;

/// Checks a lock name against the protocol's rules; the message says what is wrong.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("lock name is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "lock name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "lock name contains the control character U+{:04X}",
            c as u32
        ));
    }
    if let Some(c) = name.chars().find(|&c| is_bidi_control(c)) {
        return Err(format!(
            "lock name contains the bidirectional control character U+{:04X}, which can make \
             text display differently from what it is",
            c as u32
        ));
    }
    if let Some(c) = name.chars().find(|&c| is_default_ignorable(c)) {
        return Err(format!(
            "lock name contains the invisible character U+{:04X} (a default-ignorable code \
             point such as a zero-width space), which can make two different names look alike",
            c as u32
        ));
    }
    Ok(())
}

/// Checks an election value: at most [`MAX_VALUE_BYTES`], no control characters (it is shown
/// in terminals and logs). Unlike names it may be empty.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "election value is {} bytes long; the limit is {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|&c| c.is_control() || is_bidi_control(c))
    {
        return Err(format!(
            "election value contains the control character U+{:04X}",
            c as u32
        ));
    }
    Ok(())
}

/// The Unicode bidirectional formatting characters: the Arabic letter mark, the left-to-right
/// and right-to-left marks, embeddings, overrides and isolates.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Unicode's default-ignorable code points (DerivedCoreProperties.txt): characters that
/// display as nothing, such as zero-width spaces and joiners, variation selectors and tags.
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// `POST /v1/acquire` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// Lock name.
    pub name: String,
    /// Lease length asked for, in milliseconds.
    pub lease_ms: u64,
    /// Longest time to wait, in milliseconds; `None` waits until granted, `0` never waits.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// Longest time the server may hold this one request open before answering `202`
    /// (the server caps it at its own bound); absent means the server's bound.
    #[serde(default)]
    pub poll_ms: Option<u64>,
    /// Client-made id; repeating it resumes the same place in the queue or returns the same
    /// grant, so a retried acquire never creates a second holder.
    pub request_id: Id,
    /// `true` on the first send of `request_id`, and on no later one (not on a re-poll, not
    /// on a retry): the server may then skip looking for the request's place, which makes
    /// acquires cheaper on some backends (etcd). Absent or `false` is always correct.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first: bool,
    /// A label shown to others while this request holds the lock, such as `host-a/job-42`
    /// (same rules as names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// Longest time the lease may be held, counted from the grant: renewals never extend it
    /// past that, and renewing later answers `gone` with reason `max_hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_ms: Option<u64>,
    /// Lock-delay: if this lease ends without a release (it expires, reaches its
    /// `max_hold`, or is revoked), it keeps its place until this long after: nobody is
    /// granted the lock meanwhile whom it would not admit (for an exclusive holder, nobody;
    /// for a reader, no writer; a semaphore's permit stays taken). At most the server's
    /// maximum (`400` above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay_ms: Option<u64>,
    /// What to hold: `exclusive` (the default: a mutex, a write lock, a campaign),
    /// `shared` (a read lock) or `semaphore` (one of `permits`).
    #[serde(default, skip_serializing_if = "LockMode::is_exclusive")]
    pub mode: LockMode,
    /// With `semaphore` (and only then): how many may hold the name at once, 1 to
    /// [`MAX_PERMITS`]. Everyone using the name must give the same count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// An election value others see while this request holds the name exclusively (see
    /// [`PATH_ELECTIONS_PREFIX`]); changed later with a proclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Who asks, for a successor reservation (docs/protocol.md §3.16): any id, the same for
    /// every acquire of one client (the SDK draws one per [`DistributedLock`]). When this
    /// acquire waits first in line behind an exclusive lease that an acquire with the same
    /// `client_id` holds, the server reserves it the lock next and says so in a `202`
    /// ([`StillWaiting::next`]). A client that sends it takes on §3.16's duties.
    ///
    /// [`DistributedLock`]: crate::DistributedLock
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Id>,
}

/// How a lock is held: what an acquire asks for, and what inspection shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// One holder alone.
    #[default]
    Exclusive,
    /// Any number of shared holders (readers), nobody else.
    Shared,
    /// Up to `permits` holders.
    Semaphore,
}

impl LockMode {
    /// For `skip_serializing_if`.
    pub fn is_exclusive(&self) -> bool {
        *self == LockMode::Exclusive
    }
}

/// `POST /v1/proclaim` request body: the leader changes its election value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProclaimRequest {
    /// Election (lock) name.
    pub name: String,
    /// Lease id of the leader's grant.
    pub lease_id: Id,
    /// The new value.
    pub value: String,
}

/// `200` answer to a proclaim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProclaimResponse {
    /// Always true in a `200`; a lease that no longer leads answers `410`.
    pub proclaimed: bool,
}

/// `GET /v1/elections/{name}` answer: leadership states, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Observed {
    /// Without `after`: the current state alone. With `after`: every state after that
    /// revision (empty if none came within `wait_ms`).
    pub changes: Vec<WireObservation>,
}

/// One leadership state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireObservation {
    /// Orders states: pass the last one seen as `after`.
    pub revision: u64,
    /// The leader from this revision on; `null` when nobody leads.
    pub leader: Option<WireLeader>,
}

/// An election's leader: the exclusive holder of its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireLeader {
    /// The leader's fencing token.
    pub fencing_token: u64,
    /// Its election value (empty if it gave none).
    pub value: String,
    /// Its label, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// When it became leader, Unix milliseconds (server clock).
    pub acquired_at_ms: u64,
}

/// `200` answer to an acquire: the lock is yours.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Granted {
    /// Opaque secret naming this lease in renew and release.
    pub lease_id: Id,
    /// Strictly increasing per lock name, across server restarts too.
    pub fencing_token: u64,
    /// Lease length granted, in milliseconds.
    pub lease_ms: u64,
    /// How long after the server received this request the lease started (rounded down):
    /// the lease ends `waited_ms + lease_ms` after the request arrived. A client counts its
    /// lease from when it sent the request plus this.
    #[serde(default)]
    pub waited_ms: u64,
}

/// `202` answer to an acquire: still queued; poll again with the same request id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StillWaiting {
    /// Waiters ahead of this one when the poll ended.
    pub position: u64,
    /// The lock is reserved to this request next (docs/protocol.md §3.16): it becomes its
    /// holder, with this lease and token, the moment the lease `after` ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NextGrant>,
}

/// A successor reservation (docs/protocol.md §3.16): the grant a waiter first in line is
/// promised once the lease ahead of it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextGrant {
    /// The lease this request will hold: renew and release accept it already.
    pub lease_id: Id,
    /// Its fencing token, issued at the reservation: above the lease ahead's, below any
    /// later holder's.
    pub fencing_token: u64,
    /// Its length, counted from when the lease ahead ends.
    pub lease_ms: u64,
    /// The lease ahead: the lock's holder, acquired with the same `client_id`.
    pub after: Id,
}

/// One lease in a renew or release.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRef {
    /// Lock name.
    pub name: String,
    /// Lease id from the grant.
    pub lease_id: Id,
}

/// `POST /v1/renew` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// Up to [`MAX_RENEW_BATCH`] leases.
    pub leases: Vec<LeaseRef>,
}

/// Outcome for one lease of a renew, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RenewResult {
    /// Extended: the lease now ends `lease_ms` after the server answered.
    Renewed {
        /// Lease length, in milliseconds.
        lease_ms: u64,
    },
    /// Not held under this id (expired, released, revoked, or never existed).
    Gone {
        /// Why, when the server knows: absent for a lease it does not know (expired long
        /// ago, released, or never granted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<GoneReason>,
    },
}

/// Why a lease the server still remembers has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoneReason {
    /// Its time ran out without a renewal.
    Expired,
    /// It reached the `max_hold_ms` its acquire asked for.
    MaxHold,
    /// An operator revoked it.
    Revoked,
    /// A reason this client does not know (a newer server).
    #[serde(other)]
    Other,
}

/// `200` answer to a renew.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewResponse {
    /// One result per requested lease, same order.
    pub results: Vec<RenewResult>,
}

/// `POST /v1/cancel` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Lock name.
    pub name: String,
    /// The acquire's request id.
    pub request_id: Id,
}

/// `200` answer to a cancel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelResponse {
    /// True if a waiter was withdrawn or a grant made to it was released.
    pub cancelled: bool,
}

/// `200` answer to a release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// Always true in a `200`; a lease that is not held answers `410`.
    pub released: bool,
}

/// `POST /v1/revoke` request body: end the current holder's lease of `name` now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Lock name.
    pub name: String,
}

/// `200` answer to a revoke.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The fencing token of the lease that was revoked (the newest, when several held it).
    pub fencing_token: u64,
    /// Every revoked lease's fencing token, ascending: several for the readers of a
    /// read-write lock or the holders of a semaphore.
    #[serde(default)]
    pub fencing_tokens: Vec<u64>,
}

/// `GET /v1/locks/{name}` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    /// Lock name.
    pub name: String,
    /// The current holder, if any: the oldest grant when several hold it.
    pub holder: Option<WireHolder>,
    /// Every current holder, oldest grant first.
    #[serde(default)]
    pub holders: Vec<WireHolder>,
    /// How the holders hold it (with no holder: how the first in line asks to).
    #[serde(default)]
    pub mode: LockMode,
    /// For a semaphore: its number of permits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Number of queued waiters.
    pub waiters: u64,
    /// How long the first waiter in line has waited, in milliseconds.
    #[serde(default)]
    pub oldest_wait_ms: Option<u64>,
    /// While grants of this lock are held back after a server restart (leases granted before
    /// it may still run): when the hold-back ends, in Unix milliseconds (server clock).
    /// Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back_until_ms: Option<u64>,
}

/// `GET /v1/locks` answer: one page of the project's locks, in bytewise name order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockList {
    /// Each lock somebody holds or waits for, as `GET /v1/locks/{name}` shows it.
    pub locks: Vec<LockInfo>,
    /// The cursor of the next page (pass it as `after`) if more locks may follow; absent at
    /// the end. A page may hold fewer than `limit` locks and still have a next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What inspection shows of a holder (never its lease id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireHolder {
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// When the lock was granted, in Unix milliseconds (server clock).
    pub acquired_at_ms: u64,
    /// When the lease ends unless renewed, in Unix milliseconds (server clock).
    pub expires_at_ms: u64,
    /// Milliseconds until the lease ends unless renewed.
    pub expires_in_ms: u64,
    /// The holder's label, if it gave one.
    #[serde(default)]
    pub metadata: Option<String>,
    /// The holder's election value, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code, see [`codes`].
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
    /// With `timeout`: who held the lock when the wait ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<WireHolder>,
    /// With `gone`, when the server knows: why the lease ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<GoneReason>,
}

/// Error codes used in [`ErrorBody::error`].
pub mod codes {
    /// 400: bad input; nothing changed.
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    /// 401: missing or unknown API key.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 404: unknown route, or no such lock in the caller's project.
    pub const NOT_FOUND: &str = "not_found";
    /// 405: known route, wrong method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 409: the wait ended without the lock.
    pub const TIMEOUT: &str = "timeout";
    /// 409: the acquire does not fit how the name is in use (a semaphore of another permit
    /// count, a semaphore and a read-write lock under one name), or a proclaim by a holder
    /// that does not hold the name exclusively. Retrying the same request does not help.
    pub const CONFLICT: &str = "conflict";
    /// 403: the key may not do this (revoking with a key that is not an admin key).
    pub const FORBIDDEN: &str = "forbidden";
    /// 410: the lease is not held.
    pub const GONE: &str = "gone";
    /// 413: body too large.
    pub const TOO_LARGE: &str = "payload_too_large";
    /// 429: a per-lock or per-project limit, or the key's rate limit, was reached.
    pub const TOO_MANY: &str = "too_many_requests";
    /// 503: the server is shutting down or its store is unreachable; retry.
    pub const UNAVAILABLE: &str = "unavailable";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("jobs/nightly report").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\0b").is_err());
        assert!(validate_name(&"x".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(validate_name(&"x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn bidi_controls_and_invisible_characters_are_refused() {
        for c in [
            '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}',
        ] {
            let err = validate_name(&format!("a{c}b")).unwrap_err();
            assert!(err.contains("bidirectional"), "U+{:04X}: {err}", c as u32);
        }
        for c in [
            '\u{00AD}',
            '\u{034F}',
            '\u{115F}',
            '\u{1160}',
            '\u{17B4}',
            '\u{180B}',
            '\u{180F}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{2060}',
            '\u{206F}',
            '\u{3164}',
            '\u{FE00}',
            '\u{FE0F}',
            '\u{FEFF}',
            '\u{FFA0}',
            '\u{FFF0}',
            '\u{FFF8}',
            '\u{1BCA0}',
            '\u{1BCA3}',
            '\u{1D173}',
            '\u{1D17A}',
            '\u{E0000}',
            '\u{E0001}',
            '\u{E0FFF}',
        ] {
            let err = validate_name(&format!("a{c}b")).unwrap_err();
            assert!(err.contains(&format!("U+{:04X}", c as u32)), "{err}");
        }
        // Visible non-ASCII text stays valid: accents, scripts written right to left, emoji
        // (a lone emoji; sequences with a zero-width joiner are refused), and the code
        // points just outside the refused ranges.
        for ok in [
            "café",
            "שלום",
            "مرحبا",
            "日本語",
            "😀",
            "\u{2010}",
            "\u{202F}",
            "\u{2070}",
            "\u{FFF9}",
            "\u{E1000}",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn renew_results_are_tagged() {
        let json = serde_json::to_string(&RenewResult::Renewed { lease_ms: 5 }).unwrap();
        assert_eq!(json, r#"{"status":"renewed","lease_ms":5}"#);
        let json = serde_json::to_string(&RenewResult::Gone { reason: None }).unwrap();
        assert_eq!(json, r#"{"status":"gone"}"#);
        let json = serde_json::to_string(&RenewResult::Gone {
            reason: Some(GoneReason::MaxHold),
        })
        .unwrap();
        assert_eq!(json, r#"{"status":"gone","reason":"max_hold"}"#);
        let unknown: RenewResult =
            serde_json::from_str(r#"{"status":"gone","reason":"moved"}"#).unwrap();
        assert_eq!(
            unknown,
            RenewResult::Gone {
                reason: Some(GoneReason::Other)
            }
        );
    }
}
