//! Request bodies sent slowly cannot pin the server's memory, and one project's cannot
//! stall another's: the budget for bodies being read (`--body-budget`), against the real
//! server binary.

mod support;

use std::net::SocketAddr;
use support::load::{p90, p99, pairs, rss};
use support::process::ServerProcess;
use support::{client_for, metric};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const BODY: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_large_bodies_are_bounded_and_other_projects_keep_their_pace() {
    let _alone = support::heavy().await;
    // 1 MiB bodies at most; 8 MiB for every body being read, 2 MiB of it per project.
    let server = ServerProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--no-state-file",
        "--max-body-bytes",
        &BODY.to_string(),
        "--body-budget",
        &(8 * BODY).to_string(),
    ])
    .await;
    let addr: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let legit = client_for(&server.url, "legit");
    pairs(&legit, 50).await; // warm up
    let baseline = pairs(&legit, 500).await;
    let rss_before = rss(server.pid());

    // 200 requests of one project, each declaring a 1 MiB body and sending all of it but
    // its last byte, then holding the connection open: 200 MiB if every body were kept.
    let attackers = 200;
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::channel(attackers);
    let mut attack = tokio::task::JoinSet::new();
    for _ in 0..attackers {
        let sent = sent_tx.clone();
        attack.spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /v1/acquire HTTP/1.1\r\nhost: t\r\nauthorization: Bearer attacker\r\n\
                 content-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
            );
            // A refused request is answered at once and its body never read: its writes
            // may then stall in the socket's buffers, or fail once it is closed.
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = sent.send(()).await;
            let _ = tcp.write_all(&vec![b' '; BODY - 1]).await;
            std::future::pending::<()>().await;
            drop(tcp);
        });
    }
    for _ in 0..attackers {
        sent_rx.recv().await.unwrap();
    }
    let during = pairs(&legit, 500).await;
    let grown = rss(server.pid()).saturating_sub(rss_before);
    let refused = metric(
        addr,
        r#"leasehold_http_requests_total{route="acquire",status="503"}"#,
    )
    .await;
    attack.shutdown().await;

    println!(
        "legit pair p90 {:?} / p99 {:?} before, p90 {:?} / p99 {:?} during; server memory +{} \
         MiB; {refused} bodies refused",
        p90(&baseline),
        p99(&baseline),
        p90(&during),
        p99(&during),
        grown >> 20
    );
    assert!(refused > 0.0, "the budget refused no body");
    // The attacker's project may hold 2 MiB of bodies; the rest is the server's own noise.
    // Without the budget it would be about 200 MiB.
    assert!(grown < 32 << 20, "the server grew by {} MiB", grown >> 20);
    assert!(
        p90(&during) <= 3 * p90(&baseline),
        "another project's p90 went from {:?} to {:?}",
        p90(&baseline),
        p90(&during)
    );
}
