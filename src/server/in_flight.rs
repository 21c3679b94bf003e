//! How many acquire requests each project has in flight: a waiter is a long poll held open,
//! so this bounds a project's waiters, and what they cost the server, even in open mode.

use crate::server::store::ProjectId;
use std::collections::HashMap;
use std::sync::Mutex;

/// Acquires in flight per project, up to a limit.
#[derive(Debug)]
pub(crate) struct AcquiresInFlight {
    max: usize,
    counts: Mutex<HashMap<ProjectId, usize>>,
}

/// One acquire in flight; counted off on drop.
#[derive(Debug)]
pub(crate) struct InFlight<'a> {
    of: &'a AcquiresInFlight,
    project: ProjectId,
}

impl AcquiresInFlight {
    pub fn new(max: usize) -> AcquiresInFlight {
        AcquiresInFlight {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more acquire of `project`; `None` if it has `max` in flight already.
    pub fn enter(&self, project: ProjectId) -> Option<InFlight<'_>> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(project).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(InFlight { of: self, project })
    }

    /// The most a project may have in flight.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.project) {
            *count -= 1;
            if *count == 0 {
                // Projects that have nothing in flight cost no entry.
                counts.remove(&self.project);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_project_has_its_own_count_and_entries_leave_on_drop() {
        let in_flight = AcquiresInFlight::new(2);
        let a1 = in_flight.enter(1).unwrap();
        let _a2 = in_flight.enter(1).unwrap();
        assert!(in_flight.enter(1).is_none());
        let _b = in_flight.enter(2).unwrap();
        drop(a1);
        assert!(in_flight.enter(1).is_some());
    }
}
