//! Fan-out of one business: how many distinct recipients it reached for the first time
//! in the same-recipient window, per trailing second, against its baseline (issue 14).
//!
//! ```text
//!  first attempt to a recipient in the window (recent::find says none; issue 14: a
//!  retry of a throttled message, or a repeat, finds its slot and is not counted)
//!    -> local ring   (ten 100 ms slots, exact event counts)
//!    -> short HLL    (2^8 registers per tumbling second, this and the previous one;
//!                     only for a second after one of >= 256 first attempts here)
//!  peer shards' counts (deltas) -> peer ring (ten 100 ms slots)
//!  surge test, on every counted event:
//!    distinct = min(local ring, short HLL or, without one, the ring) + peer ring
//!    distinct >= max(floor, factor x baseline / 60)  and  new share >= new_pct_min
//! ```
//!
//! Why both an exact count and a HyperLogLog: the exact count is right for any sender
//! whose recent recipients fit the same-recipient table, and a large sender's fresh
//! numbers are counted right too (a number not in the table is counted, never missed).
//! What the table cannot do for a large sender is remember a number it sent to a moment
//! ago once its slot was reused, so a large sender that repeats recipients would be
//! counted more than once for them. The short HyperLogLog counts a recipient once per
//! second whatever the volume (standard error 1.04/16 = 6.5 %, linear counting below
//! 640, ~4 % at 50), so the smaller of the two is the right one in both regimes.
//! Counts from peer shards are their exact events (deltas carry counts, not sketches).
//!
//! The baseline is an EWMA of distinct recipients per minute (weight
//! `baseline_alpha_pct` for the latest minute); the registry's declared baseline stands
//! in while it is higher. A surge minute is never learned (the ring is cleared on a pause).

use super::{DetectConfig, Evidence};

/// Sub-windows of the fan-out second.
pub(crate) const FAN_TICKS: usize = 10;
pub(crate) const FAN_TICK_MS: u64 = 100;

/// Precision of the short HyperLogLogs: 2^8 one-byte registers each.
pub(crate) const SHORT_HLL_P: u32 = 8;
const SHORT_HLL_M: usize = 1 << SHORT_HLL_P;
const SECOND_MS: u64 = 1_000;
/// The largest per-second or per-minute count a checkpoint may restore: a quarter of u32,
/// so that the counting after a restore (one per message) and the surge test's sum of
/// local and peer counts cannot overflow; one shard's second never comes near it.
pub(crate) const RESTORED_COUNT_MAX: u32 = u32::MAX / 4;
/// A second has a short sketch when the one before it counted at least this many first
/// attempts here. Below it the same-recipient table holds every recipient of the window
/// and the exact count is right; above it the sketch's clearing (256 bytes a second) is
/// paid by at least as many messages, not by every message of a small sender.
pub(crate) const SKETCH_FROM_EVENTS: u32 = 256;

pub(crate) struct FanOut {
    pub(crate) tick: u64,
    pub(crate) ring_local: [u32; FAN_TICKS],
    pub(crate) ring_peer: [u32; FAN_TICKS],
    pub(crate) ring_new: [u32; FAN_TICKS],
    pub(crate) sum_local: u32,
    pub(crate) sum_peer: u32,
    pub(crate) sum_new: u32,
    pub(crate) minute: u64,
    pub(crate) minute_distinct: u32,
    pub(crate) baseline_per_min: f32,
    /// `baseline_per_min` rounded: what the surge test compares with, in integers (it
    /// runs on every counted message; the EWMA changes once a minute).
    learned_per_min: u32,
    /// The short HyperLogLogs of this second and the previous one, by the second's
    /// parity (`hll[second % 2]` is this second's), so that a new second clears one and
    /// copies none.
    hll: [ShortHll; 2],
    /// The second being counted.
    pub(crate) second: u64,
    /// First attempts counted here in this second.
    pub(crate) second_events: u32,
    /// This second has a sketch that holds every first attempt counted in it.
    pub(crate) sketch_on: bool,
    /// The previous second had one too (else its part of the window is counted exactly,
    /// from the ring).
    pub(crate) prev_sketch_on: bool,
}

/// A HyperLogLog of `2^8` registers with its sum of `2^-M[j]` (scaled by `2^32`) and
/// its count of zero registers kept up to date on every raise.
#[derive(Clone)]
struct ShortHll {
    regs: [u8; SHORT_HLL_M],
    sum: u64,
    zeros: u32,
}

impl ShortHll {
    fn new() -> ShortHll {
        ShortHll {
            regs: [0; SHORT_HLL_M],
            sum: (SHORT_HLL_M as u64) << 32,
            zeros: SHORT_HLL_M as u32,
        }
    }

    /// Register index and rank of a recipient hash. Mixed with a constant of its own so
    /// that the bits are not those of the 24 h sketches or the recent table.
    #[inline]
    fn split(h: u64) -> (usize, u8) {
        let x = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
        let idx = (x >> (64 - SHORT_HLL_P)) as usize;
        // Ranks stop at 32 (2^-32 is past any count this sketch is asked for), which
        // keeps the sum's `2^(32 - rank)` an integer.
        let rest = (x << SHORT_HLL_P) | (1 << (SHORT_HLL_P - 1));
        (idx, (rest.leading_zeros() + 1).min(32) as u8)
    }

    #[inline]
    fn insert(&mut self, h: u64) {
        let (idx, rank) = Self::split(h);
        let r = self.regs[idx];
        if rank > r {
            self.sum = self.sum + (1u64 << (32 - u32::from(rank))) - (1u64 << (32 - u32::from(r)));
            if r == 0 {
                self.zeros -= 1;
            }
            self.regs[idx] = rank;
        }
    }

    /// No register set.
    fn is_empty(&self) -> bool {
        self.zeros == SHORT_HLL_M as u32
    }

    /// The estimate: linear counting while it is the better one, raw HLL above.
    fn estimate(&self) -> f64 {
        let m = SHORT_HLL_M as f64;
        if self.zeros == SHORT_HLL_M as u32 {
            return 0.0;
        }
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / (self.sum as f64 / 4_294_967_296.0);
        if raw <= 2.5 * m && self.zeros > 0 {
            m * (m / f64::from(self.zeros)).ln()
        } else {
            raw
        }
    }
}

impl FanOut {
    pub(crate) fn new() -> FanOut {
        FanOut {
            tick: 0,
            ring_local: [0; FAN_TICKS],
            ring_peer: [0; FAN_TICKS],
            ring_new: [0; FAN_TICKS],
            sum_local: 0,
            sum_peer: 0,
            sum_new: 0,
            minute: 0,
            minute_distinct: 0,
            baseline_per_min: 0.0,
            learned_per_min: 0,
            hll: [ShortHll::new(), ShortHll::new()],
            second: 0,
            second_events: 0,
            sketch_on: false,
            prev_sketch_on: false,
        }
    }

    /// Loads the register line an insert of `h` writes, when one will (see
    /// `BusinessState::touch`).
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64) -> u64 {
        if !self.sketch_on {
            return 0;
        }
        u64::from(self.hll[(self.second % 2) as usize].regs[ShortHll::split(h).0])
    }

    /// Moves the rings, the minute baseline and the short sketches to `now_ms`.
    #[inline]
    pub(crate) fn advance(&mut self, now_ms: u64, cfg: &DetectConfig) {
        let tick = now_ms / FAN_TICK_MS;
        if tick <= self.tick {
            return;
        }
        if tick - self.tick >= FAN_TICKS as u64 {
            // A second or more of silence: the whole ring goes.
            self.ring_local = [0; FAN_TICKS];
            self.ring_peer = [0; FAN_TICKS];
            self.ring_new = [0; FAN_TICKS];
            (self.sum_local, self.sum_peer, self.sum_new) = (0, 0, 0);
        } else {
            for k in 1..=tick - self.tick {
                let s = ((self.tick + k) % FAN_TICKS as u64) as usize;
                self.sum_local -= self.ring_local[s];
                self.sum_peer -= self.ring_peer[s];
                self.sum_new -= self.ring_new[s];
                self.ring_local[s] = 0;
                self.ring_peer[s] = 0;
                self.ring_new[s] = 0;
            }
        }
        self.tick = tick;
        let second = now_ms / SECOND_MS;
        if second > self.second {
            let next = second == self.second + 1;
            self.prev_sketch_on = next && self.sketch_on;
            self.sketch_on = next && self.second_events >= SKETCH_FROM_EVENTS;
            // A sketch that is not on is empty (issue 19): its registers are bits of
            // recipient hashes from seconds ago, which would otherwise stay in memory
            // and in checkpoints however long the business is quiet.
            let cur = (second % 2) as usize;
            if self.sketch_on || !self.hll[cur].is_empty() {
                self.hll[cur] = ShortHll::new();
            }
            if !self.prev_sketch_on && !self.hll[cur ^ 1].is_empty() {
                self.hll[cur ^ 1] = ShortHll::new();
            }
            self.second = second;
            self.second_events = 0;
        }
        let minute = now_ms / 60_000;
        if minute > self.minute {
            let a = cfg.baseline_alpha_pct as f32 / 100.0;
            self.baseline_per_min += a * (self.minute_distinct as f32 - self.baseline_per_min);
            let idle = (minute - self.minute - 1).min(1_000) as i32;
            self.baseline_per_min *= (1.0 - a).powi(idle);
            self.relearn();
            self.minute_distinct = 0;
            self.minute = minute;
        }
    }

    /// Counts the first attempt in the window to the recipient hashed `h`, `new` when it
    /// was never contacted.
    #[inline]
    pub(crate) fn add_local(&mut self, h: u64, new: bool) {
        let s = (self.tick % FAN_TICKS as u64) as usize;
        self.ring_local[s] += 1;
        self.sum_local += 1;
        self.ring_new[s] += u32::from(new);
        self.sum_new += u32::from(new);
        self.minute_distinct += 1;
        self.second_events += 1;
        if self.sketch_on {
            self.hll[(self.second % 2) as usize].insert(h);
        }
    }

    /// Takes back one of this shard's counts, made in the tick `tick_mod` (mod
    /// `recent::COUNTED_TICK_MOD`), because a peer counted the same recipient's first
    /// attempt too (both saw it before either's event reached the other: a client
    /// resending on another connection within an exchange interval). Each shard's view
    /// is its own count plus its peers', so each takes back its own: the recipient is
    /// then counted once in both views. A count already out of the trailing second is
    /// left alone.
    pub(crate) fn uncount(&mut self, tick_mod: u64, new: bool) {
        use super::recent::COUNTED_TICK_MOD;
        let age = (self.tick % COUNTED_TICK_MOD + COUNTED_TICK_MOD - tick_mod) % COUNTED_TICK_MOD;
        if age >= FAN_TICKS as u64 {
            return;
        }
        let s = ((self.tick - age) % FAN_TICKS as u64) as usize;
        if self.ring_local[s] == 0 {
            return;
        }
        self.ring_local[s] -= 1;
        self.sum_local -= 1;
        if new && self.ring_new[s] > 0 {
            self.ring_new[s] -= 1;
            self.sum_new -= 1;
        }
        self.minute_distinct = self.minute_distinct.saturating_sub(1);
    }

    /// Counts a peer shard's distinct and never-contacted recipients (one delta).
    pub(crate) fn add_peer(&mut self, distinct: u32, new: u32) {
        let s = (self.tick % FAN_TICKS as u64) as usize;
        self.ring_peer[s] += distinct;
        self.sum_peer += distinct;
        self.ring_new[s] += new;
        self.sum_new += new;
        self.minute_distinct += distinct;
    }

    /// This shard's distinct recipients in the trailing second by the short sketches:
    /// this second's estimate plus the part of the previous one still in the window (by
    /// its sketch, or exactly from the ring when it had none). `None` when this second
    /// has no sketch (a small sender: the exact count is right).
    fn local_sketch(&self, now_ms: u64) -> Option<f64> {
        if !self.sketch_on {
            return None;
        }
        let cur = self.hll[(self.second % 2) as usize].estimate();
        let prev = if self.prev_sketch_on {
            let into = (now_ms % SECOND_MS) as f64 / SECOND_MS as f64;
            self.hll[((self.second + 1) % 2) as usize].estimate() * (1.0 - into)
        } else {
            // The ring's slots of the previous second still in the window.
            let first_tick = self.second * (SECOND_MS / FAN_TICK_MS);
            ((self.tick + 1).saturating_sub(FAN_TICKS as u64)..first_tick)
                .map(|t| f64::from(self.ring_local[(t % FAN_TICKS as u64) as usize]))
                .sum()
        };
        Some(cur + prev)
    }

    /// The surge test: `Some(evidence)` when the last second's fan-out is a surge: at
    /// least the floor, at least `factor` times the baseline, mostly never-contacted.
    /// Cheap when it is not (exact sums first; the sketch only near the threshold).
    #[inline]
    pub(crate) fn surge(
        &self,
        cfg: &DetectConfig,
        now_ms: u64,
        declared_per_min: u32,
    ) -> Option<Evidence> {
        let exact = self.sum_local + self.sum_peer;
        let declared = declared_per_min > self.learned_per_min;
        let baseline = self.learned_per_min.max(declared_per_min);
        let by_baseline = (u64::from(cfg.surge_baseline_factor) * u64::from(baseline)).div_ceil(60);
        let threshold =
            (by_baseline.min(u64::from(u32::MAX)) as u32).max(cfg.surge_distinct_per_sec_min);
        if exact < threshold
            || u64::from(self.sum_new) * 100 < u64::from(cfg.surge_new_share_pct) * u64::from(exact)
        {
            return None;
        }
        let local = match self.local_sketch(now_ms) {
            Some(sketch) => self.sum_local.min(sketch.round() as u32),
            None => self.sum_local,
        };
        let distinct = local + self.sum_peer;
        if distinct < threshold {
            return None;
        }
        Some(Evidence::FanOut {
            distinct_per_sec: distinct,
            new_pct: (u64::from(self.sum_new.min(exact)) * 100 / u64::from(exact.max(1))) as u32,
            baseline_per_min: baseline,
            baseline_declared: declared,
            threshold_per_sec: threshold,
            floor_per_sec: cfg.surge_distinct_per_sec_min,
            factor: cfg.surge_baseline_factor,
            new_pct_min: cfg.surge_new_share_pct,
        })
    }

    /// Forgets the trailing second (and the minute being learned): after a pause or an
    /// unpause, so that a surge is neither learned nor flagged twice.
    pub(crate) fn clear(&mut self) {
        self.ring_local = [0; FAN_TICKS];
        self.ring_peer = [0; FAN_TICKS];
        self.ring_new = [0; FAN_TICKS];
        self.sum_local = 0;
        self.sum_peer = 0;
        self.sum_new = 0;
        self.minute_distinct = 0;
        self.second_events = 0;
        self.sketch_on = false;
        self.prev_sketch_on = false;
    }

    /// Brings the integer baseline the surge test uses up to `baseline_per_min` (after
    /// the EWMA moved, or a restore).
    pub(crate) fn relearn(&mut self) {
        self.learned_per_min = self.baseline_per_min.round().min(u32::MAX as f32) as u32;
    }

    /// Rebuilds the sums after the rings were restored (checkpoint).
    ///
    /// False, and the sums unchanged, when a ring's sum or the second's event count passes
    /// [`RESTORED_COUNT_MAX`]: only a damaged checkpoint holds such counts (fuzzing found
    /// the overflows, `fuzz/regressions/checkpoint/`).
    #[must_use]
    pub(crate) fn resum(&mut self) -> bool {
        let sum = |ring: &[u32]| ring.iter().try_fold(0u32, |a, &x| a.checked_add(x));
        let (Some(local), Some(peer), Some(new)) = (
            sum(&self.ring_local),
            sum(&self.ring_peer),
            sum(&self.ring_new),
        ) else {
            return false;
        };
        // Headroom for the counting that follows a restore (one per message, and the
        // surge test adds local and peer): no second of one shard comes near it.
        if [local, peer, new, self.second_events]
            .iter()
            .any(|&c| c > RESTORED_COUNT_MAX)
        {
            return false;
        }
        self.sum_local = local;
        self.sum_peer = peer;
        self.sum_new = new;
        true
    }

    /// The short sketches' registers, this second's then the previous one's
    /// (checkpoint; `second`, `second_events` and the two flags are written apart).
    pub(crate) fn sketch_regs(&self) -> [&[u8; SHORT_HLL_M]; 2] {
        let cur = (self.second % 2) as usize;
        [&self.hll[cur].regs, &self.hll[cur ^ 1].regs]
    }

    /// Restores the short sketches from [`sketch_regs`](Self::sketch_regs)'s output,
    /// after `second` was set; false if a register is out of range.
    pub(crate) fn set_sketch_regs(&mut self, regs: [&[u8]; 2]) -> bool {
        let max_rank = 32;
        let cur = (self.second % 2) as usize;
        for (k, r) in regs.into_iter().enumerate() {
            let hll = &mut self.hll[cur ^ k];
            if r.len() != SHORT_HLL_M || r.iter().any(|&x| x > max_rank) {
                return false;
            }
            *hll = ShortHll::new();
            hll.regs.copy_from_slice(r);
            hll.sum = hll.regs.iter().map(|&x| 1u64 << (32 - u32::from(x))).sum();
            hll.zeros = hll.regs.iter().filter(|&&x| x == 0).count() as u32;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        super::super::keyed::siphash24(5, 6, &i.to_le_bytes())
    }

    /// A fan-out at `now_ms` whose second has a short sketch: the second before counted
    /// `SKETCH_FROM_EVENTS` first attempts (a second before the window).
    fn sketching(now_ms: u64) -> FanOut {
        let cfg = DetectConfig::default();
        let mut f = FanOut::new();
        f.advance(now_ms - SECOND_MS, &cfg);
        for i in 0..u64::from(SKETCH_FROM_EVENTS) {
            f.add_local(h(9_000_000 + i), false);
        }
        f.advance(now_ms, &cfg);
        assert!(f.sketch_on && !f.prev_sketch_on);
        f
    }

    #[test]
    fn a_small_sender_has_no_sketch_and_a_large_one_gets_one_the_next_second() {
        let cfg = DetectConfig::default();
        let mut f = FanOut::new();
        f.advance(5_000, &cfg);
        for i in 0..100 {
            f.add_local(h(i), true);
        }
        assert_eq!(
            f.local_sketch(5_500),
            None,
            "no sketch: the exact count stands"
        );
        f.advance(6_000, &cfg);
        assert!(!f.sketch_on, "100 a second is not enough for one");
        for i in 0..300 {
            f.add_local(h(1_000 + i), true);
        }
        f.advance(7_000, &cfg);
        assert!(f.sketch_on && !f.prev_sketch_on);
        f.advance(8_000, &cfg);
        assert!(
            !f.sketch_on && f.prev_sketch_on,
            "this second had no events"
        );
        f.advance(10_000, &cfg);
        assert!(!f.sketch_on && !f.prev_sketch_on, "a gap ends both");
    }

    #[test]
    fn the_short_sketch_counts_a_recipient_once_per_second_at_any_volume() {
        for n in [30u64, 50, 200, 1_000, 15_000] {
            let mut f = sketching(10_000);
            // Each recipient three times: the exact count triples, the sketch does not.
            for _ in 0..3 {
                for i in 0..n {
                    f.add_local(h(i), true);
                }
            }
            let est = f.local_sketch(10_999).expect("a sketch");
            let err = (est - n as f64).abs() / n as f64;
            assert!(err < 0.2, "{n}: {est}");
            assert_eq!(u64::from(f.sum_local), 3 * n);
        }
    }

    #[test]
    fn surge_takes_the_smaller_count_and_reports_what_it_measured() {
        let cfg = DetectConfig::default();
        let mut f = sketching(20_000);
        // 40 recipients counted twice each within the second (a large sender's table
        // lost them in between): 80 events, 40 distinct.
        for _ in 0..2 {
            for i in 0..40 {
                f.add_local(h(i), true);
            }
        }
        assert!(
            f.surge(&cfg, 20_500, 0).is_none(),
            "40 distinct is below the floor"
        );
        for i in 40..70 {
            f.add_local(h(i), true);
        }
        let Some(Evidence::FanOut {
            distinct_per_sec,
            new_pct,
            threshold_per_sec,
            baseline_declared,
            ..
        }) = f.surge(&cfg, 20_500, 0)
        else {
            panic!("70 distinct new recipients with no baseline is a surge");
        };
        assert!((60..=80).contains(&distinct_per_sec), "{distinct_per_sec}");
        assert_eq!((new_pct, threshold_per_sec), (100, 50));
        assert!(!baseline_declared);
        // A declared baseline of 1,200 a minute (20 a second) raises the threshold to
        // 5 x 20 = 100.
        assert_eq!(cfg.surge_baseline_factor, 5);
        assert!(f.surge(&cfg, 20_500, 1_200).is_none());
        for i in 70..110 {
            f.add_local(h(i), true);
        }
        let Some(Evidence::FanOut {
            threshold_per_sec,
            baseline_declared,
            baseline_per_min,
            ..
        }) = f.surge(&cfg, 20_500, 1_200)
        else {
            panic!("110 distinct against a declared 20 a second is a surge");
        };
        assert_eq!(
            (threshold_per_sec, baseline_declared, baseline_per_min),
            (100, true, 1_200)
        );
    }
}
