//! Prometheus metrics of the server, served at `/metrics` in the text format.

use crate::server::store::LockStore;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::Arc;

/// Figures a store adds to the registry (the etcd store: its calls to etcd).
pub(crate) type StoreMetrics = Option<Box<dyn FnOnce(&mut Registry) + Send>>;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

/// Every metric the HTTP layer updates.
pub(crate) struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub acquires: Counter,
    pub grants: Counter,
    pub timeouts: Counter,
    pub releases: Counter,
    pub renewals: Counter,
    pub revocations: Counter,
    pub wait_seconds: Histogram,
    pub connections_open: Gauge,
    pub connections: Counter,
    pub connections_refused: Counter,
    pub tls_handshake_failures: Counter,
    pub sessions_open: Gauge,
    pub session_operations: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(store: Arc<dyn LockStore>, store_metrics: StoreMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("leasehold");
        if let Some(register) = store_metrics {
            register(&mut registry);
        }
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let acquires = Counter::default();
        registry.register(
            "acquires",
            "Acquire requests (each poll counts)",
            acquires.clone(),
        );
        let grants = Counter::default();
        registry.register("grants", "Locks granted", grants.clone());
        let timeouts = Counter::default();
        registry.register(
            "timeouts",
            "Waits that ended without the lock",
            timeouts.clone(),
        );
        let releases = Counter::default();
        registry.register(
            "releases",
            "Leases released by their holder",
            releases.clone(),
        );
        let renewals = Counter::default();
        registry.register(
            "renewals",
            "Leases renewed (one batch renews many)",
            renewals.clone(),
        );
        let revocations = Counter::default();
        registry.register(
            "revocations",
            "Leases ended by POST /v1/revoke",
            revocations.clone(),
        );
        let wait_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 12));
        registry.register(
            "wait_seconds",
            "Time from a poll's arrival to its grant",
            wait_seconds.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open client connections",
            connections_open.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "connections",
            "Accepted client connections",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because the connection cap was reached",
            connections_refused.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register(
            "sessions_open",
            "Open session streams",
            sessions_open.clone(),
        );
        let session_operations = Counter::default();
        registry.register(
            "session_operations",
            "Lock operations carried by session streams (also counted in http_requests)",
            session_operations.clone(),
        );
        registry.register_collector(Box::new(StoreCollector(store)));
        Metrics {
            registry,
            requests,
            acquires,
            grants,
            timeouts,
            revocations,
            releases,
            renewals,
            wait_seconds,
            connections_open,
            connections,
            connections_refused,
            tls_handshake_failures,
            sessions_open,
            session_operations,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Figures the store keeps, read at scrape time.
struct StoreCollector(Arc<dyn LockStore>);

impl fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats = self.0.stats();
        let held = ConstGauge::new(stats.held as i64);
        held.encode(encoder.encode_descriptor(
            "held_locks",
            "Locks with a holder",
            None,
            held.metric_type(),
        )?)?;
        let waiters = ConstGauge::new(stats.waiters as i64);
        waiters.encode(encoder.encode_descriptor(
            "waiters",
            "Queued waiters",
            None,
            waiters.metric_type(),
        )?)?;
        let expired = ConstCounter::new(stats.expirations);
        expired.encode(encoder.encode_descriptor(
            "expirations",
            "Leases that ran out without a release",
            None,
            expired.metric_type(),
        )?)?;
        let writes = ConstCounter::new(stats.state_file_writes);
        writes.encode(encoder.encode_descriptor(
            "state_file_writes",
            "Writes (each with fsync) of the memory store's state file",
            None,
            writes.metric_type(),
        )?)?;
        Ok(())
    }
}
