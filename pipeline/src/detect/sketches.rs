//! The filter of past recipients, keyed by the recipient hash. (The count-min sketch of
//! messages per recipient that sat here until issue 14 is now `recent`, a tagged table.)

/// Recipients contacted before: a two-generation blocked Bloom filter that forgets by
/// count and by time.
///
/// Each generation is `bytes / 2` of bits in 256-bit blocks; a hash picks one block and
/// sets 3 bits in it. Block `b` of both generations shares one 64-byte cache line (the
/// current generation in one half, the old one in the other), so a lookup reads one line.
/// Lookups ask both generations.
///
/// **By count**: a generation is retired after taking `bits / 8` new recipients, which
/// keeps its false-positive rate near 3 %; so for a large sender "contacted" means
/// "among the last `bits / 8` to `bits / 4` recipients new to the filter" (a recipient
/// already in the old generation is then not copied forward: see [`PastFilter::insert`]).
///
/// **By time** (issue 19): the filter holds keyed hashes of recipients' numbers, which
/// may not outlive the messages they were taken from (the log's retention, passed in as
/// `memory_ms`). Each generation has a start: the time it became current. The current
/// one is retired once it is `memory_ms / 2` old, and a generation is dropped (zeroed)
/// once its start is `memory_ms` old, whichever comes first; so a recipient inserted at
/// `t` (after its generation's start) is forgotten by `t + memory_ms` at the latest,
/// and for a sender messaging a stable audience "contacted" means "within the last
/// `memory_ms / 2` to `memory_ms`". A recipient found only in a generation retired by
/// time is copied into the current one (the message now is a new reason to remember
/// it, and dates it anew), so a monthly audience is not all "new" once a month; after a
/// retirement by count it is not copied, for the reason above. Ages are measured by the
/// caller's clock ([`PastFilter::age`], called from every `BusinessState::advance` and
/// from `Detector::expire` for quiet businesses); a start more than a generation ahead
/// of the clock (a clock stepped back, a damaged checkpoint) counts as expired.
///
/// False positives make a new recipient look old: the fan-out detector then sees a
/// surge a little smaller than it is, never a larger one.
pub(crate) struct PastFilter {
    /// Line after line: `HALF` words of one generation, then `HALF` of the other.
    words: Vec<u64>,
    /// Which half of every line holds the current generation (0 or 1).
    cur_half: usize,
    pub(crate) cur_items: u32,
    /// When the current generation became current (caller's clock, ms).
    pub(crate) cur_start_ms: u64,
    /// When the old generation became current, if it holds anything.
    pub(crate) old_start_ms: u64,
    /// The old generation holds recipients (else its words are all zero).
    pub(crate) old_live: bool,
    /// The old generation was retired by time (else by count): its recipients are
    /// copied forward when contacted again.
    pub(crate) old_by_time: bool,
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
            cur_start_ms: 0,
            old_start_ms: 0,
            old_live: false,
            old_by_time: false,
        }
    }

    /// Retires and drops generations by age at `now_ms` (see the type's docs): the
    /// current generation retires once `memory_ms / 2` old, a generation is dropped once
    /// `memory_ms` old. Cheap when nothing is due (two comparisons): it runs per message.
    #[inline]
    pub(crate) fn age(&mut self, now_ms: u64, memory_ms: u64) {
        debug_assert!(memory_ms >= 2);
        if expired(self.cur_start_ms, now_ms, memory_ms / 2) {
            if self.cur_items == 0 {
                // Nothing to retire: the empty generation starts now.
                self.cur_start_ms = now_ms;
            } else {
                self.retire(now_ms, true);
            }
        }
        if self.old_live && expired(self.old_start_ms, now_ms, memory_ms) {
            self.clear_half(self.cur_half ^ 1);
            self.old_live = false;
        }
        debug_assert!(self.cur_items > 0 || self.cur_is_empty());
    }

    /// The current generation becomes the old one (the old one is dropped), and an empty
    /// one starts at `now_ms`.
    fn retire(&mut self, now_ms: u64, by_time: bool) {
        self.clear_half(self.cur_half ^ 1);
        self.cur_half ^= 1;
        self.old_live = self.cur_items > 0;
        self.old_start_ms = self.cur_start_ms;
        self.old_by_time = by_time;
        self.cur_items = 0;
        self.cur_start_ms = now_ms;
    }

    fn clear_half(&mut self, half: usize) {
        for line in self.words.chunks_exact_mut(LINE_WORDS) {
            line[half * HALF..][..HALF].fill(0);
        }
    }

    fn cur_is_empty(&self) -> bool {
        self.words
            .chunks_exact(LINE_WORDS)
            .all(|l| l[self.cur_half * HALF..][..HALF].iter().all(|&w| w == 0))
    }

    /// The old generation's words are all zero.
    pub(crate) fn old_is_empty(&self) -> bool {
        self.words.chunks_exact(LINE_WORDS).all(|l| {
            l[(self.cur_half ^ 1) * HALF..][..HALF]
                .iter()
                .all(|&w| w == 0)
        })
    }

    /// After a restore wrote the words and counters: refuses a filter whose current
    /// generation holds bits it has no count for (such bits would never age out), and
    /// sets whether the old generation holds anything.
    #[must_use]
    pub(crate) fn restored_consistent(&mut self) -> bool {
        if self.cur_items == 0 && !self.cur_is_empty() {
            return false;
        }
        self.old_live = !self.old_is_empty();
        true
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

    /// Records a contacted recipient. One already in the current generation stays. One
    /// only in the old generation is copied forward when that generation was retired by
    /// time, and left where it is after a retirement by count (issue 14): copying it then
    /// would use the current generation's room, and a campaign to an audience of a few
    /// thousand, re-admitted in a new order, would retire the very generation holding the
    /// rest of the audience, which then looked never contacted (measured: 81 % "new" in a
    /// campaign to 4,933 numbers all messaged the day before). So by count a generation
    /// ages only by recipients new to the filter, and an audience of up to `bits / 8` is
    /// remembered however it is messaged. Call [`age`](Self::age) first; `now_ms` starts
    /// the next generation if this one retires.
    #[inline]
    pub(crate) fn insert(&mut self, h: u64, now_ms: u64) {
        let (line, at, bits) = self.probe(h);
        let (cur, old) = self.halves(line);
        if Self::has(cur, &at, &bits) {
            return;
        }
        if Self::has(old, &at, &bits) && !self.old_by_time {
            return;
        }
        let start = line + self.cur_half * HALF;
        let cur = &mut self.words[start..start + HALF];
        for i in 0..3 {
            cur[at[i]] |= bits[i];
        }
        self.cur_items += 1;
        if self.cur_items as usize >= self.items_max() {
            // Retire by count: the old generation goes, the current one becomes old.
            self.retire(now_ms, false);
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

/// Whether a span that started at `start_ms` has lasted `span_ms` at `now_ms`; a start
/// more than `span_ms` ahead of `now_ms` counts as expired (ages cannot be told).
#[inline]
fn expired(start_ms: u64, now_ms: u64, span_ms: u64) -> bool {
    now_ms.saturating_sub(start_ms) >= span_ms || start_ms - now_ms.min(start_ms) > span_ms
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
            f.insert(h(i), 0);
        }
        assert!((0..4000).all(|i| f.contains(h(i))), "no false negatives");
        let fp = (1_000_000..1_010_000).filter(|&i| f.contains(h(i))).count();
        assert!(fp < 600, "false positives {fp} / 10000");
        // Far more recipients than it holds: the oldest are forgotten.
        for i in 10_000..30_000 {
            f.insert(h(i), 0);
        }
        let remembered = (0..4000).filter(|&i| f.contains(h(i))).count();
        assert!(remembered < 1000, "{remembered}");
    }

    #[test]
    fn filter_keeps_the_retired_generation_and_restores_in_generation_order() {
        let mut f = PastFilter::new(8192);
        // 4,096 recipients fill a generation: the first ones move to the old one.
        for i in 0..5000 {
            f.insert(h(i), 0);
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
        assert!(g.restored_consistent());
        assert!(g.old_live);
        assert_ne!(f.cur_half, g.cur_half);
        assert!(f.generation_words().eq(g.generation_words()));
        assert!((0..20_000).all(|i| f.contains(h(i)) == g.contains(h(i))));
        // The next retirement drops the first 4,096 from both alike.
        for i in 5000..9000 {
            f.insert(h(i), 0);
            g.insert(h(i), 0);
        }
        assert_eq!((f.cur_half, g.cur_half), (0, 1), "one more retirement each");
        let (a, b) = (
            (0..4096).filter(|&i| f.contains(h(i))).count(),
            (0..4096).filter(|&i| g.contains(h(i))).count(),
        );
        assert_eq!(a, b);
        assert!(a < 600, "{a}");
    }

    /// Issue 19: whenever a recipient is inserted, and however often the clock is looked
    /// at, it is known for at least half the memory and forgotten by the whole memory.
    #[test]
    fn a_recipient_is_forgotten_within_the_memory_from_any_insertion_time() {
        const MEMORY_MS: u64 = 1_000;
        for step_ms in [1, 7, 100, 499] {
            for insert_at in (0..3_000).step_by(37) {
                let mut f = PastFilter::new(8192);
                let x = h(1_000_000 + insert_at);
                let mut known_until = None;
                let mut t = 0;
                // Other recipients now and then, so generations retire by time.
                while t <= insert_at + 2 * MEMORY_MS {
                    f.age(t, MEMORY_MS);
                    if t % 200 < step_ms {
                        f.insert(h(t), t);
                    }
                    if known_until.is_none() && t >= insert_at {
                        f.insert(x, t);
                        known_until = Some(t);
                    }
                    if let Some(at) = known_until {
                        let age = t - at;
                        if age < MEMORY_MS / 2 {
                            assert!(f.contains(x), "step {step_ms}: forgotten at age {age}");
                        }
                        if age >= MEMORY_MS {
                            assert!(!f.contains(x), "step {step_ms}: known at age {age}");
                        }
                    }
                    t += step_ms;
                }
            }
        }
    }

    /// A clock far behind a generation's start (stepped back, or a damaged checkpoint):
    /// the ages cannot be told, and the filter forgets rather than keeps.
    #[test]
    fn a_start_far_ahead_of_the_clock_counts_as_expired() {
        let mut f = PastFilter::new(8192);
        f.age(10_000_000, 1_000);
        f.insert(h(1), 10_000_000);
        f.age(9_999_600, 1_000);
        assert!(f.contains(h(1)), "a small step back keeps it");
        f.age(5_000_000, 1_000);
        f.age(5_000_000, 1_000);
        assert!(!f.contains(h(1)));
    }
}
