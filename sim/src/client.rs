//! The sim client: one quinn-proto client [`Endpoint`] and its [`Connection`], driven
//! sans-IO by the simulation, speaking wire v1 like a well-behaved sender unless a test
//! tells it to misbehave.
//!
//! It owns the client's view of every stream it opened and checks every byte the server
//! sends back: each ACK must answer the oldest unanswered SUBMIT of its stream, with one
//! status per message. A violation of the protocol is a server bug, so it panics, naming
//! the seed. What a message's answers mean for storage (accepted twice, a `duplicate` at
//! another position) is recorded in its [`Ledger`] for the oracle to judge.
//!
//! Flow: handshake, HELLO on the first stream, WELCOME, then `streams` work streams
//! ("lanes"), each pipelining up to `depth` SUBMITs of its planned batches. Every message
//! has an id, a recipient and a payload that are functions of the client and the message
//! number ([`message_id`], [`recipient_for`], [`payload_for`]), so the oracle can check
//! what the log holds. Without `resend` a lane is finished (FIN) after its last planned
//! SUBMIT; with it, throttled messages are sent again after their retry-after, and a lane
//! is finished once every message has a final answer. With `reconnect`, a lost connection
//! is replaced after [`RECONNECT_DELAY`] and the unanswered messages are sent again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use courier_pipeline::cid::ShardCidGenerator;
use courier_pipeline::wire::delivery::{
    self as wire_delivery, features, DeliveryFrame, InboundEntry, StatusKind,
};
use courier_pipeline::wire::{
    self, Frame, FrameDecoder, LogPosition, OutMessage, Reason, Recipient, Status, Welcome,
};
use courier_pipeline::ShardId;

use crate::edge::{Devices, EdgePlan, Reply};
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint,
    EndpointConfig, Event, ReadError, StreamEvent, StreamId, Transmit, VarInt, WriteError,
};

/// The server name the simulated server's certificate is issued for.
pub const SERVER_NAME: &str = "courier.test";
/// How long a client with `reconnect` waits after losing its connection.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// First byte of a sim client's connection IDs (the servers' generator writes a shard id
/// there, so the tag is one). Servers never read it: datagrams to a
/// client are routed by address.
const CLIENT_CID_TAG: ShardId = ShardId::new(0xC1);
/// Bytes read from a stream per call.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Bits of a message id that number the message within its client.
const MESSAGE_NUMBER_BITS: u32 = 40;

/// The client id of message `n` of client `client`.
pub fn message_id(client: usize, n: u64) -> u64 {
    assert!(n < 1 << MESSAGE_NUMBER_BITS);
    ((client as u64) << MESSAGE_NUMBER_BITS) | n
}

/// The recipient of message `n` of client `client` that spreads over `recipients`
/// numbers of its own.
pub fn recipient_for(client: usize, n: u64, recipients: usize) -> Recipient {
    let k = n % recipients.max(1) as u64;
    Recipient::parse(format!("+1{:04}{:07}", client % 10_000, k % 10_000_000).as_bytes())
        .expect("valid E.164")
}

/// The payload of message `id`: `len` bytes, a function of the id.
pub fn payload_for(id: u64, len: usize) -> Vec<u8> {
    let mut x = id ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What one client does.
#[derive(Clone)]
pub struct ClientPlan {
    /// Bearer token sent in HELLO.
    pub token: Vec<u8>,
    /// Send HELLO as soon as the handshake completes; otherwise the test sends it
    /// ([`crate::Sim::client_send_hello`]) or never does.
    pub auto_hello: bool,
    /// Work streams opened after WELCOME.
    pub streams: usize,
    /// SUBMITs planned on each work stream (resends come on top).
    pub batches_per_stream: u64,
    /// SUBMITs a work stream keeps unanswered at most (pipelining depth).
    pub depth: usize,
    /// Messages per SUBMIT.
    pub batch_messages: usize,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// Distinct recipients the messages go to, round robin.
    pub recipients: usize,
    /// Send throttled messages again after their retry-after; keep work streams open until
    /// every message has a final answer.
    pub resend: bool,
    /// Replace a lost connection and send its unanswered messages again.
    pub reconnect: bool,
    /// Send every n-th accepted message once more with its id (0: never); the answer must
    /// be `duplicate` at the same position.
    pub duplicate_every: u64,
    /// Ask for statuses and users' replies (HELLO version 2 with EVENTS), acknowledge
    /// them, and count a message done only once it has its final status.
    pub events: bool,
    /// Be the platform's delivery edge (a platform token): take DELIVERs for simulated
    /// devices, report outcomes, hand over users' replies. Such a client sends no SUBMIT.
    pub edge: Option<EdgePlan>,
    /// Connect from the IP address of client `host` (on a port of its own) instead of
    /// an address of its own: several connections from one address.
    pub host: Option<usize>,
}

impl std::fmt::Debug for ClientPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPlan")
            .field("token", &wire::Token(self.token.clone().into()))
            .field("auto_hello", &self.auto_hello)
            .field("streams", &self.streams)
            .field("batches_per_stream", &self.batches_per_stream)
            .field("depth", &self.depth)
            .field("batch_messages", &self.batch_messages)
            .field("payload_bytes", &self.payload_bytes)
            .field("recipients", &self.recipients)
            .field("resend", &self.resend)
            .field("reconnect", &self.reconnect)
            .field("duplicate_every", &self.duplicate_every)
            .field("events", &self.events)
            .field("edge", &self.edge)
            .field("host", &self.host)
            .finish()
    }
}

impl ClientPlan {
    /// A plan with `token` and modest defaults: 2 streams of 8 batches, depth 4, 16
    /// messages of 32 bytes to one recipient; no resends, no reconnects.
    pub fn new(token: impl Into<Vec<u8>>) -> ClientPlan {
        ClientPlan {
            token: token.into(),
            auto_hello: true,
            streams: 2,
            batches_per_stream: 8,
            depth: 4,
            batch_messages: 16,
            payload_bytes: 32,
            recipients: 1,
            resend: false,
            reconnect: false,
            duplicate_every: 0,
            events: false,
            edge: None,
            host: None,
        }
    }

    /// A plan for the delivery edge with `token` (a platform credential): no SUBMIT,
    /// resends and reconnects on.
    pub fn edge(token: impl Into<Vec<u8>>, plan: EdgePlan) -> ClientPlan {
        ClientPlan {
            streams: 0,
            batches_per_stream: 0,
            resend: true,
            reconnect: true,
            edge: Some(plan),
            ..ClientPlan::new(token)
        }
    }

    /// Batches the plan sends in all, resends not counted.
    pub fn batches_total(&self) -> u64 {
        self.streams as u64 * self.batches_per_stream
    }

    /// Messages the plan sends in all, resends not counted.
    pub fn messages_total(&self) -> u64 {
        self.batches_total() * self.batch_messages as u64
    }
}

/// Where a client's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TLS handshake in progress.
    Handshaking,
    /// Handshake done, no HELLO sent.
    Connected,
    /// HELLO sent, WELCOME not yet received.
    HelloSent,
    /// WELCOME received; SUBMITs may flow.
    Welcomed,
    /// The connection is gone (see [`SimClient::close_reason`]).
    Closed,
}

/// What a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Carries HELLO and WELCOME.
    Hello,
    /// A work stream, by its lane.
    Work(usize),
    /// The edge's stream of INBOUND batches.
    Inbound,
    /// Raw bytes a test wrote.
    Raw,
}

/// The final (or, without `resend`, last) answer for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `accepted` at this position.
    Accepted(LogPosition),
    /// `duplicate`: the id was already stored, at this position.
    Duplicate(LogPosition),
    /// `rejected` for this reason.
    Rejected(Reason),
    /// `throttled` and not sent again (a plan without `resend`).
    Throttled,
}

/// What the client learned about its messages, for the oracle.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Message number → its answer (the first storing answer wins; see `conflicts`).
    pub outcomes: BTreeMap<u64, Outcome>,
    /// Messages answered as stored at two different positions, or `accepted` twice:
    /// (message number, first position, later answer).
    pub conflicts: Vec<(u64, LogPosition, Status)>,
    /// Statuses received, by kind: accepted, duplicate, throttled, rejected.
    pub answers: [u64; 4],
    /// Messages sent again (throttled, unanswered when a connection was lost, or
    /// duplicates on purpose).
    pub resent: u64,
    /// Statuses heard on this connection (any client id of the business: a business's
    /// events go to any of its connections), in the order heard, copies dropped:
    /// (event, client id, status).
    pub heard: Vec<(LogPosition, u64, StatusKind)>,
    /// When each of `heard` was heard, and on which connection (by count).
    pub heard_at: Vec<(Instant, u32)>,
    /// Users' messages heard, by event: sender and content.
    pub inbound: BTreeMap<LogPosition, (Recipient, Bytes)>,
    /// Events heard again (at least once: a copy is acknowledged and dropped).
    pub event_copies: u64,
    events_seen: BTreeSet<LogPosition>,
}

impl Ledger {
    /// The position the log holds message `n` at, as its answers say.
    pub fn stored_at(&self, n: u64) -> Option<LogPosition> {
        match self.outcomes.get(&n)? {
            Outcome::Accepted(p) | Outcome::Duplicate(p) => Some(*p),
            _ => None,
        }
    }

    fn record(&mut self, n: u64, status: Status) {
        let kind = match status {
            Status::Accepted(_) => 0,
            Status::Duplicate(_) => 1,
            Status::Throttled { .. } => 2,
            Status::Rejected(_) => 3,
        };
        self.answers[kind] += 1;
        let stored = match status {
            Status::Accepted(p) | Status::Duplicate(p) => Some(p),
            _ => None,
        };
        match (self.stored_at(n), stored) {
            (Some(first), Some(p)) => {
                // A stored message answers `duplicate` at its position from then on.
                if p != first || matches!(status, Status::Accepted(_)) {
                    self.conflicts.push((n, first, status));
                }
            }
            (Some(_), None) => {} // e.g. a resend throttled while its first copy was stored
            (None, _) => {
                let outcome = match status {
                    Status::Accepted(p) => Outcome::Accepted(p),
                    Status::Duplicate(p) => Outcome::Duplicate(p),
                    Status::Rejected(r) => Outcome::Rejected(r),
                    Status::Throttled { .. } => Outcome::Throttled,
                };
                self.outcomes.insert(n, outcome);
            }
        }
    }
}

/// The client's record of one stream it opened.
#[derive(Debug)]
pub struct ClientStream {
    /// What the stream is for.
    pub kind: StreamKind,
    /// SUBMITs written (work streams).
    pub sent: u64,
    /// ACKs received.
    pub acked: u64,
    /// Batch ids of the ACKs received, in order.
    pub ack_batch_ids: Vec<u64>,
    /// Error code of the server's STOP_SENDING, if it sent one.
    pub stopped: Option<u32>,
    /// Error code of the server's RESET_STREAM, if it sent one.
    pub reset: Option<u32>,
    /// The server finished its half (FIN) and everything before it was read.
    pub fin_received: bool,
    /// No further SUBMIT is written (a test paused it).
    pub paused: bool,
    /// A test broke the stream (wrote raw bytes after the SUBMITs, or stopped reading it);
    /// no further SUBMIT is written.
    pub poisoned: bool,
    /// The client stopped reading it (STOP_SENDING); nothing more will be seen on it.
    pub receive_stopped: bool,
    in_flight: VecDeque<SentBatch>,
    out: BytesMut,
    fin_pending: bool,
    fin_sent: bool,
    decoder: FrameDecoder,
}

impl ClientStream {
    fn new(kind: StreamKind) -> ClientStream {
        ClientStream {
            kind,
            sent: 0,
            acked: 0,
            ack_batch_ids: Vec::new(),
            stopped: None,
            reset: None,
            fin_received: false,
            paused: false,
            poisoned: false,
            receive_stopped: false,
            in_flight: VecDeque::new(),
            out: BytesMut::new(),
            fin_pending: false,
            fin_sent: false,
            decoder: FrameDecoder::new(wire::WireLimits::PERMISSIVE),
        }
    }

    /// SUBMITs written and not answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The stream ended in an error the server signalled.
    pub fn failed(&self) -> bool {
        self.stopped.is_some() || self.reset.is_some()
    }

    /// The server's error code, from RESET_STREAM or else STOP_SENDING.
    pub fn error_code(&self) -> Option<u32> {
        self.reset.or(self.stopped)
    }

    /// The client finished its half (FIN written).
    pub fn finished_sending(&self) -> bool {
        self.fin_sent
    }

    /// Nothing more will happen on it: the server finished it, failed it, or the client
    /// stopped reading it.
    pub fn settled(&self) -> bool {
        self.fin_received || self.failed() || self.receive_stopped
    }
}

/// One work stream's messages, across the client's connections.
#[derive(Debug, Default)]
struct Lane {
    /// Planned batches not sent yet, and batches lost with a connection (message numbers).
    queue: VecDeque<Vec<u64>>,
    /// Messages to send again, and when.
    retries: Vec<(Instant, u64)>,
    /// SUBMITs written on this lane, over every connection (numbers its batch ids).
    batches_sent: u64,
}

impl Lane {
    fn idle(&self) -> bool {
        self.queue.is_empty() && self.retries.is_empty()
    }

    /// The next batch to write at `now`: due resends first.
    fn next_batch(&mut self, now: Instant, batch_messages: usize) -> Option<Vec<u64>> {
        if self.retries.iter().any(|&(at, _)| at <= now) {
            self.retries.sort_unstable();
            let due = self.retries.partition_point(|&(at, _)| at <= now);
            let take = due.min(batch_messages);
            return Some(self.retries.drain(..take).map(|(_, n)| n).collect());
        }
        self.queue.pop_front()
    }
}

/// Something the client saw, reported to the simulation's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientEvent {
    Ack { batch_id: u64, statuses: usize },
    StreamError { stream: u64, code: u32 },
    Closed,
}

/// One client endpoint with its connection (replaced after a loss with `reconnect`).
pub struct SimClient {
    index: usize,
    seed: u64,
    plan: ClientPlan,
    endpoint: Endpoint,
    config: ClientConfig,
    server: SocketAddr,
    ch: ConnectionHandle,
    conn: Option<Connection>,
    phase: Phase,
    welcome: Option<Welcome>,
    business_id: Option<u32>,
    close_reason: Option<ConnectionError>,
    closed_at: Option<Instant>,
    connections: u32,
    reconnect_at: Option<Instant>,
    /// When the client was last driven: resends due by then wait for room on their
    /// stream (an ACK or a WELCOME drives the client again), not for a timer.
    driven_at: Option<Instant>,
    hello_stream: Option<StreamId>,
    /// HELLO is to be written once the server grants a stream.
    hello_wanted: bool,
    /// The current stream of each lane.
    work: Vec<StreamId>,
    lanes: Vec<Lane>,
    streams: BTreeMap<StreamId, ClientStream>,
    /// Streams of connections before this one.
    past_streams: Vec<ClientStream>,
    accepted: BTreeMap<u64, LogPosition>,
    not_accepted: u64,
    ledger: Ledger,
    /// Events to acknowledge (EVENT_ACK on the HELLO stream).
    acks_owed: Vec<LogPosition>,
    /// The edge's devices (an edge client only).
    devices: Option<Devices>,
    /// DELIVERs taken since the last CREDIT frame (granted back).
    credit_owed: u32,
    /// The edge's replies waiting to be handed over, and the next reply id.
    replies: VecDeque<(u64, Reply)>,
    next_reply: u64,
    /// INBOUND batches written and not answered, in order.
    inbound_in_flight: VecDeque<Vec<(u64, Reply)>>,
    /// No INBOUND is written before this (after a reply came back not stored).
    replies_hold_until: Option<Instant>,
    pub(crate) events: Vec<ClientEvent>,
}

impl std::fmt::Debug for SimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimClient")
            .field("index", &self.index)
            .field("phase", &self.phase)
            .field("close_reason", &self.close_reason)
            .field("connections", &self.connections)
            .field("streams", &self.streams.len())
            .field("accepted", &self.accepted.len())
            .field("answers", &self.ledger.answers)
            .field(
                "lanes",
                &self
                    .lanes
                    .iter()
                    .map(|l| {
                        (
                            l.queue.len(),
                            l.retries.len(),
                            l.retries
                                .iter()
                                .map(|r| r.0)
                                .min()
                                .map(|t| self.driven_at.map(|d| t.saturating_duration_since(d))),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .field(
                "work",
                &self
                    .work
                    .iter()
                    .map(|id| {
                        let s = &self.streams[id];
                        (
                            s.sent,
                            s.acked,
                            s.in_flight.len(),
                            s.fin_sent,
                            s.fin_received,
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Batch ids carry who sent them: `client:16 | work stream:16 | seq:32`.
pub fn batch_id(client: usize, stream: usize, seq: u64) -> u64 {
    assert!(client < 1 << 16 && stream < 1 << 16 && seq < 1 << 32);
    ((client as u64) << 48) | ((stream as u64) << 32) | seq
}

/// The `(client, work stream)` key of a batch id made by [`batch_id`].
pub fn batch_stream_key(batch_id: u64) -> u32 {
    (batch_id >> 32) as u32
}

impl SimClient {
    pub(crate) fn new(
        index: usize,
        seed: u64,
        plan: ClientPlan,
        endpoint_seed: [u8; 32],
        config: ClientConfig,
        server: SocketAddr,
        now: Instant,
    ) -> SimClient {
        assert!(plan.depth > 0 && plan.batch_messages > 0 && plan.payload_bytes > 0);
        let devices = plan
            .edge
            .clone()
            .map(|e| Devices::new(e, seed ^ (index as u64).wrapping_mul(0x9e37_79b9)));
        let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &endpoint_seed);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        endpoint_config
            .cid_generator(move || Box::new(ShardCidGenerator::new(CLIENT_CID_TAG, endpoint_seed)));
        let mut endpoint =
            Endpoint::new(Arc::new(endpoint_config), None, true, Some(endpoint_seed));
        let (ch, conn) = endpoint
            .connect(now, config.clone(), server, SERVER_NAME)
            .expect("a client config with a valid server name connects");
        let per = plan.batch_messages as u64;
        let lanes = (0..plan.streams)
            .map(|k| {
                let first = k as u64 * plan.batches_per_stream;
                Lane {
                    queue: (first..first + plan.batches_per_stream)
                        .map(|b| (b * per..(b + 1) * per).collect())
                        .collect(),
                    ..Lane::default()
                }
            })
            .collect();
        SimClient {
            index,
            seed,
            plan,
            endpoint,
            config,
            server,
            ch,
            conn: Some(conn),
            phase: Phase::Handshaking,
            welcome: None,
            business_id: None,
            close_reason: None,
            closed_at: None,
            connections: 1,
            reconnect_at: None,
            driven_at: None,
            hello_stream: None,
            hello_wanted: false,
            work: Vec::new(),
            lanes,
            streams: BTreeMap::new(),
            past_streams: Vec::new(),
            accepted: BTreeMap::new(),
            not_accepted: 0,
            ledger: Ledger::default(),
            acks_owed: Vec::new(),
            devices,
            credit_owed: 0,
            replies: VecDeque::new(),
            next_reply: 0,
            inbound_in_flight: VecDeque::new(),
            replies_hold_until: None,
            events: Vec::new(),
        }
    }

    /// What the edge did (an edge client only).
    pub fn devices(&self) -> Option<&Devices> {
        self.devices.as_ref()
    }

    /// This client's index in the simulation.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its plan.
    pub fn plan(&self) -> &ClientPlan {
        &self.plan
    }

    /// Where its connection stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The WELCOME it received (on its current connection).
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The business its token authenticated as (known after the first WELCOME).
    pub fn business_id(&self) -> Option<u32> {
        self.business_id
    }

    /// Why the last connection ended, once it has.
    pub fn close_reason(&self) -> Option<&ConnectionError> {
        self.close_reason.as_ref()
    }

    /// When the last connection ended (virtual time).
    pub fn closed_at(&self) -> Option<Instant> {
        self.closed_at
    }

    /// Connections made so far (1 plus reconnects).
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// The application error code the server closed the connection with, if it did.
    pub fn close_code(&self) -> Option<u64> {
        match &self.close_reason {
            Some(ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }

    /// Every message answered `accepted`: client message id → log position.
    pub fn accepted(&self) -> &BTreeMap<u64, LogPosition> {
        &self.accepted
    }

    /// Statuses received that were not `accepted`.
    pub fn not_accepted(&self) -> u64 {
        self.not_accepted
    }

    /// What the client learned about each of its messages.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Every stream the current connection opened.
    pub fn streams(&self) -> &BTreeMap<StreamId, ClientStream> {
        &self.streams
    }

    /// One stream's record.
    pub fn stream(&self, id: StreamId) -> &ClientStream {
        &self.streams[&id]
    }

    /// Work streams of the current connection, by lane.
    pub fn work_streams(&self) -> &[StreamId] {
        &self.work
    }

    /// The work stream of lane `index`.
    pub fn work_stream(&self, index: usize) -> &ClientStream {
        &self.streams[&self.work[index]]
    }

    /// The stream HELLO went on.
    pub fn hello_stream(&self) -> Option<StreamId> {
        self.hello_stream
    }

    /// ACKs received on work streams, every connection counted.
    pub fn batches_acked(&self) -> u64 {
        let past = self.past_streams.iter();
        let now = self.work.iter().map(|id| &self.streams[id]);
        past.chain(now)
            .filter(|s| matches!(s.kind, StreamKind::Work(_)))
            .map(|s| s.acked)
            .sum()
    }

    /// Every lane sent its messages and got every answer, and the server finished each
    /// work stream. Stays true if the connection later closes (an idle timeout, say).
    pub fn done(&self) -> bool {
        self.welcome.is_some()
            && self.work.len() == self.plan.streams
            && self.lanes.iter().all(Lane::idle)
            && self.work.iter().all(|id| {
                let s = &self.streams[id];
                s.in_flight.is_empty() && s.fin_received
            })
            && self.replies.is_empty()
            && self.inbound_in_flight.is_empty()
    }

    /// Nothing more will happen on its own: done, closed for good, or every work stream
    /// ended.
    pub fn settled(&self) -> bool {
        self.done()
            || (self.phase == Phase::Closed && self.reconnect_at.is_none())
            || (self.work.len() == self.plan.streams
                && self.work.iter().all(|id| self.streams[id].settled()))
    }

    /// SUBMITs written and not answered on the current connection.
    pub fn unanswered(&self) -> usize {
        self.streams.values().map(|s| s.in_flight.len()).sum()
    }

    // ---- driven by the simulation -------------------------------------------------------

    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        let online = self.devices.as_ref().and_then(Devices::next_online);
        let conn = self.conn.as_mut().and_then(|c| c.poll_timeout());
        let driven = self.driven_at;
        let retry = self
            .lanes
            .iter()
            .flat_map(|l| l.retries.iter().map(|&(at, _)| at))
            .filter(|&at| driven.is_none_or(|d| at > d))
            .min()
            .filter(|_| self.phase == Phase::Welcomed);
        let hold = self.replies_hold_until.filter(|_| !self.replies.is_empty());
        [conn, retry, self.reconnect_at, online, hold]
            .into_iter()
            .flatten()
            .min()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(conn) = self.conn.as_mut() {
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
        }
        if self.reconnect_at.is_some_and(|t| t <= now) && self.conn.is_none() {
            self.reconnect(now);
        }
        if let Some(d) = self.devices.as_mut() {
            d.tick(now);
        }
        if self.replies_hold_until.is_some_and(|t| t <= now) {
            self.replies_hold_until = None;
        }
        self.drive(now);
    }

    /// Feeds one datagram from `remote`; answers the endpoint produced go to `out`.
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        data: BytesMut,
        out: &mut Vec<(Transmit, Vec<u8>)>,
    ) {
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, None, None, data, &mut buf)
        {
            // Events of a connection already replaced are dropped with it.
            Some(DatagramEvent::ConnectionEvent(ch, ev)) if ch == self.ch => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.handle_event(ev);
                }
            }
            Some(DatagramEvent::ConnectionEvent(..)) => {}
            Some(DatagramEvent::Response(t)) => {
                let bytes = buf[..t.size].to_vec();
                out.push((t, bytes));
            }
            // A client endpoint has no server config: it never accepts.
            Some(DatagramEvent::NewConnection(_)) => unreachable!("client endpoint accepted"),
            None => {}
        }
        self.drive(now);
    }

    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        buf.clear();
        self.conn.as_mut()?.poll_transmit(now, max_datagrams, buf)
    }

    /// Drives the connection until it has nothing more to say: endpoint events, app events,
    /// then the client's own logic (read, submit, flush).
    pub(crate) fn drive(&mut self, now: Instant) {
        self.driven_at = Some(now);
        // Bounded: every pass consumes events produced from finite input, and the app logic
        // writes at most `depth` SUBMITs per stream per pass.
        for _ in 0..10_000 {
            let mut progressed = false;
            // App events first: a connection's last events (ConnectionLost) come before the
            // endpoint event that drains it.
            while let Some(ev) = self.conn.as_mut().and_then(Connection::poll) {
                progressed = true;
                self.on_event(ev, now);
            }
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            while let Some(ev) = conn.poll_endpoint_events() {
                progressed = true;
                let drained = ev.is_drained();
                if let Some(back) = self.endpoint.handle_event(self.ch, ev) {
                    conn.handle_event(back);
                }
                if drained {
                    self.conn = None;
                    self.phase = Phase::Closed;
                    return;
                }
            }
            if self.pump_streams(now) {
                progressed = true;
            }
            if !progressed {
                return;
            }
        }
        panic!("seed {}: client {} never quiesced", self.seed, self.index);
    }

    fn on_event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Connected => {
                self.phase = Phase::Connected;
                if self.plan.auto_hello {
                    self.send_hello();
                }
            }
            Event::ConnectionLost { reason } => {
                self.phase = Phase::Closed;
                self.closed_at = Some(now);
                self.close_reason = Some(reason);
                self.events.push(ClientEvent::Closed);
                if self.plan.reconnect {
                    self.requeue_unanswered();
                    self.reconnect_at = Some(now + RECONNECT_DELAY);
                }
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read_stream(id, now),
            Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                let code = u32::try_from(error_code.into_inner()).expect("wire codes fit u32");
                if let Some(st) = self.streams.get_mut(&id) {
                    st.stopped = Some(code);
                    st.out.clear();
                    st.fin_pending = false;
                }
                self.events.push(ClientEvent::StreamError {
                    stream: id.index(),
                    code,
                });
                // RFC 9000 3.5: a STOP_SENDING is answered with RESET_STREAM.
                if let Some(conn) = self.conn.as_mut() {
                    let _ = conn.send_stream(id).reset(error_code);
                }
            }
            Event::Stream(StreamEvent::Writable { .. })
            | Event::Stream(StreamEvent::Available { .. })
            | Event::Stream(StreamEvent::Finished { .. }) => {
                // pump_streams flushes, opens and finishes after every event.
            }
            Event::Stream(StreamEvent::Opened { .. }) => {
                panic!("seed {}: the server opened a stream", self.seed)
            }
            Event::HandshakeDataReady | Event::DatagramReceived | Event::DatagramsUnblocked => {}
        }
    }

    /// The connection is lost: every SUBMIT it left unanswered goes back to its lane, to
    /// be sent again (same ids) on the next connection.
    fn requeue_unanswered(&mut self) {
        for batch in self.inbound_in_flight.drain(..).rev() {
            for r in batch.into_iter().rev() {
                self.replies.push_front(r);
            }
        }
        self.acks_owed.clear();
        for st in self.streams.values_mut() {
            let StreamKind::Work(lane) = st.kind else {
                continue;
            };
            for sent in st.in_flight.drain(..).rev() {
                self.ledger.resent += sent.messages.len() as u64;
                self.lanes[lane].queue.push_front(sent.messages);
            }
        }
    }

    /// A fresh connection from the same endpoint, after the last one drained.
    fn reconnect(&mut self, now: Instant) {
        self.reconnect_at = None;
        let (ch, conn) = self
            .endpoint
            .connect(now, self.config.clone(), self.server, SERVER_NAME)
            .expect("a client config with a valid server name connects");
        self.ch = ch;
        self.conn = Some(conn);
        self.connections += 1;
        self.phase = Phase::Handshaking;
        self.welcome = None;
        self.hello_stream = None;
        self.hello_wanted = false;
        self.work.clear();
        self.past_streams
            .extend(std::mem::take(&mut self.streams).into_values());
    }

    /// Opens work streams, writes SUBMITs, flushes and finishes. True if anything moved.
    fn pump_streams(&mut self, now: Instant) -> bool {
        let mut progressed = false;
        if self.hello_wanted {
            self.send_hello();
            progressed = !self.hello_wanted;
        }
        let Some(conn) = self.conn.as_mut() else {
            return progressed;
        };
        if self.phase == Phase::Welcomed {
            while self.work.len() < self.plan.streams {
                let Some(id) = conn.streams().open(Dir::Bi) else {
                    break; // no stream credit yet; StreamEvent::Available wakes us
                };
                let lane = self.work.len();
                self.work.push(id);
                self.streams
                    .insert(id, ClientStream::new(StreamKind::Work(lane)));
                progressed = true;
            }
        }
        if self.phase == Phase::Welcomed {
            progressed |= self.write_delivery_frames();
        }
        let Some(conn) = self.conn.as_mut() else {
            return progressed;
        };
        for (&id, st) in self.streams.iter_mut() {
            if let StreamKind::Work(lane) = st.kind {
                progressed |=
                    write_submits(&self.plan, self.index, lane, &mut self.lanes[lane], st, now);
            }
            while !st.out.is_empty() {
                match conn.send_stream(id).write(&st.out) {
                    Ok(n) => {
                        let _ = st.out.split_to(n);
                        progressed = true;
                    }
                    Err(WriteError::Blocked) => break,
                    Err(WriteError::Stopped(code)) => {
                        st.stopped = Some(code.into_inner() as u32);
                        st.out.clear();
                        st.fin_pending = false;
                    }
                    Err(WriteError::ClosedStream) => {
                        st.out.clear();
                        st.fin_pending = false;
                    }
                }
            }
            if st.fin_pending && st.out.is_empty() && !st.fin_sent {
                st.fin_pending = false;
                st.fin_sent = true;
                let _ = conn.send_stream(id).finish();
                progressed = true;
            }
        }
        progressed
    }

    fn read_stream(&mut self, id: StreamId, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        let mut recv = conn.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return; // already finished or reset, and recorded then
        };
        // Bounded by the stream's receive window: each chunk consumes buffered data.
        loop {
            match chunks.next(READ_CHUNK_BYTES_MAX) {
                Ok(Some(chunk)) => st.decoder.push_bytes(chunk.bytes),
                Ok(None) => {
                    st.fin_received = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(code)) => {
                    let code = u32::try_from(code.into_inner()).expect("wire codes fit u32");
                    st.reset = Some(code);
                    self.events.push(ClientEvent::StreamError {
                        stream: id.index(),
                        code,
                    });
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        self.decode_frames(id, now);
    }

    fn decode_frames(&mut self, id: StreamId, now: Instant) {
        let seed = self.seed;
        // Bounded: each pass consumes one frame of the buffered bytes.
        loop {
            let st = self.streams.get_mut(&id).expect("caller checked");
            let frame = match st.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!("seed {seed}: server sent an undecodable frame on {id}: {e}"),
            };
            match (frame, st.kind) {
                (Frame::Welcome(w), StreamKind::Hello) => {
                    assert!(
                        self.welcome.is_none(),
                        "seed {seed}: a second WELCOME on {id}"
                    );
                    if let Some(b) = self.business_id {
                        assert_eq!(b, w.business_id, "seed {seed}: the business changed");
                    }
                    self.business_id = Some(w.business_id);
                    self.welcome = Some(w);
                    if self.phase == Phase::HelloSent {
                        self.phase = Phase::Welcomed;
                    }
                }
                (Frame::Ack { batch_id, statuses }, kind) => {
                    st.acked += 1;
                    st.ack_batch_ids.push(batch_id);
                    self.events.push(ClientEvent::Ack {
                        batch_id,
                        statuses: statuses.len(),
                    });
                    self.not_accepted += statuses
                        .iter()
                        .filter(|s| !matches!(s, Status::Accepted(_)))
                        .count() as u64;
                    if kind == StreamKind::Inbound {
                        let Some(batch) = self.inbound_in_flight.pop_front() else {
                            panic!("seed {seed}: ACK {batch_id:#x} answers no INBOUND");
                        };
                        assert_eq!(batch.len(), statuses.len(), "seed {seed}: INBOUND ACK");
                        self.on_inbound_answers(batch, &statuses, now);
                        continue;
                    }
                    let StreamKind::Work(lane) = kind else {
                        continue; // raw SUBMITs: their message ids are the test's business
                    };
                    let Some(sent) = st.in_flight.pop_front() else {
                        panic!("seed {seed}: ACK {batch_id:#x} on {id} answers no SUBMIT");
                    };
                    assert_eq!(
                        batch_id, sent.batch_id,
                        "seed {seed}: ACK on {id} out of SUBMIT order"
                    );
                    assert_eq!(
                        statuses.len(),
                        sent.messages.len(),
                        "seed {seed}: ACK {batch_id:#x} has the wrong number of statuses"
                    );
                    for (&n, status) in sent.messages.iter().zip(&statuses) {
                        self.on_answer(lane, n, *status, now);
                    }
                }
                (Frame::Delivery(f), StreamKind::Hello) => self.on_delivery_frame(f, now),
                (frame, kind) => panic!(
                    "seed {seed}: unexpected {} frame on a {kind:?} stream {id}",
                    frame_name(&frame)
                ),
            }
        }
    }

    /// A frame of delivery on the HELLO stream: events for a business, DELIVERs for the
    /// edge.
    fn on_delivery_frame(&mut self, f: DeliveryFrame, now: Instant) {
        let seed = self.seed;
        match f {
            DeliveryFrame::Status(events) => {
                assert!(self.plan.events, "seed {seed}: STATUS without EVENTS");
                for e in events {
                    self.acks_owed.push(e.event);
                    if !self.ledger.events_seen.insert(e.event) {
                        self.ledger.event_copies += 1;
                        continue;
                    }
                    self.ledger.heard.push((e.event, e.client_id, e.kind));
                    self.ledger.heard_at.push((now, self.connections));
                }
            }
            DeliveryFrame::InboundEvent(e) => {
                assert!(
                    self.plan.events,
                    "seed {seed}: INBOUND_EVENT without EVENTS"
                );
                self.acks_owed.push(e.event);
                if self.ledger.events_seen.insert(e.event) {
                    self.ledger.inbound.insert(e.event, (e.sender, e.payload));
                } else {
                    self.ledger.event_copies += 1;
                }
            }
            DeliveryFrame::Deliver(d) => {
                let devices = self
                    .devices
                    .as_mut()
                    .unwrap_or_else(|| panic!("seed {seed}: DELIVER to a business"));
                devices.deliver(now, d);
                self.credit_owed += 1;
            }
            other => panic!("seed {seed}: the server sent {other:?}"),
        }
    }

    /// The relay answered an INBOUND batch: accepted (or duplicate: an earlier copy was
    /// stored) replies are done, throttled ones go again, rejected ones are counted.
    fn on_inbound_answers(&mut self, batch: Vec<(u64, Reply)>, statuses: &[Status], now: Instant) {
        let devices = self.devices.as_mut().expect("an edge client");
        for ((id, reply), status) in batch.into_iter().zip(statuses) {
            match *status {
                Status::Accepted(p) | Status::Duplicate(p) => {
                    let old = devices.ledger.replies_accepted.insert(p, reply);
                    assert!(
                        old.is_none_or(|o| o == devices.ledger.replies_accepted[&p]),
                        "seed {}: two replies stored at {p:?}",
                        self.seed
                    );
                }
                // Not stored now; the edge keeps the reply and hands it over again (with
                // its id: if the record survived after all, the answer is `duplicate`).
                Status::Throttled { .. }
                | Status::Rejected(Reason::StorageUnavailable | Reason::ShuttingDown) => {
                    self.replies.push_back((id, reply));
                    self.replies_hold_until = Some(now + RECONNECT_DELAY);
                }
                Status::Rejected(_) => devices.ledger.replies_refused += 1,
            }
        }
    }

    /// Writes what an events client or the edge owes on the HELLO stream (EVENT_ACK;
    /// OUTCOME, ONLINE, CREDIT) and the edge's INBOUND batches. True if anything moved.
    fn write_delivery_frames(&mut self) -> bool {
        let mut progressed = false;
        if let Some(d) = self.devices.as_mut() {
            for r in d.replies.drain(..) {
                self.replies.push_back((self.next_reply, r));
                self.next_reply += 1;
            }
        }
        let Some(hello) = self.hello_stream else {
            return false;
        };
        let st = self.streams.get_mut(&hello).expect("the HELLO stream");
        if !self.acks_owed.is_empty() {
            wire_delivery::encode_event_ack(&std::mem::take(&mut self.acks_owed), &mut st.out);
            progressed = true;
        }
        if let Some(d) = self.devices.as_mut() {
            if !d.outcomes.is_empty() {
                wire_delivery::encode_outcome(&std::mem::take(&mut d.outcomes), &mut st.out);
                progressed = true;
            }
            if !d.online.is_empty() {
                wire_delivery::encode_online(&std::mem::take(&mut d.online), &mut st.out);
                progressed = true;
            }
            if self.credit_owed > 0 {
                wire_delivery::encode_credit(std::mem::take(&mut self.credit_owed), &mut st.out);
                progressed = true;
            }
        }
        progressed | self.write_inbound()
    }

    /// The edge hands over up to `depth` batches of replies on its INBOUND stream.
    fn write_inbound(&mut self) -> bool {
        let Some(business_batch) = self.devices.as_ref().map(|_| self.plan.batch_messages) else {
            return false;
        };
        if self.replies.is_empty() || self.inbound_in_flight.len() >= self.plan.depth {
            return false;
        }
        if self.replies_hold_until.is_some() {
            return false;
        }
        let id = match self
            .streams
            .iter()
            .find(|(_, s)| s.kind == StreamKind::Inbound && !s.failed())
        {
            Some((&id, _)) => id,
            None => {
                let Some(id) = self.conn.as_mut().and_then(|c| c.streams().open(Dir::Bi)) else {
                    return false;
                };
                self.streams
                    .insert(id, ClientStream::new(StreamKind::Inbound));
                id
            }
        };
        let mut progressed = false;
        while !self.replies.is_empty() && self.inbound_in_flight.len() < self.plan.depth {
            let n = self.replies.len().min(business_batch);
            let batch: Vec<(u64, Reply)> = self.replies.drain(..n).collect();
            let entries: Vec<InboundEntry> = batch
                .iter()
                .map(|(rid, r)| InboundEntry {
                    id: *rid,
                    business_id: r.business_id,
                    sender: r.sender,
                    payload: r.payload.clone(),
                })
                .collect();
            let st = self.streams.get_mut(&id).expect("just found");
            wire_delivery::encode_inbound(st.sent, &entries, &mut st.out);
            st.sent += 1;
            self.inbound_in_flight.push_back(batch);
            progressed = true;
        }
        progressed
    }

    /// Message `n` of `lane` got `status`.
    fn on_answer(&mut self, lane: usize, n: u64, status: Status, now: Instant) {
        let first_accept =
            matches!(status, Status::Accepted(_)) && self.ledger.stored_at(n).is_none();
        self.ledger.record(n, status);
        match status {
            Status::Accepted(p) if first_accept => {
                self.accepted.insert(message_id(self.index, n), p);
                if self.plan.duplicate_every > 0 && n.is_multiple_of(self.plan.duplicate_every) {
                    self.ledger.resent += 1;
                    self.lanes[lane].retries.push((now, n));
                }
            }
            Status::Throttled { retry_after_ms } if self.plan.resend => {
                self.ledger.resent += 1;
                let at = now + Duration::from_millis(u64::from(retry_after_ms));
                self.lanes[lane].retries.push((at, n));
            }
            _ => {}
        }
    }

    // ---- actions a test takes (through the simulation, which then pumps the client) -----

    /// Opens a stream and writes HELLO with the plan's token.
    /// Without stream credit (before HELLO the server grants one stream, and a failed
    /// one's credit comes back only once both halves are closed) it is written as soon as
    /// credit arrives.
    pub(crate) fn send_hello(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some(id) = conn.streams().open(Dir::Bi) else {
            self.hello_wanted = true;
            return;
        };
        self.hello_wanted = false;
        let mut st = ClientStream::new(StreamKind::Hello);
        let asked = match (&self.plan.edge, self.plan.events) {
            (Some(_), _) => features::DELIVERY,
            (None, true) => features::EVENTS,
            (None, false) => 0,
        };
        if asked == 0 {
            wire::encode_hello(&self.plan.token, &mut st.out);
        } else {
            wire::encode_hello_features(&self.plan.token, asked, &mut st.out);
        }
        if let Some(e) = &self.plan.edge {
            wire_delivery::encode_credit(e.credit, &mut st.out);
            self.credit_owed = 0;
        }
        self.streams.insert(id, st);
        self.hello_stream = Some(id);
        if self.phase == Phase::Connected {
            self.phase = Phase::HelloSent;
        }
    }

    /// Opens a stream and writes `bytes` to it, then finishes it if `fin`. `None` when the
    /// server has not granted stream credit.
    pub(crate) fn open_raw(&mut self, bytes: &[u8], fin: bool) -> Option<StreamId> {
        let id = self.conn.as_mut()?.streams().open(Dir::Bi)?;
        let mut st = ClientStream::new(StreamKind::Raw);
        st.out.extend_from_slice(bytes);
        st.fin_pending = fin;
        self.streams.insert(id, st);
        Some(id)
    }

    /// Writes `bytes` to an open stream after what it already queued; a work stream writes
    /// no SUBMIT after them.
    pub(crate) fn inject(&mut self, id: StreamId, bytes: &[u8], fin: bool) {
        let st = self
            .streams
            .get_mut(&id)
            .expect("the client opened this stream");
        assert!(!st.fin_sent, "stream {id} is already finished");
        st.poisoned = true;
        st.out.extend_from_slice(bytes);
        st.fin_pending = fin;
    }

    /// Stops or resumes writing SUBMITs on a work stream.
    pub(crate) fn pause(&mut self, work_index: usize, paused: bool) {
        let id = self.work[work_index];
        self.streams.get_mut(&id).expect("work stream").paused = paused;
    }

    /// Sends a PING: an ACK-eliciting packet, from whatever address the network now gives
    /// the client.
    pub(crate) fn ping(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.ping();
        }
    }

    /// Tells the server this client wants no more data on `id` (STOP_SENDING).
    pub(crate) fn stop_receiving(&mut self, id: StreamId, code: u32) {
        let st = self
            .streams
            .get_mut(&id)
            .expect("the client opened this stream");
        st.receive_stopped = true;
        st.poisoned = true;
        if let Some(conn) = self.conn.as_mut() {
            let _ = conn.recv_stream(id).stop(VarInt::from_u32(code));
        }
    }
}

/// Writes the SUBMITs a lane's stream may send now. True if any was written.
fn write_submits(
    plan: &ClientPlan,
    client: usize,
    lane_index: usize,
    lane: &mut Lane,
    st: &mut ClientStream,
    now: Instant,
) -> bool {
    let mut progressed = false;
    while !st.paused
        && !st.poisoned
        && !st.failed()
        && !st.fin_sent
        && !st.fin_pending
        && st.in_flight.len() < plan.depth
    {
        let Some(messages) = lane.next_batch(now, plan.batch_messages) else {
            break;
        };
        let batch = batch_id(client, lane_index, lane.batches_sent);
        lane.batches_sent += 1;
        let specs: Vec<(u64, Recipient, Vec<u8>)> = messages
            .iter()
            .map(|&n| {
                let id = message_id(client, n);
                let to = recipient_for(client, n, plan.recipients);
                (id, to, payload_for(id, plan.payload_bytes))
            })
            .collect();
        let out: Vec<OutMessage<'_>> = specs
            .iter()
            .map(|(id, to, payload)| OutMessage {
                client_id: *id,
                recipient: to,
                payload,
            })
            .collect();
        wire::encode_submit(batch, &out, &mut st.out);
        st.in_flight.push_back(SentBatch {
            batch_id: batch,
            messages,
        });
        st.sent += 1;
        // Without resends a lane ends with its last planned SUBMIT.
        if !plan.resend && lane.idle() {
            st.fin_pending = true;
        }
        progressed = true;
    }
    // With resends a lane ends once every message has its final answer.
    if plan.resend && lane.idle() && st.in_flight.is_empty() && !st.fin_sent && !st.fin_pending {
        st.fin_pending = true;
        progressed = true;
    }
    progressed
}

/// One SUBMIT written on a work stream and not yet answered.
#[derive(Debug, Clone)]
struct SentBatch {
    batch_id: u64,
    /// Its messages' numbers, in order.
    messages: Vec<u64>,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "HELLO",
        Frame::Submit { .. } => "SUBMIT",
        Frame::Report { .. } => "REPORT",
        Frame::Welcome(_) => "WELCOME",
        Frame::Ack { .. } => "ACK",
        Frame::Delivery(f) => match f {
            DeliveryFrame::SubmitTtl { .. } => "SUBMIT_TTL",
            DeliveryFrame::EventAck(_) => "EVENT_ACK",
            DeliveryFrame::Status(_) => "STATUS",
            DeliveryFrame::InboundEvent(_) => "INBOUND_EVENT",
            DeliveryFrame::Credit(_) => "CREDIT",
            DeliveryFrame::Outcome(_) => "OUTCOME",
            DeliveryFrame::Online(_) => "ONLINE",
            DeliveryFrame::Inbound { .. } => "INBOUND",
            DeliveryFrame::Deliver(d) if d.e2e => "DELIVER_E2E",
            DeliveryFrame::Deliver(_) => "DELIVER",
            DeliveryFrame::KeysWanted(_) => "KEYS_WANTED",
            DeliveryFrame::BusinessKeys(_) => "BUSINESS_KEYS",
            DeliveryFrame::DeviceKeys(_) => "DEVICE_KEYS",
        },
    }
}
