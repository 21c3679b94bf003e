//! `GET /v1/events`: the console's live view of a project's store events, as a long poll
//! (a request carries its key in a header, which the browser's `EventSource` cannot send).
//!
//! The server keeps the last [`KEPT`] events of all projects in a ring; a poll returns the
//! caller's project's events after its cursor, or waits for some.

use crate::server::auth::Caller;
use crate::server::http::{App, Failure, Reply, bad, json_reply};
use crate::server::listing::{number, query_params};
use crate::server::store::{EventKind, StoreEvent};
use http::StatusCode;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Path of the event poll.
pub(crate) const PATH_EVENTS: &str = "/v1/events";
/// Events kept for polls, over all projects.
const KEPT: usize = 10_000;
/// Most events in one answer.
const MAX_BATCH: usize = 500;
/// Events a first poll (without a cursor) gets: the project's most recent ones.
const FIRST_BATCH: usize = 50;

/// The recent events of every project, numbered in the order the store made them.
#[derive(Debug)]
pub(crate) struct EventHub {
    ring: Mutex<VecDeque<(u64, StoreEvent)>>,
    /// The number of the latest event.
    latest: watch::Sender<u64>,
}

/// One event as a poll shows it.
#[derive(Serialize)]
struct WireEvent<'a> {
    seq: u64,
    at_us: u64,
    lock: &'a str,
    #[serde(flatten)]
    kind: &'a EventKind,
}

#[derive(Serialize)]
struct EventBatch<'a> {
    events: Vec<WireEvent<'a>>,
    /// The cursor of the next poll.
    next: u64,
    /// Whether events after the cursor were dropped (too many, or the server restarted).
    missed: bool,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            ring: Mutex::new(VecDeque::new()),
            latest: watch::channel(0).0,
        }
    }
}

impl EventHub {
    /// Keeps the store's events for polls; ends when the store drops its sender.
    pub(crate) async fn feed(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<StoreEvent>) {
        while let Some(event) = events.recv().await {
            // Lease extensions come with every renewal: noise to an operator.
            if !matches!(event.kind, EventKind::Deadline { .. }) {
                self.push(event);
            }
        }
    }

    fn push(&self, event: StoreEvent) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *self.latest.borrow() + 1;
        if ring.len() >= KEPT {
            ring.pop_front();
        }
        ring.push_back((seq, event));
        // A notification locks every shard of the channel's waiter list: only worth it
        // with a poll to wake. A poll subscribes before it reads the ring, under the ring's
        // lock (held here), so it either counts here or reads this event from the ring.
        let polled = self.latest.receiver_count() > 0;
        self.latest.send_if_modified(|latest| {
            *latest = seq;
            polled
        });
    }

    /// The answer to a poll of `project` after `after` (the first poll has none); `None`
    /// while there is nothing new.
    fn batch(&self, project: &str, after: Option<u64>) -> Option<Reply> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let latest = *self.latest.borrow();
        let oldest = ring.front().map_or(latest + 1, |(seq, _)| *seq);
        let (from, missed) = match after {
            // A cursor from before a restart, or from another server.
            Some(after) if after > latest => (0, true),
            Some(after) => (after, after + 1 < oldest),
            None => (0, false),
        };
        let mine = ring
            .iter()
            .filter(|(seq, e)| *seq > from && e.project == project);
        let events: Vec<&(u64, StoreEvent)> = if after.is_none() {
            let mut last: Vec<_> = mine.rev().take(FIRST_BATCH).collect();
            last.reverse();
            last
        } else {
            mine.take(MAX_BATCH).collect()
        };
        if events.is_empty() && after.is_some() && !missed {
            return None;
        }
        let next = match events.last() {
            Some((seq, _)) if events.len() == MAX_BATCH => *seq,
            _ => latest,
        };
        let batch = EventBatch {
            events: events
                .iter()
                .map(|(seq, e)| WireEvent {
                    seq: *seq,
                    at_us: e.at_us,
                    lock: &e.lock,
                    kind: &e.kind,
                })
                .collect(),
            next,
            missed,
        };
        Some(json_reply(StatusCode::OK, &batch))
    }
}

impl App {
    /// `GET /v1/events?after=&wait_ms=`: the project's events after the cursor, waiting for
    /// some up to `wait_ms` (at most the server's poll bound).
    pub(crate) async fn events(
        &self,
        caller: &Caller,
        query: Option<&str>,
    ) -> Result<Reply, Failure> {
        let mut after = None;
        let mut wait = self.limits.max_poll;
        for (key, value) in query_params(query, &["after", "wait_ms"])? {
            match key {
                "after" => {
                    after = Some(value.parse::<u64>().map_err(|_| {
                        bad(format!(
                            "after is {value:?}; expected the `next` of the last poll"
                        ))
                    })?)
                }
                _ => {
                    let ms = number(key, &value, u64::MAX)?;
                    wait = wait.min(Duration::from_millis(ms));
                }
            }
        }
        let project = caller.project.id.to_string();
        let mut latest = self.events.latest.subscribe();
        let mut stopping = self.stopping.clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            latest.borrow_and_update();
            if let Some(reply) = self.events.batch(&project, after) {
                return Ok(reply);
            }
            tokio::select! {
                changed = latest.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = crate::server::stopped(&mut stopping) => break,
            }
        }
        let empty = EventBatch {
            events: Vec::new(),
            next: after.unwrap_or_default().min(*self.events.latest.borrow()),
            missed: false,
        };
        Ok(json_reply(StatusCode::OK, &empty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(project: &str, lock: &str) -> StoreEvent {
        StoreEvent {
            at_us: 1,
            project: project.into(),
            lock: lock.into(),
            kind: EventKind::Released { token: 7 },
        }
    }

    /// The JSON of an answer.
    fn body(reply: Reply) -> serde_json::Value {
        use http_body_util::BodyExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = runtime
            .block_on(reply.into_body().collect())
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn polls_see_their_project_after_their_cursor() {
        let hub = EventHub::default();
        hub.push(event("1", "a"));
        hub.push(event("2", "secret"));
        hub.push(event("1", "b"));
        // The first poll: the project's recent events, at once.
        let first = body(hub.batch("1", None).expect("an answer"));
        let locks: Vec<&str> = first["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["lock"].as_str().unwrap())
            .collect();
        assert_eq!(locks, ["a", "b"]);
        assert_eq!(first["next"], 3);
        // Nothing new for project 1 (another project's event does not wake it).
        assert!(hub.batch("1", Some(3)).is_none());
        hub.push(event("2", "other"));
        assert!(hub.batch("1", Some(3)).is_none());
        hub.push(event("1", "c"));
        let next = body(hub.batch("1", Some(3)).expect("an answer"));
        assert_eq!(next["events"][0]["lock"], "c");
        assert_eq!(next["events"][0]["event"], "released");
        assert_eq!(next["next"], 5);
        // A cursor from before a restart starts over, and says so.
        let stale = body(hub.batch("1", Some(99)).expect("an answer"));
        assert_eq!(stale["missed"], true);
    }

    #[test]
    fn old_events_make_room_and_polls_learn_they_missed_some() {
        let hub = EventHub::default();
        for _ in 0..KEPT + 10 {
            hub.push(event("1", "x"));
        }
        let late = body(hub.batch("1", Some(1)).expect("an answer"));
        assert_eq!(late["missed"], true);
        assert_eq!(late["events"].as_array().unwrap().len(), MAX_BATCH);
    }
}
