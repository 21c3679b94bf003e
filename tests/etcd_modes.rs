//! The etcd store's semaphores, read-write locks and elections, driven through the
//! `LockStore` trait over real etcd (two stores over one etcd stand for two servers).
#![cfg(feature = "etcd")]

mod support;

use etcd_client::GetOptions;
use leasehold::server::store::etcd::EtcdStore;
use leasehold::server::store::{
    AcquireOutcome, AcquireSpec, Ended, Grant, Id, LockStore, Mode, Observation, Proclaimed,
    Release, Renewal, StoreError,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::etcd::{EtcdCluster, project, store};
use support::{eventually, within};
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(30);

/// Records the tasks of a test share.
type Shared<T> = Arc<Mutex<Vec<T>>>;

/// An acquire of `name` in `mode` that waits as long as it takes, in polls of 5 s.
fn spec(name: &str, mode: Mode) -> AcquireSpec {
    AcquireSpec {
        project: project(),
        name: name.into(),
        lease: Duration::from_secs(10),
        wait: None,
        poll: Duration::from_secs(5),
        request_id: Id::random(),
        first: false,
        label: None,
        quota: Default::default(),
        max_hold: None,
        lock_delay: None,
        mode,
        value: None,
        client: None,
    }
}

fn try_once(name: &str, mode: Mode) -> AcquireSpec {
    AcquireSpec {
        wait: Some(Duration::ZERO),
        ..spec(name, mode)
    }
}

/// Acquires, re-polling with the same request id until granted (or out of time).
async fn acquire(store: &EtcdStore, spec: AcquireSpec) -> AcquireOutcome {
    loop {
        match store.acquire(spec.clone()).await.expect("acquire") {
            AcquireOutcome::StillWaiting { .. } => continue,
            other => return other,
        }
    }
}

async fn granted(store: &EtcdStore, spec: AcquireSpec) -> Grant {
    match within(BOUND, acquire(store, spec)).await {
        AcquireOutcome::Granted(grant) => grant,
        other => panic!("not granted: {other:?}"),
    }
}

async fn refused(store: &EtcdStore, spec: AcquireSpec) -> String {
    match store.acquire(spec).await {
        Err(StoreError::Conflict(message)) => message,
        other => panic!("not refused: {other:?}"),
    }
}

/// An acquire waiting in the background; its grant arrives on the handle.
fn waiter(store: &Arc<EtcdStore>, spec: AcquireSpec) -> tokio::task::JoinHandle<Grant> {
    let store = store.clone();
    tokio::spawn(async move { granted(&store, spec).await })
}

async fn release(store: &EtcdStore, name: &str, grant: &Grant) {
    let released = store.release(&project(), name, grant.lease_id).await;
    assert_eq!(released.expect("release"), Release::Released);
}

/// (holders' tokens, mode, waiters) as inspection shows them.
async fn shown(store: &EtcdStore, name: &str) -> (Vec<u64>, Mode, u64) {
    match store.inspect(&project(), name).await.expect("inspect") {
        Some(view) => (
            view.holders.iter().map(|h| h.fencing_token).collect(),
            view.mode,
            view.waiters,
        ),
        None => (Vec::new(), Mode::Exclusive, 0),
    }
}

/// Waits until inspection shows `waiters` waiters (so that acquires queue in a known order).
async fn until_waiters(store: &EtcdStore, name: &str, waiters: u64) {
    eventually(BOUND, &format!("{waiters} waiters on {name}"), || async {
        shown(store, name).await.2 == waiters
    })
    .await;
}

/// Not granted within a while (it keeps waiting).
async fn still_waiting(handle: &tokio::task::JoinHandle<Grant>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.is_finished(), "granted while it should wait");
}

/// Keys under `prefix` in etcd, by anyone.
async fn keys_under(etcd: &EtcdCluster, prefix: &str) -> i64 {
    let mut client = etcd.client().await;
    let options = GetOptions::new().with_prefix().with_count_only();
    client.get(prefix, Some(options)).await.unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_never_has_more_than_n_holders_under_contention() {
    const PERMITS: u32 = 3;
    let etcd = EtcdCluster::start(1).await;
    let stores = [store(&etcd).await, store(&etcd).await];
    let name = "pool";
    // Each client records its hold: from its grant's answer to its release's call. Those lie
    // inside the store's own holds, so at no instant may more than PERMITS of them overlap.
    let holds: Shared<(Instant, Instant, u64)> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // An independent look meanwhile: inspection never shows more than PERMITS holders.
    let inspector = {
        let (store, done) = (stores[0].clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let (holders, mode, _) = shown(&store, name).await;
                assert!(holders.len() <= PERMITS as usize, "inspection: {holders:?}");
                if !holders.is_empty() {
                    assert_eq!(mode, Mode::Permit(PERMITS));
                }
                most = most.max(holders.len());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let mut clients = Vec::new();
    for i in 0..10 {
        let (store, holds) = (stores[i % 2].clone(), holds.clone());
        clients.push(tokio::spawn(async move {
            for round in 0..4 {
                let grant = granted(&store, spec(name, Mode::Permit(PERMITS))).await;
                let start = Instant::now();
                let ms = 10 + fastrand::u64(0..40) + (i as u64 + round) % 3 * 10;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let end = Instant::now();
                release(&store, name, &grant).await;
                holds
                    .lock()
                    .unwrap()
                    .push((start, end, grant.fencing_token));
            }
        }));
    }
    for client in clients {
        within(Duration::from_secs(120), client).await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let most_seen = inspector.await.unwrap();

    let holds = holds.lock().unwrap().clone();
    assert_eq!(holds.len(), 40);
    let mut edges: Vec<(Instant, i32)> = holds
        .iter()
        .flat_map(|(start, end, _)| [(*start, 1), (*end, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    assert!(most <= PERMITS as i32, "{most} holders at once");
    assert!(
        most == PERMITS as i32 || most_seen == PERMITS as usize,
        "contention never filled the semaphore"
    );
    let mut tokens: Vec<u64> = holds.iter().map(|(_, _, t)| *t).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 40, "fencing tokens are unique");
    assert_eq!(shown(&stores[1], name).await, (vec![], Mode::Exclusive, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_a_writer_never_holds_with_anyone() {
    let etcd = EtcdCluster::start(1).await;
    let stores = [store(&etcd).await, store(&etcd).await];
    let name = "table";
    // (start, end, writer?, token), as the clients saw their holds.
    let holds: Shared<(Instant, Instant, bool, u64)> = Arc::default();
    let mut clients = Vec::new();
    for i in 0..8 {
        let (store, holds) = (stores[i % 2].clone(), holds.clone());
        clients.push(tokio::spawn(async move {
            for round in 0..4 {
                let writer = (i + round) % 3 == 0;
                let mode = if writer {
                    Mode::Exclusive
                } else {
                    Mode::Shared
                };
                let grant = granted(&store, spec(name, mode)).await;
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(0..30))).await;
                let end = Instant::now();
                release(&store, name, &grant).await;
                holds
                    .lock()
                    .unwrap()
                    .push((start, end, writer, grant.fencing_token));
            }
        }));
    }
    for client in clients {
        within(Duration::from_secs(120), client).await.unwrap();
    }
    let holds = holds.lock().unwrap().clone();
    assert_eq!(holds.len(), 32);
    let mut readers_together = false;
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            let overlap = a.0 < b.1 && b.0 < a.1;
            assert!(
                !(overlap && (a.2 || b.2)),
                "a writer held with another: {a:?} {b:?}"
            );
            readers_together |= overlap;
        }
    }
    assert!(
        readers_together,
        "readers never shared: the test proves little"
    );
}

/// Waiters are served in FIFO order, and a waiter is granted when any entry ahead of it goes,
/// not only the one just ahead.
#[tokio::test]
async fn semaphore_waiters_are_served_in_fifo_order_as_any_permit_frees() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = (store(&etcd).await, store(&etcd).await);
    let name = "slots";
    let permits = Mode::Permit(2);
    let first = granted(&a, try_once(name, permits)).await;
    let second = granted(&b, try_once(name, permits)).await;
    assert!(matches!(
        a.acquire(try_once(name, permits)).await.unwrap(),
        AcquireOutcome::TimedOut { holder: Some(_) }
    ));
    let mut waiting = Vec::new();
    for i in 0..4 {
        waiting.push(waiter(
            if i % 2 == 0 { &a } else { &b },
            spec(name, permits),
        ));
        until_waiters(&a, name, i + 1).await;
    }
    assert_eq!(
        shown(&b, name).await,
        (vec![first.fencing_token, second.fencing_token], permits, 4)
    );
    let mut grants = Vec::new();
    // The second holder goes (not the first in line): the first waiter gets its permit.
    release(&b, name, &second).await;
    let w0 = within(BOUND, &mut waiting[0]).await.unwrap();
    still_waiting(&waiting[1]).await;
    grants.push(w0);
    release(&a, name, &first).await;
    grants.push(within(BOUND, &mut waiting[1]).await.unwrap());
    still_waiting(&waiting[2]).await;
    release(&a, name, &grants[1]).await;
    grants.push(within(BOUND, &mut waiting[2]).await.unwrap());
    release(&b, name, &grants[0]).await;
    grants.push(within(BOUND, &mut waiting[3]).await.unwrap());
    let tokens: Vec<u64> = grants.iter().map(|g| g.fencing_token).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]) && tokens[0] > second.fencing_token,
        "grants in queue order, tokens increasing: {tokens:?}"
    );
    for grant in &grants[2..] {
        release(&a, name, grant).await;
    }
}

#[tokio::test]
async fn a_conflicting_acquire_is_refused_naming_the_count_and_leaves_nothing() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let sem = granted(&store, spec("sem", Mode::Permit(3))).await;

    let message = refused(&store, spec("sem", Mode::Permit(5))).await;
    assert!(
        message.contains("3 permits") && message.contains("asked for 5"),
        "{message}"
    );
    let message = refused(&store, try_once("sem", Mode::Permit(5))).await;
    assert!(message.contains("3 permits"), "{message}");
    for mode in [Mode::Exclusive, Mode::Shared] {
        let message = refused(&store, spec("sem", mode)).await;
        assert!(message.contains("semaphore with 3 permits"), "{message}");
        let message = refused(&store, try_once("sem", mode)).await;
        assert!(message.contains("semaphore with 3 permits"), "{message}");
    }
    let lock = granted(&store, spec("lock", Mode::Shared)).await;
    let message = refused(&store, spec("lock", Mode::Permit(2))).await;
    assert!(message.contains("read-write"), "{message}");
    let message = refused(&store, try_once("lock", Mode::Permit(2))).await;
    assert!(message.contains("read-write"), "{message}");

    // Nothing of the refused acquires is left: one queue key and one request key per lock.
    assert_eq!(keys_under(&etcd, "/leasehold/p/").await, 2);
    assert_eq!(keys_under(&etcd, "/leasehold/r/").await, 2);
    assert_eq!(
        shown(&store, "sem").await,
        (vec![sem.fencing_token], Mode::Permit(3), 0)
    );
    // A refused request id may try again later, when it fits.
    let later = spec("lock", Mode::Permit(2));
    refused(&store, later.clone()).await;
    release(&store, "lock", &lock).await;
    granted(&store, later).await;
    release(&store, "sem", &sem).await;
    granted(&store, spec("sem", Mode::Exclusive)).await;
}

#[tokio::test]
async fn readers_share_writers_hold_alone_and_readers_queue_behind_a_waiting_writer() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = (store(&etcd).await, store(&etcd).await);
    let name = "rw";
    let r1 = granted(&a, try_once(name, Mode::Shared)).await;
    let r2 = granted(&b, try_once(name, Mode::Shared)).await;
    assert_eq!(
        shown(&a, name).await,
        (vec![r1.fencing_token, r2.fencing_token], Mode::Shared, 0)
    );
    let writer = waiter(&a, spec(name, Mode::Exclusive));
    until_waiters(&a, name, 1).await;
    // A reader behind a waiting writer waits, even though readers hold.
    assert!(matches!(
        b.acquire(try_once(name, Mode::Shared)).await.unwrap(),
        AcquireOutcome::TimedOut { holder: Some(_) }
    ));
    let r3 = waiter(&b, spec(name, Mode::Shared));
    until_waiters(&a, name, 2).await;
    let r4 = waiter(&a, spec(name, Mode::Shared));
    until_waiters(&a, name, 3).await;
    // The census counts holders by the rule: two readers hold, three wait.
    eventually(BOUND, "the census", || async {
        let stats = a.stats();
        (stats.held, stats.waiters) == (1, 3)
    })
    .await;
    let page = a
        .list(
            &project(),
            leasehold::server::store::ListSpec {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.locks.len(), 1);
    assert_eq!(
        page.locks[0].1.holders.len(),
        2,
        "a listing shows every holder"
    );

    release(&a, name, &r1).await;
    still_waiting(&writer).await;
    release(&b, name, &r2).await;
    let w = within(BOUND, writer).await.unwrap();
    still_waiting(&r3).await;
    assert_eq!(
        shown(&b, name).await,
        (vec![w.fencing_token], Mode::Exclusive, 2)
    );
    // The writer goes: both readers behind it are admitted together.
    release(&b, name, &w).await;
    let (g3, g4) = (
        within(BOUND, r3).await.unwrap(),
        within(BOUND, r4).await.unwrap(),
    );
    assert_eq!(
        shown(&a, name).await,
        (vec![g3.fencing_token, g4.fencing_token], Mode::Shared, 0)
    );
    let tokens = [r1, r2, w, g3, g4].map(|g| g.fencing_token);
    assert!(tokens.windows(2).all(|t| t[0] < t[1]), "{tokens:?}");
    // And a second writer waits for both.
    let writer = waiter(&b, spec(name, Mode::Exclusive));
    until_waiters(&a, name, 1).await;
    release(&a, name, &g4).await;
    still_waiting(&writer).await;
    release(&a, name, &g3).await;
    let w2 = within(BOUND, writer).await.unwrap();
    assert!(w2.fencing_token > g4.fencing_token);
}

#[tokio::test]
async fn a_revocation_ends_every_holder() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    assert_eq!(
        store.revoke(&project(), "rw").await.unwrap(),
        Vec::<u64>::new()
    );
    let readers = [
        granted(&store, spec("rw", Mode::Shared)).await,
        granted(&store, spec("rw", Mode::Shared)).await,
        granted(&store, spec("rw", Mode::Shared)).await,
    ];
    let writer = waiter(&store, spec("rw", Mode::Exclusive));
    until_waiters(&store, "rw", 1).await;
    let revoked = store.revoke(&project(), "rw").await.unwrap();
    assert_eq!(revoked, readers.map(|r| r.fencing_token).to_vec());
    let w = within(BOUND, writer).await.unwrap();
    let renewals = store
        .renew(
            &project(),
            readers
                .iter()
                .map(|r| ("rw".to_owned(), r.lease_id))
                .chain([("rw".to_owned(), w.lease_id)])
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(&renewals[..3], &[Renewal::Gone(Some(Ended::Revoked)); 3]);
    assert!(matches!(renewals[3], Renewal::Renewed(_)));
    assert_eq!(
        store.revoke(&project(), "rw").await.unwrap(),
        vec![w.fencing_token]
    );

    let permits = [
        granted(&store, spec("sem", Mode::Permit(2))).await,
        granted(&store, spec("sem", Mode::Permit(2))).await,
    ];
    let third = waiter(&store, spec("sem", Mode::Permit(2)));
    until_waiters(&store, "sem", 1).await;
    let revoked = store.revoke(&project(), "sem").await.unwrap();
    assert_eq!(revoked, permits.map(|p| p.fencing_token).to_vec());
    let t = within(BOUND, third).await.unwrap();
    assert_eq!(shown(&store, "sem").await.0, vec![t.fencing_token]);
}

#[tokio::test]
async fn only_the_exclusive_holder_proclaims() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let p = project();
    let leader = granted(
        &store,
        AcquireSpec {
            value: Some("host-a".into()),
            ..spec("election", Mode::Exclusive)
        },
    )
    .await;
    let holder = |store: &Arc<EtcdStore>| {
        let store = store.clone();
        async move {
            let view = store
                .inspect(&project(), "election")
                .await
                .unwrap()
                .unwrap();
            (view.holders[0].fencing_token, view.holders[0].value.clone())
        }
    };
    assert_eq!(
        holder(&store).await,
        (leader.fencing_token, Some("host-a".into()))
    );
    let done = store.proclaim(&p, "election", leader.lease_id, "host-a:8080".into());
    assert_eq!(done.await.unwrap(), Proclaimed::Done);
    // Same lease, same token, new value; the lease still renews.
    assert_eq!(
        holder(&store).await,
        (leader.fencing_token, Some("host-a:8080".into()))
    );
    let renewed = store
        .renew(&p, vec![("election".into(), leader.lease_id)])
        .await;
    assert!(matches!(renewed.unwrap()[0], Renewal::Renewed(_)));
    let now = store.observe(&p, "election", None, Duration::ZERO).await;
    assert_eq!(
        now.unwrap()[0].leader.as_ref().unwrap().value,
        "host-a:8080"
    );

    // Not held: gone (with the reason when the lease was revoked).
    let other = store
        .proclaim(&p, "election", Id::random(), "x".into())
        .await;
    assert_eq!(other.unwrap(), Proclaimed::Gone(None));
    store.revoke(&p, "election").await.unwrap();
    let revoked = store.proclaim(&p, "election", leader.lease_id, "x".into());
    assert_eq!(
        revoked.await.unwrap(),
        Proclaimed::Gone(Some(Ended::Revoked))
    );
    let again = granted(&store, spec("election", Mode::Exclusive)).await;
    release(&store, "election", &again).await;
    let released = store.proclaim(&p, "election", again.lease_id, "x".into());
    assert_eq!(released.await.unwrap(), Proclaimed::Gone(None));

    // Readers and permit holders hold, but not alone: refused.
    let reader = granted(&store, spec("rw", Mode::Shared)).await;
    match store.proclaim(&p, "rw", reader.lease_id, "x".into()).await {
        Err(StoreError::Conflict(message)) => assert!(message.contains("shared"), "{message}"),
        other => panic!("{other:?}"),
    }
    let permit = granted(&store, spec("sem", Mode::Permit(1))).await;
    match store.proclaim(&p, "sem", permit.lease_id, "x".into()).await {
        Err(StoreError::Conflict(message)) => assert!(message.contains("permit"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// (token, value) of each observed state; `None` while nobody leads.
fn states(observations: &[Observation]) -> Vec<Option<(u64, String)>> {
    observations
        .iter()
        .map(|o| {
            o.leader
                .as_ref()
                .map(|l| (l.fencing_token, l.value.clone()))
        })
        .collect()
}

/// Every state after `after`, observed call after call until `until` states arrived.
async fn observe_from(store: &EtcdStore, after: u64, until: usize) -> Vec<Observation> {
    let mut seen: Vec<Observation> = Vec::new();
    let mut last = after;
    within(BOUND, async {
        while seen.len() < until {
            let batch = store
                .observe(&project(), "election", Some(last), Duration::from_secs(2))
                .await
                .unwrap();
            for o in &batch {
                assert!(o.revision > last, "in order: {} after {last}", o.revision);
                last = o.revision;
            }
            seen.extend(batch);
        }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_every_leadership_state_in_order() {
    let etcd = EtcdCluster::start(1).await;
    let (store, other) = (store(&etcd).await, store(&etcd).await);
    let p = project();
    let start = store.observe(&p, "election", None, Duration::ZERO).await;
    let start = start.unwrap();
    assert_eq!((start.len(), &start[0].leader), (1, &None));
    let r0 = start[0].revision;
    // A live observer through the other store, from the start.
    let live = {
        let other = other.clone();
        tokio::spawn(async move { observe_from(&other, r0, 7).await })
    };
    let campaign = |value: &str| AcquireSpec {
        value: Some(value.into()),
        ..spec("election", Mode::Exclusive)
    };
    let a = granted(&store, campaign("a")).await;
    let b = waiter(&store, campaign("b"));
    until_waiters(&store, "election", 1).await;
    assert_eq!(
        store
            .proclaim(&p, "election", a.lease_id, "a2".into())
            .await
            .unwrap(),
        Proclaimed::Done
    );
    // A readers' turn: nobody leads while readers hold.
    let reader = waiter(&store, spec("election", Mode::Shared));
    until_waiters(&store, "election", 2).await;
    release(&store, "election", &a).await;
    // B leads only briefly: released at once.
    let b = within(BOUND, b).await.unwrap();
    release(&store, "election", &b).await;
    let reader = within(BOUND, reader).await.unwrap();
    release(&store, "election", &reader).await;
    let c = granted(&store, campaign("")).await;
    release(&store, "election", &c).await;
    let d = granted(&store, campaign("d")).await;

    let expected = vec![
        Some((a.fencing_token, "a".to_owned())),
        Some((a.fencing_token, "a2".to_owned())),
        Some((b.fencing_token, "b".to_owned())),
        None,
        Some((c.fencing_token, String::new())),
        None,
        Some((d.fencing_token, "d".to_owned())),
    ];
    // After the fact, from the start: the history is replayed.
    let replayed = observe_from(&store, r0, expected.len()).await;
    assert_eq!(states(&replayed), expected);
    // Live, through the other store: the same states, at the same revisions.
    let watched = within(BOUND, live).await.unwrap();
    assert_eq!(watched, replayed);
    // Nothing new: an observer waits, then hears nothing.
    let last = replayed.last().unwrap().revision;
    let quiet = store
        .observe(&p, "election", Some(last), Duration::from_millis(300))
        .await;
    assert_eq!(quiet.unwrap(), vec![]);
    // The current state, as of the read's revision.
    let now = store
        .observe(&p, "election", None, Duration::ZERO)
        .await
        .unwrap();
    assert!(now[0].revision >= last);
    assert_eq!(states(&now), vec![Some((d.fencing_token, "d".to_owned()))]);

    // A revision etcd has not reached: nothing changed since, so nothing to tell.
    let ahead = now[0].revision + 1_000_000;
    let future = store
        .observe(&p, "election", Some(ahead), Duration::from_millis(200))
        .await;
    assert_eq!(future.unwrap(), vec![]);
    // After a compaction, an old revision answers the current state alone.
    let mut client = etcd.client().await;
    let head = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(head, None).await.unwrap();
    let compacted = store
        .observe(&p, "election", Some(r0), BOUND)
        .await
        .unwrap();
    assert_eq!(
        states(&compacted),
        vec![Some((d.fencing_token, "d".to_owned()))]
    );
}

/// A leader whose lease ends without a release holds its successor back for its lock-delay:
/// observers see nobody lead meanwhile, then the successor, at the revision the delay ended.
#[tokio::test]
async fn observers_see_a_successor_lead_when_a_lock_delay_ends() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let p = project();
    let r0 = store
        .observe(&p, "election", None, Duration::ZERO)
        .await
        .unwrap()[0]
        .revision;
    let a = granted(
        &store,
        AcquireSpec {
            lock_delay: Some(Duration::from_secs(1)),
            ..spec("election", Mode::Exclusive)
        },
    )
    .await;
    let b = waiter(&store, spec("election", Mode::Exclusive));
    until_waiters(&store, "election", 1).await;
    let revoked_at = Instant::now();
    store.revoke(&p, "election").await.unwrap();
    let live = observe_from(&store, r0, 3).await;
    let b = within(BOUND, b).await.unwrap();
    assert!(
        revoked_at.elapsed() >= Duration::from_millis(900),
        "the delay held B back"
    );
    let expected = vec![
        Some((a.fencing_token, String::new())),
        None,
        Some((b.fencing_token, String::new())),
    ];
    assert_eq!(states(&live), expected);
    assert!(live[1].revision < live[2].revision);
    // Replayed later, the same states at the same revisions.
    let replayed = observe_from(&store, r0, 3).await;
    assert_eq!(replayed, live);
}

/// Lock-delays with modes: an ended holder keeps its place and mode for its delay. A
/// semaphore's permit stays taken; readers still join an ended reader, a writer does not.
#[tokio::test]
async fn a_lock_delay_keeps_the_ended_holders_place() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let p = project();
    let delayed = |name: &str, mode| AcquireSpec {
        lock_delay: Some(Duration::from_secs(2)),
        ..spec(name, mode)
    };
    let _first = granted(&store, delayed("sem", Mode::Permit(2))).await;
    let second = granted(&store, spec("sem", Mode::Permit(2))).await;
    release(&store, "sem", &second).await;
    store.revoke(&p, "sem").await.unwrap();
    // One permit is the ended holder's for its delay; the other is free.
    let now = granted(&store, try_once("sem", Mode::Permit(2))).await;
    assert!(matches!(
        store
            .acquire(try_once("sem", Mode::Permit(2)))
            .await
            .unwrap(),
        AcquireOutcome::TimedOut { .. }
    ));
    let waiting = waiter(&store, spec("sem", Mode::Permit(2)));
    until_waiters(&store, "sem", 1).await;
    let revoked_at = Instant::now();
    let late = within(BOUND, waiting).await.unwrap();
    assert!(
        revoked_at.elapsed() >= Duration::from_millis(1000),
        "granted before the delay ended"
    );
    assert!(late.fencing_token > now.fencing_token);

    let _reader = granted(&store, delayed("rw", Mode::Shared)).await;
    store.revoke(&p, "rw").await.unwrap();
    granted(&store, try_once("rw", Mode::Shared)).await;
    assert!(matches!(
        store
            .acquire(try_once("rw", Mode::Exclusive))
            .await
            .unwrap(),
        AcquireOutcome::TimedOut { .. }
    ));
    // A reader holds and a writer waits: the live reader is what inspection shows keeping
    // it out; the ended reader's delay shows only while nobody holds (protocol §3.5).
    let writer = waiter(&store, spec("rw", Mode::Exclusive));
    until_waiters(&store, "rw", 1).await;
    let view = store.inspect(&p, "rw").await.unwrap().unwrap();
    assert!(view.held_back_until.is_none());
    assert_eq!(view.holders.len(), 1);
    drop(writer);
    assert_eq!(
        keys_under(&etcd, "/leasehold/x/").await,
        1,
        "the ended reader's delay key (the permit holder's has run out)"
    );
}

/// Past the first read's window: a reader behind more than 64 readers, a semaphore of more
/// permits than a waiter watches keys for (woken by any departure from the lock instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_of_readers_and_large_semaphores_are_read_further() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    for _ in 0..70 {
        granted(&store, try_once("readers", Mode::Shared)).await;
    }
    assert_eq!(shown(&store, "readers").await.0.len(), 70);
    let writer = waiter(&store, spec("readers", Mode::Exclusive));
    until_waiters(&store, "readers", 1).await;
    for _ in 0..70 {
        assert!(matches!(
            store
                .acquire(try_once("readers", Mode::Shared))
                .await
                .unwrap(),
            AcquireOutcome::TimedOut { .. }
        ));
    }
    drop(writer);

    let big = Mode::Permit(300);
    let mut holders = Vec::new();
    for _ in 0..300 {
        holders.push(granted(&store, try_once("big", big)).await);
    }
    assert!(matches!(
        store.acquire(try_once("big", big)).await.unwrap(),
        AcquireOutcome::TimedOut { .. }
    ));
    let waiting = waiter(&store, spec("big", big));
    until_waiters(&store, "big", 1).await;
    still_waiting(&waiting).await;
    // A holder in the middle goes: the waiter (which watches the whole lock) is granted.
    release(&store, "big", &holders[150]).await;
    let grant = within(BOUND, waiting).await.unwrap();
    assert!(grant.fencing_token > holders[299].fencing_token);
    assert_eq!(shown(&store, "big").await.0.len(), 300);
}

/// A holder's max_hold ends it on time with nobody renewing: a writer waiting behind readers,
/// and a semaphore's first waiter, end the holders whose max_hold is over.
#[tokio::test]
async fn waiters_end_holders_at_their_max_hold() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let p = project();
    let held_at_most = |name: &str, mode| AcquireSpec {
        max_hold: Some(Duration::from_secs(1)),
        ..spec(name, mode)
    };
    let started = Instant::now();
    let readers = [
        granted(&store, spec("rw", Mode::Shared)).await,
        granted(&store, held_at_most("rw", Mode::Shared)).await,
    ];
    let writer = waiter(&store, spec("rw", Mode::Exclusive));
    until_waiters(&store, "rw", 1).await;
    release(&store, "rw", &readers[0]).await;
    // The lease is 10 s: only its max_hold can free the lock this soon.
    within(Duration::from_secs(5), writer).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    let renewed = store
        .renew(&p, vec![("rw".into(), readers[1].lease_id)])
        .await;
    assert_eq!(renewed.unwrap(), vec![Renewal::Gone(Some(Ended::MaxHold))]);

    let started = Instant::now();
    let permits = [
        granted(&store, held_at_most("sem", Mode::Permit(2))).await,
        granted(&store, spec("sem", Mode::Permit(2))).await,
    ];
    let third = waiter(&store, spec("sem", Mode::Permit(2)));
    until_waiters(&store, "sem", 1).await;
    within(Duration::from_secs(5), third).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    let renewed = store
        .renew(
            &p,
            permits.iter().map(|g| ("sem".into(), g.lease_id)).collect(),
        )
        .await;
    assert_eq!(renewed.unwrap()[0], Renewal::Gone(Some(Ended::MaxHold)));
}

/// Acquires of different kinds placed at once through two servers: whichever are refused,
/// those granted share one kind, and refused ones leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_of_different_kinds_racing_through_two_servers() {
    let etcd = EtcdCluster::start(1).await;
    let stores = [store(&etcd).await, store(&etcd).await];
    let kind = |mode: Mode| match mode {
        Mode::Permit(n) => n,
        Mode::Exclusive | Mode::Shared => 0,
    };
    let mut refusals = 0;
    for round in 0..8 {
        let name = format!("race{round}");
        let modes = [
            Mode::Permit(2),
            Mode::Exclusive,
            Mode::Permit(3),
            Mode::Shared,
            Mode::Permit(2),
            Mode::Shared,
        ];
        let mut racers = Vec::new();
        for (i, mode) in modes.into_iter().enumerate() {
            let store = stores[i % 2].clone();
            let spec = AcquireSpec {
                wait: Some(Duration::from_millis(500)),
                ..spec(&name, mode)
            };
            racers.push(tokio::spawn(
                async move { (mode, store.acquire(spec).await) },
            ));
        }
        let mut granted_kinds = Vec::new();
        let mut grants = Vec::new();
        for racer in racers {
            match within(BOUND, racer).await.unwrap() {
                (mode, Ok(AcquireOutcome::Granted(grant))) => {
                    granted_kinds.push(kind(mode));
                    grants.push(grant);
                }
                (_, Ok(AcquireOutcome::TimedOut { .. })) => {}
                (_, Err(StoreError::Conflict(_))) => refusals += 1,
                (mode, other) => panic!("{mode:?}: {other:?}"),
            }
        }
        granted_kinds.dedup();
        assert_eq!(
            granted_kinds.len(),
            1,
            "round {round}: kinds {granted_kinds:?}"
        );
        // Only the holders are left in line, and their request keys.
        eventually(BOUND, "refused and timed-out acquires gone", || async {
            let left = grants.len() as i64;
            keys_under(&etcd, "/leasehold/p/").await == left
                && keys_under(&etcd, "/leasehold/r/").await == left
        })
        .await;
        for grant in &grants {
            release(&stores[0], &name, grant).await;
        }
    }
    assert!(
        refusals > 0,
        "no race produced a conflict: the test proves little"
    );
}
