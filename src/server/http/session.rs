//! The server's end of a session (docs/protocol.md §3.15): an HTTP/1.1 connection upgraded
//! to a stream of framed lock operations, answered with frames on the same connection.
//!
//! Each frame runs exactly what a plain request to its route runs (`App::operate`), with the
//! same authentication (checked again per frame, so that a removed key stops working at
//! once), rate limits, acquire cap, metrics and pause: a session changes what an operation
//! costs and nothing else. One task owns the connection: it reads frames, runs their
//! operations concurrently as futures of its own, and writes their answers, so that an
//! operation costs no task switch on the server and answers ready together leave in one
//! write.

use super::{App, Failure, Reply, Route, bad};
use crate::framing::{self, OP_HEADER, Op};
use crate::protocol::{self, codes};
use crate::server::auth::Caller;
use bytes::{Bytes, BytesMut};
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most operations of one session in flight; the server reads no further frames until one
/// ends (an SDK client keeps within it, so it never waits on this).
pub(crate) const MAX_OPS_IN_FLIGHT: usize = crate::client::session::MAX_IN_FLIGHT;
/// Answer bytes waiting for a client before the session stops reading and running more.
const MAX_BACKLOG: usize = 256 << 10;
/// A session whose client takes none of its answers for this long is ended: a client that
/// stops reading cannot pin what is queued for it.
const STALL: Duration = Duration::from_secs(10);
/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 16 << 10;

/// Where the connection learns that a request upgraded it to a session, so that it stays
/// counted (and its client's connection caps with it) until the session ends. The
/// connection puts one in each request's extensions.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpgradeSlot(Arc<Mutex<Option<JoinHandle<()>>>>);

impl UpgradeSlot {
    /// The session the connection was upgraded to, if it was.
    pub fn take(&self) -> Option<JoinHandle<()>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl App {
    /// `GET /v1/session` with `Upgrade: leasehold-session/1`: checks the request like any
    /// other, answers `101 Switching Protocols`, and serves the connection as a session
    /// from then on.
    pub(super) async fn open_session(
        self: Arc<Self>,
        mut request: Request<Incoming>,
    ) -> Result<Reply, Failure> {
        if request.method() != Route::Session.method() {
            return Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::METHOD_NOT_ALLOWED,
                format!("use {}", Route::Session.method()),
            ));
        }
        let caller = self.caller(request.headers())?;
        self.rate_limit(&caller)?;
        let asks_upgrade = request.version() == Version::HTTP_11
            && request
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case(protocol::SESSION_PROTOCOL));
        let slot = request.extensions().get::<UpgradeSlot>().cloned();
        let Some(slot) = slot.filter(|_| asks_upgrade) else {
            return Err(Failure::new(
                StatusCode::UPGRADE_REQUIRED,
                codes::INVALID_ARGUMENT,
                format!(
                    "a session is an HTTP/1.1 connection upgraded with `Connection: upgrade` and \
                     `Upgrade: {}`",
                    protocol::SESSION_PROTOCOL
                ),
            ));
        };
        if *self.stopping.borrow() {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        // Only the credentials are kept: frames are authenticated with them (see
        // `CallerCache`).
        let mut credentials = HeaderMap::new();
        if let Some(value) = request.headers().get(header::AUTHORIZATION) {
            credentials.insert(header::AUTHORIZATION, value.clone());
        }
        let upgraded = hyper::upgrade::on(&mut request);
        let project = caller.project.id;
        let app = self.clone();
        let session = tokio::spawn(async move {
            match upgraded.await {
                Ok(io) => {
                    app.serve_session(credentials, TokioIo::new(io), project)
                        .await
                }
                Err(e) => tracing::debug!(error = %e, "session upgrade failed"),
            }
        });
        *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
        let mut reply = Response::new(Full::default());
        *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = reply.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(
            header::UPGRADE,
            HeaderValue::from_static(protocol::SESSION_PROTOCOL),
        );
        Ok(reply)
    }

    /// Reads operation frames and runs them until the client closes the connection, the
    /// session idles out, or the server stops; then closes the connection.
    async fn serve_session(
        self: Arc<Self>,
        credentials: HeaderMap,
        io: impl AsyncRead + AsyncWrite + Send,
        project: crate::server::store::ProjectId,
    ) {
        let _open = Counted::open(&self.metrics.sessions_open);
        let (mut reader, mut writer) = tokio::io::split(io);
        let max_frame = OP_HEADER + self.limits.max_body_bytes;
        let mut running = FuturesUnordered::new();
        let mut callers = CallerCache::default();
        let mut abort: HashMap<u64, AbortHandle> = HashMap::new();
        // At most one frame still arriving: whole frames are taken out as soon as they are
        // in. Its bytes are held against the body budget, as a plain request's body is.
        let mut buf = BytesMut::new();
        let mut reservation = self.body_budget.reserve(project);
        let mut reserved = false;
        let mut out = BytesMut::new();
        let mut stopping = self.stopping.clone();
        let mut reading = !*stopping.borrow();
        // A session with nothing in flight ends after the connections' idle time, so that
        // an idle client's connection closes as it would without a session.
        let mut last_active = Instant::now();
        let mut last_written = Instant::now();
        // Since when part of a frame has waited for the rest: like a plain request's body,
        // it must be complete within the body read timeout.
        let mut partial_since: Option<Instant> = None;
        let mut flood_began: Option<Instant> = None;
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let flooded = out.len() > MAX_BACKLOG;
            // The stall clock runs from the later of the flood's start and the last write.
            let flooded_since = if flooded {
                *flood_began.get_or_insert_with(Instant::now)
            } else {
                flood_began = None;
                last_written
            };
            let read = reading && !flooded && running.len() < MAX_OPS_IN_FLIGHT;
            // Biased: read what has come and collect every answer that is ready before
            // writing, so that answers ready together leave in one write.
            tokio::select! {
                biased;
                done = running.next(), if !running.is_empty() && !flooded => {
                    if let Some((id, answer)) = done {
                        abort.remove(&id);
                        last_active = Instant::now();
                        if let Some(reply) = answer {
                            put_answer(&mut out, id, reply);
                        }
                    }
                }
                got = reader.read_buf(&mut buf), if read => {
                    match got {
                        Ok(n) if n > 0 => {}
                        // The client closed the session, or its connection failed: what it
                        // had in flight goes, as with reset streams.
                        _ => break,
                    }
                    last_active = Instant::now();
                    loop {
                        match framing::next_frame(&mut buf, OP_HEADER, max_frame) {
                            Ok(Some(frame)) => {
                                let frame = framing::op_frame(frame);
                                let caller = callers.get(&self, &credentials);
                                self.dispatch(caller, frame, &mut running, &mut abort, &mut out);
                            }
                            Ok(None) => break,
                            Err(length) => {
                                // Framing is lost past a bad length: nothing after it can be
                                // read as frames.
                                tracing::debug!(length, "malformed session frame: closing the session");
                                reading = false;
                                running.clear();
                                break;
                            }
                        }
                    }
                    if buf.is_empty() {
                        partial_since = None;
                        if reserved {
                            reservation = self.body_budget.reserve(project);
                            reserved = false;
                        }
                    } else if let Err(exhausted) = reservation.grow_to(buf.len()) {
                        tracing::debug!(?exhausted, "a session frame does not fit the body budget: closing the session");
                        break;
                    } else {
                        reserved = true;
                        partial_since.get_or_insert(last_active);
                    }
                }
                written = writer.write_buf(&mut out), if !out.is_empty() => {
                    match written {
                        Ok(n) if n > 0 => {
                            last_written = Instant::now();
                            // TLS keeps what it was given until flushed.
                            if out.is_empty() && writer.flush().await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
                _ = tokio::time::sleep_until(
                    partial_since.unwrap_or(last_active) + self.limits.body_read_timeout
                ), if partial_since.is_some() => {
                    tracing::debug!("a session frame did not arrive in time: closing the session");
                    break;
                }
                _ = tokio::time::sleep_until(flooded_since.max(last_written) + STALL), if flooded => {
                    tracing::debug!("the client took no session answers: closing the session");
                    break;
                }
                _ = crate::server::stopped(&mut stopping), if reading => {
                    // Finish what is in flight (waiting acquires answer 503 now) and read
                    // nothing more: the client sends the rest elsewhere.
                    reading = false;
                }
                _ = tokio::time::sleep_until(last_active + self.session_idle), if running.is_empty() && out.is_empty() => {
                    break;
                }
            }
            if !reading && running.is_empty() && out.is_empty() {
                break;
            }
        }
        // Bounded: a client that reads nothing must not keep the task (TLS sends a record).
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    }

    /// Starts one operation frame (or ends one, for an abandon).
    fn dispatch(
        self: &Arc<Self>,
        caller: Result<Caller, Failure>,
        frame: framing::OpFrame,
        running: &mut FuturesUnordered<OpFuture>,
        abort: &mut HashMap<u64, AbortHandle>,
        out: &mut BytesMut,
    ) {
        let id = frame.id;
        let route = match frame.op {
            Some(Op::Abandon) => {
                if let Some(handle) = abort.remove(&id) {
                    handle.abort();
                }
                return;
            }
            Some(op) => route_of(op),
            None => {
                let failure = bad("unknown operation in a session frame");
                put_answer(out, id, failure.into_reply(Route::Session));
                return;
            }
        };
        if abort.contains_key(&id) {
            let failure = bad(format!(
                "operation id {id} is already in flight in this session"
            ));
            put_answer(out, id, failure.into_reply(route));
            return;
        }
        let (handle, registration) = AbortHandle::new_pair();
        abort.insert(id, handle);
        let op = Abortable::new(
            self.clone().session_op(caller, route, frame.body),
            registration,
        );
        running.push(Box::pin(op.map(move |answer| (id, answer.ok()))));
    }

    /// One operation, as a plain request to `route` runs it.
    async fn session_op(
        self: Arc<Self>,
        caller: Result<Caller, Failure>,
        route: Route,
        body: Bytes,
    ) -> Reply {
        let started = Instant::now();
        self.metrics.session_operations.inc();
        self.unpaused().await;
        let reply = async {
            let caller = caller?;
            if route.rate_limited() {
                self.rate_limit(&caller)?;
            }
            let _in_flight = self.enter(route, &caller)?;
            self.operate(&caller, route, &body).await
        }
        .await
        .unwrap_or_else(|failure| failure.into_reply(route));
        self.unpaused().await;
        self.count(route, reply.status(), started);
        reply
    }
}

/// The session's caller, resolved from its credentials once per generation of the keys in
/// use: as good as authenticating every frame (a removed key stops working at the next
/// reload), without hashing the key for each.
#[derive(Default)]
struct CallerCache {
    resolved: Option<(u64, Caller)>,
}

impl CallerCache {
    fn get(&mut self, app: &App, credentials: &HeaderMap) -> Result<Caller, Failure> {
        let generation = app.auth.generation();
        if let Some((at, caller)) = &self.resolved
            && *at == generation
        {
            return Ok(caller.clone());
        }
        self.resolved = None;
        let caller = app.caller(credentials)?;
        self.resolved = Some((generation, caller.clone()));
        Ok(caller)
    }
}

/// A running operation: its id and its answer (`None` once abandoned).
type OpFuture = Pin<Box<dyn std::future::Future<Output = (u64, Option<Reply>)> + Send>>;

fn route_of(op: Op) -> Route {
    match op {
        Op::Acquire => Route::Acquire,
        Op::Renew => Route::Renew,
        Op::Release => Route::Release,
        Op::Cancel => Route::Cancel,
        Op::Revoke => Route::Revoke,
        Op::Proclaim => Route::Proclaim,
        Op::Abandon => Route::Session,
    }
}

/// Appends `reply` as the answer frame of operation `id`.
fn put_answer(out: &mut BytesMut, id: u64, reply: Reply) {
    let status = reply.status().as_u16();
    let retry_after = reply
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    // A full body is all there at once, in one frame: polling it never waits.
    let mut body = reply.into_body();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let body = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    };
    framing::put_answer(out, id, status, retry_after, &body);
}

/// Counts one open session in the gauge until dropped.
struct Counted<'a>(&'a Gauge);

impl<'a> Counted<'a> {
    fn open(gauge: &'a Gauge) -> Counted<'a> {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
