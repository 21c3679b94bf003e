//! `revoke NAME`: end the current holder's lease now, as an operator.

use crate::exit;
use leasehold::DistributedLock;
use std::process::ExitCode;

/// End the current holder's lease of a lock now.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The holder learns it on its next renewal (a `leasehold run` holder stops its command
and exits with 76), and the next waiter gets the lock with a higher fencing token, after the
holder's lock-delay if it asked for one. Only locks of the key's project; with a key file,
only keys marked `admin = true` may revoke.

Examples:
  leasehold revoke db/migrate

Exit codes: 0 revoked, 1 nobody held the lock, 64 invalid name, 69 server unavailable,
77 API key refused or not an admin key.")]
pub struct RevokeArgs {
    /// Name of the lock.
    name: String,
}

/// Runs `revoke`.
pub async fn revoke(args: RevokeArgs, dl: DistributedLock) -> ExitCode {
    match dl.revoke(&args.name).await {
        Ok(Some(token)) => {
            println!(
                "revoked the lease on lock {:?} (fencing token {token})",
                args.name
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("leasehold: nobody holds lock {:?}", args.name);
            ExitCode::from(1)
        }
        Err(error) => exit::fail(exit::for_error(&error), error),
    }
}
