//! Target `wire`: the frame decoder of a stream and, through it, every frame body parser.

use bytes::{Bytes, BytesMut};

use crate::wire::delivery::{
    self, Deliver, FailReason, InboundEntry, InboundEvent, Outcome, OutcomeEntry, StatusEvent,
    StatusKind,
};
use crate::wire::{
    decode_body, Frame, FrameDecoder, LogPosition, Message, Reason, Recipient, ReportEntry, Status,
    Token, Welcome, WireLimits, FRAME_HEADER_BYTES,
};

/// Batch bounds the control byte picks from (the last one is the protocol's ceiling).
const BATCH_MAX: [u32; 4] = [1, 3, 64, 65_536];
/// Frame bounds the control byte picks from (the smallest a profile may set, and more).
const FRAME_MAX: [u32; 2] = [1024, 1 << 20];

/// `data[0]` picks the decoder's bounds and the chunk size the stream arrives in; the rest
/// is the stream. Every frame decoded must re-encode to exactly its bytes and decode again
/// to the same frame; an error ends the stream as it does in a server.
pub fn wire(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let limits = WireLimits {
        batch_messages_max: BATCH_MAX[usize::from(ctl & 3)],
        frame_bytes_max: FRAME_MAX[usize::from((ctl >> 2) & 1)],
    };
    let chunk = 1 + usize::from(ctl >> 3);
    let mut decoder = FrameDecoder::new(limits);
    let mut pushed = 0usize;
    let mut chunks = stream.chunks(chunk);
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                // What the frame took: everything pushed minus what is still buffered.
                let end = pushed - decoder.buffered();
                check_frame(&frame, &limits, &stream[..end]);
            }
            Ok(None) => match chunks.next() {
                Some(c) => {
                    decoder.push(c);
                    pushed += c.len();
                }
                None => {
                    let ended = decoder.finish();
                    assert_eq!(
                        ended.is_ok(),
                        decoder.buffered() == 0,
                        "finish agrees with what is buffered"
                    );
                    return;
                }
            },
            Err(e) => {
                // An error is a value with a stream code, never a panic.
                let _ = e.code();
                return;
            }
        }
    }
}

/// `consumed` ends with the frame's bytes.
fn check_frame(frame: &Frame, limits: &WireLimits, consumed: &[u8]) {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    assert!(
        out.len() >= FRAME_HEADER_BYTES,
        "an encoded frame has a header"
    );
    assert!(
        consumed.ends_with(&out),
        "a decoded frame re-encodes to the bytes it came from"
    );
    let ty = out[4];
    let body = Bytes::copy_from_slice(&out[FRAME_HEADER_BYTES..]);
    let again = decode_body(ty, body, limits).expect("a re-encoded frame decodes");
    assert!(again == *frame, "decode(encode(frame)) == frame");
}

fn r(s: &str) -> Recipient {
    Recipient::parse(s.as_bytes()).expect("a valid seed recipient")
}

fn msg(client_id: u64, to: &str, payload: &'static [u8]) -> Message {
    Message {
        client_id,
        recipient: r(to),
        payload: Bytes::from_static(payload),
    }
}

/// One stream holding every frame type, and a few single frames and edge cases.
pub(super) fn seeds() -> Vec<(String, Vec<u8>)> {
    let frames = vec![
        Frame::Hello {
            version: crate::wire::VERSION,
            token: Token(Bytes::from_static(b"cr1.7.0123456789abcdef")),
            features: 0,
        },
        Frame::Hello {
            version: crate::wire::VERSION_FEATURES,
            token: Token(Bytes::from_static(b"tok")),
            features: delivery::features::ALL,
        },
        Frame::Submit {
            batch_id: 9,
            messages: vec![
                msg(1, "+4915112345678", b"hello"),
                msg(2, "+14155550123", b""),
            ],
        },
        Frame::Report {
            entries: vec![ReportEntry {
                business_id: 3,
                client_id: 4,
                recipient: r("+4412345678"),
            }],
        },
        Frame::Welcome(Welcome {
            business_id: 7,
            batch_messages_max: 64,
            payload_bytes_max: 4096,
            frame_bytes_max: 1 << 20,
            features: None,
        }),
        Frame::Welcome(Welcome {
            business_id: 7,
            batch_messages_max: 64,
            payload_bytes_max: 4096,
            frame_bytes_max: 1 << 20,
            features: Some(3),
        }),
        Frame::Ack {
            batch_id: 9,
            statuses: vec![
                Status::Accepted(LogPosition(1 << 48 | 5)),
                Status::Duplicate(LogPosition(6)),
                Status::Throttled {
                    retry_after_ms: 250,
                },
                Status::Rejected(Reason::SenderPaused),
            ],
        },
        Frame::Delivery(delivery::DeliveryFrame::SubmitTtl {
            batch_id: 10,
            ttl_secs: 3600,
            messages: vec![msg(5, "+4915112345678", b"ttl")],
        }),
        Frame::Delivery(delivery::DeliveryFrame::EventAck(vec![
            LogPosition(1),
            LogPosition(2),
        ])),
        Frame::Delivery(delivery::DeliveryFrame::Status(vec![
            StatusEvent {
                event: LogPosition(11),
                message: LogPosition(5),
                client_id: 5,
                kind: StatusKind::Delivered,
                reason: None,
                at_ms: 1_700_000_000_000,
            },
            StatusEvent {
                event: LogPosition(12),
                message: LogPosition(6),
                client_id: 6,
                kind: StatusKind::Failed,
                reason: Some(FailReason::BlockedByUser),
                at_ms: 1_700_000_000_001,
            },
        ])),
        Frame::Delivery(delivery::DeliveryFrame::InboundEvent(InboundEvent {
            event: LogPosition(13),
            at_ms: 1_700_000_000_002,
            sender: r("+4915112345678"),
            payload: Bytes::from_static(b"reply"),
        })),
        Frame::Delivery(delivery::DeliveryFrame::Credit(32)),
        Frame::Delivery(delivery::DeliveryFrame::Outcome(vec![
            OutcomeEntry {
                message: LogPosition(5),
                outcome: Outcome::Delivered,
            },
            OutcomeEntry {
                message: LogPosition(6),
                outcome: Outcome::Failed(FailReason::NoDeviceKey),
            },
            OutcomeEntry {
                message: LogPosition(7),
                outcome: Outcome::RetryLater,
            },
        ])),
        Frame::Delivery(delivery::DeliveryFrame::Online(vec![r("+4915112345678")])),
        Frame::Delivery(delivery::DeliveryFrame::Inbound {
            batch_id: 77,
            entries: vec![InboundEntry {
                id: 1,
                business_id: 7,
                sender: r("+14155550123"),
                payload: Bytes::from_static(b"hi"),
            }],
        }),
        Frame::Delivery(delivery::DeliveryFrame::Deliver(Deliver {
            message: LogPosition(5),
            business_id: 7,
            client_id: 1,
            expires_ms: 1_700_000_360_000,
            recipient: r("+4915112345678"),
            payload: Bytes::from_static(b"sealed"),
            e2e: false,
        })),
        Frame::Delivery(delivery::DeliveryFrame::Deliver(Deliver {
            message: LogPosition(6),
            business_id: 7,
            client_id: 2,
            expires_ms: 1_700_000_360_000,
            recipient: r("+4915112345678"),
            payload: {
                let mut copies = vec![1u8];
                delivery::put_device_copy(&mut copies, 1, 0, &[0; 45], &[7; 20]);
                Bytes::from(copies)
            },
            e2e: true,
        })),
        Frame::Delivery(delivery::DeliveryFrame::KeysWanted(vec![r(
            "+4915112345678",
        )])),
        Frame::Delivery(delivery::DeliveryFrame::BusinessKeys(vec![
            delivery::BusinessKeyEntry {
                business_id: 7,
                key: crate::e2e::BusinessPublicKey {
                    key_id: 1,
                    public: [5; 32],
                },
            },
        ])),
        Frame::Delivery(delivery::DeliveryFrame::DeviceKeys(vec![
            delivery::DeviceKeysEntry {
                recipient: r("+14155550123"),
                bundles: Bytes::from_static(&[1, 0]),
            },
        ])),
    ];
    let mut seeds = Vec::new();
    // Control byte: batches of up to 64, frames up to 1 MiB, chunks of 11 bytes.
    let ctl = 2 | 4 | (10 << 3);
    let mut all = vec![ctl];
    for (i, f) in frames.iter().enumerate() {
        let mut one = BytesMut::new();
        f.encode(&mut one);
        all.extend_from_slice(&one);
        let mut single = vec![2 | 4 | (((i as u8) % 32) << 3)];
        single.extend_from_slice(&one);
        seeds.push((format!("frame-{i:02}-0x{:02x}", one[4]), single));
    }
    seeds.push(("stream-every-frame".to_string(), all.clone()));
    // Edge cases: a torn last frame, an oversized header, an unknown type.
    let mut torn = all.clone();
    torn.truncate(all.len() - 3);
    seeds.push(("stream-torn-tail".to_string(), torn));
    seeds.push((
        "header-too-large".to_string(),
        vec![0, 0xff, 0xff, 0xff, 0x7f, 0x02],
    ));
    seeds.push((
        "header-unknown-type".to_string(),
        vec![0, 1, 0, 0, 0, 0x7e, 0],
    ));
    seeds
}
