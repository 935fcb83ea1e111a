//! One shard's QUIC server, sans-IO: a quinn-proto [`Endpoint`] and its connections,
//! driven by the calls of the shell.
//!
//! The polling contract, which the shell follows after every input:
//!
//! 1. feed input: [`Server::handle_datagram`] for each received datagram,
//!    [`Server::handle_timeout`] once `now` has passed [`Server::poll_timeout`],
//!    [`Server::ack`] for each batch the stage chain has decided;
//! 2. drain [`Server::poll_batch`] and hand each batch to the stage chain;
//! 3. drain [`Server::poll_transmit`] (the shell sends each datagram);
//! 4. sleep until [`Server::poll_timeout`] or the next input.
//!
//! Inside, every input drives the affected connection to quiescence: its endpoint events
//! are fed to the endpoint and the answers fed back (`Drained` removes it), its
//! application events are drained, readable streams are read into frame decoders, and its
//! timer is re-filed. A connection that may have something to send is queued for
//! [`Server::poll_transmit`], which serves connections round-robin.
//!
//! Bounds: connections per shard (`connections_per_shard_max`, handshakes beyond it are
//! refused), streams per connection (a transport parameter), SUBMITs awaiting their ACK
//! per stream (`batches_in_flight_per_stream_max`: past it the stream is not read, so QUIC
//! flow control holds the sender back), SUBMITs awaiting their ACK per business, all its
//! connections and streams together (`batches_in_flight_per_business_max`, the same
//! way), and one frame per stream decoder. So the batches waiting in
//! [`Server::poll_batch`] are bounded by the product of those, and by the businesses
//! connected times their share. [`Server::poll_batch`] takes them in turns, one batch per
//! business (`fair.rs` states the bound that gives a business against another's backlog).
//!
//! ACKs leave each stream in SUBMIT order even when the shell acks out of order.
//!
//! A bad frame fails only its stream, with a `wire::code`: STOP_SENDING at once, then the
//! ACKs of the batches decoded before it, then FIN; once the client has finished its half
//! (a truncated frame), RESET_STREAM instead, the only frame that can still carry the code.

mod config;
mod fair;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ReadError, StreamEvent,
    StreamId, Transmit, TransportConfig, VarInt, WriteError,
};

use crate::cid::ShardCidGenerator;
use crate::registry::Registry;
use crate::wire::delivery::{
    self as wire_delivery, features, BusinessEvent, Deliver, DeliveryFrame, InboundEntry,
    OutcomeEntry,
};
use crate::wire::{
    self, code, Frame, FrameDecoder, LogPosition, Message, MessageLists, Recipient, ReportEntry,
    Status, Welcome, WireLimits,
};
use crate::ShardId;
use fair::{FairQueue, Shares};

pub use config::{
    Limits, Quic, RetryMode, MTU_MAX, MTU_MIN, STREAMS_PER_CONNECTION_LIMIT, WINDOW_BYTES_MAX,
    WINDOW_BYTES_MIN,
};

/// REPORT frames decoded but not yet taken by the shell; more are refused.
const REPORTS_QUEUED_MAX: usize = 1024;
/// Delivery inputs decoded but not yet taken by the core; a frame finding the queue full
/// fails its stream (the core drains it after every datagram, so only a flood fills it).
const DELIVERY_INPUTS_QUEUED_MAX: usize = 65_536;
/// Most DELIVERs an edge connection may have granted and not yet received.
const CREDIT_MAX: u32 = 1 << 20;

/// Endpoint-generated datagrams (stateless resets, refusals, version negotiation) queued
/// for sending; more are dropped, as a router would.
const RESPONSES_QUEUED_MAX: usize = 256;
/// Streams a connection may open before its HELLO is accepted.
const PRE_HELLO_STREAMS: u32 = 1;
/// The decoder's bounds before HELLO: a frame no larger than the largest HELLO.
const PRE_HELLO_LIMITS: WireLimits = WireLimits {
    frame_bytes_max: wire::HELLO_BODY_BYTES_MAX as u32,
    batch_messages_max: 1,
};

/// Bytes asked of a stream per read.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Bytes a stream's output block is allocated with (see `Server::flush_stream`).
const OUT_BLOCK_BYTES: usize = 8 * 1024;
/// Room left in a stream's output block below which the next block is allocated.
const OUT_ROOM_MIN_BYTES: usize = 1024;
/// Block of a stream's output that carries DELIVERs: frames of about a message each, so
/// a block holds dozens of them and quinn's send buffer a chunk per block.
const DELIVER_BLOCK_BYTES: usize = 64 * 1024;

/// Which submitted batch an ACK answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    conn: ConnectionHandle,
    generation: u64,
    stream: StreamId,
    seq: u64,
    /// The business whose share of batches in flight it counts in (SUBMITs only).
    business: Option<u32>,
}

impl Ticket {
    /// A ticket for unit tests of the queues that carry it.
    #[cfg(test)]
    pub(crate) fn for_tests(seq: u64) -> Ticket {
        Ticket {
            conn: ConnectionHandle(0),
            generation: 0,
            stream: StreamId::new(quinn_proto::Side::Client, Dir::Bi, 0),
            seq,
            business: None,
        }
    }
}

/// A decoded SUBMIT (or SUBMIT_TTL), waiting for the stage chain.
#[derive(Debug)]
pub struct SubmitBatch {
    /// Pass back to [`Server::ack`].
    pub ticket: Ticket,
    /// The authenticated business.
    pub business_id: u32,
    /// The client's batch id.
    pub batch_id: u64,
    /// Seconds the messages live (0: the relay's default).
    pub ttl_secs: u32,
    /// The messages, payloads sliced from the frame.
    pub messages: Vec<Message>,
}

/// A connection, named across the shards of a node: its shard, its handle there and
/// the generation of that handle (a handle is reused after its connection is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    shard: ShardId,
    handle: usize,
    generation: u64,
}

impl ConnKey {
    /// The shard that owns the connection.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// A key for benches of the modules that route by it (`benches/delivery.rs`); no
    /// connection has it.
    #[doc(hidden)]
    pub fn for_benches(shard: u8, n: u64) -> ConnKey {
        ConnKey::for_tests(shard, n)
    }

    /// A key for unit tests of the modules that route by it.
    pub(crate) fn for_tests(shard: u8, n: u64) -> ConnKey {
        ConnKey {
            shard: ShardId::new(shard),
            handle: n as usize,
            generation: n,
        }
    }
}

/// What a connection that negotiated delivery features is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The platform's delivery edge: takes DELIVERs.
    Edge,
    /// A business that takes its statuses and users' messages.
    Business(u32),
}

/// A decoded INBOUND from the edge: users' messages, answered by one ACK once durable.
#[derive(Debug)]
pub struct InboundBatch {
    /// Pass back to [`Server::ack`].
    pub ticket: Ticket,
    /// The edge's batch id.
    pub batch_id: u64,
    /// The messages.
    pub entries: Vec<InboundEntry>,
    /// Their payloads are replies sealed end to end (the edge negotiated E2E).
    pub e2e: bool,
}

/// What delivery connections said, for the shard's core.
#[derive(Debug)]
pub enum DeliveryInput {
    /// A connection negotiated a delivery feature: it can take DELIVERs or events.
    Attached {
        /// The connection.
        conn: ConnKey,
        /// What for.
        role: Role,
    },
    /// A connection that was attached is gone (or its HELLO stream is).
    Detached {
        /// The connection.
        conn: ConnKey,
    },
    /// The edge reported outcomes.
    Outcomes(Vec<OutcomeEntry>),
    /// The edge says these recipients are online.
    Online(Vec<Recipient>),
    /// A business acknowledged events.
    EventAcks {
        /// The business.
        business_id: u32,
        /// The events.
        events: Vec<LogPosition>,
    },
    /// The edge handed over users' messages.
    Inbound(InboundBatch),
    /// The edge published recipients' device bundles (not verified yet).
    DeviceKeys(Vec<wire_delivery::DeviceKeysEntry>),
}

/// Why a DELIVER was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotWritten {
    /// The connection (or its HELLO stream) is gone.
    Gone,
    /// The edge granted no more credit.
    NoCredit,
}

/// Counters of one shard's server. Never holds content.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerStats {
    /// Datagrams handed to the endpoint.
    pub datagrams_in: u64,
    /// Connections accepted.
    pub connections_accepted: u64,
    /// Handshakes refused because the shard was full.
    pub connections_refused: u64,
    /// Handshakes refused because their source address held
    /// `connections_per_address_max` connections.
    pub address_cap_refused: u64,
    /// Connections closed at HELLO because their credential held
    /// `connections_per_business_max` connections.
    pub business_cap_refused: u64,
    /// Retry packets sent to unvalidated addresses (they hold no state here).
    pub retries_sent: u64,
    /// Handshakes in progress now (a gauge, not a counter).
    pub half_open: u64,
    /// Connections fully drained and removed.
    pub connections_drained: u64,
    /// HELLOs accepted.
    pub hellos_accepted: u64,
    /// Connections closed for a bad token.
    pub auth_failures: u64,
    /// Authenticated connections closed because a registry reload revoked their
    /// credential.
    pub revoked: u64,
    /// Connections closed for sending no HELLO in time.
    pub hello_timeouts: u64,
    /// Streams closed for a bad frame.
    pub stream_errors: u64,
    /// SUBMIT frames decoded.
    pub batches_in: u64,
    /// Messages in them.
    pub messages_in: u64,
    /// Spam report entries accepted from platform connections.
    pub reports_in: u64,
    /// ACK frames written.
    pub acks_out: u64,
    /// ACKs for batches whose stream or connection was already gone.
    pub acks_orphaned: u64,
    /// Batches acked while an earlier batch of their stream still waited: their ACK was
    /// held back to keep SUBMIT order.
    pub acks_reordered: u64,
    /// Most batches one stream had awaiting their ACK at once (at most
    /// `batches_in_flight_per_stream_max`).
    pub stream_pending_max: u64,
    /// Times a stream was left unread because its business had
    /// `batches_in_flight_per_business_max` batches in flight on the shard.
    pub share_paused: u64,
    /// Most batches of other businesses taken ahead of one batch while it waited in the
    /// shard's queue (see `server::fair` for the bound).
    pub others_ahead_max: u64,
    /// Endpoint responses dropped because the queue was full.
    pub responses_dropped: u64,
    /// DELIVER frames written to edge connections.
    pub delivers_out: u64,
    /// Outcome entries received from the edge.
    pub outcomes_in: u64,
    /// Users' messages received from the edge.
    pub inbound_in: u64,
    /// Events (statuses, users' messages) written to businesses.
    pub events_out: u64,
    /// Event acknowledgements received from businesses.
    pub event_acks_in: u64,
}

struct PendingAck {
    seq: u64,
    batch_id: u64,
    messages: usize,
    frame: Option<BytesMut>,
}

struct StreamState {
    decoder: FrameDecoder,
    pending: VecDeque<PendingAck>,
    next_seq: u64,
    /// Frames encoded and not yet handed to quinn.
    out: BytesMut,
    /// What quinn has not taken yet (flow control), in stream order: slices of `out`.
    sending: VecDeque<Bytes>,
    recv_done: bool,
    /// Not read because `pending` is full; resumed by `ack`.
    paused: bool,
    /// Not read because its business's share of batches in flight is full; filed in
    /// `Shares` and resumed by an ACK of that business.
    share_paused: bool,
    /// In the deferred list (see `Server::begin_writes`).
    deferred: bool,
    /// Of those, with ACKs among its deferred frames (handed over as
    /// `Server::release_acks` does).
    deferred_acks: bool,
}

struct Conn {
    quinn: quinn_proto::Connection,
    generation: u64,
    business_id: Option<u32>,
    /// Authenticated with a platform credential: sends REPORTs, never SUBMITs.
    platform: bool,
    /// Delivery features granted in WELCOME.
    features: u32,
    /// The HELLO stream, kept open when features were granted: DELIVERs and events go
    /// out on it.
    event_stream: Option<StreamId>,
    /// DELIVERs the edge still takes.
    credit: u32,
    hello_deadline: Instant,
    /// The client's IP address when it connected (its share of `per_address`).
    ip: IpAddr,
    /// Counted in `half_open` until its handshake completes.
    handshaking: bool,
    streams: crate::LocalMap<StreamId, StreamState>,
    timer: Option<Instant>,
    send_queued: bool,
    closing: bool,
    /// Has a stream in the deferred list (see `Server::begin_writes`).
    deferred: bool,
}

/// What a shard's server needs besides its configuration.
#[derive(Clone)]
pub struct ServerParts {
    /// This shard's index, carried in its connection IDs.
    pub shard: ShardId,
    /// TLS: the certificate chain and key, as a quinn-proto crypto config.
    pub crypto: Arc<dyn quinn_proto::crypto::ServerConfig>,
    /// Key for stateless resets; the same on every shard so any shard can reset.
    pub reset_key: [u8; 64],
    /// Seed of the connection ID generator and of the endpoint's own randomness.
    pub seed: [u8; 32],
    /// Key of address-validation tokens; the same on every shard (see
    /// [`retry_token_key`]).
    pub token_key: [u8; 32],
}

impl std::fmt::Debug for ServerParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerParts")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// The key of a node's stateless resets, derived from its master key: the same at every
/// start, so a client whose connection a crashed node forgot gets a stateless reset from
/// the restarted node at its next packet (RFC 9000 10.3) and reconnects at once, instead
/// of waiting out its idle timeout.
pub fn stateless_reset_key(master: &crate::log::MasterKey) -> [u8; 64] {
    let a = master.derive_secret(b"courier stateless reset v1 a");
    let b = master.derive_secret(b"courier stateless reset v1 b");
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(&a[..]);
    key[32..].copy_from_slice(&b[..]);
    key
}

/// The key of a node's address-validation (Retry) tokens, derived from its master key:
/// every shard and every start of the node validates the tokens of any other, and a token
/// expires after quinn-proto's `retry_token_lifetime` (15 s). Tokens are bound to the
/// client's address and the connection ID of its first Initial.
pub fn retry_token_key(master: &crate::log::MasterKey) -> [u8; 32] {
    *master.derive_secret(b"courier retry token v1")
}

/// QUIC transport settings of a courier server.
pub fn transport_config(q: &Quic) -> TransportConfig {
    let mut t = TransportConfig::default();
    // One stream until HELLO is accepted (then `streams_per_connection_max`): before it a
    // connection may buffer one HELLO-sized frame and nothing else.
    t.max_concurrent_bidi_streams(VarInt::from_u32(PRE_HELLO_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(VarInt::from_u32(q.idle_timeout_ms).into()))
        .stream_receive_window(VarInt::from_u32(q.stream_receive_window_bytes))
        .receive_window(VarInt::from_u32(q.connection_receive_window_bytes))
        .send_window(u64::from(q.send_window_bytes))
        .initial_mtu(q.initial_mtu)
        .datagram_receive_buffer_size(None);
    let mut mtud = quinn_proto::MtuDiscoveryConfig::default();
    mtud.upper_bound(q.mtu_upper_bound);
    t.mtu_discovery_config(Some(mtud));
    t
}

/// One shard's sans-IO QUIC server.
pub struct Server {
    shard: ShardId,
    endpoint: Endpoint,
    server_config: Arc<quinn_proto::ServerConfig>,
    registry: Arc<Registry>,
    limits: Limits,
    wire_limits: WireLimits,
    /// SUBMITs' message lists, given back by the stage chain and reused.
    lists: MessageLists,
    /// [`Server::begin_writes`] not yet matched by [`Server::end_writes`] (they nest).
    deferring: u32,
    /// The streams whose frames were encoded while deferring and wait to be handed to
    /// quinn together, each once (its `deferred` flag); empty outside.
    deferred: Vec<(ConnectionHandle, StreamId)>,
    conns: crate::LocalMap<ConnectionHandle, Conn>,
    next_generation: u64,
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    send_queue: VecDeque<ConnectionHandle>,
    responses: VecDeque<(Transmit, Vec<u8>)>,
    batches: FairQueue,
    shares: Shares,
    reports: VecDeque<Vec<ReportEntry>>,
    delivery_in: VecDeque<DeliveryInput>,
    retry: RetryMode,
    retry_half_open_min: u32,
    /// Connections per source IP address (entries removed at zero).
    per_address: HashMap<IpAddr, u32>,
    /// Authenticated connections per credential (entries removed at zero).
    per_business: crate::LocalMap<u32, u32>,
    scratch: Vec<u8>,
    stats: ServerStats,
    /// DELIVERY is granted only with E2E (the profile's `delivery.e2e.enabled`).
    end_to_end: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("shard", &self.shard)
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for one shard, taking in at most `limits` over connections of `quic`'s
    /// transport (both validated when the profile loaded).
    pub fn new(
        parts: ServerParts,
        limits: &Limits,
        quic: &Quic,
        registry: Arc<Registry>,
    ) -> Server {
        let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &parts.reset_key);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        let (shard, seed) = (parts.shard, parts.seed);
        endpoint_config
            .cid_generator(move || Box::new(ShardCidGenerator::new(shard, seed)))
            .rng_seed(Some(seed));
        endpoint_config
            .max_udp_payload_size(quic.mtu_upper_bound.max(MTU_MIN))
            .expect("quic.mtu_upper_bound is validated to MTU_MIN..=MTU_MAX");
        let token_key =
            aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]).extract(&parts.token_key);
        let mut server_config = quinn_proto::ServerConfig::new(parts.crypto, Arc::new(token_key));
        server_config
            .transport_config(Arc::new(transport_config(quic)))
            .max_incoming(limits.connections_per_shard_max as usize)
            .migration(true);
        let server_config = Arc::new(server_config);
        // The endpoint must hold the server config: without one, quinn-proto treats every
        // Initial as a packet for an unknown connection and answers it with a stateless
        // reset, so no handshake ever reaches `accept` (found by the simulation).
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(server_config.clone()),
            true,
            Some(seed),
        );
        Server {
            shard,
            endpoint,
            server_config,
            registry,
            limits: limits.clone(),
            wire_limits: limits.wire(),
            lists: MessageLists::new(),
            deferring: 0,
            deferred: Vec::new(),
            conns: crate::LocalMap::default(),
            next_generation: 0,
            timers: BTreeSet::new(),
            send_queue: VecDeque::new(),
            responses: VecDeque::new(),
            batches: FairQueue::default(),
            shares: Shares::new(limits.batches_in_flight_per_business_max),
            reports: VecDeque::new(),
            delivery_in: VecDeque::new(),
            retry: quic.retry,
            retry_half_open_min: quic.retry_half_open_min,
            per_address: HashMap::new(),
            per_business: crate::LocalMap::default(),
            scratch: Vec::new(),
            stats: ServerStats::default(),
            end_to_end: false,
        }
    }

    /// This shard's index.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The registry new HELLOs are checked against.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The largest round-trip time estimate over the live connections (zero without
    /// any). A stopping shard lingers a few of these so its last ACKs get out.
    pub fn rtt_max(&self) -> Duration {
        self.conns
            .values()
            .map(|c| c.quinn.rtt())
            .max()
            .unwrap_or_default()
    }

    /// Replaces the registry. New HELLOs use it; an authenticated connection whose
    /// credential it revokes (the business removed, its token rotated, or its platform
    /// role changed) is closed now with `UNAUTHORIZED`. Returns how many were closed.
    pub fn set_registry(&mut self, now: Instant, registry: Arc<Registry>) -> usize {
        let revoked: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .filter_map(|(&ch, c)| {
                let id = c.business_id?;
                let old = self.registry.get(id);
                let still = registry.get(id).is_some_and(|new| {
                    new.platform == c.platform && old.is_some_and(|old| old.same_token(new))
                });
                (!still).then_some(ch)
            })
            .collect();
        self.registry = registry;
        for &ch in &revoked {
            let conn = self.conns.get_mut(&ch).expect("listed above");
            self.stats.revoked += 1;
            conn.closing = true;
            conn.streams.clear();
            conn.quinn.close(
                now,
                VarInt::from_u32(code::UNAUTHORIZED),
                Bytes::from_static(b"credential revoked"),
            );
            self.drive(ch, now);
        }
        revoked.len()
    }

    /// Feeds one received datagram.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        data: BytesMut,
    ) {
        self.stats.datagrams_in += 1;
        self.scratch.clear();
        let event = self
            .endpoint
            .handle(now, remote, local_ip, None, data, &mut self.scratch);
        match event {
            None => {}
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(conn) = self.conns.get_mut(&ch) {
                    conn.quinn.handle_event(ev);
                    self.drive(ch, now);
                }
            }
            Some(DatagramEvent::Response(t)) => {
                let bytes = self.scratch[..t.size].to_vec();
                self.queue_response(t, bytes);
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.on_incoming(incoming, now),
        }
    }

    /// A new connection attempt: Retry an unvalidated address when the mode asks for it,
    /// refuse one beyond the shard's or its address's share, accept the rest.
    fn on_incoming(&mut self, incoming: quinn_proto::Incoming, now: Instant) {
        self.scratch.clear();
        let wants_retry = match self.retry {
            RetryMode::Always => true,
            RetryMode::UnderLoad => self.stats.half_open >= u64::from(self.retry_half_open_min),
            RetryMode::Never => false,
        };
        if wants_retry && !incoming.remote_address_validated() {
            // `remote_address_validated() == false` guarantees `may_retry()`.
            match self.endpoint.retry(incoming, &mut self.scratch) {
                Ok(t) => {
                    self.stats.retries_sent += 1;
                    let bytes = self.scratch[..t.size].to_vec();
                    self.queue_response(t, bytes);
                }
                Err(e) => self.endpoint.ignore(e.into_incoming()),
            }
            return;
        }
        let ip = incoming.remote_address().ip();
        let from_address = self.per_address.get(&ip).copied().unwrap_or(0);
        let full = self.conns.len() >= self.limits.connections_per_shard_max as usize;
        if full || from_address >= self.limits.connections_per_address_max {
            // CONNECTION_REFUSED (a QUIC transport error): an application close such as
            // SERVER_BUSY cannot travel in an Initial, and completing a handshake only to
            // close it would spend the TLS work a flood wants us to spend.
            if full {
                self.stats.connections_refused += 1;
            } else {
                self.stats.address_cap_refused += 1;
            }
            let t = self.endpoint.refuse(incoming, &mut self.scratch);
            let bytes = self.scratch[..t.size].to_vec();
            self.queue_response(t, bytes);
            return;
        }
        match self.endpoint.accept(
            incoming,
            now,
            &mut self.scratch,
            Some(self.server_config.clone()),
        ) {
            Ok((ch, quinn)) => {
                self.stats.connections_accepted += 1;
                self.stats.half_open += 1;
                *self.per_address.entry(ip).or_insert(0) += 1;
                let generation = self.next_generation;
                self.next_generation += 1;
                let hello_deadline =
                    now + Duration::from_millis(u64::from(self.limits.hello_timeout_ms));
                self.conns.insert(
                    ch,
                    Conn {
                        quinn,
                        generation,
                        business_id: None,
                        platform: false,
                        features: 0,
                        event_stream: None,
                        credit: 0,
                        hello_deadline,
                        ip,
                        handshaking: true,
                        streams: crate::LocalMap::default(),
                        timer: None,
                        send_queued: false,
                        closing: false,
                        deferred: false,
                    },
                );
                self.drive(ch, now);
            }
            Err(e) => {
                if let Some(t) = e.response {
                    let bytes = self.scratch[..t.size].to_vec();
                    self.queue_response(t, bytes);
                }
            }
        }
    }

    fn queue_response(&mut self, t: Transmit, bytes: Vec<u8>) {
        if self.responses.len() >= RESPONSES_QUEUED_MAX {
            self.stats.responses_dropped += 1;
        } else {
            self.responses.push_back((t, bytes));
        }
    }

    /// When [`Server::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Bounded: each connection has at most one entry, and each fired entry is removed.
        while let Some(&(at, ch)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, ch));
            let Some(conn) = self.conns.get_mut(&ch) else {
                continue;
            };
            conn.timer = None;
            conn.quinn.handle_timeout(now);
            if conn.business_id.is_none() && !conn.closing && now >= conn.hello_deadline {
                self.stats.hello_timeouts += 1;
                conn.closing = true;
                conn.quinn.close(
                    now,
                    VarInt::from_u32(code::HELLO_TIMEOUT),
                    Bytes::from_static(b"no HELLO in time"),
                );
            }
            self.drive(ch, now);
        }
    }

    /// The next datagram(s) to send, written into `buf` (cleared first). With
    /// `max_datagrams` > 1 the transmit may hold several datagrams of `segment_size` (GSO).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        buf.clear();
        if let Some((t, bytes)) = self.responses.pop_front() {
            buf.extend_from_slice(&bytes);
            return Some(t);
        }
        // Round-robin: a connection that sent goes to the back; one with nothing to send
        // leaves the queue until it is driven again. Each handle is in the queue at most once.
        for _ in 0..self.send_queue.len() {
            let ch = self.send_queue.pop_front()?;
            let Some(conn) = self.conns.get_mut(&ch) else {
                continue;
            };
            if let Some(t) = conn.quinn.poll_transmit(now, max_datagrams, buf) {
                self.send_queue.push_back(ch);
                // Sending may arm loss-detection and pacing timers.
                self.refile_timer(ch);
                return Some(t);
            }
            conn.send_queued = false;
            self.refile_timer(ch);
        }
        None
    }

    /// The next REPORT a platform connection sent (spam reports, for the detector).
    pub fn poll_report(&mut self) -> Option<Vec<ReportEntry>> {
        self.reports.pop_front()
    }

    /// The next decoded batch for the stage chain.
    /// Batches of every business are taken in turns, one each (see `server::fair`).
    pub fn poll_batch(&mut self) -> Option<SubmitBatch> {
        let batch = self.batches.pop();
        self.stats.others_ahead_max = self.batches.others_ahead_max();
        batch
    }

    /// Decoded batches waiting for [`Server::poll_batch`].
    pub fn batches_queued(&self) -> usize {
        self.batches.len()
    }

    /// Delivers the statuses of a batch; its ACK is written once every earlier batch of the
    /// same stream has been acked. `statuses` has one entry per message of the batch.
    /// A ticket whose stream or connection is gone is counted and dropped: the client saw
    /// the stream fail and will resubmit, and idempotency answers `duplicate`.
    ///
    /// A SUBMIT's ACK also gives its business's share back: streams of that business left
    /// unread at its share are read again.
    pub fn ack(&mut self, now: Instant, ticket: Ticket, statuses: &[Status]) {
        let resumed = ticket
            .business
            .map(|b| self.shares.acked(b))
            .unwrap_or_default();
        self.write_ack(now, ticket, statuses);
        for (ch, id) in resumed {
            self.resume_share(ch, id, now);
        }
    }

    /// Reads a stream again that was left unread at its business's share.
    fn resume_share(&mut self, ch: ConnectionHandle, id: StreamId, now: Instant) {
        let Some(st) = self.conns.get_mut(&ch).and_then(|c| c.streams.get_mut(&id)) else {
            return;
        };
        if !st.share_paused {
            // The handle and stream id now name another stream.
            return;
        }
        st.share_paused = false;
        self.read_stream(ch, id, now);
        self.finish_if_done(ch, id);
        self.drive(ch, now);
    }

    fn write_ack(&mut self, now: Instant, ticket: Ticket, statuses: &[Status]) {
        let Some(conn) = self.conns.get_mut(&ticket.conn) else {
            self.stats.acks_orphaned += 1;
            return;
        };
        if conn.generation != ticket.generation {
            self.stats.acks_orphaned += 1;
            return;
        }
        let Some(st) = conn.streams.get_mut(&ticket.stream) else {
            self.stats.acks_orphaned += 1;
            return;
        };
        let reordered = st.pending.front().is_some_and(|f| f.seq != ticket.seq);
        let Some(p) = st.pending.iter_mut().find(|p| p.seq == ticket.seq) else {
            self.stats.acks_orphaned += 1;
            return;
        };
        if reordered {
            self.stats.acks_reordered += 1;
        }
        assert_eq!(p.messages, statuses.len(), "one status per message");
        assert!(p.frame.is_none(), "a batch is acked once");
        if reordered {
            // It waits for the earlier batches' ACKs: kept apart until they are out.
            let mut frame = BytesMut::with_capacity(
                wire::FRAME_HEADER_BYTES
                    + wire::BATCH_HEADER_BYTES
                    + statuses.len() * wire::STATUS_BYTES,
            );
            wire::encode_ack(p.batch_id, statuses, &mut frame);
            p.frame = Some(frame);
        } else {
            // The first batch of the stream (the usual case): straight into the output.
            let batch_id = p.batch_id;
            st.pending.pop_front();
            wire::encode_ack(batch_id, statuses, &mut st.out);
            self.stats.acks_out += 1;
        }
        // Release ACKs in SUBMIT order.
        while st.pending.front().is_some_and(|p| p.frame.is_some()) {
            let p = st.pending.pop_front().expect("checked");
            st.out.extend_from_slice(&p.frame.expect("checked"));
            self.stats.acks_out += 1;
        }
        self.written(now, ticket.conn, ticket.stream, true);
    }

    /// Frames were just encoded into stream `id`'s output (`acks`: ACKs among them):
    /// handed to quinn now, or at [`Server::end_writes`] while deferring.
    fn written(&mut self, now: Instant, ch: ConnectionHandle, id: StreamId, acks: bool) {
        if self.deferring > 0 {
            let Some(conn) = self.conns.get_mut(&ch) else {
                return;
            };
            if let Some(st) = conn.streams.get_mut(&id) {
                if !std::mem::replace(&mut st.deferred, true) {
                    self.deferred.push((ch, id));
                }
                st.deferred_acks |= acks;
                conn.deferred = true;
            }
            return;
        }
        self.hand_over(now, ch, id, acks);
        self.drive(ch, now);
    }

    /// Hands a stream's encoded frames to quinn: after ACKs as [`Server::release_acks`]
    /// does, else only the frames (DELIVERs and events never finish a stream: a
    /// business's or edge's HELLO stream stays while the connection does).
    fn hand_over(&mut self, now: Instant, ch: ConnectionHandle, id: StreamId, acks: bool) {
        match acks {
            true => self.release_acks(now, ch, id),
            false => self.flush_stream(ch, id),
        }
    }

    /// Hands a stream's encoded ACKs to quinn, reads it again if it was paused and its
    /// ACK backlog is now below the bound, and finishes it if it is done.
    fn release_acks(&mut self, now: Instant, ch: ConnectionHandle, id: StreamId) {
        let read_max = self.limits.batches_in_flight_per_stream_max as usize;
        let Some(st) = self.conns.get_mut(&ch).and_then(|c| c.streams.get_mut(&id)) else {
            return;
        };
        let resume = st.paused && st.pending.len() < read_max;
        if resume {
            st.paused = false;
        }
        self.flush_stream(ch, id);
        if resume {
            self.read_stream(ch, id, now);
        }
        self.finish_if_done(ch, id);
    }

    /// From now until the matching [`Server::end_writes`], [`Server::ack`],
    /// [`Server::deliver`] and [`Server::push_events`] encode their frames into the
    /// stream's output but hand them to quinn only then: the ACKs of one group commit, or
    /// the DELIVERs and events of one dispatch, leave as one write per stream (a few large
    /// chunks in quinn's send buffer rather than one per frame) and one pass over each
    /// connection, rather than one of each per frame. Calls nest; the outermost
    /// `end_writes` hands everything over.
    pub fn begin_writes(&mut self) {
        self.deferring += 1;
    }

    /// Ends a [`Server::begin_writes`]; the outermost hands the frames encoded since to
    /// quinn, stream by stream in the order they were first written, then drives each
    /// connection once.
    pub fn end_writes(&mut self, now: Instant) {
        assert!(self.deferring > 0, "end_writes without begin_writes");
        self.deferring -= 1;
        if self.deferring > 0 {
            return;
        }
        // Taken for the walk (ACKs answered while releasing are written at once); its
        // memory is kept for the next commit.
        let mut list = std::mem::take(&mut self.deferred);
        for &(ch, id) in &list {
            let Some(st) = self.conns.get_mut(&ch).and_then(|c| c.streams.get_mut(&id)) else {
                continue;
            };
            st.deferred = false;
            let acks = std::mem::take(&mut st.deferred_acks);
            self.hand_over(now, ch, id, acks);
        }
        for &(ch, _) in &list {
            let Some(conn) = self.conns.get_mut(&ch) else {
                continue;
            };
            if std::mem::take(&mut conn.deferred) {
                self.drive(ch, now);
            }
        }
        list.clear();
        self.deferred = list;
    }

    /// Closes every connection with `code` (shutdown). Batches already handed out can still
    /// be acked until the connections drain.
    pub fn close_all(&mut self, now: Instant, error_code: u32, reason: &'static [u8]) {
        let mut handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        // In handle order, not `HashMap` order: the order decides which connection's close
        // goes out first, and a seeded run must replay the same way every time.
        handles.sort_unstable();
        for ch in handles {
            if let Some(conn) = self.conns.get_mut(&ch) {
                conn.closing = true;
                conn.quinn.close(
                    now,
                    VarInt::from_u32(error_code),
                    Bytes::from_static(reason),
                );
            }
            self.drive(ch, now);
        }
    }

    /// Drives one connection until it has nothing more to say.
    fn drive(&mut self, ch: ConnectionHandle, now: Instant) {
        // Bounded: each pass consumes events that quinn-proto produced from finite input.
        loop {
            let Some(conn) = self.conns.get_mut(&ch) else {
                return;
            };
            let mut progressed = false;
            while let Some(ev) = conn.quinn.poll_endpoint_events() {
                progressed = true;
                let drained = ev.is_drained();
                if let Some(back) = self.endpoint.handle_event(ch, ev) {
                    conn.quinn.handle_event(back);
                }
                if drained {
                    self.remove_conn(ch);
                    return;
                }
            }
            if let Some(ev) = conn.quinn.poll() {
                progressed = true;
                self.on_event(ch, ev, now);
            }
            if !progressed {
                break;
            }
        }
        self.refile_timer(ch);
        // The HELLO stream of a delivery connection ended (reset, stopped, finished).
        let stream_gone = self.conns.get(&ch).is_some_and(|c| {
            c.event_stream
                .is_some_and(|id| !c.streams.contains_key(&id))
        });
        if stream_gone {
            self.detach(ch);
        }
        if let Some(conn) = self.conns.get_mut(&ch) {
            if !conn.send_queued {
                conn.send_queued = true;
                self.send_queue.push_back(ch);
            }
        }
    }

    fn remove_conn(&mut self, ch: ConnectionHandle) {
        self.detach(ch);
        if let Some(conn) = self.conns.remove(&ch) {
            if let Some(t) = conn.timer {
                self.timers.remove(&(t, ch));
            }
            if conn.handshaking {
                self.stats.half_open -= 1;
            }
            release_share(&mut self.per_address, conn.ip);
            if let Some(b) = conn.business_id {
                release_share(&mut self.per_business, b);
            }
            self.stats.connections_drained += 1;
        }
    }

    fn refile_timer(&mut self, ch: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        let mut next = conn.quinn.poll_timeout();
        if conn.business_id.is_none() && !conn.closing {
            next = Some(next.map_or(conn.hello_deadline, |t| t.min(conn.hello_deadline)));
        }
        if next != conn.timer {
            if let Some(old) = conn.timer {
                self.timers.remove(&(old, ch));
            }
            if let Some(t) = next {
                self.timers.insert((t, ch));
            }
            conn.timer = next;
        }
    }

    fn on_event(&mut self, ch: ConnectionHandle, ev: Event, now: Instant) {
        match ev {
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                let Some(conn) = self.conns.get_mut(&ch) else {
                    return;
                };
                let mut opened = Vec::new();
                let limits = if conn.business_id.is_some() {
                    self.wire_limits
                } else {
                    PRE_HELLO_LIMITS
                };
                while let Some(id) = conn.quinn.streams().accept(Dir::Bi) {
                    conn.streams.insert(
                        id,
                        StreamState {
                            decoder: FrameDecoder::new(limits),
                            pending: VecDeque::new(),
                            next_seq: 0,
                            out: BytesMut::new(),
                            sending: VecDeque::new(),
                            recv_done: false,
                            paused: false,
                            share_paused: false,
                            deferred: false,
                            deferred_acks: false,
                        },
                    );
                    opened.push(id);
                }
                for id in opened {
                    self.read_stream(ch, id, now);
                }
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read_stream(ch, id, now),
            Event::Stream(StreamEvent::Writable { id }) => {
                self.flush_stream(ch, id);
                self.finish_if_done(ch, id);
            }
            Event::Stream(StreamEvent::Stopped { id, .. }) => {
                // The client no longer wants ACKs on this stream.
                if let Some(conn) = self.conns.get_mut(&ch) {
                    let close_ok = VarInt::from_u32(code::CLOSE_OK);
                    let _ = conn.quinn.recv_stream(id).stop(close_ok);
                    // RFC 9000 3.5: STOP_SENDING is answered with RESET_STREAM. Without it
                    // our send half never closes, quinn-proto never frees the stream, and
                    // the client never gets its stream credit back: after
                    // `streams_per_connection_max` such streams the connection could open
                    // no more (found by the simulation).
                    let _ = conn.quinn.send_stream(id).reset(close_ok);
                    conn.streams.remove(&id);
                }
            }
            Event::Stream(StreamEvent::Finished { id }) => {
                if let Some(conn) = self.conns.get_mut(&ch) {
                    if conn
                        .streams
                        .get(&id)
                        .is_some_and(|s| s.recv_done && s.pending.is_empty())
                    {
                        conn.streams.remove(&id);
                    }
                }
            }
            Event::ConnectionLost { .. } => {
                if let Some(conn) = self.conns.get_mut(&ch) {
                    conn.closing = true;
                    conn.streams.clear();
                }
                self.detach(ch);
            }
            Event::Connected => {
                // The HELLO budget runs from the end of the handshake, so a slow, lossy
                // handshake does not eat it (until then quinn's idle timeout applies).
                if let Some(conn) = self.conns.get_mut(&ch) {
                    conn.hello_deadline =
                        now + Duration::from_millis(u64::from(self.limits.hello_timeout_ms));
                    if conn.handshaking {
                        conn.handshaking = false;
                        self.stats.half_open -= 1;
                    }
                }
            }
            Event::Stream(_)
            | Event::HandshakeDataReady
            | Event::DatagramReceived
            | Event::DatagramsUnblocked => {}
        }
    }

    /// Reads and decodes a stream until it is drained, paused by its ACK backlog, or failed.
    fn read_stream(&mut self, ch: ConnectionHandle, id: StreamId, now: Instant) {
        let read_max = self.limits.batches_in_flight_per_stream_max as usize;
        // Bounded: each pass either decodes a frame, consumes a chunk, or returns.
        loop {
            let Some(conn) = self.conns.get_mut(&ch) else {
                return;
            };
            let Some(st) = conn.streams.get_mut(&id) else {
                return;
            };
            if st.pending.len() >= read_max {
                st.paused = true;
                return;
            }
            if let Some(b) = conn.business_id.filter(|_| !conn.platform) {
                if st.share_paused {
                    return;
                }
                if self.shares.is_full(b) {
                    st.share_paused = true;
                    self.shares.wait(b, ch, id);
                    self.stats.share_paused += 1;
                    return;
                }
            }
            match st.decoder.next_frame_reusing(&mut self.lists) {
                Ok(Some(frame)) => {
                    if !self.on_frame(ch, id, frame, now) {
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail_stream(ch, id, e.code());
                    return;
                }
            }
            if st.recv_done {
                if let Err(e) = st.decoder.finish() {
                    self.fail_stream(ch, id, e.code());
                } else {
                    self.finish_if_done(ch, id);
                }
                return;
            }
            let mut recv = conn.quinn.recv_stream(id);
            let Ok(mut chunks) = recv.read(true) else {
                conn.streams.remove(&id);
                return;
            };
            let result = chunks.next(READ_CHUNK_BYTES_MAX);
            let _ = chunks.finalize();
            match result {
                Ok(Some(chunk)) => st.decoder.push_bytes(chunk.bytes),
                Ok(None) => st.recv_done = true,
                Err(ReadError::Blocked) => return,
                Err(ReadError::Reset(_)) => {
                    // The client abandoned the stream; unacked batches will be orphaned.
                    let _ = conn
                        .quinn
                        .send_stream(id)
                        .reset(VarInt::from_u32(code::CLOSE_OK));
                    conn.streams.remove(&id);
                    return;
                }
            }
        }
    }

    /// Acts on one frame. Returns false when the stream (or connection) was closed.
    fn on_frame(&mut self, ch: ConnectionHandle, id: StreamId, frame: Frame, now: Instant) -> bool {
        match frame {
            Frame::Hello {
                token,
                version,
                features,
            } => self.on_hello(ch, id, &token.0, version, features, now),
            Frame::Submit { batch_id, messages } => self.on_submit(ch, id, batch_id, 0, messages),
            Frame::Report { entries } => {
                let conn = self.conns.get_mut(&ch).expect("caller checked");
                if conn.business_id.is_none() {
                    self.fail_stream(ch, id, code::NOT_AUTHENTICATED);
                    return false;
                }
                if !conn.platform || self.reports.len() >= REPORTS_QUEUED_MAX {
                    // Only the platform reports spam; a business cannot report (itself or
                    // a competitor). A full queue means the shell is not draining: refuse
                    // rather than grow.
                    self.fail_stream(ch, id, code::UNEXPECTED_FRAME);
                    return false;
                }
                self.stats.reports_in += entries.len() as u64;
                self.reports.push_back(entries);
                true
            }
            Frame::Delivery(f) => self.on_delivery_frame(ch, id, f),
            // Server frames never come from a client.
            Frame::Welcome(_) | Frame::Ack { .. } => {
                self.fail_stream(ch, id, code::UNEXPECTED_FRAME);
                false
            }
        }
    }

    /// HELLO: authenticate, grant the features the credential allows, answer WELCOME.
    fn on_hello(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        token: &[u8],
        version: u16,
        asked: u32,
        now: Instant,
    ) -> bool {
        let conn = self.conns.get_mut(&ch).expect("caller checked");
        if conn.business_id.is_some() {
            self.fail_stream(ch, id, code::UNEXPECTED_FRAME);
            return false;
        }
        let Ok(b) = self.registry.authenticate(token) else {
            self.stats.auth_failures += 1;
            conn.closing = true;
            conn.streams.clear();
            conn.quinn.close(
                now,
                VarInt::from_u32(code::UNAUTHORIZED),
                Bytes::from_static(b"unauthorized"),
            );
            return false;
        };
        let held = self.per_business.get(&b.id).copied().unwrap_or(0);
        if held >= self.limits.connections_per_business_max {
            self.stats.business_cap_refused += 1;
            conn.closing = true;
            conn.streams.clear();
            conn.quinn.close(
                now,
                VarInt::from_u32(code::TOO_MANY_CONNECTIONS),
                Bytes::from_static(b"too many connections for this credential"),
            );
            return false;
        }
        *self.per_business.entry(b.id).or_insert(0) += 1;
        self.stats.hellos_accepted += 1;
        conn.business_id = Some(b.id);
        conn.platform = b.platform;
        // Authenticated: the full stream allowance and frame bounds.
        conn.quinn.set_max_concurrent_streams(
            Dir::Bi,
            VarInt::from_u32(self.limits.streams_per_connection_max),
        );
        let allowed = if b.platform {
            features::DELIVERY | features::E2E
        } else {
            features::EVENTS
        };
        let mut granted = asked & allowed;
        // E2E goes with DELIVERY; a relay that seals for devices hands messages only to
        // an edge that takes them so.
        let both = features::DELIVERY | features::E2E;
        if !self.end_to_end {
            granted &= !features::E2E;
        } else if granted & both != both {
            granted &= !both;
        }
        conn.features = granted;
        if granted != 0 {
            conn.event_stream = Some(id);
            let role = if b.platform {
                Role::Edge
            } else {
                Role::Business(b.id)
            };
            let key = key_of(self.shard, ch, conn.generation);
            self.delivery_in
                .push_back(DeliveryInput::Attached { conn: key, role });
        }
        let st = conn.streams.get_mut(&id).expect("caller checked");
        st.decoder.set_limits(self.wire_limits);
        wire::encode_welcome(
            &Welcome {
                business_id: b.id,
                batch_messages_max: self.limits.batch_messages_max,
                payload_bytes_max: self.limits.payload_bytes_max,
                frame_bytes_max: self.limits.frame_bytes_max,
                features: (version == wire::VERSION_FEATURES).then_some(granted),
            },
            &mut st.out,
        );
        self.flush_stream(ch, id);
        self.refile_timer(ch);
        true
    }

    /// SUBMIT or SUBMIT_TTL: queued for the stage chain, its ACK reserved in order.
    fn on_submit(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        batch_id: u64,
        ttl_secs: u32,
        messages: Vec<Message>,
    ) -> bool {
        let conn = self.conns.get_mut(&ch).expect("caller checked");
        let Some(business_id) = conn.business_id else {
            self.fail_stream(ch, id, code::NOT_AUTHENTICATED);
            return false;
        };
        if conn.platform {
            self.fail_stream(ch, id, code::UNEXPECTED_FRAME);
            return false;
        }
        self.stats.batches_in += 1;
        self.stats.messages_in += messages.len() as u64;
        let mut ticket = self.reserve_ack(ch, id, batch_id, messages.len());
        ticket.business = Some(business_id);
        self.shares.took(business_id);
        self.batches.push(SubmitBatch {
            ticket,
            business_id,
            batch_id,
            ttl_secs,
            messages,
        });
        true
    }

    /// Reserves the ACK of a batch of `count` entries on stream `id`, in order.
    fn reserve_ack(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        batch_id: u64,
        count: usize,
    ) -> Ticket {
        let conn = self.conns.get_mut(&ch).expect("caller checked");
        let st = conn.streams.get_mut(&id).expect("caller checked");
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.push_back(PendingAck {
            seq,
            batch_id,
            messages: count,
            frame: None,
        });
        let pending = st.pending.len() as u64;
        self.stats.stream_pending_max = self.stats.stream_pending_max.max(pending);
        Ticket {
            conn: ch,
            generation: conn.generation,
            stream: id,
            seq,
            business: None,
        }
    }

    /// A delivery frame from a client: businesses submit with a TTL and acknowledge
    /// events; the edge grants credit, reports outcomes, online recipients and replies.
    fn on_delivery_frame(&mut self, ch: ConnectionHandle, id: StreamId, f: DeliveryFrame) -> bool {
        let conn = self.conns.get_mut(&ch).expect("caller checked");
        let Some(business_id) = conn.business_id else {
            self.fail_stream(ch, id, code::NOT_AUTHENTICATED);
            return false;
        };
        let platform = conn.platform;
        let full = self.delivery_in.len() >= DELIVERY_INPUTS_QUEUED_MAX;
        let input = match f {
            DeliveryFrame::SubmitTtl {
                batch_id,
                ttl_secs,
                messages,
            } => return self.on_submit(ch, id, batch_id, ttl_secs, messages),
            DeliveryFrame::EventAck(events) if !platform && !full => {
                self.stats.event_acks_in += events.len() as u64;
                DeliveryInput::EventAcks {
                    business_id,
                    events,
                }
            }
            DeliveryFrame::Credit(n) if platform => {
                conn.credit = conn.credit.saturating_add(n).min(CREDIT_MAX);
                return true;
            }
            DeliveryFrame::Outcome(entries) if platform && !full => {
                self.stats.outcomes_in += entries.len() as u64;
                DeliveryInput::Outcomes(entries)
            }
            DeliveryFrame::Online(recipients) if platform && !full => {
                DeliveryInput::Online(recipients)
            }
            DeliveryFrame::Inbound { batch_id, entries } if platform && !full => {
                self.stats.inbound_in += entries.len() as u64;
                let e2e = conn.features & features::E2E != 0;
                let ticket = self.reserve_ack(ch, id, batch_id, entries.len());
                DeliveryInput::Inbound(InboundBatch {
                    ticket,
                    batch_id,
                    entries,
                    e2e,
                })
            }
            DeliveryFrame::DeviceKeys(entries)
                if platform && !full && conn.features & features::E2E != 0 =>
            {
                DeliveryInput::DeviceKeys(entries)
            }
            // Server frames, frames of the other role, or a flood.
            _ => {
                self.fail_stream(ch, id, code::UNEXPECTED_FRAME);
                return false;
            }
        };
        self.delivery_in.push_back(input);
        true
    }

    /// The next input of a delivery connection, for the core.
    pub fn poll_delivery(&mut self) -> Option<DeliveryInput> {
        self.delivery_in.pop_front()
    }

    /// Writes a DELIVER on an edge connection's HELLO stream, using one credit.
    pub fn deliver(&mut self, now: Instant, conn: ConnKey, d: &Deliver) -> Result<(), NotWritten> {
        let (ch, id) = self.event_stream(conn, features::DELIVERY)?;
        let c = self.conns.get_mut(&ch).expect("checked");
        if c.credit == 0 {
            return Err(NotWritten::NoCredit);
        }
        c.credit -= 1;
        let st = c.streams.get_mut(&id).expect("checked");
        // Copied whole into the stream's output, payload included: quinn finds the bytes
        // of each packet by walking its send buffer's chunks from the oldest unacked one,
        // so a chunk per payload (as handing delivery's `Bytes` over would make) costs
        // more in that walk than the copy (BENCHMARKS.md, "DELIVERs in large chunks").
        st.room_for(wire_delivery::deliver_frame_bytes(d), DELIVER_BLOCK_BYTES);
        wire_delivery::encode_deliver(d, &mut st.out);
        self.stats.delivers_out += 1;
        self.written(now, ch, id, false);
        Ok(())
    }

    /// The most messages one SUBMIT of a business may carry.
    pub fn batch_messages_max(&self) -> u32 {
        self.wire_limits.batch_messages_max
    }

    /// Delivery connections take DELIVERs only with E2E (`true`), or only without it.
    pub fn set_end_to_end(&mut self, on: bool) {
        self.end_to_end = on;
    }

    /// Writes KEYS_WANTED on an edge connection's HELLO stream.
    pub fn keys_wanted(
        &mut self,
        now: Instant,
        conn: ConnKey,
        recipients: &[Recipient],
    ) -> Result<(), NotWritten> {
        self.write_e2e(now, conn, |out| {
            wire_delivery::encode_keys_wanted(recipients, out)
        })
    }

    /// Writes BUSINESS_KEYS on an edge connection's HELLO stream.
    pub fn business_keys(
        &mut self,
        now: Instant,
        conn: ConnKey,
        entries: &[wire_delivery::BusinessKeyEntry],
    ) -> Result<(), NotWritten> {
        self.write_e2e(now, conn, |out| {
            wire_delivery::encode_business_keys(entries, out)
        })
    }

    /// Writes what `encode` makes on the HELLO stream of an edge granted E2E.
    fn write_e2e(
        &mut self,
        now: Instant,
        conn: ConnKey,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), NotWritten> {
        let (ch, id) = self.event_stream(conn, features::E2E)?;
        let c = self.conns.get_mut(&ch).expect("checked");
        let st = c.streams.get_mut(&id).expect("checked");
        encode(&mut st.out);
        self.flush_stream(ch, id);
        self.drive(ch, now);
        Ok(())
    }

    /// Writes events on a business connection's HELLO stream, in order.
    pub fn push_events(
        &mut self,
        now: Instant,
        conn: ConnKey,
        events: &[BusinessEvent],
    ) -> Result<(), NotWritten> {
        let (ch, id) = self.event_stream(conn, features::EVENTS)?;
        let c = self.conns.get_mut(&ch).expect("checked");
        let st = c.streams.get_mut(&id).expect("checked");
        wire_delivery::encode_events(events, &mut st.out);
        self.stats.events_out += events.len() as u64;
        self.written(now, ch, id, false);
        Ok(())
    }

    /// The live HELLO stream of `conn` if it was granted `feature`.
    fn event_stream(
        &self,
        conn: ConnKey,
        feature: u32,
    ) -> Result<(ConnectionHandle, StreamId), NotWritten> {
        assert_eq!(conn.shard, self.shard, "a connection of this shard");
        let ch = ConnectionHandle(conn.handle);
        let c = self
            .conns
            .get(&ch)
            .filter(|c| c.generation == conn.generation && !c.closing)
            .ok_or(NotWritten::Gone)?;
        let id = c
            .event_stream
            .filter(|_| c.features & feature != 0)
            .filter(|id| c.streams.contains_key(id))
            .ok_or(NotWritten::Gone)?;
        Ok((ch, id))
    }

    /// A connection that took deliveries or events no longer can: the core hears it once.
    fn detach(&mut self, ch: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        if conn.event_stream.take().is_some() {
            let key = key_of(self.shard, ch, conn.generation);
            self.delivery_in
                .push_back(DeliveryInput::Detached { conn: key });
        }
    }

    /// Fails one stream for a bad frame with `error_code`. Other streams and connections
    /// are untouched.
    ///
    /// While the client is still sending, the code goes in STOP_SENDING and our half stays
    /// open: the batches decoded before the bad frame still get their ACKs, in order, and
    /// then our half is finished (FIN), so every ACK written reaches the client. Resetting
    /// our half at once instead (RESET_STREAM) discards ACK bytes not yet delivered, and
    /// orphans batches the stage chain holds: the simulation found ACKs the server counted
    /// as sent that never reached the client, for batches already given log positions.
    ///
    /// Once the client has finished its half (a truncated frame is only found then), a
    /// STOP_SENDING no longer reaches it as an event, and only RESET_STREAM carries the
    /// code: pending batches are orphaned, and ACK bytes in flight are lost with it.
    fn fail_stream(&mut self, ch: ConnectionHandle, id: StreamId, error_code: u32) {
        self.stats.stream_errors += 1;
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        let code = VarInt::from_u32(error_code);
        let _ = conn.quinn.recv_stream(id).stop(code);
        let Some(st) = conn.streams.get_mut(&id) else {
            let _ = conn.quinn.send_stream(id).reset(code);
            return;
        };
        if st.recv_done {
            let _ = conn.quinn.send_stream(id).reset(code);
            conn.streams.remove(&id);
            return;
        }
        // Read nothing more: the receive half is over, and what was buffered after the bad
        // frame is dropped. `finish_if_done` then ends our half after the last ACK.
        st.recv_done = true;
        st.paused = false;
        st.decoder = FrameDecoder::new(self.wire_limits);
        self.finish_if_done(ch, id);
    }

    /// Keeps a batch's message list for a later SUBMIT (see [`MessageLists`]).
    pub fn give_messages(&mut self, list: Vec<Message>) {
        self.lists.give(list);
    }

    fn flush_stream(&mut self, ch: ConnectionHandle, id: StreamId) {
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        let Some(st) = conn.streams.get_mut(&id) else {
            return;
        };
        // quinn takes `Bytes` as they are (`write` would copy them into a new buffer):
        // what is encoded goes as a slice of `out`'s block, and the next frames are
        // encoded into the block's room. A new block is allocated when the room runs low
        // (the old one is freed once quinn has dropped its slices), so a stream allocates
        // about once per `OUT_BLOCK_BYTES` of frames rather than once per write. While
        // quinn is blocked, frames gather in `out` and go as one slice later.
        while !(st.sending.is_empty() && st.out.is_empty()) {
            if st.sending.is_empty() {
                st.hand_out();
            }
            match conn
                .quinn
                .send_stream(id)
                .write_chunks(st.sending.make_contiguous())
            {
                // quinn took the written chunks (left empty) and advanced a partial one.
                Ok(_) => {
                    while st.sending.front().is_some_and(Bytes::is_empty) {
                        st.sending.pop_front();
                    }
                }
                Err(WriteError::Blocked) => return,
                Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                    conn.streams.remove(&id);
                    return;
                }
            }
        }
    }

    /// Finishes our half once the client finished its half and every ACK is out.
    fn finish_if_done(&mut self, ch: ConnectionHandle, id: StreamId) {
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        let Some(st) = conn.streams.get(&id) else {
            return;
        };
        if st.recv_done
            && st.pending.is_empty()
            && st.out.is_empty()
            && st.sending.is_empty()
            && st.decoder.buffered() == 0
        {
            let _ = conn.quinn.send_stream(id).finish();
            conn.streams.remove(&id);
        }
    }
}

impl StreamState {
    /// Queues what `out` holds for quinn, as a slice of its block; a new block when the
    /// room left runs low.
    fn hand_out(&mut self) {
        self.sending.push_back(self.out.split().freeze());
        if self.out.capacity() < OUT_ROOM_MIN_BYTES {
            self.out.reserve(OUT_BLOCK_BYTES);
        }
    }

    /// Makes room for a frame of `bytes` in `out`'s block: when it does not fit, what
    /// `out` holds is queued for quinn and a new block of at least `block` bytes is
    /// taken, so frames are never moved by a growing buffer.
    fn room_for(&mut self, bytes: usize, block: usize) {
        if self.out.capacity() - self.out.len() >= bytes {
            return;
        }
        if !self.out.is_empty() {
            self.sending.push_back(self.out.split().freeze());
        }
        self.out.reserve(bytes.max(block));
    }
}

fn key_of(shard: ShardId, ch: ConnectionHandle, generation: u64) -> ConnKey {
    ConnKey {
        shard,
        handle: ch.0,
        generation,
    }
}

/// Gives back one connection's share of a per-key count, removing the key at zero.
fn release_share<K: std::hash::Hash + Eq, S: std::hash::BuildHasher>(
    counts: &mut HashMap<K, u32, S>,
    key: K,
) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(key) {
        debug_assert!(*e.get() > 0, "a share is released once");
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}
