//! Two small sketches keyed by the recipient hash: a filter of past recipients and a
//! count-min sketch of messages per recipient in a sliding window.

/// Recipients contacted before: a two-generation blocked Bloom filter.
///
/// Each generation is `bytes / 2` of bits in 64-byte blocks; a hash picks one block and
/// sets 3 bits in it (one cache line per lookup). A generation is retired after taking
/// `bits / 8` new recipients, which keeps its false-positive rate near 3 %; lookups ask
/// both generations, so "contacted" means "among roughly the last `bits / 4` distinct
/// recipients". False positives make a new recipient look old: the fan-out detector then
/// sees a surge a little smaller than it is, never a larger one.
pub(crate) struct PastFilter {
    pub(crate) cur: Vec<u64>,
    pub(crate) old: Vec<u64>,
    pub(crate) cur_items: u32,
}

const BLOCK_WORDS: usize = 8;

impl PastFilter {
    pub(crate) fn new(bytes: usize) -> PastFilter {
        let words = bytes / 2 / 8;
        assert!(words >= BLOCK_WORDS && words.is_power_of_two());
        PastFilter {
            cur: vec![0; words],
            old: vec![0; words],
            cur_items: 0,
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        (self.cur.capacity() + self.old.capacity()) * 8
    }

    #[inline]
    fn probe(words: usize, h: u64) -> (usize, [u64; 3], [usize; 3]) {
        let blocks = words / BLOCK_WORDS;
        let b = (h as usize) & (blocks - 1);
        let mut bits = [0u64; 3];
        let mut idx = [0usize; 3];
        for i in 0..3 {
            let bit = (h >> (32 + 9 * i)) as usize & 511;
            idx[i] = b * BLOCK_WORDS + bit / 64;
            bits[i] = 1u64 << (bit % 64);
        }
        (b, bits, idx)
    }

    #[inline]
    fn has(v: &[u64], idx: &[usize; 3], bits: &[u64; 3]) -> bool {
        (0..3).all(|i| v[idx[i]] & bits[i] != 0)
    }

    /// Loads the words a lookup of `h` reads, so their cache misses overlap with the
    /// other sketches' (see `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64) -> u64 {
        let (_, _, idx) = Self::probe(self.cur.len(), h);
        self.cur[idx[0]] ^ self.old[idx[0]]
    }

    #[inline]
    pub(crate) fn contains(&self, h: u64) -> bool {
        let (_, bits, idx) = Self::probe(self.cur.len(), h);
        Self::has(&self.cur, &idx, &bits) || Self::has(&self.old, &idx, &bits)
    }

    #[inline]
    pub(crate) fn insert(&mut self, h: u64) {
        let (_, bits, idx) = Self::probe(self.cur.len(), h);
        if Self::has(&self.cur, &idx, &bits) {
            return;
        }
        for i in 0..3 {
            self.cur[idx[i]] |= bits[i];
        }
        self.cur_items += 1;
        if self.cur_items as usize >= self.cur.len() * 64 / 8 {
            std::mem::swap(&mut self.cur, &mut self.old);
            self.cur.fill(0);
            self.cur_items = 0;
        }
    }
}

/// Messages per recipient in a sliding window: count-min sketches (2 rows of `width`
/// saturating `u8` counters, conservative update) for the current and the previous
/// tumbling window; the estimate weighs the previous one by the part of it still inside
/// the sliding window.
///
/// A count-min sketch never under-counts; it over-counts a recipient by the traffic that
/// collides with it in both rows, which stays below 1 while a business sends fewer than
/// `width` messages per window (e.g. 80 msg/s × 10 s = 800 < 1,024). Past that a
/// high-volume business may be throttled early on a recipient: size
/// `same_recipient_sketch_width` to the largest `mps × window`.
pub(crate) struct RecipientCounts {
    /// `(current, previous)` counter pairs, row 0 then row 1: one cache line serves
    /// both windows of a cell.
    pub(crate) cells: Vec<[u8; 2]>,
    pub(crate) window: u64,
    window_ms: u64,
    start_ms: u64,
    end_ms: u64,
}

impl RecipientCounts {
    pub(crate) fn new(width: usize, window_ms: u32) -> RecipientCounts {
        assert!(width.is_power_of_two() && window_ms > 0);
        let window_ms = u64::from(window_ms);
        RecipientCounts {
            cells: vec![[0, 0]; 2 * width],
            window: 0,
            window_ms,
            start_ms: 0,
            end_ms: window_ms,
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.cells.capacity() * 2
    }

    /// Sets the window number (from a checkpoint) without touching the counters.
    pub(crate) fn set_window(&mut self, window: u64) {
        self.window = window;
        self.start_ms = window * self.window_ms;
        self.end_ms = self.start_ms + self.window_ms;
    }

    #[inline]
    fn index(&self, h: u64) -> (usize, usize) {
        let w = self.cells.len() / 2;
        let x = h.rotate_left(23).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let a = (x >> 40) as usize & (w - 1);
        let b = w + ((x >> 12) as usize & (w - 1));
        (a, b)
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
            for c in &mut self.cells {
                *c = [0, c[0]];
            }
        } else {
            self.cells.fill([0, 0]);
        }
        self.set_window(window);
    }

    /// True when `t` falls in the current window.
    pub(crate) fn in_window(&self, t: u64) -> bool {
        (self.start_ms..self.end_ms).contains(&t)
    }

    /// Loads both cells of `h` (see `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64) -> u64 {
        let (a, b) = self.index(h);
        u64::from(self.cells[a][0] ^ self.cells[b][1])
    }

    /// Count in the current window only.
    #[inline]
    pub(crate) fn current(&self, h: u64) -> u32 {
        let (a, b) = self.index(h);
        u32::from(self.cells[a][0].min(self.cells[b][0]))
    }

    /// Sliding-window estimate at `now_ms`: the current window plus the part of the
    /// previous one still inside the sliding window (rounded up).
    #[cfg(test)]
    pub(crate) fn estimate(&self, h: u64, now_ms: u64) -> u32 {
        let (a, b) = self.index(h);
        let cur = u64::from(self.cells[a][0].min(self.cells[b][0]));
        let prev = u64::from(self.cells[a][1].min(self.cells[b][1]));
        let left = self.end_ms - now_ms;
        (cur + (prev * left).div_ceil(self.window_ms)) as u32
    }

    /// `estimate(h, now_ms) >= max`, without a division.
    #[inline]
    pub(crate) fn at_limit(&self, h: u64, now_ms: u64, max: u32) -> bool {
        let (a, b) = self.index(h);
        let cur = u64::from(self.cells[a][0].min(self.cells[b][0]));
        let max = u64::from(max);
        if cur >= max {
            return true;
        }
        let prev = u64::from(self.cells[a][1].min(self.cells[b][1]));
        // ceil(prev * left / W) >= max - cur  <=>  prev * left > (max - cur - 1) * W
        prev * (self.end_ms - now_ms) > (max - cur - 1) * self.window_ms
    }

    /// Milliseconds until the current window ends.
    pub(crate) fn retry_ms(&self, now_ms: u64) -> u32 {
        (self.end_ms - now_ms).clamp(1, u64::from(u32::MAX)) as u32
    }

    #[inline]
    pub(crate) fn increment(&mut self, h: u64) {
        let (a, b) = self.index(h);
        let m = self.cells[a][0].min(self.cells[b][0]).saturating_add(1);
        // Conservative update: raise only the counters below the new minimum.
        self.cells[a][0] = self.cells[a][0].max(m);
        self.cells[b][0] = self.cells[b][0].max(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        super::super::keyed::siphash24(3, 4, &i.to_le_bytes())
    }

    #[test]
    fn filter_remembers_recent_recipients_with_few_false_positives() {
        let mut f = PastFilter::new(8192);
        for i in 0..4000 {
            f.insert(h(i));
        }
        assert!((0..4000).all(|i| f.contains(h(i))), "no false negatives");
        let fp = (1_000_000..1_010_000).filter(|&i| f.contains(h(i))).count();
        assert!(fp < 600, "false positives {fp} / 10000");
        // Far more recipients than it holds: the oldest are forgotten.
        for i in 10_000..30_000 {
            f.insert(h(i));
        }
        let remembered = (0..4000).filter(|&i| f.contains(h(i))).count();
        assert!(remembered < 1000, "{remembered}");
    }

    #[test]
    fn counts_slide_and_never_undercount() {
        let mut c = RecipientCounts::new(1024, 1000);
        c.advance(5_000);
        for _ in 0..4 {
            c.increment(h(1));
        }
        for i in 100..900 {
            c.increment(h(i));
        }
        assert!(c.estimate(h(1), 5_000) >= 4);
        assert!(c.estimate(h(1), 5_000) <= 5);
        c.advance(6_500);
        assert_eq!(c.current(h(1)), 0);
        assert_eq!(c.estimate(h(1), 6_500), 2, "half of the previous window");
        for (now, max) in [(6_500, 2), (6_500, 3), (6_000, 4), (6_001, 4), (6_999, 1)] {
            assert_eq!(
                c.at_limit(h(1), now, max),
                c.estimate(h(1), now) >= max,
                "{now} {max}"
            );
        }
        c.advance(8_000);
        assert_eq!(c.estimate(h(1), 8_000), 0);
    }
}
