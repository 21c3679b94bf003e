//! What this server's calls to etcd cost, for `/metrics`: how long each takes and how often
//! an attempt fails, by call. When lock latency rises, these say whether etcd is why.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    call: &'static str,
    error: &'static str,
}

/// Why an attempt failed, as counted.
#[derive(Clone, Copy, Debug)]
pub(super) enum CallError {
    /// It failed, and the call tried again.
    Retried,
    /// It failed, and the call gave up: the request got `503`.
    Unavailable,
    /// etcd refused this server's certificate, user or permissions.
    Refused,
}

type Durations = Family<CallLabels, Histogram, fn() -> Histogram>;

/// The etcd call figures. Cheap to clone: clones share the figures.
#[derive(Clone)]
pub(crate) struct EtcdMetrics {
    durations: Durations,
    errors: Family<ErrorLabels, Counter>,
}

fn histogram() -> Histogram {
    // 0.1 ms to about 0.8 s: a healthy etcd answers in the lowest buckets.
    Histogram::new(exponential_buckets(0.0001, 2.0, 14))
}

impl Default for EtcdMetrics {
    fn default() -> EtcdMetrics {
        EtcdMetrics {
            durations: Durations::new_with_constructor(histogram),
            errors: Family::default(),
        }
    }
}

impl EtcdMetrics {
    /// One finished call (all its attempts), successful or not.
    pub(super) fn took(&self, call: &'static str, elapsed: Duration) {
        self.durations
            .get_or_create(&CallLabels { call })
            .observe(elapsed.as_secs_f64());
    }

    /// One failed attempt.
    pub(super) fn failed(&self, call: &'static str, error: CallError) {
        let error = match error {
            CallError::Retried => "retried",
            CallError::Unavailable => "unavailable",
            CallError::Refused => "refused",
        };
        self.errors
            .get_or_create(&ErrorLabels { call, error })
            .inc();
    }

    /// Adds the figures to the server's registry.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "etcd_call_duration_seconds",
            "Time of each call to etcd, all its attempts included, by call",
            self.durations.clone(),
        );
        registry.register(
            "etcd_call_errors",
            "Failed attempts of calls to etcd, by call and by what followed: retried, unavailable (gave up: 503), refused (etcd refuses this server's credentials)",
            self.errors.clone(),
        );
    }
}

#[cfg(test)]
impl EtcdMetrics {
    /// How many calls named `call` finished.
    pub(super) fn calls(&self, call: &str) -> u64 {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let line = format!("etcd_call_duration_seconds_count{{call=\"{call}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |n| n.parse().expect("a count"))
    }
}

impl std::fmt::Debug for EtcdMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdMetrics")
    }
}
