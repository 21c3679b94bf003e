//! The SDK: `DistributedLock` and its builder.

pub(crate) mod election;
pub(crate) mod guard;
pub(crate) mod inspect;
pub(crate) mod lease;
pub(crate) mod lease_state;
pub(crate) mod list;
pub(crate) mod mailbox;
pub(crate) mod renewer;
pub(crate) mod request;
pub(crate) mod retry;
pub(crate) mod revoke;
pub(crate) mod session;
pub(crate) mod stamped;
pub(crate) mod successors;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod transport;

use crate::error::Error;
use guard::LockGuard;
use lease::LockFn;
use request::LockRequest;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::{Connect, Transport, TransportConfig};

/// Endpoint used when neither the builder nor `LEASEHOLD_URL` names one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7878";
/// Environment variable read for the endpoint (a URL, or several separated by commas).
pub const URL_ENV: &str = "LEASEHOLD_URL";

/// A client of the lock servers of one project.
///
/// Cheap to clone: clones share one connection pool, one session per server and one
/// renewal task, so there is no need to wrap it in an `Arc`. Lock operations share one
/// session (one connection) per server, however many acquires wait at once; inspections go
/// as HTTP/2 requests over one pooled connection.
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// use leasehold::DistributedLock;
/// let dl = DistributedLock::new("project-api-key");
/// let guard = dl.lock("my-lock").await?;
/// // ... work while holding the lock ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DistributedLock {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// `Err` holds a configuration problem found by [`DistributedLock::new`], reported by
    /// the first request (`new` itself cannot fail).
    transport: Result<Arc<Transport>, String>,
    renewer: Mutex<Option<mailbox::Commands>>,
    next_key: AtomicU64,
    unavailable_after: Duration,
    safety_margin: Option<Duration>,
    lease_clock: renewer::LeaseClock,
    /// This client's `client_id` (docs/protocol.md §3.16): the server reserves a lock to one
    /// of its waiters behind a lease it holds.
    client_id: crate::protocol::Id,
    /// Its waiters with a reservation, by the lease ahead of each.
    successors: Arc<successors::Successors>,
}

impl DistributedLock {
    /// A client for the project of `api_key`, talking to `$LEASEHOLD_URL` or, if that
    /// is unset, to `http://127.0.0.1:7878`.
    ///
    /// Never fails: a malformed `LEASEHOLD_URL` or API key is reported as
    /// [`Error::InvalidArgument`] by the first request. Use [`DistributedLock::builder`] to
    /// see such errors at once.
    pub fn new(api_key: impl Into<String>) -> DistributedLock {
        let builder = DistributedLock::builder(api_key);
        let settings = (builder.unavailable_after, builder.safety_margin);
        builder.build().unwrap_or_else(|error| DistributedLock {
            inner: Arc::new(Inner {
                transport: Err(error.to_string()),
                renewer: Mutex::new(None),
                next_key: AtomicU64::new(0),
                unavailable_after: settings.0,
                safety_margin: settings.1,
                lease_clock: renewer::LeaseClock::FromSend,
                client_id: crate::protocol::Id::fresh(),
                successors: Arc::default(),
            }),
        })
    }

    /// A builder for a client with custom endpoints or settings.
    pub fn builder(api_key: impl Into<String>) -> DistributedLockBuilder {
        DistributedLockBuilder {
            api_key: api_key.into(),
            endpoints: Vec::new(),
            connector: None,
            connect_timeout: Duration::from_secs(3),
            unavailable_after: Duration::from_secs(30),
            safety_margin: None,
            http1_only: false,
            session_stream: true,
            prefer_first_endpoint: false,
            lease_clock: renewer::LeaseClock::FromSend,
            #[cfg(feature = "tls")]
            tls: tls::TlsSettings::default(),
            error: None,
        }
    }

    /// Starts a request for the lock `name`; configure it, then `.await` it for a
    /// [`LockGuard`](crate::LockGuard). Invalid names are reported at `.await` as [`Error::InvalidArgument`].
    pub fn lock(&self, name: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), name.into())
    }

    /// Starts a request for one of `permits` permits of the semaphore `name`: up to `permits`
    /// holders at once, each with its own [`LockGuard`] (lease, renewal and fencing token),
    /// the others waiting in FIFO order. Configure and `.await` it like [`lock`](Self::lock).
    ///
    /// Everyone using the name must give the same `permits` while anyone holds or waits for
    /// it: another count fails with [`Error::Conflict`] naming the count in use. So does a
    /// name in use as a lock. `0` permits is [`Error::InvalidArgument`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// # async fn call_payment_api() {}
    /// let dl = leasehold::DistributedLock::new("project-api-key");
    /// // At most 5 workers call the payment API at once.
    /// dl.semaphore("payments-api", 5)
    ///     .with_lock(|| async { call_payment_api().await })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, name: impl Into<String>, permits: u32) -> LockRequest {
        LockRequest::semaphore(self.clone(), name.into(), permits)
    }

    /// Starts a request to read under the read-write lock `name`: readers hold it together,
    /// a writer ([`write_lock`](Self::write_lock), or [`lock`](Self::lock), which is the same)
    /// alone. Waiting is FIFO across both: a reader behind a waiting writer waits, so
    /// writers never starve, and readers that reach the front together are admitted
    /// together.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// let dl = leasehold::DistributedLock::new("project-api-key");
    /// let read = dl.read_lock("config").await?;
    /// // ... read the config; other readers may too, no writer can ...
    /// read.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn read_lock(&self, name: impl Into<String>) -> LockRequest {
        LockRequest::shared(self.clone(), name.into())
    }

    /// Starts a request to write under the read-write lock `name`: alone, with no reader and
    /// no other writer. The same exclusive lock as [`lock`](Self::lock), so existing mutex
    /// users and new readers interoperate.
    pub fn write_lock(&self, name: impl Into<String>) -> LockRequest {
        self.lock(name)
    }

    /// Takes the lock `name` with default settings, runs `f`, releases the lock and returns
    /// `f`'s value: the closure style of the original library.
    ///
    /// Same as `self.lock(name).with_lock(f)`; see [`LockRequest::with_lock`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// let dl = leasehold::DistributedLock::new("project-api-key");
    /// let v = dl.with_lock("my-lock", || async { 10 }).await?;
    /// assert_eq!(v, 10);
    /// # Ok(()) }
    /// ```
    ///
    /// The closure may take the [`Lease`](crate::Lease), to pass its fencing token on (give
    /// its parameter a type, `|lease: Lease|`, so Rust knows which shape it is):
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// # async fn write(token: u64) {}
    /// use leasehold::Lease;
    /// let dl = leasehold::DistributedLock::new("project-api-key");
    /// dl.with_lock("my-lock", |lease: Lease| async move { write(lease.fencing_token()).await })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping the future stops `f` and releases (or withdraws from) the lock.
    pub async fn with_lock<F, Args>(
        &self,
        name: impl Into<String>,
        f: F,
    ) -> Result<F::Output, Error>
    where
        F: LockFn<Args>,
    {
        self.lock(name).with_lock(f).await
    }

    /// Takes the lock `name` (default settings) if it is free, without waiting: `Ok(None)`
    /// if someone holds or waits for it. See [`LockRequest::try_lock`] to set a lease.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), leasehold::Error> {
    /// let dl = leasehold::DistributedLock::new("project-api-key");
    /// match dl.try_lock("nightly-report").await? {
    ///     Some(guard) => { /* we run it */ drop(guard) }
    ///     None => println!("another instance runs it"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// As for awaiting [`lock`](DistributedLock::lock): a grant that raced the drop is
    /// released at once.
    pub async fn try_lock(&self, name: impl Into<String>) -> Result<Option<LockGuard>, Error> {
        self.lock(name).try_lock().await
    }

    /// How many of this client's waiters know the server reserved them a lock next
    /// (docs/protocol.md §3.16): for tests that must wait until a hand-over can happen in
    /// the client.
    #[doc(hidden)]
    pub fn reserved_waiters_for_tests(&self) -> usize {
        self.inner.successors.len()
    }
}

impl Inner {
    fn usable(&self) -> Result<(), Error> {
        match &self.transport {
            Ok(_) => Ok(()),
            Err(message) => Err(Error::invalid(message.clone())),
        }
    }

    fn transport(&self) -> &Arc<Transport> {
        self.transport
            .as_ref()
            .expect("callers check usable() first")
    }

    /// The renewal task's mailbox, starting the task on the current runtime if none runs
    /// (first use, or its runtime shut down).
    fn renewer(&self) -> mailbox::Commands {
        let mut slot = self.renewer.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let tx = renewer::spawn(
                    self.transport().clone(),
                    self.lease_clock,
                    self.successors.clone(),
                );
                *slot = Some(tx.clone());
                tx
            }
        }
    }

    fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// How long before the server could expire a lease (of `lease`, or a shorter
    /// `max_hold`) the guard presumes it lost: the configured margin, by default a tenth of
    /// it up to one second; never more than half of it.
    fn margin_for(&self, lease: Duration) -> Duration {
        match self.safety_margin {
            Some(margin) => margin.min(lease / 2),
            None => (lease / 10).min(Duration::from_secs(1)),
        }
    }
}

impl fmt::Debug for DistributedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DistributedLock");
        match &self.inner.transport {
            Ok(transport) => d.field("transport", transport),
            Err(error) => d.field("error", error),
        };
        d.finish_non_exhaustive()
    }
}

/// Configures a [`DistributedLock`]. Setters take and return the builder; the first invalid
/// setting is reported by [`build`](DistributedLockBuilder::build).
#[must_use = "a builder does nothing until build() is called"]
pub struct DistributedLockBuilder {
    api_key: String,
    endpoints: Vec<String>,
    connector: Option<Arc<dyn Connect>>,
    connect_timeout: Duration,
    unavailable_after: Duration,
    safety_margin: Option<Duration>,
    http1_only: bool,
    session_stream: bool,
    prefer_first_endpoint: bool,
    lease_clock: renewer::LeaseClock,
    #[cfg(feature = "tls")]
    tls: tls::TlsSettings,
    error: Option<Error>,
}

impl DistributedLockBuilder {
    /// Trusts the certificates in `pem` (one or more PEM certificates) as roots for `https`
    /// endpoints, in addition to the built-in roots: for servers with a private CA.
    #[cfg(feature = "tls")]
    pub fn add_root_certificate(mut self, pem: impl AsRef<[u8]>) -> DistributedLockBuilder {
        match tls::parse_pem_certificates(pem.as_ref()) {
            Ok(certs) => self.tls.extra_roots.extend(certs),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// Whether Mozilla's root certificates (built into the SDK) are trusted (default
    /// `true`). Turn off to trust only [`add_root_certificate`](Self::add_root_certificate).
    #[cfg(feature = "tls")]
    pub fn tls_built_in_roots(mut self, enabled: bool) -> DistributedLockBuilder {
        self.tls.built_in_roots = enabled;
        self
    }

    /// **Dangerous**: accept any server certificate, for any name. Anyone on the network
    /// path can then impersonate the lock server and grant locks at will. Only for tests
    /// against throwaway servers; the client logs a warning when built with it.
    #[cfg(feature = "tls")]
    pub fn danger_accept_invalid_certificates(mut self) -> DistributedLockBuilder {
        self.tls.accept_invalid = true;
        self
    }
    /// The server's base URL, such as `http://locks.internal:7878`. Replaces any endpoints
    /// set before. Default: `$LEASEHOLD_URL`, else `http://127.0.0.1:7878`.
    pub fn endpoint(self, url: impl Into<String>) -> DistributedLockBuilder {
        self.endpoints([url.into()])
    }

    /// Several servers of one deployment (sharing one etcd cluster). Each client starts at
    /// one of them, picked at random so that clients spread over the servers, and moves to
    /// the next when it cannot be reached. See also
    /// [`prefer_first_endpoint`](Self::prefer_first_endpoint).
    pub fn endpoints<I, S>(mut self, urls: I) -> DistributedLockBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = urls.into_iter().map(Into::into).collect();
        if self.endpoints.is_empty() && self.error.is_none() {
            self.error = Some(Error::invalid("endpoints() was given an empty list"));
        }
        self
    }

    /// Sends everything to the first of the [`endpoints`](Self::endpoints) while it answers;
    /// the others only take over when it cannot be reached (a primary and its stand-ins).
    pub fn prefer_first_endpoint(mut self) -> DistributedLockBuilder {
        self.prefer_first_endpoint = true;
        self
    }

    /// Opens connections with `connector` instead of plain TCP, for example over a
    /// simulated network in tests.
    pub fn connector(mut self, connector: impl Connect) -> DistributedLockBuilder {
        self.connector = Some(Arc::new(connector));
        self
    }

    /// Longest time to open one connection (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> DistributedLockBuilder {
        if timeout.is_zero() && self.error.is_none() {
            self.error = Some(Error::invalid("connect_timeout must be longer than zero"));
        }
        self.connect_timeout = timeout;
        self
    }

    /// How long an acquire without `timeout` keeps retrying unreachable servers before it
    /// fails with [`Error::Unavailable`] (default 30 s). Acquires with a `timeout` give up
    /// at that timeout; renewals give up when the lease would end.
    pub fn unavailable_after(mut self, limit: Duration) -> DistributedLockBuilder {
        self.unavailable_after = limit;
        self
    }

    /// How long before the server could expire a lease the guard presumes it lost (default:
    /// a tenth of the lease, at most 1 s; never more than half the lease).
    ///
    /// The guard counts its lease from when the acquire or renewal was *sent*, which is
    /// already earlier than the server's clock starts; the margin absorbs clock-rate drift.
    /// Raise it to give the application time to stop its work after [`LockGuard::lost`]
    /// fires and before anyone else can get the lock (the `leasehold` command adds
    /// its `--kill-after` this way). A margin above half the lease is cut to half.
    ///
    /// [`LockGuard::lost`]: crate::LockGuard::lost
    pub fn safety_margin(mut self, margin: Duration) -> DistributedLockBuilder {
        self.safety_margin = Some(margin);
        self
    }

    /// Counts leases from when the server's answer arrived instead of from when the request
    /// was sent: a deliberately wrong client, so that the fault tests can show that their
    /// checks catch a loss signal that comes too late. Never use it.
    #[doc(hidden)]
    pub fn count_lease_from_answer_for_tests(mut self) -> DistributedLockBuilder {
        self.lease_clock = renewer::LeaseClock::FromAnswer;
        self
    }

    /// Speak HTTP/1.1 instead of HTTP/2, for proxies that cannot carry HTTP/2 without TLS.
    /// Each concurrent request then needs its own connection.
    pub fn http1_only(mut self) -> DistributedLockBuilder {
        self.http1_only = true;
        self
    }

    /// Whether lock operations go over one *session* per server (`true`, the default), or
    /// as one HTTP request each (`false`).
    ///
    /// A session is a connection of its own, upgraded from HTTP/1.1 (like a WebSocket),
    /// that carries acquires, renewals, releases, cancels, revocations and proclaims as
    /// small frames and their answers back (docs/protocol.md §3.15): the same operations
    /// with the same guarantees, at a fraction of a request's cost in latency and CPU.
    /// Operations go as plain requests while a session opens, and for a while wherever a
    /// server or a proxy refuses one, so turning it off is rarely needed: for a proxy that
    /// accepts the upgrade but then holds data back, say. Inspection, listing and
    /// elections' observation are always plain requests. [`http1_only`](Self::http1_only)
    /// clients use sessions too.
    pub fn session_stream(mut self, enabled: bool) -> DistributedLockBuilder {
        self.session_stream = enabled;
        self
    }

    /// Builds the client. Fails with [`Error::InvalidArgument`] on a malformed endpoint or
    /// API key, or the first invalid setting.
    pub fn build(self) -> Result<DistributedLock, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let endpoints = if self.endpoints.is_empty() {
            match std::env::var(URL_ENV) {
                Ok(urls) if !urls.trim().is_empty() => urls
                    .split(',')
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty())
                    .collect(),
                _ => vec![DEFAULT_ENDPOINT.to_owned()],
            }
        } else {
            self.endpoints
        };
        let transport = Transport::new(TransportConfig {
            endpoints,
            api_key: self.api_key,
            connector: self.connector,
            connect_timeout: self.connect_timeout,
            http1_only: self.http1_only,
            prefer_first_endpoint: self.prefer_first_endpoint,
            sessions: self.session_stream,
            #[cfg(feature = "tls")]
            tls: self.tls,
        })?;
        Ok(DistributedLock {
            inner: Arc::new(Inner {
                transport: Ok(Arc::new(transport)),
                renewer: Mutex::new(None),
                next_key: AtomicU64::new(0),
                unavailable_after: self.unavailable_after,
                safety_margin: self.safety_margin,
                lease_clock: self.lease_clock,
                client_id: crate::protocol::Id::fresh(),
                successors: Arc::default(),
            }),
        })
    }
}

impl fmt::Debug for DistributedLockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistributedLockBuilder")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("unavailable_after", &self.unavailable_after)
            .field("safety_margin", &self.safety_margin)
            .field("http1_only", &self.http1_only)
            .field("session_stream", &self.session_stream)
            .field("prefer_first_endpoint", &self.prefer_first_endpoint)
            .finish_non_exhaustive()
    }
}

/// `at + limit`, or some 136 years on where that would not fit in an `Instant`: a limit that
/// long is no limit (`Duration::MAX` included).
pub(crate) fn later(at: tokio::time::Instant, limit: Duration) -> tokio::time::Instant {
    at.checked_add(limit)
        .unwrap_or_else(|| at + Duration::from_secs(u32::MAX.into()))
}
