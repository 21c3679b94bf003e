//! A test kit: a real lock server in your test process, with the hooks tests of lost-lock
//! handling need. Feature `testing`.
//!
//! The server is the real one (memory store, open mode, HTTP on a loopback port): no mock.
//! [`TestServer::revoke`] ends a lease now, as an operator would, and [`TestServer::pause`]
//! makes the server stop answering, so a test can make its code lose a lock without
//! waiting a lease out.
//!
//! ```
//! # #[tokio::main] async fn main() {
//! use leasehold::LostReason;
//! use leasehold::testing::TestServer;
//!
//! let server = TestServer::start().await;
//! let dl = server.client("test-key");
//! let guard = dl.lock("jobs/import").await.unwrap();
//!
//! server.revoke("jobs/import").await;
//! assert_eq!(guard.lost().await, LostReason::Revoked);
//! # }
//! ```
//!
//! # Lease logic on tokio's paused clock
//! Code that plans work against a lease's deadline is best written against the deadline
//! itself ([`LockGuard::valid_until`](crate::LockGuard::valid_until)), and tested with
//! `#[tokio::test(start_paused = true)]`: tokio's clock then jumps ahead whenever every task
//! waits, so minutes of lease take no time. Keep the `TestServer` out of such tests: a
//! paused clock also jumps while a request is on the wire, which makes leases look expired.
//!
//! ```
//! use std::time::Duration;
//! use tokio::time::Instant;
//!
//! /// Runs steps of `step` each while another one still fits before `valid_until`.
//! async fn run_steps(valid_until: Instant, step: Duration, steps: u32) -> u32 {
//!     let mut done = 0;
//!     while done < steps && Instant::now() + step <= valid_until {
//!         tokio::time::sleep(step).await; // the real step
//!         done += 1;
//!     }
//!     done
//! }
//!
//! // #[tokio::test(start_paused = true)]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn stops_before_the_lease_ends() {
//!     let valid_until = Instant::now() + Duration::from_secs(60); // guard.valid_until()
//!     assert_eq!(run_steps(valid_until, Duration::from_secs(25), 10).await, 2);
//! }
//! # fn main() { stops_before_the_lease_ends() }
//! ```

use crate::DistributedLock;
use crate::server::Server;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// A lock server running in the test's own process, on `127.0.0.1` at a free port.
///
/// Open mode: any key is accepted, and each key is its own project. It stops when dropped
/// (or, waiting for it, on [`shutdown`](TestServer::shutdown)).
pub struct TestServer {
    server: Server,
    /// The keys handed to [`client`](TestServer::client): the projects `revoke` looks in.
    keys: Mutex<BTreeSet<String>>,
}

impl TestServer {
    /// Starts a server on a free loopback port (no state file: nothing is written to disk).
    ///
    /// # Panics
    /// If the server cannot start (no loopback port free): a test kit fails the test.
    ///
    /// # Cancel safety
    /// If the future is dropped, the server is not started (or stops again at once).
    pub async fn start() -> TestServer {
        let server = Server::builder()
            .bind("127.0.0.1:0")
            .start()
            .await
            .unwrap_or_else(|e| panic!("the test lock server did not start: {e}"));
        TestServer {
            server,
            keys: Mutex::new(BTreeSet::new()),
        }
    }

    /// The server's base URL, such as `http://127.0.0.1:41234`: for clients built by hand
    /// or other processes (set `LEASEHOLD_URL` to it).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A client of this server for the project of `key`. Clients of the same key share
    /// locks; different keys are isolated projects.
    ///
    /// Its [`unavailable_after`](crate::DistributedLockBuilder::unavailable_after) is a
    /// minute, so that a test that [`pause`](TestServer::pause)s the server for a while
    /// sees acquires wait rather than fail.
    pub fn client(&self, key: &str) -> DistributedLock {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned());
        DistributedLock::builder(key)
            .endpoint(self.url())
            .unavailable_after(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|e| panic!("a client of the test lock server: {e}"))
    }

    /// Ends the current holder's lease of `name` now, in every project whose client came
    /// from [`client`](TestServer::client). Returns the revoked lease's fencing token, or
    /// `None` if nobody held the lock.
    ///
    /// The holder learns it on its next renewal: its [`lost`](crate::LockGuard::lost)
    /// resolves with [`LostReason::Revoked`](crate::LostReason::Revoked) (a renewal is due
    /// every third of the lease; the server answers it at once). The next waiter gets the
    /// lock with a higher fencing token.
    ///
    /// # Panics
    /// If the server does not answer (it is [`pause`](TestServer::pause)d, say).
    ///
    /// # Cancel safety
    /// If the future is dropped, the lease may be revoked or not.
    pub async fn revoke(&self, name: &str) -> Option<u64> {
        let keys: Vec<String> = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut revoked = None;
        for key in keys {
            let admin = DistributedLock::builder(key)
                .endpoint(self.url())
                .unavailable_after(Duration::from_secs(5))
                .build()
                .unwrap_or_else(|e| panic!("a client of the test lock server: {e}"));
            match admin.revoke(name).await {
                Ok(token) => revoked = revoked.or(token),
                Err(e) => panic!("revoking {name:?} on the test lock server failed: {e}"),
            }
        }
        revoked
    }

    /// Stops answering: requests (and answers to requests in progress) wait until
    /// [`resume`](TestServer::resume), as if the server were stopped with `SIGSTOP` or cut
    /// off by the network. Leases run on, so holders that cannot renew lose them: their
    /// guards report [`LostReason::Expired`](crate::LostReason::Expired) a safety margin
    /// before the server lets anyone else have the lock.
    ///
    /// # Cancel safety
    /// Takes effect at once; nothing is left half done.
    pub async fn pause(&self) {
        self.server.set_paused(true);
    }

    /// Answers again: waiting requests go on.
    ///
    /// # Cancel safety
    /// Takes effect at once; nothing is left half done.
    pub async fn resume(&self) {
        self.server.set_paused(false);
    }

    /// Stops the server, letting requests in progress finish.
    ///
    /// # Cancel safety
    /// If the future is dropped, the server stops without waiting.
    pub async fn shutdown(self) {
        self.server.set_paused(false);
        self.server.shutdown().await;
    }
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}
