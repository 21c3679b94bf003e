//! `distributed-lock-server`: the lock server as a command.

use clap::Parser;
use distributed_lock::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// A lock server for distributed-lock clients.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:\n  distributed-lock-server\n  distributed-lock-server --listen 0.0.0.0:7878 --state-file /var/lib/distributed-lock/state"
)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "DISTRIBUTED_LOCK_LISTEN",
        default_value = "127.0.0.1:7878"
    )]
    listen: String,

    /// File keeping restart state (token epoch, longest lease); grants wait out old leases
    /// after a crash.
    #[arg(
        long,
        env = "DISTRIBUTED_LOCK_STATE_FILE",
        default_value = "distributed-lock.state"
    )]
    state_file: PathBuf,

    /// Keep no restart state (development only: a restart may then grant a lock a client
    /// still believes it holds).
    #[arg(long, conflicts_with = "state_file")]
    no_state_file: bool,

    /// Longest lease a client may ask for, such as `1h` or `90s`.
    #[arg(long, env = "DISTRIBUTED_LOCK_MAX_LEASE", default_value = "1h", value_parser = parse_duration)]
    max_lease: Duration,

    /// Longest time one long poll is held open.
    #[arg(long, env = "DISTRIBUTED_LOCK_MAX_POLL", default_value = "20s", value_parser = parse_duration)]
    max_poll: Duration,

    /// Worker threads (default: one per core).
    #[arg(long, env = "DISTRIBUTED_LOCK_THREADS")]
    threads: Option<usize>,
}

/// Parses `250ms`, `10s`, `5m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 10s, 5m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_millis(ms))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), distributed_lock::Error> {
    let mut builder = Server::builder()
        .bind(&args.listen)
        .max_lease(args.max_lease)
        .max_poll(args.max_poll);
    if args.no_state_file {
        tracing::warn!(
            "no state file: after a restart, locks may be granted that clients still believe they hold"
        );
    } else {
        builder = builder.state_file(&args.state_file);
    }
    let server = builder.start().await?;
    tracing::warn!(
        "OPEN DEVELOPMENT MODE: no API keys are configured, so any key is accepted and each distinct key is its own project"
    );
    tracing::info!("listening on {}", server.url());
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
