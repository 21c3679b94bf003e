//! What the benchmarks share: settings, percentiles, server processes, the hand-over loop.
#![allow(dead_code)]

use leasehold::DistributedLock;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        mean,
    }
}

/// Tasks (one per client given) take turns on one lock for `duration`. Returns the gaps
/// from a release being sent to the next holder's grant arriving, how many grants went to
/// the task that had the lock just before, and how many grants were counted.
pub async fn handoff(
    clients: Vec<DistributedLock>,
    lease: Duration,
    duration: Duration,
) -> (Stats, usize, usize) {
    handoff_with(clients, lease, duration, |dl, _| dl.lock("hot")).await
}

/// [`handoff`], each task `id` taking what `request(client, id)` asks for: a permit of a
/// semaphore, a read or a write lock. The gap of a grant is counted from the latest
/// release, the one that let it in.
pub async fn handoff_with(
    clients: Vec<DistributedLock>,
    lease: Duration,
    duration: Duration,
    request: fn(&DistributedLock, usize) -> leasehold::LockRequest,
) -> (Stats, usize, usize) {
    let tasks = clients.len();
    let origin = Instant::now();
    // Nanoseconds since `origin` at which the last release was sent.
    let released_at = Arc::new(AtomicU64::new(0));
    let log = Arc::new(Mutex::new(Vec::<(usize, Duration)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for (id, dl) in clients.into_iter().enumerate() {
        let (released_at, log, stop) = (released_at.clone(), log.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let guard = request(&dl, id).expires_in(lease).await.unwrap();
                let granted = origin.elapsed();
                let released = Duration::from_nanos(released_at.load(Ordering::SeqCst));
                log.lock()
                    .unwrap()
                    .push((id, granted.saturating_sub(released)));
                released_at.store(origin.elapsed().as_nanos() as u64, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    let log = log.lock().unwrap();
    // Skip the start, when waiters were still queueing.
    let steady = &log[tasks.min(log.len())..];
    let repeats = steady.windows(2).filter(|w| w[0].0 == w[1].0).count();
    (
        stats(steady.iter().map(|(_, gap)| *gap).collect()),
        repeats,
        steady.len(),
    )
}

/// The other kinds' hand-overs, to set beside the mutex's: the permit of a one-permit
/// semaphore passing between the tasks, then writers (even ids) and readers (odd ids)
/// taking turns on one read-write lock. Each: (gaps, grants).
pub async fn kinds_handoff(
    clients: Vec<DistributedLock>,
    lease: Duration,
    duration: Duration,
) -> [(Stats, usize); 2] {
    let (semaphore, _, semaphore_grants) =
        handoff_with(clients.clone(), lease, duration, |dl, _| {
            dl.semaphore("hot-semaphore", 1)
        })
        .await;
    let (rw, _, rw_grants) = handoff_with(clients, lease, duration, |dl, id| {
        if id % 2 == 0 {
            dl.write_lock("hot-rw")
        } else {
            dl.read_lock("hot-rw")
        }
    })
    .await;
    [(semaphore, semaphore_grants), (rw, rw_grants)]
}

/// A server process; its address is read from what it prints (`listening on URL`).
pub struct Spawned {
    pub child: Child,
    pub url: String,
}

impl Spawned {
    pub fn start(command: &mut Command) -> Spawned {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server process starts");
        // A bare server prints on stdout, the real one logs on stderr: read both.
        let (tx, rx) = std::sync::mpsc::channel();
        let streams = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some((_, url)) = line.split_once("listening on ") {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
            });
        }
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed its address");
        Spawned { child, url }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
