//! Bad input, project isolation, unreachable servers. The tests that reach a server run
//! against both stores (`name::memory`, `name::etcd`).

mod support;

use leasehold::{DistributedLock, Error};
use std::time::Duration;
use support::proxy::Proxy;
use support::{Backend, TestServer, client_for, dead_addr, eventually, raw};
use tokio::time::Instant;

on_both_backends!(
    the_sdk_rejects_bad_names_and_leases_with_a_message,
    the_server_answers_400_to_the_same_raw_requests_and_changes_nothing,
    requests_without_a_valid_key_get_401,
    two_keys_never_see_each_others_locks,
);

fn message(err: Error) -> String {
    match err {
        Error::InvalidArgument { message } => message,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

async fn the_sdk_rejects_bad_names_and_leases_with_a_message(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let long = "x".repeat(300);
    let cases: Vec<(&str, Duration, &str)> = vec![
        ("", Duration::from_secs(1), "empty"),
        (&long, Duration::from_secs(1), "300 bytes"),
        ("nul\0inside", Duration::from_secs(1), "control character"),
        ("ok", Duration::ZERO, "longer than zero"),
        ("ok", Duration::from_secs(1000 * 86_400), "between"),
    ];
    for (name, lease, expected) in cases {
        let err = dl.lock(name).expires_in(lease).await.unwrap_err();
        let text = message(err);
        assert!(
            text.contains(expected),
            "{text:?} should mention {expected:?}"
        );
    }
    // Nothing reached the server.
    assert_eq!(server.metric("leasehold_acquires_total").await, 0.0);
}

async fn the_server_answers_400_to_the_same_raw_requests_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let held = dl.lock("existing").await.unwrap();
    let auth = [("authorization", "Bearer p")];
    let id = "0123456789abcdef0123456789abcdef";
    let long = "x".repeat(300);
    let bodies = [
        format!(r#"{{"name":"","lease_ms":1000,"request_id":"{id}"}}"#),
        format!(r#"{{"name":"{long}","lease_ms":1000,"request_id":"{id}"}}"#),
        format!(r#"{{"name":"a\u0000b","lease_ms":1000,"request_id":"{id}"}}"#),
        format!(r#"{{"name":"ok","lease_ms":0,"request_id":"{id}"}}"#),
        format!(r#"{{"name":"ok","lease_ms":86400000000,"request_id":"{id}"}}"#),
        format!(r#"{{"name":"ok","lease_ms":-5,"request_id":"{id}"}}"#),
        r#"{"name":"ok","lease_ms":1000,"request_id":"not-hex"}"#.to_owned(),
        format!(r#"{{"name":"existing","lease_ms":1000,"request_id":"{id}","extra":1}}"#),
        r#"{"name":"ok","lease_ms":1000"#.to_owned(),
        "not json".to_owned(),
    ];
    for body in &bodies {
        let (status, answer) = raw(server.addr, "POST", "/v1/acquire", &auth, body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let error: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(error["error"], "invalid_argument");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    // The SDK maps a 400 to InvalidArgument too (the server's lease bound is lower than the
    // protocol's).
    let err = dl
        .lock("ok")
        .expires_in(Duration::from_secs(7200))
        .await
        .unwrap_err();
    assert!(message(err).contains("lease_ms"));
    // State is as before: one holder, nobody waiting, no other lock.
    assert_eq!(
        server.inspect("p", "existing").await,
        (Some(held.fencing_token()), 0)
    );
    assert_eq!(server.inspect("p", "ok").await, (None, 0));
    // The etcd store counts held locks and waiters in the background (every few seconds).
    eventually(
        Duration::from_secs(10),
        "one lock held, nobody waiting",
        || async {
            server.metric("leasehold_held_locks").await == 1.0
                && server.metric("leasehold_waiters").await == 0.0
        },
    )
    .await;
}

async fn requests_without_a_valid_key_get_401(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let body = r#"{"name":"a","lease_ms":1000,"request_id":"0123456789abcdef0123456789abcdef"}"#;
    for headers in [
        vec![],
        vec![("authorization", "Basic abc")],
        vec![("authorization", "Bearer ")],
    ] {
        let (status, _) = raw(server.addr, "POST", "/v1/acquire", &headers, body).await;
        assert_eq!(status, 401);
    }
}

async fn two_keys_never_see_each_others_locks(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let a = server.client("key-a");
    let b = server.client("key-b");
    let held_by_a = a.lock("same-name").await.unwrap();
    // Project B gets its own lock of the same name at once.
    let held_by_b = b.lock("same-name").timeout(Duration::ZERO).await.unwrap();
    assert_ne!(held_by_a.fencing_token(), held_by_b.fencing_token());
    assert_eq!(
        server.inspect("key-a", "same-name").await.0,
        Some(held_by_a.fencing_token())
    );
    assert_eq!(
        server.inspect("key-b", "same-name").await.0,
        Some(held_by_b.fencing_token())
    );
    assert_eq!(server.inspect("key-c", "same-name").await, (None, 0));
    // A's release does not touch B's lock.
    held_by_a.release().await.unwrap();
    assert_eq!(
        server.inspect("key-b", "same-name").await.0,
        Some(held_by_b.fencing_token())
    );
}

#[tokio::test]
async fn an_unreachable_server_is_reported_within_the_timeout() {
    let addr = dead_addr().await;
    let dl = client_for(&format!("http://{addr}"), "p");
    let started = Instant::now();
    let err = dl
        .lock("x")
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains(&addr.to_string()),
        "{err} should name the endpoint"
    );
    assert!(waited <= Duration::from_secs(2), "took {waited:?}");
}

#[tokio::test]
async fn a_silent_server_is_reported_shortly_after_the_timeout() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    proxy.cut();
    let dl = client_for(&proxy.url(), "p");
    let started = Instant::now();
    let err = dl
        .lock("x")
        .timeout(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // A server that ends a wait at the deadline answers a network trip later, so silence
    // is only concluded one second after it.
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unavailable_after_bounds_a_wait_without_timeout() {
    let addr = dead_addr().await;
    let dl = DistributedLock::builder("p")
        .endpoint(format!("http://{addr}"))
        .unavailable_after(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = dl.lock("x").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

/// `Duration::MAX` is a fair way to say "no limit": it must not overflow the clock.
#[tokio::test]
async fn the_longest_durations_mean_no_limit() {
    let server = TestServer::start().await;
    let dl = DistributedLock::builder("p")
        .endpoint(server.url())
        .unavailable_after(Duration::MAX)
        .build()
        .unwrap();
    let guard = dl.lock("forever").timeout(Duration::MAX).await.unwrap();
    assert!(guard.is_held());
    let info = dl.inspect("forever").await.unwrap();
    assert_eq!(
        info.holder.map(|h| h.fencing_token),
        Some(guard.fencing_token())
    );
    guard.release().await.unwrap();
    // Waiting without a timeout, past `unavailable_after(MAX)`, for a lock taken at once.
    let guard = dl.lock("forever").await.unwrap();
    guard.release().await.unwrap();
}

#[tokio::test]
async fn bad_client_settings_are_reported_by_build() {
    for url in ["ftp://x", "not a url", "http://host/path", "http://"] {
        let err = DistributedLock::builder("k")
            .endpoint(url)
            .build()
            .unwrap_err();
        assert!(err.is_invalid_argument(), "{url}: {err}");
    }
    let err = DistributedLock::builder("k")
        .endpoints(Vec::<String>::new())
        .build()
        .unwrap_err();
    assert!(err.is_invalid_argument());
    let err = DistributedLock::builder("bad\nkey").build().unwrap_err();
    assert!(err.is_invalid_argument());
    assert!(
        !err.to_string().contains("bad\nkey"),
        "errors never show the key"
    );
    // `new` cannot fail: the first request reports the problem.
    let dl = DistributedLock::builder("").build();
    assert!(dl.is_err());
}
