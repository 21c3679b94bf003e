//! What the HTTP layer adds for the kinds beyond the mutex: the acquire's mode, and the two
//! election endpoints (`POST /v1/proclaim`, `GET /v1/elections/{name}`).

use super::{App, Failure, Reply, bad, json_reply, percent_decode, unix_ms};
use crate::protocol::{
    self, AcquireRequest, LockMode, Observed, ProclaimRequest, ProclaimResponse, WireLeader,
    WireObservation, codes,
};
use crate::server::auth::Caller;
use crate::server::listing::query_params;
use crate::server::store::{Mode, Observation, Proclaimed};
use http::StatusCode;
use std::time::Duration;

/// The store's mode of an acquire; `permits` belongs to `semaphore` alone, so that a
/// forgotten `mode` is not silently an exclusive lock.
pub(super) fn mode(req: &AcquireRequest) -> Result<Mode, Failure> {
    match (req.mode, req.permits) {
        (LockMode::Exclusive, None) => Ok(Mode::Exclusive),
        (LockMode::Shared, None) => Ok(Mode::Shared),
        (LockMode::Semaphore, Some(n)) if (1..=protocol::MAX_PERMITS).contains(&n) => {
            Ok(Mode::Permit(n))
        }
        (LockMode::Semaphore, Some(n)) => Err(bad(format!(
            "permits is {n}; a semaphore has 1 to {} permits",
            protocol::MAX_PERMITS
        ))),
        (LockMode::Semaphore, None) => Err(bad("mode \"semaphore\" needs permits")),
        (_, Some(_)) => Err(bad(
            "permits is only for mode \"semaphore\"; add \"mode\": \"semaphore\"",
        )),
    }
}

fn observation(o: Observation) -> WireObservation {
    WireObservation {
        revision: o.revision,
        leader: o.leader.map(|l| WireLeader {
            fencing_token: l.fencing_token,
            value: l.value,
            metadata: l.label,
            acquired_at_ms: unix_ms(l.acquired_at),
        }),
    }
}

impl App {
    /// Changes the leader's value, atomically with its leadership: a lease that no longer
    /// holds the name answers `410` like a renewal would, and nothing changes.
    pub(super) async fn proclaim(
        &self,
        caller: &Caller,
        req: ProclaimRequest,
    ) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        protocol::validate_value(&req.value).map_err(bad)?;
        match self
            .store
            .proclaim(&caller.project, &req.name, req.lease_id, req.value)
            .await?
        {
            Proclaimed::Done => Ok(json_reply(
                StatusCode::OK,
                &ProclaimResponse { proclaimed: true },
            )),
            Proclaimed::Gone(why) => Err(super::gone(
                format!("no lease with that id leads {:?}", req.name),
                why,
            )),
        }
    }

    /// `GET /v1/elections/{name}[?after=R[&wait_ms=W]]`: the current leader, or every
    /// leadership state after revision `R` (a long poll of up to `W`, capped at the server's
    /// poll bound).
    pub(super) async fn election(
        &self,
        caller: &Caller,
        encoded: &str,
        query: Option<&str>,
    ) -> Result<Reply, Failure> {
        let name = percent_decode(encoded)
            .ok_or_else(|| bad("election name is not valid percent-encoded UTF-8"))?;
        Self::check_name(&name)?;
        let mut after = None;
        let mut wait = self.limits.max_poll;
        for (key, value) in query_params(query, &["after", "wait_ms"])? {
            let n = value.parse::<u64>().map_err(|_| {
                bad(format!(
                    "query parameter {key:?} is {value:?}; expected a whole number"
                ))
            })?;
            match key {
                "after" => after = Some(n),
                _ => wait = Duration::from_millis(n).min(self.limits.max_poll),
            }
        }
        let mut stopping = self.stopping.clone();
        let changes = tokio::select! {
            changes = self.store.observe(&caller.project, &name, after, wait) => changes?,
            _ = crate::server::stopped(&mut stopping) => {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    "server is shutting down; retry",
                ));
            }
        };
        Ok(json_reply(
            StatusCode::OK,
            &Observed {
                changes: changes.into_iter().map(observation).collect(),
            },
        ))
    }
}
