//! The server as a whole: restarts, connections, health, the binary.

mod support;

use std::time::Duration;
use support::{TestServer, eventually, raw, within};

const BOUND: Duration = Duration::from_secs(20);

fn temp_state_file(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("leasehold-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.json")
}

#[tokio::test]
async fn fencing_tokens_keep_increasing_across_restarts() {
    let state = temp_state_file("tokens");
    let mut last = 0;
    for _ in 0..3 {
        let server = TestServer::start_with(|b| b.state_file(&state)).await;
        let dl = server.client("p");
        for _ in 0..3 {
            let guard = dl
                .lock("fenced")
                .timeout(Duration::from_secs(5))
                .await
                .unwrap();
            assert!(
                guard.fencing_token() > last,
                "{} after {last}",
                guard.fencing_token()
            );
            last = guard.fencing_token();
            guard.release().await.unwrap();
        }
        server.stop().await;
    }
    assert!(last < 1 << 53, "tokens stay exact in JSON readers");
}

#[tokio::test]
async fn without_a_state_file_tokens_still_follow_the_clock_upwards() {
    let mut last = 0;
    for _ in 0..3 {
        let server = TestServer::start().await;
        let guard = server.client("p").lock("fenced").await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
        server.stop().await;
    }
}

#[tokio::test]
async fn after_a_crash_grants_wait_for_leases_that_may_still_be_held() {
    let state = temp_state_file("crash");
    let server = TestServer::start_with(|b| b.state_file(&state)).await;
    let addr = server.addr;
    let guard = server
        .client("p")
        .lock("held")
        .expires_in(Duration::from_millis(800))
        .await
        .unwrap();
    // A crash: the server goes away without its clean shutdown record.
    drop(server);
    // Taken before the restart: the hold-back runs from the new server's start, which comes
    // after this (measured after it, the wait could fall short by the start-up time).
    let started = tokio::time::Instant::now();
    let restarted = TestServer::restart_on(addr, |b| b.state_file(&state)).await;
    let next = within(BOUND, restarted.client("p").lock("held"))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "granted after {:?}",
        started.elapsed()
    );
    assert!(next.fencing_token() > guard.fencing_token());
    // The old holder learned of its loss (its renewals were refused) before the new grant.
    assert!(!guard.is_held());
}

#[tokio::test]
async fn a_thousand_waiting_acquires_share_a_handful_of_connections() {
    let server = TestServer::start().await;
    let dl = server.client("p");
    let holder = dl.lock("crowded").await.unwrap();
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let dl = dl.clone();
        waiters.spawn(async move { dl.lock("crowded").timeout(Duration::from_secs(60)).await });
    }
    eventually(BOUND, "1000 waiters queued", || async {
        server.inspect("p", "crowded").await.1 == 1000
    })
    .await;
    let connections = server.metric("leasehold_connections_total").await;
    // Each `inspect` and `metric` call of the harness opens one connection of its own.
    let open = server.metric("leasehold_connections_open").await - 1.0;
    println!("1000 waiting acquires from one client: {open} open client connections");
    assert!(open <= 2.0, "{open} connections for one client");
    assert!(connections >= 1.0);
    drop(holder);
    // Every waiter gets its turn.
    within(Duration::from_secs(60), async {
        while let Some(done) = waiters.join_next().await {
            drop(done.unwrap().unwrap());
        }
    })
    .await;
}

#[tokio::test]
async fn health_and_metrics_need_no_key() {
    let server = TestServer::start().await;
    let (status, body) = raw(server.addr, "GET", "/healthz", &[], "").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = raw(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("leasehold_held_locks"));
    let (status, _) = raw(server.addr, "GET", "/nowhere", &[], "").await;
    assert_eq!(status, 404);
    let (status, _) = raw(server.addr, "GET", "/v1/acquire", &[], "").await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn shutdown_answers_waiting_acquires_at_once() {
    let server = TestServer::start().await;
    let _holder = server.client("p").lock("s").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let addr = server.addr;
    tokio::spawn(async move {
        let body =
            r#"{"name":"s","lease_ms":1000,"request_id":"0123456789abcdef0123456789abcdef"}"#;
        let _ = tx.send(
            raw(
                addr,
                "POST",
                "/v1/acquire",
                &[("authorization", "Bearer p")],
                body,
            )
            .await,
        );
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "s").await.1 == 1
    })
    .await;
    let stopping = tokio::time::Instant::now();
    server.stop().await;
    let (status, _) = within(BOUND, rx).await.unwrap();
    assert_eq!(status, 503);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn the_binary_serves_in_open_development_mode_and_stops_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold-server"))
        .args(["--listen", "127.0.0.1:0", "--no-state-file"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("server binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = within(BOUND, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("server printed its address");
            seen.push(line.clone());
            if let Some((_, url)) = line.split_once("listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await;
    assert!(
        seen.iter().any(|l| l.contains("OPEN DEVELOPMENT MODE")),
        "{seen:?}"
    );
    let dl = support::client_for(&url, "any-key");
    let v = dl.with_lock("bin", || async { 10 }).await.unwrap();
    assert_eq!(v, 10);
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = within(BOUND, child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn clients_spread_over_their_endpoints_or_prefer_the_first() {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    for _ in 0..20 {
        let dl = leasehold::DistributedLock::builder("p")
            .endpoints([a.url(), b.url()])
            .build()
            .unwrap();
        // Released before the next client tries once: a dropped guard releases in the
        // background, which could still be on its way.
        dl.lock("x")
            .timeout(Duration::ZERO)
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    // Each of 20 clients picks its first endpoint at random: both are used (all on one
    // would happen once in half a million runs).
    let (on_a, on_b) = (
        a.metric("leasehold_acquires_total").await,
        b.metric("leasehold_acquires_total").await,
    );
    assert!(on_a > 0.0 && on_b > 0.0, "{on_a} / {on_b}");
    for _ in 0..10 {
        let dl = leasehold::DistributedLock::builder("p")
            .endpoints([a.url(), b.url()])
            .prefer_first_endpoint()
            .build()
            .unwrap();
        // Released before the next client tries once: a dropped guard releases in the
        // background, which could still be on its way.
        dl.lock("x")
            .timeout(Duration::ZERO)
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    assert_eq!(b.metric("leasehold_acquires_total").await, on_b);
    assert_eq!(a.metric("leasehold_acquires_total").await, on_a + 10.0);
}

/// Without `--state-file` the memory server keeps its state in the state directory
/// (systemd's, else XDG's), never in the directory it was started from; with none known it
/// refuses to start and says what to pass.
#[tokio::test]
async fn the_state_file_defaults_to_the_state_directory_never_the_current_one() {
    use support::process::{SERVER_BIN, own_state_directory};
    let cwd = own_state_directory();
    let state = own_state_directory();
    let mut server = tokio::process::Command::new(SERVER_BIN)
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(&cwd)
        .env_remove("XDG_STATE_HOME")
        .env("STATE_DIRECTORY", &state)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let path = state.join("leasehold.state");
    support::eventually(Duration::from_secs(20), "the state file is written", || {
        let exists = path.exists();
        async move { exists }
    })
    .await;
    server.kill().await.unwrap();
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "wrote into the current directory"
    );

    let output = tokio::process::Command::new(SERVER_BIN)
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(&cwd)
        .env_remove("STATE_DIRECTORY")
        .env_remove("XDG_STATE_HOME")
        .env_remove("HOME")
        .output();
    let output = support::within(Duration::from_secs(20), output)
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "started without a state directory: {printed}"
    );
    assert!(printed.contains("--state-file"), "{printed}");
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0);
}

/// Each binary's help describes that binary, not the crate.
#[test]
fn each_binary_describes_itself_in_its_help() {
    use support::process::{CLI_BIN, SERVER_BIN};
    let help = |bin: &str| {
        let output = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let server = help(SERVER_BIN);
    assert!(server.starts_with("The leasehold lock server"), "{server}");
    let cli = help(CLI_BIN);
    assert!(
        cli.starts_with("Take a distributed lock from the shell"),
        "{cli}"
    );
    for text in [&server, &cli] {
        assert!(
            !text.contains("async Rust SDK"),
            "the crate's description: {text}"
        );
    }
}
