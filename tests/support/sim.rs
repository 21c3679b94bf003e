//! The deterministic simulation's glue: the server's [`Listener`] and the SDK's [`Connect`]
//! over turmoil's simulated TCP, the simulated clock, and the server's audit trail placed on
//! that clock.
//!
//! Turmoil runs every host on a paused tokio clock that it advances itself, so the server's
//! and the clients' `tokio::time::Instant`s are simulated. The audit trail, though, stamps
//! events with `origin_wall + (simulated time since the store opened)`, where `origin_wall`
//! is the real wall clock read when the store opened: every server run has its own unknown
//! offset from simulated time, and real time runs at another pace than simulated time. So
//! each run's events are received by a task on the server host that notes the simulated time
//! of receipt: on a paused clock, time only moves when every task is idle, so an event is
//! received at the very simulated instant it was emitted, and the run's offset is the largest
//! `at_us - received` seen. Every time handed to `history::check` is then simulated µs.

use leasehold::server::store::{EventKind, EventSink, StoreEvent};
use leasehold::server::{AcceptFuture, Listener};
use leasehold::{Connect, ConnectFuture, Io};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Simulated time since the simulation began, in µs. Call it on a simulated host only.
pub fn now_us() -> u64 {
    turmoil::sim_elapsed()
        .expect("the simulated clock is read on a simulated host")
        .as_micros() as u64
}

/// The server's connections, from turmoil's simulated TCP.
pub struct SimListener(pub turmoil::net::TcpListener);

impl Listener for SimListener {
    fn accept(&mut self) -> AcceptFuture<'_> {
        Box::pin(async move {
            let (stream, _) = self.0.accept().await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// The SDK's connections, over turmoil's simulated TCP (host names are turmoil's).
#[derive(Debug, Clone, Copy)]
pub struct SimConnect;

impl Connect for SimConnect {
    fn connect(&self, host: &str, port: u16) -> ConnectFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host, port)).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }
}

/// The audit trail of one server run.
pub struct Run {
    /// Kept here, not in the server host, so that a crash loses no event.
    rx: Mutex<mpsc::UnboundedReceiver<StoreEvent>>,
    /// Events received on the server host, with the simulated time of receipt.
    received: Mutex<Vec<(StoreEvent, u64)>>,
}

impl Run {
    /// Receives the run's events as they come, noting the simulated time. Never returns;
    /// run it on the server host, beside the server.
    pub async fn forward(&self) {
        loop {
            let next = std::future::poll_fn(|cx| self.rx.lock().unwrap().poll_recv(cx)).await;
            match next {
                Some(event) => self.received.lock().unwrap().push((event, now_us())),
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// What the simulation's checks learn from the server runs.
#[derive(Debug, Default)]
pub struct Trail {
    /// Each run's events in order, every time in simulated µs.
    pub runs: Vec<Vec<StoreEvent>>,
    /// Events received later than they were emitted (a crash came first, or the receiving
    /// task ran a tick late); their times are still exact, from the run's offset.
    pub late: usize,
}

/// The audit trails of all server runs of one simulation, in order.
#[derive(Clone, Default)]
pub struct ServerRuns(Arc<Mutex<Vec<Arc<Run>>>>);

impl ServerRuns {
    /// The sink of a new server run, and the run to [`forward`](Run::forward).
    pub fn start(&self) -> (EventSink, Arc<Run>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let run = Arc::new(Run {
            rx: Mutex::new(rx),
            received: Mutex::default(),
        });
        self.0.lock().unwrap().push(run.clone());
        (tx, run)
    }

    /// Every run's events on the simulated clock. Call it once the simulation is over.
    pub fn trail(&self) -> Trail {
        let mut trail = Trail::default();
        for (index, run) in self.0.lock().unwrap().iter().enumerate() {
            let mut events: Vec<(StoreEvent, Option<u64>)> = run
                .received
                .lock()
                .unwrap()
                .drain(..)
                .map(|(e, at)| (e, Some(at)))
                .collect();
            let mut rx = run.rx.lock().unwrap();
            while let Ok(event) = rx.try_recv() {
                events.push((event, None));
            }
            let Some(offset) = events
                .iter()
                .filter_map(|(e, received)| Some(i128::from(e.at_us) - i128::from((*received)?)))
                .max()
            else {
                assert!(
                    events.is_empty(),
                    "server run {index}: {} events, none received on the server host: \
                     cannot place them in simulated time",
                    events.len()
                );
                trail.runs.push(Vec::new());
                continue;
            };
            let sim = |wall_us: u64| -> u64 {
                u64::try_from(i128::from(wall_us) - offset)
                    .expect("an event of a run is not older than the run")
            };
            trail.late += events
                .iter()
                .filter(|(e, received)| {
                    received.is_none_or(|r| i128::from(e.at_us) - i128::from(r) != offset)
                })
                .count();
            trail.runs.push(
                events
                    .into_iter()
                    .map(|(mut e, _)| {
                        e.at_us = sim(e.at_us);
                        match &mut e.kind {
                            EventKind::Granted { deadline_us, .. }
                            | EventKind::Deadline { deadline_us, .. }
                            | EventKind::Expired { deadline_us, .. } => {
                                *deadline_us = sim(*deadline_us);
                            }
                            EventKind::Released { .. }
                            | EventKind::Revoked { .. }
                            | EventKind::Cancelled { .. }
                            | EventKind::Proclaimed { .. }
                            | EventKind::WaiterLeft { .. } => {}
                        }
                        e
                    })
                    .collect(),
            );
        }
        trail
    }
}
