//! The renewal task's mailbox: guards and acquires leave commands here, and the task is
//! woken only when it must act before its next planned wake-up.
//!
//! With a plain channel every acquire and release would wake the task (two cross-thread
//! wake-ups per lock taken); here a short-lived guard costs none. Senders never block and
//! need no runtime, so `Drop` can use it.

use crate::client::renewer::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Shared between the senders and the task.
pub(crate) struct Mailbox {
    inbox: Mutex<Vec<Command>>,
    wake: Notify,
    /// The task's next planned wake-up, in µs after `base` (`u64::MAX`: none).
    planned: AtomicU64,
    base: Instant,
    senders: AtomicUsize,
    /// Set when the task is gone (its runtime shut down): senders then report failure.
    closed: AtomicBool,
}

/// A sending handle. Cheap to clone; the task ends once every handle is dropped.
pub(crate) struct Commands(Arc<Mailbox>);

/// What the task holds.
pub(crate) struct Inbox(Arc<Mailbox>);

/// A new mailbox: the handle for senders, and the task's end.
pub(crate) fn mailbox() -> (Commands, Inbox) {
    let mailbox = Arc::new(Mailbox {
        inbox: Mutex::new(Vec::new()),
        wake: Notify::new(),
        planned: AtomicU64::new(u64::MAX),
        base: Instant::now(),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
    });
    (Commands(mailbox.clone()), Inbox(mailbox))
}

impl Mailbox {
    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }
}

impl Commands {
    /// Leaves `command`; wakes the task if it must see it before `act_by` and would not.
    /// Returns false if the task is gone.
    pub fn send(&self, command: Command, act_by: Option<Instant>) -> bool {
        let mailbox = &self.0;
        if mailbox.closed.load(Ordering::SeqCst) {
            return false;
        }
        mailbox
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(command);
        // After the push: either the task, publishing a later plan, then sees the command,
        // or this sees that plan and wakes it (see `Inbox::plan`).
        let urgent = match act_by {
            None => true,
            Some(at) => mailbox.micros(at) < mailbox.planned.load(Ordering::SeqCst),
        };
        if urgent {
            mailbox.wake.notify_one();
        }
        true
    }

    /// Leaves `command` for whenever the task next wakes up, without waking it.
    pub fn leave(&self, command: Command) {
        if !self.is_closed() {
            self.0
                .inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(command);
        }
    }

    /// True once the task is gone.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }
}

impl Clone for Commands {
    fn clone(&self) -> Commands {
        self.0.senders.fetch_add(1, Ordering::SeqCst);
        Commands(self.0.clone())
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last one: let the task see that nobody is left.
            self.0.wake.notify_one();
        }
    }
}

impl Inbox {
    /// Takes every command left so far.
    pub fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.0.inbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Publishes the next planned wake-up. Returns false if commands arrived meanwhile:
    /// look at them before sleeping.
    pub fn plan(&self, wake: Option<Instant>) -> bool {
        let planned = wake.map_or(u64::MAX, |at| self.0.micros(at));
        self.0.planned.store(planned, Ordering::SeqCst);
        self.0
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Resolves when a sender wants the task awake.
    pub async fn woken(&self) {
        self.0.wake.notified().await;
    }

    /// True once every sender is gone.
    pub fn abandoned(&self) -> bool {
        self.0.senders.load(Ordering::SeqCst) == 0
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
    }
}
