//! `POST /v1/revoke`: an operator ends the current holder's lease of a lock now.

use super::{App, Failure, Reply, json_reply};
use crate::protocol::{RevokeRequest, RevokeResponse, codes};
use crate::server::auth::Caller;
use http::StatusCode;

impl App {
    /// Revokes within the caller's project only (the store is asked for that project's
    /// lock), and only with an admin key: a revocation takes a lock from a client that
    /// believes it holds it, so ordinary keys of the project must not be able to.
    pub(super) async fn revoke(
        &self,
        caller: &Caller,
        req: RevokeRequest,
    ) -> Result<Reply, Failure> {
        if !caller.admin {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                "this key may not revoke leases: only keys marked `admin = true` in the \
                 server's key file may",
            ));
        }
        Self::check_name(&req.name)?;
        let fencing_tokens = self.store.revoke(&caller.project, &req.name).await?;
        let Some(&fencing_token) = fencing_tokens.last() else {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                format!("nobody holds lock {:?} in this project", req.name),
            ));
        };
        self.metrics.revocations.inc_by(fencing_tokens.len() as u64);
        // The key id, never the key; in open mode the project's name derives from the key,
        // so it is left out too.
        tracing::info!(
            key_id = caller.key_id.as_deref().unwrap_or("-"),
            lock = %req.name,
            ?fencing_tokens,
            "revoked"
        );
        Ok(json_reply(
            StatusCode::OK,
            &RevokeResponse {
                fencing_token,
                fencing_tokens,
            },
        ))
    }
}
