//! The lock server (feature `server`): embed it with [`Server::builder`], or run the
//! `distributed-lock-server` binary.
//!
//! ```
//! # async fn run() -> Result<(), distributed_lock::Error> {
//! use distributed_lock::server::Server;
//! let server = Server::builder().bind("127.0.0.1:0").start().await?;
//! let dl = distributed_lock::DistributedLock::builder("any-key")
//!     .endpoint(server.url())
//!     .build()?;
//! let guard = dl.lock("job").await?;
//! drop(guard);
//! server.shutdown().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

mod auth;
mod http;
mod metrics;
mod state_file;
pub mod store;

use crate::error::Error;
use auth::Auth;
use http::{App, Limits};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics::Metrics;
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

/// Configures and starts a [`Server`].
#[must_use = "a builder does nothing until start() is awaited"]
#[derive(Debug)]
pub struct ServerBuilder {
    bind: String,
    memory: MemoryConfig,
    limits: Limits,
    drain_timeout: Duration,
}

/// A running lock server. Dropping it stops the server without waiting; prefer
/// [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    store: Arc<dyn LockStore>,
}

impl Server {
    /// A builder with defaults: memory store, `127.0.0.1:7878`, leases from 10 ms to 1 h.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            bind: "127.0.0.1:7878".into(),
            memory: MemoryConfig::default(),
            limits: Limits {
                max_body_bytes: 1 << 20,
                min_lease: Duration::from_millis(10),
                max_lease: Duration::from_secs(3600),
                max_poll: Duration::from_secs(20),
            },
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give the SDK, such as `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, answers waiting acquires with a retryable `503`, lets
    /// requests in progress finish (up to the drain timeout), and records a clean shutdown
    /// in the state file.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Err(e) = self.store.shutdown().await {
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
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Address to listen on, such as `127.0.0.1:7878` or `0.0.0.0:0` (any free port).
    pub fn bind(mut self, addr: impl Into<String>) -> ServerBuilder {
        self.bind = addr.into();
        self
    }

    /// Keeps the memory store's restart state in `path`: the fencing-token epoch and how long
    /// leases issued before a restart may still run (grants wait for them after a crash).
    /// Without it, every start is treated as a first start.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.memory.state_file = Some(path.into());
        self
    }

    /// Longest lease a client may ask for (default 1 h, at most 24 h).
    pub fn max_lease(mut self, lease: Duration) -> ServerBuilder {
        self.limits.max_lease = lease;
        self
    }

    /// Shortest lease a client may ask for (default 10 ms).
    pub fn min_lease(mut self, lease: Duration) -> ServerBuilder {
        self.limits.min_lease = lease;
        self
    }

    /// Longest time one long poll is held open (default 20 s); the client then polls again,
    /// keeping its place in line.
    pub fn max_poll(mut self, poll: Duration) -> ServerBuilder {
        self.limits.max_poll = poll;
        self
    }

    /// How long a waiter whose connection went away keeps its place in line, and a grant
    /// made to it is kept for it (default 3 s).
    pub fn grace(mut self, grace: Duration) -> ServerBuilder {
        self.memory.grace = grace;
        self
    }

    /// Most waiters one lock may have (default 100,000); more get `429`.
    pub fn max_waiters_per_lock(mut self, max: usize) -> ServerBuilder {
        self.memory.max_waiters_per_lock = max;
        self
    }

    /// Binds the socket, opens the store and starts serving on the current runtime.
    pub async fn start(self) -> Result<Server, Error> {
        if self.limits.min_lease.is_zero() || self.limits.min_lease > self.limits.max_lease {
            return Err(Error::invalid(
                "lease bounds: need 0 < min_lease <= max_lease",
            ));
        }
        let listener = TcpListener::bind(&self.bind)
            .await
            .map_err(|source| Error::Io {
                context: format!("cannot listen on {}", self.bind),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "cannot read the bound address".into(),
            source,
        })?;
        let store: Arc<dyn LockStore> =
            Arc::new(MemoryStore::open(self.memory).map_err(|source| Error::Io {
                context: "cannot open the memory store's state file".into(),
                source,
            })?);
        let (stop, stopping) = watch::channel(false);
        let app = Arc::new(App {
            store: store.clone(),
            auth: Auth::open(),
            metrics: Metrics::new(store.clone()),
            limits: self.limits,
            stopping: stopping.clone(),
        });
        let task = tokio::spawn(serve(listener, app, stopping, self.drain_timeout));
        Ok(Server {
            addr,
            stop,
            task: Some(task),
            store,
        })
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Accepts connections until told to stop, then drains them.
async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    mut stopping: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        // One client multiplexes all its waiting acquires over one connection.
        .max_concurrent_streams(16_384)
        .keep_alive_interval(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stopping) => break,
        };
        let _ = tcp.set_nodelay(true);
        app.metrics.connections.inc();
        app.metrics.connections_open.inc();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let handler = app.clone();
            let service = service_fn(move |request| handler.clone().handle(request));
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            let _ = watcher.watch(connection.into_owned()).await;
            app.metrics.connections_open.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
