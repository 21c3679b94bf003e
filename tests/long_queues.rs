//! A long line of waiters costs each queue operation nothing extra: a waiter is found by
//! its request id, not by walking the line (issue 13's attack 4: 98,000 waiters re-polling
//! on one lock stalled other projects for seconds). Against the real server binary.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use support::client_for;
use support::load::{cpu_time, p99, pairs};
use support::process::ServerProcess;

/// Plain HTTP/2 requests with request ids the test chooses.
#[derive(Clone)]
struct Raw {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

impl Raw {
    fn new(url: &str) -> Raw {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Raw {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            url: url.to_owned(),
        }
    }

    /// An acquire that answers at once (`poll_ms: 0`): joins the line, or re-polls the
    /// place of `request_id`. Returns the status.
    async fn poll(&self, key: &str, name: &str, request_id: &str) -> u16 {
        let body = format!(
            r#"{{"name":"{name}","lease_ms":60000,"poll_ms":0,"request_id":"{request_id}"}}"#
        );
        let request = hyper::Request::post(format!("{}/v1/acquire", self.url))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }
}

/// `n` re-polls of one waiter's place, from `tasks` tasks at once.
async fn repolls(raw: &Raw, name: &str, id: &str, n: usize, tasks: usize) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (raw, name, id) = (raw.clone(), name.to_owned(), id.to_owned());
        set.spawn(async move {
            for _ in 0..n / tasks {
                assert_eq!(raw.poll("attacker", &name, &id).await, 202);
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_polls_cost_the_same_at_the_end_of_a_long_line() {
    let _alone = support::heavy().await;
    let server = ServerProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--no-state-file",
        "--max-acquires-per-project",
        "30000",
    ])
    .await;
    let raw = Raw::new(&server.url);
    let attacker = client_for(&server.url, "attacker");
    let _long_holder = attacker.lock("long").await.unwrap();
    let _short_holder = attacker.lock("short").await.unwrap();
    // 20,000 waiters on one lock, each a long poll held open: ten clients, each on a
    // connection of its own (a server allows 2,048 streams per connection).
    let line = 20_000;
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let dl = client_for(&server.url, "attacker");
        for _ in 0..line / 10 {
            let dl = dl.clone();
            waiters.spawn(async move { dl.lock("long").await.map(drop) });
        }
    }
    support::eventually(Duration::from_secs(120), "the line is long", || async {
        attacker.inspect("long").await.unwrap().waiters == line as u64
    })
    .await;
    // One probe at the end of the long line, one alone in line behind the short lock.
    let (last, alone) = (
        "0000000000000000000000000000000a",
        "0000000000000000000000000000000b",
    );
    assert_eq!(raw.poll("attacker", "long", last).await, 202);
    assert_eq!(raw.poll("attacker", "short", alone).await, 202);

    // The server's own CPU time per re-poll, in alternating blocks so that the machine's
    // slow and fast spells hit both probes alike.
    let pid = server.pid();
    let (mut long_cpu, mut short_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..10 {
        for (id, name, total) in [
            (last, "long", &mut long_cpu),
            (alone, "short", &mut short_cpu),
        ] {
            let before = cpu_time(pid);
            repolls(&raw, name, id, 200, 16).await;
            *total += cpu_time(pid) - before;
        }
    }
    let ratio = long_cpu.as_secs_f64() / short_cpu.as_secs_f64().max(1e-3);
    println!(
        "server CPU for 2,000 re-polls at the end of a line of {line}: {long_cpu:?}; alone in \
         line: {short_cpu:?} (ratio {ratio:.2})"
    );
    // Walking the line made a re-poll at its end cost the server several times one alone
    // in line (twice the line per re-poll: finding the place, then answering from it).
    assert!(
        ratio < 1.5,
        "re-polls at the end of a long line cost {ratio:.2}x"
    );

    // Another project keeps its pace while the waiter at the end of the long line re-polls.
    // Any flood of requests slows others on two shared cores, whatever the queue; that is
    // what per-key rate limits are for. What the long line must not add is anything beyond
    // that: the baseline is the same flood by the waiter alone in line.
    let legit = client_for(&server.url, "legit");
    let idle = pairs(&legit, 300).await;
    let (_, floor) = tokio::join!(repolls(&raw, "short", alone, 1_000, 4), pairs(&legit, 300));
    let (_, attacked) = tokio::join!(repolls(&raw, "long", last, 1_000, 4), pairs(&legit, 300));
    println!(
        "another project's p99: {:?} idle, {:?} while a waiter alone in line re-polls, {:?} \
         while one at the end of the long line does",
        p99(&idle),
        p99(&floor),
        p99(&attacked)
    );
    assert!(
        p99(&attacked) <= 3 * p99(&floor),
        "another project's p99 went from {:?} to {:?}",
        p99(&floor),
        p99(&attacked)
    );
    waiters.abort_all();
}
