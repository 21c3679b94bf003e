//! The lock server (feature `server`): embed it with [`Server::builder`], or run the
//! `leasehold-server` binary.
//!
//! ```
//! # async fn run() -> Result<(), leasehold::Error> {
//! use leasehold::server::Server;
//! let server = Server::builder().bind("127.0.0.1:0").start().await?;
//! let dl = leasehold::DistributedLock::builder("any-key")
//!     .endpoint(server.url())
//!     .build()?;
//! let guard = dl.lock("job").await?;
//! drop(guard);
//! server.shutdown().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

mod auth;
mod budget;
mod connection;
pub(crate) mod console;
mod http;
mod in_flight;
mod listing;
mod log_limit;
mod metrics;
mod state_dir;
mod state_file;
pub mod store;
mod tls;

use crate::error::Error;
use auth::Auth;
use connection::{ConnLimits, Role};
use http::{App, Limits};
use metrics::{Metrics, StoreMetrics};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::LockStore;
use store::memory::{MemoryConfig, MemoryStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use auth::new_key;
pub use connection::{AcceptFromFuture, AcceptFuture, Listener};
pub use state_dir::default_state_file;

/// Configures and starts a [`Server`].
#[must_use = "a builder does nothing until start() is awaited"]
pub struct ServerBuilder {
    bind: String,
    metrics_bind: Option<String>,
    memory: MemoryConfig,
    limits: Limits,
    conn: ConnLimits,
    key_file: Option<PathBuf>,
    key_reload_interval: Duration,
    tls: Option<(PathBuf, PathBuf)>,
    event_log: Option<PathBuf>,
    listener: Option<Box<dyn Listener>>,
    #[cfg(feature = "etcd")]
    etcd: Option<store::etcd::EtcdConfig>,
    #[cfg(feature = "etcd")]
    etcd_tls_files: store::etcd::TlsFiles,
}

/// A running lock server. Dropping it stops the server without waiting; prefer
/// [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    tls: bool,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    app: Arc<App>,
}

impl Server {
    /// A builder with defaults: memory store, `127.0.0.1:7878`, open development mode,
    /// leases from 10 ms to 1 h.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            bind: "127.0.0.1:7878".into(),
            metrics_bind: None,
            memory: MemoryConfig::default(),
            limits: Limits {
                max_body_bytes: 1 << 20,
                min_lease: Duration::from_millis(10),
                max_lease: Duration::from_secs(3600),
                max_poll: Duration::from_secs(20),
                body_read_timeout: Duration::from_secs(10),
                body_budget: 256 << 20,
                max_locks_per_project: 1_000_000,
                max_acquires_per_project: 20_000,
                max_lock_delay: Duration::from_secs(60),
            },
            conn: ConnLimits::default(),
            key_file: None,
            key_reload_interval: Duration::from_secs(1),
            tls: None,
            event_log: None,
            listener: None,
            #[cfg(feature = "etcd")]
            etcd: None,
            #[cfg(feature = "etcd")]
            etcd_tls_files: Default::default(),
        }
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address `/metrics` is served on when it has a listener of its own
    /// ([`ServerBuilder::metrics_bind`]), with the real port when bound to port 0.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The base URL to give the SDK, such as `http://127.0.0.1:40123` (`https` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// True when no key file is configured: any key is accepted, each its own project.
    pub fn is_open_mode(&self) -> bool {
        self.app.auth.is_open()
    }

    /// Re-reads the key file now (it is also re-read by itself when it changes). Keys added
    /// work and revoked keys are refused from the next request on; held locks stay held. On
    /// error the keys in use stay as they were. Returns how many keys are loaded.
    pub fn reload_keys(&self) -> Result<usize, Error> {
        self.app.auth.reload()
    }

    /// Stops answering (`true`) or answers again (`false`): requests and answers wait, while
    /// leases run on. For the test kit.
    #[cfg(feature = "testing")]
    pub(crate) fn set_paused(&self, paused: bool) {
        self.app.paused.send_replace(paused);
    }

    /// Stops accepting connections, answers waiting acquires with a retryable `503`, lets
    /// requests in progress finish (up to the drain timeout), and records a clean shutdown
    /// in the state file.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.metrics_task.take() {
            let _ = task.await;
        }
        if let Err(e) = self.app.store.shutdown().await {
            tracing::error!(error = %e, "store shutdown failed");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("bind", &self.bind)
            .field("metrics_bind", &self.metrics_bind)
            .field("key_file", &self.key_file)
            .field("tls", &self.tls)
            .field("custom_listener", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Address to listen on, such as `127.0.0.1:7878` or `0.0.0.0:0` (any free port).
    pub fn bind(mut self, addr: impl Into<String>) -> ServerBuilder {
        self.bind = addr.into();
        self
    }

    /// Serves connections from `listener` instead of binding a TCP socket (`bind` is then
    /// ignored): for example a simulated network in tests.
    pub fn listener(mut self, listener: impl Listener) -> ServerBuilder {
        self.listener = Some(Box::new(listener));
        self
    }

    /// Serves `/metrics` (and `/healthz`) on a listener of its own at this address, such as
    /// `10.0.0.5:9100` on a private network, like etcd's `--listen-metrics-urls`; the main
    /// address then answers `/metrics` with `404`. Without it (the default, as before),
    /// `/metrics` is served on the main address, where it needs no API key and shows every
    /// project's activity counts: firewall it, or move it here. The metrics listener
    /// speaks plain HTTP (no TLS), with the same connection limits as the main one.
    pub fn metrics_bind(mut self, addr: impl Into<String>) -> ServerBuilder {
        self.metrics_bind = Some(addr.into());
        self
    }

    /// Serves the projects and API keys of this key file (TOML) instead of open development
    /// mode. See the README for its format.
    ///
    /// The file is re-read when it changes, once it has stopped changing (the same
    /// modification time and size at two checks in a row). Replace it atomically: write the
    /// new version to a temporary file in the same directory, then rename it over the old
    /// one. A version that does not parse, or that has no keys when the one in use has
    /// some (a truncated or emptied file), is refused with a warning and the keys in use
    /// stay. Keys that did not change keep their rate-limit state across reloads.
    ///
    /// A key revoked while it holds locks gets `401` on renew and release: its locks are
    /// then never held longer than their lease, and expire as any unrenewed lease does.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.key_file = Some(path.into());
        self
    }

    /// How often the key file is checked for changes (default 1 s; zero: never, reload
    /// only through [`Server::reload_keys`] or the binary's SIGHUP).
    pub fn key_reload_interval(mut self, interval: Duration) -> ServerBuilder {
        self.key_reload_interval = interval;
        self
    }

    /// Serves HTTPS with this PEM certificate chain and private key (TLS 1.2 and 1.3).
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> ServerBuilder {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    /// Keeps the memory store's restart state in `path`: the fencing-token floor and how
    /// long leases issued before a restart may still run (grants wait for them after a
    /// crash). Without it, every start is treated as a first start.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.memory.state_file = Some(path.into());
        self
    }

    /// Keeps every lock in the etcd cluster at these client URLs (such as
    /// `http://10.0.0.1:2379`) instead of in memory, so that several servers can serve the
    /// same locks (feature `etcd`). See the README's "Scaling out with etcd".
    ///
    /// etcd counts lease TTLs in whole seconds: leases are rounded up, and etcd raises them
    /// to its minimum TTL (2 s with etcd's default timing); grants report the length etcd
    /// granted. A waiter whose client went away keeps its place for its lease's TTL (the
    /// [`grace`](ServerBuilder::grace) setting does not apply), and the state file is not
    /// used.
    #[cfg(feature = "etcd")]
    pub fn etcd<I, S>(mut self, endpoints: I) -> ServerBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.etcd_config().endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The key prefix of the etcd backend (default `/leasehold`): servers with the
    /// same prefix share their locks; different prefixes keep deployments apart on one etcd
    /// cluster. Has an effect only with [`etcd`](ServerBuilder::etcd).
    #[cfg(feature = "etcd")]
    pub fn etcd_prefix(mut self, prefix: impl Into<String>) -> ServerBuilder {
        self.etcd_config().prefix = prefix.into();
        self
    }

    /// Trusts only the CA certificate(s) in this PEM file for etcd's certificate, instead of
    /// Mozilla's roots. Needs `https://` endpoints. The file is read by
    /// [`start`](ServerBuilder::start), which fails if it is unreadable or holds no valid
    /// certificate, or if etcd's certificate is not signed by this CA.
    #[cfg(feature = "etcd")]
    pub fn etcd_ca_file(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.etcd_config();
        self.etcd_tls_files.ca = Some(path.into());
        self
    }

    /// Presents this PEM client certificate chain and private key to etcd, for etcd's
    /// mutual TLS (`--client-cert-auth`). Needs `https://` endpoints. The files are read by
    /// [`start`](ServerBuilder::start), which fails if either is unreadable or invalid, or
    /// if the key is not the certificate's.
    #[cfg(feature = "etcd")]
    pub fn etcd_client_cert(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> ServerBuilder {
        self.etcd_config();
        self.etcd_tls_files.identity = Some((cert.into(), key.into()));
        self
    }

    /// Logs in to etcd as this user (for etcd's authentication), and logs in again when
    /// etcd's token expires. The user needs read and write permission on the key prefix.
    /// [`start`](ServerBuilder::start) fails if etcd refuses the name or password. The
    /// password is never logged.
    #[cfg(feature = "etcd")]
    pub fn etcd_user(
        mut self,
        name: impl Into<String>,
        password: impl Into<String>,
    ) -> ServerBuilder {
        self.etcd_config().user = Some(store::etcd::EtcdUser::new(name, password));
        self
    }

    /// The etcd settings, made on the first etcd setter: `start` then insists on endpoints.
    #[cfg(feature = "etcd")]
    fn etcd_config(&mut self) -> &mut store::etcd::EtcdConfig {
        self.etcd
            .get_or_insert_with(|| store::etcd::EtcdConfig::new(Vec::new()))
    }

    /// Longest lease a client may ask for (default 1 h, at most 24 h).
    pub fn max_lease(mut self, lease: Duration) -> ServerBuilder {
        self.limits.max_lease = lease;
        self
    }

    /// Longest lock-delay (`lock_delay_ms`) a client may ask for (default 60 s, at most
    /// 24 h): a longer one is refused with `400`. `Duration::ZERO` refuses every delay.
    pub fn max_lock_delay(mut self, delay: Duration) -> ServerBuilder {
        self.limits.max_lock_delay = delay;
        self
    }

    /// Shortest lease a client may ask for (default 10 ms).
    pub fn min_lease(mut self, lease: Duration) -> ServerBuilder {
        self.limits.min_lease = lease;
        self
    }

    /// Longest time one long poll is held open (default 20 s); the client then polls again,
    /// keeping its place in line. The memory store remembers ended acquires' request ids
    /// for three long polls (see the protocol's request ids).
    pub fn max_poll(mut self, poll: Duration) -> ServerBuilder {
        self.limits.max_poll = poll;
        self.memory.tombstone_ttl = poll.saturating_mul(3);
        self
    }

    /// After a crash, the memory store grants no lock until leases granted before it could
    /// have expired, but for at most this long (default 30 s): leases up to this long are
    /// covered by it. A longer lease is recorded with its lock in the state file when it is
    /// granted (and forgotten when its lock is free), and after a crash only that lock waits
    /// for the lease's full length. Needs [`state_file`](Self::state_file).
    pub fn crash_hold_back(mut self, bound: Duration) -> ServerBuilder {
        self.memory.crash_hold_back = bound;
        self
    }

    /// How far ahead the memory store reserves fencing tokens in its state file (default
    /// 60 s of wall-clock microseconds): the next reservation is written when half is used,
    /// so about every 30 s while grants happen. While a reservation cannot be written, no
    /// lock is granted (acquires get a retryable `503`).
    pub fn fencing_token_reserve(mut self, reserve: Duration) -> ServerBuilder {
        self.memory.token_reserve = reserve;
        self
    }

    /// Writes the state file on the request's task, blocking it, instead of on the
    /// background writer (no grouping, no rate limit): for deterministic simulations, whose
    /// simulated clock would run on while a real thread writes. Never use it in a server.
    #[doc(hidden)]
    pub fn state_file_inline_writes_for_simulations(mut self) -> ServerBuilder {
        self.memory.state_file_inline_writes = true;
        self
    }

    /// Most locks, held or waited for, that one project may have at once where its key file
    /// sets no `max_locks` (default 1,000,000; open mode too). Beyond it acquires of new
    /// lock names answer `429`.
    pub fn max_locks_per_project(mut self, max: u64) -> ServerBuilder {
        self.limits.max_locks_per_project = max;
        self
    }

    /// Most acquire requests of one project in flight at once (default 20,000; open mode
    /// too). Each waiter is a long poll in flight, so this bounds a project's waiters and
    /// the memory they hold. Beyond it acquires answer `429` with `Retry-After`. Renewals,
    /// releases and cancels are never refused by it.
    pub fn max_acquires_per_project(mut self, max: usize) -> ServerBuilder {
        self.limits.max_acquires_per_project = max;
        self
    }

    /// Most bytes of request bodies held in memory at once while they are read (default
    /// 256 MiB), and a quarter of that for each project. A body that does not fit is refused
    /// with `503` and `Retry-After: 1` (the SDK retries), so slow senders cannot pin the
    /// server's memory, and one project cannot take the whole budget.
    pub fn body_budget(mut self, bytes: usize) -> ServerBuilder {
        self.limits.body_budget = bytes;
        self
    }

    /// Largest request body (default 1 MiB); larger ones get `413`.
    pub fn max_body_bytes(mut self, bytes: usize) -> ServerBuilder {
        self.limits.max_body_bytes = bytes;
        self
    }

    /// How long a waiter whose connection went away keeps its place in line, and a grant
    /// made to it is kept for it (default 3 s).
    pub fn grace(mut self, grace: Duration) -> ServerBuilder {
        self.memory.grace = grace;
        self
    }

    /// Sends the store's audit trail (every grant, deadline change, release, cancel, expiry
    /// and departed waiter) to `sink`. See also [`event_log`](Self::event_log).
    pub fn events(mut self, sink: store::EventSink) -> ServerBuilder {
        self.memory.events = Some(sink);
        self
    }

    /// Appends the store's audit trail to `path` as JSON lines (see [`store::StoreEvent`]).
    /// Lines are written as events happen, so a crash loses at most the last few.
    pub fn event_log(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.event_log = Some(path.into());
        self
    }

    /// Most waiters one lock may have (default 100,000); more get `429`.
    pub fn max_waiters_per_lock(mut self, max: usize) -> ServerBuilder {
        self.memory.max_waiters_per_lock = max;
        self
    }

    /// Most open client connections (default 10,000); more are closed at once.
    pub fn max_connections(mut self, max: usize) -> ServerBuilder {
        self.conn.max_connections = max;
        self
    }

    /// Most open connections from one source address (default 256; an IPv6 address counts
    /// by its /64); more are closed at once, so that one client cannot take every
    /// connection [`max_connections`](Self::max_connections) allows. `0` turns the
    /// per-address cap off: do so behind a proxy or load balancer that connects from one
    /// address. Applies to connections whose address the listener knows (TCP).
    pub fn max_connections_per_ip(mut self, max: usize) -> ServerBuilder {
        self.conn.max_connections_per_ip = max;
        self
    }

    /// A connection whose client takes none of its responses for this long is closed
    /// (default 10 s): a client that stops reading its socket, or keeps its HTTP/2
    /// flow-control window at zero, cannot pin responses in server memory.
    pub fn write_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.conn.write_timeout = timeout;
        self
    }

    /// Time a client has to send a request's header, and then its body (default 10 s
    /// each): protects against connections that trickle bytes to hold server resources
    /// (slowloris). Late headers close the connection; late bodies get `408`. A new
    /// connection's first request header is due this long after accept, TLS handshake and
    /// HTTP version detection included: connections that send nothing are closed.
    pub fn header_read_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.conn.header_read_timeout = timeout;
        self.limits.body_read_timeout = timeout;
        self
    }

    /// A connection with no request in flight for this long is closed (default 60 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.conn.idle_timeout = timeout;
        self
    }

    /// Time a client has to complete the TLS handshake (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.conn.handshake_timeout = timeout;
        self
    }

    /// Largest request header section, at least 8 KiB (default 16 KiB); larger ones, or
    /// more than `max_headers` fields, get `431`.
    pub fn max_header_bytes(mut self, bytes: usize) -> ServerBuilder {
        self.conn.max_header_bytes = bytes;
        self
    }

    /// Most header fields in one request (default 64).
    pub fn max_headers(mut self, count: usize) -> ServerBuilder {
        self.conn.max_headers = count;
        self
    }

    /// How long a graceful shutdown waits for requests in progress (default 10 s); also how
    /// long a connection asked to close (HTTP/2 GOAWAY after the idle timeout) may take to
    /// finish before it is cut.
    pub fn drain_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.conn.drain = timeout;
        self
    }

    fn check(&self) -> Result<(), Error> {
        let protocol_max = Duration::from_millis(crate::protocol::MAX_LEASE_MS);
        if self.limits.min_lease.is_zero()
            || self.limits.min_lease > self.limits.max_lease
            || self.limits.max_lease > protocol_max
        {
            return Err(Error::invalid(format!(
                "lease bounds: need 0 < min_lease <= max_lease <= {protocol_max:?}"
            )));
        }
        if self.limits.max_lock_delay > protocol_max {
            return Err(Error::invalid(format!(
                "max_lock_delay must be at most {protocol_max:?}"
            )));
        }
        if self.conn.max_header_bytes < 8192 {
            return Err(Error::invalid("max_header_bytes must be at least 8192"));
        }
        if self.conn.max_connections == 0 || self.limits.max_body_bytes == 0 {
            return Err(Error::invalid(
                "max_connections and max_body_bytes must be above 0",
            ));
        }
        if self.limits.max_locks_per_project == 0 || self.limits.max_acquires_per_project == 0 {
            return Err(Error::invalid(
                "max_locks_per_project and max_acquires_per_project must be above 0",
            ));
        }
        if self.limits.body_budget / 4 < self.limits.max_body_bytes {
            return Err(Error::invalid(format!(
                "body_budget ({} bytes) must hold at least four bodies of max_body_bytes ({} \
                 bytes): each project may use a quarter of it",
                self.limits.body_budget, self.limits.max_body_bytes
            )));
        }
        if self.conn.write_timeout.is_zero() || self.conn.header_read_timeout.is_zero() {
            return Err(Error::invalid(
                "write_timeout and header_read_timeout must be above 0",
            ));
        }
        Ok(())
    }

    /// The store, and what it adds to `/metrics`.
    async fn open_store(&self) -> Result<(Arc<dyn LockStore>, StoreMetrics), Error> {
        #[cfg(feature = "etcd")]
        if let Some(config) = &self.etcd {
            if config.endpoints.is_empty() {
                return Err(Error::invalid(
                    "the etcd backend needs at least one etcd endpoint",
                ));
            }
            let config = store::etcd::EtcdConfig {
                max_waiters_per_lock: self.memory.max_waiters_per_lock,
                tls: self.etcd_tls_files.load()?.or_else(|| config.tls.clone()),
                ..config.clone()
            };
            let store = store::etcd::EtcdStore::connect(config).await?;
            let metrics = store.metrics();
            return Ok((
                Arc::new(store),
                Some(Box::new(move |r| metrics.register(r))),
            ));
        }
        let store = MemoryStore::open(self.memory.clone()).map_err(|source| Error::Io {
            context: "cannot open the memory store's state file".into(),
            source,
        })?;
        Ok((Arc::new(store), None))
    }

    /// Binds the socket, opens the store and starts serving on the current runtime.
    pub async fn start(mut self) -> Result<Server, Error> {
        self.check()?;
        if let Some(path) = &self.event_log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::Io {
                    context: format!("cannot open event log {}", path.display()),
                    source,
                })?;
            let (sink, events) = tokio::sync::mpsc::unbounded_channel();
            tokio::task::spawn_blocking(move || write_events(file, events));
            self.memory.events = Some(sink);
        }
        // The console's live view gets the store's events too.
        let event_hub = Arc::new(console::EventHub::default());
        let (sink, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(event_hub.clone().feed(events));
        self.memory.console_events = Some(sink);
        let auth = match &self.key_file {
            Some(path) => Auth::from_file(path)?,
            None => Auth::open(),
        };
        let tls = match &self.tls {
            Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                cert, key,
            )?)),
            None => None,
        };
        let listener: Box<dyn Listener> = match self.listener.take() {
            Some(listener) => listener,
            None => Box::new(
                TcpListener::bind(&self.bind)
                    .await
                    .map_err(|source| Error::Io {
                        context: format!("cannot listen on {}", self.bind),
                        source,
                    })?,
            ),
        };
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "cannot read the bound address".into(),
            source,
        })?;
        let metrics_listener = match &self.metrics_bind {
            Some(bind) => Some(TcpListener::bind(bind).await.map_err(|source| Error::Io {
                context: format!("cannot listen for /metrics on {bind}"),
                source,
            })?),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(listener) => Some(listener.local_addr().map_err(|source| Error::Io {
                context: "cannot read the bound /metrics address".into(),
                source,
            })?),
            None => None,
        };
        let (store, store_metrics) = self.open_store().await?;
        let (stop, stopping) = watch::channel(false);
        let app = Arc::new(App {
            store: store.clone(),
            auth,
            metrics: Metrics::new(store, store_metrics),
            body_budget: budget::BodyBudget::new(self.limits.body_budget),
            acquires: in_flight::AcquiresInFlight::new(self.limits.max_acquires_per_project),
            session_idle: self.conn.idle_timeout,
            limits: self.limits,
            stopping: stopping.clone(),
            #[cfg(feature = "testing")]
            paused: watch::Sender::new(false),
            events: event_hub,
        });
        if self.key_file.is_some() && !self.key_reload_interval.is_zero() {
            tokio::spawn(watch_key_file(
                app.clone(),
                self.key_reload_interval,
                stopping.clone(),
            ));
        }
        let metrics_task = metrics_listener.map(|listener| {
            tokio::spawn(connection::serve(
                Box::new(listener),
                app.clone(),
                None,
                self.conn.clone(),
                Role::Metrics,
                stopping.clone(),
            ))
        });
        let task = tokio::spawn(connection::serve(
            listener,
            app.clone(),
            tls.clone(),
            self.conn,
            Role::Api {
                metrics_elsewhere: metrics_addr.is_some(),
            },
            stopping,
        ));
        Ok(Server {
            addr,
            metrics_addr,
            metrics_task,
            tls: tls.is_some(),
            stop,
            task: Some(task),
            app,
        })
    }
}

/// Writes events as JSON lines until every sender is gone; flushes whenever it catches up.
fn write_events(
    file: std::fs::File,
    mut events: tokio::sync::mpsc::UnboundedReceiver<store::StoreEvent>,
) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(file);
    while let Some(event) = events.blocking_recv() {
        let mut next = Some(event);
        while let Some(event) = next {
            let line = serde_json::to_string(&event).expect("events serialize");
            if writeln!(out, "{line}").is_err() {
                return;
            }
            next = events.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// Re-reads the key file whenever it changes, until the server stops.
async fn watch_key_file(app: Arc<App>, every: Duration, mut stopping: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stopping) => return,
        }
        match app.auth.reload_if_changed() {
            Some(Ok(keys)) => tracing::info!(keys, "key file changed: reloaded"),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "key file changed but is refused; keeping the keys in use")
            }
            None => {}
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}
