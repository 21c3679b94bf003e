//! Hostile clients against the real server binary: each attack's effect on the server is
//! bounded (memory, log volume, connections), and a legitimate client on another source
//! address keeps working meanwhile. Every wait is bounded by a timeout the test chose.
//!
//! All of 127.0.0.0/8 is loopback on Linux: attackers connect from 127.0.0.1, legitimate
//! clients from 127.0.0.2, so that the per-address connection cap tells them apart.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::process::SERVER_BIN;
use support::within;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Generous bound for the server to start and for single requests.
const BOUND: Duration = Duration::from_secs(20);

/// What the server printed: every line (up to a cap) and the total bytes.
#[derive(Default)]
struct Log {
    bytes: AtomicU64,
    lines: Mutex<Vec<String>>,
    changed: Notify,
}

/// A `leasehold-server` process whose log is captured.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Log>,
    reader: tokio::task::JoinHandle<()>,
}

impl Proc {
    async fn start(args: &[&str]) -> Proc {
        // LEASEHOLD_ABUSE_SERVER_BIN runs the attacks against another build (such as the
        // one before a fix), to see them fail there.
        // Flags that build may not know are left out then.
        let other = std::env::var("LEASEHOLD_ABUSE_SERVER_BIN").ok();
        let mut kept = Vec::new();
        let mut skip = false;
        for arg in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            if other.is_some()
                && [
                    "--write-timeout",
                    "--drain-timeout",
                    "--max-connections-per-ip",
                ]
                .contains(arg)
            {
                skip = true;
                continue;
            }
            kept.push(*arg);
        }
        let mut child = Command::new(other.unwrap_or(SERVER_BIN.into()))
            .args(["--listen", "127.0.0.1:0", "--no-state-file"])
            .args(kept)
            // RUST_LOG names no library: the server's defaults keep them quiet.
            .env(
                "RUST_LOG",
                std::env::var("LEASEHOLD_ABUSE_RUST_LOG").unwrap_or("info".into()),
            )
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("server binary starts");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped");
        let reader = tokio::spawn({
            let log = log.clone();
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.bytes
                        .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
                    let mut kept = log.lines.lock().unwrap();
                    if kept.len() < 20_000 {
                        kept.push(line);
                    }
                    drop(kept);
                    log.changed.notify_waiters();
                }
            }
        });
        let mut proc = Proc {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            reader,
        };
        let line = proc
            .wait_log("listening", |l| l.contains("listening on "))
            .await;
        let url = line.split_once("listening on ").unwrap().1.trim();
        proc.addr = url
            .trim_start_matches("http://")
            .parse()
            .expect("an address");
        proc
    }

    /// Waits (within [`BOUND`]) for a log line matching `pred`, and returns it.
    async fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let found = tokio::time::timeout(BOUND, async {
            loop {
                let notified = self.log.changed.notified();
                if let Some(line) = self.log.lines.lock().unwrap().iter().find(|l| pred(l)) {
                    return line.clone();
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line {what} within {BOUND:?}"))
    }

    fn log_has(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.log.lines.lock().unwrap().iter().any(|l| pred(l))
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The server's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM, then waits for the process and its log to end; returns the log's size.
    async fn stop(mut self) -> u64 {
        support::process::signal(self.pid(), libc::SIGTERM);
        within(BOUND, self.child.wait()).await.unwrap();
        within(BOUND, &mut self.reader).await.unwrap();
        self.log.bytes.load(Ordering::Relaxed)
    }

    async fn metric(&self, series: &str) -> f64 {
        let (status, body) = request_from(LEGIT, self.addr, "GET", "/metrics", &[], "").await;
        assert_eq!(status, 200, "{body}");
        metric_in(&body, series)
    }
}

fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

/// A TCP connection from source address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// One HTTP/1.1 request from `from` on a fresh connection: (status, body); status 0 when the
/// connection was refused or closed without an answer.
async fn request_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut tcp) = connect_from(from, to).await else {
        return (0, String::new());
    };
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = within(BOUND, tcp.read_to_end(&mut answer)).await;
    support::parse_answer(&answer)
}

/// A legitimate client's round: acquire a lock and release it, from 127.0.0.2. Returns how
/// long it took.
async fn legit_round(addr: SocketAddr, n: usize) -> Duration {
    let started = Instant::now();
    let auth = ("authorization", "Bearer legit");
    let id = format!("{:032x}", n as u128 + 1);
    let (status, body) = request_from(
        LEGIT,
        addr,
        "POST",
        "/v1/acquire",
        &[auth],
        &format!(r#"{{"name":"legit-{n}","lease_ms":10000,"wait_ms":0,"request_id":"{id}"}}"#),
    )
    .await;
    assert_eq!(status, 200, "legitimate acquire: {body}");
    let grant: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lease = grant["lease_id"].as_str().unwrap();
    let (status, body) = request_from(
        LEGIT,
        addr,
        "POST",
        "/v1/release",
        &[auth],
        &format!(r#"{{"name":"legit-{n}","lease_id":"{lease}"}}"#),
    )
    .await;
    assert_eq!(status, 200, "legitimate release: {body}");
    started.elapsed()
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Attack 1: an HTTP/2 client keeps its flow-control window at 0 (answering PINGs) and opens
/// as many `GET /metrics` streams as it can. The server allows 2,048 at once, counts each
/// until its response is sent, and closes the connection once the client has taken no
/// response for the write timeout: memory stays bounded and the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_never_opens_its_window_is_cut_off() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let write_timeout = Duration::from_secs(3);
    let server = Proc::start(&["--write-timeout", "3s"]).await;
    let baseline: Vec<Duration> = {
        let mut v = Vec::new();
        for n in 0..200 {
            v.push(legit_round(server.addr, n).await);
        }
        v
    };
    let rss_before = server.rss_kib();

    let tcp = connect_from(ATTACKER, server.addr).await.unwrap();
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let attack_started = Instant::now();
    // The connection task answers PINGs (and SETTINGS) until the server closes.
    let driver = tokio::spawn(async move {
        let ended = connection.await;
        println!("attacker connection ended: {ended:?}");
        Instant::now()
    });
    // A well-behaved attacker: one request first, whose response header (not flow
    // controlled) brings the server's SETTINGS, so that it then opens only as many streams
    // at once as the server allows. The body is never read: the window stays at 0.
    let request = || http::Request::get("http://t/metrics").body(()).unwrap();
    let (first, _) = send.send_request(request(), true).unwrap();
    let first = within(BOUND, first).await.unwrap();
    assert_eq!(first.status(), 200);
    let max_streams = send.current_max_send_streams();
    let opener = tokio::spawn(async move {
        let mut pending = vec![];
        // Up to the server's limit: beyond it, h2 refuses streams and soon sends GOAWAY
        // (too many resets), which would end the attack before the write timeout does.
        for _ in 1..max_streams.min(8_000) {
            send = match send.ready().await {
                Ok(send) => send,
                Err(_) => break,
            };
            match send.send_request(request(), true) {
                Ok((response, _)) => pending.push(response),
                Err(e) => {
                    println!("send_request: {e}");
                    break;
                }
            }
        }
        // Returned, not dropped: dropping them would cancel the streams.
        pending
    });
    // Once every stream the server allows is open and stuck, the legitimate client is
    // served as before, until the write timeout ends the attacker's connection.
    let pending = within(BOUND, opener).await.unwrap();
    let opened = pending.len();
    let mut rss_peak = server.rss_kib();
    let mut during = Vec::new();
    let mut n = 1000;
    // Closed once no response went through for the write timeout (plus scheduling).
    while !driver.is_finished() && attack_started.elapsed() < write_timeout * 10 {
        during.push(legit_round(server.addr, n).await);
        rss_peak = rss_peak.max(server.rss_kib());
        n += 1;
    }
    let lasted = attack_started.elapsed();
    let grew_mib = rss_peak.saturating_sub(rss_before) / 1024;
    println!(
        "attacker opened {opened} streams (server limit {max_streams}); connection open for \
         {lasted:?} (closed: {}); RSS grew {grew_mib} MiB (from {rss_before} KiB); legit p99 \
         {:?} during vs {:?} before",
        driver.is_finished(),
        p99(during.clone()),
        p99(baseline.clone())
    );
    assert!(
        max_streams <= 2048,
        "the server allows {max_streams} streams"
    );
    assert!(opened < max_streams, "{opened} streams opened");
    assert!(driver.is_finished(), "still open after {lasted:?}");
    drop(pending);
    // 2,048 stuck streams cost about 20 MiB.
    assert!(grew_mib < 40, "RSS grew {grew_mib} MiB");
    if !during.is_empty() {
        assert!(
            // Plus a few scheduler ticks: the machine is shared.
            p99(during.clone()) <= p99(baseline.clone()) * 3 + Duration::from_millis(20),
            "legit p99 {:?} during vs {:?} before",
            p99(during),
            p99(baseline)
        );
    }
    // Fine afterwards too.
    legit_round(server.addr, 99_999).await;
    server.stop().await;
}

/// Attack 1, HTTP/1.1: a client that sends requests but never reads is closed after the
/// write timeout (its socket buffers fill first).
#[tokio::test]
async fn an_http1_client_that_never_reads_is_cut_off() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let write_timeout = Duration::from_secs(1);
    let server = Proc::start(&["--write-timeout", "1s"]).await;
    let mut tcp = connect_from(ATTACKER, server.addr).await.unwrap();
    let started = Instant::now();
    // Pipelined requests whose answers are never read; writing fails once the server
    // has closed the connection (or after the bound).
    let request = b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n";
    let outcome = tokio::time::timeout(write_timeout * 30, async {
        loop {
            if tcp.write_all(request).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "still open after {:?}", started.elapsed());
    println!(
        "the non-reading client was cut off after {:?}",
        started.elapsed()
    );
    legit_round(server.addr, 1).await;
    server.stop().await;
}

/// Attack 2: connections that send nothing. The first request is due a header timeout
/// after accept (protocol detection included), and one address may hold only so many
/// connections: the silent ones are closed, and a client on another address is served
/// throughout (the global cap is below the attacker's connection count).
#[tokio::test]
async fn silent_connections_are_closed_and_do_not_lock_others_out() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let header_timeout = Duration::from_secs(1);
    let server = Proc::start(&[
        "--header-read-timeout",
        "1s",
        "--max-connections",
        "100",
        "--max-connections-per-ip",
        "50",
    ])
    .await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        if let Ok(tcp) = connect_from(ATTACKER, server.addr).await {
            silent.push((Instant::now(), tcp));
        }
    }
    // The legitimate client gets in, /metrics included, while they are open.
    legit_round(server.addr, 1).await;
    assert!(server.metric("leasehold_connections_refused_total").await >= 200.0);
    // Every silent connection is closed: the refused ones at once, the others when their
    // header timeout (counted from accept) is up.
    for (opened, mut tcp) in silent {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(header_timeout * 10, tcp.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "open after {:?}: {read:?}",
            opened.elapsed()
        );
    }
    legit_round(server.addr, 2).await;
    // The refusals were logged a few times, not once each.
    let refusals = server
        .log
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("connection refused"))
        .count();
    assert!((1..=20).contains(&refusals), "{refusals} refusals logged");
    server.stop().await;
}

/// After GOAWAY: a client that takes one byte of its response and then nothing (its window
/// stays shut) keeps the stream, and so the connection, from finishing after the idle
/// timeout's GOAWAY; the drain timeout cuts it.
#[tokio::test]
async fn a_connection_asked_to_close_is_cut_after_the_drain_timeout() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let (idle, drain) = (Duration::from_secs(1), Duration::from_secs(1));
    let server = Proc::start(&[
        "--idle-timeout",
        "1s",
        "--drain-timeout",
        "1s",
        // Longer than the test: not what ends this connection.
        "--write-timeout",
        "120s",
    ])
    .await;
    let tcp = connect_from(ATTACKER, server.addr).await.unwrap();
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let started = Instant::now();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
        Instant::now()
    });
    let request = http::Request::get("http://t/metrics").body(()).unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    // The header comes; the body is never read, so the window is never opened again.
    let response = within(BOUND, response).await.unwrap();
    assert_eq!(response.status(), 200);
    let closed = within((idle + drain) * 10, driver).await.unwrap();
    let lasted = closed - started;
    println!("connection closed after {lasted:?}");
    assert!(lasted >= idle, "{lasted:?}");
    drop(response);
    legit_round(server.addr, 1).await;
    server.stop().await;
}

/// HTTP/2 frame header: length, type, flags, stream 0.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// Attack 3: a flood of unsolicited HTTP/2 PING acknowledgements. The h2 crate warns about
/// each one; the server's default log filter keeps library targets at `error`, so the log
/// stays small.
#[tokio::test]
async fn unsolicited_ping_acks_do_not_flood_the_log() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    // A header timeout longer than the test: the flood connection sends no request.
    let server = Proc::start(&["--header-read-timeout", "120s"]).await;
    let before = server.log.bytes.load(Ordering::Relaxed);
    let tcp = connect_from(ATTACKER, server.addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    // Drain what the server sends, and note when our own PING comes back acknowledged.
    let acked = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = read.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            buf.extend_from_slice(&chunk[..n]);
            // Look for PING (type 6) with ACK (flag 1) and our payload "lastping".
            if buf
                .windows(17)
                .any(|w| w[3] == 6 && w[4] == 1 && &w[9..17] == b"lastping")
            {
                return true;
            }
        }
    });
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, &[]));
    let ack = frame(6, 1, b"unasked!");
    let count = 200_000;
    for _ in 0..count {
        bytes.extend_from_slice(&ack);
    }
    // A real PING last: the server handles frames in order, so its answer means every
    // acknowledgement before it has been processed.
    bytes.extend(frame(6, 0, b"lastping"));
    within(BOUND, write.write_all(&bytes)).await.unwrap();
    assert!(
        within(BOUND * 3, acked).await.unwrap(),
        "the connection closed before the last PING was answered"
    );
    legit_round(server.addr, 1).await;
    let after = server.stop().await;
    let logged = after - before;
    println!(
        "{count} unsolicited PING ACKs ({} bytes) produced {logged} bytes of log",
        bytes.len()
    );
    assert!(logged < 1024 * 1024, "{logged} bytes of log");
}

/// A key file that is replaced atomically (write, then rename) unless a test edits it in
/// place on purpose.
struct KeyFile {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl KeyFile {
    fn new(test: &str) -> KeyFile {
        let dir =
            std::env::temp_dir().join(format!("leasehold-abuse-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        KeyFile { dir, path }
    }

    fn write(&self, text: &str) {
        let tmp = self.dir.join("keys.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Attack 9: the key file is emptied or truncated mid-edit, or merely touched. The emptied
/// and the unparsable versions are refused (with a warning) and every key keeps working; a
/// reload of unchanged keys does not refill their rate-limit buckets.
#[tokio::test]
async fn a_truncated_or_touched_key_file_changes_nothing() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let (limited, limited_line) = leasehold::server::new_key("limited");
    let (free, free_line) = leasehold::server::new_key("free");
    let file = KeyFile::new("keys");
    let text = format!(
        "[[projects]]\nname = \"limited\"\nrate_limit = 0.001\nburst = 2\nkeys = [\n  {limited_line}\n]\n\n\
         [[projects]]\nname = \"free\"\nkeys = [\n  {free_line}\n]\n"
    );
    file.write(&text);
    let path = file.path.display().to_string();
    let server = Proc::start(&["--key-file", &path, "--key-check-interval", "50ms"]).await;
    // Inspecting a lock nobody holds: 404 once the key is accepted (401 if not, 429 when
    // rate limited).
    let inspect = |key: String| {
        let addr = server.addr;
        async move {
            let auth = format!("Bearer {key}");
            request_from(
                LEGIT,
                addr,
                "GET",
                "/v1/locks/x",
                &[("authorization", &auth)],
                "",
            )
            .await
            .0
        }
    };
    assert_eq!(inspect(limited.clone()).await, 404);
    assert_eq!(inspect(limited.clone()).await, 404);
    assert_eq!(inspect(limited.clone()).await, 429);

    // Touched (same content, new modification time): reloaded, the bucket stays empty.
    let f = std::fs::File::options()
        .write(true)
        .open(&file.path)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    server
        .wait_log("reloaded", |l| l.contains("key file changed: reloaded"))
        .await;
    assert_eq!(
        inspect(limited.clone()).await,
        429,
        "a reload refilled the bucket"
    );

    // Emptied in place: refused, at WARN; both keys still work.
    std::fs::write(&file.path, "").unwrap();
    let line = server
        .wait_log("refusing the empty file", |l| l.contains("no keys"))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(inspect(free.clone()).await, 404);
    assert_eq!(inspect(limited.clone()).await, 429);

    // Truncated mid-line: does not parse, refused; the keys in use stay.
    let cut = text.find(&limited_line).unwrap() + 20;
    std::fs::write(&file.path, &text[..cut]).unwrap();
    server
        .wait_log("refusing the truncated file", |l| {
            l.contains("refused") && !l.contains("no keys")
        })
        .await;
    assert_eq!(inspect(free.clone()).await, 404);

    // A proper replacement without the free key is loaded; that key is then refused.
    file.write(&format!(
        "[[projects]]\nname = \"limited\"\nrate_limit = 0.001\nburst = 2\nkeys = [\n  {limited_line}\n]\n"
    ));
    support::eventually(BOUND, "the free key revoked", || async {
        inspect(free.clone()).await == 401
    })
    .await;
    assert_eq!(inspect(limited.clone()).await, 429);
    assert!(!server.log_has(|l| l.contains(&free) || l.contains(&limited)));
    server.stop().await;
}

/// Attack 10: names and labels with bidirectional overrides or invisible characters are
/// refused by the server (400, saying why) and by the SDK before sending anything.
#[tokio::test]
async fn names_and_labels_with_bidi_or_invisible_characters_are_refused() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let server = Proc::start(&[]).await;
    let auth = ("authorization", "Bearer p");
    let id = "0123456789abcdef0123456789abcdef";
    for (name, label, expected) in [
        ("invoice\u{202E}fdp.exe", None, "bidirectional"),
        ("a\u{2066}b", None, "bidirectional"),
        ("zero\u{200B}width", None, "invisible"),
        ("tag\u{E0041}", None, "invisible"),
        ("fine", Some("host-a\u{200F}"), "bidirectional"),
        ("fine", Some("job\u{FEFF}42"), "invisible"),
    ] {
        let mut body =
            serde_json::json!({"name": name, "lease_ms": 1000, "wait_ms": 0, "request_id": id});
        if let Some(label) = label {
            body["metadata"] = label.into();
        }
        let (status, answer) = request_from(
            LEGIT,
            server.addr,
            "POST",
            "/v1/acquire",
            &[auth],
            &body.to_string(),
        )
        .await;
        assert_eq!(status, 400, "{name:?} {label:?}: {answer}");
        assert!(answer.contains(expected), "{answer}");
        if label.is_some() {
            assert!(answer.contains("metadata"), "{answer}");
        }
    }
    // Inspection refuses them too (percent-encoded in the path).
    let (status, _) = request_from(
        LEGIT,
        server.addr,
        "GET",
        "/v1/locks/a%E2%80%AEb",
        &[auth],
        "",
    )
    .await;
    assert_eq!(status, 400);
    // The SDK refuses them without a server: nothing listens at its endpoint.
    let dl = support::client_for(&format!("http://{}", support::dead_addr().await), "p");
    let err = within(BOUND, dl.lock("a\u{202E}b").timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let err = within(
        BOUND,
        dl.lock("ok").metadata("x\u{200D}y").timeout(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    server.stop().await;
}

/// `/metrics` (no key needed, every project's counts) can move to an address of its own;
/// the main address then answers it with 404.
#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    // One at a time: latency and memory are measured against a baseline.
    let _alone = support::heavy().await;
    let server = Proc::start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let line = server
        .wait_log("the metrics address", |l| {
            l.contains("serving /metrics on ")
        })
        .await;
    let metrics_addr: SocketAddr = line
        .split_once("http://")
        .unwrap()
        .1
        .trim()
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    let (status, _) = request_from(LEGIT, server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 404);
    let (status, body) = request_from(LEGIT, metrics_addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("leasehold_connections_open"), "{body}");
    let (status, _) = request_from(LEGIT, metrics_addr, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);
    let (status, _) = request_from(
        LEGIT,
        metrics_addr,
        "GET",
        "/v1/locks/x",
        &[("authorization", "Bearer p")],
        "",
    )
    .await;
    assert_eq!(status, 404);
    legit_round(server.addr, 1).await;
    server.stop().await;
}
