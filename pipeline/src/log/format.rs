//! Record and segment formats: framing, encryption at rest, and the scan that recovery
//! and `courier log verify` run over a segment's bytes.
//!
//! ```text
//! segment = header | record*
//! header  = "CRSG" | version:u16 | flags:u16 | segment_id:u64 | data_key_id:u64
//!           | first_index:u64 | created_ms:u64 | crc32c:u32 (of the 40 bytes before)
//! record  = len:u32 | crc32c:u32 | sealed[len]
//!           crc32c covers len (4 bytes) and sealed, so a check needs no key
//! sealed  = AES-256-GCM(data key, nonce, aad = "", plain) = ciphertext | tag[16]
//! nonce   = segment_id:u64 | index_in_segment:u32     (little endian, 12 bytes)
//! sealed (version 3) = AES-256-GCM(data key, nonce, aad = "", fixed | fields_key:u8)
//!           | AES-256-GCM(field key, index:u32 | 0[8], aad = fixed | fields_key, tail)
//!           (each ciphertext | tag[16])
//! sealed (version 4) = version 3's, except that a record with neither recipient nor
//!           payload (a status, a cursor) is the head alone, with fields_key 2:
//!           AES-256-GCM(data key, nonce, aad = "", fixed | 2)
//! fixed   = kind:u8 | business_id:u32 | time_ms:u64 | client_id:u64 | reference:u64 | code:u16
//! tail    = recipient_len:u8 (0: none) | recipient | payload_len:u32 | payload
//! plain (version 2, read only) = fixed | tail, sealed whole under the data key
//! plain (version 1, read only) = business_id:u32 | time_ms:u64 | client_id:u64
//!           | recipient_len:u8 | recipient | payload_len:u32 | payload   (a message)
//! ```
//!
//! Header flags: bit 0 `continues` (the segment was opened by a roll of the run that wrote
//! the segment before it, so its first index is where that segment ended: recovery reads a
//! gap before it as records lost in a crash); the other bits are written 0 and ignored.
//!
//! Record kinds ([`RecordKind`]): a message (its recipient-sealed payload, `reference` its
//! expiry), a status of a message (`reference` the message's position, `code` the
//! status), a user's inbound message to a business (`recipient` the user, the payload its
//! content), and an acknowledgement cursor (`reference` the position through which the
//! business acknowledged this shard's events). Segments written before delivery existed
//! (version 1) hold messages only.
//!
//! **Why the nonce never repeats under a key.** Each data key is drawn fresh at random for
//! exactly one segment and is never used for another one. Within a segment the record
//! index strictly increases, and a segment is appended to by one process lifetime only:
//! recovery never appends to an existing segment, it always opens a new one with a new
//! key. So the (key, nonce) pair is unique by construction, crashes included, even when a
//! torn tail is truncated (the truncated indexes are never encrypted again under that key).
//! The segment id in the nonce additionally binds a record to its segment: a record copied
//! into another segment fails its tag.
//!
//! **Per-business field keys (version 3, issue 19: erasing a business).** What a record
//! says about a business's users (the recipient's number, a user's reply, the sealed
//! payload) is its `tail`, encrypted under a key that needs both the segment's data key
//! and that business's root key: `fields_key` 1 = HMAC(the business's field root (from
//! its root key, [`FieldKeys`]), salt), where the salt is HMAC(data key, a label), so the
//! key is new in every segment (a random data key each) and the index nonce never repeats
//! under it, restores of old copies included. The data key seals the `fixed` part (ids,
//! times, codes) and the tail's tag binds it (AAD). The tail is encrypted once, not once
//! per key: a second pass over the payload doubled the format's CPU cost
//! (`benches/log_encode.rs`).
//! `fields_key` 0 = a key of the segment alone (records with nothing of a user: statuses,
//! cursors; and logs opened without business keys, such as tools' and tests'). Dropping a
//! business's root key (`courier businesses erase`) leaves its records' tails unreadable
//! under every key that remains, without rewriting a segment: they read back as
//! [`OwnedRecord::fields_hidden`]. Version 2 segments (before) keep their tails under the
//! data key alone; they age out with the retention.
//!
//! **Records without a tail (version 4, issue 15).** A status or a cursor says nothing of
//! a user: its version 3 tail is 5 bytes of zero lengths, sealed under the segment's field
//! key all the same, and a delivered message writes two statuses. Version 4 leaves that
//! tail and its second AES-GCM pass out (`fields_key` 2): such a record is 56 bytes on
//! disk instead of 77 and one seal instead of two. A `fields_key` 2 record with a tail,
//! of a kind that needs a recipient, or in a version 3 segment is malformed. Segments of
//! versions 1 to 3 keep reading as before.
//!
//! Every length is checked against its bound before anything is allocated for it.

use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::keys::{DataKey, KEY_BYTES, TAG_BYTES};
use crate::wire::{LogPosition, Recipient, RECIPIENT_BYTES_MAX};

/// Bytes of the segment header at offset 0.
pub const SEGMENT_HEADER_BYTES: usize = 44;
/// Bytes of a record's frame header (`len:u32 | crc32c:u32`).
pub const RECORD_FRAME_BYTES: usize = 8;
/// Fixed bytes of a record's plaintext besides recipient and payload.
pub const RECORD_PLAIN_FIXED_BYTES: usize = RECORD_HEADER_FIXED_BYTES + 1 + 1 + 4 + TAG_BYTES;
/// Bytes of a record's `fixed` part (kind .. code).
const RECORD_HEADER_FIXED_BYTES: usize = 1 + 4 + 8 + 8 + 8 + 2;
/// Fixed bytes of a version 2 record's plaintext besides recipient and payload.
const RECORD_PLAIN_FIXED_BYTES_V2: usize = RECORD_HEADER_FIXED_BYTES + 1 + 4;
/// Fixed bytes of a version 1 record's plaintext besides recipient and payload.
const RECORD_PLAIN_FIXED_BYTES_V1: usize = 4 + 8 + 8 + 1 + 4;
/// Bytes a record takes on disk besides its recipient and payload.
pub const RECORD_OVERHEAD_BYTES: usize = RECORD_FRAME_BYTES + RECORD_PLAIN_FIXED_BYTES + TAG_BYTES;
/// Bytes a record takes at most on disk besides its payload.
pub const RECORD_OVERHEAD_BYTES_MAX: usize = RECORD_OVERHEAD_BYTES + RECIPIENT_BYTES_MAX;
/// Bytes on disk of a version 4 record with neither recipient nor payload (a status, a
/// cursor): frame, head, one tag.
pub const RECORD_HEAD_ONLY_BYTES: usize =
    RECORD_FRAME_BYTES + RECORD_HEADER_FIXED_BYTES + 1 + TAG_BYTES;
/// The segment format version this build writes (it reads 1 to 3 too).
pub const SEGMENT_VERSION: u16 = 4;
/// The first version whose records nest a tail under a field key.
const VERSION_FIELD_KEYS: u16 = 3;
/// The first version whose statuses and cursors have no tail.
const VERSION_HEAD_ONLY: u16 = 4;
/// The oldest segment format version this build reads.
pub const SEGMENT_VERSION_MIN: u16 = 1;
const SEGMENT_MAGIC: [u8; 4] = *b"CRSG";

const _: () = assert!(SEGMENT_HEADER_BYTES == 4 + 2 + 2 + 8 + 8 + 8 + 8 + 4);
const _: () = assert!(RECORD_OVERHEAD_BYTES_MAX == 8 + 53 + 16 + 16);
const _: () = assert!(RECORD_PLAIN_FIXED_BYTES_V1 < RECORD_PLAIN_FIXED_BYTES_V2);
const _: () = assert!(RECORD_PLAIN_FIXED_BYTES_V2 < RECORD_PLAIN_FIXED_BYTES);
const _: () = assert!(RECORD_HEAD_ONLY_BYTES == 56 && RECORD_OVERHEAD_BYTES == 77);

/// The largest `len` field of a record whose payload is at most `payload_bytes_max`.
pub const fn sealed_bytes_max(payload_bytes_max: u32) -> usize {
    RECORD_PLAIN_FIXED_BYTES + RECIPIENT_BYTES_MAX + payload_bytes_max as usize + TAG_BYTES
}

/// The first bytes of every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's id; also its file name. Never reused.
    pub segment_id: u64,
    /// The keyring id of the data key its records are encrypted with.
    pub data_key_id: u64,
    /// Log index of the segment's first record.
    pub first_index: u64,
    /// When the segment was created, unix ms.
    pub created_ms: u64,
    /// The format version of its records.
    pub version: u16,
    /// Opened by a roll of the run that wrote the segment before it: its first index is
    /// where that segment ended (flag bit 0; segments of older builds have it clear).
    pub continues: bool,
}

/// Header flag: the segment continues the one before it (see [`SegmentHeader::continues`]).
const FLAG_CONTINUES: u16 = 1;

/// Why a segment header is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_BYTES`] bytes.
    #[error("segment header is truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a courier segment.
    #[error("not a courier segment (bad magic)")]
    Magic,
    /// A version this build cannot read.
    #[error("segment version {0} is not supported")]
    Version(u16),
    /// The header's CRC does not match.
    #[error("segment header CRC mismatch")]
    Crc,
    /// The first index lies outside the log's index space: no log writes such a header.
    #[error("segment header names first index {0}, beyond the log's index space")]
    FirstIndex(u64),
}

impl SegmentHeader {
    /// Appends the 44 header bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&SEGMENT_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        let flags = if self.continues { FLAG_CONTINUES } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.segment_id.to_le_bytes());
        out.extend_from_slice(&self.data_key_id.to_le_bytes());
        out.extend_from_slice(&self.first_index.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(SegmentHeader::decode(&out[start..]), Ok(*self));
    }

    /// Decodes and checks the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(HeaderError::Truncated(bytes.len()));
        }
        let crc = u32_at(bytes, 40);
        if crc32c(&bytes[..40]) != crc {
            return Err(HeaderError::Crc);
        }
        if bytes[..4] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if !(SEGMENT_VERSION_MIN..=SEGMENT_VERSION).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        // A log index is below LogPosition::INDEX_LIMIT; a CRC-valid header beyond it is
        // damage or a forgery, and its first index plus a record count could overflow.
        let first_index = u64_at(bytes, 24);
        if first_index >= LogPosition::INDEX_LIMIT {
            return Err(HeaderError::FirstIndex(first_index));
        }
        Ok(SegmentHeader {
            segment_id: u64_at(bytes, 8),
            data_key_id: u64_at(bytes, 16),
            first_index,
            created_ms: u64_at(bytes, 32),
            version,
            continues: u16::from_le_bytes([bytes[6], bytes[7]]) & FLAG_CONTINUES != 0,
        })
    }
}

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A business's message: `client_id`, `recipient`, `reference` = expiry (unix ms; 0 in
    /// version 1 segments, written before delivery existed), payload = the sealed message.
    Message = 0,
    /// A status of a message: `client_id` of the message, `reference` = its position,
    /// `code` = the status; no payload.
    Status = 1,
    /// A user's message to a business: `recipient` = the user, payload = the content.
    Inbound = 2,
    /// The business acknowledged this shard's events through position `reference`.
    Cursor = 3,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        Some(match b {
            0 => RecordKind::Message,
            1 => RecordKind::Status,
            2 => RecordKind::Inbound,
            3 => RecordKind::Cursor,
            _ => return None,
        })
    }
}

/// The clear header of a record. Which fields mean something depends on its kind (see
/// [`RecordKind`]); the others are zero or `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record is.
    pub kind: RecordKind,
    /// The business.
    pub business_id: u32,
    /// When the record was appended, unix ms.
    pub time_ms: u64,
    /// The business's client message id (messages and their statuses).
    pub client_id: u64,
    /// The recipient of a message, the writer of an inbound message (its `Debug` is
    /// redacted).
    pub recipient: Option<Recipient>,
    /// A message's expiry, a status's message position, a cursor's position.
    pub reference: u64,
    /// A status's code.
    pub code: u16,
}

impl RecordHeader {
    /// The header of a message record.
    pub fn message(
        business_id: u32,
        time_ms: u64,
        client_id: u64,
        recipient: Recipient,
        expires_ms: u64,
    ) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Message,
            business_id,
            time_ms,
            client_id,
            recipient: Some(recipient),
            reference: expires_ms,
            code: 0,
        }
    }

    /// Bytes of the recipient field.
    pub fn recipient_bytes(&self) -> usize {
        self.recipient.map_or(0, |r| r.as_bytes().len())
    }
}

/// A record to append; the payload is the recipient-sealed message, opaque to the log.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The clear header.
    pub header: RecordHeader,
    /// The body.
    pub payload: &'a [u8],
}

impl std::fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("header", &self.header)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// A record read back from a segment.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The clear header.
    pub header: RecordHeader,
    /// The body.
    pub payload: Vec<u8>,
    /// Its user fields (recipient, payload) are under a business key the reader does not
    /// hold (an erased business, or a reader given no business keys): `recipient` is
    /// `None` and `payload` empty whatever the record held.
    pub fields_hidden: bool,
}

impl OwnedRecord {
    /// Borrows it as a [`Record`].
    pub fn as_record(&self) -> Record<'_> {
        Record {
            header: self.header,
            payload: &self.payload,
        }
    }
}

impl std::fmt::Debug for OwnedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_record().fmt(f)
    }
}

/// Why a record cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload is larger than the caller's bound.
    #[error("payload of {bytes} bytes exceeds the log's bound of {max}")]
    PayloadTooLarge {
        /// Payload bytes.
        bytes: usize,
        /// The bound.
        max: u32,
    },
}

/// Why a record read at an offset is not valid. Carries offsets and lengths only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes remain than the record needs (a partial record).
    #[error("record at offset {offset} is truncated: {needed} bytes needed, {available} present")]
    Truncated {
        /// Record offset.
        offset: u64,
        /// Bytes the record needs from its offset.
        needed: u64,
        /// Bytes present from its offset.
        available: u64,
    },
    /// The length field is zero or beyond the bound.
    #[error("record at offset {offset} has length {len}, outside 1..={max}")]
    Length {
        /// Record offset.
        offset: u64,
        /// The length field.
        len: u32,
        /// The bound.
        max: usize,
    },
    /// The CRC does not match: the bytes changed after they were written.
    #[error("record at offset {offset} fails its CRC")]
    Crc {
        /// Record offset.
        offset: u64,
    },
    /// The CRC holds but the AEAD tag does not: wrong key, or bytes forged with a matching CRC.
    #[error("record at offset {offset} fails authentication (wrong data key or tampering)")]
    Aead {
        /// Record offset.
        offset: u64,
    },
    /// Decrypted, but the plaintext does not follow the format (a bug or a forgery).
    #[error("record at offset {offset} is malformed: {what}")]
    Malformed {
        /// Record offset.
        offset: u64,
        /// Which field.
        what: &'static str,
    },
}

impl RecordError {
    /// The offset of the record.
    pub fn offset(&self) -> u64 {
        match *self {
            RecordError::Truncated { offset, .. }
            | RecordError::Length { offset, .. }
            | RecordError::Crc { offset }
            | RecordError::Aead { offset }
            | RecordError::Malformed { offset, .. } => offset,
        }
    }
}

/// Corruption found before the tail of a segment: data that must not be skipped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("segment {segment_id} is corrupt at byte offset {offset}: {cause}")]
pub struct Corruption {
    /// The segment (from its header; the file name when the header itself is bad).
    pub segment_id: u64,
    /// Byte offset of the bad record (0 for the header).
    pub offset: u64,
    /// What was wrong.
    pub cause: CorruptionCause,
}

/// What a [`Corruption`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionCause {
    /// The segment header is bad.
    #[error("{0}")]
    Header(HeaderError),
    /// A record is bad and valid data follows it.
    #[error("{0}")]
    Record(RecordError),
    /// The header names another data key than the one given.
    #[error("segment is encrypted under data key {header_key_id}, not {given_key_id}")]
    KeyMismatch {
        /// Key id in the header.
        header_key_id: u64,
        /// Key id given.
        given_key_id: u64,
    },
    /// The header names another segment id than its file name.
    #[error("segment header says segment {header_segment_id}")]
    IdMismatch {
        /// Segment id in the header.
        header_segment_id: u64,
    },
}

/// The per-business keys of version 3 records' user fields (see the module docs):
/// implemented by the businesses' root keys (`seal::DerivedKeys`).
pub trait FieldKeys: Send + Sync + std::fmt::Debug {
    /// The field key of `business_id` in the segment whose salt is `salt`, or `None` when
    /// this reader has no key for it (an erased business). Deterministic: the writer and
    /// every later reader derive the same key.
    fn field_key(
        &self,
        business_id: u32,
        salt: &[u8; KEY_BYTES],
    ) -> Option<zeroize::Zeroizing<[u8; KEY_BYTES]>>;
}

/// Labels of what a segment derives from its data key (HMAC-SHA256 with the data key).
const FIELD_SALT_LABEL: &[u8] = b"courier log field salt v3";
const SEGMENT_FIELD_KEY_LABEL: &[u8] = b"courier log segment field key v3";
/// `fields_key` values.
const FIELDS_UNDER_SEGMENT: u8 = 0;
const FIELDS_UNDER_BUSINESS: u8 = 1;
/// `fields_key` of a version 4 record that has no tail (nothing of a user in it).
const FIELDS_NONE: u8 = 2;

/// Encrypts and decrypts one segment's records.
pub struct SegmentCodec {
    header: SegmentHeader,
    key: DataKey,
    payload_bytes_max: u32,
    /// The businesses' field keys (version 3); `None`: every tail under the segment's key
    /// when writing, and tails under a business key read back hidden.
    fields: Option<Arc<dyn FieldKeys>>,
    /// HMAC(data key, salt label): what business field keys are derived with here.
    salt: zeroize::Zeroizing<[u8; KEY_BYTES]>,
    /// The segment's own field key (`fields_key` 0).
    segment_fields: LessSafeKey,
    /// Business field keys derived so far, by business (`None`: it has none). Bounded by
    /// the registry's businesses.
    business_fields: Mutex<crate::LocalMap<u32, Option<Arc<LessSafeKey>>>>,
}

impl std::fmt::Debug for SegmentCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentCodec")
            .field("header", &self.header)
            .field("key", &self.key)
            .field("payload_bytes_max", &self.payload_bytes_max)
            .field("business_fields", &self.fields.is_some())
            .finish_non_exhaustive()
    }
}

fn aes_key(bytes: &[u8; KEY_BYTES]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key"))
}

/// A summary of a segment whose every record was read and authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// The header.
    pub header: SegmentHeader,
    /// Valid records.
    pub records: u32,
    /// Byte length of header plus valid records.
    pub bytes: u64,
    /// Time of the newest record, unix ms (`None`: no records).
    pub newest_ms: Option<u64>,
    /// Time of the oldest record, unix ms (`None`: no records): retention drops the
    /// segment once this one reaches the retention.
    pub oldest_ms: Option<u64>,
}

/// The result of scanning a segment (recovery and verification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOutcome {
    /// Every byte belongs to the header or a valid record.
    Clean(SegmentSummary),
    /// The last record is partial or fails its CRC and nothing valid follows it:
    /// truncate the segment to `truncate_to` (= `summary.bytes`); `cause` says what was cut.
    TornTail {
        /// The valid prefix.
        summary: SegmentSummary,
        /// New length of the segment.
        truncate_to: u64,
        /// The problem at `truncate_to`.
        cause: RecordError,
    },
    /// The segment's header was never completely written: it holds no record; remove it.
    TornHeader {
        /// Bytes present.
        bytes: u64,
    },
    /// A bad record before the tail, or a record that fails authentication: stop.
    Corrupt(Corruption),
}

impl SegmentCodec {
    /// A codec for the segment with `header`, whose data key is `key`.
    /// Panics if `key` is not the header's key (a bug in the caller).
    pub fn new(header: SegmentHeader, key: DataKey, payload_bytes_max: u32) -> SegmentCodec {
        assert_eq!(header.data_key_id, key.id(), "data key of another segment");
        let salt = key.derive(FIELD_SALT_LABEL);
        let segment_fields = aes_key(&key.derive(SEGMENT_FIELD_KEY_LABEL));
        SegmentCodec {
            header,
            key,
            payload_bytes_max,
            fields: None,
            salt,
            segment_fields,
            business_fields: Mutex::new(crate::LocalMap::default()),
        }
    }

    /// The same codec with the businesses' field keys: version 3 records of a business
    /// it has a key for are written (and read back) with their user fields under that
    /// business's key. Without it they are written under the segment's key and read back
    /// hidden ([`OwnedRecord::fields_hidden`]).
    pub fn with_field_keys(mut self, fields: Option<Arc<dyn FieldKeys>>) -> SegmentCodec {
        self.fields = fields;
        self
    }

    /// Replaces the businesses' field keys (more businesses: a registry reload).
    pub fn set_field_keys(&mut self, fields: Option<Arc<dyn FieldKeys>>) {
        self.fields = fields;
        self.business_fields
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// The field key of `business_id` here, derived once per segment.
    fn business_key(&self, business_id: u32) -> Option<Arc<LessSafeKey>> {
        let fields = self.fields.as_ref()?;
        let mut cache = self
            .business_fields
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .entry(business_id)
            .or_insert_with(|| {
                fields
                    .field_key(business_id, &self.salt)
                    .map(|k| Arc::new(aes_key(&k)))
            })
            .clone()
    }

    /// The nonce of a record's tail under its field key: that key is this segment's own,
    /// and the index is used once in a segment.
    fn tail_nonce(index: u32) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&index.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// The segment header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The largest payload this codec accepts.
    pub fn payload_bytes_max(&self) -> u32 {
        self.payload_bytes_max
    }

    fn nonce(&self, index: u32) -> Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.header.segment_id.to_le_bytes());
        n[8..].copy_from_slice(&index.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Appends record number `index` (in this segment) to `out`; returns its bytes on disk.
    ///
    /// The caller guarantees `index` is used once per segment (see the module docs). The
    /// record is checked right before it is handed to storage: its frame always, and a
    /// full decode in debug builds.
    pub fn encode_record(
        &self,
        index: u32,
        record: &Record<'_>,
        out: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        if record.payload.len() > self.payload_bytes_max as usize {
            return Err(EncodeError::PayloadTooLarge {
                bytes: record.payload.len(),
                max: self.payload_bytes_max,
            });
        }
        // The log appends in the current format only; version 3 stays writable for the
        // tests and benches that compare the two.
        assert!(
            (VERSION_FIELD_KEYS..=SEGMENT_VERSION).contains(&self.header.version),
            "records are appended in format version 3 or 4 only"
        );
        let start = out.len();
        let h = &record.header;
        let r = h.recipient.as_ref().map_or(&[][..], Recipient::as_bytes);
        // A record that says nothing of a user: no tail at all from version 4 on.
        let head_only =
            self.header.version >= VERSION_HEAD_ONLY && r.is_empty() && record.payload.is_empty();
        let sealed_len = if head_only {
            RECORD_HEAD_ONLY_BYTES - RECORD_FRAME_BYTES
        } else {
            RECORD_PLAIN_FIXED_BYTES + r.len() + record.payload.len() + TAG_BYTES
        };
        out.reserve(RECORD_FRAME_BYTES + sealed_len);
        out.extend_from_slice(&(sealed_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let plain = out.len();
        out.push(h.kind as u8);
        out.extend_from_slice(&h.business_id.to_le_bytes());
        out.extend_from_slice(&h.time_ms.to_le_bytes());
        out.extend_from_slice(&h.client_id.to_le_bytes());
        out.extend_from_slice(&h.reference.to_le_bytes());
        out.extend_from_slice(&h.code.to_le_bytes());
        // A record that says something of a user goes under its business's key.
        let about_a_user = !r.is_empty() || !record.payload.is_empty();
        let business = about_a_user
            .then(|| self.business_key(h.business_id))
            .flatten();
        out.push(match business {
            _ if head_only => FIELDS_NONE,
            Some(_) => FIELDS_UNDER_BUSINESS,
            None => FIELDS_UNDER_SEGMENT,
        });
        let mut aad = [0u8; RECORD_HEADER_FIXED_BYTES + 1];
        aad.copy_from_slice(&out[plain..]);
        let head_tag = self
            .key
            .aead
            .seal_in_place_separate_tag(self.nonce(index), Aad::empty(), &mut out[plain..])
            .expect("AES-GCM seal cannot fail for a bounded record");
        out.extend_from_slice(head_tag.as_ref());
        if head_only {
            return Ok(self.frame_encoded(index, record, out, start, sealed_len));
        }
        let tail = out.len();
        out.push(r.len() as u8);
        out.extend_from_slice(r);
        out.extend_from_slice(&(record.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(record.payload);
        let tail_key = business.as_deref().unwrap_or(&self.segment_fields);
        let tail_tag = tail_key
            .seal_in_place_separate_tag(Self::tail_nonce(index), Aad::from(&aad), &mut out[tail..])
            .expect("AES-GCM seal cannot fail for a bounded record");
        out.extend_from_slice(tail_tag.as_ref());
        Ok(self.frame_encoded(index, record, out, start, sealed_len))
    }

    /// Writes the CRC of the record sealed at `out[start..]` into its frame and checks the
    /// whole record; returns its bytes on disk.
    fn frame_encoded(
        &self,
        index: u32,
        record: &Record<'_>,
        out: &mut [u8],
        start: usize,
        sealed_len: usize,
    ) -> usize {
        let plain = start + RECORD_FRAME_BYTES;
        let crc = frame_crc(&out[start..start + 4], &out[plain..]);
        out[start + 4..plain].copy_from_slice(&crc.to_le_bytes());

        // Asserted right before it is written.
        let written = out.len() - start;
        assert_eq!(written, RECORD_FRAME_BYTES + sealed_len);
        if cfg!(debug_assertions) {
            let (back, used) = self
                .read_at(&out[start..], 0, index)
                .expect("a record just encoded decodes");
            assert_eq!(used, written);
            assert_eq!(back.as_record(), *record);
        }
        written
    }

    /// Frames and seals arbitrary `plain` bytes as record number `index`, as
    /// [`SegmentCodec::encode_record`] frames a record's plaintext: the fuzz targets build
    /// records no encoder would write, to reach the plaintext parser behind the tag.
    #[doc(hidden)]
    pub fn seal_plaintext_for_fuzzing(&self, index: u32, plain: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        // Version 3 seals the head under the data key and the rest under the segment's
        // field key (a business's key is the parser's to look up): two tags. Version 4
        // seals a plaintext of the head's length alone, as it writes statuses.
        let head = RECORD_HEADER_FIXED_BYTES + 1;
        let split = match self.header.version {
            VERSION_HEAD_ONLY.. => plain.len() > head,
            VERSION_FIELD_KEYS => plain.len() >= head,
            _ => false,
        }
        .then_some(head);
        let tags = if split.is_some() { 2 } else { 1 };
        let sealed_len =
            u32::try_from(plain.len() + tags * TAG_BYTES).expect("a fuzz record fits u32");
        out.extend_from_slice(&sealed_len.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let sealed = out.len();
        out.extend_from_slice(&plain[..split.unwrap_or(plain.len())]);
        let tag = self
            .key
            .aead
            .seal_in_place_separate_tag(self.nonce(index), Aad::empty(), &mut out[sealed..])
            .expect("AES-GCM seal cannot fail for a bounded record");
        out.extend_from_slice(tag.as_ref());
        if let Some(head) = split {
            let tail = out.len();
            out.extend_from_slice(&plain[head..]);
            let tag = self
                .segment_fields
                .seal_in_place_separate_tag(
                    Self::tail_nonce(index),
                    Aad::from(&plain[..head]),
                    &mut out[tail..],
                )
                .expect("AES-GCM seal cannot fail for a bounded record");
            out.extend_from_slice(tag.as_ref());
        }
        let crc = frame_crc(&out[start..start + 4], &out[sealed..]);
        out[start + 4..sealed].copy_from_slice(&crc.to_le_bytes());
    }

    /// Checks the frame of the record at `offset` of `bytes` without the key: bounds, then
    /// CRC. Returns the record's total length.
    fn frame_at(&self, bytes: &[u8], offset: u64) -> Result<usize, RecordError> {
        frame_at(bytes, offset, self.payload_bytes_max)
    }

    /// Reads record number `index` of this segment at byte `offset` of `bytes` (bytes from
    /// the start of the segment, or any slice whose position 0 is `offset`'s origin).
    /// Returns the record and the offset of the next one. Validated right after it is
    /// read: frame, CRC, tag and every field.
    pub fn read_record(
        &self,
        bytes: &[u8],
        offset: u64,
        index: u32,
    ) -> Result<(OwnedRecord, u64), RecordError> {
        let (rec, used) = self.read_at(bytes, offset, index)?;
        Ok((rec, offset + used as u64))
    }

    /// The records of a whole segment's `bytes`, in order, each with its offset, read and
    /// checked as [`SegmentCodec::read_record`] reads one, up to the end of the records
    /// (zero padding after the last is no record); nothing after an error.
    pub fn records<'a>(&'a self, bytes: &'a [u8]) -> Records<'a> {
        Records {
            codec: self,
            bytes,
            offset: SEGMENT_HEADER_BYTES as u64,
            index: 0,
            failed: false,
        }
    }

    fn read_at(
        &self,
        bytes: &[u8],
        offset: u64,
        index: u32,
    ) -> Result<(OwnedRecord, usize), RecordError> {
        let total = self.frame_at(bytes, offset)?;
        let o = offset as usize;
        let mut buf = bytes[o + RECORD_FRAME_BYTES..o + total].to_vec();
        if self.header.version >= VERSION_FIELD_KEYS {
            return Ok((self.read_v3(&mut buf, offset, index)?, total));
        }
        let plain = self
            .key
            .aead
            .open_in_place(self.nonce(index), Aad::empty(), &mut buf)
            .map_err(|_| RecordError::Aead { offset })?;
        let rec = match self.header.version {
            1 => parse_plain_v1(plain, offset, self.payload_bytes_max)?,
            _ => parse_plain(plain, offset, self.payload_bytes_max)?,
        };
        Ok((rec, total))
    }

    /// A version 3 or 4 record's sealed bytes: the head opened under the data key, the
    /// tail (if it has one) under its field key, then read as version 2's plaintext;
    /// hidden when the field key is not here.
    fn read_v3(
        &self,
        sealed: &mut [u8],
        offset: u64,
        index: u32,
    ) -> Result<OwnedRecord, RecordError> {
        let bad = |what| RecordError::Malformed { offset, what };
        let head = RECORD_HEADER_FIXED_BYTES + 1;
        let head_only_allowed = self.header.version >= VERSION_HEAD_ONLY;
        // A record with a tail has at least its two lengths and two tags.
        let sealed_len = sealed.len();
        let with_tail_min = RECORD_PLAIN_FIXED_BYTES + TAG_BYTES;
        let shortest = if head_only_allowed {
            head + TAG_BYTES
        } else {
            with_tail_min
        };
        if sealed_len < shortest {
            return Err(bad("short record"));
        }
        let (head_sealed, tail_sealed) = sealed.split_at_mut(head + TAG_BYTES);
        let p = self
            .key
            .aead
            .open_in_place(self.nonce(index), Aad::empty(), head_sealed)
            .map_err(|_| RecordError::Aead { offset })?;
        let business_id = u32_at(p, 1);
        if p[head - 1] == FIELDS_NONE && head_only_allowed {
            if !tail_sealed.is_empty() {
                return Err(bad("a tail after a head-only record"));
            }
            // Version 2's plaintext of a record without recipient or payload: both
            // lengths zero (its kind is checked there).
            let mut v2 = [0u8; RECORD_PLAIN_FIXED_BYTES_V2];
            v2[..head - 1].copy_from_slice(&p[..head - 1]);
            return parse_plain(&v2, offset, self.payload_bytes_max);
        }
        if sealed_len < with_tail_min {
            return Err(bad("short record"));
        }
        let key = match p[head - 1] {
            FIELDS_UNDER_SEGMENT => None,
            FIELDS_UNDER_BUSINESS => match self.business_key(business_id) {
                Some(k) => Some(k),
                None => return hidden(p, offset),
            },
            _ => return Err(bad("fields key")),
        };
        let tail_key = key.as_deref().unwrap_or(&self.segment_fields);
        let tail = tail_key
            .open_in_place(Self::tail_nonce(index), Aad::from(&p[..head]), tail_sealed)
            .map_err(|_| RecordError::Aead { offset })?;
        let mut v2 = Vec::with_capacity(head - 1 + tail.len());
        v2.extend_from_slice(&p[..head - 1]);
        v2.extend_from_slice(tail);
        parse_plain(&v2, offset, self.payload_bytes_max)
    }

    /// Scans a whole segment (`bytes` from offset 0): header, then every record in order,
    /// each checked by CRC and authenticated. See [`ScanOutcome`] for the verdicts.
    ///
    /// A bad record is a torn tail only if no intact record frame starts anywhere after
    /// it; otherwise it is corruption. The look-ahead is linear in the bytes after the
    /// bad record and runs only when one is found. A failed tag is always corruption: the
    /// CRC proved the bytes are the ones written.
    ///
    /// Limitation: damage confined to the very last record of a segment looks exactly like
    /// a torn write and is truncated. That record is the newest one written; the verdict
    /// says what was cut (`cause`) so the shell can report it.
    pub fn scan(&self, bytes: &[u8]) -> ScanOutcome {
        self.scan_visiting(bytes, &mut |_, _| {})
    }

    /// [`SegmentCodec::scan`], calling `visit(log index, record)` for each valid record in
    /// order (records after a torn tail are not visited; on corruption, those before it
    /// were). Recovery uses it to rebuild the idempotency table from the log.
    pub fn scan_visiting(
        &self,
        bytes: &[u8],
        visit: &mut dyn FnMut(u64, &OwnedRecord),
    ) -> ScanOutcome {
        let segment_id = self.header.segment_id;
        match SegmentHeader::decode(bytes) {
            Err(HeaderError::Truncated(n)) => return ScanOutcome::TornHeader { bytes: n as u64 },
            Err(e) => {
                return ScanOutcome::Corrupt(Corruption {
                    segment_id,
                    offset: 0,
                    cause: CorruptionCause::Header(e),
                })
            }
            Ok(h) if h != self.header => {
                let cause = if h.segment_id != segment_id {
                    CorruptionCause::IdMismatch {
                        header_segment_id: h.segment_id,
                    }
                } else {
                    CorruptionCause::KeyMismatch {
                        header_key_id: h.data_key_id,
                        given_key_id: self.key.id(),
                    }
                };
                return ScanOutcome::Corrupt(Corruption {
                    segment_id,
                    offset: 0,
                    cause,
                });
            }
            Ok(_) => {}
        }
        let mut summary = SegmentSummary {
            header: self.header,
            records: 0,
            bytes: SEGMENT_HEADER_BYTES as u64,
            newest_ms: None,
            oldest_ms: None,
        };
        let end = bytes.len() as u64;
        while summary.bytes < end {
            let offset = summary.bytes;
            let index = summary.records;
            match self.read_at(bytes, offset, index) {
                Ok((rec, used)) => {
                    visit(self.header.first_index + u64::from(summary.records), &rec);
                    summary.records += 1;
                    summary.bytes += used as u64;
                    summary.newest_ms =
                        Some(summary.newest_ms.unwrap_or(0).max(rec.header.time_ms));
                    summary.oldest_ms = Some(
                        summary
                            .oldest_ms
                            .unwrap_or(u64::MAX)
                            .min(rec.header.time_ms),
                    );
                }
                Err(cause @ (RecordError::Aead { .. } | RecordError::Malformed { .. })) => {
                    return ScanOutcome::Corrupt(Corruption {
                        segment_id,
                        offset,
                        cause: CorruptionCause::Record(cause),
                    })
                }
                Err(_) if records_end(bytes, offset) => {
                    // Zeros after the last record: the padding of a direct I/O write
                    // (`node::commit`), or space a file system allocated; nothing was
                    // written there, so the segment ends here, cleanly.
                    break;
                }
                Err(cause) => {
                    if next_frame(bytes, offset + 1, self.payload_bytes_max).is_some() {
                        return ScanOutcome::Corrupt(Corruption {
                            segment_id,
                            offset,
                            cause: CorruptionCause::Record(cause),
                        });
                    }
                    return ScanOutcome::TornTail {
                        summary,
                        truncate_to: offset,
                        cause,
                    };
                }
            }
        }
        ScanOutcome::Clean(summary)
    }
}

/// A segment's records in order ([`SegmentCodec::records`]): `(offset, record)`, or the
/// error that ends them.
#[derive(Debug)]
pub struct Records<'a> {
    codec: &'a SegmentCodec,
    bytes: &'a [u8],
    offset: u64,
    index: u32,
    failed: bool,
}

impl Records<'_> {
    /// Where the next record would start: after the last one read.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(u64, OwnedRecord), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || records_end(self.bytes, self.offset) {
            return None;
        }
        match self.codec.read_record(self.bytes, self.offset, self.index) {
            Ok((rec, next)) => {
                let at = std::mem::replace(&mut self.offset, next);
                self.index += 1;
                Some(Ok((at, rec)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Whether no record starts at `offset` of a segment's `bytes`: their end, or only zeros
/// from there on (a direct I/O write's padding, `node::commit`).
fn records_end(bytes: &[u8], offset: u64) -> bool {
    bytes
        .get(offset as usize..)
        .is_none_or(|rest| rest.iter().all(|&b| b == 0))
}

/// Checks the frame at `offset`: enough bytes for the frame header, a length in bounds,
/// the whole record present, the CRC. Returns the record's total length.
fn frame_at(bytes: &[u8], offset: u64, payload_bytes_max: u32) -> Result<usize, RecordError> {
    let available = (bytes.len() as u64).saturating_sub(offset);
    if available < RECORD_FRAME_BYTES as u64 {
        return Err(RecordError::Truncated {
            offset,
            needed: RECORD_FRAME_BYTES as u64,
            available,
        });
    }
    let o = offset as usize;
    let len = u32_at(bytes, o);
    let max = sealed_bytes_max(payload_bytes_max);
    if len == 0 || len as usize > max {
        return Err(RecordError::Length { offset, len, max });
    }
    let total = RECORD_FRAME_BYTES + len as usize;
    if available < total as u64 {
        return Err(RecordError::Truncated {
            offset,
            needed: total as u64,
            available,
        });
    }
    let crc = u32_at(bytes, o + 4);
    if frame_crc(&bytes[o..o + 4], &bytes[o + RECORD_FRAME_BYTES..o + total]) != crc {
        return Err(RecordError::Crc { offset });
    }
    Ok(total)
}

/// The first offset at or after `from` where an intact record frame starts.
fn next_frame(bytes: &[u8], from: u64, payload_bytes_max: u32) -> Option<u64> {
    (from..bytes.len() as u64).find(|&o| frame_at(bytes, o, payload_bytes_max).is_ok())
}

/// CRC-32C (Castagnoli) of `bytes`: the checksum of segment headers, records and the
/// keyring.
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    crc32c_of(&[bytes])
}

/// CRC-32C of `parts` one after the other, as of their concatenation.
fn crc32c_of(parts: &[&[u8]]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for p in parts {
        d.update(p);
    }
    // CRC-32 values fit 32 bits; the crate returns every width as u64.
    d.finalize() as u32
}

fn frame_crc(len: &[u8], sealed: &[u8]) -> u32 {
    crc32c_of(&[len, sealed])
}

fn parse_plain(p: &[u8], offset: u64, payload_bytes_max: u32) -> Result<OwnedRecord, RecordError> {
    let bad = |what| RecordError::Malformed { offset, what };
    if p.len() < RECORD_PLAIN_FIXED_BYTES_V2 {
        return Err(bad("short plaintext"));
    }
    let kind = RecordKind::from_u8(p[0]).ok_or(bad("record kind"))?;
    let business_id = u32_at(p, 1);
    let time_ms = u64_at(p, 5);
    let client_id = u64_at(p, 13);
    let reference = u64_at(p, 21);
    let code = u16::from_le_bytes([p[29], p[30]]);
    let rlen = p[31] as usize;
    if rlen > RECIPIENT_BYTES_MAX || p.len() < RECORD_PLAIN_FIXED_BYTES_V2 + rlen {
        return Err(bad("recipient length"));
    }
    let recipient = match rlen {
        0 => None,
        _ => Some(Recipient::parse(&p[32..32 + rlen]).ok_or(bad("recipient"))?),
    };
    let needs_recipient = matches!(kind, RecordKind::Message | RecordKind::Inbound);
    if recipient.is_some() != needs_recipient {
        return Err(bad("recipient for the record kind"));
    }
    let plen = u32_at(p, 32 + rlen) as usize;
    if plen > payload_bytes_max as usize || p.len() != RECORD_PLAIN_FIXED_BYTES_V2 + rlen + plen {
        return Err(bad("payload length"));
    }
    Ok(OwnedRecord {
        header: RecordHeader {
            kind,
            business_id,
            time_ms,
            client_id,
            recipient,
            reference,
            code,
        },
        payload: p[36 + rlen..].to_vec(),
        fields_hidden: false,
    })
}

/// A version 3 record whose fields are under a business key this reader does not hold:
/// its ids and times, nothing of its user.
fn hidden(p: &[u8], offset: u64) -> Result<OwnedRecord, RecordError> {
    let kind = RecordKind::from_u8(p[0]).ok_or(RecordError::Malformed {
        offset,
        what: "record kind",
    })?;
    Ok(OwnedRecord {
        header: RecordHeader {
            kind,
            business_id: u32_at(p, 1),
            time_ms: u64_at(p, 5),
            client_id: u64_at(p, 13),
            recipient: None,
            reference: u64_at(p, 21),
            code: u16::from_le_bytes([p[29], p[30]]),
        },
        payload: Vec::new(),
        fields_hidden: true,
    })
}

/// A version 1 record: always a message, without an expiry.
fn parse_plain_v1(
    p: &[u8],
    offset: u64,
    payload_bytes_max: u32,
) -> Result<OwnedRecord, RecordError> {
    let bad = |what| RecordError::Malformed { offset, what };
    if p.len() < RECORD_PLAIN_FIXED_BYTES_V1 {
        return Err(bad("short plaintext"));
    }
    let business_id = u32_at(p, 0);
    let time_ms = u64_at(p, 4);
    let client_id = u64_at(p, 12);
    let rlen = p[20] as usize;
    if rlen > RECIPIENT_BYTES_MAX || p.len() < RECORD_PLAIN_FIXED_BYTES_V1 + rlen {
        return Err(bad("recipient length"));
    }
    let recipient = Recipient::parse(&p[21..21 + rlen]).ok_or(bad("recipient"))?;
    let plen = u32_at(p, 21 + rlen) as usize;
    if plen > payload_bytes_max as usize || p.len() != RECORD_PLAIN_FIXED_BYTES_V1 + rlen + plen {
        return Err(bad("payload length"));
    }
    Ok(OwnedRecord {
        header: RecordHeader::message(business_id, time_ms, client_id, recipient, 0),
        payload: p[25 + rlen..].to_vec(),
        fields_hidden: false,
    })
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// crc-fast computes the log's checksum; the crc32c crate (the one the log used before,
    /// an independent implementation) must agree, whole and in two parts, at every length
    /// around its vector widths, so no segment written before reads as corrupt.
    #[test]
    fn the_checksum_is_crc32c_whole_and_in_parts() {
        let bytes: Vec<u8> = (0..2100u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..300).chain([1023, 1024, 1025, 1100, 1200, 2048, 2100]) {
            let b = &bytes[..len];
            let want = ::crc32c::crc32c(b);
            assert_eq!(crc32c(b), want, "length {len}");
            for split in [0, 1, 4, len / 2, len].map(|s| s.min(len)) {
                assert_eq!(
                    crc32c_of(&[&b[..split], &b[split..]]),
                    want,
                    "length {len} split {split}"
                );
            }
        }
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
