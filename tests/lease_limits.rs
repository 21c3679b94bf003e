//! Lease limits over raw HTTP, on both stores: `max_hold_ms`, `lock_delay_ms`, revocation
//! (`POST /v1/revoke`) and the `gone` reasons of renewals.
//!
//! Time bounds follow from the leases each test chose: a lower bound is what the protocol
//! promises (nobody is granted before it), an upper bound adds generous slack for a slow,
//! busy machine. Waiting is done by long polls and bounded re-checks, never fixed sleeps.

mod support;

use leasehold::server::new_key;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::{Backend, TestServer, eventually, raw, within};
use tokio::time::Instant;

/// Slack for "promptly": scheduling on a loaded machine, plus etcd's lease expiry checks
/// (every 500 ms) and its whole-second TTLs.
fn slack(backend: Backend) -> Duration {
    match backend {
        Backend::Memory => Duration::from_secs(2),
        Backend::Etcd => Duration::from_secs(4),
    }
}

const BOUND: Duration = Duration::from_secs(60);

async fn post(addr: SocketAddr, key: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = raw(
        addr,
        "POST",
        path,
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
        ],
        &body.to_string(),
    )
    .await;
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, value)
}

/// A fresh request id: 32 hex digits, unique within this test binary's run.
fn request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!("{nanos:016x}{:08x}{n:08x}", std::process::id())
}

/// An acquire: `extra` adds fields (`max_hold_ms`, `lock_delay_ms`, `wait_ms`).
async fn acquire(
    addr: SocketAddr,
    key: &str,
    name: &str,
    lease: Duration,
    extra: Value,
) -> (u16, Value) {
    let mut body = json!({
        "name": name,
        "lease_ms": lease.as_millis() as u64,
        "request_id": request_id(),
        "wait_ms": 0,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            body.insert(k.clone(), v.clone());
        }
    }
    // Long polls end with 202 before the wait does: poll again with the same request id.
    loop {
        let (status, answer) = post(addr, key, "/v1/acquire", body.clone()).await;
        if status != 202 {
            return (status, answer);
        }
    }
}

/// An acquire that waits (long polls) for up to `BOUND`.
async fn wait_for(addr: SocketAddr, key: &str, name: &str, lease: Duration) -> (u16, Value) {
    let wait_ms = BOUND.as_millis() as u64;
    acquire(addr, key, name, lease, json!({ "wait_ms": wait_ms })).await
}

/// A granted acquire's (lease id, fencing token, lease ms).
fn granted(answer: &(u16, Value)) -> (String, u64, u64) {
    assert_eq!(answer.0, 200, "not granted: {answer:?}");
    let v = &answer.1;
    (
        v["lease_id"].as_str().expect("lease_id").to_owned(),
        v["fencing_token"].as_u64().expect("fencing_token"),
        v["lease_ms"].as_u64().expect("lease_ms"),
    )
}

async fn renew(addr: SocketAddr, key: &str, name: &str, lease_id: &str) -> Value {
    let (status, answer) = post(
        addr,
        key,
        "/v1/renew",
        json!({"leases": [{"name": name, "lease_id": lease_id}]}),
    )
    .await;
    assert_eq!(status, 200, "renew answered {status}: {answer}");
    answer["results"][0].clone()
}

async fn release(addr: SocketAddr, key: &str, name: &str, lease_id: &str) -> (u16, Value) {
    post(
        addr,
        key,
        "/v1/release",
        json!({"name": name, "lease_id": lease_id}),
    )
    .await
}

async fn revoke(addr: SocketAddr, key: &str, name: &str) -> (u16, Value) {
    post(addr, key, "/v1/revoke", json!({"name": name})).await
}

async fn inspect(addr: SocketAddr, key: &str, name: &str) -> (u16, Value) {
    let (status, text) = raw(
        addr,
        "GET",
        &format!("/v1/locks/{name}"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

on_both_backends!(
    max_hold_caps_renewals_then_answers_gone_max_hold,
    a_waiter_gets_the_lock_at_the_holders_max_hold,
    lock_delay_holds_back_after_an_expiry_not_after_a_release,
    lock_delay_and_max_hold_are_checked,
    revoke_hands_the_lock_to_the_next_waiter,
    revoke_honours_the_revoked_leases_lock_delay,
    revoke_needs_an_admin_key_of_the_project,
);

async fn max_hold_caps_renewals_then_answers_gone_max_hold(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(300));
    let hold = lease * 2 + lease / 2;
    let sent = Instant::now();
    let answer = acquire(
        server.addr,
        "p",
        "capped",
        lease,
        json!({"max_hold_ms": hold.as_millis() as u64}),
    )
    .await;
    let received = Instant::now();
    let (lease_id, _, lease_ms) = granted(&answer);
    assert!(lease_ms <= lease.as_millis() as u64);
    // Renew about three times per lease until the server says the hold is over.
    let reason = within(hold + slack(backend) * 2, async {
        loop {
            let renew_sent = Instant::now();
            let result = renew(server.addr, "p", "capped", &lease_id).await;
            if result["status"] == "gone" {
                assert!(
                    renew_sent + Duration::from_millis(1) >= sent + hold,
                    "gone {:?} before the hold could end",
                    sent + hold - renew_sent
                );
                return result["reason"].clone();
            }
            assert_eq!(result["status"], "renewed", "{result}");
            // Never past the hold's end: granted no earlier than `sent`, so the hold ends no
            // later than `received + hold`, and this renewal was made after `renew_sent`.
            let left = (received + hold).saturating_duration_since(renew_sent);
            let lease_ms = result["lease_ms"].as_u64().expect("lease_ms");
            assert!(
                lease_ms <= left.as_millis() as u64 + 1,
                "renewed for {lease_ms} ms with at most {left:?} of the hold left"
            );
            tokio::time::sleep_until(renew_sent + lease / 3).await;
        }
    })
    .await;
    assert_eq!(reason, "max_hold");
    // The lock is free again.
    granted(&acquire(server.addr, "p", "capped", lease, json!({})).await);
}

async fn a_waiter_gets_the_lock_at_the_holders_max_hold(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    // A long lease the holder never gives back; its hold ends long before it.
    let lease = Duration::from_secs(30);
    let hold = server.lease(Duration::from_millis(1500));
    let sent = Instant::now();
    let answer = acquire(
        server.addr,
        "p",
        "hog",
        lease,
        json!({"max_hold_ms": hold.as_millis() as u64}),
    )
    .await;
    let received = Instant::now();
    let (_, first_token, _) = granted(&answer);
    let waiter = wait_for(server.addr, "p", "hog", lease).await;
    let got = Instant::now();
    let (_, token, _) = granted(&waiter);
    assert!(token > first_token);
    assert!(got >= sent + hold, "granted {:?} early", sent + hold - got);
    assert!(
        got <= received + hold + slack(backend),
        "granted {:?} after the hold ended",
        got - (received + hold)
    );
}

async fn lock_delay_holds_back_after_an_expiry_not_after_a_release(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(300));
    let delay = Duration::from_secs(2);
    let delayed = json!({"lock_delay_ms": delay.as_millis() as u64});

    // A release never waits.
    let (lease_id, _, _) = granted(&acquire(server.addr, "p", "d", lease, delayed.clone()).await);
    assert_eq!(release(server.addr, "p", "d", &lease_id).await.0, 200);
    let (lease_id, _, _) = granted(&acquire(server.addr, "p", "d", lease, json!({})).await);
    assert_eq!(release(server.addr, "p", "d", &lease_id).await.0, 200);

    // An expiry does: nobody before the lease's end plus the delay.
    let sent = Instant::now();
    let sent_wall = wall_ms();
    let (_, first_token, lease_ms) =
        granted(&acquire(server.addr, "p", "d", lease, delayed.clone()).await);
    let received = Instant::now();
    let earliest = sent + Duration::from_millis(lease_ms) + delay;
    let waiter = tokio::spawn({
        let addr = server.addr;
        async move {
            let answer = wait_for(addr, "p", "d", lease).await;
            (answer, Instant::now())
        }
    });
    // While the delay runs, inspection says until when, and a try-once acquire is refused.
    eventually(
        lease + delay + slack(backend),
        "the delay shows",
        || async {
            let (status, info) = inspect(server.addr, "p", "d").await;
            if status != 200 || !info["holder"].is_null() {
                return false;
            }
            let Some(until) = info["held_back_until_ms"].as_u64() else {
                // Nobody holds and no delay shows: only once the delay may have ended (a
                // check starved for the whole delay has nothing left to see).
                assert!(
                    Instant::now() >= earliest,
                    "the lock shows free while its delay runs: {info}"
                );
                return true;
            };
            assert!(
                until + 1 >= sent_wall + lease_ms + delay.as_millis() as u64,
                "the delay ends too early: {info}"
            );
            true
        },
    )
    .await;
    if Instant::now() + Duration::from_millis(200) < earliest {
        let (status, _) = acquire(server.addr, "other", "d", lease, json!({})).await;
        assert_eq!(
            status, 200,
            "another project's lock of that name is not delayed"
        );
        let (status, answer) = acquire(server.addr, "p", "d", lease, json!({})).await;
        assert_eq!(status, 409, "granted during the delay: {answer}");
    }
    let (answer, got) = within(BOUND, waiter).await.expect("waiter");
    let (_, token, _) = granted(&answer);
    assert!(token > first_token);
    assert!(got >= earliest, "granted {:?} early", earliest - got);
    let latest = received + Duration::from_millis(lease_ms) + delay + slack(backend);
    assert!(got <= latest, "granted {:?} late", got - latest);
}

async fn lock_delay_and_max_hold_are_checked(backend: Backend) {
    let server =
        TestServer::start_on_with(backend, |b| b.max_lock_delay(Duration::from_secs(5))).await;
    let lease = server.lease(Duration::from_millis(500));
    let (status, answer) =
        acquire(server.addr, "p", "c", lease, json!({"lock_delay_ms": 5001})).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_argument");
    let message = answer["message"].as_str().expect("message");
    assert!(
        message.contains("5000 ms"),
        "the maximum is named: {message}"
    );
    let (status, answer) = acquire(server.addr, "p", "c", lease, json!({"max_hold_ms": 0})).await;
    assert_eq!(status, 400, "{answer}");
    let (lease_id, _, _) = granted(
        &acquire(
            server.addr,
            "p",
            "c",
            lease,
            json!({"lock_delay_ms": 5000, "max_hold_ms": 60000}),
        )
        .await,
    );
    assert_eq!(release(server.addr, "p", "c", &lease_id).await.0, 200);
}

async fn revoke_hands_the_lock_to_the_next_waiter(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = Duration::from_secs(30);
    let (lease_id, first_token, _) =
        granted(&acquire(server.addr, "p", "r", lease, json!({})).await);
    let waiter = tokio::spawn({
        let addr = server.addr;
        async move { wait_for(addr, "p", "r", lease).await }
    });
    eventually(BOUND, "the waiter is in line", || async {
        server.inspect("p", "r").await.1 == 1
    })
    .await;
    // Another project's key cannot reach the lock; a lock nobody holds has nothing to revoke.
    assert_eq!(revoke(server.addr, "q", "r").await.0, 404);
    let (status, answer) = revoke(server.addr, "p", "nobody-holds-this").await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));

    let (status, answer) = revoke(server.addr, "p", "r").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["fencing_token"].as_u64(), Some(first_token));
    let (next_id, token, _) = granted(&within(BOUND, waiter).await.expect("waiter"));
    assert!(token > first_token);
    let result = renew(server.addr, "p", "r", &lease_id).await;
    assert_eq!(result, json!({"status": "gone", "reason": "revoked"}));
    let (status, answer) = release(server.addr, "p", "r", &lease_id).await;
    assert_eq!((status, answer["error"].as_str()), (410, Some("gone")));
    assert_eq!(server.metric("leasehold_revocations_total").await, 1.0);
    assert_eq!(release(server.addr, "p", "r", &next_id).await.0, 200);
}

async fn revoke_honours_the_revoked_leases_lock_delay(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = Duration::from_secs(30);
    let delay = Duration::from_secs(2);
    granted(
        &acquire(
            server.addr,
            "p",
            "rd",
            lease,
            json!({"lock_delay_ms": delay.as_millis() as u64}),
        )
        .await,
    );
    let revoke_sent = Instant::now();
    let (status, answer) = revoke(server.addr, "p", "rd").await;
    let revoke_received = Instant::now();
    assert_eq!(status, 200, "{answer}");
    let answer = wait_for(server.addr, "p", "rd", lease).await;
    let got = Instant::now();
    granted(&answer);
    assert!(
        got >= revoke_sent + delay,
        "granted {:?} early",
        revoke_sent + delay - got
    );
    let latest = revoke_received + delay + slack(server.backend);
    assert!(got <= latest, "granted {:?} late", got - latest);
}

async fn revoke_needs_an_admin_key_of_the_project(backend: Backend) {
    let (admin, admin_line) = new_key("alpha");
    let (user, user_line) = new_key("alpha");
    let (other, other_line) = new_key("beta");
    let admin_line = admin_line.replacen("{ id", "{ admin = true, id", 1);
    let other_line = other_line.replacen("{ id", "{ admin = true, id", 1);
    let dir =
        std::env::temp_dir().join(format!("dl-revoke-keys-{backend:?}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!(
            "[[projects]]\nname = \"alpha\"\nkeys = [\n{admin_line}\n{user_line}\n]\n\
             [[projects]]\nname = \"beta\"\nkeys = [\n{other_line}\n]\n"
        ),
    )
    .expect("key file");
    let server = TestServer::start_on_with(backend, move |b| b.key_file(path)).await;
    let (_, token, _) = granted(
        &acquire(
            server.addr,
            &user,
            "job",
            Duration::from_secs(30),
            json!({}),
        )
        .await,
    );

    let (status, answer) = revoke(server.addr, &user, "job").await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    assert!(
        answer["message"].as_str().unwrap_or("").contains("admin"),
        "{answer}"
    );
    // An admin of another project does not see the lock.
    assert_eq!(revoke(server.addr, &other, "job").await.0, 404);
    let (status, answer) = revoke(server.addr, &admin, "job").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["fencing_token"].as_u64(), Some(token));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The memory store remembers why a lease ended: a renewal after it expired says so.
#[tokio::test]
async fn a_late_renewal_of_an_expired_lease_says_expired() {
    let server = TestServer::start().await;
    let lease = Duration::from_millis(50);
    let (lease_id, _, _) = granted(&acquire(server.addr, "p", "late", lease, json!({})).await);
    let sent = Instant::now();
    eventually(BOUND, "the lease expires", || async {
        sent.elapsed() > lease && server.inspect("p", "late").await.0.is_none()
    })
    .await;
    let result = renew(server.addr, "p", "late", &lease_id).await;
    assert_eq!(result, json!({"status": "gone", "reason": "expired"}));
    // A lease id the server never issued has no reason.
    let unknown = renew(server.addr, "p", "late", &request_id()).await;
    assert_eq!(unknown, json!({"status": "gone"}));
}

/// On etcd, the lock-delay is in etcd, not in the server that granted the lease: a holder
/// whose server is gone (and who stops renewing) delays a waiter on another server.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn another_server_over_the_same_etcd_respects_the_lock_delay() {
    let etcd = support::etcd::EtcdCluster::start(1).await;
    let first = TestServer::start_over(Some(&etcd), |b| b).await;
    let second = TestServer::start_over(Some(&etcd), |b| b).await;
    let lease = Backend::Etcd.lease(Duration::from_millis(300));
    let delay = Duration::from_secs(2);
    let sent = Instant::now();
    let (_, first_token, lease_ms) = granted(
        &acquire(
            first.addr,
            "p",
            "shared",
            lease,
            json!({"lock_delay_ms": delay.as_millis() as u64}),
        )
        .await,
    );
    let received = Instant::now();
    first.stop().await;
    let answer = wait_for(second.addr, "p", "shared", lease).await;
    let got = Instant::now();
    let (_, token, _) = granted(&answer);
    assert!(token > first_token);
    let earliest = sent + Duration::from_millis(lease_ms) + delay;
    assert!(got >= earliest, "granted {:?} early", earliest - got);
    let latest = received + Duration::from_millis(lease_ms) + delay + slack(Backend::Etcd);
    assert!(got <= latest, "granted {:?} late", got - latest);
}
