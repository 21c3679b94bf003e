//! The etcd backend beyond the shared conformance suite: several servers over one etcd,
//! servers and etcd members that die, etcd restarts, lease rounding, the key layout.
//! Every test runs real etcd processes (see `support/etcd.rs`).
#![cfg(feature = "etcd")]

mod support;

use etcd_client::GetOptions;
use leasehold::DistributedLock;
use leasehold::server::{Server, ServerBuilder};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::etcd::EtcdCluster;
use support::proxy::Proxy;
use support::{TestServer, eventually, raw, within};
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(20);

/// A client that uses the first endpoint while it answers (the tests kill it).
fn client(endpoints: &[String], key: &str) -> DistributedLock {
    DistributedLock::builder(key)
        .endpoints(endpoints.iter().cloned())
        .prefer_first_endpoint()
        .build()
        .expect("client builds")
}

fn acquire_body(name: &str, lease_ms: u64, poll_ms: u64, request_id: &str) -> String {
    format!(
        r#"{{"name":"{name}","lease_ms":{lease_ms},"poll_ms":{poll_ms},"request_id":"{request_id}"}}"#
    )
}

async fn post(server: &TestServer, path: &str, key: &str, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {key}");
    let (status, text) = raw(server.addr, "POST", path, &[("authorization", &auth)], body).await;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A `leasehold-server --backend etcd` process, killed on drop.
/// Inspects `name` through `url`: (holder token, waiters).
async fn inspect_at(url: &str, key: &str, name: &str) -> (Option<u64>, u64) {
    let addr = url.trim_start_matches("http://").parse().unwrap();
    let (status, body) = raw(
        addr,
        "GET",
        &format!("/v1/locks/{}", support::encode(name)),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    if status == 404 {
        return (None, 0);
    }
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        info["holder"]["fencing_token"].as_u64(),
        info["waiters"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn servers_over_one_etcd_share_locks_and_keep_fifo_order() {
    let etcd = EtcdCluster::start(1).await;
    let a = TestServer::start_over(Some(&etcd), |b| b).await;
    let b = TestServer::start_over(Some(&etcd), |b| b).await;
    let holder = a.client("p").lock("shared").await.unwrap();
    assert_eq!(
        b.inspect("p", "shared").await,
        (Some(holder.fencing_token()), 0)
    );
    // Waiters queue alternately through both servers, one after another.
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..4u64 {
        let dl = if i % 2 == 0 { &a } else { &b }.client("p");
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = dl
                .lock("shared")
                .expires_in(Duration::from_secs(30))
                .await
                .unwrap();
            order.lock().unwrap().push((i, guard.fencing_token()));
            guard.release().await.unwrap();
        }));
        eventually(BOUND, "waiter queued", || async {
            a.inspect("p", "shared").await.1 == i + 1
        })
        .await;
    }
    let first_token = holder.fencing_token();
    holder.release().await.unwrap();
    for w in waiters {
        within(BOUND, w).await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let mut last = first_token;
    for (_, token) in order {
        assert!(token > last, "tokens increase: {token} after {last}");
        last = token;
    }
}

#[tokio::test]
async fn new_locks_racing_through_two_servers_never_overshoot_the_lock_quota() {
    let etcd = EtcdCluster::start(1).await;
    let a = TestServer::start_over(Some(&etcd), |b| b.max_locks_per_project(5)).await;
    let b = TestServer::start_over(Some(&etcd), |b| b.max_locks_per_project(5)).await;
    let (in_a, in_b) = (a.client("p"), b.client("p"));
    // 40 new locks at once, half through each server, each tried once.
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..40 {
        let dl = if i % 2 == 0 { &in_a } else { &in_b }.clone();
        tries.spawn(async move { dl.lock(format!("n{i}")).timeout(Duration::ZERO).await });
    }
    let mut held = Vec::new();
    while let Some(done) = within(BOUND, tries.join_next()).await {
        match done.unwrap() {
            Ok(guard) => held.push(guard),
            Err(e) => assert!(e.is_limit_reached(), "{e}"),
        }
    }
    assert!(
        (1..=5).contains(&held.len()),
        "{} of 40 racing new locks held, with a quota of 5",
        held.len()
    );
    for guard in held {
        guard.release().await.unwrap();
    }
    // Refusals left nothing behind: the whole quota is free again.
    let mut again = Vec::new();
    for i in 0..5 {
        let dl = if i % 2 == 0 { &in_a } else { &in_b };
        again.push(
            dl.lock(format!("m{i}"))
                .timeout(Duration::ZERO)
                .await
                .unwrap(),
        );
    }
    let err = in_a.lock("m5").timeout(Duration::ZERO).await.unwrap_err();
    assert!(err.is_limit_reached(), "{err}");
}

#[tokio::test]
async fn a_request_id_finds_its_grant_and_its_place_through_any_server() {
    let etcd = EtcdCluster::start(1).await;
    let a = TestServer::start_over(Some(&etcd), |b| b).await;
    let b = TestServer::start_over(Some(&etcd), |b| b).await;
    let first = "11111111111111111111111111111111";
    let second = "22222222222222222222222222222222";
    // A grant, repeated through the other server: the same lease and token, no second
    // holder.
    let (status, granted) = post(
        &a,
        "/v1/acquire",
        "p",
        &acquire_body("x", 5000, 1000, first),
    )
    .await;
    assert_eq!(status, 200, "{granted}");
    let (status, again) = post(
        &b,
        "/v1/acquire",
        "p",
        &acquire_body("x", 5000, 1000, first),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(granted["lease_id"], again["lease_id"]);
    assert_eq!(granted["fencing_token"], again["fencing_token"]);
    assert_eq!(a.inspect("p", "x").await.1, 0);
    // A waiter polls through A, then through B: still one waiter, still first in line.
    let (status, waiting) =
        post(&a, "/v1/acquire", "p", &acquire_body("x", 5000, 50, second)).await;
    assert_eq!((status, waiting["position"].as_u64()), (202, Some(0)));
    let (status, waiting) =
        post(&b, "/v1/acquire", "p", &acquire_body("x", 5000, 50, second)).await;
    assert_eq!((status, waiting["position"].as_u64()), (202, Some(0)));
    assert_eq!(b.inspect("p", "x").await.1, 1);
    // The holder releases through B; the waiter's next poll, through A, gets the lock.
    let release = format!(r#"{{"name":"x","lease_id":{}}}"#, granted["lease_id"]);
    let (status, _) = post(&b, "/v1/release", "p", &release).await;
    assert_eq!(status, 200);
    let (status, next) = post(
        &a,
        "/v1/acquire",
        "p",
        &acquire_body("x", 5000, 1000, second),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    assert!(next["fencing_token"].as_u64() > granted["fencing_token"].as_u64());
    // Releasing the old lease again, anywhere: gone.
    let (status, _) = post(&a, "/v1/release", "p", &release).await;
    assert_eq!(status, 410);
}

/// etcd deletes a release's keys, but its answer is lost on the way back; the server's
/// retry finds the keys gone. That is still this release, not a `410`/`404`.
#[tokio::test]
async fn a_release_whose_answer_from_etcd_was_lost_is_still_a_release() {
    let etcd = EtcdCluster::start(1).await;
    let etcd_addr = etcd
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = Proxy::start(etcd_addr).await;
    let server = TestServer::start_with(|b| b.etcd([proxy.url()])).await;
    let request = acquire_body("x", 5000, 1000, "33333333333333333333333333333333");
    let (status, granted) = post(&server, "/v1/acquire", "p", &request).await;
    assert_eq!(status, 200, "{granted}");

    proxy.cut_answers();
    let (addr, release) = (
        server.addr,
        format!(r#"{{"name":"x","lease_id":{}}}"#, granted["lease_id"]),
    );
    let released = tokio::spawn(async move {
        let auth = [("authorization", "Bearer p")];
        raw(addr, "POST", "/v1/release", &auth, &release).await
    });
    let direct = etcd.client().await;
    eventually(BOUND, "etcd deleted the lock's keys", || {
        let mut direct = direct.clone();
        async move {
            let all = GetOptions::new().with_prefix().with_count_only();
            let found = direct.get("/leasehold/", Some(all)).await.unwrap();
            found.count() == 0
        }
    })
    .await;
    // The server's connection to etcd breaks with the answer still held: it retries.
    proxy.reset();
    proxy.heal();
    let (status, body) = within(BOUND, released).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn leases_are_whole_seconds_and_never_shorter_than_asked() {
    let server = TestServer::start_on(support::Backend::Etcd).await;
    for (asked, at_least) in [(300, 1000), (2500, 3000), (4000, 4000)] {
        let id = format!("{asked:032x}");
        let (status, granted) = post(
            &server,
            "/v1/acquire",
            "p",
            &acquire_body(&format!("l{asked}"), asked, 1000, &id),
        )
        .await;
        assert_eq!(status, 200, "{granted}");
        let lease_ms = granted["lease_ms"].as_u64().unwrap();
        assert_eq!(lease_ms % 1000, 0, "whole seconds: {lease_ms}");
        assert!(
            lease_ms >= at_least,
            "{asked} ms asked, {lease_ms} ms granted"
        );
        // Renewals report the same length.
        let renew = format!(
            r#"{{"leases":[{{"name":"l{asked}","lease_id":{}}}]}}"#,
            granted["lease_id"]
        );
        let (status, renewed) = post(&server, "/v1/renew", "p", &renew).await;
        assert_eq!(status, 200);
        assert_eq!(renewed["results"][0]["lease_ms"].as_u64(), Some(lease_ms));
    }
    // A made-up lease id renews nothing and releases nothing.
    let renew = r#"{"leases":[{"name":"l300","lease_id":"7fffffffffffffff0000000000000000"}]}"#;
    let (_, renewed) = post(&server, "/v1/renew", "p", renew).await;
    assert_eq!(renewed["results"][0]["status"], "gone");
}

#[tokio::test]
async fn projects_and_names_that_share_prefixes_never_meet() {
    use leasehold::server::new_key;
    let (a, a_line) = new_key("a");
    let (ab, ab_line) = new_key("ab");
    let dir = std::env::temp_dir().join(format!("dl-etcd-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        format!(
            "[[projects]]\nname = \"a\"\nmax_locks = 2\nkeys = [\n{a_line}\n]\n\
             [[projects]]\nname = \"ab\"\nkeys = [\n{ab_line}\n]\n"
        ),
    )
    .unwrap();
    let server = TestServer::start_on_with(support::Backend::Etcd, |b| b.key_file(&file)).await;
    let in_a = server.client(&a);
    let in_ab = server.client(&ab);
    // Names that would alias under a naive `project/name` layout.
    let held: Vec<_> = [(&in_a, "b/c"), (&in_a, "b"), (&in_ab, "c"), (&in_ab, "/c")]
        .into_iter()
        .map(|(dl, name)| async move { dl.lock(name).timeout(Duration::ZERO).await.unwrap() })
        .collect();
    let mut guards = Vec::new();
    for guard in held {
        guards.push(within(BOUND, guard).await);
    }
    assert_eq!(
        server.inspect(&a, "b/c").await.0,
        Some(guards[0].fencing_token())
    );
    assert_eq!(
        server.inspect(&a, "b").await.0,
        Some(guards[1].fencing_token())
    );
    assert_eq!(
        server.inspect(&ab, "c").await.0,
        Some(guards[2].fencing_token())
    );
    assert_eq!(
        server.inspect(&ab, "/c").await.0,
        Some(guards[3].fencing_token())
    );
    assert_eq!(server.inspect(&a, "c").await, (None, 0));
    assert_eq!(server.inspect(&ab, "b/c").await, (None, 0));
    // Project a's quota of 2 locks counts only its own.
    let err = in_a
        .lock("third")
        .timeout(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.is_limit_reached(), "{err}");
    assert!(in_ab.lock("third").timeout(Duration::ZERO).await.is_ok());
    drop(guards);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Failure test 1: two server processes over one etcd; the one that holds every connection of
/// a guard and of queued waiters is killed (SIGKILL). Nothing is lost: the guard renews
/// through the other server, the waiters keep their places and are served in order, and
/// no lock is granted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_that_holds_the_connections_loses_nothing() {
    // Timing matters here: not alongside the crowd test.
    let _alone = support::heavy().await;
    let etcd = EtcdCluster::start(1).await;
    let first = support::etcd_server_process(&etcd).await;
    let second = support::etcd_server_process(&etcd).await;
    // Every client tries the first server first.
    let endpoints = vec![first.url.clone(), second.url.clone()];
    let lease = Duration::from_secs(3);
    let holder = client(&endpoints, "p")
        .lock("k")
        .expires_in(lease)
        .await
        .unwrap();
    let inside = Arc::new(AtomicBool::new(true));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..3u64 {
        let dl = client(&endpoints, "p");
        let (inside, order) = (inside.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let guard = dl
                .lock("k")
                .expires_in(Duration::from_secs(30))
                .await
                .unwrap();
            assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
            order.lock().unwrap().push((i, guard.fencing_token()));
            inside.store(false, Ordering::SeqCst);
            guard.release().await.unwrap();
        }));
        eventually(BOUND, "waiter queued", || async {
            inspect_at(&second.url, "p", "k").await.1 == i + 1
        })
        .await;
    }
    first.kill().await;
    // The guard keeps its lease through the other server for two lease lengths and more.
    let lost = tokio::time::timeout(lease * 2 + Duration::from_secs(1), holder.lost()).await;
    assert!(
        lost.is_err(),
        "the guard lost its lease after the server died"
    );
    assert!(holder.is_held());
    // The waiters (their long polls reset) are still queued, in the same places.
    assert_eq!(
        inspect_at(&second.url, "p", "k").await,
        (Some(holder.fencing_token()), 3)
    );
    let token = holder.fencing_token();
    inside.store(false, Ordering::SeqCst);
    holder.release().await.unwrap();
    for w in waiters {
        within(BOUND, w).await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1) && order[0].1 > token);
}

/// Failure test 2: a three-member etcd cluster loses its leader. Leases, waiters and new
/// acquires carry on (after a new leader is elected); the member comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_an_etcd_member_does_not_stop_the_service() {
    // Timing matters here: not alongside the crowd test.
    let _alone = support::heavy().await;
    let mut etcd = EtcdCluster::start(3).await;
    let server = TestServer::start_over(Some(&etcd), |b| b).await;
    let lease = Duration::from_secs(4);
    let dl = server.client("p");
    let holder = dl.lock("held").expires_in(lease).await.unwrap();
    let waiter = tokio::spawn({
        let dl = server.client("p");
        async move {
            dl.lock("held")
                .expires_in(Duration::from_secs(30))
                .await
                .map(|g| g.fencing_token())
        }
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "held").await.1 == 1
    })
    .await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    // New locks are granted and released while the member is down.
    for i in 0..5 {
        let guard = within(BOUND, dl.lock(format!("during-{i}"))).await.unwrap();
        within(BOUND, guard.release()).await.unwrap();
    }
    // The holder kept its lease through the election.
    let lost = tokio::time::timeout(lease * 2, holder.lost()).await;
    assert!(
        lost.is_err(),
        "the guard lost its lease when an etcd member died"
    );
    etcd.restart(leader).await;
    let token = holder.fencing_token();
    holder.release().await.unwrap();
    let next = within(BOUND, waiter).await.unwrap().unwrap();
    assert!(next > token);
    // And the cluster, all three again, still serves.
    let again = within(BOUND, dl.lock("after")).await.unwrap();
    assert!(again.fencing_token() > next);
}

/// Failure test 3a: the whole etcd restarts quickly. A guard whose lease outlasts the outage
/// keeps it (its renewals retry until its deadline), and fencing tokens keep increasing
/// (they are etcd revisions, which survive restarts). The server's shared watch of deletions
/// breaks and comes back, and a waiter queued across the restart is woken by the release.
#[tokio::test]
async fn a_quick_etcd_restart_keeps_leases() {
    // Timing matters here: not alongside the crowd test.
    let _alone = support::heavy().await;
    let mut server = TestServer::start_on(support::Backend::Etcd).await;
    let lease = Duration::from_secs(6);
    let dl = server.client("p");
    let guard = dl.lock("kept").expires_in(lease).await.unwrap();
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("kept").expires_in(lease).await }
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "kept").await.1 == 1
    })
    .await;
    let etcd = server.etcd.as_mut().unwrap();
    let down = Instant::now();
    etcd.kill_all();
    etcd.restart_all().await;
    let outage = down.elapsed();
    assert!(outage < lease / 2, "etcd took {outage:?} to come back");
    let etcd = server.etcd.as_ref().unwrap();
    eventually(BOUND, "the server watches deletions again", || async {
        etcd_figure(etcd, "etcd_debugging_mvcc_watcher_total").await == 1.0
    })
    .await;
    let lost = tokio::time::timeout(lease + Duration::from_secs(1), guard.lost()).await;
    assert!(
        lost.is_err(),
        "the guard lost its lease over a {outage:?} outage"
    );
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let next = within(BOUND, waiter).await.unwrap().unwrap();
    assert!(next.fencing_token() > token);
}

/// Failure test 3b: etcd is down for longer than a lease. The guard learns it lost the lease
/// (before anyone else could get it); requests meanwhile fail as unavailable; when etcd
/// returns, every lease restarts with a full TTL, so the lost holder's lock frees itself one
/// TTL later, and the next grant has a larger token.
#[tokio::test]
async fn a_long_etcd_outage_loses_leases_as_documented() {
    // Timing matters here: not alongside the crowd test.
    let _alone = support::heavy().await;
    let mut server = TestServer::start_on(support::Backend::Etcd).await;
    let lease = Duration::from_secs(2);
    let guard = server
        .client("p")
        .lock("lapsed")
        .expires_in(lease)
        .await
        .unwrap();
    let token = guard.fencing_token();
    server.etcd.as_mut().unwrap().kill_all();
    within(BOUND, guard.lost()).await;
    let err = server
        .client("p")
        .lock("other")
        .timeout(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    server.etcd.as_mut().unwrap().restart_all().await;
    let back = Instant::now();
    let next = within(BOUND, server.client("p").lock("lapsed"))
        .await
        .unwrap();
    assert!(next.fencing_token() > token);
    // Freed by expiry: within the TTL (plus etcd's expiry tick and a little slack).
    assert!(
        back.elapsed() < lease + Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
}

/// A crowd of 1,000 on one lock, queued through two servers: every waiter gets its turn, one at a
/// time, in create-revision order (each waiter watches only the key ahead of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_on_one_lock_through_two_servers_is_served_one_at_a_time() {
    let _alone = support::heavy().await;
    let etcd = EtcdCluster::start(1).await;
    // A thousand clients, each with its own connection, stand for a thousand machines: all
    // on 127.0.0.1 here, so the per-address connection cap is off.
    let a = TestServer::start_over(Some(&etcd), |b| b.max_connections_per_ip(0)).await;
    let b = TestServer::start_over(Some(&etcd), |b| b.max_connections_per_ip(0)).await;
    let holder = a.client("p").lock("crowded").await.unwrap();
    let crowd = 1000u64;
    let inside = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..crowd {
        let dl = if i % 2 == 0 {
            a.client("p")
        } else {
            b.client("p")
        };
        let (inside, tokens) = (inside.clone(), tokens.clone());
        waiters.spawn(async move {
            // A lease longer than the wait: the SDK counts it from the poll's start.
            let guard = dl
                .lock("crowded")
                .expires_in(Duration::from_secs(60))
                .await
                .unwrap();
            assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
            tokens.lock().unwrap().push(guard.fencing_token());
            inside.store(false, Ordering::SeqCst);
            guard.release().await.unwrap();
        });
    }
    eventually(Duration::from_secs(60), "the crowd queued", || async {
        b.inspect("p", "crowded").await.1 == crowd
    })
    .await;
    holder.release().await.unwrap();
    within(Duration::from_secs(120), async {
        while let Some(done) = waiters.join_next().await {
            done.unwrap();
        }
    })
    .await;
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len() as u64, crowd);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "grants in queue order"
    );
    assert_eq!(a.inspect("p", "crowded").await, (None, 0));
}

/// etcd's count of `LeaseKeepAlive` streams opened and keep-alive messages received.
/// etcd's own `/metrics` text.
async fn etcd_metrics(etcd: &EtcdCluster) -> String {
    let addr = etcd
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (status, metrics) = raw(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    metrics
}

async fn keep_alive_counts(etcd: &EtcdCluster) -> (u64, u64) {
    let metrics = etcd_metrics(etcd).await;
    let count = |metric: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(metric) && l.contains(r#"grpc_method="LeaseKeepAlive""#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    (
        count("grpc_server_started_total"),
        count("grpc_server_msg_received_total"),
    )
}

#[tokio::test]
async fn keep_alives_reuse_one_stream_per_lease() {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::start_over(Some(&etcd), |b| b).await;
    let dl = server.client("p");
    // The first pair grants leases; later pairs reuse the lock's own spare, which needs a
    // keep-alive only when its last one is older than the slack (1 s, less a 0.2 s margin):
    // one per 0.8 s of the loop at most.
    dl.lock("solo").await.unwrap().release().await.unwrap();
    let (opened, sent) = keep_alive_counts(&etcd).await;
    let started = std::time::Instant::now();
    for _ in 0..30 {
        dl.lock("solo").await.unwrap().release().await.unwrap();
    }
    let windows = (started.elapsed().as_secs_f64() / 0.8).ceil() as u64;
    let (opened_after, sent_after) = keep_alive_counts(&etcd).await;
    assert!(
        sent_after - sent <= 1 + windows,
        "30 acquires of a spare sent {} keep-alives in {windows} windows of 0.8 s",
        sent_after - sent
    );
    assert!(
        opened_after - opened <= 3,
        "{} streams opened for {} keep-alives",
        opened_after - opened,
        sent_after - sent
    );
    // A held lock's renewals, too, go over one stream.
    let guard = dl
        .lock("held")
        .expires_in(Duration::from_secs(2))
        .await
        .unwrap();
    let (opened, sent) = keep_alive_counts(&etcd).await;
    eventually(BOUND, "three renewals", || async {
        keep_alive_counts(&etcd).await.1 >= sent + 3
    })
    .await;
    assert!(guard.is_held());
    let (opened_after, _) = keep_alive_counts(&etcd).await;
    assert!(
        opened_after - opened <= 1,
        "renewals opened {} streams",
        opened_after - opened
    );
    guard.release().await.unwrap();
}

/// A figure from etcd's own `/metrics`, by its series name.
async fn etcd_figure(etcd: &EtcdCluster, series: &str) -> f64 {
    etcd_metrics(etcd)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn waiters_share_one_etcd_watch_per_server() {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::start_over(Some(&etcd), |b| b).await;
    let dl = server.client("p");
    let holder = dl.lock("crowded").await.unwrap();
    let other = dl.lock("other").await.unwrap();
    let mut waiters = Vec::new();
    for name in ["crowded"; 8].into_iter().chain(["other"; 4]) {
        let dl = dl.clone();
        waiters.push(tokio::spawn(async move {
            let guard = dl.lock(name).await?;
            let token = guard.fencing_token();
            guard.release().await.map(|()| (name, token))
        }));
    }
    eventually(BOUND, "12 waiters queued", || async {
        server.inspect("p", "crowded").await.1 == 8 && server.inspect("p", "other").await.1 == 4
    })
    .await;
    // A watch per waiter would make 24 (the key ahead, and its own).
    assert_eq!(
        etcd_figure(&etcd, "etcd_debugging_mvcc_watcher_total").await,
        1.0
    );
    // Woken through it, every waiter gets its turn.
    holder.release().await.unwrap();
    other.release().await.unwrap();
    // Tokens are distinct per lock (grants of different names may share one: acquires
    // queued in one etcd transaction).
    let mut tokens = Vec::new();
    for waiter in waiters {
        tokens.push(within(BOUND, waiter).await.unwrap().unwrap());
    }
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 12);
}

#[tokio::test]
async fn healthz_answers_503_while_etcd_is_out_of_reach() {
    let mut server = TestServer::start_on(support::Backend::Etcd).await;
    let health = |addr| async move { raw(addr, "GET", "/healthz", &[], "").await };
    assert_eq!(health(server.addr).await, (200, "ok\n".to_owned()));
    server.etcd.as_mut().unwrap().kill_all();
    let addr = server.addr;
    eventually(BOUND, "healthz reports etcd down", || async move {
        let (status, body) = health(addr).await;
        status == 503 && body.contains("etcd unavailable")
    })
    .await;
    server.etcd.as_mut().unwrap().restart_all().await;
    eventually(BOUND, "healthz reports etcd back", || async move {
        health(addr).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn metrics_time_each_etcd_call_and_count_its_failures() {
    let mut server = TestServer::start_on(support::Backend::Etcd).await;
    let dl = server.client("p");
    for _ in 0..3 {
        dl.lock("counted").await.unwrap().release().await.unwrap();
    }
    let calls =
        |call: &str| format!("leasehold_etcd_call_duration_seconds_count{{call=\"{call}\"}}");
    assert!(server.metric(&calls("queue")).await >= 3.0);
    assert!(server.metric(&calls("release")).await >= 3.0);
    let unavailable = "leasehold_etcd_call_errors_total{call=\"health\",error=\"unavailable\"}";
    assert_eq!(server.metric(unavailable).await, 0.0);
    server.etcd.as_mut().unwrap().kill_all();
    let addr = server.addr;
    eventually(BOUND, "healthz reports etcd down", || async move {
        raw(addr, "GET", "/healthz", &[], "").await.0 == 503
    })
    .await;
    assert!(server.metric(unavailable).await >= 1.0);
    let retried = "leasehold_etcd_call_errors_total{call=\"health\",error=\"retried\"}";
    assert!(server.metric(retried).await >= 1.0);
}

#[tokio::test]
async fn a_server_stops_promptly_while_etcd_is_out_of_reach() {
    let mut server = TestServer::start_on(support::Backend::Etcd).await;
    let dl = server.client("p");
    // Locks held at once, then released, leave as many spare etcd leases, which a shutdown
    // revokes: one call timeout (5 s) each while etcd cannot be reached, were they revoked
    // one by one.
    let mut guards = Vec::new();
    for name in ["a", "b", "c", "d", "e", "f"] {
        guards.push(dl.lock(name).await.unwrap());
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
    server.etcd.as_mut().unwrap().kill_all();
    within(Duration::from_secs(10), server.stop()).await;
}

// TLS and authentication towards etcd.

/// The message of a server start that must fail, within a bound: a refusal is no hang.
async fn start_error(builder: ServerBuilder) -> String {
    start_failure(builder).await.to_string()
}

async fn start_failure(builder: ServerBuilder) -> leasehold::Error {
    match within(BOUND, builder.bind("127.0.0.1:0").start()).await {
        Ok(server) => panic!("the server started: {server:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn over_mutual_tls_with_etcd_locks_are_granted_and_handed_over() {
    let etcd = EtcdCluster::start_tls(1).await;
    assert!(etcd.endpoint(0).starts_with("https://"));
    // The harness gives the server the cluster's CA and client certificate.
    let server = TestServer::start_over(Some(&etcd), |b| b).await;
    let dl = server.client("p");
    let holder = dl.lock("secure").await.unwrap();
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("secure").await.map(|g| g.fencing_token()) }
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "secure").await.1 == 1
    })
    .await;
    let token = holder.fencing_token();
    holder.release().await.unwrap();
    assert!(within(BOUND, waiter).await.unwrap().unwrap() > token);
}

#[tokio::test]
async fn tls_that_etcd_refuses_stops_the_server_at_start() {
    let etcd = EtcdCluster::start_tls(1).await;
    let pki = etcd.pki.as_ref().unwrap();
    // etcd's certificate is signed by a CA the server does not trust.
    let other_ca = etcd.file("other-ca.pem", &support::etcd::Ca::new("another CA").pem);
    let err = start_failure(
        Server::builder()
            .etcd(etcd.endpoints())
            .etcd_ca_file(&other_ca)
            .etcd_client_cert(&pki.client_cert, &pki.client_key),
    )
    .await;
    // Reported as what it is: TLS, not a bad argument.
    assert!(err.is_tls(), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("etcd's certificate is not trusted"), "{err}");
    // The server trusts etcd, but presents no client certificate to an etcd that wants one.
    let err = start_error(
        Server::builder()
            .etcd(etcd.endpoints())
            .etcd_ca_file(&pki.ca),
    )
    .await;
    assert!(err.contains("etcd refused the handshake"), "{err}");
}

#[tokio::test]
async fn bad_tls_settings_are_refused_before_reaching_etcd() {
    // Nothing listens on these endpoints: every case fails before the first connection.
    let dir = std::env::temp_dir().join(format!("dl-etcd-tls-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let ca = support::etcd::Ca::new("test CA");
    let (cert, _) = ca.issue(&["leasehold-server"]);
    let (_, another_key) = ca.issue(&["someone-else"]);
    let (cert, another_key) = (file("cert.pem", &cert), file("other-key.pem", &another_key));
    let https = || Server::builder().etcd(["https://127.0.0.1:1"]);
    let cases = [
        (
            https().etcd_ca_file(dir.join("absent.pem")),
            "cannot read the etcd CA certificate",
        ),
        (
            https().etcd_ca_file(file("not-pem.pem", "hello")),
            "no PEM certificate",
        ),
        (
            https().etcd_client_cert(&cert, file("empty-key.pem", "")),
            "no usable PEM private key",
        ),
        (
            https().etcd_client_cert(&cert, &another_key),
            "the key does not fit the certificate",
        ),
        (
            Server::builder()
                .etcd(["http://127.0.0.1:1"])
                .etcd_ca_file(file("ca.pem", &ca.pem)),
            "need https:// endpoints",
        ),
        (
            Server::builder().etcd(["https://127.0.0.1:1", "http://127.0.0.1:2"]),
            "endpoints mix http://",
        ),
    ];
    for (builder, expected) in cases {
        let err = start_failure(builder).await;
        assert!(
            matches!(
                err,
                leasehold::Error::Configuration { .. } | leasehold::Error::Io { .. }
            ),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(err.contains(expected), "expected {expected:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const PREFIX: &str = "/leasehold/";

#[tokio::test]
async fn an_etcd_user_logs_in_and_a_wrong_password_is_refused_at_start() {
    let mut etcd = EtcdCluster::start(1).await;
    etcd.enable_auth("locks", "s3cret", PREFIX).await;
    let server = TestServer::start_over(Some(&etcd), |b| b.etcd_user("locks", "s3cret")).await;
    let guard = server.client("p").lock("guarded").await.unwrap();
    guard.release().await.unwrap();
    let err = start_failure(
        Server::builder()
            .etcd(etcd.endpoints())
            .etcd_user("locks", "not-the-password"),
    )
    .await;
    // Reported as what it is: a configuration etcd refuses, not a bad argument.
    assert!(
        matches!(err, leasehold::Error::Configuration { .. }),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    // The right password, but a prefix outside the user's permissions.
    let err = start_error(
        Server::builder()
            .etcd(etcd.endpoints())
            .etcd_prefix("/elsewhere")
            .etcd_user("locks", "s3cret"),
    )
    .await;
    assert!(err.contains("lacks permission on the key prefix"), "{err}");
    // Without a user, the server cannot know whether etcd wants one before a request comes;
    // requests then get a 503 that says why, at once.
    let anonymous = TestServer::start_over(Some(&etcd), |b| b).await;
    assert_acquire_refused(&anonymous, "etcd requires authentication").await;
}

/// An acquire through `server` gets `503` at once, with a message containing `why`.
async fn assert_acquire_refused(server: &TestServer, why: &str) {
    let (status, body) = post(
        server,
        "/v1/acquire",
        "p",
        &acquire_body("refused", 5000, 0, &"1".repeat(32)),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains(why)),
        "{body}"
    );
}

#[tokio::test]
async fn the_server_logs_in_again_when_etcd_ends_its_token() {
    let mut etcd = EtcdCluster::start(1).await;
    etcd.enable_auth("locks", "s3cret", PREFIX).await;
    let server = TestServer::start_over(Some(&etcd), |b| b.etcd_user("locks", "s3cret")).await;
    let dl = server.client("p");
    dl.lock("a").await.unwrap().release().await.unwrap();
    // etcd ends a user's tokens when its password changes, as it does when they expire:
    // changed and changed back, the server is left with an ended token and the right
    // password.
    let mut root = etcd.client().await;
    root.user_change_password("locks", "interim").await.unwrap();
    root.user_change_password("locks", "s3cret").await.unwrap();
    let guard = within(BOUND, dl.lock("a")).await.unwrap();
    guard.release().await.unwrap();
    // Changed for good: logging in again fails, and the answer says so at once.
    root.user_change_password("locks", "changed").await.unwrap();
    assert_acquire_refused(&server, "authentication failed").await;
}

#[tokio::test]
async fn a_server_with_a_user_starts_while_etcd_is_down_and_logs_in_later() {
    let mut etcd = EtcdCluster::start(1).await;
    etcd.enable_auth("locks", "s3cret", PREFIX).await;
    etcd.kill_all();
    // The startup check gives up after the call timeout (5 s) and the server starts.
    let server = TestServer::start_over(Some(&etcd), |b| b.etcd_user("locks", "s3cret")).await;
    etcd.restart_all().await;
    let guard = within(BOUND, server.client("p").lock("later"))
        .await
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test]
async fn the_server_binary_reaches_a_secured_etcd_with_its_flags() {
    let mut etcd = EtcdCluster::start_tls(1).await;
    etcd.enable_auth("locks", "s3cret", PREFIX).await;
    let password_file = etcd.file("password", "s3cret\n");
    let mut args = support::etcd_server_args(&etcd);
    args.extend(["--etcd-user".into(), "locks".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let with_file = [
        &args[..],
        &["--etcd-password-file", password_file.to_str().unwrap()],
    ]
    .concat();
    let server = support::process::ServerProcess::start(&with_file).await;
    let guard = within(BOUND, support::client_for(&server.url, "p").lock("cli"))
        .await
        .unwrap();
    guard.release().await.unwrap();
    server.kill().await;
    // The password from the environment, a wrong one: a clear error, and never printed.
    let printed = support::process::ServerProcess::refused(
        &args,
        &[("LEASEHOLD_ETCD_PASSWORD", "wrong-password")],
    )
    .await;
    assert!(printed.contains("authentication failed"), "{printed}");
    assert!(!printed.contains("wrong-password"), "{printed}");
    // Both sources at once, or none: refused before reaching etcd.
    let printed = support::process::ServerProcess::refused(
        &with_file,
        &[("LEASEHOLD_ETCD_PASSWORD", "s3cret")],
    )
    .await;
    assert!(printed.contains("given twice"), "{printed}");
    let printed = support::process::ServerProcess::refused(&args, &[]).await;
    assert!(
        printed.contains("--etcd-user needs a password"),
        "{printed}"
    );
    // A client certificate without its key.
    let pki = etcd.pki.as_ref().unwrap();
    let printed = support::process::ServerProcess::refused(
        &[
            "--backend",
            "etcd",
            "--etcd-cert-file",
            pki.client_cert.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(printed.contains("--etcd-key-file"), "{printed}");
}
