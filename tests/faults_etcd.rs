//! The fault suite on the etcd backend: a server killed, an etcd member killed, and the
//! path between a server and etcd cut, while clients contend through several servers.
//!
//! Each server only sees its own part of the story, so the checks here use no server
//! trail: no stale write accepted by the fenced resource, no two clients believing they
//! hold a lock at once (every held-claim of a token between its first and last is one
//! span; spans never overlap), and every lock acquirable again after the faults heal.
#![cfg(feature = "etcd")]

mod support;

use leasehold::DistributedLock;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::contend::{Shared, contend_waiting};
use support::etcd::EtcdCluster;
use support::history::{self, Report};
use support::proxy::Proxy;
use support::{TestServer, within};

const BOUND: Duration = Duration::from_secs(60);
/// etcd counts leases in whole seconds, with a 2 s minimum.
const LEASE: Duration = Duration::from_secs(2);
const LOCKS: [&str; 2] = ["alpha", "beta"];

/// Four clients taking turns on two locks through `endpoints` (each client starting at a
/// different server and keeping to it while it answers).
fn contenders(endpoints: &[String], shared: &Shared) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|i| {
            let mut order = endpoints.to_vec();
            order.rotate_left(i % endpoints.len());
            let dl = DistributedLock::builder("faults")
                .endpoints(order)
                .prefer_first_endpoint()
                .build()
                .unwrap();
            let (client, lock) = (format!("c{i}"), LOCKS[i % 2].to_owned());
            contend_waiting(
                dl,
                client,
                lock,
                LEASE,
                Duration::from_secs(5),
                shared,
                i as u64,
            )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_servers_killed() {
    let etcd = EtcdCluster::start(1).await;
    let (first, second) = (
        support::etcd_server_process(&etcd).await,
        support::etcd_server_process(&etcd).await,
    );
    let endpoints = vec![first.url.clone(), second.url.clone()];
    let shared = Shared::new();
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
    let shared = Shared::new();
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
    let shared = Shared::new();
    let tasks = contenders(&endpoints, &shared);
    tokio::time::sleep(LEASE).await;
    // The first server can no longer reach etcd for three leases: its calls hang, then
    // fail; clients move to the other server, and leases are never doubled meanwhile.
    let grants_before = direct.metric("leasehold_grants_total").await;
    proxy.cut();
    tokio::time::sleep(LEASE * 3).await;
    proxy.heal();
    let served = direct.metric("leasehold_grants_total").await - grants_before;
    println!("during the cut the directly connected server made {served} grants");
    assert!(served > 0.0, "the service went on through the other server");
    tokio::time::sleep(LEASE).await;
    let report = finish(&shared, tasks, &endpoints).await;
    assert_clean("the path from a server to etcd cut", &report);
}
