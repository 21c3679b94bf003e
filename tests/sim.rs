//! Deterministic network simulation: the real lock server (memory backend, state file) and
//! real SDK clients on turmoil hosts, under randomised latency, partitions (both ways and one
//! way), held messages, client crashes and server crashes, replayable by seed.
//!
//! Each seed draws a plan (clients, lease, latencies, a fault schedule, the clients' choices),
//! runs it on simulated time, heals every fault, checks that each lock can be acquired again
//! within lease + grace + 2 s, and runs the offline checks of `support::history` on what the
//! server's audit trail, the clients and the fencing-checked resource recorded, every time
//! on the simulated clock (see `support::sim` for how the audit trail gets there).
//!
//! Environment:
//! * `LEASEHOLD_SIM_SEEDS`: `N` (seeds 0 to N-1), `A..B` or `A,B,C`, run by
//!   `seeds_from_env` (CI runs `CI_SEEDS`). A seed that ever failed gets its own test in
//!   `regression`.
//! * `LEASEHOLD_SIM_REPEAT`: runs each seed that many times (see
//!   `the_same_seed_gives_the_same_history` for what a replay does and does not repeat).
//! * `LEASEHOLD_SIM_TRACE=DIR`: writes each seed's timeline to `DIR/seed-N.txt`.
//! * `LEASEHOLD_SIM_LOG=FILTER`: the crate's (and hyper's, h2's) tracing on stderr,
//!   stamped with simulated µs, such as `leasehold=debug`.

mod support;

use leasehold::DistributedLock;
use leasehold::server::Server;
use leasehold::server::store::StoreEvent;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::contend::{Take, take_turn};
use support::history::{self, ClientEvent, ClientKind, Clients, Hold, Report, Resource};
use support::sim::{ServerRuns, SimConnect, SimListener, now_us};

/// The seeds CI runs.
const CI_SEEDS: std::ops::Range<u64> = 1..17;
const PROJECT: &str = "sim";
/// The mutex seeds' locks.
const LOCKS: [(&str, Take); 2] = [("alpha", Take::Lock), ("beta", Take::Lock)];
/// The kind seeds' names, each with how a contender takes it: a semaphore of two permits,
/// readers and writers of one read-write lock, and an election.
const KIND_LOCKS: [(&str, Take); 4] = [
    ("pool", Take::Permits(2)),
    ("config", Take::Read),
    ("config", Take::Write),
    ("leader", Take::Lead),
];
/// The seeds CI runs with every kind.
/// (Twelve: in a run, the semaphore's two permits overlap in only a few of them, and the
/// negative control below needs one.)
const CI_KIND_SEEDS: std::ops::Range<u64> = 1..13;
const PORT: u16 = 7878;
const URL: &str = "http://server:7878";
/// The server's grace period for detached waiters and uncollected grants (its default).
const GRACE: Duration = Duration::from_secs(3);
/// Faults start within this much simulated time; everything is healed at its end.
const CHAOS: Duration = Duration::from_secs(12);
/// Nothing goes wrong during the first moments: the clients get going.
const CALM_START: Duration = Duration::from_millis(500);
/// The simulation gives up this long after healing (the liveness probe should long be done).
const AFTER_HEAL_LIMIT: Duration = Duration::from_secs(30);

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// One fault on the simulated network or hosts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Client `i` and the server cannot reach each other (in-flight segments are lost).
    Partition(usize),
    /// Client `i`'s segments to the server are lost; the answers still arrive.
    PartitionToServer(usize),
    /// The server's segments to client `i` are lost; its requests still arrive.
    PartitionFromServer(usize),
    /// Segments between client `i` and the server are held back, then delivered at once.
    Hold(usize),
    /// Latency between client `i` and the server is this, far above its usual.
    Slow(usize, Duration),
    /// Client `i`'s host crashes (every task and socket gone), then starts again.
    CrashClient(usize),
    /// The server's host crashes, then starts again from its state file.
    CrashServer,
}

impl Fault {
    fn label(&self) -> &'static str {
        match self {
            Fault::Partition(_) => "partition",
            Fault::PartitionToServer(_) => "partition to server",
            Fault::PartitionFromServer(_) => "partition from server",
            Fault::Hold(_) => "hold",
            Fault::Slow(..) => "latency spike",
            Fault::CrashClient(_) => "client crash",
            Fault::CrashServer => "server crash",
        }
    }
}

/// A fault and when it starts and ends (simulated time since the start).
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    start: Duration,
    end: Duration,
    fault: Fault,
}

/// Everything a seed decides.
#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    clients: usize,
    lease: Duration,
    /// Latency of every link at the start and after healing.
    latency: Duration,
    /// Latency of client links is drawn again now and then, up to this.
    max_latency: Duration,
    /// When client `i`'s link to the server gets which latency (a latency spike, a fault,
    /// overrides it while it lasts).
    latency_changes: Vec<(Duration, usize, Duration)>,
    /// Per client: the SDK's safety margin (`None`: its default, a tenth of the lease).
    /// Simulated clocks do not drift, so no margin at all must be safe too.
    margins: Vec<Option<Duration>>,
    faults: Vec<Scheduled>,
    /// Whether the contenders use semaphores, read-write locks and elections instead of
    /// two mutexes (the same draws otherwise, so mutex seeds replay as they always did).
    kinds: bool,
}

impl Plan {
    /// A seed's plan with every kind of lock.
    fn with_kinds(seed: u64) -> Plan {
        Plan {
            kinds: true,
            ..Plan::new(seed)
        }
    }

    /// The names the contenders take, each with how.
    fn locks(&self) -> &'static [(&'static str, Take)] {
        if self.kinds { &KIND_LOCKS } else { &LOCKS }
    }

    /// Each name once, with how the liveness probe takes it.
    fn names(&self) -> Vec<(&'static str, Take)> {
        support::contend::names(self.locks())
    }

    fn new(seed: u64) -> Plan {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clients = rng.usize(3..=5);
        let lease = [ms(500), ms(1000), ms(2000)][rng.usize(..3)];
        let max_latency = ms(rng.u64(2..=40));
        let latency = ms(rng.u64(1..=max_latency.as_millis() as u64));
        let mut latency_changes = Vec::new();
        for i in 0..clients {
            let mut at = Duration::ZERO;
            while at < CHAOS {
                let latency = ms(rng.u64(1..=max_latency.as_millis() as u64));
                latency_changes.push((at, i, latency));
                at += ms(rng.u64(50..1000));
            }
        }
        let margins = (0..clients)
            .map(|_| match rng.u8(..3) {
                0 => Some(Duration::ZERO),
                _ => None,
            })
            .collect();
        let mut faults = Vec::new();
        let end = |start: Duration, len: Duration| (start + len).min(CHAOS);
        // Each client's link and host go through one fault at a time.
        for i in 0..clients {
            let mut at = CALM_START + ms(rng.u64(0..2000));
            while at < CHAOS {
                let (fault, len) = match rng.u8(..12) {
                    0..=2 => (Fault::Partition(i), ms(rng.u64(100..3000))),
                    3 => (Fault::PartitionToServer(i), ms(rng.u64(100..2500))),
                    4 => (Fault::PartitionFromServer(i), ms(rng.u64(100..2500))),
                    5..=7 => (Fault::Hold(i), ms(rng.u64(50..2500))),
                    8..=9 => (
                        Fault::Slow(i, ms(rng.u64(100..500))),
                        ms(rng.u64(500..4000)),
                    ),
                    _ => (Fault::CrashClient(i), ms(rng.u64(50..2000))),
                };
                faults.push(Scheduled {
                    start: at,
                    end: end(at, len),
                    fault,
                });
                at += len + ms(rng.u64(200..3000));
            }
        }
        // The server crashes now and then, down for a while each time.
        let mut at = CALM_START + ms(rng.u64(500..5000));
        while at < CHAOS {
            let len = ms(rng.u64(50..2000));
            faults.push(Scheduled {
                start: at,
                end: end(at, len),
                fault: Fault::CrashServer,
            });
            at += len + ms(rng.u64(1500..6000));
        }
        faults.sort_by_key(|f| f.start);
        Plan {
            seed,
            clients,
            lease,
            latency,
            max_latency,
            latency_changes,
            margins,
            faults,
            kinds: false,
        }
    }

    /// The liveness bound after healing.
    fn bound(&self) -> Duration {
        self.lease + GRACE + Duration::from_secs(2)
    }

    fn fault_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for f in &self.faults {
            *counts.entry(f.fault.label()).or_default() += 1;
        }
        counts
    }
}

/// A lock, and how long after healing the probe got it (or why it did not).
type ProbeResult = (String, Result<Duration, String>);

/// What the hosts of one simulation share with the test.
#[derive(Clone)]
struct World {
    plan: Arc<Plan>,
    clients: Clients,
    resource: Resource,
    runs: ServerRuns,
    state_file: PathBuf,
    /// Contenders start no new round once set.
    stop: Arc<AtomicBool>,
    /// Simulated µs at which every fault was healed (0: not yet).
    healed_at: Arc<AtomicU64>,
    /// The liveness probe's results: per lock, how long after healing it got the lock.
    probe: Arc<Mutex<Vec<ProbeResult>>>,
    probe_done: Arc<AtomicBool>,
    /// What the clients did besides the checked events, for the trace file.
    notes: Arc<Mutex<Vec<(u64, String)>>>,
}

impl World {
    fn note(&self, text: String) {
        self.notes.lock().unwrap().push((now_us(), text));
    }
}

fn client(margin: Option<Duration>) -> DistributedLock {
    let mut builder = DistributedLock::builder(PROJECT)
        .endpoint(URL)
        .connector(SimConnect);
    if let Some(margin) = margin {
        builder = builder.safety_margin(margin);
    }
    builder.build().expect("client builds")
}

/// The server host: the real server on simulated TCP, with its state file, its audit trail
/// received on this host (see `support::sim`).
async fn server(runs: ServerRuns, state_file: PathBuf) -> turmoil::Result {
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let (events, run) = runs.start();
    let server = Server::builder()
        .listener(SimListener(listener))
        .events(events)
        .state_file(state_file)
        // The state file's writer thread would run on real time, the simulation on its own.
        .state_file_inline_writes_for_simulations()
        .grace(GRACE)
        .start()
        .await?;
    run.forward().await;
    drop(server);
    Ok(())
}

/// A contending client: rounds of acquire, check `is_held()` and write with the token,
/// release (or drop the guard), with randomised timeouts, plain-expiry leases, long work,
/// and acquires given up by dropping them. Everything it sees is recorded.
async fn contender(world: World, i: usize, incarnation: u64) -> turmoil::Result {
    let name = format!("c{i}");
    let plan = &world.plan;
    let lease = plan.lease;
    let dl = client(plan.margins[i]);
    let mut rng = fastrand::Rng::with_seed(plan.seed * 1_000 + i as u64 * 100 + incarnation);
    while !world.stop.load(Ordering::SeqCst) {
        // Think time: never spin without letting simulated time pass.
        tokio::time::sleep(ms(rng.u64(1..60))).await;
        let locks = plan.locks();
        let (lock, take) = locks[rng.usize(..locks.len())];
        let timeout = match rng.u8(..10) {
            0 => Duration::ZERO,
            _ => ms(rng.u64(200..3000)),
        };
        let auto_renew = rng.u8(..8) != 0;
        let request = take_turn(&dl, lock, take, &name, lease, timeout, auto_renew);
        let acquired = if rng.u8(..8) == 0 {
            // Gives up early by dropping the acquire: its waiter is withdrawn.
            let give_up = ms(rng.u64(5..1000));
            world.note(format!(
                "{name} {lock} acquire, timeout {timeout:?}, dropped after {give_up:?}"
            ));
            match tokio::time::timeout(give_up, request).await {
                Ok(acquired) => acquired,
                Err(_) => {
                    world.note(format!("{name} {lock} acquire dropped"));
                    continue;
                }
            }
        } else {
            world.note(format!("{name} {lock} acquire, timeout {timeout:?}"));
            request.await
        };
        let turn = match acquired {
            Ok(turn) => turn,
            Err(e) => {
                world.note(format!("{name} {lock} acquire failed: {e}"));
                continue;
            }
        };
        let guard = turn.guard();
        let token = guard.fencing_token();
        world
            .clients
            .record_at(now_us(), &name, lock, ClientKind::Acquired(token));
        for _ in 0..rng.usize(1..4) {
            if !guard.is_held() {
                world
                    .clients
                    .record_at(now_us(), &name, lock, ClientKind::Lost(token));
                break;
            }
            match take.hold() {
                Hold::Exclusive => {
                    world
                        .clients
                        .record_at(now_us(), &name, lock, ClientKind::Held(token));
                    world.resource.write(lock, &name, token);
                }
                // Readers and permit holders do not write one shared record.
                hold => {
                    world
                        .clients
                        .record_at(now_us(), &name, lock, ClientKind::HeldAs(token, hold));
                }
            }
            // The work done under the lock: now and then longer than the lease.
            let work = match rng.u8(..6) {
                0 => ms(rng.u64(lease.as_millis() as u64 / 2..lease.as_millis() as u64 * 2)),
                _ => ms(rng.u64(1..50)),
            };
            tokio::select! {
                _ = tokio::time::sleep(work) => {}
                _ = guard.lost() => {}
            }
            if world.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        if rng.bool() {
            let _ = turn.release().await;
        } else {
            drop(turn);
        }
        if rng.u8(..8) == 0 && take.hold() == Hold::Exclusive {
            // A late write with the old token, as from a process that was paused while it
            // held the lock: the resource must refuse it once a newer holder has written.
            tokio::time::sleep(ms(rng.u64(0..lease.as_millis() as u64 * 2))).await;
            world.resource.write(lock, &name, token);
        }
    }
    // The process stays up, idle: turmoil stops running a host whose software returned, which
    // would freeze its background tasks (withdrawals, releases) and leave its connections
    // open but silent, like a process stopped forever.
    std::future::pending::<()>().await;
    drop(dl);
    Ok(())
}

/// After healing: takes every lock (waiting at most the liveness bound), records what it
/// saw like a contender, and reports how long each took after healing.
async fn probe(world: World) -> turmoil::Result {
    let healed = loop {
        match world.healed_at.load(Ordering::SeqCst) {
            0 => tokio::time::sleep(ms(5)).await,
            at => break at,
        }
    };
    let dl = client(None);
    let bound = world.plan.bound();
    let probe = |(lock, take): (&'static str, Take)| {
        let (dl, world) = (dl.clone(), world.clone());
        async move {
            let result = take_turn(&dl, lock, take, "probe", world.plan.lease, bound, true).await;
            let after = Duration::from_micros(now_us() - healed);
            let outcome = match result {
                Ok(turn) => {
                    let token = turn.guard().fencing_token();
                    let clients = &world.clients;
                    clients.record_at(now_us(), "probe", lock, ClientKind::Acquired(token));
                    if turn.guard().is_held() {
                        match take.hold() {
                            Hold::Exclusive => {
                                clients.record_at(now_us(), "probe", lock, ClientKind::Held(token));
                                world.resource.write(lock, "probe", token);
                            }
                            hold => clients.record_at(
                                now_us(),
                                "probe",
                                lock,
                                ClientKind::HeldAs(token, hold),
                            ),
                        }
                    }
                    let _ = turn.release().await;
                    Ok(after)
                }
                Err(e) => Err(format!("{e} ({after:?} after healing)")),
            };
            world.probe.lock().unwrap().push((lock.to_owned(), outcome));
        }
    };
    // Every name at once, as the clients would.
    let mut probes = tokio::task::JoinSet::new();
    for name in world.plan.names() {
        probes.spawn(probe(name));
    }
    while probes.join_next().await.is_some() {}
    world.probe_done.store(true, Ordering::SeqCst);
    Ok(())
}

/// What one seed's run produced.
struct Outcome {
    plan: Arc<Plan>,
    report: Report,
    probe: Vec<ProbeResult>,
    /// Simulated time when the run ended.
    simulated: Duration,
    server_runs: usize,
    late_events: usize,
    /// Acquires whose guard was lost already when the acquire returned.
    born_lost: usize,
    panics: usize,
    /// A digest of the history that leaves out what is random by nature (tokens follow the
    /// wall clock, ids are random): same seed, same fingerprint, if the run is deterministic.
    fingerprint: u64,
    /// What the clients saw, for checks beyond the report.
    clients: Vec<ClientEvent>,
}

impl Outcome {
    /// Why the seed failed, if it did.
    fn failures(&self) -> Vec<String> {
        let mut failures = self.report.violations.clone();
        if self.report.grants == 0 {
            failures.push("nothing was granted".into());
        }
        if self.panics > 0 {
            failures.push(format!("{} panic(s) in the crate's code", self.panics));
        }
        let bound = self.plan.bound();
        for (lock, _) in self.plan.names() {
            match self.probe.iter().find(|(l, _)| l == lock) {
                Some((_, Ok(after))) if *after <= bound => {}
                Some((_, Ok(after))) => failures.push(format!(
                    "{lock} acquired {after:?} after healing, beyond the bound {bound:?}"
                )),
                Some((_, Err(e))) => failures.push(format!(
                    "{lock} not acquirable within {bound:?} after healing: {e}"
                )),
                None => failures.push(format!("{lock}: the liveness probe never finished")),
            }
        }
        failures
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        let faults: Vec<String> = plan
            .fault_counts()
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        let probe: Vec<String> = self
            .probe
            .iter()
            .map(|(lock, r)| match r {
                Ok(after) => format!("{lock} in {after:?}"),
                Err(e) => format!("{lock} FAILED: {e}"),
            })
            .collect();
        write!(
            f,
            "seed {}: {} clients, lease {:?}, latency 1ms to {:?}; faults: {}; {} server runs; \
             {}; after healing {}; {:?} simulated; history {:016x}",
            plan.seed,
            plan.clients,
            plan.lease,
            plan.max_latency,
            faults.join(", "),
            self.server_runs,
            self.report.summary(),
            probe.join(", "),
            self.simulated,
            self.fingerprint,
        )?;
        if self.born_lost > 0 {
            write!(f, "; {} acquires returned a lost guard", self.born_lost)?;
        }
        if self.late_events > 0 {
            write!(f, " ({} events received late)", self.late_events)?;
        }
        Ok(())
    }
}

/// A change the test makes to the simulated network or hosts.
#[derive(Debug, Clone, Copy)]
enum Action {
    End(Fault),
    Latency(usize, Duration),
    Start(Fault),
}

/// Applies actions to the simulation, keeping each client link's latency (which a latency
/// spike overrides while it lasts).
struct Network {
    latency: Vec<Duration>,
    slow: Vec<Option<Duration>>,
}

impl Network {
    fn apply(&mut self, sim: &mut turmoil::Sim<'_>, action: Action) {
        let host = |i: usize| format!("c{i}");
        match action {
            Action::Latency(i, latency) => {
                self.latency[i] = latency;
                if self.slow[i].is_none() {
                    sim.set_link_latency(host(i), "server", latency);
                }
            }
            Action::Start(Fault::Slow(i, latency)) => {
                self.slow[i] = Some(latency);
                sim.set_link_latency(host(i), "server", latency);
            }
            Action::End(Fault::Slow(i, _)) => {
                self.slow[i] = None;
                sim.set_link_latency(host(i), "server", self.latency[i]);
            }
            Action::Start(fault) => match fault {
                Fault::Partition(i) => sim.partition(host(i), "server"),
                Fault::PartitionToServer(i) => sim.partition_oneway(host(i), "server"),
                Fault::PartitionFromServer(i) => sim.partition_oneway("server", host(i)),
                Fault::Hold(i) => sim.hold(host(i), "server"),
                Fault::CrashClient(i) => sim.crash(host(i)),
                Fault::CrashServer => sim.crash("server"),
                Fault::Slow(..) => unreachable!(),
            },
            Action::End(fault) => match fault {
                Fault::Partition(i) => sim.repair(host(i), "server"),
                Fault::PartitionToServer(i) => sim.repair_oneway(host(i), "server"),
                Fault::PartitionFromServer(i) => sim.repair_oneway("server", host(i)),
                // Delivers what was held, at once.
                Fault::Hold(i) => sim.release(host(i), "server"),
                Fault::CrashClient(i) => sim.bounce(host(i)),
                Fault::CrashServer => sim.bounce("server"),
                Fault::Slow(..) => unreachable!(),
            },
        }
    }
}

/// A fresh directory for one simulation's state file.
fn temp_dir(label: &str) -> PathBuf {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "dl-sim-{}-{label}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs one seed and checks nothing: see [`Outcome::failures`].
fn simulate(seed: u64) -> Outcome {
    simulate_plan(Plan::new(seed), true)
}

/// Runs one seed; `fencing` off makes the resource accept every write (a negative control).
fn simulate_with(seed: u64, fencing: bool) -> Outcome {
    simulate_plan(Plan::new(seed), fencing)
}

/// Runs one plan.
fn simulate_plan(plan: Plan, fencing: bool) -> Outcome {
    let seed = plan.seed;
    let plan = Arc::new(plan);
    let dir = temp_dir(&format!("seed-{seed}"));
    let world = World {
        plan: plan.clone(),
        clients: Clients::default(),
        resource: Resource::new(fencing),
        runs: ServerRuns::default(),
        state_file: dir.join("state.json"),
        stop: Arc::default(),
        healed_at: Arc::default(),
        probe: Arc::default(),
        probe_done: Arc::default(),
        notes: Arc::default(),
    };
    // LEASEHOLD_SIM_LOG: a tracing filter (such as `leasehold=debug`); lines
    // go to stderr, stamped with simulated µs and the host.
    let _log = std::env::var("LEASEHOLD_SIM_LOG").ok().map(|filter| {
        struct SimTime;
        impl tracing_subscriber::fmt::time::FormatTime for SimTime {
            fn format_time(
                &self,
                w: &mut tracing_subscriber::fmt::format::Writer<'_>,
            ) -> fmt::Result {
                match turmoil::sim_elapsed() {
                    Some(t) => write!(w, "{:>10}", t.as_micros()),
                    None => write!(w, "{:>10}", "-"),
                }
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_timer(SimTime)
            .with_writer(std::io::stderr)
            .finish();
        tracing::subscriber::set_default(subscriber)
    });
    let panics_before = support::crate_panics();
    // The SDK's retry jitter (backon) draws from this thread's fastrand generator.
    fastrand::seed(seed);

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(ms(1))
        // Latency is fixed per link at any one time (and changed by the plan): turmoil
        // draws each message's latency from one generator in the order messages are sent,
        // so that order, which tokio and the crate do not keep from run to run, would
        // decide every later latency. At least a tick: with none, a request could arrive in
        // the very simulated millisecond it was sent, and the checks could not order them.
        .min_message_latency(plan.latency)
        .max_message_latency(plan.latency)
        .simulation_duration(CHAOS + AFTER_HEAL_LIMIT + Duration::from_secs(60))
        .build();
    {
        let world = world.clone();
        sim.host("server", move || {
            server(world.runs.clone(), world.state_file.clone())
        });
    }
    for i in 0..plan.clients {
        let world = world.clone();
        let incarnation = Rc::new(Cell::new(0u64));
        sim.host(format!("c{i}"), move || {
            incarnation.set(incarnation.get() + 1);
            contender(world.clone(), i, incarnation.get())
        });
    }
    {
        let world = world.clone();
        sim.host("probe", move || probe(world.clone()));
    }

    // Start and end of every fault and latency change, in time order (at the same time: ends
    // first); everything is healed at CHAOS, and latency is back to where it started.
    let mut actions: Vec<(Duration, Action)> = plan
        .faults
        .iter()
        .flat_map(|f| {
            [
                (f.start, Action::Start(f.fault)),
                (f.end, Action::End(f.fault)),
            ]
        })
        .chain(
            plan.latency_changes
                .iter()
                .map(|&(at, i, latency)| (at, Action::Latency(i, latency))),
        )
        .chain((0..plan.clients).map(|i| (CHAOS, Action::Latency(i, plan.latency))))
        .collect();
    actions.sort_by_key(|(at, action)| {
        let order = match action {
            Action::End(_) => 0,
            Action::Latency(..) => 1,
            Action::Start(_) => 2,
        };
        (*at, order)
    });
    let mut network = Network {
        latency: vec![plan.latency; plan.clients],
        slow: vec![None; plan.clients],
    };
    let mut next = 0;
    let mut healed = false;
    loop {
        let now = sim.elapsed();
        while next < actions.len() && actions[next].0 <= now {
            network.apply(&mut sim, actions[next].1);
            next += 1;
        }
        if !healed && now >= CHAOS {
            assert_eq!(next, actions.len(), "every fault ended by CHAOS");
            healed = true;
            world.stop.store(true, Ordering::SeqCst);
            world
                .healed_at
                .store(now.as_micros() as u64, Ordering::SeqCst);
        }
        if world.probe_done.load(Ordering::SeqCst) || now > CHAOS + AFTER_HEAL_LIMIT {
            break;
        }
        if let Err(e) = sim.step() {
            panic!("seed {seed}: a simulated host failed: {e}");
        }
    }
    let simulated = sim.elapsed();
    drop(sim);

    let trail = world.runs.trail();
    let clients = world.clients.events();
    let writes = world.resource.writes();
    let report = history::check(&trail.runs, &clients, &writes);
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same history gives the same digest.
        let mut h = std::hash::DefaultHasher::new();
        for run in &trail.runs {
            for e in run {
                (e.at_us, &e.lock).hash(&mut h);
                std::mem::discriminant(&e.kind).hash(&mut h);
            }
        }
        for e in &clients {
            (e.at_us, &e.client, &e.lock).hash(&mut h);
            std::mem::discriminant(&e.kind).hash(&mut h);
        }
        for w in &writes {
            (&w.lock, &w.client, w.accepted).hash(&mut h);
        }
        h.finish()
    };
    if let Ok(dir) = std::env::var("LEASEHOLD_SIM_TRACE") {
        write_trace(Path::new(&dir), &world, &trail.runs, &clients);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let probe = world.probe.lock().unwrap().clone();
    Outcome {
        plan,
        report,
        probe,
        simulated,
        server_runs: trail.runs.len(),
        born_lost: clients
            .windows(2)
            .filter(|w| {
                matches!(w[0].kind, ClientKind::Acquired(_))
                    && matches!(w[1].kind, ClientKind::Lost(_))
                    && (w[0].at_us, &w[0].client) == (w[1].at_us, &w[1].client)
            })
            .count(),
        late_events: trail.late,
        panics: support::crate_panics() - panics_before,
        fingerprint,
        clients,
    }
}

/// Writes one seed's timeline (faults, server events, client events and notes, by simulated
/// µs) to `<dir>/seed-<seed>.txt`: the first thing to read when a seed fails.
fn write_trace(dir: &Path, world: &World, runs: &[Vec<StoreEvent>], clients: &[ClientEvent]) {
    let mut lines: Vec<(u64, String)> = Vec::new();
    for f in &world.plan.faults {
        lines.push((f.start.as_micros() as u64, format!("start {:?}", f.fault)));
        lines.push((f.end.as_micros() as u64, format!("end {:?}", f.fault)));
    }
    for (run, events) in runs.iter().enumerate() {
        for e in events {
            lines.push((
                e.at_us,
                format!("server run {run}: {} {:?}", e.lock, e.kind),
            ));
        }
    }
    for e in clients {
        lines.push((e.at_us, format!("{} {} {:?}", e.client, e.lock, e.kind)));
    }
    lines.extend(world.notes.lock().unwrap().iter().cloned());
    lines.sort();
    let text: String = lines
        .iter()
        .map(|(t, l)| format!("{t:>10} {l}\n"))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{}.txt", world.plan.seed)), text).unwrap();
}

fn replay_hint(seed: u64) -> String {
    format!(
        "replay: LEASEHOLD_SIM_SEEDS={seed}..{} cargo test --test sim seeds_from_env -- --nocapture",
        seed + 1
    )
}

/// Runs the seeds (each `LEASEHOLD_SIM_REPEAT` times, default once), printing one
/// line per run, and fails listing every failing seed.
fn run_seeds(seeds: impl IntoIterator<Item = u64>) {
    run_plans(seeds.into_iter().map(Plan::new));
}

/// [`run_seeds`] for any plans.
fn run_plans(plans: impl IntoIterator<Item = Plan>) {
    let repeat: usize = std::env::var("LEASEHOLD_SIM_REPEAT")
        .map(|r| r.parse().expect("LEASEHOLD_SIM_REPEAT is a count"))
        .unwrap_or(1);
    let mut failed = Vec::new();
    for plan in plans {
        let seed = plan.seed;
        for _ in 0..repeat {
            let started = std::time::Instant::now();
            let outcome = simulate_plan(plan.clone(), true);
            println!("{outcome} [{:?} wall]", started.elapsed());
            let failures = outcome.failures();
            if !failures.is_empty() {
                failed.push(format!(
                    "seed {seed} failed:\n  {}\n  {}",
                    failures.join("\n  "),
                    replay_hint(seed)
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// `LEASEHOLD_SIM_SEEDS`: `N` (seeds 0 to N-1), `A..B`, or `A,B,C`.
fn seeds_from(var: &str) -> Vec<u64> {
    let var = var.trim();
    if let Some((a, b)) = var.split_once("..") {
        let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
        (a..b).collect()
    } else if var.contains(',') {
        var.split(',').map(|s| s.trim().parse().unwrap()).collect()
    } else {
        (0..var.parse().unwrap()).collect()
    }
}

// The CI seeds, in two tests that run side by side.
#[test]
fn ci_seeds_first_half() {
    run_seeds(CI_SEEDS.start..CI_SEEDS.start + 8);
}

#[test]
fn ci_seeds_second_half() {
    run_seeds(CI_SEEDS.start + 8..CI_SEEDS.end);
}

/// The CI seeds' faults, with contenders on a semaphore, a read-write lock and an
/// election.
#[test]
fn ci_seeds_with_every_kind() {
    run_plans(CI_KIND_SEEDS.map(Plan::with_kinds));
}

/// Negative control for the kind seeds: checked as if the semaphore had one permit and the
/// readers were writers, the same runs show overlaps. So the clean checks above had
/// several holders at once to check.
#[test]
fn negative_control_the_kind_seeds_really_share() {
    let mut overlapped = std::collections::BTreeSet::new();
    // All of them: which runs overlap on which lock varies with timing (sessions per lock
    // moved it), and the claim is about the runs the clean check covers.
    for seed in CI_KIND_SEEDS {
        let outcome = simulate_plan(Plan::with_kinds(seed), true);
        let stricter = history::stricter(outcome.clients);
        for v in history::check(&[], &stricter, &[]).violations {
            overlapped.insert(v.split(':').next().unwrap_or_default().to_owned());
        }
    }
    for lock in ["pool", "config"] {
        assert!(
            overlapped.contains(lock),
            "{lock} never had two holders at once in the kind seeds: {overlapped:?}"
        );
    }
}

#[test]
fn seeds_from_env() {
    match std::env::var("LEASEHOLD_SIM_SEEDS") {
        Ok(var) => run_seeds(seeds_from(&var)),
        Err(_) => println!("LEASEHOLD_SIM_SEEDS is not set: no extra seeds"),
    }
}

#[test]
fn plans_are_replayable_and_varied() {
    let a = Plan::new(7);
    let b = Plan::new(7);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    let kinds: std::collections::BTreeSet<&str> = CI_SEEDS
        .flat_map(|s| Plan::new(s).faults)
        .map(|f| f.fault.label())
        .collect();
    assert_eq!(
        kinds.len(),
        7,
        "CI seeds cover every kind of fault: {kinds:?}"
    );
    assert_eq!(CI_SEEDS.count(), 16);
    assert_eq!(seeds_from("3"), vec![0, 1, 2]);
    assert_eq!(seeds_from("5..7"), vec![5, 6]);
    assert_eq!(seeds_from("4, 9"), vec![4, 9]);
}

/// The checks can fail on simulated histories too: with a resource that does not check
/// tokens, the clients' late writes with old tokens are accepted, and found. (Seeds whose
/// runs with the check had several writes refused.)
#[test]
fn negative_control_without_token_checks_late_writes_are_found() {
    let mut stale = 0;
    for seed in [0, 8, 12] {
        let outcome = simulate_with(seed, false);
        println!("control, no token check: {outcome}");
        stale += outcome
            .report
            .violations
            .iter()
            .filter(|v| v.starts_with("stale write accepted"))
            .count();
    }
    assert!(stale > 0, "the checker must find the stale writes");
}

/// A plain-expiry lease of 500 ms over a link with 100 ms of latency each way, watched by a
/// loop that records `is_held()` every 5 ms until `lost()`; then someone else takes the lock
/// (so that the server's expiry is in the trail). Returns the offline report.
fn held_claims_under_latency(count_from_answer: bool) -> Report {
    let mut sim = turmoil::Builder::new()
        .tick_duration(ms(1))
        .min_message_latency(ms(100))
        .max_message_latency(ms(100))
        .build();
    let dir = temp_dir("held-claims");
    let runs = ServerRuns::default();
    {
        let (runs, state) = (runs.clone(), dir.join("state.json"));
        sim.host("server", move || server(runs.clone(), state.clone()));
    }
    let clients = Clients::default();
    {
        let clients = clients.clone();
        sim.client("client", async move {
            let mut builder = DistributedLock::builder(PROJECT)
                .endpoint(URL)
                .connector(SimConnect)
                .safety_margin(Duration::ZERO);
            if count_from_answer {
                builder = builder.count_lease_from_answer_for_tests();
            }
            let dl = builder.build()?;
            let guard = dl.lock("job").expires_in(ms(500)).auto_renew(false).await?;
            let token = guard.fencing_token();
            clients.record_at(now_us(), "a", "job", ClientKind::Acquired(token));
            while guard.is_held() {
                clients.record_at(now_us(), "a", "job", ClientKind::Held(token));
                tokio::time::sleep(ms(5)).await;
            }
            clients.record_at(now_us(), "a", "job", ClientKind::Lost(token));
            drop(dl.lock("job").timeout(Duration::from_secs(5)).await?);
            Ok(())
        });
    }
    sim.run().unwrap();
    drop(sim);
    let _ = std::fs::remove_dir_all(&dir);
    history::check(&runs.trail().runs, &clients.events(), &[])
}

#[test]
fn with_no_safety_margin_the_loss_signal_comes_in_time() {
    let report = held_claims_under_latency(false);
    println!("margin 0, counted from the send: {}", report.summary());
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(report.held_claims > 10);
}

/// The clock placement of `support::sim` is exact enough to catch a loss signal 100 ms late.
#[test]
fn negative_control_counting_from_the_answer_is_found() {
    let report = held_claims_under_latency(true);
    println!("control, counted from the answer: {}", report.summary());
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("outside its server lease")),
        "{:#?}",
        report.violations
    );
}

/// The same seed must give the same history, to the microsecond. It does so only in a
/// build with `--cfg tokio_unstable`: otherwise tokio's `select!` polls its branches in
/// random order, which turmoil can seed only then. (The memory store's shard choice is
/// already deterministic.) With it, 40 seeds gave identical histories run after run:
/// `RUSTFLAGS="--cfg tokio_unstable" cargo test --all-features --test sim -- --ignored`.
/// Without it a seed replays its plan exactly (faults, latencies, client choices, retry
/// jitter), not every interleaving; `LEASEHOLD_SIM_REPEAT` replays a seed several
/// times.
#[test]
#[ignore = "needs --cfg tokio_unstable (RUSTFLAGS), so that turmoil can seed tokio's select! order"]
fn the_same_seed_gives_the_same_history() {
    for seed in [2, 5, 84] {
        let (a, b) = (simulate(seed), simulate(seed));
        assert_eq!(
            a.fingerprint, b.fingerprint,
            "seed {seed} gave two histories:\n{a}\n{b}"
        );
    }
}

/// Seeds that failed once, each kept as its own test.
mod regression {
    use super::*;

    /// Failed while the simulation let two events share a simulated millisecond (no minimum
    /// latency): the probe's `is_held()` and the server's release of the same lease were
    /// stamped alike, and the check could not order them.
    #[test]
    fn seed_12() {
        run_seeds([12]);
    }

    /// Failed while a client host whose software had returned stopped being run by turmoil:
    /// its acquires stayed queued on the server on silent connections, each granted a full
    /// lease in turn after healing, and the probe waited past the bound.
    #[test]
    fn seed_84() {
        run_seeds([84]);
    }
}

/// Bugs in the crate the simulation found (now fixed), each kept as a small deterministic
/// regression scenario.
mod bugs {
    use super::*;

    fn quiet_sim<'a>() -> turmoil::Sim<'a> {
        turmoil::Builder::new()
            .tick_duration(ms(1))
            .min_message_latency(ms(1))
            .max_message_latency(ms(1))
            .simulation_duration(Duration::from_secs(120))
            .build()
    }

    /// An acquire sent while the server is down is retried until it is back, then granted
    /// at once: the guard must be held. The SDK used to count the lease from when the
    /// *first* attempt was sent, so after an outage longer than the lease the guard came back
    /// already lost (`is_held()` false, `lost()` resolved), and `release()` then skipped the
    /// server, leaving the lease held there until it expired. Leases now count from the
    /// attempt that was answered (`Reply::sent`).
    #[test]
    fn an_acquire_retried_through_a_server_outage_returns_a_held_guard() {
        let mut sim = quiet_sim();
        let dir = temp_dir("outage");
        let runs = ServerRuns::default();
        {
            let (runs, state) = (runs.clone(), dir.join("state.json"));
            sim.host("server", move || server(runs.clone(), state.clone()));
        }
        sim.crash("server");
        let seen: Arc<Mutex<Option<(bool, Duration)>>> = Arc::default();
        {
            let seen = seen.clone();
            sim.client("client", async move {
                let started = tokio::time::Instant::now();
                let guard = client(None)
                    .lock("job")
                    .expires_in(Duration::from_secs(1))
                    .timeout(Duration::from_secs(10))
                    .await?;
                *seen.lock().unwrap() = Some((guard.is_held(), started.elapsed()));
                guard.release().await.ok();
                Ok(())
            });
        }
        let mut restarted = false;
        while !sim.step().unwrap() {
            if !restarted && sim.elapsed() >= Duration::from_secs(3) {
                sim.bounce("server");
                restarted = true;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let (held, waited) = seen.lock().unwrap().expect("acquired");
        assert!(
            held,
            "granted {waited:?} after the acquire began (the server was down for 3 s of it), \
             the guard was already lost"
        );
    }

    /// After a crash, the memory store holds grants back for the longest lease it issued.
    /// Waiters queued meanwhile must get the lock when the hold-back ends. `shard_task` used
    /// to compute the end of the hold-back against a sweep time that a due sweep then moved
    /// on, so for 15 shards of 16 no wake-up was set for it: the waiters waited for the
    /// shard's next sweep, 62 ms to 1 s late. Four locks cover several shards.
    #[test]
    fn waiters_get_the_lock_when_the_hold_back_after_a_crash_ends() {
        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        let lease = Duration::from_secs(2);
        let mut sim = quiet_sim();
        let dir = temp_dir("hold-back");
        let runs = ServerRuns::default();
        {
            let (runs, state) = (runs.clone(), dir.join("state.json"));
            sim.host("server", move || server(runs.clone(), state.clone()));
        }
        let phase = Arc::new(AtomicU64::new(0));
        {
            let phase = phase.clone();
            sim.client("client", async move {
                let dl = client(None);
                // A 2 s lease, so that a crash holds grants back for 2 s.
                dl.lock("first").expires_in(lease).await?.release().await?;
                phase.store(1, Ordering::SeqCst);
                while phase.load(Ordering::SeqCst) < 2 {
                    tokio::time::sleep(ms(1)).await;
                }
                // The server is back, holding grants back: wait in line for four locks.
                let take = |name: &'static str| {
                    let dl = dl.clone();
                    async move {
                        let request = dl.lock(name).timeout(Duration::from_secs(10));
                        request.await.map(drop)
                    }
                };
                let (a, b, c, d) = tokio::join!(
                    take(NAMES[0]),
                    take(NAMES[1]),
                    take(NAMES[2]),
                    take(NAMES[3])
                );
                a?;
                b?;
                c?;
                d?;
                Ok(())
            });
        }
        let mut restarted_at = None;
        while !sim.step().unwrap() {
            if restarted_at.is_none() && phase.load(Ordering::SeqCst) == 1 {
                sim.crash("server");
                sim.bounce("server");
                restarted_at = Some(sim.elapsed());
                phase.store(2, Ordering::SeqCst);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let hold_back_end = restarted_at.expect("restarted") + lease;
        let trail = runs.trail();
        assert_eq!(trail.runs.len(), 2);
        let late: Vec<String> = trail.runs[1]
            .iter()
            .filter(|e| matches!(e.kind, leasehold::server::store::EventKind::Granted { .. }))
            .map(|e| {
                (
                    e.lock.clone(),
                    Duration::from_micros(e.at_us).saturating_sub(hold_back_end),
                )
            })
            .filter(|(_, late)| *late > ms(50))
            .map(|(lock, late)| format!("{lock} granted {late:?} after the hold-back ended"))
            .collect();
        assert!(late.is_empty(), "{late:#?}");
    }
}
