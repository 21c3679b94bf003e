//! The etcd store's acquire attempts: a first attempt (protocol `first`) writes no request
//! key, and every later attempt of the same request id (a re-poll, a retry, through any
//! server) still finds its one place. Two stores over one etcd stand for two servers.
#![cfg(feature = "etcd")]

mod support;

use etcd_client::GetOptions;
use leasehold::server::store::etcd::EtcdStore;
use leasehold::server::store::{
    AcquireOutcome, AcquireSpec, Grant, Id, LockStore, Mode, Release, Renewal,
};
use std::time::Duration;
use support::etcd::{EtcdCluster, project, store};
use support::within;

const BOUND: Duration = Duration::from_secs(30);

/// A first attempt at `name` that waits as long as it takes, in polls of `poll`.
fn first_attempt(name: &str, poll: Duration) -> AcquireSpec {
    AcquireSpec {
        project: project(),
        name: name.into(),
        lease: Duration::from_secs(10),
        wait: None,
        poll,
        request_id: Id::random(),
        first: true,
        label: None,
        quota: Default::default(),
        max_hold: None,
        lock_delay: None,
        mode: Mode::Exclusive,
        value: None,
        client: None,
    }
}

/// A holder of `name` whose lease (60 s, never renewed here) outlasts any test below, so that
/// its waiters keep waiting however slow the machine.
async fn holder(store: &EtcdStore, name: &str) -> Grant {
    let spec = AcquireSpec {
        lease: Duration::from_secs(60),
        ..first_attempt(name, Duration::from_secs(1))
    };
    grant(store.acquire(spec).await.expect("acquire"))
}

/// A later attempt of the same request (a re-poll or a retry).
fn repeat(spec: &AcquireSpec) -> AcquireSpec {
    AcquireSpec {
        first: false,
        ..spec.clone()
    }
}

fn grant(outcome: AcquireOutcome) -> Grant {
    match outcome {
        AcquireOutcome::Granted(grant) => grant,
        other => panic!("not granted: {other:?}"),
    }
}

/// Re-polls (as repeats) until granted.
async fn granted(store: &EtcdStore, spec: &AcquireSpec) -> Grant {
    within(BOUND, async {
        let mut attempt = spec.clone();
        loop {
            match store.acquire(attempt.clone()).await.expect("acquire") {
                AcquireOutcome::StillWaiting { .. } => attempt = repeat(spec),
                other => return grant(other),
            }
        }
    })
    .await
}

async fn still_waiting(store: &EtcdStore, spec: AcquireSpec) {
    match store.acquire(spec).await.expect("acquire") {
        AcquireOutcome::StillWaiting { .. } => {}
        other => panic!("not waiting: {other:?}"),
    }
}

async fn release(store: &EtcdStore, name: &str, lease_id: Id) -> Release {
    store
        .release(&project(), name, lease_id)
        .await
        .expect("release")
}

/// Withdraws the request's place (by request id).
async fn store_cancel(store: &EtcdStore, spec: &AcquireSpec) -> bool {
    store
        .cancel(&project(), &spec.name, spec.request_id)
        .await
        .expect("cancel")
}

/// Keys under `prefix` in etcd, by anyone.
async fn keys_under(etcd: &EtcdCluster, prefix: &str) -> i64 {
    let mut client = etcd.client().await;
    let options = GetOptions::new().with_prefix().with_count_only();
    client.get(prefix, Some(options)).await.unwrap().count()
}

#[tokio::test]
async fn a_first_attempt_writes_no_request_key_and_its_repeats_find_its_place() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = (store(&etcd).await, store(&etcd).await);
    let poll = Duration::from_millis(200);
    let holder = holder(&a, "lock").await;
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 0);
    // A place still waiting when its poll ends gets its request key then (a mark), so that
    // its re-polls find it by name.
    let waiter = first_attempt("lock", poll);
    still_waiting(&a, waiter.clone()).await;
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 1);

    // Its re-polls, through either server, keep the one place: nothing more is queued.
    still_waiting(&b, repeat(&waiter)).await;
    still_waiting(&a, repeat(&waiter)).await;
    assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 2);
    let shown = a.inspect(&project(), "lock").await.unwrap().unwrap();
    assert_eq!(shown.waiters, 1);

    assert_eq!(
        release(&a, "lock", holder.lease_id).await,
        Release::Released
    );
    let got = granted(&b, &repeat(&waiter)).await;
    assert!(got.fencing_token > holder.fencing_token);
    // A retry after the grant gets the same grant back.
    let again = granted(&a, &repeat(&waiter)).await;
    assert_eq!(
        (again.lease_id, again.fencing_token),
        (got.lease_id, got.fencing_token)
    );
    let renewed = b
        .renew(&project(), vec![("lock".into(), got.lease_id)])
        .await
        .unwrap();
    assert!(matches!(renewed[..], [Renewal::Renewed(_)]), "{renewed:?}");
    assert_eq!(release(&b, "lock", got.lease_id).await, Release::Released);
    assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 0);
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 0);
}

/// A mark can outlive its place (released under a lease id that does not name it, by an
/// attempt that found the place by its entry). A later attempt of the request is not turned
/// back by it: the stale mark goes, and the attempt queues anew.
#[tokio::test]
async fn a_mark_left_behind_its_place_does_not_turn_later_attempts_back() {
    let etcd = EtcdCluster::start(1).await;
    let a = store(&etcd).await;
    let poll = Duration::from_millis(200);
    let holder = holder(&a, "lock").await;
    let waiter = first_attempt("lock", poll);
    still_waiting(&a, waiter.clone()).await;
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 1);
    // The waiter's place goes without its mark, as a release by revision leaves it.
    let mut client = etcd.client().await;
    let options = GetOptions::new().with_prefix();
    let queue = client.get("/leasehold/p/", Some(options)).await.unwrap();
    let place = queue
        .kvs()
        .iter()
        .max_by_key(|kv| kv.create_revision())
        .expect("the waiter's place")
        .key()
        .to_vec();
    client.delete(place, None).await.unwrap();

    still_waiting(&a, repeat(&waiter)).await;
    assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 2, "queued anew");
    assert_eq!(
        release(&a, "lock", holder.lease_id).await,
        Release::Released
    );
    let got = granted(&a, &repeat(&waiter)).await;
    assert_eq!(release(&a, "lock", got.lease_id).await, Release::Released);
    assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 0);
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 0);
}

/// A first attempt that took its time on the way and a retry of it, through two servers at
/// once: in whatever order etcd places them, exactly one place is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_and_its_retry_at_once_leave_one_place() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = (store(&etcd).await, store(&etcd).await);
    let poll = Duration::from_millis(200);
    let holder = holder(&a, "lock").await;
    for _ in 0..20 {
        let waiter = first_attempt("lock", poll);
        let (first, retry) = tokio::join!(
            still_waiting(&a, waiter.clone()),
            still_waiting(&b, repeat(&waiter))
        );
        let ((), ()) = (first, retry);
        assert_eq!(
            keys_under(&etcd, "/leasehold/p/").await,
            2,
            "the holder and one place for the waiter"
        );
        assert!(
            store_cancel(&b, &waiter).await,
            "the waiter's place is found by request id"
        );
        // The place's mark went with it.
        assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 1);
        assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 0);
    }
    assert_eq!(
        release(&a, "lock", holder.lease_id).await,
        Release::Released
    );
}

/// A lease id stays its own place's: etcd leases are reused by later acquires, and a late
/// release or renewal of an earlier lease on the same etcd lease finds nothing.
#[tokio::test]
async fn a_stale_lease_id_names_no_later_place_on_the_same_etcd_lease() {
    let etcd = EtcdCluster::start(1).await;
    let a = store(&etcd).await;
    let poll = Duration::from_secs(1);
    let earlier = grant(a.acquire(first_attempt("lock", poll)).await.unwrap());
    assert_eq!(
        release(&a, "lock", earlier.lease_id).await,
        Release::Released
    );
    let later = grant(a.acquire(first_attempt("lock", poll)).await.unwrap());
    // The same etcd lease (the last 8 bytes), a different place.
    assert_eq!(later.lease_id.0[8..], earlier.lease_id.0[8..]);
    assert_ne!(later.lease_id, earlier.lease_id);

    assert_ne!(
        release(&a, "lock", earlier.lease_id).await,
        Release::Released
    );
    let renewed = a
        .renew(&project(), vec![("lock".into(), earlier.lease_id)])
        .await
        .unwrap();
    assert!(matches!(renewed[..], [Renewal::Gone(_)]), "{renewed:?}");
    let shown = a.inspect(&project(), "lock").await.unwrap().unwrap();
    assert_eq!(shown.holders[0].fencing_token, later.fencing_token);
    assert_eq!(release(&a, "lock", later.lease_id).await, Release::Released);
}

/// A first attempt held up on its way and two retries of it, through two servers at once
/// (the client listens only to the last): whichever place etcd keeps, no attempt is told
/// its wait is over while the request still has a place in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_attempts_at_once_are_all_still_waiting() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = (store(&etcd).await, store(&etcd).await);
    let poll = Duration::from_millis(300);
    let holder = holder(&a, "lock").await;
    for _ in 0..30 {
        // Renewed every round, so that it holds for 60 s more however slow the rounds.
        let renewed = a
            .renew(&project(), vec![("lock".into(), holder.lease_id)])
            .await
            .unwrap();
        assert!(matches!(renewed[..], [Renewal::Renewed(_)]), "{renewed:?}");
        let waiter = first_attempt("lock", poll);
        let (first, second, third) = tokio::join!(
            a.acquire(waiter.clone()),
            b.acquire(repeat(&waiter)),
            a.acquire(repeat(&waiter)),
        );
        for outcome in [first, second, third] {
            match outcome.expect("acquire") {
                AcquireOutcome::StillWaiting { .. } => {}
                other => panic!("the request still waits, but an attempt was told {other:?}"),
            }
        }
        // Its next poll finds its one place.
        still_waiting(&b, repeat(&waiter)).await;
        assert_eq!(
            keys_under(&etcd, "/leasehold/p/").await,
            2,
            "the holder and one place for the waiter"
        );
        assert!(store_cancel(&a, &waiter).await);
        assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 1);
        assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 0);
    }
    assert_eq!(
        release(&a, "lock", holder.lease_id).await,
        Release::Released
    );
}
