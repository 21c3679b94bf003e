//! A TCP proxy for fault injection between the SDK and a server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Forwards connections to `upstream`. While cut, bytes are held back in both directions
/// (a blackhole: connections stay open, nothing arrives).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<JoinSet<()>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let acceptor = tokio::spawn({
            let accepted = accepted.clone();
            let connections = connections.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let cut = cut_rx.clone();
                    connections.lock().unwrap().spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, cut.clone()), pump(sr, cw, cut));
                    });
                }
            }
        });
        Proxy {
            addr,
            cut,
            accepted,
            connections,
            acceptor,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Holds back every byte from now on, in both directions.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets bytes flow again (held ones first).
    pub fn heal(&self) {
        self.cut.send_replace(false);
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
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|cut| !*cut).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
