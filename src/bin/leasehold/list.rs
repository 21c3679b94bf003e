//! `list [PREFIX]`: every lock of the project (or those whose names start with PREFIX), who
//! holds each and how many wait, as a table or JSON.

use crate::duration::human;
use crate::exit;
use crate::status::Status;
use leasehold::{DistributedLock, LockInfo, LockMode};
use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

/// List the project's locks: holder, lease left, waiters.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  leasehold list
  leasehold list db/ --json | jq '.[] | select(.waiters > 0) | .name'

Only locks somebody holds or waits for are listed, in bytewise name order.
JSON: an array of objects, each as `leasehold status NAME --json` prints it.

Exit codes: 0, 64 invalid prefix, 69 server unavailable, 77 API key refused.")]
pub struct ListArgs {
    /// Only locks whose names start with this.
    #[arg(default_value = "")]
    prefix: String,

    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `list`: reads every page, then prints.
pub async fn list(args: ListArgs, dl: DistributedLock) -> ExitCode {
    let mut locks: Vec<LockInfo> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = match dl.list(&args.prefix, after.as_deref()).await {
            Ok(page) => page,
            Err(error) => return exit::fail(exit::for_error(&error), error),
        };
        locks.extend(page.locks);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let now = SystemTime::now();
    let out = if args.json {
        let all: Vec<Status> = locks.iter().map(|info| Status::new(info, now)).collect();
        let mut json = serde_json::to_string(&all).expect("plain data serializes");
        json.push('\n');
        json
    } else {
        table(&locks, now)
    };
    // A closed stdout (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

const HEADER: [&str; 8] = [
    "NAME",
    "STATE",
    "HOLDER",
    "TOKEN",
    "HELD FOR",
    "LEASE LEFT",
    "WAITERS",
    "LONGEST WAIT",
];

/// The cells of one lock's row.
fn row(info: &LockInfo, now: SystemTime) -> [String; 8] {
    let holder = info.holder.as_ref();
    let holders = info.holders.len();
    let state = match (holder, info.held_back_until, info.mode) {
        (Some(_), _, LockMode::Shared) => format!("read by {holders}"),
        (Some(_), _, LockMode::Semaphore { permits }) => format!("{holders} of {permits} permits"),
        (Some(_), _, _) => "held".into(),
        (None, Some(_), _) => "held back".into(),
        (None, None, _) => "waiting".into(),
    };
    // The oldest holder's label (and a leader's value); how many more hold it.
    let label = holder.map_or(String::new(), |h| {
        let mut label = h.metadata.clone().unwrap_or_else(|| "-".into());
        if let Some(value) = &h.value {
            label.push_str(&format!(" ({value})"));
        }
        if holders > 1 {
            label.push_str(&format!(" +{}", holders - 1));
        }
        label
    });
    let held_for = holder.map_or(String::new(), |h| {
        human(now.duration_since(h.acquired_at).unwrap_or_default())
    });
    let left = match (holder, info.held_back_until) {
        (Some(h), _) => human(h.expires_in),
        (None, Some(until)) => format!(
            "held back {}",
            human(until.duration_since(now).unwrap_or_default())
        ),
        (None, None) => String::new(),
    };
    [
        info.name.clone(),
        state,
        label,
        holder.map_or(String::new(), |h| h.fencing_token.to_string()),
        held_for,
        left,
        info.waiters.to_string(),
        info.oldest_wait
            .filter(|_| info.waiters > 0)
            .map_or(String::new(), human),
    ]
}

/// A table with a header, columns as wide as their widest cell.
fn table(locks: &[LockInfo], now: SystemTime) -> String {
    if locks.is_empty() {
        return "no locks held or waited for\n".into();
    }
    let rows: Vec<[String; 8]> = std::iter::once(HEADER.map(String::from))
        .chain(locks.iter().map(|info| row(info, now)))
        .collect();
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_says_so() {
        assert_eq!(
            table(&[], SystemTime::now()),
            "no locks held or waited for\n"
        );
    }
}
