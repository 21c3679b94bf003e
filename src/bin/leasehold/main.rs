//! `leasehold`: take a distributed lock from the shell.
//!
//! `run NAME -- CMD ARGS...` runs a command while holding a lock (`run.rs`, with the child
//! process in `child.rs` and the waiting display in `waiting.rs`); `status NAME` shows who
//! holds it (`status.rs`); `list [PREFIX]` shows every lock of the project (`list.rs`);
//! `revoke NAME` ends the holder's lease (`revoke.rs`); `elect NAME -- CMD` runs a command
//! while leading an election (`elect.rs`, on `run.rs`'s machinery). The command line itself is in
//! `cli.rs`, exit codes in `exit.rs`, the signals passed on to the command in `signals.rs`.
//! Unix only: it relies on process groups and signals.

#[cfg(unix)]
mod child;
#[cfg(unix)]
mod cli;
#[cfg(unix)]
mod duration;
#[cfg(unix)]
mod elect;
#[cfg(unix)]
mod exit;
#[cfg(unix)]
mod list;
#[cfg(unix)]
mod revoke;
#[cfg(unix)]
mod run;
#[cfg(unix)]
mod signals;
#[cfg(unix)]
mod status;
#[cfg(unix)]
mod waiting;

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(unix))]
fn main() -> std::process::ExitCode {
    eprintln!("leasehold: the command-line client runs on Unix-like systems only");
    std::process::ExitCode::from(69)
}
