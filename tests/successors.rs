//! Successor reservations (docs/protocol.md §3.16): a lock passes between the waiters of
//! one client in the client, without waiting for the server, and the server keeps the order,
//! the tokens and the leases that make that safe. A real server over sockets: the protocol
//! with raw HTTP requests, the SDK with a server that stops answering.
#![cfg(feature = "testing")]

mod support;

use leasehold::testing::TestServer;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use support::{eventually, raw, within};

/// Leases of the SDK tests: long against any machine's pauses, so a guard's deadline never
/// passes by itself while a test runs.
const LEASE: Duration = Duration::from_secs(30);
/// The server's long poll in the protocol tests: an answer well before it came from an
/// event, not from the poll's end.
const POLL_MS: u64 = 60_000;
/// Bound for anything that comes from an event, half the poll.
const EVENT: Duration = Duration::from_secs(30);

fn addr(server: &TestServer) -> SocketAddr {
    server
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("the test server's address")
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = raw(
        addr,
        "POST",
        path,
        &[
            ("authorization", "Bearer k"),
            ("content-type", "application/json"),
        ],
        &body.to_string(),
    )
    .await;
    let answer = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}"))
    };
    (status, answer)
}

fn hex(n: u8) -> String {
    format!("{n:02x}").repeat(16)
}

/// Cancels the acquire `request` of the lock; the answer's status.
async fn cancel(addr: SocketAddr, request: u8) -> u16 {
    let body = json!({"name": "turns", "request_id": hex(request)});
    post(addr, "/v1/cancel", body).await.0
}

fn acquire(request: u8, client: Option<u8>, extra: Value) -> Value {
    let mut body = json!({
        "name": "turns",
        "lease_ms": 10_000,
        "poll_ms": POLL_MS,
        "request_id": hex(request),
    });
    if let Some(client) = client {
        body["client_id"] = json!(hex(client));
    }
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

#[tokio::test]
async fn the_server_reserves_the_lock_to_the_holders_own_clients_waiter() {
    let server = TestServer::start().await;
    let addr = addr(&server);
    let (status, holder) = post(addr, "/v1/acquire", acquire(1, Some(7), json!({}))).await;
    assert_eq!(status, 200, "{holder}");

    // Another client's waiter first in line gets no reservation: its poll runs out.
    let other = acquire(2, Some(8), json!({"poll_ms": 200}));
    let (status, answer) = within(EVENT, post(addr, "/v1/acquire", other)).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.get("next").is_none(), "{answer}");
    assert_eq!(cancel(addr, 2).await, 200);

    // The holder's own client's waiter is told at once, long before its poll ends.
    let (status, answer) = within(
        EVENT,
        post(addr, "/v1/acquire", acquire(3, Some(7), json!({}))),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let next = &answer["next"];
    assert_eq!(next["after"], holder["lease_id"]);
    assert_eq!(next["lease_ms"], 10_000);
    assert!(next["fencing_token"].as_u64() > holder["fencing_token"].as_u64());

    // Its lease is renewed already, and its wait no longer ends by itself.
    let renew = json!({"leases": [{"name": "turns", "lease_id": next["lease_id"]}]});
    let (status, renewed) = post(addr, "/v1/renew", renew).await;
    assert_eq!(status, 200);
    assert_eq!(renewed["results"][0]["status"], "renewed", "{renewed}");
    let short_wait = acquire(3, Some(7), json!({"wait_ms": 100}));
    let (status, answer) = within(EVENT, post(addr, "/v1/acquire", short_wait)).await;
    assert_eq!(status, 202, "still reserved: {answer}");
    assert_eq!(&answer["next"], next);

    // The holder's release makes it the holder, with the reserved lease and token.
    let poll = tokio::spawn(post(addr, "/v1/acquire", acquire(3, Some(7), json!({}))));
    let release = json!({"name": "turns", "lease_id": holder["lease_id"]});
    let (status, _) = post(addr, "/v1/release", release).await;
    assert_eq!(status, 200);
    let (status, granted) = within(EVENT, poll).await.unwrap();
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["lease_id"], next["lease_id"]);
    assert_eq!(granted["fencing_token"], next["fencing_token"]);
}

#[tokio::test]
async fn a_reservation_ends_only_by_its_clients_word() {
    let server = TestServer::start().await;
    let addr = addr(&server);
    let (_, holder) = post(addr, "/v1/acquire", acquire(1, Some(7), json!({}))).await;
    let (_, answer) = within(
        EVENT,
        post(addr, "/v1/acquire", acquire(2, Some(7), json!({}))),
    )
    .await;
    let first = answer["next"].clone();
    let (_, answer) = within(
        EVENT,
        post(
            addr,
            "/v1/acquire",
            acquire(3, Some(7), json!({"poll_ms": 100})),
        ),
    )
    .await;
    assert!(answer.get("next").is_none(), "second in line: {answer}");

    // Released before it began: the next of the same client is reserved in its place,
    // behind the same holder, with a later token.
    let release = json!({"name": "turns", "lease_id": first["lease_id"]});
    let (status, _) = post(addr, "/v1/release", release).await;
    assert_eq!(status, 200);
    let (status, answer) = within(
        EVENT,
        post(addr, "/v1/acquire", acquire(3, Some(7), json!({}))),
    )
    .await;
    assert_eq!(status, 202);
    let second = &answer["next"];
    assert_eq!(second["after"], holder["lease_id"]);
    assert!(second["fencing_token"].as_u64() > first["fencing_token"].as_u64());

    // A cancel withdraws it: the holder's release leaves the lock free.
    assert_eq!(cancel(addr, 3).await, 200);
    let release = json!({"name": "turns", "lease_id": holder["lease_id"]});
    assert_eq!(post(addr, "/v1/release", release).await.0, 200);
    let free = acquire(4, None, json!({"wait_ms": 0}));
    assert_eq!(post(addr, "/v1/acquire", free).await.0, 200);
}

/// A second task of `dl` waiting for "turns", once it knows the server reserved the lock
/// to it next.
async fn reserved_waiter(
    dl: &leasehold::DistributedLock,
) -> tokio::task::JoinHandle<Result<leasehold::LockGuard, leasehold::Error>> {
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("turns").expires_in(LEASE).await }
    });
    eventually(EVENT, "the waiter knows its reservation", || {
        let known = dl.reserved_waiters_for_tests() == 1;
        async move { known }
    })
    .await;
    waiter
}

#[tokio::test]
async fn tasks_of_one_client_pass_the_lock_without_waiting_for_the_server() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let first = dl.lock("turns").expires_in(LEASE).await.unwrap();
    let waiter = reserved_waiter(&dl).await;

    // The server answers nothing now: the lock still passes, when the guard goes.
    server.pause().await;
    let first_token = first.fencing_token();
    let first_until = first.valid_until();
    drop(first);
    let second = within(EVENT, waiter).await.unwrap().unwrap();
    assert!(second.fencing_token() > first_token);
    assert!(second.is_held());
    // Held no longer than the lease ahead was, until the server confirms its own.
    assert!(second.valid_until() <= first_until);

    // The server catches up: the reserved lease is the holder, and it renews.
    server.resume().await;
    let addr = addr(&server);
    eventually(EVENT, "the server sees the second holder", || async {
        let (status, body) = raw(
            addr,
            "GET",
            "/v1/locks/turns",
            &[("authorization", "Bearer k")],
            "",
        )
        .await;
        status == 200
            && serde_json::from_str::<Value>(&body).unwrap()["holder"]["fencing_token"]
                == json!(second.fencing_token())
    })
    .await;
    second.release().await.unwrap();
}

#[tokio::test]
async fn a_reserved_waiter_times_out_in_the_client_and_leaves_the_line() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let holder = dl.lock("turns").expires_in(LEASE).await.unwrap();
    let timeout = Duration::from_millis(300);
    let waiter = dl.lock("turns").expires_in(LEASE).timeout(timeout);
    let err = within(EVENT, waiter).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // Its cancel reached the server: the release leaves the lock to nobody.
    eventually(EVENT, "the waiter left the line", || async {
        dl.inspect("turns")
            .await
            .is_ok_and(|info| info.waiters == 0)
    })
    .await;
    holder.release().await.unwrap();
    let other = server.client("k");
    assert!(other.try_lock("turns").await.unwrap().is_some());
}

#[tokio::test]
async fn a_waiter_behind_a_lost_lease_gets_the_lock_from_the_server() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let short = Duration::from_secs(1);
    let first = dl
        .lock("turns")
        .expires_in(short)
        .auto_renew(false)
        .await
        .unwrap();
    let waiter = reserved_waiter(&dl).await;
    // Never released: lost when its lease runs out, and the server grants the waiter when
    // it expires there.
    within(EVENT, first.lost()).await;
    let second = within(EVENT, waiter).await.unwrap().unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    assert!(second.is_held());
}

#[tokio::test]
async fn a_revoked_holders_successor_waits_until_the_holder_would_have_lost_it() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let lease = Duration::from_secs(3);
    let first = dl.lock("turns").expires_in(lease).await.unwrap();
    let waiter = reserved_waiter(&dl).await;
    // The holder's client does not know of the revocation before its next renewal, and
    // could hand the lock over until its deadline: the successor starts no earlier.
    let until = first.valid_until();
    assert!(server.revoke("turns").await.is_some());
    let second = within(EVENT, waiter).await.unwrap().unwrap();
    assert!(tokio::time::Instant::now() >= until);
    assert!(second.fencing_token() > first.fencing_token());
    assert!(!first.is_held());
}
