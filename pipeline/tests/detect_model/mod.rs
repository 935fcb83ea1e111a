//! A labelled traffic model for the detector (issue 14): seeded senders whose behaviour
//! is *normal* (must never be paused or rejected) or *abusive* (must be flagged), each
//! run alone on a cluster of detectors in virtual time, as a client following the README
//! would send it (batches, throttled messages resent after their retry-after, or sooner),
//! with the shards exchanging deltas every 100 ms as the shell does.
//!
//! Shared by `pipeline/tests/detect_quality.rs` (a few seeds, [`Depth::Quick`], in CI)
//! and `benches/detect_quality.rs` (at least 20 seeds, [`Depth::Full`]: the table in
//! BENCHMARKS.md). A run's parameters are drawn from its seed; the run is replayed
//! exactly from it.
//!
//! What "flagged" means, per behaviour, and from when its time to flag is measured:
//! - surges (blast, spread, large sender's jump): paused (`sender_paused`), from the onset;
//! - slow ramp: its first `messaging_limit_reached`, from the first attempt to a new
//!   recipient made when its true distinct recipients in 24 h had reached the tier;
//! - report storm: its red rating, from the moment its true reports per million
//!   delivered (24 h) reached `rating_red_ppm` with at least `rating_reports_min` reports;
//! - a normal behaviour is a false positive if any of its messages is paused or rejected
//!   (throttling by its own `mps` is the answer it asked for, and is counted apart).
#![allow(dead_code)]

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};

use courier_pipeline::detect::{BusinessLimits, DetectConfig, Detector, Rating, Verdict, Why};
use courier_pipeline::registry::Tier;
use courier_pipeline::wire::{Reason, Recipient};

const SECRET: [u8; 16] = *b"model-secret-key";
const EXCHANGE_MS: u64 = 100;
const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
/// Most rounds a client resends one batch's throttled messages.
const ROUNDS_MAX: u32 = 500;
/// Business id of the modelled sender.
const ID: u32 = 77;

/// What the detector should conclude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// Must never be paused or rejected.
    Normal,
    /// Must be flagged.
    Abusive,
}

/// How long the runs are: `Quick` for CI, `Full` for the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Shorter warm-ups and steady phases.
    Quick,
    /// The benchmark's lengths.
    Full,
}

/// The behaviours of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Bursts of 20-45 new numbers at mps 5-20; throttled ones resent after their
    /// retry-after (the first case of issue 14 is mps 10 and 30 numbers).
    RetryAfter,
    /// The same, resent every 5-50 ms whatever the server says, each round on a random
    /// one of two connections (shards).
    RetryEager,
    /// A sender with a Zipf audience, offline 1-5 minutes, then sending its whole backlog
    /// at once (resent after throttling).
    ReconnectBurst,
    /// An audience of 500-6,000 messaged once over a day, then a campaign to all of it at
    /// once at mps 50-500.
    DailyCampaign,
    /// Steady Zipf traffic, 0.5-20 msg/s over 1,000-200,000 recipients, growing up to
    /// 20 % a day.
    ZipfMix,
    /// A declared baseline of 1,000-100,000 recipients a minute, sending about that (0.7 to
    /// 1.3 of it) to fresh numbers (and 10 % follow-ups to recent ones), on two shards.
    LargeDeclared,
    /// One-time codes: fresh numbers, one at a time, at a steady 0.2-20 a second.
    Otp,
    /// An established sender starts messaging 100-1,000 never-contacted numbers a second.
    Blast,
    /// New numbers at a rate rising by 20 an hour each hour, into tier 250 or 2,000.
    SlowRamp,
    /// A blast of 200-800 a second spread over 8 connections on 8 shards.
    Spread,
    /// A declared large sender (1,000-100,000 a minute) jumping to 10 times that.
    LargeJump,
    /// An established sender whose messages start being reported (5-30 % of them).
    ReportStorm,
}

impl Behaviour {
    /// Every behaviour, normal ones first.
    pub const ALL: [Behaviour; 12] = [
        Behaviour::RetryAfter,
        Behaviour::RetryEager,
        Behaviour::ReconnectBurst,
        Behaviour::DailyCampaign,
        Behaviour::ZipfMix,
        Behaviour::LargeDeclared,
        Behaviour::Otp,
        Behaviour::Blast,
        Behaviour::SlowRamp,
        Behaviour::Spread,
        Behaviour::LargeJump,
        Behaviour::ReportStorm,
    ];

    /// Its label.
    pub fn label(self) -> Label {
        match self {
            Behaviour::Blast
            | Behaviour::SlowRamp
            | Behaviour::Spread
            | Behaviour::LargeJump
            | Behaviour::ReportStorm => Label::Abusive,
            _ => Label::Normal,
        }
    }

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::RetryAfter => "retry after retry_after",
            Behaviour::RetryEager => "retry every 5-50 ms, 2 shards",
            Behaviour::ReconnectBurst => "burst after reconnect",
            Behaviour::DailyCampaign => "daily campaign, existing audience",
            Behaviour::ZipfMix => "Zipf mix",
            Behaviour::LargeDeclared => "large sender at its declared baseline",
            Behaviour::Otp => "one-time codes, fresh numbers",
            Behaviour::Blast => "blast of new numbers",
            Behaviour::SlowRamp => "slow ramp into the tier",
            Behaviour::Spread => "blast over 8 connections/shards",
            Behaviour::LargeJump => "large sender jumps 10x",
            Behaviour::ReportStorm => "report storm",
        }
    }
}

/// What happened to one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The behaviour.
    pub behaviour: Behaviour,
    /// Its seed.
    pub seed: u64,
    /// The run's parameters, in words.
    pub params: String,
    /// Messages admitted (last answer of each, after resends).
    pub admitted: u64,
    /// Answers `throttled` (every round).
    pub throttled: u64,
    /// Answers `rejected(messaging_limit_reached)`.
    pub limit_rejected: u64,
    /// Answers `rejected(sender_paused)`.
    pub paused_rejected: u64,
    /// First `sender_paused`, ms.
    pub paused_at_ms: Option<u64>,
    /// First `messaging_limit_reached`, ms.
    pub limit_at_ms: Option<u64>,
    /// First red rating signal, ms.
    pub red_at_ms: Option<u64>,
    /// When the abuse began or became flaggable (see the module docs), ms.
    pub due_ms: Option<u64>,
    /// Flagged as its label says it should be (abusive) or at all (normal).
    pub flagged: bool,
    /// From `due_ms` to the flag, ms (abusive and flagged).
    pub time_to_flag_ms: Option<u64>,
    /// What the detector said it measured when it paused, if it did.
    pub evidence: Option<String>,
}

/// SplitMix64: tiny, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, behaviour: Behaviour) -> Rng {
        let b = Behaviour::ALL
            .iter()
            .position(|x| *x == behaviour)
            .expect("listed") as u64;
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (b << 56) ^ 0x5eed)
    }
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
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Exponential gap with this mean, ms (fractional: the caller accumulates).
    fn exp(&mut self, mean_ms: f64) -> f64 {
        -(1.0 - self.unit()).ln() * mean_ms
    }
}

/// Zipf over `n` ranks by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        assert!(n > 0 && n <= 1 << 20);
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64
    }
    /// The highest rate at which the top recipient gets at most 3 messages in 10 s: a
    /// normal sender does not message one number more often (and the same-recipient
    /// limit, 5 per 10 s, would throttle it, rightly).
    fn rate_cap(&self) -> f64 {
        0.3 / self.cdf[0]
    }
}

/// `+1`, three digits of `space`, seven of `idx`: audiences and fresh numbers of a run
/// live in spaces of their own.
fn number(space: u32, idx: u64) -> Recipient {
    assert!(space < 1_000 && idx < 10_000_000);
    let mut s = *b"+1__________";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for d in s[at..at + width].iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(2, 3, u64::from(space));
    put(5, 7, idx);
    Recipient::parse(&s).expect("valid E.164")
}

/// How the modelled client resends throttled messages.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// After the largest retry-after of the round (`submit_with_retry`, `courier send`).
    AfterRetryAfter,
    /// After a fixed wait, ignoring the retry-after; on a random connection when `roam`.
    Fixed { wait_ms: u64, roam: bool },
}

/// A batch the client sends: at `at_ms`, on connection `conn`, to these recipients.
struct Batch {
    at_ms: u64,
    conn: usize,
    to: Vec<Recipient>,
    round: u32,
}

impl PartialEq for Batch {
    fn eq(&self, o: &Batch) -> bool {
        self.at_ms == o.at_ms
    }
}
impl Eq for Batch {}
impl PartialOrd for Batch {
    fn partial_cmp(&self, o: &Batch) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Batch {
    fn cmp(&self, o: &Batch) -> Ordering {
        self.at_ms.cmp(&o.at_ms)
    }
}

/// A run: the sender's limits, its first-attempt batches in time order, and how the
/// client resends.
struct Plan {
    limits: BusinessLimits,
    shards: usize,
    /// Connection `c` lands on shard `c % shards`.
    connections: usize,
    retry: Retry,
    batches: Vec<Batch>,
    /// Each admitted message is reported with this probability from `reports_from_ms`.
    report_share: f64,
    reports_from_ms: u64,
    /// Onset of a surge-like abuse (ground truth for its time to flag).
    onset_ms: Option<u64>,
    /// Track distinct admitted recipients against this tier (slow ramp's ground truth).
    ramp_tier: Option<u64>,
    params: String,
}

/// `n` detectors for `n` shards, exchanging deltas every 100 ms of virtual time.
struct Cluster {
    shards: Vec<Detector>,
    next_exchange: u64,
}

impl Cluster {
    fn new(n: usize, cfg: &DetectConfig) -> Cluster {
        let mut shards: Vec<Detector> =
            (0..n).map(|_| Detector::new(cfg.clone(), SECRET)).collect();
        if n > 1 {
            for s in &mut shards {
                s.export_delta(0);
            }
        }
        Cluster {
            shards,
            next_exchange: EXCHANGE_MS,
        }
    }

    fn advance_to(&mut self, now: u64) {
        if self.shards.len() == 1 {
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
}

/// Runs one seeded instance of `behaviour`.
pub fn run(behaviour: Behaviour, seed: u64, depth: Depth, cfg: &DetectConfig) -> Outcome {
    let mut rng = Rng::new(seed, behaviour);
    let plan = plan(behaviour, &mut rng, depth);
    simulate(behaviour, seed, plan, &mut rng, cfg)
}

fn simulate(
    behaviour: Behaviour,
    seed: u64,
    plan: Plan,
    rng: &mut Rng,
    cfg: &DetectConfig,
) -> Outcome {
    let mut out = Outcome {
        behaviour,
        seed,
        params: plan.params.clone(),
        admitted: 0,
        throttled: 0,
        limit_rejected: 0,
        paused_rejected: 0,
        paused_at_ms: None,
        limit_at_ms: None,
        red_at_ms: None,
        due_ms: plan.onset_ms,
        flagged: false,
        time_to_flag_ms: None,
        evidence: None,
    };
    let mut cluster = Cluster::new(plan.shards, cfg);
    let mut first = plan.batches.into_iter().peekable();
    let mut resends: BinaryHeap<Reverse<Batch>> = BinaryHeap::new();
    let mut verdicts = Vec::new();
    let mut admitted_set: HashSet<Recipient> = HashSet::new();
    let (mut reports, mut delivered) = (0u64, 0u64);
    loop {
        // The earlier of the next first attempt and the next resend.
        let take_first = match (first.peek(), resends.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(f), Some(Reverse(r))) => f.at_ms <= r.at_ms,
        };
        let b = if take_first {
            first.next().expect("peeked")
        } else {
            resends.pop().expect("peeked").0
        };
        let now = b.at_ms;
        cluster.advance_to(now);
        let shard = b.conn % plan.shards;
        if let (Some(tier), None) = (plan.ramp_tier, out.due_ms) {
            if admitted_set.len() as u64 >= tier && b.to.iter().any(|r| !admitted_set.contains(r)) {
                out.due_ms = Some(now);
            }
        }
        verdicts.clear();
        cluster.shards[shard].observe_batch(now, &plan.limits, &b.to, &mut verdicts);
        let mut again = Vec::new();
        let mut wait = 0u64;
        for (r, v) in b.to.iter().zip(&verdicts) {
            match *v {
                Verdict::Admit => {
                    out.admitted += 1;
                    delivered += 1;
                    if plan.ramp_tier.is_some() {
                        admitted_set.insert(*r);
                    }
                    if plan.report_share > 0.0
                        && now >= plan.reports_from_ms
                        && rng.unit() < plan.report_share
                    {
                        // REPORT frames arrive on the platform's connection: shard 0.
                        cluster.shards[0].report(now, ID, 1);
                        reports += 1;
                        if out.due_ms.is_none()
                            && reports >= u64::from(cfg.rating_reports_min)
                            && reports * 1_000_000 >= u64::from(cfg.rating_red_ppm) * delivered
                        {
                            out.due_ms = Some(now);
                        }
                    }
                }
                Verdict::Throttle { retry_after_ms } => {
                    out.throttled += 1;
                    wait = wait.max(u64::from(retry_after_ms));
                    again.push(*r);
                }
                Verdict::Reject(Reason::SenderPaused) => {
                    out.paused_rejected += 1;
                    out.paused_at_ms.get_or_insert(now);
                }
                Verdict::Reject(Reason::MessagingLimitReached) => {
                    out.limit_rejected += 1;
                    out.limit_at_ms.get_or_insert(now);
                }
                Verdict::Reject(r) => panic!("unexpected reason {r:?}"),
            }
        }
        for s in &mut cluster.shards {
            while let Some(sig) = s.poll_signal() {
                if sig.rating == Rating::Red && sig.why == Some(Why::QualityRed) {
                    out.red_at_ms.get_or_insert(now);
                }
                if sig.paused && sig.why == Some(Why::FanOutSurge) && out.evidence.is_none() {
                    out.evidence = sig.evidence.map(|e| e.to_string());
                }
            }
        }
        if !again.is_empty() && b.round < ROUNDS_MAX {
            let (wait, conn) = match plan.retry {
                Retry::AfterRetryAfter => (wait, b.conn),
                Retry::Fixed { wait_ms, roam } => (
                    wait_ms,
                    if roam {
                        rng.below(plan.connections as u64) as usize
                    } else {
                        b.conn
                    },
                ),
            };
            resends.push(Reverse(Batch {
                at_ms: now + wait.max(1),
                conn,
                to: again,
                round: b.round + 1,
            }));
        }
    }
    judge(&mut out, behaviour);
    out
}

fn judge(out: &mut Outcome, behaviour: Behaviour) {
    let flag_at = match behaviour {
        Behaviour::SlowRamp => out.limit_at_ms,
        Behaviour::ReportStorm => out.red_at_ms,
        _ => out.paused_at_ms,
    };
    match behaviour.label() {
        Label::Normal => {
            out.flagged = out.paused_rejected + out.limit_rejected > 0 || out.red_at_ms.is_some();
        }
        Label::Abusive => {
            out.flagged = flag_at.is_some();
            if let (Some(at), Some(due)) = (flag_at, out.due_ms) {
                out.time_to_flag_ms = Some(at.saturating_sub(due));
            }
        }
    }
}

/// A steady stream of single messages (Poisson), `per_sec` a second from `from_ms` to
/// `to_ms`, each to `pick()`.
fn poisson(
    rng: &mut Rng,
    from_ms: u64,
    to_ms: u64,
    per_sec: impl Fn(u64) -> f64,
    conn: usize,
    mut pick: impl FnMut(&mut Rng) -> Recipient,
    out: &mut Vec<Batch>,
) {
    let mut t = from_ms as f64;
    loop {
        t += rng.exp(SEC as f64 / per_sec(t as u64).max(1e-6));
        if t >= to_ms as f64 {
            return;
        }
        let to = vec![pick(rng)];
        out.push(Batch {
            at_ms: t as u64,
            conn,
            to,
            round: 0,
        });
    }
}

/// Batches of up to 64 at `per_sec(t)` messages a second, round-robin over `conns`
/// connections, from `from_ms` to `to_ms`.
fn paced(
    rng: &mut Rng,
    from_ms: u64,
    to_ms: u64,
    per_sec: impl Fn(u64) -> f64,
    conns: usize,
    mut pick: impl FnMut(&mut Rng) -> Recipient,
    out: &mut Vec<Batch>,
) {
    let mut t = from_ms as f64;
    let mut k = 0;
    while t < to_ms as f64 {
        let rate = per_sec(t as u64).max(1e-6);
        let n = (rate / 20.0).clamp(1.0, 64.0) as usize; // ~20 batches a second at most
        let to = (0..n).map(|_| pick(rng)).collect();
        out.push(Batch {
            at_ms: t as u64,
            conn: k % conns,
            to,
            round: 0,
        });
        k += 1;
        t += n as f64 * SEC as f64 / rate;
    }
}

fn limits(tier: Tier, mps: u32, baseline_per_min: u32) -> BusinessLimits {
    BusinessLimits {
        id: ID,
        tier,
        mps,
        exempt: false,
        baseline_per_min,
    }
}

fn plan(b: Behaviour, rng: &mut Rng, depth: Depth) -> Plan {
    let quick = depth == Depth::Quick;
    let base = Plan {
        limits: limits(Tier::T100k, 100, 0),
        shards: 1,
        connections: 1,
        retry: Retry::AfterRetryAfter,
        batches: Vec::new(),
        report_share: 0.0,
        reports_from_ms: 0,
        onset_ms: None,
        ramp_tier: None,
        params: String::new(),
    };
    match b {
        Behaviour::RetryAfter | Behaviour::RetryEager => plan_retries(b, rng, quick, base),
        Behaviour::ReconnectBurst => plan_reconnect(rng, quick, base),
        Behaviour::DailyCampaign => plan_campaign(rng, base),
        Behaviour::ZipfMix => plan_zipf(rng, quick, base),
        Behaviour::LargeDeclared | Behaviour::LargeJump => plan_large(b, rng, quick, base),
        Behaviour::Otp => plan_otp(rng, quick, base),
        Behaviour::Blast | Behaviour::Spread => plan_blast(b, rng, quick, base),
        Behaviour::SlowRamp => plan_ramp(rng, base),
        Behaviour::ReportStorm => plan_storm(rng, quick, base),
    }
}

fn plan_retries(b: Behaviour, rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let mps = [5u32, 10, 20][rng.below(3) as usize];
    // Up to 6,000 fresh numbers in 5 minutes at mps 20: tier 10,000 holds them.
    p.limits = limits(Tier::T10k, mps, 0);
    let until = if quick { 2 * MIN } else { 5 * MIN };
    let mut t = SEC;
    let mut fresh = 0;
    let mut sizes = Vec::new();
    while t < until {
        let k = 20 + rng.below(26) as usize;
        let to = (0..k)
            .map(|i| number(101, fresh + i as u64))
            .collect::<Vec<_>>();
        fresh += k as u64;
        sizes.push(k);
        p.batches.push(Batch {
            at_ms: t,
            conn: 0,
            to,
            round: 0,
        });
        // Demand no higher than the rate on average: the next burst after the last is
        // through, or later.
        let through_ms = k as u64 * SEC / u64::from(mps);
        t += through_ms + (rng.range(0.2, 2.0) * through_ms as f64) as u64;
    }
    if b == Behaviour::RetryEager {
        let wait_ms = 5 + rng.below(46);
        p.retry = Retry::Fixed {
            wait_ms,
            roam: true,
        };
        p.shards = 2;
        p.connections = 2;
        p.params = format!(
            "mps {mps}, {} bursts of 20-45, resent every {wait_ms} ms",
            sizes.len()
        );
    } else {
        p.params = format!("mps {mps}, {} bursts of 20-45", sizes.len());
    }
    p
}

fn plan_reconnect(rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let population = 2_000 + rng.below(18_001) as usize;
    let zipf = Zipf::new(population, rng.range(0.9, 1.1));
    let rate = rng.range(1.0, 5.0).min(zipf.rate_cap());
    let mps = ((10.0 * rate) as u32).max(20);
    p.limits = limits(Tier::T100k, mps, 0);
    let warm = if quick { 20 * MIN } else { HOUR };
    let gap = rng.range(60.0, 300.0) as u64 * SEC;
    let mut pick = |r: &mut Rng| number(201, zipf.sample(r));
    poisson(rng, 0, warm, |_| rate, 0, &mut pick, &mut p.batches);
    // Offline for `gap`: what it would have sent meanwhile goes at once on reconnect.
    let backlog = (rate * gap as f64 / SEC as f64) as usize;
    let back = warm + gap;
    let mut k = 0;
    while k < backlog {
        let n = (backlog - k).min(64);
        let to = (0..n).map(|_| pick(rng)).collect();
        p.batches.push(Batch {
            at_ms: back + (k / 64) as u64,
            conn: 0,
            to,
            round: 0,
        });
        k += n;
    }
    poisson(
        rng,
        back + 100,
        back + 5 * MIN,
        |_| rate,
        0,
        &mut pick,
        &mut p.batches,
    );
    p.params = format!(
        "{rate:.1}/s over Zipf {population}, offline {} s, backlog {backlog}, mps {mps}",
        gap / SEC
    );
    p
}

fn plan_campaign(rng: &mut Rng, mut p: Plan) -> Plan {
    let audience = 500 + rng.below(5_501);
    let mps = 50 + rng.below(451) as u32;
    p.limits = limits(Tier::T10k, mps, 0);
    // Day 0: each member once, at a random time (opt-in, conversations).
    let mut day0: Vec<(u64, u64)> = (0..audience).map(|i| (rng.below(20 * HOUR), i)).collect();
    day0.sort_unstable();
    for (t, i) in day0 {
        p.batches.push(Batch {
            at_ms: t,
            conn: 0,
            to: vec![number(301, i)],
            round: 0,
        });
    }
    // Day 1: the campaign, all of it at once in batches of 64, in a random order.
    let at = 24 * HOUR + rng.below(2 * HOUR);
    let mut order: Vec<u64> = (0..audience).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (k, chunk) in order.chunks(64).enumerate() {
        p.batches.push(Batch {
            at_ms: at + k as u64,
            conn: 0,
            to: chunk.iter().map(|&i| number(301, i)).collect(),
            round: 0,
        });
    }
    p.params = format!("audience {audience}, mps {mps}");
    p
}

fn plan_zipf(rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let population = 1_000 + rng.below(199_001) as usize;
    let s = rng.range(0.8, 1.2);
    let growth = rng.range(0.0, 0.2);
    let zipf = Zipf::new(population, s);
    let rate = rng.range(0.5, 20.0).min(zipf.rate_cap() / 1.2);
    let mps = ((3.0 * rate) as u32).max(10);
    p.limits = limits(Tier::T100k, mps, 0);
    let until = if quick { 30 * MIN } else { 2 * HOUR };
    let day = (24 * HOUR) as f64;
    poisson(
        rng,
        0,
        until,
        |t| rate * (1.0 + growth * t as f64 / day),
        0,
        |r| number(401, zipf.sample(r)),
        &mut p.batches,
    );
    p.params = format!(
        "{rate:.1}/s over Zipf({s:.2}) {population}, +{:.0} %/day",
        growth * 100.0
    );
    p
}

fn plan_large(b: Behaviour, rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    // Log-uniform between 1,000 and 100,000 a minute.
    let per_min = (1_000.0 * 100f64.powf(rng.unit())).round();
    let per_sec = per_min / 60.0;
    let jump = b == Behaviour::LargeJump;
    p.limits = limits(
        Tier::Unlimited,
        (per_sec * 20.0).max(1_000.0) as u32,
        per_min as u32,
    );
    p.shards = 2;
    p.connections = 2;
    let steady = if quick { 20 * SEC } else { 2 * MIN };
    let phase = rng.unit() * std::f64::consts::TAU;
    let mut fresh = 0u64;
    let mut recent: Vec<u64> = Vec::with_capacity(1_000);
    let mut pick = |r: &mut Rng| {
        // 10 % follow-ups, one each, to one of the last thousand; the rest fresh numbers.
        // (Follow-ups drawn with replacement gave one number six messages within a
        // second in one run of 25: the same-recipient limit rightly throttled the sixth.)
        if !recent.is_empty() && r.unit() < 0.1 {
            let i = r.below(recent.len() as u64) as usize;
            return number(501, recent.swap_remove(i));
        }
        fresh += 1;
        if recent.len() < 1_000 {
            recent.push(fresh);
        } else {
            recent[(fresh % 1_000) as usize] = fresh;
        }
        number(501, fresh)
    };
    // 0.7 to 1.3 of the declared rate over a minute's swing.
    let swing = move |t: u64| {
        per_sec * (1.0 + 0.3 * ((t as f64 / MIN as f64) * std::f64::consts::TAU + phase).sin())
    };
    paced(rng, 0, steady, swing, 2, &mut pick, &mut p.batches);
    if jump {
        let onset = steady;
        p.onset_ms = Some(onset);
        paced(
            rng,
            onset,
            onset + 5 * SEC,
            |_| 10.0 * per_sec,
            2,
            &mut pick,
            &mut p.batches,
        );
        p.params = format!("declared {per_min}/min, then 10x");
    } else {
        p.params = format!("declared {per_min}/min");
    }
    p
}

fn plan_otp(rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let rate = 0.2 * 100f64.powf(rng.unit()); // 0.2 to 20 a second, log-uniform
    p.limits = limits(Tier::Unlimited, 50, 0);
    let until = if quick { 20 * MIN } else { HOUR };
    let mut fresh = 0;
    poisson(
        rng,
        0,
        until,
        |_| rate,
        0,
        |_| {
            fresh += 1;
            number(601, fresh)
        },
        &mut p.batches,
    );
    p.params = format!("{rate:.2}/s");
    p
}

fn plan_blast(b: Behaviour, rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let spread = b == Behaviour::Spread;
    let zipf = Zipf::new(20_000, 1.0);
    let rate = rng.range(1.0, 10.0).min(zipf.rate_cap());
    p.limits = limits(Tier::T100k, 100, 0);
    let warm = if quick { 5 * MIN } else { 20 * MIN };
    poisson(
        rng,
        0,
        warm,
        |_| rate,
        0,
        |r| number(701, zipf.sample(r)),
        &mut p.batches,
    );
    let blast = if spread {
        rng.range(200.0, 800.0)
    } else {
        rng.range(100.0, 1_000.0)
    };
    let conns = if spread { 8 } else { 1 };
    p.shards = conns;
    p.connections = conns;
    let onset = warm + rng.below(SEC);
    p.onset_ms = Some(onset);
    let mut fresh = 0;
    paced(
        rng,
        onset,
        onset + 30 * SEC,
        |_| blast,
        conns,
        |_| {
            fresh += 1;
            number(702, fresh)
        },
        &mut p.batches,
    );
    p.params = format!("{rate:.1}/s, then {blast:.0}/s new over {conns} shard(s)");
    p
}

fn plan_ramp(rng: &mut Rng, mut p: Plan) -> Plan {
    let tier = if rng.unit() < 0.5 {
        Tier::T250
    } else {
        Tier::T2k
    };
    let limit = tier.recipients_per_day().expect("bounded tier");
    let (from, step) = if tier == Tier::T250 {
        (5.0, 5.0)
    } else {
        (20.0, 20.0)
    };
    p.limits = limits(tier, 80, 0);
    p.ramp_tier = Some(limit);
    let until = 20 * HOUR;
    let mut fresh = 0;
    poisson(
        rng,
        0,
        until,
        |t| (from + step * (t / HOUR) as f64) / 3600.0,
        0,
        |_| {
            fresh += 1;
            number(801, fresh)
        },
        &mut p.batches,
    );
    p.params = format!("tier {limit}, +{step:.0}/h each hour");
    p
}

fn plan_storm(rng: &mut Rng, quick: bool, mut p: Plan) -> Plan {
    let share = rng.range(0.05, 0.3);
    let zipf = Zipf::new(20_000, 1.0);
    let rate = rng.range(2.0, 20.0).min(zipf.rate_cap());
    p.limits = limits(Tier::T10k, 100, 0);
    p.shards = 2;
    p.connections = 2;
    let warm = if quick { 10 * MIN } else { 30 * MIN };
    let until = warm + if quick { 20 * MIN } else { 40 * MIN };
    // The sender's traffic on shard 1; reports reach shard 0.
    poisson(
        rng,
        0,
        until,
        |_| rate,
        1,
        |r| number(901, zipf.sample(r)),
        &mut p.batches,
    );
    p.report_share = share;
    p.reports_from_ms = warm;
    p.params = format!("{rate:.1}/s, {:.0} % reported", share * 100.0);
    p
}

/// Figures of one behaviour over its runs.
#[derive(Debug, Clone)]
pub struct Row {
    /// The behaviour.
    pub behaviour: Behaviour,
    /// Runs.
    pub runs: usize,
    /// Runs flagged (for a normal behaviour: false positives).
    pub flagged: usize,
    /// Runs paused by the surge check.
    pub paused: usize,
    /// Runs with any rejection.
    pub rejected: usize,
    /// Throttled answers per admitted message.
    pub throttled_share: f64,
    /// Times to flag of the flagged runs, ms, sorted.
    pub times_ms: Vec<u64>,
}

impl Row {
    /// Median time to flag, ms.
    pub fn median_ms(&self) -> Option<u64> {
        (!self.times_ms.is_empty()).then(|| self.times_ms[(self.times_ms.len() - 1) / 2])
    }
    /// Largest time to flag, ms.
    pub fn max_ms(&self) -> Option<u64> {
        self.times_ms.last().copied()
    }
}

/// Sums outcomes by behaviour, in [`Behaviour::ALL`] order.
pub fn rows(outcomes: &[Outcome]) -> Vec<Row> {
    Behaviour::ALL
        .iter()
        .filter_map(|&b| {
            let os: Vec<&Outcome> = outcomes.iter().filter(|o| o.behaviour == b).collect();
            if os.is_empty() {
                return None;
            }
            let mut times_ms: Vec<u64> = os.iter().filter_map(|o| o.time_to_flag_ms).collect();
            times_ms.sort_unstable();
            let admitted: u64 = os.iter().map(|o| o.admitted).sum();
            let throttled: u64 = os.iter().map(|o| o.throttled).sum();
            Some(Row {
                behaviour: b,
                runs: os.len(),
                flagged: os.iter().filter(|o| o.flagged).count(),
                paused: os.iter().filter(|o| o.paused_at_ms.is_some()).count(),
                rejected: os
                    .iter()
                    .filter(|o| o.paused_rejected + o.limit_rejected > 0)
                    .count(),
                throttled_share: throttled as f64 / admitted.max(1) as f64,
                times_ms,
            })
        })
        .collect()
}

/// Precision and recall over all runs: a flagged abusive run is a true positive, a
/// flagged normal one a false positive, an abusive one not flagged a false negative.
/// (With nothing flagged, precision is reported as 1: no false positive was made.)
pub fn precision_recall(outcomes: &[Outcome]) -> (f64, f64) {
    let tp = outcomes
        .iter()
        .filter(|o| o.behaviour.label() == Label::Abusive && o.flagged)
        .count();
    let fp = outcomes
        .iter()
        .filter(|o| o.behaviour.label() == Label::Normal && o.flagged)
        .count();
    let abusive = outcomes
        .iter()
        .filter(|o| o.behaviour.label() == Label::Abusive)
        .count();
    let precision = if tp + fp == 0 {
        1.0
    } else {
        tp as f64 / (tp + fp) as f64
    };
    (precision, tp as f64 / abusive.max(1) as f64)
}

/// The table, as the bench prints it and BENCHMARKS.md holds it.
pub fn table(outcomes: &[Outcome]) -> String {
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |x| format!("{:.3}", x as f64 / 1e3));
    let mut s = String::from(
        "| behaviour | label | runs | flagged | paused | rejected | throttled / admitted | median s to flag | max s to flag |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows(outcomes) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.3} | {} | {} |\n",
            r.behaviour.name(),
            match r.behaviour.label() {
                Label::Normal => "normal",
                Label::Abusive => "abusive",
            },
            r.runs,
            r.flagged,
            r.paused,
            r.rejected,
            r.throttled_share,
            ms(r.median_ms()),
            ms(r.max_ms()),
        ));
    }
    let (p, rc) = precision_recall(outcomes);
    s.push_str(&format!(
        "\nprecision {p:.3}, recall {rc:.3} over {} runs\n",
        outcomes.len()
    ));
    s
}
