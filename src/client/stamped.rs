//! A request body that notes when the connection first asks for it: the moment the request
//! really leaves the client.
//!
//! A lease is counted from when its request was sent. Taking `Instant::now()` before handing
//! the request to hyper counts from too early under load: the request may then wait inside
//! the client (for a stream of the shared HTTP/2 connection, a pooled connection, or a turn
//! of the runtime) for longer than the lease, and the grant would arrive already expired.
//! The connection polls the body only once it writes this request; the server cannot act on
//! a request before it has read the body, so its clock starts after this moment, which keeps
//! the count safe while starting it as late as possible.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::time::Instant;

/// `Full<Bytes>` that records its first poll.
#[derive(Debug)]
pub(crate) struct StampedBody {
    inner: Full<Bytes>,
    polled: Arc<OnceLock<Instant>>,
}

impl StampedBody {
    /// The body, and where the instant of its first poll will appear.
    pub fn new(bytes: Bytes) -> (StampedBody, Arc<OnceLock<Instant>>) {
        let polled = Arc::new(OnceLock::new());
        let body = StampedBody {
            inner: Full::new(bytes),
            polled: polled.clone(),
        };
        (body, polled)
    }
}

impl Body for StampedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polled.get_or_init(Instant::now);
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
