//! Answers that are not the protocol's, and the errors they become: each keeps its cause.
#![cfg(feature = "testing")]

mod support;

use leasehold::testing::TestServer;
use leasehold::{DistributedLock, Error};
use std::time::Duration;
use support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SLACK: Duration = Duration::from_secs(10);

/// A server that answers every HTTP/1.1 request with `status` and `body`, as a proxy in
/// front of a lock server might.
async fn answering(status: &'static str, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head and the body (small JSON), then answer.
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

fn client(url: &str) -> DistributedLock {
    DistributedLock::builder("k")
        .endpoint(url)
        .http1_only()
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_a_decode_error_with_its_cause() {
    let url = answering("200 OK", "<html>hello</html>").await;
    let err = within(SLACK, client(&url).lock("x")).await.unwrap_err();
    assert!(err.is_decode(), "{err:?}");
    assert!(matches!(err, Error::Decode { status: 200, .. }), "{err:?}");
    let cause = std::error::Error::source(&err).expect("the JSON error is the source");
    assert!(cause.is::<serde_json::Error>(), "{cause:?}");
}

#[tokio::test]
async fn a_proxy_error_page_keeps_the_page_and_why_it_was_not_read() {
    let url = answering("500 Internal Server Error", "<h1>upstream broke</h1>").await;
    let err = within(SLACK, client(&url).lock("x")).await.unwrap_err();
    match &err {
        Error::Server {
            status, message, ..
        } => {
            assert_eq!(*status, 500);
            assert!(message.contains("upstream broke"), "{message}");
        }
        other => panic!("expected Server, got {other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
}

#[tokio::test]
async fn timeout_messages_round_their_durations() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let holder = dl.lock("rounded").metadata("host-a/job-1").await.unwrap();
    let err = dl
        .lock("rounded")
        .timeout(Duration::from_millis(120))
        .await
        .unwrap_err();
    let message = err.to_string();
    // `timed out after 123ms`, never `123.456789ms`.
    let waited = message
        .split("timed out after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default();
    assert!(
        waited.ends_with("ms") && waited.trim_end_matches("ms").parse::<u64>().is_ok()
            || waited.ends_with('s') && !waited.contains("ms"),
        "{message}"
    );
    assert!(message.contains("host-a/job-1"), "{message}");
    holder.release().await.unwrap();
    server.shutdown().await;
}
