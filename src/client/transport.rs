//! HTTP to the lock servers: sessions for lock operations (`session.rs`), pooled HTTP
//! connections for the rest and as the fallback, retries, endpoint fail-over.

use crate::client::retry;
use crate::client::session::{self, Session};
use crate::client::stamped::StampedBody;
use crate::error::{BoxError, Error};
use crate::framing::Op;
use crate::protocol::{self, ErrorBody};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, capture_connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// Largest response body the SDK reads.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// How long past a call's deadline an answer may still arrive: a server that ends a wait at
/// the deadline answers one network trip later.
const ANSWER_GRACE: Duration = Duration::from_secs(1);
/// How long a client that has never reached a server keeps trying to open a connection
/// before it says that nothing answers at its URL. Once any server has answered, failures
/// are retried until the caller's deadline (`unavailable_after`, a timeout, a lease).
const FIRST_CONTACT: Duration = Duration::from_secs(3);
/// How long a client waits before asking a server that refused a session (one without
/// sessions, a proxy that does not pass the upgrade) for one again.
const SESSION_REFUSED_PAUSE: Duration = Duration::from_secs(60);
/// How many plain requests a client has answered before it opens a session.
const SESSION_AFTER_ANSWERS: u32 = 3;
/// Sessions a client keeps to each server. The server runs each session's operations in
/// one task, and the client reads and writes each in one task: with one session, the
/// client's and the server's work on a busy client alternate, each side idle while the
/// other works; with several, one session's frames are on the server while another's
/// answers are with the client. Measured on 2 cores, 32 tasks on distinct locks, sessions
/// taken in turn (before a lock's operations kept to one), pairs/s:
/// 1 session 58,000–61,000; 2: 75,000–85,000; 3: 85,000–101,000; 4: 80,000–95,000;
/// 6: 77,000–83,000; 8: 57,000–60,000 (smaller batches, more system calls).
const SESSIONS_PER_SERVER: usize = 4;
/// How long after a failed attempt to open a session the next one may start.
const SESSION_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A byte stream to a lock server, as returned by a custom [`Connect`].
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The future a [`Connect`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>>;

/// Opens byte streams to lock servers; plug one in with
/// [`DistributedLockBuilder::connector`](crate::DistributedLockBuilder::connector).
///
/// The default opens a TCP connection with `TCP_NODELAY`. A custom one lets tests run the SDK
/// over a simulated network (turmoil, a fault-injecting proxy) or route through a tunnel. The
/// SDK speaks HTTP over whatever stream it returns.
pub trait Connect: Send + Sync + 'static {
    /// Opens a stream to `host:port`, as named in the endpoint URL.
    fn connect(&self, host: &str, port: u16) -> ConnectFuture;
}

/// One server base URL, with its request URIs built once.
struct Endpoint {
    base: Arc<str>,
    acquire: Uri,
    renew: Uri,
    release: Uri,
    cancel: Uri,
    revoke: Uri,
    proclaim: Uri,
    session: Uri,
    /// The sessions to this server (see [`SESSIONS_PER_SERVER`]).
    session_slots: Box<[Arc<Mutex<SessionSlot>>]>,
    /// Which session the next call about no one lock (a renewal) starts looking at: such
    /// calls take turns.
    next_session: AtomicUsize,
}

/// Where the session to one server stands.
enum SessionSlot {
    /// None open; the next operation opens one (not before `retry_at`).
    Closed {
        retry_at: Option<Instant>,
    },
    /// Being opened: operations meanwhile go as plain requests.
    Opening,
    Open(Arc<Session>),
    /// The server refused one: plain requests until `until`.
    Refused {
        until: Instant,
    },
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, Error> {
        let base = url.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .map_err(|e| Error::invalid(format!("endpoint {url:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if cfg!(feature = "tls") => {}
            Some("https") => {
                return Err(Error::invalid(format!(
                    "endpoint {url:?}: https needs the crate's `tls` feature"
                )));
            }
            _ => {
                return Err(Error::invalid(format!(
                    "endpoint {url:?} must start with http:// or https://"
                )));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(Error::invalid(format!("endpoint {url:?} has no host")));
        }
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(Error::invalid(format!(
                "endpoint {url:?} must be a base URL without path or query"
            )));
        }
        let join = |path: &str| -> Uri {
            format!("{base}{path}")
                .parse()
                .expect("a valid base URL joined with a fixed path is a valid URL")
        };
        Ok(Endpoint {
            acquire: join(protocol::PATH_ACQUIRE),
            renew: join(protocol::PATH_RENEW),
            release: join(protocol::PATH_RELEASE),
            cancel: join(protocol::PATH_CANCEL),
            revoke: join(protocol::PATH_REVOKE),
            proclaim: join(protocol::PATH_PROCLAIM),
            session: join(protocol::PATH_SESSION),
            session_slots: (0..SESSIONS_PER_SERVER)
                .map(|_| Arc::new(Mutex::new(SessionSlot::Closed { retry_at: None })))
                .collect(),
            next_session: AtomicUsize::new(0),
            base: base.into(),
        })
    }

    fn uri(&self, route: Route) -> Uri {
        match route {
            Route::Acquire => self.acquire.clone(),
            Route::Renew => self.renew.clone(),
            Route::Release => self.release.clone(),
            Route::Cancel => self.cancel.clone(),
            Route::Revoke => self.revoke.clone(),
            Route::Proclaim => self.proclaim.clone(),
        }
    }
}

/// What to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Acquire,
    Renew,
    Release,
    Cancel,
    Revoke,
    Proclaim,
}

impl Route {
    /// The pool (and so the connection and session) the route's calls use.
    fn pool(self) -> Pool {
        match self {
            Route::Acquire | Route::Revoke => Pool::Acquires,
            // A proclaim is lease upkeep too: it must not queue behind long polls.
            Route::Renew | Route::Release | Route::Cancel | Route::Proclaim => Pool::Leases,
        }
    }

    /// The session frame's op that stands for the route.
    fn op(self) -> Op {
        match self {
            Route::Acquire => Op::Acquire,
            Route::Renew => Op::Renew,
            Route::Release => Op::Release,
            Route::Cancel => Op::Cancel,
            Route::Revoke => Op::Revoke,
            Route::Proclaim => Op::Proclaim,
        }
    }
}

/// The two connection pools (of plain requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// Acquires (long polls), revocations and inspections.
    Acquires,
    /// Renewals, releases, cancels and proclaims.
    Leases,
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempts {
    /// Stop retrying (answer `Unavailable`) after this instant.
    pub deadline: Instant,
    /// Longest wait for one answer.
    pub per_attempt: Duration,
    /// Whether a client that has never reached any server gives up after [`FIRST_CONTACT`]
    /// while nothing accepts its connections: for calls bounded only by
    /// `unavailable_after`, not for a caller's own timeout (it said how long to wait).
    pub first_contact: bool,
}

/// A server's answer that the caller interprets.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub endpoint: Arc<str>,
    /// Attempts made; above 1, an earlier attempt may have been processed unanswered.
    pub attempts: u32,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<Duration>,
    /// When the attempt that got this answer left the client: when the connection first
    /// read its body (see `stamped.rs`). Earlier attempts may have reached the server too,
    /// but a repeat resets what they set (a renewal's deadline, a grant's lease), so leases
    /// are counted from this one.
    pub sent: Instant,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|source| Error::Decode {
            endpoint: self.endpoint.to_string(),
            status: self.status.as_u16(),
            source,
        })
    }

    /// Maps an answer no caller handles specially to an error.
    pub fn into_error(self) -> Error {
        let (message, code, source) = match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(body) => (body.message, body.error, None),
            Err(e) => (
                String::from_utf8_lossy(&self.body).into_owned(),
                String::new(),
                Some(Box::new(e) as BoxError),
            ),
        };
        match self.status {
            StatusCode::CONFLICT if code == protocol::codes::CONFLICT => {
                Error::Conflict { message }
            }
            StatusCode::UNAUTHORIZED => Error::Unauthorized {
                endpoint: self.endpoint.to_string(),
            },
            StatusCode::BAD_REQUEST => Error::InvalidArgument { message },
            StatusCode::FORBIDDEN => Error::Forbidden {
                endpoint: self.endpoint.to_string(),
                message,
            },
            StatusCode::TOO_MANY_REQUESTS => Error::LimitReached {
                endpoint: self.endpoint.to_string(),
                message,
                retry_after: self.retry_after,
            },
            status => Error::Server {
                endpoint: self.endpoint.to_string(),
                status: status.as_u16(),
                message,
                source,
            },
        }
    }
}

/// Settings the builder hands over.
pub(crate) struct TransportConfig {
    pub endpoints: Vec<String>,
    pub api_key: String,
    pub connector: Option<Arc<dyn Connect>>,
    pub connect_timeout: Duration,
    pub http1_only: bool,
    pub prefer_first_endpoint: bool,
    /// Carry lock operations over sessions.
    pub sessions: bool,
    #[cfg(feature = "tls")]
    pub tls: crate::client::tls::TlsSettings,
}

/// The shared HTTP machinery of one client and its clones.
pub(crate) struct Transport {
    endpoints: Box<[Endpoint]>,
    /// Index of the endpoint in use; moves on when it fails.
    current: AtomicUsize,
    /// Acquires (long polls) and inspections.
    acquires: Client<Connector, StampedBody>,
    /// Renewals, releases and cancels, on a connection of their own: a server limits the
    /// streams of one connection (2,048 by default), and thousands of waiting acquires
    /// would otherwise hold them all while the leases they already hold run out.
    leases: Client<Connector, StampedBody>,
    /// Whether lock operations go over sessions.
    sessions: bool,
    /// Opens sessions' connections: TLS with ALPN `http/1.1`, since a session is an
    /// upgraded HTTP/1.1 connection.
    session_connector: Connector,
    connect_timeout: Duration,
    auth: HeaderValue,
    /// Whether any server has answered yet (see [`FIRST_CONTACT`]).
    reached: AtomicBool,
    /// Plain requests answered so far (up to [`SESSION_AFTER_ANSWERS`]).
    plain_answers: AtomicU32,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoints: Vec<&str> = self.endpoints.iter().map(|e| &*e.base).collect();
        f.debug_struct("Transport")
            .field("endpoints", &endpoints)
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub fn new(config: TransportConfig) -> Result<Transport, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::invalid("no endpoint given"));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint::parse(e))
            .collect::<Result<Box<[_]>, _>>()?;
        let mut auth = HeaderValue::try_from(format!("Bearer {}", config.api_key))
            .map_err(|_| Error::invalid("the API key contains characters not allowed in HTTP"))?;
        auth.set_sensitive(true);
        if config.api_key.is_empty() {
            return Err(Error::invalid("the API key is empty"));
        }
        #[cfg(feature = "tls")]
        let tls = |http1_only: bool| -> Result<_, Error> {
            if !config.endpoints.iter().any(|e| e.starts_with("https:")) {
                return Ok(None);
            }
            let client_config = crate::client::tls::client_config(&config.tls, http1_only)?;
            Ok(Some(tokio_rustls::TlsConnector::from(client_config)))
        };
        let connector = Connector {
            custom: config.connector.clone(),
            connect_timeout: config.connect_timeout,
            #[cfg(feature = "tls")]
            tls: tls(config.http1_only)?,
        };
        let session_connector = Connector {
            custom: config.connector,
            connect_timeout: config.connect_timeout,
            #[cfg(feature = "tls")]
            tls: tls(true)?,
        };
        let pool = || {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                // HTTP/2 with prior knowledge: every request of a pool, waiting acquires
                // included, shares one connection per server.
                .http2_only(!config.http1_only)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .http2_keep_alive_timeout(Duration::from_secs(5))
                .http2_initial_max_send_streams(1024)
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector.clone())
        };
        Ok(Transport {
            endpoints,
            // Clients start at different endpoints, so that load spreads over the servers.
            current: AtomicUsize::new(if config.prefer_first_endpoint {
                0
            } else {
                usize::from(crate::id::Id::random().0[0])
            }),
            acquires: pool(),
            leases: pool(),
            sessions: config.sessions,
            session_connector,
            connect_timeout: config.connect_timeout,
            auth,
            reached: AtomicBool::new(false),
            plain_answers: AtomicU32::new(0),
        })
    }

    /// How many servers this client may use.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// POSTs `body` to `route`, retrying transport faults and 502/503/504 with backoff and
    /// moving to the next endpoint after each failure, until `attempts.deadline`. `lock`:
    /// the lock the call is about, if it is about one (it picks the session).
    pub async fn post(
        &self,
        route: Route,
        lock: Option<&str>,
        body: Bytes,
        attempts: Attempts,
    ) -> Result<Reply, Error> {
        self.send(
            Some((route, lock)),
            Method::POST,
            |e| Ok(e.uri(route)),
            || body.clone(),
            attempts,
        )
        .await
    }

    fn client(&self, pool: Pool) -> &Client<Connector, StampedBody> {
        match pool {
            Pool::Acquires => &self.acquires,
            Pool::Leases => &self.leases,
        }
    }

    /// [`Transport::post`] with a body made afresh for each attempt (an acquire's remaining
    /// wait shrinks between attempts).
    pub async fn post_each(
        &self,
        route: Route,
        lock: Option<&str>,
        body: impl Fn() -> Bytes,
        attempts: Attempts,
    ) -> Result<Reply, Error> {
        self.send(
            Some((route, lock)),
            Method::POST,
            |e| Ok(e.uri(route)),
            body,
            attempts,
        )
        .await
    }

    /// GETs `path` (already percent-encoded), with the same retry policy as [`Transport::post`].
    pub async fn get(&self, path: &str, attempts: Attempts) -> Result<Reply, Error> {
        let uri = |e: &Endpoint| {
            format!("{}{path}", e.base)
                .parse::<Uri>()
                .map_err(|err| Error::invalid(format!("bad path {path:?}: {err}")))
        };
        self.send(None, Method::GET, uri, Bytes::new, attempts)
            .await
    }

    /// `call`: the POST route called and the lock it is about, `None` for a GET (on the
    /// acquires' pool).
    async fn send(
        &self,
        call: Option<(Route, Option<&str>)>,
        method: Method,
        uri: impl Fn(&Endpoint) -> Result<Uri, Error>,
        body: impl Fn() -> Bytes,
        attempts: Attempts,
    ) -> Result<Reply, Error> {
        let mut delays = retry::delays();
        let mut attempt = 0;
        // A client that never reached any server gives up early while nothing even accepts
        // its connections: most likely no server runs at that URL at all.
        let first_contact_by = Instant::now() + FIRST_CONTACT;
        loop {
            attempt += 1;
            let index = self.current.load(Ordering::Relaxed);
            let endpoint = &self.endpoints[index % self.endpoints.len()];
            let started = Instant::now();
            let answer_by = (attempts.deadline + ANSWER_GRACE).saturating_duration_since(started);
            let timeout = attempts.per_attempt.min(answer_by);
            let route = call.map(|(route, _)| route);
            let session =
                call.and_then(|(route, lock)| Some((route, self.session(endpoint, lock)?)));
            let plain = session.is_none();
            let outcome = match session {
                Some((route, session)) => {
                    self.session_attempt(endpoint, route, &session, &body(), timeout)
                        .await
                }
                None => {
                    let pool = self.client(route.map_or(Pool::Acquires, Route::pool));
                    self.attempt(pool, method.clone(), uri(endpoint)?, body(), timeout)
                        .await
                }
            };
            let failure = match outcome {
                Ok(answer) if !retryable(answer.status) => {
                    self.reached.store(true, Ordering::Relaxed);
                    if plain && self.plain_answers.load(Ordering::Relaxed) < SESSION_AFTER_ANSWERS {
                        self.plain_answers.fetch_add(1, Ordering::Relaxed);
                    }
                    // A body never read (an answer before the request was written) counts
                    // from the attempt's start: earlier, so still safe.
                    let sent = answer.left.unwrap_or(started);
                    // How long the request waited inside the client (for a stream or a
                    // connection, or for the runtime) before it left.
                    let queued = sent.saturating_duration_since(started);
                    tracing::debug!(
                        endpoint = %endpoint.base,
                        status = answer.status.as_u16(),
                        queued_us = queued.as_micros() as u64,
                        "lock server answered"
                    );
                    return Ok(Reply {
                        status: answer.status,
                        body: answer.body,
                        endpoint: endpoint.base.clone(),
                        attempts: attempt,
                        retry_after: answer.retry_after,
                        sent,
                    });
                }
                Ok(answer) => {
                    self.reached.store(true, Ordering::Relaxed);
                    Failure {
                        reason: format!("answered {}", answer.status),
                        source: None,
                        connect: false,
                    }
                }
                Err(Failed::Tls { message, source }) => {
                    return Err(Error::Tls {
                        endpoint: endpoint.base.to_string(),
                        message,
                        source: Some(source),
                    });
                }
                Err(Failed::Retry(failure)) => failure,
            };
            tracing::debug!(endpoint = %endpoint.base, failure = %failure.reason, "lock server request failed");
            // Move on from the failed endpoint unless another caller already did.
            let _ = self.current.compare_exchange(
                index,
                index.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let delay = delays.next().unwrap_or(Duration::from_millis(500));
            let now = Instant::now();
            let never_reached = !self.reached.load(Ordering::Relaxed) && failure.connect;
            let give_up_early =
                attempts.first_contact && never_reached && now + delay >= first_contact_by;
            if now + delay >= attempts.deadline || give_up_early {
                let reason = if never_reached {
                    format!(
                        "nothing answers there ({}); start a server with `leasehold-server` \
                         (or run `cargo run --example quickstart` for a local one), or set \
                         {} to where one runs",
                        failure.reason,
                        crate::client::URL_ENV
                    )
                } else {
                    failure.reason
                };
                return Err(Error::Unavailable {
                    endpoint: endpoint.base.to_string(),
                    reason,
                    source: failure.source,
                });
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// The open session to `endpoint`, if there is one; else starts opening one (unless one
    /// is being opened, or the server refused one lately) and answers `None`, so that this
    /// call goes as a plain request.
    ///
    /// Calls about one lock go over one session (while it is open): a release and the
    /// acquires it grants are then read, run and answered by one task on the server, and
    /// the grant leaves in the same write as the release's answer.
    fn session(&self, endpoint: &Endpoint, lock: Option<&str>) -> Option<Arc<Session>> {
        // Only for a client that keeps talking: not before servers have answered a few of
        // its plain requests. A client that has yet to reach a server would open two
        // connections where one fails as well; one that takes a lock once and goes (a cron
        // job, the CLI) gains nothing from a session; and a crowd of new clients (a fleet
        // starting, a server back from a restart) would open twice the connections at once.
        if !self.sessions || self.plain_answers.load(Ordering::Relaxed) < SESSION_AFTER_ANSWERS {
            return None;
        }
        // A lock's calls go to its own session; calls about no one lock (renewals) to any
        // open one. So a client opens only as many sessions as it uses locks, up to
        // `SESSIONS_PER_SERVER`; while its lock's session opens, a call takes another.
        let slots = &endpoint.session_slots;
        let open = |k: usize| match &*slots[k % slots.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            SessionSlot::Open(session) if !session.is_ended() => Some(session.clone()),
            _ => None,
        };
        match lock {
            Some(name) => {
                use std::hash::{BuildHasher, BuildHasherDefault};
                let own = BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(name)
                    as usize
                    % slots.len();
                self.session_in(endpoint, &slots[own])
                    .or_else(|| (1..slots.len()).find_map(|k| open(own + k)))
            }
            None => {
                let first = endpoint.next_session.fetch_add(1, Ordering::Relaxed);
                (0..slots.len())
                    .find_map(|k| open(first + k))
                    .or_else(|| self.session_in(endpoint, &slots[0]))
            }
        }
    }

    /// The session open in `slot`, if one is; else starts opening one there (unless one is
    /// being opened, or the server refused one lately).
    fn session_in(
        &self,
        endpoint: &Endpoint,
        slot: &Arc<Mutex<SessionSlot>>,
    ) -> Option<Arc<Session>> {
        let now = Instant::now();
        {
            let mut state = slot.lock().unwrap_or_else(|p| p.into_inner());
            match &*state {
                SessionSlot::Open(open) if !open.is_ended() => return Some(open.clone()),
                SessionSlot::Opening => return None,
                SessionSlot::Refused { until } if now < *until => return None,
                SessionSlot::Closed { retry_at: Some(at) } if now < *at => return None,
                _ => {}
            }
            *state = SessionSlot::Opening;
        }
        tokio::spawn(open_session(
            self.session_connector.clone(),
            endpoint.session.clone(),
            self.auth.clone(),
            slot.clone(),
            self.connect_timeout + ANSWER_GRACE,
        ));
        None
    }

    /// One operation over a session, answered as a plain request would be.
    async fn session_attempt(
        &self,
        endpoint: &Endpoint,
        route: Route,
        open: &Arc<Session>,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Answer, Failed> {
        match tokio::time::timeout(timeout, open.call(route.op(), body)).await {
            Ok(Ok(answer)) => {
                let status = StatusCode::from_u16(answer.status).map_err(|_| {
                    Failed::retry(format!("answered status {}", answer.status), None)
                })?;
                Ok(Answer {
                    status,
                    body: answer.body,
                    retry_after: (answer.retry_after > 0)
                        .then(|| Duration::from_secs(u64::from(answer.retry_after))),
                    left: answer.left,
                })
            }
            Ok(Err(session::Unanswered::Ended)) => Err(Failed::retry(
                "the session stream ended before the answer".into(),
                None,
            )),
            Err(_) => {
                // As for a plain request: the connection may be dead without knowing it.
                // The next attempt opens a fresh session; this one closes once its last
                // operation lets go of it.
                for slot in &endpoint.session_slots {
                    let mut state = slot.lock().unwrap_or_else(|p| p.into_inner());
                    if matches!(&*state, SessionSlot::Open(current) if Arc::ptr_eq(current, open)) {
                        *state = SessionSlot::Closed { retry_at: None };
                    }
                }
                Err(Failed::retry(
                    format!("no answer within {}", crate::error::round(timeout)),
                    None,
                ))
            }
        }
    }

    async fn attempt(
        &self,
        pool: &Client<Connector, StampedBody>,
        method: Method,
        uri: Uri,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, Failed> {
        let (body, left) = StampedBody::new(body);
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| Failed::retry(e.to_string(), Some(Box::new(e))))?;
        let connection = capture_connection(&mut request);
        let exchange = async {
            let response = pool.request(request).await.map_err(describe)?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| Failed::retry(format!("reading the answer failed: {e}"), Some(e)))?
                .to_bytes();
            Ok(Answer {
                status,
                body,
                retry_after,
                left: left.get().copied(),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be dead without knowing it (a blackholed peer): make
                // the next attempt open a fresh one.
                if let Some(connected) = connection.connection_metadata().as_ref() {
                    connected.poison();
                }
                Err(Failed::retry(
                    format!("no answer within {}", crate::error::round(timeout)),
                    None,
                ))
            }
        }
    }
}

/// Opens a session to the server at `uri` on a connection of its own, and records the
/// outcome in `slot`.
async fn open_session(
    connector: Connector,
    uri: Uri,
    auth: HeaderValue,
    slot: Arc<Mutex<SessionSlot>>,
    timeout: Duration,
) {
    let opened = tokio::time::timeout(timeout, upgrade(connector, uri, auth)).await;
    let now = Instant::now();
    let next = match opened {
        Ok(Ok(session)) => {
            tracing::debug!("session open");
            SessionSlot::Open(Arc::new(session))
        }
        Ok(Err(Some(status))) => {
            // A server without sessions (404), or one that will not upgrade: plain requests
            // work as before.
            tracing::debug!(status = status.as_u16(), "session refused");
            if retryable(status) || status == StatusCode::TOO_MANY_REQUESTS {
                SessionSlot::Closed {
                    retry_at: Some(now + SESSION_RETRY_PAUSE),
                }
            } else {
                SessionSlot::Refused {
                    until: now + SESSION_REFUSED_PAUSE,
                }
            }
        }
        Ok(Err(None)) | Err(_) => SessionSlot::Closed {
            retry_at: Some(now + SESSION_RETRY_PAUSE),
        },
    };
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = next;
}

/// Connects, and asks the server to upgrade the connection to a session. `Err(Some(status))`:
/// the server answered `status` instead; `Err(None)`: the connection failed.
async fn upgrade(
    mut connector: Connector,
    uri: Uri,
    auth: HeaderValue,
) -> Result<Session, Option<StatusCode>> {
    use tower_service::Service;
    let conn = connector.call(uri.clone()).await.map_err(|e| {
        tracing::debug!(error = %e, "session connection failed");
        None
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(conn)
        .await
        .map_err(|_| None)?;
    tokio::spawn(connection.with_upgrades());
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri.path())
        .header(header::HOST, host)
        .header(header::AUTHORIZATION, auth)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, protocol::SESSION_PROTOCOL)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|_| None)?;
    let response = sender.send_request(request).await.map_err(|_| None)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(Some(response.status()));
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(|_| None)?;
    Ok(Session::start(TokioIo::new(upgraded), MAX_RESPONSE_BYTES))
}

/// One HTTP answer.
struct Answer {
    status: StatusCode,
    body: Bytes,
    retry_after: Option<Duration>,
    /// When the request's body was first read: when it left the client.
    left: Option<Instant>,
}

fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Why an attempt failed.
pub(crate) enum Failed {
    /// Worth another attempt (transport fault, no answer).
    Retry(Failure),
    /// The TLS handshake failed: retrying will not help.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls { message: String, source: BoxError },
}

/// A failure worth another attempt.
pub(crate) struct Failure {
    /// What went wrong, in a few words.
    reason: String,
    /// The underlying error, kept for [`Error::Unavailable`]'s `source()`.
    source: Option<BoxError>,
    /// No connection could be opened (refused, unreachable, timed out): nothing answered.
    connect: bool,
}

impl Failed {
    fn retry(reason: String, source: Option<BoxError>) -> Failed {
        Failed::Retry(Failure {
            reason,
            source,
            connect: false,
        })
    }
}

/// A hyper error as a failure: its innermost cause says what happened (hyper's own text
/// says only "client error (Connect)"); the whole chain stays reachable through `source`.
fn describe(error: hyper_util::client::legacy::Error) -> Failed {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        #[cfg(feature = "tls")]
        if let Some(tls) = cause
            .downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .and_then(|e| e.downcast_ref::<crate::client::tls::TlsFailure>())
        {
            return Failed::Tls {
                message: tls.0.clone(),
                source: Box::new(error),
            };
        }
        reason = cause.to_string();
        source = cause.source();
    }
    Failed::Retry(Failure {
        reason,
        connect: error.is_connect(),
        source: Some(Box::new(error)),
    })
}

/// Opens connections: the custom [`Connect`] if one was given, else TCP with `TCP_NODELAY`.
#[derive(Clone)]
pub(crate) struct Connector {
    custom: Option<Arc<dyn Connect>>,
    connect_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsConnector>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL without host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let connect = async {
                match &this.custom {
                    Some(custom) => custom.connect(&host, port).await,
                    None => {
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        // Without it every small HTTP/2 frame waits on Nagle's algorithm
                        // (about 40 ms per request, measured).
                        tcp.set_nodelay(true)?;
                        Ok(Box::new(tcp) as Box<dyn Io>)
                    }
                }
            };
            let connect = async {
                let io = connect.await?;
                if !https {
                    return Ok(io);
                }
                #[cfg(feature = "tls")]
                if let Some(tls) = &this.tls {
                    let name = crate::client::tls::server_name(&host)?;
                    let stream = tls.connect(name, io).await.map_err(|e| {
                        io::Error::other(crate::client::tls::TlsFailure(e.to_string()))
                    })?;
                    return Ok(Box::new(stream) as Box<dyn Io>);
                }
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "https without TLS support",
                ))
            };
            let io = tokio::time::timeout(this.connect_timeout, connect)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", this.connect_timeout),
                    )
                })??;
            Ok(Conn(TokioIo::new(io)))
        })
    }
}

/// A connection as hyper sees it.
pub(crate) struct Conn(TokioIo<Box<dyn Io>>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
