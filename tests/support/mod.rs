//! Test harness: a real server on a real socket, raw HTTP, a cuttable TCP proxy, and waits
//! on conditions with generous bounds (never fixed sleeps).
#![allow(dead_code)]

pub mod contend;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod history;
pub mod key_file;
pub mod load;
pub mod process;
pub mod proxy;
pub mod sim;

use leasehold::DistributedLock;
use leasehold::server::{Server, ServerBuilder};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics raised in the crate's own code (`src/`), in any thread or task: tokio
/// swallows a panicking server task, so the test would not see it otherwise. Test
/// assertions (`tests/`) are not counted; they fail their own test.
fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().starts_with("src/"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Which store a test server keeps its locks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    /// A one-member etcd cluster of its own, started for the server.
    Etcd,
}

impl Backend {
    /// The lease this backend grants when `wanted` is asked for: etcd counts whole seconds,
    /// and its minimum TTL (with its default timing) is 2 s.
    pub fn lease(self, wanted: Duration) -> Duration {
        match self {
            Backend::Memory => wanted,
            Backend::Etcd => Duration::from_secs(wanted.as_millis().div_ceil(1000) as u64)
                .max(Duration::from_secs(2)),
        }
    }

    /// How much later than an inspected `expires_in_ms` the lease may really end: etcd
    /// reports remaining TTLs in whole seconds, rounded down.
    pub fn expiry_slack(self) -> Duration {
        match self {
            Backend::Memory => Duration::ZERO,
            Backend::Etcd => Duration::from_secs(1),
        }
    }
}

/// Without the `etcd` feature there is no etcd to start: the etcd halves of the conformance
/// suite are not compiled, and nothing can reach this.
#[cfg(not(feature = "etcd"))]
pub mod etcd {
    pub enum EtcdCluster {}

    impl EtcdCluster {
        pub async fn start(_members: usize) -> EtcdCluster {
            panic!("the etcd backend's tests need the `etcd` feature (cargo test --all-features)")
        }

        pub fn endpoints(&self) -> Vec<String> {
            match *self {}
        }
    }
}

/// Runs each listed `async fn name(backend: Backend)` as two tests, `name::memory` and
/// `name::etcd`: the conformance suite both stores must pass. Prefix the list with
/// `multi_thread:` for a two-worker runtime.
#[macro_export]
macro_rules! on_both_backends {
    (multi_thread: $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name($crate::support::Backend::Memory).await
            }
            #[cfg(feature = "etcd")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name($crate::support::Backend::Etcd).await
            }
        }
    )+};
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name($crate::support::Backend::Memory).await
            }
            #[cfg(feature = "etcd")]
            #[tokio::test]
            async fn etcd() {
                super::$name($crate::support::Backend::Etcd).await
            }
        }
    )+};
}

/// A `leasehold-server --backend etcd` process over `etcd`.
#[cfg(feature = "etcd")]
pub async fn etcd_server_process(etcd: &etcd::EtcdCluster) -> process::ServerProcess {
    let args = etcd_server_args(etcd);
    process::ServerProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// The server binary's arguments for `etcd`: its endpoints, and its CA and client
/// certificate if it serves TLS.
#[cfg(feature = "etcd")]
pub fn etcd_server_args(etcd: &etcd::EtcdCluster) -> Vec<String> {
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--backend", "etcd"]
        .map(String::from)
        .into();
    args.extend(["--etcd-endpoints".into(), etcd.endpoints().join(",")]);
    if let Some(pki) = &etcd.pki {
        for (flag, path) in [
            ("--etcd-ca-file", &pki.ca),
            ("--etcd-cert-file", &pki.client_cert),
            ("--etcd-key-file", &pki.client_key),
        ] {
            args.extend([flag.to_owned(), path.display().to_string()]);
        }
    }
    args
}

/// Panics raised so far in the crate's own code (`src/`), in any thread or task of this
/// test binary; starts counting at the first call.
pub fn crate_panics() -> usize {
    watch_panics();
    PANICS.load(Ordering::SeqCst)
}

/// An in-process lock server on an ephemeral port. Shuts down on drop, and fails the test if
/// anything panicked meanwhile (server tasks included).
pub struct TestServer {
    server: Option<Server>,
    pub addr: SocketAddr,
    panics_at_start: usize,
    pub backend: Backend,
    /// The etcd the server keeps its locks in (etcd backend); dropped after the server.
    pub etcd: Option<etcd::EtcdCluster>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|b| b).await
    }

    pub async fn start_with(configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> TestServer {
        TestServer::start_on_with(Backend::Memory, configure).await
    }

    /// A server on `backend`; for etcd, with a one-member etcd cluster of its own.
    pub async fn start_on(backend: Backend) -> TestServer {
        TestServer::start_on_with(backend, |b| b).await
    }

    pub async fn start_on_with(
        backend: Backend,
        configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
    ) -> TestServer {
        let etcd = match backend {
            Backend::Memory => None,
            Backend::Etcd => Some(etcd::EtcdCluster::start(1).await),
        };
        let mut server = TestServer::start_over(etcd.as_ref(), configure).await;
        server.backend = backend;
        server.etcd = etcd;
        server
    }

    /// A server over `etcd` (if given; else on the memory store). Several servers started
    /// over one cluster share their locks.
    pub async fn start_over(
        etcd: Option<&etcd::EtcdCluster>,
        configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
    ) -> TestServer {
        watch_panics();
        let mut builder = Server::builder().bind("127.0.0.1:0");
        if let Some(cluster) = etcd {
            #[cfg(feature = "etcd")]
            {
                builder = builder.etcd(cluster.endpoints());
                if let Some(pki) = &cluster.pki {
                    builder = builder
                        .etcd_ca_file(&pki.ca)
                        .etcd_client_cert(&pki.client_cert, &pki.client_key);
                }
            }
            #[cfg(not(feature = "etcd"))]
            let _ = cluster.endpoints();
        }
        let server = configure(builder)
            .start()
            .await
            .expect("test server starts");
        TestServer {
            addr: server.local_addr(),
            server: Some(server),
            panics_at_start: PANICS.load(Ordering::SeqCst),
            backend: if etcd.is_some() {
                Backend::Etcd
            } else {
                Backend::Memory
            },
            etcd: None,
        }
    }

    /// The lease this server grants when `wanted` is asked for.
    pub fn lease(&self, wanted: Duration) -> Duration {
        self.backend.lease(wanted)
    }

    /// Starts a server on the address a previous one used, waiting for it to be released.
    pub async fn restart_on(
        addr: SocketAddr,
        configure: impl Fn(ServerBuilder) -> ServerBuilder,
    ) -> TestServer {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match configure(Server::builder().bind(addr.to_string()))
                .start()
                .await
            {
                Ok(server) => {
                    watch_panics();
                    return TestServer {
                        addr: server.local_addr(),
                        server: Some(server),
                        panics_at_start: PANICS.load(Ordering::SeqCst),
                        backend: Backend::Memory,
                        etcd: None,
                    };
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("listen"), "{e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("cannot restart on {addr}: {e}"),
            }
        }
    }

    pub fn url(&self) -> String {
        self.server
            .as_ref()
            .map_or_else(|| format!("http://{}", self.addr), |s| s.url())
    }

    pub fn reload_keys(&self) -> Result<usize, leasehold::Error> {
        self.server.as_ref().expect("running").reload_keys()
    }

    /// A client for project `key` talking straight to this server.
    pub fn client(&self, key: &str) -> DistributedLock {
        client_for(&self.url(), key)
    }

    /// Shuts down gracefully (and checks for panics).
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// The value of one metric line, such as `leasehold_grants_total` or
    /// `leasehold_http_requests_total{route="renew",status="200"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(self.addr, series).await
    }

    /// Inspection as project `key` sees it: (holder token, waiters).
    pub async fn inspect(&self, key: &str, name: &str) -> (Option<u64>, u64) {
        let path = format!("/v1/locks/{}", encode(name));
        let (status, body) = raw(
            self.addr,
            "GET",
            &path,
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await;
        if status == 404 {
            return (None, 0); // nobody holds or waits for it
        }
        assert_eq!(status, 200, "inspect answered {status}: {body}");
        let info: serde_json::Value = serde_json::from_str(&body).expect("inspect JSON");
        (
            info["holder"]["fencing_token"].as_u64(),
            info["waiters"].as_u64().expect("waiters"),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.server.take());
        let panics = PANICS.load(Ordering::SeqCst) - self.panics_at_start;
        if panics > 0 && !std::thread::panicking() {
            panic!("{panics} panic(s) in the crate's code while the test server ran");
        }
    }
}

pub fn client_for(url: &str, key: &str) -> DistributedLock {
    DistributedLock::builder(key)
        .endpoint(url)
        .build()
        .expect("client builds")
}

/// Percent-encodes everything outside unreserved characters.
pub fn encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One raw HTTP/1.1 request on a fresh connection: (status, body).
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    raw_bytes(addr, request.as_bytes()).await
}

/// One series of the server's `/metrics` at `addr` (0 when absent).
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (status, body) = raw(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("metric value"))
        })
        .unwrap_or(0.0)
}

/// Sends bytes as they are and reads the answer until the server closes.
pub async fn raw_bytes(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.write_all(request).await;
    let mut answer = Vec::new();
    // A reset counts as an answer without a status (0).
    let _ = within(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    parse_answer(&answer)
}

/// (status, body) of a raw HTTP/1.1 answer; status 0 when there is none (a reset).
pub fn parse_answer(answer: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Awaits `f`, failing the test if it takes longer than `bound`.
pub async fn within<T>(bound: Duration, f: impl std::future::IntoFuture<Output = T>) -> T {
    tokio::time::timeout(bound, f)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {bound:?}"))
}

/// Serializes the tests of one test binary that load the whole (small) machine, so that
/// they do not starve each other's timers. Hold the guard for the test's duration.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Waits until `condition` holds, checking every few milliseconds, failing after `bound`.
pub async fn eventually<F, Fut>(bound: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An address where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
