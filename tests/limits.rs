//! Server limits, each one exercised: body size, header size and count, long-poll bound,
//! slowloris, idle keep-alive, the connection cap, and inspection details.

mod support;

use std::time::Duration;
use support::{TestServer, raw, raw_bytes, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(10);
const AUTH: (&str, &str) = ("authorization", "Bearer p");

#[tokio::test]
async fn oversized_bodies_get_413() {
    let server = TestServer::start_with(|b| b.max_body_bytes(1024)).await;
    let big = format!(
        r#"{{"name":"{}","lease_ms":1000,"request_id":"0123456789abcdef0123456789abcdef"}}"#,
        "x".repeat(2000)
    );
    let (status, _) = raw(server.addr, "POST", "/v1/acquire", &[AUTH], &big).await;
    assert_eq!(status, 413);
    // Also when the length is not declared up front (chunked).
    let chunked = format!(
        "POST /v1/acquire HTTP/1.1\r\nhost: t\r\nauthorization: Bearer p\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let (status, _) = raw_bytes(server.addr, chunked.as_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(server.metric("leasehold_held_locks").await, 0.0);
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let server = TestServer::start().await;
    let long = "v".repeat(20_000);
    let (status, _) = raw(server.addr, "GET", "/healthz", &[("x-long", &long)], "").await;
    assert_eq!(status, 431);
    let many: Vec<(String, String)> = (0..100)
        .map(|i| (format!("x-h{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _) = raw(server.addr, "GET", "/healthz", &many, "").await;
    assert_eq!(status, 431);
    let (status, _) = raw(server.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_long_poll_is_answered_at_the_servers_bound_and_keeps_the_place() {
    let server = TestServer::start_with(|b| b.max_poll(Duration::from_millis(200))).await;
    let _holder = server.client("p").lock("polled").await.unwrap();
    let body = r#"{"name":"polled","lease_ms":1000,"poll_ms":60000,"request_id":"0123456789abcdef0123456789abcdef"}"#;
    let started = Instant::now();
    let (status, answer) = raw(server.addr, "POST", "/v1/acquire", &[AUTH], body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(2));
    // Still in line for the grace period.
    assert_eq!(server.inspect("p", "polled").await.1, 1);
}

#[tokio::test]
async fn slowloris_connections_are_closed_while_real_clients_stay_fast() {
    let server =
        TestServer::start_with(|b| b.header_read_timeout(Duration::from_millis(300))).await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-slow: ")
            .await
            .unwrap();
        slow.push(tcp);
    }
    // A real client is not held up meanwhile.
    let started = Instant::now();
    let dl = server.client("p");
    dl.with_lock("fast", || async {}).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Every trickling connection is closed after the header timeout.
    for mut tcp in slow {
        let mut buf = Vec::new();
        let read = within(BOUND, tcp.read_to_end(&mut buf)).await;
        assert!(read.is_ok() || read.is_err());
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let server = TestServer::start_with(|b| b.idle_timeout(Duration::from_millis(300))).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within(BOUND, tcp.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    // Keep-alive: the connection stays open, then is closed when idle too long.
    let n = within(BOUND, tcp.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        answered.elapsed() >= Duration::from_millis(250),
        "{:?}",
        answered.elapsed()
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let server = TestServer::start_with(|b| b.max_connections(3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        // A completed request proves the connection was accepted and counted.
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = within(BOUND, tcp.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        held.push(tcp);
    }
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 1024];
    let read = within(BOUND, extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(held);
    support::eventually(BOUND, "capacity back", || async {
        raw(server.addr, "GET", "/healthz", &[], "").await.0 == 200
    })
    .await;
    assert!(server.metric("leasehold_connections_refused_total").await >= 1.0);
}

#[tokio::test]
async fn inspection_shows_holder_label_times_and_the_line() {
    let server = TestServer::start().await;
    let dl = server.client("p");
    let before = std::time::SystemTime::now();
    let guard = dl
        .lock("inspected")
        .expires_in(Duration::from_secs(30))
        .metadata("host-a/job-42")
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("inspected").timeout(Duration::from_secs(30)).await }
    });
    support::eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "inspected").await.1 == 1
    })
    .await;
    let info = dl.inspect("inspected").await.unwrap();
    let holder = info.holder.expect("held");
    assert_eq!(holder.fencing_token, guard.fencing_token());
    assert_eq!(holder.metadata.as_deref(), Some("host-a/job-42"));
    assert!(
        holder.expires_in > Duration::from_secs(25) && holder.expires_in <= Duration::from_secs(30)
    );
    let acquired = holder
        .acquired_at
        .duration_since(before)
        .unwrap_or_default();
    assert!(acquired < Duration::from_secs(5), "{acquired:?}");
    assert_eq!(info.waiters, 1);
    assert!(info.oldest_wait.is_some());
    waiter.abort();
    // A free lock inspects as free.
    let free = dl.inspect("nobody-here").await.unwrap();
    assert_eq!((free.holder, free.waiters), (None, 0));
    // Timeouts say who held the lock.
    let err = server
        .client("p")
        .lock("inspected")
        .timeout(Duration::from_millis(50))
        .await
        .unwrap_err();
    match &err {
        leasehold::Error::Timeout {
            holder: Some(h), ..
        } => {
            assert_eq!(h.fencing_token, guard.fencing_token());
            assert_eq!(h.metadata.as_deref(), Some("host-a/job-42"));
        }
        other => panic!("expected a timeout naming the holder, got {other}"),
    }
    assert!(err.to_string().contains("host-a/job-42"), "{err}");
    // A bad label is refused like a bad name.
    let err = dl.lock("x").metadata("bad\nlabel").await.unwrap_err();
    assert!(err.is_invalid_argument());
}
