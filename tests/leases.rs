//! Leases: renewal (batched), loss, release, plain expiry. Most tests run against both
//! stores (`name::memory`, `name::etcd`), with leases the store can grant.

mod support;

use leasehold::DistributedLock;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;
use support::process::ServerProcess;
use support::proxy::{Faults, Proxy};
use support::{Backend, TestServer, client_for, eventually, within};
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(10);

on_both_backends!(multi_thread: one_client_renews_many_guards_in_batches);
on_both_backends!(
    a_renewed_short_lease_is_never_given_to_anyone_else,
    loss_is_signalled_before_the_server_could_expire_the_lease,
    loss_when_the_server_goes_away,
    with_lock_drops_the_closure_when_the_lease_is_lost,
    dropping_the_guard_hands_the_lock_over_promptly,
    releasing_a_lost_guard_still_frees_the_lock,
    a_release_whose_answer_was_lost_still_succeeds,
    a_release_dropped_midway_still_frees_the_lock,
    plain_expiry_frees_the_lock_after_expires_in,
);

async fn a_renewed_short_lease_is_never_given_to_anyone_else(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(300));
    let guard = server
        .client("p")
        .lock("renewed")
        .expires_in(lease)
        .await
        .unwrap();
    // A waiter for several lease lengths (ten on memory, four on etcd's 2 s minimum): it
    // would get the lock at the first lapse.
    let lengths = if backend == Backend::Memory { 10 } else { 4 };
    let err = server
        .client("p")
        .lock("renewed")
        .timeout(lease * lengths)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(guard.is_held());
    assert_eq!(
        server.inspect("p", "renewed").await.0,
        Some(guard.fencing_token())
    );
    // At least one renewal per lease length (about three are sent).
    assert!(server.metric("leasehold_renewals_total").await >= f64::from(lengths - 1));
    assert_eq!(server.metric("leasehold_expirations_total").await, 0.0);
}

/// 10,000 guards on memory; 1,000 on etcd (each renewal there is an etcd keep-alive plus
/// two reads, on the same two cores as everything else).
async fn one_client_renews_many_guards_in_batches(backend: Backend) {
    let _alone = support::heavy().await;
    let server = TestServer::start_on(backend).await;
    let dl = server.client("p");
    let guards_wanted: usize = if backend == Backend::Memory {
        10_000
    } else {
        1_000
    };
    // The lease must outlast what the server needs to serve the burst: renewals of the
    // first guards wait behind the last acquires (on etcd, behind their transactions), and
    // no renewal scheme keeps a lease shorter than that. Calibrated on a tenth of the burst
    // first, with room for the whole burst three times over; 3 s where the machine is fast.
    let started = Instant::now();
    drop(
        acquire_all(
            &dl,
            "calibration",
            guards_wanted / 10,
            Duration::from_secs(60),
        )
        .await,
    );
    let lease = (started.elapsed() * 30).max(Duration::from_secs(3));
    let guards = acquire_all(&dl, "lock", guards_wanted, lease).await;
    let n = guards_wanted as f64;
    let renews_before = server
        .metric(r#"leasehold_http_requests_total{route="renew",status="200"}"#)
        .await;
    let held_from = Instant::now();
    // Two lease lengths: every guard must be renewed throughout (six renewal periods of 1 s).
    tokio::time::sleep(2 * lease).await;
    assert!(
        guards.iter().all(|g| g.is_held()),
        "{} of {guards_wanted} guards lost within two leases",
        guards.iter().filter(|g| !g.is_held()).count()
    );
    let renews = server
        .metric(r#"leasehold_http_requests_total{route="renew",status="200"}"#)
        .await
        - renews_before;
    let periods = held_from.elapsed().as_secs_f64() / (lease / 3).as_secs_f64();
    println!("{n} guards of {lease:?}: {renews} renew requests over {periods:.1} renewal periods");
    // Unbatched would be one request per guard and period. Batches carry up to 1,000 leases
    // each, so n / 1,000 requests per period is the floor; allow for leases acquired at
    // different moments.
    let per_period = 4.0 * (n / 1000.0).ceil();
    assert!(
        renews <= per_period * (periods + 1.0),
        "{renews} renew requests in {periods:.1} periods"
    );
    // The etcd store counts held locks in the background (every few seconds); a lease's
    // length bounds how stale a count may be.
    eventually(lease * 2, "every guard counted as held", || async {
        server.metric("leasehold_held_locks").await == n
    })
    .await;
}

/// Takes `n` distinct locks at once from one client. Every guard must be held at the moment
/// it is handed over, however long its request waited inside the busy client.
async fn acquire_all(
    dl: &DistributedLock,
    prefix: &str,
    n: usize,
    lease: Duration,
) -> Vec<leasehold::LockGuard> {
    let mut acquires = tokio::task::JoinSet::new();
    for i in 0..n {
        let dl = dl.clone();
        let name = format!("{prefix}-{i}");
        acquires.spawn(async move {
            let guard = dl.lock(name).expires_in(lease).await.unwrap();
            // Checked in the same poll that got the guard: nothing else ran in between.
            let held = guard.is_held();
            (guard, held)
        });
    }
    let mut guards = Vec::with_capacity(n);
    let mut born_lost = 0;
    while let Some(joined) = acquires.join_next().await {
        let (guard, held) = joined.unwrap();
        born_lost += usize::from(!held);
        guards.push(guard);
    }
    assert_eq!(
        born_lost, 0,
        "{born_lost} of {n} guards were handed over already lost"
    );
    guards
}

/// A busy client used to get guards that were already lost: the lease was counted from
/// when a request was handed to the client's HTTP layer, and under load it then waited
/// there, behind thousands of others, for longer than the lease. Here the client's only
/// thread is kept busy half of the time, so that this happens on a fast machine too; the
/// server runs in a process of its own.
#[test]
fn a_busy_client_is_never_handed_a_lost_guard() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _alone = support::heavy().await;
        let server = ServerProcess::start(&["--listen", "127.0.0.1:0", "--no-state-file"]).await;
        let dl = client_for(&server.url, "p");
        // The load, not a wait: the runtime's one thread is blocked for 2 ms of every 4,
        // as in a process busy with other work.
        let busy = tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(2));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let lease = Duration::from_secs(3);
        let guards = acquire_all(&dl, "lock", 10_000, lease).await;
        // Held two lease lengths later: the confirmed guards are renewed like any other.
        tokio::time::sleep(2 * lease).await;
        let lost = guards.iter().filter(|g| !g.is_held()).count();
        busy.abort();
        assert_eq!(lost, 0, "{lost} of 10000 guards lost within two leases");
    });
}

async fn loss_is_signalled_before_the_server_could_expire_the_lease(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let proxy = Proxy::start(server.addr).await;
    let lease = server.lease(Duration::from_millis(600));
    let guard = client_for(&proxy.url(), "p")
        .lock("lossy")
        .expires_in(lease)
        .await
        .unwrap();
    assert!(guard.is_held());
    proxy.cut();
    // No renewal reaches the server from now on. Read the server's own deadline, counted
    // conservatively from when the question was sent.
    let asked = Instant::now();
    let path = "/v1/locks/lossy";
    let (_, body) = support::raw(
        server.addr,
        "GET",
        path,
        &[("authorization", "Bearer p")],
        "",
    )
    .await;
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let server_deadline = asked
        + Duration::from_millis(info["holder"]["expires_in_ms"].as_u64().unwrap())
        + backend.expiry_slack();

    within(BOUND, guard.lost()).await;
    let lost_at = Instant::now();
    assert!(!guard.is_held());
    assert!(
        lost_at < server_deadline,
        "lost() fired {:?} after the server-side expiry",
        lost_at - server_deadline
    );
    // And the lock does go to someone else afterwards.
    let next = within(BOUND, server.client("p").lock("lossy"))
        .await
        .unwrap();
    assert!(next.fencing_token() > guard.fencing_token());
}

async fn loss_when_the_server_goes_away(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(500));
    let guard = server
        .client("p")
        .lock("gone")
        .expires_in(lease)
        .await
        .unwrap();
    let stopped = Instant::now();
    server.stop().await;
    within(BOUND, guard.lost()).await;
    assert!(!guard.is_held());
    assert!(
        stopped.elapsed() < lease,
        "lost {:?} after the server stopped",
        stopped.elapsed()
    );
    // Releasing a lost lease reports it.
    assert!(guard.release().await.unwrap_err().is_lock_lost());
}

#[tokio::test]
async fn revoked_leases_are_lost_at_the_next_renewal() {
    // A restart without a state file forgets every lease: renewals answer "gone".
    let first = TestServer::start().await;
    let addr = first.addr;
    let guard = first
        .client("p")
        .lock("revoked")
        .expires_in(Duration::from_secs(3))
        .await
        .unwrap();
    first.stop().await;
    let second = TestServer::restart_on(addr, |b| b).await;
    let lost_within = Instant::now();
    within(BOUND, guard.lost()).await;
    assert!(lost_within.elapsed() < Duration::from_millis(2700));
    drop(second);
}

async fn with_lock_drops_the_closure_when_the_lease_is_lost(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(400));
    let proxy = Proxy::start(server.addr).await;
    let dl = client_for(&proxy.url(), "p");
    let dropped = Arc::new(AtomicBool::new(false));
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let flag = SetOnDrop(dropped.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let run = tokio::spawn(async move {
        dl.lock("closure")
            .expires_in(lease)
            .with_lock(|| async move {
                let _flag = flag;
                let _ = started_tx.send(());
                std::future::pending::<()>().await
            })
            .await
    });
    within(BOUND, started_rx).await.unwrap();
    proxy.cut();
    let result = within(BOUND, run).await.unwrap();
    assert!(result.unwrap_err().is_lock_lost());
    assert!(
        dropped.load(Ordering::SeqCst),
        "the closure's future was dropped"
    );
}

async fn dropping_the_guard_hands_the_lock_over_promptly(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = Duration::from_secs(60);
    let guard = server
        .client("p")
        .lock("drop")
        .expires_in(lease)
        .await
        .unwrap();
    let dl = server.client("p");
    let waiter = tokio::spawn(async move { dl.lock("drop").await.map(|g| (g, Instant::now())) });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "drop").await.1 == 1
    })
    .await;
    let dropped = Instant::now();
    drop(guard);
    let (next, granted) = within(lease, waiter).await.unwrap().unwrap();
    // Handed over by the release, not by the lease's expiry (nor by a 20 s re-poll).
    assert!(granted - dropped < lease / 10, "{:?}", granted - dropped);
    assert!(next.is_held());
}

/// A renewal reaches the server but its answer comes back too late: the guard presumes the
/// lease lost while the server has just renewed it for a whole lease. Releasing the guard
/// must still free the lock, or the next waiter waits out that lease for nothing.
async fn releasing_a_lost_guard_still_frees_the_lock(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let proxy = Proxy::start(server.addr).await;
    let lease = server.lease(Duration::from_millis(1500));
    // With the margin at half the lease and a sixth of it added each way, the grant arrives
    // at a third, the renewal sent then reaches the server at a half, and its answer would
    // arrive at two thirds: after the guard's deadline, a half. A release sent at the loss
    // reaches the server at two thirds, well before the renewed lease ends (one and a half).
    let holder = DistributedLock::builder("p")
        .endpoint(proxy.url())
        .safety_margin(lease / 2)
        .build()
        .unwrap();
    proxy.set(Faults {
        delay: lease / 6,
        ..Faults::default()
    });
    let guard = holder.lock("late").expires_in(lease).await.unwrap();
    let dl = server.client("p");
    let waiter = tokio::spawn(async move { dl.lock("late").await });
    within(BOUND, guard.lost()).await;
    // Counted from here: on a slow machine the grant may have come too late, been given
    // back and been taken again before the guard was handed over, which is a release too.
    let releases_before = server.metric("leasehold_releases_total").await;
    assert!(guard.release().await.unwrap_err().is_lock_lost());
    let next = within(BOUND, waiter).await.unwrap().unwrap();
    assert!(next.is_held());
    assert_eq!(
        server.metric("leasehold_releases_total").await - releases_before,
        1.0,
        "the lock was freed by expiry, not by the release"
    );
}

/// The server released the lock, but its answer was lost on the way back. The SDK's retry
/// finds the lock free (`404`, or `410` with others waiting): that is still a release.
async fn a_release_whose_answer_was_lost_still_succeeds(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let proxy = Proxy::start(server.addr).await;
    let holder = client_for(&proxy.url(), "p");
    let guard = holder.lock("answer-lost").await.unwrap();
    proxy.cut_answers();
    let release = tokio::spawn(guard.release());
    eventually(BOUND, "the server released the lock", || async {
        server.inspect("p", "answer-lost").await == (None, 0)
    })
    .await;
    // The connection breaks with the answer still held back: the SDK tries again.
    proxy.reset();
    proxy.heal();
    within(BOUND, release).await.unwrap().expect("released");
}

/// A release dropped before the server answered (a `with_lock` call cancelled while it
/// releases, say) still frees the lock: the renewal task sends it, as for a dropped guard.
async fn a_release_dropped_midway_still_frees_the_lock(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let proxy = Proxy::start(server.addr).await;
    let holder = client_for(&proxy.url(), "p");
    let guard = holder
        .lock("dropped-release")
        .expires_in(Duration::from_secs(60))
        .await
        .unwrap();
    proxy.cut();
    let mut release = Box::pin(guard.release());
    let first = std::future::poll_fn(|cx| Poll::Ready(release.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "nothing passes the cut");
    drop(release);
    // What was sent so far never arrives; the connection breaks and the proxy heals.
    proxy.reset();
    proxy.heal();
    let next = within(BOUND, server.client("p").lock("dropped-release")).await;
    assert!(
        next.unwrap().is_held(),
        "freed long before its 60 s lease ended"
    );
}

/// One client used from two runtimes: its renewal task started on the first, which shuts
/// down while an acquire waits on the second. The grant gets a renewal task of its own.
#[test]
fn a_grant_outlives_the_runtime_its_client_first_ran_on() {
    let main = tokio::runtime::Runtime::new().unwrap();
    let first = tokio::runtime::Runtime::new().unwrap();
    let server = main.block_on(TestServer::start());
    let dl = server.client("p");
    let holder = main
        .block_on(server.client("p").lock("shared").into_future())
        .unwrap();
    // The client's first acquire starts its renewal task on `first`.
    first.block_on(async { dl.lock("warm-up").await.unwrap().release().await.unwrap() });
    let waiting = main.spawn({
        let dl = dl.clone();
        async move { dl.lock("shared").await }
    });
    main.block_on(eventually(BOUND, "the acquire waits", || async {
        server.inspect("p", "shared").await.1 == 1
    }));
    drop(first);
    main.block_on(holder.release()).unwrap();
    let guard = main.block_on(within(BOUND, waiting)).unwrap().unwrap();
    assert!(
        guard.is_held(),
        "the new holder's lease is tracked by a renewal task"
    );
    main.block_on(guard.release()).unwrap();
    drop(server);
}

#[test]
fn dropping_a_guard_outside_any_runtime_does_not_panic() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, guard) = runtime.block_on(async {
        let server = TestServer::start().await;
        let guard = server.client("p").lock("outside").await.unwrap();
        (server, guard)
    });
    // Dropped on another thread with no runtime at all, and after the runtime is gone.
    let other = runtime.block_on(async { server.client("p").lock("outside-2").await.unwrap() });
    std::thread::spawn(move || drop(guard)).join().unwrap();
    drop(runtime);
    drop(other);
    drop(server);
}

async fn plain_expiry_frees_the_lock_after_expires_in(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_millis(400));
    // etcd notices expired leases on a 500 ms tick, then revokes them through raft.
    let late = if backend == Backend::Memory {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    };
    let granted = Instant::now();
    let guard = server
        .client("p")
        .lock("plain")
        .expires_in(lease)
        .auto_renew(false)
        .await
        .unwrap();
    let dl = server.client("p");
    let waiter = tokio::spawn(async move { dl.lock("plain").await.map(|g| (g, Instant::now())) });
    within(BOUND, guard.lost()).await;
    let lost_at = Instant::now();
    assert!(!guard.is_held());
    let (_next, next_at) = within(BOUND, waiter).await.unwrap().unwrap();
    assert!(
        next_at >= lost_at,
        "granted to the next before the holder knew"
    );
    assert!(
        next_at - granted >= lease,
        "freed early after {:?}",
        next_at - granted
    );
    assert!(
        next_at - granted < lease + late,
        "freed late after {:?}",
        next_at - granted
    );
    assert_eq!(server.metric("leasehold_renewals_total").await, 0.0);
}

/// Regression (found by the fault suite): a waiter granted after waiting longer than its
/// lease counted its lease from when it started waiting, and so believed it lost at once.
#[tokio::test]
async fn a_grant_after_a_wait_longer_than_the_lease_is_held() {
    let server = TestServer::start().await;
    let holder = server.client("p").lock("long-wait").await.unwrap();
    let dl = server.client("p");
    let waiter = tokio::spawn(async move {
        dl.lock("long-wait")
            .expires_in(Duration::from_millis(300))
            .await
            .unwrap()
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect("p", "long-wait").await.1 == 1
    })
    .await;
    // The scenario itself: the waiter waits twice its 300 ms lease before the hand-over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(holder);
    let guard = within(BOUND, waiter).await.unwrap();
    assert!(guard.is_held(), "a fresh grant is held");
    // And stays held through renewals.
    let renewed = server.metric("leasehold_renewals_total").await;
    eventually(BOUND, "renewed twice", || async {
        server.metric("leasehold_renewals_total").await >= renewed + 2.0
    })
    .await;
    assert!(guard.is_held());
}

/// A grant whose answer reaches the client with less than a third of its lease left is
/// confirmed by a renewal before the guard is handed over.
#[tokio::test]
async fn a_late_grant_is_confirmed_before_it_is_handed_over() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let dl = client_for(&proxy.url(), "p");
    let lease = Duration::from_secs(1);
    proxy.cut_answers();
    let acquire = tokio::spawn(dl.lock("late").expires_in(lease).into_future());
    eventually(BOUND, "the server granted the lock", || async {
        server.inspect("p", "late").await.0.is_some()
    })
    .await;
    let granted_at = Instant::now();
    let token = server.inspect("p", "late").await.0.unwrap();
    // The grant's answer is held back until less than a third of the lease is left (the
    // scenario, not a wait for an event); the server still holds the lease then.
    tokio::time::sleep_until(granted_at + lease * 3 / 4).await;
    proxy.heal();
    let guard = within(BOUND, acquire).await.unwrap().unwrap();
    assert!(guard.is_held());
    assert_eq!(guard.fencing_token(), token, "the same grant, confirmed");
    assert_eq!(server.metric("leasehold_renewals_total").await, 1.0);
}

/// A grant that arrives after the server could have expired it is not handed over: the
/// confirming renewal finds it gone, and the request waits in line again.
#[tokio::test]
async fn a_grant_found_gone_is_not_handed_over_and_the_wait_goes_on() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let dl = client_for(&proxy.url(), "p");
    let lease = Duration::from_millis(500);
    proxy.cut_answers();
    let acquire = tokio::spawn(
        dl.lock("gone")
            .expires_in(lease)
            .timeout(lease * 20)
            .into_future(),
    );
    eventually(BOUND, "the server granted the lock", || async {
        server.inspect("p", "gone").await.0.is_some()
    })
    .await;
    let first = server.inspect("p", "gone").await.0.unwrap();
    // Held back until the server's lease has ended without a renewal.
    eventually(
        lease * 4,
        "the first grant expired on the server",
        || async { server.inspect("p", "gone").await.0.is_none() },
    )
    .await;
    proxy.heal();
    let guard = within(BOUND, acquire).await.unwrap().unwrap();
    assert!(guard.is_held());
    assert!(
        guard.fencing_token() > first,
        "a new grant ({}) after the lost one ({first})",
        guard.fencing_token()
    );
    assert_eq!(
        server.inspect("p", "gone").await.0,
        Some(guard.fencing_token())
    );
}

/// A server limits the streams of one connection (2,048); a client with more waiting
/// acquires than that used to queue its renewals behind them, for as long as the long
/// polls lasted, and lose the leases it held. Renewals and releases have a connection of
/// their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_never_wait_behind_the_clients_waiting_acquires() {
    let _alone = support::heavy().await;
    let server = TestServer::start().await;
    let dl = server.client("p");
    let lease = Duration::from_secs(1);
    let held = dl.lock("held").expires_in(lease).await.unwrap();
    let _blocker = dl.lock("crowded").await.unwrap();
    let crowd = 3_000;
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..crowd {
        let dl = dl.clone();
        waiters.spawn(async move { dl.lock("crowded").await.map(drop) });
    }
    // Every stream the server allows is taken by a waiting acquire, the rest queue in the
    // client; meanwhile the held lease must be renewed every third of a second.
    eventually(
        BOUND,
        "the server's streams are full of waiters",
        || async { server.inspect("p", "crowded").await.1 >= 2_048 },
    )
    .await;
    let since = Instant::now();
    while since.elapsed() < 3 * lease {
        assert!(held.is_held(), "lost after {:?}", since.elapsed());
        tokio::time::sleep(lease / 10).await;
    }
    waiters.abort_all();
}
