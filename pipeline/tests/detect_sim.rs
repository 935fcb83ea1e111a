//! Seeded, virtual-time simulations of the detector (issue 5 acceptance): normal senders
//! for simulated days, a blast, a slow ramp, a report storm, on one shard and spread over
//! eight shards exchanging deltas every 100 ms, each with and without a restart
//! (checkpoint -> restore) in the middle.
//!
//! Traffic is sampled: a few thousand messages per simulated hour per sender, so days
//! run in seconds.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use courier_pipeline::detect::{
    BusinessLimits, BusinessSignal, DetectConfig, Detector, Rating, Verdict, Why,
};
use courier_pipeline::registry::Tier;
use courier_pipeline::wire::{Reason, Recipient};

const SECRET: [u8; 16] = *b"sim-secret-key!!";
const HOUR_MS: u64 = 3_600_000;
const EXCHANGE_MS: u64 = 100;

/// SplitMix64: tiny, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential inter-arrival with this mean, at least 1 ms.
    fn exp_ms(&mut self, mean_ms: f64) -> u64 {
        ((-(1.0 - self.unit()).ln()) * mean_ms).max(1.0) as u64
    }
}

struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

fn number(sender: u32, idx: u64) -> Recipient {
    assert!(idx < 10_000_000);
    Recipient::parse(format!("+1{sender:03}{idx:07}").as_bytes()).expect("valid E.164")
}

#[derive(Clone, Copy)]
enum Pattern {
    /// Zipf recipients at a steady rate that grows by `growth_per_day` (fraction).
    Normal { per_hour: f64, growth_per_day: f64 },
    /// Normal until `start_ms`, then never-contacted numbers at `per_sec` attempts.
    Blast {
        per_hour: f64,
        start_ms: u64,
        per_sec: f64,
    },
    /// New numbers only, at a rate rising linearly from `from_per_hour` by
    /// `step_per_hour` every hour: slow enough never to look like a surge.
    Ramp {
        from_per_hour: f64,
        step_per_hour: f64,
    },
    /// Normal, and from `start_ms` recipients report `report_share` of its messages.
    Reported {
        per_hour: f64,
        start_ms: u64,
        report_share: f64,
    },
}

struct Sender {
    limits: BusinessLimits,
    pattern: Pattern,
    zipf: Zipf,
    next_new: u64,
}

impl Sender {
    fn new(id: u32, tier: Tier, mps: u32, population: usize, pattern: Pattern) -> Sender {
        Sender {
            limits: BusinessLimits {
                id,
                tier,
                mps,
                exempt: false,
                baseline_per_min: 0,
            },
            pattern,
            zipf: Zipf::new(population, 1.0),
            next_new: 5_000_000,
        }
    }

    fn mean_gap_ms(&self, now: u64) -> f64 {
        let per_hour = match self.pattern {
            Pattern::Normal {
                per_hour,
                growth_per_day,
            } => per_hour * (1.0 + growth_per_day * now as f64 / (24 * HOUR_MS) as f64),
            Pattern::Blast {
                per_hour,
                start_ms,
                per_sec,
            } => {
                if now >= start_ms {
                    per_sec * 3600.0
                } else {
                    per_hour
                }
            }
            Pattern::Ramp {
                from_per_hour,
                step_per_hour,
            } => from_per_hour + step_per_hour * (now / HOUR_MS) as f64,
            Pattern::Reported { per_hour, .. } => per_hour,
        };
        HOUR_MS as f64 / per_hour
    }

    fn recipient_idx(&mut self, now: u64, rng: &mut Rng) -> u64 {
        let fresh = match self.pattern {
            Pattern::Blast { start_ms, .. } => now >= start_ms,
            Pattern::Ramp { .. } => true,
            _ => false,
        };
        if fresh {
            self.next_new += 1;
            self.next_new
        } else {
            self.zipf.sample(rng)
        }
    }
}

/// `n` detectors standing for `n` shards; with more than one, every 100 ms of virtual
/// time each exports a delta that every other merges (what the shell does over
/// crossbeam channels).
struct Cluster {
    cfg: DetectConfig,
    shards: Vec<Detector>,
    next_exchange: u64,
    exchanges: bool,
}

impl Cluster {
    fn new(n: usize, cfg: DetectConfig, exchanges: bool) -> Cluster {
        Cluster {
            shards: (0..n).map(|_| Detector::new(cfg.clone(), SECRET)).collect(),
            cfg,
            next_exchange: EXCHANGE_MS,
            exchanges,
        }
    }

    fn advance_to(&mut self, now: u64) {
        if self.shards.len() == 1 || !self.exchanges {
            return;
        }
        while self.next_exchange <= now {
            let t = self.next_exchange;
            let deltas: Vec<_> = self.shards.iter_mut().map(|s| s.export_delta(t)).collect();
            for (i, s) in self.shards.iter_mut().enumerate() {
                for (j, d) in deltas.iter().enumerate() {
                    if i != j {
                        s.merge(t, d);
                    }
                }
            }
            self.next_exchange += EXCHANGE_MS;
        }
    }

    /// Restart: every shard checkpoints, and a fresh detector restores it.
    fn restart(&mut self) {
        for s in &mut self.shards {
            let bytes = s.checkpoint();
            let mut fresh = Detector::new(self.cfg.clone(), SECRET);
            fresh.restore(&bytes).expect("own checkpoint restores");
            *s = fresh;
        }
    }

    fn signals(&mut self) -> Vec<BusinessSignal> {
        let mut v = Vec::new();
        for s in &mut self.shards {
            while let Some(sig) = s.poll_signal() {
                v.push(sig);
            }
        }
        v
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    admitted: u64,
    throttled: u64,
    limit_rejected: u64,
    paused_rejected: u64,
    first_pause_ms: Option<u64>,
    signals: Vec<(u64, u32, Rating, Tier, bool, Option<Why>)>,
    /// Admitted (hour, recipient index) pairs, for the exact 24 h truth.
    admitted_by_hour: Vec<(u64, u64)>,
    final_rating: Option<Rating>,
    final_tier: Option<Tier>,
}

struct Run {
    seed: u64,
    shards: usize,
    exchanges: bool,
    until_ms: u64,
    restart_at_ms: Option<u64>,
    cfg: DetectConfig,
}

fn run(spec: &Run, mut senders: Vec<Sender>) -> HashMap<u32, Outcome> {
    let mut rng = Rng(spec.seed);
    let mut cluster = Cluster::new(spec.shards, spec.cfg.clone(), spec.exchanges);
    let mut heap = BinaryHeap::new();
    for (i, s) in senders.iter().enumerate() {
        heap.push(Reverse((rng.exp_ms(s.mean_gap_ms(0)), i)));
    }
    let mut out: HashMap<u32, Outcome> = HashMap::new();
    let mut restart_at = spec.restart_at_ms;
    while let Some(Reverse((now, i))) = heap.pop() {
        if now > spec.until_ms {
            break;
        }
        if let Some(at) = restart_at {
            if now >= at {
                cluster.advance_to(at);
                collect_signals(&mut cluster, at, &mut out);
                cluster.restart();
                restart_at = None;
            }
        }
        cluster.advance_to(now);
        let s = &mut senders[i];
        let idx = s.recipient_idx(now, &mut rng);
        let shard = (rng.next() % spec.shards as u64) as usize;
        let v = cluster.shards[shard].observe(now, &s.limits, &number(s.limits.id, idx));
        let o = out.entry(s.limits.id).or_default();
        match v {
            Verdict::Admit => {
                o.admitted += 1;
                o.admitted_by_hour.push((now / HOUR_MS, idx));
                cluster.shards[shard].record_accepted(now, s.limits.id, 1);
                if let Pattern::Reported {
                    start_ms,
                    report_share,
                    ..
                } = s.pattern
                {
                    if now >= start_ms && rng.unit() < report_share {
                        // REPORT frames arrive on the platform's connection: shard 0.
                        cluster.shards[0].report(now, s.limits.id, 1);
                    }
                }
            }
            Verdict::Throttle { .. } => o.throttled += 1,
            Verdict::Reject(Reason::MessagingLimitReached) => o.limit_rejected += 1,
            Verdict::Reject(Reason::SenderPaused) => {
                o.paused_rejected += 1;
                o.first_pause_ms.get_or_insert(now);
            }
            Verdict::Reject(r) => panic!("unexpected reason {r:?}"),
        }
        let gap = rng.exp_ms(s.mean_gap_ms(now));
        heap.push(Reverse((now + gap, i)));
        if now % 1000 == 0 {
            collect_signals(&mut cluster, now, &mut out);
        }
    }
    collect_signals(&mut cluster, spec.until_ms, &mut out);
    for s in &senders {
        let sig = cluster.shards[0].signal(s.limits.id);
        let o = out.entry(s.limits.id).or_default();
        o.final_rating = sig.map(|s| s.rating);
        o.final_tier = sig.map(|s| s.tier);
    }
    out
}

fn collect_signals(cluster: &mut Cluster, now: u64, out: &mut HashMap<u32, Outcome>) {
    for s in cluster.signals() {
        out.entry(s.business_id).or_default().signals.push((
            now,
            s.business_id,
            s.rating,
            s.tier,
            s.paused,
            s.why,
        ));
    }
}

/// Most distinct recipients admitted in any rolling 24 h (hour-aligned, as enforced).
fn max_unique_24h(o: &Outcome) -> usize {
    let last = o.admitted_by_hour.last().map_or(0, |x| x.0);
    (0..=last)
        .map(|h| {
            o.admitted_by_hour
                .iter()
                .filter(|(ah, _)| *ah + 24 > h && *ah <= h)
                .map(|(_, r)| *r)
                .collect::<HashSet<_>>()
                .len()
        })
        .max()
        .unwrap_or(0)
}

fn normal_mix(first_id: u32) -> Vec<Sender> {
    let mut v = Vec::new();
    for k in 0..10u32 {
        let per_hour = 1_500.0 + 300.0 * f64::from(k);
        let growth = if k % 3 == 0 { 0.10 } else { 0.0 };
        let population = 3_000 + 4_000 * k as usize;
        v.push(Sender::new(
            first_id + k,
            if k < 3 { Tier::T10k } else { Tier::T100k },
            80,
            population,
            Pattern::Normal {
                per_hour,
                growth_per_day: growth,
            },
        ));
    }
    v
}

fn assert_unflagged(out: &HashMap<u32, Outcome>, ids: impl Iterator<Item = u32>) {
    for id in ids {
        let o = &out[&id];
        assert_eq!(o.paused_rejected, 0, "sender {id} paused: {:?}", o.signals);
        assert!(
            o.signals.is_empty(),
            "sender {id} signalled: {:?}",
            o.signals
        );
        assert_eq!(o.limit_rejected, 0, "sender {id} hit its tier");
        assert!(
            o.throttled * 200 < o.admitted,
            "sender {id}: {} throttled of {}",
            o.throttled,
            o.admitted
        );
        assert_eq!(o.final_rating, Some(Rating::Green));
    }
}

fn spec(shards: usize, until_ms: u64, restart_at_ms: Option<u64>) -> Run {
    Run {
        seed: 0x5eed,
        shards,
        exchanges: true,
        until_ms,
        restart_at_ms,
        cfg: DetectConfig::default(),
    }
}

#[test]
fn normal_senders_for_two_days_are_never_flagged_and_a_restart_changes_nothing() {
    let until = 48 * HOUR_MS;
    let a = run(&spec(1, until, None), normal_mix(1));
    assert_unflagged(&a, 1..=10);
    let total: u64 = a.values().map(|o| o.admitted).sum();
    assert!(total > 1_000_000, "{total} messages");
    let b = run(&spec(1, until, Some(30 * HOUR_MS + 17)), normal_mix(1));
    assert_eq!(a, b, "restart in the middle changed an outcome");
}

fn blast_senders(start_ms: u64, per_sec: f64) -> Vec<Sender> {
    let mut v = normal_mix(1);
    v.push(Sender::new(
        50,
        Tier::T100k,
        80,
        20_000,
        Pattern::Blast {
            per_hour: 2_000.0,
            start_ms,
            per_sec,
        },
    ));
    v
}

#[test]
fn blast_is_flagged_within_one_second_and_after_a_restart_too() {
    let start = 2 * HOUR_MS + 123;
    let until = start + 60_000;
    let plain = run(&spec(1, until, None), blast_senders(start, 500.0));
    for restart in [None, Some(start - 5_000), Some(start + 2_000)] {
        let out = run(&spec(1, until, restart), blast_senders(start, 500.0));
        assert_eq!(out, plain, "restart at {restart:?} changed an outcome");
        let o = &out[&50];
        let at = o.first_pause_ms.expect("blast flagged");
        eprintln!(
            "1 shard, restart {restart:?}: blast flagged {} ms after onset",
            at - start
        );
        assert!(
            at >= start && at - start < 1_000,
            "flagged {} ms after onset",
            at as i64 - start as i64
        );
        assert!(o
            .signals
            .iter()
            .any(|s| s.4 && s.5 == Some(Why::FanOutSurge)));
        // Still paused at the end, restart or not.
        assert!(o.paused_rejected > 20_000, "{}", o.paused_rejected);
        assert_unflagged(&out, 1..=10);
    }
}

#[test]
fn blast_spread_over_8_shards_is_flagged_within_one_second() {
    // 200 attempts/s over 8 shards is 25/s per shard: below the surge floor (50/s) on
    // every shard alone; only the merged view shows it.
    let start = 2 * HOUR_MS + 123;
    let until = start + 30_000;
    let alone = Run {
        exchanges: false,
        ..spec(8, until, None)
    };
    let out = run(&alone, blast_senders(start, 200.0));
    assert_eq!(
        out[&50].first_pause_ms, None,
        "no single shard sees the surge"
    );
    for restart in [None, Some(start + 200)] {
        let out = run(&spec(8, until, restart), blast_senders(start, 200.0));
        let at = out[&50].first_pause_ms.expect("flagged across shards");
        eprintln!(
            "8 shards, restart {restart:?}: blast flagged {} ms after onset",
            at - start
        );
        assert!(at - start < 1_000, "flagged {} ms after onset", at - start);
        assert_unflagged(&out, 1..=10);
    }
}

fn ramp(id: u32, tier: Tier) -> Sender {
    Sender::new(
        id,
        tier,
        80,
        1,
        Pattern::Ramp {
            from_per_hour: 20.0,
            step_per_hour: 20.0,
        },
    )
}

#[test]
fn slow_ramp_is_stopped_at_its_tier_on_one_and_on_8_shards() {
    let until = 40 * HOUR_MS;
    let plain = run(&spec(1, until, None), vec![ramp(60, Tier::T2k)]);
    for (shards, restart) in [
        (1, None),
        (1, Some(20 * HOUR_MS + 5)),
        (8, None),
        (8, Some(20 * HOUR_MS + 5)),
    ] {
        let out = run(&spec(shards, until, restart), vec![ramp(60, Tier::T2k)]);
        if shards == 1 {
            assert_eq!(out, plain, "restart changed an outcome");
        }
        let o = &out[&60];
        let max = max_unique_24h(o);
        eprintln!(
            "{shards} shards, restart {restart:?}: ramp peaked at {max} unique in 24 h (tier 2000)"
        );
        assert!(
            (1_900..=2_100).contains(&max),
            "{shards} shards: {max} unique recipients in 24 h for tier 2000"
        );
        assert!(o.limit_rejected > 1_000, "{}", o.limit_rejected);
        assert_eq!(o.first_pause_ms, None, "a ramp is not a surge");
    }
}

#[test]
fn slow_ramp_at_tier_10k_is_stopped_within_the_sketch_error() {
    // Above exact_recipients_max the 24 hourly HyperLogLogs count (standard error 2.3 %
    // at p = 11), and at the limit "already counted" is judged by the past-recipient
    // filter and the sketch registers, with an overdraft of 0.5 % of the limit. The bound
    // asserted is the limit + 0.5 % + 3 standard errors; the figure is printed, and the
    // 5 % target holds only at about 2 standard errors (see the module docs).
    let until = 30 * HOUR_MS;
    let s = Sender::new(
        61,
        Tier::T10k,
        80,
        1,
        Pattern::Ramp {
            from_per_hour: 100.0,
            step_per_hour: 100.0,
        },
    );
    let out = run(&spec(1, until, None), vec![s]);
    let o = &out[&61];
    let max = max_unique_24h(o);
    eprintln!("tier 10000 ramp peaked at {max} unique in 24 h");
    assert!(
        (9_500..=10_740).contains(&max),
        "{max} unique recipients in 24 h for tier 10000"
    );
}

#[test]
fn rate_limit_holds_within_5_percent_across_8_shards() {
    // Attempts at 5x the limit, spread over 8 shards, to a recipient set large enough that
    // the same-recipient limit never binds; fan-out detection is out of this test.
    let cfg = DetectConfig {
        surge_distinct_per_sec_min: 1_000_000,
        ..DetectConfig::default()
    };
    let secs = 120;
    for shards in [1, 8] {
        let s = Sender::new(
            70,
            Tier::Unlimited,
            80,
            50_000,
            Pattern::Normal {
                per_hour: 400.0 * 3600.0,
                growth_per_day: 0.0,
            },
        );
        let r = Run {
            cfg: cfg.clone(),
            ..spec(shards, secs * 1000, None)
        };
        let out = run(&r, vec![s]);
        let admitted = out[&70].admitted;
        let expected = 80 * (1 + secs); // one second of burst, then 80/s
        let err = (admitted as f64 - expected as f64).abs() / expected as f64;
        eprintln!(
            "{shards} shards: admitted {admitted} of {expected} allowed ({:+.2} %)",
            100.0 * (admitted as f64 / expected as f64 - 1.0)
        );
        assert!(
            err < 0.05,
            "{shards} shards: admitted {admitted}, limit allows {expected}"
        );
    }
}

#[test]
fn report_storm_turns_a_sender_red_and_lowers_its_tier() {
    let start = 2 * HOUR_MS;
    let until = 4 * HOUR_MS;
    let mut senders = normal_mix(1);
    senders.push(Sender::new(
        80,
        Tier::T10k,
        80,
        8_000,
        Pattern::Reported {
            per_hour: 2_000.0,
            start_ms: start,
            report_share: 0.2,
        },
    ));
    for (shards, restart) in [
        (1, None),
        (1, Some(start + 600_000)),
        (8, None),
        (8, Some(start + 600_000)),
    ] {
        let out = run(&spec(shards, until, restart), senders_clone(&senders));
        let o = &out[&80];
        assert_eq!(o.final_rating, Some(Rating::Red), "{shards} shards");
        assert_eq!(o.final_tier, Some(Tier::T2k));
        assert!(o
            .signals
            .iter()
            .any(|s| s.2 == Rating::Red && s.5 == Some(Why::QualityRed)));
        assert_unflagged(&out, 1..=10);
    }
}

fn senders_clone(v: &[Sender]) -> Vec<Sender> {
    v.iter()
        .map(|s| {
            Sender::new(
                s.limits.id,
                s.limits.tier,
                s.limits.mps,
                s.zipf.cdf.len(),
                s.pattern,
            )
        })
        .collect()
}
