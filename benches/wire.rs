//! Wire v1 codec throughput: encoding and decoding SUBMIT batches and their ACKs.
//!
//! Decoding goes through `FrameDecoder` (push, then next_frame) as the server reads a
//! stream, with one decoder reused across iterations like one stream carrying many
//! batches: `decode_submit` pushes a whole frame at once, `decode_submit_chunked` pushes
//! it as quinn hands a stream over, in chunks of a packet's stream data (1,200 bytes),
//! and keeps the last two frames decoded alive, as the server holds batches that wait
//! for their group commit (a decoder cannot reuse memory a live frame still uses). Throughput is counted in messages (`Elements(64)` per batch); payload MB/s is
//! messages/s times the payload size.
//!
//! Run: `cargo bench --bench wire -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use courier::courier_pipeline::wire::{
    encode_ack, encode_submit, Frame, FrameDecoder, LogPosition, OutMessage, Reason, Recipient,
    Status, WireLimits,
};
use courier::courier_pipeline::ShardId;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

/// Messages per SUBMIT (and statuses per ACK).
const BATCH_MESSAGES: usize = 64;
/// Payload sizes measured: a long SMS-like text and a rich message.
const PAYLOAD_SIZES: [usize; 2] = [256, 1024];

/// Limits of a server that takes the benchmarked batches, not the permissive ones, so
/// the checks cost what they cost in production.
const LIMITS: WireLimits = WireLimits {
    frame_bytes_max: 1 << 20,
    batch_messages_max: BATCH_MESSAGES as u32,
};

fn recipients() -> Vec<Recipient> {
    (0..BATCH_MESSAGES as u64)
        .map(|i| {
            let number = format!("+49151{:08}", 10_000_000 + i);
            Recipient::parse(number.as_bytes()).expect("valid E.164")
        })
        .collect()
}

fn payloads(size: usize) -> Vec<Vec<u8>> {
    (0..BATCH_MESSAGES)
        .map(|i| (0..size).map(|j| (i * 31 + j) as u8).collect())
        .collect()
}

fn out_messages<'a>(recipients: &'a [Recipient], payloads: &'a [Vec<u8>]) -> Vec<OutMessage<'a>> {
    recipients
        .iter()
        .zip(payloads)
        .enumerate()
        .map(|(i, (recipient, payload))| OutMessage {
            client_id: 1_000_000 + i as u64,
            recipient,
            payload,
        })
        .collect()
}

fn statuses() -> Vec<Status> {
    (0..BATCH_MESSAGES as u64)
        .map(|i| match i % 8 {
            0..=4 => Status::Accepted(LogPosition::new(ShardId::new(3), 1_000_000 + i)),
            5 => Status::Duplicate(LogPosition::new(ShardId::new(1), i)),
            6 => Status::Throttled {
                retry_after_ms: 250,
            },
            _ => Status::Rejected(Reason::ALL[i as usize % Reason::ALL.len()]),
        })
        .collect()
}

/// Decodes one frame of `bytes` the way the server does; the decoder is reused.
fn decode(d: &mut FrameDecoder, bytes: &[u8]) -> Frame {
    d.push(bytes);
    let frame = d.next_frame().expect("valid frame").expect("whole frame");
    debug_assert_eq!(d.buffered(), 0);
    frame
}

/// Stream bytes per chunk in `decode_submit_chunked` (one packet's STREAM frame, about).
const CHUNK_BYTES: usize = 1200;

/// Hands a chunk to the decoder as the server does (quinn's `Bytes`, no copy).
fn push_chunk(d: &mut FrameDecoder, chunk: Bytes) {
    d.push_bytes(chunk);
}

fn submit(c: &mut Criterion) {
    let recipients = recipients();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    for size in PAYLOAD_SIZES {
        let payloads = payloads(size);
        let messages = out_messages(&recipients, &payloads);
        let mut out = BytesMut::new();

        g.bench_with_input(
            BenchmarkId::new("encode_submit", size),
            &messages,
            |b, m| {
                b.iter(|| {
                    out.clear();
                    encode_submit(black_box(7), black_box(m), &mut out);
                    black_box(&out);
                })
            },
        );

        let mut frame = BytesMut::new();
        encode_submit(7, &messages, &mut frame);
        let frame: Bytes = frame.freeze();
        let mut d = FrameDecoder::new(LIMITS);
        assert!(
            matches!(decode(&mut d, &frame), Frame::Submit { messages, .. }
            if messages.len() == BATCH_MESSAGES && messages[0].payload.len() == size)
        );
        g.bench_with_input(BenchmarkId::new("decode_submit", size), &frame, |b, f| {
            b.iter(|| black_box(decode(&mut d, black_box(f))))
        });
        let chunks: Vec<Bytes> = frame
            .chunks(CHUNK_BYTES)
            .map(|c| frame.slice_ref(c))
            .collect();
        let mut held = std::collections::VecDeque::new();
        g.bench_with_input(
            BenchmarkId::new("decode_submit_chunked", size),
            &chunks,
            |b, chunks| {
                // The chunks are handed over owned, as quinn does; making them (reference
                // counts) is outside the timing, dropping them inside.
                b.iter_batched(
                    || chunks.clone(),
                    |chunks| {
                        for c in chunks {
                            push_chunk(&mut d, c);
                        }
                        let frame = d.next_frame().expect("valid frame").expect("whole frame");
                        held.push_back(frame);
                        if held.len() > 2 {
                            black_box(held.pop_front());
                        }
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    g.finish();
}

fn ack(c: &mut Criterion) {
    let statuses = statuses();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    let mut out = BytesMut::new();
    g.bench_with_input(
        BenchmarkId::new("encode_ack", BATCH_MESSAGES),
        &statuses,
        |b, s| {
            b.iter(|| {
                out.clear();
                encode_ack(black_box(7), black_box(s), &mut out);
                black_box(&out);
            })
        },
    );

    let mut frame = BytesMut::new();
    encode_ack(7, &statuses, &mut frame);
    let frame = frame.freeze();
    // A client reads ACKs with its own decoder; the server's limits are a fair stand-in.
    let mut d = FrameDecoder::new(LIMITS);
    assert!(matches!(decode(&mut d, &frame), Frame::Ack { statuses: s, .. } if s == statuses));
    g.bench_with_input(
        BenchmarkId::new("decode_ack", BATCH_MESSAGES),
        &frame,
        |b, f| b.iter(|| black_box(decode(&mut d, black_box(f)))),
    );
    g.finish();
}

criterion_group!(benches, submit, ack);
criterion_main!(benches);
