//! The command line: subcommands, the options every subcommand shares, and `main`.

use crate::{elect, exit, list, revoke, run, status};
use clap::Parser;
use leasehold::{DistributedLock, DistributedLockBuilder, Error};
use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

/// The key used when none is configured: a server in open mode (no key file) accepts any
/// key, so local development needs no set-up; a server with a key file refuses it (401).
const DEFAULT_KEY: &str = "default";

/// How long `status` and `list` keep trying an unreachable server.
const STATUS_GIVE_UP: Duration = Duration::from_secs(5);

fn give_up(builder: DistributedLockBuilder) -> DistributedLockBuilder {
    builder.unavailable_after(STATUS_GIVE_UP)
}

/// Take a distributed lock from the shell: run a command while holding it, see who holds
/// it, or list the project's locks.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, after_help = help())]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,

    #[command(subcommand)]
    command: Command,
}

fn help() -> String {
    format!(
        "Examples:
  export LEASEHOLD_URL=http://locks.internal:7878 LEASEHOLD_API_KEY=...
  # crontab: the nightly report runs on one machine only; skip if it is still running
  0 2 * * * leasehold run reports/nightly --timeout 0 -- ./nightly-report.sh
  # deploy: one migration at a time; wait up to 10 minutes for the lock
  leasehold run db/migrate --timeout 10m -- ./manage.py migrate
  # at most 3 exports at once; readers share, a writer is alone
  leasehold run --permits 3 exports -- ./export.sh
  leasehold run --read config -- ./render-site.sh
  # one scheduler over the fleet, the others standing by
  leasehold elect scheduler --value \"$(hostname):8080\" -- ./scheduler
  leasehold status db/migrate --json
  # an operator ends a stuck holder's lease
  leasehold revoke db/migrate
  # every lock of the project whose name starts with db/: holders, leases, waiters
  leasehold list db/

See `leasehold run --help` for the options of run.

{}",
        exit::HELP
    )
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Run(run::RunCommand),
    Elect(elect::ElectCommand),
    Status(status::StatusArgs),
    Revoke(revoke::RevokeArgs),
    List(list::ListArgs),
}

/// Where the lock server is and how to authenticate, shared by every subcommand.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Lock server URL, or several separated by commas (tried in turn).
    /// [default: http://127.0.0.1:7878]
    #[arg(long, env = "LEASEHOLD_URL", global = true, value_name = "URL")]
    url: Option<String>,

    /// The project's API key. Prefer the environment variable: other users of the
    /// machine can see command-line arguments. [default: the key `default`, which only a
    /// server in open mode accepts]
    #[arg(
        long,
        env = "LEASEHOLD_API_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<ApiKey>,
}

impl ServerArgs {
    /// A client for the configured server and key, with `configure` applied.
    pub fn client(
        &self,
        configure: impl FnOnce(DistributedLockBuilder) -> DistributedLockBuilder,
    ) -> Result<DistributedLock, Error> {
        let key = match &self.api_key {
            Some(ApiKey(key)) if !key.trim().is_empty() => key.clone(),
            _ => {
                eprintln!(
                    "leasehold: no API key configured (LEASEHOLD_API_KEY or --api-key); using \
                     the key {DEFAULT_KEY:?}, which a server in open mode accepts"
                );
                DEFAULT_KEY.to_owned()
            }
        };
        let mut builder = DistributedLock::builder(key);
        let urls: Vec<&str> = (self.url.iter())
            .flat_map(|urls| urls.split(','))
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        if !urls.is_empty() {
            builder = builder.endpoints(urls);
        }
        configure(builder).build()
    }
}

/// An API key; its `Debug` form does not show it.
#[derive(Clone)]
struct ApiKey(String);

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(key: &str) -> Result<ApiKey, Self::Err> {
        Ok(ApiKey(key.to_owned()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // Help and version go to stdout and succeed; usage errors are EX_USAGE.
            return if error.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // One thread: the command is spawned from the main thread, which matters for the
    // parent-death signal (it fires when the spawning thread ends).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return exit::fail(exit::UNAVAILABLE, format!("cannot start: {error}"));
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(command) => run::run_command(command, &cli.server).await,
            Command::Elect(command) => elect::elect(command, &cli.server).await,
            Command::Status(args) => match cli.server.client(give_up) {
                Ok(dl) => status::status(args, dl).await,
                Err(error) => exit::fail(exit::for_error(&error), error),
            },
            Command::List(args) => match cli.server.client(give_up) {
                Ok(dl) => list::list(args, dl).await,
                Err(error) => exit::fail(exit::for_error(&error), error),
            },
            Command::Revoke(args) => match cli.server.client(give_up) {
                Ok(dl) => revoke::revoke(args, dl).await,
                Err(error) => exit::fail(exit::for_error(&error), error),
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let key = ApiKey("secret-key".into());
        assert!(!format!("{key:?}").contains("secret"));
    }
}
