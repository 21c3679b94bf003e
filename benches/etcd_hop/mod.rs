//! The architecture's own floor: one etcd write behind a bare HTTP/2 hop, in a process of
//! its own, as the lock server is. A pair through it (a put, then a delete) costs what any
//! client → HTTP server → etcd design must pay on this machine: two etcd writes and two
//! HTTP/2 round trips, with no lock logic, no SDK and no server features.
//!
//! The bench binary plays the hop itself when started with `BENCH_BARE_HOP_ETCD` set to an
//! etcd endpoint (see [`serve_if_asked`]).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::process::Command;

const ENV: &str = "BENCH_BARE_HOP_ETCD";

/// The command that starts the hop over this etcd (it prints `listening on URL`).
pub fn command(etcd: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the bench's own path"));
    command.env(ENV, etcd);
    command
}

/// Serves as the hop (and never returns) when this process was started as one.
pub fn serve_if_asked() {
    let Ok(endpoint) = std::env::var(ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let etcd = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .expect("etcd");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        eprintln!("listening on http://{}", listener.local_addr().unwrap());
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let etcd = etcd.clone();
            tokio::spawn(async move {
                let write =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let mut etcd = etcd.clone();
                        async move {
                            let put = request.uri().path() == "/put";
                            let _ = request.into_body().collect().await;
                            if put {
                                etcd.put("bench/hop", "v", None).await.map(drop)
                            } else {
                                etcd.delete("bench/hop", None).await.map(drop)
                            }
                            .map(|()| Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), write)
                    .await;
            });
        }
    });
    std::process::exit(0);
}

/// An HTTP/2 (prior knowledge) client for the hop.
pub struct Hop {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

impl Hop {
    pub fn new(url: &str) -> Hop {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Hop {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            url: url.to_owned(),
        }
    }

    async fn post(&self, path: &str) {
        let request = Request::post(format!("{}{path}", self.url))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert!(response.status().is_success());
        let _ = response.into_body().collect().await;
    }

    /// A put, then a delete, each behind the hop.
    pub async fn pair(&self) {
        self.post("/put").await;
        self.post("/delete").await;
    }
}
