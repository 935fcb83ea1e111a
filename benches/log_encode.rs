//! CPU cost of the log's record format: framing, AES-256-GCM under the segment's data key
//! and CRC32C, per record, without any IO. This is what `Log::append` spends before the
//! shell's write and fdatasync; the durable append bench (`log_append`) adds the IO.
//!
//! Ids: `encode/<payload bytes>` and `scan/<payload bytes>` (a segment of 64 records
//! scanned as recovery does: CRC, tag and fields of every record), and
//! `encode_business_key/<payload bytes>`: as the server writes since issue 19, with each
//! record's user fields under its business's field key (a second AES-256-GCM, the key
//! derived once per business and segment). Throughput in bytes of records on disk.
//!
//! `status/v3` and `status/v4`: 64 status records (two per delivered message), in format
//! version 3 (head and an empty tail, two AES-256-GCM seals) and version 4 (the head
//! alone, one seal); `scan_status/…` reads them back.
//!
//! Run: `cargo bench --bench log_encode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use courier::courier_pipeline::log::format::SEGMENT_VERSION;
use std::sync::Arc;

use courier::courier_pipeline::log::{
    DataKey, FieldKeys, Record, RecordHeader, RecordKind, ScanOutcome, SegmentCodec, SegmentHeader,
};
use courier::courier_pipeline::seal::keys::{DerivedKeys, RootKey};
use courier::courier_pipeline::wire::Recipient;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const RECORDS: usize = 64;
const PAYLOAD_SIZES: [usize; 2] = [256, 1024];

fn codec() -> SegmentCodec {
    codec_of(SEGMENT_VERSION)
}

fn codec_of(version: u16) -> SegmentCodec {
    let header = SegmentHeader {
        segment_id: 1,
        data_key_id: 1,
        first_index: 0,
        created_ms: 1_700_000_000_000,
        version,
        continues: false,
    };
    SegmentCodec::new(header, DataKey::from_random(1, [7; 32]), 65_536 + 64)
}

/// Encodes records `0..RECORDS` (as `record(i)` makes them) with `codec`, appended to `out`.
fn encode_all<'a>(codec: &SegmentCodec, out: &mut Vec<u8>, record: impl Fn(usize) -> Record<'a>) {
    for i in 0..RECORDS {
        codec
            .encode_record(i as u32, &record(i), out)
            .expect("bounded");
    }
}

/// Status records as delivery writes them, in format version 3 against version 4.
fn statuses(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let status = |i: usize| Record {
        header: RecordHeader {
            kind: RecordKind::Status,
            business_id: 1,
            time_ms: 1_700_000_000_000,
            client_id: i as u64,
            recipient: None,
            reference: 1 << 40 | i as u64,
            code: 2,
        },
        payload: &[],
    };
    for version in [3u16, 4] {
        assert!(version <= SEGMENT_VERSION);
        let codec = codec_of(version);
        let mut segment = Vec::new();
        codec.header().encode(&mut segment);
        let start = segment.len();
        encode_all(&codec, &mut segment, status);
        group.throughput(Throughput::Elements(RECORDS as u64));
        let name = format!("v{version}");
        let mut out = Vec::with_capacity(segment.len() - start);
        group.bench_with_input(BenchmarkId::new("status", &name), &name, |b, _| {
            b.iter(|| {
                out.clear();
                encode_all(&codec, &mut out, status);
                black_box(out.len())
            })
        });
        group.bench_with_input(BenchmarkId::new("scan_status", &name), &name, |b, _| {
            b.iter(|| match codec.scan(black_box(&segment)) {
                ScanOutcome::Clean(s) => s.records,
                other => panic!("{other:?}"),
            })
        });
    }
}

fn bench(c: &mut Criterion) {
    let codec = codec();
    let mut keys = DerivedKeys::new();
    keys.insert_root(1, &RootKey::generate(&mut rand::rng()));
    let keys: Arc<dyn FieldKeys> = Arc::new(keys);
    let with_keys = self::codec().with_field_keys(Some(keys));
    let recipient = Recipient::parse(b"+4915112345678").expect("valid E.164");
    let mut group = c.benchmark_group("log");
    for size in PAYLOAD_SIZES {
        let payload = vec![0x5a; size];
        let record = |i: usize| Record {
            header: RecordHeader::message(1, 1_700_000_000_000, i as u64, recipient, 0),
            payload: &payload,
        };
        let mut segment = Vec::new();
        codec.header().encode(&mut segment);
        let start = segment.len();
        encode_all(&codec, &mut segment, record);
        group.throughput(Throughput::Bytes((segment.len() - start) as u64));
        let mut out = Vec::with_capacity(segment.len());
        group.bench_with_input(BenchmarkId::new("encode", size), &size, |b, _| {
            b.iter(|| {
                out.clear();
                encode_all(&codec, &mut out, record);
                black_box(out.len())
            })
        });
        group.bench_with_input(
            BenchmarkId::new("encode_business_key", size),
            &size,
            |b, _| {
                b.iter(|| {
                    out.clear();
                    encode_all(&with_keys, &mut out, record);
                    black_box(out.len())
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("scan", size), &size, |b, _| {
            b.iter(|| match codec.scan(black_box(&segment)) {
                ScanOutcome::Clean(s) => s.records,
                other => panic!("{other:?}"),
            })
        });
    }
    statuses(&mut group);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
