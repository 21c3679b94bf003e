//! leasehold against Redis and PostgreSQL, side by side in one run, each taken the way its
//! users take it.
//!
//! ```text
//! bash compare/setup-peers.sh                 # Redis on 6390, PostgreSQL on 5440
//! cargo run --release -p leasehold-compare
//! ```
//!
//! * **leasehold**: the real `leasehold-server` binary (release build, memory backend) in a
//!   process of its own on loopback, and one `DistributedLock` shared by every task of this
//!   process's multi-thread runtime. The bench builds the binary first
//!   (`cargo build --release --features server --bin leasehold-server`) unless
//!   `COMPARE_SERVER_BIN` names one, or `COMPARE_SERVER_URL` names a running server.
//! * **Redis**: redis-rs with one `ConnectionManager` (one multiplexed connection) shared by
//!   every task. Acquire: `SET key token NX PX ttl`; while the key is taken, sleep
//!   `COMPARE_REDIS_RETRY_MS` (default 10 ms) and try again. Release: the Lua
//!   compare-and-delete script (`EVALSHA`).
//! * **PostgreSQL**: tokio-postgres, one connection per task, `SET lock_timeout = '10s'`
//!   once per connection, statements prepared once per connection;
//!   `SELECT pg_advisory_lock($1)` and `SELECT pg_advisory_unlock($1)`.
//!
//! Scenarios (each repeated `COMPARE_ROUNDS` times, default 3, the systems alternating and
//! their order rotating from round to round):
//! * uncontended: one task, acquire + release of one lock, pair latency p50 / p99, the
//!   systems taking turns in blocks of 250 pairs (`COMPARE_PAIRS` per system, default 2000);
//! * throughput: 32 tasks on distinct locks, pairs per second (`COMPARE_SECS`, default 3,
//!   per system and round, in three turns each that the systems take one after another);
//! * handoff: 8 tasks on one lock, each holding it 1 ms; 200 grants after the first 8; the
//!   mean idle time from a release being sent to the next grant arriving, how many of the
//!   199 hand-overs went to a different task, and the mean gap of those (a waiter's wait
//!   after a release: with Redis the releasing task often takes the lock straight back);
//!   beside them, the floor under any hand-over between processes: one round trip over bare
//!   TCP between a client and a peer that are both idle, after the same 1 ms of idleness;
//! * burst: `COMPARE_BURST` (default 10,000) concurrent acquires of distinct locks from one
//!   client, acquires per second (leasehold only).
//!
//! The last table holds the medians over the rounds, checked against issue 14's targets.
//! `COMPARE_SCENARIOS` (e.g. `throughput,burst`) and `COMPARE_SYSTEMS` (e.g. `leasehold`)
//! pick a subset, e.g. for profiling.

use leasehold::DistributedLock;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(10);
const HOLD: Duration = Duration::from_millis(1);
const HANDOFF_TASKS: usize = 8;
const HANDOFF_GRANTS: usize = 200;
const THROUGHPUT_TASKS: usize = 32;
/// Turns each system takes per round of the throughput scenario.
const THROUGHPUT_SLICES: u32 = 3;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn wanted(var: &str, item: &str) -> bool {
    match std::env::var(var) {
        Ok(list) => list.split(',').any(|w| w.trim() == item),
        Err(_) => true,
    }
}

struct Settings {
    rounds: usize,
    pairs: usize,
    secs: u64,
    burst: usize,
    redis_retry: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Leasehold,
    Redis,
    Postgres,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Leasehold => "leasehold",
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
        }
    }
}

/// One system's way to take and release a lock, as its users do it.
#[derive(Clone)]
enum System {
    Leasehold(DistributedLock),
    Redis(RedisLocks),
    Postgres(PgLocks),
}

impl System {
    fn kind(&self) -> Kind {
        match self {
            System::Leasehold(_) => Kind::Leasehold,
            System::Redis(_) => Kind::Redis,
            System::Postgres(_) => Kind::Postgres,
        }
    }

    /// A handle for one task: PostgreSQL gives each task a connection of its own (task
    /// `slot` uses connection `slot`); the others share one client.
    fn handle(&self, slot: usize) -> Handle {
        match self {
            System::Leasehold(dl) => Handle::Leasehold(dl.clone()),
            System::Redis(r) => Handle::Redis(r.clone()),
            System::Postgres(pg) => Handle::Postgres(pg.conns[slot].clone()),
        }
    }
}

enum Handle {
    Leasehold(DistributedLock),
    Redis(RedisLocks),
    Postgres(Arc<PgConn>),
}

enum Held {
    Leasehold(leasehold::LockGuard),
    Redis(String, String),
    Postgres(i64),
}

impl Handle {
    /// Waits for the lock (Redis: polls), unless `stop` is set while it waits (Redis only;
    /// the others wait in a queue and get the lock when the holders go).
    async fn acquire(&self, name: &str, stop: Option<&AtomicBool>) -> Option<Held> {
        match self {
            Handle::Leasehold(dl) => Some(Held::Leasehold(
                dl.lock(name)
                    .expires_in(LEASE)
                    .await
                    .expect("leasehold lock"),
            )),
            Handle::Redis(r) => r.acquire(name, stop).await,
            Handle::Postgres(pg) => {
                let key = pg_key(name);
                pg.client
                    .execute(&pg.lock, &[&key])
                    .await
                    .expect("pg_advisory_lock");
                Some(Held::Postgres(key))
            }
        }
    }

    async fn release(&self, held: Held) {
        match (self, held) {
            (_, Held::Leasehold(guard)) => guard.release().await.expect("leasehold release"),
            (Handle::Redis(r), Held::Redis(key, token)) => r.release(&key, &token).await,
            (Handle::Postgres(pg), Held::Postgres(key)) => {
                let row = pg
                    .client
                    .query_one(&pg.unlock, &[&key])
                    .await
                    .expect("pg_advisory_unlock");
                assert!(row.get::<_, bool>(0), "pg_advisory_unlock found the lock");
            }
            _ => unreachable!("a lock is released through the system that took it"),
        }
    }

    async fn pair(&self, name: &str) {
        let held = self.acquire(name, None).await.expect("acquired");
        self.release(held).await;
    }
}

// ---------- Redis ----------

const RELEASE_SCRIPT: &str = r#"if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
else
    return 0
end"#;

#[derive(Clone)]
struct RedisLocks {
    conn: redis::aio::ConnectionManager,
    release: Arc<redis::Script>,
    retry: Duration,
    tokens: Arc<AtomicU64>,
}

impl RedisLocks {
    async fn connect(url: &str, retry: Duration) -> RedisLocks {
        let client = redis::Client::open(url).expect("redis url");
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .unwrap_or_else(|e| panic!("redis at {url}: {e} (run compare/setup-peers.sh)"));
        RedisLocks {
            conn,
            release: Arc::new(redis::Script::new(RELEASE_SCRIPT)),
            retry,
            tokens: Arc::new(AtomicU64::new(random_seed())),
        }
    }

    async fn acquire(&self, name: &str, stop: Option<&AtomicBool>) -> Option<Held> {
        let key = format!("lock:{name}");
        let token = format!(
            "{:016x}",
            self.tokens
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        );
        let mut conn = self.conn.clone();
        loop {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LEASE.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .expect("redis SET");
            if set.is_some() {
                return Some(Held::Redis(key, token));
            }
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return None;
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    async fn release(&self, key: &str, token: &str) {
        let mut conn = self.conn.clone();
        let deleted: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut conn)
            .await
            .expect("redis release script");
        assert_eq!(deleted, 1, "the release found the lock");
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    nanos ^ ((std::process::id() as u64) << 32)
}

// ---------- PostgreSQL ----------

#[derive(Clone)]
struct PgLocks {
    conns: Vec<Arc<PgConn>>,
}

struct PgConn {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
}

impl PgLocks {
    async fn connect(url: &str, count: usize) -> PgLocks {
        let mut conns = Vec::with_capacity(count);
        for _ in 0..count {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("postgres at {url}: {e} (run compare/setup-peers.sh)"));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("postgres connection: {e}");
                }
            });
            client
                .batch_execute("SET lock_timeout = '10s'")
                .await
                .expect("SET lock_timeout");
            let lock = client
                .prepare("SELECT pg_advisory_lock($1)")
                .await
                .expect("prepare");
            let unlock = client
                .prepare("SELECT pg_advisory_unlock($1)")
                .await
                .expect("prepare");
            conns.push(Arc::new(PgConn {
                client,
                lock,
                unlock,
            }));
        }
        PgLocks { conns }
    }
}

/// Advisory locks are numbered: the lock's name hashed (FNV-1a) to a bigint.
fn pg_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

// ---------- the leasehold server ----------

struct Server {
    child: Option<Child>,
    url: String,
}

impl Server {
    fn start() -> Server {
        if let Ok(url) = std::env::var("COMPARE_SERVER_URL") {
            return Server { child: None, url };
        }
        let bin = match std::env::var("COMPARE_SERVER_BIN") {
            Ok(bin) => bin,
            Err(_) => build_server(),
        };
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--no-state-file"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}"));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, url)) = line.split_once("listening on ") {
                    let _ = tx.send(strip_ansi(url.trim()));
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("leasehold-server printed its address");
        println!("leasehold-server: {bin}, pid {}, {url}", child.id());
        Server {
            child: Some(child),
            url,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Builds the release `leasehold-server` of this workspace and returns its path.
fn build_server() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--features",
            "server",
            "--bin",
            "leasehold-server",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building leasehold-server failed");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{root}/target"));
    format!("{target}/release/leasehold-server")
}

// ---------- scenarios ----------

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Pair latencies of every system, taking turns in blocks of 250 pairs so that the
/// machine's slow and fast spells hit all alike.
async fn uncontended(systems: &[System], pairs: usize) -> Vec<Latency> {
    let handles: Vec<Handle> = systems.iter().map(|s| s.handle(0)).collect();
    for handle in &handles {
        for _ in 0..200 {
            handle.pair("solo").await;
        }
    }
    let mut samples = vec![Vec::with_capacity(pairs); handles.len()];
    while samples[0].len() < pairs {
        for (handle, samples) in handles.iter().zip(&mut samples) {
            for _ in 0..250 {
                let start = Instant::now();
                handle.pair("solo").await;
                samples.push(start.elapsed());
            }
        }
    }
    samples.into_iter().map(latency).collect()
}

/// Pairs per second of `tasks` tasks, each on a lock of its own.
async fn throughput(system: &System, tasks: usize, duration: Duration) -> f64 {
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..tasks {
        let handle = system.handle(id);
        let (count, stop) = (count.clone(), stop.clone());
        set.spawn(async move {
            let name = format!("lock-{id}");
            while !stop.load(Ordering::Relaxed) {
                handle.pair(&name).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Let every task get going before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    let done = count.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    done as f64 / elapsed.as_secs_f64()
}

/// The floor under any hand-over between processes: one round trip over bare TCP from an
/// idle client to an idle peer (a thread blocked in `read`) and back, each after `HOLD` of
/// idleness as in [`handoff`]. A hand-over needs at least this much: the release must wake
/// the lock's keeper, and the grant must wake the waiter.
async fn idle_round_trip() -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the echo peer");
    let addr = listener.local_addr().expect("echo address");
    let peer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut socket, _) = listener.accept().expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut ping = [0u8; 16];
        while socket.read_exact(&mut ping).is_ok() {
            if socket.write_all(&ping).is_err() {
                break;
            }
        }
    });
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the echo peer");
    socket.set_nodelay(true).expect("nodelay");
    let mut trips = Vec::new();
    let mut pong = [0u8; 16];
    for i in 0..HANDOFF_TASKS + HANDOFF_GRANTS - 1 {
        tokio::time::sleep(HOLD).await;
        let start = Instant::now();
        socket.write_all(&[7; 16]).await.expect("ping");
        socket.read_exact(&mut pong).await.expect("pong");
        if i >= HANDOFF_TASKS {
            trips.push(start.elapsed());
        }
    }
    drop(socket);
    let _ = peer.join();
    trips.iter().sum::<Duration>() / trips.len() as u32
}

struct Handoff {
    mean_gap: Duration,
    p50_gap: Duration,
    /// The mean gap of the hand-overs that went to another task: how long a waiter waited
    /// after a release (Redis: the releasing task often takes the lock straight back).
    moved_gap: Option<Duration>,
    /// Of the hand-overs counted, how many went to a task other than the one before.
    changed: usize,
    handovers: usize,
}

/// `HANDOFF_TASKS` tasks take turns on one lock, each holding it `HOLD`.
async fn handoff(system: &System, round: usize) -> Handoff {
    let name = format!("hot-{round}");
    let origin = Instant::now();
    // Nanoseconds since `origin` at which the last release was sent.
    let released_at = Arc::new(AtomicU64::new(0));
    let log = Arc::new(std::sync::Mutex::new(Vec::<(usize, Duration)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let wanted = HANDOFF_TASKS + HANDOFF_GRANTS;
    let mut set = tokio::task::JoinSet::new();
    for id in 0..HANDOFF_TASKS {
        let handle = system.handle(id);
        let (released_at, log, stop, name) =
            (released_at.clone(), log.clone(), stop.clone(), name.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(held) = handle.acquire(&name, Some(&stop)).await else {
                    break;
                };
                let granted = origin.elapsed();
                let released = Duration::from_nanos(released_at.load(Ordering::SeqCst));
                {
                    let mut log = log.lock().unwrap();
                    log.push((id, granted.saturating_sub(released)));
                    if log.len() >= wanted {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(HOLD).await;
                released_at.store(origin.elapsed().as_nanos() as u64, Ordering::SeqCst);
                handle.release(held).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let log = log.lock().unwrap();
    // Skip the start, while the waiters were still queueing.
    let steady = &log[HANDOFF_TASKS..wanted];
    let gaps: Vec<Duration> = steady.iter().map(|(_, gap)| *gap).collect();
    let mean_gap = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    let moved: Vec<Duration> = steady
        .windows(2)
        .filter(|w| w[0].0 != w[1].0)
        .map(|w| w[1].1)
        .collect();
    let changed = moved.len();
    let moved_gap = (!moved.is_empty()).then(|| moved.iter().sum::<Duration>() / changed as u32);
    Handoff {
        mean_gap,
        p50_gap: latency(gaps).p50,
        moved_gap,
        changed,
        handovers: steady.len() - 1,
    }
}

/// `count` concurrent acquires of distinct locks from one client; acquires per second.
async fn burst(dl: &DistributedLock, count: usize, round: usize) -> f64 {
    let started = Instant::now();
    let mut acquires = tokio::task::JoinSet::new();
    for i in 0..count {
        let dl = dl.clone();
        acquires.spawn(async move {
            dl.lock(format!("burst-{round}-{i}"))
                .expires_in(LEASE)
                .await
                .expect("burst lock")
        });
    }
    let mut guards = Vec::with_capacity(count);
    while let Some(guard) = acquires.join_next().await {
        guards.push(guard.expect("task"));
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let mut releases = tokio::task::JoinSet::new();
    for guard in guards {
        releases.spawn(guard.release());
    }
    while let Some(released) = releases.join_next().await {
        released.expect("task").expect("burst release");
    }
    rate
}

// ---------- the run ----------

#[derive(Default)]
struct Results {
    p50: Vec<Vec<f64>>,
    p99: Vec<Vec<f64>>,
    pairs: Vec<Vec<f64>>,
    gap_mean: Vec<Vec<f64>>,
    gap_p50: Vec<Vec<f64>>,
    gap_moved: Vec<Vec<f64>>,
    changed: Vec<Vec<(usize, usize)>>,
    burst: Vec<f64>,
    /// Mean idle round trip over bare TCP, per round (see [`idle_round_trip`]).
    floor: Vec<f64>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

async fn run() {
    let settings = Settings {
        rounds: env_num("COMPARE_ROUNDS", 3) as usize,
        pairs: env_num("COMPARE_PAIRS", 2000) as usize,
        secs: env_num("COMPARE_SECS", 3),
        burst: env_num("COMPARE_BURST", 10_000) as usize,
        redis_retry: Duration::from_millis(env_num("COMPARE_REDIS_RETRY_MS", 10)),
    };
    let redis_url = env_str("COMPARE_REDIS_URL", "redis://127.0.0.1:6390/");
    let pg_url = env_str(
        "COMPARE_PG_URL",
        "postgres://postgres@127.0.0.1:5440/postgres",
    );

    let mut systems = Vec::new();
    let server = wanted("COMPARE_SYSTEMS", "leasehold").then(Server::start);
    if let Some(server) = &server {
        let dl = DistributedLock::builder("compare")
            .endpoint(&server.url)
            .build()
            .expect("client");
        systems.push(System::Leasehold(dl));
    }
    if wanted("COMPARE_SYSTEMS", "redis") {
        println!("redis: {redis_url}, retry every {:?}", settings.redis_retry);
        systems.push(System::Redis(
            RedisLocks::connect(&redis_url, settings.redis_retry).await,
        ));
    }
    if wanted("COMPARE_SYSTEMS", "postgres") {
        println!("postgres: {pg_url}");
        systems.push(System::Postgres(
            PgLocks::connect(&pg_url, THROUGHPUT_TASKS).await,
        ));
    }
    let n = systems.len();
    let names: Vec<&str> = systems.iter().map(|s| s.kind().name()).collect();
    println!(
        "client: one multi-thread runtime, {} workers; rounds {}, uncontended {} pairs, throughput {} s, burst {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        settings.rounds,
        settings.pairs,
        settings.secs,
        settings.burst
    );
    let mut results = Results {
        p50: vec![Vec::new(); n],
        p99: vec![Vec::new(); n],
        pairs: vec![Vec::new(); n],
        gap_mean: vec![Vec::new(); n],
        gap_p50: vec![Vec::new(); n],
        gap_moved: vec![Vec::new(); n],
        changed: vec![Vec::new(); n],
        burst: Vec::new(),
        floor: Vec::new(),
    };

    for round in 0..settings.rounds {
        // The systems' order rotates from round to round.
        let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
        println!("\n-- round {} --", round + 1);
        if wanted("COMPARE_SCENARIOS", "uncontended") && n > 0 {
            let turn: Vec<System> = order.iter().map(|&i| systems[i].clone()).collect();
            let lat = uncontended(&turn, settings.pairs).await;
            for (&i, l) in order.iter().zip(lat) {
                println!(
                    "uncontended  {:<9} p50 {:>7.1} µs  p99 {:>8.1} µs",
                    names[i],
                    us(l.p50),
                    us(l.p99)
                );
                results.p50[i].push(us(l.p50));
                results.p99[i].push(us(l.p99));
            }
        }
        if wanted("COMPARE_SCENARIOS", "throughput") {
            // The systems take turns in slices, so that the machine's drift within a round
            // (a peer's rate moved by half between two runs of a few seconds) falls on all
            // of them alike.
            let slice = Duration::from_secs(settings.secs) / THROUGHPUT_SLICES;
            let mut rates = vec![0.0; n];
            for _ in 0..THROUGHPUT_SLICES {
                for &i in &order {
                    rates[i] += throughput(&systems[i], THROUGHPUT_TASKS, slice).await
                        / f64::from(THROUGHPUT_SLICES);
                }
            }
            for &i in &order {
                println!(
                    "throughput   {:<9} {:>9.0} pairs/s ({THROUGHPUT_TASKS} tasks, distinct locks)",
                    names[i], rates[i]
                );
                results.pairs[i].push(rates[i]);
            }
        }
        if wanted("COMPARE_SCENARIOS", "handoff") {
            for &i in &order {
                let h = handoff(&systems[i], round).await;
                println!(
                    "handoff      {:<9} idle gap mean {:>8.1} µs p50 {:>8.1} µs, to another task {:>8.1} µs | {} of {} hand-overs to another task",
                    names[i],
                    us(h.mean_gap),
                    us(h.p50_gap),
                    h.moved_gap.map_or(f64::NAN, us),
                    h.changed,
                    h.handovers
                );
                results.gap_mean[i].push(us(h.mean_gap));
                results.gap_p50[i].push(us(h.p50_gap));
                if let Some(moved) = h.moved_gap {
                    results.gap_moved[i].push(us(moved));
                }
                results.changed[i].push((h.changed, h.handovers));
            }
            let floor = idle_round_trip().await;
            println!(
                "handoff      floor     idle round trip mean {:>8.1} µs (bare TCP echo, {HOLD:?} idle before each)",
                us(floor)
            );
            results.floor.push(us(floor));
        }
        if wanted("COMPARE_SCENARIOS", "burst") {
            if let Some(System::Leasehold(dl)) =
                systems.iter().find(|s| s.kind() == Kind::Leasehold)
            {
                let rate = burst(dl, settings.burst, round).await;
                println!(
                    "burst        leasehold {rate:>9.0} acquires/s ({} concurrent)",
                    settings.burst
                );
                results.burst.push(rate);
            }
        }
    }
    report(&systems, &results, &settings);
    drop(server);
}

fn ratio_text(a: Option<f64>, b: Option<f64>) -> String {
    a.zip(b)
        .map_or("–".to_owned(), |(a, b)| format!("{:.2}×", a / b))
}

fn report(systems: &[System], r: &Results, settings: &Settings) {
    let idx = |k: Kind| systems.iter().position(|s| s.kind() == k);
    let med = |v: &[Vec<f64>], k: Kind| idx(k).and_then(|i| median(&v[i]));
    let fmt = |v: Option<f64>, unit: &str| match v {
        Some(v) if unit == "/s" => format!("{v:.0}{unit}"),
        Some(v) => format!("{v:.0} {unit}"),
        None => "–".to_owned(),
    };
    let changed = |k: Kind| {
        idx(k).and_then(|i| {
            let c = &r.changed[i];
            // The worst round.
            c.iter().min_by_key(|(changed, _)| *changed).copied()
        })
    };
    println!(
        "\n## Medians of {} rounds (hand-overs: the worst round)\n",
        settings.rounds
    );
    println!("| scenario | leasehold | Redis | PostgreSQL |");
    println!("| --- | --- | --- | --- |");
    let row = |label: &str, v: &[Vec<f64>], unit: &str| {
        println!(
            "| {label} | {} | {} | {} |",
            fmt(med(v, Kind::Leasehold), unit),
            fmt(med(v, Kind::Redis), unit),
            fmt(med(v, Kind::Postgres), unit)
        );
    };
    row("uncontended acquire+release p50", &r.p50, "µs");
    row("uncontended acquire+release p99", &r.p99, "µs");
    row("32 tasks, distinct locks", &r.pairs, "pairs/s");
    row(
        "8 tasks, one lock, 1 ms hold: mean idle gap",
        &r.gap_mean,
        "µs",
    );
    row("8 tasks, one lock: p50 idle gap", &r.gap_p50, "µs");
    row(
        "8 tasks, one lock: mean gap when another task takes over",
        &r.gap_moved,
        "µs",
    );
    let ch = |k: Kind| match changed(k) {
        Some((c, n)) => format!("{c} of {n}"),
        None => "–".to_owned(),
    };
    println!(
        "| 8 tasks, one lock: hand-overs to another task | {} | {} | {} |",
        ch(Kind::Leasehold),
        ch(Kind::Redis),
        ch(Kind::Postgres)
    );
    println!(
        "| {} concurrent acquires, one client | {} | – | – |",
        settings.burst,
        fmt(median(&r.burst), "acquires/s")
    );
    if let Some(floor) = median(&r.floor) {
        println!(
            "\nFloor under any hand-over: one idle round trip over bare TCP, {floor:.0} µs ({} of PostgreSQL's mean idle gap).",
            ratio_text(Some(floor), med(&r.gap_mean, Kind::Postgres))
        );
    }

    println!("\n## Issue 14's targets\n");
    println!("| target | measured | verdict |");
    println!("| --- | --- | --- |");
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "not measured",
    };
    let line = |target: &str, value: Option<f64>, ok: fn(f64) -> bool, unit: &str| {
        println!(
            "| {target} | {} | {} |",
            value.map_or("–".to_owned(), |v| format!("{v:.2}{unit}")),
            verdict(value.map(ok))
        );
    };
    let ours_pairs = med(&r.pairs, Kind::Leasehold);
    line(
        "32 tasks: ≥ 2× PostgreSQL's pairs/s",
        ratio(ours_pairs, med(&r.pairs, Kind::Postgres)),
        |v| v >= 2.0,
        "×",
    );
    line(
        "32 tasks: ≥ 0.75× Redis's pairs/s",
        ratio(ours_pairs, med(&r.pairs, Kind::Redis)),
        |v| v >= 0.75,
        "×",
    );
    line(
        "uncontended p50 ≤ 1.3× Redis's",
        ratio(med(&r.p50, Kind::Leasehold), med(&r.p50, Kind::Redis)),
        |v| v <= 1.3,
        "×",
    );
    line(
        "8 tasks, 1 ms hold: mean idle gap ≤ 0.5× PostgreSQL's",
        ratio(
            med(&r.gap_mean, Kind::Leasehold),
            med(&r.gap_mean, Kind::Postgres),
        ),
        |v| v <= 0.5,
        "×",
    );
    let fifo = changed(Kind::Leasehold);
    println!(
        "| 8 tasks: strict FIFO, ≥ 195 of 199 hand-overs to another task | {} | {} |",
        fifo.map_or("–".to_owned(), |(c, n)| format!("{c} of {n}")),
        verdict(fifo.map(|(c, _)| c >= 195))
    );
    let burst = median(&r.burst);
    println!(
        "| {} concurrent acquires: ≥ 50,000 acquires/s | {} | {} |",
        settings.burst,
        burst.map_or("–".to_owned(), |v| format!("{v:.0}/s")),
        verdict(burst.map(|v| v >= 50_000.0))
    );
}
