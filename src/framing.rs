//! A session's frames (docs/protocol.md §3.15): their encoding, their decoding, and the
//! queue of frames waiting to be sent.
//!
//! Both ends use this: the SDK to send operations and read answers, the server to read
//! operations and send answers. A frame is a 4-byte big-endian length (of what follows it),
//! a fixed header and a JSON body, the same JSON the plain endpoint takes or answers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use tokio::time::Instant;

/// Bytes of an operation frame's header after the length: the id and the op.
pub(crate) const OP_HEADER: usize = 8 + 1;
/// Bytes of an answer frame's header after the length: the id, the status, `Retry-After`.
pub(crate) const ANSWER_HEADER: usize = 8 + 2 + 4;

/// What an operation frame asks for: the plain endpoint it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// No answer wanted any more: end the operation with this id, as a reset stream would.
    Abandon = 0,
    Acquire = 1,
    Renew = 2,
    Release = 3,
    Cancel = 4,
    Revoke = 5,
    Proclaim = 6,
}

impl Op {
    pub(crate) fn from_byte(byte: u8) -> Option<Op> {
        Some(match byte {
            0 => Op::Abandon,
            1 => Op::Acquire,
            2 => Op::Renew,
            3 => Op::Release,
            4 => Op::Cancel,
            5 => Op::Revoke,
            6 => Op::Proclaim,
            _ => return None,
        })
    }
}

/// Appends an operation frame to `out`.
pub(crate) fn put_op(out: &mut BytesMut, id: u64, op: Op, body: &[u8]) {
    out.reserve(4 + OP_HEADER + body.len());
    out.put_u32((OP_HEADER + body.len()) as u32);
    out.put_u64(id);
    out.put_u8(op as u8);
    out.put_slice(body);
}

/// Appends an answer frame to `out`. `retry_after`: whole seconds, 0 for none.
pub(crate) fn put_answer(out: &mut BytesMut, id: u64, status: u16, retry_after: u32, body: &[u8]) {
    out.reserve(4 + ANSWER_HEADER + body.len());
    out.put_u32((ANSWER_HEADER + body.len()) as u32);
    out.put_u64(id);
    out.put_u16(status);
    out.put_u32(retry_after);
    out.put_slice(body);
}

/// The next whole frame at the front of `buf` (its length prefix removed), or `None` until
/// more bytes arrive. `Err(length)` when the frame announces more than `max` bytes or fewer
/// than `min`: the stream cannot be trusted past it.
pub(crate) fn next_frame(buf: &mut BytesMut, min: usize, max: usize) -> Result<Option<Bytes>, u32> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (length as usize) < min || length as usize > max {
        return Err(length);
    }
    if buf.len() < 4 + length as usize {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(length as usize).freeze()))
}

/// An operation frame, parsed.
#[derive(Debug)]
pub(crate) struct OpFrame {
    pub id: u64,
    /// `None`: an op byte this end does not know.
    pub op: Option<Op>,
    pub body: Bytes,
}

/// Parses a frame from [`next_frame`] (at least [`OP_HEADER`] bytes long).
pub(crate) fn op_frame(mut frame: Bytes) -> OpFrame {
    let id = frame.get_u64();
    let op = Op::from_byte(frame.get_u8());
    OpFrame {
        id,
        op,
        body: frame,
    }
}

/// An answer frame, parsed.
#[derive(Debug)]
pub(crate) struct AnswerFrame {
    pub id: u64,
    pub status: u16,
    /// Whole seconds; 0: none.
    pub retry_after: u32,
    pub body: Bytes,
}

/// Parses a frame from [`next_frame`] (at least [`ANSWER_HEADER`] bytes long).
pub(crate) fn answer_frame(mut frame: Bytes) -> AnswerFrame {
    AnswerFrame {
        id: frame.get_u64(),
        status: frame.get_u16(),
        retry_after: frame.get_u32(),
        body: frame,
    }
}

/// Frames waiting to be sent, shared by whoever queues them and the task that sends them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<Queued>,
}

#[derive(Debug, Default)]
struct Queued {
    bytes: BytesMut,
    /// Filled with the instant the queued frames leave (see `client/stamped.rs`).
    stamps: Vec<Arc<OnceLock<Instant>>>,
    /// The sender, waiting for frames.
    waker: Option<Waker>,
    closed: bool,
}

impl Outbox {
    /// Queues frames written by `write`. `stamp`, if given, learns when they leave. Returns
    /// false, queueing nothing, once the outbox is closed.
    pub fn push(
        &self,
        stamp: Option<Arc<OnceLock<Instant>>>,
        write: impl FnOnce(&mut BytesMut),
    ) -> bool {
        let waker = {
            let mut queued = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if queued.closed {
                return false;
            }
            write(&mut queued.bytes);
            queued.stamps.extend(stamp);
            queued.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Ready once frames are queued or the outbox is closed.
    pub fn poll_queued(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut queued = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if queued.bytes.is_empty() && !queued.closed {
            queued.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    /// Drops the waker `poll_queued` left: the sender will look again by itself.
    pub fn forget_waker(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).waker = None;
    }

    /// Takes every frame queued so far, as one chunk, so that operations queued while the
    /// connection was busy share one write; `None` once closed and empty.
    pub fn take(&self) -> Option<Bytes> {
        let mut queued = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if queued.bytes.is_empty() && queued.closed {
            return None;
        }
        if !queued.stamps.is_empty() {
            let now = Instant::now();
            for stamp in queued.stamps.drain(..) {
                stamp.get_or_init(|| now);
            }
        }
        Some(queued.bytes.split().freeze())
    }

    /// Refuses later pushes; what is queued is still taken.
    pub fn close(&self) {
        let waker = {
            let mut queued = self.state.lock().unwrap_or_else(|p| p.into_inner());
            queued.closed = true;
            queued.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut wire = BytesMut::new();
        put_op(&mut wire, 7, Op::Acquire, br#"{"name":"a"}"#);
        put_op(&mut wire, 8, Op::Abandon, b"");
        let all = wire.freeze();
        // Fed one byte at a time, the same two frames come out.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in all.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = next_frame(&mut buf, OP_HEADER, 1024).unwrap() {
                frames.push(op_frame(frame));
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].id, frames[0].op), (7, Some(Op::Acquire)));
        assert_eq!(&frames[0].body[..], br#"{"name":"a"}"#);
        assert_eq!((frames[1].id, frames[1].op), (8, Some(Op::Abandon)));
        assert!(frames[1].body.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn answers_round_trip() {
        let mut wire = BytesMut::new();
        put_answer(&mut wire, u64::MAX, 429, 3, b"{}");
        let frame = next_frame(&mut wire, ANSWER_HEADER, 64).unwrap().unwrap();
        let answer = answer_frame(frame);
        assert_eq!(
            (answer.id, answer.status, answer.retry_after),
            (u64::MAX, 429, 3)
        );
        assert_eq!(&answer.body[..], b"{}");
    }

    #[test]
    fn lengths_out_of_bounds_are_refused_before_any_byte_is_awaited() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3][..]);
        assert_eq!(next_frame(&mut buf, OP_HEADER, 1024), Err(3));
        let mut buf = BytesMut::from(&[0u8, 1, 0, 0][..]);
        assert_eq!(next_frame(&mut buf, OP_HEADER, 1024), Err(65536));
    }

    #[test]
    fn unknown_ops_parse_as_none() {
        let mut wire = BytesMut::new();
        put_op(&mut wire, 1, Op::Renew, b"");
        wire[4 + 8] = 200;
        let frame = next_frame(&mut wire, OP_HEADER, 64).unwrap().unwrap();
        assert_eq!(op_frame(frame).op, None);
    }
}
