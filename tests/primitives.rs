//! Beyond the mutex: semaphores, read-write locks and leader election, through the SDK
//! against a real server. Each test runs against both stores (`name::memory`, `name::etcd`).

mod support;

use leasehold::{DistributedLock, LockMode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Backend, TestServer, eventually, raw, within};

const BOUND: Duration = Duration::from_secs(20);

on_both_backends!(multi_thread: a_semaphore_never_has_more_holders_than_permits);
on_both_backends!(
    semaphore_waiters_are_served_in_fifo_order,
    a_name_is_one_kind_with_one_permit_count_at_a_time,
    readers_share_and_a_writer_is_alone,
    a_reader_behind_a_waiting_writer_waits_and_readers_then_enter_together,
    inspection_shows_every_holder_and_the_mode,
    observers_see_every_leader_and_value_in_order,
    a_leader_that_led_briefly_is_not_missed,
    a_proclaim_after_the_lease_is_gone_changes_nothing,
    guards_of_every_kind_renew_together_in_one_request,
);

/// Waiters in line for `name`, as inspection shows them.
async fn waiters(dl: &DistributedLock, name: &str) -> u64 {
    dl.inspect(name).await.expect("inspect").waiters
}

async fn a_semaphore_never_has_more_holders_than_permits(backend: Backend) {
    const PERMITS: usize = 3;
    let server = TestServer::start_on(backend).await;
    // The observer counts holders on the client side, where the guards are: a count above
    // the permits would mean the server admitted one too many.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let dl = server.client("p");
        let (inside, most, tokens) = (inside.clone(), most.clone(), tokens.clone());
        tasks.spawn(async move {
            for _ in 0..10 {
                let permit = dl.semaphore("pool", PERMITS as u32).await.expect("acquire");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokens.lock().unwrap().push(permit.fencing_token());
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                permit.release().await.expect("release");
            }
        });
    }
    within(Duration::from_secs(90), async {
        while let Some(done) = tasks.join_next().await {
            done.expect("client task");
        }
    })
    .await;
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= PERMITS,
        "{most} holders of {PERMITS} permits at once"
    );
    assert!(most >= 2, "the permits were never shared ({most} at most)");
    let mut tokens = tokens.lock().unwrap().clone();
    let count = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), count, "every permit has a token of its own");
}

async fn semaphore_waiters_are_served_in_fifo_order(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let first = dl.semaphore("pool", 2).await.unwrap();
    let second = dl.semaphore("pool", 2).await.unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..3u64 {
        let waiter = server.client("p");
        let order = order.clone();
        waiting.push(tokio::spawn(async move {
            let permit = waiter.semaphore("pool", 2).await.unwrap();
            order.lock().unwrap().push((i, permit.fencing_token()));
            permit
        }));
        eventually(BOUND, "waiter queued", || async {
            waiters(&dl, "pool").await == i + 1
        })
        .await;
    }
    // One permit comes free: the first in line gets it, the others still wait.
    first.release().await.unwrap();
    eventually(BOUND, "first waiter granted", || async {
        order.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(waiters(&dl, "pool").await, 2);
    second.release().await.unwrap();
    let w0 = within(BOUND, waiting.remove(0)).await.unwrap();
    let w1 = within(BOUND, waiting.remove(0)).await.unwrap();
    w0.release().await.unwrap();
    let w2 = within(BOUND, waiting.remove(0)).await.unwrap();
    let order = order.lock().unwrap().clone();
    assert_eq!(order.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens grow in grant order: {order:?}"
    );
    drop((w1, w2));
}

async fn a_name_is_one_kind_with_one_permit_count_at_a_time(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let permit = dl.semaphore("payments-api", 5).await.unwrap();
    let other = server.client("p");
    let err = other
        .semaphore("payments-api", 3)
        .timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("5 permits") && message.contains("3"),
        "the error names the count in use and the one asked: {message}"
    );
    for err in [
        other
            .lock("payments-api")
            .timeout(Duration::from_secs(5))
            .await
            .unwrap_err(),
        other
            .read_lock("payments-api")
            .timeout(Duration::from_secs(5))
            .await
            .unwrap_err(),
    ] {
        assert!(err.is_conflict(), "{err}");
        assert!(err.to_string().contains("semaphore"), "{err}");
    }
    // Nothing was queued by the refused requests.
    assert_eq!(waiters(&dl, "payments-api").await, 0);
    permit.release().await.unwrap();

    // Free again, the name may become a read-write lock; then a semaphore is refused.
    let read = other.read_lock("payments-api").await.unwrap();
    let err = dl
        .semaphore("payments-api", 5)
        .timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("read-write"), "{err}");
    read.release().await.unwrap();
    // Zero permits is bad input, refused before anything is sent.
    let err = dl.semaphore("payments-api", 0).await.unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

async fn readers_share_and_a_writer_is_alone(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let r1 = dl.read_lock("config").await.unwrap();
    let r2 = server.client("p").read_lock("config").await.unwrap();
    assert!(r1.is_held() && r2.is_held());
    // A writer (`write_lock`, or `lock`, the same exclusive lock) waits for the readers.
    assert!(dl.write_lock("config").try_lock().await.unwrap().is_none());
    assert!(dl.lock("config").try_lock().await.unwrap().is_none());
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = dl.write_lock("config").await.unwrap();
    assert!(dl.read_lock("config").try_lock().await.unwrap().is_none());
    assert!(dl.lock("config").try_lock().await.unwrap().is_none());
    w.release().await.unwrap();
    // Released, a plain mutex user takes it, and readers wait for it in turn.
    let m = dl.lock("config").await.unwrap();
    assert!(dl.read_lock("config").try_lock().await.unwrap().is_none());
    m.release().await.unwrap();
}

async fn a_reader_behind_a_waiting_writer_waits_and_readers_then_enter_together(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let r1 = dl.read_lock("config").await.unwrap();
    let writer = {
        let dl = server.client("p");
        tokio::spawn(async move { dl.write_lock("config").await.unwrap() })
    };
    eventually(BOUND, "writer queued", || async {
        waiters(&dl, "config").await == 1
    })
    .await;
    // A reader may not pass the waiting writer, although readers hold the lock.
    assert!(
        server
            .client("p")
            .read_lock("config")
            .try_lock()
            .await
            .unwrap()
            .is_none()
    );
    let mut readers = Vec::new();
    for i in 0..2u64 {
        let reader = server.client("p");
        readers.push(tokio::spawn(async move {
            reader.read_lock("config").await.unwrap()
        }));
        eventually(BOUND, "reader queued", || async {
            waiters(&dl, "config").await == i + 2
        })
        .await;
    }
    r1.release().await.unwrap();
    let w = within(BOUND, writer).await.unwrap();
    let writer_token = w.fencing_token();
    assert_eq!(waiters(&dl, "config").await, 2, "the readers still wait");
    w.release().await.unwrap();
    // Both readers reached the front together: both are admitted.
    let a = within(BOUND, readers.remove(0)).await.unwrap();
    let b = within(BOUND, readers.remove(0)).await.unwrap();
    assert!(a.is_held() && b.is_held());
    let info = dl.inspect("config").await.unwrap();
    assert_eq!(info.mode, LockMode::Shared);
    assert_eq!(info.holders.len(), 2);
    assert!(b.fencing_token() > a.fencing_token() && a.fencing_token() > writer_token);
}

async fn inspection_shows_every_holder_and_the_mode(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let a = dl.semaphore("pool", 3).metadata("a").await.unwrap();
    let b = dl.semaphore("pool", 3).metadata("b").await.unwrap();
    let info = dl.inspect("pool").await.unwrap();
    assert_eq!(info.mode, LockMode::Semaphore { permits: 3 });
    let labels: Vec<_> = info.holders.iter().map(|h| h.metadata.clone()).collect();
    assert_eq!(labels, [Some("a".to_owned()), Some("b".to_owned())]);
    let tokens: Vec<_> = info.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(tokens, [a.fencing_token(), b.fencing_token()]);
    assert_eq!(
        info.holder.as_ref().map(|h| h.fencing_token),
        Some(a.fencing_token())
    );

    let leadership = dl
        .election("scheduler")
        .campaign("host-a:8080")
        .await
        .unwrap();
    let info = dl.inspect("scheduler").await.unwrap();
    assert_eq!(info.mode, LockMode::Exclusive);
    assert_eq!(info.holders.len(), 1);
    assert_eq!(info.holders[0].value.as_deref(), Some("host-a:8080"));
    drop(leadership);
}

async fn observers_see_every_leader_and_value_in_order(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let election = dl.election("scheduler");
    let mut watch = election.observe();
    assert_eq!(within(BOUND, watch.next()).await.unwrap(), None);
    assert_eq!(election.leader().await.unwrap(), None);

    let a = election.campaign("a:1").metadata("host-a").await.unwrap();
    let seen = within(BOUND, watch.next()).await.unwrap().expect("a leads");
    assert_eq!(
        (
            seen.value.as_str(),
            seen.fencing_token,
            seen.metadata.as_deref()
        ),
        ("a:1", a.fencing_token(), Some("host-a"))
    );

    // B campaigns and waits: the observer sees no change until leadership changes.
    let b = {
        let election = server.client("p").election("scheduler");
        tokio::spawn(async move { election.campaign("b:1").await.unwrap() })
    };
    eventually(BOUND, "b in line", || async {
        waiters(&dl, "scheduler").await == 1
    })
    .await;
    a.proclaim("a:2").await.unwrap();
    let seen = within(BOUND, watch.next()).await.unwrap().expect("a leads");
    assert_eq!(
        (seen.value.as_str(), seen.fencing_token),
        ("a:2", a.fencing_token())
    );
    assert_eq!(election.leader().await.unwrap(), Some(seen));

    let a_token = a.fencing_token();
    a.resign().await.unwrap();
    let b = within(BOUND, b).await.unwrap();
    assert!(b.fencing_token() > a_token);
    // Between A and B the election may have been without a leader for a moment; if the
    // store saw that state, the observer sees it too, in order.
    let mut seen = within(BOUND, watch.next()).await.unwrap();
    if seen.is_none() {
        seen = within(BOUND, watch.next()).await.unwrap();
    }
    let seen = seen.expect("b leads");
    assert_eq!(
        (seen.value.as_str(), seen.fencing_token),
        ("b:1", b.fencing_token())
    );
    b.resign().await.unwrap();
    assert_eq!(within(BOUND, watch.next()).await.unwrap(), None);
}

async fn a_leader_that_led_briefly_is_not_missed(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let election = dl.election("cron");
    let mut watch = election.observe();
    assert_eq!(within(BOUND, watch.next()).await.unwrap(), None);
    // Two leaders come and go while the observer is not even asking.
    let mut tokens = Vec::new();
    for value in ["a", "b"] {
        let leadership = election.campaign(value).await.unwrap();
        tokens.push(leadership.fencing_token());
        leadership.resign().await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let leader = within(BOUND, watch.next()).await.unwrap();
        seen.push(leader.map(|l| (l.value, l.fencing_token)));
    }
    assert_eq!(
        seen,
        [
            Some(("a".to_owned(), tokens[0])),
            None,
            Some(("b".to_owned(), tokens[1])),
            None
        ]
    );
}

async fn a_proclaim_after_the_lease_is_gone_changes_nothing(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let auth = [("authorization", "Bearer p")];
    let acquire = r#"{"name":"leader","lease_ms":60000,"request_id":"00000000000000000000000000000001","value":"a"}"#;
    let (status, body) = raw(server.addr, "POST", "/v1/acquire", &auth, acquire).await;
    assert_eq!(status, 200, "{body}");
    let granted: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lease_id = granted["lease_id"].as_str().unwrap().to_owned();
    let proclaim =
        |value: &str| format!(r#"{{"name":"leader","lease_id":"{lease_id}","value":"{value}"}}"#);
    let (status, body) = raw(server.addr, "POST", "/v1/proclaim", &auth, &proclaim("a2")).await;
    assert_eq!(status, 200, "{body}");
    let release = format!(r#"{{"name":"leader","lease_id":"{lease_id}"}}"#);
    let (status, body) = raw(server.addr, "POST", "/v1/release", &auth, &release).await;
    assert_eq!(status, 200, "{body}");

    // Another leader now; the old lease's proclaim must not touch its value.
    let dl = server.client("p");
    let b = dl.election("leader").campaign("b").await.unwrap();
    let (status, body) = raw(server.addr, "POST", "/v1/proclaim", &auth, &proclaim("a3")).await;
    assert_eq!(status, 410, "{body}");
    let leader = dl.election("leader").leader().await.unwrap().unwrap();
    assert_eq!(
        (leader.value.as_str(), leader.fencing_token),
        ("b", b.fencing_token())
    );

    // A reader cannot proclaim: only an exclusive holder leads.
    let acquire = r#"{"name":"readers","lease_ms":60000,"request_id":"00000000000000000000000000000002","mode":"shared"}"#;
    let (status, body) = raw(server.addr, "POST", "/v1/acquire", &auth, acquire).await;
    assert_eq!(status, 200, "{body}");
    let lease_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = format!(r#"{{"name":"readers","lease_id":"{lease_id}","value":"x"}}"#);
    let (status, answer) = raw(server.addr, "POST", "/v1/proclaim", &auth, &body).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("\"conflict\""), "{answer}");
}

async fn guards_of_every_kind_renew_together_in_one_request(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    // Leases acquired within a sixth of a lease of each other share renewal requests: 3 s
    // leaves half a second for the three acquires on a busy machine.
    let lease = server.lease(Duration::from_secs(3));
    let permit = dl.semaphore("pool", 2).expires_in(lease).await.unwrap();
    let read = dl.read_lock("config").expires_in(lease).await.unwrap();
    let leader = dl
        .election("scheduler")
        .campaign("a")
        .expires_in(lease)
        .await
        .unwrap();
    let requests = r#"leasehold_http_requests_total{route="renew",status="200"}"#;
    let (requests_before, renewed_before) = (
        server.metric(requests).await,
        server.metric("leasehold_renewals_total").await,
    );
    // Three leases renewed three times each, about every third of the lease.
    eventually(lease * 4 + BOUND, "three renewals of each", || async {
        server.metric("leasehold_renewals_total").await >= renewed_before + 9.0
    })
    .await;
    let renewed = server.metric("leasehold_renewals_total").await - renewed_before;
    let sent = server.metric(requests).await - requests_before;
    // Batched: one request per period for all three (a period split in two, or a retry,
    // may add one); unbatched would be one per renewal.
    let periods = (renewed / 3.0).ceil();
    assert!(
        sent <= periods + 1.0,
        "{sent} renew requests for {renewed} renewals of three guards"
    );
    assert!(permit.is_held() && read.is_held() && leader.is_held());
}
