//! Hostile input to the wire v1 decoder: every refusal is asserted as its exact
//! [`WireError`] and the stream code sent to the peer, and no refusal shows content.
//!
//! A decoder that returned an error is dropped, never read again: the server answers the
//! error by resetting the stream with [`WireError::code`], and what the decoder holds after
//! an error is not part of its contract (a header error leaves the header buffered, a body
//! error has consumed the bad frame). The tests follow the server and stop at the first
//! error.

mod wire_gen;

use bytes::{BufMut, BytesMut};
use courier_pipeline::wire::{
    code, frame_type, Frame, FrameDecoder, WireError, WireLimits, BATCH_HEADER_BYTES,
    FRAME_HEADER_BYTES, MESSAGE_OVERHEAD_BYTES, TOKEN_BYTES_MAX, VERSION,
};
use proptest::prelude::*;
use proptest::sample::Index;
use wire_gen::{config, encode_all, frame, split_at_cuts, STREAM_FRAMES_MAX};

/// Limits of a plausible server profile, tight enough that tests can reach them.
const LIMITS: WireLimits = WireLimits {
    frame_bytes_max: 64 << 10,
    batch_messages_max: 64,
};

/// A valid recipient whose digits must never appear in an error.
const RECIPIENT: &[u8] = b"+4915112345678";
/// A payload whose bytes must never appear in an error.
const PAYLOAD: &[u8] = b"secret words: meet at the usual place";

// ---------------------------------------------------------------------------------------
// Hostile counts: a count that sized a `Vec` before being checked against the body would
// ask for u32::MAX messages (hundreds of GiB), and the allocation failure aborts the test
// binary. So these tests fail loudly if the check ever moves after the allocation, without
// an allocator probe (which would need `unsafe`, allowed only in src/uring/).

const HOSTILE: WireLimits = WireLimits {
    frame_bytes_max: 1 << 20,
    batch_messages_max: u32::MAX,
};

// ---------------------------------------------------------------------------------------
// Raw frame builders: they write what a hostile peer would, bypassing the encoders' checks.

fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32_le(u32::try_from(body.len()).unwrap());
    out.put_u8(ty);
    out.put_slice(body);
    out.to_vec()
}

/// One SUBMIT message; `recipient_len` is written as given, whatever `recipient` holds.
fn put_message(out: &mut BytesMut, recipient_len: u8, recipient: &[u8], payload: &[u8]) {
    out.put_u64_le(7);
    out.put_u8(recipient_len);
    out.put_slice(recipient);
    out.put_u32_le(u32::try_from(payload.len()).unwrap());
    out.put_slice(payload);
}

fn put_valid_message(out: &mut BytesMut) {
    put_message(out, RECIPIENT.len() as u8, RECIPIENT, PAYLOAD);
}

fn submit_header(count: u32) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u64_le(42);
    body.put_u32_le(count);
    body
}

fn ack_body(entries: &[(u8, u64)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u64_le(42);
    body.put_u32_le(u32::try_from(entries.len()).unwrap());
    for &(kind, value) in entries {
        body.put_u8(kind);
        body.put_u64_le(value);
    }
    body.to_vec()
}

fn hello_body(version: u16, token_len: u16, token: &[u8]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u16_le(version);
    body.put_u16_le(token_len);
    body.put_slice(token);
    body.to_vec()
}

// ---------------------------------------------------------------------------------------
// Assertions

/// Asserts that nothing of the secret content used by these tests shows in `e`.
fn assert_no_content(e: &WireError, also: &[&[u8]]) {
    let shown = format!("{e} {e:?}");
    let digits = std::str::from_utf8(&RECIPIENT[1..]).unwrap();
    assert!(!shown.contains(digits), "error shows a recipient: {shown}");
    assert!(!shown.contains("secret"), "error shows a payload: {shown}");
    for s in also {
        let s = String::from_utf8_lossy(s);
        assert!(!shown.contains(&*s), "error shows {s:?}: {shown}");
    }
}

/// Pushes `bytes` whole, expects the first `next_frame` to refuse with `expected` and
/// stream code `code` (given apart, so that `WireError::code` is checked too).
fn assert_refused(limits: WireLimits, bytes: &[u8], expected: WireError, code: u32) {
    assert_refused_showing_nothing_of(limits, bytes, expected, code, &[]);
}

fn assert_refused_showing_nothing_of(
    limits: WireLimits,
    bytes: &[u8],
    expected: WireError,
    code: u32,
    content: &[&[u8]],
) {
    let mut d = FrameDecoder::new(limits);
    d.push(bytes);
    let e = d.next_frame().expect_err("hostile frame accepted");
    assert_eq!(e, expected);
    assert_eq!(e.code(), code, "{e}");
    assert_no_content(&e, content);
}

fn malformed(frame: &'static str, what: &'static str) -> WireError {
    WireError::Malformed { frame, what }
}

// ---------------------------------------------------------------------------------------
// Stream framing

#[test]
fn frame_cut_at_end_of_stream_is_truncated() {
    let mut body = submit_header(1);
    put_valid_message(&mut body);
    let bytes = raw_frame(frame_type::SUBMIT, &body);
    // Cut in the header, right after it, and one byte before the end.
    for cut in [
        1,
        FRAME_HEADER_BYTES - 1,
        FRAME_HEADER_BYTES,
        bytes.len() - 1,
    ] {
        let mut d = FrameDecoder::new(LIMITS);
        d.push(&bytes[..cut]);
        assert_eq!(d.next_frame(), Ok(None), "cut at {cut}");
        let e = d
            .finish()
            .expect_err("partial frame accepted at end of stream");
        assert_eq!(e, WireError::Truncated { buffered: cut });
        assert_eq!(e.code(), code::TRUNCATED);
        assert_no_content(&e, &[]);
    }
}

#[test]
fn stream_ending_between_frames_is_clean() {
    let mut d = FrameDecoder::new(LIMITS);
    assert_eq!(d.finish(), Ok(()), "empty stream");
    d.push(&raw_frame(frame_type::ACK, &ack_body(&[(0, 1)])));
    assert!(matches!(d.next_frame(), Ok(Some(Frame::Ack { .. }))));
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.finish(), Ok(()));
}

#[test]
fn oversized_frame_fails_on_its_header_before_the_body_is_buffered() {
    let limits = WireLimits {
        frame_bytes_max: 1024,
        batch_messages_max: 16,
    };
    for len in [1025, 1 << 20, u32::MAX] {
        let mut d = FrameDecoder::new(limits);
        let mut header = BytesMut::new();
        header.put_u32_le(len);
        header.put_u8(frame_type::SUBMIT);
        // Byte by byte: nothing is decided before the 5th byte, the 5th decides.
        for (i, b) in header.iter().enumerate() {
            d.push(&[*b]);
            let r = d.next_frame();
            if i + 1 < FRAME_HEADER_BYTES {
                assert_eq!(r, Ok(None), "decided on {} header bytes", i + 1);
            } else {
                let e = r.expect_err("oversized header accepted");
                assert_eq!(e, WireError::FrameTooLarge { len, max: 1024 });
                assert_eq!(e.code(), code::FRAME_TOO_LARGE);
                assert_no_content(&e, &[]);
            }
        }
        assert_eq!(
            d.buffered(),
            FRAME_HEADER_BYTES,
            "body buffered for len {len}"
        );
    }
}

#[test]
fn frame_of_exactly_frame_bytes_max_is_accepted() {
    let limits = WireLimits {
        frame_bytes_max: 1024,
        batch_messages_max: 16,
    };
    let mut body = submit_header(1);
    let payload_len = 1024 - BATCH_HEADER_BYTES - MESSAGE_OVERHEAD_BYTES - RECIPIENT.len();
    put_message(
        &mut body,
        RECIPIENT.len() as u8,
        RECIPIENT,
        &vec![b'x'; payload_len],
    );
    assert_eq!(body.len(), 1024);
    let mut d = FrameDecoder::new(limits);
    d.push(&raw_frame(frame_type::SUBMIT, &body));
    assert!(matches!(d.next_frame(), Ok(Some(Frame::Submit { .. }))));
}

#[test]
fn unknown_type_fails_on_its_header() {
    for ty in [0x00, 0x0b, 0x7f, 0x80, 0x89, 0xff] {
        let bytes = raw_frame(ty, &[0; 32]);
        assert_refused(
            LIMITS,
            &bytes,
            WireError::UnknownType(ty),
            code::UNKNOWN_FRAME_TYPE,
        );
        // Decided on the header alone, before any of the body arrives.
        let mut d = FrameDecoder::new(LIMITS);
        d.push(&bytes[..FRAME_HEADER_BYTES]);
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(ty)));
        assert_eq!(d.buffered(), FRAME_HEADER_BYTES);
    }
}

// ---------------------------------------------------------------------------------------
// SUBMIT

#[test]
fn submit_with_no_message_is_a_bad_batch_size() {
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::SUBMIT, &submit_header(0)),
        WireError::BadBatchSize { count: 0, max: 64 },
        code::BAD_BATCH_SIZE,
    );
}

#[test]
fn submit_over_batch_messages_max_is_a_bad_batch_size() {
    for count in [65, u32::MAX] {
        let mut body = submit_header(count);
        put_valid_message(&mut body);
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::SUBMIT, &body),
            WireError::BadBatchSize { count, max: 64 },
            code::BAD_BATCH_SIZE,
        );
    }
}

#[test]
fn submit_count_beyond_the_body_fails_without_sizing_a_vec_by_it() {
    let mut body = submit_header(HOSTILE.batch_messages_max);
    put_valid_message(&mut body);
    let mut d = FrameDecoder::new(HOSTILE);
    d.push(&raw_frame(frame_type::SUBMIT, &body));
    let e = d.next_frame().expect_err("count beyond the body accepted");
    assert_eq!(
        e,
        malformed("SUBMIT", "count larger than the body can hold")
    );
    assert_eq!(e.code(), code::MALFORMED_FRAME);
    assert_no_content(&e, &[]);
}

#[test]
fn submit_count_just_within_the_body_bound_still_needs_every_message() {
    // Two minimal messages' worth of bytes, but the first message's payload takes them:
    // the cheap bound passes and the second message's header is missing.
    let mut body = submit_header(2);
    put_message(&mut body, RECIPIENT.len() as u8, RECIPIENT, &[b'x'; 64]);
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::SUBMIT, &body),
        malformed("SUBMIT", "message header truncated"),
        code::MALFORMED_FRAME,
    );
}

#[test]
fn invalid_recipients_are_refused_with_their_index() {
    let too_long_200 = [b'1'; 200];
    let cases: [(&str, &[u8]); 9] = [
        ("no plus", b"4915112345678"),
        ("leading zero", b"+0915112345678"),
        ("letters", b"+49151abc45678"),
        ("dash", b"+49151-2345678"),
        ("plus in the middle", b"+4915+12345678"),
        ("too short", b"+123456"),
        ("too long", b"+1234567890123456"),
        ("empty", b""),
        ("recipient_len 200", &too_long_200),
    ];
    for (why, bad) in cases {
        // A valid message first, so the index is checked to be the bad entry's.
        let mut body = submit_header(2);
        put_valid_message(&mut body);
        put_message(&mut body, bad.len() as u8, bad, PAYLOAD);
        let bytes = raw_frame(frame_type::SUBMIT, &body);
        let mut d = FrameDecoder::new(LIMITS);
        d.push(&bytes);
        let e = d.next_frame().expect_err(why);
        assert_eq!(e, WireError::InvalidRecipient { index: 1 }, "{why}");
        assert_eq!(e.code(), code::INVALID_RECIPIENT, "{why}");
        // Short strings would match the sizes an error carries by chance.
        let shown: &[&[u8]] = if bad.len() >= 7 { &[bad] } else { &[] };
        assert_no_content(&e, shown);
    }
}

#[test]
fn recipient_len_past_the_frame_is_malformed() {
    // recipient_len 200 with fewer than 200 bytes left: nothing to validate, the frame
    // is cut.
    let mut body = submit_header(1);
    put_message(&mut body, 200, RECIPIENT, PAYLOAD);
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::SUBMIT, &body),
        malformed("SUBMIT", "recipient truncated"),
        code::MALFORMED_FRAME,
    );
}

#[test]
fn payload_len_past_the_frame_is_malformed() {
    for claimed in [PAYLOAD.len() as u32 + 1, 1 << 20, u32::MAX] {
        let mut body = submit_header(1);
        body.put_u64_le(7);
        body.put_u8(RECIPIENT.len() as u8);
        body.put_slice(RECIPIENT);
        body.put_u32_le(claimed);
        body.put_slice(PAYLOAD);
        assert_refused_showing_nothing_of(
            LIMITS,
            &raw_frame(frame_type::SUBMIT, &body),
            malformed("SUBMIT", "payload runs past the frame"),
            code::MALFORMED_FRAME,
            &[PAYLOAD],
        );
    }
}

#[test]
fn bytes_after_the_last_message_are_malformed() {
    for trailing in [&[0u8][..], &[0u8; 9][..], PAYLOAD] {
        let mut body = submit_header(1);
        put_valid_message(&mut body);
        body.put_slice(trailing);
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::SUBMIT, &body),
            malformed("SUBMIT", "bytes after the last message"),
            code::MALFORMED_FRAME,
        );
    }
}

#[test]
fn submit_shorter_than_its_header_is_malformed() {
    for len in [0, 1, BATCH_HEADER_BYTES - 1] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::SUBMIT, &vec![1; len]),
            malformed("SUBMIT", "shorter than its fixed fields"),
            code::MALFORMED_FRAME,
        );
    }
}

// ---------------------------------------------------------------------------------------
// REPORT

#[test]
fn report_count_beyond_the_body_fails_without_sizing_a_vec_by_it() {
    let mut body = BytesMut::new();
    body.put_u32_le(HOSTILE.batch_messages_max);
    body.put_u32_le(3);
    body.put_u64_le(7);
    body.put_u8(RECIPIENT.len() as u8);
    body.put_slice(RECIPIENT);
    let mut d = FrameDecoder::new(HOSTILE);
    d.push(&raw_frame(frame_type::REPORT, &body));
    assert_eq!(
        d.next_frame(),
        Err(malformed("REPORT", "count larger than the body can hold"))
    );
}

#[test]
fn report_with_invalid_recipient_is_refused() {
    let mut body = BytesMut::new();
    body.put_u32_le(1);
    body.put_u32_le(3);
    body.put_u64_le(7);
    body.put_u8(14);
    body.put_slice(b"+0915112345678");
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::REPORT, &body),
        WireError::InvalidRecipient { index: 0 },
        code::INVALID_RECIPIENT,
    );
}

// ---------------------------------------------------------------------------------------
// HELLO

#[test]
fn hello_with_unsupported_version_is_a_bad_hello() {
    for version in [0, VERSION + 2, u16::MAX] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::HELLO, &hello_body(version, 3, b"tok")),
            WireError::BadHello("unsupported version"),
            code::BAD_HELLO,
        );
    }
}

#[test]
fn hello_with_token_over_256_bytes_is_a_bad_hello() {
    let token = vec![b't'; TOKEN_BYTES_MAX + 1];
    assert_refused_showing_nothing_of(
        LIMITS,
        &raw_frame(
            frame_type::HELLO,
            &hello_body(VERSION, token.len() as u16, &token),
        ),
        WireError::BadHello("token longer than 256 bytes"),
        code::BAD_HELLO,
        &[&token],
    );
    // The bound holds on the declared length alone, whatever follows.
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::HELLO, &hello_body(VERSION, u16::MAX, b"")),
        WireError::BadHello("token longer than 256 bytes"),
        code::BAD_HELLO,
    );
    // 256 bytes is allowed.
    let token = vec![b't'; TOKEN_BYTES_MAX];
    let mut d = FrameDecoder::new(LIMITS);
    d.push(&raw_frame(
        frame_type::HELLO,
        &hello_body(VERSION, token.len() as u16, &token),
    ));
    assert!(matches!(d.next_frame(), Ok(Some(Frame::Hello { .. }))));
}

#[test]
fn hello_whose_token_len_does_not_match_is_malformed() {
    for (token_len, token) in [(4, &b"tok"[..]), (2, &b"tok"[..])] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::HELLO, &hello_body(VERSION, token_len, token)),
            malformed("HELLO", "token length does not match the frame"),
            code::MALFORMED_FRAME,
        );
    }
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::HELLO, &[1, 0, 0]),
        malformed("HELLO", "shorter than its fixed fields"),
        code::MALFORMED_FRAME,
    );
}

// ---------------------------------------------------------------------------------------
// WELCOME and ACK

#[test]
fn welcome_of_wrong_size_is_malformed() {
    for len in [0, 15, 17, 19, 21] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::WELCOME, &vec![0; len]),
            malformed("WELCOME", "body is not 16 or 20 bytes"),
            code::MALFORMED_FRAME,
        );
    }
}

#[test]
fn ack_with_unknown_status_kind_is_malformed() {
    for kind in [4, 0x80, 0xff] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::ACK, &ack_body(&[(0, 1), (kind, 0)])),
            malformed("ACK", "unknown status"),
            code::MALFORMED_FRAME,
        );
    }
}

#[test]
fn ack_with_unknown_reason_is_malformed() {
    // Kind 3 is Rejected; its value is the reason byte, 1..=8.
    for value in [0, 9, 0xff, 0x101, u64::MAX] {
        assert_refused(
            LIMITS,
            &raw_frame(frame_type::ACK, &ack_body(&[(3, value)])),
            malformed("ACK", "unknown status"),
            code::MALFORMED_FRAME,
        );
    }
}

#[test]
fn ack_with_retry_after_beyond_u32_is_malformed() {
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::ACK, &ack_body(&[(2, 1 << 32)])),
        malformed("ACK", "unknown status"),
        code::MALFORMED_FRAME,
    );
}

#[test]
fn ack_count_not_matching_its_body_is_malformed() {
    let mut body = ack_body(&[(0, 1), (1, 2)]);
    body.pop();
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::ACK, &body),
        malformed("ACK", "count does not match the body"),
        code::MALFORMED_FRAME,
    );
    assert_refused(
        LIMITS,
        &raw_frame(frame_type::ACK, &ack_body(&[])),
        WireError::BadBatchSize { count: 0, max: 64 },
        code::BAD_BATCH_SIZE,
    );
}

// ---------------------------------------------------------------------------------------
// Any input at all

/// What a stream of arbitrary bytes came to.
#[derive(Debug)]
struct Outcome {
    /// The frames decoded, in stream order.
    frames: Vec<Frame>,
    /// The refusal that ended the stream, if any; the decoder was dropped there, as the
    /// server does. Without one, the stream ended between frames or `finish` reported it
    /// truncated.
    refused: Option<WireError>,
}

/// Feeds `chunks` to a decoder as the server does and checks what it must never do:
/// panic, loop, buffer past its bound, decode a frame that is not the canonical encoding
/// of the bytes it consumed, or return an error outside the stream codes.
fn drive<'a>(limits: WireLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut d = FrameDecoder::new(limits);
    let mut stream = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        d.push(chunk);
        stream.extend_from_slice(chunk);
        assert!(
            d.buffered() <= FRAME_HEADER_BYTES + limits.frame_bytes_max as usize + chunk.len(),
            "decoder holds {} bytes",
            d.buffered()
        );
        // Every frame consumes at least its header: this bounds the drain loop.
        for _ in 0..=d.buffered() / FRAME_HEADER_BYTES {
            let start = stream.len() - d.buffered();
            match d.next_frame() {
                Ok(Some(f)) => {
                    let end = stream.len() - d.buffered();
                    let mut again = BytesMut::new();
                    f.encode(&mut again);
                    assert_eq!(&again[..], &stream[start..end], "non-canonical {f:?}");
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        [
                            code::MALFORMED_FRAME,
                            code::FRAME_TOO_LARGE,
                            code::UNKNOWN_FRAME_TYPE,
                            code::INVALID_RECIPIENT,
                            code::BAD_BATCH_SIZE,
                            code::BAD_HELLO,
                        ]
                        .contains(&e.code()),
                        "{e}"
                    );
                    return Outcome {
                        frames,
                        refused: Some(e),
                    };
                }
            }
        }
        assert_eq!(d.next_frame(), Ok(None), "drain loop left a frame");
    }
    match d.finish() {
        Ok(()) => assert_eq!(d.buffered(), 0),
        Err(e) => assert_eq!(
            e,
            WireError::Truncated {
                buffered: d.buffered()
            }
        ),
    }
    Outcome {
        frames,
        refused: None,
    }
}

fn limits() -> impl Strategy<Value = WireLimits> {
    prop_oneof![
        Just(WireLimits {
            frame_bytes_max: 256,
            batch_messages_max: 4,
        }),
        Just(LIMITS),
        Just(WireLimits::PERMISSIVE),
    ]
}

/// A header of a known type announcing the length of the random body that follows, so
/// that random bytes reach the body decoders rather than dying on the header.
fn known_type_random_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            frame_type::HELLO,
            frame_type::SUBMIT,
            frame_type::REPORT,
            frame_type::WELCOME,
            frame_type::ACK,
        ]),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(ty, body)| raw_frame(ty, &body))
}

/// Shows nothing of the recipients and payloads of `frames` long enough that a chance
/// match with the sizes an error carries is out of the question.
fn assert_error_hides(e: &WireError, frames: &[Frame]) {
    let shown = format!("{e} {e:?}");
    for f in frames {
        if let Frame::Submit { messages, .. } = f {
            for m in messages {
                let digits = &m.recipient.as_str()[1..];
                if digits.len() >= 12 {
                    assert!(!shown.contains(digits), "{shown}");
                }
                if m.payload.len() >= 16 {
                    let text = String::from_utf8_lossy(&m.payload);
                    assert!(!shown.contains(&*text), "{shown}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(
        limits in limits(),
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        drive(limits, split_at_cuts(&bytes, &cuts));
    }

    #[test]
    fn random_bodies_of_known_types_never_panic(
        limits in limits(),
        frames in prop::collection::vec(known_type_random_body(), 1..4),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let bytes = frames.concat();
        drive(limits, split_at_cuts(&bytes, &cuts));
    }

    /// Valid streams with a few bytes overwritten, and maybe cut short: the decoder yields
    /// the frames before the damage, then refuses or waits, and never shows content.
    #[test]
    fn mutated_valid_frames_never_panic(
        frames in prop::collection::vec(frame(), 1..=STREAM_FRAMES_MAX),
        mutations in prop::collection::vec((any::<Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<Index>()),
        chunks in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let clean = encode_all(&frames).to_vec();
        let mut bytes = clean.clone();
        for (at, value) in &mutations {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let outcome = drive(WireLimits::PERMISSIVE, split_at_cuts(&bytes, &chunks));
        // The frames that end before the first damaged byte come out as they went in.
        let damage_at = clean
            .iter()
            .zip(&bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(bytes.len());
        let mut end = 0;
        let intact = frames
            .iter()
            .take_while(|f| {
                end += encode_all(std::slice::from_ref(*f)).len();
                end <= damage_at
            })
            .count();
        prop_assert!(outcome.frames.len() >= intact, "{} of {intact} intact frames", outcome.frames.len());
        prop_assert_eq!(&outcome.frames[..intact], &frames[..intact]);
        if let Some(e) = &outcome.refused {
            assert_error_hides(e, &frames);
        }
    }
}
