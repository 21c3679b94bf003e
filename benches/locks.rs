//! End-to-end lock benchmarks against a bare-hyper floor measured in the same run.
//!
//! `cargo bench --bench locks` starts two server processes on loopback: the real
//! `leasehold-server` binary, and a bare hyper server (this binary re-executed with
//! `--serve-baseline`) answering the same small JSON requests from a HashMap behind a mutex.
//! The client side runs here, in this process, so client and server never share a runtime.
//!
//! Scenarios, each run 3 times, alternating floor and SDK:
//! * uncontended: one task, acquire + release of one lock, pair latency p50 / p99 (floor and
//!   SDK alternate in blocks of 250 pairs);
//! * handoff: 8 tasks on one lock; the gap from a release being sent to the next holder's
//!   grant arriving, and whether every successive grant went to a different task;
//! * throughput: 32 tasks on distinct locks, pairs per second;
//! * burst: `BENCH_BURST` (default 10,000) concurrent acquires of distinct locks from one
//!   client, acquires per second, and how long requests waited inside the client before they
//!   left for the connection (the SDK's `queued_us` tracing field).
//!
//! Settings (environment): `BENCH_SECS` (throughput seconds, default 3), `BENCH_PAIRS`
//! (uncontended pairs, default 3000), `BENCH_CLIENT_RT` (`multi` or `current`, default
//! `multi`), `BENCH_PROTO` (`session`, `h2`, `h1` or `all`, default `all`).
//!
//! The SDK runs three ways: `Session` (the default client: lock operations as frames over a
//! session, docs/protocol.md §3.15), and `H2` and `H1` (`session_stream(false)`: one HTTP
//! request per operation, HTTP/2 or HTTP/1.1). The floor is bare hyper over HTTP/2 for the
//! first two, HTTP/1.1 for the last.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use leasehold::DistributedLock;
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{Spawned, Stats, env_num, handoff, stats};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-baseline") {
        serve_baseline();
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is expected.
    let client_rt = std::env::var("BENCH_CLIENT_RT").unwrap_or_else(|_| "multi".into());
    let queue_times = QueueTimes::install();
    let runtime = match client_rt.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("runtime");
    runtime.block_on(run(client_rt, queue_times));
}

/// Collects the `queued_us` field of the SDK's per-request debug events: how long each
/// request waited inside the client before the connection took it.
#[derive(Clone, Default)]
struct QueueTimes(Arc<Mutex<Vec<u64>>>);

impl QueueTimes {
    fn install() -> QueueTimes {
        use tracing_subscriber::prelude::*;
        let times = QueueTimes::default();
        let only_transport = tracing_subscriber::filter::Targets::new()
            .with_target("leasehold::client::transport", tracing::Level::DEBUG);
        tracing_subscriber::registry()
            .with(times.clone().with_filter(only_transport))
            .init();
        times
    }

    /// The times collected since the last call.
    fn take(&self) -> Vec<Duration> {
        let taken = std::mem::take(&mut *self.0.lock().unwrap());
        taken.into_iter().map(Duration::from_micros).collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QueueTimes {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Queued(Option<u64>);
        impl tracing::field::Visit for Queued {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "queued_us" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut queued = Queued(None);
        event.record(&mut queued);
        if let Some(us) = queued.0 {
            self.0.lock().unwrap().push(us);
        }
    }
}

struct Settings {
    secs: u64,
    pairs: usize,
    burst: usize,
}

async fn run(client_rt: String, queue_times: QueueTimes) {
    let settings = Settings {
        secs: env_num("BENCH_SECS", 3),
        pairs: env_num("BENCH_PAIRS", 3000) as usize,
        burst: env_num("BENCH_BURST", 10_000) as usize,
    };
    let protos = match std::env::var("BENCH_PROTO").as_deref() {
        Ok("session") => vec![Proto::Session],
        Ok("h1") => vec![Proto::H1],
        Ok("h2") => vec![Proto::H2],
        _ => vec![Proto::Session, Proto::H2, Proto::H1],
    };
    println!(
        "client runtime: {client_rt}; servers: default binaries (multi-thread, one worker per core)"
    );
    let baseline =
        Spawned::start(Command::new(std::env::current_exe().unwrap()).arg("--serve-baseline"));
    let server = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_leasehold-server"))
            .args(["--listen", "127.0.0.1:0", "--no-state-file"])
            .env("RUST_LOG", "info"),
    );
    for proto in protos {
        println!("\n== {proto:?} ==");
        let floor = Floor::new(&baseline.url, proto);
        let sdk_for = |url: &str| {
            let b = DistributedLock::builder("bench").endpoint(url);
            match proto {
                Proto::H1 => b.http1_only().session_stream(false),
                Proto::H2 => b.session_stream(false),
                Proto::Session => b,
            }
            .build()
            .unwrap()
        };
        let dl = sdk_for(&server.url);
        let sdk_on_floor = sdk_for(&baseline.url);
        let floor_on_server = Floor::new(&server.url, proto);
        let paths = Paths {
            floor: &floor,
            sdk_on_floor: &sdk_on_floor,
            floor_on_server: &floor_on_server,
            sdk: &dl,
        };
        for round in 1..=3 {
            let [f, sdk_on_floor, floor_on_server, s] = uncontended(&paths, settings.pairs).await;
            println!(
                "uncontended pair  round {round}: floor p50 {:>7.1} µs p99 {:>7.1} µs | sdk p50 {:>7.1} µs p99 {:>7.1} µs | ratio p50 {:.2} \
                 (sdk client on the bare server {:.1} µs, bare client on the lock server {:.1} µs)",
                us(f.p50),
                us(f.p99),
                us(s.p50),
                us(s.p99),
                s.p50.as_secs_f64() / f.p50.as_secs_f64(),
                us(sdk_on_floor.p50),
                us(floor_on_server.p50),
            );
        }
        for round in 1..=3 {
            let rtt = round_trip_floor(&floor, settings.pairs).await;
            let clients = vec![dl.clone(); 8];
            let (gap, repeats, grants) = handoff(
                clients,
                leasehold::DEFAULT_EXPIRES_IN,
                Duration::from_secs(settings.secs),
            )
            .await;
            println!(
                "handoff 8 tasks   round {round}: floor round trip p50 {:>7.1} µs | gap p50 {:>7.1} µs p99 {:>7.1} µs | {grants} grants, {repeats} to the same task twice in a row",
                us(rtt.p50),
                us(gap.p50),
                us(gap.p99)
            );
            // The other kinds' hand-overs, against the mutex's of the same round (target:
            // within 1.2x): a permit of a one-permit semaphore passing between 8 tasks, and
            // 4 writers and 4 readers taking turns on one read-write lock.
            let lease = leasehold::DEFAULT_EXPIRES_IN;
            let secs = Duration::from_secs(settings.secs);
            let [(sem, sem_grants), (rw, rw_grants)] =
                common::kinds_handoff(vec![dl.clone(); 8], lease, secs).await;
            println!(
                "handoff kinds     round {round}: semaphore gap p50 {:>7.1} µs ({sem_grants} grants, ratio to mutex {:.2}) | read-write gap p50 {:>7.1} µs ({rw_grants} grants, ratio {:.2})",
                us(sem.p50),
                sem.p50.as_secs_f64() / gap.p50.as_secs_f64(),
                us(rw.p50),
                rw.p50.as_secs_f64() / gap.p50.as_secs_f64(),
            );
        }
        for round in 1..=3 {
            let secs = Duration::from_secs(settings.secs);
            let bare = Arc::new(Floor {
                client: floor.client.clone(),
                url: floor.url.clone(),
            });
            let f = throughput(32, secs, move |name| {
                let bare = bare.clone();
                async move { bare.pair(&name).await }
            })
            .await;
            let sdk = dl.clone();
            let s = throughput(32, secs, move |name| {
                let sdk = sdk.clone();
                async move { sdk.lock(name).await.unwrap().release().await.unwrap() }
            })
            .await;
            println!(
                "throughput 32     round {round}: floor {f:>8.0} pairs/s | sdk {s:>8.0} pairs/s | ratio {:.2}",
                s / f
            );
        }
        for round in 1..=3 {
            queue_times.take();
            let started = Instant::now();
            let mut acquires = tokio::task::JoinSet::new();
            for i in 0..settings.burst {
                let dl = dl.clone();
                acquires.spawn(async move { dl.lock(format!("burst-{round}-{i}")).await.unwrap() });
            }
            let mut guards = Vec::with_capacity(settings.burst);
            while let Some(guard) = acquires.join_next().await {
                guards.push(guard.unwrap());
            }
            let rate = settings.burst as f64 / started.elapsed().as_secs_f64();
            let queued = stats(queue_times.take());
            let held = guards.iter().filter(|g| g.is_held()).count();
            println!(
                "burst {}       round {round}: {rate:>8.0} acquires/s | waited inside the client p50 {:>9.1} µs p99 {:>9.1} µs | {held} held",
                settings.burst,
                us(queued.p50),
                us(queued.p99),
            );
            drop(guards);
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[derive(Debug, Clone, Copy)]
enum Proto {
    /// The default SDK: sessions (its first operations, and the bare floor, plain HTTP/2).
    Session,
    H2,
    H1,
}

/// Acquire+release pair latencies of four client/server combinations, measured in turns
/// of 250 pairs so that the machine's slow and fast spells hit all alike: the bare-hyper
/// floor, the SDK against the bare server, the bare client against the lock server, and
/// the SDK against the lock server. The middle two say which side adds what.
async fn uncontended(paths: &Paths<'_>, pairs: usize) -> [Stats; 4] {
    for _ in 0..500 {
        for path in 0..4 {
            paths.pair(path).await;
        }
    }
    let mut samples: [Vec<Duration>; 4] = Default::default();
    while samples[0].len() < pairs {
        for (path, samples) in samples.iter_mut().enumerate() {
            for _ in 0..250 {
                let start = Instant::now();
                paths.pair(path).await;
                samples.push(start.elapsed());
            }
        }
    }
    samples.map(stats)
}

/// The four ways to take and release a lock that `uncontended` compares.
struct Paths<'a> {
    floor: &'a Floor,
    sdk_on_floor: &'a DistributedLock,
    floor_on_server: &'a Floor,
    sdk: &'a DistributedLock,
}

impl Paths<'_> {
    async fn pair(&self, path: usize) {
        match path {
            0 => self.floor.pair("solo").await,
            1 => sdk_pair(self.sdk_on_floor).await,
            2 => self.floor_on_server.pair("solo").await,
            _ => sdk_pair(self.sdk).await,
        }
    }
}

async fn sdk_pair(dl: &DistributedLock) {
    dl.lock("solo").await.unwrap().release().await.unwrap();
}

/// Pairs per second of `tasks` tasks, each taking turns on a lock of its own with `pair`.
async fn throughput<F, Fut>(tasks: usize, duration: Duration, pair: F) -> f64
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..tasks {
        let (pair, count, stop) = (pair.clone(), count.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                pair(format!("lock-{id}")).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let done = count.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    while set.join_next().await.is_some() {}
    done as f64 / elapsed.as_secs_f64()
}

// ---------- the bare-hyper floor ----------

struct Floor {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

impl Floor {
    fn new(url: &str, proto: Proto) -> Floor {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(!matches!(proto, Proto::H1))
            .build(connector);
        Floor {
            client,
            url: url.to_owned(),
        }
    }

    async fn post(&self, path: &str, body: String) -> Bytes {
        let request = Request::post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .header("authorization", "Bearer bench")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    async fn pair(&self, name: &str) {
        let id = format!("{:032x}", fastrand_u128());
        let granted = self
            .post(
                "/v1/acquire",
                format!(r#"{{"name":"{name}","lease_ms":10000,"wait_ms":null,"poll_ms":20000,"request_id":"{id}"}}"#),
            )
            .await;
        let granted: serde_json::Value = serde_json::from_slice(&granted).unwrap();
        let lease = granted["lease_id"].as_str().unwrap();
        self.post(
            "/v1/release",
            format!(r#"{{"name":"{name}","lease_id":"{lease}"}}"#),
        )
        .await;
    }
}

fn fastrand_u128() -> u128 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) as u128 * 0x9E37_79B9_7F4A_7C15
}

async fn round_trip_floor(floor: &Floor, n: usize) -> Stats {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        floor
            .post("/v1/release", r#"{"name":"none","lease_id":"00"}"#.into())
            .await;
        samples.push(start.elapsed());
    }
    stats(samples)
}

/// The floor's server: parse the JSON, touch a HashMap behind a mutex, answer JSON.
fn serve_baseline() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        let table = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
        let counter = Arc::new(AtomicU64::new(1));
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let table = table.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let table = table.clone();
                    let counter = counter.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await?.to_bytes();
                        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let name = value["name"].as_str().unwrap_or_default().to_owned();
                        let reply = if path == "/v1/acquire" {
                            let token = counter.fetch_add(1, Ordering::Relaxed);
                            table.lock().unwrap().insert(name, token);
                            format!(r#"{{"lease_id":"{token:032x}","fencing_token":{token},"lease_ms":10000}}"#)
                        } else {
                            table.lock().unwrap().remove(&name);
                            r#"{"released":true}"#.to_owned()
                        };
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(reply))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}
