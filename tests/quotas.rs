//! Default quotas per project, in open mode too: locks held or waited for, and acquires in
//! flight (every waiter is one). One project at its quota never holds up another.

mod support;

use std::time::Duration;
use support::load::{p90, p99, pairs, rss};
use support::{TestServer, eventually, within};

const BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_project_at_its_acquires_in_flight_waits_no_more_and_others_go_on() {
    let server = TestServer::start_with(|b| b.max_acquires_per_project(20)).await;
    let greedy = server.client("greedy");
    // Held by another client of the project: a waiter of the holder's own client would be
    // reserved the lock next (docs/protocol.md §3.16) and wait out of flight, one more in
    // line than the quota counts.
    let _holder = server.client("greedy").lock("x").await.unwrap();
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let dl = greedy.clone();
        waiters.spawn(async move { dl.lock("x").await.map(drop) });
    }
    eventually(BOUND, "twenty waiters in line", || async {
        server.inspect("greedy", "x").await.1 == 20
    })
    .await;
    let mut refused = 0;
    while refused < 10 {
        let result = within(BOUND, waiters.join_next()).await.unwrap().unwrap();
        let err = result.expect_err("the lock is held: only refusals end early");
        assert!(err.is_limit_reached(), "{err}");
        assert!(err.to_string().contains("in flight"), "{err}");
        refused += 1;
    }
    // Another project is not held up by it.
    let other = within(BOUND, server.client("other").lock("x"))
        .await
        .unwrap();
    assert!(other.is_held());
    assert_eq!(server.inspect("greedy", "x").await.1, 20);
    waiters.abort_all();
}

#[tokio::test]
async fn a_project_may_hold_its_quota_of_locks_and_no_more() {
    let server = TestServer::start_with(|b| b.max_locks_per_project(5)).await;
    let dl = server.client("p");
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(dl.lock(format!("lock-{i}")).await.unwrap());
    }
    let err = dl.lock("lock-5").await.unwrap_err();
    assert!(err.is_limit_reached(), "{err}");
    // The quota is per project, and a freed lock makes room again.
    let _other = server.client("q").lock("lock-5").await.unwrap();
    held.pop().unwrap().release().await.unwrap();
    let _again = within(BOUND, dl.lock("lock-5")).await.unwrap();
}

/// One open-mode key held 139,000 waiters (about 5 KB each). Against the real binary, with
/// the quota set to 2,000 so that the test stays small: the rest of a crowd is refused,
/// the server's memory stays bounded, and another project keeps its pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_waiters_from_one_key_is_bounded() {
    let _alone = support::heavy().await;
    let server = support::process::ServerProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--no-state-file",
        "--max-acquires-per-project",
        "2000",
    ])
    .await;
    let legit = support::client_for(&server.url, "legit");
    pairs(&legit, 50).await; // warm up
    let baseline = pairs(&legit, 300).await;
    let rss_before = rss(server.pid());

    let attacker = support::client_for(&server.url, "anything");
    // Held by another client of the project, as in the test above.
    let _holder = support::client_for(&server.url, "anything")
        .lock("x")
        .await
        .unwrap();
    let mut crowd = tokio::task::JoinSet::new();
    for _ in 0..3_000 {
        let dl = attacker.clone();
        crowd.spawn(async move { dl.lock("x").await.map(drop) });
    }
    let mut refused = 0;
    while refused < 1_000 {
        let result = within(BOUND, crowd.join_next()).await.unwrap().unwrap();
        assert!(result.unwrap_err().is_limit_reached());
        refused += 1;
    }
    assert_eq!(attacker.inspect("x").await.unwrap().waiters, 2_000);
    let during = pairs(&legit, 300).await;
    let grown = rss(server.pid()).saturating_sub(rss_before);
    println!(
        "2,000 waiters held, 1,000 refused: server memory +{} MiB; another project's p90 \
         / p99 {:?} / {:?} before, {:?} / {:?} during",
        grown >> 20,
        p90(&baseline),
        p99(&baseline),
        p90(&during),
        p99(&during)
    );
    // About 5 KB a waiter, twice over for the allocator's slack.
    assert!(
        grown < 2_000 * 10 * 1024 + (16 << 20),
        "grew {} MiB",
        grown >> 20
    );
    assert!(
        p90(&during) <= 3 * p90(&baseline),
        "another project's p90 went from {:?} to {:?}",
        p90(&baseline),
        p90(&during)
    );
    crowd.abort_all();
}
