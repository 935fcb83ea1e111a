//! What the shared idempotency table costs a shard per message.
//!
//! The table has the default profile's size (4 million ids) and is full before measuring,
//! so every new claim also forgets the oldest id, as on a server that has run a while.
//!
//! - `idempotency/claim_settle/threads=T`: per message, a fresh claim and its settle
//!   (what a stored message costs), with T threads sharing the table (T = 1: no
//!   contention; T = 2: both of this machine's cores claiming at once). Time is the wall
//!   time of N messages split over the T threads, so it is per message of the whole
//!   table, not per thread.
//! - `idempotency/duplicate`: a claim that finds a stored id (what a resend costs).
//!
//! Run: `cargo bench --bench idempotency -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::courier_pipeline::idempotency::{Claim, Idempotency};
use courier::courier_pipeline::wire::LogPosition;
use courier::courier_pipeline::ShardId;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The default profile's `limits.idempotency_ids_max`.
const IDS: usize = 4_000_000;
/// The default profile's `limits.idempotency_ids_per_business_max`.
const SHARE: usize = 1_000_000;
/// Businesses the ids are spread over.
const BUSINESSES: u64 = 1000;

fn full_table() -> (Arc<Idempotency>, Arc<AtomicU64>) {
    let t = Arc::new(Idempotency::new(IDS, SHARE));
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..IDS {
        claim_settle(&t, &next);
    }
    (t, next)
}

fn claim_settle(t: &Idempotency, next: &AtomicU64) {
    let n = next.fetch_add(1, Ordering::Relaxed);
    let business = (n % BUSINESSES) as u32;
    if let Claim::Fresh(tk) = t.claim(business, n, n / 1000) {
        t.settle(tk, LogPosition::new(ShardId::new(0), n));
    }
}

fn bench(c: &mut Criterion) {
    let (table, next) = full_table();
    let mut g = c.benchmark_group("idempotency");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        g.bench_function(format!("claim_settle/threads={threads}"), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| {
                            for _ in 0..per {
                                claim_settle(&table, &next);
                            }
                        });
                    }
                });
                let wall = start.elapsed();
                // Report per message actually done.
                Duration::from_nanos(
                    (wall.as_nanos() * u128::from(iters) / u128::from(per * threads as u64)) as u64,
                )
            })
        });
    }
    g.bench_function("duplicate", |b| {
        let mut k = 0u64;
        b.iter(|| {
            // Ids of the newest million are still remembered.
            let n = next.load(Ordering::Relaxed) - 1 - (k % 1_000_000);
            k += 1;
            let got = table.claim((n % BUSINESSES) as u32, n, 0);
            assert!(matches!(got, Claim::Duplicate(_)), "a remembered id");
            black_box(got)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
