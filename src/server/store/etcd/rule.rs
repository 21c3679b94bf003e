//! The grant rule over etcd's queue: who holds a lock, and what a waiter waits for.
//!
//! [`Mode::admits`] is the rule, the same as the memory store's: walk the lock's queue in
//! create-revision order (FIFO); each entry holds if the rule admits it next to the holders
//! before it; the first entry it does not admit, and everyone after, waits.
//!
//! Lock-delays take part as *phantoms*: a delay key that outlives its holder (the lease ended
//! without a release) keeps that holder's place (its fencing token is its create revision)
//! and mode in the walk until the delay is over. So nobody is granted next to an ended
//! lease whom it would not have admitted while it held: nobody after an exclusive holder
//! (as before modes), no writer after a reader, no more than `n` permits counting it.
//!
//! Holding is monotone, which is what makes grants safe without a grant record: entries
//! join only at the back, a phantom takes exactly the place and mode of the lease it
//! outlives, and phantoms only go. So an entry the rule admits at one revision holds at every
//! later one until it leaves, whichever server looks, and grants follow create-revision
//! order: fencing tokens increase across the grants of a name.

use crate::server::store::Mode;

/// Most keys a waiter watches for a semaphore; beyond, it is woken by any departure from the
/// lock's queue (see [`Witnesses::Lock`]).
pub(super) const WITNESS_CAP: usize = 256;

/// How many entries ahead a waiter reads first, newest first (the next pages, if the rule
/// needs them, are [`PAGE`] long).
pub(super) fn window(mode: Mode) -> usize {
    match mode {
        // The entry just ahead decides.
        Mode::Exclusive => 1,
        // The nearest writer decides, usually close.
        Mode::Shared => 64,
        // `n` entries ahead prove it waits; one more tells the first waiter apart.
        Mode::Permit(n) => (n as usize).min(WITNESS_CAP) + 1,
    }
}

/// Entries per further page of a queue read (values of about 150 bytes: far below gRPC's
/// 4 MiB message limit).
pub(super) const PAGE: usize = 1000;

/// How many of the live entries (oldest first) hold, given the phantoms (oldest first): the
/// live entries in the longest prefix of the merged walk that the rule admits. Revisions
/// place phantoms among entries.
pub(super) fn holding(live: &[(i64, Mode)], phantoms: &[(i64, Mode)]) -> usize {
    let (mut l, mut p) = (0, 0);
    let mut held = None;
    let mut holders = 0;
    loop {
        let take_phantom = match (live.get(l), phantoms.get(p)) {
            (None, None) => return l,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(entry), Some(phantom)) => phantom.0 < entry.0,
        };
        let mode = if take_phantom {
            phantoms[p].1
        } else {
            live[l].1
        };
        if !mode.admits(held, holders) {
            return l;
        }
        held.get_or_insert(mode);
        holders += 1;
        if take_phantom {
            p += 1;
        } else {
            l += 1;
        }
    }
}

/// Where a waiter stands, judged from the entries ahead of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The rule admits it: it holds.
    Admitted,
    /// It waits.
    Blocked(Blocked),
    /// The entries read do not decide: read further ahead.
    NeedMore,
}

/// Why a waiter waits, and what may change that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Blocked {
    /// Entries ahead whose existence proves that it waits: until one of them goes (or a
    /// phantom does, with `poll`), looking again cannot find it admitted.
    pub witnesses: Witnesses,
    /// Phantoms are among the reasons: look again every so often, since their keys go when
    /// their etcd leases end, which the watch over queue keys does not see.
    pub poll: bool,
    /// It is the first waiter of a semaphore, having read everything ahead: it ends every
    /// holder it read at its `max_hold` (else only the entry just ahead).
    pub end_all: bool,
}

/// What a blocked waiter watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Witnesses {
    /// These entries (indexes into the entries read, newest first).
    Keys(Vec<usize>),
    /// Any departure from the lock's queue: a semaphore of more permits than a waiter should
    /// watch keys for.
    Lock,
}

fn witnesses(entries: std::ops::Range<usize>) -> Witnesses {
    if entries.len() > WITNESS_CAP {
        Witnesses::Lock
    } else {
        Witnesses::Keys(entries.collect())
    }
}

fn blocked(witnesses: Witnesses, poll: bool, end_all: bool) -> Verdict {
    Verdict::Blocked(Blocked {
        witnesses,
        poll,
        end_all,
    })
}

/// Judges a waiter of mode `own`. `nearest`: the modes of the entries ahead of it, newest
/// first, as read; `complete`: they are all of them. `phantoms`: the modes of the phantoms
/// ahead of it (delay keys with a lower token than its own create revision that belong to no
/// entry read); only looked at once every entry ahead was read, when they are exact.
pub(super) fn judge(own: Mode, nearest: &[Mode], complete: bool, phantoms: &[Mode]) -> Verdict {
    let live = judge_live(own, nearest, complete);
    if live != Verdict::Admitted || phantoms.is_empty() {
        // Blocked by live entries alone: phantoms can only add to that, so their going (which
        // nothing wakes) cannot end the wait by itself.
        return live;
    }
    // Every entry ahead was read and admits it: the phantoms decide. Their order among the
    // entries does not matter here: one of another kind blocks wherever it stands, and
    // permits are counted.
    let admitted = match own {
        Mode::Exclusive => false,
        Mode::Shared => phantoms.iter().all(|&m| m == Mode::Shared),
        Mode::Permit(n) => {
            phantoms.iter().all(|&m| m == own) && nearest.len() + phantoms.len() < n as usize
        }
    };
    if admitted {
        return Verdict::Admitted;
    }
    let ahead = match own {
        // One of them going frees a permit.
        Mode::Permit(_) => witnesses(0..nearest.len()),
        // Readers ahead, or nobody: only the phantoms hold it back.
        Mode::Exclusive | Mode::Shared => Witnesses::Keys(Vec::new()),
    };
    blocked(ahead, true, matches!(own, Mode::Permit(_)))
}

/// [`judge`] as if no lease had a lock-delay running.
fn judge_live(own: Mode, nearest: &[Mode], complete: bool) -> Verdict {
    match own {
        Mode::Exclusive if nearest.is_empty() => Verdict::Admitted,
        // Anyone ahead holds or waits: it must go first.
        Mode::Exclusive => blocked(Witnesses::Keys(vec![0]), false, false),
        Mode::Shared => match nearest.iter().position(|&m| m != Mode::Shared) {
            // The nearest writer (or an entry of another kind) ahead: while it is there, so is
            // the wait; readers before it do not matter.
            Some(i) => blocked(Witnesses::Keys(vec![i]), false, false),
            None if complete => Verdict::Admitted,
            None => Verdict::NeedMore,
        },
        Mode::Permit(n) => {
            let n = n as usize;
            if nearest.len() >= n {
                // `n` entries ahead, holders or waiters: no permit for it while they all stay.
                // Exactly `n`, all read: it is the first waiter.
                blocked(witnesses(0..n), false, complete && nearest.len() == n)
            } else if !complete {
                Verdict::NeedMore
            } else if nearest.iter().all(|&m| m == own) {
                Verdict::Admitted
            } else {
                // An entry of another kind ahead (a refused acquire not yet gone, see
                // `acquire.rs`): never granted next to it.
                blocked(witnesses(0..nearest.len()), false, true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mode::{Exclusive as X, Permit as P, Shared as S};

    fn keys(k: &[usize]) -> Verdict {
        blocked(Witnesses::Keys(k.to_vec()), false, false)
    }

    #[test]
    fn holders_are_the_prefix_the_rule_admits() {
        let q = |modes: &[Mode]| -> Vec<(i64, Mode)> {
            modes
                .iter()
                .enumerate()
                .map(|(i, &m)| (10 + i as i64, m))
                .collect()
        };
        assert_eq!(holding(&q(&[X, X]), &[]), 1);
        assert_eq!(
            holding(&q(&[S, S, X, S]), &[]),
            2,
            "readers behind a writer wait"
        );
        assert_eq!(holding(&q(&[X, S, S]), &[]), 1);
        assert_eq!(holding(&q(&[P(2), P(2), P(2)]), &[]), 2);
        assert_eq!(
            holding(&q(&[P(3), P(2)]), &[]),
            1,
            "another count never joins"
        );
        assert_eq!(holding(&q(&[]), &[]), 0);
        // Phantoms keep their place and mode.
        assert_eq!(holding(&q(&[X]), &[(5, X)]), 0);
        assert_eq!(
            holding(&q(&[S, S]), &[(5, S)]),
            2,
            "readers join a reader's delay"
        );
        assert_eq!(holding(&q(&[X, S]), &[(5, S)]), 0, "a writer does not");
        assert_eq!(holding(&q(&[P(2), P(2)]), &[(5, P(2))]), 1);
        let apart = [(10, P(2)), (12, P(2))];
        assert_eq!(holding(&apart, &[(11, P(2))]), 1, "placed by token");
        assert_eq!(holding(&apart, &[(13, P(2))]), 2, "behind: no effect");
    }

    #[test]
    fn an_exclusive_waiter_waits_for_the_entry_just_ahead() {
        assert_eq!(judge(X, &[], true, &[]), Verdict::Admitted);
        assert_eq!(judge(X, &[S], false, &[]), keys(&[0]));
        assert_eq!(
            judge(X, &[], true, &[S]),
            blocked(Witnesses::Keys(vec![]), true, false),
            "a phantom of any kind holds a writer back"
        );
    }

    #[test]
    fn a_reader_waits_for_the_nearest_writer_ahead() {
        assert_eq!(judge(S, &[S, S], true, &[]), Verdict::Admitted);
        assert_eq!(judge(S, &[S, X, S], false, &[]), keys(&[1]));
        assert_eq!(judge(S, &[S, S], false, &[]), Verdict::NeedMore);
        assert_eq!(judge(S, &[S], true, &[S]), Verdict::Admitted);
        assert_eq!(
            judge(S, &[S], true, &[X]),
            blocked(Witnesses::Keys(vec![]), true, false)
        );
        // A phantom never unblocks what live entries block, and is not watched for then.
        assert_eq!(judge(S, &[X], true, &[S]), keys(&[0]));
    }

    #[test]
    fn a_permit_waiter_counts_the_entries_ahead() {
        let p = P(3);
        assert_eq!(judge(p, &[p, p], true, &[]), Verdict::Admitted);
        assert_eq!(
            judge(p, &[p, p, p], true, &[]),
            blocked(Witnesses::Keys(vec![0, 1, 2]), false, true),
            "the first waiter, having read all ahead"
        );
        assert_eq!(
            judge(p, &[p, p, p, p], false, &[]),
            blocked(Witnesses::Keys(vec![0, 1, 2]), false, false)
        );
        assert_eq!(
            judge(p, &[p, X], true, &[]),
            blocked(Witnesses::Keys(vec![0, 1]), false, true),
            "never next to another kind"
        );
        assert_eq!(
            judge(p, &[p], true, &[p, p]),
            blocked(Witnesses::Keys(vec![0]), true, true),
            "phantoms count"
        );
        assert_eq!(judge(p, &[p], true, &[p]), Verdict::Admitted);
        let big = P(1000);
        assert_eq!(judge(big, &[big; 10], false, &[]), Verdict::NeedMore);
        assert_eq!(
            judge(big, &[big; 1000], false, &[]),
            blocked(Witnesses::Lock, false, false)
        );
        assert_eq!(
            judge(big, &[big; 1000], true, &[]),
            blocked(Witnesses::Lock, false, true)
        );
        assert_eq!(
            judge(big, &[big; 1001], true, &[]),
            blocked(Witnesses::Lock, false, false),
            "the second waiter leaves holders to the first"
        );
        assert_eq!(window(X), 1);
        assert_eq!(window(P(3)), 4);
        assert_eq!(window(big), WITNESS_CAP + 1);
    }
}
