//! Default quotas per project, in open mode too: locks held or waited for, and acquires in
//! flight (every waiter is one). One project at its quota never holds up another.

mod support;

use std::time::Duration;
use support::{TestServer, eventually, within};

const BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_project_at_its_acquires_in_flight_waits_no_more_and_others_go_on() {
    let server = TestServer::start_with(|b| b.max_acquires_per_project(20)).await;
    let greedy = server.client("greedy");
    let _holder = greedy.lock("x").await.unwrap();
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
