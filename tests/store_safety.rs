//! The memory store's safety around its state file and late requests: no grant without a
//! durable token reservation, no orphan from a late attempt of an ended acquire, a crash
//! holding back only the locks whose leases may still run, and a bounded number of state-file
//! writes whatever the requests.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::process::{CLI_BIN, ServerProcess};
use support::{TestServer, client_for, eventually, raw, within};
use tokio::time::Instant;

/// Generous bound on anything that should happen promptly (start-up, a few requests).
const BOUND: Duration = Duration::from_secs(20);

fn temp_state_file(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("leasehold-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.json")
}

fn id(n: u128) -> String {
    format!("{n:032x}")
}

/// A raw acquire as project `p`; `wait_ms: None` waits without limit, polls of 100 ms.
async fn acquire(
    addr: std::net::SocketAddr,
    name: &str,
    request_id: &str,
    lease_ms: u64,
    wait_ms: Option<u64>,
) -> (u16, String) {
    let wait = wait_ms.map_or(String::new(), |w| format!(r#","wait_ms":{w}"#));
    let body = format!(
        r#"{{"name":"{name}","lease_ms":{lease_ms},"poll_ms":100,"request_id":"{request_id}"{wait}}}"#
    );
    raw(
        addr,
        "POST",
        "/v1/acquire",
        &[("authorization", "Bearer p")],
        &body,
    )
    .await
}

async fn post(addr: std::net::SocketAddr, path: &str, body: String) -> (u16, String) {
    raw(addr, "POST", path, &[("authorization", "Bearer p")], &body).await
}

/// Inspection of lock `long` of project `p`, if it answers `200`.
async fn inspect_long(addr: std::net::SocketAddr) -> Option<serde_json::Value> {
    let auth = [("authorization", "Bearer p")];
    let (status, body) = raw(addr, "GET", "/v1/locks/long", &auth, "").await;
    (status == 200).then(|| json(&body))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Item A: while the token reservation cannot be written, nothing is granted (`503`), and
/// grants resume once it can.
#[tokio::test]
async fn no_grant_while_the_token_reservation_cannot_be_written() {
    let state = temp_state_file("reserve");
    // Reservations of 200 ms of tokens run out 200 ms after the last one was written.
    let server = TestServer::start_with(|b| {
        b.state_file(&state)
            .fencing_token_reserve(Duration::from_millis(200))
    })
    .await;
    let (status, body) = acquire(server.addr, "before", &id(1), 1000, Some(0)).await;
    assert_eq!(status, 200, "{body}");

    // The state file is written to `state.tmp` and renamed: a directory there makes the
    // write fail for everyone. (Tests run as root, which permission bits do not stop.)
    let tmp = state.with_extension("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut n = 100;
    eventually(BOUND, "acquires refused with 503", || {
        n += 1;
        async move {
            let (status, body) =
                acquire(server.addr, &format!("l{n}"), &id(n), 1000, Some(0)).await;
            assert!(status == 200 || status == 503, "{status} {body}");
            status == 503 && json(&body)["error"] == "unavailable"
        }
    })
    .await;
    let grants = server.metric("leasehold_grants_total").await;
    for i in 0..3 {
        let (status, body) = acquire(server.addr, "during", &id(200 + i), 1000, None).await;
        assert_eq!(status, 503, "{body}");
    }
    assert_eq!(server.metric("leasehold_grants_total").await, grants);
    assert_eq!(server.metric("leasehold_waiters").await, 0.0);

    std::fs::remove_dir(&tmp).unwrap();
    eventually(BOUND, "grants resume", || async {
        acquire(server.addr, "after", &id(300), 1000, Some(0))
            .await
            .0
            == 200
    })
    .await;
    server.stop().await;
}

/// Item B: a late attempt of an acquire whose client gave up creates neither a place in line
/// nor a grant.
#[tokio::test]
async fn a_late_attempt_of_an_ended_acquire_creates_nothing() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let (status, _) = acquire(addr, "busy", &id(1), 60_000, Some(0)).await;
    assert_eq!(status, 200);
    let ended = |body: &str| json(body)["error"] == "timeout";

    // The client cancelled before its acquire arrived (the cancel overtook it).
    let cancel = |name: &str, n: u128| format!(r#"{{"name":"{name}","request_id":"{}"}}"#, id(n));
    let (status, body) = post(addr, "/v1/cancel", cancel("busy", 2)).await;
    assert_eq!(
        (status, json(&body)["cancelled"].as_bool()),
        (200, Some(false))
    );
    let (status, body) = acquire(addr, "busy", &id(2), 60_000, None).await;
    assert!(status == 409 && ended(&body), "{status} {body}");
    assert_eq!(server.inspect("p", "busy").await.1, 0, "nobody waits");

    // The same on a free lock: no grant.
    let (status, _) = post(addr, "/v1/cancel", cancel("free", 3)).await;
    assert_eq!(status, 200);
    let (status, body) = acquire(addr, "free", &id(3), 60_000, None).await;
    assert!(status == 409 && ended(&body), "{status} {body}");
    assert_eq!(server.inspect("p", "free").await, (None, 0));

    // Cancelled while waiting: its re-poll does not queue it again.
    let (status, _) = acquire(addr, "busy", &id(4), 60_000, None).await;
    assert_eq!(status, 202);
    let (status, body) = post(addr, "/v1/cancel", cancel("busy", 4)).await;
    assert_eq!(
        (status, json(&body)["cancelled"].as_bool()),
        (200, Some(true))
    );
    let (status, _) = acquire(addr, "busy", &id(4), 60_000, None).await;
    assert_eq!(status, 409);

    // Its wait ran out: a retry of it does not queue it again.
    let (status, _) = acquire(addr, "busy", &id(5), 60_000, Some(50)).await;
    assert_eq!(status, 409);
    let (status, _) = acquire(addr, "busy", &id(5), 60_000, None).await;
    assert_eq!(status, 409);

    // Granted and released: a late duplicate is not granted again.
    let (status, body) = acquire(addr, "again", &id(6), 60_000, Some(0)).await;
    assert_eq!(status, 200);
    let lease_id = json(&body)["lease_id"].clone();
    let release = format!(r#"{{"name":"again","lease_id":{lease_id}}}"#);
    assert_eq!(post(addr, "/v1/release", release).await.0, 200);
    let (status, body) = acquire(addr, "again", &id(6), 60_000, Some(0)).await;
    assert!(status == 409 && ended(&body), "{status} {body}");

    assert_eq!(server.metric("leasehold_waiters").await, 0.0);
    assert_eq!(
        server.metric("leasehold_held_locks").await,
        1.0,
        "only `busy`"
    );
    // A request id is scoped to its lock: the tombstone of id 6 on `again` is not on `other`.
    let (status, _) = acquire(addr, "other", &id(6), 60_000, Some(0)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// `leasehold-server` with a state file and a crash hold-back bound of 1 s.
async fn server_with_bound(state: &std::path::Path) -> ServerProcess {
    let state = state.display().to_string();
    ServerProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--state-file",
        &state,
        "--crash-hold-back",
        "1s",
        "--max-lease",
        "1h",
    ])
    .await
}

/// Item C: after a crash, a lease longer than the bound (1 h here) holds back only its own
/// lock; every other lock waits the bounded global hold-back (which covers the short lease
/// granted before the crash) and no longer.
#[tokio::test]
async fn after_a_crash_a_long_lease_holds_back_only_its_own_lock() {
    let state = temp_state_file("long-lease");
    let server = server_with_bound(&state).await;
    let dl = client_for(&server.url, "p");
    let long = dl
        .lock("long")
        .expires_in(Duration::from_secs(3600))
        .await
        .unwrap();
    let short_lease = Duration::from_millis(600);
    let _short = dl.lock("short").expires_in(short_lease).await.unwrap();
    server.kill().await;

    // Taken before the restart: the hold-back runs from the new server's start.
    let restarting = Instant::now();
    let server = server_with_bound(&state).await;
    let dl = client_for(&server.url, "p");
    // Before the fix the hold-back was the 1 h lease for every lock.
    let other = within(BOUND, dl.lock("never-used")).await.unwrap();
    assert!(
        restarting.elapsed() >= short_lease,
        "granted {:?} after the restart began, within the short lease",
        restarting.elapsed()
    );
    assert!(other.fencing_token() > long.fencing_token());
    let (status, _) = acquire(
        server.url.trim_start_matches("http://").parse().unwrap(),
        "long",
        &id(1),
        1000,
        Some(0),
    )
    .await;
    assert_eq!(status, 409, "the 1 h lease may still run");
    drop(other);
    server.terminate().await;
}

/// Item C, safety: the long-lease lock itself is not granted before its lease (40 s) could
/// have ended, while other locks are; inspection and the CLI say until when.
#[tokio::test]
async fn after_a_crash_the_long_lease_lock_waits_for_its_own_lease() {
    let state = temp_state_file("long-lock");
    let server = server_with_bound(&state).await;
    let lease = Duration::from_secs(40);
    let dl = client_for(&server.url, "p");
    let _long = dl.lock("long").expires_in(lease).await.unwrap();
    server.kill().await;

    let restarting = SystemTime::now();
    let restarted = Instant::now();
    let server = server_with_bound(&state).await;
    let addr: std::net::SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let dl = client_for(&server.url, "p");
    let _other = within(BOUND, dl.lock("other")).await.unwrap();
    // Inspection says so before anyone waits too.
    let before_anyone = inspect_long(addr)
        .await
        .expect("a held-back lock answers 200");
    assert!(
        before_anyone["held_back_until_ms"].is_u64(),
        "{before_anyone}"
    );

    // A waiter (the CLI, its stderr a pipe) and inspection see the hold-back's end.
    let cli = tokio::process::Command::new(CLI_BIN)
        .args(["--url", &server.url, "--api-key", "p", "run", "long"])
        .args(["--timeout", "3s", "--", "true"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen = std::cell::Cell::new(None);
    let until = &seen;
    eventually(BOUND, "the CLI waits in line", || async move {
        let info = inspect_long(addr).await.unwrap_or_default();
        until.set(info["held_back_until_ms"].as_u64());
        info["waiters"] == 1 && until.get().is_some()
    })
    .await;
    let until = seen.get().unwrap();
    let earliest = unix_ms(restarting + lease);
    assert!(
        until >= earliest && until <= earliest + BOUND.as_millis() as u64,
        "held back until {until}, the lease could end at {earliest}"
    );

    // Refused for as long as this test looks: a few seconds, far within the 40 s lease.
    let mut n = 10;
    while restarted.elapsed() < Duration::from_secs(3) {
        n += 1;
        let (status, body) = acquire(addr, "long", &id(n), 1000, Some(0)).await;
        assert_eq!(status, 409, "{body}");
    }
    let out = within(BOUND, cli.wait_with_output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "timed out: {stderr}");
    let waiting: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("waiting for \"long\""))
        .collect();
    assert_eq!(waiting.len(), 1, "one line while waiting: {stderr}");
    assert!(
        waiting[0].contains("held back after a server restart until"),
        "{stderr}"
    );
    server.terminate().await;
}

/// Item D: acquires with ever longer leases, one after the other (1000, 1001, 1002 ms, ...:
/// once one write each), then at once and past the crash hold-back bound (so each long one
/// needs its lock recorded durably before it is answered), cost about one write of the state
/// file per second, not one per request.
#[tokio::test]
async fn ever_longer_leases_cost_a_bounded_number_of_state_file_writes() {
    let state = temp_state_file("writes");
    let server = TestServer::start_with(|b| b.state_file(&state)).await;
    let writes = "leasehold_state_file_writes_total";
    let before = server.metric(writes).await;
    assert!(before >= 1.0, "the start writes the file");
    let started = Instant::now();
    for i in 0..300u64 {
        let (status, body) = acquire(
            server.addr,
            &format!("seq-{i}"),
            &id(u128::from(i) + 1000),
            1000 + i,
            Some(0),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let elapsed = started.elapsed();
    let written = server.metric(writes).await - before;
    println!(
        "300 acquires, one after the other, leases 1000 to 1299 ms, in {elapsed:?}: {written} state-file writes"
    );
    // At most one write per second, and one at once after a quiet second.
    assert!(
        written <= 2.0 + elapsed.as_secs_f64(),
        "{written} writes in {elapsed:?}"
    );

    let before = server.metric(writes).await;
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    const N: u64 = 300;
    // Each raw acquire is a connection of its own; a server takes at most 256 at once from
    // one address, and on a busy machine all 300 can be open together. 64 at a time is
    // still a burst for the state file, without testing the connection cap.
    let open = Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..N {
        let addr = server.addr;
        // 1000 ms to 41,963 ms: a new longest lease each, the last quarter over the 30 s bound.
        let lease_ms = 1000 + i * 137;
        let open = open.clone();
        burst.spawn(async move {
            let _connection = open.acquire_owned().await.expect("never closed");
            acquire(
                addr,
                &format!("burst-{i}"),
                &id(u128::from(i) + 1),
                lease_ms,
                Some(0),
            )
            .await
        });
    }
    while let Some(done) = burst.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let elapsed = started.elapsed();
    let written = server.metric(writes).await - before;
    println!("{N} acquires with growing leases in {elapsed:?}: {written} state-file writes");
    // At most one write per second, and one at once after a quiet second.
    assert!(
        written <= 2.0 + elapsed.as_secs_f64(),
        "{written} writes in {elapsed:?}"
    );
    server.stop().await;
}
