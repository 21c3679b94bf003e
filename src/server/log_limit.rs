//! Rate limits for log lines that clients can cause, so that no client can flood the log.

use std::sync::Mutex;

/// Lets a few log lines of one kind through and counts the others, so that nothing a client
/// does can flood the log: a burst of [`LogLimit::BURST`], then one line a second.
pub(crate) struct LogLimit {
    state: Mutex<LogBucket>,
}

struct LogBucket {
    tokens: f64,
    at: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimit {
    const BURST: f64 = 10.0;
    const PER_SECOND: f64 = 1.0;

    pub(crate) const fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new(LogBucket {
                tokens: LogLimit::BURST,
                at: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log this line: `Some(n)` with the number of lines of this kind suppressed
    /// since the last one logged (also logged as "n similar messages suppressed"), or `None`
    /// to drop it.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if let Some(at) = state.at {
            let refill = now.duration_since(at).as_secs_f64() * LogLimit::PER_SECOND;
            state.tokens = (state.tokens + refill).min(LogLimit::BURST);
        }
        state.at = Some(now);
        if state.tokens < 1.0 {
            state.suppressed += 1;
            return None;
        }
        state.tokens -= 1.0;
        let suppressed = std::mem::take(&mut state.suppressed);
        if suppressed > 0 {
            tracing::warn!("{suppressed} similar messages suppressed");
        }
        Some(suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn log_lines_of_one_kind_are_limited_and_counted() {
        let limit = LogLimit::new();
        for _ in 0..10 {
            assert_eq!(limit.allow(), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.allow(), None);
        }
        // A second later one more gets through, saying how many were dropped.
        limit.state.lock().unwrap().at = Some(std::time::Instant::now() - Duration::from_secs(1));
        assert_eq!(limit.allow(), Some(1000));
        assert_eq!(limit.allow(), None);
    }
}
