//! The memory store's semaphores, read-write locks and elections, through the `LockStore`
//! calls the HTTP layer makes: modes and their conflicts, several holders of one lock,
//! revoking them all, proclaiming, and observing every leadership change.

use leasehold::server::store::memory::{MemoryConfig, MemoryStore};
use leasehold::server::store::{
    AcquireOutcome, AcquireSpec, Ended, EventKind, Grant, Id, LockStore, Mode, Observation,
    Proclaimed, Project, Quota, Release, Renewal, StoreError, StoreEvent,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn project() -> Project {
    Project {
        id: 1,
        name: "p".into(),
    }
}

fn id(n: u128) -> Id {
    Id(n.to_be_bytes())
}

fn spec(name: &str, request: u128, mode: Mode) -> AcquireSpec {
    AcquireSpec {
        project: project(),
        name: name.into(),
        lease: Duration::from_secs(10),
        wait: None,
        poll: Duration::from_millis(50),
        request_id: id(request),
        first: false,
        label: None,
        quota: Quota::default(),
        max_hold: None,
        lock_delay: None,
        mode,
        value: None,
        client: None,
    }
}

fn open() -> (MemoryStore, mpsc::UnboundedReceiver<StoreEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let store = MemoryStore::open(MemoryConfig {
        events: Some(tx),
        ..MemoryConfig::default()
    })
    .unwrap();
    (store, rx)
}

async fn granted(store: &MemoryStore, spec: AcquireSpec) -> Grant {
    match store.acquire(spec).await.unwrap() {
        AcquireOutcome::Granted(grant) => grant,
        other => panic!("not granted: {other:?}"),
    }
}

async fn waits(store: &MemoryStore, spec: AcquireSpec) {
    let outcome = store.acquire(spec).await.unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::StillWaiting { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn readers_share_and_a_writer_waits_for_them_all() {
    let (store, mut events) = open();
    let p = project();
    let r1 = granted(&store, spec("rw", 1, Mode::Shared)).await;
    let r2 = granted(&store, spec("rw", 2, Mode::Shared)).await;
    assert!(r2.fencing_token > r1.fencing_token);
    waits(&store, spec("rw", 3, Mode::Exclusive)).await;
    waits(&store, spec("rw", 4, Mode::Shared)).await;
    let view = store.inspect(&p, "rw").await.unwrap().unwrap();
    assert_eq!(view.mode, Mode::Shared);
    assert_eq!(view.waiters, 2);
    let tokens: Vec<u64> = view.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(tokens, [r1.fencing_token, r2.fencing_token], "oldest first");
    assert_eq!(store.stats().held, 1, "one lock held, by two readers");
    assert_eq!(store.stats().waiters, 2);

    assert_eq!(
        store.release(&p, "rw", r1.lease_id).await.unwrap(),
        Release::Released
    );
    assert_eq!(
        store.release(&p, "rw", r2.lease_id).await.unwrap(),
        Release::Released
    );
    let w = granted(&store, spec("rw", 3, Mode::Exclusive)).await;
    assert!(w.fencing_token > r2.fencing_token);
    assert_eq!(
        store.inspect(&p, "rw").await.unwrap().unwrap().mode,
        Mode::Exclusive
    );

    let mut shared_grants = 0;
    while let Ok(event) = events.try_recv() {
        if let EventKind::Granted {
            shared, permits, ..
        } = event.kind
        {
            assert_eq!(permits, None);
            shared_grants += usize::from(shared);
        }
    }
    assert_eq!(shared_grants, 2);
}

#[tokio::test]
async fn a_semaphore_grants_up_to_its_permits_and_refuses_other_uses() {
    let (store, mut events) = open();
    let p = project();
    let a = granted(&store, spec("sem", 1, Mode::Permit(2))).await;
    let _b = granted(&store, spec("sem", 2, Mode::Permit(2))).await;
    waits(&store, spec("sem", 3, Mode::Permit(2))).await;
    for (request, mode, expected) in [
        (4, Mode::Permit(3), "2 permits"),
        (5, Mode::Exclusive, "semaphore with 2 permits"),
        (6, Mode::Shared, "semaphore with 2 permits"),
    ] {
        match store.acquire(spec("sem", request, mode)).await {
            Err(StoreError::Conflict(message)) => assert!(message.contains(expected), "{message}"),
            other => panic!("not refused: {other:?}"),
        }
    }
    let view = store.inspect(&p, "sem").await.unwrap().unwrap();
    assert_eq!(
        (view.mode, view.holders.len(), view.waiters),
        (Mode::Permit(2), 2, 1)
    );
    assert_eq!(
        store.release(&p, "sem", a.lease_id).await.unwrap(),
        Release::Released
    );
    granted(&store, spec("sem", 3, Mode::Permit(2))).await;
    let permits: Vec<Option<u32>> = std::iter::from_fn(|| events.try_recv().ok())
        .filter_map(|e| match e.kind {
            EventKind::Granted { permits, .. } => Some(permits),
            _ => None,
        })
        .collect();
    assert_eq!(permits, [Some(2); 3]);
}

#[tokio::test]
async fn a_revoke_ends_every_holder() {
    let (store, _events) = open();
    let p = project();
    let r1 = granted(&store, spec("rv", 1, Mode::Shared)).await;
    let r2 = granted(&store, spec("rv", 2, Mode::Shared)).await;
    let tokens = store.revoke(&p, "rv").await.unwrap();
    assert_eq!(tokens, [r1.fencing_token, r2.fencing_token]);
    let renewed = store
        .renew(
            &p,
            vec![("rv".into(), r1.lease_id), ("rv".into(), r2.lease_id)],
        )
        .await
        .unwrap();
    assert_eq!(renewed, [Renewal::Gone(Some(Ended::Revoked)); 2]);
    assert!(store.revoke(&p, "rv").await.unwrap().is_empty());
    assert_eq!(store.stats().held, 0);
}

/// Observes `name` after `after` for up to `wait`.
async fn observe(store: &MemoryStore, after: u64, wait: Duration) -> Vec<Observation> {
    store
        .observe(&project(), "el", Some(after), wait)
        .await
        .unwrap()
}

#[tokio::test]
async fn observers_see_every_leader_and_value() {
    let (store, mut events) = open();
    let p = project();
    let first = store.observe(&p, "el", None, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].leader, None);
    let mut seen = first[0].revision;
    assert!(observe(&store, seen, Duration::ZERO).await.is_empty());

    let mut campaign = spec("el", 1, Mode::Exclusive);
    campaign.value = Some("a".into());
    campaign.label = Some("host-a".into());
    let a = granted(&store, campaign).await;
    waits(&store, spec("el", 2, Mode::Exclusive)).await;
    let states = observe(&store, seen, Duration::ZERO).await;
    let leader = states[0].leader.as_ref().unwrap();
    assert_eq!(
        (
            leader.fencing_token,
            leader.value.as_str(),
            leader.label.as_deref()
        ),
        (a.fencing_token, "a", Some("host-a"))
    );
    seen = states[0].revision;

    // A waiting observer is woken by the change.
    let (done, changes) = tokio::join!(
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store
                .proclaim(&p, "el", a.lease_id, "b".into())
                .await
                .unwrap()
        },
        observe(&store, seen, Duration::from_secs(10)),
    );
    assert_eq!(done, Proclaimed::Done);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].leader.as_ref().unwrap().value, "b");
    assert!(changes[0].revision > seen);
    seen = changes[0].revision;
    let view = store.inspect(&p, "el").await.unwrap().unwrap();
    assert_eq!(view.holders[0].value.as_deref(), Some("b"));

    // A release hands over at once: the observer sees the moment nobody led, then the next
    // leader, in order.
    assert_eq!(
        store.release(&p, "el", a.lease_id).await.unwrap(),
        Release::Released
    );
    let b = granted(&store, spec("el", 2, Mode::Exclusive)).await;
    let states = observe(&store, seen, Duration::ZERO).await;
    let leaders: Vec<Option<u64>> = states
        .iter()
        .map(|s| s.leader.as_ref().map(|l| l.fencing_token))
        .collect();
    assert_eq!(leaders, [None, Some(b.fencing_token)]);
    assert!(states.windows(2).all(|w| w[0].revision < w[1].revision));
    assert_eq!(states[1].leader.as_ref().unwrap().value, "", "no value");
    seen = states[1].revision;

    // Asked again from the start, the current state.
    let now = store.observe(&p, "el", None, Duration::ZERO).await.unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].revision, seen);
    // From a revision older than the history, the current state alone.
    let stale = observe(&store, 1, Duration::ZERO).await;
    assert_eq!(stale.len(), 1);
    assert_eq!(
        stale[0].leader.as_ref().unwrap().fencing_token,
        b.fencing_token
    );

    // A lease gone is `Gone` to proclaim, with its reason when remembered.
    assert_eq!(
        store
            .proclaim(&p, "el", a.lease_id, "x".into())
            .await
            .unwrap(),
        Proclaimed::Gone(None)
    );
    let proclaimed: Vec<String> = std::iter::from_fn(|| events.try_recv().ok())
        .filter_map(|e| match e.kind {
            EventKind::Proclaimed { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(proclaimed, ["b"]);
}

#[tokio::test]
async fn an_observer_learns_of_a_leader_whose_lease_ran_out() {
    let (store, _events) = open();
    let p = project();
    let mut campaign = spec("el", 1, Mode::Exclusive);
    campaign.lease = Duration::from_millis(200);
    let a = granted(&store, campaign).await;
    let now = store.observe(&p, "el", None, Duration::ZERO).await.unwrap();
    assert_eq!(
        now[0].leader.as_ref().map(|l| l.fencing_token),
        Some(a.fencing_token)
    );
    let started = Instant::now();
    let states = observe(&store, now[0].revision, Duration::from_secs(10)).await;
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].leader, None);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "at the lease's end, not at a sweep: {:?}",
        started.elapsed()
    );
    assert_eq!(
        store
            .proclaim(&p, "el", a.lease_id, "late".into())
            .await
            .unwrap(),
        Proclaimed::Gone(Some(Ended::Expired))
    );
}

#[tokio::test]
async fn only_an_exclusive_holder_proclaims() {
    let (store, _events) = open();
    let p = project();
    let r = granted(&store, spec("rw", 1, Mode::Shared)).await;
    match store.proclaim(&p, "rw", r.lease_id, "v".into()).await {
        Err(StoreError::Conflict(message)) => {
            assert!(message.contains("only an exclusive holder"), "{message}")
        }
        other => panic!("not refused: {other:?}"),
    }
    let s = granted(&store, spec("sem", 2, Mode::Permit(3))).await;
    assert!(matches!(
        store.proclaim(&p, "sem", s.lease_id, "v".into()).await,
        Err(StoreError::Conflict(_))
    ));
    // Nobody leads a read lock or a semaphore.
    for name in ["rw", "sem"] {
        let states = store.observe(&p, name, None, Duration::ZERO).await.unwrap();
        assert_eq!(states[0].leader, None);
    }
    assert_eq!(
        store
            .proclaim(&p, "nothing", r.lease_id, "v".into())
            .await
            .unwrap(),
        Proclaimed::Gone(None)
    );
}

#[tokio::test]
async fn a_waiting_observer_times_out_empty() {
    let (store, _events) = open();
    let p = project();
    let first = store.observe(&p, "el", None, Duration::ZERO).await.unwrap();
    let started = Instant::now();
    assert!(
        observe(&store, first[0].revision, Duration::from_millis(100))
            .await
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn waiters_are_granted_when_holders_run_out_without_a_sweep() {
    let store = MemoryStore::open(MemoryConfig {
        // Only the locks' own timers can grant in this test.
        sweep_interval: Duration::from_secs(600),
        ..MemoryConfig::default()
    })
    .unwrap();
    let lease = |name: &str, request: u128, mode: Mode, ms: u64| {
        let mut spec = spec(name, request, mode);
        spec.lease = Duration::from_millis(ms);
        spec
    };
    let long_poll = |name: &str, request: u128, mode: Mode| {
        let mut spec = spec(name, request, mode);
        spec.poll = Duration::from_secs(10);
        spec
    };
    granted(&store, lease("rw", 1, Mode::Shared, 100)).await;
    granted(&store, lease("rw", 2, Mode::Shared, 300)).await;
    granted(&store, lease("sem", 3, Mode::Permit(2), 200)).await;
    granted(&store, lease("sem", 4, Mode::Permit(2), 200)).await;
    let started = Instant::now();
    let (writer, (p1, p2)) = tokio::join!(
        async {
            let grant = granted(&store, long_poll("rw", 5, Mode::Exclusive)).await;
            (grant, started.elapsed())
        },
        async {
            tokio::join!(
                granted(&store, long_poll("sem", 6, Mode::Permit(2))),
                granted(&store, long_poll("sem", 7, Mode::Permit(2))),
            )
        },
    );
    let (_, waited) = writer;
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "the writer waited for the last reader: {waited:?}"
    );
    assert!(p2.fencing_token != p1.fencing_token);
    let view = store.inspect(&project(), "sem").await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 2);
    assert_eq!(store.stats().expirations, 4);
}

/// Lock-delays with modes: an ended holder keeps its place and mode for its delay, and the
/// lock's own timer grants the next waiter when it runs out. A semaphore's permit stays
/// taken while the other works; readers still join an ended reader, a writer does not.
#[tokio::test]
async fn a_lock_delay_keeps_the_ended_holders_place() {
    let store = MemoryStore::open(MemoryConfig {
        // Only the locks' own timers can grant in this test.
        sweep_interval: Duration::from_secs(600),
        ..MemoryConfig::default()
    })
    .unwrap();
    let p = project();
    let delay = Duration::from_millis(400);
    let delayed = |name: &str, request: u128, mode: Mode| AcquireSpec {
        lock_delay: Some(delay),
        ..spec(name, request, mode)
    };
    let try_once = |name: &str, request: u128, mode: Mode| AcquireSpec {
        wait: Some(Duration::ZERO),
        ..spec(name, request, mode)
    };
    let long_poll = |name: &str, request: u128, mode: Mode| AcquireSpec {
        poll: Duration::from_secs(10),
        ..spec(name, request, mode)
    };
    let timed_out = |outcome: AcquireOutcome| matches!(outcome, AcquireOutcome::TimedOut { .. });

    // A semaphore of 2: the revoked holder's permit stays taken for its delay.
    let first = granted(&store, delayed("sem", 1, Mode::Permit(2))).await;
    let second = granted(&store, spec("sem", 2, Mode::Permit(2))).await;
    assert_eq!(
        store.release(&p, "sem", second.lease_id).await.unwrap(),
        Release::Released
    );
    let revoked_at = Instant::now();
    assert_eq!(
        store.revoke(&p, "sem").await.unwrap(),
        [first.fencing_token]
    );
    let renewed = store
        .renew(&p, vec![("sem".into(), first.lease_id)])
        .await
        .unwrap();
    assert_eq!(renewed, [Renewal::Gone(Some(Ended::Revoked))]);
    let other = granted(&store, try_once("sem", 3, Mode::Permit(2))).await;
    assert!(timed_out(
        store
            .acquire(try_once("sem", 4, Mode::Permit(2)))
            .await
            .unwrap()
    ));
    let view = store.inspect(&p, "sem").await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 1, "the ended holder is not shown");
    assert_eq!(view.held_back_until, None, "someone holds");
    let late = granted(&store, long_poll("sem", 5, Mode::Permit(2))).await;
    assert!(
        revoked_at.elapsed() >= delay,
        "granted {:?} after the revoke",
        revoked_at.elapsed()
    );
    assert!(
        revoked_at.elapsed() < Duration::from_secs(5),
        "by the lock's timer, not a sweep"
    );
    assert!(late.fencing_token > other.fencing_token);

    // A read lock: readers join the ended reader, a writer waits for its delay.
    let reader = granted(&store, delayed("rw", 6, Mode::Shared)).await;
    let revoked_at = Instant::now();
    assert_eq!(
        store.revoke(&p, "rw").await.unwrap(),
        [reader.fencing_token]
    );
    let view = store.inspect(&p, "rw").await.unwrap().unwrap();
    assert!(view.holders.is_empty());
    let until = view
        .held_back_until
        .expect("the delay shows while nobody holds");
    assert!(until > std::time::SystemTime::now());
    let joined = granted(&store, try_once("rw", 7, Mode::Shared)).await;
    assert!(timed_out(
        store
            .acquire(try_once("rw", 8, Mode::Exclusive))
            .await
            .unwrap()
    ));
    assert_eq!(
        store.release(&p, "rw", joined.lease_id).await.unwrap(),
        Release::Released
    );
    let writer = granted(&store, long_poll("rw", 9, Mode::Exclusive)).await;
    assert!(
        revoked_at.elapsed() >= delay,
        "the writer was granted {:?} after the revoke",
        revoked_at.elapsed()
    );
    assert!(writer.fencing_token > joined.fencing_token);

    // A plain lock: nobody during the delay, as before modes.
    let holder = granted(&store, delayed("x", 10, Mode::Exclusive)).await;
    let revoked_at = Instant::now();
    store.revoke(&p, "x").await.unwrap();
    for (request, mode) in [(11, Mode::Exclusive), (12, Mode::Shared)] {
        assert!(timed_out(
            store.acquire(try_once("x", request, mode)).await.unwrap()
        ));
    }
    let next = granted(&store, long_poll("x", 13, Mode::Shared)).await;
    assert!(revoked_at.elapsed() >= delay);
    assert!(next.fencing_token > holder.fencing_token);
}
