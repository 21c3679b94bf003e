//! `list`: a page of the project's locks, with their holders and waiters.

use crate::client::DistributedLock;
use crate::client::inspect::{LockInfo, percent_encode};
use crate::client::transport::Attempts;
use crate::error::Error;
use crate::protocol::{self, MAX_LIST_LIMIT, PATH_LOCKS};
use std::time::Duration;
use tokio::time::Instant;

/// One page of a project's locks, in bytewise name order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockPage {
    /// Each lock somebody holds or waits for.
    pub locks: Vec<LockInfo>,
    /// Where the next page starts, if more locks may follow: pass it to
    /// [`DistributedLock::list`] as `after`. A page may be short and still have a next one;
    /// only `None` means the end.
    pub next: Option<String>,
}

impl DistributedLock {
    /// Lists the project's locks whose names start with `prefix` (`""` for all), up to
    /// 1,000 per page: who holds each, since when, for how long yet, and how many wait.
    /// Start with `after = None`; pass the page's [`next`](LockPage::next) for the next one.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// use leasehold::DistributedLock;
    /// let dl = DistributedLock::new("project-api-key");
    /// let mut after = None;
    /// loop {
    ///     let page = dl.list("jobs/", after.as_deref()).await?;
    ///     for lock in &page.locks {
    ///         let holder = lock.holder.as_ref().and_then(|h| h.metadata.as_deref());
    ///         println!("{}: held by {holder:?}, {} waiting", lock.name, lock.waiters);
    ///     }
    ///     match page.next {
    ///         Some(next) => after = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn list(&self, prefix: &str, after: Option<&str>) -> Result<LockPage, Error> {
        if prefix.len() > protocol::MAX_NAME_BYTES {
            return Err(Error::invalid(format!(
                "the prefix is {} bytes long; names are at most {}",
                prefix.len(),
                protocol::MAX_NAME_BYTES
            )));
        }
        self.inner.usable()?;
        let mut path = format!("{PATH_LOCKS}?limit={MAX_LIST_LIMIT}");
        if !prefix.is_empty() {
            path.push_str(&format!("&prefix={}", percent_encode(prefix)));
        }
        if let Some(after) = after {
            protocol::validate_name(after).map_err(Error::invalid)?;
            path.push_str(&format!("&after={}", percent_encode(after)));
        }
        let attempts = Attempts {
            deadline: crate::client::later(Instant::now(), self.inner.unavailable_after),
            per_attempt: Duration::from_secs(10),
            first_contact: true,
        };
        let reply = self.inner.transport().get(&path, attempts).await?;
        if !reply.status.is_success() {
            return Err(reply.into_error());
        }
        let list: protocol::LockList = reply.json()?;
        Ok(LockPage {
            locks: list.locks.into_iter().map(LockInfo::from).collect(),
            next: list.next,
        })
    }
}
