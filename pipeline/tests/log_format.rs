//! Record and segment format: round trip, tamper detection, torn tails at every cut point,
//! corruption reported with segment and offset, and no content in Debug/Display.

use courier_pipeline::log::format::{
    RecordError, RECORD_HEAD_ONLY_BYTES, RECORD_OVERHEAD_BYTES, SEGMENT_HEADER_BYTES,
    SEGMENT_VERSION,
};
use courier_pipeline::log::{
    recover_segment, Action, CorruptionCause, DataKey, KeyError, Keyring, LogError, LogFailure,
    MasterKey, OwnedRecord, Record, RecordHeader, RecordKind, RecoveryError, ScanOutcome,
    SegmentCodec, SegmentHeader, SegmentVerdict,
};
use courier_pipeline::wire::Recipient;
use proptest::prelude::*;

const PAYLOAD_MAX: u32 = 4096;
const SEGMENT_ID: u64 = 7;

fn header() -> SegmentHeader {
    SegmentHeader {
        segment_id: SEGMENT_ID,
        data_key_id: SEGMENT_ID,
        first_index: 1000,
        created_ms: 1_700_000_000_000,
        version: SEGMENT_VERSION,
        continues: false,
    }
}

fn codec(key_byte: u8) -> SegmentCodec {
    SegmentCodec::new(
        header(),
        DataKey::from_random(SEGMENT_ID, [key_byte; 32]),
        PAYLOAD_MAX,
    )
}

fn record(i: u64, payload: &[u8]) -> Record<'_> {
    Record {
        header: RecordHeader::message(
            42,
            1_700_000_000_000 + i,
            i,
            Recipient::parse(b"+4915112345678").unwrap(),
            1_700_000_000_000 + i + 1,
        ),
        payload,
    }
}

/// The log's bounds in the tests that open one.
fn log_config() -> courier_pipeline::log::LogConfig {
    courier_pipeline::log::LogConfig {
        segment_bytes_max: 1 << 20,
        segment_age_max_ms: 3_600_000,
        retention_ms: 86_400_000,
        group_commit_records_max: 64,
        group_commit_bytes_max: 1 << 20,
        payload_bytes_max: PAYLOAD_MAX,
        drops_per_step_max: 4,
    }
}

/// A segment of `n` records; returns its bytes and each record's offset.
fn segment(c: &SegmentCodec, n: usize) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    header().encode(&mut bytes);
    let mut offsets = Vec::new();
    for i in 0..n {
        offsets.push(bytes.len());
        let payload = vec![b'a' + i as u8; 20 + 7 * i];
        c.encode_record(i as u32, &record(i as u64, &payload), &mut bytes)
            .unwrap();
    }
    (bytes, offsets)
}

proptest! {
    #[test]
    fn records_round_trip(
        business_id: u32,
        time_ms: u64,
        client_id: u64,
        digits in "[1-9][0-9]{6,14}",
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
    ) {
        let c = codec(1);
        let recipient = Recipient::parse(format!("+{digits}").as_bytes()).unwrap();
        let mut bytes = Vec::new();
        header().encode(&mut bytes);
        let mut offsets = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            offsets.push(bytes.len() as u64);
            let r = Record {
                header: RecordHeader::message(business_id, time_ms, client_id, recipient, time_ms),
                payload: p,
            };
            c.encode_record(i as u32, &r, &mut bytes).unwrap();
        }
        for (i, p) in payloads.iter().enumerate() {
            let (back, next) = c.read_record(&bytes, offsets[i], i as u32).unwrap();
            prop_assert_eq!(&back.payload, p);
            prop_assert_eq!(back.header.recipient, Some(recipient));
            prop_assert_eq!(back.header.business_id, business_id);
            prop_assert_eq!(back.header.time_ms, time_ms);
            prop_assert_eq!(back.header.client_id, client_id);
            prop_assert_eq!(next, offsets.get(i + 1).copied().unwrap_or(bytes.len() as u64));
        }
        match c.scan(&bytes) {
            ScanOutcome::Clean(s) => {
                prop_assert_eq!(s.records as usize, payloads.len());
                prop_assert_eq!(s.bytes, bytes.len() as u64);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn oversized_payload_is_refused_before_encoding() {
    let c = codec(1);
    let big = vec![0u8; PAYLOAD_MAX as usize + 1];
    let mut out = Vec::new();
    assert!(c.encode_record(0, &record(0, &big), &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn every_flipped_bit_of_a_record_is_caught_without_the_key() {
    let c = codec(1);
    let (bytes, offsets) = segment(&c, 3);
    let (start, end) = (offsets[1], offsets[2]);
    for bit in start * 8..end * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        match c.read_record(&b, start as u64, 1) {
            Err(
                RecordError::Crc { .. }
                | RecordError::Length { .. }
                | RecordError::Truncated { .. },
            ) => {}
            other => panic!("bit {bit}: expected a frame error, got {other:?}"),
        }
    }
}

#[test]
fn a_record_under_another_key_or_index_fails_authentication() {
    let (bytes, offsets) = segment(&codec(1), 2);
    let wrong = codec(2);
    assert_eq!(
        wrong.read_record(&bytes, offsets[0] as u64, 0).unwrap_err(),
        RecordError::Aead {
            offset: offsets[0] as u64
        }
    );
    // Right key, wrong record index: the nonce differs, so the tag fails.
    assert!(matches!(
        codec(1).read_record(&bytes, offsets[1] as u64, 0),
        Err(RecordError::Aead { .. })
    ));
    match wrong.scan(&bytes) {
        ScanOutcome::Corrupt(c) => assert_eq!(c.offset, offsets[0] as u64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn torn_last_record_is_truncated_at_every_cut_point() {
    let c = codec(1);
    let (bytes, offsets) = segment(&c, 4);
    let last = offsets[3];
    assert!(matches!(c.scan(&bytes[..last]), ScanOutcome::Clean(s) if s.records == 3));
    for cut in last + 1..bytes.len() {
        match c.scan(&bytes[..cut]) {
            ScanOutcome::TornTail {
                summary,
                truncate_to,
                ..
            } => {
                assert_eq!(truncate_to, last as u64, "cut {cut}");
                assert_eq!(summary.records, 3);
                assert_eq!(summary.bytes, last as u64);
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // A complete last record whose CRC fails is a torn tail too.
    for bit in (last * 8..bytes.len() * 8).step_by(13) {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(
            matches!(c.scan(&b), ScanOutcome::TornTail { truncate_to, .. } if truncate_to == last as u64),
            "bit {bit}"
        );
    }
    // A segment cut inside its header holds nothing.
    for cut in 0..SEGMENT_HEADER_BYTES {
        assert!(matches!(
            c.scan(&bytes[..cut]),
            ScanOutcome::TornHeader { .. }
        ));
    }
}

#[test]
fn a_flipped_bit_before_the_tail_is_corruption_with_segment_and_offset() {
    let c = codec(1);
    let (bytes, offsets) = segment(&c, 4);
    for (bit_in_record, what) in [
        (0usize, "len"),
        (20, "len, pointing past the end"),
        (40, "crc"),
        (8 * 30, "sealed"),
    ] {
        let mut b = bytes.clone();
        let bit = offsets[1] * 8 + bit_in_record;
        b[bit / 8] ^= 1 << (bit % 8);
        match c.scan(&b) {
            ScanOutcome::Corrupt(corr) => {
                assert_eq!(corr.segment_id, SEGMENT_ID, "{what}");
                assert_eq!(corr.offset, offsets[1] as u64, "{what}");
                assert!(matches!(corr.cause, CorruptionCause::Record(_)));
                let msg = corr.to_string();
                assert!(
                    msg.contains(&format!("segment {SEGMENT_ID}"))
                        && msg.contains(&format!("offset {}", offsets[1])),
                    "{msg}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A bad header is corruption at offset 0.
    let mut b = bytes.clone();
    b[10] ^= 1;
    assert!(matches!(c.scan(&b), ScanOutcome::Corrupt(c) if c.offset == 0));
}

/// A keyring with one data key (under master key `[5; 32]`) and a segment of `records`
/// records "hello" under it, from index 0; the segment's id is the key's.
fn one_key_segment(records: u32) -> (Keyring, u64, Vec<u8>) {
    let master = MasterKey::from_bytes([5; 32]);
    let mut ring = Keyring::new();
    let key = ring.create_key(&master, [9; 32], [1; 12]);
    let h = SegmentHeader {
        segment_id: key.id(),
        data_key_id: key.id(),
        first_index: 0,
        created_ms: 0,
        version: SEGMENT_VERSION,
        continues: false,
    };
    let c = SegmentCodec::new(h, key, PAYLOAD_MAX);
    let mut bytes = Vec::new();
    h.encode(&mut bytes);
    for i in 0..records {
        c.encode_record(i, &record(u64::from(i), b"hello"), &mut bytes)
            .unwrap();
    }
    (ring, h.segment_id, bytes)
}

#[test]
fn recovery_refuses_a_wrong_master_key_and_corruption() {
    let master = MasterKey::from_bytes([5; 32]);
    let (ring, id, bytes) = one_key_segment(3);
    assert!(matches!(
        recover_segment(id, &bytes, &ring, &master, PAYLOAD_MAX),
        Ok(SegmentVerdict::Keep(s)) if s.records == 3
    ));
    let wrong = MasterKey::from_bytes([6; 32]);
    assert_eq!(
        recover_segment(id, &bytes, &ring, &wrong, PAYLOAD_MAX).unwrap_err(),
        RecoveryError::Key {
            segment_id: id,
            cause: KeyError::UnwrapFailed { key_id: id }
        }
    );
    let mut torn = bytes.clone();
    torn.truncate(bytes.len() - 3);
    assert!(matches!(
        recover_segment(id, &torn, &ring, &master, PAYLOAD_MAX),
        Ok(SegmentVerdict::Truncate { summary, .. }) if summary.records == 2
    ));
    let mut flipped = bytes.clone();
    flipped[SEGMENT_HEADER_BYTES + 12] ^= 0x10;
    assert!(matches!(
        recover_segment(id, &flipped, &ring, &master, PAYLOAD_MAX),
        Err(RecoveryError::Corrupt(c)) if c.offset == SEGMENT_HEADER_BYTES as u64 && c.segment_id == id
    ));
}

#[test]
fn nothing_shows_recipient_payload_or_key_bytes() {
    const DIGITS: &str = "4915112345678";
    const PAYLOAD: &[u8] = b"SECRET-PAYLOAD-TEXT";
    let master_hex = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";
    let master = MasterKey::parse(master_hex.as_bytes()).unwrap();
    let mut ring = Keyring::new();
    let key = ring.create_key(&master, [0xab; 32], [3; 12]);
    let c = SegmentCodec::new(
        SegmentHeader {
            segment_id: key.id(),
            data_key_id: key.id(),
            first_index: 0,
            created_ms: 0,
            version: SEGMENT_VERSION,
            continues: false,
        },
        DataKey::from_random(key.id(), [0xab; 32]),
        PAYLOAD_MAX,
    );
    let r = record(1, PAYLOAD);
    let mut bytes = Vec::new();
    c.encode_record(0, &r, &mut bytes).unwrap();
    let owned = OwnedRecord {
        header: r.header,
        payload: PAYLOAD.to_vec(),
        fields_hidden: false,
    };
    let texts = [
        format!("{r:?}"),
        format!("{owned:?}"),
        format!("{master:?}"),
        format!("{key:?}"),
        format!("{ring:?}"),
        format!("{c:?}"),
        format!(
            "{:?}",
            Action::Write {
                segment_id: 1,
                offset: 0,
                bytes: bytes.clone()
            }
        ),
        format!(
            "{:?}",
            Action::PersistKeyring {
                bytes: ring.to_bytes()
            }
        ),
        LogError::Failed(LogFailure::DiskFull { segment_id: 1 }).to_string(),
        KeyError::UnwrapFailed { key_id: 1 }.to_string(),
        RecordError::Aead { offset: 4 }.to_string(),
        MasterKey::parse(b"zz").unwrap_err().to_string(),
    ];
    let payload_text = String::from_utf8_lossy(PAYLOAD).into_owned();
    for t in &texts {
        assert!(!t.contains(DIGITS), "recipient shown: {t}");
        assert!(!t.contains(&payload_text), "payload shown: {t}");
        assert!(
            !t.contains("5ec7e7") && !t.contains("ab, ab") && !t.contains("171, 171"),
            "key shown: {t}"
        );
    }
    // At rest, neither the recipient nor the payload appears in the clear.
    let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!find(DIGITS.as_bytes()));
    assert!(!find(PAYLOAD));
}

#[test]
fn zeroed_space_after_the_last_record_ends_the_segment_cleanly() {
    // A direct I/O write's padding, or a preallocated or extended file, reads as zeros
    // past the last record: the segment ends there, with nothing to repair.
    let c = codec(1);
    let (mut bytes, offsets) = segment(&c, 3);
    let end = bytes.len();
    bytes.resize(end + 4095, 0);
    match c.scan(&bytes) {
        ScanOutcome::Clean(summary) => {
            assert_eq!(summary.records, 3);
            assert_eq!(
                summary.bytes, end as u64,
                "appends continue at the last record's end"
            );
        }
        other => panic!("{other:?}"),
    }
    // A reader walking the records stops at the padding too.
    let mut walk = c.records(&bytes);
    let at: Vec<u64> = walk.by_ref().map(|r| r.unwrap().0).collect();
    assert_eq!(at, offsets.iter().map(|&o| o as u64).collect::<Vec<_>>());
    assert_eq!(walk.offset(), end as u64);
    // A torn record before the zeros is still a torn tail, cut where that record starts.
    let last = offsets[2];
    for cut in [last + 1, last + 9, end - 1] {
        let mut torn = bytes[..cut].to_vec();
        torn.resize(end + 4095, 0);
        // The walk yields the two whole records, then the error, then nothing.
        let walked: Vec<bool> = c.records(&torn).map(|r| r.is_ok()).collect();
        assert_eq!(walked, [true, true, false], "cut {cut}");
        match c.scan(&torn) {
            ScanOutcome::TornTail {
                summary,
                truncate_to,
                ..
            } => {
                assert_eq!(truncate_to, last as u64, "cut {cut}");
                assert_eq!(summary.records, 2);
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // One non-zero byte in the padding is not padding.
    let mut dirty = bytes.clone();
    dirty[end + 100] = 1;
    assert!(
        matches!(c.scan(&dirty), ScanOutcome::TornTail { truncate_to, .. } if truncate_to == end as u64)
    );
}

/// Every kind of record round-trips with the fields its kind uses, in the format this
/// build writes and in version 3 (which it still reads); from version 4 on a status and a
/// cursor are their head alone.
#[test]
fn every_record_kind_round_trips() {
    assert_eq!(SEGMENT_VERSION, 4);
    for version in [3, SEGMENT_VERSION] {
        let h = SegmentHeader {
            version,
            ..header()
        };
        let c = SegmentCodec::new(h, DataKey::from_random(SEGMENT_ID, [2; 32]), PAYLOAD_MAX);
        let sizes = every_record_kind_round_trips_in(&c);
        let small = match version {
            3 => RECORD_OVERHEAD_BYTES,
            _ => RECORD_HEAD_ONLY_BYTES,
        };
        // message, status, inbound, cursor
        assert_eq!(
            sizes,
            [
                RECORD_OVERHEAD_BYTES + 14 + 6,
                small,
                RECORD_OVERHEAD_BYTES + 14 + 7,
                small
            ],
            "version {version}"
        );
    }
}

/// Writes one record of each kind with `c`, scans them back, and returns their sizes.
fn every_record_kind_round_trips_in(c: &SegmentCodec) -> Vec<usize> {
    let who = Recipient::parse(b"+4915112345678").unwrap();
    let kinds = [
        (RecordHeader::message(1, 10, 11, who, 99), &b"sealed"[..]),
        (
            RecordHeader {
                kind: RecordKind::Status,
                business_id: 1,
                time_ms: 12,
                client_id: 11,
                recipient: None,
                reference: 1000,
                code: 0x0203,
            },
            &b""[..],
        ),
        (
            RecordHeader {
                kind: RecordKind::Inbound,
                business_id: 1,
                time_ms: 13,
                client_id: 0,
                recipient: Some(who),
                reference: 0,
                code: 0,
            },
            &b"a reply"[..],
        ),
        (
            RecordHeader {
                kind: RecordKind::Cursor,
                business_id: 1,
                time_ms: 14,
                client_id: 0,
                recipient: None,
                reference: 1001,
                code: 0,
            },
            &b""[..],
        ),
    ];
    let mut bytes = Vec::new();
    c.header().encode(&mut bytes);
    let mut sizes = Vec::new();
    for (i, (h, p)) in kinds.iter().enumerate() {
        let r = Record {
            header: *h,
            payload: p,
        };
        let written = c.encode_record(i as u32, &r, &mut bytes).unwrap();
        sizes.push(written);
    }
    let mut seen = Vec::new();
    let mut visit = |_: u64, r: &OwnedRecord| seen.push(r.clone());
    assert!(matches!(
        c.scan_visiting(&bytes, &mut visit),
        ScanOutcome::Clean(_)
    ));
    assert_eq!(seen.len(), kinds.len());
    for ((h, p), back) in kinds.iter().zip(&seen) {
        assert_eq!(back.header, *h);
        assert_eq!(back.payload, *p);
        assert!(!back.fields_hidden);
    }
    sizes
}

/// The head of a record (`fixed | fields_key`) in plaintext: a status of message 1000.
fn status_head(kind: RecordKind, fields_key: u8) -> Vec<u8> {
    let mut p = vec![kind as u8];
    p.extend_from_slice(&42u32.to_le_bytes());
    p.extend_from_slice(&7u64.to_le_bytes());
    p.extend_from_slice(&9u64.to_le_bytes());
    p.extend_from_slice(&1000u64.to_le_bytes());
    p.extend_from_slice(&0x0102u16.to_le_bytes());
    p.push(fields_key);
    p
}

/// A record without a tail (`fields_key` 2) is read only where version 4 writes one: in a
/// version 4 segment, of a kind without recipient, with nothing after its head. Everything
/// else is a malformed record, reported with its offset, never a panic.
#[test]
fn a_head_only_record_is_read_only_where_version_4_writes_one() {
    let read = |version: u16, plain: Vec<u8>| {
        let h = SegmentHeader {
            version,
            ..header()
        };
        let c = SegmentCodec::new(h, DataKey::from_random(SEGMENT_ID, [5; 32]), PAYLOAD_MAX);
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        c.seal_plaintext_for_fuzzing(0, &plain, &mut bytes);
        c.read_record(&bytes, SEGMENT_HEADER_BYTES as u64, 0)
            .map(|(r, next)| (r, next as usize == bytes.len()))
    };
    let malformed = |r: Result<_, RecordError>| match r {
        Err(RecordError::Malformed { offset, what }) => {
            assert_eq!(offset, SEGMENT_HEADER_BYTES as u64);
            what
        }
        other => panic!("expected a malformed record, got {other:?}"),
    };

    let (rec, whole) = read(4, status_head(RecordKind::Status, 2)).unwrap();
    assert!(whole);
    assert_eq!(
        (rec.header.kind, rec.header.reference, rec.header.code),
        (RecordKind::Status, 1000, 0x0102)
    );
    assert_eq!((rec.header.recipient, rec.payload.len()), (None, 0));

    // A kind that needs a recipient cannot be a head alone.
    for kind in [RecordKind::Message, RecordKind::Inbound] {
        let what = malformed(read(4, status_head(kind, 2)));
        assert_eq!(what, "recipient for the record kind");
    }
    // A tail after a head-only record.
    let mut with_tail = status_head(RecordKind::Status, 2);
    with_tail.extend_from_slice(&[0; 5]);
    assert_eq!(
        malformed(read(4, with_tail.clone())),
        "a tail after a head-only record"
    );
    // Version 3 knows no head-only records.
    assert_eq!(malformed(read(3, with_tail)), "fields key");
    assert_eq!(
        malformed(read(3, status_head(RecordKind::Status, 2))),
        "short record"
    );
    // A head that promises a tail and has none.
    assert_eq!(
        malformed(read(4, status_head(RecordKind::Status, 0))),
        "short record"
    );
}

/// Appends record 0 of segment [`SEGMENT_ID`] in an older format, by hand: `plain` sealed
/// under the data key `[3; 32]` (nonce: segment id, index 0), framed with its length and
/// CRC-32C as every format version frames a record.
fn frame_old_record(bytes: &mut Vec<u8>, mut plain: Vec<u8>) {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[3; 32]).unwrap());
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&SEGMENT_ID.to_le_bytes());
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::empty(),
        &mut plain,
    )
    .unwrap();
    let len = (plain.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &plain);
    bytes.extend_from_slice(&len);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&plain);
}

/// Segments written before delivery existed (version 1: messages without a kind or an
/// expiry) still read back, as messages whose expiry is 0.
#[test]
fn a_version_1_segment_reads_back() {
    let h = SegmentHeader {
        version: 1,
        ..header()
    };
    let mut bytes = Vec::new();
    h.encode(&mut bytes);
    // A version 1 record by hand: business | time | client | rlen | recipient | plen | payload.
    let mut plain = Vec::new();
    plain.extend_from_slice(&42u32.to_le_bytes());
    plain.extend_from_slice(&7u64.to_le_bytes());
    plain.extend_from_slice(&9u64.to_le_bytes());
    let who = b"+4915112345678";
    plain.push(who.len() as u8);
    plain.extend_from_slice(who);
    plain.extend_from_slice(&5u32.to_le_bytes());
    plain.extend_from_slice(b"hello");
    frame_old_record(&mut bytes, plain);
    let c = SegmentCodec::new(h, DataKey::from_random(SEGMENT_ID, [3; 32]), PAYLOAD_MAX);
    let (rec, _) = c
        .read_record(&bytes, SEGMENT_HEADER_BYTES as u64, 0)
        .unwrap();
    assert_eq!(
        rec.header,
        RecordHeader::message(42, 7, 9, Recipient::parse(who).unwrap(), 0)
    );
    assert_eq!(rec.payload, b"hello");
}

#[test]
fn a_version_2_segment_reads_back() {
    let h = SegmentHeader {
        version: 2,
        ..header()
    };
    let mut bytes = Vec::new();
    h.encode(&mut bytes);
    // kind | business | time | client | reference | code | rlen | recipient | plen | payload
    let who = b"+4915112345678";
    let mut plain = vec![RecordKind::Inbound as u8];
    plain.extend_from_slice(&42u32.to_le_bytes());
    plain.extend_from_slice(&7u64.to_le_bytes());
    plain.extend_from_slice(&9u64.to_le_bytes());
    plain.extend_from_slice(&0u64.to_le_bytes());
    plain.extend_from_slice(&0u16.to_le_bytes());
    plain.push(who.len() as u8);
    plain.extend_from_slice(who);
    plain.extend_from_slice(&5u32.to_le_bytes());
    plain.extend_from_slice(b"hello");
    frame_old_record(&mut bytes, plain);
    let c = SegmentCodec::new(h, DataKey::from_random(SEGMENT_ID, [3; 32]), PAYLOAD_MAX);
    let (rec, _) = c
        .read_record(&bytes, SEGMENT_HEADER_BYTES as u64, 0)
        .unwrap();
    assert_eq!(rec.header.kind, RecordKind::Inbound);
    assert_eq!(rec.header.recipient, Some(Recipient::parse(who).unwrap()));
    assert_eq!(
        (rec.payload.as_slice(), rec.fields_hidden),
        (&b"hello"[..], false)
    );
}

/// Field keys of a set of businesses, as the businesses' root keys give them.
#[derive(Debug)]
struct Fields(Vec<u32>);

impl courier_pipeline::log::FieldKeys for Fields {
    fn field_key(&self, business_id: u32, salt: &[u8; 32]) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        self.0.contains(&business_id).then(|| {
            let mut k = zeroize::Zeroizing::new(*salt);
            k[0] ^= business_id as u8;
            k
        })
    }
}

/// Issue 19, erasing a business: a version 3 record's user fields are under its
/// business's key; without that key (erased) they read back hidden, with its ids, and
/// its statuses and the other businesses' records read as before.
#[test]
fn user_fields_read_back_hidden_without_their_business_key() {
    use std::sync::Arc;
    let who = Recipient::parse(b"+4915112345678").unwrap();
    let records = [
        record(1, b"of business 42"),
        Record {
            header: RecordHeader {
                kind: RecordKind::Inbound,
                business_id: 43,
                time_ms: 5,
                client_id: 6,
                recipient: Some(who),
                reference: 0,
                code: 0,
            },
            payload: b"a reply to 43",
        },
        Record {
            header: RecordHeader {
                kind: RecordKind::Status,
                business_id: 42,
                time_ms: 5,
                client_id: 1,
                recipient: None,
                reference: 1000,
                code: 2,
            },
            payload: b"",
        },
    ];
    let both: Arc<dyn courier_pipeline::log::FieldKeys> = Arc::new(Fields(vec![42, 43]));
    let writer = codec(9).with_field_keys(Some(both));
    let mut bytes = Vec::new();
    header().encode(&mut bytes);
    for (i, r) in records.iter().enumerate() {
        writer.encode_record(i as u32, r, &mut bytes).unwrap();
    }
    let read = |fields: Option<Arc<dyn courier_pipeline::log::FieldKeys>>| {
        let mut out = Vec::new();
        let outcome = codec(9)
            .with_field_keys(fields)
            .scan_visiting(&bytes, &mut |_, r| out.push(r.clone()));
        assert!(matches!(outcome, ScanOutcome::Clean(_)), "{outcome:?}");
        out
    };
    // With both keys: everything, as written.
    let all = read(Some(Arc::new(Fields(vec![42, 43]))));
    for (r, back) in records.iter().zip(&all) {
        assert_eq!(back.as_record(), *r);
        assert!(!back.fields_hidden);
    }
    // Business 42 erased: its message is hidden (ids kept), its status is not.
    let erased = read(Some(Arc::new(Fields(vec![43]))));
    assert!(erased[0].fields_hidden);
    assert_eq!(
        (erased[0].header.business_id, erased[0].header.client_id),
        (42, 1)
    );
    assert_eq!(erased[0].header.recipient, None);
    assert!(erased[0].payload.is_empty());
    assert_eq!(erased[1].as_record(), records[1]);
    assert_eq!(erased[2].as_record(), records[2]);
    // No business keys at all (a tool): the statuses read, the user fields do not.
    let none = read(None);
    assert!(none[0].fields_hidden && none[1].fields_hidden);
    assert_eq!(none[2].as_record(), records[2]);
    // A wrong business key is tampering, not an erased business.
    #[derive(Debug)]
    struct Wrong;
    impl courier_pipeline::log::FieldKeys for Wrong {
        fn field_key(&self, _: u32, _: &[u8; 32]) -> Option<zeroize::Zeroizing<[u8; 32]>> {
            Some(zeroize::Zeroizing::new([7; 32]))
        }
    }
    let outcome = codec(9).with_field_keys(Some(Arc::new(Wrong))).scan(&bytes);
    assert!(matches!(outcome, ScanOutcome::Corrupt(_)), "{outcome:?}");
    // Nothing of the user lies in the bytes, even to one holding the data key alone.
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("business 42") && !text.contains("+4915112345678"));
}

// Found by fuzzing (the `segment` and `keyring` targets, `fuzz/regressions/`): a segment
// header or keyring with valid CRCs but counters at the edge of their range made recovery
// overflow or a later append panic on a position past the index space. They are refused
// with errors now, and a log that reaches the top of its index space refuses appends.

mod index_space {
    use super::*;
    use courier_pipeline::log::format::HeaderError;
    use courier_pipeline::log::{KeyringError, OpenError, Recovery};
    use courier_pipeline::wire::LogPosition;
    use courier_pipeline::ShardId;

    const LIMIT: u64 = LogPosition::INDEX_LIMIT;

    /// A keyring with one key, and a segment of `records` records under it whose header
    /// names `first_index` (written with a valid CRC, as a forger or bit rot with luck would).
    fn segment_at(first_index: u64, records: u32) -> (Keyring, Vec<u8>) {
        let (ring, _, mut bytes) = one_key_segment(records);
        bytes[24..32].copy_from_slice(&first_index.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..40]);
        bytes[40..44].copy_from_slice(&crc.to_le_bytes());
        (ring, bytes)
    }

    fn open(ring: &Keyring, bytes: &[u8]) -> Result<courier_pipeline::log::Log, OpenError> {
        let master = MasterKey::from_bytes([5; 32]);
        let mut r = Recovery::new(Some(&ring.to_bytes()), true, master, PAYLOAD_MAX).unwrap();
        r.judge(1, bytes, &mut |_, _| {}).unwrap();
        match r.plan().open(log_config(), ShardId::new(0)) {
            Ok((log, _)) => Ok(log),
            Err(courier_pipeline::log::RecoverError::Open(e)) => Err(e),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn a_segment_header_beyond_the_index_space_is_corruption_not_an_overflow() {
        for first_index in [LIMIT, u64::MAX - 2] {
            let (ring, bytes) = segment_at(first_index, 3);
            let master = MasterKey::from_bytes([5; 32]);
            let err = recover_segment(1, &bytes, &ring, &master, PAYLOAD_MAX).unwrap_err();
            let RecoveryError::Corrupt(c) = err else {
                panic!("corruption expected, got {err}");
            };
            assert_eq!(c.offset, 0);
            assert_eq!(
                c.cause,
                CorruptionCause::Header(HeaderError::FirstIndex(first_index))
            );
        }
    }

    #[test]
    fn a_log_whose_segments_end_past_the_index_space_does_not_open() {
        let (ring, bytes) = segment_at(LIMIT - 1, 3);
        assert_eq!(
            open(&ring, &bytes).unwrap_err(),
            OpenError::IndexSpace {
                next_index: LIMIT + 2
            }
        );
    }

    #[test]
    fn a_log_at_the_top_of_its_index_space_refuses_appends_with_an_error() {
        let (ring, bytes) = segment_at(LIMIT - 2, 1);
        let mut log = open(&ring, &bytes).unwrap();
        assert_eq!(log.next_index(), LIMIT - 1);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        let r = record(1, b"last");
        log.append(1, &mut rng, &[r], &mut actions, &mut positions)
            .unwrap();
        assert_eq!(
            positions[0].index(),
            LIMIT - 1,
            "the last index is handed out"
        );
        assert_eq!(
            log.append(2, &mut rng, &[r], &mut actions, &mut positions),
            Err(LogError::Failed(LogFailure::IndexSpaceExhausted))
        );
        assert_eq!(log.failure(), Some(LogFailure::IndexSpaceExhausted));
    }

    #[test]
    fn a_keyring_whose_counters_cannot_advance_is_refused() {
        let master = MasterKey::from_bytes([5; 32]);
        let mut ring = Keyring::new();
        ring.create_key(&master, [9; 32], [1; 12]);
        let good = ring.to_bytes();
        let with = |offset: usize, value: u64| {
            let mut b = good.clone();
            b[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            Keyring::from_bytes(&b)
        };
        // Counters at u64::MAX parse (a log may write them) but a log does not open on
        // them (found by fuzzing: an epoch at u64::MAX - 1 opened, was bumped, and the
        // keyring written would not read back).
        for (offset, what) in [(8, "nonce epoch"), (16, "key id counter")] {
            let ring = with(offset, u64::MAX).unwrap();
            let mut r = Recovery::new(
                Some(&ring.to_bytes()),
                false,
                MasterKey::from_bytes([5; 32]),
                PAYLOAD_MAX,
            )
            .unwrap();
            r.judge(1, &[], &mut |_, _| {}).unwrap();
            assert_eq!(
                r.plan().open(log_config(), ShardId::new(0)).unwrap_err(),
                courier_pipeline::log::RecoverError::Open(OpenError::Exhausted(what))
            );
        }
        assert_eq!(
            with(16, 0).unwrap_err(),
            KeyringError::Counter("key id counter"),
            "key ids start at 1 (found by fuzzing: a roll issued key 0, which no keyring holds)"
        );
        assert_eq!(
            with(24, LIMIT + 1).unwrap_err(),
            KeyringError::Counter("index floor")
        );
        // The edges themselves are fine: a full log opens and refuses appends.
        assert!(with(8, u64::MAX - 1).is_ok());
        assert!(with(24, LIMIT).is_ok());
    }
}

/// Upgrading: a shard log the previous build wrote (a version 3 segment holding a message,
/// its two statuses and a cursor) opens in this build, which appends to a new segment in
/// version 4; after a restart both segments are judged whole and every record reads back
/// as it was written, in log order.
#[test]
fn a_version_3_log_opens_appends_in_version_4_and_reads_back_after_a_restart() {
    use courier_pipeline::log::Recovery;
    use courier_pipeline::ShardId;
    use std::collections::BTreeMap;

    let who = Recipient::parse(b"+4915112345678").unwrap();
    let status = |time_ms: u64, reference: u64, code: u16| RecordHeader {
        kind: RecordKind::Status,
        business_id: 42,
        time_ms,
        client_id: 1,
        recipient: None,
        reference,
        code,
    };
    let cursor = |time_ms: u64, reference: u64| RecordHeader {
        kind: RecordKind::Cursor,
        business_id: 42,
        time_ms,
        client_id: 0,
        recipient: None,
        reference,
        code: 0,
    };
    let old: Vec<(RecordHeader, &[u8])> = vec![
        (RecordHeader::message(42, 10, 1, who, 99_000), b"sealed one"),
        (status(11, 0, 1), b""),
        (status(12, 0, 2), b""),
        (cursor(13, 2), b""),
    ];
    let new: Vec<(RecordHeader, &[u8])> = vec![
        (RecordHeader::message(42, 20, 2, who, 99_000), b"sealed two"),
        (status(21, 4, 1), b""),
        (status(22, 4, 2), b""),
        (cursor(23, 6), b""),
    ];

    // What the previous build left: a keyring with one key and a version 3 segment.
    let master = || MasterKey::from_bytes([5; 32]);
    let mut ring = Keyring::new();
    let key = ring.create_key(&master(), [9; 32], [1; 12]);
    let h3 = SegmentHeader {
        segment_id: key.id(),
        data_key_id: key.id(),
        first_index: 0,
        created_ms: 0,
        version: 3,
        continues: false,
    };
    let c3 = SegmentCodec::new(h3, key, PAYLOAD_MAX);
    let mut v3 = Vec::new();
    h3.encode(&mut v3);
    for (i, (h, p)) in old.iter().enumerate() {
        let r = Record {
            header: *h,
            payload: p,
        };
        c3.encode_record(i as u32, &r, &mut v3).unwrap();
    }
    let mut files: BTreeMap<u64, Vec<u8>> = BTreeMap::from([(h3.segment_id, v3)]);
    let mut ring_bytes = ring.to_bytes();

    // This build starts on it and appends.
    let config = log_config();
    let mut recovery = Recovery::new(Some(&ring_bytes), true, master(), PAYLOAD_MAX).unwrap();
    for (id, bytes) in &files {
        recovery.judge(*id, bytes, &mut |_, _| {}).unwrap();
    }
    let (mut log, mut actions) = recovery.plan().open(config, ShardId::new(0)).unwrap();
    let records: Vec<Record<'_>> = new
        .iter()
        .map(|(h, p)| Record {
            header: *h,
            payload: p,
        })
        .collect();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let mut positions = Vec::new();
    log.append(30, &mut rng, &records, &mut actions, &mut positions)
        .unwrap();
    assert_eq!(
        positions.iter().map(|p| p.index()).collect::<Vec<_>>(),
        [4, 5, 6, 7],
        "the log goes on where the old segment ended"
    );
    for a in actions {
        match a {
            Action::PersistKeyring { bytes } => ring_bytes = bytes,
            Action::CreateSegment { segment_id } => {
                assert!(
                    files.insert(segment_id, Vec::new()).is_none(),
                    "a new segment"
                );
            }
            Action::Write {
                segment_id,
                offset,
                bytes,
            } => {
                let f = files.get_mut(&segment_id).expect("created first");
                let end = offset as usize + bytes.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[offset as usize..end].copy_from_slice(&bytes);
            }
            Action::SyncSegment { .. } | Action::DeleteSegment { .. } => {}
        }
    }
    assert_eq!(files.len(), 2, "the old segment is never appended to");
    let versions: Vec<u16> = files
        .values()
        .map(|b| SegmentHeader::decode(b).unwrap().version)
        .collect();
    assert_eq!(versions, [3, SEGMENT_VERSION]);
    // The new statuses and cursor are their heads alone.
    let new_bytes = files.values().last().unwrap().len() - SEGMENT_HEADER_BYTES;
    let message_bytes = RECORD_OVERHEAD_BYTES + 14 + b"sealed two".len();
    assert_eq!(new_bytes, message_bytes + 3 * RECORD_HEAD_ONLY_BYTES);

    // A restart reads both back.
    let mut seen = Vec::new();
    let mut recovery = Recovery::new(Some(&ring_bytes), true, master(), PAYLOAD_MAX).unwrap();
    for (id, bytes) in &files {
        recovery
            .judge(*id, bytes, &mut |index, r| seen.push((index, r.clone())))
            .unwrap();
    }
    let (log, _) = recovery.plan().open(config, ShardId::new(0)).unwrap();
    assert_eq!(log.next_index(), 8);
    assert_eq!(seen.len(), 8);
    for (i, ((index, back), (h, p))) in seen.iter().zip(old.iter().chain(&new)).enumerate() {
        assert_eq!(*index, i as u64);
        assert_eq!((back.header, back.payload.as_slice()), (*h, *p));
    }
}
