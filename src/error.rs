//! The one error type of the SDK (and of the embedded server's start-up).

use crate::client::inspect::HolderInfo;
use std::time::Duration;

fn held_by(holder: &Option<Box<HolderInfo>>) -> String {
    match holder {
        Some(h) => match &h.metadata {
            Some(label) => format!(" (held by {label:?}, fencing token {})", h.fencing_token),
            None => format!(" (held under fencing token {})", h.fencing_token),
        },
        None => String::new(),
    }
}

/// An underlying error kept as [`source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `534ms`, `2.5s`, `3m 20s`: a duration as people read it, not `534.558327ms`.
pub(crate) fn round(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 120_000 {
        format!("{}s", d.as_secs())
    } else {
        let s = d.as_secs();
        match s % 60 {
            0 => format!("{}m", s / 60),
            rest => format!("{}m {rest}s", s / 60),
        }
    }
}

/// Everything that can go wrong, as variants a caller can act on.
///
/// Messages name the lock and the endpoint involved, never the API key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The wait for the lock reached its `timeout` without the lock being granted.
    #[error(
        "timed out after {} waiting for lock {name:?}{}",
        round(*waited),
        held_by(holder)
    )]
    Timeout {
        /// The lock waited for.
        name: String,
        /// How long the caller waited.
        waited: Duration,
        /// Who held the lock when the wait ended, if the server said.
        holder: Option<Box<HolderInfo>>,
    },

    /// The lease ended (expired, revoked, or could not be renewed in time) while it was
    /// believed held, or it was already gone when released.
    #[error("lost the lease on lock {name:?}: {reason}")]
    LockLost {
        /// The lock whose lease was lost.
        name: String,
        /// Why.
        reason: crate::LostReason,
    },

    /// The server refused the API key.
    #[error("{endpoint} refused the API key (401 Unauthorized)")]
    Unauthorized {
        /// The endpoint that refused it.
        endpoint: String,
    },

    /// Bad input: a lock name, a duration, or a client setting. Nothing was changed.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong.
        message: String,
    },

    /// No server could be reached (or all were shutting down) within the deadline. A client
    /// that never reached any server gives up after a few seconds, saying so, unless the
    /// call has a `timeout` of its own.
    #[error("lock server unavailable at {endpoint}: {reason}")]
    Unavailable {
        /// The endpoint tried last.
        endpoint: String,
        /// The last failure seen.
        reason: String,
        /// The underlying transport error, if there was one (not for a `503` answer).
        #[source]
        source: Option<BoxError>,
    },

    /// The request does not fit how the name is in use, and retrying it will not help: a
    /// semaphore of another permit count, a semaphore and a read-write lock under one name
    /// while anyone holds or waits for it, or a proclaim for a lease that holds the name
    /// shared. The message names what is in use.
    #[error("conflict: {message}")]
    Conflict {
        /// What is in use, and what the request asked.
        message: String,
    },

    /// The server refused the request for this key: revoking with a key that is not an
    /// admin key of its project.
    #[error("{endpoint} refused: {message} (403 Forbidden)")]
    Forbidden {
        /// The endpoint that refused.
        endpoint: String,
        /// The server's explanation.
        message: String,
    },

    /// The server's answer could not be decoded: not the protocol's JSON (a proxy's error
    /// page, or a server of another protocol version at that URL).
    #[error("{endpoint} answered {status} with a body that is not the protocol's: {source}")]
    Decode {
        /// The endpoint that answered.
        endpoint: String,
        /// HTTP status code.
        status: u16,
        /// Why it could not be decoded.
        #[source]
        source: serde_json::Error,
    },

    /// A server limit was reached: the project's lock quota, the lock's waiter limit, or the
    /// key's request rate. Try again later (after `retry_after`, if given).
    #[error("{endpoint} refused: {message}")]
    LimitReached {
        /// The endpoint that refused.
        endpoint: String,
        /// The server's explanation.
        message: String,
        /// How long the server asked to wait.
        retry_after: Option<Duration>,
    },

    /// The server answered with an error the SDK does not map to another variant.
    #[error("{endpoint} answered {status}: {message}")]
    Server {
        /// The endpoint that answered.
        endpoint: String,
        /// HTTP status code.
        status: u16,
        /// The server's message.
        message: String,
        /// Why the body was not the protocol's error object, when it was not (a proxy's
        /// page, say): then `message` is the body as text.
        #[source]
        source: Option<BoxError>,
    },

    /// A TLS handshake with the server failed (an untrusted or mismatched certificate, or
    /// no common protocol). Retrying does not help; fix the certificates or the settings.
    #[error("TLS with {endpoint} failed: {message}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        message: String,
        /// The underlying TLS error, if there is one to keep.
        #[source]
        source: Option<BoxError>,
    },

    /// The embedded server's configuration was refused by what it connects to: etcd
    /// credentials it rejects, or a user without permission on the key prefix. Retrying
    /// does not help; fix the settings.
    #[error("configuration refused: {message}")]
    Configuration {
        /// What was refused, and what to check.
        message: String,
    },

    /// An I/O error outside any request, such as binding the embedded server's socket.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True for [`Error::LockLost`].
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, Error::LockLost { .. })
    }

    /// True for [`Error::Unauthorized`].
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Error::Unauthorized { .. })
    }

    /// True for [`Error::InvalidArgument`].
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Error::InvalidArgument { .. })
    }

    /// True for [`Error::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// True for [`Error::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True for [`Error::Forbidden`].
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Error::Forbidden { .. })
    }

    /// True for [`Error::Decode`].
    pub fn is_decode(&self) -> bool {
        matches!(self, Error::Decode { .. })
    }

    /// True for [`Error::Tls`].
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls { .. })
    }

    /// True for [`Error::LimitReached`].
    pub fn is_limit_reached(&self) -> bool {
        matches!(self, Error::LimitReached { .. })
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::round;
    use std::time::Duration;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(round(Duration::from_micros(534_558)), "534ms");
        assert_eq!(round(Duration::from_millis(2_540)), "2.5s");
        assert_eq!(round(Duration::from_millis(42_900)), "42s");
        assert_eq!(round(Duration::from_secs(200)), "3m 20s");
        assert_eq!(round(Duration::from_secs(300)), "5m");
    }
}
