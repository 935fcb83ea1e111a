//! Targets `segment` (the segment scan and start-up recovery) and `keyring` (the keyring
//! file, and the log opened from it).

use rand::SeedableRng;

use crate::log::format::SEGMENT_HEADER_BYTES;
use crate::log::{
    recover_segment_visiting, Keyring, LogConfig, MasterKey, Record, RecordHeader, Recovery,
    SegmentCodec, SegmentHeader, SegmentVerdict,
};
use crate::wire::{LogPosition, Recipient};
use crate::ShardId;

const SEGMENT_ID: u64 = 5;
const CREATED_MS: u64 = 1_700_000_000_000;
/// The record payload bound of the targets' log (sealed payloads, so with overhead).
const PAYLOAD_BYTES_MAX: u32 = 4096;
/// A record plaintext length byte of this value ends the records: the rest of the input
/// is appended to the segment as it is (a torn or damaged tail).
const RAW_TAIL: u8 = 0xff;

fn master() -> MasterKey {
    MasterKey::from_bytes([7; 32])
}

/// A keyring holding data key 1 (the targets' segment key), and the key in the clear.
fn keyring_with_key() -> (Keyring, crate::log::DataKey) {
    let mut k = Keyring::new();
    let key = k.create_key(&master(), [1; 32], [2; 12]);
    (k, key)
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1 << 20,
        segment_age_max_ms: 3_600_000,
        retention_ms: 86_400_000,
        group_commit_records_max: 64,
        group_commit_bytes_max: 1 << 20,
        payload_bytes_max: PAYLOAD_BYTES_MAX,
        drops_per_step_max: 4,
    }
}

/// `data[0]` bit 0 clear: the rest is a segment file's bytes as they are (bit 1: with its
/// header CRC recomputed). Bit 0 set: a valid header (bit 1: format version 1, else bit 3:
/// version 3, whose plaintexts nest a tail under a field key, or with bit 4 too version 4,
/// where a plaintext of the head's length alone is sealed as one, else version 2; bit 2: a
/// first index near the top of the index space) followed by records whose plaintexts come
/// from the input (`len:u8 | plaintext`, sealed under the segment's key and CRC-framed; a
/// length of 0xff appends the rest raw). The segment is judged by recovery, the verdict
/// checked against the bytes, and a log opened from it and appended to.
pub fn segment(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let (keyring, key) = keyring_with_key();
    let bytes = if ctl & 1 == 0 {
        let mut b = rest.to_vec();
        if ctl & 2 != 0 && b.len() >= SEGMENT_HEADER_BYTES {
            let crc = crate::log::format::crc32c(&b[..40]);
            b[40..44].copy_from_slice(&crc.to_le_bytes());
        }
        b
    } else {
        let header = SegmentHeader {
            segment_id: SEGMENT_ID,
            data_key_id: key.id(),
            first_index: if ctl & 4 != 0 {
                LogPosition::INDEX_LIMIT - 2
            } else {
                100
            },
            created_ms: CREATED_MS,
            version: match (ctl & 2 != 0, ctl & 8 != 0, ctl & 16 != 0) {
                (true, _, _) => 1,
                (false, true, false) => 3,
                (false, true, true) => 4,
                (false, false, _) => 2,
            },
            continues: false,
        };
        build_segment(header, key, rest)
    };
    judge(&keyring, &bytes);
    recover_and_open(&keyring, &bytes);
}

fn build_segment(header: SegmentHeader, key: crate::log::DataKey, mut rest: &[u8]) -> Vec<u8> {
    let codec = SegmentCodec::new(header, key, PAYLOAD_BYTES_MAX);
    let mut bytes = Vec::new();
    header.encode(&mut bytes);
    let mut index = 0u32;
    while let Some((&len, tail)) = rest.split_first() {
        if len == RAW_TAIL {
            bytes.extend_from_slice(tail);
            break;
        }
        let (plain, tail) = tail.split_at(usize::from(len).min(tail.len()));
        codec.seal_plaintext_for_fuzzing(index, plain, &mut bytes);
        index += 1;
        rest = tail;
    }
    bytes
}

/// The verdict agrees with the bytes: a kept segment is whole, a truncated one keeps a
/// prefix that is itself judged whole with the same summary.
fn judge(keyring: &Keyring, bytes: &[u8]) {
    let mut visited = 0u32;
    let verdict = recover_segment_visiting(
        SEGMENT_ID,
        bytes,
        keyring,
        &master(),
        PAYLOAD_BYTES_MAX,
        &mut |_, _| visited += 1,
    );
    match verdict {
        Ok(SegmentVerdict::Keep(s)) => {
            assert_eq!(s.bytes, bytes.len() as u64, "a kept segment is read whole");
            assert_eq!(s.records, visited, "every kept record is visited");
        }
        Ok(SegmentVerdict::Truncate { summary, to, .. }) => {
            assert_eq!(summary.bytes, to, "the summary ends where the file is cut");
            assert!(to < bytes.len() as u64, "a truncation cuts something");
            assert_eq!(summary.records, visited, "every kept record is visited");
            let prefix = &bytes[..usize::try_from(to).expect("to fits usize")];
            let again = recover_segment_visiting(
                SEGMENT_ID,
                prefix,
                keyring,
                &master(),
                PAYLOAD_BYTES_MAX,
                &mut |_, _| {},
            );
            assert_eq!(
                again,
                Ok(SegmentVerdict::Keep(summary)),
                "the truncated segment is judged whole"
            );
        }
        Ok(SegmentVerdict::Remove(_)) | Err(_) => {}
    }
}

/// Start-up recovery over the keyring and this one segment; a log that opens takes a
/// record.
fn recover_and_open(keyring: &Keyring, bytes: &[u8]) {
    let Ok(mut recovery) =
        Recovery::new(Some(&keyring.to_bytes()), true, master(), PAYLOAD_BYTES_MAX)
    else {
        panic!("the targets' keyring parses");
    };
    if recovery.judge(SEGMENT_ID, bytes, &mut |_, _| {}).is_err() {
        return;
    }
    open_and_append(recovery);
}

fn open_and_append(recovery: Recovery) {
    let Ok((mut log, _actions)) = recovery.plan().open(config(), ShardId::new(0)) else {
        return;
    };
    let recipient = Recipient::parse(b"+4915112345678").expect("a valid recipient");
    let record = Record {
        header: RecordHeader::message(7, CREATED_MS + 1, 1, recipient, CREATED_MS + 60_000),
        payload: b"sealed",
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut actions = Vec::new();
    let mut positions = Vec::new();
    if log
        .append(
            CREATED_MS + 1,
            &mut rng,
            &[record],
            &mut actions,
            &mut positions,
        )
        .is_ok()
    {
        assert_eq!(positions.len(), 1, "one position per record");
        let _: LogPosition = positions[0];
    }
}

/// `data[0]` bit 0 set: the trailing CRC is recomputed. The rest is a keyring file; one
/// that parses serializes to the same bytes (but for its reserved field) and parses back
/// to the same keyring, and a log opened from it takes a record. The same bytes are also
/// read as a master key file.
pub fn keyring(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if ctl & 1 != 0 {
        super::fix_trailing_crc(&mut bytes);
    }
    let _ = MasterKey::parse(&bytes);
    let Ok(k) = Keyring::from_bytes(&bytes) else {
        return;
    };
    let again = k.to_bytes();
    assert_eq!(
        again.len(),
        bytes.len(),
        "a keyring re-serializes to its length"
    );
    assert_eq!(again[..6], bytes[..6], "magic and version re-serialize");
    assert_eq!(
        again[8..again.len() - 4],
        bytes[8..bytes.len() - 4],
        "fields re-serialize"
    );
    assert_eq!(
        Keyring::from_bytes(&again).as_ref(),
        Ok(&k),
        "the keyring parses back"
    );
    if let Ok(recovery) = Recovery::new(Some(&bytes), false, master(), PAYLOAD_BYTES_MAX) {
        open_and_append(recovery);
    }
}

fn plaintext(kind: u8, recipient: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![kind];
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(&CREATED_MS.to_le_bytes());
    p.extend_from_slice(&42u64.to_le_bytes());
    p.extend_from_slice(&(CREATED_MS + 60_000).to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.push(recipient.len() as u8);
    p.extend_from_slice(recipient);
    p.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    p.extend_from_slice(payload);
    p
}

fn plaintext_v1(recipient: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = 7u32.to_le_bytes().to_vec();
    p.extend_from_slice(&CREATED_MS.to_le_bytes());
    p.extend_from_slice(&42u64.to_le_bytes());
    p.push(recipient.len() as u8);
    p.extend_from_slice(recipient);
    p.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    p.extend_from_slice(payload);
    p
}

fn records_input(ctl: u8, plains: &[Vec<u8>], tail: &[u8]) -> Vec<u8> {
    let mut input = vec![ctl];
    for p in plains {
        input.push(u8::try_from(p.len()).expect("a seed plaintext is short"));
        input.extend_from_slice(p);
    }
    if !tail.is_empty() {
        input.push(RAW_TAIL);
        input.extend_from_slice(tail);
    }
    input
}

pub(super) fn segment_seeds() -> Vec<(String, Vec<u8>)> {
    let to = b"+4915112345678";
    let v2 = vec![
        plaintext(0, to, b"sealed message"),
        plaintext(1, b"", b""),
        plaintext(2, to, b"a reply"),
        plaintext(3, b"", b""),
    ];
    // Version 3 and 4 plaintexts: the head (`fixed | fields_key`), then the tail; a
    // status and a cursor are their head alone (`fields_key` 2) in version 4.
    let with_fields_key = |mut p: Vec<u8>, fields_key: u8| {
        p.insert(31, fields_key);
        p
    };
    let head_only = |kind: u8| {
        let mut p = plaintext(kind, b"", b"");
        p.truncate(31);
        p.push(2);
        p
    };
    let v4 = vec![
        with_fields_key(plaintext(0, to, b"sealed message"), 0),
        head_only(1),
        with_fields_key(plaintext(2, to, b"a reply"), 0),
        head_only(3),
    ];
    let mut seeds = vec![
        ("records-v2".to_string(), records_input(1, &v2, b"")),
        (
            "records-v1".to_string(),
            records_input(3, &[plaintext_v1(to, b"old message")], b""),
        ),
        (
            "records-torn-tail".to_string(),
            records_input(1, &v2[..2], &[9, 0, 0, 0, 1, 2]),
        ),
        (
            "records-high-index".to_string(),
            records_input(5, &v2[..1], b""),
        ),
        (
            "records-v4".to_string(),
            records_input(1 | 8 | 16, &v4, b""),
        ),
    ];
    // Whole files as the real encoder writes them, for the raw mode.
    let (_, key) = keyring_with_key();
    let header = SegmentHeader {
        segment_id: SEGMENT_ID,
        data_key_id: key.id(),
        first_index: 100,
        created_ms: CREATED_MS,
        version: crate::log::format::SEGMENT_VERSION,
        continues: false,
    };
    let codec = SegmentCodec::new(header, key, PAYLOAD_BYTES_MAX);
    let mut file = vec![0u8];
    header.encode(&mut file);
    let recipient = Recipient::parse(to).expect("valid");
    for i in 0..3u32 {
        let rec = Record {
            header: RecordHeader::message(7, CREATED_MS + u64::from(i), u64::from(i), recipient, 0),
            payload: b"payload",
        };
        codec
            .encode_record(i, &rec, &mut file)
            .expect("a seed record encodes");
    }
    seeds.push(("file-three-records".to_string(), file.clone()));
    seeds.push((
        "file-header-only".to_string(),
        file[..1 + SEGMENT_HEADER_BYTES].to_vec(),
    ));
    seeds.push(("file-torn-header".to_string(), file[..20].to_vec()));
    seeds
}

pub(super) fn keyring_seeds() -> Vec<(String, Vec<u8>)> {
    let m = master();
    let mut k = Keyring::new();
    let empty = k.to_bytes();
    for i in 0..3u8 {
        k.create_key(&m, [i; 32], [i; 12]);
    }
    k.next_epoch();
    k.raise_index_floor(1000);
    k.destroy(2);
    let mut seeds = Vec::new();
    for (name, bytes) in [("empty", empty), ("two-live-keys", k.to_bytes())] {
        let mut input = vec![0];
        input.extend_from_slice(&bytes);
        seeds.push((name.to_string(), input));
    }
    let mut text = vec![1];
    text.extend_from_slice(m.to_file_text().as_bytes());
    seeds.push(("master-key-text".to_string(), text));
    seeds
}
