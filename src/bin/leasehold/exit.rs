//! Exit codes: the command's own, or a documented one saying what happened instead.
//!
//! The codes follow sysexits.h where one fits and the shell's conventions for commands that
//! cannot run or died of a signal. Keep this list, `--help`, the README and the CHANGELOG in
//! step.

use leasehold::Error;
use std::process::{ExitCode, ExitStatus};

/// Invalid argument (EX_USAGE).
pub const USAGE: u8 = 64;
/// The lock server could not be reached or answered with an error (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// `--timeout` passed before the lock was granted; the command was not run (EX_TEMPFAIL).
pub const TIMEOUT: u8 = 75;
/// The lease was lost while the command ran; the command was stopped.
pub const LEASE_LOST: u8 = 76;
/// The server refused the API key (EX_NOPERM).
pub const NO_PERMISSION: u8 = 77;
/// `--max-hold` was reached; the command was stopped.
pub const MAX_HOLD: u8 = 78;
/// The command could not be executed (shell convention).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (shell convention).
pub const NOT_FOUND: u8 = 127;

/// The table shown by `--help`.
pub const HELP: &str = "\
Exit codes:
  N      the command's own exit code
  128+N  the command died of signal N (or leasehold got signal N while waiting)
  64     invalid argument, or a name in use another way (another --permits count)
  69     lock server unavailable, or it answered with an error
  75     timed out waiting for the lock; the command was not run
  76     lease lost while the command ran; the command was stopped
  77     the server refused the API key
  78     --max-hold reached; the command was stopped
  126    the command could not be executed
  127    the command was not found
A command that itself exits with one of these codes looks the same; the message on stderr
tells them apart.";

/// The exit code for an SDK error.
pub fn for_error(error: &Error) -> u8 {
    match error {
        Error::Timeout { .. } => TIMEOUT,
        Error::LockLost { .. } => LEASE_LOST,
        Error::Unauthorized { .. } | Error::Forbidden { .. } => NO_PERMISSION,
        // A name in use another way (another --permits count): retrying will not help.
        Error::InvalidArgument { .. } | Error::Conflict { .. } => USAGE,
        // Unavailable, other server answers, and whatever later versions add.
        _ => UNAVAILABLE,
    }
}

/// The exit code that passes the command's own status on: its code, or 128+N for signal N.
pub fn for_status(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => for_signal(signal),
        // Stopped or continued: not reported by `wait`, which waits for termination.
        (None, None) => CANNOT_EXECUTE,
    }
}

/// 128+N: the shell's code for death by signal N.
pub fn for_signal(signal: i32) -> u8 {
    128u8.saturating_add(signal.clamp(0, 127) as u8)
}

/// Prints `leasehold: {message}` on stderr and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("leasehold: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses_pass_through() {
        assert_eq!(for_status(ExitStatus::from_raw(0)), 0);
        assert_eq!(for_status(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(for_status(ExitStatus::from_raw(255 << 8)), 255);
        // Killed by SIGKILL (9) and SIGTERM (15).
        assert_eq!(for_status(ExitStatus::from_raw(9)), 137);
        assert_eq!(for_status(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn errors_map_to_documented_codes() {
        let timeout = Error::Timeout {
            name: "n".into(),
            waited: std::time::Duration::ZERO,
            holder: None,
        };
        assert_eq!(for_error(&timeout), TIMEOUT);
        assert_eq!(
            for_error(&Error::LockLost {
                name: "n".into(),
                reason: leasehold::LostReason::Expired
            }),
            LEASE_LOST
        );
        let refused = Error::Unauthorized {
            endpoint: "e".into(),
        };
        assert_eq!(for_error(&refused), NO_PERMISSION);
        let unavailable = Error::Unavailable {
            endpoint: "e".into(),
            reason: "r".into(),
            source: None,
        };
        assert_eq!(for_error(&unavailable), UNAVAILABLE);
    }
}
