//! The memory backend's small durable state: what a restart needs to stay safe.
//!
//! Two facts survive a restart: a bound above every fencing token issued so far (tokens
//! follow the wall clock in microseconds, and a run reserves them ahead in steps), and how
//! long leases issued before the restart may still run. The file is rewritten only at start,
//! when a longer lease than ever before is granted, when the token reservation is used up
//! (about once a minute while grants happen), and at a clean shutdown.

use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    /// Every token issued so far is below this.
    tokens_below: u64,
    /// Longest lease granted or renewed since the last start.
    max_lease_ms: u64,
    /// Set by a clean shutdown: wall-clock time (Unix ms) by which every lease still held
    /// then has expired.
    #[serde(default)]
    clean_until_unix_ms: Option<u64>,
}

/// What the previous run implies for this one.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    /// Tokens of this run must be at least this.
    pub first_token: u64,
    /// Grants must wait this long: leases issued before the restart may still be held.
    pub hold_back: Duration,
}

/// Handle on the state file.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    state: Mutex<Persisted>,
}

/// Microseconds since 2025-01-01T00:00:00Z: the floor of fencing tokens. Tokens stay below
/// 2^53 (exact in every JSON reader, JavaScript's doubles included) until the year 2310.
pub fn wall_micros(now: SystemTime) -> u64 {
    const JAN_2025_SECS: u64 = 1_735_689_600;
    (now.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64)
        .saturating_sub(JAN_2025_SECS * 1_000_000)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl StateFile {
    /// Reads the previous run's state (if any), takes a new epoch, and records it durably.
    pub fn open(path: &Path) -> io::Result<(StateFile, Boot)> {
        let previous: Option<Persisted> = match std::fs::read(path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("state file {} is corrupt: {e}", path.display()),
                )
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let wall = wall_micros(now);
        let (first_token, hold_back) = match &previous {
            None => (wall, Duration::ZERO),
            Some(prev) => {
                let hold_back = match prev.clean_until_unix_ms {
                    Some(until) => Duration::from_millis(until.saturating_sub(unix_ms(now))),
                    // Crashed: any lease may have been renewed just before, so wait out the
                    // longest one issued.
                    None => Duration::from_millis(prev.max_lease_ms),
                };
                (wall.max(prev.tokens_below), hold_back)
            }
        };
        let file = StateFile {
            path: path.to_owned(),
            state: Mutex::new(Persisted {
                tokens_below: first_token,
                // Leases of the previous run are still running during the hold-back; if this
                // run crashes early, the next must wait for them too.
                max_lease_ms: hold_back.as_millis() as u64,
                clean_until_unix_ms: None,
            }),
        };
        file.save(&file.lock())?;
        Ok((
            file,
            Boot {
                first_token,
                hold_back,
            },
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a lease this long was granted, before the grant is answered.
    pub fn note_lease(&self, lease: Duration) -> io::Result<()> {
        let mut state = self.lock();
        let ms = lease.as_millis() as u64;
        if ms <= state.max_lease_ms {
            return Ok(());
        }
        state.max_lease_ms = ms;
        self.save(&state)
    }

    /// Records that tokens up to (not including) `below` may be issued.
    pub fn reserve_tokens(&self, below: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.tokens_below = state.tokens_below.max(below);
        self.save(&state)
    }

    /// Records a clean shutdown: every lease still held ends by `leases_end`.
    pub fn clean_shutdown(&self, leases_end: SystemTime) -> io::Result<()> {
        let mut state = self.lock();
        state.clean_until_unix_ms = Some(unix_ms(leases_end));
        self.save(&state)
    }

    fn save(&self, state: &Persisted) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_grow_and_crashes_hold_back() {
        let dir = std::env::temp_dir().join(format!("dl-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = std::fs::remove_file(&path);

        let (first, boot) = StateFile::open(&path).unwrap();
        assert_eq!(boot.hold_back, Duration::ZERO);
        first.note_lease(Duration::from_secs(7)).unwrap();
        drop(first); // a crash: no clean_shutdown

        let (second, boot2) = StateFile::open(&path).unwrap();
        assert!(boot2.first_token >= boot.first_token);
        second
            .reserve_tokens(boot2.first_token + 1_000_000_000)
            .unwrap();
        assert_eq!(boot2.hold_back, Duration::from_secs(7));
        second.clean_shutdown(SystemTime::now()).unwrap();

        let (_third, boot3) = StateFile::open(&path).unwrap();
        assert!(boot3.first_token >= boot2.first_token + 1_000_000_000);
        assert!(boot3.hold_back <= Duration::from_millis(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
