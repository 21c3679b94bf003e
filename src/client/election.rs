//! Leader election: campaign for a name, proclaim a value, observe who leads.
//!
//! An election is a lock: campaigning is an exclusive acquire of its name, and the leader is
//! the holder. So leadership has every guarantee of a [`LockGuard`]: FIFO campaigns, fencing
//! tokens, renewal, and a leader that learns of a lost lease before anyone else can lead.

use crate::client::DistributedLock;
use crate::client::guard::LockGuard;
use crate::client::inspect::percent_encode;
use crate::client::lease_state::{GuardState, LostReason, LostSignal};
use crate::client::renewer::json;
use crate::client::request::{LockFuture, LockRequest};
use crate::client::transport::{Attempts, Route};
use crate::error::Error;
use crate::protocol::{self, GoneReason, ProclaimRequest};
use http::StatusCode;
use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How long one observe poll may wait at the server for a change.
const OBSERVE_POLL: Duration = Duration::from_secs(20);

/// An election among the clients of one project, created by [`DistributedLock::election`].
/// Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// let dl = leasehold::DistributedLock::new("project-api-key");
/// let election = dl.election("scheduler");
/// let leadership = election.campaign("host-a:8080").await?; // waits until leader
/// // ... run the scheduler while `leadership.is_held()` ...
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Election {
    client: DistributedLock,
    name: Arc<str>,
}

/// The leader of an election, as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// What the leader campaigned with, or proclaimed since (empty if it gave nothing).
    pub value: String,
    /// The fencing token of its leadership: higher for every later leader.
    pub fencing_token: u64,
    /// The label it gave with [`Campaign::metadata`], if any.
    pub metadata: Option<String>,
    /// When it became leader, by the server's clock.
    pub since: SystemTime,
}

impl DistributedLock {
    /// The election `name`. Campaigning is an exclusive acquire of the lock `name`, so a
    /// plain [`lock`](DistributedLock::lock) of the same name competes in it too (and leads
    /// with an empty value). Invalid names are reported by the first call.
    pub fn election(&self, name: impl Into<String>) -> Election {
        Election {
            client: self.clone(),
            name: name.into().into(),
        }
    }
}

impl Election {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Campaigns with `value` (what others see as the leader's value, such as its address);
    /// configure it, then `.await` it: it waits, in FIFO order with the other campaigns,
    /// until this client leads.
    pub fn campaign(&self, value: impl Into<String>) -> Campaign {
        let mut request = self.client.lock(self.name.to_string());
        request.value = Some(value.into());
        Campaign { request }
    }

    /// The current leader, `None` if nobody leads.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn leader(&self) -> Result<Option<Leader>, Error> {
        let mut changes = fetch(&self.client, &self.name, None).await?;
        Ok(changes.pop_front().and_then(|(_, leader)| leader))
    }

    /// A stream of leadership: its first [`next`](Observer::next) is the current leader,
    /// each later one the next change (a new leader, no leader, or a proclaimed value).
    ///
    /// The server keeps the order of changes, so an observer that keeps calling `next` sees
    /// every leader, even one that led only briefly. Observers wait at the server (one long
    /// poll each), never in a polling loop, and never compete with the campaigns.
    pub fn observe(&self) -> Observer {
        Observer {
            client: self.client.clone(),
            name: self.name.clone(),
            after: None,
            pending: VecDeque::new(),
        }
    }
}

/// A campaign for leadership, configured with setters and started by `.await`; the same
/// settings as a [`LockRequest`].
///
/// # Cancel safety
/// As for a [`LockRequest`]: dropping it withdraws the campaign; leadership won at that
/// moment is given up at once.
#[must_use = "campaigns do nothing unless awaited"]
pub struct Campaign {
    request: LockRequest,
}

impl Campaign {
    /// Lease length of the leadership (default 10 s): how long the election stays without
    /// a leader after a leader dies.
    pub fn expires_in(mut self, lease: Duration) -> Campaign {
        self.request = self.request.expires_in(lease);
        self
    }

    /// Longest time to wait for leadership (default: no limit); after it,
    /// [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Campaign {
        self.request = self.request.timeout(timeout);
        self
    }

    /// A label shown in inspection and to observers (as [`Leader::metadata`]).
    pub fn metadata(mut self, label: impl Into<String>) -> Campaign {
        self.request = self.request.metadata(label);
        self
    }

    /// The longest this client may lead, from its election (see
    /// [`LockRequest::max_hold`]): then leadership is lost with
    /// [`LostReason::MaxHold`], and the next candidate leads.
    pub fn max_hold(mut self, limit: Duration) -> Campaign {
        self.request = self.request.max_hold(limit);
        self
    }

    /// Whether the leadership's lease is renewed in the background (default `true`).
    pub fn auto_renew(mut self, auto_renew: bool) -> Campaign {
        self.request = self.request.auto_renew(auto_renew);
        self
    }
}

impl fmt::Debug for Campaign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Campaign").field(&self.request).finish()
    }
}

impl IntoFuture for Campaign {
    type Output = Result<Leadership, Error>;
    type IntoFuture = CampaignFuture;

    fn into_future(self) -> CampaignFuture {
        CampaignFuture(self.request.into_future())
    }
}

/// The future of an awaited [`Campaign`].
#[must_use = "futures do nothing unless polled"]
pub struct CampaignFuture(LockFuture);

impl Future for CampaignFuture {
    type Output = Result<Leadership, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|held| held.map(|guard| Leadership { guard }))
    }
}

impl fmt::Debug for CampaignFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CampaignFuture")
    }
}

/// Leadership won by a [`Campaign`]: a [`LockGuard`] on the election's name. Dropping it
/// resigns (the lease is released in the background).
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        self.guard.name()
    }

    /// The fencing token of this leadership: pass it to what the leader writes to, so that
    /// a deposed leader's late writes can be refused.
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// Whether this client still leads, by its own safe count (see
    /// [`LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.guard.is_held()
    }

    /// Where the leadership stands now.
    pub fn state(&self) -> GuardState {
        self.guard.state()
    }

    /// Time left before the leadership is presumed lost unless renewed.
    pub fn remaining(&self) -> Duration {
        self.guard.remaining()
    }

    /// Resolves when the leadership is lost, with why: before anyone else can lead.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches.
    pub async fn lost(&self) -> LostReason {
        self.guard.lost().await
    }

    /// A handle that resolves when the leadership is lost, for other tasks.
    pub fn lost_signal(&self) -> LostSignal {
        self.guard.lost_signal()
    }

    /// The guard of the election's lock.
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// The guard of the election's lock, to hold leadership as a plain lock (dropping the
    /// guard resigns).
    pub fn into_guard(self) -> LockGuard {
        self.guard
    }

    /// Changes the value observers see, staying leader. Atomic with leadership: if this
    /// client no longer leads, nothing changes and it fails with [`Error::LockLost`].
    ///
    /// # Cancel safety
    /// If the future is dropped after the request left, the value may or may not have
    /// changed; leadership is unaffected.
    pub async fn proclaim(&self, value: impl Into<String>) -> Result<(), Error> {
        let value = value.into();
        protocol::validate_value(&value).map_err(Error::invalid)?;
        let lost = |reason| Error::LockLost {
            name: self.name().to_owned(),
            reason,
        };
        let deadline = match self.guard.state() {
            GuardState::Lost(reason) => return Err(lost(reason)),
            GuardState::Held | GuardState::Jeopardy => self.guard.valid_until(),
        };
        let body = json(&ProclaimRequest {
            name: self.name().to_owned(),
            lease_id: self.guard.lease_id,
            value,
        });
        let attempts = Attempts {
            // Worth trying while the lease may hold.
            deadline: deadline.max(Instant::now() + Duration::from_millis(1)),
            per_attempt: Duration::from_secs(5),
            first_contact: false,
        };
        let reply = self
            .guard
            .transport
            .post(Route::Proclaim, Some(self.name()), body, attempts)
            .await?;
        match reply.status {
            status if status.is_success() => Ok(()),
            StatusCode::GONE => {
                let reason = reply
                    .json::<protocol::ErrorBody>()
                    .ok()
                    .and_then(|b| b.reason);
                Err(lost(match reason {
                    Some(GoneReason::MaxHold) => LostReason::MaxHold,
                    Some(GoneReason::Revoked) => LostReason::Revoked,
                    _ => LostReason::Expired,
                }))
            }
            _ => Err(reply.into_error()),
        }
    }

    /// Gives up leadership now: the next campaign in line leads.
    ///
    /// # Cancel safety
    /// As [`LockGuard::release`]: the leadership is given up either way.
    pub async fn resign(self) -> Result<(), Error> {
        self.guard.release().await
    }
}

/// Leadership changes of an [`Election`], from [`Election::observe`].
pub struct Observer {
    client: DistributedLock,
    name: Arc<str>,
    /// The revision of the last state handed out (or queued): the next poll asks for the
    /// states after it.
    after: Option<u64>,
    pending: VecDeque<Option<Leader>>,
}

impl Observer {
    /// The current leader on the first call, then each change in order: waits for one.
    ///
    /// An error (no server reachable within the client's `unavailable_after`) leaves the
    /// observer usable: the next call resumes from the last state it handed out.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call loses no change; the next call returns it.
    pub async fn next(&mut self) -> Result<Option<Leader>, Error> {
        loop {
            if let Some(leader) = self.pending.pop_front() {
                return Ok(leader);
            }
            let changes = fetch(&self.client, &self.name, self.after).await?;
            if let Some(&(revision, _)) = changes.back() {
                self.after = Some(revision);
            }
            self.pending
                .extend(changes.into_iter().map(|(_, leader)| leader));
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("name", &self.name)
            .field("after", &self.after)
            .finish()
    }
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .finish()
    }
}

/// One `GET /v1/elections/{name}`: the current state (`after` `None`), or the states after
/// `after` (a long poll; empty if none came).
async fn fetch(
    client: &DistributedLock,
    name: &str,
    after: Option<u64>,
) -> Result<VecDeque<(u64, Option<Leader>)>, Error> {
    protocol::validate_name(name).map_err(Error::invalid)?;
    client.inner.usable()?;
    let mut path = format!(
        "{}{}",
        protocol::PATH_ELECTIONS_PREFIX,
        percent_encode(name)
    );
    let mut per_attempt = Duration::from_secs(10);
    if let Some(after) = after {
        path.push_str(&format!(
            "?after={after}&wait_ms={}",
            OBSERVE_POLL.as_millis()
        ));
        per_attempt += OBSERVE_POLL;
    }
    let attempts = Attempts {
        deadline: crate::client::later(Instant::now(), client.inner.unavailable_after),
        per_attempt,
        first_contact: true,
    };
    let reply = client.inner.transport().get(&path, attempts).await?;
    if !reply.status.is_success() {
        return Err(reply.into_error());
    }
    let observed: protocol::Observed = reply.json()?;
    Ok(observed
        .changes
        .into_iter()
        .map(|o| {
            let leader = o.leader.map(|l| Leader {
                value: l.value,
                fencing_token: l.fencing_token,
                metadata: l.metadata,
                since: UNIX_EPOCH + Duration::from_millis(l.acquired_at_ms),
            });
            (o.revision, leader)
        })
        .collect())
}
