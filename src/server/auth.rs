//! API keys to projects.
//!
//! * Open development mode (no key file): every distinct key is its own project, created on
//!   first use.
//! * Key file: projects list their keys as SHA-256 digests under a non-secret key id. A key
//!   `dlk_<id>_<secret>` is looked up by its id and its digest compared in constant time, so
//!   an unknown key and a wrong secret look the same from outside.
//!
//! Keys themselves are never stored or logged; logs name the key id at most.
//!
//! Reloads are careful: a changed file is loaded only once it has stopped changing (same
//! modification time and size at two checks in a row); a version that does not parse, or
//! that has no keys when the one in use has some (truncated or emptied mid-edit), is
//! refused and the keys in use stay; keys that did not change keep their rate limiter.

use crate::error::Error;
use crate::server::store::{Project, ProjectId, Quota};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Most projects open mode creates, so random keys cannot grow memory without bound.
pub(crate) const MAX_OPEN_PROJECTS: usize = 100_000;

/// Prefix of the keys this server makes.
const KEY_PREFIX: &str = "dlk_";

/// Why a request has no project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Missing, malformed, repeated or unknown key, or a wrong secret.
    BadKey,
    /// Open mode created as many projects as it may.
    TooManyProjects,
}

/// Who is calling, as far as the server's limits are concerned.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub project: Project,
    pub quota: Quota,
    /// The key's rate limiter, if its project has a rate limit.
    pub bucket: Option<Arc<Mutex<Bucket>>>,
    /// Non-secret key id, for logs (none in open mode).
    pub key_id: Option<Arc<str>>,
    /// Whether the key may act on other holders' leases (revoke): keys marked `admin` in
    /// the key file, and every key in open mode (each is alone in its project there).
    pub admin: bool,
}

/// Resolves the `Authorization` header to a [`Caller`].
#[derive(Debug)]
pub(crate) struct Auth {
    mode: Mode,
    /// Project ids by name, stable across key reloads so that held locks stay theirs.
    ids: Mutex<HashMap<String, ProjectId>>,
    /// Bumped by every reload that changes the keys in use: a caller resolved under an
    /// older generation must be resolved again (a session caches its caller).
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
enum Mode {
    /// Each key's project, by the key's digest; the name is made once, not per request.
    Open(Mutex<HashMap<[u8; 32], Project>>),
    File {
        path: PathBuf,
        keys: RwLock<Arc<KeyTable>>,
        /// Modification time and length of the file version last loaded or refused.
        loaded: Mutex<Option<Stamp>>,
        /// A changed version seen at the last check, not loaded until it stays the same.
        settling: Mutex<Option<Stamp>>,
    },
}

#[derive(Debug, Default)]
struct KeyTable {
    by_id: HashMap<String, KeyEntry>,
}

#[derive(Debug)]
struct KeyEntry {
    digest: [u8; 32],
    caller: Caller,
    /// The project's rate limit (requests per second, burst), if any.
    limit: Option<(f64, f64)>,
}

/// A file's modification time and length.
type Stamp = (SystemTime, u64);

/// A token bucket: `rate` requests per second, bursts up to `burst`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The key file's format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    projects: Vec<ProjectEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectEntry {
    name: String,
    #[serde(default)]
    keys: Vec<KeyLine>,
    /// Most locks held or waited for at once.
    max_locks: Option<u64>,
    /// Most waiters per lock.
    max_waiters_per_lock: Option<u64>,
    /// Requests per second per key (acquire, cancel, inspect; renewals and releases are
    /// never limited, so a throttled client does not lose its leases).
    rate_limit: Option<f64>,
    /// Burst above the rate (default: twice the rate, at least 1).
    burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyLine {
    id: String,
    sha256: String,
    /// May revoke other holders' leases in its project.
    #[serde(default)]
    admin: bool,
}

impl Auth {
    pub fn open() -> Auth {
        Auth {
            mode: Mode::Open(Mutex::new(HashMap::new())),
            ids: Mutex::new(HashMap::new()),
            generation: Default::default(),
        }
    }

    /// Loads the key file; fails on a missing or invalid file.
    pub fn from_file(path: &Path) -> Result<Auth, Error> {
        let auth = Auth {
            mode: Mode::File {
                path: path.to_owned(),
                keys: RwLock::new(Arc::default()),
                loaded: Mutex::new(None),
                settling: Mutex::new(None),
            },
            ids: Mutex::new(HashMap::new()),
            generation: Default::default(),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Changes whenever the keys in use do (see `caller`).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_open(&self) -> bool {
        matches!(self.mode, Mode::Open(_))
    }

    /// Re-reads the key file. On error (unreadable, invalid, or without keys when the keys
    /// in use have some) the keys in use stay as they were.
    pub fn reload(&self) -> Result<usize, Error> {
        let Mode::File {
            path, keys, loaded, ..
        } = &self.mode
        else {
            return Ok(0);
        };
        let stamp = file_stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("cannot read key file {}", path.display()),
            source,
        })?;
        let old = keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let table = self
            .parse_over(&text, &old)
            .map_err(|e| Error::invalid(format!("key file {}: {e}", path.display())))?;
        if table.by_id.is_empty() && !old.by_id.is_empty() {
            return Err(Error::invalid(format!(
                "key file {} has no keys, but {} are in use: refusing it as truncated or \
                 emptied (replace the file atomically: write a new one, then rename it over \
                 the old one)",
                path.display(),
                old.by_id.len()
            )));
        }
        let count = table.by_id.len();
        *keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        Ok(count)
    }

    /// Reloads if the key file changed since it was last loaded (a cheap `stat`), once it
    /// has stopped changing: the same modification time and size as at the previous check.
    /// A refused version is not tried again until the file changes again.
    pub fn reload_if_changed(&self) -> Option<Result<usize, Error>> {
        let Mode::File {
            path,
            loaded,
            settling,
            ..
        } = &self.mode
        else {
            return None;
        };
        let stamp = file_stamp(path)?;
        if *loaded.lock().unwrap_or_else(|p| p.into_inner()) == Some(stamp) {
            return None;
        }
        {
            let mut settling = settling.lock().unwrap_or_else(|p| p.into_inner());
            if *settling != Some(stamp) {
                // Changed since the last check: maybe still being written.
                *settling = Some(stamp);
                return None;
            }
            *settling = None;
        }
        let result = self.reload();
        if result.is_err() {
            *loaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(stamp);
        }
        Some(result)
    }

    #[cfg(test)]
    fn parse(&self, text: &str) -> Result<KeyTable, String> {
        self.parse_over(text, &KeyTable::default())
    }

    /// Parses a key file; keys that are in `old` unchanged (same id, digest, project and
    /// rate limit) keep their rate limiter, so a reload does not refill their buckets.
    fn parse_over(&self, text: &str, old: &KeyTable) -> Result<KeyTable, String> {
        let file: KeyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut table = KeyTable::default();
        let mut names = std::collections::HashSet::new();
        for project in file.projects {
            if project.name.is_empty() || !names.insert(project.name.clone()) {
                return Err(format!(
                    "project name {:?} is empty or repeated",
                    project.name
                ));
            }
            let project_ref = Project {
                id: self.project_id(&project.name),
                name: project.name.as_str().into(),
            };
            let quota = Quota {
                max_locks: project.max_locks,
                max_waiters_per_lock: project.max_waiters_per_lock,
            };
            let limit = match project.rate_limit {
                Some(rate) if !(rate > 0.0 && rate.is_finite()) => {
                    return Err(format!(
                        "project {:?}: rate_limit must be above 0",
                        project.name
                    ));
                }
                Some(rate) => Some((rate, project.burst.unwrap_or(2.0 * rate).max(1.0))),
                None => None,
            };
            for key in project.keys {
                let digest = parse_digest(&key.sha256)
                    .ok_or_else(|| format!("key {:?}: sha256 must be 64 hex digits", key.id))?;
                if key.id.is_empty() || key.id.contains('_') {
                    return Err(format!(
                        "key id {:?} must be non-empty, without '_'",
                        key.id
                    ));
                }
                let kept = old.by_id.get(&key.id).filter(|e| {
                    e.digest == digest
                        && e.caller.project.name == project_ref.name
                        && e.limit == limit
                });
                let bucket = match kept {
                    Some(entry) => entry.caller.bucket.clone(),
                    None => {
                        limit.map(|(rate, burst)| Arc::new(Mutex::new(Bucket::new(rate, burst))))
                    }
                };
                let caller = Caller {
                    project: project_ref.clone(),
                    quota,
                    bucket,
                    key_id: Some(key.id.as_str().into()),
                    admin: key.admin,
                };
                if table
                    .by_id
                    .insert(
                        key.id.clone(),
                        KeyEntry {
                            digest,
                            caller,
                            limit,
                        },
                    )
                    .is_some()
                {
                    return Err(format!("key id {:?} appears twice", key.id));
                }
            }
        }
        Ok(table)
    }

    fn project_id(&self, name: &str) -> ProjectId {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() as ProjectId;
        *ids.entry(name.to_owned()).or_insert(next)
    }

    /// The caller behind the request's credentials.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = values.next().ok_or(Refusal::BadKey)?;
        if values.next().is_some() {
            return Err(Refusal::BadKey);
        }
        let key = bearer(value.as_bytes()).ok_or(Refusal::BadKey)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        match &self.mode {
            Mode::Open(projects) => {
                let mut projects = projects.lock().unwrap_or_else(|p| p.into_inner());
                let next = projects.len();
                if next >= MAX_OPEN_PROJECTS && !projects.contains_key(&digest) {
                    return Err(Refusal::TooManyProjects);
                }
                let project = projects
                    .entry(digest)
                    .or_insert_with(|| Project {
                        id: next as ProjectId,
                        name: hex(&digest).into(),
                    })
                    .clone();
                Ok(Caller {
                    project,
                    quota: Quota::default(),
                    bucket: None,
                    key_id: None,
                    admin: true,
                })
            }
            Mode::File { keys, .. } => {
                let keys = keys.read().unwrap_or_else(|p| p.into_inner()).clone();
                let entry = key_id(key).and_then(|id| keys.by_id.get(id));
                // Compare against something even for an unknown id, so that both refusals
                // take the same time.
                let expected = entry.map_or([0u8; 32], |e| e.digest);
                if constant_time_eq(&digest, &expected)
                    && let Some(entry) = entry
                {
                    Ok(entry.caller.clone())
                } else {
                    Err(Refusal::BadKey)
                }
            }
        }
    }
}

fn file_stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The id part of `dlk_<id>_<secret>`.
fn key_id(key: &[u8]) -> Option<&str> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 6750).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty() && key.iter().all(|b| b.is_ascii_graphic())).then_some(key)
}

/// A new API key for `project`: the key (shown once) and the line for the key file.
pub fn new_key(project: &str) -> (String, String) {
    let mut id = [0u8; 4];
    let mut secret = [0u8; 20];
    getrandom::fill(&mut id).expect("the OS random source works");
    getrandom::fill(&mut secret).expect("the OS random source works");
    let key = format!("{KEY_PREFIX}{}_{}", hex(&id), hex(&secret));
    let digest = hex(&Sha256::digest(key.as_bytes()));
    let line = format!(
        "{{ id = \"{}\", sha256 = \"{digest}\" }},  # project {project:?}",
        hex(&id)
    );
    (key, line)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn open_mode_keys_map_to_separate_projects() {
        let auth = Auth::open();
        let a = auth.caller(&headers(&["Bearer key-a"])).unwrap().project;
        let b = auth.caller(&headers(&["bearer key-b"])).unwrap().project;
        assert_ne!(a, b);
        assert_ne!(a.name, b.name);
        assert_eq!(auth.caller(&headers(&["Bearer key-a"])).unwrap().project, a);
    }

    #[test]
    fn malformed_credentials_are_refused() {
        let auth = Auth::open();
        for bad in [
            &[][..],
            &["Basic abc"],
            &["Bearer "],
            &["Bearer a", "Bearer a"],
        ] {
            assert_eq!(
                auth.caller(&headers(bad)).unwrap_err(),
                Refusal::BadKey,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_file_keys_resolve_and_wrong_secrets_do_not() {
        let (key, line) = new_key("billing");
        let (other, _) = new_key("billing");
        assert!(key.starts_with("dlk_") && key.len() == 4 + 8 + 1 + 40);
        let dir = std::env::temp_dir().join(format!("dl-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            format!("[[projects]]\nname = \"billing\"\nkeys = [\n  {line}\n]\n"),
        )
        .unwrap();
        let auth = Auth::from_file(&path).unwrap();
        let caller = auth.caller(&headers(&[&format!("Bearer {key}")])).unwrap();
        assert_eq!(caller.key_id.as_deref(), Some(&key[4..12]));
        // Same id, wrong secret; and an unknown key: the same refusal.
        let wrong = format!("{}{}", &key[..13], &other[13..]);
        assert_eq!(
            auth.caller(&headers(&[&format!("Bearer {wrong}")]))
                .unwrap_err(),
            Refusal::BadKey
        );
        assert_eq!(
            auth.caller(&headers(&[&format!("Bearer {other}")]))
                .unwrap_err(),
            Refusal::BadKey
        );
        assert_eq!(
            auth.caller(&headers(&["Bearer plain"])).unwrap_err(),
            Refusal::BadKey
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_key_files_are_refused_with_a_reason() {
        let auth = Auth::open();
        for (text, expected) in [
            (
                "[[projects]]\nname = \"a\"\n[[projects]]\nname = \"a\"\n",
                "repeated",
            ),
            (
                "[[projects]]\nname = \"a\"\nkeys = [{ id = \"x\", sha256 = \"zz\" }]\n",
                "64 hex",
            ),
            ("[[projects]]\nname = \"a\"\nrate_limit = 0\n", "rate_limit"),
            ("[[projects]]\nname = \"a\"\nunknown = 1\n", "unknown"),
        ] {
            let err = auth.parse(text).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn reloads_wait_for_a_settled_file_refuse_emptied_ones_and_keep_buckets() {
        let (key, line) = new_key("p");
        let dir = std::env::temp_dir().join(format!("dl-keys-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let text = format!(
            "[[projects]]\nname = \"p\"\nrate_limit = 0.001\nburst = 1\nkeys = [\n  {line}\n]\n"
        );
        std::fs::write(&path, &text).unwrap();
        let auth = Auth::from_file(&path).unwrap();
        let bearer = [format!("Bearer {key}")];
        let bearer = headers(&[bearer[0].as_str()]);
        let take = |auth: &Auth| {
            let caller = auth.caller(&bearer).unwrap();
            caller.bucket.unwrap().lock().unwrap().take()
        };
        assert!(take(&auth).is_ok());
        assert!(take(&auth).is_err());
        // Emptied: seen changed, then settled, then refused; the key still works.
        std::fs::write(&path, "").unwrap();
        let mut outcome = None;
        for _ in 0..3 {
            if let Some(result) = auth.reload_if_changed() {
                outcome = Some(result);
                break;
            }
        }
        let err = outcome.expect("reloaded once settled").unwrap_err();
        assert!(err.to_string().contains("no keys"), "{err}");
        assert!(auth.caller(&bearer).is_ok());
        // Not tried again while it stays the same.
        assert!(auth.reload_if_changed().is_none());
        assert!(auth.reload_if_changed().is_none());
        // The same keys again: the bucket is the one in use (still empty).
        std::fs::write(&path, format!("{text}\n")).unwrap();
        assert!(
            auth.reload_if_changed().is_none(),
            "loaded before it settled"
        );
        assert_eq!(auth.reload_if_changed().unwrap().unwrap(), 1);
        assert!(take(&auth).is_err(), "the reload refilled the bucket");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn buckets_refill_at_their_rate() {
        let mut bucket = Bucket::new(10.0, 2.0);
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_ok());
        let wait = bucket.take().unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
    }
}
