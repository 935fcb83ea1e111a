//! The client side of wire v1 as pure state: no socket, no clock, no runtime, no QUIC
//! types. The quinn [`crate::Client`] drives it over real streams; a deterministic
//! simulation can drive it over quinn-proto streams of its own.
//!
//! ```text
//! Hello::new(token, out)      ── HELLO bytes into `out` ──> caller writes them on stream 0
//!   handle_data(bytes) ...    <── stream 0 bytes          ──> Some(Session) once WELCOME
//! Session (WELCOME's bounds)
//!   encode_submit(id, batch, out) ── checked against the bounds ──> SUBMIT bytes in `out`
//!   ack_queue(depth) ──> AckQueue<T>, one per submit stream:
//!       push(id, count, tag)   before the SUBMIT is written (so its ACK always finds it)
//!       handle_data(bytes)     <── stream bytes: ACKs decoded and matched, oldest first
//!       poll_answer()          ──> Answer { batch_id, statuses, tag }, strictly in order
//!       handle_finish() / fail() ──> the stream is dead: every pending tag comes back
//! ```
//!
//! Invariants this module keeps:
//! - a batch is checked against the server's WELCOME bounds before a byte is encoded;
//! - an ACK answers the oldest pending batch of its stream, with its batch id and one
//!   status per message; anything else is a protocol error that kills the stream;
//! - a dead stream accepts nothing more and hands back exactly its pending batches, each
//!   once, so the caller fails exactly those;
//! - every queue is bounded: a stream holds at most its `depth` pending batches, and
//!   answers waiting to be polled never outnumber the batches they answered;
//! - no error or `Debug` output carries a token, a recipient or a payload.
//!
//! The pending `tag` is the caller's: the quinn client keeps the reply channel of each
//! batch there, a simulation whatever it checks answers against.

use std::collections::VecDeque;

use bytes::BytesMut;
use courier_pipeline::wire::delivery::InboundEntry;
use courier_pipeline::wire::{
    self, Frame, FrameDecoder, Message, OutMessage, ReportEntry, Status, Welcome, WireError,
    WireLimits,
};

/// The WELCOME body answering HELLO version 1 is 16 bytes.
const WELCOME_BODY_BYTES: u32 = 16;
/// The WELCOME body answering HELLO version 2 is 20 bytes (the features granted).
const WELCOME_V2_BODY_BYTES: u32 = 20;
/// Most batches one stream may have pending (a bound on [`Session::ack_queue`]'s depth).
pub const PENDING_PER_STREAM_MAX: usize = 4096;

/// Why the session refused a batch or a stream broke. No variant carries a token, a
/// recipient or a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The token does not fit HELLO; nothing was encoded.
    #[error("the token is longer than {max} bytes")]
    TokenTooLong {
        /// The wire's bound, [`wire::TOKEN_BYTES_MAX`].
        max: usize,
    },
    /// The server broke wire v1 (an ACK out of order, a wrong status count, an
    /// unexpected frame, unusable WELCOME bounds); the stream is dead.
    #[error("protocol violation by the server: {0}")]
    Protocol(&'static str),
    /// A frame from the server did not decode; the stream is dead. Stop the stream with
    /// the error's [`WireError::code`].
    #[error("undecodable frame from the server: {0}")]
    Wire(#[from] WireError),
    /// The server ended the stream before answering everything (or before WELCOME).
    #[error("the server ended the stream before answering")]
    StreamEnded,
    /// A batch with no message; nothing was encoded.
    #[error("empty batch")]
    EmptyBatch,
    /// More messages (or report entries) than the server's `batch_messages_max`; nothing
    /// was encoded. Split it.
    #[error("batch of {count} messages exceeds the server's batch_messages_max {max}")]
    BatchTooLarge {
        /// Messages in the batch.
        count: usize,
        /// The server's bound.
        max: u32,
    },
    /// A payload larger than the server's `payload_bytes_max`; nothing was encoded.
    #[error(
        "payload of message {index} is {bytes} bytes, over the server's payload_bytes_max {max}"
    )]
    PayloadTooLarge {
        /// Index of the message in its batch.
        index: usize,
        /// Its payload size.
        bytes: usize,
        /// The server's bound.
        max: u32,
    },
    /// The encoded SUBMIT is larger than the server's `frame_bytes_max`; nothing was
    /// encoded. Send fewer or smaller messages per batch.
    #[error("SUBMIT body of {bytes} bytes exceeds the server's frame_bytes_max {max}")]
    FrameTooLarge {
        /// Body bytes of the SUBMIT.
        bytes: usize,
        /// The server's bound.
        max: u32,
    },
}

impl SessionError {
    /// The stream error code to stop the server's half of a stream that broke with this
    /// error (see `wire::code`); `None` when the stream did not break by a frame.
    pub fn stop_code(&self) -> Option<u32> {
        match self {
            SessionError::Wire(e) => Some(e.code()),
            SessionError::Protocol(_) => Some(wire::code::UNEXPECTED_FRAME),
            _ => None,
        }
    }
}

/// A connection waiting for WELCOME on its HELLO stream.
///
/// HELLO version 1 ([`Hello::new`]) is what every client before delivery sent: the
/// server answers with a 16-byte WELCOME and the stream is done. HELLO version 2
/// ([`Hello::with_features`]) asks for delivery features; the server answers with a
/// 20-byte WELCOME stating the features granted and, when any was granted, keeps the
/// stream open for events (see [`crate::events`]): bytes that follow WELCOME in the
/// same read are kept for them ([`Hello::leftover`]).
#[derive(Debug)]
pub struct Hello {
    /// Bytes of the stream not yet used: WELCOME while incomplete, then what followed it.
    buf: Vec<u8>,
    /// The features asked for; `None`: HELLO version 1.
    asked: Option<u32>,
    done: bool,
}

impl Hello {
    /// Encodes HELLO version 1 with `token` into `out` (for the connection's first stream).
    pub fn new(token: &[u8], out: &mut BytesMut) -> Result<Hello, SessionError> {
        check_token(token)?;
        wire::encode_hello(token, out);
        Ok(Hello {
            buf: Vec::new(),
            asked: None,
            done: false,
        })
    }

    /// Encodes HELLO version 2 asking for `features` (see
    /// [`wire::delivery::features`]) into `out`.
    pub fn with_features(
        token: &[u8],
        features: u32,
        out: &mut BytesMut,
    ) -> Result<Hello, SessionError> {
        check_token(token)?;
        wire::encode_hello_features(token, features, out);
        Ok(Hello {
            buf: Vec::new(),
            asked: Some(features),
            done: false,
        })
    }

    /// Takes bytes the server sent on the HELLO stream; the session once WELCOME is
    /// complete. Bytes after WELCOME are kept for [`Hello::leftover`] (events may follow
    /// a version 2 WELCOME at once); nothing more is taken after it.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<Option<Session>, SessionError> {
        if self.done {
            return Err(SessionError::Protocol("data after WELCOME given to Hello"));
        }
        // At most one WELCOME frame plus one read is buffered: the header is checked as
        // soon as its 5 bytes are in.
        self.buf.extend_from_slice(data);
        if self.buf.len() < wire::FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes"));
        let ty = self.buf[4];
        if ty != wire::frame_type::WELCOME {
            return Err(SessionError::Protocol("expected WELCOME"));
        }
        let want = match self.asked {
            None => WELCOME_BODY_BYTES,
            Some(_) => WELCOME_V2_BODY_BYTES,
        };
        if len != want {
            return Err(SessionError::Wire(WireError::Malformed {
                frame: "WELCOME",
                what: "body length does not answer the HELLO version sent",
            }));
        }
        let end = wire::FRAME_HEADER_BYTES + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let body = bytes::Bytes::copy_from_slice(&self.buf[wire::FRAME_HEADER_BYTES..end]);
        self.buf.drain(..end);
        self.done = true;
        let Frame::Welcome(w) = wire::decode_body(ty, body, &WireLimits::PERMISSIVE)? else {
            unreachable!("a WELCOME body decodes to WELCOME");
        };
        if let (Some(asked), Some(granted)) = (self.asked, w.features) {
            if granted & !asked != 0 {
                return Err(SessionError::Protocol(
                    "WELCOME grants a feature not asked for",
                ));
            }
        }
        Session::new(w).map(Some)
    }

    /// The bytes that followed WELCOME in the reads given to [`Hello::handle_data`].
    pub fn leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The server ended the HELLO stream before WELCOME.
    pub fn handle_finish(&self) -> SessionError {
        if self.buf.is_empty() {
            SessionError::StreamEnded
        } else {
            SessionError::Wire(WireError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

fn check_token(token: &[u8]) -> Result<(), SessionError> {
    if token.len() > wire::TOKEN_BYTES_MAX {
        return Err(SessionError::TokenTooLong {
            max: wire::TOKEN_BYTES_MAX,
        });
    }
    Ok(())
}

/// An authenticated connection: the bounds the server stated in WELCOME, and what
/// follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    welcome: Welcome,
}

impl Session {
    /// A session under `welcome`'s bounds; refuses bounds no batch could meet.
    pub fn new(welcome: Welcome) -> Result<Session, SessionError> {
        if welcome.batch_messages_max == 0 || welcome.frame_bytes_max == 0 {
            return Err(SessionError::Protocol("WELCOME states unusable bounds"));
        }
        Ok(Session { welcome })
    }

    /// The bounds the server stated.
    pub fn welcome(&self) -> Welcome {
        self.welcome
    }

    /// The delivery features the server granted (0: none, or a version 1 WELCOME).
    pub fn features(&self) -> u32 {
        self.welcome.features.unwrap_or(0)
    }

    /// Checks `batch` against the WELCOME bounds; returns the body bytes of its SUBMIT.
    /// [`Session::encode_submit`] refuses exactly the batches this refuses.
    pub fn check(&self, batch: &[Message]) -> Result<usize, SessionError> {
        self.check_bounds(
            batch.iter().map(|m| {
                let entry = wire::MESSAGE_OVERHEAD_BYTES + m.recipient.as_bytes().len();
                (m.payload.len(), entry)
            }),
            batch.len(),
        )
    }

    /// The WELCOME bounds of a SUBMIT or INBOUND batch of `count` entries, given each
    /// entry's payload bytes and its bytes besides the payload: 1 ..= `batch_messages_max`
    /// entries, each payload within `payload_bytes_max`, the body within
    /// `frame_bytes_max`. Returns the body bytes.
    fn check_bounds(
        &self,
        entries: impl Iterator<Item = (usize, usize)> + Clone,
        count: usize,
    ) -> Result<usize, SessionError> {
        let w = &self.welcome;
        if count == 0 {
            return Err(SessionError::EmptyBatch);
        }
        if count > w.batch_messages_max as usize {
            return Err(SessionError::BatchTooLarge {
                count,
                max: w.batch_messages_max,
            });
        }
        if let Some((index, (bytes, _))) = entries
            .clone()
            .enumerate()
            .find(|(_, (payload, _))| *payload > w.payload_bytes_max as usize)
        {
            return Err(SessionError::PayloadTooLarge {
                index,
                bytes,
                max: w.payload_bytes_max,
            });
        }
        let body_bytes = wire::BATCH_HEADER_BYTES
            + entries
                .map(|(payload, other)| payload + other)
                .sum::<usize>();
        if body_bytes > w.frame_bytes_max as usize {
            return Err(SessionError::FrameTooLarge {
                bytes: body_bytes,
                max: w.frame_bytes_max,
            });
        }
        Ok(body_bytes)
    }

    /// Checks `batch` and appends its SUBMIT frame (header included) to `out`; nothing
    /// is appended when the batch is refused.
    pub fn encode_submit(
        &self,
        batch_id: u64,
        batch: &[Message],
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        let body_bytes = self.check(batch)?;
        let messages: Vec<OutMessage<'_>> = batch
            .iter()
            .map(|m| OutMessage {
                client_id: m.client_id,
                recipient: &m.recipient,
                payload: &m.payload,
            })
            .collect();
        debug_assert_eq!(wire::submit_body_bytes(&messages), body_bytes);
        let start = out.len();
        out.reserve(wire::FRAME_HEADER_BYTES + body_bytes);
        wire::encode_submit_into(batch_id, &messages, out);
        debug_assert_eq!(out.len() - start, wire::FRAME_HEADER_BYTES + body_bytes);
        Ok(())
    }

    /// Checks `batch` and appends its SUBMIT_TTL frame to `out`: the messages live
    /// `ttl_secs` (0: the relay's default; the relay caps it at its own maximum).
    pub fn encode_submit_ttl(
        &self,
        batch_id: u64,
        ttl_secs: u32,
        batch: &[Message],
        out: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let body_bytes = self.check(batch)? + 4;
        if body_bytes > self.welcome.frame_bytes_max as usize {
            return Err(SessionError::FrameTooLarge {
                bytes: body_bytes,
                max: self.welcome.frame_bytes_max,
            });
        }
        let messages: Vec<OutMessage<'_>> = batch
            .iter()
            .map(|m| OutMessage {
                client_id: m.client_id,
                recipient: &m.recipient,
                payload: &m.payload,
            })
            .collect();
        wire::delivery::encode_submit_ttl(batch_id, ttl_secs, &messages, out);
        Ok(())
    }

    /// Checks users' replies (an edge's INBOUND batch) against the WELCOME bounds and
    /// appends the INBOUND frame to `out`; it is answered by one ACK, like SUBMIT.
    pub fn encode_inbound(
        &self,
        batch_id: u64,
        entries: &[InboundEntry],
        out: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let body_bytes = self.check_bounds(
            entries.iter().map(|e| {
                let entry = wire::delivery::INBOUND_ENTRY_FIXED_BYTES + e.sender.as_bytes().len();
                (e.payload.len(), entry)
            }),
            entries.len(),
        )?;
        let start = out.len();
        wire::delivery::encode_inbound(batch_id, entries, out);
        debug_assert_eq!(out.len() - start, wire::FRAME_HEADER_BYTES + body_bytes);
        Ok(())
    }

    /// Checks `entries` (1 ..= `batch_messages_max` of them) and appends their REPORT
    /// frame to `out`.
    pub fn encode_report(
        &self,
        entries: &[ReportEntry],
        out: &mut BytesMut,
    ) -> Result<(), SessionError> {
        if entries.is_empty() || entries.len() > self.welcome.batch_messages_max as usize {
            return Err(SessionError::BatchTooLarge {
                count: entries.len(),
                max: self.welcome.batch_messages_max,
            });
        }
        wire::encode_report(entries, out);
        Ok(())
    }

    /// The decoder bounds for ACKs answering batches within WELCOME's bounds.
    pub fn ack_limits(&self) -> WireLimits {
        let body = wire::BATCH_HEADER_BYTES as u64
            + u64::from(self.welcome.batch_messages_max) * wire::STATUS_BYTES as u64;
        WireLimits {
            frame_bytes_max: u32::try_from(body).unwrap_or(u32::MAX),
            batch_messages_max: self.welcome.batch_messages_max,
        }
    }

    /// The state of one submit stream with at most `depth` batches pending (clamped to
    /// 1 ..= [`PENDING_PER_STREAM_MAX`]).
    pub fn ack_queue<T>(&self, depth: usize) -> AckQueue<T> {
        let depth = depth.clamp(1, PENDING_PER_STREAM_MAX);
        AckQueue {
            decoder: FrameDecoder::new(self.ack_limits()),
            pending: VecDeque::with_capacity(depth),
            answers: VecDeque::new(),
            depth,
            dead: false,
        }
    }
}

/// One batch answered by its ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    /// The batch id the SUBMIT carried.
    pub batch_id: u64,
    /// One status per message, in batch order.
    pub statuses: Vec<Status>,
    /// What the caller pushed with the batch.
    pub tag: T,
}

/// Why [`AckQueue::push`] handed a batch back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushRefused {
    /// The stream is dead; write the batch on another stream.
    #[error("the stream is dead")]
    Dead,
    /// The stream already has its `depth` batches pending.
    #[error("the stream has its most batches pending")]
    Full,
}

/// A batch registered before its SUBMIT is written.
#[derive(Debug)]
struct Pending<T> {
    batch_id: u64,
    count: usize,
    tag: T,
}

/// One submit stream: its SUBMITs awaiting their ACK, oldest first, and the decoder of
/// what the server sent back on it.
#[derive(Debug)]
pub struct AckQueue<T> {
    decoder: FrameDecoder,
    pending: VecDeque<Pending<T>>,
    answers: VecDeque<Answer<T>>,
    depth: usize,
    dead: bool,
}

impl<T> AckQueue<T> {
    /// Registers a batch of `count` messages whose SUBMIT is about to be written; hands
    /// `tag` back if the stream is dead or full.
    pub fn push(&mut self, batch_id: u64, count: usize, tag: T) -> Result<(), (PushRefused, T)> {
        if self.dead {
            return Err((PushRefused::Dead, tag));
        }
        if self.pending.len() >= self.depth {
            return Err((PushRefused::Full, tag));
        }
        self.pending.push_back(Pending {
            batch_id,
            count,
            tag,
        });
        Ok(())
    }

    /// Takes bytes the server sent on this stream and matches every complete ACK with
    /// the oldest pending batch. On an error the stream is dead: answers decoded before
    /// it still come out of [`AckQueue::poll_answer`]; [`AckQueue::fail`] hands back the
    /// rest. Bytes after an error are ignored.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if self.dead {
            return Ok(());
        }
        self.decoder.push(data);
        // Each frame decoded takes buffered bytes, so this ends with the buffer.
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.die(SessionError::Wire(e))),
            };
            if let Err(e) = self.resolve(frame) {
                return Err(self.die(e));
            }
        }
    }

    /// The server finished its half of the stream: what it left unanswered can never be
    /// answered. Returns why (a truncated frame, or the end itself); the stream is dead.
    pub fn handle_finish(&mut self) -> SessionError {
        let err = match self.decoder.finish() {
            Ok(()) => SessionError::StreamEnded,
            Err(e) => SessionError::Wire(e),
        };
        self.die(err)
    }

    /// The next answered batch, in the order the batches were pushed.
    pub fn poll_answer(&mut self) -> Option<Answer<T>> {
        self.answers.pop_front()
    }

    /// Marks the stream dead (reset, connection lost, or an error above) and hands back
    /// every batch still pending, oldest first; each is handed back once.
    pub fn fail(&mut self) -> impl Iterator<Item = T> + '_ {
        self.dead = true;
        self.pending.drain(..).map(|p| p.tag)
    }

    /// Whether the stream is dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Batches pushed and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether another batch may be pushed now.
    pub fn has_room(&self) -> bool {
        !self.dead && self.pending.len() < self.depth
    }

    fn die(&mut self, err: SessionError) -> SessionError {
        self.dead = true;
        err
    }

    /// Matches one frame with the oldest pending batch.
    fn resolve(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Frame::Ack { batch_id, statuses } = frame else {
            return Err(SessionError::Protocol(
                "a frame other than ACK on a submit stream",
            ));
        };
        match self.pending.front() {
            None => return Err(SessionError::Protocol("ACK with no batch pending")),
            Some(p) if p.batch_id != batch_id => {
                return Err(SessionError::Protocol(
                    "ACK for a batch other than the oldest",
                ))
            }
            Some(p) if p.count != statuses.len() => {
                return Err(SessionError::Protocol(
                    "ACK status count differs from the batch",
                ))
            }
            Some(_) => {}
        }
        let p = self.pending.pop_front().expect("front exists");
        self.answers.push_back(Answer {
            batch_id,
            statuses,
            tag: p.tag,
        });
        debug_assert!(self.pending.len() + self.answers.len() <= self.depth);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use courier_pipeline::wire::{LogPosition, Reason, Recipient};

    fn welcome() -> Welcome {
        Welcome {
            business_id: 1,
            batch_messages_max: 4,
            payload_bytes_max: 10,
            frame_bytes_max: 100,
            features: None,
        }
    }

    fn session() -> Session {
        Session::new(welcome()).unwrap()
    }

    fn msg(id: u64, payload: &'static [u8]) -> Message {
        Message {
            client_id: id,
            recipient: Recipient::parse(b"+15550000001").unwrap(),
            payload: Bytes::from_static(payload),
        }
    }

    fn ack(batch_id: u64, statuses: &[Status]) -> BytesMut {
        let mut b = BytesMut::new();
        wire::encode_ack(batch_id, statuses, &mut b);
        b
    }

    const OK: Status = Status::Accepted(LogPosition(5));

    #[test]
    fn hello_then_welcome_gives_a_session() {
        let mut out = BytesMut::new();
        let mut hello = Hello::new(b"c1.1.token", &mut out).unwrap();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&out);
        assert!(matches!(d.next_frame().unwrap(), Some(Frame::Hello { .. })));
        let mut w = BytesMut::new();
        wire::encode_welcome(&welcome(), &mut w);
        // Byte by byte: nothing until the frame is whole.
        for b in &w[..w.len() - 1] {
            assert_eq!(hello.handle_data(&[*b]).unwrap(), None);
        }
        let s = hello.handle_data(&w[w.len() - 1..]).unwrap().unwrap();
        assert_eq!(s.welcome(), welcome());
    }

    #[test]
    fn hello_v2_asks_for_features_and_keeps_what_follows_welcome() {
        let mut out = BytesMut::new();
        let mut hello = Hello::with_features(b"c1.1.token", 0x1, &mut out).unwrap();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&out);
        let Some(Frame::Hello {
            version, features, ..
        }) = d.next_frame().unwrap()
        else {
            panic!("not a HELLO");
        };
        assert_eq!((version, features), (wire::VERSION_FEATURES, 0x1));
        let v2 = Welcome {
            features: Some(0x1),
            ..welcome()
        };
        let mut w = BytesMut::new();
        wire::encode_welcome(&v2, &mut w);
        assert_eq!(
            w.len(),
            wire::FRAME_HEADER_BYTES + 20,
            "a version 2 WELCOME"
        );
        w.extend_from_slice(b"\x07\x00");
        let (head, tail) = w.split_at(9);
        assert_eq!(hello.handle_data(head).unwrap(), None);
        let s = hello.handle_data(tail).unwrap().unwrap();
        assert_eq!((s.welcome(), s.features()), (v2, 0x1));
        assert_eq!(hello.leftover(), b"\x07\x00", "the start of an event frame");
        assert!(hello.handle_data(b"x").is_err(), "Hello is done");
        // A feature not asked for, or a WELCOME of the other version, is refused.
        let mut hello = Hello::with_features(b"t", 0x1, &mut out).unwrap();
        let mut w = BytesMut::new();
        wire::encode_welcome(
            &Welcome {
                features: Some(0x3),
                ..welcome()
            },
            &mut w,
        );
        assert!(matches!(
            hello.handle_data(&w),
            Err(SessionError::Protocol(_))
        ));
        let mut v1 = Hello::new(b"t", &mut out).unwrap();
        assert!(matches!(v1.handle_data(&w), Err(SessionError::Wire(_))));
        assert_eq!(
            session().features(),
            0,
            "a version 1 WELCOME grants nothing"
        );
    }

    #[test]
    fn submit_ttl_and_inbound_are_checked_against_welcome_and_decode_back() {
        use courier_pipeline::wire::delivery::DeliveryFrame;
        let s = session();
        let mut out = BytesMut::new();
        s.encode_submit_ttl(3, 60, &[msg(1, b"hi")], &mut out)
            .unwrap();
        let entry = |payload: &'static [u8]| InboundEntry {
            id: 1,
            business_id: 7,
            sender: Recipient::parse(b"+15550000002").unwrap(),
            payload: Bytes::from_static(payload),
        };
        s.encode_inbound(4, &[entry(b"yes")], &mut out).unwrap();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&out);
        let Some(Frame::Delivery(DeliveryFrame::SubmitTtl {
            batch_id: 3,
            ttl_secs: 60,
            messages,
        })) = d.next_frame().unwrap()
        else {
            panic!("not a SUBMIT_TTL");
        };
        assert_eq!(messages[0].client_id, 1);
        let Some(Frame::Delivery(DeliveryFrame::Inbound {
            batch_id: 4,
            entries,
        })) = d.next_frame().unwrap()
        else {
            panic!("not an INBOUND");
        };
        assert_eq!(entries, vec![entry(b"yes")]);
        let mut out = BytesMut::new();
        assert_eq!(
            s.encode_inbound(5, &[], &mut out),
            Err(SessionError::EmptyBatch)
        );
        assert!(matches!(
            s.encode_inbound(5, &[entry(b"01234567890")], &mut out),
            Err(SessionError::PayloadTooLarge { index: 0, .. })
        ));
        let five: Vec<InboundEntry> = (0..5).map(|_| entry(b"x")).collect();
        assert!(matches!(
            s.encode_inbound(5, &five, &mut out),
            Err(SessionError::BatchTooLarge { count: 5, max: 4 })
        ));
        let four: Vec<_> = (0..4).map(|i| msg(i, b"0123456789")).collect();
        assert!(matches!(
            s.encode_submit_ttl(6, 1, &four, &mut out),
            Err(SessionError::FrameTooLarge { .. })
        ));
        assert!(out.is_empty(), "a refused batch encodes nothing");
    }

    #[test]
    fn hello_refuses_long_tokens_other_frames_and_an_early_end() {
        let long = vec![b'x'; wire::TOKEN_BYTES_MAX + 1];
        let mut out = BytesMut::new();
        assert_eq!(
            Hello::new(&long, &mut out).unwrap_err(),
            SessionError::TokenTooLong {
                max: wire::TOKEN_BYTES_MAX
            }
        );
        assert!(out.is_empty(), "nothing encoded");
        let mut hello = Hello::new(b"t", &mut out).unwrap();
        assert!(matches!(
            hello.handle_data(&ack(1, &[])),
            Err(SessionError::Protocol(_) | SessionError::Wire(_))
        ));
        let hello = Hello::new(b"t", &mut out).unwrap();
        assert_eq!(hello.handle_finish(), SessionError::StreamEnded);
        let unusable = Welcome {
            batch_messages_max: 0,
            ..welcome()
        };
        assert!(matches!(
            Session::new(unusable),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn encode_refuses_batches_outside_welcome_bounds() {
        let s = session();
        let mut out = Vec::new();
        assert_eq!(
            s.encode_submit(1, &[], &mut out),
            Err(SessionError::EmptyBatch)
        );
        let five: Vec<_> = (0..5).map(|i| msg(i, b"x")).collect();
        assert_eq!(
            s.encode_submit(1, &five, &mut out),
            Err(SessionError::BatchTooLarge { count: 5, max: 4 })
        );
        assert_eq!(
            s.encode_submit(1, &[msg(0, b"x"), msg(1, b"01234567890")], &mut out),
            Err(SessionError::PayloadTooLarge {
                index: 1,
                bytes: 11,
                max: 10
            })
        );
        // 4 messages of 13 + 12 + 10 bytes plus the 12 byte header: 152 > 100.
        let four: Vec<_> = (0..4).map(|i| msg(i, b"0123456789")).collect();
        assert_eq!(
            s.encode_submit(1, &four, &mut out),
            Err(SessionError::FrameTooLarge {
                bytes: 152,
                max: 100
            })
        );
        assert!(out.is_empty(), "a refused batch encodes nothing");
    }

    #[test]
    fn encoded_submit_decodes_back() {
        let mut out = vec![0xEE];
        session()
            .encode_submit(9, &[msg(7, b"hi"), msg(8, b"")], &mut out)
            .unwrap();
        assert_eq!(out[0], 0xEE, "appended after what was there");
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&out[1..]);
        let Some(Frame::Submit { batch_id, messages }) = d.next_frame().unwrap() else {
            panic!("not a SUBMIT");
        };
        assert_eq!(batch_id, 9);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].client_id, 7);
        assert_eq!(&messages[0].payload[..], b"hi");
        assert_eq!(messages[1].client_id, 8);
    }

    #[test]
    fn acks_answer_pending_batches_in_order_even_split_across_reads() {
        let mut q = session().ack_queue::<&str>(4);
        q.push(1, 1, "a").unwrap();
        q.push(2, 2, "b").unwrap();
        let mut bytes = ack(1, &[OK]).to_vec();
        bytes.extend_from_slice(&ack(2, &[OK, Status::Rejected(Reason::SenderPaused)]));
        let (head, tail) = bytes.split_at(7);
        q.handle_data(head).unwrap();
        assert_eq!(q.poll_answer(), None, "no ACK complete yet");
        q.handle_data(tail).unwrap();
        let a = q.poll_answer().unwrap();
        assert_eq!((a.batch_id, a.tag, a.statuses), (1, "a", vec![OK]));
        let b = q.poll_answer().unwrap();
        assert_eq!((b.batch_id, b.tag, b.statuses.len()), (2, "b", 2));
        assert_eq!(q.poll_answer(), None);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn ack_mismatch_is_a_protocol_error_and_fails_exactly_the_pending() {
        for bad in [ack(3, &[OK]), ack(2, &[OK, OK])] {
            let mut q = session().ack_queue::<u32>(4);
            for id in 1..=3 {
                q.push(id, 1, id as u32 * 10).unwrap();
            }
            let mut bytes = ack(1, &[OK]).to_vec();
            bytes.extend_from_slice(&bad);
            let err = q.handle_data(&bytes).unwrap_err();
            assert!(matches!(err, SessionError::Protocol(_)), "{err}");
            assert_eq!(err.stop_code(), Some(wire::code::UNEXPECTED_FRAME));
            assert!(q.is_dead());
            // The ACK decoded before the bad one still answers its batch.
            assert_eq!(q.poll_answer().unwrap().tag, 10);
            assert_eq!(q.fail().collect::<Vec<_>>(), vec![20, 30]);
            assert_eq!(q.fail().count(), 0, "each pending batch comes back once");
            assert_eq!(q.push(4, 1, 40), Err((PushRefused::Dead, 40)));
        }
    }

    #[test]
    fn an_ack_with_nothing_pending_or_another_frame_is_a_protocol_error() {
        let mut q = session().ack_queue::<()>(1);
        assert!(matches!(
            q.handle_data(&ack(1, &[OK])),
            Err(SessionError::Protocol(_))
        ));
        let mut q = session().ack_queue::<()>(1);
        q.push(1, 1, ()).unwrap();
        let mut w = BytesMut::new();
        wire::encode_welcome(&welcome(), &mut w);
        assert!(q.handle_data(&w).is_err());
        assert_eq!(q.fail().count(), 1);
    }

    #[test]
    fn a_finished_or_garbled_stream_fails_its_pending() {
        let mut q = session().ack_queue::<u8>(2);
        q.push(1, 1, 1).unwrap();
        assert_eq!(q.handle_finish(), SessionError::StreamEnded);
        assert_eq!(q.fail().collect::<Vec<_>>(), vec![1]);
        let mut q = session().ack_queue::<u8>(2);
        q.push(1, 1, 1).unwrap();
        let a = ack(1, &[OK]);
        q.handle_data(&a[..3]).unwrap();
        assert!(matches!(q.handle_finish(), SessionError::Wire(_)));
        let mut q = session().ack_queue::<u8>(2);
        q.push(1, 1, 1).unwrap();
        // A frame header announcing more than any ACK within WELCOME's bounds.
        let e = q.handle_data(&[0xff, 0xff, 0xff, 0x00, 0x03]).unwrap_err();
        assert!(e.stop_code().is_some(), "{e}");
        assert_eq!(q.fail().count(), 1);
    }

    #[test]
    fn a_stream_holds_at_most_its_depth() {
        let mut q = session().ack_queue::<u8>(2);
        q.push(1, 1, 1).unwrap();
        q.push(2, 1, 2).unwrap();
        assert!(!q.has_room());
        assert_eq!(q.push(3, 1, 3), Err((PushRefused::Full, 3)));
        q.handle_data(&ack(1, &[OK])).unwrap();
        assert!(q.has_room());
        assert_eq!(session().ack_queue::<u8>(0).depth, 1);
    }

    #[test]
    fn errors_and_debug_never_show_content() {
        let m = Message {
            client_id: 1,
            recipient: Recipient::parse(b"+4915112345678").unwrap(),
            payload: Bytes::from_static(b"secret words, too long"),
        };
        let err = session()
            .encode_submit(1, std::slice::from_ref(&m), &mut Vec::new())
            .unwrap_err();
        let mut out = BytesMut::new();
        let hello = Hello::new(b"c1.1.secret-token", &mut out).unwrap();
        let s = format!("{m:?} {err} {err:?} {hello:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(!s.contains("4915112345678"), "{s}");
    }
}
