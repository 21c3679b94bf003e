//! Listing a project's locks: the lock names come from keys-only ranges over the project's
//! queue keys (hex names sort as the names do, bytewise), then each lock is inspected.
//!
//! A range that stops inside a lock's keys goes on just past that lock (`<hex name>0` sorts
//! after every `<hex name>/...` key and before the names it is a prefix of), so a lock with
//! many waiters costs one range call, not one per thousand waiters.

use super::keys::{hex, project_queues};
use super::{EtcdError, Inner};
use crate::server::store::{ListPage, ListSpec, Project};
use etcd_client::GetOptions;

/// Keys per range call.
const CHUNK: i64 = 1000;

impl Inner {
    pub(super) async fn list(
        &self,
        project: &Project,
        spec: &ListSpec,
    ) -> Result<ListPage, EtcdError> {
        let limit = spec.limit.max(1);
        let queues = project_queues(&self.prefix, &project.name);
        let mut first = queues.clone();
        first.extend_from_slice(hex(spec.prefix.as_bytes()).as_bytes());
        let end = range_end(&first);
        let mut start = match &spec.after {
            Some(after) => past(&queues, hex(after.as_bytes()).as_bytes()).max(first),
            None => first,
        };
        let mut names: Vec<String> = Vec::new();
        let mut exhausted = false;
        while names.len() <= limit {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_keys_only()
                .with_limit(CHUNK);
            let answer = self.etcd.get("list", &start, Some(options)).await?;
            let mut last: Option<&[u8]> = None;
            for kv in answer.kvs() {
                let rest = kv.key().get(queues.len()..).unwrap_or_default();
                let Some(slash) = rest.iter().position(|&b| b == b'/') else {
                    continue;
                };
                let hex_name = &rest[..slash];
                if last != Some(hex_name) {
                    last = Some(hex_name);
                    if let Some(name) = unhex(hex_name) {
                        names.push(name);
                    }
                }
            }
            match last {
                Some(last) if answer.more() => start = past(&queues, last),
                _ => {
                    exhausted = true;
                    break;
                }
            }
        }
        let more = !exhausted || names.len() > limit;
        let mut page = ListPage::default();
        for name in names.into_iter().take(limit) {
            if let Some(view) = self.inspect(project, &name).await? {
                page.locks.push((name.clone(), view));
            }
            // A short page still carries the cursor: only its absence means the end.
            if more {
                page.next = Some(name);
            }
        }
        Ok(page)
    }
}

/// The first key after every queue key of the lock whose hex name this is.
fn past(queues: &[u8], hex_name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(queues.len() + hex_name.len() + 1);
    key.extend_from_slice(queues);
    key.extend_from_slice(hex_name);
    key.push(b'0');
    key
}

/// The end of the range of keys starting with `prefix` (which ends in a hex digit or `/`).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn unhex(hex: &[u8]) -> Option<String> {
    let digit = |b: u8| (b as char).to_digit(16);
    let bytes = hex
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some((digit(*hi)? * 16 + digit(*lo)?) as u8),
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_names_round_trip_and_ranges_skip_whole_locks() {
        assert_eq!(
            unhex(hex("jobs/ä".as_bytes()).as_bytes()).as_deref(),
            Some("jobs/ä")
        );
        assert_eq!(unhex(b"6"), None);
        assert_eq!(range_end(b"p/q/61"), b"p/q/62");
        assert_eq!(range_end(b"p/q/6f"), b"p/q/6g");
        // Past lock `a` (61): after `61/...`, before `6162/...` (lock `ab`).
        let past_a = past(b"q/", b"61");
        assert!(past_a.as_slice() > b"q/61/ffff".as_slice());
        assert!(past_a.as_slice() < b"q/6162/0".as_slice());
    }
}
