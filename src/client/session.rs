//! The SDK's end of a session (docs/protocol.md §3.15): a connection of its own to a server,
//! upgraded from HTTP/1.1, that carries the client's lock operations as small frames and
//! their answers back.
//!
//! Why: a plain request costs a stream, a header block each way, and on each side a few
//! task switches between the caller, the HTTP machinery and the connection. A frame costs a
//! few bytes; one task here writes every frame queued meanwhile in one write and hands each
//! answer straight to its caller, and one task on the server reads, runs and answers them.
//! The operations and their answers are exactly the plain endpoints', so the retry loop in
//! `transport.rs` treats a frame like a request: a session that ends or stalls fails its
//! operations as retryable, and they are sent again (on a new session, or as plain
//! requests while one opens).

use crate::framing::{self, ANSWER_HEADER, Op, Outbox};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

/// Most operations one session keeps in flight; more wait in the client for a slot.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;
/// Of those, how many acquires (and revocations): the rest stay free for renewals,
/// releases and cancels, so that a client with a full queue of waiters still renews on
/// time. Each grant frees a slot for the next acquire.
const MAX_ACQUIRES_IN_FLIGHT: usize = MAX_IN_FLIGHT - 512;
/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 16 << 10;
/// Longest wait to close a session's side of its connection (TLS sends a last record).
const SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// One answer, as the transport reads a plain response.
#[derive(Debug)]
pub(crate) struct Answered {
    pub status: u16,
    pub retry_after: u32,
    pub body: Bytes,
    /// When the operation's frame left the client.
    pub left: Option<Instant>,
}

/// Why an operation got no answer.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// The session ended (closed by the server, or its connection failed) first.
    Ended,
}

/// Operations waiting for their answers.
#[derive(Default)]
struct Waiting {
    answers: Mutex<HashMap<u64, oneshot::Sender<framing::AnswerFrame>>>,
    /// The answer stream has ended: nothing more will be answered.
    ended: AtomicBool,
}

/// One open session.
pub(crate) struct Session {
    outbox: Arc<Outbox>,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
    slots: Semaphore,
    acquire_slots: Semaphore,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ended", &self.is_ended())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session over `io`, a connection the server has just upgraded; a task of its own
    /// writes the frames and reads the answers.
    pub fn start(io: impl AsyncRead + AsyncWrite + Send + 'static, max_answer: usize) -> Session {
        let outbox = Arc::new(Outbox::default());
        let waiting = Arc::new(Waiting::default());
        tokio::spawn(drive(io, outbox.clone(), waiting.clone(), max_answer));
        Session {
            outbox,
            waiting,
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            acquire_slots: Semaphore::new(MAX_ACQUIRES_IN_FLIGHT),
        }
    }

    /// Whether the session can take no more operations.
    pub fn is_ended(&self) -> bool {
        self.waiting.ended.load(Ordering::Relaxed) || self.outbox.is_closed()
    }

    /// Sends one operation and waits for its answer.
    ///
    /// # Cancel safety
    /// Dropping the future before the answer abandons the operation: an abandon frame tells
    /// the server to drop it, as a reset stream would, and a late answer is ignored.
    pub async fn call(&self, op: Op, body: &[u8]) -> Result<Answered, Unanswered> {
        let _acquire_slot = match op {
            Op::Acquire | Op::Revoke => Some(
                self.acquire_slots
                    .acquire()
                    .await
                    .map_err(|_| Unanswered::Ended)?,
            ),
            _ => None,
        };
        let _slot = self.slots.acquire().await.map_err(|_| Unanswered::Ended)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut answers = self
                .waiting
                .answers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Checked under the lock the reader empties the map under: an operation is
            // either seen by the reader's final sweep or refused here.
            if self.waiting.ended.load(Ordering::Relaxed) {
                return Err(Unanswered::Ended);
            }
            answers.insert(id, tx);
        }
        let mut pending = Pending {
            session: self,
            id,
            answered: false,
        };
        let stamp = Arc::new(OnceLock::new());
        if !self.outbox.push(Some(stamp.clone()), |out| {
            framing::put_op(out, id, op, body)
        }) {
            return Err(Unanswered::Ended);
        }
        let answer = rx.await.map_err(|_| Unanswered::Ended)?;
        pending.answered = true;
        Ok(Answered {
            status: answer.status,
            retry_after: answer.retry_after,
            body: answer.body,
            left: stamp.get().copied(),
        })
    }
}

impl Drop for Session {
    /// The client let go of the session: end its request, which ends it on the server.
    fn drop(&mut self) {
        self.outbox.close();
    }
}

/// An operation in flight; abandons it if dropped unanswered.
struct Pending<'a> {
    session: &'a Session,
    id: u64,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let removed = self
            .session
            .waiting
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        // Still waiting (not ended with the session): tell the server to drop it.
        if removed.is_some() {
            let id = self.id;
            self.session
                .outbox
                .push(None, |out| framing::put_op(out, id, Op::Abandon, b""));
        }
    }
}

/// Writes queued frames and reads answers, handing each to its operation, until the
/// connection fails or closes, or the client lets go of the session; then fails every
/// operation still waiting.
async fn drive(
    io: impl AsyncRead + AsyncWrite,
    outbox: Arc<Outbox>,
    waiting: Arc<Waiting>,
    max_answer: usize,
) {
    // Also when the task is dropped unfinished: its runtime shut down, and with it the
    // connection; the operations must fail over, not wait for answers that cannot come.
    let _end = EndOnDrop(waiting.clone(), outbox.clone());
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Bytes::new();
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        // Biased: hand out the answers that have come before writing more.
        tokio::select! {
            biased;
            got = reader.read_buf(&mut buf) => {
                match got {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
                let mut answered = 0;
                loop {
                    match framing::next_frame(&mut buf, ANSWER_HEADER, max_answer) {
                        Ok(Some(frame)) => {
                            let answer = framing::answer_frame(frame);
                            let tx = waiting
                                .answers
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&answer.id);
                            if let Some(tx) = tx {
                                answered += usize::from(tx.send(answer).is_ok());
                            }
                        }
                        Ok(None) => break,
                        Err(length) => {
                            tracing::debug!(length, "a session sent a malformed frame");
                            return;
                        }
                    }
                }
                // Let the callers just answered run first (they are queued on this thread):
                // what they send next then leaves in this task's next write, together. With
                // several, their frames must not wake this task meanwhile, or it would write
                // the first caller's frame alone, and so on (with 32 callers: 1.8 frames per
                // write); it resumes once this thread has run them. A single caller's next
                // frame wakes it at once instead, as nothing else could join it.
                if answered > 1 {
                    outbox.forget_waker();
                }
                tokio::task::yield_now().await;
            }
            () = std::future::poll_fn(|cx| outbox.poll_queued(cx)), if out.is_empty() => {
                match outbox.take() {
                    Some(chunk) => out = chunk,
                    None => {
                        // The client let go, so no operation waits for an answer: close our
                        // side (the server then ends the session) and stop, without waiting
                        // on a server that may be out of reach.
                        let _ = tokio::time::timeout(SHUTDOWN, writer.shutdown()).await;
                        return;
                    }
                }
            }
            written = writer.write_buf(&mut out), if !out.is_empty() => {
                match written {
                    // TLS keeps what it was given until flushed.
                    Ok(n) if n > 0 => {
                        if out.is_empty() && writer.flush().await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        }
    }
}

/// Ends the session when its task ends, however it ends.
struct EndOnDrop(Arc<Waiting>, Arc<Outbox>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.1.close();
        let orphans = {
            let mut answers = self.0.answers.lock().unwrap_or_else(|p| p.into_inner());
            self.0.ended.store(true, Ordering::Relaxed);
            std::mem::take(&mut *answers)
        };
        // Dropping the senders fails their operations as unanswered: the transport retries
        // them.
        drop(orphans);
    }
}
