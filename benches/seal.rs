//! Sealing throughput (issue 4): the pipeline's `Sealer` in three recipient regimes,
//! against raw AES-256-GCM in the same run, plus the AES-GCM implementation comparison
//! and the rayon question.
//!
//! Every bench seals batches of 64 messages (a SUBMIT's worth) into a reused output
//! buffer with the sealed layout `nonce(12) | ciphertext | tag(16)`; throughput is counted
//! in messages (`Elements(64)` per batch).
//!
//! - `seal/<size>/one`: every message to one recipient (always a cache hit).
//! - `seal/<size>/cycle1k`: 1,000 recipients in turn, cache of 4,096 keys (hits).
//! - `seal/<size>/all_new`: 131,072 recipients in turn through the same cache: every
//!   lookup misses, so each message pays HKDF-SHA256 and an AES key schedule.
//! - `raw/<size>/one_key`, `raw/<size>/new_key`: aws-lc-rs `LessSafeKey` sealing with the
//!   same layout and AAD length, with one key, and with a key built per message.
//! - `impl/aes-gcm/<size>`, `impl/aws-lc-rs/<size>`, `impl/ring/<size>`: raw one-key
//!   sealing per crate, and `impl/*_new_key/<size>` with a key built per message (the
//!   sealer uses ring, chosen on these).
//! - `parts/hkdf`, `parts/key_schedule/*`: the two costs of a cache miss, alone;
//!   `parts/hkdf_batch16`: keys derived 16 per request as a batch's misses are (two at
//!   a time, SHA-256 interleaved), per key;
//!   `parts/hmac_aws-lc-rs`, `parts/hmac_ring`: the HKDF-Expand block through those
//!   crates' HMAC instead.
//! - `par/serial/<n>`, `par/rayon/<n>`: one batch of `n` × 1 KiB sealed on one core or
//!   spread over all cores with rayon.
//!
//! Run: `cargo bench --bench seal -- --warm-up-time 1 --measurement-time 3`
//!
//! On a shared machine wall time swings with the other work on the cores. With
//! `SEAL_BENCH_CLOCK=cpu` the `seal`, `raw`, `impl` and `parts` groups are timed in the
//! bench thread's own CPU time instead (from `/proc/thread-self/schedstat`, read once per
//! sample, no `unsafe`), which keeps the ratios between benches of one run steady. The
//! kernel updates that figure only every few milliseconds, so this mode samples flat
//! (equal samples) and wants few, long samples:
//! `SEAL_BENCH_CLOCK=cpu cargo bench --bench seal -- --warm-up-time 1 --measurement-time 3 --sample-size 10 --save-baseline cpu`
//! (300 ms samples, about 1% resolution; `--save-baseline cpu` keeps these figures apart
//! from the wall-time ones). `par` always runs on wall time (rayon's workers are other
//! threads).
//!
//! `SEAL_BENCH_PAIRED=<seconds>` runs instead the paired comparison of the two targets
//! (`seal/*/cycle1k` against `raw/*/one_key`, `seal/*/all_new` against `raw/*/new_key`):
//! one batch of each, timed back to back in alternating order, repeated for that many
//! seconds; it prints the median and quartiles of the per-pair ratios. Slow swings of a
//! shared machine hit both halves of a pair alike, so the median ratio holds still where
//! separate criterion runs drift; alternating also costs each side its caches, so its
//! per-message times are higher than criterion's.

use std::hint::black_box;
use std::sync::Arc;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use bytes::Bytes;
use courier::courier_pipeline::seal::{
    nonce_bytes, DerivedKeys, RecipientKey, RecipientKeys, RootKey, SealedBatch, Sealer,
    SealerConfig,
};
use courier::courier_pipeline::wire::{Message, Recipient};
use courier::courier_pipeline::ShardId;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use rayon::prelude::*;

/// Messages per batch, as in a SUBMIT.
const BATCH_MESSAGES: usize = 64;
/// Payload sizes: a long SMS-like text and a rich message.
const PAYLOAD_SIZES: [usize; 2] = [256, 1024];
/// Recipients of the cache-hit regime.
const CYCLE_RECIPIENTS: usize = 1000;
/// Recipients of the all-miss regime: far more than the cache holds.
const NEW_RECIPIENTS: usize = 1 << 17;
/// Keys the shard's cache holds in these benches.
const CACHE_KEYS: usize = 4096;
/// The AAD length the pipeline uses for a 14-byte recipient: prefix 15 + 4 + 8 + 1 + 14.
const AAD_BYTES: usize = 42;
const BUSINESS: u32 = 7;

fn recipient(i: usize) -> Recipient {
    Recipient::parse(format!("+4915{i:09}").as_bytes()).expect("valid E.164")
}

fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|j| (j * 31) as u8).collect::<Vec<u8>>())
}

/// Batches of 64 that, in turn, send to `recipients` recipients in order.
fn batches(recipients: usize, size: usize) -> Vec<Vec<Message>> {
    let p = payload(size);
    let rs: Vec<Recipient> = (0..recipients).map(recipient).collect();
    // A whole number of batches that is also a whole number of cycles (when it fits).
    let messages = if recipients <= BATCH_MESSAGES * 125 {
        BATCH_MESSAGES * recipients / gcd(BATCH_MESSAGES, recipients)
    } else {
        recipients
    };
    (0..messages)
        .map(|i| Message {
            client_id: 1_000_000 + i as u64,
            recipient: rs[i % recipients],
            payload: p.clone(),
        })
        .collect::<Vec<_>>()
        .chunks(BATCH_MESSAGES)
        .map(<[Message]>::to_vec)
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn sealer(keys: &Arc<DerivedKeys>) -> Sealer<Arc<DerivedKeys>> {
    Sealer::new(
        keys.clone(),
        SealerConfig {
            epoch: 1,
            shard: ShardId::new(0),
            nonce_mask: [0x5c; 12],
            cache_keys_max: CACHE_KEYS,
        },
    )
}

fn aws_key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).unwrap())
}

/// Key bytes to build per message (cycled; building is what is measured).
fn key_bytes() -> Vec<[u8; 32]> {
    (0..4096u32)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[4..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9).to_le_bytes());
            k
        })
        .collect()
}

/// Seals one message with aws-lc-rs into `out` in the pipeline's layout.
fn raw_seal(key: &LessSafeKey, counter: u64, aad: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    let nonce = nonce_bytes(1, ShardId::new(0), counter);
    let start = out.len();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(payload);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start + 12..],
        )
        .unwrap();
    out.extend_from_slice(tag.as_ref());
}

fn bench_seal<M: Measurement>(c: &mut Criterion<M>) {
    let mut keys = DerivedKeys::new();
    keys.insert_root(BUSINESS, &RootKey::from_bytes([0x5a; 32]));
    let keys = Arc::new(keys);
    let aad = [0x33u8; AAD_BYTES];

    let mut seal = c.benchmark_group("seal");
    seal.sampling_mode(sampling());
    seal.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    for size in PAYLOAD_SIZES {
        for (regime, recipients) in [
            ("one", 1),
            ("cycle1k", CYCLE_RECIPIENTS),
            ("all_new", NEW_RECIPIENTS),
        ] {
            let batches = batches(recipients, size);
            let mut s = sealer(&keys);
            let mut out = SealedBatch::with_capacity(BATCH_MESSAGES, BATCH_MESSAGES * (size + 28));
            let mut next = 0;
            seal.bench_function(BenchmarkId::new(size.to_string(), regime), |b| {
                b.iter(|| {
                    out.clear();
                    s.seal_batch(BUSINESS, &batches[next], &mut out).unwrap();
                    next = (next + 1) % batches.len();
                    black_box(out.as_bytes());
                })
            });
            let st = s.cache_stats();
            eprintln!(
                "seal/{size}/{regime}: cache hits {} misses {} ({:.1}% hits)",
                st.hits,
                st.misses,
                100.0 * st.hits as f64 / (st.hits + st.misses).max(1) as f64
            );
        }
    }
    seal.finish();

    let mut raw = c.benchmark_group("raw");
    raw.sampling_mode(sampling());
    raw.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    let kb = key_bytes();
    for size in PAYLOAD_SIZES {
        let p = payload(size);
        let mut out = Vec::with_capacity(BATCH_MESSAGES * (size + 28));
        let key = aws_key(&kb[0]);
        let mut counter = 0u64;
        raw.bench_function(BenchmarkId::new(size.to_string(), "one_key"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    raw_seal(&key, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        let mut k = 0;
        raw.bench_function(BenchmarkId::new(size.to_string(), "new_key"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    let key = aws_key(&kb[k]);
                    k = (k + 1) % kb.len();
                    raw_seal(&key, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
    }
    raw.finish();
}

fn aes_gcm_seal(key: &Aes256Gcm, counter: u64, aad: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    let nonce = nonce_bytes(1, ShardId::new(0), counter);
    let start = out.len();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(payload);
    let tag = key
        .encrypt_in_place_detached((&nonce).into(), aad, &mut out[start + 12..])
        .unwrap();
    out.extend_from_slice(&tag);
}

fn ring_key(bytes: &[u8; 32]) -> ring::aead::LessSafeKey {
    ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, bytes).unwrap(),
    )
}

/// Seals one message with ring into `out` in the pipeline's layout.
fn ring_seal(
    key: &ring::aead::LessSafeKey,
    counter: u64,
    aad: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let nonce = nonce_bytes(1, ShardId::new(0), counter);
    let start = out.len();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(payload);
    let tag = key
        .seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(aad),
            &mut out[start + 12..],
        )
        .unwrap();
    out.extend_from_slice(tag.as_ref());
}

fn bench_impl<M: Measurement>(c: &mut Criterion<M>) {
    let aad = [0x33u8; AAD_BYTES];
    let kb = key_bytes();
    let mut g = c.benchmark_group("impl");
    g.sampling_mode(sampling());
    g.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    for size in PAYLOAD_SIZES {
        let p = payload(size);
        let mut out = Vec::with_capacity(BATCH_MESSAGES * (size + 28));
        let mut counter = 0u64;
        let rc = Aes256Gcm::new((&kb[0]).into());
        g.bench_function(BenchmarkId::new("aes-gcm", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    aes_gcm_seal(&rc, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        let lc = aws_key(&kb[0]);
        g.bench_function(BenchmarkId::new("aws-lc-rs", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    raw_seal(&lc, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        let rk = ring_key(&kb[0]);
        g.bench_function(BenchmarkId::new("ring", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    ring_seal(&rk, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        let mut k = 0;
        g.bench_function(BenchmarkId::new("aes-gcm_new_key", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    let key = Aes256Gcm::new((&kb[k]).into());
                    k = (k + 1) % kb.len();
                    aes_gcm_seal(&key, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        g.bench_function(BenchmarkId::new("aws-lc-rs_new_key", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    let key = aws_key(&kb[k]);
                    k = (k + 1) % kb.len();
                    raw_seal(&key, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
        g.bench_function(BenchmarkId::new("ring_new_key", size), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH_MESSAGES {
                    let key = ring_key(&kb[k]);
                    k = (k + 1) % kb.len();
                    ring_seal(&key, counter, &aad, &p, &mut out);
                    counter += 1;
                }
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn bench_parts<M: Measurement>(c: &mut Criterion<M>) {
    let mut keys = DerivedKeys::new();
    keys.insert_root(BUSINESS, &RootKey::from_bytes([0x5a; 32]));
    let rs: Vec<Recipient> = (0..4096).map(recipient).collect();
    let kb = key_bytes();
    let mut g = c.benchmark_group("parts");
    g.sampling_mode(sampling());
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    let mut out = RecipientKey::zeroed();
    g.bench_function("hkdf", |b| {
        b.iter(|| {
            keys.recipient_key(BUSINESS, &rs[i], &mut out).unwrap();
            i = (i + 1) % rs.len();
            black_box(out.as_bytes());
        })
    });
    // Keys derived the way a batch's misses are: 16 per request, two at a time with
    // their SHA-256 compressions interleaved. Per key (throughput 16 per iteration).
    g.throughput(Throughput::Elements(16));
    let mut sixteen: Vec<RecipientKey> = (0..16).map(|_| RecipientKey::zeroed()).collect();
    i = 0; // 4,096 recipients: whole windows of 16 from 0
    g.bench_function("hkdf_batch16", |b| {
        b.iter(|| {
            keys.recipient_keys(BUSINESS, &rs[i..i + 16], &mut sixteen)
                .unwrap();
            i = (i + 16) % rs.len();
            black_box(&sixteen);
        })
    });
    g.throughput(Throughput::Elements(1));
    // The same HKDF-Expand block through aws-lc-rs's HMAC, for the choice of HMAC.
    let prk = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[0x5a; 32]);
    let info = [0x44u8; 42];
    g.bench_function("hmac_aws-lc-rs", |b| {
        b.iter(|| black_box(aws_lc_rs::hmac::sign(&prk, black_box(&info))))
    });
    let prk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0x5a; 32]);
    g.bench_function("hmac_ring", |b| {
        b.iter(|| black_box(ring::hmac::sign(&prk, black_box(&info))))
    });
    g.bench_function(BenchmarkId::new("key_schedule", "aws-lc-rs"), |b| {
        b.iter(|| {
            let k = aws_key(&kb[i]);
            i = (i + 1) % kb.len();
            black_box(k);
        })
    });
    g.bench_function(BenchmarkId::new("key_schedule", "ring"), |b| {
        b.iter(|| {
            let k = ring_key(&kb[i]);
            i = (i + 1) % kb.len();
            black_box(k);
        })
    });
    g.bench_function(BenchmarkId::new("key_schedule", "aes-gcm"), |b| {
        b.iter(|| {
            let k = Aes256Gcm::new((&kb[i]).into());
            i = (i + 1) % kb.len();
            black_box(k);
        })
    });
    g.finish();
}

/// One batch of `n` × 1 KiB, one key, sealed into fixed-stride slots of one buffer:
/// serially, or in rayon chunks of 64 messages over all cores.
fn bench_par(c: &mut Criterion) {
    const SIZE: usize = 1024;
    const STRIDE: usize = SIZE + 28;
    let aad = [0x33u8; AAD_BYTES];
    let key = aws_key(&[9; 32]);
    let p = payload(SIZE);
    let seal_slot = |slot: &mut [u8], counter: u64| {
        let nonce = nonce_bytes(1, ShardId::new(0), counter);
        slot[..12].copy_from_slice(&nonce);
        slot[12..12 + SIZE].copy_from_slice(&p);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut slot[12..12 + SIZE],
            )
            .unwrap();
        slot[12 + SIZE..].copy_from_slice(tag.as_ref());
    };
    let mut g = c.benchmark_group("par");
    for n in [64usize, 256, 1024, 4096] {
        let mut out = vec![0u8; n * STRIDE];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("serial", n), |b| {
            b.iter(|| {
                for (i, slot) in out.chunks_mut(STRIDE).enumerate() {
                    seal_slot(slot, i as u64);
                }
                black_box(&out);
            })
        });
        g.bench_function(BenchmarkId::new("rayon", n), |b| {
            b.iter(|| {
                out.par_chunks_mut(STRIDE * BATCH_MESSAGES)
                    .enumerate()
                    .for_each(|(c, chunk)| {
                        for (i, slot) in chunk.chunks_mut(STRIDE).enumerate() {
                            seal_slot(slot, (c * BATCH_MESSAGES + i) as u64);
                        }
                    });
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn cpu_clock() -> bool {
    std::env::var("SEAL_BENCH_CLOCK").as_deref() == Ok("cpu")
}

/// Flat sampling on the coarse CPU clock, criterion's default otherwise.
fn sampling() -> SamplingMode {
    if cpu_clock() {
        SamplingMode::Flat
    } else {
        SamplingMode::Auto
    }
}

/// The bench thread's CPU time in nanoseconds, from the scheduler's accounting.
struct ThreadCpu {
    wall: WallTime,
}

fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("SEAL_BENCH_CLOCK=cpu needs Linux with /proc/thread-self/schedstat");
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat starts with the run time in ns")
}

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = std::time::Duration;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> std::time::Duration {
        std::time::Duration::from_nanos(thread_cpu_ns() - start)
    }
    fn add(&self, a: &std::time::Duration, b: &std::time::Duration) -> std::time::Duration {
        *a + *b
    }
    fn zero(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    fn to_f64(&self, v: &std::time::Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds either way: reuse the wall-time formatter.
        self.wall.formatter()
    }
}

/// One batch of the sealer's regime against one batch of its raw reference, timed back
/// to back (wall clock, order alternating), many times: the median of the per-pair
/// ratios is immune to the slow swings of a shared machine, which hit both halves of a
/// pair alike. `SEAL_BENCH_PAIRED=<seconds per comparison>`.
fn paired(seconds: f64) {
    use std::time::Instant;
    let mut keys = DerivedKeys::new();
    keys.insert_root(BUSINESS, &RootKey::from_bytes([0x5a; 32]));
    let keys = Arc::new(keys);
    let aad = [0x33u8; AAD_BYTES];
    let kb = key_bytes();
    for size in PAYLOAD_SIZES {
        for (regime, recipients, reference) in [
            ("cycle1k", CYCLE_RECIPIENTS, "one_key"),
            ("all_new", NEW_RECIPIENTS, "new_key"),
        ] {
            let batches = batches(recipients, size);
            let mut s = sealer(&keys);
            let mut out = SealedBatch::with_capacity(BATCH_MESSAGES, BATCH_MESSAGES * (size + 28));
            let p = payload(size);
            let mut raw_out = Vec::with_capacity(BATCH_MESSAGES * (size + 28));
            let one_key = aws_key(&kb[0]);
            let new_key = reference == "new_key";
            let (mut next, mut k, mut counter) = (0, 0, 0u64);
            let mut ours = || {
                out.clear();
                s.seal_batch(BUSINESS, &batches[next], &mut out).unwrap();
                next = (next + 1) % batches.len();
                black_box(out.as_bytes());
            };
            let mut raw = || {
                raw_out.clear();
                for _ in 0..BATCH_MESSAGES {
                    if new_key {
                        let key = aws_key(&kb[k]);
                        k = (k + 1) % kb.len();
                        raw_seal(&key, counter, &aad, &p, &mut raw_out);
                    } else {
                        raw_seal(&one_key, counter, &aad, &p, &mut raw_out);
                    }
                    counter += 1;
                }
                black_box(&raw_out);
            };
            let mut ratios = Vec::new();
            let (mut ours_ns, mut raw_ns) = (Vec::new(), Vec::new());
            let start = Instant::now();
            let mut pair = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                let t0 = Instant::now();
                let (o, r) = if pair.is_multiple_of(2) {
                    ours();
                    let t1 = Instant::now();
                    raw();
                    (t1 - t0, t1.elapsed())
                } else {
                    raw();
                    let t1 = Instant::now();
                    ours();
                    (t1.elapsed(), t1 - t0)
                };
                pair += 1;
                // The first tenth warms caches and clocks.
                if start.elapsed().as_secs_f64() > seconds / 10.0 {
                    ratios.push(r.as_secs_f64() / o.as_secs_f64());
                    ours_ns.push(o.as_nanos() as f64 / BATCH_MESSAGES as f64);
                    raw_ns.push(r.as_nanos() as f64 / BATCH_MESSAGES as f64);
                }
            }
            let q = |v: &mut Vec<f64>, f: f64| {
                v.sort_by(f64::total_cmp);
                v[((v.len() - 1) as f64 * f) as usize]
            };
            println!(
                "paired seal/{size}/{regime} vs raw/{size}/{reference}: {} pairs, raw/ours \
                 median {:.3} (quartiles {:.3} {:.3}); per message median ours {:.0} ns, raw {:.0} ns",
                ratios.len(),
                q(&mut ratios, 0.5),
                q(&mut ratios, 0.25),
                q(&mut ratios, 0.75),
                q(&mut ours_ns, 0.5),
                q(&mut raw_ns, 0.5),
            );
        }
    }
}

fn main() {
    if let Ok(seconds) = std::env::var("SEAL_BENCH_PAIRED") {
        paired(
            seconds
                .parse()
                .expect("SEAL_BENCH_PAIRED=<seconds per comparison>"),
        );
        return;
    }
    if cpu_clock() {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpu { wall: WallTime })
            .configure_from_args();
        bench_seal(&mut c);
        bench_impl(&mut c);
        bench_parts(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench_seal(&mut c);
        bench_impl(&mut c);
        bench_parts(&mut c);
        bench_par(&mut c);
        c.final_summary();
    }
}
