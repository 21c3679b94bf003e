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
use support::contend::{
    KINDS, Shared, Take, assert_kinds_overlapped, contend_as, names, take_turn,
};
use support::etcd::EtcdCluster;
use support::history::{self, Report};
use support::proxy::Proxy;
use support::{TestServer, within};

const BOUND: Duration = Duration::from_secs(60);
/// etcd counts leases in whole seconds, with a 2 s minimum.
const LEASE: Duration = Duration::from_secs(2);
/// Four clients taking turns on two locks.
const MUTEXES: [(&str, Take); 4] = [
    ("alpha", Take::Lock),
    ("beta", Take::Lock),
    ("alpha", Take::Lock),
    ("beta", Take::Lock),
];

/// The scenarios' contenders: the mutexes', or every other kind (`support::contend::KINDS`).
#[derive(Clone, Copy)]
enum Cast {
    Mutexes,
    Kinds,
}

impl Cast {
    fn clients(self) -> &'static [(&'static str, Take)] {
        match self {
            Cast::Mutexes => &MUTEXES,
            Cast::Kinds => &KINDS,
        }
    }
}

/// `cast`'s clients taking turns through `endpoints` (each client starting at a different
/// server and keeping to it while it answers).
fn contenders(
    endpoints: &[String],
    shared: &Shared,
    cast: Cast,
) -> Vec<tokio::task::JoinHandle<()>> {
    (cast.clients().iter().enumerate())
        .map(|(i, &(lock, take))| {
            let mut order = endpoints.to_vec();
            order.rotate_left(i % endpoints.len());
            let dl = DistributedLock::builder("faults")
                .endpoints(order)
                .prefer_first_endpoint()
                .build()
                .unwrap();
            contend_as(
                dl,
                format!("c{i}"),
                lock.to_owned(),
                take,
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
    cast: Cast,
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
    for (lock, take) in names(cast.clients()) {
        let bound = LEASE + LEASE + Duration::from_secs(2);
        let lease = leasehold::DEFAULT_EXPIRES_IN;
        let guard = take_turn(&dl, lock, take, "probe", lease, bound, true).await;
        assert!(
            guard.is_ok(),
            "{lock} not acquirable within {bound:?}: {:?}",
            guard.err()
        );
    }
    let report = history::check(&[], &shared.clients.events(), &shared.resource.writes());
    if let Cast::Kinds = cast {
        assert_kinds_overlapped("etcd", shared);
    }
    report
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
    server_killed(Cast::Mutexes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_servers_killed_under_every_kind() {
    server_killed(Cast::Kinds).await;
}

async fn server_killed(cast: Cast) {
    let etcd = EtcdCluster::start(1).await;
    let (first, second) = (
        support::etcd_server_process(&etcd).await,
        support::etcd_server_process(&etcd).await,
    );
    let endpoints = vec![first.url.clone(), second.url.clone()];
    let shared = Shared::new();
    let tasks = contenders(&endpoints, &shared, cast);
    tokio::time::sleep(LEASE).await;
    first.kill().await;
    tokio::time::sleep(LEASE * 2).await;
    let report = finish(&shared, tasks, &endpoints[1..], cast).await;
    assert_clean("one of two etcd-backed servers killed", &report);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_of_three_killed() {
    member_killed(Cast::Mutexes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_of_three_killed_under_every_kind() {
    member_killed(Cast::Kinds).await;
}

async fn member_killed(cast: Cast) {
    let mut etcd = EtcdCluster::start(3).await;
    let servers = [
        TestServer::start_over(Some(&etcd), |b| b).await,
        TestServer::start_over(Some(&etcd), |b| b).await,
    ];
    let endpoints: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let shared = Shared::new();
    let tasks = contenders(&endpoints, &shared, cast);
    tokio::time::sleep(LEASE).await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    tokio::time::sleep(LEASE * 2).await;
    etcd.restart(leader).await;
    tokio::time::sleep(LEASE).await;
    let report = finish(&shared, tasks, &endpoints, cast).await;
    assert_clean("the etcd leader of three killed and restarted", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_between_a_server_and_etcd_cut() {
    path_cut(Cast::Mutexes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_between_a_server_and_etcd_cut_under_every_kind() {
    path_cut(Cast::Kinds).await;
}

async fn path_cut(cast: Cast) {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = etcd.endpoint(0);
    let etcd_addr = endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(etcd_addr).await;
    let cut_off = TestServer::start_with(|b| b.etcd([proxy.url()])).await;
    let direct = TestServer::start_over(Some(&etcd), |b| b).await;
    let endpoints = vec![cut_off.url(), direct.url()];
    let shared = Shared::new();
    let tasks = contenders(&endpoints, &shared, cast);
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
    let report = finish(&shared, tasks, &endpoints, cast).await;
    assert_clean("the path from a server to etcd cut", &report);
}
