//! The sim client: one quinn-proto client [`Endpoint`] and its [`Connection`], driven
//! sans-IO by the simulation, speaking wire v1 like a well-behaved sender unless a test
//! tells it to misbehave.
//!
//! It owns the client's view of every stream it opened and checks every byte the server
//! sends back: each ACK must answer the oldest unanswered SUBMIT of its stream, with one
//! status per message. A violation is a server bug, so it panics, naming the seed.
//!
//! Flow of a well-behaved client: handshake, HELLO on the first stream, WELCOME, then
//! `streams` work streams, each pipelining up to `depth` SUBMITs, finished (FIN) after its
//! last one; a work stream is done when every SUBMIT has its ACK and the server finished
//! its half.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint,
    EndpointConfig, Event, ReadError, StreamEvent, StreamId, Transmit, VarInt, WriteError,
};

use crate::cid::ShardCidGenerator;
use crate::wire::{self, Frame, FrameDecoder, LogPosition, OutMessage, Recipient, Status, Welcome};

/// The server name the simulated server's certificate is issued for.
pub const SERVER_NAME: &str = "courier.test";

/// First byte of a sim client's connection IDs. Servers never read it: datagrams to a
/// client are routed by address.
const CLIENT_CID_TAG: u8 = 0xC1;
/// Bytes read from a stream per call.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// What one client does.
#[derive(Clone)]
pub struct ClientPlan {
    /// Bearer token sent in HELLO.
    pub token: Vec<u8>,
    /// Send HELLO as soon as the handshake completes; otherwise the test sends it
    /// ([`crate::sim::Sim::client_send_hello`]) or never does.
    pub auto_hello: bool,
    /// Work streams opened after WELCOME.
    pub streams: usize,
    /// SUBMITs sent on each work stream.
    pub batches_per_stream: u64,
    /// SUBMITs a work stream keeps unanswered at most (pipelining depth).
    pub depth: usize,
    /// Messages per SUBMIT.
    pub batch_messages: usize,
    /// Payload bytes per message.
    pub payload_bytes: usize,
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
            .finish()
    }
}

impl ClientPlan {
    /// A plan with `token` and modest defaults: 2 streams of 8 batches, depth 4, 16
    /// messages of 32 bytes.
    pub fn new(token: impl Into<Vec<u8>>) -> ClientPlan {
        ClientPlan {
            token: token.into(),
            auto_hello: true,
            streams: 2,
            batches_per_stream: 8,
            depth: 4,
            batch_messages: 16,
            payload_bytes: 32,
        }
    }

    /// Batches the plan sends in all.
    pub fn batches_total(&self) -> u64 {
        self.streams as u64 * self.batches_per_stream
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
    /// A work stream, by its index in opening order.
    Work(usize),
    /// Raw bytes a test wrote.
    Raw,
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

/// Something the client saw, reported to the simulation's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientEvent {
    Ack { batch_id: u64, statuses: usize },
    StreamError { stream: u64, code: u32 },
    Closed,
}

/// One client endpoint with one connection.
pub struct SimClient {
    index: usize,
    seed: u64,
    plan: ClientPlan,
    endpoint: Endpoint,
    ch: ConnectionHandle,
    conn: Option<Connection>,
    phase: Phase,
    welcome: Option<Welcome>,
    close_reason: Option<ConnectionError>,
    closed_at: Option<Instant>,
    hello_stream: Option<StreamId>,
    work: Vec<StreamId>,
    streams: BTreeMap<StreamId, ClientStream>,
    accepted: BTreeMap<u64, LogPosition>,
    not_accepted: u64,
    next_message: u64,
    recipient: Recipient,
    payload: Vec<u8>,
    pub(crate) events: Vec<ClientEvent>,
}

impl std::fmt::Debug for SimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimClient")
            .field("index", &self.index)
            .field("phase", &self.phase)
            .field("close_reason", &self.close_reason)
            .field("streams", &self.streams.len())
            .field("accepted", &self.accepted.len())
            .finish_non_exhaustive()
    }
}

/// Batch ids carry who sent them: `client:16 | work stream:16 | seq:32`. The simulation
/// reads the top 32 bits to count a stream's batches held by the server.
pub fn batch_id(client: usize, stream: usize, seq: u64) -> u64 {
    assert!(client < 1 << 16 && stream < 1 << 16 && seq < 1 << 32);
    ((client as u64) << 48) | ((stream as u64) << 32) | seq
}

/// The `(client, work stream)` key of a batch id made by [`batch_id`].
pub fn batch_stream_key(batch_id: u64) -> u32 {
    (batch_id >> 32) as u32
}

impl SimClient {
    #[allow(clippy::too_many_arguments)]
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
        let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &endpoint_seed);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        endpoint_config
            .cid_generator(move || Box::new(ShardCidGenerator::new(CLIENT_CID_TAG, endpoint_seed)));
        let mut endpoint =
            Endpoint::new(Arc::new(endpoint_config), None, true, Some(endpoint_seed));
        let (ch, conn) = endpoint
            .connect(now, config, server, SERVER_NAME)
            .expect("a client config with a valid server name connects");
        // Recipients are valid E.164 numbers; the content is irrelevant to the server.
        let recipient = Recipient::parse(format!("+1555{:07}", index % 10_000_000).as_bytes())
            .expect("valid E.164");
        let payload = (0..plan.payload_bytes)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        SimClient {
            index,
            seed,
            plan,
            endpoint,
            ch,
            conn: Some(conn),
            phase: Phase::Handshaking,
            welcome: None,
            close_reason: None,
            closed_at: None,
            hello_stream: None,
            work: Vec::new(),
            streams: BTreeMap::new(),
            accepted: BTreeMap::new(),
            not_accepted: 0,
            next_message: 0,
            recipient,
            payload,
            events: Vec::new(),
        }
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

    /// The WELCOME it received.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<&ConnectionError> {
        self.close_reason.as_ref()
    }

    /// When the connection ended (virtual time).
    pub fn closed_at(&self) -> Option<Instant> {
        self.closed_at
    }

    /// The application error code the server closed the connection with, if it did.
    pub fn close_code(&self) -> Option<u64> {
        match &self.close_reason {
            Some(ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }

    /// Every accepted message: client message id → log position.
    pub fn accepted(&self) -> &BTreeMap<u64, LogPosition> {
        &self.accepted
    }

    /// Statuses received that were not `accepted`.
    pub fn not_accepted(&self) -> u64 {
        self.not_accepted
    }

    /// Every stream the client opened.
    pub fn streams(&self) -> &BTreeMap<StreamId, ClientStream> {
        &self.streams
    }

    /// One stream's record.
    pub fn stream(&self, id: StreamId) -> &ClientStream {
        &self.streams[&id]
    }

    /// Work streams in opening order.
    pub fn work_streams(&self) -> &[StreamId] {
        &self.work
    }

    /// The work stream opened `index`-th.
    pub fn work_stream(&self, index: usize) -> &ClientStream {
        &self.streams[&self.work[index]]
    }

    /// The stream HELLO went on.
    pub fn hello_stream(&self) -> Option<StreamId> {
        self.hello_stream
    }

    /// ACKs received on work streams.
    pub fn batches_acked(&self) -> u64 {
        self.work.iter().map(|id| self.streams[id].acked).sum()
    }

    /// Every work stream was opened, sent its plan and got every ACK and the server's FIN.
    /// Stays true if the connection later closes (an idle timeout, say).
    pub fn done(&self) -> bool {
        self.welcome.is_some()
            && self.work.len() == self.plan.streams
            && self.work.iter().all(|id| {
                let s = &self.streams[id];
                s.acked == self.plan.batches_per_stream && s.fin_received
            })
    }

    /// Nothing more will happen on its own: done, closed, or every work stream ended.
    pub fn settled(&self) -> bool {
        self.done()
            || self.phase == Phase::Closed
            || (self.work.len() == self.plan.streams
                && self.work.iter().all(|id| self.streams[id].settled()))
    }

    // ---- driven by the simulation -------------------------------------------------------

    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        self.conn.as_mut().and_then(|c| c.poll_timeout())
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(conn) = self.conn.as_mut() {
            conn.handle_timeout(now);
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
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                assert_eq!(ch, self.ch, "a sim client has one connection");
                if let Some(conn) = self.conn.as_mut() {
                    conn.handle_event(ev);
                }
            }
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
            if self.pump_streams() {
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
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read_stream(id),
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

    /// Opens work streams, writes SUBMITs, flushes and finishes. True if anything moved.
    fn pump_streams(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let mut progressed = false;
        if self.phase == Phase::Welcomed {
            while self.work.len() < self.plan.streams {
                let Some(id) = conn.streams().open(Dir::Bi) else {
                    break; // no stream credit yet; StreamEvent::Available wakes us
                };
                let index = self.work.len();
                self.work.push(id);
                self.streams
                    .insert(id, ClientStream::new(StreamKind::Work(index)));
                progressed = true;
            }
        }
        for (&id, st) in self.streams.iter_mut() {
            if let StreamKind::Work(index) = st.kind {
                while !st.paused
                    && !st.poisoned
                    && !st.failed()
                    && st.in_flight.len() < self.plan.depth
                    && st.sent < self.plan.batches_per_stream
                {
                    let batch = batch_id(self.index, index, st.sent);
                    let first = self.next_message;
                    self.next_message += self.plan.batch_messages as u64;
                    let ids: Vec<u64> = (first..self.next_message)
                        .map(|n| ((self.index as u64) << 40) | n)
                        .collect();
                    let msgs: Vec<OutMessage<'_>> = ids
                        .iter()
                        .map(|&client_id| OutMessage {
                            client_id,
                            recipient: &self.recipient,
                            payload: &self.payload,
                        })
                        .collect();
                    wire::encode_submit(batch, &msgs, &mut st.out);
                    st.in_flight.push_back(SentBatch {
                        batch_id: batch,
                        first_message: ids[0],
                        messages: msgs.len(),
                    });
                    st.sent += 1;
                    if st.sent == self.plan.batches_per_stream {
                        st.fin_pending = true;
                    }
                    progressed = true;
                }
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

    fn read_stream(&mut self, id: StreamId) {
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
                Ok(Some(chunk)) => st.decoder.push(&chunk.bytes),
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
        self.decode_frames(id);
    }

    fn decode_frames(&mut self, id: StreamId) {
        let seed = self.seed;
        let st = self.streams.get_mut(&id).expect("caller checked");
        // Bounded: each pass consumes one frame of the buffered bytes.
        loop {
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
                    let StreamKind::Work(_) = kind else {
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
                        sent.messages,
                        "seed {seed}: ACK {batch_id:#x} has the wrong number of statuses"
                    );
                    // A batch's message ids are consecutive from its first.
                    for (i, status) in statuses.iter().enumerate() {
                        if let Status::Accepted(p) = status {
                            let client_id = sent.first_message + i as u64;
                            let old = self.accepted.insert(client_id, *p);
                            assert!(
                                old.is_none(),
                                "seed {seed}: message {client_id:#x} accepted twice"
                            );
                        }
                    }
                }
                (frame, kind) => panic!(
                    "seed {seed}: unexpected {} frame on a {kind:?} stream {id}",
                    frame_name(&frame)
                ),
            }
        }
    }

    // ---- actions a test takes (through the simulation, which then pumps the client) -----

    /// Opens a stream and writes HELLO with the plan's token.
    pub(crate) fn send_hello(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let id = conn
            .streams()
            .open(Dir::Bi)
            .expect("a fresh connection has stream credit for HELLO");
        let mut st = ClientStream::new(StreamKind::Hello);
        wire::encode_hello(&self.plan.token, &mut st.out);
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

/// One SUBMIT written on a work stream and not yet answered.
#[derive(Debug, Clone, Copy)]
struct SentBatch {
    batch_id: u64,
    first_message: u64,
    messages: usize,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "HELLO",
        Frame::Submit { .. } => "SUBMIT",
        Frame::Report { .. } => "REPORT",
        Frame::Welcome(_) => "WELCOME",
        Frame::Ack { .. } => "ACK",
    }
}
