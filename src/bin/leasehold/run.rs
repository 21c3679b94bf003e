//! `run NAME -- CMD ARGS...`: take the lock, run the command while the lease lives, release.

use crate::child::{self, Running};
use crate::cli::ServerArgs;
use crate::duration::{self, human};
use crate::exit;
use crate::signals::Signals;
use crate::waiting::{self, Queue, Seen, StatusLine, holder_text};
use leasehold::{DistributedLock, Error, Leadership, LockGuard, LostReason};
use std::ffi::OsString;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;
use tokio::time::Instant;

/// Run a command while holding a lock.
///
/// Waits for the lock, runs the command with LEASEHOLD_NAME and
/// LEASEHOLD_FENCING_TOKEN in its environment, and releases the lock as soon as the
/// command ends. SIGINT, SIGTERM and SIGHUP are passed on to the command. If the lease is lost
/// or --max-hold is reached, the command gets SIGTERM, then SIGKILL after --kill-after.
#[derive(Debug, clap::Args)]
#[command(after_help = help())]
pub struct RunCommand {
    /// Take one of N permits of a semaphore instead: up to N runs at once. Everyone using
    /// NAME must give the same N.
    #[arg(long, value_name = "N", conflicts_with = "read")]
    permits: Option<u32>,

    /// Take a read (shared) lock instead: runs with --read share NAME, and exclude runs
    /// without it (writers).
    #[arg(long)]
    read: bool,

    #[command(flatten)]
    args: RunArgs,
}

/// What `run` and `elect` share: the lock, its lease, and the command.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Name of the lock.
    name: String,

    /// Lease length. The lease renews itself while the command runs; it bounds how long the
    /// lock stays taken if this process dies.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
    expires_in: Duration,

    /// Longest wait for the lock; then exit 75 without running the command. 0 tries once.
    /// [default: wait as long as it takes]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    timeout: Option<Duration>,

    /// Longest time the lock may be held, from the grant. The server frees the lock then,
    /// even if this process stalls. The command gets SIGTERM early enough to be gone by
    /// then (--kill-after plus a safety margin before), and leasehold exits 78.
    /// [default: no limit]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    max_hold: Option<Duration>,

    /// Label others see in `status` while this run holds the lock.
    /// [default: HOSTNAME:PID]
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,

    /// How long the command has to exit after SIGTERM before it gets SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration::parse)]
    kill_after: Duration,

    /// Run this shell command line with `/bin/sh -c`, as `flock -c` does, instead of a
    /// COMMAND after `--`.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "SHELL COMMAND",
        conflicts_with = "command"
    )]
    shell: Option<String>,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "shell", value_name = "COMMAND")]
    command: Vec<OsString>,
}

impl RunArgs {
    /// The program and its arguments: the COMMAND after `--`, or `/bin/sh -c` and the
    /// shell command line.
    fn argv(&self) -> Vec<OsString> {
        match &self.shell {
            Some(line) => vec!["/bin/sh".into(), "-c".into(), line.into()],
            None => self.command.clone(),
        }
    }
}

fn help() -> String {
    format!(
        "Examples:
  # cron: run the nightly report on one machine only; skip if it is still running
  leasehold run reports/nightly --timeout 0 -- ./nightly-report.sh
  # deploy: wait up to 10 minutes for other migrations; stop ours after an hour
  leasehold run db/migrate --timeout 10m --max-hold 1h -- ./manage.py migrate
  # a shell command line, as with flock -c
  leasehold run db/backup -c 'pg_dump app | gzip > /backup/app.sql.gz'

Durations: 250ms, 10s, 5m, 1h (a number needs its unit, except 0).

If the lease is lost (the server cannot be reached for most of a lease, or restarted
without its state), the command gets SIGTERM early enough that even the SIGKILL that follows
--kill-after later comes before the server could give the lock to anyone else. That holds
while --kill-after is under about half of --expires-in (as with the defaults); otherwise a
warning says so. The command runs in its own process group: signals reach all of it.

{}",
        exit::HELP
    )
}

/// Longest wait for the server to confirm the release after the command ended.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Why the command was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    LeaseLost,
    MaxHold,
}

/// What the command runs under.
#[derive(Debug, Clone)]
pub enum Hold {
    /// The lock alone (a writer).
    Exclusive,
    /// A read lock.
    Read,
    /// One of this many permits.
    Permits(u32),
    /// Leadership, with this election value.
    Leader(String),
}

/// Runs `run`.
pub async fn run_command(command: RunCommand, server: &ServerArgs) -> ExitCode {
    let hold = match (command.permits, command.read) {
        (Some(0), _) => return exit::fail(exit::USAGE, "--permits must be at least 1"),
        (Some(n), _) => Hold::Permits(n),
        (None, true) => Hold::Read,
        (None, false) => Hold::Exclusive,
    };
    run(command.args, hold, server).await
}

/// Runs the command under `hold`.
pub async fn run(args: RunArgs, hold: Hold, server: &ServerArgs) -> ExitCode {
    if args.expires_in.is_zero() {
        return exit::fail(exit::USAGE, "--expires-in must be longer than zero");
    }
    if args.max_hold == Some(Duration::ZERO) {
        return exit::fail(exit::USAGE, "--max-hold must be longer than zero");
    }
    // Presume the lease lost early enough that the command can be stopped, SIGKILL included,
    // before the server could expire the lease: --kill-after on top of the SDK's own margin.
    // The SDK caps a margin at half the lease.
    let margin = args.kill_after + (args.expires_in / 10).min(Duration::from_secs(1));
    if margin > args.expires_in / 2 {
        eprintln!(
            "leasehold: warning: with --kill-after {} and --expires-in {}, a command \
             stopped after a lost lease may still run when the lock goes to someone else; \
             use a longer --expires-in or a shorter --kill-after",
            human(args.kill_after),
            human(args.expires_in)
        );
    }
    if let Some(limit) = args.max_hold.filter(|limit| margin > *limit / 2) {
        eprintln!(
            "leasehold: warning: with --kill-after {} and --max-hold {}, the command may still \
             run when the server frees the lock at --max-hold; use a longer --max-hold or a \
             shorter --kill-after",
            human(args.kill_after),
            human(limit)
        );
    }
    let dl = match server.client(|builder| builder.safety_margin(margin)) {
        Ok(dl) => dl,
        Err(error) => return exit::fail(exit::for_error(&error), error),
    };
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            return exit::fail(exit::UNAVAILABLE, format!("cannot handle signals: {error}"));
        }
    };

    let guard = match acquire(&dl, &args, &hold, &mut signals).await {
        Ok(guard) => guard,
        Err(code) => return code,
    };
    let token = guard.fencing_token();
    let env = [
        ("LEASEHOLD_NAME", args.name.clone()),
        ("LEASEHOLD_FENCING_TOKEN", token.to_string()),
    ];
    let argv = args.argv();
    let mut running = match child::spawn(&argv, &env) {
        Ok(running) => running,
        Err(error) => {
            let _ = release(guard).await;
            let code = match error.kind() {
                io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            let program = argv[0].to_string_lossy();
            return exit::fail(code, format!("cannot run {program:?}: {error}"));
        }
    };

    let (stop, status) = supervise(&mut running, &guard, &args, &mut signals).await;
    running.reclaim_terminal();
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            // Should not happen; make sure nothing of the command outlives the lock.
            running.signal_group(libc::SIGKILL);
            let _ = release(guard).await;
            return exit::fail(
                exit::CANNOT_EXECUTE,
                format!("lost track of the command: {error}"),
            );
        }
    };
    if stop.is_some() {
        // What the command started may outlive it: nothing of it may run without the lock.
        running.signal_group(libc::SIGKILL);
    }
    drop(running);

    let release_problem = release(guard).await;
    match stop {
        Some(Stop::LeaseLost) => exit::fail(
            exit::LEASE_LOST,
            format!(
                "lost the lease on lock {:?}; the command was stopped ({})",
                args.name,
                describe(status)
            ),
        ),
        Some(Stop::MaxHold) => exit::fail(
            exit::MAX_HOLD,
            format!(
                "held lock {:?} for --max-hold {}; the command was stopped ({})",
                args.name,
                human(args.max_hold.unwrap_or_default()),
                describe(status)
            ),
        ),
        None => {
            // The command ended while the lease was believed held: pass its status on, and
            // say so if the release did not go as planned.
            if let Some(problem) = release_problem {
                eprintln!("leasehold: {problem}");
            }
            ExitCode::from(exit::for_status(status))
        }
    }
}

/// Releases the lock, waiting at most `RELEASE_WAIT` (an unreachable server could otherwise
/// hold us up until the lease ends by itself). Says what went wrong, if anything.
async fn release(guard: LockGuard) -> Option<String> {
    match tokio::time::timeout(RELEASE_WAIT, guard.release()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) if error.is_lock_lost() => Some(
            "the lease was already gone when the lock was released after the command ended".into(),
        ),
        Ok(Err(error)) => Some(format!(
            "releasing the lock failed; it frees itself when the lease ends: {error}"
        )),
        Err(_) => Some(format!(
            "the server did not confirm the release within {}; the lock frees itself when \
             the lease ends",
            human(RELEASE_WAIT)
        )),
    }
}

/// Waits for the lock, showing a status line on a terminal. A signal ends the wait (the
/// waiter is withdrawn) with 128+N.
async fn acquire(
    dl: &DistributedLock,
    args: &RunArgs,
    hold: &Hold,
    signals: &mut Signals,
) -> Result<LockGuard, ExitCode> {
    let mut line = StatusLine::if_terminal();
    // Those already waiting are ahead of us: look once before joining the line.
    let before = match line {
        Some(_) => tokio::time::timeout(Duration::from_secs(1), dl.inspect(&args.name))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|info| Seen::from(&info)),
        None => None,
    };
    let label = args.label.clone().unwrap_or_else(default_label);
    let mut acquire: Pin<Box<dyn Future<Output = Result<LockGuard, Error>>>> = match hold {
        Hold::Leader(value) => {
            let mut campaign = (dl.election(&args.name).campaign(value.clone()))
                .expires_in(args.expires_in)
                .metadata(label);
            if let Some(limit) = args.max_hold {
                campaign = campaign.max_hold(limit);
            }
            if let Some(timeout) = args.timeout {
                campaign = campaign.timeout(timeout);
            }
            Box::pin(async move { campaign.await.map(Leadership::into_guard) })
        }
        hold => {
            let request = match hold {
                Hold::Read => dl.read_lock(&args.name),
                Hold::Permits(n) => dl.semaphore(&args.name, *n),
                _ => dl.lock(&args.name),
            };
            let mut request = request.expires_in(args.expires_in).metadata(label);
            // The SDK and the server enforce --max-hold: the guard reports it as the
            // lease's loss, and the server frees the lock then even if this process stalls.
            if let Some(limit) = args.max_hold {
                request = request.max_hold(limit);
            }
            if let Some(timeout) = args.timeout {
                request = request.timeout(timeout);
            }
            Box::pin(request.into_future())
        }
    };
    let result = tokio::select! {
        result = &mut acquire => result,
        () = waiting::show(dl, &args.name, line.as_mut(), Queue::joined_after(before.as_ref())) => {
            unreachable!("the status line never ends")
        }
        signal = signals.recv() => {
            drop(acquire); // withdraws the waiter
            if let Some(line) = line.as_mut() {
                line.clear();
            }
            // Give the withdrawal a moment to reach the server; if it does not, the server
            // drops the waiter when it notices the connection is gone.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Err(exit::fail(
                exit::for_signal(signal),
                format!(
                    "got signal {signal} while waiting for lock {:?}; the command was not run",
                    args.name
                ),
            ));
        }
    };
    drop(line);
    result.map_err(|error| match error {
        Error::Timeout { holder, .. } => {
            let held_by = holder.map_or(String::new(), |h| {
                format!(
                    " (held by {})",
                    holder_text(h.fencing_token, h.metadata.as_deref())
                )
            });
            exit::fail(
                exit::TIMEOUT,
                format!(
                    "timed out after {} waiting for lock {:?}{held_by}; the command was not run",
                    human(args.timeout.unwrap_or_default()),
                    args.name
                ),
            )
        }
        error => exit::fail(exit::for_error(&error), error),
    })
}

/// Waits for the command to end, passing signals on, and stops it if the lease is lost or
/// `--max-hold` is reached. Returns why it was stopped, if it was, and how it ended.
async fn supervise(
    running: &mut Running,
    guard: &LockGuard,
    args: &RunArgs,
    signals: &mut Signals,
) -> (Option<Stop>, io::Result<ExitStatus>) {
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    let mut lease_lost = false;
    loop {
        tokio::select! {
            biased;
            status = running.child.wait() => return (stop, status),
            signal = signals.recv() => running.signal_group(signal),
            reason = guard.lost(), if !lease_lost => {
                lease_lost = true;
                if stop.is_none() {
                    if reason == LostReason::MaxHold {
                        stop = Some(Stop::MaxHold);
                        eprintln!(
                            "leasehold: held lock {:?} for --max-hold {}; stopping the command (SIGTERM, SIGKILL after {})",
                            args.name,
                            human(args.max_hold.unwrap_or_default()),
                            human(args.kill_after)
                        );
                    } else {
                        stop = Some(Stop::LeaseLost);
                        eprintln!(
                            "leasehold: lost the lease on lock {:?} ({reason}); stopping the command (SIGTERM, SIGKILL after {})",
                            args.name,
                            human(args.kill_after)
                        );
                    }
                    running.signal_group(libc::SIGTERM);
                    kill_at = Some(Instant::now() + args.kill_after);
                }
            }
            () = sleep_until(kill_at) => {
                kill_at = None;
                eprintln!(
                    "leasehold: the command did not stop within {}; sending SIGKILL",
                    human(args.kill_after)
                );
                running.signal_group(libc::SIGKILL);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with {code}"),
        (None, Some(signal)) => format!("it died of signal {signal}"),
        (None, None) => "it ended".to_owned(),
    }
}

/// `HOSTNAME:PID`, so that `status` says where the holder runs.
pub fn default_label() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = if ok {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".to_owned()
    };
    format!("{host}:{}", std::process::id())
}
