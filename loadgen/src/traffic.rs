//! Synthetic traffic: recipients, payload sizes and the schedule of intended send times.
//!
//! Everything here is deterministic from a seed and allocation-free per message, so the
//! generator stays cheap next to the server. Recipients are synthetic (`+1555…` for the
//! shared population, `+19…` for "all new") and payloads are filler: the generator never
//! sees real personal data.

use bytes::Bytes;
use courier_pipeline::wire::Recipient;
use serde::{Deserialize, Serialize};

/// Most distinct recipients of a uniform or Zipf population (7 digits after `+1555`).
pub const POPULATION_MAX: u64 = 10_000_000;
/// Most entries of a Zipf table (its CDF is precomputed: 8 bytes each).
pub const ZIPF_POPULATION_MAX: u64 = 1 << 20;
/// Largest payload the generator draws.
pub const PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// Most senders a plan may hold (the sender index is part of "new" recipients).
pub const SENDERS_MAX: usize = 1000;
const FILLER: &[u8] = b"courier load filler; ";

/// xorshift64*: a fast deterministic generator for synthetic traffic.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> XorShift {
        // splitmix64 spreads small seeds; the state must not be 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }
}

/// `+1555` and 7 digits: member `index` of the shared synthetic population.
pub fn population_recipient(index: u64) -> Recipient {
    assert!(index < POPULATION_MAX);
    let mut s = *b"+1555_______";
    put_digits(&mut s[5..], index);
    Recipient::parse(&s).expect("+1555 and 7 digits is valid E.164")
}

/// `+19`, 3 digits of the sender, 10 digits of a counter: a recipient nobody else uses.
pub fn new_recipient(sender: usize, counter: u64) -> Recipient {
    assert!(sender < SENDERS_MAX && counter < 10_000_000_000);
    let mut s = *b"+19_____________";
    put_digits(&mut s[3..6], sender as u64);
    put_digits(&mut s[6..], counter);
    Recipient::parse(&s).expect("+19 and 13 digits is valid E.164")
}

fn put_digits(out: &mut [u8], mut n: u64) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// How a sender picks recipients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RecipientSpec {
    /// Uniform over a population shared by every sender.
    Uniform {
        /// Distinct recipients.
        population: u64,
    },
    /// Zipf with exponent `s` over a shared population: a few recipients get most messages.
    Zipf {
        /// The exponent (1.0 is classic Zipf; larger is more skewed).
        s: f64,
        /// Distinct recipients (at most 2^20).
        population: u64,
    },
    /// Every message to a recipient never messaged before ("message everyone").
    New,
}

impl RecipientSpec {
    /// Checks the bounds; names the problem.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            RecipientSpec::Uniform { population }
                if population == 0 || population > POPULATION_MAX =>
            {
                Err(format!(
                    "uniform population must be in 1..={POPULATION_MAX}"
                ))
            }
            RecipientSpec::Zipf { s, population } => {
                if population == 0 || population > ZIPF_POPULATION_MAX {
                    Err(format!(
                        "zipf population must be in 1..={ZIPF_POPULATION_MAX}"
                    ))
                } else if !(s.is_finite() && s > 0.0 && s <= 10.0) {
                    Err("zipf s must be in (0, 10]".into())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// Draws recipients for one connection of one sender.
#[derive(Debug)]
pub struct RecipientGen {
    kind: RecipientKind,
    sender: usize,
    /// For `New`: the next counter; the connection index sits in the high digits.
    counter: u64,
}

#[derive(Debug)]
enum RecipientKind {
    Uniform(u64),
    /// Cumulative probabilities, increasing, the last is 1.
    Zipf(std::sync::Arc<[f64]>),
    New,
}

impl RecipientGen {
    /// A generator for connection `connection` of sender `sender`; `zipf` is the shared
    /// table from [`zipf_table`] when the spec is Zipf.
    pub fn new(
        spec: &RecipientSpec,
        sender: usize,
        connection: u64,
        zipf: Option<std::sync::Arc<[f64]>>,
    ) -> RecipientGen {
        let kind = match spec {
            RecipientSpec::Uniform { population } => RecipientKind::Uniform(*population),
            RecipientSpec::Zipf { .. } => RecipientKind::Zipf(zipf.expect("zipf table given")),
            RecipientSpec::New => RecipientKind::New,
        };
        RecipientGen {
            kind,
            sender,
            // 10 digits: 4 for the connection, 6 (a million messages) per connection
            // before wrapping into the next connection's space.
            counter: connection * 1_000_000,
        }
    }

    /// The next recipient.
    pub fn next(&mut self, rng: &mut XorShift) -> Recipient {
        match &self.kind {
            RecipientKind::Uniform(n) => population_recipient(rng.below(*n)),
            RecipientKind::Zipf(cdf) => {
                let u = rng.unit();
                let i = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
                population_recipient(i as u64)
            }
            RecipientKind::New => {
                self.counter = (self.counter + 1) % 10_000_000_000;
                new_recipient(self.sender, self.counter)
            }
        }
    }
}

/// The cumulative distribution of Zipf(`s`) over ranks 1..=`population`.
pub fn zipf_table(s: f64, population: u64) -> std::sync::Arc<[f64]> {
    assert!(population > 0 && population <= ZIPF_POPULATION_MAX);
    let mut cdf: Vec<f64> = (1..=population).map(|k| (k as f64).powf(-s)).collect();
    let mut acc = 0.0;
    for c in cdf.iter_mut() {
        acc += *c;
        *c = acc;
    }
    for c in cdf.iter_mut() {
        *c /= acc;
    }
    *cdf.last_mut().expect("non-empty") = 1.0;
    cdf.into()
}

/// Payload sizes: fixed, uniform over a range, or weighted choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// Every payload this many bytes.
    Fixed(usize),
    /// Uniform in `min..=max` bytes.
    Range {
        /// Smallest.
        min: usize,
        /// Largest.
        max: usize,
    },
    /// `[[bytes, weight], ...]`: each size with probability weight / sum of weights.
    Weighted(Vec<(usize, u32)>),
}

impl SizeSpec {
    /// Parses the command-line forms `1024`, `100-2000` and `100:3,1000:1`.
    pub fn parse(s: &str) -> Result<SizeSpec, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad size `{t}`"))
        };
        let spec = if s.contains(':') {
            let mut v = Vec::new();
            for part in s.split(',') {
                let (b, w) = part
                    .split_once(':')
                    .ok_or_else(|| format!("bad size:weight `{part}`"))?;
                let w = w
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("bad weight `{w}`"))?;
                v.push((num(b)?, w));
            }
            SizeSpec::Weighted(v)
        } else if let Some((a, b)) = s.split_once('-') {
            SizeSpec::Range {
                min: num(a)?,
                max: num(b)?,
            }
        } else {
            SizeSpec::Fixed(num(s)?)
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks the bounds; names the problem.
    pub fn check(&self) -> Result<(), String> {
        match self {
            SizeSpec::Fixed(n) if *n > PAYLOAD_BYTES_MAX => {
                Err(format!("size over {PAYLOAD_BYTES_MAX} bytes"))
            }
            SizeSpec::Range { min, max } if min > max || *max > PAYLOAD_BYTES_MAX => Err(format!(
                "size range must have min <= max <= {PAYLOAD_BYTES_MAX}"
            )),
            SizeSpec::Weighted(v) if v.is_empty() || v.iter().all(|(_, w)| *w == 0) => {
                Err("weighted sizes need at least one positive weight".into())
            }
            SizeSpec::Weighted(v) if v.iter().any(|(b, _)| *b > PAYLOAD_BYTES_MAX) => {
                Err(format!("size over {PAYLOAD_BYTES_MAX} bytes"))
            }
            _ => Ok(()),
        }
    }

    /// The largest size this spec can draw.
    pub fn max(&self) -> usize {
        match self {
            SizeSpec::Fixed(n) => *n,
            SizeSpec::Range { max, .. } => *max,
            SizeSpec::Weighted(v) => v.iter().map(|(b, _)| *b).max().unwrap_or(0),
        }
    }

    /// Draws one size.
    pub fn draw(&self, rng: &mut XorShift) -> usize {
        match self {
            SizeSpec::Fixed(n) => *n,
            SizeSpec::Range { min, max } => min + rng.below((max - min + 1) as u64) as usize,
            SizeSpec::Weighted(v) => {
                let total: u64 = v.iter().map(|(_, w)| u64::from(*w)).sum();
                let mut x = rng.below(total);
                for (b, w) in v {
                    if x < u64::from(*w) {
                        return *b;
                    }
                    x -= u64::from(*w);
                }
                unreachable!("x < total")
            }
        }
    }
}

/// Whether `bytes` are filler (what [`filler`] makes, of any length).
pub fn is_filler(bytes: &[u8]) -> bool {
    bytes.iter().zip(FILLER.iter().cycle()).all(|(a, b)| a == b)
}

/// `size` bytes of filler; payloads are zero-copy slices of one such buffer.
pub fn filler(size: usize) -> Bytes {
    FILLER
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect::<Vec<u8>>()
        .into()
}

/// Intended send times of one connection: message `k` is due `time_of(k)` after the run
/// starts. The rate goes linearly from `rate_from` to `rate_to` between `start` and
/// `stop` (equal for a constant rate), so the cumulative count is a quadratic in time
/// and its inverse has a closed form: no per-message state, so a backlog costs no memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Seconds after the run's start of the first message.
    pub start_secs: f64,
    /// Seconds after the run's start when sending stops.
    pub stop_secs: f64,
    /// Messages per second at `start_secs`.
    pub rate_from: f64,
    /// Messages per second at `stop_secs`.
    pub rate_to: f64,
    /// Fraction of one message interval to shift this connection by, so that the
    /// connections of a sender interleave instead of sending in lockstep.
    pub phase: f64,
}

impl Schedule {
    fn slope(&self) -> f64 {
        let span = self.stop_secs - self.start_secs;
        if span > 0.0 {
            (self.rate_to - self.rate_from) / span
        } else {
            0.0
        }
    }

    /// Messages due by `t` seconds after the run's start (the count whose intended time
    /// is at most `t`).
    pub fn due_by(&self, t: f64) -> u64 {
        let count = |t: f64| self.rate_from * t + 0.5 * self.slope() * t * t - self.phase;
        if t < self.start_secs {
            return 0;
        }
        // Messages strictly before stop: k + phase < count(stop).
        let total = count(self.stop_secs - self.start_secs).ceil().max(0.0) as u64;
        let n = count(t.min(self.stop_secs) - self.start_secs) + 1.0;
        if n <= 0.0 {
            0
        } else {
            (n.floor() as u64).min(total)
        }
    }

    /// Seconds after the run's start at which message `k` (from 0) is due, or `None` when
    /// it falls after `stop_secs`.
    pub fn time_of(&self, k: u64) -> Option<f64> {
        let n = k as f64 + self.phase;
        let a = 0.5 * self.slope();
        let b = self.rate_from;
        let t = if a.abs() < 1e-12 {
            if b <= 0.0 {
                return None;
            }
            n / b
        } else {
            let disc = b * b + 4.0 * a * n;
            if disc < 0.0 {
                return None;
            }
            (-b + disc.sqrt()) / (2.0 * a)
        };
        let at = self.start_secs + t;
        (at.is_finite() && at < self.stop_secs).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_valid_deterministic_and_spread() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        let spec = RecipientSpec::Uniform {
            population: POPULATION_MAX,
        };
        let mut ga = RecipientGen::new(&spec, 0, 0, None);
        let mut gb = RecipientGen::new(&spec, 0, 0, None);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let r = ga.next(&mut a);
            assert_eq!(r, gb.next(&mut b));
            assert!(r.as_str().starts_with("+1555") && r.as_str().len() == 12);
            seen.insert(r);
        }
        assert!(seen.len() > 990, "only {} distinct", seen.len());
    }

    #[test]
    fn new_recipients_never_repeat_across_senders_and_connections() {
        let mut rng = XorShift::new(1);
        let mut seen = std::collections::HashSet::new();
        for sender in [0, 1, 999] {
            for conn in [0, 1] {
                let mut g = RecipientGen::new(&RecipientSpec::New, sender, conn, None);
                for _ in 0..500 {
                    assert!(seen.insert(g.next(&mut rng)));
                }
            }
        }
    }

    #[test]
    fn zipf_is_skewed_towards_low_ranks() {
        let spec = RecipientSpec::Zipf {
            s: 1.2,
            population: 1000,
        };
        spec.check().unwrap();
        let mut g = RecipientGen::new(&spec, 0, 0, Some(zipf_table(1.2, 1000)));
        let mut rng = XorShift::new(3);
        let top = (0..10_000)
            .filter(|_| g.next(&mut rng) == population_recipient(0))
            .count();
        // P(rank 1) = 1 / H(1000, 1.2) ≈ 0.22.
        assert!((1800..2600).contains(&top), "{top}");
    }

    #[test]
    fn sizes_parse_and_draw_within_bounds() {
        assert_eq!(SizeSpec::parse("1024").unwrap(), SizeSpec::Fixed(1024));
        let r = SizeSpec::parse("100-200").unwrap();
        let w = SizeSpec::parse("10:3,1000:1").unwrap();
        assert_eq!(w, SizeSpec::Weighted(vec![(10, 3), (1000, 1)]));
        assert!(SizeSpec::parse("200-100").is_err());
        assert!(SizeSpec::parse("10:0").is_err());
        let mut rng = XorShift::new(9);
        let mut small = 0;
        for _ in 0..4000 {
            assert!((100..=200).contains(&r.draw(&mut rng)));
            if w.draw(&mut rng) == 10 {
                small += 1;
            }
        }
        assert!((2700..3300).contains(&small), "{small}");
        assert_eq!((r.max(), w.max()), (200, 1000));
        assert_eq!(&filler(7)[..], b"courier");
    }

    #[test]
    fn constant_schedule_spaces_messages_evenly() {
        let s = Schedule {
            start_secs: 1.0,
            stop_secs: 2.0,
            rate_from: 100.0,
            rate_to: 100.0,
            phase: 0.0,
        };
        assert_eq!(s.time_of(0), Some(1.0));
        assert!((s.time_of(50).unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(s.time_of(100), None);
        assert_eq!(s.due_by(0.5), 0);
        assert_eq!(s.due_by(1.0), 1);
        assert_eq!(s.due_by(1.5), 51);
        assert_eq!(s.due_by(9.0), 100);
    }

    #[test]
    fn ramp_schedule_inverts_its_count() {
        let s = Schedule {
            start_secs: 0.0,
            stop_secs: 10.0,
            rate_from: 0.0,
            rate_to: 1000.0,
            phase: 0.5,
        };
        // Half way the rate is 500/s and a quarter of the 5,000 messages were due.
        assert!((s.due_by(5.0) as i64 - 1250).abs() <= 1);
        assert_eq!(s.due_by(10.0), 5000);
        for k in [0u64, 1, 10, 1000, 4999] {
            let t = s.time_of(k).unwrap();
            assert_eq!(s.due_by(t + 1e-9), k + 1, "k {k} t {t}");
        }
        assert_eq!(s.time_of(5000), None);
    }
}
