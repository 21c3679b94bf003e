//! The fault suite on the etcd backend: a server killed, an etcd member killed, and the
//! path between a server and etcd cut, while clients contend through several servers.
//!
//! Each server only sees its own part of the story, so the checks here use no server
//! trail: no stale write accepted by the fenced resource, no two clients believing they
//! hold a lock at once (every held-claim of a token between its first and last is one
//! span; spans never overlap), and every lock acquirable again after the faults heal.
#![cfg(feature = "etcd")]

mod support;

use distributed_lock::DistributedLock;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::etcd::EtcdCluster;
use support::history::{self, ClientKind, Clients, Report, Resource};
use support::process::ServerProcess;
use support::proxy::Proxy;
use support::{TestServer, within};

const BOUND: Duration = Duration::from_secs(60);
/// etcd counts leases in whole seconds, with a 2 s minimum.
const LEASE: Duration = Duration::from_secs(2);
const LOCKS: [&str; 2] = ["alpha", "beta"];

#[derive(Clone, Default)]
struct Shared {
    clients: Clients,
    resource: Resource,
    stop: Arc<AtomicBool>,
}

impl Default for Resource {
    fn default() -> Resource {
        Resource::new(true)
    }
}

/// Four clients taking turns on two locks through `endpoints` (each client starting at a
/// different server), acquiring, claiming, writing and releasing until stopped.
fn contenders(endpoints: &[String], shared: &Shared) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|i| {
            let mut order = endpoints.to_vec();
            order.rotate_left(i % endpoints.len());
            let dl = DistributedLock::builder("faults")
                .endpoints(order)
                .build()
                .unwrap();
            let (client, lock) = (format!("c{i}"), LOCKS[i % 2]);
            let Shared {
                clients,
                resource,
                stop,
            } = shared.clone();
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(i as u64);
                while !stop.load(Ordering::SeqCst) {
                    let Ok(guard) = dl
                        .lock(lock)
                        .expires_in(LEASE)
                        .timeout(Duration::from_secs(5))
                        .await
                    else {
                        continue;
                    };
                    let token = guard.fencing_token();
                    clients.record(&client, lock, ClientKind::Acquired(token));
                    for _ in 0..rng.usize(1..4) {
                        if !guard.is_held() {
                            clients.record(&client, lock, ClientKind::Lost(token));
                            break;
                        }
                        clients.record(&client, lock, ClientKind::Held(token));
                        resource.write(lock, &client, token);
                        tokio::time::sleep(Duration::from_millis(rng.u64(1..40))).await;
                    }
                    let _ = guard.release().await;
                }
            })
        })
        .collect()
}

async fn finish(
    shared: &Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoints: &[String],
) -> Report {
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        within(BOUND, t).await.unwrap();
    }
    // After the faults heal every lock can be acquired again within lease + grace + 2 s
    // (the etcd backend's grace is a lease).
    let dl = DistributedLock::builder("faults")
        .endpoints(endpoints.to_vec())
        .build()
        .unwrap();
    for lock in LOCKS {
        let bound = LEASE + LEASE + Duration::from_secs(2);
        let guard = dl.lock(lock).timeout(bound).await;
        assert!(
            guard.is_ok(),
            "{lock} not acquirable within {bound:?}: {:?}",
            guard.err()
        );
    }
    history::check(&[], &shared.clients.events(), &shared.resource.writes())
}

fn assert_clean(scenario: &str, report: &Report) {
    println!("{scenario}: {}", report.summary());
    assert!(
        report.violations.is_empty(),
        "{scenario}: {:#?}",
        report.violations
    );
    assert!(
        report.writes_accepted > 0,
        "{scenario}: nothing was written"
    );
}

async fn etcd_server(etcd: &EtcdCluster) -> ServerProcess {
    let endpoints = etcd.endpoints().join(",");
    ServerProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_servers_killed() {
    let etcd = EtcdCluster::start(1).await;
    let (first, second) = (etcd_server(&etcd).await, etcd_server(&etcd).await);
    let endpoints = vec![first.url.clone(), second.url.clone()];
    let shared = Shared::default();
    let tasks = contenders(&endpoints, &shared);
    tokio::time::sleep(LEASE).await;
    first.kill().await;
    tokio::time::sleep(LEASE * 2).await;
    let report = finish(&shared, tasks, &endpoints[1..]).await;
    assert_clean("one of two etcd-backed servers killed", &report);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_of_three_killed() {
    let mut etcd = EtcdCluster::start(3).await;
    let servers = [
        TestServer::start_over(Some(&etcd), |b| b).await,
        TestServer::start_over(Some(&etcd), |b| b).await,
    ];
    let endpoints: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let shared = Shared::default();
    let tasks = contenders(&endpoints, &shared);
    tokio::time::sleep(LEASE).await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    tokio::time::sleep(LEASE * 2).await;
    etcd.restart(leader).await;
    tokio::time::sleep(LEASE).await;
    let report = finish(&shared, tasks, &endpoints).await;
    assert_clean("the etcd leader of three killed and restarted", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_between_a_server_and_etcd_cut() {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = etcd.endpoint(0);
    let etcd_addr = endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(etcd_addr).await;
    let cut_off = TestServer::start_with(|b| b.etcd([proxy.url()])).await;
    let direct = TestServer::start_over(Some(&etcd), |b| b).await;
    let endpoints = vec![cut_off.url(), direct.url()];
    let shared = Shared::default();
    let tasks = contenders(&endpoints, &shared);
    tokio::time::sleep(LEASE).await;
    // The first server can no longer reach etcd for three leases: its calls hang, then
    // fail; clients move to the other server, and leases are never doubled meanwhile.
    let grants_before = direct.metric("distributed_lock_grants_total").await;
    proxy.cut();
    tokio::time::sleep(LEASE * 3).await;
    proxy.heal();
    let served = direct.metric("distributed_lock_grants_total").await - grants_before;
    println!("during the cut the directly connected server made {served} grants");
    assert!(served > 0.0, "the service went on through the other server");
    tokio::time::sleep(LEASE).await;
    let report = finish(&shared, tasks, &endpoints).await;
    assert_clean("the path from a server to etcd cut", &report);
}
