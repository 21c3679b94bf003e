//! A fault-injecting TCP proxy, placed between the SDK and a server (or a server and etcd).
//!
//! Faults apply to bytes as they pass, in both directions, keeping their order (it is TCP):
//! * delay: each chunk waits `delay ± jitter`;
//! * drop: with probability `drop_rate` a chunk waits an extra `drop_penalty`, like a lost
//!   segment that TCP retransmits (dropping bytes outright would corrupt the stream, not
//!   emulate a network);
//! * cut (blackhole): nothing passes until healed; connections stay open;
//! * answers cut: requests pass, what comes back is held until healed (a reply lost on the
//!   way, after the request took effect);
//! * reset: every open connection is closed at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The faults in force.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub delay: Duration,
    pub jitter: Duration,
    pub drop_rate: f64,
    pub drop_penalty: Duration,
    pub cut: bool,
    /// Hold back only what the upstream sends.
    pub answers_cut: bool,
}

/// Forwards connections to `upstream`, injecting [`Faults`].
pub struct Proxy {
    pub addr: SocketAddr,
    faults: watch::Sender<Faults>,
    accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<JoinSet<()>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Proxy::start_seeded(upstream, 1).await
    }

    /// A proxy whose random choices (jitter, drops) follow `seed`.
    pub async fn start_seeded(upstream: SocketAddr, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let (faults, faults_rx) = watch::channel(Faults::default());
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let acceptor = tokio::spawn({
            let accepted = accepted.clone();
            let connections = connections.clone();
            async move {
                let mut n = 0u64;
                while let Ok((client, _)) = listener.accept().await {
                    n += 1;
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let faults = faults_rx.clone();
                    let seeds = (seed ^ (n << 1), seed ^ (n << 1 | 1));
                    connections.lock().unwrap().spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(
                            pump(cr, sw, faults.clone(), seeds.0, false),
                            pump(sr, cw, faults, seeds.1, true)
                        );
                    });
                }
            }
        });
        Proxy {
            addr,
            faults,
            accepted,
            connections,
            acceptor,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the faults in force.
    pub fn set(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// Holds back every byte from now on, in both directions (a blackhole).
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.cut = true);
    }

    /// Holds back every byte the upstream sends from now on; requests still pass.
    pub fn cut_answers(&self) {
        self.faults.send_modify(|f| f.answers_cut = true);
    }

    /// Removes every fault (held bytes flow again, in order).
    pub fn heal(&self) {
        self.faults.send_replace(Faults::default());
    }

    /// Closes every proxied connection at once.
    pub fn reset(&self) {
        self.connections.lock().unwrap().abort_all();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.reset();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    seed: u64,
    answers: bool,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = vec![0u8; 16 * 1024];
    // Chunks leave in order: never before the one read earlier.
    let mut last_delivery = Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let f = *faults.borrow();
        let mut wait = f.delay;
        if !f.jitter.is_zero() {
            let spread = f.jitter.as_secs_f64() * (2.0 * rng.f64() - 1.0);
            wait = Duration::from_secs_f64((wait.as_secs_f64() + spread).max(0.0));
        }
        if f.drop_rate > 0.0 && rng.f64() < f.drop_rate {
            wait += f.drop_penalty;
        }
        last_delivery = last_delivery.max(Instant::now() + wait);
        tokio::time::sleep_until(last_delivery).await;
        let held = |f: &Faults| f.cut || (answers && f.answers_cut);
        if faults.wait_for(|f| !held(f)).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
