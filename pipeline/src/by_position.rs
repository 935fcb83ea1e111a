//! A map keyed by one shard's log positions, stored in log order instead of hashed:
//! delivery's pending messages, the delivered ones it remembers for a `read`, and the
//! load generator's record of every message it tracks.
//!
//! Every step of a message through delivery looks it up by position, and so does every
//! timer queue when it checks whether the next timer in a lane is still live. With the
//! messages in a hash map, each of those lookups lands on a random cache line of a table
//! of up to `pending_max` entries: a profile of a delivery run put most of delivery's own
//! time on those misses (BENCHMARKS.md, "Pending messages in log order").
//!
//! But positions are the shard's log indexes, handed out in order, and messages enter,
//! leave and time out mostly in that order. So the store is a *ring* over a window of
//! positions `[base, base + ring.len())`, one `u32` per position naming the message's
//! entry in a *slab* (or none: a record that is not a waiting message, or one finished).
//! Neighbouring positions are neighbouring ring slots, and entries freed in order are
//! reused in order (the free list is first in, first out), so a pass in log order walks
//! memory in order too.
//!
//! A message still waiting long after those behind it finished (a recipient offline for
//! days) would keep the window, and so the ring, growing with the log. The window is kept
//! to at most `RING_PER_LIVE` slots per message in it plus `RING_SLACK`: past that, the
//! oldest ones move to an *overflow* hash map (every position below `base` is there) and
//! the window's start moves past them. A message moves at most once; the overflow is
//! usually empty.
//!
//! Memory: the slab holds as many entries as were ever pending at once (like a hash map,
//! it keeps its peak), the ring `4 × (RING_PER_LIVE × pending + RING_SLACK)` bytes at
//! most, the overflow only the moved ones.

use std::collections::VecDeque;

use crate::wire::LogPosition;

/// Ring slots allowed per message in the window (log records between messages, such as
/// status records, take slots too).
const RING_PER_LIVE: usize = 8;

/// Ring slots allowed beyond that.
const RING_SLACK: usize = 1 << 16;

/// A ring slot naming no entry.
const NONE: u32 = u32::MAX;

/// See the module docs. Keys are positions of one shard's log (any position can be
/// looked up; only those inserted are found).
#[derive(Debug)]
pub struct ByPosition<V> {
    /// The position of `ring[0]`. Every key below it is in `overflow`.
    base: u64,
    ring: VecDeque<u32>,
    /// Entries named by the ring.
    ring_live: usize,
    overflow: crate::LocalMap<u64, u32>,
    slab: Vec<Option<(LogPosition, V)>>,
    /// Free slab entries, in the order they were freed.
    free: VecDeque<u32>,
}

impl<V> Default for ByPosition<V> {
    fn default() -> Self {
        ByPosition {
            base: 0,
            ring: VecDeque::new(),
            ring_live: 0,
            overflow: crate::LocalMap::default(),
            slab: Vec::new(),
            free: VecDeque::new(),
        }
    }
}

impl<V> ByPosition<V> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.ring_live + self.overflow.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is held.
    pub fn contains_key(&self, key: &LogPosition) -> bool {
        self.slot(key.0).is_some()
    }

    /// The value of `key`.
    pub fn get(&self, key: &LogPosition) -> Option<&V> {
        let s = self.slot(key.0)?;
        self.slab[s as usize].as_ref().map(|(_, v)| v)
    }

    /// The value of `key`, to change.
    pub fn get_mut(&mut self, key: &LogPosition) -> Option<&mut V> {
        let s = self.slot(key.0)?;
        self.slab[s as usize].as_mut().map(|(_, v)| v)
    }

    /// Adds `key`, which must not be held (`Err` gives the value back if it is).
    pub fn insert(&mut self, key: LogPosition, value: V) -> Result<(), V> {
        if self.contains_key(&key) {
            return Err(value);
        }
        let s = match self.free.pop_front() {
            Some(s) => {
                self.slab[s as usize] = Some((key, value));
                s
            }
            None => {
                let s = u32::try_from(self.slab.len()).expect("fewer than 2^32 pending");
                assert!(s != NONE, "fewer than 2^32 - 1 pending");
                self.slab.push(Some((key, value)));
                s
            }
        };
        let k = key.0;
        if self.ring.is_empty() && k >= self.base {
            self.base = k;
        }
        if k < self.base {
            self.overflow.insert(k, s);
            return Ok(());
        }
        // Make room for the window to reach `k` within the bound (moving the oldest out),
        // then extend it.
        while !self.ring.is_empty() && self.over_bound((k - self.base + 1) as usize, 1) {
            self.evict_front();
        }
        if self.ring.is_empty() {
            self.base = k;
        }
        let i = (k - self.base) as usize;
        if i >= self.ring.len() {
            self.ring.resize(i + 1, NONE);
        }
        self.ring[i] = s;
        self.ring_live += 1;
        Ok(())
    }

    /// Takes `key` out.
    pub fn remove(&mut self, key: &LogPosition) -> Option<V> {
        let k = key.0;
        let s = if k < self.base {
            self.overflow.remove(&k)?
        } else {
            let i = usize::try_from(k - self.base).ok()?;
            let slot = self.ring.get_mut(i)?;
            let s = std::mem::replace(slot, NONE);
            if s == NONE {
                return None;
            }
            self.ring_live -= 1;
            self.pop_empty_front();
            while self.over_bound(self.ring.len(), 0) {
                self.evict_front();
            }
            s
        };
        let (_, value) = self.slab[s as usize].take().expect("a named entry is full");
        self.free.push_back(s);
        Some(value)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (LogPosition, &V)> + '_ {
        self.slab
            .iter()
            .filter_map(|e| e.as_ref().map(|(k, v)| (*k, v)))
    }

    /// Entries that left the window for the overflow (for the tests).
    #[cfg(test)]
    fn overflowed(&self) -> usize {
        self.overflow.len()
    }

    /// Slots of the window (for the tests).
    #[cfg(test)]
    fn window(&self) -> usize {
        self.ring.len()
    }

    fn slot(&self, k: u64) -> Option<u32> {
        if k < self.base {
            return self.overflow.get(&k).copied();
        }
        let i = usize::try_from(k - self.base).ok()?;
        self.ring.get(i).copied().filter(|&s| s != NONE)
    }

    /// Whether a window of `slots` slots holding `extra` more entries than now is past the
    /// bound.
    fn over_bound(&self, slots: usize, extra: usize) -> bool {
        slots > RING_PER_LIVE * (self.ring_live + extra) + RING_SLACK
    }

    /// Moves the window's first entry to the overflow and the window's start past it and
    /// past the empty slots after it.
    fn evict_front(&mut self) {
        if let Some(s) = self.ring.pop_front() {
            if s != NONE {
                self.overflow.insert(self.base, s);
                self.ring_live -= 1;
            }
            self.base += 1;
        }
        self.pop_empty_front();
    }

    fn pop_empty_front(&mut self) {
        while self.ring.front() == Some(&NONE) {
            self.ring.pop_front();
            self.base += 1;
        }
    }
}

impl<V> std::ops::Index<&LogPosition> for ByPosition<V> {
    type Output = V;

    fn index(&self, key: &LogPosition) -> &V {
        self.get(key).expect("a held position")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::ShardId;

    fn m(i: u64) -> LogPosition {
        LogPosition::new(ShardId::new(0), i)
    }

    #[test]
    fn in_order_use_keeps_the_window_small_and_the_overflow_empty() {
        let mut s = ByPosition::default();
        // Messages every third index (status records between), 64 pending at a time.
        for i in 0..100_000u64 {
            s.insert(m(3 * i), i).unwrap();
            if i >= 64 {
                assert_eq!(s.remove(&m(3 * (i - 64))), Some(i - 64));
            }
        }
        assert_eq!(s.len(), 64);
        assert_eq!(s.overflowed(), 0);
        assert!(s.window() <= 3 * 64, "window {}", s.window());
        assert!(s.slab.len() <= 65, "slab {}", s.slab.len());
        assert_eq!(s.get(&m(3 * 99_999)), Some(&99_999));
        assert_eq!(s.get(&m(3 * 99_999 + 1)), None);
    }

    #[test]
    fn a_straggler_moves_to_the_overflow_and_the_window_stays_bounded() {
        let mut s = ByPosition::default();
        s.insert(m(5), 5).unwrap();
        for i in 10..1_000_000u64 {
            s.insert(m(i), i).unwrap();
            assert_eq!(s.remove(&m(i)), Some(i));
        }
        assert_eq!(s.len(), 1);
        assert_eq!(s.overflowed(), 1, "the straggler left the window");
        assert!(s.window() <= RING_SLACK + RING_PER_LIVE);
        assert_eq!(s[&m(5)], 5);
        assert_eq!(s.remove(&m(5)), Some(5));
        assert_eq!(s.len(), 0);
        assert_eq!(s.remove(&m(5)), None);
    }

    #[test]
    fn a_far_jump_does_not_build_a_window_over_the_gap() {
        let mut s = ByPosition::default();
        s.insert(m(1), 1).unwrap();
        s.insert(m(1 << 40), 2).unwrap();
        assert!(s.window() <= 1, "window {}", s.window());
        assert_eq!(s[&m(1)], 1);
        assert_eq!(s[&m(1 << 40)], 2);
        assert_eq!(s.get(&LogPosition(u64::MAX)), None);
        assert_eq!(s.get(&m(0)), None);
    }

    #[test]
    fn a_held_key_is_refused_and_keeps_its_value() {
        let mut s = ByPosition::default();
        s.insert(m(7), "a").unwrap();
        assert_eq!(s.insert(m(7), "b"), Err("b"));
        assert_eq!(s[&m(7)], "a");
    }

    proptest! {
        /// The store answers as a hash map does, and its window stays within the bound,
        /// whatever the order of inserts (mostly ascending, some behind, some far ahead)
        /// and removals.
        #[test]
        fn it_answers_as_a_map_does(ops in prop::collection::vec((0u8..10, 0u64..64, any::<bool>()), 1..2000)) {
            let mut s = ByPosition::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut next = 0u64;
            for (n, (op, x, far)) in ops.into_iter().enumerate() {
                let v = n as u64;
                match op {
                    0..=4 => {
                        next += 1 + x % 4;
                        let k = if far { next + (x << 20) } else { next };
                        next = next.max(k);
                        prop_assert_eq!(s.insert(m(k), v).is_ok(), !model.contains_key(&k));
                        model.entry(k).or_insert(v);
                    }
                    5 => {
                        let k = next.saturating_sub(x * 3);
                        prop_assert_eq!(s.insert(m(k), v).is_ok(), !model.contains_key(&k));
                        model.entry(k).or_insert(v);
                    }
                    _ => {
                        // The oldest, or one from the middle.
                        let mut keys: Vec<u64> = model.keys().copied().collect();
                        keys.sort_unstable();
                        let k = if far { keys.first().copied() } else { keys.get(x as usize % keys.len().max(1)).copied() };
                        if let Some(k) = k {
                            prop_assert_eq!(s.remove(&m(k)), model.remove(&k));
                        }
                        prop_assert_eq!(s.remove(&m(next + 1)), None);
                    }
                }
                prop_assert_eq!(s.len(), model.len());
                prop_assert!(s.window() <= RING_PER_LIVE * s.ring_live + RING_SLACK);
            }
            for (k, v) in &model {
                prop_assert_eq!(s.get(&m(*k)), Some(v));
            }
            let mut seen: Vec<(u64, u64)> = s.iter().map(|(k, v)| (k.0, *v)).collect();
            seen.sort_unstable();
            let mut want: Vec<(u64, u64)> = model.into_iter().collect();
            want.sort_unstable();
            prop_assert_eq!(seen, want);
        }
    }
}
