//! distributed-lock (placeholder docs)
#![deny(missing_docs, missing_debug_implementations)]

mod client;
mod error;
mod id;
pub mod protocol;

pub use client::guard::LockGuard;
pub use client::request::{DEFAULT_EXPIRES_IN, LockFuture, LockRequest};
pub use client::transport::{Connect, ConnectFuture, Io};
pub use client::{DEFAULT_ENDPOINT, DistributedLock, DistributedLockBuilder, URL_ENV};
pub use error::Error;

#[cfg(feature = "server")]
pub mod server;
