//! How many bytes of request bodies the server holds in memory at once: a budget for the
//! whole server, and a smaller one for each project.
//!
//! A body is read into memory before it is parsed, and a client may send it slowly. Without
//! a budget, a few thousand streams each trickling in a body just under the size limit pin
//! gigabytes. Every body now reserves its bytes as they arrive (all at once when it declares
//! its length); a reservation that does not fit is refused with `503` and `Retry-After`, and
//! the bytes are given back when the request has been parsed. The per-project budget keeps
//! one tenant from using up the whole server's: the SDK's own bodies are small, so a project
//! that sends only those never comes near it.

use crate::server::store::ProjectId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The server's budgets for buffered request bodies.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    global: Arc<Semaphore>,
    per_project: usize,
    projects: Mutex<HashMap<ProjectId, Arc<Semaphore>>>,
}

/// Which budget a body did not fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exhausted {
    /// The caller's project holds its whole share in bodies being read.
    Project(usize),
    /// The server holds its whole budget in bodies being read.
    Server(usize),
}

/// Bytes one body holds of both budgets; given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    global: (Arc<Semaphore>, Option<OwnedSemaphorePermit>),
    project: (Arc<Semaphore>, Option<OwnedSemaphorePermit>),
    bytes: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes for the server, a quarter of it for each project.
    pub fn new(total: usize) -> BodyBudget {
        // Semaphores count at most `usize::MAX >> 3` permits.
        let total = total.min(Semaphore::MAX_PERMITS);
        BodyBudget {
            global: Arc::new(Semaphore::new(total)),
            per_project: (total / 4).max(1),
            projects: Mutex::new(HashMap::new()),
        }
    }

    /// An empty reservation for a body of `project`'s.
    pub fn reserve(&self, project: ProjectId) -> Reservation {
        let semaphore = self
            .projects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(project)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_project)))
            .clone();
        Reservation {
            global: (self.global.clone(), None),
            project: (semaphore, None),
            bytes: 0,
        }
    }

    /// The server-wide budget, in bytes.
    #[cfg(test)]
    fn total(&self) -> usize {
        self.global.available_permits()
    }
}

impl Reservation {
    /// Grows the reservation to `bytes` (never shrinks it).
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), Exhausted> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let more = bytes - self.bytes;
        let Ok(count) = u32::try_from(more) else {
            return Err(Exhausted::Server(more));
        };
        let project = self.project.0.clone().try_acquire_many_owned(count);
        let project = project.map_err(|_| Exhausted::Project(bytes))?;
        let global = self.global.0.clone().try_acquire_many_owned(count);
        let global = global.map_err(|_| Exhausted::Server(bytes))?;
        merge(&mut self.project.1, project);
        merge(&mut self.global.1, global);
        self.bytes = bytes;
        Ok(())
    }
}

fn merge(held: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match held {
        Some(permit) => permit.merge(more),
        None => *held = Some(more),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_gets_a_quarter_and_bytes_come_back_on_drop() {
        let budget = BodyBudget::new(4000);
        let mut first = budget.reserve(1);
        first.grow_to(600).unwrap();
        first.grow_to(1000).unwrap();
        let mut second = budget.reserve(1);
        assert_eq!(second.grow_to(1), Err(Exhausted::Project(1)));
        // Another project has its own share.
        let mut other = budget.reserve(2);
        other.grow_to(1000).unwrap();
        assert_eq!(budget.total(), 2000);
        drop(first);
        second.grow_to(1000).unwrap();
        drop((second, other));
        assert_eq!(budget.total(), 4000);
    }

    #[test]
    fn the_server_budget_bounds_every_project_together() {
        let budget = BodyBudget::new(4000);
        let mut held: Vec<Reservation> = (0..4)
            .map(|p| {
                let mut r = budget.reserve(p);
                r.grow_to(1000).unwrap();
                r
            })
            .collect();
        let mut fifth = budget.reserve(4);
        assert_eq!(fifth.grow_to(10), Err(Exhausted::Server(10)));
        held.pop();
        fifth.grow_to(10).unwrap();
    }
}
