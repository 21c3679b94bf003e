//! What a guard knows of its lease: its deadline, jeopardy, why it was lost; `max_hold`,
//! `try_lock`, `with_lock` with the lease, loss signals. All against the test kit's real
//! in-process server, the way users' own tests use it.
#![cfg(feature = "testing")]

mod support;

use leasehold::testing::TestServer;
use leasehold::{Error, GuardState, Lease, LostReason};
use std::time::Duration;
use support::{eventually, within};
use tokio::time::Instant;

/// Slack for a busy machine on top of the times the tests choose.
const SLACK: Duration = Duration::from_secs(10);

#[tokio::test]
async fn remaining_and_valid_until_are_the_deadline_is_held_uses() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let lease = Duration::from_secs(30);
    let before = Instant::now();
    let guard = dl.lock("deadline").expires_in(lease).await.unwrap();
    let remaining = guard.remaining();
    // Counted from when the request left, less the safety margin: never past the lease.
    assert!(remaining <= lease, "{remaining:?}");
    assert!(guard.valid_until() <= before + lease);
    assert!(guard.valid_until() > Instant::now());
    assert_eq!(guard.state(), GuardState::Held);
    assert!(guard.is_held());
    // A renewal (a third into the lease) moves the deadline on.
    let first = guard.valid_until();
    eventually(lease, "a renewal moved the deadline", || async {
        guard.valid_until() > first
    })
    .await;
    assert_eq!(guard.state(), GuardState::Held);
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_paused_server_puts_the_guard_in_jeopardy_and_answering_again_ends_it() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    // Jeopardy begins half a lease after the last confirmed renewal, the loss a margin
    // (a tenth) before its end: 2 s of warning.
    let lease = Duration::from_secs(5);
    let guard = dl.lock("jeopardy").expires_in(lease).await.unwrap();
    server.pause().await;
    within(lease, async {
        while guard.state() != GuardState::Jeopardy {
            assert_eq!(guard.state(), GuardState::Held);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(guard.is_held(), "in jeopardy the lease is still held");
    assert!(guard.remaining() > Duration::ZERO);
    server.resume().await;
    // The renewal that waited is answered: held again, with a later deadline.
    eventually(lease, "held again", || async {
        guard.state() == GuardState::Held
    })
    .await;
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_server_that_stops_answering_loses_the_lease_as_expired() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let lease = Duration::from_secs(1);
    let guard = dl.lock("expires").expires_in(lease).await.unwrap();
    let deadline = guard.valid_until();
    server.pause().await;
    let reason = within(lease + SLACK, guard.lost()).await;
    assert_eq!(reason, LostReason::Expired);
    assert!(Instant::now() >= deadline);
    assert_eq!(guard.state(), GuardState::Lost(LostReason::Expired));
    assert_eq!(guard.remaining(), Duration::ZERO);
    assert!(!guard.is_held());
    server.resume().await;
    let err = guard.release().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::LockLost {
                reason: LostReason::Expired,
                ..
            }
        ),
        "{err:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn max_hold_ends_the_lease_on_the_client_and_on_the_server() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let lease = Duration::from_secs(1);
    let max_hold = Duration::from_millis(2500);
    let guard = dl
        .lock("bounded")
        .expires_in(lease)
        .max_hold(max_hold)
        .await
        .unwrap();
    let granted = Instant::now();
    let token = guard.fencing_token();
    let reason = within(max_hold + SLACK, guard.lost()).await;
    assert_eq!(reason, LostReason::MaxHold);
    // Renewals ran until then (the lease alone would have ended after 1 s).
    assert!(
        granted.elapsed() >= max_hold - lease,
        "{:?}",
        granted.elapsed()
    );
    // The server ends it too, while the guard lives on: someone else gets the lock.
    let next = within(lease + SLACK, dl.lock("bounded")).await.unwrap();
    assert!(next.fencing_token() > token);
    drop(guard);
    next.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_revoked_lease_is_lost_as_revoked_and_its_signals_hear_it() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let lease = Duration::from_secs(3);
    let guard = dl.lock("revoked").expires_in(lease).await.unwrap();
    let token = guard.fencing_token();
    let signal = guard.lost_signal();
    let watcher = tokio::spawn({
        let signal = signal.clone();
        async move { signal.lost().await }
    });
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("revoked").await }
    });
    assert_eq!(server.revoke("revoked").await, Some(token));
    // The holder hears it on its next renewal, due a third into the lease.
    assert_eq!(
        within(lease + SLACK, watcher).await.unwrap(),
        LostReason::Revoked
    );
    assert!(signal.is_lost());
    assert_eq!(guard.state(), GuardState::Lost(LostReason::Revoked));
    let next = within(SLACK, waiter).await.unwrap().unwrap();
    assert!(next.fencing_token() > token);
    // Nobody holds it now but `next`; revoking what nobody holds says so.
    next.release().await.unwrap();
    assert_eq!(server.revoke("revoked").await, None);
    server.shutdown().await;
}

#[tokio::test]
async fn a_signal_that_outlives_its_guard_reports_the_release() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let guard = dl.lock("released").await.unwrap();
    let signal = guard.lost_signal();
    assert!(!signal.is_lost());
    assert_eq!(signal.state(), GuardState::Held);
    guard.release().await.unwrap();
    assert_eq!(within(SLACK, signal.lost()).await, LostReason::Released);
    assert!(signal.is_lost());
    server.shutdown().await;
}

#[tokio::test]
async fn with_lock_hands_the_closure_its_lease_or_nothing() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let (token, remaining) = dl
        .with_lock("closure", |lease: Lease| async move {
            assert_eq!(lease.name(), "closure");
            assert!(lease.is_held());
            (lease.fencing_token(), lease.remaining())
        })
        .await
        .unwrap();
    assert!(token > 0);
    assert!(remaining > Duration::ZERO && remaining <= leasehold::DEFAULT_EXPIRES_IN);
    // The plain shape still works, and later grants carry larger tokens.
    assert_eq!(dl.with_lock("closure", || async { 10 }).await.unwrap(), 10);
    let next = dl
        .lock("closure")
        .with_lock(|lease: Lease| async move { lease.fencing_token() })
        .await
        .unwrap();
    assert!(next > token);
    server.shutdown().await;
}

/// The README's test-kit example, as a user writes it: revoking the lock stops the work.
#[tokio::test]
async fn revoking_the_lock_stops_work_done_under_with_lock() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let job = tokio::spawn(async move {
        dl.lock("import")
            .expires_in(Duration::from_secs(3))
            .with_lock(|| async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await // work that would never end by itself
            })
            .await
    });
    within(SLACK, started_rx).await.unwrap();
    assert!(server.revoke("import").await.is_some());
    let result = within(Duration::from_secs(3) + SLACK, job).await.unwrap();
    assert!(
        matches!(
            result,
            Err(Error::LockLost {
                reason: LostReason::Revoked,
                ..
            })
        ),
        "{result:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn try_lock_takes_a_free_lock_and_never_waits_for_a_taken_one() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let guard = dl.try_lock("try").await.unwrap().expect("the lock is free");
    let other = server.client("k");
    assert!(other.try_lock("try").await.unwrap().is_none());
    // Another project's lock of the same name is another lock.
    let elsewhere = server.client("another-project");
    let theirs = elsewhere.try_lock("try").await.unwrap();
    assert!(theirs.is_some());
    guard.release().await.unwrap();
    let again = other
        .lock("try")
        .expires_in(Duration::from_secs(5))
        .try_lock()
        .await
        .unwrap();
    assert!(again.is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn a_paused_test_server_makes_acquires_wait_until_it_answers_again() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    server.pause().await;
    let acquire = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("paused").await }
    });
    // Nothing is answered while paused, however long it takes.
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if acquire.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_err(), "an acquire was answered while paused");
    server.resume().await;
    let guard = within(SLACK, acquire).await.unwrap().unwrap();
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reached_a_server_says_so_within_seconds() {
    let addr = support::dead_addr().await;
    let dl = leasehold::DistributedLock::builder("k")
        .endpoint(format!("http://{addr}"))
        .build()
        .unwrap();
    let started = Instant::now();
    // No timeout and `unavailable_after` at its 30 s default: only first contact is short.
    let err = within(SLACK, dl.lock("anything")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(err.is_unavailable(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("nothing answers there"), "{message}");
    assert!(message.contains("leasehold-server"), "{message}");
    // The transport error itself is kept as the cause.
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
}

#[tokio::test]
async fn lock_delay_holds_the_next_grant_back_after_an_unclean_end_only() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    let delay = Duration::from_secs(3);
    // A clean release frees the lock at once for the next one...
    let guard = dl.lock("delayed").lock_delay(delay).await.unwrap();
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("delayed").lock_delay(delay).await }
    });
    eventually(SLACK, "the waiter is in line", || async {
        dl.inspect("delayed").await.unwrap().waiters == 1
    })
    .await;
    let released_at = Instant::now();
    guard.release().await.unwrap();
    let next = within(SLACK, waiter).await.unwrap().unwrap();
    let clean = released_at.elapsed();
    // ...but a revoked lease (an unclean end) keeps it from anyone for the delay.
    let waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("delayed").await }
    });
    eventually(SLACK, "the waiter is in line", || async {
        dl.inspect("delayed").await.unwrap().waiters == 1
    })
    .await;
    let revoked_at = Instant::now();
    assert_eq!(server.revoke("delayed").await, Some(next.fencing_token()));
    let after = within(delay + SLACK, waiter).await.unwrap().unwrap();
    assert!(revoked_at.elapsed() >= delay, "{:?}", revoked_at.elapsed());
    assert!(after.fencing_token() > next.fencing_token());
    assert!(clean < delay, "a clean release waited {clean:?}");
    drop(next);
    after.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_revoked_leaders_proclaim_fails_as_revoked_and_changes_nothing() {
    let server = TestServer::start().await;
    let dl = server.client("k");
    // A long lease: the leader's renewal would notice the revocation only 10 s later, so a
    // refusal now comes from the server's check in the proclaim itself.
    let election = dl.election("scheduler");
    let leadership = election
        .campaign("a")
        .expires_in(Duration::from_secs(30))
        .await
        .unwrap();
    leadership.proclaim("a2").await.unwrap();
    assert_eq!(
        server.revoke("scheduler").await,
        Some(leadership.fencing_token())
    );
    let err = leadership.proclaim("a3").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::LockLost {
                reason: LostReason::Revoked,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(election.leader().await.unwrap(), None, "nobody leads now");
    server.shutdown().await;
}
