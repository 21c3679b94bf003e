//! Distributed locks for async Rust: leases that renew themselves, fencing tokens, and
//! waiting in line on the server.
//!
//! Any number of processes on any number of machines take turns on a named lock held by a
//! lock server. This crate is both the SDK ([`DistributedLock`]) and, with the `server`
//! feature, the server itself (the `leasehold-server` binary, or `server::Server`
//! embedded in a process).
//!
//! # A tour
//!
//! ```
//! use leasehold::{DistributedLock, Error};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Error> {
//! # let server = leasehold::server::Server::builder().bind("127.0.0.1:0").start().await?;
//! # let url = server.url();
//! // One client per project key; cheap to clone. `DistributedLock::new(key)` reads the
//! // endpoint from $LEASEHOLD_URL (default http://127.0.0.1:7878).
//! let dl = DistributedLock::builder("project-api-key").endpoint(url).build()?;
//!
//! // Closure style: take the lock, run, release, return the closure's value.
//! let v = dl.with_lock("my-lock", || async { 10 }).await?;
//! assert_eq!(v, 10);
//!
//! // Guard style: the lease is renewed in the background while the guard lives.
//! let guard = dl
//!     .lock("my-lock")
//!     .expires_in(Duration::from_secs(20)) // lease length (default 10 s)
//!     .timeout(Duration::from_secs(5)) // longest wait (default: as long as it takes)
//!     .await?;
//! let token = guard.fencing_token(); // pass it to the storage you protect
//!
//! // Meanwhile another client cannot get it; a zero timeout tries once.
//! let err = dl.lock("my-lock").timeout(Duration::ZERO).await.unwrap_err();
//! assert!(err.is_timeout());
//!
//! // Stop work if the lease is ever lost.
//! tokio::select! {
//!     reason = guard.lost() => return Err(Error::LockLost { name: "my-lock".into(), reason }),
//!     _ = async { /* critical section */ } => {}
//! }
//! guard.release().await?; // or just drop the guard
//!
//! // Every later grant carries a larger token.
//! let next = dl.lock("my-lock").await?;
//! assert!(next.fencing_token() > token);
//! # drop(next);
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```
//!
//! # Guarantees
//! * The server never lets two parties hold a lock at once, and every grant carries a
//!   fencing token larger than any earlier grant of that name, across server restarts.
//! * A guard learns that its lease is lost ([`LockGuard::lost`], [`LockGuard::is_held`])
//!   *before* the server could give the lock to anyone else: it counts its lease from when
//!   the request left the client for the connection, minus a safety margin.
//! * `lock().await` never hands back a guard that is not held. Under load a request, or its
//!   answer, can wait inside the client; a grant that arrives with less than a third of its
//!   lease left is confirmed by an immediate renewal first, and one that cannot be confirmed
//!   is released and waited for again, within the same `timeout`. So at the moment the guard
//!   is returned, [`LockGuard::is_held`] is true; how long it stays so depends on renewals.
//! * A process can still be paused (GC, swap, SIGSTOP) past its lease without noticing. The
//!   fencing token is what makes that safe: have the protected resource reject writes whose
//!   token is older than one it has seen.
//!
//! # How it talks to the server
//! Lock operations (acquire, renew, release, cancel) go over one *session* per server: a
//! connection upgraded from HTTP/1.1 where each operation is a small frame carrying the
//! plain endpoint's JSON, so thousands of waiting acquires share it, and operations queued
//! together leave in one write. Where a server or proxy refuses a session, and while one
//! opens, the same operations go as JSON requests over HTTP/2 (cleartext, prior knowledge)
//! on two pooled connections per server: one for acquires, and one for renewals, releases
//! and cancels, so that lease upkeep never waits for a stream behind long polls. Either
//! way, a session keeps room for renewals however many acquires wait. Waiting happens on
//! the server (long polls in FIFO order), never in a client polling loop. One background
//! task per client renews every due lease in batched requests. The protocol is written
//! down in `docs/protocol.md`.
//!
//! # Features
//! * `server`: the lock server (the `server` module and the `leasehold-server` binary).
//!   Off by default, so the SDK's dependency tree stays small.
//! * `etcd`: the server's etcd backend (`--backend etcd`), so that several servers share
//!   their locks through one etcd cluster. Implies `server`; building it needs `protoc`.
//! * `cli`: the `leasehold` command (`run` a command while holding a lock, `status`).
//!   Off by default; adds clap and libc.
#![deny(missing_docs, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod error;
// The session stream's frames, both ends: without the server, its end goes unused.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod framing;
mod id;
// The wire types are not Rust API: docs/protocol.md (versioned by its `/v1/` paths) is the
// contract for clients in other languages, and the SDK's own types are what Rust users need.
// Keeping them private lets the wire format grow without a semver break of this crate.
// Without the server, its half of the wire (answers it builds, error codes) goes unused.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod protocol;

pub use client::election::{Campaign, CampaignFuture, Election, Leader, Leadership, Observer};
pub use client::guard::LockGuard;
pub use client::inspect::{HolderInfo, LockInfo, LockMode};
pub use client::lease::{Lease, LockFn};
pub use client::lease_state::{GuardState, LostReason, LostSignal};
pub use client::list::LockPage;
pub use client::request::{DEFAULT_EXPIRES_IN, LockFuture, LockRequest};
pub use client::transport::{Connect, ConnectFuture, Io};
pub use client::{DEFAULT_ENDPOINT, DistributedLock, DistributedLockBuilder, URL_ENV};
pub use error::Error;

#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

/// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
