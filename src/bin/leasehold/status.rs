//! `status NAME`: who holds a lock and how many wait, as text or JSON.

use crate::duration::human;
use crate::exit;
use crate::waiting::holder_text;
use leasehold::{DistributedLock, LockInfo, LockMode};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Show who holds a lock and how many wait for it.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  leasehold status db/migrate
  leasehold status db/migrate --json | jq .holder.fencing_token

JSON: {\"name\": \"db/migrate\", \"mode\": \"exclusive\" | \"shared\" | \"semaphore\",
\"permits\": null | 5, \"holder\": null | {\"fencing_token\": 42,
\"since\": \"2025-06-01T11:59:58.000Z\", \"expires_in_ms\": 8200,
\"lease_deadline\": \"2025-06-01T12:00:08.200Z\", \"label\": null | \"host-a/job-42\",
\"value\": null | \"host-a:8080\"}, \"holders\": [every holder, as holder],
\"waiters\": 2, \"oldest_wait_ms\": null | 1500, \"held_back_until\": null |
\"2025-06-01T12:00:30.000Z\"}
holder is the oldest of holders (readers and semaphores have several); value is the
election value of a leader (`leasehold elect`). since and held_back_until are the server's
clock; lease_deadline is this machine's clock plus expires_in_ms. held_back_until: after a server restart, nobody gets the lock before
then (leases granted before the crash may still run).
Fields may be added later.

Exit codes: 0 (whether held or not), 64 invalid name, 69 server unavailable, 77 API key
refused.")]
pub struct StatusArgs {
    /// Name of the lock.
    name: String,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The lock as `status` shows it.
///
/// Built from the SDK's `LockInfo`. A new field goes into `Holder` (or `Status`), is filled
/// in `Status::new` and gets a row in `Status::rows`: JSON follows by itself.
#[derive(Debug, Serialize, PartialEq)]
pub struct Status {
    name: String,
    /// `exclusive` (a lock, a writer, a leader), `shared` (readers) or `semaphore`.
    mode: &'static str,
    /// A semaphore's number of permits.
    permits: Option<u32>,
    /// The oldest of `holders`.
    holder: Option<Holder>,
    /// Every holder, oldest grant first.
    holders: Vec<Holder>,
    /// How many wait in line.
    waiters: u64,
    /// How long the first in line has waited.
    oldest_wait_ms: Option<u64>,
    /// While grants are held back after a server restart: until when, by the server's
    /// clock (RFC 3339, UTC).
    held_back_until: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct Holder {
    fencing_token: u64,
    /// When the lock was granted, by the server's clock (RFC 3339, UTC).
    since: String,
    /// Time left on the lease when the server answered (unless renewed).
    expires_in_ms: u64,
    /// When the lease ends unless renewed, by this machine's clock (RFC 3339, UTC).
    lease_deadline: String,
    /// The holder's label (`run --label`, or `metadata` in the SDK).
    label: Option<String>,
    /// A leader's election value (`elect --value`).
    value: Option<String>,
}

impl Status {
    pub fn new(info: &LockInfo, now: SystemTime) -> Status {
        let holders: Vec<Holder> = (info.holders.iter())
            .map(|holder| Holder {
                fencing_token: holder.fencing_token,
                since: rfc3339(holder.acquired_at),
                expires_in_ms: holder.expires_in.as_millis() as u64,
                lease_deadline: rfc3339(now + holder.expires_in),
                label: holder.metadata.clone(),
                value: holder.value.clone(),
            })
            .collect();
        let (mode, permits) = match info.mode {
            LockMode::Shared => ("shared", None),
            LockMode::Semaphore { permits } => ("semaphore", Some(permits)),
            _ => ("exclusive", None),
        };
        Status {
            name: info.name.clone(),
            mode,
            permits,
            holder: holders.first().cloned(),
            holders,
            waiters: info.waiters,
            oldest_wait_ms: info.oldest_wait.map(|d| d.as_millis() as u64),
            held_back_until: info.held_back_until.map(rfc3339),
        }
    }

    /// The rows of a lock with at most one holder (an election's leader among them).
    fn one_holder(&self, rows: &mut Vec<(&'static str, String)>) {
        match (&self.holder, &self.held_back_until) {
            (None, Some(until)) => rows.push((
                "holder",
                format!(
                    "none, but held back after a server restart until {until} (leases \
                     granted before the crash may still run)"
                ),
            )),
            (None, None) => rows.push(("holder", "none (the lock is free)".into())),
            (Some(holder), _) => {
                let who = match &holder.label {
                    Some(label) => format!("{label} (fencing token {})", holder.fencing_token),
                    None => format!("fencing token {}", holder.fencing_token),
                };
                rows.push(("holder", who));
                if let Some(value) = &holder.value {
                    rows.push(("leader value", value.clone()));
                }
                rows.push(("since", holder.since.clone()));
                rows.push((
                    "lease ends",
                    format!(
                        "{} (in {}, unless renewed)",
                        holder.lease_deadline,
                        human(Duration::from_millis(holder.expires_in_ms))
                    ),
                ));
            }
        }
    }

    /// Label and value of each line of the text form.
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = vec![("lock", self.name.clone())];
        match (self.mode, self.permits) {
            ("semaphore", Some(permits)) => rows.push((
                "semaphore",
                format!("{} of {permits} permits held", self.holders.len()),
            )),
            ("shared", _) => rows.push((
                "read lock",
                format!("held by {} readers", self.holders.len()),
            )),
            _ => {}
        }
        if self.holders.len() > 1 {
            for holder in &self.holders {
                rows.push((
                    "holder",
                    format!(
                        "{}, lease ends in {}",
                        holder_text(holder.fencing_token, holder.label.as_deref()),
                        human(Duration::from_millis(holder.expires_in_ms))
                    ),
                ));
            }
        } else {
            self.one_holder(&mut rows);
        }
        let waiters = match self.oldest_wait_ms {
            Some(ms) if self.waiters > 0 => format!(
                "{} (the first has waited {})",
                self.waiters,
                human(Duration::from_millis(ms))
            ),
            _ => self.waiters.to_string(),
        };
        rows.push(("waiters", waiters));
        rows
    }

    fn text(&self) -> String {
        let rows = self.rows();
        let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
        rows.iter()
            .map(|(label, value)| format!("{:<width$} {value}\n", format!("{label}:")))
            .collect()
    }
}

/// Runs `status`.
pub async fn status(args: StatusArgs, dl: DistributedLock) -> ExitCode {
    let info = match dl.inspect(&args.name).await {
        Ok(info) => info,
        Err(error) => return exit::fail(exit::for_error(&error), error),
    };
    let status = Status::new(&info, SystemTime::now());
    let out = if args.json {
        let mut json = serde_json::to_string(&status).expect("plain data serializes");
        json.push('\n');
        json
    } else {
        status.text()
    };
    // A closed stdout (`| head -0`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

/// `2025-06-01T12:00:08.200Z`, in UTC with milliseconds.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), for dates from 1970 on.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_700_000_000, 250)), "2023-11-14T22:13:20.250Z");
        assert_eq!(rfc3339(at(4_102_444_799, 999)), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn text_and_json_forms() {
        let holder = Holder {
            fencing_token: 42,
            since: "2025-06-01T11:59:58.000Z".into(),
            expires_in_ms: 8200,
            lease_deadline: "2025-06-01T12:00:08.200Z".into(),
            label: Some("host-a/job-42".into()),
            value: None,
        };
        let status = Status {
            name: "db/migrate".into(),
            mode: "exclusive",
            permits: None,
            holder: Some(holder.clone()),
            holders: vec![holder.clone()],
            waiters: 2,
            oldest_wait_ms: Some(1500),
            held_back_until: None,
        };
        assert_eq!(
            status.text(),
            "lock:       db/migrate\n\
             holder:     host-a/job-42 (fencing token 42)\n\
             since:      2025-06-01T11:59:58.000Z\n\
             lease ends: 2025-06-01T12:00:08.200Z (in 8.2s, unless renewed)\n\
             waiters:    2 (the first has waited 1.5s)\n"
        );
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({
                "name": "db/migrate",
                "mode": "exclusive",
                "permits": null,
                "holder": {
                    "fencing_token": 42,
                    "since": "2025-06-01T11:59:58.000Z",
                    "expires_in_ms": 8200,
                    "lease_deadline": "2025-06-01T12:00:08.200Z",
                    "label": "host-a/job-42",
                    "value": null,
                },
                "holders": [{
                    "fencing_token": 42,
                    "since": "2025-06-01T11:59:58.000Z",
                    "expires_in_ms": 8200,
                    "lease_deadline": "2025-06-01T12:00:08.200Z",
                    "label": "host-a/job-42",
                    "value": null,
                }],
                "waiters": 2,
                "oldest_wait_ms": 1500,
                "held_back_until": null,
            })
        );
        let free = Status {
            name: "x".into(),
            mode: "exclusive",
            permits: None,
            holder: None,
            holders: Vec::new(),
            waiters: 0,
            oldest_wait_ms: None,
            held_back_until: None,
        };
        assert_eq!(
            free.text(),
            "lock:    x\nholder:  none (the lock is free)\nwaiters: 0\n"
        );
        let held_back = Status {
            waiters: 1,
            held_back_until: Some("2025-06-01T12:00:30.000Z".into()),
            ..free
        };
        assert_eq!(
            held_back.text(),
            "lock:    x\nholder:  none, but held back after a server restart until \
             2025-06-01T12:00:30.000Z (leases granted before the crash may still run)\n\
             waiters: 1\n"
        );
        let leader = Holder {
            value: Some("host-a:8080".into()),
            ..holder.clone()
        };
        let election = Status {
            name: "scheduler".into(),
            mode: "exclusive",
            permits: None,
            holder: Some(leader.clone()),
            holders: vec![leader],
            waiters: 0,
            oldest_wait_ms: None,
            held_back_until: None,
        };
        assert!(
            election.text().contains("leader value: host-a:8080\n"),
            "{}",
            election.text()
        );
        let second = Holder {
            fencing_token: 43,
            label: None,
            ..holder.clone()
        };
        let semaphore = Status {
            name: "payments-api".into(),
            mode: "semaphore",
            permits: Some(5),
            holder: Some(holder.clone()),
            holders: vec![holder, second],
            waiters: 0,
            oldest_wait_ms: None,
            held_back_until: None,
        };
        assert_eq!(
            semaphore.text(),
            "lock:      payments-api\n\
             semaphore: 2 of 5 permits held\n\
             holder:    \"host-a/job-42\" (fencing token 42), lease ends in 8.2s\n\
             holder:    fencing token 43, lease ends in 8.2s\n\
             waiters:   0\n"
        );
    }
}
