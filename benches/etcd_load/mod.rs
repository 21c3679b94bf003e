//! Throughput under load: many tasks on distinct locks, through our server and through
//! etcd's own lock service (v3lock), and the scaling of several servers over one 3-member
//! etcd against etcd's own write rate.

use super::common::{Spawned, env_num};
use super::etcd_support::EtcdCluster;
use etcd_client::{Client, LockOptions, PutOptions};
use leasehold::DistributedLock;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Tasks in the distinct-locks scenario.
pub const TASKS: usize = 32;

/// Pairs per second of `tasks` tasks, each taking and releasing a lock of its own (one
/// shared client), for `duration` after a warm-up of a tenth of it.
pub async fn ours_distinct(dl: &DistributedLock, tasks: usize, duration: Duration) -> f64 {
    let dl = dl.clone();
    run_tasks(tasks, duration, move |i| {
        let dl = dl.clone();
        let name = format!("distinct-{i}");
        async move {
            dl.lock(&name).await.unwrap().release().await.unwrap();
        }
    })
    .await
}

/// The same through etcd's lock service: each task has a session lease of its own, as each
/// would be a client of the service, over one shared etcd connection.
pub async fn v3lock_distinct(client: &Client, tasks: usize, duration: Duration) -> f64 {
    let mut sessions = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        sessions.push(client.clone().lease_grant(60, None).await.unwrap().id());
    }
    let sessions = Arc::new(sessions);
    let c = client.clone();
    let ids = sessions.clone();
    let rate = run_tasks(tasks, duration, move |i| {
        let mut c = c.clone();
        let session = ids[i];
        let name = format!("bench/v3lock-distinct-{i}");
        async move {
            let key = c
                .lock(name, Some(LockOptions::new().with_lease(session)))
                .await
                .unwrap()
                .key()
                .to_vec();
            c.unlock(key).await.unwrap();
        }
    })
    .await;
    for &session in sessions.iter() {
        let _ = client.clone().lease_revoke(session).await;
    }
    rate
}

/// etcd's own write rate: `tasks` tasks putting keys of their own, as fast as etcd takes
/// them (puts per second). The ceiling of anything that writes to etcd.
pub async fn etcd_writes(client: &Client, tasks: usize, duration: Duration) -> f64 {
    let c = client.clone();
    run_tasks(tasks, duration, move |i| {
        let mut c = c.clone();
        async move {
            c.put(format!("bench/raw/{i}"), "v", None::<PutOptions>)
                .await
                .unwrap();
        }
    })
    .await
}

/// Runs `step(i)` in a loop in each of `tasks` tasks; the steps completed per second over
/// `duration`, counted after a warm-up of a tenth of it.
async fn run_tasks<F, Fut>(tasks: usize, duration: Duration, step: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let step = Arc::new(step);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let (step, done, stop) = (step.clone(), done.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                step(i).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tokio::time::sleep(duration / 10).await;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(duration).await;
    let (elapsed, after) = (start.elapsed(), done.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    (after - before) as f64 / elapsed.as_secs_f64()
}

/// One row of the scaling table.
pub struct ScalingRow {
    pub servers: usize,
    pub pairs_per_sec: f64,
    /// Cores used meanwhile by the etcd members, the servers and the bench (the clients):
    /// all share this machine, so their sum near its core count is the machine's limit,
    /// not etcd's.
    pub cores: [f64; 3],
}

/// 1, 2 and 3 servers over one 3-member etcd, `TASKS` tasks per server on distinct locks
/// (each server's tasks share a client that talks to that server only); and etcd's own
/// write rate in the same run (measured first and last, the mean reported). The servers get
/// `server_args`, their clients `api_key`.
pub async fn scaling(
    duration: Duration,
    server_args: &[String],
    api_key: &str,
) -> (Vec<ScalingRow>, f64) {
    let cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints().join(",");
    let client = Client::connect(cluster.endpoints(), None).await.unwrap();
    let writers = env_num("BENCH_RAW_WRITERS", 64) as usize;
    let raw_before = etcd_writes(&client, writers, duration).await;
    let mut rows = Vec::new();
    for servers in 1..=3 {
        let spawned: Vec<Spawned> = (0..servers)
            .map(|_| {
                Spawned::start(
                    Command::new(env!("CARGO_BIN_EXE_leasehold-server"))
                        .args(["--listen", "127.0.0.1:0", "--backend", "etcd"])
                        .args(["--etcd-endpoints", &endpoints])
                        .args(server_args)
                        .env("RUST_LOG", "warn,leasehold_server=info"),
                )
            })
            .collect();
        let clients: Vec<DistributedLock> = spawned
            .iter()
            .map(|s| {
                DistributedLock::builder(api_key)
                    .endpoint(&s.url)
                    .build()
                    .unwrap()
            })
            .collect();
        let etcd_pids: Vec<u32> = (0..3).filter_map(|i| cluster.pid(i)).collect();
        let server_pids: Vec<u32> = spawned.iter().map(|s| s.child.id()).collect();
        let groups = [etcd_pids, server_pids, vec![std::process::id()]];
        let used = |groups: &[Vec<u32>; 3]| {
            groups
                .clone()
                .map(|pids| super::cpu(&pids).iter().sum::<f64>())
        };
        let before = (used(&groups), Instant::now());
        let mut set = tokio::task::JoinSet::new();
        for (i, dl) in clients.into_iter().enumerate() {
            set.spawn(async move {
                let dl = dl.clone();
                run_tasks(TASKS, duration, move |t| {
                    let dl = dl.clone();
                    let name = format!("scale-{i}-{t}");
                    async move {
                        dl.lock(&name).await.unwrap().release().await.unwrap();
                    }
                })
                .await
            });
        }
        let mut total = 0.0;
        while let Some(rate) = set.join_next().await {
            total += rate.unwrap();
        }
        let (after, elapsed) = (used(&groups), before.1.elapsed().as_secs_f64());
        let cores = std::array::from_fn(|i| (after[i] - before.0[i]) / elapsed);
        rows.push(ScalingRow {
            servers,
            pairs_per_sec: total,
            cores,
        });
        drop(spawned);
    }
    let raw_after = etcd_writes(&client, writers, duration).await;
    (rows, (raw_before + raw_after) / 2.0)
}
