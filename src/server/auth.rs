//! API keys to projects.
//!
//! Open development mode (no key file): every distinct key is its own project, created on
//! first use. Keys are kept only as SHA-256 digests.

use crate::server::store::ProjectId;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

/// Most projects open mode creates, so random keys cannot grow memory without bound.
const MAX_OPEN_PROJECTS: usize = 100_000;

/// Why a request has no project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Missing, malformed, repeated or unknown key.
    BadKey,
    /// Open mode created as many projects as it may.
    TooManyProjects,
}

/// Resolves the `Authorization` header to a project.
#[derive(Debug)]
pub(crate) struct Auth {
    open: Mutex<HashMap<[u8; 32], ProjectId>>,
}

impl Auth {
    pub fn open() -> Auth {
        Auth {
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The caller's project.
    pub fn project(&self, headers: &HeaderMap) -> Result<ProjectId, Refusal> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = values.next().ok_or(Refusal::BadKey)?;
        if values.next().is_some() {
            return Err(Refusal::BadKey);
        }
        let key = bearer(value.as_bytes()).ok_or(Refusal::BadKey)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut projects = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let next = projects.len();
        if next >= MAX_OPEN_PROJECTS && !projects.contains_key(&digest) {
            return Err(Refusal::TooManyProjects);
        }
        Ok(*projects.entry(digest).or_insert(next as ProjectId))
    }
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
    fn keys_map_to_separate_projects() {
        let auth = Auth::open();
        let a = auth.project(&headers(&["Bearer key-a"])).unwrap();
        let b = auth.project(&headers(&["bearer key-b"])).unwrap();
        assert_ne!(a, b);
        assert_eq!(auth.project(&headers(&["Bearer key-a"])), Ok(a));
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
            assert_eq!(auth.project(&headers(bad)), Err(Refusal::BadKey), "{bad:?}");
        }
    }
}
