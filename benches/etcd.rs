//! The etcd backend against etcd itself, measured in the same run.
//!
//! `cargo bench --bench etcd` starts a one-member etcd (the `etcd` on PATH, data in a
//! temporary directory, fsync on as in production) and the real `leasehold-server
//! --backend etcd` as a separate process, with a key file as in production (see
//! [`open_mode`]), then measures on loopback, 3 rounds each:
//!
//! * single etcd operations through etcd-client (a put, a linearizable read, a lease grant,
//!   a keep-alive, a revoke, the backend's acquire and release transactions);
//! * interleaved, one of each in turn so that the machine's drifts cancel out of the
//!   ratios: two etcd writes (a put, then a delete); the same two writes behind a bare
//!   HTTP/2 hop in a process of its own (`etcd_hop`), the floor of the architecture itself
//!   (client -> HTTP server -> etcd); the SDK's uncontended acquire+release pair through
//!   the server; and etcd's own lock service (v3lock) lock+unlock with a session lease;
//! * each half of the pair, with the CPU each process spends on it, and the server's own
//!   account of its etcd calls meanwhile (from its `/metrics`);
//! * etcd's own lock service (`etcdctl lock`'s v3lock API) with a session lease per task:
//!   the hand-over gap with 8 contending tasks;
//! * 32 tasks on distinct locks, pairs/s: the SDK (one shared client) and v3lock (a
//!   session lease per task), taking turns in three slices each per round;
//! * the SDK's hand-over gap with 8 contending tasks (from the release being sent to the
//!   next holder's grant arriving);
//! * the mean time of etcd's WAL syncs meanwhile, as etcd reports it.
//!
//! Then the pair on one lock before and after `BENCH_MORE_PAIRS` (default 10,000) more
//! pairs on it, without any compaction of etcd's history.
//!
//! One round against an etcd on a slower disk (last, after the summary below): `strace`
//! (if installed) adds `BENCH_SLOW_SYNC_US` (default 600; 0 skips this) microseconds to
//! each of etcd's fsync and fdatasync calls. A write's cost is mostly its sync on a
//! typical server disk, and little of it on this machine's; the ratios to "two etcd
//! writes" depend on which. After the summary, that round's uncontended pair and bare hop
//! against v3lock are printed for context: etcd's writes weigh more there against the
//! fixed cost of the hop to the server.
//!
//! Then, unless `BENCH_SCALING=0`: a 3-member etcd, and 1, 2 and 3 servers over it with 32
//! tasks per server on distinct locks (aggregate pairs/s), beside etcd's own write rate
//! (`BENCH_RAW_WRITERS`, default 64, concurrent puts) measured before and after. Then a
//! summary table of the ratios to v3lock, with PASS/FAIL against issue 15's targets, and
//! last the slower disk's round (above).
//!
//! Settings (environment): `BENCH_PAIRS` (samples per latency figure, default 500),
//! `BENCH_ROUNDS` (default 3), `BENCH_ONLY_DISTINCT` (seconds: only the SDK on distinct
//! locks, printing the process ids, for a profiler to attach to, and the server's etcd
//! calls with their mean durations; v3lock instead with `BENCH_V3LOCK` set),
//! `BENCH_ONLY_PAIR` (only the interleaved uncontended pairs of one round, `BENCH_PAIRS`
//! of each, with the context switches and CPU of the server, the hop and etcd, and the
//! server's own account of its etcd calls: a few seconds per run, for comparing server
//! builds), `BENCH_SECS` (seconds per hand-over round, default 3), `BENCH_SERVER_ARGS` (more
//! arguments for the etcd-backed server, such as `--threads 1`), `BENCH_OPEN_MODE` (run the
//! etcd-backed servers in open development mode instead of with a key file).

#[path = "../tests/support/etcd.rs"]
#[allow(dead_code)]
mod etcd_support;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LockOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp,
};
use leasehold::DistributedLock;
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
mod etcd_hop;
mod etcd_load;
use common::{Spawned, Stats, env_num, handoff, stats};

/// One round's figures for the summary against etcd's lock service (v3lock).
#[derive(Default, Clone, Copy)]
struct Round {
    /// Uncontended acquire+release p50, ours and v3lock's (ms), interleaved.
    pair: f64,
    v3_pair: f64,
    /// Two etcd writes behind a bare HTTP/2 hop (ms): the floor of any client -> server ->
    /// etcd design.
    hop: f64,
    /// Mean idle time between holders, 8 tasks on one lock (ms), and how many grants went
    /// to the same task twice in a row (0 under strict FIFO).
    gap: f64,
    v3_gap: f64,
    repeats: usize,
    /// Pairs/s of 32 tasks on distinct locks.
    distinct: f64,
    v3_distinct: f64,
}

fn main() {
    etcd_hop::serve_if_asked();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// Slices per round of the 32-task comparison: the SDK and v3lock take turns this many
/// times each.
const DISTINCT_SLICES: u32 = 3;

/// The bench's API key, made with `leasehold-server new-key --project bench`, and its line
/// in the key file.
const KEY: &str = "dlk_7db92cf4_e840e7a18fe6a4d9418c40b0cf4b80336b85814a";
const KEY_FILE: &str = "[[projects]]\nname = \"bench\"\nkeys = [{ id = \"7db92cf4\", sha256 = \"9cdb198ff06810227c966eaa280e8283c00ad65790f662c3dbec49d84d994ddc\" }]\n";

/// The etcd-backed servers run as in production, with a key file, unless `BENCH_OPEN_MODE`
/// is set. It matters to etcd: in open mode a project is named after its key's SHA-256
/// (64 hex digits, which every one of its etcd keys carries, in hex again), where a key
/// file's projects carry the names their operator gave them.
fn open_mode() -> bool {
    std::env::var_os("BENCH_OPEN_MODE").is_some()
}

/// The API key the SDK presents to the etcd-backed servers.
fn api_key() -> String {
    if open_mode() { "bench" } else { KEY }.to_owned()
}

/// The etcd-backed servers' arguments beyond the listen address and the backend: the key
/// file, then `BENCH_SERVER_ARGS`.
fn server_args() -> Vec<String> {
    let mut args = Vec::new();
    if !open_mode() {
        let path = std::env::temp_dir().join("leasehold-bench-keys.toml");
        std::fs::write(&path, KEY_FILE).expect("the bench's key file");
        args.push("--key-file".to_owned());
        args.push(path.display().to_string());
    }
    args.extend(
        std::env::var("BENCH_SERVER_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned),
    );
    args
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latencies of `n` sequential runs of `f`, after 20 to warm up.
async fn sample<F, Fut>(n: usize, mut f: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..20 {
        f().await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    stats(samples)
}

async fn run() {
    let pairs = env_num("BENCH_PAIRS", 500) as usize;
    let secs = env_num("BENCH_SECS", 3);
    let etcd = etcd_support::EtcdCluster::start(1).await;
    println!("== etcd on this machine's own disk ==");
    let more = env_num("BENCH_MORE_PAIRS", 10_000) as usize;
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let figures = measure(&etcd, rounds, pairs, secs, more).await;
    drop(etcd);
    let scaling = if env_num("BENCH_SCALING", 1) == 0 {
        println!("\n(scaling over a 3-member etcd skipped: BENCH_SCALING=0)");
        None
    } else {
        println!("\n== scaling: 1, 2 and 3 servers over one 3-member etcd ==");
        let (rows, raw) =
            etcd_load::scaling(Duration::from_secs(secs), &server_args(), &api_key()).await;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        for row in &rows {
            println!(
                "{} server(s), {} tasks each on distinct locks: {:.0} pairs/s ({:.0} etcd writes/s at 2 per pair); cores used: etcd {:.2}, servers {:.2}, clients {:.2} (of {cores} on this machine)",
                row.servers,
                etcd_load::TASKS,
                row.pairs_per_sec,
                row.pairs_per_sec * 2.0,
                row.cores[0],
                row.cores[1],
                row.cores[2]
            );
        }
        println!("etcd's own write rate (concurrent puts, same cluster): {raw:.0} puts/s");
        Some((rows, raw))
    };
    // Printed before the slower disk's round, which can fail where strace cannot attach.
    summary(&figures, scaling.as_ref());
    if let Some((delay, slow)) = slow_disk(pairs, secs).await {
        for r in &slow {
            println!(
                "\nFor context, on the slower disk (+{delay} µs per sync): uncontended pair p50 ours / v3lock {:.2}, its bare hop {:.2}",
                r.pair / r.v3_pair,
                r.hop / r.v3_pair
            );
        }
    }
}

/// One round against an etcd whose every sync takes `BENCH_SLOW_SYNC_US` longer, with that
/// delay; `None` if skipped.
async fn slow_disk(pairs: usize, secs: u64) -> Option<(u64, Vec<Round>)> {
    let delay = env_num("BENCH_SLOW_SYNC_US", 600);
    if delay == 0 {
        return None;
    }
    println!(
        "\n== etcd on a slower disk: every fsync/fdatasync {delay} µs longer (BENCH_SLOW_SYNC_US) =="
    );
    if Command::new("strace").arg("-V").output().is_err() {
        println!("skipped: strace, which adds the delay, is not installed");
        return None;
    }
    let slow = etcd_support::EtcdCluster::start_slow_disk(1, Duration::from_micros(delay)).await;
    Some((delay, measure(&slow, 1, pairs, secs, 0).await))
}

/// The figures against one etcd, `rounds` times, then the pair on a lock worn by `more`
/// pairs (unless 0).
async fn measure(
    etcd: &etcd_support::EtcdCluster,
    rounds: usize,
    pairs: usize,
    secs: u64,
    more: usize,
) -> Vec<Round> {
    let mut figures = Vec::new();
    let endpoint = etcd.endpoint(0);
    let server = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_leasehold-server"))
            .args(["--listen", "127.0.0.1:0", "--backend", "etcd"])
            .args(["--etcd-endpoints", &endpoint])
            .args(server_args())
            .env("RUST_LOG", "warn,leasehold_server=info"),
    );
    // The same server on the memory store: what HTTP and the SDK cost without etcd.
    let memory = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_leasehold-server"))
            .args(["--listen", "127.0.0.1:0", "--no-state-file"])
            .env("RUST_LOG", "warn,leasehold_server=info"),
    );
    let hop_process = Spawned::start(&mut etcd_hop::command(&endpoint));
    let hop = etcd_hop::Hop::new(&hop_process.url);
    let on_memory = DistributedLock::builder("bench")
        .endpoint(&memory.url)
        .build()
        .unwrap();
    let client = Client::connect([endpoint.as_str()], None).await.unwrap();
    let etcd_pid = etcd.pid(0).expect("etcd runs");
    let dl = DistributedLock::builder(api_key())
        .endpoint(&server.url)
        .build()
        .unwrap();
    println!(
        "etcd {} (one member, fsync on), server {} (--backend etcd); {pairs} samples per figure",
        endpoint, server.url
    );
    if std::env::var_os("BENCH_ONLY_PAIR").is_some() {
        only_pair(
            &server.url,
            &client,
            &hop,
            &dl,
            pairs,
            [server.child.id(), hop_process.child.id(), etcd_pid],
        )
        .await;
        return figures;
    }
    if let Some(secs) = std::env::var("BENCH_ONLY_DISTINCT")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        // For profiling: only the SDK on distinct locks, with the processes' ids to attach to.
        println!(
            "server pid {}, etcd pid {etcd_pid}, bench pid {}",
            server.child.id(),
            std::process::id()
        );
        let span = Duration::from_secs(secs);
        if std::env::var_os("BENCH_V3LOCK").is_some() {
            let rate = etcd_load::v3lock_distinct(&client, etcd_load::TASKS, span).await;
            println!(
                "{} tasks on distinct locks: v3lock {rate:.0} pairs/s",
                etcd_load::TASKS
            );
            return figures;
        }
        let rate = etcd_load::ours_distinct(&dl, etcd_load::TASKS, span).await;
        println!(
            "{} tasks on distinct locks: SDK {rate:.0} pairs/s",
            etcd_load::TASKS
        );
        // The server's etcd calls: how many, and how long each took on average (a shared
        // transaction's mean is what bounds the rate: see `batch.rs`).
        let text = scrape(&server.url).unwrap_or_default();
        let metric = "leasehold_etcd_call_duration_seconds_count{call=\"";
        for (call, count) in text.lines().filter_map(|line| {
            let (call, count) = line.strip_prefix(metric)?.split_once("\"} ")?;
            Some((call, count.trim().parse::<f64>().ok()?))
        }) {
            let sum = sample_value(
                &text,
                &format!("leasehold_etcd_call_duration_seconds_sum{{call=\"{call}\"}}"),
            )
            .unwrap_or(0.0);
            println!(
                "  etcd call {call}: {count:.0} calls, mean {:.2} ms",
                1000.0 * sum / count.max(1.0)
            );
        }
        return figures;
    }
    let syncs_before = wal_syncs(&endpoint);
    let session = client.clone().lease_grant(600, None).await.unwrap().id();
    for round in 1..=rounds {
        println!("\n-- round {round} --");
        let mut figure = Round::default();
        floor(&client, pairs).await;
        // Interleaved, one of each in turn, so that a drift of the machine's speed moves
        // all alike and the ratios hold.
        let [two_writes, behind_hop, pair, own] =
            uncontended_pairs(&client, &hop, &dl, session, pairs).await;
        figure.pair = ms(pair.p50);
        figure.hop = ms(behind_hop.p50);
        figure.v3_pair = ms(own.p50);
        println!(
            "etcd lock service pair (lock+unlock, session lease): p50 {:.2} ms  p99 {:.2} ms",
            ms(own.p50),
            ms(own.p99)
        );
        println!(
            "interleaved: two etcd writes (put+delete):          p50 {:.2} ms  p99 {:.2} ms",
            ms(two_writes.p50),
            ms(two_writes.p99)
        );
        println!(
            "             the same two behind a bare HTTP/2 hop: p50 {:.2} ms  p99 {:.2} ms  = {:.2}x two etcd writes (p50): the floor of any client -> server -> etcd design",
            ms(behind_hop.p50),
            ms(behind_hop.p99),
            behind_hop.p50.as_secs_f64() / two_writes.p50.as_secs_f64()
        );
        println!(
            "             SDK acquire+release pair:              p50 {:.2} ms  p99 {:.2} ms  = {:.2}x two etcd writes (p50), {:.2} ms more",
            ms(pair.p50),
            ms(pair.p99),
            pair.p50.as_secs_f64() / two_writes.p50.as_secs_f64(),
            ms(pair.p50.saturating_sub(two_writes.p50))
        );
        let pids = [server.child.id(), etcd_pid, std::process::id()];
        let cpu_before = cpu(&pids);
        let calls_before = server_calls(&server.url);
        let (acquire, release) = halves(&dl, pairs).await;
        let calls_after = server_calls(&server.url);
        let cpu_used: Vec<f64> = cpu(&pids)
            .iter()
            .zip(&cpu_before)
            .map(|(after, before)| (after - before) / (pairs + 20) as f64 * 1e3)
            .collect();
        let memory_cpu_before = cpu(&[memory.child.id()])[0];
        let (memory_acquire, memory_release) = halves(&on_memory, pairs).await;
        let memory_cpu =
            (cpu(&[memory.child.id()])[0] - memory_cpu_before) / (pairs + 20) as f64 * 1e3;
        println!(
            "SDK acquire p50 {:.2} ms, release p50 {:.2} ms (memory store, same build: {:.2} ms, {:.2} ms)",
            ms(acquire.p50),
            ms(release.p50),
            ms(memory_acquire.p50),
            ms(memory_release.p50)
        );
        if let (Some(before), Some(after)) = (calls_before, calls_after) {
            let mean = |i: usize| {
                let (count, secs): (f64, f64) =
                    (after[i].0 - before[i].0, after[i].1 - before[i].1);
                if count > 0.0 {
                    secs / count * 1e3
                } else {
                    f64::NAN
                }
            };
            println!(
                "  seen by the server (means): the acquire's etcd transaction {:.2} ms (its keep-alive beside it {:.2} ms), the release's {:.2} ms; the rest of each half is HTTP, the SDK and the server's own code",
                mean(0),
                mean(1),
                mean(2)
            );
        }
        println!(
            "  CPU per pair: server {:.2} ms (memory store: {memory_cpu:.2} ms), etcd {:.2} ms, client (this process) {:.2} ms",
            cpu_used[0], cpu_used[1], cpu_used[2]
        );
        // Separate clients, as separate processes would be.
        let clients: Vec<DistributedLock> = (0..8)
            .map(|_| {
                DistributedLock::builder(api_key())
                    .endpoint(&server.url)
                    .build()
                    .unwrap()
            })
            .collect();
        let (gap, repeats, grants) = handoff(
            clients.clone(),
            Duration::from_secs(60),
            Duration::from_secs(secs),
        )
        .await;
        println!(
            "SDK hand-over, 8 tasks:  gap p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  ({grants} grants, {repeats} to the same task twice in a row)",
            ms(gap.p50),
            ms(gap.p99),
            ms(gap.mean)
        );
        figure.gap = ms(gap.mean);
        figure.repeats = repeats;
        // The other kinds against the mutex's gap just measured (target: within 1.2x).
        let lease = Duration::from_secs(60);
        let [(sem, sem_grants), (rw, rw_grants)] =
            common::kinds_handoff(clients, lease, Duration::from_secs(secs)).await;
        println!(
            "SDK hand-over, other kinds: semaphore gap p50 {:.2} ms ({sem_grants} grants, ratio to the mutex {:.2}) | read-write gap p50 {:.2} ms ({rw_grants} grants, ratio {:.2})",
            ms(sem.p50),
            sem.p50.as_secs_f64() / gap.p50.as_secs_f64(),
            ms(rw.p50),
            rw.p50.as_secs_f64() / gap.p50.as_secs_f64(),
        );
        let (gap, grants) = etcd_lock_handoff(&client, 8, Duration::from_secs(secs)).await;
        println!(
            "etcd lock service hand-over, 8 tasks: gap p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  ({grants} grants)",
            ms(gap.p50),
            ms(gap.p99),
            ms(gap.mean)
        );
        figure.v3_gap = ms(gap.mean);
        // 32 tasks on distinct locks, ours and v3lock's in turn, in `DISTINCT_SLICES`
        // slices each (which goes first alternates from slice to slice and round to round):
        // the machine's speed drifts by more than the ratio within a few seconds, and
        // alternating slices cancel the drift out of it.
        let tasks = etcd_load::TASKS;
        let slice = Duration::from_secs(secs) / DISTINCT_SLICES;
        let (mut ours, mut theirs) = (0.0, 0.0);
        for i in 0..DISTINCT_SLICES {
            if (round + i as usize) % 2 == 1 {
                ours += etcd_load::ours_distinct(&dl, tasks, slice).await;
                theirs += etcd_load::v3lock_distinct(&client, tasks, slice).await;
            } else {
                theirs += etcd_load::v3lock_distinct(&client, tasks, slice).await;
                ours += etcd_load::ours_distinct(&dl, tasks, slice).await;
            }
        }
        figure.distinct = ours / f64::from(DISTINCT_SLICES);
        figure.v3_distinct = theirs / f64::from(DISTINCT_SLICES);
        println!(
            "{tasks} tasks on distinct locks: SDK {:.0} pairs/s, etcd lock service {:.0} pairs/s",
            figure.distinct, figure.v3_distinct
        );
        figures.push(figure);
    }
    let _ = client.clone().lease_revoke(session).await;
    if let (Some(before), Some(after)) = (syncs_before, wal_syncs(&endpoint)) {
        let (count, secs) = (after.0 - before.0, after.1 - before.1);
        if count > 0.0 {
            println!(
                "\netcd's WAL syncs meanwhile: {count} of {:.3} ms on average (etcd_disk_wal_fsync_duration_seconds)",
                secs / count * 1e3
            );
        }
    }
    if more == 0 {
        return figures;
    }
    // etcd keeps deleted names until a compaction (this etcd never compacts): a lock used
    // many times must not get slower for it.
    let first = sample(pairs, || async {
        dl.lock("worn").await.unwrap().release().await.unwrap();
    })
    .await;
    for _ in 0..more {
        dl.lock("worn").await.unwrap().release().await.unwrap();
    }
    let later = sample(pairs, || async {
        dl.lock("worn").await.unwrap().release().await.unwrap();
    })
    .await;
    println!(
        "\nSDK pair on a fresh lock: p50 {:.2} ms; after {more} more pairs on it: p50 {:.2} ms",
        ms(first.p50),
        ms(later.p50)
    );
    figures
}

/// The targets against etcd's lock service, one ratio per round, PASS or FAIL on the
/// median round.
fn summary(rounds: &[Round], scaling: Option<&(Vec<etcd_load::ScalingRow>, f64)>) {
    if rounds.is_empty() {
        return;
    }
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let per_round = |f: &dyn Fn(&Round) -> f64| {
        rounds
            .iter()
            .map(|r| format!("{:.2}", f(r)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!("\n== summary against etcd's lock service (v3lock), same etcd, same run ==");
    println!("| target | per round | median | goal | verdict |");
    println!("| --- | --- | --- | --- | --- |");
    let throughput = |r: &Round| r.distinct / r.v3_distinct;
    let t = median(&throughput);
    println!(
        "| 32 tasks, distinct locks: pairs/s ours / v3lock | {} | {t:.2} | >= 2 (required >= 1) | {} |",
        per_round(&throughput),
        if t >= 2.0 {
            "PASS"
        } else if t >= 1.0 {
            "PASS (required only)"
        } else {
            "FAIL"
        }
    );
    let pair = |r: &Round| r.pair / r.v3_pair;
    let p = median(&pair);
    println!(
        "| uncontended pair p50: ours / v3lock | {} | {p:.2} | <= 1.2 | {} |",
        per_round(&pair),
        verdict(p <= 1.2)
    );
    let floor = |r: &Round| r.hop / r.v3_pair;
    println!(
        "| (floor: two etcd writes behind a bare HTTP/2 hop / v3lock pair) | {} | {:.2} | | |",
        per_round(&floor),
        median(&floor)
    );
    let gap = |r: &Round| r.gap / r.v3_gap;
    let g = median(&gap);
    let repeats: usize = rounds.iter().map(|r| r.repeats).sum();
    println!(
        "| 8 tasks, one lock: mean idle gap ours / v3lock | {} | {g:.2} | <= 0.33 | {} |",
        per_round(&gap),
        verdict(g <= 1.0 / 3.0)
    );
    println!(
        "| 8 tasks, one lock: grants to the same task twice in a row | {} | | 0 (strict FIFO) | {} |",
        rounds
            .iter()
            .map(|r| r.repeats.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        verdict(repeats == 0)
    );
    if let Some((rows, raw)) = scaling {
        let base = rows.first().map_or(f64::NAN, |r| r.pairs_per_sec);
        for row in rows {
            println!(
                "| {} server(s), 3-member etcd: pairs/s (vs 1 server; etcd writes at 2 per pair / etcd's own put rate) | {:.0} | {:.2}x; {:.2} | grows until etcd is the limit | |",
                row.servers,
                row.pairs_per_sec,
                row.pairs_per_sec / base,
                row.pairs_per_sec * 2.0 / raw
            );
        }
    }
}

type Step<'a> = &'a dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Latencies of `n` rounds of the steps, one run of each in turn per round, after 20 rounds
/// to warm up.
async fn interleaved<const N: usize>(n: usize, steps: [Step<'_>; N]) -> [Stats; N] {
    let mut samples: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(n));
    for round in 0..n + 20 {
        for (step, samples) in steps.iter().zip(&mut samples) {
            let start = Instant::now();
            step().await;
            if round >= 20 {
                samples.push(start.elapsed());
            }
        }
    }
    samples.map(stats)
}

/// The Prometheus text at `base` (`http://host:port`) + `/metrics`.
fn scrape(base: &str) -> Option<String> {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://")?;
    let mut tcp = std::net::TcpStream::connect(address).ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the sample named `name` (labels included) in Prometheus text.
fn sample_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// etcd's count and total seconds of WAL syncs so far, from its metrics.
fn wal_syncs(endpoint: &str) -> Option<(f64, f64)> {
    let text = scrape(endpoint)?;
    Some((
        sample_value(&text, "etcd_disk_wal_fsync_duration_seconds_count")?,
        sample_value(&text, "etcd_disk_wal_fsync_duration_seconds_sum")?,
    ))
}

/// The server's own account of its etcd calls so far, from its `/metrics`: (count, total
/// seconds) of the acquire's transaction, the keep-alive beside it, and the release's; a
/// call the server has not made yet counts as none (its series appears with the first).
/// `None` only if the metrics cannot be read.
fn server_calls(url: &str) -> Option<[(f64, f64); 3]> {
    let text = scrape(url)?;
    let call = |name: &str| {
        let metric = "leasehold_etcd_call_duration_seconds";
        let value = |part: &str| {
            sample_value(&text, &format!("{metric}_{part}{{call=\"{name}\"}}")).unwrap_or(0.0)
        };
        (value("count"), value("sum"))
    };
    Some([call("queue"), call("keep_alive"), call("release")])
}

/// Single etcd operations, as the backend uses them.
async fn floor(client: &Client, n: usize) {
    let c = client.clone();
    let put = sample(n, || {
        let mut c = c.clone();
        async move {
            c.put("bench/floor", "v", None).await.unwrap();
        }
    })
    .await;
    let me = std::process::id();
    let cpu_before = cpu(&[me])[0];
    let two = sample(n, || {
        let mut c = c.clone();
        async move {
            c.put("bench/floor", "v", None).await.unwrap();
            c.delete("bench/floor", None).await.unwrap();
        }
    })
    .await;
    let client_cpu_per_call = (cpu(&[me])[0] - cpu_before) / ((n + 20) * 2) as f64 * 1e3;
    let read = sample(n, || {
        let mut c = c.clone();
        async move {
            c.get("bench/floor", None).await.unwrap();
        }
    })
    .await;
    let lease = c.clone().lease_grant(10, None).await.unwrap().id();
    let keep_alive = sample(n, || {
        let mut c = c.clone();
        async move {
            c.lease_keep_alive(lease).await.unwrap();
        }
    })
    .await;
    let grant = sample(n / 5, || {
        let mut c = c.clone();
        async move {
            let id = c.lease_grant(10, None).await.unwrap().id();
            // Revoked outside the measurement's concern: it is a second write.
            std::mem::drop(tokio::spawn(async move {
                let _ = c.lease_revoke(id).await;
            }));
        }
    })
    .await;
    // The backend's acquire transaction on a free lock, its release transaction, then a
    // revoke.
    let mut txn_samples = Vec::new();
    let mut release_samples = Vec::new();
    let mut revoke_samples = Vec::new();
    for i in 0..n / 5 {
        let mut c = c.clone();
        let id = c.lease_grant(10, None).await.unwrap().id();
        let key = format!("bench/q/{i}");
        let rkey = format!("bench/r/{i}");
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                rkey.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(key.clone(), "{}", Some(PutOptions::new().with_lease(id))),
                TxnOp::put(rkey.clone(), "id", Some(PutOptions::new().with_lease(id))),
                TxnOp::get(
                    "bench/q/",
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            ]);
        let start = Instant::now();
        c.txn(txn).await.unwrap();
        txn_samples.push(start.elapsed());
        let release = Txn::new()
            .when(vec![
                Compare::lease(rkey.clone(), CompareOp::Equal, id),
                Compare::lease(key.clone(), CompareOp::Equal, id),
            ])
            .and_then(vec![
                TxnOp::get(key.clone(), None),
                TxnOp::delete(key, None),
                TxnOp::delete(rkey, None),
            ]);
        let start = Instant::now();
        assert!(c.txn(release).await.unwrap().succeeded());
        release_samples.push(start.elapsed());
        let start = Instant::now();
        c.lease_revoke(id).await.unwrap();
        revoke_samples.push(start.elapsed());
    }
    let (txn, release, revoke) = (
        stats(txn_samples),
        stats(release_samples),
        stats(revoke_samples),
    );
    // The backend's "who is first" read (a sorted range).
    let first = sample(n, || {
        let mut c = c.clone();
        async move {
            c.get(
                "bench/q/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
            .await
            .unwrap();
        }
    })
    .await;
    println!(
        "etcd floor p50: put {:.2} ms | put+delete (two writes) {:.2} ms | linearizable read {:.2} ms | sorted range {:.2} ms",
        ms(put.p50),
        ms(two.p50),
        ms(read.p50),
        ms(first.p50)
    );
    println!(
        "                lease grant {:.2} ms | keep-alive {:.2} ms | acquire txn {:.2} ms | release txn {:.2} ms | revoke {:.2} ms",
        ms(grant.p50),
        ms(keep_alive.p50),
        ms(txn.p50),
        ms(release.p50),
        ms(revoke.p50)
    );
    println!("                etcd-client CPU per call in this build: {client_cpu_per_call:.2} ms");
}

/// One lock + unlock through etcd's lock service, with the session lease `session`.
async fn etcd_lock_once(client: &Client, session: i64) {
    let mut c = client.clone();
    let key = c
        .lock(
            "bench/etcd-lock-solo",
            Some(LockOptions::new().with_lease(session)),
        )
        .await
        .unwrap()
        .key()
        .to_vec();
    c.unlock(key).await.unwrap();
}

/// The uncontended pairs, interleaved: two etcd writes, the same behind the bare hop, the
/// SDK's acquire+release, and v3lock's lock+unlock with the session lease `session`.
async fn uncontended_pairs(
    client: &Client,
    hop: &etcd_hop::Hop,
    dl: &DistributedLock,
    session: i64,
    pairs: usize,
) -> [Stats; 4] {
    interleaved(
        pairs,
        [
            &|| {
                let mut c = client.clone();
                Box::pin(async move {
                    c.put("bench/floor", "v", None).await.unwrap();
                    c.delete("bench/floor", None).await.unwrap();
                })
            },
            &|| Box::pin(hop.pair()),
            &|| {
                Box::pin(async {
                    dl.lock("solo").await.unwrap().release().await.unwrap();
                })
            },
            &|| Box::pin(etcd_lock_once(client, session)),
        ],
    )
    .await
}

/// For experiments on the uncontended pair: the interleaved pairs alone, with the context
/// switches and CPU per pair of the server, the hop and etcd (each process serves one or
/// two of the four steps, so a figure per pair compares like with like only across runs).
async fn only_pair(
    url: &str,
    client: &Client,
    hop: &etcd_hop::Hop,
    dl: &DistributedLock,
    pairs: usize,
    pids: [u32; 3],
) {
    let session = client.clone().lease_grant(600, None).await.unwrap().id();
    let (switches_before, cpu_before) = (pids.map(switches), cpu(&pids));
    let before = server_calls(url).unwrap_or_default();
    let [two_writes, behind_hop, pair, own] =
        uncontended_pairs(client, hop, dl, session, pairs).await;
    let n = (pairs + 20) as f64;
    let cpu_used: Vec<f64> = cpu(&pids)
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| (a - b) / n * 1e3)
        .collect();
    let switched: Vec<f64> = pids
        .map(switches)
        .iter()
        .zip(&switches_before)
        .map(|(a, b)| (a - b) as f64 / n)
        .collect();
    println!(
        "p50 ms: two writes {:.2}, hop {:.2}, SDK pair {:.2}, v3lock {:.2}; SDK/v3lock {:.2}, hop/v3lock {:.2}",
        ms(two_writes.p50),
        ms(behind_hop.p50),
        ms(pair.p50),
        ms(own.p50),
        pair.p50.as_secs_f64() / own.p50.as_secs_f64(),
        behind_hop.p50.as_secs_f64() / own.p50.as_secs_f64()
    );
    println!(
        "per round of the four: context switches server {:.1}, hop {:.1}, etcd {:.1}; CPU ms server {:.2}, hop {:.2}, etcd {:.2}",
        switched[0], switched[1], switched[2], cpu_used[0], cpu_used[1], cpu_used[2]
    );
    if let Some(after) = server_calls(url) {
        let mean = |i: usize| {
            let (count, sum) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
            (count, sum / count.max(1.0) * 1e3)
        };
        let ((queues, queue), (keep_alives, _), (releases, release)) = (mean(0), mean(1), mean(2));
        println!(
            "seen by the server: {queues} acquire transactions of {queue:.2} ms on average, {releases} release transactions of {release:.2} ms, {keep_alives} keep-alives"
        );
    }
}

/// Context switches of every thread of process `pid` so far.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Acquire and release latencies, measured apart.
async fn halves(dl: &DistributedLock, n: usize) -> (Stats, Stats) {
    let (mut acquires, mut releases) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 20 {
        let start = Instant::now();
        let guard = dl.lock("halves").await.unwrap();
        let acquired = start.elapsed();
        let start = Instant::now();
        guard.release().await.unwrap();
        if i >= 20 {
            acquires.push(acquired);
            releases.push(start.elapsed());
        }
    }
    (stats(acquires), stats(releases))
}

/// 8 tasks take turns on one lock through etcd's lock service, each with its own session.
async fn etcd_lock_handoff(client: &Client, tasks: usize, duration: Duration) -> (Stats, usize) {
    let origin = Instant::now();
    let released_at = Arc::new(AtomicU64::new(0));
    let log = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let mut c = client.clone();
        let (released_at, log, stop) = (released_at.clone(), log.clone(), stop.clone());
        set.spawn(async move {
            let session = c.lease_grant(60, None).await.unwrap().id();
            while !stop.load(Ordering::Relaxed) {
                let key = c
                    .lock(
                        "bench/etcd-lock-hot",
                        Some(LockOptions::new().with_lease(session)),
                    )
                    .await
                    .unwrap()
                    .key()
                    .to_vec();
                let granted = origin.elapsed();
                let released = Duration::from_nanos(released_at.load(Ordering::SeqCst));
                log.lock().unwrap().push(granted.saturating_sub(released));
                released_at.store(origin.elapsed().as_nanos() as u64, Ordering::SeqCst);
                c.unlock(key).await.unwrap();
            }
            let _ = c.lease_revoke(session).await;
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    let log = log.lock().unwrap();
    let steady = log[tasks.min(log.len())..].to_vec();
    let n = steady.len();
    (stats(steady), n)
}

/// CPU seconds (user + system) each process has used so far (Linux `/proc`).
fn cpu(pids: &[u32]) -> Vec<f64> {
    // Clock ticks per second: 100 on Linux (USER_HZ).
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which ends with ')'): utime is the 12th, stime
            // the 13th.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (ticks(11) + ticks(12)) / 100.0
        })
        .collect()
}
