//! The one error type of the SDK (and of the embedded server's start-up).

use crate::client::inspect::HolderInfo;
use std::time::Duration;

fn held_by(holder: &Option<HolderInfo>) -> String {
    match holder {
        Some(h) => match &h.metadata {
            Some(label) => format!(" (held by {label:?}, fencing token {})", h.fencing_token),
            None => format!(" (held under fencing token {})", h.fencing_token),
        },
        None => String::new(),
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
        "timed out after {waited:?} waiting for lock {name:?}{}",
        held_by(holder)
    )]
    Timeout {
        /// The lock waited for.
        name: String,
        /// How long the caller waited.
        waited: Duration,
        /// Who held the lock when the wait ended, if the server said.
        holder: Option<HolderInfo>,
    },

    /// The lease ended (expired, revoked, or could not be renewed in time) while it was
    /// believed held, or it was already gone when released.
    #[error("lost the lease on lock {name:?}")]
    LockLost {
        /// The lock whose lease was lost.
        name: String,
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

    /// No server could be reached (or all were shutting down) within the deadline.
    #[error("lock server unavailable at {endpoint}: {reason}")]
    Unavailable {
        /// The endpoint tried last.
        endpoint: String,
        /// The last failure seen.
        reason: String,
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
    },

    /// A TLS handshake with the server failed (an untrusted or mismatched certificate, or
    /// no common protocol). Retrying does not help; fix the certificates or the settings.
    #[error("TLS with {endpoint} failed: {message}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// What failed.
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
