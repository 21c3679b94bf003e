//! Sessions (docs/protocol.md §3.15): lock operations as frames over an upgraded HTTP/1.1
//! connection. The SDK's own use of them, and the frames as another language's client would
//! speak them, byte for byte over a raw socket.

mod support;

use leasehold::server::new_key;
use serde_json::{Value, json};
use std::time::Duration;
use support::key_file::KeyFile;
use support::{TestServer, eventually, within};

const BOUND: Duration = Duration::from_secs(10);

fn key_file(keys: &[&str]) -> String {
    format!(
        "[[projects]]\nname = \"p\"\nkeys = [\n{}\n]\n",
        keys.join("\n")
    )
}
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SESSIONS_OPEN: &str = "leasehold_sessions_open";
const SESSION_OPS: &str = "leasehold_session_operations_total";

/// A raw session: the upgrade, then frames written and read by hand.
struct RawSession {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawSession {
    /// Upgrades a fresh connection; returns the status and the answer's head if the server
    /// did not switch protocols.
    async fn open(server: &TestServer, key: &str) -> Result<RawSession, (u16, String)> {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /v1/session HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n\
             connection: upgrade\r\nupgrade: leasehold-session/1\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed before answering the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head[9..12].parse().unwrap();
        if status != 101 {
            return Err((status, head));
        }
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: leasehold-session/1"), "{head}");
        Ok(RawSession {
            tcp,
            buf: buf[head_end..].to_vec(),
        })
    }

    async fn send(&mut self, id: u64, op: u8, body: &Value) {
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        self.send_raw(&frame(id, op, &body)).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next answer frame: (id, status, retry-after seconds, JSON body); `None` once the
    /// server closed the session.
    async fn answer(&mut self) -> Option<(u64, u16, u32, Value)> {
        let mut chunk = [0u8; 4096];
        loop {
            if self.buf.len() >= 4 {
                let length = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + length {
                    let frame: Vec<u8> = self.buf.drain(..4 + length).skip(4).collect();
                    let id = u64::from_be_bytes(frame[..8].try_into().unwrap());
                    let status = u16::from_be_bytes(frame[8..10].try_into().unwrap());
                    let retry_after = u32::from_be_bytes(frame[10..14].try_into().unwrap());
                    let body = if frame.len() > 14 {
                        serde_json::from_slice(&frame[14..]).unwrap()
                    } else {
                        Value::Null
                    };
                    return Some((id, status, retry_after, body));
                }
            }
            let n = within(BOUND, self.tcp.read(&mut chunk)).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One operation frame, as docs/protocol.md §3.15 lays it out.
fn frame(id: u64, op: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((8 + 1 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.push(op);
    out.extend_from_slice(body);
    out
}

/// A client opens its session once servers have answered three of its plain requests; these
/// two locks taken and released make four (the last may already go over the session).
async fn warm_up(dl: &leasehold::DistributedLock) {
    for _ in 0..2 {
        dl.lock("warm").await.unwrap().release().await.unwrap();
    }
}

const ABANDON: u8 = 0;
const ACQUIRE: u8 = 1;
const RENEW: u8 = 2;
const RELEASE: u8 = 3;
const CANCEL: u8 = 4;

fn acquire(name: &str, request_id: &str, wait_ms: u64) -> Value {
    json!({"name": name, "lease_ms": 10_000, "wait_ms": wait_ms, "request_id": request_id})
}

#[tokio::test]
async fn a_raw_session_speaks_the_documented_frames() {
    let server = TestServer::start().await;
    let mut session = RawSession::open(&server, "p").await.unwrap();
    let first = "00000000000000000000000000000001";
    session.send(1, ACQUIRE, &acquire("raw", first, 0)).await;
    let (id, status, _, granted) = session.answer().await.unwrap();
    assert_eq!((id, status), (1, 200), "{granted}");
    let lease_id = granted["lease_id"].as_str().unwrap().to_owned();
    assert!(granted["fencing_token"].as_u64().is_some(), "{granted}");

    // Taken: a second acquire that will not wait is refused as over HTTP.
    let second = "00000000000000000000000000000002";
    session.send(2, ACQUIRE, &acquire("raw", second, 0)).await;
    let (id, status, _, refused) = session.answer().await.unwrap();
    assert_eq!((id, status), (2, 409), "{refused}");
    assert_eq!(refused["error"], "timeout");

    // A waiting acquire, then abandoned: it leaves the line without an answer.
    let third = "00000000000000000000000000000003";
    session
        .send(3, ACQUIRE, &acquire("raw", third, 60_000))
        .await;
    eventually(BOUND, "the third acquire waits", || async {
        server.inspect("p", "raw").await.1 == 1
    })
    .await;
    session.send(3, ABANDON, &Value::Null).await;
    eventually(BOUND, "the abandoned acquire left the line", || async {
        server.inspect("p", "raw").await.1 == 0
    })
    .await;

    // Answers come back by id, in any order: a renewal and a cancel sent together.
    session
        .send(
            4,
            RENEW,
            &json!({"leases": [{"name": "raw", "lease_id": lease_id}]}),
        )
        .await;
    session
        .send(5, CANCEL, &json!({"name": "raw", "request_id": third}))
        .await;
    let mut answers = [
        session.answer().await.unwrap(),
        session.answer().await.unwrap(),
    ];
    answers.sort_by_key(|a| a.0);
    assert_eq!((answers[0].0, answers[0].1), (4, 200), "{}", answers[0].3);
    assert!(answers[0].3["results"][0]["lease_ms"].as_u64().is_some());
    assert_eq!((answers[1].0, answers[1].1), (5, 200), "{}", answers[1].3);

    // Bad input gets the plain endpoint's answer: an unknown op, invalid JSON, a bad name.
    session.send_raw(&frame(6, 99, b"{}")).await;
    session.send_raw(&frame(7, RELEASE, b"not json")).await;
    session
        .send(8, RELEASE, &json!({"name": "", "lease_id": lease_id}))
        .await;
    for expected in 6..=8 {
        let (id, status, _, body) = session.answer().await.unwrap();
        assert_eq!((id, status), (expected, 400), "{body}");
        assert_eq!(body["error"], "invalid_argument");
    }

    session
        .send(9, RELEASE, &json!({"name": "raw", "lease_id": lease_id}))
        .await;
    let (id, status, _, released) = session.answer().await.unwrap();
    assert_eq!((id, status), (9, 200), "{released}");
    assert_eq!(server.inspect("p", "raw").await, (None, 0));
    // Every operation frame but the unknown op ran as an operation (the abandon ends one).
    assert_eq!(server.metric(SESSION_OPS).await, 8.0);
}

#[tokio::test]
async fn a_session_is_refused_without_an_upgrade_or_a_key() {
    let (key, line) = new_key("p");
    let file = KeyFile::new("session-refused");
    file.write(&key_file(&[&line]));
    let path = file.path.clone();
    let server = TestServer::start_with(move |b| b.key_file(path)).await;
    let (status, head) = RawSession::open(&server, "wrong").await.err().unwrap();
    assert_eq!(status, 401, "{head}");
    // A plain GET, without the upgrade: 426, with what to send instead.
    let bearer = format!("Bearer {key}");
    let (status, body) = support::raw(
        server.addr,
        "GET",
        "/v1/session",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 426, "{body}");
    assert!(body.contains("leasehold-session/1"), "{body}");
    assert_eq!(server.metric(SESSIONS_OPEN).await, 0.0);
}

#[tokio::test]
async fn a_malformed_frame_closes_the_session_and_drops_its_waiters() {
    let server = TestServer::start().await;
    let holder = server.client("p").lock("m").await.unwrap();
    let mut session = RawSession::open(&server, "p").await.unwrap();
    session
        .send(
            1,
            ACQUIRE,
            &acquire("m", "00000000000000000000000000000009", 60_000),
        )
        .await;
    eventually(BOUND, "the raw acquire waits", || async {
        server.inspect("p", "m").await.1 == 1
    })
    .await;
    // A length too short to hold a frame's header: framing is lost, the session ends.
    session.send_raw(&[0, 0, 0, 2, 1, 2]).await;
    assert!(session.answer().await.is_none(), "the session was closed");
    eventually(BOUND, "its waiter left the line", || async {
        server.inspect("p", "m").await.1 == 0
    })
    .await;
    holder.release().await.unwrap();
}

#[tokio::test]
async fn the_sdk_carries_a_locks_operations_over_one_session_and_keeps_at_most_four() {
    let server = TestServer::start().await;
    for http1_only in [false, true] {
        let builder = leasehold::DistributedLock::builder("p").endpoint(server.url());
        let dl = if http1_only {
            builder.http1_only()
        } else {
            builder
        }
        .build()
        .unwrap();
        let before = server.metric(SESSION_OPS).await;
        warm_up(&dl).await;
        eventually(BOUND, "a session is open", || async {
            server.metric(SESSIONS_OPEN).await == 1.0
        })
        .await;
        for _ in 0..5 {
            let guard = dl.lock("warm").await.unwrap();
            assert!(guard.is_held());
            guard.release().await.unwrap();
        }
        let carried = server.metric(SESSION_OPS).await - before;
        assert!(
            carried >= 10.0,
            "5 acquires and 5 releases went over the session: {carried}"
        );
        // Still one session: one lock's operations share one.
        assert_eq!(server.metric(SESSIONS_OPEN).await, 1.0);
        // Many locks: their operations spread over more sessions, never more than four.
        let many = || async {
            for i in 0..24 {
                dl.lock(format!("s{i}"))
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            }
        };
        many().await;
        eventually(BOUND, "four sessions are open", || async {
            server.metric(SESSIONS_OPEN).await == 4.0
        })
        .await;
        many().await;
        assert_eq!(server.metric(SESSIONS_OPEN).await, 4.0);
        drop(dl);
        // Dropping the client closes its sessions.
        eventually(BOUND, "the sessions closed with their client", || async {
            server.metric(SESSIONS_OPEN).await == 0.0
        })
        .await;
    }
}

#[tokio::test]
async fn with_sessions_off_every_operation_is_a_plain_request() {
    let server = TestServer::start().await;
    let dl = leasehold::DistributedLock::builder("p")
        .endpoint(server.url())
        .session_stream(false)
        .build()
        .unwrap();
    for _ in 0..3 {
        dl.lock("plain").await.unwrap().release().await.unwrap();
    }
    assert_eq!(server.metric(SESSION_OPS).await, 0.0);
    assert_eq!(server.metric(SESSIONS_OPEN).await, 0.0);
    assert_eq!(
        server
            .metric(r#"leasehold_http_requests_total{route="acquire",status="200"}"#)
            .await,
        3.0
    );
}

#[tokio::test]
async fn an_idle_session_closes_and_the_next_operation_opens_another() {
    let idle = Duration::from_millis(300);
    let server = TestServer::start_with(|b| b.idle_timeout(idle)).await;
    let dl = server.client("p");
    warm_up(&dl).await;
    eventually(BOUND, "a session is open", || async {
        server.metric(SESSIONS_OPEN).await == 1.0
    })
    .await;
    // Nothing in flight for the idle time: the server closes it.
    eventually(BOUND + idle, "the idle session closed", || async {
        server.metric(SESSIONS_OPEN).await == 0.0
    })
    .await;
    // The client notices, and its next operations work (over a new session, once open).
    for _ in 0..3 {
        within(BOUND, dl.lock("a"))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    eventually(BOUND, "a new session is open", || async {
        server.metric(SESSIONS_OPEN).await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_key_removed_from_the_key_file_stops_working_on_an_open_session() {
    let (first, first_line) = new_key("p");
    let (_, second_line) = new_key("p");
    let file = KeyFile::new("session-revoked");
    file.write(&key_file(&[&first_line, &second_line]));
    let path = file.path.clone();
    // No reload by itself: the test reloads when it has rewritten the file.
    let server =
        TestServer::start_with(move |b| b.key_file(path).key_reload_interval(Duration::ZERO)).await;
    let dl = server.client(&first);
    warm_up(&dl).await;
    eventually(BOUND, "a session is open", || async {
        server.metric(SESSIONS_OPEN).await == 1.0
    })
    .await;
    dl.lock("a").await.unwrap().release().await.unwrap();
    file.write(&key_file(&[&second_line]));
    server.reload_keys().unwrap();
    let err = dl.lock("a").await.unwrap_err();
    assert!(
        matches!(err, leasehold::Error::Unauthorized { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_frame_that_never_completes_closes_the_session_after_the_body_timeout() {
    let timeout = Duration::from_millis(300);
    let server = TestServer::start_with(|b| b.header_read_timeout(timeout)).await;
    let mut session = RawSession::open(&server, "p").await.unwrap();
    // A well-formed start of a 100-byte frame, and then nothing more.
    session.send_raw(&[0, 0, 0, 100, 0, 0, 0]).await;
    let closed = within(BOUND + timeout, session.answer()).await;
    assert!(closed.is_none(), "the session was closed");
    eventually(BOUND, "the session is gone", || async {
        server.metric(SESSIONS_OPEN).await == 0.0
    })
    .await;
}
