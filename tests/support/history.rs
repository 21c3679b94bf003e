//! The fault suite's record of what happened, a resource protected by fencing tokens, and
//! the offline checks run on the record.
//!
//! Server-side facts come from the store's audit trail ([`StoreEvent`]s, one list per server
//! run); client-side facts from the clients in the test; writes from the resource.

use leasehold::server::store::{EventKind, StoreEvent};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// How a grant holds its lock: alone (a mutex, a writer, a leader), shared with readers,
/// or as one of a semaphore's permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Exclusive,
    Shared,
    Permit(u32),
}

impl Hold {
    /// Whether a holder of this kind may hold next to `others` (all holding at once).
    fn fits_with(self, others: &[Hold]) -> bool {
        match self {
            Hold::Exclusive => others.is_empty(),
            Hold::Shared => others.iter().all(|o| *o == Hold::Shared),
            Hold::Permit(n) => {
                others.iter().all(|o| *o == Hold::Permit(n)) && others.len() < n as usize
            }
        }
    }
}

/// What a client saw or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKind {
    /// Its acquire returned this token.
    Acquired(u64),
    /// `is_held()` said true (just before it wrote) of an exclusive grant.
    Held(u64),
    /// `is_held()` said true of a shared grant or a permit.
    HeldAs(u64, Hold),
    /// `lost()` resolved.
    Lost(u64),
}

#[derive(Debug, Clone)]
pub struct ClientEvent {
    pub at_us: u64,
    pub client: String,
    pub lock: String,
    pub kind: ClientKind,
}

/// Client events, shared by every client task of a test.
#[derive(Debug, Clone, Default)]
pub struct Clients(Arc<Mutex<Vec<ClientEvent>>>);

impl Clients {
    pub fn record(&self, client: &str, lock: &str, kind: ClientKind) {
        self.record_at(now_us(), client, lock, kind);
    }

    /// Records an event at a time of the caller's clock (the simulation's, for instance),
    /// which must be the clock of the server events it is checked against.
    pub fn record_at(&self, at_us: u64, client: &str, lock: &str, kind: ClientKind) {
        self.0.lock().unwrap().push(ClientEvent {
            at_us,
            client: client.to_owned(),
            lock: lock.to_owned(),
            kind,
        });
    }

    pub fn events(&self) -> Vec<ClientEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// One write the resource saw.
#[derive(Debug, Clone)]
pub struct Write {
    pub at_us: u64,
    /// The lock that protects what was written (each lock guards its own record).
    pub lock: String,
    pub client: String,
    pub token: u64,
    pub accepted: bool,
}

/// A store protected by the lock: it rejects a write whose fencing token is lower than the
/// highest it has accepted. With `checking` off it accepts everything (the negative
/// control), and the offline check must then find the stale writes.
#[derive(Debug, Clone)]
pub struct Resource {
    checking: bool,
    state: Arc<Mutex<Ledger>>,
}

/// Highest accepted token per lock, and every write in order.
#[derive(Debug, Default)]
struct Ledger {
    highest: HashMap<String, u64>,
    writes: Vec<Write>,
}

impl Resource {
    pub fn new(checking: bool) -> Resource {
        Resource {
            checking,
            state: Arc::default(),
        }
    }

    /// Writes the record guarded by `lock`.
    pub fn write(&self, lock: &str, client: &str, token: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        let highest = state.highest.entry(lock.to_owned()).or_default();
        let accepted = !self.checking || token >= *highest;
        if accepted {
            *highest = (*highest).max(token);
        }
        state.writes.push(Write {
            at_us: now_us(),
            lock: lock.to_owned(),
            client: client.to_owned(),
            token,
            accepted,
        });
        accepted
    }

    pub fn writes(&self) -> Vec<Write> {
        self.state.lock().unwrap().writes.clone()
    }

    /// Serves writes from other processes: a line `W <lock> <client> <token>` is answered
    /// `OK` or `STALE`.
    pub async fn serve(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let resource = self.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let resource = resource.clone();
                tokio::spawn(async move {
                    let (read, mut write) = tcp.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut parts = line.split_whitespace();
                        let (Some("W"), Some(lock), Some(client), Some(token)) =
                            (parts.next(), parts.next(), parts.next(), parts.next())
                        else {
                            break;
                        };
                        let Ok(token) = token.parse() else { break };
                        let answer = if resource.write(lock, client, token) {
                            "OK\n"
                        } else {
                            "STALE\n"
                        };
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }
}

/// A server-side lease: from its grant to its end (release, cancel, or the deadline it
/// expired at or would have, if the server died first).
#[derive(Debug, Clone)]
struct Interval {
    token: u64,
    start: u64,
    end: u64,
    hold: Hold,
}

/// Each interval (sorted by start) that began while the ones still running did not admit
/// it: `(interval, the tokens it overlapped)`.
fn overlaps(list: &[Interval]) -> Vec<(&Interval, Vec<u64>)> {
    let mut found = Vec::new();
    let mut running: Vec<&Interval> = Vec::new();
    for i in list {
        running.retain(|r| r.end > i.start);
        let holds: Vec<Hold> = running.iter().map(|r| r.hold).collect();
        if !i.hold.fits_with(&holds) {
            found.push((i, running.iter().map(|r| r.token).collect()));
        }
        running.push(i);
    }
    found
}

/// The outcome of the offline checks.
#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<String>,
    pub grants: usize,
    pub writes_accepted: usize,
    pub writes_rejected: usize,
    pub held_claims: usize,
    /// Acquires that returned a guard, and guards that saw their lease lost, client-side.
    pub acquisitions: usize,
    pub losses: usize,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "{} grants on the server, {} acquisitions and {} losses seen by clients, {} writes accepted, {} rejected as stale, {} held-claims checked, {} violations",
            self.grants,
            self.acquisitions,
            self.losses,
            self.writes_accepted,
            self.writes_rejected,
            self.held_claims,
            self.violations.len()
        )
    }
}

/// Runs every offline check. `runs` holds the audit trail of each server run in order (a
/// restart starts a new run).
pub fn check(runs: &[Vec<StoreEvent>], clients: &[ClientEvent], writes: &[Write]) -> Report {
    let mut report = Report::default();
    let mut intervals: HashMap<String, Vec<Interval>> = HashMap::new();
    let mut last_token: HashMap<String, u64> = HashMap::new();
    for events in runs {
        let mut open: HashMap<u64, (String, Interval)> = HashMap::new();
        let mut gone_requests: HashSet<String> = HashSet::new();
        for e in events {
            let lock = format!("{}/{}", e.project, e.lock);
            match &e.kind {
                EventKind::Granted {
                    token,
                    request,
                    deadline_us,
                    shared,
                    permits,
                } => {
                    let hold = match (shared, permits) {
                        (true, _) => Hold::Shared,
                        (false, Some(n)) => Hold::Permit(*n),
                        (false, None) => Hold::Exclusive,
                    };
                    report.grants += 1;
                    // (1) no token regressions, across runs too.
                    if let Some(prev) = last_token.get(&lock)
                        && token <= prev
                    {
                        report
                            .violations
                            .push(format!("{lock}: token {token} granted after {prev}"));
                    }
                    last_token.insert(lock.clone(), *token);
                    // (5) no grant to a waiter that had already gone.
                    if gone_requests.contains(&format!("{lock} {request}")) {
                        report.violations.push(format!(
                            "{lock}: granted to request {request} after it left"
                        ));
                    }
                    open.insert(
                        *token,
                        (
                            lock.clone(),
                            Interval {
                                token: *token,
                                start: e.at_us,
                                end: *deadline_us,
                                hold,
                            },
                        ),
                    );
                }
                EventKind::Deadline { token, deadline_us } => {
                    if let Some((_, interval)) = open.get_mut(token) {
                        interval.end = *deadline_us;
                    }
                }
                EventKind::Released { token }
                | EventKind::Revoked { token }
                | EventKind::Cancelled {
                    token: Some(token), ..
                } => {
                    if let Some((lock, mut interval)) = open.remove(token) {
                        interval.end = e.at_us.min(interval.end);
                        intervals.entry(lock).or_default().push(interval);
                    }
                    if let EventKind::Cancelled { request, .. } = &e.kind {
                        gone_requests.insert(format!("{lock} {request}"));
                    }
                }
                EventKind::Expired { token, deadline_us } => {
                    if let Some((lock, mut interval)) = open.remove(token) {
                        interval.end = *deadline_us;
                        intervals.entry(lock).or_default().push(interval);
                    }
                }
                EventKind::Cancelled {
                    token: None,
                    request,
                }
                | EventKind::WaiterLeft { request, .. } => {
                    gone_requests.insert(format!("{lock} {request}"));
                }
                EventKind::Proclaimed { .. } => {}
            }
        }
        // The run ended (shutdown or crash): what was open counts until its deadline.
        for (_, (lock, interval)) in open {
            intervals.entry(lock).or_default().push(interval);
        }
    }
    // (3) no unexpired server-side leases at once that their kinds forbid: two exclusive
    // ones, an exclusive one beside any other, more permits than the semaphore has.
    for (lock, list) in &mut intervals {
        list.sort_by_key(|i| (i.start, i.token));
        for (i, running) in overlaps(list) {
            let token = running.iter().max().copied().unwrap_or_default();
            report.violations.push(format!(
                "{lock}: lease {} ({:?}) granted before lease {token} ended (running: {running:?})",
                i.token, i.hold
            ));
        }
    }
    let by_token: HashMap<u64, &Interval> =
        intervals.values().flatten().map(|i| (i.token, i)).collect();
    // Client-side checks. (An acquire's answer may arrive late, after a newer grant, when
    // the network held it back: that is not a regression as long as the client never
    // believes it holds the lock outside the lease, which is what is checked.)
    for e in clients {
        match e.kind {
            ClientKind::Acquired(_) => report.acquisitions += 1,
            // (4) no client reporting the lock as held outside its server-side lease (when
            // the server's trail is there to say).
            ClientKind::Held(_) | ClientKind::HeldAs(..) if runs.is_empty() => {
                report.held_claims += 1
            }
            ClientKind::Held(token) | ClientKind::HeldAs(token, _) => {
                report.held_claims += 1;
                match by_token.get(&token) {
                    Some(i) if i.start <= e.at_us && e.at_us < i.end => {}
                    Some(i) => report.violations.push(format!(
                        "{}: client {} believed token {token} held {} µs outside its server lease",
                        e.lock,
                        e.client,
                        if e.at_us >= i.end {
                            e.at_us - i.end
                        } else {
                            i.start - e.at_us
                        }
                    )),
                    None => report.violations.push(format!(
                        "{}: client {} held token {token} the server never granted",
                        e.lock, e.client
                    )),
                }
            }
            ClientKind::Lost(_) => report.losses += 1,
        }
    }
    // (4') no two clients believing they hold the same lock at once: each token's span runs
    // from its first to its last held-claim, and spans of a lock never overlap. Needs no
    // server trail, so it also checks stores that keep none (etcd). (An acquire's answer
    // alone is no claim: it may arrive after its lease ended, and the guard then says so.)
    let mut spans: HashMap<(&str, u64), (u64, u64, Hold)> = HashMap::new();
    for e in clients {
        let (lock, token, at, hold) = match e.kind {
            ClientKind::Held(t) => (e.lock.as_str(), t, e.at_us, Hold::Exclusive),
            ClientKind::HeldAs(t, hold) => (e.lock.as_str(), t, e.at_us, hold),
            ClientKind::Acquired(_) | ClientKind::Lost(_) => continue,
        };
        let span = spans.entry((lock, token)).or_insert((at, at, hold));
        span.0 = span.0.min(at);
        span.1 = span.1.max(at);
    }
    let mut by_lock: HashMap<&str, Vec<Interval>> = HashMap::new();
    for ((lock, token), (start, end, hold)) in spans {
        by_lock.entry(lock).or_default().push(Interval {
            token,
            start,
            end,
            hold,
        });
    }
    for (lock, mut list) in by_lock {
        list.sort_by_key(|i| (i.start, i.token));
        for (i, running) in overlaps(&list) {
            report.violations.push(format!(
                "{lock}: clients believed token {} ({:?}) held at once with tokens {running:?}",
                i.token, i.hold
            ));
        }
    }
    // (2) no stale write accepted.
    let mut highest: HashMap<&str, u64> = HashMap::new();
    for w in writes {
        if w.accepted {
            report.writes_accepted += 1;
            let highest = highest.entry(&w.lock).or_default();
            if w.token < *highest {
                report.violations.push(format!(
                    "stale write accepted: {} wrote {} with token {} after {highest}",
                    w.client, w.lock, w.token
                ));
            }
            *highest = (*highest).max(w.token);
        } else {
            report.writes_rejected += 1;
        }
    }
    report
}

/// The same client claims, as if every semaphore had one permit fewer and readers were
/// writers: the negative control of a clean run with several holders at once, whose check
/// must then find overlaps.
pub fn stricter(events: impl IntoIterator<Item = ClientEvent>) -> Vec<ClientEvent> {
    (events.into_iter())
        .map(|mut e| {
            if let ClientKind::HeldAs(token, hold) = e.kind {
                e.kind = match hold {
                    Hold::Permit(n) if n > 1 => ClientKind::HeldAs(token, Hold::Permit(n - 1)),
                    _ => ClientKind::Held(token),
                };
            }
            e
        })
        .collect()
}

/// Reads an event log written by `leasehold-server --event-log`.
pub fn read_event_log(path: &std::path::Path) -> Vec<StoreEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
