//! Recipients of the same-recipient window (issue 14): which numbers this business
//! messaged or tried to message lately, and how many of its messages each one took.
//!
//! A table of `entries` slots in buckets of `BUCKET` (8 slots, one 64-byte line). A slot
//! holds one recipient as a 32-bit tag (bits of its keyed hash that do not choose the
//! bucket), its admitted messages in the current and the previous tumbling window, and
//! whether it was *attempted* (throttled or refused) in either. The sliding-window count
//! weighs the previous window by the part of it still inside the sliding window, as the
//! count-min sketch it replaces did.
//!
//! Why a tagged table and not a count-min sketch: a count-min sketch never under-counts,
//! so its error is all on the side of throttling, and that error grows with the sender's
//! volume (at 1,000 new numbers a second, 1,024 counters per row hold ten each, and a
//! fresh number looks as if it had had its five). Here a recipient is counted only in
//! its own slot, so:
//!
//! - a number with no slot has count 0 and is never throttled, whatever the volume;
//! - a number is throttled only if its own slot says it had its quota, or if its tag
//!   equals, in the same bucket, the tag of another number that had its quota: at most
//!   `BUCKET / 2^32` (2 in a billion) per message, independent of the sender's volume;
//! - when a bucket is full, the oldest of its slots with the fewest admitted messages is
//!   reused (a bucket keeps its slots newest first): that recipient is then
//!   under-counted, so errors fall on the side of admitting a message, never on
//!   throttling one. A number sent to again and again keeps its slot (its count is above
//!   the many 1s of a large sender's fresh numbers), so a business hammering one
//!   recipient is still held to the limit while it spreads traffic over many others.
//!
//! The same table says whether a message is a *first attempt* in the window: a retry of
//! a throttled message, or another message to a number already messaged in the window,
//! finds the slot and is not a new recipient for the fan-out count (see `fanout`). An
//! attempt mark weighs as one message when a slot is chosen for reuse, and never takes
//! the slot of a recipient with two or more. A slot also remembers whether this shard
//! counted the recipient's first attempt, and when, so that a peer shard's event for the
//! same first attempt (a client resending on another connection before the shards
//! exchanged) takes the double count back.

/// Slots per bucket: 8 slots of 8 bytes are one cache line.
pub(crate) const BUCKET: usize = 8;

const COUNT_CUR_SHIFT: u32 = 32;
const COUNT_PREV_SHIFT: u32 = 40;
const TRIED_CUR: u64 = 1 << 48;
const TRIED_PREV: u64 = 1 << 49;
/// This shard counted the recipient's first attempt for fan-out, in fan-out tick
/// `COUNTED_TICK` (mod 2^12), as never contacted if `COUNTED_NEW`: so that a peer's
/// event saying it counted the same recipient too can take one of the two counts back.
const COUNTED: u64 = 1 << 50;
const COUNTED_NEW: u64 = 1 << 51;
const COUNTED_TICK_SHIFT: u32 = 52;
/// Ticks are kept mod 2^12 (409.6 s of 100 ms ticks): far more than the one second a
/// count stays in the fan-out window.
pub(crate) const COUNTED_TICK_MOD: u64 = 1 << 12;
/// Everything but the tag and the counted marks: a slot is free when these are zero.
const STATE_MASK: u64 = 0x0003_ffff_0000_0000;
const _: () = assert!(STATE_MASK == (0xffff << 32) | TRIED_CUR | TRIED_PREV);
const _: () = assert!(COUNTED_TICK_SHIFT + 12 == 64);

/// The slot of a recipient found in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot(usize);

pub(crate) struct RecentRecipients {
    /// `BUCKET` slots per bucket, newest first, bucket after bucket: `tag | cur << 32 |
    /// prev << 40 | tried flags << 48 | counted mark << 50 | counted tick << 52`.
    pub(crate) slots: Vec<u64>,
    pub(crate) window: u64,
    window_ms: u64,
    start_ms: u64,
    end_ms: u64,
}

impl RecentRecipients {
    pub(crate) fn new(entries: usize, window_ms: u32) -> RecentRecipients {
        assert!(
            entries.is_power_of_two() && entries >= BUCKET,
            "{entries} slots"
        );
        assert!(window_ms > 0);
        let window_ms = u64::from(window_ms);
        RecentRecipients {
            slots: vec![0; entries],
            window: 0,
            window_ms,
            start_ms: 0,
            end_ms: window_ms,
        }
    }

    /// Bytes a table of `entries` slots holds on the heap.
    pub(crate) const fn heap_bytes_for(entries: usize) -> usize {
        entries * 8
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 8
    }

    /// Sets the window number (from a checkpoint) without touching the slots. False, and
    /// nothing changed, when the window would end past `u64::MAX` ms: only a damaged
    /// checkpoint names such a window (fuzzing found the overflow,
    /// `fuzz/regressions/checkpoint/`).
    #[must_use]
    pub(crate) fn set_window(&mut self, window: u64) -> bool {
        let Some(start_ms) = window.checked_mul(self.window_ms) else {
            return false;
        };
        let Some(end_ms) = start_ms.checked_add(self.window_ms) else {
            return false;
        };
        self.window = window;
        self.start_ms = start_ms;
        self.end_ms = end_ms;
        true
    }

    /// The first slot of `h`'s bucket and its tag.
    #[inline]
    fn bucket(&self, h: u64) -> (usize, u32) {
        let buckets = self.slots.len() / BUCKET;
        let x = h.rotate_left(23).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = (x >> 40) as usize & (buckets - 1);
        // The tag is the low half of the hash: the bucket came from mixing all of it.
        (b * BUCKET, h as u32)
    }

    /// Moves to the tumbling window holding `now_ms`. Divides only when the window
    /// changes: the hot path compares against the cached bounds.
    #[inline]
    pub(crate) fn advance(&mut self, now_ms: u64) {
        if now_ms < self.end_ms {
            return; // same window, or a peer's late event: counted in the current one
        }
        let window = now_ms / self.window_ms;
        if window == self.window + 1 {
            for s in &mut self.slots {
                *s = shifted(*s);
            }
        } else {
            self.slots.fill(0);
        }
        let moved = self.set_window(window);
        debug_assert!(moved, "a window of a clock's time fits u64");
    }

    /// Which of the two windows `t` falls in: `Some(false)` the current one,
    /// `Some(true)` the previous one (a peer's event sent just before the window turned
    /// here), `None` neither.
    pub(crate) fn window_of(&self, t: u64) -> Option<bool> {
        if (self.start_ms..self.end_ms).contains(&t) {
            Some(false)
        } else if (self.start_ms.saturating_sub(self.window_ms)..self.start_ms).contains(&t) {
            Some(true)
        } else {
            None
        }
    }

    /// A peer's event for `h` from the previous window: its admitted message counts in
    /// the previous window's count, its attempt as tried there.
    pub(crate) fn record_previous(&mut self, h: u64, admitted: bool) {
        let slot = self.find(h);
        let i = match slot {
            Some(Slot(i)) => i,
            None => self.claim(h, if admitted { u64::MAX } else { 1 }),
        };
        if i == usize::MAX {
            return;
        }
        let s = self.slots[i];
        self.slots[i] = if admitted {
            let prev = ((s >> COUNT_PREV_SHIFT) & 0xff).saturating_add(1).min(0xff);
            (s & !(0xff << COUNT_PREV_SHIFT)) | (prev << COUNT_PREV_SHIFT)
        } else {
            s | TRIED_PREV
        };
    }

    /// Loads the line a lookup of `h` reads (see `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64) -> u64 {
        let (first, _) = self.bucket(h);
        self.slots[first]
    }

    /// The slot of `h`: some when `h` was admitted or attempted in the current or the
    /// previous window (or, 2 in a billion, another recipient with the same tag was).
    #[inline]
    pub(crate) fn find(&self, h: u64) -> Option<Slot> {
        let (first, tag) = self.bucket(h);
        self.slots[first..first + BUCKET]
            .iter()
            .position(|&s| s & STATE_MASK != 0 && s as u32 == tag)
            .map(|i| Slot(first + i))
    }

    /// Whether the sliding-window count of the recipient in `slot` is at least `max`:
    /// its current window plus the part of the previous one still inside the sliding
    /// window (rounded up), without a division.
    #[inline]
    pub(crate) fn at_limit(&self, slot: Slot, now_ms: u64, max: u32) -> bool {
        let s = self.slots[slot.0];
        let cur = (s >> COUNT_CUR_SHIFT) & 0xff;
        let max = u64::from(max);
        if cur >= max {
            return true;
        }
        let prev = (s >> COUNT_PREV_SHIFT) & 0xff;
        // ceil(prev * left / W) >= max - cur  <=>  prev * left > (max - cur - 1) * W,
        // in u128: a restored window may end far ahead of the clock (a checkpoint from a
        // clock that ran ahead), and its products must not overflow (fuzz finding 10).
        let left = u128::from(self.end_ms.saturating_sub(now_ms));
        u128::from(prev) * left > u128::from(max - cur - 1) * u128::from(self.window_ms)
    }

    /// Sliding-window count of `h` (tests: the reference `at_limit` agrees with).
    #[cfg(test)]
    pub(crate) fn estimate(&self, h: u64, now_ms: u64) -> u32 {
        let Some(Slot(i)) = self.find(h) else {
            return 0;
        };
        let s = self.slots[i];
        let cur = (s >> COUNT_CUR_SHIFT) & 0xff;
        let prev = (s >> COUNT_PREV_SHIFT) & 0xff;
        let left = self.end_ms - now_ms;
        (cur + (prev * left).div_ceil(self.window_ms)) as u32
    }

    /// Milliseconds until the current window ends.
    pub(crate) fn retry_ms(&self, now_ms: u64) -> u32 {
        (self.end_ms - now_ms).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// Counts one admitted message to `h` (found at `slot`, if it was); returns its slot.
    #[inline]
    pub(crate) fn admit(&mut self, h: u64, slot: Option<Slot>) -> Option<Slot> {
        let i = match slot {
            Some(Slot(i)) => i,
            None => self.claim(h, u64::MAX),
        };
        debug_assert!(i != usize::MAX, "an admitted message always gets a slot");
        let s = self.slots[i];
        let cur = ((s >> COUNT_CUR_SHIFT) & 0xff).saturating_add(1).min(0xff);
        self.slots[i] = (s & !(0xff << COUNT_CUR_SHIFT)) | (cur << COUNT_CUR_SHIFT);
        debug_assert!(self.slots[i] & STATE_MASK != 0);
        Some(Slot(i))
    }

    /// Marks `h` as attempted in this window (throttled or refused), so that its retry
    /// is known as one. Takes a free slot, else the oldest holding at most one admitted
    /// message: knowing a retry (or else counting it as a new recipient) matters more
    /// than one message of a recipient's quota (losing it can only admit one more
    /// message later); a recipient with more keeps its slot. Returns its slot, if it got
    /// one.
    #[inline]
    pub(crate) fn attempt(&mut self, h: u64, slot: Option<Slot>) -> Option<Slot> {
        let i = match slot {
            Some(Slot(i)) => i,
            None => self.claim(h, 1),
        };
        if i == usize::MAX {
            return None;
        }
        self.slots[i] |= TRIED_CUR;
        Some(Slot(i))
    }

    /// Notes that this shard counted the first attempt to the recipient in `slot` for
    /// fan-out, in fan-out tick `tick`, as never contacted if `new`.
    #[inline]
    pub(crate) fn mark_counted(&mut self, slot: Slot, tick: u64, new: bool) {
        let s = self.slots[slot.0] & !(COUNTED | COUNTED_NEW | (0xfff << COUNTED_TICK_SHIFT));
        self.slots[slot.0] = s
            | COUNTED
            | if new { COUNTED_NEW } else { 0 }
            | ((tick % COUNTED_TICK_MOD) << COUNTED_TICK_SHIFT);
    }

    /// If this shard counted `h`'s first attempt (and has not given the count back),
    /// clears the mark and returns the tick (mod [`COUNTED_TICK_MOD`]) and whether it
    /// was counted as never contacted.
    pub(crate) fn take_counted(&mut self, h: u64) -> Option<(u64, bool)> {
        let Slot(i) = self.find(h)?;
        let s = self.slots[i];
        if s & COUNTED == 0 {
            return None;
        }
        self.slots[i] = s & !(COUNTED | COUNTED_NEW | (0xfff << COUNTED_TICK_SHIFT));
        Some((s >> COUNTED_TICK_SHIFT, s & COUNTED_NEW != 0))
    }

    /// A slot for `h`, tagged and empty, at the front of its bucket: a bucket keeps its
    /// slots newest first, so that among slots of equal weight the oldest is reused (a
    /// number messaged once survives the next `BUCKET` newcomers to its bucket, time for
    /// a second message to make it outweigh them). Reuses a free slot, else the oldest of
    /// those with the fewest admitted messages if that is at most `weight_max`;
    /// `usize::MAX` if none qualifies.
    fn claim(&mut self, h: u64, weight_max: u64) -> usize {
        let (first, tag) = self.bucket(h);
        let mut victim = usize::MAX;
        let mut victim_weight = u64::MAX;
        for i in first..first + BUCKET {
            let s = self.slots[i];
            if s & STATE_MASK == 0 {
                victim = i;
                victim_weight = 0;
                break;
            }
            let w = weight(s);
            if w <= victim_weight {
                victim_weight = w;
                victim = i;
            }
        }
        debug_assert!(victim != usize::MAX, "a bucket has slots");
        if victim_weight > weight_max {
            return usize::MAX;
        }
        // Newest first: the slots before the victim move one down (at most 7 words of one
        // line; a plain loop, not a call to memmove).
        for i in (first + 1..=victim).rev() {
            self.slots[i] = self.slots[i - 1];
        }
        self.slots[first] = u64::from(tag);
        first
    }
}

/// What a reuse of the slot loses: its admitted messages, both windows; a recipient only
/// attempted weighs as one message (a retry still to come is worth as much as one
/// message of a quota, so the older of the two goes).
#[inline]
fn weight(s: u64) -> u64 {
    let messages = ((s >> COUNT_CUR_SHIFT) & 0xff) + ((s >> COUNT_PREV_SHIFT) & 0xff);
    messages.max(u64::from(s & (TRIED_CUR | TRIED_PREV) != 0))
}

/// A slot one window later: current becomes previous; free if nothing is left. The
/// counted mark stays: a count made just before the window turned is still in the
/// fan-out second, and a peer's event about it may arrive just after.
#[inline]
fn shifted(s: u64) -> u64 {
    let cur = (s >> COUNT_CUR_SHIFT) & 0xff;
    let tried = s & TRIED_CUR != 0;
    if cur == 0 && !tried {
        return 0;
    }
    let counted = s & (COUNTED | COUNTED_NEW | (0xfff << COUNTED_TICK_SHIFT));
    (s & 0xffff_ffff) | (cur << COUNT_PREV_SHIFT) | if tried { TRIED_PREV } else { 0 } | counted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        super::super::keyed::siphash24(3, 4, &i.to_le_bytes())
    }

    #[test]
    fn counts_slide_and_agree_with_the_estimate() {
        let mut c = RecentRecipients::new(512, 1000);
        c.advance(5_000);
        for _ in 0..4 {
            let s = c.find(h(1));
            c.admit(h(1), s);
        }
        assert_eq!(c.estimate(h(1), 5_000), 4);
        c.advance(6_500);
        assert_eq!(c.estimate(h(1), 6_500), 2, "half of the previous window");
        let slot = c.find(h(1)).expect("kept one window on");
        for (now, max) in [(6_500, 2), (6_500, 3), (6_000, 4), (6_001, 4), (6_999, 1)] {
            assert_eq!(
                c.at_limit(slot, now, max),
                c.estimate(h(1), now) >= max,
                "{now} {max}"
            );
        }
        c.advance(7_000);
        assert_eq!(c.find(h(1)), None, "two windows on, it is forgotten");
        c.advance(9_500);
        assert_eq!(c.estimate(h(1), 9_500), 0);
    }

    /// Issue 14: a count-min sketch of 1,024 counters a row throttled fresh numbers of a
    /// sender of 1,000 new numbers a second. No volume makes a fresh number look used.
    #[test]
    fn a_fresh_number_is_never_at_its_limit_however_many_were_sent() {
        let mut c = RecentRecipients::new(512, 10_000);
        c.advance(0);
        // 100,000 distinct numbers in one window: 200 times the table.
        for i in 0..100_000 {
            let s = c.find(h(i));
            c.admit(h(i), s);
        }
        let limited = (1_000_000..1_100_000u64)
            .filter(|&i| c.find(h(i)).is_some_and(|s| c.at_limit(s, 5_000, 1)))
            .count();
        assert_eq!(limited, 0);
    }

    #[test]
    fn a_hammered_number_keeps_its_slot_among_a_flood_of_fresh_ones() {
        let mut c = RecentRecipients::new(512, 10_000);
        c.advance(0);
        let target = h(7);
        let mut limited_at = None;
        let mut fresh = 1_000_000;
        for k in 0..20u64 {
            let s = c.find(target);
            if s.is_some_and(|s| c.at_limit(s, 10, 5)) {
                limited_at = Some(k);
                break;
            }
            c.admit(target, s);
            // Fresh numbers between two messages to the target: 100 (a fifth of the
            // table) before its second, a thousand (twice the table) after: from its
            // second message on it outweighs them.
            for _ in 0..if k == 0 { 100 } else { 1_000 } {
                let s = c.find(h(fresh));
                c.admit(h(fresh), s);
                fresh += 1;
            }
        }
        assert_eq!(limited_at, Some(5), "the sixth message is held back");
    }

    #[test]
    fn a_bucket_reuses_its_oldest_slot_of_the_least_weight() {
        let mut c = RecentRecipients::new(8, 10_000);
        c.advance(0);
        // Ten numbers into one bucket of 8: the first two are gone, the last 8 stay.
        for i in 0..10 {
            c.admit(h(i), None);
        }
        assert!(c.find(h(0)).is_none() && c.find(h(1)).is_none());
        assert!((2..10).all(|i| c.find(h(i)).is_some()));
        // Number 2 gets a second message: it now outlives any number of newcomers.
        let s = c.find(h(2));
        c.admit(h(2), s);
        for i in 100..200 {
            c.admit(h(i), None);
        }
        assert!(c.find(h(2)).is_some());
        assert!((3..10).all(|i| c.find(h(i)).is_none()));
    }

    #[test]
    fn attempts_are_remembered_but_never_displace_recipients_with_two_messages() {
        let mut c = RecentRecipients::new(64, 10_000);
        c.advance(0);
        // Fill every slot with a recipient of two messages.
        let mut i = 0u64;
        while c.slots.iter().any(|s| s & STATE_MASK == 0) {
            let s = c.admit(h(i), None);
            c.admit(h(i), s);
            i += 1;
        }
        assert!(c.slots.iter().all(|s| weight(*s) == 2));
        let before = c.slots.clone();
        for k in 0..1_000 {
            c.attempt(h(5_000_000 + k), None);
        }
        assert_eq!(
            c.slots, before,
            "attempt marks take no slot of two messages"
        );
        // In a table with room they are kept, and found by a retry.
        let mut d = RecentRecipients::new(64, 10_000);
        d.advance(0);
        d.attempt(h(9), None);
        let s = d.find(h(9)).expect("the retry is recognised");
        assert!(
            !d.at_limit(s, 1, 1),
            "an attempt is not an admitted message"
        );
        d.advance(10_000);
        assert!(d.find(h(9)).is_some(), "kept one window on");
        d.advance(20_000);
        assert!(d.find(h(9)).is_none());
    }
}
