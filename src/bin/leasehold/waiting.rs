//! What `run` shows while it waits for the lock: a live status line on an interactive
//! stderr, else one line after the first second.

use crate::duration::human;
use leasehold::{DistributedLock, LockInfo};
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How often the line is refreshed (each refresh asks the server once).
const REFRESH: Duration = Duration::from_secs(1);
/// Uncontended grants take milliseconds: do not flash a line for them.
const FIRST_DRAW: Duration = Duration::from_millis(500);
/// Without a terminal, one line is printed once the wait has lasted this long: logs of
/// jobs that got their lock at once stay quiet.
const QUIET_WAIT: Duration = Duration::from_secs(1);

/// One line on stderr, redrawn in place. Exists only when stderr is a terminal.
#[derive(Debug)]
pub struct StatusLine {
    drawn: bool,
}

impl StatusLine {
    /// A status line if stderr is a terminal; `None` keeps `run` quiet.
    pub fn if_terminal() -> Option<StatusLine> {
        std::io::stderr()
            .is_terminal()
            .then_some(StatusLine { drawn: false })
    }

    fn draw(&mut self, text: &str) {
        let text = truncate(text, terminal_width().saturating_sub(1));
        let mut stderr = std::io::stderr().lock();
        // Carriage return and "erase line": the line is redrawn in place.
        let _ = write!(stderr, "\r\x1b[2K{text}");
        let _ = stderr.flush();
        self.drawn = true;
    }

    /// Erases the line, if one was drawn.
    pub fn clear(&mut self) {
        if std::mem::take(&mut self.drawn) {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K");
            let _ = stderr.flush();
        }
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.clear();
    }
}

/// What one inspection showed: holder, waiter count, and the end of a hold-back after a
/// server restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub holder: Option<SeenHolder>,
    pub waiters: u64,
    pub held_back_until: Option<SystemTime>,
}

/// The holder as one inspection showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHolder {
    pub token: u64,
    /// Lease left unless renewed.
    pub left: Duration,
    pub label: Option<String>,
}

impl From<&LockInfo> for Seen {
    fn from(info: &LockInfo) -> Seen {
        Seen {
            holder: info.holder.as_ref().map(|h| SeenHolder {
                token: h.fencing_token,
                left: h.expires_in,
                label: h.metadata.clone(),
            }),
            waiters: info.waiters,
            held_back_until: info.held_back_until,
        }
    }
}

/// Who holds a lock, by label if it gave one: `"host-a/job-42" (fencing token 42)`, or
/// `fencing token 42`.
pub fn holder_text(token: u64, label: Option<&str>) -> String {
    match label {
        Some(label) => format!("{label:?} (fencing token {token})"),
        None => format!("fencing token {token}"),
    }
}

/// Why nobody gets the lock: `held back after a server restart until 12:00:30 UTC (leases
/// granted before the crash may still run)`.
pub fn held_back_text(until: SystemTime) -> String {
    format!(
        "held back after a server restart until {} (leases granted before the crash may still run)",
        clock_utc(until)
    )
}

/// `HH:MM:SS UTC` of a wall-clock time.
pub fn clock_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Where we stand in line, as far as the server's counts tell.
///
/// The server reports how many wait, not in what order. Those waiting just before we joined
/// are ahead of us; each later change of holder took one of them; and never more are ahead
/// than wait besides us. Changes of holder between two looks are missed, so the figure is an
/// upper bound.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Queue {
    ahead: Option<u64>,
    holder: Option<u64>,
}

impl Queue {
    /// Starts from what the server showed just before we joined the line.
    pub fn joined_after(before: Option<&Seen>) -> Queue {
        Queue {
            ahead: before.map(|seen| seen.waiters),
            holder: before.and_then(|seen| seen.holder.as_ref().map(|h| h.token)),
        }
    }

    /// Takes in one inspection made while we wait in line.
    pub fn observe(&mut self, seen: &Seen) {
        let others = seen.waiters.saturating_sub(1);
        let token = seen.holder.as_ref().map(|h| h.token);
        let mut ahead = self.ahead.map_or(others, |a| a.min(others));
        if matches!((self.holder, token), (Some(before), Some(now)) if now > before) {
            ahead = ahead.saturating_sub(1);
        }
        self.ahead = Some(ahead);
        self.holder = token.or(self.holder);
    }

    /// How many are ahead of us, if known.
    pub fn ahead(&self) -> Option<u64> {
        self.ahead
    }
}

/// Redraws the status line about every second until dropped (it never returns). Without a
/// line, prints one line once the wait has lasted a second, then only waits.
pub async fn show(
    dl: &DistributedLock,
    name: &str,
    line: Option<&mut StatusLine>,
    mut queue: Queue,
) {
    let Some(line) = line else {
        tokio::time::sleep(QUIET_WAIT).await;
        let info = tokio::time::timeout(REFRESH, dl.inspect(name))
            .await
            .ok()
            .and_then(Result::ok);
        eprintln!("leasehold: {}", quiet_line(name, info.as_ref(), &mut queue));
        return std::future::pending().await;
    };
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(started + FIRST_DRAW, REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let seen = tokio::time::timeout(REFRESH, dl.inspect(name))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|info| Seen::from(&info));
        if let Some(seen) = &seen {
            queue.observe(seen);
        }
        line.draw(&render(name, started.elapsed(), seen.as_ref(), &queue));
    }
}

/// The one line printed without a terminal: the status line's text (who holds the lock,
/// and why we wait).
pub fn quiet_line(name: &str, info: Option<&LockInfo>, queue: &mut Queue) -> String {
    let seen = info.map(Seen::from);
    if let Some(seen) = &seen {
        queue.observe(seen);
    }
    render(name, QUIET_WAIT, seen.as_ref(), queue)
}

/// The text of the line, such as
/// `waiting for "deploy": 12s; 2 ahead; held by "host-a/job-42" (fencing token 42, 8s
/// left)`: the most useful first, since a narrow terminal cuts the end off.
pub fn render(name: &str, waited: Duration, seen: Option<&Seen>, queue: &Queue) -> String {
    let whole_seconds = |d: Duration| human(Duration::from_secs(d.as_secs()));
    let mut text = format!("waiting for {name:?}: {}", whole_seconds(waited));
    let Some(seen) = seen else {
        text.push_str("; no answer from the server");
        return text;
    };
    if let Some(ahead) = queue.ahead() {
        text.push_str(&format!("; {ahead} ahead"));
    }
    match (&seen.holder, seen.held_back_until) {
        (Some(holder), _) => text.push_str(&format!(
            "; held by {}, {} left",
            holder_text(holder.token, holder.label.as_deref()),
            whole_seconds(holder.left)
        )),
        (None, Some(until)) => text.push_str(&format!("; {}", held_back_text(until))),
        (None, None) => text.push_str("; being handed over"),
    }
    text
}

fn truncate(text: &str, width: usize) -> &str {
    match text.char_indices().nth(width) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a plain `winsize` struct, which may be all zeroes.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live `winsize`, as TIOCGWINSZ expects.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(holder: Option<u64>, waiters: u64) -> Seen {
        Seen {
            holder: holder.map(|token| SeenHolder {
                token,
                left: Duration::from_secs(8),
                label: None,
            }),
            waiters,
            held_back_until: None,
        }
    }

    #[test]
    fn says_until_when_grants_are_held_back() {
        let until = UNIX_EPOCH + Duration::from_secs(1_700_000_030);
        let held_back = Seen {
            held_back_until: Some(until),
            ..seen(None, 1)
        };
        assert_eq!(
            render(
                "d",
                Duration::from_secs(3),
                Some(&held_back),
                &Queue::joined_after(None)
            ),
            "waiting for \"d\": 3s; held back after a server restart until 22:13:50 UTC \
             (leases granted before the crash may still run)"
        );
    }

    #[test]
    fn counts_those_ahead_down() {
        // Two waited before us; nobody joins behind us yet.
        let mut queue = Queue::joined_after(Some(&seen(Some(10), 2)));
        queue.observe(&seen(Some(10), 3));
        assert_eq!(queue.ahead(), Some(2));
        // Others join behind us: still two ahead.
        queue.observe(&seen(Some(10), 6));
        assert_eq!(queue.ahead(), Some(2));
        // A hand-over took one from the front.
        queue.observe(&seen(Some(11), 5));
        assert_eq!(queue.ahead(), Some(1));
        // The one ahead gave up: only we and those behind wait... bounded by the count.
        queue.observe(&seen(Some(11), 1));
        assert_eq!(queue.ahead(), Some(0));
    }

    #[test]
    fn without_a_first_look_the_count_bounds_it() {
        let mut queue = Queue::joined_after(None);
        assert_eq!(queue.ahead(), None);
        queue.observe(&seen(Some(10), 4));
        assert_eq!(queue.ahead(), Some(3));
    }

    #[test]
    fn renders_what_is_known() {
        let queue = Queue::joined_after(Some(&seen(Some(42), 2)));
        assert_eq!(
            render(
                "deploy",
                Duration::from_millis(12_400),
                Some(&seen(Some(42), 3)),
                &queue
            ),
            "waiting for \"deploy\": 12s; 2 ahead; held by fencing token 42, 8s left"
        );
        let labelled = Seen {
            holder: Some(SeenHolder {
                token: 42,
                left: Duration::from_secs(8),
                label: Some("host-a/job-42".into()),
            }),
            waiters: 1,
            held_back_until: None,
        };
        assert_eq!(
            render("deploy", Duration::from_secs(2), Some(&labelled), &queue),
            "waiting for \"deploy\": 2s; 2 ahead; held by \"host-a/job-42\" (fencing token 42), \
             8s left"
        );
        assert_eq!(
            render("deploy", Duration::from_secs(75), None, &queue),
            "waiting for \"deploy\": 1m15s; no answer from the server"
        );
        assert_eq!(
            render(
                "d",
                Duration::ZERO,
                Some(&seen(None, 1)),
                &Queue::joined_after(None)
            ),
            "waiting for \"d\": 0s; being handed over"
        );
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("ab", 3), "ab");
    }
}
