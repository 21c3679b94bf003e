//! `elect NAME --value V -- CMD`: run the command only while this process leads.

use crate::cli::ServerArgs;
use crate::run::{self, Hold, RunArgs};
use std::process::ExitCode;

/// Run a command only while leading an election.
///
/// Campaigns for NAME (waiting, in line with the other candidates, until it leads), then
/// runs the command with LEASEHOLD_NAME and LEASEHOLD_FENCING_TOKEN in its environment.
/// Others see --value as the leader's value (`leasehold status NAME`, or an SDK's
/// `election(NAME).leader()`). If leadership is lost, the command is stopped as `run` stops
/// it; when the command ends, leadership passes to the next candidate.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  # one scheduler at a time over the fleet; the others wait to take over
  leasehold elect scheduler --value \"$(hostname):8080\" -- ./scheduler
  leasehold status scheduler

See `leasehold run --help` for what happens when the lease is lost.")]
pub struct ElectCommand {
    /// The value others see while this process leads, such as its address.
    /// [default: HOSTNAME:PID]
    #[arg(long, value_name = "VALUE")]
    value: Option<String>,

    #[command(flatten)]
    args: RunArgs,
}

/// Runs `elect`.
pub async fn elect(command: ElectCommand, server: &ServerArgs) -> ExitCode {
    let value = command.value.unwrap_or_else(run::default_label);
    run::run(command.args, Hold::Leader(value), server).await
}
