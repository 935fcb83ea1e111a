//! Unique recipients in a rolling 24 hours: exact below a threshold, HyperLogLog above.
//!
//! Every recipient is a 32-bit `tag` (the high half of its keyed hash) seen in some hour
//! (`now_ms / 3_600_000`). The window is the current hour and the 23 before it.
//!
//! - **Exact** while at most `exact_max` distinct tags are in the window: an
//!   open-addressing table of tags with the hour (mod 24) each was last seen. Counting and
//!   membership are exact up to 32-bit tag collisions (for 2,000 recipients the chance of
//!   any collision is 2000²/2³³ ≈ 0.05 %). Tiers 250 and 2,000 therefore never leave this
//!   mode under the default `exact_max` (2,048): their limit is enforced exactly.
//! - **Sketch** once the window holds more: the table is converted (each tag into the
//!   sketch of its hour) into a ring of 24 hourly HyperLogLogs of `2^p` one-byte
//!   registers, plus their running union, whose estimate is kept up to date incrementally
//!   (sum of `2^-M[j]` and the count of zero registers) so a lookup costs O(1). Hour
//!   rotation rebuilds the union from the 23 surviving sketches (once per hour).
//!   Standard error of HLL is `1.04 / sqrt(2^p)`: 2.3 % at p = 11 (the default), so the
//!   5 % bound holds at 2.2 σ (≈97 % of the time) for tiers 10,000 and 100,000; small
//!   cardinalities use linear counting, which is tighter. Hashes are 32 bits: fine to
//!   ~10⁸ distinct tags, far above any tier.
//!
//! **Forgetting within a short retention** (issue 19). A tag is 32 bits of a keyed hash
//! of a number: it may not outlive the log's retention. With a retention of 24 h or more
//! the window's own expiry does it. With a shorter one (`detect.recipient_memory_ms`
//! below a day: the short-retention profile) the exact set forgets the tags of every
//! hour that is as old as the retention ([`Recipients::forget_before`]) but keeps *how
//! many* recipients that hour had, per hour, so the tier still counts them for the rest
//! of the 24 h: the limit stays a 24 h limit. What is lost is only membership: a
//! forgotten recipient messaged again at the limit is refused as a new one, and counted
//! again (an over-count: the limit errs on the strict side). When the set turns into
//! the sketch, each forgotten recipient enters its hour's sketch as a stand-in tag (a
//! hash of the hour and an index, no recipient's), so that it still counts. The
//! sketch's registers are kept for their 24 h whatever the retention: a register is
//! the largest rank among the thousands of recipients that fall in it (the sketch mode
//! starts above `exact_max` recipients a day), and names none of them.
//!
//! Sketches are mergeable by register max, so a peer shard's recipients (sent as tags
//! with their hour) fold in the same way as local ones.

/// Hours in the rolling window.
pub(crate) const HOURS: usize = 24;

/// Whether a tag is already counted in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    /// Certainly counted.
    Yes,
    /// Certainly not counted (exact mode) or adding it would raise the estimate.
    No,
    /// The sketch cannot tell (adding it changes no register).
    Maybe,
}

pub(crate) enum Recipients {
    Exact(ExactSet),
    Sketch(Box<HllRing>),
}

impl Recipients {
    pub(crate) fn new(exact_max: usize) -> Recipients {
        Recipients::Exact(ExactSet::new(exact_max))
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Recipients::Exact(e) => e.heap_bytes(),
            Recipients::Sketch(h) => std::mem::size_of::<HllRing>() + h.heap_bytes(),
        }
    }

    pub(crate) fn advance(&mut self, hour: u32) {
        match self {
            Recipients::Exact(e) => e.advance(hour),
            Recipients::Sketch(h) => h.advance(hour),
        }
    }

    /// Forgets the tags of every hour before `hour_min` (keeping how many there were):
    /// see the module docs. Nothing to do in sketch mode, or when those hours are
    /// forgotten already (one comparison: it runs per message under a short retention).
    #[inline]
    pub(crate) fn forget_before(&mut self, hour_min: u32) {
        if let Recipients::Exact(e) = self {
            if hour_min > e.forgotten_below {
                e.forget_before(hour_min);
            }
        }
    }

    /// Distinct tags in the window (estimated in sketch mode).
    #[inline]
    pub(crate) fn count(&self) -> u64 {
        match self {
            Recipients::Exact(e) => e.len as u64 + e.anon_total,
            Recipients::Sketch(h) => h.estimate,
        }
    }

    /// Loads what an insert of `tag` in `hour` reads (see `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, tag: u32, hour: u32) -> u64 {
        match self {
            Recipients::Exact(e) => e.slots[e.start(tag)],
            Recipients::Sketch(h) => {
                let (idx, _) = h.split(tag);
                let s = (hour % HOURS as u32) as usize;
                u64::from(h.union[idx] ^ h.regs[(s << h.p) + idx])
            }
        }
    }

    #[inline]
    pub(crate) fn member(&self, tag: u32) -> Member {
        match self {
            Recipients::Exact(e) => {
                if e.find(tag).is_some() {
                    Member::Yes
                } else {
                    Member::No
                }
            }
            Recipients::Sketch(h) => {
                if h.would_raise(tag) {
                    Member::No
                } else {
                    Member::Maybe
                }
            }
        }
    }

    /// Counts `tag` as seen in `hour`; converts to the sketch when the table is full.
    #[inline]
    pub(crate) fn insert(&mut self, tag: u32, hour: u32, precision: u8) {
        match self {
            Recipients::Exact(e) => {
                if e.insert(tag, hour) {
                    return;
                }
                let mut ring = Box::new(HllRing::new(precision));
                ring.advance(e.latest_hour);
                for (t, h) in e.entries() {
                    ring.insert(t, h);
                }
                for (t, h) in e.stand_ins() {
                    ring.insert(t, h);
                }
                ring.insert(tag, hour);
                *self = Recipients::Sketch(ring);
            }
            Recipients::Sketch(h) => h.insert(tag, hour),
        }
    }
}

/// Exact set of tags with the hour (mod 24) each was last seen, packed one per `u64`
/// (`present << 63 | tag << 8 | hour slot`; 0 is empty) so a probe touches one cache
/// line.
pub(crate) struct ExactSet {
    slots: Vec<u64>,
    pub(crate) len: usize,
    max: usize,
    pub(crate) latest_hour: u32,
    /// Tags of hours before this one are not kept (a short retention passed them).
    pub(crate) forgotten_below: u32,
    /// Recipients of the window whose tags were forgotten, per hour slot (boxed: most
    /// profiles never use it, and the enum holding this set stays small).
    pub(crate) anon: Box<AnonHours>,
    /// Sum of `anon.count` over the window.
    anon_total: u64,
}

/// Per hour slot: the absolute hour (`u32::MAX`: none) and how many recipients of it were
/// counted without their tags (at most the set's `max` an hour).
pub(crate) struct AnonHours {
    pub(crate) hour: [u32; HOURS],
    pub(crate) count: [u32; HOURS],
}

const PRESENT: u64 = 1 << 63;

impl ExactSet {
    pub(crate) fn new(max: usize) -> ExactSet {
        let cap = (max * 2).next_power_of_two();
        ExactSet {
            slots: vec![0; cap],
            len: 0,
            max,
            latest_hour: 0,
            forgotten_below: 0,
            anon: Box::new(AnonHours {
                hour: [u32::MAX; HOURS],
                count: [0; HOURS],
            }),
            anon_total: 0,
        }
    }

    /// Counts one recipient of `hour` whose tag is not kept.
    fn count_anon(&mut self, hour: u32) {
        if u64::from(hour) + HOURS as u64 <= u64::from(self.latest_hour) {
            return;
        }
        let s = (hour % HOURS as u32) as usize;
        if self.anon.hour[s] != hour {
            if self.anon.hour[s] != u32::MAX && self.anon.hour[s] > hour {
                return; // the slot holds a later hour: this one left the window
            }
            self.anon_total -= u64::from(self.anon.count[s]);
            self.anon.hour[s] = hour;
            self.anon.count[s] = 0;
        }
        if (self.anon.count[s] as usize) < self.max {
            self.anon.count[s] += 1;
            self.anon_total += 1;
        }
    }

    /// Moves the tags of every hour before `hour_min` to the anonymous counts.
    fn forget_before(&mut self, hour_min: u32) {
        self.forgotten_below = hour_min;
        let old: Vec<(u32, u32)> = self.entries().collect();
        self.slots.fill(0);
        self.len = 0;
        for (t, h) in old {
            if h < hour_min {
                self.count_anon(h);
            } else {
                let ok = self.insert(t, h);
                debug_assert!(ok, "reinserting fewer tags than before");
            }
        }
    }

    /// Stand-in tags for the anonymous counts, each with its hour: a hash of the hour and
    /// an index, the same for the same counts (no recipient's).
    fn stand_ins(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..HOURS)
            .filter(|&s| self.anon.hour[s] != u32::MAX)
            .flat_map(move |s| {
                let hour = self.anon.hour[s];
                (0..self.anon.count[s]).map(move |i| {
                    // splitmix64's finalizer: distinct inputs give well-spread tags.
                    let mut x =
                        (u64::from(hour) << 32 | u64::from(i)).wrapping_add(0x9e37_79b9_7f4a_7c15);
                    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    (((x ^ (x >> 31)) >> 32) as u32, hour)
                })
            })
    }

    /// Restores the anonymous counts (after the tags); false if one is out of range.
    #[must_use]
    pub(crate) fn restore_anon(&mut self, forgotten_below: u32, slots: &[(u32, u32)]) -> bool {
        self.forgotten_below = forgotten_below;
        for (s, &(hour, count)) in slots.iter().enumerate() {
            let empty = hour == u32::MAX;
            if (empty && count != 0)
                || (!empty && (hour % HOURS as u32) as usize != s)
                || count as usize > self.max
            {
                return false;
            }
            self.anon.hour[s] = hour;
            self.anon.count[s] = count;
        }
        self.sum_anon();
        true
    }

    /// Drops anonymous counts that left the window and sums the rest.
    fn sum_anon(&mut self) {
        let mut total = 0;
        for s in 0..HOURS {
            let h = self.anon.hour[s];
            if h != u32::MAX && u64::from(h) + HOURS as u64 <= u64::from(self.latest_hour) {
                self.anon.hour[s] = u32::MAX;
                self.anon.count[s] = 0;
            }
            total += u64::from(self.anon.count[s]);
        }
        self.anon_total = total;
    }

    /// Bytes a set for `max` tags holds on the heap.
    pub(crate) fn heap_bytes_for(max: usize) -> usize {
        (max * 2).next_power_of_two() * 8 + std::mem::size_of::<AnonHours>()
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 8 + std::mem::size_of::<AnonHours>()
    }

    #[inline]
    fn start(&self, tag: u32) -> usize {
        (tag.wrapping_mul(0x9e37_79b9) >> 7) as usize & (self.slots.len() - 1)
    }

    #[inline]
    fn find(&self, tag: u32) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        // Load stays <= 1/2, so a probe run ends at an empty slot.
        loop {
            let e = self.slots[i];
            if e == 0 {
                return None;
            }
            if (e >> 8) as u32 == tag {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn age(&self, slot: u8) -> u32 {
        (self.latest_hour % HOURS as u32 + HOURS as u32 - u32::from(slot)) % HOURS as u32
    }

    /// Records `tag` in `hour`. False when it is new and the set is full.
    #[inline]
    fn insert(&mut self, tag: u32, hour: u32) -> bool {
        // In u64 here and in `advance`: a checkpoint may name hours near u32::MAX
        // (fuzzing found the overflow, `fuzz/regressions/checkpoint/`; saturating instead
        // expired the last 24 hours before u32::MAX, which fuzzing found too).
        if u64::from(hour) + HOURS as u64 <= u64::from(self.latest_hour) {
            return true; // older than the window: counts for nothing
        }
        if hour > self.latest_hour {
            self.advance(hour);
        }
        if hour < self.forgotten_below {
            // A peer's event from an hour whose tags are forgotten here: counted only.
            self.count_anon(hour);
            return true;
        }
        let slot = (hour % HOURS as u32) as u8;
        let age_new = self.latest_hour - hour;
        let entry = PRESENT | (u64::from(tag) << 8) | u64::from(slot);
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        loop {
            let e = self.slots[i];
            if e == 0 {
                if self.len >= self.max {
                    return false;
                }
                self.slots[i] = entry;
                self.len += 1;
                return true;
            }
            if (e >> 8) as u32 == tag {
                if age_new < self.age(e as u8) {
                    self.slots[i] = entry;
                }
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    /// Moves the window to end at `hour`, dropping tags last seen 24 or more hours ago.
    fn advance(&mut self, hour: u32) {
        if hour <= self.latest_hour {
            return;
        }
        let old: Vec<(u32, u32)> = self.entries().collect();
        self.latest_hour = hour;
        self.slots.fill(0);
        self.len = 0;
        for (t, h) in old {
            if u64::from(h) + HOURS as u64 > u64::from(hour) {
                let ok = self.insert(t, h);
                debug_assert!(ok, "reinserting fewer tags than before");
            }
        }
        self.sum_anon();
    }

    /// Every (tag, absolute hour last seen).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.slots.iter().filter(|e| **e != 0).map(|e| {
            (
                (e >> 8) as u32,
                self.latest_hour.saturating_sub(self.age(*e as u8)),
            )
        })
    }

    pub(crate) fn restore(max: usize, latest_hour: u32, entries: &[(u32, u32)]) -> ExactSet {
        let mut e = ExactSet::new(max);
        e.latest_hour = latest_hour;
        for &(t, h) in entries {
            e.insert(t, h);
        }
        e
    }
}

/// A ring of 24 hourly HyperLogLogs and their union.
pub(crate) struct HllRing {
    pub(crate) p: u8,
    /// `HOURS * 2^p` registers, hour slot after hour slot.
    pub(crate) regs: Vec<u8>,
    /// The absolute hour each slot holds; `u32::MAX` when empty.
    pub(crate) slot_hour: [u32; HOURS],
    pub(crate) latest_hour: u32,
    union: Vec<u8>,
    /// Sum of `2^(32 - M[j])` over the union: exact integer arithmetic, so a sketch
    /// rebuilt from a checkpoint estimates exactly what the original did.
    sum: u64,
    zeros: u32,
    estimate: u64,
}

impl HllRing {
    pub(crate) fn new(p: u8) -> HllRing {
        assert!((8..=16).contains(&p), "HLL precision {p} out of range");
        let m = 1usize << p;
        HllRing {
            p,
            regs: vec![0; HOURS * m],
            slot_hour: [u32::MAX; HOURS],
            latest_hour: 0,
            union: vec![0; m],
            sum: (m as u64) << 32,
            zeros: m as u32,
            estimate: 0,
        }
    }

    /// Heap bytes of a ring of precision `p`.
    pub(crate) fn heap_bytes_for(p: u8) -> usize {
        (HOURS + 1) << p
    }

    fn heap_bytes(&self) -> usize {
        self.regs.capacity() + self.union.capacity()
    }

    #[inline]
    fn split(&self, tag: u32) -> (usize, u8) {
        let idx = (tag >> (32 - self.p)) as usize;
        let w = tag << self.p;
        let rank = (w.leading_zeros() + 1).min(32 - u32::from(self.p) + 1) as u8;
        (idx, rank)
    }

    #[inline]
    fn would_raise(&self, tag: u32) -> bool {
        let (idx, rank) = self.split(tag);
        rank > self.union[idx]
    }

    /// `2^-rank` scaled by `2^32`; ranks never exceed `33 - p` <= 25.
    #[inline]
    fn pow2_neg(rank: u8) -> u64 {
        1u64 << (32 - u32::from(rank))
    }

    pub(crate) fn advance(&mut self, hour: u32) {
        if hour <= self.latest_hour {
            return;
        }
        self.latest_hour = hour;
        let m = 1usize << self.p;
        let mut cleared = false;
        for s in 0..HOURS {
            let h = self.slot_hour[s];
            if h != u32::MAX && u64::from(h) + HOURS as u64 <= u64::from(self.latest_hour) {
                self.regs[s * m..(s + 1) * m].fill(0);
                self.slot_hour[s] = u32::MAX;
                cleared = true;
            }
        }
        if cleared {
            self.rebuild_union();
        }
    }

    pub(crate) fn rebuild_union(&mut self) {
        let m = 1usize << self.p;
        self.union.fill(0);
        for s in 0..HOURS {
            if self.slot_hour[s] == u32::MAX {
                continue;
            }
            let regs = &self.regs[s * m..(s + 1) * m];
            for (u, &r) in self.union.iter_mut().zip(regs) {
                *u = (*u).max(r);
            }
        }
        self.sum = self.union.iter().map(|&r| Self::pow2_neg(r)).sum();
        self.zeros = self.union.iter().filter(|&&r| r == 0).count() as u32;
        self.refresh_estimate();
    }

    fn refresh_estimate(&mut self) {
        let m = (1u64 << self.p) as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / (self.sum as f64 / 4_294_967_296.0);
        let e = if raw <= 2.5 * m && self.zeros > 0 {
            m * (m / f64::from(self.zeros)).ln()
        } else {
            raw
        };
        self.estimate = e.round() as u64;
    }

    #[inline]
    pub(crate) fn insert(&mut self, tag: u32, hour: u32) {
        if u64::from(hour) + HOURS as u64 <= u64::from(self.latest_hour) {
            return;
        }
        if hour > self.latest_hour {
            self.advance(hour);
        }
        let s = (hour % HOURS as u32) as usize;
        if self.slot_hour[s] != hour {
            // Expired slots were cleared by advance, so this one is empty.
            debug_assert!(self.slot_hour[s] == u32::MAX);
            self.slot_hour[s] = hour;
        }
        let (idx, rank) = self.split(tag);
        let m = 1usize << self.p;
        let r = &mut self.regs[s * m + idx];
        if rank > *r {
            *r = rank;
        }
        let u = self.union[idx];
        if rank > u {
            self.sum = self.sum + Self::pow2_neg(rank) - Self::pow2_neg(u);
            if u == 0 {
                self.zeros -= 1;
            }
            self.union[idx] = rank;
            self.refresh_estimate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u64) -> u32 {
        (super::super::keyed::siphash24(1, 2, &i.to_le_bytes()) >> 32) as u32
    }

    #[test]
    fn exact_counts_and_expires_after_24_hours() {
        let mut r = Recipients::new(64);
        for i in 0..50 {
            r.insert(tag(i), 100, 11);
        }
        r.insert(tag(0), 110, 11); // refreshed
        assert_eq!(r.count(), 50);
        assert_eq!(r.member(tag(3)), Member::Yes);
        assert_eq!(r.member(tag(999)), Member::No);
        r.advance(123);
        assert_eq!(r.count(), 50);
        r.advance(124);
        assert_eq!(r.count(), 1, "only the refreshed tag survives");
        r.advance(134);
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn sketch_estimate_within_5_percent_over_a_rolling_day() {
        let mut r = Recipients::new(2048);
        // 50,000 distinct per 12 hours, hours 0..36: window always holds ~100k.
        let mut next = 0u64;
        for hour in 0..36u32 {
            for _ in 0..(100_000 / 24) {
                r.insert(tag(next), hour, 11);
                next += 1;
            }
            if hour >= 23 {
                let truth = (100_000 / 24) * 24;
                let est = r.count() as f64;
                let err = (est - truth as f64).abs() / truth as f64;
                assert!(err < 0.05, "hour {hour}: estimate {est} vs {truth}");
            }
        }
        assert!(matches!(r, Recipients::Sketch(_)));
        for n in [3_000u64, 10_000] {
            let mut r = Recipients::new(2048);
            for i in 0..n {
                r.insert(tag(i + 1_000_000), 5, 11);
            }
            let err = (r.count() as f64 - n as f64).abs() / n as f64;
            assert!(err < 0.05, "{n}: {}", r.count());
        }
    }

    #[test]
    fn conversion_keeps_hours() {
        let mut r = Recipients::new(16);
        for i in 0..16 {
            r.insert(tag(i), 10, 11);
        }
        for i in 16..40 {
            r.insert(tag(i), 20, 11);
        }
        assert!(matches!(r, Recipients::Sketch(_)));
        let c = r.count();
        assert!((38..=42).contains(&c), "{c}");
        r.advance(34); // hour 10 leaves the window
        let c = r.count();
        assert!((22..=26).contains(&c), "{c}");
    }
}
