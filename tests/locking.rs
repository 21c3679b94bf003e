//! Taking turns: mutual exclusion, FIFO waiting on the server, timeouts, cancellation.
//! Each test runs against both stores (`name::memory`, `name::etcd`).

mod support;

use leasehold::Error;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Backend, TestServer, eventually, within};
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(10);

on_both_backends!(multi_thread: never_two_holders_and_tokens_increase);
on_both_backends!(
    waiters_are_served_in_fifo_order_by_the_server,
    timeout_ends_the_wait_no_earlier_than_asked,
    zero_timeout_tries_once,
    dropping_a_waiting_acquire_withdraws_it,
    a_grant_that_races_the_drop_is_released_at_once,
);

async fn never_two_holders_and_tokens_increase(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let inside = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        // Separate clients: separate connections and renewal tasks, like separate processes.
        let dl = server.client("project");
        let inside = inside.clone();
        let tokens = tokens.clone();
        tasks.spawn(async move {
            for _ in 0..25 {
                let guard = dl.lock("shared").await.expect("acquire");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                tokens.lock().unwrap().push(guard.fencing_token());
                tokio::task::yield_now().await;
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        });
    }
    within(Duration::from_secs(60), async {
        while let Some(done) = tasks.join_next().await {
            done.expect("client task");
        }
    })
    .await;
    let tokens = tokens.lock().unwrap();
    assert_eq!(tokens.len(), 200);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must strictly increase in grant order"
    );
}

async fn waiters_are_served_in_fifo_order_by_the_server(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let holder = server.client("p").lock("queue").await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..5u64 {
        let dl = server.client("p");
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = dl
                .lock("queue")
                .expires_in(Duration::from_secs(30))
                .await
                .unwrap();
            order.lock().unwrap().push((i, Instant::now()));
            guard.release().await.unwrap();
        }));
        // Make the arrival order certain before the next one queues.
        eventually(BOUND, "waiter queued", || async {
            server.inspect("p", "queue").await.1 == i + 1
        })
        .await;
    }
    let released = Instant::now();
    holder.release().await.unwrap();
    for w in waiters {
        within(BOUND, w).await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<u64> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    // The hand-over comes from the server at release, not from a poll or an expiry: well
    // within half of the 20 s poll (and of the 30 s lease).
    assert!(order[0].1 - released < Duration::from_secs(20) / 2);
    // One acquire request per client: the waiting happened on the server.
    assert_eq!(server.metric("leasehold_acquires_total").await, 6.0);
}

async fn timeout_ends_the_wait_no_earlier_than_asked(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let _holder = dl.lock("busy").await.unwrap();
    let other = server.client("p");

    let started = Instant::now();
    let err = other
        .lock("busy")
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(
        waited >= Duration::from_millis(300),
        "returned early: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1300),
        "returned late: {waited:?}"
    );
    assert!(err.to_string().contains("busy"), "{err}");
    // The waiter is gone from the line.
    assert_eq!(server.inspect("p", "busy").await.1, 0);
}

async fn zero_timeout_tries_once(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let held = dl
        .lock("once")
        .timeout(Duration::ZERO)
        .await
        .expect("free lock is granted");
    let before = server.metric("leasehold_acquires_total").await;
    let started = Instant::now();
    let err = server
        .client("p")
        .lock("once")
        .timeout(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        server.metric("leasehold_acquires_total").await,
        before + 1.0
    );
    assert_eq!(
        server.inspect("p", "once").await,
        (Some(held.fencing_token()), 0)
    );
}

async fn dropping_a_waiting_acquire_withdraws_it(backend: Backend) {
    // A long grace (memory) and a long lease (etcd keeps a detached waiter for its lease's
    // TTL): only the SDK's explicit withdrawal can clear the waiter this fast.
    let server = TestServer::start_on_with(backend, |b| b.grace(Duration::from_secs(120))).await;
    let _holder = server.client("p").lock("c").await.unwrap();
    let dl = server.client("p");
    let waiting =
        tokio::spawn(async move { dl.lock("c").expires_in(Duration::from_secs(120)).await });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "c").await.1 == 1
    })
    .await;
    waiting.abort();
    eventually(BOUND, "waiter withdrawn", || async {
        server.inspect("p", "c").await.1 == 0
    })
    .await;
}

async fn a_grant_that_races_the_drop_is_released_at_once(backend: Backend) {
    let server = TestServer::start_on_with(backend, |b| b.grace(Duration::from_secs(120))).await;
    let holder = server.client("p").lock("race").await.unwrap();
    let dl = server.client("p");
    let mut acquire = Box::pin(
        dl.lock("race")
            .expires_in(Duration::from_secs(120))
            .into_future(),
    );
    tokio::select! {
        _ = &mut acquire => panic!("granted while held"),
        _ = eventually(BOUND, "waiter queued", || async { server.inspect("p", "race").await.1 == 1 }) => {}
    }
    // The server grants to the waiter now, but nobody polls the acquire to read the answer.
    holder.release().await.unwrap();
    let (token, _) = server.inspect("p", "race").await;
    assert!(token.is_some(), "the waiter was granted the lock");
    drop(acquire);
    // Far sooner than the 120 s lease: the orphaned grant is released.
    eventually(BOUND, "orphaned grant released", || async {
        server.inspect("p", "race").await.0.is_none()
    })
    .await;
    let next = server
        .client("p")
        .lock("race")
        .timeout(Duration::ZERO)
        .await;
    assert!(next.is_ok());
}

/// A retried acquire asks only for the wait that remains, so the server never keeps the
/// caller in line past its timeout, and does not say it is the first (protocol `first`: it
/// may have a place already). The peer here is a bare socket that reads the first
/// attempt, holds it unanswered, then drops the connection, and refuses the second
/// (`409`, as a lock server does when the wait ends without a grant).
#[tokio::test]
async fn a_retried_acquire_asks_for_the_remaining_wait() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = Duration::from_millis(400);
    let peer = tokio::spawn(async move {
        let mut waits = Vec::new();
        let mut firsts = Vec::new();
        for attempt in 0..2 {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            // The JSON body ends the request (the client sends it in one piece with it).
            while !request.ends_with(b"}") {
                let n = socket.read(&mut chunk).await.unwrap();
                assert!(n > 0, "request cut short");
                request.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&request).into_owned();
            let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            waits.push(json["wait_ms"].as_u64().unwrap());
            firsts.push(json.get("first").cloned());
            if attempt == 0 {
                tokio::time::sleep(held).await;
                drop(socket);
            } else {
                let answer = r#"{"error":"timeout","message":"not granted in time"}"#;
                let response = format!(
                    "HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        }
        (waits, firsts)
    });
    // Plain requests: the bare peer speaks no sessions.
    let dl = leasehold::DistributedLock::builder("k")
        .endpoint(&url)
        .http1_only()
        .session_stream(false)
        .build()
        .unwrap();
    let err = within(
        Duration::from_secs(20),
        dl.lock("x").timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let (waits, firsts) = within(Duration::from_secs(20), peer).await.unwrap();
    assert_eq!(firsts, [Some(serde_json::Value::Bool(true)), None]);
    assert!(waits[0] <= 5000 && waits[0] > 4000, "{waits:?}");
    assert!(
        waits[1] + held.as_millis() as u64 <= waits[0],
        "the retry asked for {} ms after {held:?} had passed: {waits:?}",
        waits[1]
    );
}
