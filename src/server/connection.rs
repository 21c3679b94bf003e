//! Accepting and serving connections, within limits: a connection cap, a TLS handshake
//! timeout, a header read timeout (slowloris), header size and count, an idle timeout, and
//! a graceful drain on shutdown.

use crate::client::transport::Io;
use crate::server::http::App;
use crate::server::stopped;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connection-level limits.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimits {
    /// A request's header must arrive within this (HTTP/1.1; slowloris protection).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// Largest request header section (431 beyond it).
    pub max_header_bytes: usize,
    /// Most header fields in one request (431 beyond it).
    pub max_headers: usize,
    /// How long a graceful shutdown waits for requests in progress.
    pub drain: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            drain: Duration::from_secs(10),
        }
    }
}

/// The future a [`Listener`] returns.
pub type AcceptFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send + 'a>>;

/// Where the server gets its connections: a TCP listener by default, or anything else
/// that yields byte streams, such as a simulated network in tests (turmoil).
pub trait Listener: Send + Sync + 'static {
    /// Waits for the next connection.
    fn accept(&mut self) -> AcceptFuture<'_>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Listener for TcpListener {
    fn accept(&mut self) -> AcceptFuture<'_> {
        Box::pin(async move {
            let (tcp, _) = TcpListener::accept(self).await?;
            // Without it every small HTTP/2 frame waits on Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp) as Box<dyn Io>)
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

/// Accepts connections until told to stop, then drains them.
pub(crate) async fn serve(
    mut listener: Box<dyn Listener>,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let builder = Arc::new(http_builder(&limits));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                                // The gauge goes down as soon as a connection ends (the JoinSet only when
                // it is reaped).
                if app.metrics.connections_open.get() >= limits.max_connections as i64 {
                                        app.metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                }
                                app.metrics.connections_open.inc();
                                connections.spawn(connection(
                    stream,
                    app.clone(),
                    builder.clone(),
                    tls.clone(),
                    limits.clone(),
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
        .max_concurrent_streams(16_384)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(20));
    builder
}

/// Requests in flight on one connection, and when the last one started or ended.
struct Activity {
    origin: Instant,
    in_flight: AtomicUsize,
    last_micros: AtomicU64,
}

/// Marks one request in flight until dropped (also when the client goes away mid-request).
struct Busy(Arc<Activity>);

impl Activity {
    fn touch(&self) {
        self.last_micros
            .store(self.origin.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// When the connection will have been idle for `limit`, if nothing happens meanwhile
    /// (while requests are in flight: `limit` from now, to look again then).
    fn idle_deadline(&self, limit: Duration) -> Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Instant::now() + limit;
        }
        let last = self.origin + Duration::from_micros(self.last_micros.load(Ordering::Relaxed));
        last + limit
    }

    fn idle(&self, limit: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && Instant::now() >= self.idle_deadline(limit)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: Box<dyn Io>,
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    mut stopping: watch::Receiver<bool>,
) {
    app.metrics.connections.inc();
    let _open = scopeguard(|| {
        app.metrics.connections_open.dec();
    });
    let io: Box<dyn Io> = match tls {
        None => stream,
        Some(acceptor) => {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
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
    let activity = Arc::new(Activity {
        origin: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_micros: AtomicU64::new(0),
    });
    let service = {
        let app = app.clone();
        let activity = activity.clone();
        service_fn(move |request| {
            let busy = activity.begin();
            let app = app.clone();
            async move {
                let reply = app.handle(request).await;
                drop(busy);
                reply
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = stopped(&mut stopping), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep_until(idle_at), if !closing => {
                if activity.idle(limits.idle_timeout) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
