//! The acquire's `max_hold_ms` and `lock_delay_ms`: their bounds, and the renewal's `gone`
//! reasons they lead to.

use super::{App, Failure, bad};
use crate::protocol::{AcquireRequest, GoneReason};
use crate::server::store::Ended;
use std::time::Duration;

/// Longest `max_hold_ms` accepted: 30 days. A hold bound is meant to be long (hours, days);
/// beyond a month it bounds nothing an operator would wait for.
pub(crate) const MAX_HOLD_MS: u64 = 30 * 24 * 60 * 60 * 1000;

impl App {
    /// Checks the acquire's `max_hold_ms` (1 ms to 30 days) and `lock_delay_ms` (up to the
    /// server's maximum; 0 is no delay).
    pub(super) fn lease_limits(
        &self,
        req: &AcquireRequest,
    ) -> Result<(Option<Duration>, Option<Duration>), Failure> {
        let max_hold = match req.max_hold_ms {
            Some(ms) if ms == 0 || ms > MAX_HOLD_MS => {
                return Err(bad(format!(
                    "max_hold_ms is {ms}; this server accepts 1 to {MAX_HOLD_MS}"
                )));
            }
            other => other.map(Duration::from_millis),
        };
        let max_delay = self.limits.max_lock_delay;
        let lock_delay = match req.lock_delay_ms {
            Some(ms) if Duration::from_millis(ms) > max_delay => {
                return Err(bad(format!(
                    "lock_delay_ms is {ms}; this server's maximum lock-delay is {} ms",
                    max_delay.as_millis()
                )));
            }
            Some(0) | None => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        };
        Ok((max_hold, lock_delay))
    }
}

/// The wire's reason for a lease the store remembers ending.
pub(super) fn gone_reason(ended: Ended) -> GoneReason {
    match ended {
        Ended::Expired => GoneReason::Expired,
        Ended::MaxHold => GoneReason::MaxHold,
        Ended::Revoked => GoneReason::Revoked,
    }
}
