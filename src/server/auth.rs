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

    /// The caller's project, or `None` for a missing, malformed, repeated or unknown key.
    pub fn project(&self, headers: &HeaderMap) -> Option<ProjectId> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let key = bearer(value.as_bytes())?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut projects = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let next = projects.len();
        if next >= MAX_OPEN_PROJECTS && !projects.contains_key(&digest) {
            return None;
        }
        Some(*projects.entry(digest).or_insert(next as ProjectId))
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
        assert_eq!(auth.project(&headers(&["Bearer key-a"])), Some(a));
    }

    #[test]
    fn malformed_credentials_are_refused() {
        let auth = Auth::open();
        assert_eq!(auth.project(&headers(&[])), None);
        assert_eq!(auth.project(&headers(&["Basic abc"])), None);
        assert_eq!(auth.project(&headers(&["Bearer "])), None);
        assert_eq!(auth.project(&headers(&["Bearer a", "Bearer a"])), None);
    }
}
