//! `DistributedLock::revoke`: an operator ends the current holder's lease.

use crate::client::DistributedLock;
use crate::client::renewer::json;
use crate::client::transport::{Attempts, Route};
use crate::error::Error;
use crate::protocol::{self, RevokeRequest, RevokeResponse};
use http::StatusCode;
use std::time::Duration;
use tokio::time::Instant;

impl DistributedLock {
    /// Ends the current holder's lease of `name` now, as an operator would: returns the
    /// revoked lease's fencing token, or `None` if nobody held the lock.
    ///
    /// The holder learns it on its next renewal ([`LockGuard::lost`](crate::LockGuard::lost)
    /// resolves with [`LostReason::Revoked`](crate::LostReason::Revoked)), and the next waiter
    /// gets the lock with a higher fencing token (after the holder's lock-delay, if it set
    /// one). Only locks of this key's project; with a key file, only keys marked
    /// `admin = true` may revoke (others get [`Error::Forbidden`]).
    ///
    /// # Cancel safety
    /// If the future is dropped after the request left, the lease may be revoked or not.
    pub async fn revoke(&self, name: &str) -> Result<Option<u64>, Error> {
        protocol::validate_name(name).map_err(Error::invalid)?;
        self.inner.usable()?;
        let attempts = Attempts {
            deadline: crate::client::later(Instant::now(), self.inner.unavailable_after),
            per_attempt: Duration::from_secs(10),
            first_contact: true,
        };
        let body = json(&RevokeRequest {
            name: name.to_owned(),
        });
        let reply = self
            .inner
            .transport()
            .post(Route::Revoke, Some(name), body, attempts)
            .await?;
        match reply.status {
            StatusCode::OK => Ok(Some(reply.json::<RevokeResponse>()?.fencing_token)),
            // Nobody holds it (or an earlier attempt revoked it and lost the answer).
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(reply.into_error()),
        }
    }
}
