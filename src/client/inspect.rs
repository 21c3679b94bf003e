//! `inspect`: who holds a lock, and how many wait.

use crate::client::DistributedLock;
use crate::client::transport::Attempts;
use crate::error::Error;
use crate::protocol::{self, PATH_LOCKS_PREFIX};
use http::StatusCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// What the server knows of a lock at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock's name.
    pub name: String,
    /// The current holder, if any: the oldest grant when several hold it.
    pub holder: Option<HolderInfo>,
    /// Every current holder, oldest grant first: the readers of a read lock, the permit
    /// holders of a semaphore.
    pub holders: Vec<HolderInfo>,
    /// How the holders hold the lock (with no holder, how the first in line asks to).
    pub mode: LockMode,
    /// How many wait in line.
    pub waiters: u64,
    /// How long the first in line has waited.
    pub oldest_wait: Option<Duration>,
    /// While the server holds grants of this lock back after it restarted (leases granted
    /// before the restart may still run, so nobody gets the lock yet): when the hold-back
    /// ends, by the server's clock. `None` otherwise, and always on the etcd backend.
    pub held_back_until: Option<SystemTime>,
}

/// The holder of a lock, as inspection shows it (never its lease id).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HolderInfo {
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// When the lock was granted, by the server's clock.
    pub acquired_at: SystemTime,
    /// Time left on the lease unless it is renewed.
    pub expires_in: Duration,
    /// The label the holder gave with [`LockRequest::metadata`](crate::LockRequest::metadata).
    pub metadata: Option<String>,
    /// The holder's election value, when it leads an [`Election`](crate::Election).
    pub value: Option<String>,
}

/// How a lock is held, as inspection shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockMode {
    /// By one holder alone: a mutex, a writer, a leader.
    #[default]
    Exclusive,
    /// By readers, together.
    Shared,
    /// By up to `permits` holders: a semaphore.
    Semaphore {
        /// The semaphore's number of permits.
        permits: u32,
    },
}

impl From<protocol::WireHolder> for HolderInfo {
    fn from(h: protocol::WireHolder) -> HolderInfo {
        HolderInfo {
            fencing_token: h.fencing_token,
            acquired_at: UNIX_EPOCH + Duration::from_millis(h.acquired_at_ms),
            expires_in: Duration::from_millis(h.expires_in_ms),
            metadata: h.metadata,
            value: h.value,
        }
    }
}

impl DistributedLock {
    /// Shows who holds the lock `name` and how many wait for it, without changing anything.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn inspect(&self, name: &str) -> Result<LockInfo, Error> {
        protocol::validate_name(name).map_err(Error::invalid)?;
        self.inner.usable()?;
        let attempts = Attempts {
            deadline: crate::client::later(Instant::now(), self.inner.unavailable_after),
            per_attempt: Duration::from_secs(10),
            first_contact: true,
        };
        self.inner.inspect_within(name, attempts).await
    }
}

impl crate::client::Inner {
    /// Inspection of `name` (already validated), with the retries `attempts` allows.
    async fn inspect_within(&self, name: &str, attempts: Attempts) -> Result<LockInfo, Error> {
        let path = format!("{PATH_LOCKS_PREFIX}{}", percent_encode(name));
        let reply = self.transport().get(&path, attempts).await?;
        if reply.status == StatusCode::NOT_FOUND {
            // Nobody holds or waits for it: the lock is free.
            return Ok(LockInfo {
                name: name.to_owned(),
                holder: None,
                holders: Vec::new(),
                mode: LockMode::Exclusive,
                waiters: 0,
                oldest_wait: None,
                held_back_until: None,
            });
        }
        if !reply.status.is_success() {
            return Err(reply.into_error());
        }
        Ok(reply.json::<protocol::LockInfo>()?.into())
    }

    /// Who holds `name` now, asked once with a short bound (a second): for a timeout the
    /// client ends itself, which no server answer describes. `None` if nobody does or no
    /// answer came in time.
    pub(crate) async fn holder_now(&self, name: &str) -> Option<Box<HolderInfo>> {
        let attempts = Attempts {
            deadline: Instant::now() + Duration::from_secs(1),
            per_attempt: Duration::from_secs(1),
            first_contact: false,
        };
        let info = self.inspect_within(name, attempts).await.ok()?;
        info.holder.map(Box::new)
    }
}

impl From<protocol::LockInfo> for LockInfo {
    fn from(info: protocol::LockInfo) -> LockInfo {
        let mode = match (info.mode, info.permits) {
            (protocol::LockMode::Shared, _) => LockMode::Shared,
            (protocol::LockMode::Semaphore, Some(permits)) => LockMode::Semaphore { permits },
            _ => LockMode::Exclusive,
        };
        // A server from before several holders sends only `holder`.
        let holders = if info.holders.is_empty() {
            info.holder.clone().into_iter().collect::<Vec<_>>()
        } else {
            info.holders
        };
        LockInfo {
            name: info.name,
            holder: info.holder.map(HolderInfo::from),
            holders: holders.into_iter().map(HolderInfo::from).collect(),
            mode,
            waiters: info.waiters,
            oldest_wait: info.oldest_wait_ms.map(Duration::from_millis),
            held_back_until: info
                .held_back_until_ms
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub(crate) fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn encoding_keeps_unreserved_characters() {
        assert_eq!(super::percent_encode("a/b c✓"), "a%2Fb%20c%E2%9C%93");
        assert_eq!(super::percent_encode("A-z_0.~"), "A-z_0.~");
    }
}
