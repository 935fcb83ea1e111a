//! The filter of past recipients, keyed by the recipient hash. (The count-min sketch of
//! messages per recipient that sat here until issue 14 is now `recent`, a tagged table.)

/// Recipients contacted before: a two-generation blocked Bloom filter.
///
/// Each generation is `bytes / 2` of bits in 256-bit blocks; a hash picks one block and
/// sets 3 bits in it. Block `b` of both generations shares one 64-byte cache line (the
/// current generation in one half, the old one in the other), so a lookup reads one line.
/// A generation is retired after taking `bits / 8` new recipients, which keeps its
/// false-positive rate near 3 %; lookups ask both generations, so "contacted" means
/// "among the last `bits / 8` to `bits / 4` recipients new to the filter" (a recipient
/// already in the old generation is not copied forward: see [`PastFilter::insert`]).
/// False positives make a new recipient look old: the fan-out detector then sees a
/// surge a little smaller than it is, never a larger one.
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

    /// Recipients the current generation takes before it retires the old one (so a
    /// filter never holds `cur_items` at or above it; a restore checks that).
    pub(crate) fn items_max(&self) -> usize {
        self.words.len() / 2 * 64 / 8
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

    /// Records a contacted recipient. One already in either generation is left where it
    /// is (issue 14): copying it into the current one would use that generation's room,
    /// and a campaign to an audience of a few thousand, re-admitted in a new order, would
    /// retire the very generation holding the rest of the audience, which then looked
    /// never contacted (measured: 81 % "new" in a campaign to 4,933 numbers all
    /// messaged the day before). So a generation ages only by recipients new to the
    /// filter, and an audience of up to `bits / 8` is remembered however it is messaged.
    #[inline]
    pub(crate) fn insert(&mut self, h: u64) {
        let (line, at, bits) = self.probe(h);
        let (cur, old) = self.halves(line);
        if Self::has(cur, &at, &bits) || Self::has(old, &at, &bits) {
            return;
        }
        let start = line + self.cur_half * HALF;
        let cur = &mut self.words[start..start + HALF];
        for i in 0..3 {
            cur[at[i]] |= bits[i];
        }
        self.cur_items += 1;
        if self.cur_items as usize >= self.items_max() {
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
}
