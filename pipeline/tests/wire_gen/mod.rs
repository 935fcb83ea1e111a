//! Generators of valid wire v1 frames, shared by the round-trip properties and by the
//! hostile-input properties (which mutate valid frames).

use bytes::{Bytes, BytesMut};
use courier_pipeline::wire::delivery::{
    Deliver, DeliveryFrame, FailReason, InboundEntry, InboundEvent, Outcome, OutcomeEntry,
    StatusEvent, StatusKind,
};
use courier_pipeline::wire::{
    Frame, LogPosition, Message, Reason, Recipient, ReportEntry, Status, Token, Welcome,
    RECIPIENT_DIGITS_MIN, TOKEN_BYTES_MAX, VERSION, VERSION_FEATURES,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Cases per property: enough to hit every variant many times, few enough that the suite
/// stays a few seconds at `opt-level = 1`.
pub const CASES: u32 = 256;
/// Longest payload generated, per the brief of the suite (well above typical SMS sizes).
pub const PAYLOAD_BYTES_MAX: usize = 2048;
/// Most entries per generated batch; the codec has no special case above a few.
pub const BATCH_ENTRIES_MAX: usize = 8;
/// Most frames per generated stream.
pub const STREAM_FRAMES_MAX: usize = 6;

pub fn config() -> ProptestConfig {
    ProptestConfig::with_cases(CASES)
}

// ---------------------------------------------------------------------------------------
// Generators

/// `+`, a first digit 1-9, then the rest: 7..=15 digits in all.
pub fn recipient() -> impl Strategy<Value = Recipient> {
    (
        b'1'..=b'9',
        prop::collection::vec(b'0'..=b'9', RECIPIENT_DIGITS_MIN - 1..=14),
    )
        .prop_map(|(first, rest)| {
            let mut s = vec![b'+', first];
            s.extend_from_slice(&rest);
            Recipient::parse(&s).expect("generator makes valid E.164")
        })
}

pub fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=PAYLOAD_BYTES_MAX).prop_map(Bytes::from)
}

pub fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), recipient(), payload()).prop_map(|(client_id, recipient, payload)| Message {
        client_id,
        recipient,
        payload,
    })
}

pub fn reason() -> impl Strategy<Value = Reason> {
    prop::sample::select(Reason::ALL.to_vec())
}

pub fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        any::<u64>().prop_map(|p| Status::Accepted(LogPosition(p))),
        any::<u64>().prop_map(|p| Status::Duplicate(LogPosition(p))),
        any::<u32>().prop_map(|retry_after_ms| Status::Throttled { retry_after_ms }),
        reason().prop_map(Status::Rejected),
    ]
}

pub fn hello() -> impl Strategy<Value = Frame> {
    (
        prop::collection::vec(any::<u8>(), 0..=TOKEN_BYTES_MAX),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(t, features)| Frame::Hello {
            version: if features.is_some() {
                VERSION_FEATURES
            } else {
                VERSION
            },
            token: Token(Bytes::from(t)),
            features: features.unwrap_or(0),
        })
}

pub fn submit() -> impl Strategy<Value = Frame> {
    (
        any::<u64>(),
        prop::collection::vec(message(), 1..=BATCH_ENTRIES_MAX),
    )
        .prop_map(|(batch_id, messages)| Frame::Submit { batch_id, messages })
}

pub fn report() -> impl Strategy<Value = Frame> {
    let entry = (any::<u32>(), any::<u64>(), recipient()).prop_map(
        |(business_id, client_id, recipient)| ReportEntry {
            business_id,
            client_id,
            recipient,
        },
    );
    prop::collection::vec(entry, 1..=BATCH_ENTRIES_MAX)
        .prop_map(|entries| Frame::Report { entries })
}

pub fn welcome() -> impl Strategy<Value = Frame> {
    (
        any::<(u32, u32, u32, u32)>(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|((a, b, c, d), features)| {
            Frame::Welcome(Welcome {
                business_id: a,
                batch_messages_max: b,
                payload_bytes_max: c,
                frame_bytes_max: d,
                features,
            })
        })
}

fn position() -> impl Strategy<Value = LogPosition> {
    any::<u64>().prop_map(LogPosition)
}

fn fail_reason() -> impl Strategy<Value = FailReason> {
    prop::sample::select(FailReason::ALL.to_vec())
}

fn status_event() -> impl Strategy<Value = StatusEvent> {
    let kind = prop_oneof![
        Just((StatusKind::Sent, None)),
        Just((StatusKind::Delivered, None)),
        Just((StatusKind::Read, None)),
        Just((StatusKind::Expired, None)),
        fail_reason().prop_map(|r| (StatusKind::Failed, Some(r))),
    ];
    (position(), position(), any::<u64>(), kind, any::<u64>()).prop_map(
        |(event, message, client_id, (kind, reason), at_ms)| StatusEvent {
            event,
            message,
            client_id,
            kind,
            reason,
            at_ms,
        },
    )
}

fn outcome() -> impl Strategy<Value = OutcomeEntry> {
    let o = prop_oneof![
        Just(Outcome::Delivered),
        Just(Outcome::Read),
        Just(Outcome::RetryLater),
        fail_reason().prop_map(Outcome::Failed),
    ];
    (position(), o).prop_map(|(message, outcome)| OutcomeEntry { message, outcome })
}

/// Every delivery frame, valid.
pub fn delivery() -> impl Strategy<Value = Frame> {
    let inbound_entry = (any::<u64>(), any::<u32>(), recipient(), payload()).prop_map(
        |(id, business_id, sender, payload)| InboundEntry {
            id,
            business_id,
            sender,
            payload,
        },
    );
    let f = prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(message(), 1..=BATCH_ENTRIES_MAX)
        )
            .prop_map(|(batch_id, ttl_secs, messages)| DeliveryFrame::SubmitTtl {
                batch_id,
                ttl_secs,
                messages
            }),
        prop::collection::vec(position(), 1..=BATCH_ENTRIES_MAX).prop_map(DeliveryFrame::EventAck),
        prop::collection::vec(status_event(), 1..=BATCH_ENTRIES_MAX)
            .prop_map(DeliveryFrame::Status),
        (position(), any::<u64>(), recipient(), payload()).prop_map(
            |(event, at_ms, sender, payload)| DeliveryFrame::InboundEvent(InboundEvent {
                event,
                at_ms,
                sender,
                payload
            })
        ),
        any::<u32>().prop_map(DeliveryFrame::Credit),
        prop::collection::vec(outcome(), 1..=BATCH_ENTRIES_MAX).prop_map(DeliveryFrame::Outcome),
        prop::collection::vec(recipient(), 1..=BATCH_ENTRIES_MAX).prop_map(DeliveryFrame::Online),
        (
            any::<u64>(),
            prop::collection::vec(inbound_entry, 1..=BATCH_ENTRIES_MAX)
        )
            .prop_map(|(batch_id, entries)| DeliveryFrame::Inbound { batch_id, entries }),
        (
            position(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            recipient(),
            payload(),
            any::<bool>()
        )
            .prop_map(
                |(message, business_id, client_id, expires_ms, recipient, payload, e2e)| {
                    DeliveryFrame::Deliver(Deliver {
                        message,
                        business_id,
                        client_id,
                        expires_ms,
                        recipient,
                        payload,
                        e2e,
                    })
                }
            ),
    ];
    f.prop_map(Frame::Delivery)
}

pub fn ack() -> impl Strategy<Value = Frame> {
    (any::<u64>(), prop::collection::vec(status(), 1..=64))
        .prop_map(|(batch_id, statuses)| Frame::Ack { batch_id, statuses })
}

pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![hello(), submit(), report(), welcome(), ack(), delivery()]
}

// ---------------------------------------------------------------------------------------
// Helpers

pub fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    out
}

/// Splits `bytes` at the positions picked by `cuts` (duplicates give empty chunks, which
/// a stream can deliver too).
pub fn split_at_cuts<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut chunks = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for cut in at {
        chunks.push(&bytes[start..cut]);
        start = cut;
    }
    chunks.push(&bytes[start..]);
    chunks
}
