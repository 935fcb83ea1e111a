//! The event stream of a connection that negotiated delivery features, as pure state:
//! what the server pushes on the HELLO stream after WELCOME, and the frames a client
//! writes back on it. The quinn side is [`crate::subscription`].
//!
//! ```text
//! business (EVENTS)                               edge (DELIVERY)
//!   <── STATUS (statuses of its messages)           <── DELIVER (within the credit granted)
//!   <── INBOUND_EVENT (a user's reply)              ──> CREDIT, OUTCOME, ONLINE
//!   ──> EVENT_ACK (events handled)                  ──> INBOUND on other streams (ACKed)
//!
//! EventStream::new(session, leftover) ── handle_data(bytes) ──> poll() -> Incoming
//! encode_event_acks / encode_outcomes / encode_online / encode_credit ── frames within
//!   the server's WELCOME bounds (split into several frames when needed)
//! SeenIds: a bounded window of event (or message) ids already handled
//! ```
//!
//! Every push is at least once: a business hears an event again until it acknowledges
//! it (after a lost acknowledgement, a reconnect, a restart of the relay), and an edge may
//! be handed a message again until its outcome arrives. Both drop copies by id: an
//! event's id is the log position of its record, a message's id its log position.
//!
//! Invariants this module keeps:
//! - a business stream takes STATUS and INBOUND_EVENT only, an edge stream DELIVER only;
//!   any other frame kills the stream (a protocol error);
//! - frames are bounded before they are buffered (the WELCOME bounds, widened to the
//!   largest DELIVER and STATUS the server can send under them);
//! - no error or `Debug` output carries a recipient or a payload.

use std::collections::{HashSet, VecDeque};

use bytes::BytesMut;
use courier_pipeline::seal::SEAL_OVERHEAD_BYTES;
use courier_pipeline::wire::delivery::{
    self as wd, features, BusinessEvent, Deliver, DeliveryFrame, InboundEvent, OutcomeEntry,
    StatusEvent,
};
use courier_pipeline::wire::{self, Frame, FrameDecoder, LogPosition, Recipient, WireLimits};

use crate::session::{Session, SessionError};

/// Most events the server puts in one STATUS frame (its `delivery.events_per_push_max`
/// is at most this).
pub const EVENTS_PER_FRAME_MAX: u32 = 4096;

/// What a connection takes on its HELLO stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRole {
    /// A business: statuses and users' replies.
    Business,
    /// The platform's delivery edge: messages to deliver.
    Edge,
}

impl StreamRole {
    /// The role the granted `features` give; `None` when none was granted.
    pub fn of(features: u32) -> Option<StreamRole> {
        if features & features::DELIVERY != 0 {
            Some(StreamRole::Edge)
        } else if features & features::EVENTS != 0 {
            Some(StreamRole::Business)
        } else {
            None
        }
    }
}

/// One frame the server pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Statuses of the business's messages, in the order recorded.
    Statuses(Vec<StatusEvent>),
    /// A user's reply to the business.
    Inbound(InboundEvent),
    /// A message for the edge to deliver.
    Deliver(Deliver),
    /// The relay wants these recipients' device keys (E2E).
    KeysWanted(Vec<Recipient>),
    /// The businesses' reply keys (E2E).
    BusinessKeys(Vec<wd::BusinessKeyEntry>),
}

impl Incoming {
    /// The business events it holds, in order (none for a DELIVER).
    pub fn into_events(self) -> Vec<BusinessEvent> {
        match self {
            Incoming::Statuses(s) => s.into_iter().map(BusinessEvent::Status).collect(),
            Incoming::Inbound(i) => vec![BusinessEvent::Inbound(i)],
            Incoming::Deliver(_) | Incoming::KeysWanted(_) | Incoming::BusinessKeys(_) => {
                Vec::new()
            }
        }
    }
}

/// The decoder of one connection's event stream.
pub struct EventStream {
    role: StreamRole,
    decoder: FrameDecoder,
    items: VecDeque<Incoming>,
    dead: bool,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the decoder's buffer: it holds frames' bytes, payloads and numbers included.
        f.debug_struct("EventStream")
            .field("role", &self.role)
            .field("buffered", &self.decoder.buffered())
            .field("items", &self.items.len())
            .field("dead", &self.dead)
            .finish()
    }
}

/// The decoder bounds for what the server pushes under `session`'s WELCOME: a DELIVER
/// carries a sealed payload (the payload bound plus the seal's overhead), a STATUS up
/// to [`EVENTS_PER_FRAME_MAX`] events.
pub fn event_limits(session: &Session) -> WireLimits {
    let w = session.welcome();
    let deliver = wd::DELIVER_FIXED_BYTES as u64
        + wire::RECIPIENT_BYTES_MAX as u64
        + u64::from(w.payload_bytes_max)
        + SEAL_OVERHEAD_BYTES as u64;
    // DELIVER_E2E: a copy per device, each with its header and tag.
    let devices = courier_pipeline::e2e::bundle::DEVICES_PER_RECIPIENT_MAX as u64;
    let deliver = deliver.max(
        wd::DELIVER_FIXED_BYTES as u64
            + wire::RECIPIENT_BYTES_MAX as u64
            + 1
            + devices
                * (wd::DEVICE_COPY_FIXED_BYTES as u64
                    + u64::from(w.payload_bytes_max)
                    + courier_pipeline::e2e::hpke::TAG_BYTES as u64),
    );
    let status = 4 + wd::STATUS_EVENT_BYTES as u64 * u64::from(EVENTS_PER_FRAME_MAX);
    let frame = u64::from(w.frame_bytes_max).max(deliver).max(status);
    WireLimits {
        frame_bytes_max: u32::try_from(frame).unwrap_or(u32::MAX),
        batch_messages_max: w.batch_messages_max.max(EVENTS_PER_FRAME_MAX),
    }
}

impl EventStream {
    /// The event stream of `session`, starting with the bytes that followed WELCOME.
    /// Refused when the server granted no delivery feature.
    pub fn new(session: &Session, leftover: &[u8]) -> Result<EventStream, SessionError> {
        let role = StreamRole::of(session.features())
            .ok_or(SessionError::Protocol("no delivery feature was granted"))?;
        let mut s = EventStream {
            role,
            decoder: FrameDecoder::new(event_limits(session)),
            items: VecDeque::new(),
            dead: false,
        };
        s.handle_data(leftover)?;
        Ok(s)
    }

    /// What this stream carries.
    pub fn role(&self) -> StreamRole {
        self.role
    }

    /// Takes bytes the server sent on the HELLO stream. On an error the stream is dead:
    /// frames decoded before it still come out of [`EventStream::poll`].
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if self.dead {
            return Ok(());
        }
        self.decoder.push(data);
        // Each frame decoded takes buffered bytes, so this ends with the buffer.
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.die(SessionError::Wire(e))),
            };
            let item = match (self.role, frame) {
                (StreamRole::Business, Frame::Delivery(DeliveryFrame::Status(s))) => {
                    Incoming::Statuses(s)
                }
                (StreamRole::Business, Frame::Delivery(DeliveryFrame::InboundEvent(i))) => {
                    Incoming::Inbound(i)
                }
                (StreamRole::Edge, Frame::Delivery(DeliveryFrame::Deliver(d))) => {
                    Incoming::Deliver(d)
                }
                (StreamRole::Edge, Frame::Delivery(DeliveryFrame::KeysWanted(r))) => {
                    Incoming::KeysWanted(r)
                }
                (StreamRole::Edge, Frame::Delivery(DeliveryFrame::BusinessKeys(k))) => {
                    Incoming::BusinessKeys(k)
                }
                _ => {
                    return Err(self.die(SessionError::Protocol(
                        "a frame this connection's role never takes on its event stream",
                    )))
                }
            };
            self.items.push_back(item);
        }
    }

    /// The next frame pushed, in order.
    pub fn poll(&mut self) -> Option<Incoming> {
        self.items.pop_front()
    }

    /// The server ended the stream: nothing more will come. Returns why.
    pub fn handle_finish(&mut self) -> SessionError {
        let err = match self.decoder.finish() {
            Ok(()) => SessionError::StreamEnded,
            Err(e) => SessionError::Wire(e),
        };
        self.die(err)
    }

    /// Whether the stream is dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn die(&mut self, err: SessionError) -> SessionError {
        self.dead = true;
        err
    }
}

/// How many entries of `each` bytes one frame may hold under the server's bounds.
fn per_frame(session: &Session, each: usize) -> usize {
    let w = session.welcome();
    let by_bytes = (w.frame_bytes_max as usize).saturating_sub(4) / each;
    by_bytes.min(w.batch_messages_max as usize).max(1)
}

/// Appends DEVICE_KEYS frames with `entries` (as many frames as the server's bounds
/// need; none for no entry).
pub fn encode_device_keys(session: &Session, entries: &[wd::DeviceKeysEntry], out: &mut BytesMut) {
    let w = session.welcome();
    let room = (w.frame_bytes_max as usize).saturating_sub(4);
    let mut i = 0;
    while i < entries.len() {
        let mut bytes = 0;
        let mut n = 0;
        for e in &entries[i..] {
            let each = 1 + e.recipient.as_bytes().len() + 4 + e.bundles.len();
            if n > 0 && (bytes + each > room || n >= w.batch_messages_max as usize) {
                break;
            }
            bytes += each;
            n += 1;
        }
        wd::encode_device_keys(&entries[i..i + n], out);
        i += n;
    }
}

/// Appends EVENT_ACK frames acknowledging `events` (as many frames as the server's
/// bounds need; none for no event).
pub fn encode_event_acks(session: &Session, events: &[LogPosition], out: &mut BytesMut) {
    for chunk in events.chunks(per_frame(session, 8)) {
        wd::encode_event_ack(chunk, out);
    }
}

/// Appends OUTCOME frames reporting `entries` (split within the server's bounds).
pub fn encode_outcomes(session: &Session, entries: &[OutcomeEntry], out: &mut BytesMut) {
    for chunk in entries.chunks(per_frame(session, wd::OUTCOME_BYTES)) {
        wd::encode_outcome(chunk, out);
    }
}

/// Appends ONLINE frames saying `recipients` are reachable now.
pub fn encode_online(session: &Session, recipients: &[Recipient], out: &mut BytesMut) {
    for chunk in recipients.chunks(per_frame(session, 1 + wire::RECIPIENT_BYTES_MAX)) {
        wd::encode_online(chunk, out);
    }
}

/// Appends a CREDIT frame granting `credit` more DELIVERs (nothing for 0).
pub fn encode_credit(credit: u32, out: &mut BytesMut) {
    if credit > 0 {
        wd::encode_credit(credit, out);
    }
}

/// A bounded window of ids already handled, to drop copies of at-least-once pushes.
///
/// Holds the last `capacity` ids inserted; an id older than that is forgotten (a copy of
/// it would pass again), which is why `capacity` should cover what can be pushed again:
/// the events unacknowledged at a reconnect, the messages handed and not yet reported.
#[derive(Debug)]
pub struct SeenIds {
    set: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl SeenIds {
    /// An empty window of at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> SeenIds {
        let capacity = capacity.max(1);
        SeenIds {
            set: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    /// Records `id`; true when it was not in the window (the first copy).
    pub fn insert(&mut self, id: u64) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            let old = self.order.pop_front().expect("full");
            self.set.remove(&old);
        }
        self.order.push_back(id);
        debug_assert_eq!(self.set.len(), self.order.len());
        true
    }

    /// Whether `id` is in the window.
    pub fn contains(&self, id: u64) -> bool {
        self.set.contains(&id)
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use courier_pipeline::wire::delivery::{FailReason, Outcome, StatusKind};
    use courier_pipeline::wire::Welcome;
    use courier_pipeline::ShardId;

    fn session(features: u32) -> Session {
        Session::new(Welcome {
            business_id: 1,
            batch_messages_max: 4,
            payload_bytes_max: 100,
            frame_bytes_max: 200,
            features: Some(features),
        })
        .unwrap()
    }

    fn status(i: u64, kind: StatusKind) -> StatusEvent {
        StatusEvent {
            event: LogPosition::new(ShardId::new(0), 100 + i),
            message: LogPosition::new(ShardId::new(0), i),
            client_id: i,
            kind,
            reason: None,
            at_ms: 5,
        }
    }

    fn r(s: &str) -> Recipient {
        Recipient::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_business_stream_yields_statuses_and_replies_in_order_across_reads() {
        let s = session(features::EVENTS);
        let mut bytes = BytesMut::new();
        // More statuses in one frame than the WELCOME's batch bound: the server's push
        // bound is its own, up to EVENTS_PER_FRAME_MAX.
        let six: Vec<StatusEvent> = (0..6).map(|i| status(i, StatusKind::Sent)).collect();
        wd::encode_status(&six, &mut bytes);
        let reply = InboundEvent {
            event: LogPosition::new(ShardId::new(1), 9),
            at_ms: 7,
            sender: r("+4915112345678"),
            payload: Bytes::from_static(b"yes please"),
        };
        wd::encode_inbound_event(&reply, &mut bytes);
        // WELCOME's leftover holds the first 3 bytes; the rest comes byte by byte.
        let mut es = EventStream::new(&s, &bytes[..3]).unwrap();
        assert_eq!(es.role(), StreamRole::Business);
        for b in &bytes[3..] {
            es.handle_data(&[*b]).unwrap();
        }
        assert_eq!(es.poll(), Some(Incoming::Statuses(six.clone())));
        let Some(Incoming::Inbound(got)) = es.poll() else {
            panic!("expected the reply");
        };
        assert_eq!(got, reply);
        assert_eq!(es.poll(), None);
        let events = Incoming::Statuses(six).into_events();
        assert_eq!(events.len(), 6);
        assert_eq!(events[5].event(), LogPosition::new(ShardId::new(0), 105));
    }

    #[test]
    fn each_role_refuses_the_other_roles_frames() {
        let mut d = BytesMut::new();
        wd::encode_deliver(
            &Deliver {
                message: LogPosition::new(ShardId::new(0), 1),
                business_id: 1,
                client_id: 2,
                expires_ms: 3,
                recipient: r("+15550001111"),
                payload: Bytes::from(vec![7u8; 100 + SEAL_OVERHEAD_BYTES]),
                e2e: false,
            },
            &mut d,
        );
        let mut edge = EventStream::new(&session(features::DELIVERY), &d).unwrap();
        assert!(
            matches!(edge.poll(), Some(Incoming::Deliver(x)) if x.client_id == 2),
            "a DELIVER of the largest sealed payload fits the edge's bounds"
        );
        let mut biz = EventStream::new(&session(features::EVENTS), &[]).unwrap();
        let e = biz.handle_data(&d).unwrap_err();
        assert_eq!(e.stop_code(), Some(wire::code::UNEXPECTED_FRAME));
        assert!(biz.is_dead());
        let mut st = BytesMut::new();
        wd::encode_status(&[status(1, StatusKind::Delivered)], &mut st);
        let mut edge = EventStream::new(&session(features::DELIVERY), &[]).unwrap();
        assert!(edge.handle_data(&st).is_err());
        assert!(
            EventStream::new(&session(0), &[]).is_err(),
            "no feature granted"
        );
    }

    #[test]
    fn a_truncated_or_oversized_frame_kills_the_stream() {
        let s = session(features::EVENTS);
        let mut st = BytesMut::new();
        wd::encode_status(&[status(1, StatusKind::Read)], &mut st);
        let mut es = EventStream::new(&s, &st[..10]).unwrap();
        assert!(matches!(es.handle_finish(), SessionError::Wire(_)));
        let mut es = EventStream::new(&s, &[]).unwrap();
        let huge = [0xff, 0xff, 0xff, 0x7f, wire::frame_type::STATUS];
        assert!(es.handle_data(&huge).unwrap_err().stop_code().is_some());
    }

    #[test]
    fn control_frames_are_split_within_the_servers_bounds_and_decode_back() {
        let s = session(features::DELIVERY);
        let limits = WireLimits {
            frame_bytes_max: 200,
            batch_messages_max: 4,
        };
        let decode_all = |bytes: &BytesMut| {
            let mut d = FrameDecoder::new(limits);
            d.push(bytes);
            std::iter::from_fn(|| d.next_frame().unwrap()).collect::<Vec<Frame>>()
        };
        let events: Vec<LogPosition> = (0..9)
            .map(|i| LogPosition::new(ShardId::new(1), i))
            .collect();
        let mut out = BytesMut::new();
        encode_event_acks(&s, &events, &mut out);
        let frames = decode_all(&out);
        assert_eq!(frames.len(), 3, "4 + 4 + 1");
        let acked: Vec<LogPosition> = frames
            .into_iter()
            .flat_map(|f| match f {
                Frame::Delivery(DeliveryFrame::EventAck(e)) => e,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(acked, events);
        let outcomes: Vec<OutcomeEntry> = (0..5)
            .map(|i| OutcomeEntry {
                message: LogPosition::new(ShardId::new(0), i),
                outcome: if i % 2 == 0 {
                    Outcome::Delivered
                } else {
                    Outcome::Failed(FailReason::NotOnPlatform)
                },
            })
            .collect();
        let mut out = BytesMut::new();
        encode_outcomes(&s, &outcomes, &mut out);
        encode_online(&s, &[r("+15550001111"); 5], &mut out);
        encode_credit(0, &mut out);
        encode_credit(64, &mut out);
        let frames = decode_all(&out);
        assert_eq!(frames.len(), 2 + 2 + 1);
        assert_eq!(
            frames[4],
            Frame::Delivery(DeliveryFrame::Credit(64)),
            "no CREDIT frame for 0"
        );
        let mut out = BytesMut::new();
        encode_event_acks(&s, &[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn seen_ids_drop_copies_within_their_window() {
        let mut seen = SeenIds::new(3);
        assert!(seen.insert(1) && seen.insert(2) && seen.insert(3));
        assert!(!seen.insert(2), "a copy");
        assert!(seen.insert(4), "new; 1 leaves the window");
        assert!(!seen.contains(1) && seen.contains(4));
        assert_eq!(seen.len(), 3);
        assert!(seen.insert(1), "forgotten ids pass again");
    }

    #[test]
    fn debug_output_never_shows_content() {
        let mut bytes = BytesMut::new();
        wd::encode_inbound_event(
            &InboundEvent {
                event: LogPosition::new(ShardId::new(1), 9),
                at_ms: 7,
                sender: r("+4915112345678"),
                payload: Bytes::from_static(b"secret reply"),
            },
            &mut bytes,
        );
        let mut es =
            EventStream::new(&session(features::EVENTS), &bytes[..bytes.len() - 2]).unwrap();
        let partial = format!("{es:?}");
        es.handle_data(&bytes[bytes.len() - 2..]).unwrap();
        let text = format!("{partial} {:?} {es:?}", es.poll());
        assert!(
            !text.contains("secret") && !text.contains("4915112345678"),
            "{text}"
        );
    }
}
