//! The receive path's copy of each datagram for quinn: a buffer of its own per datagram
//! (`BytesMut::from`, as before) against a slice of a shared receive arena
//! (`courier::recv_arena`). Each datagram is copied, "decrypted" in place (every byte
//! rewritten, as quinn's AEAD does), split into a chunk as quinn's packet decoder does,
//! and held by one of four streams until that stream has a whole 64-message SUBMIT
//! (55 datagrams); then the stream drops its chunks at once, as the frame decoder does
//! once a frame is complete. The streams start staggered, so chunks of different
//! frames share arenas, as they do on a busy shard.
//!
//! cargo bench --bench recv_arena

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use courier::recv_arena::RecvArenas;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const DATAGRAM: usize = 1200;
const STREAMS: usize = 4;
const PER_FRAME: usize = 55;
const DATAGRAMS: usize = 4096;

struct Streams {
    held: Vec<VecDeque<Bytes>>,
    next: usize,
}

impl Streams {
    fn new() -> Self {
        Streams {
            held: (0..STREAMS)
                .map(|_| VecDeque::with_capacity(PER_FRAME))
                .collect(),
            next: 0,
        }
    }

    fn take(&mut self, mut d: BytesMut) {
        for b in d.iter_mut() {
            *b ^= 0x5a;
        }
        let chunk = d.split_off(28).freeze();
        let s = self.next % STREAMS;
        self.next += 1;
        let held = &mut self.held[s];
        held.push_back(chunk);
        // Staggered: stream s completes its frames at a different phase from the others.
        if held.len() >= PER_FRAME - s * 7 {
            held.clear();
        }
    }
}

fn bench(c: &mut Criterion) {
    let datagrams: Vec<Vec<u8>> = (0..64)
        .map(|i| (0..DATAGRAM).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let mut g = c.benchmark_group("recv");
    g.throughput(Throughput::Elements(DATAGRAMS as u64));
    g.bench_function("own_buffer", |b| {
        b.iter_batched_ref(
            Streams::new,
            |streams| {
                for i in 0..DATAGRAMS {
                    streams.take(BytesMut::from(&datagrams[i % 64][..]));
                }
            },
            BatchSize::SmallInput,
        )
    });
    let mut arenas = RecvArenas::new();
    g.bench_function("arena", |b| {
        b.iter_batched_ref(
            Streams::new,
            |streams| {
                for i in 0..DATAGRAMS {
                    streams.take(arenas.copy(&datagrams[i % 64]).0);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
