//! The retry policy, in one place.
//!
//! Delays come from `backon` (exponential with jitter). The design card named the `backoff`
//! crate, but RustSec flags it and its `instant` dependency as unmaintained
//! (RUSTSEC-2025-0012, RUSTSEC-2024-0384); `backon` is the successor the advisory names.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

/// Delays between attempts: 5 ms doubling to 500 ms, jittered, unbounded in count
/// (callers stop at their own deadline).
pub(crate) fn delays() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(5))
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    #[test]
    fn delays_grow_and_stay_bounded() {
        let d: Vec<_> = super::delays().take(20).collect();
        assert_eq!(d.len(), 20);
        assert!(d[0] <= std::time::Duration::from_millis(10));
        assert!(
            d.iter()
                .all(|d| *d <= std::time::Duration::from_millis(1000))
        );
    }
}
