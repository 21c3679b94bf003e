//! The waiting half of an acquire, and what happens when its long poll goes away.

use super::Shared;
use super::lock_state::{Listener, News, PollEnd};
use crate::id::Id;
use crate::server::store::AcquireOutcome;
use tokio::sync::oneshot;

impl Listener for oneshot::Sender<News> {
    fn deliver(self, news: News) -> bool {
        self.send(news).is_ok()
    }

    fn is_closed(&self) -> bool {
        oneshot::Sender::is_closed(self)
    }
}

/// A long poll waiting for its grant. Dropping it (client gone) detaches the waiter, and
/// hands back a grant that was delivered but never answered.
pub(super) struct PendingWait<'a> {
    shared: &'a Shared,
    key: Box<[u8]>,
    fingerprint: u64,
    request_id: Id,
    /// `None` once the wait has an answer.
    rx: Option<oneshot::Receiver<News>>,
    /// When the store began this call (µs since origin).
    started: u64,
}

impl<'a> PendingWait<'a> {
    pub fn new(
        shared: &'a Shared,
        key: Box<[u8]>,
        fingerprint: u64,
        request_id: Id,
        rx: oneshot::Receiver<News>,
        started: u64,
    ) -> PendingWait<'a> {
        PendingWait {
            shared,
            key,
            fingerprint,
            request_id,
            rx: Some(rx),
            started,
        }
    }

    /// The grant (or a successor reservation), once made; `None` if the waiter was handed
    /// to a newer poll of the same request.
    pub async fn wait(&mut self) -> Option<News> {
        let news = self.rx.as_mut()?.await.ok()?;
        self.rx = None;
        Some(news)
    }

    /// Ends the wait after its time ran out: a grant that raced wins, else the waiter leaves
    /// the line (`timed_out`) or detaches to wait for the next poll.
    pub fn finish(mut self, timed_out: bool) -> AcquireOutcome {
        self.rx = None;
        let (shared, started, request_id) = (self.shared, self.started, self.request_id);
        shared
            .on_lock(&self.key, self.fingerprint, |lock, tick, fx| {
                match lock.finish_poll(request_id, timed_out, started, tick, fx) {
                    PollEnd::Granted(grant) => AcquireOutcome::Granted(grant),
                    PollEnd::StillWaiting(position, next) => {
                        AcquireOutcome::StillWaiting { position, next }
                    }
                    PollEnd::TimedOut => AcquireOutcome::TimedOut {
                        holder: lock
                            .holders()
                            .first()
                            .map(|h| h.view(tick.now, shared.origin_wall)),
                    },
                }
            })
            .unwrap_or(AcquireOutcome::TimedOut { holder: None })
    }
}

impl Drop for PendingWait<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let delivered = match rx.try_recv() {
            Ok(News::Granted(grant)) => Some(grant.fencing_token),
            // A reservation told and never answered stays: the next poll hears of it.
            Ok(News::Next(_)) | Err(_) => None,
        };
        drop(rx);
        let request_id = self.request_id;
        self.shared
            .on_lock(&self.key, self.fingerprint, |lock, tick, fx| {
                lock.poll_dropped(request_id, delivered, tick, fx)
            });
    }
}
