//! What the tests of hostile load measure: a server process's memory and CPU, and a
//! legitimate client's pace.

use leasehold::DistributedLock;
use std::time::Duration;
use tokio::time::Instant;

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("Linux /proc");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// CPU time a process has used (user and system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("Linux /proc");
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// Acquire+release pairs of one client on lock `work`, each timed, sorted.
pub async fn pairs(dl: &DistributedLock, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        dl.lock("work").await.unwrap().release().await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times
}

/// The `pct`th percentile of sorted times.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[sorted.len() * pct / 100]
}

/// The 99th percentile of sorted times.
pub fn p99(sorted: &[Duration]) -> Duration {
    percentile(sorted, 99)
}

/// The 90th percentile of sorted times: what "another project keeps its pace" is judged by
/// where the pairs are sub-millisecond (with sessions). A p99 of a few hundred pairs is
/// then a handful of samples, and on a loaded 2-core machine those are the OS scheduler's
/// time slices (a few milliseconds each) landing on the test's own threads, not the
/// server; a server that an attack really slows moves the whole distribution.
pub fn p90(sorted: &[Duration]) -> Duration {
    percentile(sorted, 90)
}
