//! The fault suite: mutual exclusion under crashes, pauses, partitions and restarts, with
//! real processes on loopback, checked offline against the server's audit trail.
//!
//! Every scenario records what the server granted (its event trail), what the clients saw,
//! and what a fencing-checked resource accepted, then runs the checks of
//! `support::history::check`. Negative controls show the checks can fail.
//!
//! `LEASEHOLD_SOAK=1` runs the long version (more restarts, more fault phases,
//! more seeds).

mod support;

use leasehold::DistributedLock;
use leasehold::server::store::StoreEvent;

use std::sync::atomic::Ordering;
use std::time::Duration;
use support::contend::{
    KINDS, Shared, Take, assert_kinds_overlapped, contend_as, names, take_turn,
};
use support::history::{self, ClientKind, Clients, Hold, Report, Resource};
use support::process::{self, ServerProcess, cli_run};
use support::proxy::{Faults, Proxy};
use support::{TestServer, client_for, eventually, within};
use tokio::sync::mpsc;
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(30);
/// How long a contending client waits for its lock before it tries again.
const PATIENCE: Duration = Duration::from_secs(3);

fn soak() -> bool {
    std::env::var_os("LEASEHOLD_SOAK").is_some()
}

/// An in-process server whose audit trail the test keeps.
async fn server_with_events() -> (TestServer, mpsc::UnboundedReceiver<StoreEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = TestServer::start_with(move |b| b.events(tx)).await;
    (server, rx)
}

fn drain(rx: &mut mpsc::UnboundedReceiver<StoreEvent>) -> Vec<StoreEvent> {
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    events
}

fn assert_clean(scenario: &str, report: &Report) {
    println!("{scenario}: {}", report.summary());
    assert!(
        report.violations.is_empty(),
        "{scenario}: {:#?}",
        report.violations
    );
    assert!(report.grants > 0, "{scenario}: nothing was granted");
}

/// After the faults heal, every lock can be acquired again within lease + grace + 2 s.
async fn assert_live(url: &str, key: &str, locks: &[(&str, Take)], lease: Duration) {
    let dl = client_for(url, key);
    let bound = lease + Duration::from_secs(3) + Duration::from_secs(2);
    for &(lock, take) in locks {
        let started = Instant::now();
        let lease = leasehold::DEFAULT_EXPIRES_IN;
        let guard = take_turn(&dl, lock, take, "probe", lease, bound, true).await;
        assert!(
            guard.is_ok(),
            "{lock} not acquirable within {bound:?} after the faults: {:?}",
            guard.err()
        );
        println!(
            "after healing, {lock} was acquired in {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_while_holding_frees_the_lock_within_its_lease() {
    let (server, mut events) = server_with_events().await;
    let resource = Resource::new(true);
    let addr = resource.serve().await;
    let mut holder = cli_run(
        &server.url(),
        "job",
        &["--expires-in", "1s", "--kill-after", "100ms"],
        &process::writer_loop(addr, "A"),
    );
    eventually(BOUND, "A writes", || async {
        resource.writes().iter().any(|w| w.client == "A")
    })
    .await;
    let mut next = cli_run(
        &server.url(),
        "job",
        &["--expires-in", "1s", "--timeout", "30s"],
        &process::write_once(addr, "B"),
    );
    eventually(BOUND, "B waits", || async {
        server.inspect("faults", "job").await.1 == 1
    })
    .await;

    let killed = Instant::now();
    holder.kill().await.unwrap();
    let status = within(BOUND, next.wait()).await.unwrap();
    let waited = killed.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        resource
            .writes()
            .iter()
            .any(|w| w.client == "B" && w.accepted)
    );
    // Freed by expiry within the 1 s lease (plus the server's timer and B's round trips).
    assert!(
        waited < Duration::from_millis(1800),
        "the next holder waited {waited:?}"
    );
    server.stop().await;
    let report = history::check(&[drain(&mut events)], &[], &resource.writes());
    assert_clean("client killed", &report);
}

/// A holder paused past its lease (SIGSTOP on `leasehold run`, whose command keeps
/// writing with the old token): someone else gets the lock, the old token is refused, and
/// the paused holder reports the loss when it resumes. Returns the offline report.
async fn paused_holder(checking: bool) -> (Report, Option<i32>) {
    paused(checking, "run").await
}

/// [`paused_holder`] with the holder started by `leasehold SUBCOMMAND` (`run` holds the
/// lock, `elect` leads the election of that name; the next holder takes the same lock).
async fn paused(checking: bool, subcommand: &str) -> (Report, Option<i32>) {
    let (server, mut events) = server_with_events().await;
    let resource = Resource::new(checking);
    let addr = resource.serve().await;
    let mut paused = process::cli_command(
        &server.url(),
        subcommand,
        "job",
        &["--expires-in", "1s", "--kill-after", "100ms"],
        &process::writer_loop(addr, "A"),
    );
    eventually(BOUND, "A writes", || async {
        resource.writes().iter().any(|w| w.client == "A")
    })
    .await;

    let clients = Clients::default();
    let next = {
        let dl = server.client("faults");
        let (clients, resource) = (clients.clone(), resource.clone());
        tokio::spawn(async move {
            let guard = dl
                .lock("job")
                .expires_in(Duration::from_secs(5))
                .await
                .unwrap();
            let token = guard.fencing_token();
            clients.record("B", "job", ClientKind::Acquired(token));
            for _ in 0..10 {
                clients.record("B", "job", ClientKind::Held(token));
                resource.write("job", "B", token);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            guard.release().await.unwrap();
        })
    };
    eventually(BOUND, "B waits", || async {
        server.inspect("faults", "job").await.1 == 1
    })
    .await;
    process::signal(paused.id().unwrap(), libc::SIGSTOP);
    // A's command writes on with A's old token after B has written: refused (or, without
    // the check, accepted: the stale write the checker must find).
    eventually(BOUND, "A writes after B", || async {
        let writes = resource.writes();
        let first_b = writes.iter().position(|w| w.client == "B");
        first_b.is_some_and(|b| writes[b..].iter().any(|w| w.client == "A"))
    })
    .await;
    process::signal(paused.id().unwrap(), libc::SIGCONT);
    let status = within(BOUND, paused.wait()).await.unwrap();
    within(BOUND, next).await.unwrap();
    server.stop().await;
    let report = history::check(&[drain(&mut events)], &clients.events(), &resource.writes());
    (report, status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_paused_past_its_lease_is_fenced_off_and_told() {
    let (report, code) = paused_holder(true).await;
    assert_clean("client paused", &report);
    assert!(
        report.writes_rejected > 0,
        "the paused holder's late writes were refused"
    );
    assert_eq!(code, Some(76), "the resumed holder reports the lost lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_fenced_off_and_told() {
    let (report, code) = paused(true, "elect").await;
    assert_clean("leader paused", &report);
    assert!(
        report.writes_rejected > 0,
        "the paused leader's late writes were refused"
    );
    assert_eq!(
        code,
        Some(76),
        "the resumed leader reports the lost leadership"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_token_checks_the_pause_produces_stale_writes() {
    let (report, _) = paused_holder(false).await;
    println!("control, no token check: {}", report.summary());
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.starts_with("stale write accepted")),
        "the checker must catch stale writes when the resource does not: {:#?}",
        report.violations
    );
}

/// The mutex's contenders: four clients, two on each of two locks.
const MUTEXES: [(&str, Take); 4] = [
    ("alpha", Take::Lock),
    ("beta", Take::Lock),
    ("alpha", Take::Lock),
    ("beta", Take::Lock),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_and_restarted_again_and_again_never_grants_twice() {
    let (report, _) = server_restarts("mutex", &MUTEXES).await;
    assert_clean("server killed repeatedly", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphores_readers_writers_and_leaders_survive_server_kills() {
    let (report, shared) = server_restarts("kinds", &KINDS).await;
    assert_clean("server killed repeatedly, every kind", &report);
    assert_kinds_overlapped("server killed repeatedly", &shared);
}

/// A server process killed (SIGKILL) and restarted on its state file again and again while
/// `clients` contend; the check of every run's audit trail and of the clients' claims.
async fn server_restarts(tag: &str, clients: &[(&'static str, Take)]) -> (Report, Shared) {
    let dir = std::env::temp_dir().join(format!("dl-faults-restarts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let port = support::dead_addr().await.port();
    let listen = format!("127.0.0.1:{port}");
    let start = |run: usize| {
        let log = dir.join(format!("events-{run}.jsonl"));
        let (listen, state) = (listen.clone(), state.clone());
        async move {
            ServerProcess::start(&[
                "--listen",
                &listen,
                "--state-file",
                state.to_str().unwrap(),
                "--event-log",
                log.to_str().unwrap(),
            ])
            .await
        }
    };
    let mut server = start(0).await;
    let url = server.url.clone();
    let lease = Duration::from_secs(1);
    let shared = Shared::new();
    let mut tasks = Vec::new();
    for (i, &(lock, take)) in clients.iter().enumerate() {
        let dl = client_for(&url, "faults");
        tasks.push(contend_as(
            dl,
            format!("c{i}"),
            lock.into(),
            take,
            lease,
            PATIENCE,
            &shared,
            i as u64,
        ));
    }
    let restarts = if soak() { 100 } else { 10 };
    let mut rng = fastrand::Rng::with_seed(7);
    for run in 1..=restarts {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..800))).await;
        server.kill().await;
        server = start(run).await;
    }
    // Let it work for a while after the last crash (past the hold-back), then stop.
    tokio::time::sleep(lease * 2).await;
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        within(BOUND, t).await.unwrap();
    }
    assert_live(&url, "faults", &names(clients), lease).await;
    server.terminate().await;
    let runs: Vec<Vec<StoreEvent>> = (0..=restarts)
        .map(|run| history::read_event_log(&dir.join(format!("events-{run}.jsonl"))))
        .collect();
    let report = history::check(&runs, &shared.clients.events(), &shared.resource.writes());
    println!("{restarts} SIGKILL restarts of the server");
    std::fs::remove_dir_all(&dir).unwrap();
    (report, shared)
}

/// `clients`, each behind its own fault proxy, through phases of delay, drops and a
/// blackhole for the first of them.
async fn network_faults(seed: u64, clients: &[(&'static str, Take)]) -> (Report, Shared) {
    let (server, mut events) = server_with_events().await;
    let lease = Duration::from_secs(1);
    let shared = Shared::new();
    let mut proxies = Vec::new();
    let mut tasks = Vec::new();
    for (i, &(lock, take)) in (0u64..).zip(clients) {
        let proxy = Proxy::start_seeded(server.addr, seed * 100 + i).await;
        let dl = client_for(&proxy.url(), "faults");
        tasks.push(contend_as(
            dl,
            format!("c{i}"),
            lock.into(),
            take,
            lease,
            PATIENCE,
            &shared,
            seed * 10 + i,
        ));
        proxies.push(proxy);
    }
    let phase = |faults: Faults| {
        for p in &proxies {
            p.set(faults);
        }
    };
    let rounds = if soak() { 10 } else { 1 };
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(500)).await;
        phase(Faults {
            delay: Duration::from_millis(75),
            jitter: Duration::from_millis(50),
            ..Faults::default()
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        phase(Faults {
            drop_rate: 0.5,
            drop_penalty: Duration::from_millis(250),
            ..Faults::default()
        });
        tokio::time::sleep(Duration::from_millis(1000)).await;
        phase(Faults::default());
        // Client 0 is cut off for twice its lease: it must learn of the loss in time, and
        // the others carry on.
        proxies[0].cut();
        tokio::time::sleep(lease * 2).await;
        proxies[0].heal();
        proxies[1].reset();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        within(BOUND, t).await.unwrap();
    }
    assert_live(&server.url(), "faults", &names(clients), lease).await;
    server.stop().await;
    let report = history::check(
        &[drain(&mut events)],
        &shared.clients.events(),
        &shared.resource.writes(),
    );
    (report, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_drops_and_a_blackhole_never_break_mutual_exclusion() {
    let seeds: Vec<u64> = if soak() { (1..=10).collect() } else { vec![1] };
    for seed in seeds {
        let (report, _) = network_faults(seed, &MUTEXES).await;
        assert_clean(&format!("network faults, seed {seed}"), &report);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_drops_and_a_blackhole_never_break_semaphores_readers_writers_or_leaders() {
    let seeds: Vec<u64> = if soak() { (1..=10).collect() } else { vec![2] };
    for seed in seeds {
        let scenario = format!("network faults, every kind, seed {seed}");
        let (report, shared) = network_faults(seed, &KINDS).await;
        assert_clean(&scenario, &report);
        assert_kinds_overlapped(&scenario, &shared);
    }
}

/// A plain-expiry lease through a proxy that delays each direction by 100 ms, observed by
/// a loop that records `is_held()` every 5 ms until `lost()`.
async fn held_claims_under_delay(count_from_answer: bool) -> Report {
    let (server, mut events) = server_with_events().await;
    let proxy = Proxy::start(server.addr).await;
    proxy.set(Faults {
        delay: Duration::from_millis(100),
        ..Faults::default()
    });
    let mut builder = DistributedLock::builder("faults")
        .endpoint(proxy.url())
        .safety_margin(Duration::ZERO);
    if count_from_answer {
        builder = builder.count_lease_from_answer_for_tests();
    }
    let dl = builder.build().unwrap();
    let clients = Clients::default();
    let guard = dl
        .lock("job")
        .expires_in(Duration::from_millis(500))
        .auto_renew(false)
        .await
        .unwrap();
    let token = guard.fencing_token();
    clients.record("A", "job", ClientKind::Acquired(token));
    while guard.is_held() {
        clients.record("A", "job", ClientKind::Held(token));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    clients.record("A", "job", ClientKind::Lost(token));
    // Make sure the server has expired it too (its expiry is in the trail).
    let next = server
        .client("faults")
        .lock("job")
        .timeout(BOUND)
        .await
        .unwrap();
    drop(next);
    server.stop().await;
    history::check(&[drain(&mut events)], &clients.events(), &[])
}

#[tokio::test]
async fn with_no_safety_margin_under_delay_the_loss_signal_still_comes_in_time() {
    // Leases are counted from when the request was sent, which is before the server starts
    // its clock: network delay alone never makes the signal late, even with no margin.
    let report = held_claims_under_delay(false).await;
    assert_clean("margin 0, counted from the send", &report);
    assert!(report.held_claims > 20);
}

#[tokio::test]
async fn negative_control_counting_from_the_answer_makes_the_loss_signal_late() {
    // The naive client counts from the answer, 100 ms after the server's clock started:
    // it believes it holds the lock for about 100 ms after the server expired it.
    let report = held_claims_under_delay(true).await;
    println!("control, counted from the answer: {}", report.summary());
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("outside its server lease")),
        "the checker must catch a late loss signal: {:#?}",
        report.violations
    );
}

/// Each offline check, shown able to fail on a history that breaks it.
#[test]
fn the_checker_catches_each_kind_of_violation() {
    use leasehold::server::store::EventKind;
    use support::history::{ClientEvent, Write, check};
    let event = |at_us, kind| StoreEvent {
        at_us,
        project: "0".into(),
        lock: "job".into(),
        kind,
    };
    let granted_as = |at, token, request: &str, deadline_us, shared, permits| {
        event(
            at,
            EventKind::Granted {
                token,
                request: request.into(),
                deadline_us,
                shared,
                permits,
            },
        )
    };
    let granted = |at, token, request: &str, deadline_us| {
        granted_as(at, token, request, deadline_us, false, None)
    };
    let count = |report: Report, what: &str| {
        report
            .violations
            .iter()
            .filter(|v| v.contains(what))
            .count()
    };

    // Two leases at once.
    let overlap = vec![granted(100, 1, "a", 1_000), granted(500, 2, "b", 2_000)];
    assert_eq!(
        count(check(&[overlap], &[], &[]), "before lease 1 ended"),
        1
    );
    // A lease from before a crash counts until its deadline.
    let before = vec![granted(100, 1, "a", 1_000)];
    let after = vec![granted(900, 2, "b", 2_000)];
    assert_eq!(
        count(
            check(&[before.clone(), after], &[], &[]),
            "before lease 1 ended"
        ),
        1
    );
    // Token regression, across a restart.
    let after = vec![granted(2_000, 1, "b", 3_000)];
    assert_eq!(count(check(&[before, after], &[], &[]), "granted after"), 1);
    // A grant to a waiter that had left.
    let gone = vec![
        event(
            100,
            EventKind::WaiterLeft {
                request: "w".into(),
                reason: "timeout".into(),
            },
        ),
        granted(200, 1, "w", 1_000),
    ];
    assert_eq!(count(check(&[gone], &[], &[]), "after it left"), 1);
    // Two clients believing they hold the same lock at once (no server trail needed).
    let claim = |client: &str, at_us, token| ClientEvent {
        at_us,
        client: client.into(),
        lock: "job".into(),
        kind: ClientKind::Held(token),
    };
    let both = [claim("a", 100, 1), claim("a", 300, 1), claim("b", 200, 2)];
    assert_eq!(count(check(&[], &both, &[]), "held at once"), 1);
    // A client believing it holds a lease the server has ended.
    let lease = vec![
        granted(100, 1, "a", 1_000),
        event(400, EventKind::Released { token: 1 }),
    ];
    let claim = ClientEvent {
        at_us: 500,
        client: "c".into(),
        lock: "job".into(),
        kind: ClientKind::Held(1),
    };
    assert_eq!(
        count(check(&[lease], &[claim], &[]), "outside its server lease"),
        1
    );
    // Readers share, and permits up to their count; one more permit, or a writer beside
    // a reader, is a violation.
    let readers = vec![
        granted_as(100, 1, "r1", 1_000, true, None),
        granted_as(200, 2, "r2", 1_000, true, None),
    ];
    assert_eq!(
        count(
            check(std::slice::from_ref(&readers), &[], &[]),
            "granted before"
        ),
        0
    );
    let mut writer_too = readers;
    writer_too.push(granted(300, 3, "w", 2_000));
    assert_eq!(count(check(&[writer_too], &[], &[]), "granted before"), 1);
    let permit = |at, token| granted_as(at, token, "p", 5_000, false, Some(2));
    let two = vec![permit(100, 1), permit(200, 2)];
    assert_eq!(
        count(
            check(std::slice::from_ref(&two), &[], &[]),
            "granted before"
        ),
        0
    );
    let mut three = two;
    three.push(permit(300, 3));
    assert_eq!(count(check(&[three], &[], &[]), "granted before"), 1);
    // The same, from clients' claims alone (etcd keeps no trail): two leaders at once, a
    // third holder of two permits.
    let claim_as = |client: &str, at_us, token, hold| ClientEvent {
        at_us,
        client: client.into(),
        lock: "job".into(),
        kind: ClientKind::HeldAs(token, hold),
    };
    let leader = |client: &str, at_us, token| ClientEvent {
        at_us,
        client: client.into(),
        lock: "job".into(),
        kind: ClientKind::Held(token),
    };
    let leaders = [
        leader("a", 100, 1),
        leader("a", 300, 1),
        leader("b", 200, 2),
    ];
    assert_eq!(count(check(&[], &leaders, &[]), "held at once"), 1);
    let permits = [
        claim_as("a", 100, 1, Hold::Permit(2)),
        claim_as("a", 400, 1, Hold::Permit(2)),
        claim_as("b", 200, 2, Hold::Permit(2)),
        claim_as("b", 400, 2, Hold::Permit(2)),
        claim_as("c", 300, 3, Hold::Permit(2)),
    ];
    assert_eq!(count(check(&[], &permits, &[]), "held at once"), 1);
    assert_eq!(count(check(&[], &permits[..4], &[]), "held at once"), 0);
    let mixed = [
        claim_as("a", 100, 1, Hold::Shared),
        claim_as("a", 400, 1, Hold::Shared),
        leader("w", 300, 2),
    ];
    assert_eq!(count(check(&[], &mixed, &[]), "held at once"), 1);
    // A stale write accepted.
    let write = |token| Write {
        at_us: 0,
        lock: "job".into(),
        client: "c".into(),
        token,
        accepted: true,
    };
    assert_eq!(
        count(check(&[], &[], &[write(2), write(1)]), "stale write"),
        1
    );
}
