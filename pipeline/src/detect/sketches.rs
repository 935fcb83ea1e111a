//! Two small sketches keyed by the recipient hash: a filter of past recipients and a
//! count-min sketch of messages per recipient in a sliding window.

/// Recipients contacted before: a two-generation blocked Bloom filter.
///
/// Each generation is `bytes / 2` of bits in 256-bit blocks; a hash picks one block and
/// sets 3 bits in it. Block `b` of both generations shares one 64-byte cache line (the
/// current generation in one half, the old one in the other), so a lookup reads one line.
/// A generation is retired after taking `bits / 8` new recipients, which keeps its
/// false-positive rate near 3 %; lookups ask both generations, so "contacted" means
/// "among roughly the last `bits / 4` distinct recipients". False positives make a new
/// recipient look old: the fan-out detector then sees a surge a little smaller than it
/// is, never a larger one.
pub(crate) struct PastFilter {
    /// Line after line: `HALF` words of one generation, then `HALF` of the other.
    words: Vec<u64>,
    /// Which half of every line holds the current generation (0 or 1).
    cur_half: usize,
    pub(crate) cur_items: u32,
}

/// Words of one generation in a line.
const HALF: usize = 4;
const LINE_WORDS: usize = 2 * HALF;

impl PastFilter {
    pub(crate) fn new(bytes: usize) -> PastFilter {
        let words = bytes / 8;
        assert!(words >= LINE_WORDS && words.is_power_of_two());
        PastFilter {
            words: vec![0; words],
            cur_half: 0,
            cur_items: 0,
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// The first word of `h`'s line, and the word offsets and bits of its 3 bits within
    /// a half line.
    #[inline]
    fn probe(&self, h: u64) -> (usize, [usize; 3], [u64; 3]) {
        let lines = self.words.len() / LINE_WORDS;
        let line = ((h as usize) & (lines - 1)) * LINE_WORDS;
        let mut at = [0usize; 3];
        let mut bits = [0u64; 3];
        for i in 0..3 {
            let bit = (h >> (32 + 8 * i)) as usize & 255;
            at[i] = bit / 64;
            bits[i] = 1u64 << (bit % 64);
        }
        (line, at, bits)
    }

    #[inline]
    fn has(half: &[u64], at: &[usize; 3], bits: &[u64; 3]) -> bool {
        (0..3).all(|i| half[at[i]] & bits[i] != 0)
    }

    #[inline]
    fn halves(&self, line: usize) -> (&[u64], &[u64]) {
        let (a, b) = self.words[line..line + LINE_WORDS].split_at(HALF);
        if self.cur_half == 0 {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// Loads the line a lookup of `h` reads, so its cache miss overlaps with the other
    /// sketches' (see `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64) -> u64 {
        let (line, _, _) = self.probe(h);
        self.words[line]
    }

    #[inline]
    pub(crate) fn contains(&self, h: u64) -> bool {
        let (line, at, bits) = self.probe(h);
        let (cur, old) = self.halves(line);
        Self::has(cur, &at, &bits) || Self::has(old, &at, &bits)
    }

    #[inline]
    pub(crate) fn insert(&mut self, h: u64) {
        let (line, at, bits) = self.probe(h);
        let start = line + self.cur_half * HALF;
        let cur = &mut self.words[start..start + HALF];
        if Self::has(cur, &at, &bits) {
            return;
        }
        for i in 0..3 {
            cur[at[i]] |= bits[i];
        }
        self.cur_items += 1;
        if self.cur_items as usize >= self.words.len() / 2 * 64 / 8 {
            // Retire the old generation: its halves become the new, empty, current one.
            self.cur_half ^= 1;
            for line in self.words.chunks_exact_mut(LINE_WORDS) {
                line[self.cur_half * HALF..][..HALF].fill(0);
            }
            self.cur_items = 0;
        }
    }

    /// Words of the filter, the current generation's then the old one's (each in line
    /// order): the checkpoint's order, independent of which half is current.
    pub(crate) fn generation_words(&self) -> impl Iterator<Item = u64> + '_ {
        let gen = |half: usize| {
            self.words
                .chunks_exact(LINE_WORDS)
                .flat_map(move |l| l[half * HALF..][..HALF].iter().copied())
        };
        gen(self.cur_half).chain(gen(self.cur_half ^ 1))
    }

    /// Number of words in [`generation_words`](Self::generation_words).
    pub(crate) fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Sets word `i` of the [`generation_words`](Self::generation_words) order.
    pub(crate) fn set_generation_word(&mut self, i: usize, v: u64) {
        let per_gen = self.words.len() / 2;
        let (gen, j) = (i / per_gen, i % per_gen);
        let half = self.cur_half ^ gen;
        self.words[j / HALF * LINE_WORDS + half * HALF + j % HALF] = v;
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
    fn filter_keeps_the_retired_generation_and_restores_in_generation_order() {
        let mut f = PastFilter::new(8192);
        // 4,096 recipients fill a generation: the first ones move to the old one.
        for i in 0..5000 {
            f.insert(h(i));
        }
        assert_eq!(f.cur_half, 1, "one generation retired");
        assert!(
            (0..5000).all(|i| f.contains(h(i))),
            "both generations are asked"
        );
        // Rebuilt word by word into a filter whose current half is the other one.
        let mut g = PastFilter::new(8192);
        g.cur_items = f.cur_items;
        for (i, w) in f.generation_words().enumerate() {
            g.set_generation_word(i, w);
        }
        assert_ne!(f.cur_half, g.cur_half);
        assert!(f.generation_words().eq(g.generation_words()));
        assert!((0..20_000).all(|i| f.contains(h(i)) == g.contains(h(i))));
        // The next retirement drops the first 4,096 from both alike.
        for i in 5000..9000 {
            f.insert(h(i));
            g.insert(h(i));
        }
        assert_eq!((f.cur_half, g.cur_half), (0, 1), "one more retirement each");
        let (a, b) = (
            (0..4096).filter(|&i| f.contains(h(i))).count(),
            (0..4096).filter(|&i| g.contains(h(i))).count(),
        );
        assert_eq!(a, b);
        assert!(a < 600, "{a}");
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
