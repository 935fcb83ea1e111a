//! A queue of `(time, message)` timers for delivery's states (due, offered, handed,
//! expiring), cheaper than an ordered set per timer.
//!
//! Delivery's times are nearly all "the clock now plus a fixed delay" (due now, the
//! outcome timeout, the default time to live, one of a few backoffs): each delay's
//! times arrive in order. So a timer goes at the back of a *lane*, a deque whose times
//! never decrease (the lane whose last time is the latest not after it); one later than
//! no lane's last goes into a spare lane, and one that fits no lane (more delays than
//! lanes, a clock stepped back) into an ordered set. Pushing is then a deque push, not a
//! B-tree insertion into a set of up to a million entries.
//!
//! Removal is lazy: the owner changes a message's state first, then calls
//! [`TimerQueue::remove`]; an entry the owner's `live(time, message)` denies is stale.
//! Invariants, kept by every method:
//! - the front of every lane is live (a removal of a lane's front pops it and every stale
//!   entry behind it), so [`TimerQueue::first`] is the earliest live timer;
//! - the set holds no stale entry (a removal takes it out at once);
//! - stale entries are at most about as many as the live ones: past
//!   `2 * live_max + STALE_SLACK` entries in the lanes, they are swept out (amortized: a
//!   sweep visits at most twice the entries it drops).
//!
//! A message has at most one live timer per queue (its state names one time). Duplicates
//! of a live `(time, message)` (a message that left a state and came back to it at the
//! same millisecond) are harmless: handling the first changes the message's state, which
//! makes the other stale.

use std::collections::{BTreeSet, VecDeque};

use crate::wire::LogPosition;

/// Lanes of non-decreasing times (delays in use at once: now, the bounce delay, a few
/// backoffs, the key recheck).
const LANES: usize = 8;

/// Stale entries tolerated beyond the live ones before a sweep.
const STALE_SLACK: usize = 4096;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct TimerQueue {
    lanes: Vec<VecDeque<(u64, LogPosition)>>,
    /// Entries in the lanes, stale ones included.
    lanes_len: usize,
    /// Timers that fit no lane; exact.
    rest: BTreeSet<(u64, LogPosition)>,
}

impl TimerQueue {
    /// Adds a timer, live by `live` from now on. `live_max` bounds the live timers (the
    /// messages pending): past twice as many entries, stale ones are swept out.
    pub(super) fn push(
        &mut self,
        at: u64,
        message: LogPosition,
        live_max: usize,
        live: impl Fn(u64, LogPosition) -> bool,
    ) {
        // The lane whose last time is the latest not after `at`; else an empty one.
        let mut best: Option<(usize, u64)> = None;
        let mut empty = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            match lane.back() {
                Some(&(t, _)) if t <= at && best.is_none_or(|(_, b)| t > b) => {
                    best = Some((i, t));
                }
                None if empty.is_none() => empty = Some(i),
                _ => {}
            }
        }
        let lane = match (best, empty) {
            (Some((i, _)), _) | (None, Some(i)) => i,
            (None, None) if self.lanes.len() < LANES => {
                self.lanes.push(VecDeque::new());
                self.lanes.len() - 1
            }
            (None, None) => {
                self.rest.insert((at, message));
                return;
            }
        };
        self.lanes[lane].push_back((at, message));
        self.lanes_len += 1;
        if self.lanes_len > 2 * live_max + STALE_SLACK {
            self.sweep(&live);
        }
    }

    /// `(at, message)` is stale now (its owner changed the message's state first).
    pub(super) fn remove(
        &mut self,
        at: u64,
        message: LogPosition,
        live: impl Fn(u64, LogPosition) -> bool,
    ) {
        if self.rest.remove(&(at, message)) {
            return;
        }
        // Only a lane whose front this was can have a stale front now (see the module
        // docs: the fronts were live, and only this message's state changed).
        for i in 0..self.lanes.len() {
            if self.lanes[i].front() == Some(&(at, message)) {
                self.lanes[i].pop_front();
                self.lanes_len -= 1;
                self.trim(i, &live);
            }
        }
    }

    /// The earliest live timer.
    pub(super) fn first(&self) -> Option<(u64, LogPosition)> {
        self.lanes
            .iter()
            .filter_map(|l| l.front().copied())
            .chain(self.rest.first().copied())
            .min()
    }

    /// Timers held, stale ones included (for the bound's tests).
    #[cfg(test)]
    pub(super) fn entries(&self) -> usize {
        self.lanes_len + self.rest.len()
    }

    /// Pops lane `i`'s stale front entries.
    fn trim(&mut self, i: usize, live: &impl Fn(u64, LogPosition) -> bool) {
        let lane = &mut self.lanes[i];
        while let Some(&(t, m)) = lane.front() {
            if live(t, m) {
                break;
            }
            lane.pop_front();
            self.lanes_len -= 1;
        }
    }

    /// Drops every stale entry of the lanes.
    fn sweep(&mut self, live: &impl Fn(u64, LogPosition) -> bool) {
        for lane in &mut self.lanes {
            lane.retain(|&(t, m)| live(t, m));
        }
        self.lanes_len = self.lanes.iter().map(VecDeque::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ShardId;

    fn m(i: u64) -> LogPosition {
        LogPosition::new(ShardId::new(0), i)
    }

    /// A queue with the owner's side: the live time of each message.
    #[derive(Default)]
    struct Owner {
        q: TimerQueue,
        state: BTreeMap<LogPosition, u64>,
    }

    impl Owner {
        fn set(&mut self, i: u64, at: u64) {
            if let Some(old) = self.state.insert(m(i), at) {
                let state = &self.state;
                self.q.remove(old, m(i), |t, x| state.get(&x) == Some(&t));
            }
            let state = &self.state;
            let live_max = state.len();
            self.q
                .push(at, m(i), live_max, |t, x| state.get(&x) == Some(&t));
        }

        fn drop(&mut self, i: u64) {
            let old = self.state.remove(&m(i)).unwrap();
            let state = &self.state;
            self.q.remove(old, m(i), |t, x| state.get(&x) == Some(&t));
        }

        /// Pops every timer due by `now`, in order, as the owner does (first, then a
        /// state change).
        fn due(&mut self, now: u64) -> Vec<(u64, u64)> {
            let mut out = Vec::new();
            while let Some((t, x)) = self.q.first() {
                if t > now {
                    break;
                }
                assert_eq!(self.state.get(&x), Some(&t), "first is live");
                out.push((t, x.index()));
                self.drop(x.index());
            }
            out
        }

        /// The owner's own view: the earliest live time.
        fn expected_first(&self) -> Option<u64> {
            self.state.values().copied().min()
        }
    }

    #[test]
    fn timers_come_out_in_time_order_across_lanes_and_the_set() {
        let mut o = Owner::default();
        // Several delays at each "now", more than there are lanes.
        let mut next = 0;
        for now in (0..100).step_by(10) {
            for delay in [
                0, 50, 1000, 2000, 4000, 8000, 16_000, 30_000, 60_000, 120_000, 7,
            ] {
                o.set(next, now + delay);
                next += 1;
            }
        }
        assert!(
            !o.q.rest.is_empty(),
            "more delays than lanes: some in the set"
        );
        let mut expected: Vec<(u64, u64)> = o.state.iter().map(|(x, &t)| (t, x.index())).collect();
        expected.sort();
        let mut got = o.due(u64::MAX);
        // In time order (the order among timers of one time is not kept), each once.
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0));
        got.sort();
        assert_eq!(got, expected);
        assert_eq!(o.q.entries(), 0);
    }

    #[test]
    fn a_clock_stepped_back_and_far_future_times_keep_the_order() {
        let mut o = Owner::default();
        o.set(1, 1_000_000);
        o.set(2, u64::MAX - 1);
        // The clock stepped back: earlier than every lane's last.
        o.set(3, 5);
        o.set(4, 3);
        o.set(5, 1_000_000);
        assert_eq!(o.q.first(), Some((3, m(4))));
        assert_eq!(o.due(10), [(3, 4), (5, 3)]);
        let mut at_1m = o.due(1_000_000);
        at_1m.sort();
        assert_eq!(at_1m, [(1_000_000, 1), (1_000_000, 5)]);
        assert!(o.due(u64::MAX - 2).is_empty());
        assert_eq!(o.due(u64::MAX), [(u64::MAX - 1, 2)]);
    }

    #[test]
    fn removed_and_moved_timers_never_come_out_and_first_is_always_live() {
        let mut o = Owner::default();
        // A pseudo-random mix of pushes, moves and removals, checked against the owner's
        // own view after every step.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut now = 0u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = x % 500;
            match x % 7 {
                0 if o.state.contains_key(&m(i)) => o.drop(i),
                1 => now += x % 3,
                _ => o.set(i, now + [0, 50, 1000, 30_000][(x >> 8) as usize % 4]),
            }
            let first = o.q.first();
            assert_eq!(first.map(|f| f.0), o.expected_first(), "step {step}");
            if let Some((t, x)) = first {
                assert_eq!(o.state.get(&x), Some(&t), "step {step}: first is live");
            }
            if step % 1000 == 0 {
                let due = o.due(now);
                assert!(due.windows(2).all(|w| w[0].0 <= w[1].0));
            }
        }
    }

    #[test]
    fn stale_entries_stay_within_the_bound() {
        let mut o = Owner::default();
        // One message stays; many come and go behind it (their removals are lazy).
        o.set(0, 0);
        for i in 1..50_000 {
            o.set(i, i);
            assert!(
                o.q.entries() <= 2 * o.state.len() + STALE_SLACK,
                "{} entries for {} live",
                o.q.entries(),
                o.state.len()
            );
            o.drop(i);
        }
        assert_eq!(o.due(u64::MAX), [(0, 0)]);
        assert_eq!(o.q.entries(), 0);
    }
}
