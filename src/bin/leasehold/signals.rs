//! The signals `run` passes on to the command.

use std::io;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The signals passed on to the command: SIGINT, SIGTERM, SIGHUP.
///
/// Once these are handled here they no longer end leasehold by themselves: while it
/// waits for the lock they end the wait, and while the command runs they go to the command.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> libc::c_int {
        tokio::select! {
            Some(()) = self.interrupt.recv() => libc::SIGINT,
            Some(()) = self.terminate.recv() => libc::SIGTERM,
            Some(()) = self.hangup.recv() => libc::SIGHUP,
            else => std::future::pending().await,
        }
    }
}
