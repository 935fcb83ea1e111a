//! Wire protocol v1 (ALPN `courier/1`): frames on QUIC bidirectional streams.
//!
//! ```text
//! frame   = len:u32 | type:u8 | body[len]          (little endian; len counts the body only)
//!
//! client -> server
//!   HELLO  0x01  version:u16 | token_len:u16 | token   (version 1; version 2 adds
//!                | features:u32, see [`delivery`])
//!   SUBMIT 0x02  batch_id:u64 | count:u32 | count * message
//!                message = client_id:u64 | recipient_len:u8 | recipient | payload_len:u32 | payload
//!   REPORT 0x03  count:u32 | count * (business_id:u32 | client_id:u64 | recipient_len:u8 | recipient)
//! server -> client
//!   WELCOME 0x81 business_id:u32 | batch_messages_max:u32 | payload_bytes_max:u32 | frame_bytes_max:u32
//!                (| features:u32 when answering a version 2 HELLO)
//!   ACK     0x82 batch_id:u64 | count:u32 | count * (status:u8 | value:u64)
//! ```
//!
//! Delivery (statuses, users' replies, the platform's delivery edge) adds the frames of
//! [`delivery`], negotiated by HELLO version 2: a version 1 client never sees them.
//!
//! A connection sends HELLO once, on its first stream, and waits for WELCOME before it
//! sends SUBMIT on any stream. Each SUBMIT is answered by exactly one ACK on the same
//! stream, in order, holding one [`Status`] per message in the order of the batch.
//!
//! Invariants this module keeps:
//! - every length and count is checked against [`WireLimits`] before a byte is buffered
//!   for it: a frame header announcing more than `frame_bytes_max` fails at once;
//! - decoding never allocates per message payload: payloads are slices of the frame;
//! - decode(encode(x)) == x for every frame (property-tested);
//! - [`Recipient`], [`Token`] and message payloads never show their content through
//!   `Debug`, and no [`WireError`] carries content: errors can be logged safely.

pub mod delivery;

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ShardId;

pub use delivery::DeliveryFrame;

/// The ALPN protocol identifier of wire v1.
pub const ALPN: &[u8] = b"courier/1";
/// The HELLO version of clients without delivery features.
pub const VERSION: u16 = 1;
/// The HELLO version that carries feature bits (see [`delivery::features`]).
pub const VERSION_FEATURES: u16 = 2;
/// Bytes of the frame header (`len:u32 | type:u8`).
pub const FRAME_HEADER_BYTES: usize = 5;
/// Longest bearer token accepted in HELLO.
pub const TOKEN_BYTES_MAX: usize = 256;
/// Largest HELLO body: version, token length, token, features (wire version 2).
pub const HELLO_BODY_BYTES_MAX: usize = 2 + 2 + TOKEN_BYTES_MAX + 4;
/// Longest recipient field: `+` and at most 15 digits (E.164).
pub const RECIPIENT_BYTES_MAX: usize = 16;
/// Fewest digits accepted in an E.164 number (country code included).
pub const RECIPIENT_DIGITS_MIN: usize = 7;
/// Fixed bytes of one message in SUBMIT besides recipient and payload.
pub const MESSAGE_OVERHEAD_BYTES: usize = 8 + 1 + 4;
/// Bytes of one status in ACK.
pub const STATUS_BYTES: usize = 1 + 8;
/// Fixed bytes of a SUBMIT or ACK body before its entries.
pub const BATCH_HEADER_BYTES: usize = 8 + 4;

/// The largest message payload under any profile: the ceiling of `limits.payload_bytes_max`.
/// A payload larger than this is refused by every server (each states its own, smaller or
/// equal, bound in WELCOME).
pub const PAYLOAD_BYTES_LIMIT: u32 = 16 << 20;
/// The largest frame body under any profile: the ceiling of `limits.frame_bytes_max`.
pub const FRAME_BYTES_LIMIT: u32 = 64 << 20;
/// The smallest `limits.frame_bytes_max` a profile may set.
pub const FRAME_BYTES_MIN: u32 = 1024;
/// The most messages in one SUBMIT under any profile: the ceiling of
/// `limits.batch_messages_max`.
pub const BATCH_MESSAGES_LIMIT: u32 = 65_536;

// One message of the largest payload fits the largest frame, and so does the ACK of the
// largest batch: every bound a profile may set has a frame bound that holds it.
const _: () = assert!(
    BATCH_HEADER_BYTES
        + MESSAGE_OVERHEAD_BYTES
        + RECIPIENT_BYTES_MAX
        + PAYLOAD_BYTES_LIMIT as usize
        <= FRAME_BYTES_LIMIT as usize
);
const _: () = assert!(
    BATCH_HEADER_BYTES + BATCH_MESSAGES_LIMIT as usize * STATUS_BYTES <= FRAME_BYTES_LIMIT as usize
);

const _: () = assert!(RECIPIENT_BYTES_MAX == 1 + 15);
const _: () = assert!(RECIPIENT_DIGITS_MIN < RECIPIENT_BYTES_MAX);

/// Frame type bytes.
pub mod frame_type {
    /// Client authenticates with a bearer token.
    pub const HELLO: u8 = 0x01;
    /// Client submits a batch of messages.
    pub const SUBMIT: u8 = 0x02;
    /// Platform reports messages as spam (accepted only from platform connections).
    pub const REPORT: u8 = 0x03;
    /// Server accepts a HELLO and states its bounds.
    pub const WELCOME: u8 = 0x81;
    /// Server answers one SUBMIT (or INBOUND).
    pub const ACK: u8 = 0x82;
    /// Business: events it handled.
    pub const EVENT_ACK: u8 = 0x04;
    /// Edge: outcomes of delivered messages.
    pub const OUTCOME: u8 = 0x05;
    /// Edge: recipients now online.
    pub const ONLINE: u8 = 0x06;
    /// Edge: users' messages to businesses.
    pub const INBOUND: u8 = 0x07;
    /// Edge: more DELIVERs it takes.
    pub const CREDIT: u8 = 0x08;
    /// Business: SUBMIT with a time to live.
    pub const SUBMIT_TTL: u8 = 0x09;
    /// Server to edge: a message to deliver.
    pub const DELIVER: u8 = 0x83;
    /// Server to business: statuses of its messages.
    pub const STATUS: u8 = 0x84;
    /// Server to business: a user's message.
    pub const INBOUND_EVENT: u8 = 0x85;
    /// Edge: recipients' device key bundles (with E2E).
    pub const DEVICE_KEYS: u8 = 0x0A;
    /// Server to edge: recipients whose device keys it wants (with E2E).
    pub const KEYS_WANTED: u8 = 0x86;
    /// Server to edge: businesses' reply keys (with E2E).
    pub const BUSINESS_KEYS: u8 = 0x87;
    /// Server to edge: a message sealed for the recipient's devices (with E2E).
    pub const DELIVER_E2E: u8 = 0x88;
}

/// Application error codes. Stream codes are sent in RESET_STREAM and STOP_SENDING when a
/// stream is closed for a bad frame; connection codes in CONNECTION_CLOSE.
pub mod code {
    /// Stream: the frame's body does not match its declared structure.
    pub const MALFORMED_FRAME: u32 = 0x10;
    /// Stream: a frame header announced more than the server's `frame_bytes_max`.
    pub const FRAME_TOO_LARGE: u32 = 0x11;
    /// Stream: the frame type byte is not one of wire v1's.
    pub const UNKNOWN_FRAME_TYPE: u32 = 0x12;
    /// Stream: a recipient is not a valid E.164 number (`+` then 7 to 15 digits, no leading 0).
    pub const INVALID_RECIPIENT: u32 = 0x13;
    /// Stream: SUBMIT or REPORT arrived before the connection's HELLO was accepted.
    pub const NOT_AUTHENTICATED: u32 = 0x14;
    /// Stream: a batch holds no message or more than `batch_messages_max`.
    pub const BAD_BATCH_SIZE: u32 = 0x15;
    /// Stream: the stream ended in the middle of a frame.
    pub const TRUNCATED: u32 = 0x16;
    /// Stream: a frame that this side never accepts (a server frame from a client, a
    /// second HELLO, REPORT on a business connection, SUBMIT on a platform connection).
    pub const UNEXPECTED_FRAME: u32 = 0x17;
    /// Stream: HELLO with a token longer than 256 bytes or an unsupported version.
    pub const BAD_HELLO: u32 = 0x18;

    /// Connection: no error, the peer is done.
    pub const CLOSE_OK: u32 = 0x00;
    /// Connection: HELLO carried an unknown or wrong token.
    pub const UNAUTHORIZED: u32 = 0x01;
    /// Connection: the server is shutting down; unacked messages were not taken.
    pub const SHUTTING_DOWN: u32 = 0x02;
    /// Connection: reserved, never sent. A full connection table (or a source address at
    /// its share) is answered to the client's Initial with the QUIC *transport* close
    /// CONNECTION_REFUSED (transport error 0x02), before any TLS work: an application
    /// close cannot travel in an Initial packet. A client reading codes must tell the
    /// transport close from the application close [`SHUTTING_DOWN`].
    pub const SERVER_BUSY: u32 = 0x03;
    /// Connection: no HELLO arrived within the profile's bound.
    pub const HELLO_TIMEOUT: u32 = 0x04;
    /// Connection: the credential of its HELLO already holds
    /// `connections_per_business_max` connections on this shard.
    pub const TOO_MANY_CONNECTIONS: u32 = 0x05;
}

/// Bounds a decoder enforces; they come from the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Largest frame body accepted.
    pub frame_bytes_max: u32,
    /// Most messages in one SUBMIT (or entries in one REPORT / ACK).
    pub batch_messages_max: u32,
}

impl WireLimits {
    /// Limits wide enough for any frame the encoder can produce; for tests and clients
    /// that decode what a trusted server sent.
    pub const PERMISSIVE: WireLimits = WireLimits {
        frame_bytes_max: FRAME_BYTES_LIMIT,
        batch_messages_max: 1 << 20,
    };
}

/// Why a frame was refused. Carries sizes and codes only, never content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header announced a body larger than the limit.
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    FrameTooLarge {
        /// Announced body length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The type byte is not part of wire v1.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The stream ended with a partial frame buffered.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the partial frame.
        buffered: usize,
    },
    /// The body does not match its structure.
    #[error("malformed {frame} frame: {what}")]
    Malformed {
        /// Frame name.
        frame: &'static str,
        /// What was wrong.
        what: &'static str,
    },
    /// A batch had zero entries or more than allowed.
    #[error("batch of {count} entries outside 1..={max}")]
    BadBatchSize {
        /// Entries announced.
        count: u32,
        /// The limit in force.
        max: u32,
    },
    /// A recipient is not valid E.164; which one is deliberately not said.
    #[error("recipient of entry {index} is not a valid E.164 number")]
    InvalidRecipient {
        /// Index of the entry in its batch.
        index: u32,
    },
    /// HELLO with an unsupported version or an over-long token.
    #[error("bad HELLO: {0}")]
    BadHello(&'static str),
}

impl WireError {
    /// The stream error code that reports this error to the peer.
    pub fn code(&self) -> u32 {
        match self {
            WireError::FrameTooLarge { .. } => code::FRAME_TOO_LARGE,
            WireError::UnknownType(_) => code::UNKNOWN_FRAME_TYPE,
            WireError::Truncated { .. } => code::TRUNCATED,
            WireError::Malformed { .. } => code::MALFORMED_FRAME,
            WireError::BadBatchSize { .. } => code::BAD_BATCH_SIZE,
            WireError::InvalidRecipient { .. } => code::INVALID_RECIPIENT,
            WireError::BadHello(_) => code::BAD_HELLO,
        }
    }
}

/// A recipient phone number in E.164 form (`+` then 7 to 15 digits, first digit not 0).
///
/// Stored inline (no allocation). `Debug` and `Display` never show the number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Recipient {
    len: u8,
    bytes: [u8; RECIPIENT_BYTES_MAX],
}

impl Recipient {
    /// Validates `s` as E.164; `None` if it is not.
    pub fn parse(s: &[u8]) -> Option<Recipient> {
        if s.len() < 1 + RECIPIENT_DIGITS_MIN || s.len() > RECIPIENT_BYTES_MAX || s[0] != b'+' {
            return None;
        }
        let digits = &s[1..];
        if digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut bytes = [0u8; RECIPIENT_BYTES_MAX];
        bytes[..s.len()].copy_from_slice(s);
        Some(Recipient {
            len: s.len() as u8,
            bytes,
        })
    }

    /// The number as bytes, `+` included. Handle with care: this is personal data.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The number zero-padded to [`RECIPIENT_BYTES_MAX`] bytes, `+` included: a fixed-size
    /// encoding (no number holds a zero byte, so no two share one) for fixed-length
    /// hashing and key derivation. Handle with care: this is personal data.
    pub(crate) fn padded(&self) -> &[u8; RECIPIENT_BYTES_MAX] {
        &self.bytes
    }

    /// The number as text, `+` included. Handle with care: this is personal data.
    pub fn as_str(&self) -> &str {
        // The bytes were checked to be ASCII in parse.
        std::str::from_utf8(self.as_bytes()).expect("recipient is ASCII")
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient(<{} digits redacted>)", self.len - 1)
    }
}

/// A bearer token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub Bytes);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<{} bytes redacted>)", self.0.len())
    }
}

/// One message of a SUBMIT, as decoded: the payload is a slice of the frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender's id for this message, its idempotency key.
    pub client_id: u64,
    /// Who it is for.
    pub recipient: Recipient,
    /// The content, in the clear.
    pub payload: Bytes,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("client_id", &self.client_id)
            .field("recipient", &self.recipient)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// One entry of a REPORT: a delivered message that its recipient reported as spam.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEntry {
    /// The business that sent it.
    pub business_id: u32,
    /// The business's client message id.
    pub client_id: u64,
    /// The recipient who reported it.
    pub recipient: Recipient,
}

/// Where an accepted message lives: the shard's log and the record's index in it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct LogPosition(pub u64);

impl LogPosition {
    /// Bits of the position that hold the record index.
    pub const INDEX_BITS: u32 = 48;
    /// Indexes a log can hand out: every index is below this (a full log takes nothing).
    pub const INDEX_LIMIT: u64 = 1 << Self::INDEX_BITS;

    /// Position of record `index` in the log of `shard`.
    pub fn new(shard: ShardId, index: u64) -> LogPosition {
        assert!(index < 1 << Self::INDEX_BITS, "log index overflow");
        LogPosition((u64::from(u16::from(shard)) << Self::INDEX_BITS) | index)
    }
    /// The shard field as encoded (16 bits). A position read from a peer may name a
    /// value that is no shard: route by [`LogPosition::shard_id`].
    pub fn shard(self) -> u16 {
        (self.0 >> Self::INDEX_BITS) as u16
    }
    /// The shard whose log holds the record; `None` when the field names no shard.
    pub fn shard_id(self) -> Option<ShardId> {
        ShardId::try_from(self.shard()).ok()
    }
    /// The record's index in that log.
    pub fn index(self) -> u64 {
        self.0 & ((1 << Self::INDEX_BITS) - 1)
    }
}

/// Why a message was rejected: a closed set, stable on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// The connection is not authenticated for this business.
    Unauthorized = 1,
    /// The recipient cannot be messaged (kept for routing checks; syntax errors close the stream).
    InvalidRecipient = 2,
    /// The payload is larger than the profile's `payload_bytes_max`, or empty.
    PayloadTooLarge = 3,
    /// The business is paused for an abnormal sending pattern.
    SenderPaused = 4,
    /// The business reached its limit of unique recipients in 24 hours.
    MessagingLimitReached = 5,
    /// The log cannot take the message (disk full, storage failed).
    StorageUnavailable = 6,
    /// The server is shutting down.
    ShuttingDown = 7,
    /// A user's reply sealed end to end did not open (bad ciphertext, wrong business or
    /// key, a retired key): answered to the edge, never stored.
    BadCiphertext = 8,
}

impl Reason {
    /// Every reason, in wire order.
    pub const ALL: [Reason; 8] = [
        Reason::Unauthorized,
        Reason::InvalidRecipient,
        Reason::PayloadTooLarge,
        Reason::SenderPaused,
        Reason::MessagingLimitReached,
        Reason::StorageUnavailable,
        Reason::ShuttingDown,
        Reason::BadCiphertext,
    ];

    /// Decodes a reason byte.
    pub fn from_u8(v: u8) -> Option<Reason> {
        Reason::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }

    /// Stable snake_case name, for reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unauthorized => "unauthorized",
            Reason::InvalidRecipient => "invalid_recipient",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::SenderPaused => "sender_paused",
            Reason::MessagingLimitReached => "messaging_limit_reached",
            Reason::StorageUnavailable => "storage_unavailable",
            Reason::ShuttingDown => "shutting_down",
            Reason::BadCiphertext => "bad_ciphertext",
        }
    }
}

/// The outcome of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Taken, at this position.
    Accepted(LogPosition),
    /// Already taken earlier under the same client id, at this position.
    Duplicate(LogPosition),
    /// Not taken now; the sender may retry after this many milliseconds.
    Throttled {
        /// Milliseconds to wait before retrying.
        retry_after_ms: u32,
    },
    /// Not taken, for this reason.
    Rejected(Reason),
}

impl Status {
    fn encode(self, out: &mut BytesMut) {
        let (kind, value) = match self {
            Status::Accepted(p) => (0u8, p.0),
            Status::Duplicate(p) => (1, p.0),
            Status::Throttled { retry_after_ms } => (2, u64::from(retry_after_ms)),
            Status::Rejected(r) => (3, r as u64),
        };
        out.put_u8(kind);
        out.put_u64_le(value);
    }

    fn decode(kind: u8, value: u64) -> Option<Status> {
        Some(match kind {
            0 => Status::Accepted(LogPosition(value)),
            1 => Status::Duplicate(LogPosition(value)),
            2 => Status::Throttled {
                retry_after_ms: u32::try_from(value).ok()?,
            },
            3 => Status::Rejected(Reason::from_u8(u8::try_from(value).ok()?)?),
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Authenticate.
    Hello {
        /// Protocol version.
        version: u16,
        /// Bearer token.
        token: Token,
        /// Features asked for (version 2; 0 for version 1).
        features: u32,
    },
    /// A batch of messages.
    Submit {
        /// The client's id of the batch, echoed in its ACK.
        batch_id: u64,
        /// The messages.
        messages: Vec<Message>,
    },
    /// Spam reports.
    Report {
        /// Reported messages.
        entries: Vec<ReportEntry>,
    },
    /// Authentication accepted.
    Welcome(Welcome),
    /// Outcome of one SUBMIT.
    Ack {
        /// The batch id of the SUBMIT answered.
        batch_id: u64,
        /// One status per message, in batch order.
        statuses: Vec<Status>,
    },
    /// A frame of delivery (see [`delivery`]).
    Delivery(DeliveryFrame),
}

/// What the server tells an authenticated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The business the token belongs to.
    pub business_id: u32,
    /// Most messages per SUBMIT.
    pub batch_messages_max: u32,
    /// Largest payload accepted.
    pub payload_bytes_max: u32,
    /// Largest frame body accepted.
    pub frame_bytes_max: u32,
    /// Features granted, when answering a version 2 HELLO (`None`: a version 1 WELCOME).
    pub features: Option<u32>,
}

/// A message to encode: borrowed, so a client encodes without copying into owned messages.
#[derive(Clone, Copy)]
pub struct OutMessage<'a> {
    /// Idempotency key.
    pub client_id: u64,
    /// Recipient.
    pub recipient: &'a Recipient,
    /// Content.
    pub payload: &'a [u8],
}

impl std::fmt::Debug for OutMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutMessage")
            .field("client_id", &self.client_id)
            .field("recipient", self.recipient)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

pub(crate) fn put_header(out: &mut impl BufMut, ty: u8, len: usize) {
    let len = u32::try_from(len).expect("frame body fits u32");
    out.put_u32_le(len);
    out.put_u8(ty);
}

/// Encodes HELLO version 1 (no features).
pub fn encode_hello(token: &[u8], out: &mut BytesMut) {
    assert!(token.len() <= TOKEN_BYTES_MAX, "token too long");
    put_header(out, frame_type::HELLO, 2 + 2 + token.len());
    out.put_u16_le(VERSION);
    out.put_u16_le(token.len() as u16);
    out.put_slice(token);
}

/// Encodes HELLO version 2, asking for `features` (see [`delivery::features`]).
pub fn encode_hello_features(token: &[u8], features: u32, out: &mut BytesMut) {
    assert!(token.len() <= TOKEN_BYTES_MAX, "token too long");
    put_header(out, frame_type::HELLO, 2 + 2 + token.len() + 4);
    out.put_u16_le(VERSION_FEATURES);
    out.put_u16_le(token.len() as u16);
    out.put_slice(token);
    out.put_u32_le(features);
}

/// Body bytes of a SUBMIT holding `messages`.
pub fn submit_body_bytes<'a>(messages: impl IntoIterator<Item = &'a OutMessage<'a>>) -> usize {
    BATCH_HEADER_BYTES
        + messages
            .into_iter()
            .map(|m| MESSAGE_OVERHEAD_BYTES + m.recipient.as_bytes().len() + m.payload.len())
            .sum::<usize>()
}

/// Encodes SUBMIT.
pub fn encode_submit(batch_id: u64, messages: &[OutMessage<'_>], out: &mut BytesMut) {
    out.reserve(FRAME_HEADER_BYTES + submit_body_bytes(messages));
    encode_submit_into(batch_id, messages, out);
}

/// Encodes SUBMIT into any buffer (a recycled `Vec<u8>`, say); reserving room first is
/// the caller's choice.
pub fn encode_submit_into(batch_id: u64, messages: &[OutMessage<'_>], out: &mut impl BufMut) {
    let body = submit_body_bytes(messages);
    put_header(out, frame_type::SUBMIT, body);
    out.put_u64_le(batch_id);
    out.put_u32_le(u32::try_from(messages.len()).expect("batch count fits u32"));
    for m in messages {
        out.put_u64_le(m.client_id);
        let r = m.recipient.as_bytes();
        out.put_u8(r.len() as u8);
        out.put_slice(r);
        out.put_u32_le(u32::try_from(m.payload.len()).expect("payload fits u32"));
        out.put_slice(m.payload);
    }
}

/// Encodes REPORT.
pub fn encode_report(entries: &[ReportEntry], out: &mut BytesMut) {
    let body = 4 + entries
        .iter()
        .map(|e| 4 + 8 + 1 + e.recipient.as_bytes().len())
        .sum::<usize>();
    put_header(out, frame_type::REPORT, body);
    out.put_u32_le(u32::try_from(entries.len()).expect("count fits u32"));
    for e in entries {
        out.put_u32_le(e.business_id);
        out.put_u64_le(e.client_id);
        let r = e.recipient.as_bytes();
        out.put_u8(r.len() as u8);
        out.put_slice(r);
    }
}

/// Encodes WELCOME (20 bytes with features, 16 without).
pub fn encode_welcome(w: &Welcome, out: &mut BytesMut) {
    put_header(
        out,
        frame_type::WELCOME,
        if w.features.is_some() { 20 } else { 16 },
    );
    out.put_u32_le(w.business_id);
    out.put_u32_le(w.batch_messages_max);
    out.put_u32_le(w.payload_bytes_max);
    out.put_u32_le(w.frame_bytes_max);
    if let Some(f) = w.features {
        out.put_u32_le(f);
    }
}

/// Encodes ACK.
pub fn encode_ack(batch_id: u64, statuses: &[Status], out: &mut BytesMut) {
    let body = BATCH_HEADER_BYTES + statuses.len() * STATUS_BYTES;
    out.reserve(FRAME_HEADER_BYTES + body);
    put_header(out, frame_type::ACK, body);
    out.put_u64_le(batch_id);
    out.put_u32_le(u32::try_from(statuses.len()).expect("count fits u32"));
    for s in statuses {
        s.encode(out);
    }
}

impl Frame {
    /// Encodes any frame (tests and tools; hot paths call the `encode_*` functions).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello {
                version,
                token,
                features,
            } => {
                let extra = if *version == VERSION_FEATURES { 4 } else { 0 };
                put_header(out, frame_type::HELLO, 4 + token.0.len() + extra);
                out.put_u16_le(*version);
                out.put_u16_le(token.0.len() as u16);
                out.put_slice(&token.0);
                if extra > 0 {
                    out.put_u32_le(*features);
                }
            }
            Frame::Submit { batch_id, messages } => {
                let out_msgs: Vec<OutMessage<'_>> = messages
                    .iter()
                    .map(|m| OutMessage {
                        client_id: m.client_id,
                        recipient: &m.recipient,
                        payload: &m.payload,
                    })
                    .collect();
                encode_submit(*batch_id, &out_msgs, out);
            }
            Frame::Report { entries } => encode_report(entries, out),
            Frame::Welcome(w) => encode_welcome(w, out),
            Frame::Ack { batch_id, statuses } => encode_ack(*batch_id, statuses, out),
            Frame::Delivery(f) => delivery::encode(f, out),
        }
    }
}

/// Decodes one frame body of type `ty`. `body` is exactly the frame's body.
pub fn decode_body(ty: u8, body: Bytes, limits: &WireLimits) -> Result<Frame, WireError> {
    decode_body_reusing(ty, body, limits, &mut MessageLists::new())
}

/// Message lists kept for the next SUBMITs, so that a server decoding batch after batch
/// does not allocate a list for each: the stage chain gives a batch's list back
/// ([`MessageLists::give`]) once the batch is sealed and appended. At most
/// [`MESSAGE_LISTS_KEPT`] lists of at most [`MESSAGE_LIST_CAPACITY_KEPT`] messages each are
/// kept (a `Message` is 64 bytes: 4 MiB at most); a larger list is dropped when given back.
#[derive(Debug, Default)]
pub struct MessageLists {
    free: Vec<Vec<Message>>,
}

/// Lists a [`MessageLists`] keeps at most.
pub const MESSAGE_LISTS_KEPT: usize = 64;
/// Capacity (in messages) above which a list given back is dropped, not kept.
pub const MESSAGE_LIST_CAPACITY_KEPT: usize = 1024;

impl MessageLists {
    /// None kept yet (allocates nothing).
    pub fn new() -> MessageLists {
        MessageLists::default()
    }

    /// An empty list with room for `count` messages: a kept one when there is one.
    pub fn take(&mut self, count: usize) -> Vec<Message> {
        let mut list = self.free.pop().unwrap_or_default();
        list.reserve(count);
        list
    }

    /// Keeps `list` (emptied) for a later [`MessageLists::take`], within the bounds.
    pub fn give(&mut self, mut list: Vec<Message>) {
        let cap = list.capacity();
        if cap == 0 || cap > MESSAGE_LIST_CAPACITY_KEPT || self.free.len() >= MESSAGE_LISTS_KEPT {
            return;
        }
        list.clear();
        if self.free.capacity() == 0 {
            self.free.reserve_exact(MESSAGE_LISTS_KEPT);
        }
        self.free.push(list);
    }

    /// Lists kept now.
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

/// [`decode_body`], with a SUBMIT's message list taken from `lists`.
pub fn decode_body_reusing(
    ty: u8,
    mut body: Bytes,
    limits: &WireLimits,
    lists: &mut MessageLists,
) -> Result<Frame, WireError> {
    match ty {
        frame_type::HELLO => {
            let m = |what| WireError::Malformed {
                frame: "HELLO",
                what,
            };
            if body.len() < 4 {
                return Err(m("shorter than its fixed fields"));
            }
            let version = body.get_u16_le();
            let token_len = usize::from(body.get_u16_le());
            let extra = match version {
                VERSION => 0,
                VERSION_FEATURES => 4,
                _ => return Err(WireError::BadHello("unsupported version")),
            };
            if token_len > TOKEN_BYTES_MAX {
                return Err(WireError::BadHello("token longer than 256 bytes"));
            }
            if body.len() != token_len + extra {
                return Err(m("token length does not match the frame"));
            }
            let token = Token(body.split_to(token_len));
            let features = if extra > 0 { body.get_u32_le() } else { 0 };
            Ok(Frame::Hello {
                version,
                token,
                features,
            })
        }
        frame_type::SUBMIT => {
            let m = |what| WireError::Malformed {
                frame: "SUBMIT",
                what,
            };
            if body.len() < BATCH_HEADER_BYTES {
                return Err(m("shorter than its fixed fields"));
            }
            let batch_id = body.get_u64_le();
            let count = body.get_u32_le();
            check_count(count, limits)?;
            // Each message takes at least its fixed fields plus a minimal recipient: a
            // count the body cannot hold is refused before the Vec is sized by it.
            let min_each = MESSAGE_OVERHEAD_BYTES + 1 + RECIPIENT_DIGITS_MIN;
            if (count as usize).saturating_mul(min_each) > body.len() {
                return Err(m("count larger than the body can hold"));
            }
            let mut messages = lists.take(count as usize);
            for index in 0..count {
                if body.len() < 9 {
                    return Err(m("message header truncated"));
                }
                let client_id = body.get_u64_le();
                let rlen = usize::from(body.get_u8());
                if body.len() < rlen + 4 {
                    return Err(m("recipient truncated"));
                }
                if rlen > RECIPIENT_BYTES_MAX {
                    return Err(WireError::InvalidRecipient { index });
                }
                let recipient =
                    Recipient::parse(&body[..rlen]).ok_or(WireError::InvalidRecipient { index })?;
                body.advance(rlen);
                let plen = body.get_u32_le() as usize;
                if body.len() < plen {
                    return Err(m("payload runs past the frame"));
                }
                let payload = body.split_to(plen);
                messages.push(Message {
                    client_id,
                    recipient,
                    payload,
                });
            }
            if !body.is_empty() {
                return Err(m("bytes after the last message"));
            }
            Ok(Frame::Submit { batch_id, messages })
        }
        frame_type::REPORT => {
            let m = |what| WireError::Malformed {
                frame: "REPORT",
                what,
            };
            if body.len() < 4 {
                return Err(m("shorter than its fixed fields"));
            }
            let count = body.get_u32_le();
            check_count(count, limits)?;
            let min_each = 4 + 8 + 1 + 1 + RECIPIENT_DIGITS_MIN;
            if (count as usize).saturating_mul(min_each) > body.len() {
                return Err(m("count larger than the body can hold"));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for index in 0..count {
                if body.len() < 13 {
                    return Err(m("entry truncated"));
                }
                let business_id = body.get_u32_le();
                let client_id = body.get_u64_le();
                let rlen = usize::from(body.get_u8());
                if body.len() < rlen {
                    return Err(m("recipient truncated"));
                }
                let recipient =
                    Recipient::parse(&body[..rlen]).ok_or(WireError::InvalidRecipient { index })?;
                body.advance(rlen);
                entries.push(ReportEntry {
                    business_id,
                    client_id,
                    recipient,
                });
            }
            if !body.is_empty() {
                return Err(m("bytes after the last entry"));
            }
            Ok(Frame::Report { entries })
        }
        frame_type::WELCOME => {
            if body.len() != 16 && body.len() != 20 {
                return Err(WireError::Malformed {
                    frame: "WELCOME",
                    what: "body is not 16 or 20 bytes",
                });
            }
            Ok(Frame::Welcome(Welcome {
                business_id: body.get_u32_le(),
                batch_messages_max: body.get_u32_le(),
                payload_bytes_max: body.get_u32_le(),
                frame_bytes_max: body.get_u32_le(),
                features: (body.len() == 4).then(|| body.get_u32_le()),
            }))
        }
        frame_type::ACK => {
            let m = |what| WireError::Malformed { frame: "ACK", what };
            if body.len() < BATCH_HEADER_BYTES {
                return Err(m("shorter than its fixed fields"));
            }
            let batch_id = body.get_u64_le();
            let count = body.get_u32_le();
            check_count(count, limits)?;
            if body.len() != count as usize * STATUS_BYTES {
                return Err(m("count does not match the body"));
            }
            let mut statuses = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let kind = body.get_u8();
                let value = body.get_u64_le();
                statuses.push(Status::decode(kind, value).ok_or(m("unknown status"))?);
            }
            Ok(Frame::Ack { batch_id, statuses })
        }
        other if delivery::is_delivery_type(other) => {
            delivery::decode_reusing(other, body, limits, lists).map(Frame::Delivery)
        }
        other => Err(WireError::UnknownType(other)),
    }
}

pub(crate) fn check_count(count: u32, limits: &WireLimits) -> Result<(), WireError> {
    if count == 0 || count > limits.batch_messages_max {
        return Err(WireError::BadBatchSize {
            count,
            max: limits.batch_messages_max,
        });
    }
    Ok(())
}

fn known_type(ty: u8) -> bool {
    matches!(
        ty,
        frame_type::HELLO
            | frame_type::SUBMIT
            | frame_type::REPORT
            | frame_type::WELCOME
            | frame_type::ACK
    ) || delivery::is_delivery_type(ty)
}

/// Most chunks a decoder holds as they came; stream bytes beyond them are copied into
/// one contiguous overflow buffer instead. Each held chunk keeps its datagram's buffer
/// alive, so this bounds how many small buffers a peer's tiny packets can pin (a SUBMIT
/// of 64 messages of 1 KiB arrives in about 60 chunks).
pub const CHUNKS_HELD_MAX: usize = 256;

/// Reassembles frames from the chunks of one stream.
///
/// Holds at most one frame (`FRAME_HEADER_BYTES + frame_bytes_max`) plus the chunk being
/// pushed: a header is checked as soon as its 5 bytes are in, so an oversized or unknown
/// frame fails before its body is buffered. Nothing is reserved ahead of the bytes that
/// arrived.
///
/// **One copy at most.** Chunks pushed with [`FrameDecoder::push_bytes`] (quinn's `Bytes`)
/// are held as they came, up to [`CHUNKS_HELD_MAX`]; a frame is copied out of them once,
/// into one buffer, when its last byte is in (a frame inside one chunk is not copied at
/// all: its body is a slice of the chunk); that buffer is reused for a later frame once
/// the frame decoded from it is dropped. Before, every chunk was
/// appended to one growing buffer, and a frame larger than the buffer's first
/// reservation (a batch of 64 messages of 1 KiB is) was copied again when it grew.
/// Past [`CHUNKS_HELD_MAX`] chunks the rest of the stream's bytes are appended to an
/// overflow buffer that grows geometrically, so a peer sending tiny chunks costs
/// amortised linear copying, never quadratic.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: WireLimits,
    /// Stream bytes not yet decoded, in order: first the held chunks, then `overflow`.
    chunks: VecDeque<Bytes>,
    /// Bytes that arrived while [`CHUNKS_HELD_MAX`] chunks were held (or after such bytes).
    overflow: BytesMut,
    /// Bytes in `chunks` and `overflow` together.
    buffered: usize,
    /// What is left of the buffer the last body copied out of several chunks went into
    /// (empty; that body was split off it). The next such body goes into its room, or,
    /// once every frame decoded from it is dropped, into the same memory from its start
    /// (still in the cache), instead of a new allocation. Split off a shared buffer, it
    /// keeps its shared header, so reusing it allocates nothing.
    spare: BytesMut,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: WireLimits) -> FrameDecoder {
        FrameDecoder {
            limits,
            chunks: VecDeque::new(),
            overflow: BytesMut::new(),
            buffered: 0,
            spare: BytesMut::new(),
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Changes the bounds from the next frame on (a connection's bounds widen once its
    /// HELLO is accepted).
    pub fn set_limits(&mut self, limits: WireLimits) {
        self.limits = limits;
    }

    /// Appends stream bytes (copied; [`FrameDecoder::push_bytes`] takes a chunk without).
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if self.takes_overflow() {
            self.overflow.extend_from_slice(chunk);
            self.buffered += chunk.len();
        } else {
            self.push_bytes(Bytes::copy_from_slice(chunk));
        }
    }

    /// Appends a chunk of stream bytes, held without a copy while fewer than
    /// [`CHUNKS_HELD_MAX`] are.
    pub fn push_bytes(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.buffered += chunk.len();
        if self.takes_overflow() {
            self.overflow.extend_from_slice(&chunk);
        } else {
            self.chunks.push_back(chunk);
        }
    }

    /// Whether new bytes go to the overflow buffer: it holds some already (they must stay
    /// in order), or the decoder holds as many chunks as it may.
    fn takes_overflow(&self) -> bool {
        !self.overflow.is_empty() || self.chunks.len() >= CHUNKS_HELD_MAX
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// An error ends the stream: reset it with [`WireError::code`] and drop the decoder.
    /// What the decoder holds after an error is unspecified (a header error leaves the
    /// header buffered, a body error has consumed the bad frame), so it is not read again.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        self.next_frame_reusing(&mut MessageLists::new())
    }

    /// [`FrameDecoder::next_frame`], with a SUBMIT's message list taken from `lists`.
    pub fn next_frame_reusing(
        &mut self,
        lists: &mut MessageLists,
    ) -> Result<Option<Frame>, WireError> {
        let Some((ty, len)) = self.header()? else {
            return Ok(None);
        };
        if self.buffered < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        // The header was read by `header`: dropped, not copied out.
        self.consume(FRAME_HEADER_BYTES, |_| {});
        let body = self.take(len);
        decode_body_reusing(ty, body, &self.limits, lists).map(Some)
    }

    /// Checks the header of the next frame as soon as it is complete.
    fn header(&self) -> Result<Option<(u8, usize)>, WireError> {
        if self.buffered < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut h = [0u8; FRAME_HEADER_BYTES];
        self.peek(&mut h);
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let ty = h[4];
        if !known_type(ty) {
            return Err(WireError::UnknownType(ty));
        }
        if len > self.limits.frame_bytes_max {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.limits.frame_bytes_max,
            });
        }
        Ok(Some((ty, len as usize)))
    }

    /// Copies the first `out.len()` buffered bytes (there are that many) into `out`.
    fn peek(&self, out: &mut [u8]) {
        let mut filled = 0;
        let parts = self.chunks.iter().map(|c| &c[..]);
        for part in parts.chain(std::iter::once(&self.overflow[..])) {
            let n = part.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
            if filled == out.len() {
                return;
            }
        }
        unreachable!("peek past the buffered bytes");
    }

    /// Takes the first `n` buffered bytes (there are that many): a slice of the first
    /// chunk or of the overflow when it holds them all, else one copy into a buffer of
    /// `n` (the last such body's, when its frame is gone).
    fn take(&mut self, n: usize) -> Bytes {
        if let Some(first) = self.chunks.front_mut() {
            if first.len() >= n {
                self.buffered -= n;
                let out = first.split_to(n);
                if first.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        } else if self.overflow.len() >= n {
            self.buffered -= n;
            let out = self.overflow.split_to(n).freeze();
            self.release_drained_overflow();
            return out;
        }
        // Room after the last body, or the whole buffer again once nothing decoded from
        // it is alive; else a new buffer.
        let mut out = std::mem::take(&mut self.spare);
        if !out.try_reclaim(n) {
            out = BytesMut::with_capacity(n);
        }
        self.consume(n, |part| out.extend_from_slice(part));
        let body = out.split_to(n).freeze();
        self.spare = out;
        body
    }

    /// Removes the first `n` buffered bytes (there are that many), handing each run of
    /// them to `f` in order.
    fn consume(&mut self, n: usize, mut f: impl FnMut(&[u8])) {
        debug_assert!(n <= self.buffered);
        self.buffered -= n;
        let mut left = n;
        while left > 0 {
            if let Some(first) = self.chunks.front_mut() {
                let k = first.len().min(left);
                f(&first[..k]);
                first.advance(k);
                if first.is_empty() {
                    self.chunks.pop_front();
                }
                left -= k;
            } else {
                f(&self.overflow[..left]);
                self.overflow.advance(left);
                self.release_drained_overflow();
                left = 0;
            }
        }
    }

    /// Gives an emptied overflow buffer back rather than keep a large frame's memory for
    /// the stream.
    fn release_drained_overflow(&mut self) {
        if self.overflow.is_empty() {
            self.overflow = BytesMut::new();
        }
    }

    /// Validates what is buffered once the stream has ended: a partial frame is an error.
    /// Call after `next_frame` returned `Ok(None)`.
    pub fn finish(&self) -> Result<(), WireError> {
        self.header()?;
        if self.buffered == 0 {
            Ok(())
        } else {
            Err(WireError::Truncated {
                buffered: self.buffered,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Recipient {
        Recipient::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn recipient_validation() {
        assert!(Recipient::parse(b"+4915112345678").is_some());
        assert!(Recipient::parse(b"+1234567").is_some());
        assert!(Recipient::parse(b"+123456").is_none(), "too short");
        assert!(
            Recipient::parse(b"+1234567890123456").is_none(),
            "16 digits"
        );
        assert!(Recipient::parse(b"4915112345678").is_none(), "no plus");
        assert!(Recipient::parse(b"+0915112345678").is_none(), "leading 0");
        assert!(Recipient::parse(b"+49151-2345678").is_none(), "dash");
        assert!(Recipient::parse(b"").is_none());
    }

    #[test]
    fn debug_never_shows_content() {
        let m = Message {
            client_id: 7,
            recipient: r("+4915112345678"),
            payload: Bytes::from_static(b"secret words"),
        };
        let s = format!("{m:?} {:?}", Token(Bytes::from_static(b"tok-abc")));
        assert!(!s.contains("4915112345678"), "{s}");
        assert!(!s.contains("secret"), "{s}");
        assert!(!s.contains("tok-abc"), "{s}");
    }

    #[test]
    fn log_position_parts() {
        let p = LogPosition::new(ShardId::new(3), 99);
        assert_eq!((p.shard(), p.index()), (3, 99));
    }

    #[test]
    fn header_checked_before_body_buffered() {
        let limits = WireLimits {
            frame_bytes_max: 1024,
            batch_messages_max: 16,
        };
        let mut d = FrameDecoder::new(limits);
        let mut hdr = BytesMut::new();
        hdr.put_u32_le(1025);
        hdr.put_u8(frame_type::SUBMIT);
        d.push(&hdr);
        assert_eq!(
            d.next_frame(),
            Err(WireError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        );
    }

    /// A SUBMIT of `count` messages of `size` bytes, encoded, and its messages' payloads.
    fn submit_frame(count: usize, size: usize) -> (Bytes, Vec<Vec<u8>>) {
        let to = r("+4915112345678");
        let payloads: Vec<Vec<u8>> = (0..count)
            .map(|i| (0..size).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let messages: Vec<OutMessage<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| OutMessage {
                client_id: i as u64,
                recipient: &to,
                payload: p,
            })
            .collect();
        let mut out = BytesMut::new();
        encode_submit(9, &messages, &mut out);
        (out.freeze(), payloads)
    }

    fn payloads_of(frame: Frame) -> Vec<Bytes> {
        match frame {
            Frame::Submit {
                batch_id: 9,
                messages,
            } => messages.into_iter().map(|m| m.payload).collect(),
            other => panic!("not the SUBMIT sent: {other:?}"),
        }
    }

    #[test]
    fn a_frame_inside_one_chunk_is_not_copied() {
        let (frame, payloads) = submit_frame(3, 100);
        let mut chunk = BytesMut::from(&frame[..]);
        chunk.extend_from_slice(&frame[..3]); // the next frame's first bytes
        let chunk = chunk.freeze();
        let range = chunk.as_ptr_range();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push_bytes(chunk);
        let got = payloads_of(d.next_frame().unwrap().unwrap());
        assert_eq!(got, payloads);
        for p in &got {
            assert!(range.contains(&p.as_ptr()), "a payload was copied");
        }
        assert_eq!(d.buffered(), 3);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn a_frame_across_chunks_is_copied_once_into_its_own_buffer() {
        // A batch of 64 messages of 1 KiB, in chunks of a packet's stream data.
        let (frame, payloads) = submit_frame(64, 1024);
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        let chunks: Vec<Bytes> = frame.chunks(1200).map(Bytes::copy_from_slice).collect();
        assert!(chunks.len() < CHUNKS_HELD_MAX);
        let (last, rest) = chunks.split_last().unwrap();
        for c in rest {
            d.push_bytes(c.clone());
            assert_eq!(d.next_frame(), Ok(None));
        }
        assert!(d.overflow.is_empty(), "every chunk held as it came");
        d.push_bytes(last.clone());
        let got = payloads_of(d.next_frame().unwrap().unwrap());
        assert_eq!(got, payloads);
        // One buffer holds the whole body: the payloads lie in order, back to back
        // apart from each next message's fixed fields and recipient.
        for w in got.windows(2) {
            let gap = w[1].as_ptr() as usize - (w[0].as_ptr() as usize + w[0].len());
            assert_eq!(gap, MESSAGE_OVERHEAD_BYTES + "+4915112345678".len());
        }
        for p in &got {
            assert!(
                chunks
                    .iter()
                    .all(|c| !c.as_ptr_range().contains(&p.as_ptr())),
                "the body is its own buffer, not a chunk's"
            );
        }
        assert_eq!(d.buffered(), 0);
        assert!(d.chunks.is_empty());
    }

    #[test]
    fn a_body_buffer_is_reused_only_once_its_frame_is_dropped() {
        let (a, pa) = submit_frame(8, 500);
        let (b, pb) = submit_frame(8, 500);
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        let mut decode = |frame: &Bytes| {
            for c in frame.chunks(700) {
                d.push_bytes(frame.slice_ref(c));
            }
            payloads_of(d.next_frame().unwrap().unwrap())
        };
        let first = decode(&a);
        let held = first[0].as_ptr();
        // While the first frame lives, the second is copied elsewhere and the first's
        // payloads stay as they were.
        let second = decode(&b);
        assert_eq!(first, pa);
        assert_eq!(second, pb);
        assert_ne!(second[0].as_ptr(), held);
        drop(first);
        let spare = second[0].as_ptr();
        drop(second);
        // Both dropped: the next body goes into the last one's memory.
        let third = decode(&a);
        assert_eq!(third, pa);
        assert_eq!(third[0].as_ptr(), spare);
    }

    #[test]
    fn a_message_list_given_back_is_the_next_submits_list() {
        let (a, pa) = submit_frame(8, 100);
        let mut lists = MessageLists::new();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push_bytes(a.clone());
        let Some(Frame::Submit { messages, .. }) = d.next_frame_reusing(&mut lists).unwrap() else {
            panic!("a SUBMIT");
        };
        let list = messages.as_ptr();
        lists.give(messages);
        assert_eq!(lists.kept(), 1);
        d.push_bytes(a);
        let Some(Frame::Submit { messages, .. }) = d.next_frame_reusing(&mut lists).unwrap() else {
            panic!("a SUBMIT");
        };
        assert_eq!(messages.as_ptr(), list, "the same allocation");
        let got: Vec<Vec<u8>> = messages.iter().map(|m| m.payload.to_vec()).collect();
        assert_eq!(got, pa, "decoded as from a new list");
        assert_eq!(lists.kept(), 0);
    }

    #[test]
    fn message_lists_keep_a_bounded_number_of_bounded_lists() {
        let mut lists = MessageLists::new();
        for _ in 0..MESSAGE_LISTS_KEPT + 10 {
            lists.give(Vec::with_capacity(64));
        }
        assert_eq!(lists.kept(), MESSAGE_LISTS_KEPT);
        let mut lists = MessageLists::new();
        lists.give(Vec::with_capacity(MESSAGE_LIST_CAPACITY_KEPT + 1));
        lists.give(Vec::new());
        assert_eq!(lists.kept(), 0, "an oversized or empty list is dropped");
        assert!(lists.take(5).capacity() >= 5);
    }

    #[test]
    fn past_the_chunks_held_the_bytes_go_to_one_buffer_and_decode_the_same() {
        // Tiny chunks (a byte each, as a hostile peer's packets could carry): at most
        // CHUNKS_HELD_MAX are held, the rest is appended to the overflow buffer.
        let (a, pa) = submit_frame(5, 300);
        let (b, pb) = submit_frame(1, 10);
        let mut stream = a.to_vec();
        stream.extend_from_slice(&b);
        assert!(a.len() > 2 * CHUNKS_HELD_MAX);
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        let mut frames = Vec::new();
        for byte in stream.chunks(1) {
            d.push_bytes(Bytes::copy_from_slice(byte));
            assert!(d.chunks.len() <= CHUNKS_HELD_MAX);
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(payloads_of(frames.remove(0)), pa);
        assert_eq!(payloads_of(frames.remove(0)), pb);
        assert_eq!(d.buffered(), 0);
        // Drained, the decoder holds chunks as they come again.
        assert!(d.overflow.is_empty() && d.chunks.is_empty());
        d.push_bytes(b.slice(..4));
        assert_eq!(d.chunks.len(), 1);
    }
}
