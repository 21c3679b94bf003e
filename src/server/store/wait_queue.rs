//! A FIFO line of waiters, indexed by request id, whose every operation costs the same
//! whatever the line's length.
//!
//! A waiter re-polls, resumes, times out or is cancelled by its request id, anywhere in the
//! line. A plain `VecDeque` finds it by walking the line, under the shard's lock: 98,000
//! waiters re-polling on one lock then stalled every other lock of the shard (issue 13's
//! attack 4). Here a map finds a waiter's slot, a waiter leaving from the middle leaves an
//! empty slot behind (the line is compacted once half of it is empty), and a Fenwick tree
//! over the slots counts the waiters ahead of one in O(log n).

use crate::id::Id;
use std::collections::{HashMap, VecDeque};

/// The line of one lock.
#[derive(Debug)]
pub(crate) struct WaitQueue<T> {
    /// Oldest first; `None` where a waiter left out of order.
    slots: VecDeque<Option<(Id, T)>>,
    /// Sequence number of `slots[0]` (numbers restart from 0 when the line is compacted).
    base: u64,
    /// Where each waiter is, by sequence number.
    index: HashMap<Id, u64>,
    /// One count per live waiter, by sequence number relative to `tree_base`.
    tree: Fenwick,
    tree_base: u64,
}

impl<T> Default for WaitQueue<T> {
    fn default() -> WaitQueue<T> {
        WaitQueue {
            slots: VecDeque::new(),
            base: 0,
            index: HashMap::new(),
            tree: Fenwick::new(0),
            tree_base: 0,
        }
    }
}

impl<T> WaitQueue<T> {
    /// Waiters in line.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Joins the line at its end. A request id already in line keeps its place (and the
    /// new value is dropped): callers look it up first.
    pub fn push_back(&mut self, id: Id, value: T) {
        if self.index.contains_key(&id) {
            return;
        }
        let seq = self.base + self.slots.len() as u64;
        if (seq - self.tree_base) as usize >= self.tree.len() {
            self.rebuild(2 * self.slots.len() + 16);
        }
        self.slots.push_back(Some((id, value)));
        self.index.insert(id, seq);
        self.tree.add((seq - self.tree_base) as usize, 1);
    }

    /// The first waiter in line.
    pub fn front(&self) -> Option<&T> {
        self.slots.iter().flatten().next().map(|(_, v)| v)
    }

    /// The first waiter in line, to change.
    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.slots.iter_mut().flatten().next().map(|(_, v)| v)
    }

    /// Leaves the line from its front.
    pub fn pop_front(&mut self) -> Option<T> {
        self.trim_front();
        let (id, value) = self.slots.pop_front()??;
        self.index.remove(&id);
        self.tree.add((self.base - self.tree_base) as usize, -1);
        self.base += 1;
        self.trim_front();
        Some(value)
    }

    /// The waiter with this request id.
    pub fn get_mut(&mut self, id: &Id) -> Option<&mut T> {
        let slot = (*self.index.get(id)? - self.base) as usize;
        self.slots[slot].as_mut().map(|(_, v)| v)
    }

    /// How many waiters are ahead of this one.
    pub fn position(&self, id: &Id) -> Option<u64> {
        let seq = *self.index.get(id)?;
        Some(self.tree.sum_before((seq - self.tree_base) as usize) as u64)
    }

    /// Leaves the line from wherever the waiter is.
    pub fn remove(&mut self, id: &Id) -> Option<T> {
        let seq = self.index.remove(id)?;
        let (_, value) = self.slots[(seq - self.base) as usize].take()?;
        self.tree.add((seq - self.tree_base) as usize, -1);
        self.trim_front();
        // Empty slots cost memory and make `front` walk: compact when they are the most.
        if self.slots.len() > 2 * self.index.len() + 16 {
            self.compact();
        }
        Some(value)
    }

    /// Keeps the waiters for which `keep` is true, in order. Walks the whole line: for the
    /// periodic sweep, not for per-request work.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let leaving: Vec<Id> = self
            .slots
            .iter()
            .flatten()
            .filter(|(_, v)| !keep(v))
            .map(|(id, _)| *id)
            .collect();
        for id in leaving {
            self.remove(&id);
        }
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.is_empty() && self.slots.capacity() > 64 {
            self.slots.shrink_to(16);
        }
    }

    /// Drops the empty slots, renumbering the waiters.
    fn compact(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        self.base = 0;
        self.index.clear();
        self.tree_base = 0;
        self.tree = Fenwick::new(0);
        for (id, value) in slots.into_iter().flatten() {
            self.push_back(id, value);
        }
    }

    /// A tree for sequence numbers from `base` on, room for `room` of them.
    fn rebuild(&mut self, room: usize) {
        self.tree_base = self.base;
        let mut counts = vec![0i64; room.max(self.slots.len() + 1)];
        for (i, slot) in self.slots.iter().enumerate() {
            counts[i] = i64::from(slot.is_some());
        }
        self.tree = Fenwick::from_counts(counts);
    }
}

/// Prefix sums with point updates, both O(log n).
#[derive(Debug)]
struct Fenwick(Vec<i64>);

impl Fenwick {
    fn new(len: usize) -> Fenwick {
        Fenwick(vec![0; len])
    }

    /// In O(n).
    fn from_counts(mut counts: Vec<i64>) -> Fenwick {
        for i in 0..counts.len() {
            let parent = i | (i + 1);
            if parent < counts.len() {
                counts[parent] += counts[i];
            }
        }
        Fenwick(counts)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn add(&mut self, mut i: usize, delta: i64) {
        while i < self.0.len() {
            self.0[i] += delta;
            i |= i + 1;
        }
    }

    /// The sum of the counts before `i`.
    fn sum_before(&self, mut i: usize) -> i64 {
        let mut sum = 0;
        while i > 0 {
            sum += self.0[i - 1];
            i &= i - 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Id {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        Id(bytes)
    }

    /// Random operations against a plain `VecDeque`, the obviously right model.
    #[test]
    fn behaves_like_a_walked_deque() {
        for seed in 0..50 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut queue = WaitQueue::default();
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 0;
            for _ in 0..2_000 {
                match rng.u8(0..10) {
                    0..=3 => {
                        queue.push_back(id(next), next);
                        model.push_back(next);
                        next += 1;
                    }
                    4 | 5 => assert_eq!(queue.pop_front(), model.pop_front()),
                    6 | 7 if next > 0 => {
                        let n = rng.u64(0..next);
                        let at = model.iter().position(|&m| m == n);
                        if let Some(at) = at {
                            model.remove(at);
                        }
                        assert_eq!(queue.remove(&id(n)), at.map(|_| n));
                    }
                    8 if next > 0 => {
                        let n = rng.u64(0..next);
                        let at = model.iter().position(|&m| m == n).map(|p| p as u64);
                        assert_eq!(queue.position(&id(n)), at);
                        assert_eq!(queue.get_mut(&id(n)).map(|v| *v), at.map(|_| n));
                    }
                    _ => {
                        let modulus = rng.u64(2..5);
                        queue.retain(|v| v % modulus != 0);
                        model.retain(|v| v % modulus != 0);
                    }
                }
                assert_eq!(queue.len(), model.len());
                assert_eq!(queue.front(), model.front());
                assert!(queue.slots.len() <= 2 * queue.len() + 17);
            }
        }
    }

    #[test]
    fn a_request_id_in_line_keeps_its_place() {
        let mut queue = WaitQueue::default();
        queue.push_back(id(1), "first");
        queue.push_back(id(2), "second");
        queue.push_back(id(1), "again");
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.position(&id(1)), Some(0));
        assert_eq!(queue.pop_front(), Some("first"));
        assert_eq!(queue.position(&id(2)), Some(0));
    }
}
