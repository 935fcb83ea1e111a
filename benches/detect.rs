//! Detector cost per observed message (issue 5): `detect/observe`, on a realistic state.
//! Messages are decided as the shard decides them, one SUBMIT batch of 64 per
//! `Detector::observe_batch` call; the figure is per message (one criterion iteration is
//! one message: whole batches run until the iteration count is reached, and the time is
//! scaled to it).
//!
//! State: 1,000 businesses, each pre-warmed over a simulated 23 hours with its own
//! population of 1,000 to 20,000 recipients (so about half hold the exact table and half
//! the 24 hourly HyperLogLogs), all at their full per-business size. Traffic: SUBMIT
//! batches of 64 messages, the business of each batch Zipf-distributed (a few large
//! senders dominate), recipients Zipf-distributed within the business's population, at
//! one million messages per simulated second. Limits are set high so that most messages
//! take the full admit path (sketch inserts), the most expensive one, and the surge
//! floor is out of reach (the check runs but never pauses, which would make later
//! messages cheap rejections); the verdict mix is printed. The clock is read once per
//! batch.
//!
//! Run: `cargo bench --bench detect -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Instant;

use courier::courier_pipeline::detect::{BusinessLimits, DetectConfig, Detector, Verdict};
use courier::courier_pipeline::registry::Tier;
use courier::courier_pipeline::wire::Recipient;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BUSINESSES: usize = 1_000;
const BATCH: usize = 64;
const SEQUENCE: usize = 1 << 20;
const HOUR_MS: u64 = 3_600_000;

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
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
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
    cdf
}

fn sample(cdf: &[f64], rng: &mut Rng) -> usize {
    let u = rng.unit();
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

fn number(business: usize, i: usize) -> Recipient {
    Recipient::parse(format!("+1{business:03}{i:07}").as_bytes()).expect("valid E.164")
}

fn setup() -> (Detector, Vec<BusinessLimits>, Vec<(u16, Recipient)>) {
    let cfg = DetectConfig {
        businesses_max: BUSINESSES as u32,
        same_recipient_max: 250,
        // Each business here sends far above any baseline it learned while pre-warming;
        // the surge check still runs on every message, it just does not fire.
        surge_distinct_per_sec_min: u32::MAX,
        ..DetectConfig::default()
    };
    let mut det = Detector::new(cfg, *b"bench-secret-key");
    let limits: Vec<BusinessLimits> = (0..BUSINESSES)
        .map(|k| BusinessLimits {
            id: k as u32 + 1,
            tier: Tier::T100k,
            mps: 1_000_000,
            exempt: false,
            baseline_per_min: 0,
        })
        .collect();
    let populations: Vec<usize> = (0..BUSINESSES)
        .map(|k| 1_000 + (k * 37 % 20) * 1_000)
        .collect();
    // Pre-warm: every recipient once, spread over 23 hours (no surge, a full window).
    for (k, l) in limits.iter().enumerate() {
        let pop = populations[k];
        for i in 0..pop {
            let t = i as u64 * (23 * HOUR_MS) / pop as u64;
            det.observe(t, l, &number(k, i));
        }
    }
    let mut rng = Rng(42);
    let business_cdf = zipf_cdf(BUSINESSES, 1.0);
    let mut cdfs: std::collections::HashMap<usize, Vec<f64>> = Default::default();
    let mut seq = Vec::with_capacity(SEQUENCE);
    while seq.len() < SEQUENCE {
        let k = sample(&business_cdf, &mut rng);
        let cdf = cdfs
            .entry(populations[k])
            .or_insert_with(|| zipf_cdf(populations[k], 1.0));
        for _ in 0..BATCH {
            seq.push((k as u16, number(k, sample(cdf, &mut rng))));
        }
    }
    seq.truncate(SEQUENCE);
    (det, limits, seq)
}

fn observe(c: &mut Criterion) {
    let (mut det, limits, seq) = setup();
    let start = 23 * HOUR_MS;
    let per_business = det.business_state_bytes(1).expect("state");
    let largest = (1..=BUSINESSES as u32)
        .filter_map(|id| det.business_state_bytes(id))
        .max()
        .expect("state");
    let total: usize = (1..=BUSINESSES as u32)
        .filter_map(|id| det.business_state_bytes(id))
        .sum();
    println!(
        "detect state: business 1 {per_business} B, largest {largest} B, bound {} B, \
         {BUSINESSES} businesses {:.1} MiB",
        det.config().business_state_bytes_needed(),
        total as f64 / (1 << 20) as f64
    );
    assert!(largest <= 64 << 10);

    // Verdict mix of one pass over the sequence, on a copy of the state.
    {
        let mut probe = Detector::new(det.config().clone(), *b"bench-secret-key");
        probe.restore(&det.checkpoint()).expect("restore");
        let mut mix = [0u64; 3];
        let mut out = Vec::with_capacity(BATCH);
        for (b, batch) in seq.chunks(BATCH).enumerate() {
            let now = start + (b * BATCH) as u64 / 1000;
            out.clear();
            let limits = &limits[batch[0].0 as usize];
            probe.observe_batch(now, limits, batch.iter().map(|(_, r)| r), &mut out);
            for v in &out {
                match v {
                    Verdict::Admit => mix[0] += 1,
                    Verdict::Throttle { .. } => mix[1] += 1,
                    Verdict::Reject(_) => mix[2] += 1,
                }
            }
        }
        println!(
            "verdicts over {} messages: admit {}, throttle {}, reject {}",
            seq.len(),
            mix[0],
            mix[1],
            mix[2]
        );
    }

    let mut g = c.benchmark_group("detect");
    // One iteration is one message: whole SUBMIT batches are decided until at least
    // `iters` messages have been, and the time is scaled to `iters` messages.
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize; // the next batch's first message
    let mut n = 0u64; // messages decided so far
    let mut out = Vec::with_capacity(BATCH);
    g.bench_function("observe", |b| {
        b.iter_custom(|iters| {
            let mut done = 0u64;
            let t = Instant::now();
            while done < iters {
                let batch = &seq[i..i + BATCH];
                // One million messages per simulated second; one clock reading per batch,
                // as the shard takes it.
                let now = start + n / 1000;
                out.clear();
                det.observe_batch(
                    now,
                    &limits[batch[0].0 as usize],
                    batch.iter().map(|(_, r)| black_box(r)),
                    &mut out,
                );
                black_box(&out);
                i = (i + BATCH) & (SEQUENCE - 1);
                n += BATCH as u64;
                done += BATCH as u64;
            }
            t.elapsed().mul_f64(iters as f64 / done as f64)
        })
    });
    g.finish();
}

criterion_group!(benches, observe);
criterion_main!(benches);
