//! The frames of delivery (wire v1 with HELLO version 2): statuses and users' replies to
//! businesses, messages to the platform's delivery edge and its outcomes.
//!
//! ```text
//! negotiation
//!   HELLO v2  0x01  version=2:u16 | token_len:u16 | token | features:u32
//!   WELCOME   0x81  (16 bytes as in v1) | features:u32    (granted; only answering a v2 HELLO)
//!   features: EVENTS (0x1, a business: STATUS and INBOUND_EVENT come on the HELLO stream)
//!             DELIVERY (0x2, a platform credential: DELIVER comes on the HELLO stream)
//!             E2E (0x4, with DELIVERY: messages are sealed for devices, replies for
//!                  businesses; the edge publishes device keys. A relay whose profile sets
//!                  `[e2e] enabled` grants DELIVERY only together with E2E)
//! business -> server
//!   SUBMIT_TTL 0x09  batch_id:u64 | ttl_secs:u32 | count:u32 | count * message (as SUBMIT)
//!   EVENT_ACK  0x04  count:u32 | count * event:u64       (events handled; any stream)
//! server -> business (HELLO stream, with EVENTS)
//!   STATUS        0x84  count:u32 | count * (event:u64 | message:u64 | client_id:u64
//!                       | kind:u8 | reason:u8 | at_ms:u64)
//!   INBOUND_EVENT 0x85  event:u64 | at_ms:u64 | sender_len:u8 | sender | len:u32 | payload
//! edge -> server (platform credential)
//!   CREDIT   0x08  credit:u32                            (more DELIVERs it can take)
//!   OUTCOME  0x05  count:u32 | count * (message:u64 | outcome:u8 | reason:u8)
//!   ONLINE   0x06  count:u32 | count * (recipient_len:u8 | recipient)
//!   INBOUND  0x07  batch_id:u64 | count:u32 | count * (id:u64 | business_id:u32
//!                  | sender_len:u8 | sender | len:u32 | payload)
//!                  (answered by ACK, like SUBMIT; `id` is the edge's idempotency key: a
//!                  resend is answered `duplicate` with the first position; with E2E the
//!                  payload is a sealed reply (`e2e::SealedReply`), opened by the relay:
//!                  one that does not open is answered `rejected(bad_ciphertext)`)
//!   DEVICE_KEYS 0x0A count:u32 | count * (recipient_len:u8 | recipient | len:u32
//!                  | bundle list (`e2e::bundle`, at most BUNDLE_LIST_BYTES_MAX; no device:
//!                  the recipient has none))                                  (with E2E)
//! server -> edge (HELLO stream, with DELIVERY)
//!   DELIVER  0x83  message:u64 | business_id:u32 | client_id:u64 | expires_ms:u64
//!                  | recipient_len:u8 | recipient | len:u32 | payload
//! server -> edge (HELLO stream, with DELIVERY and E2E)
//!   DELIVER_E2E  0x88  as DELIVER, the payload being the device copies:
//!                copies:u8 (1..=DEVICES_PER_RECIPIENT_MAX) | copies * (device_id:u32
//!                | seq:u64 | session header (45, `e2e::SessionHeader`) | len:u32
//!                | ciphertext | tag)
//!   KEYS_WANTED  0x86  count:u32 | count * (recipient_len:u8 | recipient)
//!                (answer with DEVICE_KEYS for each)
//!   BUSINESS_KEYS 0x87 count:u32 (<= BUSINESS_KEYS_PER_FRAME_MAX) | count * (business_id:u32
//!                | key_id:u32 | X25519 public key(32))   (the keys replies are sealed to)
//! ```
//!
//! Every DELIVER_E2E copy carries its session's header, not only a session's first
//! message: hand-offs are at least once and spread over the edge's connections, so the
//! first message of a session is not always the first to reach its device, and a device
//! that lost its side of a session can rebuild it from any message (45 bytes per copy).
//!
//! Event and message ids are log positions (`shard:16 | index:48`): unique per node, so
//! a receiver drops a copy it already handled (every push is at least once).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    check_count, frame_type, put_header, LogPosition, Message, Recipient, WireError, WireLimits,
    MESSAGE_OVERHEAD_BYTES, RECIPIENT_BYTES_MAX, RECIPIENT_DIGITS_MIN,
};

/// Feature bits of HELLO v2 and WELCOME.
pub mod features {
    /// A business connection receives STATUS and INBOUND_EVENT on its HELLO stream.
    pub const EVENTS: u32 = 0x1;
    /// A platform connection receives DELIVER on its HELLO stream.
    pub const DELIVERY: u32 = 0x2;
    /// With DELIVERY: end-to-end sealing for devices and replies (DELIVER_E2E,
    /// KEYS_WANTED, BUSINESS_KEYS; DEVICE_KEYS from the edge; INBOUND payloads sealed).
    pub const E2E: u32 = 0x4;
    /// Every feature this build knows.
    pub const ALL: u32 = EVENTS | DELIVERY | E2E;
}

/// Bytes of one STATUS entry.
pub const STATUS_EVENT_BYTES: usize = 8 + 8 + 8 + 1 + 1 + 8;
/// Bytes of one OUTCOME entry.
pub const OUTCOME_BYTES: usize = 8 + 1 + 1;
/// Fixed bytes of a DELIVER body besides recipient and payload.
pub const DELIVER_FIXED_BYTES: usize = 8 + 4 + 8 + 8 + 1 + 4;
/// Fixed bytes of an INBOUND_EVENT body besides sender and payload.
pub const INBOUND_EVENT_FIXED_BYTES: usize = 8 + 8 + 1 + 4;
/// Fixed bytes of one INBOUND entry besides sender and payload.
pub const INBOUND_ENTRY_FIXED_BYTES: usize = 8 + 4 + 1 + 4;
/// Most business keys in one BUSINESS_KEYS frame (more go in several frames).
pub const BUSINESS_KEYS_PER_FRAME_MAX: usize = 256;
/// Bytes of one BUSINESS_KEYS entry.
pub const BUSINESS_KEY_BYTES: usize = 4 + 4 + 32;
/// Bytes of a device copy in a DELIVER_E2E payload besides its ciphertext.
pub const DEVICE_COPY_FIXED_BYTES: usize = 4 + 8 + crate::e2e::session::SESSION_HEADER_BYTES + 4;

/// What happened to a message, as a business hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StatusKind {
    /// Handed to the delivery edge.
    Sent = 1,
    /// On a device of the recipient.
    Delivered = 2,
    /// Read by the recipient.
    Read = 3,
    /// Cannot be delivered (see the reason).
    Failed = 4,
    /// Not delivered before its time to live ran out.
    Expired = 5,
}

impl StatusKind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<StatusKind> {
        Some(match b {
            1 => StatusKind::Sent,
            2 => StatusKind::Delivered,
            3 => StatusKind::Read,
            4 => StatusKind::Failed,
            5 => StatusKind::Expired,
            _ => return None,
        })
    }

    /// Stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            StatusKind::Sent => "sent",
            StatusKind::Delivered => "delivered",
            StatusKind::Read => "read",
            StatusKind::Failed => "failed",
            StatusKind::Expired => "expired",
        }
    }

    /// Whether no further delivery is attempted after it (`read` may still follow
    /// `delivered`).
    pub fn is_final(self) -> bool {
        !matches!(self, StatusKind::Sent)
    }
}

/// Why a message failed for good: a closed set, stable on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FailReason {
    /// The number has no account on the platform.
    NotOnPlatform = 1,
    /// The recipient blocked the business.
    BlockedByUser = 2,
    /// No device of the recipient could be reached.
    DeviceUnreachable = 3,
    /// The recipient published no device key in time.
    NoDeviceKey = 4,
    /// Any other permanent failure the edge reports.
    Undeliverable = 5,
}

impl FailReason {
    /// Every reason, in wire order.
    pub const ALL: [FailReason; 5] = [
        FailReason::NotOnPlatform,
        FailReason::BlockedByUser,
        FailReason::DeviceUnreachable,
        FailReason::NoDeviceKey,
        FailReason::Undeliverable,
    ];

    /// Decodes a reason byte.
    pub fn from_u8(b: u8) -> Option<FailReason> {
        FailReason::ALL.get(usize::from(b).checked_sub(1)?).copied()
    }

    /// Stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            FailReason::NotOnPlatform => "not_on_platform",
            FailReason::BlockedByUser => "blocked_by_user",
            FailReason::DeviceUnreachable => "device_unreachable",
            FailReason::NoDeviceKey => "no_device_key",
            FailReason::Undeliverable => "undeliverable",
        }
    }
}

/// One status of one message, for its business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusEvent {
    /// The event's id (the position of its status record).
    pub event: LogPosition,
    /// The message's position (its id in ACK `accepted`).
    pub message: LogPosition,
    /// The business's client message id.
    pub client_id: u64,
    /// What happened.
    pub kind: StatusKind,
    /// Why, for `failed`.
    pub reason: Option<FailReason>,
    /// When the relay recorded it, unix ms.
    pub at_ms: u64,
}

impl StatusEvent {
    /// The status as a record code: `kind << 8 | reason`.
    pub fn code(kind: StatusKind, reason: Option<FailReason>) -> u16 {
        (kind as u16) << 8 | reason.map_or(0, |r| r as u16)
    }

    /// The kind and reason of a record code; `None` if it names none.
    pub fn from_code(code: u16) -> Option<(StatusKind, Option<FailReason>)> {
        let kind = StatusKind::from_u8((code >> 8) as u8)?;
        let reason = match code & 0xff {
            0 => None,
            r => Some(FailReason::from_u8(r as u8)?),
        };
        (reason.is_some() == (kind == StatusKind::Failed)).then_some((kind, reason))
    }
}

/// What the edge says about one message it was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// On a device.
    Delivered,
    /// Read.
    Read,
    /// Failed for good.
    Failed(FailReason),
    /// Not now (recipient offline); the relay retries later, or at RECIPIENT_ONLINE.
    RetryLater,
}

/// One OUTCOME entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeEntry {
    /// The message (its position, the DELIVER id).
    pub message: LogPosition,
    /// What happened.
    pub outcome: Outcome,
}

/// One user's message to a business, as the edge hands it over.
#[derive(Clone, PartialEq, Eq)]
pub struct InboundEntry {
    /// The edge's id of the message: its idempotency key (per business).
    pub id: u64,
    /// The business written to.
    pub business_id: u32,
    /// The user who wrote.
    pub sender: Recipient,
    /// The content.
    pub payload: Bytes,
}

impl std::fmt::Debug for InboundEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundEntry")
            .field("id", &self.id)
            .field("business_id", &self.business_id)
            .field("sender", &self.sender)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// A message handed to the edge.
#[derive(Clone, PartialEq, Eq)]
pub struct Deliver {
    /// Its id: the message's log position.
    pub message: LogPosition,
    /// The sending business.
    pub business_id: u32,
    /// The business's client message id.
    pub client_id: u64,
    /// When the relay stops trying, unix ms.
    pub expires_ms: u64,
    /// Who it is for.
    pub recipient: Recipient,
    /// The sealed message: sealed at rest by the relay (DELIVER), or its device copies
    /// (DELIVER_E2E, when `e2e`; see [`decode_device_copies`]).
    pub payload: Bytes,
    /// Sealed end to end for the recipient's devices (sent as DELIVER_E2E).
    pub e2e: bool,
}

impl std::fmt::Debug for Deliver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliver")
            .field("message", &self.message)
            .field("business_id", &self.business_id)
            .field("client_id", &self.client_id)
            .field("expires_ms", &self.expires_ms)
            .field("payload_bytes", &self.payload.len())
            .field("e2e", &self.e2e)
            .finish()
    }
}

/// One device's copy of a message in a DELIVER_E2E.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCopy {
    /// The device.
    pub device_id: u32,
    /// The message's sequence number in its session.
    pub seq: u64,
    /// The session's header (`e2e::SessionHeader` bytes).
    pub header: [u8; crate::e2e::session::SESSION_HEADER_BYTES],
    /// `ciphertext | tag`.
    pub ciphertext: Bytes,
}

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCopy")
            .field("device_id", &self.device_id)
            .field("seq", &self.seq)
            .field("ciphertext_bytes", &self.ciphertext.len())
            .finish()
    }
}

/// Appends one device copy to a DELIVER_E2E payload being built (after its count byte).
pub fn put_device_copy(
    out: &mut Vec<u8>,
    device_id: u32,
    seq: u64,
    header: &[u8; crate::e2e::session::SESSION_HEADER_BYTES],
    ciphertext: &[u8],
) {
    out.extend_from_slice(&device_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(
        &u32::try_from(ciphertext.len())
            .expect("ciphertext fits u32")
            .to_le_bytes(),
    );
    out.extend_from_slice(ciphertext);
}

/// The device copies of a DELIVER_E2E payload: 1 to `DEVICES_PER_RECIPIENT_MAX`, each
/// device once, nothing after the last.
pub fn decode_device_copies(payload: &Bytes) -> Result<Vec<DeviceCopy>, WireError> {
    let m = |what| WireError::Malformed {
        frame: "DELIVER_E2E",
        what,
    };
    let mut body = payload.clone();
    if body.is_empty() {
        return Err(m("no copy count"));
    }
    let count = usize::from(body.get_u8());
    if count == 0 || count > crate::e2e::bundle::DEVICES_PER_RECIPIENT_MAX {
        return Err(m("copy count out of bounds"));
    }
    let mut copies: Vec<DeviceCopy> = Vec::with_capacity(count);
    for _ in 0..count {
        if body.len() < DEVICE_COPY_FIXED_BYTES {
            return Err(m("device copy truncated"));
        }
        let device_id = body.get_u32_le();
        let seq = body.get_u64_le();
        let mut header = [0; crate::e2e::session::SESSION_HEADER_BYTES];
        body.copy_to_slice(&mut header);
        let ciphertext = get_payload(&mut body, m)?;
        if copies.iter().any(|c| c.device_id == device_id) {
            return Err(m("a device has two copies"));
        }
        copies.push(DeviceCopy {
            device_id,
            seq,
            header,
            ciphertext,
        });
    }
    if !body.is_empty() {
        return Err(m("bytes after the last copy"));
    }
    Ok(copies)
}

/// One business's key for replies, as BUSINESS_KEYS carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessKeyEntry {
    /// The business.
    pub business_id: u32,
    /// Its current reply key.
    pub key: crate::e2e::BusinessPublicKey,
}

/// One recipient's published device bundles, as DEVICE_KEYS carries them (the bundle
/// list's bytes, decoded and verified by the relay).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKeysEntry {
    /// The recipient.
    pub recipient: Recipient,
    /// `e2e::bundle` list bytes.
    pub bundles: Bytes,
}

impl std::fmt::Debug for DeviceKeysEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeysEntry")
            .field("bundle_bytes", &self.bundles.len())
            .finish()
    }
}

/// A user's message, as its business hears it.
#[derive(Clone, PartialEq, Eq)]
pub struct InboundEvent {
    /// The event's id (the position of its inbound record).
    pub event: LogPosition,
    /// When the relay took it, unix ms.
    pub at_ms: u64,
    /// The user who wrote.
    pub sender: Recipient,
    /// The content.
    pub payload: Bytes,
}

impl std::fmt::Debug for InboundEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundEvent")
            .field("event", &self.event)
            .field("at_ms", &self.at_ms)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// One event a business hears: a status or a user's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusinessEvent {
    /// A status of one of its messages.
    Status(StatusEvent),
    /// A user's message.
    Inbound(InboundEvent),
}

impl BusinessEvent {
    /// The event's id: the position of its record.
    pub fn event(&self) -> LogPosition {
        match self {
            BusinessEvent::Status(s) => s.event,
            BusinessEvent::Inbound(i) => i.event,
        }
    }

    /// Payload bytes it holds.
    pub fn bytes(&self) -> u64 {
        match self {
            BusinessEvent::Status(_) => 0,
            BusinessEvent::Inbound(i) => i.payload.len() as u64,
        }
    }
}

/// Encodes events in order: runs of statuses as one STATUS frame each, every user's
/// message as an INBOUND_EVENT frame.
pub fn encode_events(events: &[BusinessEvent], out: &mut BytesMut) {
    let mut i = 0;
    while i < events.len() {
        if let BusinessEvent::Inbound(e) = &events[i] {
            encode_inbound_event(e, out);
            i += 1;
            continue;
        }
        let run: Vec<StatusEvent> = events[i..]
            .iter()
            .map_while(|e| match e {
                BusinessEvent::Status(s) => Some(*s),
                BusinessEvent::Inbound(_) => None,
            })
            .collect();
        i += run.len();
        encode_status(&run, out);
    }
}

fn put_recipient(out: &mut impl BufMut, r: &Recipient) {
    let b = r.as_bytes();
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

fn get_recipient(
    body: &mut Bytes,
    index: u32,
    m: impl Fn(&'static str) -> WireError,
) -> Result<Recipient, WireError> {
    if body.is_empty() {
        return Err(m("recipient truncated"));
    }
    let len = usize::from(body.get_u8());
    if len > RECIPIENT_BYTES_MAX {
        return Err(WireError::InvalidRecipient { index });
    }
    if body.len() < len {
        return Err(m("recipient truncated"));
    }
    let r = Recipient::parse(&body[..len]).ok_or(WireError::InvalidRecipient { index })?;
    body.advance(len);
    Ok(r)
}

/// `count:u32 | count * (recipient_len:u8 | recipient)` (ONLINE, KEYS_WANTED).
fn get_recipients(
    body: &mut Bytes,
    limits: &WireLimits,
    m: impl Fn(&'static str) -> WireError + Copy,
) -> Result<Vec<Recipient>, WireError> {
    if body.len() < 4 {
        return Err(m("shorter than its fixed fields"));
    }
    let count = body.get_u32_le();
    check_count(count, limits)?;
    if (count as usize).saturating_mul(1 + RECIPIENT_DIGITS_MIN + 1) > body.len() {
        return Err(m("count larger than the body can hold"));
    }
    let mut recipients = Vec::with_capacity(count as usize);
    for index in 0..count {
        recipients.push(get_recipient(body, index, m)?);
    }
    Ok(recipients)
}

fn get_payload(
    body: &mut Bytes,
    m: impl Fn(&'static str) -> WireError,
) -> Result<Bytes, WireError> {
    if body.len() < 4 {
        return Err(m("payload length truncated"));
    }
    let len = body.get_u32_le() as usize;
    if body.len() < len {
        return Err(m("payload runs past the frame"));
    }
    Ok(body.split_to(len))
}

/// Encodes SUBMIT_TTL: a SUBMIT whose messages live `ttl_secs` (0: the relay's default).
pub fn encode_submit_ttl(
    batch_id: u64,
    ttl_secs: u32,
    messages: &[super::OutMessage<'_>],
    out: &mut BytesMut,
) {
    let body = 4 + super::submit_body_bytes(messages);
    put_header(out, frame_type::SUBMIT_TTL, body);
    out.put_u64_le(batch_id);
    out.put_u32_le(ttl_secs);
    out.put_u32_le(u32::try_from(messages.len()).expect("batch count fits u32"));
    for m in messages {
        out.put_u64_le(m.client_id);
        put_recipient(out, m.recipient);
        out.put_u32_le(u32::try_from(m.payload.len()).expect("payload fits u32"));
        out.put_slice(m.payload);
    }
}

/// Encodes EVENT_ACK.
pub fn encode_event_ack(events: &[LogPosition], out: &mut BytesMut) {
    put_header(out, frame_type::EVENT_ACK, 4 + 8 * events.len());
    out.put_u32_le(u32::try_from(events.len()).expect("count fits u32"));
    for e in events {
        out.put_u64_le(e.0);
    }
}

/// Encodes STATUS.
pub fn encode_status(events: &[StatusEvent], out: &mut BytesMut) {
    put_header(
        out,
        frame_type::STATUS,
        4 + STATUS_EVENT_BYTES * events.len(),
    );
    out.put_u32_le(u32::try_from(events.len()).expect("count fits u32"));
    for e in events {
        out.put_u64_le(e.event.0);
        out.put_u64_le(e.message.0);
        out.put_u64_le(e.client_id);
        out.put_u8(e.kind as u8);
        out.put_u8(e.reason.map_or(0, |r| r as u8));
        out.put_u64_le(e.at_ms);
    }
}

/// Encodes INBOUND_EVENT.
pub fn encode_inbound_event(e: &InboundEvent, out: &mut BytesMut) {
    let body = INBOUND_EVENT_FIXED_BYTES + e.sender.as_bytes().len() + e.payload.len();
    put_header(out, frame_type::INBOUND_EVENT, body);
    out.put_u64_le(e.event.0);
    out.put_u64_le(e.at_ms);
    put_recipient(out, &e.sender);
    out.put_u32_le(u32::try_from(e.payload.len()).expect("payload fits u32"));
    out.put_slice(&e.payload);
}

/// Encodes CREDIT.
pub fn encode_credit(credit: u32, out: &mut BytesMut) {
    put_header(out, frame_type::CREDIT, 4);
    out.put_u32_le(credit);
}

/// Encodes OUTCOME.
pub fn encode_outcome(entries: &[OutcomeEntry], out: &mut BytesMut) {
    put_header(out, frame_type::OUTCOME, 4 + OUTCOME_BYTES * entries.len());
    out.put_u32_le(u32::try_from(entries.len()).expect("count fits u32"));
    for e in entries {
        out.put_u64_le(e.message.0);
        let (kind, reason) = match e.outcome {
            Outcome::Delivered => (1u8, 0u8),
            Outcome::Read => (2, 0),
            Outcome::Failed(r) => (3, r as u8),
            Outcome::RetryLater => (4, 0),
        };
        out.put_u8(kind);
        out.put_u8(reason);
    }
}

/// Encodes ONLINE.
pub fn encode_online(recipients: &[Recipient], out: &mut BytesMut) {
    put_recipients(frame_type::ONLINE, recipients, out);
}

fn put_recipients(ty: u8, recipients: &[Recipient], out: &mut BytesMut) {
    let body = 4 + recipients
        .iter()
        .map(|r| 1 + r.as_bytes().len())
        .sum::<usize>();
    put_header(out, ty, body);
    out.put_u32_le(u32::try_from(recipients.len()).expect("count fits u32"));
    for r in recipients {
        put_recipient(out, r);
    }
}

/// Encodes INBOUND.
pub fn encode_inbound(batch_id: u64, entries: &[InboundEntry], out: &mut BytesMut) {
    let body = 8
        + 4
        + entries
            .iter()
            .map(|e| INBOUND_ENTRY_FIXED_BYTES + e.sender.as_bytes().len() + e.payload.len())
            .sum::<usize>();
    put_header(out, frame_type::INBOUND, body);
    out.put_u64_le(batch_id);
    out.put_u32_le(u32::try_from(entries.len()).expect("count fits u32"));
    for e in entries {
        out.put_u64_le(e.id);
        out.put_u32_le(e.business_id);
        put_recipient(out, &e.sender);
        out.put_u32_le(u32::try_from(e.payload.len()).expect("payload fits u32"));
        out.put_slice(&e.payload);
    }
}

/// Bytes of a DELIVER frame for `d`, header included.
pub fn deliver_frame_bytes(d: &Deliver) -> usize {
    super::FRAME_HEADER_BYTES + DELIVER_FIXED_BYTES + d.recipient.as_bytes().len() + d.payload.len()
}

/// Encodes DELIVER ([`deliver_frame_bytes`] long).
pub fn encode_deliver(d: &Deliver, out: &mut BytesMut) {
    let body = DELIVER_FIXED_BYTES + d.recipient.as_bytes().len() + d.payload.len();
    let ty = if d.e2e {
        frame_type::DELIVER_E2E
    } else {
        frame_type::DELIVER
    };
    put_header(out, ty, body);
    out.put_u64_le(d.message.0);
    out.put_u32_le(d.business_id);
    out.put_u64_le(d.client_id);
    out.put_u64_le(d.expires_ms);
    put_recipient(out, &d.recipient);
    out.put_u32_le(u32::try_from(d.payload.len()).expect("payload fits u32"));
    out.put_slice(&d.payload);
}

/// Encodes KEYS_WANTED.
pub fn encode_keys_wanted(recipients: &[Recipient], out: &mut BytesMut) {
    put_recipients(frame_type::KEYS_WANTED, recipients, out);
}

/// Encodes BUSINESS_KEYS frames, at most [`BUSINESS_KEYS_PER_FRAME_MAX`] entries each.
pub fn encode_business_keys(entries: &[BusinessKeyEntry], out: &mut BytesMut) {
    for chunk in entries.chunks(BUSINESS_KEYS_PER_FRAME_MAX) {
        put_header(
            out,
            frame_type::BUSINESS_KEYS,
            4 + BUSINESS_KEY_BYTES * chunk.len(),
        );
        out.put_u32_le(chunk.len() as u32);
        for e in chunk {
            out.put_u32_le(e.business_id);
            out.put_u32_le(e.key.key_id);
            out.put_slice(&e.key.public);
        }
    }
}

/// Encodes DEVICE_KEYS.
pub fn encode_device_keys(entries: &[DeviceKeysEntry], out: &mut BytesMut) {
    let body = 4 + entries
        .iter()
        .map(|e| 1 + e.recipient.as_bytes().len() + 4 + e.bundles.len())
        .sum::<usize>();
    put_header(out, frame_type::DEVICE_KEYS, body);
    out.put_u32_le(u32::try_from(entries.len()).expect("count fits u32"));
    for e in entries {
        put_recipient(out, &e.recipient);
        out.put_u32_le(u32::try_from(e.bundles.len()).expect("bundles fit u32"));
        out.put_slice(&e.bundles);
    }
}

/// A decoded delivery frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryFrame {
    /// SUBMIT with a time to live.
    SubmitTtl {
        /// The client's batch id.
        batch_id: u64,
        /// Seconds the messages live; 0 = the relay's default.
        ttl_secs: u32,
        /// The messages.
        messages: Vec<Message>,
    },
    /// Events a business handled.
    EventAck(Vec<LogPosition>),
    /// Statuses for a business.
    Status(Vec<StatusEvent>),
    /// A user's message for a business.
    InboundEvent(InboundEvent),
    /// The edge takes more DELIVERs.
    Credit(u32),
    /// Outcomes of messages handed to the edge.
    Outcome(Vec<OutcomeEntry>),
    /// Recipients now online.
    Online(Vec<Recipient>),
    /// Users' messages from the edge.
    Inbound {
        /// The edge's batch id, echoed in its ACK.
        batch_id: u64,
        /// The messages.
        entries: Vec<InboundEntry>,
    },
    /// A message for the edge (DELIVER, or DELIVER_E2E when its `e2e` is set).
    Deliver(Deliver),
    /// Recipients whose device keys the relay wants.
    KeysWanted(Vec<Recipient>),
    /// Businesses' reply keys.
    BusinessKeys(Vec<BusinessKeyEntry>),
    /// Recipients' device bundles, from the edge.
    DeviceKeys(Vec<DeviceKeysEntry>),
}

/// Decodes the body of a delivery frame of type `ty`.
pub fn decode(ty: u8, body: Bytes, limits: &WireLimits) -> Result<DeliveryFrame, WireError> {
    decode_reusing(ty, body, limits, &mut super::MessageLists::new())
}

/// [`decode`], with a SUBMIT_TTL's message list taken from `lists`.
pub fn decode_reusing(
    ty: u8,
    mut body: Bytes,
    limits: &WireLimits,
    lists: &mut super::MessageLists,
) -> Result<DeliveryFrame, WireError> {
    let name = frame_name(ty);
    let m = |what| WireError::Malformed { frame: name, what };
    let frame = match ty {
        frame_type::SUBMIT_TTL => {
            if body.len() < 16 {
                return Err(m("shorter than its fixed fields"));
            }
            let batch_id = body.get_u64_le();
            let ttl_secs = body.get_u32_le();
            let count = body.get_u32_le();
            check_count(count, limits)?;
            let min_each = MESSAGE_OVERHEAD_BYTES + 1 + RECIPIENT_DIGITS_MIN;
            if (count as usize).saturating_mul(min_each) > body.len() {
                return Err(m("count larger than the body can hold"));
            }
            let mut messages = lists.take(count as usize);
            for index in 0..count {
                if body.len() < 8 {
                    return Err(m("message header truncated"));
                }
                let client_id = body.get_u64_le();
                let recipient = get_recipient(&mut body, index, m)?;
                let payload = get_payload(&mut body, m)?;
                messages.push(Message {
                    client_id,
                    recipient,
                    payload,
                });
            }
            DeliveryFrame::SubmitTtl {
                batch_id,
                ttl_secs,
                messages,
            }
        }
        frame_type::EVENT_ACK => {
            let count = counted(&mut body, 8, limits, m)?;
            DeliveryFrame::EventAck((0..count).map(|_| LogPosition(body.get_u64_le())).collect())
        }
        frame_type::STATUS => {
            let count = counted(&mut body, STATUS_EVENT_BYTES, limits, m)?;
            let mut events = Vec::with_capacity(count);
            for _ in 0..count {
                let event = LogPosition(body.get_u64_le());
                let message = LogPosition(body.get_u64_le());
                let client_id = body.get_u64_le();
                let kind = body.get_u8();
                let reason = body.get_u8();
                let at_ms = body.get_u64_le();
                let code = u16::from(kind) << 8 | u16::from(reason);
                let (kind, reason) = StatusEvent::from_code(code).ok_or(m("unknown status"))?;
                events.push(StatusEvent {
                    event,
                    message,
                    client_id,
                    kind,
                    reason,
                    at_ms,
                });
            }
            DeliveryFrame::Status(events)
        }
        frame_type::INBOUND_EVENT => {
            if body.len() < 16 {
                return Err(m("shorter than its fixed fields"));
            }
            let event = LogPosition(body.get_u64_le());
            let at_ms = body.get_u64_le();
            let sender = get_recipient(&mut body, 0, m)?;
            let payload = get_payload(&mut body, m)?;
            DeliveryFrame::InboundEvent(InboundEvent {
                event,
                at_ms,
                sender,
                payload,
            })
        }
        frame_type::CREDIT => {
            if body.len() != 4 {
                return Err(m("body is not 4 bytes"));
            }
            DeliveryFrame::Credit(body.get_u32_le())
        }
        frame_type::OUTCOME => {
            let count = counted(&mut body, OUTCOME_BYTES, limits, m)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let message = LogPosition(body.get_u64_le());
                let kind = body.get_u8();
                let reason = body.get_u8();
                let outcome = match (kind, reason) {
                    (1, 0) => Outcome::Delivered,
                    (2, 0) => Outcome::Read,
                    (3, r) => Outcome::Failed(FailReason::from_u8(r).ok_or(m("unknown reason"))?),
                    (4, 0) => Outcome::RetryLater,
                    _ => return Err(m("unknown outcome")),
                };
                entries.push(OutcomeEntry { message, outcome });
            }
            DeliveryFrame::Outcome(entries)
        }
        frame_type::ONLINE => DeliveryFrame::Online(get_recipients(&mut body, limits, m)?),
        frame_type::INBOUND => {
            if body.len() < 12 {
                return Err(m("shorter than its fixed fields"));
            }
            let batch_id = body.get_u64_le();
            let count = body.get_u32_le();
            check_count(count, limits)?;
            let min_each = INBOUND_ENTRY_FIXED_BYTES + 1 + RECIPIENT_DIGITS_MIN;
            if (count as usize).saturating_mul(min_each) > body.len() {
                return Err(m("count larger than the body can hold"));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for index in 0..count {
                if body.len() < 12 {
                    return Err(m("entry truncated"));
                }
                let id = body.get_u64_le();
                let business_id = body.get_u32_le();
                let sender = get_recipient(&mut body, index, m)?;
                let payload = get_payload(&mut body, m)?;
                entries.push(InboundEntry {
                    id,
                    business_id,
                    sender,
                    payload,
                });
            }
            DeliveryFrame::Inbound { batch_id, entries }
        }
        frame_type::DELIVER | frame_type::DELIVER_E2E => {
            if body.len() < 28 {
                return Err(m("shorter than its fixed fields"));
            }
            let message = LogPosition(body.get_u64_le());
            let business_id = body.get_u32_le();
            let client_id = body.get_u64_le();
            let expires_ms = body.get_u64_le();
            let recipient = get_recipient(&mut body, 0, m)?;
            let payload = get_payload(&mut body, m)?;
            DeliveryFrame::Deliver(Deliver {
                message,
                business_id,
                client_id,
                expires_ms,
                recipient,
                payload,
                e2e: ty == frame_type::DELIVER_E2E,
            })
        }
        frame_type::KEYS_WANTED => DeliveryFrame::KeysWanted(get_recipients(&mut body, limits, m)?),
        frame_type::BUSINESS_KEYS => {
            if body.len() < 4 {
                return Err(m("shorter than its fixed fields"));
            }
            let count = body.get_u32_le() as usize;
            if count == 0 || count > BUSINESS_KEYS_PER_FRAME_MAX {
                return Err(m("count out of bounds"));
            }
            if body.len() != count * BUSINESS_KEY_BYTES {
                return Err(m("body is not count entries"));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let business_id = body.get_u32_le();
                let key_id = body.get_u32_le();
                let mut public = [0; 32];
                body.copy_to_slice(&mut public);
                entries.push(BusinessKeyEntry {
                    business_id,
                    key: crate::e2e::BusinessPublicKey { key_id, public },
                });
            }
            DeliveryFrame::BusinessKeys(entries)
        }
        frame_type::DEVICE_KEYS => {
            if body.len() < 4 {
                return Err(m("shorter than its fixed fields"));
            }
            let count = body.get_u32_le();
            check_count(count, limits)?;
            if (count as usize).saturating_mul(1 + RECIPIENT_DIGITS_MIN + 1 + 4) > body.len() {
                return Err(m("count larger than the body can hold"));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for index in 0..count {
                let recipient = get_recipient(&mut body, index, m)?;
                let bundles = get_payload(&mut body, m)?;
                if bundles.len() > crate::e2e::bundle::BUNDLE_LIST_BYTES_MAX {
                    return Err(m("bundle list larger than its bound"));
                }
                entries.push(DeviceKeysEntry { recipient, bundles });
            }
            DeliveryFrame::DeviceKeys(entries)
        }
        other => return Err(WireError::UnknownType(other)),
    };
    if !body.is_empty() {
        return Err(m("bytes after the last field"));
    }
    Ok(frame)
}

/// Reads a `count:u32` of entries of `each` bytes and checks that the body holds exactly
/// them; returns the count.
fn counted(
    body: &mut Bytes,
    each: usize,
    limits: &WireLimits,
    m: impl Fn(&'static str) -> WireError,
) -> Result<usize, WireError> {
    if body.len() < 4 {
        return Err(m("shorter than its fixed fields"));
    }
    let count = body.get_u32_le();
    check_count(count, limits)?;
    if body.len() != count as usize * each {
        return Err(m("count does not match the body"));
    }
    Ok(count as usize)
}

/// The name of a delivery frame type, for errors.
pub fn frame_name(ty: u8) -> &'static str {
    match ty {
        frame_type::SUBMIT_TTL => "SUBMIT_TTL",
        frame_type::EVENT_ACK => "EVENT_ACK",
        frame_type::STATUS => "STATUS",
        frame_type::INBOUND_EVENT => "INBOUND_EVENT",
        frame_type::CREDIT => "CREDIT",
        frame_type::OUTCOME => "OUTCOME",
        frame_type::ONLINE => "ONLINE",
        frame_type::INBOUND => "INBOUND",
        frame_type::DELIVER => "DELIVER",
        frame_type::DELIVER_E2E => "DELIVER_E2E",
        frame_type::KEYS_WANTED => "KEYS_WANTED",
        frame_type::BUSINESS_KEYS => "BUSINESS_KEYS",
        frame_type::DEVICE_KEYS => "DEVICE_KEYS",
        _ => "unknown",
    }
}

/// Whether `ty` is a delivery frame type.
pub fn is_delivery_type(ty: u8) -> bool {
    frame_name(ty) != "unknown"
}

/// Encodes any delivery frame (tests and tools).
pub fn encode(f: &DeliveryFrame, out: &mut BytesMut) {
    match f {
        DeliveryFrame::SubmitTtl {
            batch_id,
            ttl_secs,
            messages,
        } => {
            let msgs: Vec<super::OutMessage<'_>> = messages
                .iter()
                .map(|m| super::OutMessage {
                    client_id: m.client_id,
                    recipient: &m.recipient,
                    payload: &m.payload,
                })
                .collect();
            encode_submit_ttl(*batch_id, *ttl_secs, &msgs, out);
        }
        DeliveryFrame::EventAck(e) => encode_event_ack(e, out),
        DeliveryFrame::Status(e) => encode_status(e, out),
        DeliveryFrame::InboundEvent(e) => encode_inbound_event(e, out),
        DeliveryFrame::Credit(c) => encode_credit(*c, out),
        DeliveryFrame::Outcome(e) => encode_outcome(e, out),
        DeliveryFrame::Online(r) => encode_online(r, out),
        DeliveryFrame::Inbound { batch_id, entries } => encode_inbound(*batch_id, entries, out),
        DeliveryFrame::Deliver(d) => encode_deliver(d, out),
        DeliveryFrame::KeysWanted(r) => encode_keys_wanted(r, out),
        DeliveryFrame::BusinessKeys(e) => encode_business_keys(e, out),
        DeliveryFrame::DeviceKeys(e) => encode_device_keys(e, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Recipient {
        Recipient::parse(s.as_bytes()).unwrap()
    }

    fn round_trip(f: DeliveryFrame) {
        let mut out = BytesMut::new();
        encode(&f, &mut out);
        let ty = out[4];
        let body = out.split_off(5).freeze();
        assert_eq!(decode(ty, body, &WireLimits::PERMISSIVE), Ok(f));
    }

    /// A DELIVER takes the bytes `deliver_frame_bytes` says (the server makes room for
    /// it by that figure), and decodes.
    #[test]
    fn a_deliver_frame_is_as_long_as_said_and_decodes() {
        let d = Deliver {
            message: LogPosition::new(crate::ShardId::new(1), 42),
            business_id: 7,
            client_id: 9,
            expires_ms: 1_000,
            recipient: r("+4915112345678"),
            payload: Bytes::from(vec![0xa5; 1_100]),
            e2e: false,
        };
        let mut whole = BytesMut::from(&b"before"[..]);
        encode_deliver(&d, &mut whole);
        let mut frame = whole.split_off(6);
        assert_eq!(whole, b"before"[..]);
        assert_eq!(frame.len(), deliver_frame_bytes(&d));
        let ty = frame[4];
        let body = frame.split_off(5).freeze();
        assert_eq!(
            decode(ty, body, &WireLimits::PERMISSIVE),
            Ok(DeliveryFrame::Deliver(d))
        );
    }

    #[test]
    fn every_delivery_frame_round_trips() {
        let p = LogPosition::new(crate::ShardId::new(2), 77);
        round_trip(DeliveryFrame::EventAck(vec![
            p,
            LogPosition::new(crate::ShardId::new(0), 1),
        ]));
        round_trip(DeliveryFrame::Status(vec![StatusEvent {
            event: LogPosition::new(crate::ShardId::new(1), 5),
            message: p,
            client_id: 9,
            kind: StatusKind::Failed,
            reason: Some(FailReason::BlockedByUser),
            at_ms: 1234,
        }]));
        round_trip(DeliveryFrame::InboundEvent(InboundEvent {
            event: p,
            at_ms: 5,
            sender: r("+4915112345678"),
            payload: Bytes::from_static(b"hi"),
        }));
        round_trip(DeliveryFrame::Credit(64));
        round_trip(DeliveryFrame::Outcome(vec![
            OutcomeEntry {
                message: p,
                outcome: Outcome::Read,
            },
            OutcomeEntry {
                message: p,
                outcome: Outcome::Failed(FailReason::NotOnPlatform),
            },
            OutcomeEntry {
                message: p,
                outcome: Outcome::RetryLater,
            },
        ]));
        round_trip(DeliveryFrame::Online(vec![r("+15550001111")]));
        round_trip(DeliveryFrame::Inbound {
            batch_id: 3,
            entries: vec![InboundEntry {
                id: 77,
                business_id: 4,
                sender: r("+15550001111"),
                payload: Bytes::from_static(b"yes"),
            }],
        });
        round_trip(DeliveryFrame::Deliver(Deliver {
            message: p,
            business_id: 1,
            client_id: 2,
            expires_ms: 3,
            recipient: r("+15550001111"),
            payload: Bytes::from_static(b"sealed"),
            e2e: false,
        }));
        let mut copies = vec![2u8];
        put_device_copy(&mut copies, 1, 0, &[3; 45], b"ct-and-tag-of-one-device");
        put_device_copy(&mut copies, 9, 77, &[4; 45], b"another");
        round_trip(DeliveryFrame::Deliver(Deliver {
            message: p,
            business_id: 1,
            client_id: 2,
            expires_ms: 3,
            recipient: r("+15550001111"),
            payload: Bytes::from(copies.clone()),
            e2e: true,
        }));
        let got = decode_device_copies(&Bytes::from(copies)).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].device_id, got[1].seq), (9, 77));
        assert_eq!(&got[1].ciphertext[..], b"another");
        assert_eq!(got[0].header, [3; 45]);
        round_trip(DeliveryFrame::KeysWanted(vec![
            r("+15550001111"),
            r("+4915112345678"),
        ]));
        round_trip(DeliveryFrame::BusinessKeys(vec![BusinessKeyEntry {
            business_id: 7,
            key: crate::e2e::BusinessPublicKey {
                key_id: 3,
                public: [5; 32],
            },
        }]));
        round_trip(DeliveryFrame::DeviceKeys(vec![DeviceKeysEntry {
            recipient: r("+15550001111"),
            bundles: Bytes::from_static(&[1, 0]),
        }]));
        round_trip(DeliveryFrame::SubmitTtl {
            batch_id: 8,
            ttl_secs: 60,
            messages: vec![Message {
                client_id: 1,
                recipient: r("+15550001111"),
                payload: Bytes::from_static(b"x"),
            }],
        });
    }

    #[test]
    fn status_codes_name_a_reason_exactly_for_failures() {
        for kind in [
            StatusKind::Sent,
            StatusKind::Delivered,
            StatusKind::Read,
            StatusKind::Expired,
        ] {
            let c = StatusEvent::code(kind, None);
            assert_eq!(StatusEvent::from_code(c), Some((kind, None)));
            assert_eq!(StatusEvent::from_code(c | 1), None);
        }
        for reason in FailReason::ALL {
            let c = StatusEvent::code(StatusKind::Failed, Some(reason));
            assert_eq!(
                StatusEvent::from_code(c),
                Some((StatusKind::Failed, Some(reason)))
            );
        }
        assert_eq!(
            StatusEvent::from_code(StatusEvent::code(StatusKind::Failed, None)),
            None
        );
    }

    #[test]
    fn bad_entries_are_refused_with_their_codes() {
        let limits = WireLimits {
            frame_bytes_max: 1 << 20,
            batch_messages_max: 4,
        };
        let mut body = BytesMut::new();
        body.put_u32_le(5);
        body.extend_from_slice(&[0; 50]);
        assert!(matches!(
            decode(frame_type::OUTCOME, body.freeze(), &limits),
            Err(WireError::BadBatchSize { count: 5, max: 4 })
        ));
        let mut body = BytesMut::new();
        body.put_u32_le(1);
        body.put_u64_le(1);
        body.put_u8(3);
        body.put_u8(99);
        assert_eq!(
            decode(frame_type::OUTCOME, body.freeze(), &limits)
                .unwrap_err()
                .code(),
            super::super::code::MALFORMED_FRAME
        );
        let mut body = BytesMut::new();
        body.put_u32_le(1);
        body.put_u8(3);
        body.extend_from_slice(b"+12");
        assert_eq!(
            decode(frame_type::ONLINE, body.freeze(), &limits)
                .unwrap_err()
                .code(),
            super::super::code::MALFORMED_FRAME,
            "a count the body cannot hold"
        );
    }

    #[test]
    fn device_copies_refuse_bad_structure() {
        let one = |id: u32| {
            let mut v = Vec::new();
            put_device_copy(&mut v, id, 1, &[0; 45], b"x");
            v
        };
        let bad = |bytes: Vec<u8>| decode_device_copies(&Bytes::from(bytes)).is_err();
        assert!(bad(vec![]), "no count");
        assert!(bad(vec![0]), "zero copies");
        assert!(
            bad([vec![17], one(1)].concat()),
            "more than the devices bound"
        );
        assert!(bad([vec![2], one(1)].concat()), "fewer copies than counted");
        assert!(bad([vec![2], one(1), one(1)].concat()), "one device twice");
        assert!(bad([vec![1], one(1), vec![0]].concat()), "trailing byte");
        let mut long = [vec![1], one(1)].concat();
        long.truncate(long.len() - 1);
        assert!(bad(long), "ciphertext runs past the payload");
        assert!(!bad([vec![2], one(1), one(2)].concat()));
    }
}
