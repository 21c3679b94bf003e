use super::*;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

const MS: u64 = 1000;
const GRACE: u64 = 3_000 * MS;

/// A poll listening for its grant.
#[derive(Debug)]
struct Ear {
    got: Rc<Cell<Option<Grant>>>,
    next: Rc<Cell<Option<Reserved>>>,
    closed: bool,
}

impl Listener for Ear {
    fn deliver(self, news: News) -> bool {
        if self.closed {
            return false;
        }
        match news {
            News::Granted(grant) => self.got.set(Some(grant)),
            News::Next(next) => self.next.set(Some(next)),
        }
        true
    }

    fn is_closed(&self) -> bool {
        self.closed
    }
}

/// What the lock told the store.
#[derive(Debug, Default)]
struct Log {
    last_token: u64,
    no_tokens: bool,
    last_lease: u128,
    ended_requests: Vec<u128>,
    ended_leases: Vec<(u64, Ended)>,
    events: Vec<String>,
    /// Every change of leadership: the leader's token and value, or `None`.
    leaders: Vec<Option<(u64, Option<String>)>>,
    granted: Vec<u64>,
}

impl Effects for Log {
    fn token(&mut self) -> Option<u64> {
        if self.no_tokens {
            return None;
        }
        self.last_token += 1;
        Some(self.last_token)
    }

    fn lease_id(&mut self) -> Id {
        self.last_lease += 1;
        Id((1_000_000 + self.last_lease).to_be_bytes())
    }

    fn request_ended(&mut self, request_id: Id) {
        self.ended_requests.push(num(request_id));
    }

    fn lease_ended(&mut self, holder: &Holder, why: Ended) {
        self.ended_leases.push((holder.token(), why));
    }

    fn happened(&mut self, what: Happened<'_>) {
        if let Some(leader) = what.leadership() {
            self.leaders
                .push(leader.map(|h| (h.token(), h.value().map(str::to_owned))));
        }
        if let Happened::Granted(h) = what {
            self.granted.push(h.token());
        }
        let event = match what {
            Happened::Granted(h) => format!("granted {}", num(h.request_id())),
            Happened::Deadline(h) => format!("deadline {}", num(h.request_id())),
            Happened::Released(h) => format!("released {}", num(h.request_id())),
            Happened::CancelledGrant(h) => format!("cancelled grant {}", num(h.request_id())),
            Happened::CancelledWaiter(id) => format!("cancelled waiter {}", num(id)),
            Happened::Revoked(h) => format!("revoked {}", num(h.request_id())),
            Happened::Expired(h) => format!("expired {}", num(h.request_id())),
            Happened::WaiterLeft {
                request_id,
                timed_out,
            } => format!("left {} {timed_out}", num(request_id)),
            Happened::Proclaimed(h) => format!("proclaimed {}", num(h.request_id())),
        };
        self.events.push(event);
    }
}

fn id(n: u128) -> Id {
    Id(n.to_be_bytes())
}

fn num(id: Id) -> u128 {
    u128::from_be_bytes(id.0)
}

/// One lock, its clock, and the grants its waiters received.
struct Lab {
    lock: LockState<Ear>,
    log: Log,
    now: u64,
    ears: HashMap<u128, Rc<Cell<Option<Grant>>>>,
    nexts: HashMap<u128, Rc<Cell<Option<Reserved>>>>,
}

/// How a test's acquire differs from the default (10 s lease, waits, listening).
#[derive(Clone, Copy)]
struct Opts {
    lease_ms: u32,
    lock_delay: Option<Duration>,
    max_hold: Option<Duration>,
    no_wait: bool,
    deaf: bool,
    value: Option<&'static str>,
    /// The asking client's tag (0: none).
    client: u64,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            lease_ms: 10_000,
            lock_delay: None,
            max_hold: None,
            no_wait: false,
            deaf: false,
            value: None,
            client: 0,
        }
    }
}

impl Lab {
    fn new() -> Lab {
        Lab {
            lock: LockState::default(),
            log: Log::default(),
            now: 1_000 * MS,
            ears: HashMap::new(),
            nexts: HashMap::new(),
        }
    }

    fn tick(&self) -> Tick {
        Tick {
            now: self.now,
            grace: GRACE,
            held_back_until: 0,
        }
    }

    fn ask(&mut self, n: u128, mode: Mode) -> Result<Begun, StoreError> {
        self.ask_with(n, mode, Opts::default())
    }

    fn ask_with(&mut self, n: u128, mode: Mode, opts: Opts) -> Result<Begun, StoreError> {
        let got = Rc::new(Cell::new(None));
        let next = Rc::new(Cell::new(None));
        let ask = Ask {
            name: "lk",
            request_id: id(n),
            lease_ms: opts.lease_ms,
            limits: LeaseLimits::new(opts.max_hold, opts.lock_delay),
            mode,
            label: None,
            value: opts.value,
            client: opts.client,
            listener: Ear {
                got: got.clone(),
                next: next.clone(),
                closed: opts.deaf,
            },
            no_wait: opts.no_wait,
            max_waiters: 100,
            held_back_until: None,
        };
        let tick = self.tick();
        let begun = self.lock.acquire(ask, tick, &mut self.log);
        if let Ok(Begun::Granted(grant)) = begun {
            got.set(Some(grant));
        }
        self.ears.insert(n, got);
        self.nexts.insert(n, next);
        begun
    }

    /// The request ids of the holders, oldest grant first.
    fn holders(&self) -> Vec<u128> {
        self.lock
            .holders()
            .iter()
            .map(|h| num(h.request_id()))
            .collect()
    }

    fn grant(&self, n: u128) -> Option<Grant> {
        self.ears.get(&n).and_then(|got| got.get())
    }

    /// The reservation request `n`'s polls were told of.
    fn next(&self, n: u128) -> Option<Reserved> {
        self.nexts.get(&n).and_then(|next| next.get())
    }

    fn lease(&self, n: u128) -> Id {
        self.grant(n).expect("granted").lease_id
    }

    fn release(&mut self, n: u128) -> bool {
        let (lease, tick) = (self.lease(n), self.tick());
        self.lock.release(lease, tick, &mut self.log)
    }

    fn advance(&mut self, us: u64) {
        self.now += us;
        let tick = self.tick();
        self.lock.settle(tick, &mut self.log);
    }

    /// The modes of the ended holders whose lock-delay runs.
    fn delayed(&self) -> Vec<Mode> {
        self.lock
            .queue
            .as_ref()
            .map_or_else(Vec::new, |q| q.delays.iter().map(|d| d.mode).collect())
    }

    fn check_invariants(&self) {
        let holders = self.lock.holders();
        // The live holders and the ended ones in their delay: one mode, within its count.
        let modes: Vec<Mode> = holders
            .iter()
            .map(Holder::mode)
            .chain(self.delayed())
            .collect();
        if let Some(&first) = modes.first() {
            assert!(modes.iter().all(|&m| m == first), "one mode: {modes:?}");
            match first {
                Mode::Exclusive => assert_eq!(modes.len(), 1),
                Mode::Shared => {}
                Mode::Permit(n) => assert!(modes.len() <= n as usize),
            }
        }
        let tokens: Vec<u64> = holders.iter().map(Holder::token).collect();
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "oldest grant first");
        assert!(
            holders.iter().all(|h| h.deadline() > self.now),
            "none overdue"
        );
    }
}

#[test]
fn the_line_is_first_in_first_out_across_kinds() {
    let mut lab = Lab::new();
    assert!(matches!(lab.ask(1, Mode::Exclusive), Ok(Begun::Granted(_))));
    for (n, mode) in [
        (2, Mode::Shared),
        (3, Mode::Shared),
        (4, Mode::Exclusive),
        (5, Mode::Shared),
    ] {
        assert_eq!(lab.ask(n, mode).unwrap(), Begun::Waiting);
    }
    assert_eq!(lab.lock.waiters(), 4);
    assert_eq!(lab.lock.mode(), Mode::Exclusive);

    assert!(lab.release(1));
    assert_eq!(lab.holders(), [2, 3], "the readers at the head, together");
    assert!(lab.grant(2).is_some() && lab.grant(3).is_some());
    assert_eq!(lab.lock.mode(), Mode::Shared);
    assert!(lab.release(2));
    assert_eq!(lab.holders(), [3], "the writer waits for every reader");
    assert!(lab.release(3));
    assert_eq!(lab.holders(), [4]);
    assert!(
        lab.grant(5).is_none(),
        "the reader behind the writer waited"
    );
    assert!(lab.release(4));
    assert_eq!(lab.holders(), [5]);
    assert_eq!(lab.lock.waiters(), 0);
    lab.check_invariants();
}

#[test]
fn readers_share_unless_a_writer_waits() {
    let mut lab = Lab::new();
    assert!(matches!(lab.ask(1, Mode::Shared), Ok(Begun::Granted(_))));
    assert!(matches!(lab.ask(2, Mode::Shared), Ok(Begun::Granted(_))));
    assert_eq!(lab.holders(), [1, 2]);
    assert_eq!(lab.ask(3, Mode::Exclusive).unwrap(), Begun::Waiting);
    // Behind a waiting writer a reader waits, even with `wait: 0`: writers never starve.
    assert_eq!(lab.ask(4, Mode::Shared).unwrap(), Begun::Waiting);
    let no_wait = Opts {
        no_wait: true,
        ..Opts::default()
    };
    assert_eq!(
        lab.ask_with(5, Mode::Shared, no_wait).unwrap(),
        Begun::TimedOut
    );
    assert_eq!(lab.holders(), [1, 2]);
    assert_eq!(lab.lock.waiters(), 2);
    assert!(lab.release(1));
    assert!(lab.release(2));
    assert_eq!(lab.holders(), [3]);
    assert!(lab.release(3));
    assert_eq!(lab.holders(), [4]);
    assert!(lab.lock.leader().is_none(), "readers do not lead");
}

#[test]
fn a_semaphore_never_exceeds_its_permits() {
    let mut lab = Lab::new();
    for n in 1..=5 {
        let begun = lab.ask(n, Mode::Permit(3)).unwrap();
        assert_eq!(matches!(begun, Begun::Granted(_)), n <= 3, "{n}: {begun:?}");
    }
    assert_eq!(lab.holders(), [1, 2, 3]);
    assert_eq!(lab.lock.mode(), Mode::Permit(3));
    assert!(lab.lock.leader().is_none(), "permit holders do not lead");

    // Random acquires, releases, cancels, expiries and revokes, some with lock-delays: never
    // more than 3 holders, counting the ended ones in their delay, and never a free permit
    // while someone waits.
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut lab = Lab::new();
        let mut next = 0u128;
        for _ in 0..500 {
            match rng.u8(0..10) {
                0..=3 => {
                    next += 1;
                    let opts = Opts {
                        lease_ms: rng.u32(1..50),
                        lock_delay: (seed % 2 == 1 && rng.bool())
                            .then(|| Duration::from_millis(rng.u64(1..30))),
                        ..Opts::default()
                    };
                    lab.ask_with(next, Mode::Permit(3), opts).unwrap();
                }
                4 | 5 if next > 0 => {
                    let n = rng.u128(1..=next);
                    if lab.holders().contains(&n) {
                        assert!(lab.release(n));
                    }
                }
                6 if next > 0 => {
                    let (n, tick) = (rng.u128(1..=next), lab.tick());
                    lab.lock.withdraw(id(n), tick, &mut lab.log);
                }
                7 => {
                    let tick = lab.tick();
                    let tokens = lab.lock.revoke(tick, &mut lab.log);
                    assert!(tokens.windows(2).all(|w| w[0] < w[1]));
                }
                _ => lab.advance(rng.u64(0..20 * MS)),
            }
            lab.check_invariants();
            let taken = lab.lock.holders().len() + lab.delayed().len();
            assert!(taken <= 3);
            if lab.lock.waiters() > 0 {
                assert_eq!(taken, 3, "a free permit while waiters wait");
            }
        }
    }
}

#[test]
fn conflicting_acquires_are_refused_and_not_queued() {
    let mut lab = Lab::new();
    lab.ask(1, Mode::Permit(2)).unwrap();
    let conflict = |begun: Result<Begun, StoreError>| match begun {
        Err(StoreError::Conflict(message)) => message,
        other => panic!("not a conflict: {other:?}"),
    };
    let message = conflict(lab.ask(2, Mode::Exclusive));
    assert!(message.contains("semaphore with 2 permits"), "{message}");
    let message = conflict(lab.ask(3, Mode::Shared));
    assert!(message.contains("semaphore with 2 permits"), "{message}");
    let message = conflict(lab.ask(4, Mode::Permit(3)));
    assert!(
        message.contains("2 permits") && message.contains("asked for 3"),
        "{message}"
    );
    assert_eq!(lab.lock.waiters(), 0, "nothing was queued");
    assert_eq!(lab.holders(), [1]);
    // A re-poll of a known request is not a new acquire.
    assert!(matches!(lab.ask(1, Mode::Exclusive), Ok(Begun::Granted(_))));

    // Once nobody holds or waits, the name is free for any use.
    assert!(lab.release(1));
    assert!(lab.lock.is_empty());
    lab.ask(5, Mode::Shared).unwrap();
    let message = conflict(lab.ask(6, Mode::Permit(1)));
    assert!(message.contains("read-write"), "{message}");
    assert!(matches!(lab.ask(7, Mode::Exclusive), Ok(Begun::Waiting)));
}

#[test]
fn with_only_waiters_the_first_waiters_mode_is_in_use() {
    let mut lab = Lab::new();
    let delayed = Opts {
        lease_ms: 10,
        lock_delay: Some(Duration::from_millis(100)),
        ..Opts::default()
    };
    lab.ask_with(1, Mode::Exclusive, delayed).unwrap();
    lab.advance(10 * MS);
    assert!(lab.holders().is_empty(), "expired");
    assert_eq!(lab.ask(2, Mode::Permit(4)).unwrap(), Begun::Waiting);
    assert_eq!(
        lab.lock.mode(),
        Mode::Permit(4),
        "shown while it only waits"
    );
    let Err(StoreError::Conflict(message)) = lab.ask(3, Mode::Exclusive) else {
        panic!("not a conflict")
    };
    assert!(message.contains("semaphore with 4 permits"), "{message}");
}

#[test]
fn ending_one_of_several_holders_grants_the_next_waiters() {
    let mut lab = Lab::new();
    let short = Opts {
        lease_ms: 50,
        ..Opts::default()
    };
    lab.ask(1, Mode::Permit(2)).unwrap();
    lab.ask_with(2, Mode::Permit(2), short).unwrap();
    for n in 3..=5 {
        assert_eq!(lab.ask(n, Mode::Permit(2)).unwrap(), Begun::Waiting);
    }
    // A release frees one permit: one waiter.
    assert!(lab.release(1));
    assert_eq!(lab.holders(), [2, 3]);
    // An expiry frees one permit: the next waiter.
    assert_eq!(lab.lock.wake_at(), Some(lab.now + 50 * MS));
    lab.advance(50 * MS);
    assert_eq!(lab.holders(), [3, 4]);
    assert!(
        lab.log.ended_requests.contains(&2),
        "an answered grant's end"
    );
    // A revoke ends every holder, each with its own token; the waiter takes the lock.
    let tokens: Vec<u64> = lab.lock.holders().iter().map(Holder::token).collect();
    let tick = lab.tick();
    assert_eq!(lab.lock.revoke(tick, &mut lab.log), tokens);
    assert_eq!(lab.holders(), [5]);
    let revoked: Vec<u64> = lab
        .log
        .ended_leases
        .iter()
        .filter(|(_, why)| *why == Ended::Revoked)
        .map(|(token, _)| *token)
        .collect();
    assert_eq!(revoked, tokens);
    // A cancel of a grant frees its permit too.
    let tick = lab.tick();
    assert!(lab.lock.withdraw(id(5), tick, &mut lab.log));
    assert!(lab.lock.is_empty());
    let tick = lab.tick();
    assert_eq!(lab.lock.revoke(tick, &mut lab.log), Vec::<u64>::new());

    // Readers: the writer waits until the last reader has gone, however it goes.
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Shared, short).unwrap();
    lab.ask(2, Mode::Shared).unwrap();
    lab.ask(3, Mode::Exclusive).unwrap();
    assert_eq!(lab.lock.wake_at(), Some(lab.now + 50 * MS));
    lab.advance(50 * MS);
    assert_eq!(lab.holders(), [2], "one reader left");
    assert!(lab.release(2));
    assert_eq!(lab.holders(), [3]);
}

#[test]
fn tokens_increase_across_every_grant() {
    let mut lab = Lab::new();
    lab.ask(1, Mode::Shared).unwrap();
    lab.ask(2, Mode::Shared).unwrap();
    lab.ask(3, Mode::Exclusive).unwrap();
    lab.ask(4, Mode::Shared).unwrap();
    lab.ask(5, Mode::Shared).unwrap();
    for n in 1..=4 {
        assert!(lab.release(n));
    }
    let tokens: Vec<u64> = (1..=5)
        .map(|n| lab.grant(n).unwrap().fencing_token)
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(lab.log.granted, tokens);
}

#[test]
fn no_token_no_grant() {
    let mut lab = Lab::new();
    lab.log.no_tokens = true;
    assert!(matches!(
        lab.ask(1, Mode::Exclusive),
        Err(StoreError::Unavailable(_))
    ));
    assert!(lab.lock.is_empty());
    lab.log.no_tokens = false;
    lab.ask(1, Mode::Exclusive).unwrap();
    lab.ask(2, Mode::Exclusive).unwrap();
    lab.log.no_tokens = true;
    assert!(lab.release(1));
    assert_eq!(lab.lock.waiters(), 1, "keeps its place");
    lab.log.no_tokens = false;
    lab.advance(0);
    assert_eq!(lab.holders(), [2]);
}

#[test]
fn proclaims_and_leadership_changes() {
    let mut lab = Lab::new();
    let campaign = Opts {
        value: Some("a"),
        lease_ms: 100,
        ..Opts::default()
    };
    lab.ask_with(1, Mode::Exclusive, campaign).unwrap();
    assert_eq!(lab.lock.leader().map(Holder::value), Some(Some("a")));
    let tick = lab.tick();
    let lease = lab.lease(1);
    assert!(
        lab.lock
            .proclaim("lk", lease, "b".into(), tick, &mut lab.log)
            .unwrap()
    );
    assert_eq!(lab.lock.holders()[0].value(), Some("b"));
    assert!(
        !lab.lock
            .proclaim("lk", id(99), "c".into(), tick, &mut lab.log)
            .unwrap(),
        "not held under this lease"
    );
    lab.ask(2, Mode::Exclusive).unwrap();
    lab.advance(100 * MS);
    assert_eq!(lab.holders(), [2], "the leader's lease ran out");
    assert!(lab.release(2));
    // Shared grants are nobody's leadership, and may not proclaim.
    lab.ask(3, Mode::Shared).unwrap();
    let (tick, lease) = (lab.tick(), lab.lease(3));
    let Err(StoreError::Conflict(message)) =
        lab.lock
            .proclaim("lk", lease, "d".into(), tick, &mut lab.log)
    else {
        panic!("a reader proclaimed")
    };
    assert!(message.contains("only an exclusive holder"), "{message}");
    assert_eq!(lab.lock.holders()[0].value(), None);
    let t = |n: u128| lab.grant(n).unwrap().fencing_token;
    assert_eq!(
        lab.log.leaders,
        [
            Some((t(1), Some("a".to_owned()))),
            Some((t(1), Some("b".to_owned()))),
            None,
            Some((t(2), None)),
            None,
        ]
    );
}

/// A holder with a 100 ms lock-delay and a 10 ms lease.
fn delayed() -> Opts {
    Opts {
        lease_ms: 10,
        lock_delay: Some(Duration::from_millis(100)),
        ..Opts::default()
    }
}

#[test]
fn an_exclusive_holders_delay_holds_back_every_grant() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, delayed()).unwrap();
    lab.ask(2, Mode::Shared).unwrap();
    lab.ask(3, Mode::Shared).unwrap();
    let expiry = lab.now + 10 * MS;
    assert_eq!(lab.lock.wake_at(), Some(expiry));
    lab.advance(10 * MS);
    assert!(lab.holders().is_empty());
    assert_eq!(lab.delayed(), [Mode::Exclusive]);
    assert_eq!(lab.lock.held_back_until(), Some(expiry + 100 * MS));
    assert_eq!(lab.lock.wake_at(), Some(expiry + 100 * MS));
    let no_wait = Opts {
        no_wait: true,
        ..Opts::default()
    };
    assert_eq!(
        lab.ask_with(4, Mode::Shared, no_wait).unwrap(),
        Begun::TimedOut
    );
    lab.advance(100 * MS - 1);
    assert!(lab.holders().is_empty(), "the delay runs");
    lab.check_invariants();
    lab.advance(1);
    assert_eq!(lab.holders(), [2, 3]);
    assert_eq!(lab.lock.held_back_until(), None);
    assert!(lab.delayed().is_empty());
    // A release starts no delay.
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, delayed()).unwrap();
    lab.ask(2, Mode::Exclusive).unwrap();
    assert!(lab.release(1));
    assert_eq!(lab.holders(), [2]);
    // Nor does a cancel of the grant.
    let tick = lab.tick();
    assert!(lab.lock.withdraw(id(2), tick, &mut lab.log));
    assert!(lab.lock.is_empty());
}

#[test]
fn a_readers_delay_lets_readers_join_but_not_a_writer() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Shared, delayed()).unwrap();
    let ended = lab.now + 10 * MS;
    lab.advance(10 * MS);
    assert!(lab.holders().is_empty());
    assert_eq!(lab.delayed(), [Mode::Shared]);
    // The ended reader does not make the name a read-write lock: a semaphore's acquire is
    // not refused, and waits for the delay.
    let no_wait = Opts {
        no_wait: true,
        ..Opts::default()
    };
    assert_eq!(
        lab.ask_with(2, Mode::Permit(2), no_wait).unwrap(),
        Begun::TimedOut
    );
    assert_eq!(
        lab.ask_with(3, Mode::Exclusive, no_wait).unwrap(),
        Begun::TimedOut,
        "no writer during a reader's delay"
    );
    assert!(matches!(lab.ask(4, Mode::Shared), Ok(Begun::Granted(_))));
    assert!(matches!(lab.ask(5, Mode::Shared), Ok(Begun::Granted(_))));
    assert_eq!(lab.holders(), [4, 5], "readers join");
    assert_eq!(lab.lock.held_back_until(), Some(ended + 100 * MS));
    assert_eq!(lab.ask(6, Mode::Exclusive).unwrap(), Begun::Waiting);
    assert_eq!(lab.ask(7, Mode::Shared).unwrap(), Begun::Waiting, "FIFO");
    assert!(lab.release(4));
    assert!(lab.release(5));
    assert!(lab.holders().is_empty(), "the writer waits for the delay");
    assert_eq!(lab.lock.waiters(), 2);
    lab.check_invariants();
    // The delay's end is the lock's next wake; the writer is granted then.
    assert_eq!(lab.lock.wake_at(), Some(ended + 100 * MS));
    lab.now = ended + 100 * MS - 1;
    lab.advance(0);
    assert!(lab.holders().is_empty());
    lab.advance(1);
    assert_eq!(lab.holders(), [6]);
    assert!(lab.grant(6).is_some());
    assert_eq!(lab.lock.held_back_until(), None);
}

#[test]
fn a_semaphores_ended_holder_keeps_its_permit_for_its_delay() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Permit(2), delayed()).unwrap();
    lab.ask(2, Mode::Permit(2)).unwrap();
    assert_eq!(lab.ask(3, Mode::Permit(2)).unwrap(), Begun::Waiting);
    assert_eq!(lab.ask(4, Mode::Permit(2)).unwrap(), Begun::Waiting);
    let ended = lab.now + 10 * MS;
    lab.advance(10 * MS);
    assert_eq!(lab.holders(), [2], "the ended holder's permit stays taken");
    assert_eq!(lab.lock.waiters(), 2);
    assert_eq!(lab.delayed(), [Mode::Permit(2)]);
    assert_eq!(lab.lock.wake_at(), Some(ended + 100 * MS));
    // The other permit keeps working.
    assert!(lab.release(2));
    assert_eq!(lab.holders(), [3]);
    assert_eq!(lab.lock.waiters(), 1);
    lab.check_invariants();
    lab.advance(ended + 100 * MS - 1 - lab.now);
    assert_eq!(lab.holders(), [3]);
    lab.advance(1);
    assert_eq!(
        lab.holders(),
        [3, 4],
        "the permit is free when the delay ends"
    );
    assert_eq!(lab.lock.waiters(), 0);
    assert!(lab.delayed().is_empty());

    // A revoke keeps each revoked holder's permit for its own delay.
    let mut lab = Lab::new();
    let long_delay = Opts {
        lock_delay: Some(Duration::from_millis(100)),
        ..Opts::default()
    };
    lab.ask_with(1, Mode::Permit(3), long_delay).unwrap();
    lab.ask(2, Mode::Permit(3)).unwrap();
    let tick = lab.tick();
    assert_eq!(lab.lock.revoke(tick, &mut lab.log).len(), 2);
    assert_eq!(lab.delayed(), [Mode::Permit(3)]);
    assert!(matches!(lab.ask(3, Mode::Permit(3)), Ok(Begun::Granted(_))));
    assert!(matches!(lab.ask(4, Mode::Permit(3)), Ok(Begun::Granted(_))));
    assert_eq!(lab.ask(5, Mode::Permit(3)).unwrap(), Begun::Waiting);
    lab.check_invariants();
    lab.advance(100 * MS);
    assert_eq!(lab.holders(), [3, 4, 5]);
}

#[test]
fn a_lock_with_only_delays_is_dropped_when_the_last_ends() {
    let mut lab = Lab::new();
    let longer = Opts {
        lock_delay: Some(Duration::from_millis(300)),
        ..delayed()
    };
    lab.ask_with(1, Mode::Shared, delayed()).unwrap();
    lab.ask_with(2, Mode::Shared, longer).unwrap();
    let ended = lab.now + 10 * MS;
    lab.advance(10 * MS);
    assert!(lab.holders().is_empty());
    assert!(!lab.lock.is_empty());
    // Nobody waits: the lock's next wake is when it can go.
    assert_eq!(lab.lock.wake_at(), Some(ended + 300 * MS));
    assert_eq!(lab.lock.held_back_until(), Some(ended + 300 * MS));
    // A writer waiting wakes it at the first delay's end, which grants nothing yet.
    assert_eq!(lab.ask(3, Mode::Exclusive).unwrap(), Begun::Waiting);
    assert_eq!(lab.lock.wake_at(), Some(ended + 100 * MS));
    lab.advance(100 * MS);
    assert!(lab.holders().is_empty());
    assert_eq!(lab.delayed(), [Mode::Shared]);
    assert_eq!(lab.lock.wake_at(), Some(ended + 300 * MS));
    lab.advance(200 * MS);
    assert_eq!(lab.holders(), [3]);
    assert!(lab.release(3));
    assert!(lab.lock.is_empty());
}

#[test]
fn a_restart_hold_back_holds_back_every_grant() {
    let mut lab = Lab::new();
    let mut tick = lab.tick();
    tick.held_back_until = lab.now + 5 * MS;
    let ask = |n| Ask {
        name: "lk",
        request_id: id(n),
        lease_ms: 1000,
        limits: LeaseLimits::new(None, None),
        mode: Mode::Shared,
        label: None,
        value: None,
        client: 0,
        listener: Ear {
            got: Rc::default(),
            next: Rc::default(),
            closed: false,
        },
        no_wait: false,
        max_waiters: 10,
        held_back_until: Some(tick.held_back_until),
    };
    assert_eq!(
        lab.lock.acquire(ask(1), tick, &mut lab.log).unwrap(),
        Begun::Waiting
    );
    assert_eq!(lab.lock.held_back_until(), Some(tick.held_back_until));
    tick.now = tick.held_back_until;
    lab.lock.settle(tick, &mut lab.log);
    assert_eq!(lab.holders(), [1]);
}

#[test]
fn a_grant_nobody_listens_for_is_kept_briefly() {
    let mut lab = Lab::new();
    lab.ask(1, Mode::Exclusive).unwrap();
    let deaf = Opts {
        deaf: true,
        ..Opts::default()
    };
    assert_eq!(
        lab.ask_with(2, Mode::Exclusive, deaf).unwrap(),
        Begun::Waiting
    );
    assert!(lab.release(1));
    assert_eq!(lab.holders(), [2]);
    assert!(lab.grant(2).is_none(), "not delivered");
    assert_eq!(lab.lock.holders()[0].deadline(), lab.now + GRACE);
    lab.advance(GRACE);
    assert!(lab.lock.is_empty());
    assert!(
        !lab.log.ended_requests.contains(&2),
        "never answered: a slow re-poll may join the line again"
    );
}

#[test]
fn polls_end_detach_and_are_abandoned() {
    let mut lab = Lab::new();
    lab.ask(1, Mode::Exclusive).unwrap();
    let deaf = Opts {
        deaf: true,
        ..Opts::default()
    };
    lab.ask_with(2, Mode::Exclusive, deaf).unwrap();
    lab.ask(3, Mode::Exclusive).unwrap();
    let tick = lab.tick();
    assert_eq!(
        lab.lock
            .finish_poll(id(2), false, tick.now, tick, &mut lab.log),
        PollEnd::StillWaiting(0, None)
    );
    assert_eq!(
        lab.lock
            .finish_poll(id(3), true, tick.now, tick, &mut lab.log),
        PollEnd::TimedOut
    );
    assert!(lab.log.ended_requests.contains(&3));
    assert_eq!(lab.lock.waiters(), 1);
    lab.now += GRACE - 1;
    let tick = lab.tick();
    lab.lock.drop_abandoned(tick, &mut lab.log);
    assert_eq!(lab.lock.waiters(), 1, "within its grace period");
    lab.now += 1;
    let tick = lab.tick();
    lab.lock.drop_abandoned(tick, &mut lab.log);
    assert_eq!(lab.lock.waiters(), 0);
    assert!(lab.log.events.contains(&"left 2 false".to_owned()));
    // A poll that ends after its grant raced in gets the grant.
    lab.ask(4, Mode::Exclusive).unwrap();
    assert!(lab.release(1));
    let tick = lab.tick();
    assert!(matches!(
        lab.lock
            .finish_poll(id(4), false, tick.now, tick, &mut lab.log),
        PollEnd::Granted(_)
    ));
}

#[test]
fn a_renewal_runs_up_to_the_max_hold() {
    let mut lab = Lab::new();
    let limited = Opts {
        lease_ms: 100,
        max_hold: Some(Duration::from_millis(150)),
        ..Opts::default()
    };
    lab.ask_with(1, Mode::Exclusive, limited).unwrap();
    lab.advance(90 * MS);
    let (lease, tick) = (lab.lease(1), lab.tick());
    assert_eq!(
        lab.lock.renew(lease, tick, &mut lab.log),
        Some(Some(Duration::from_millis(60)))
    );
    lab.advance(60 * MS);
    assert!(lab.lock.is_empty());
    assert_eq!(
        lab.log.ended_leases.last().map(|e| e.1),
        Some(Ended::MaxHold)
    );
    let tick = lab.tick();
    assert_eq!(lab.lock.renew(lease, tick, &mut lab.log), None);
}

#[test]
fn a_held_mutex_stays_small() {
    // The per-lock budget (about 256 bytes per held lock at a million locks): the table's
    // entry grew by the client's tag (8 bytes) for successor reservations.
    assert!(std::mem::size_of::<LockState<Ear>>() <= 104);
    assert!(std::mem::size_of::<Holder>() <= 96);
}

/// An acquire by the client `client`, otherwise the defaults.
fn of_client(client: u64) -> Opts {
    Opts {
        client,
        ..Opts::default()
    }
}

#[test]
fn a_waiter_behind_its_own_clients_holder_is_reserved_the_lock_next() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(3, Mode::Exclusive, of_client(8)).unwrap();
    let next = lab.next(2).expect("told at once");
    assert_eq!(next.after, lab.lease(1));
    assert!(next.fencing_token > lab.grant(1).unwrap().fencing_token);
    assert_eq!(next.lease, Duration::from_secs(10));
    assert!(lab.next(3).is_none(), "not first in line");
    // The poll told of it has answered; the client polls again, for the grant.
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    // Its lease and token are the reservation's, and it runs whole from the release.
    lab.now += 5 * MS;
    assert!(lab.release(1));
    let granted = lab.grant(2).expect("granted");
    assert_eq!(
        (granted.lease_id, granted.fencing_token),
        (next.lease_id, next.fencing_token)
    );
    assert_eq!(lab.lock.holders()[0].deadline(), lab.now + 10_000 * MS);
    // Another client's waiter is first now: no reservation, and tokens still grow.
    assert!(lab.next(3).is_none());
    lab.advance(10_000 * MS);
    assert!(lab.grant(3).unwrap().fencing_token > next.fencing_token);
    lab.check_invariants();
}

#[test]
fn only_exclusive_acquires_of_one_client_reserve() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(2, Mode::Shared, of_client(7)).unwrap();
    assert!(lab.next(2).is_none(), "a reader");
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Permit(1), of_client(7)).unwrap();
    lab.ask_with(2, Mode::Permit(1), of_client(7)).unwrap();
    assert!(lab.next(2).is_none(), "a semaphore");
    let mut lab = Lab::new();
    lab.ask(1, Mode::Exclusive).unwrap();
    lab.ask(2, Mode::Exclusive).unwrap();
    assert!(lab.next(2).is_none(), "no client id");
}

#[test]
fn a_reservation_outlasts_its_wait_its_polls_and_the_grace_period() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    let next = lab.next(2).unwrap();
    let tick = lab.tick();
    assert_eq!(
        lab.lock
            .finish_poll(id(2), true, tick.now, tick, &mut lab.log),
        PollEnd::StillWaiting(0, Some(next)),
        "its wait ran out: it stays"
    );
    lab.now += 3 * GRACE;
    let tick = lab.tick();
    lab.lock.drop_abandoned(tick, &mut lab.log);
    assert_eq!(lab.lock.waiters(), 1, "no poll for long: it stays");
    // Granted with no poll attached: its client holds it already, so it runs whole.
    assert!(lab.release(1));
    assert!(lab.grant(2).is_none(), "nobody was listening");
    assert_eq!(lab.holders(), [2]);
    assert_eq!(lab.lock.holders()[0].deadline(), lab.now + 10_000 * MS);
    let tick = lab.tick();
    lab.lock
        .poll_dropped(id(2), Some(next.fencing_token), tick, &mut lab.log);
    assert_eq!(lab.lock.holders()[0].deadline(), lab.now + 10_000 * MS);
}

#[test]
fn a_poll_that_missed_its_reservation_hears_of_it_when_it_comes_back() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    let deaf = Opts {
        deaf: true,
        ..of_client(7)
    };
    lab.ask_with(2, Mode::Exclusive, deaf).unwrap();
    assert!(lab.next(2).is_none());
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    let told = lab.next(2).expect("told on the re-poll");
    assert_eq!(told.after, lab.lease(1));
    // Told once: the next poll waits for the grant.
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    assert!(lab.next(2).is_none());
}

#[test]
fn a_reserved_lease_renews_and_releases_before_it_begins() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(3, Mode::Exclusive, of_client(7)).unwrap();
    let next = lab.next(2).unwrap();
    let tick = lab.tick();
    assert_eq!(
        lab.lock.renew(next.lease_id, tick, &mut lab.log),
        Some(Some(Duration::from_secs(10)))
    );
    assert!(lab.lock.release(next.lease_id, tick, &mut lab.log));
    assert!(lab.log.ended_requests.contains(&2));
    assert_eq!(lab.lock.waiters(), 1);
    assert_eq!(lab.lock.renew(next.lease_id, tick, &mut lab.log), None);
    // The next in line is reserved in its place.
    let third = lab.next(3).expect("reserved next");
    assert_eq!(third.after, lab.lease(1));
    assert!(third.fencing_token > next.fencing_token);
    // A cancel withdraws a reservation too.
    assert!(lab.lock.withdraw(id(3), tick, &mut lab.log));
    assert_eq!(lab.lock.waiters(), 0);
    assert!(!lab.lock.release(third.lease_id, tick, &mut lab.log));
    assert_eq!(lab.holders(), [1]);
}

#[test]
fn a_revoked_holders_reserved_successor_starts_when_its_lease_would_have_ended() {
    let mut lab = Lab::new();
    lab.ask_with(1, Mode::Exclusive, of_client(7)).unwrap();
    lab.ask_with(2, Mode::Exclusive, of_client(7)).unwrap();
    let ends = lab.lock.holders()[0].deadline();
    lab.now += 1_000 * MS;
    let tick = lab.tick();
    assert_eq!(lab.lock.revoke(tick, &mut lab.log).len(), 1);
    assert!(lab.holders().is_empty());
    assert_eq!(lab.lock.wake_at(), Some(ends));
    lab.advance(ends - lab.now - 1);
    assert!(lab.holders().is_empty());
    lab.advance(1);
    assert_eq!(lab.holders(), [2]);
    lab.check_invariants();
}
