//! Accepting and serving connections, within limits: a connection cap, overall and per
//! source address, a deadline for the first request counted from accept (TLS handshake and
//! protocol detection included), header size and count, a write timeout for clients that
//! do not read their responses, an idle timeout, a deadline for connections asked to close,
//! and a graceful drain on shutdown.

use crate::client::transport::Io;
use crate::server::http::{App, UpgradeSlot};
use crate::server::log_limit::LogLimit;
use crate::server::stopped;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

/// Most concurrent HTTP/2 streams (requests) per connection. The SDK keeps at most about
/// 1,024 waiting acquires on one connection (`http2_initial_max_send_streams(1024)`); twice
/// that leaves as many streams again for its renewals, releases and cancels, so that a
/// client with a full queue of waiters still renews on time. A client beyond the limit
/// waits for a stream to free up. Each open stream costs the server about 10 KB.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 2048;

/// Connection-level limits.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimits {
    /// A request's header must arrive within this (HTTP/1.1; slowloris protection); the
    /// first request's is counted from accept.
    pub header_read_timeout: Duration,
    /// A connection whose client takes no response data (socket full, or an HTTP/2
    /// flow-control window left at 0) for this long is closed.
    pub write_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// Connections from one source address (IPv6: one /64) beyond this are closed at once;
    /// 0: no per-address cap.
    pub max_connections_per_ip: usize,
    /// Largest request header section (431 beyond it).
    pub max_header_bytes: usize,
    /// Most header fields in one request (431 beyond it).
    pub max_headers: usize,
    /// How long a graceful shutdown waits for requests in progress, and how long a
    /// connection asked to close (idle, or shutting down) may take before it is cut.
    pub drain: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            drain: Duration::from_secs(10),
        }
    }
}

/// The future a [`Listener`] returns.
pub type AcceptFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send + 'a>>;

/// The future of [`Listener::accept_from`]: a connection and its source address, if known.
pub type AcceptFromFuture<'a> =
    Pin<Box<dyn Future<Output = io::Result<(Box<dyn Io>, Option<SocketAddr>)>> + Send + 'a>>;

/// Where the server gets its connections: a TCP listener by default, or anything else
/// that yields byte streams, such as a simulated network in tests (turmoil).
pub trait Listener: Send + Sync + 'static {
    /// Waits for the next connection.
    fn accept(&mut self) -> AcceptFuture<'_>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Waits for the next connection, with the address it comes from if known: the
    /// per-address connection cap counts only connections whose address is known. The
    /// default calls [`accept`](Listener::accept) and knows no address.
    fn accept_from(&mut self) -> AcceptFromFuture<'_> {
        let accepted = self.accept();
        Box::pin(async move { Ok((accepted.await?, None)) })
    }
}

impl Listener for TcpListener {
    fn accept(&mut self) -> AcceptFuture<'_> {
        Box::pin(async move { Ok(self.accept_from().await?.0) })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }

    fn accept_from(&mut self) -> AcceptFromFuture<'_> {
        Box::pin(async move {
            let (tcp, peer) = TcpListener::accept(self).await?;
            // Without it every small HTTP/2 frame waits on Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            Ok((Box::new(tcp) as Box<dyn Io>, Some(peer)))
        })
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The API; `/metrics` too unless `metrics_elsewhere`.
    Api { metrics_elsewhere: bool },
    /// Only `/metrics` and `/healthz` (the `--metrics-listen` address).
    Metrics,
}

impl Role {
    fn serves(self, path: &str) -> bool {
        match self {
            Role::Api { metrics_elsewhere } => !(metrics_elsewhere && path == "/metrics"),
            Role::Metrics => path == "/metrics" || path == "/healthz",
        }
    }
}

/// The per-address key: IPv4 addresses (IPv4-mapped IPv6 ones included) as they are, IPv6
/// addresses by their /64, the block one host usually gets.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections of one listener, in all and per source address.
#[derive(Default)]
struct Census {
    open: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounts it when dropped.
struct Slot {
    census: Arc<Census>,
    source: Option<IpAddr>,
    app: Arc<App>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.census.open.fetch_sub(1, Ordering::Relaxed);
        self.app.metrics.connections_open.dec();
        if let Some(source) = self.source {
            let mut per_source = self
                .census
                .per_source
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_source.get_mut(&source) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_source.remove(&source);
                }
            }
        }
    }
}

static ACCEPT_FAILED: LogLimit = LogLimit::new();
static CAP_REACHED: LogLimit = LogLimit::new();
static SOURCE_CAP_REACHED: LogLimit = LogLimit::new();

/// Counts the connection in, or refuses it if it is over a cap.
fn admit(
    census: &Arc<Census>,
    app: &Arc<App>,
    limits: &ConnLimits,
    peer: Option<SocketAddr>,
) -> Option<Slot> {
    if census.open.load(Ordering::Relaxed) >= limits.max_connections {
        if let Some(suppressed) = CAP_REACHED.allow() {
            tracing::warn!(
                max = limits.max_connections,
                suppressed,
                "connection refused: the server has as many connections open as it may"
            );
        }
        return None;
    }
    let source = peer
        .map(|p| source_key(p.ip()))
        .filter(|_| limits.max_connections_per_ip > 0);
    if let Some(source) = source {
        let mut per_source = census.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_source.entry(source).or_insert(0);
        if *count >= limits.max_connections_per_ip {
            if let Some(suppressed) = SOURCE_CAP_REACHED.allow() {
                tracing::warn!(
                    %source,
                    max = limits.max_connections_per_ip,
                    suppressed,
                    "connection refused: this source address has as many connections open as \
                     one address may"
                );
            }
            return None;
        }
        *count += 1;
    }
    census.open.fetch_add(1, Ordering::Relaxed);
    app.metrics.connections_open.inc();
    Some(Slot {
        census: census.clone(),
        source,
        app: app.clone(),
    })
}

/// Accepts connections until told to stop, then drains them.
pub(crate) async fn serve(
    mut listener: Box<dyn Listener>,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    role: Role,
    mut stopping: watch::Receiver<bool>,
) {
    let builder = Arc::new(http_builder(&limits));
    let census = Arc::new(Census::default());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept_from() => {
                let accepted_at = Instant::now();
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        if let Some(suppressed) = ACCEPT_FAILED.allow() {
                            tracing::warn!(error = %e, suppressed, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = admit(&census, &app, &limits, peer) else {
                    app.metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                };
                connections.spawn(connection(
                    stream,
                    accepted_at,
                    slot,
                    app.clone(),
                    builder.clone(),
                    tls.clone(),
                    limits.clone(),
                    role,
                    stopping.clone(),
                ));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut stopping) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
    }
}

fn http_builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        // One client multiplexes all its waiting acquires over one connection.
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(20));
    builder
}

/// Requests in flight on one connection (from their start until their response has been
/// handed over in full), and when things last moved.
struct Activity {
    origin: Instant,
    /// Requests started on this connection, ever.
    started: AtomicUsize,
    /// Requests whose response is not yet handed over in full.
    in_flight: AtomicUsize,
    /// Of those, the ones whose handler has answered: their response waits on the client.
    sending: AtomicUsize,
    /// When a request last started or ended.
    last_micros: AtomicU64,
    /// When a response was last handed over in full, or the first one started waiting.
    progress_micros: AtomicU64,
    /// Wakes the connection's watch when its deadlines change: at the first request, and
    /// when a response starts waiting on an idle client.
    changed: tokio::sync::Notify,
}

/// Marks one request in flight until dropped: inside the handler, then inside its response
/// body (also when the client goes away mid-request).
struct Busy {
    activity: Arc<Activity>,
    sending: bool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            started: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            last_micros: AtomicU64::new(0),
            progress_micros: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn now_micros(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn at(&self, micros: &AtomicU64) -> Instant {
        self.origin + Duration::from_micros(micros.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        self.last_micros.store(self.now_micros(), Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        if self.started.fetch_add(1, Ordering::Relaxed) == 0 {
            self.changed.notify_one();
        }
        Busy {
            activity: self.clone(),
            sending: false,
        }
    }

    /// When the connection will have been idle for `limit`, if nothing happens meanwhile
    /// (while requests are in flight: `limit` from now, to look again then).
    fn idle_deadline(&self, limit: Duration) -> Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Instant::now() + limit;
        }
        self.at(&self.last_micros) + limit
    }

    fn idle(&self, limit: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && Instant::now() >= self.idle_deadline(limit)
    }

    /// When the client will have taken no response for `limit` while responses wait on it.
    fn stall_deadline(&self, limit: Duration) -> Option<Instant> {
        (self.sending.load(Ordering::Relaxed) > 0).then(|| self.at(&self.progress_micros) + limit)
    }
}

impl Busy {
    /// The handler has answered: from now on the response waits on the client.
    fn sending(mut self) -> Busy {
        let activity = &self.activity;
        if activity.sending.fetch_add(1, Ordering::Relaxed) == 0 {
            // The stall clock starts with the first response waiting.
            activity
                .progress_micros
                .store(activity.now_micros(), Ordering::Relaxed);
            activity.changed.notify_one();
        }
        self.sending = true;
        self
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.activity;
        activity.touch();
        if self.sending {
            activity
                .progress_micros
                .store(activity.now_micros(), Ordering::Relaxed);
            activity.sending.fetch_sub(1, Ordering::Relaxed);
        }
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until hyper has taken all of it (and
/// dropped it): with HTTP/2, only once the client's flow-control window let it through.
struct Tracked {
    body: Full<Bytes>,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A byte stream whose writes fail once the peer has taken nothing for `timeout`: a client
/// that stops reading cannot hold the connection (and what is buffered for it) open.
struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Set while writes are blocked.
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, timeout: Duration) -> WriteDeadline<T> {
        WriteDeadline {
            inner,
            timeout,
            blocked: None,
        }
    }

    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.blocked = None;
            return polled;
        }
        let timeout = self.timeout;
        let blocked = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match blocked.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no data for the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let polled = Pin::new(&mut me.inner).poll_write(cx, buf);
        me.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let polled = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        me.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let polled = Pin::new(&mut me.inner).poll_flush(cx);
        me.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let polled = Pin::new(&mut me.inner).poll_shutdown(cx);
        me.check(cx, polled)
    }
}

/// The answer to a path this listener does not serve.
fn not_served(path: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&crate::protocol::ErrorBody {
        error: crate::protocol::codes::NOT_FOUND.into(),
        message: format!("no route {path}"),
        holder: None,
        reason: None,
    })
    .unwrap_or_default();
    let mut reply = Response::new(Full::new(body.into()));
    *reply.status_mut() = StatusCode::NOT_FOUND;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    reply
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: Box<dyn Io>,
    accepted_at: Instant,
    _slot: Slot,
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    role: Role,
    mut stopping: watch::Receiver<bool>,
) {
    app.metrics.connections.inc();
    // The first request's header must be in within the header timeout of accept: the TLS
    // handshake and HTTP version detection count too, so silent connections do not linger.
    let first_request_by = accepted_at + limits.header_read_timeout;
    let stream = WriteDeadline::new(stream, limits.write_timeout);
    let io: Box<dyn Io> = match tls {
        None => Box::new(stream),
        Some(acceptor) => {
            let by = first_request_by.min(accepted_at + limits.handshake_timeout);
            match tokio::time::timeout_at(by, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(e)) => {
                    app.metrics.tls_handshake_failures.inc();
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    app.metrics.tls_handshake_failures.inc();
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let activity = Arc::new(Activity::new());
    // Set when a request upgrades the connection to a session.
    let upgraded = UpgradeSlot::default();
    let service = {
        let app = app.clone();
        let activity = activity.clone();
        let upgraded = upgraded.clone();
        service_fn(move |mut request: Request<Incoming>| {
            let busy = activity.begin();
            let app = app.clone();
            request.extensions_mut().insert(upgraded.clone());
            async move {
                let reply = if role.serves(request.uri().path()) {
                    app.handle(request).await?
                } else {
                    not_served(request.uri().path())
                };
                let busy = busy.sending();
                Ok::<_, Infallible>(reply.map(|body| Tracked { body, _busy: busy }))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // When the connection was asked to close (GOAWAY, or no more keep-alive).
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let first_request =
            (activity.started.load(Ordering::Relaxed) == 0).then_some(first_request_by);
        let stall = activity.stall_deadline(limits.write_timeout);
        let cut = closing.map(|since| since + limits.drain);
        let idle = closing
            .is_none()
            .then(|| activity.idle_deadline(limits.idle_timeout));
        let wake = [first_request, stall, cut, idle]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + limits.idle_timeout);
        tokio::select! {
            _ = conn.as_mut() => break,
            // Deadlines moved: compute them again.
            _ = activity.changed.notified() => {}
            _ = stopped(&mut stopping), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if activity.started.load(Ordering::Relaxed) == 0 && now >= first_request_by {
                    tracing::debug!("no request within the header timeout of accept: closing");
                    break;
                }
                if activity
                    .stall_deadline(limits.write_timeout)
                    .is_some_and(|at| now >= at)
                {
                    tracing::debug!(
                        waiting = activity.sending.load(Ordering::Relaxed),
                        "the client took no response for the write timeout: closing"
                    );
                    break;
                }
                if closing.is_some_and(|since| now >= since + limits.drain) {
                    tracing::debug!("connection still open after being asked to close: closing");
                    break;
                }
                if closing.is_none() && activity.idle(limits.idle_timeout) {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(now);
                }
            }
        }
    }
    // Upgraded to a session: the connection lives on in the session's task (which watches
    // for shutdown, idleness and stalls itself), and stays counted against the caps until
    // it ends.
    if let Some(session) = upgraded.take() {
        let _ = session.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source_key(v4), v4);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
    }
}
