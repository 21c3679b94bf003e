//! The public types can move across tasks and threads.

use leasehold::server::Server;
use leasehold::{
    DistributedLock, DistributedLockBuilder, Error, LockFuture, LockGuard, LockRequest,
};

fn send_sync<T: Send + Sync>() {}
fn send_static<T: Send + 'static>(_: &T) {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<DistributedLock>();
    send_sync::<DistributedLockBuilder>();
    send_sync::<LockRequest>();
    send_sync::<LockGuard>();
    send_sync::<Error>();
    send_sync::<Server>();
    fn send<T: Send>() {}
    send::<LockFuture>();
}

#[test]
fn futures_can_be_spawned() {
    let dl = DistributedLock::new("k");
    send_static(&std::future::IntoFuture::into_future(dl.lock("a")));
    send_static(&dl.lock("a").with_lock(|| async { 1 }));
    let dl2 = dl.clone();
    send_static(&async move { dl2.with_lock("a", || async { 1 }).await });
    send_static(&Server::builder().start());
}
