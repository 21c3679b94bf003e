//! Fencing tokens: `max(previous + 1, wall-clock µs since 2025)`.
//!
//! They increase across restarts as long as the clock does not step back; with a state
//! file, also when it does, because a run issues only tokens durably reserved in the file.
//! While a reservation cannot be written, no token (hence no grant) is issued.

use crate::server::state_file::{MIN_FLUSH_INTERVAL, StateFile, wall_micros};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

#[derive(Debug)]
pub(super) struct Tokens {
    last: AtomicU64,
    /// Reservation step, in token units (wall-clock µs): the configured step, plus the
    /// longest a write may wait for its turn, so that a reservation asked for now is not
    /// used up by the wall clock by the time it is written.
    pub reserve: u64,
}

impl Tokens {
    pub fn new(first: u64, reserve: u64) -> Tokens {
        Tokens {
            last: AtomicU64::new(first.saturating_sub(1)),
            reserve: reserve.saturating_add(MIN_FLUSH_INTERVAL.as_micros() as u64),
        }
    }

    /// The next token to issue, and whether the durable reservation covers it.
    pub fn candidate(&self, file: Option<&StateFile>) -> (u64, bool) {
        let next = (self.last.load(Ordering::Acquire) + 1).max(wall_micros(SystemTime::now()));
        (next, file.is_none_or(|f| next < f.durable_tokens()))
    }

    /// Issues a token, or `None` while the reservation that would cover it is not durable.
    /// Asks for the next reservation when half of the current one is used.
    pub fn next(&self, file: Option<&StateFile>) -> Option<u64> {
        let floor = wall_micros(SystemTime::now());
        let below = file.map_or(u64::MAX, StateFile::durable_tokens);
        let issued = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                let token = (last + 1).max(floor);
                (token < below).then_some(token)
            });
        let token = match issued {
            Ok(last) | Err(last) => (last + 1).max(floor),
        };
        if let Some(file) = file
            && token.saturating_add(self.reserve / 2) >= below
        {
            file.reserve_tokens(token.saturating_add(self.reserve));
        }
        issued.ok().map(|_| token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_increase_and_follow_the_wall_clock() {
        let tokens = Tokens::new(0, 1);
        let first = tokens.next(None).unwrap();
        assert!(first >= wall_micros(SystemTime::now()) - 1_000_000);
        let mut last = first;
        for _ in 0..1000 {
            let token = tokens.next(None).unwrap();
            assert!(token > last);
            last = token;
        }
        // A start whose first token lies ahead (the previous run's reservation) begins there.
        let ahead = Tokens::new(last + 1_000_000_000, 1);
        assert_eq!(ahead.next(None), Some(last + 1_000_000_000));
    }
}
