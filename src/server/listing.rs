//! `GET /v1/locks`: a page of the caller's project's locks, and the query strings it and
//! the console's event poll take.

use crate::protocol::{self, LockInfo, LockList, LockMode};
use crate::server::auth::Caller;
use crate::server::http::{
    App, Failure, Reply, bad, holder_info, json_reply, percent_decode, unix_ms,
};
use crate::server::store::{ListSpec, LockView, Mode};
use http::StatusCode;

/// The parameters of a query string, decoded (`%XX` escapes, and `+` as a space as in HTML
/// forms). Refuses unknown and repeated parameters so that a typo is not silently ignored.
pub(crate) fn query_params<'a>(
    query: Option<&str>,
    known: &[&'a str],
) -> Result<Vec<(&'a str, String)>, Failure> {
    let mut params: Vec<(&'a str, String)> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode(&s.replace('+', " "));
        let key = decode(key)
            .ok_or_else(|| bad("the query string is not valid percent-encoded UTF-8"))?;
        let Some(known) = known.iter().find(|k| **k == key) else {
            return Err(bad(format!(
                "unknown query parameter {key:?}; this endpoint takes {}",
                known.join(", ")
            )));
        };
        if params.iter().any(|(k, _)| k == known) {
            return Err(bad(format!("query parameter {key:?} is given twice")));
        }
        let value = decode(value).ok_or_else(|| {
            bad(format!(
                "query parameter {key:?} is not valid percent-encoded UTF-8"
            ))
        })?;
        params.push((known, value));
    }
    Ok(params)
}

/// A whole number parameter within `1..=max`.
pub(crate) fn number(name: &str, value: &str, max: u64) -> Result<u64, Failure> {
    match value.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(format!(
            "query parameter {name:?} is {value:?}; expected a whole number from 1 to {max}"
        ))),
    }
}

/// The listing's page, from its query string.
fn list_spec(query: Option<&str>) -> Result<ListSpec, Failure> {
    let mut spec = ListSpec {
        limit: protocol::DEFAULT_LIST_LIMIT,
        ..ListSpec::default()
    };
    for (key, value) in query_params(query, &["prefix", "after", "limit"])? {
        match key {
            "prefix" => {
                if value.len() > protocol::MAX_NAME_BYTES {
                    return Err(bad(format!(
                        "prefix is {} bytes long; names are at most {}",
                        value.len(),
                        protocol::MAX_NAME_BYTES
                    )));
                }
                spec.prefix = value;
            }
            "after" => {
                protocol::validate_name(&value).map_err(|e| bad(format!("after: {e}")))?;
                spec.after = Some(value);
            }
            _ => spec.limit = number(key, &value, protocol::MAX_LIST_LIMIT as u64)? as usize,
        }
    }
    Ok(spec)
}

/// A lock as the wire shows it.
pub(crate) fn lock_info(name: String, view: LockView) -> LockInfo {
    let holders: Vec<_> = view.holders.into_iter().map(holder_info).collect();
    let (mode, permits) = match view.mode {
        Mode::Exclusive => (LockMode::Exclusive, None),
        Mode::Shared => (LockMode::Shared, None),
        Mode::Permit(n) => (LockMode::Semaphore, Some(n)),
    };
    LockInfo {
        name,
        holder: holders.first().cloned(),
        holders,
        mode,
        permits,
        waiters: view.waiters,
        oldest_wait_ms: view.oldest_wait.map(|d| d.as_millis() as u64),
        held_back_until_ms: view.held_back_until.map(unix_ms),
    }
}

impl App {
    /// `GET /v1/locks?prefix=&after=&limit=`.
    pub(crate) async fn list(
        &self,
        caller: &Caller,
        query: Option<&str>,
    ) -> Result<Reply, Failure> {
        let spec = list_spec(query)?;
        let page = self.store.list(&caller.project, spec).await?;
        let locks = page
            .locks
            .into_iter()
            .map(|(name, view)| lock_info(name, view))
            .collect();
        Ok(json_reply(
            StatusCode::OK,
            &LockList {
                locks,
                next: page.next,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries() {
        let spec = list_spec(Some("prefix=jobs%2Fa+b&limit=5&after=jobs%2Fa"))
            .ok()
            .unwrap();
        assert_eq!(spec.prefix, "jobs/a b");
        assert_eq!(spec.after.as_deref(), Some("jobs/a"));
        assert_eq!(spec.limit, 5);
        let spec = list_spec(None).ok().unwrap();
        assert_eq!(spec.limit, protocol::DEFAULT_LIST_LIMIT);
        for refused in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "colour=red",
            "limit=1&limit=2",
            "prefix=%zz",
            "after=",
        ] {
            assert!(list_spec(Some(refused)).is_err(), "{refused}");
        }
    }
}
