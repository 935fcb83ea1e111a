//! Round-trip properties of wire v1: `decode(encode(x)) == x` for every frame type, read
//! back through [`FrameDecoder`] as the server reads a stream, whatever the chunk splits.
//!
//! Generators produce only frames that the protocol allows (E.164 recipients, batches of
//! at least one entry, HELLO at [`VERSION`] with a token of at most 256 bytes), so every
//! failure here is a codec bug, not a generator artefact.

mod wire_gen;

use bytes::{Bytes, BytesMut};
use courier_pipeline::wire::{
    encode_ack, encode_hello, encode_submit, Frame, FrameDecoder, LogPosition, Message, OutMessage,
    Reason, Recipient, ReportEntry, Status, Token, WireLimits, FRAME_HEADER_BYTES, TOKEN_BYTES_MAX,
    VERSION,
};
use courier_pipeline::ShardId;
use proptest::prelude::*;
use proptest::sample::Index;
use wire_gen::{
    ack, config, encode_all, frame, hello, message, report, split_at_cuts, status, submit, welcome,
    BATCH_ENTRIES_MAX, PAYLOAD_BYTES_MAX, STREAM_FRAMES_MAX,
};

/// Pushes `chunks` in order, draining every complete frame after each push, and checks
/// that the stream ends cleanly.
fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Frame> {
    let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
    let mut frames = Vec::new();
    for chunk in chunks {
        d.push(chunk);
        // Each frame consumes at least its header, so the drain loop is bounded by the
        // bytes buffered.
        for _ in 0..=d.buffered() / FRAME_HEADER_BYTES {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => panic!("valid stream refused: {e}"),
            }
        }
    }
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.buffered(), 0, "bytes left after the last frame");
    assert_eq!(d.finish(), Ok(()));
    frames
}

/// Encodes `f` alone and decodes it from one chunk.
fn decode_whole(f: &Frame) -> Vec<Frame> {
    decode_chunks([&encode_all(std::slice::from_ref(f))[..]])
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config())]

    /// Each frame type alone, pushed in one chunk.
    #[test]
    fn hello_round_trips(f in hello()) {
        prop_assert_eq!(decode_whole(&f), vec![f]);
    }

    #[test]
    fn submit_round_trips(f in submit()) {
        prop_assert_eq!(decode_whole(&f), vec![f]);
    }

    #[test]
    fn report_round_trips(f in report()) {
        prop_assert_eq!(decode_whole(&f), vec![f]);
    }

    #[test]
    fn welcome_round_trips(f in welcome()) {
        prop_assert_eq!(decode_whole(&f), vec![f]);
    }

    #[test]
    fn ack_round_trips(f in ack()) {
        prop_assert_eq!(decode_whole(&f), vec![f]);
    }

    /// Several frames of any types on one stream, split at random points.
    #[test]
    fn stream_round_trips_in_random_chunks(
        frames in prop::collection::vec(frame(), 1..=STREAM_FRAMES_MAX),
        cuts in prop::collection::vec(any::<Index>(), 0..32),
    ) {
        let bytes = encode_all(&frames);
        prop_assert_eq!(decode_chunks(split_at_cuts(&bytes, &cuts)), frames);
    }

    /// Several frames on one stream, delivered one byte at a time: every header and body
    /// boundary falls between two pushes.
    #[test]
    fn stream_round_trips_one_byte_at_a_time(
        frames in prop::collection::vec(frame(), 1..=STREAM_FRAMES_MAX),
    ) {
        let bytes = encode_all(&frames);
        prop_assert_eq!(decode_chunks(bytes.chunks(1)), frames);
    }

    /// The hot-path encoders (`encode_submit` from borrowed messages, `encode_ack`,
    /// `encode_hello`) write exactly the bytes of `Frame::encode`.
    #[test]
    fn hot_path_encoders_match_frame_encode(
        batch_id in any::<u64>(),
        messages in prop::collection::vec(message(), 1..=BATCH_ENTRIES_MAX),
        statuses in prop::collection::vec(status(), 1..=64),
        token in prop::collection::vec(any::<u8>(), 0..=TOKEN_BYTES_MAX),
    ) {
        let out: Vec<OutMessage<'_>> = messages
            .iter()
            .map(|m| OutMessage { client_id: m.client_id, recipient: &m.recipient, payload: &m.payload })
            .collect();
        let mut fast = BytesMut::new();
        encode_submit(batch_id, &out, &mut fast);
        encode_ack(batch_id, &statuses, &mut fast);
        encode_hello(&token, &mut fast);
        let slow = encode_all(&[
            Frame::Submit { batch_id, messages },
            Frame::Ack { batch_id, statuses },
            Frame::Hello { version: VERSION, token: Token(Bytes::from(token)), features: 0 },
        ]);
        prop_assert_eq!(fast, slow);
    }
}

/// Every `Status` variant and every `Reason` in one ACK, at the edges of their values, so
/// that coverage does not depend on what the generator happened to draw.
#[test]
fn every_status_and_reason_round_trips() {
    let mut statuses = vec![
        Status::Accepted(LogPosition(0)),
        Status::Accepted(LogPosition(u64::MAX)),
        // The largest position a server writes (positions read back may name any shard
        // field: `LogPosition(u64::MAX)` above).
        Status::Accepted(LogPosition::new(
            ShardId::new(u8::MAX),
            (1 << LogPosition::INDEX_BITS) - 1,
        )),
        Status::Duplicate(LogPosition(0)),
        Status::Duplicate(LogPosition(u64::MAX)),
        Status::Throttled { retry_after_ms: 0 },
        Status::Throttled {
            retry_after_ms: u32::MAX,
        },
    ];
    statuses.extend(Reason::ALL.map(Status::Rejected));
    let f = Frame::Ack {
        batch_id: u64::MAX,
        statuses,
    };
    assert_eq!(decode_whole(&f), vec![f]);
}

/// The shortest and longest recipients, empty and maximal payloads, the longest token.
#[test]
fn edge_sizes_round_trip() {
    let short = Recipient::parse(b"+1000000").unwrap();
    let long = Recipient::parse(b"+999999999999999").unwrap();
    let frames = vec![
        Frame::Hello {
            version: VERSION,
            token: Token(Bytes::new()),
            features: 0,
        },
        Frame::Hello {
            version: courier_pipeline::wire::VERSION_FEATURES,
            token: Token(Bytes::from(vec![0xAB; TOKEN_BYTES_MAX])),
            features: u32::MAX,
        },
        Frame::Submit {
            batch_id: 0,
            messages: vec![
                Message {
                    client_id: 0,
                    recipient: short,
                    payload: Bytes::new(),
                },
                Message {
                    client_id: u64::MAX,
                    recipient: long,
                    payload: Bytes::from(vec![0xFF; PAYLOAD_BYTES_MAX]),
                },
            ],
        },
        Frame::Report {
            entries: vec![ReportEntry {
                business_id: u32::MAX,
                client_id: u64::MAX,
                recipient: long,
            }],
        },
    ];
    let bytes = encode_all(&frames);
    assert_eq!(decode_chunks(bytes.chunks(1)), frames);
    assert_eq!(decode_chunks([&bytes[..]]), frames);
}
