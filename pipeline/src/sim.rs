//! A deterministic, seeded simulation of courier's ingest path: sim clients and one
//! [`Server`] per shard, joined by a simulated network, all on a virtual clock.
//!
//! ```text
//!   SimClient 0..n  (quinn-proto client Endpoint + Connection, wire v1 sender)
//!        │ datagrams ▲
//!        ▼           │
//!   Network: delay + jitter, loss, reordering, bounded queue (net.rs)
//!        │
//!        ▼  SO_REUSEPORT: shard = hash(client address) % shards
//!   shell model: cid::owner_shard(datagram) names another shard? hand it over
//!        │
//!        ▼
//!   Server of shard k ── poll_batch ──> Ingest of shard k ──> held acks (delay, jitter,
//!        ▲                                                      out of order)
//!        └──────────────────────── ack(ticket, statuses) <──────────┘
//! ```
//!
//! The harness plays the shell's part of the polling contract (see [`crate::server`]):
//! after every input to a server it drains `poll_batch` into the stage chain, acks what
//! is due, drains `poll_transmit` into the network, and fires `handle_timeout` when
//! `poll_timeout` is reached.
//!
//! Invariants it keeps:
//! - the harness reads no clock: [`Sim::new`] takes the base of virtual time from its
//!   caller; every instant is `base + offset`, and nothing depends on the base's value;
//! - every random draw (network, ack delays and order, endpoint and connection ID seeds)
//!   comes from one [`StdRng`] seeded by [`SimConfig::seed`], and every collection that is
//!   iterated is ordered, so one seed gives one trace; [`Sim::digest`] hashes that trace
//!   (sizes and times, not ciphertexts: rustls draws its own key shares);
//! - every loop and queue is bounded, and a run that exceeds [`SimConfig::steps_max`]
//!   panics, naming the seed.
//!
//! Tests (`pipeline/tests/sim.rs`) build scenarios on it; `swarm_of_seeds` draws whole
//! scenarios from seeds (`COURIER_SIM_SEEDS=A..B` runs more), and any failure replays from
//! the seed it prints. Not modelled: a client moving during its handshake (its Initials
//! carry no connection ID a shard can steer by, so [`cid::owner_shard`] cannot route them).

mod client;
mod net;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{StreamId, Transmit};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::cid;
use crate::ingest::Ingest;
use crate::profile::Profile;
use crate::registry::Registry;
use crate::server::{Server, ServerParts, Ticket};
use crate::wire::{self, LogPosition, Status};

pub use client::{
    batch_id, batch_stream_key, ClientPlan, ClientStream, Phase, SimClient, StreamKind, SERVER_NAME,
};
pub use net::{Fate, NetConfig, NetStats};

use net::{Datagram, Network};

/// The address every shard listens on (they share it, as with SO_REUSEPORT).
pub const SERVER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7443);
/// Datagrams asked of one `poll_transmit` (GSO batches, split by the network).
const TRANSMIT_DATAGRAMS_MAX: usize = 10;
/// Passes of one node's pump before it is declared stuck.
const PUMP_PASSES_MAX: usize = 100_000;
/// First port of a client; a migration moves it to a later one.
const CLIENT_PORT_FIRST: u16 = 40_000;

/// TLS for the simulation: a server config with the test certificate, a client config that
/// trusts exactly that certificate. ALPN `courier/1`, TLS 1.3, aws-lc-rs.
#[derive(Clone)]
pub struct SimTls {
    /// For the servers.
    pub server: Arc<QuicServerConfig>,
    /// For the clients.
    pub client: Arc<QuicClientConfig>,
}

impl std::fmt::Debug for SimTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTls").finish_non_exhaustive()
    }
}

impl SimTls {
    /// Builds both configs from a certificate for [`SERVER_NAME`] and its key (tests make
    /// one with `rcgen`). An Ed25519 key keeps handshake sizes, and so traces, fixed.
    pub fn new(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> SimTls {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("the test certificate and key match");
        server.alpn_protocols = vec![wire::ALPN.to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("the test certificate parses");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![wire::ALPN.to_vec()];
        SimTls {
            server: Arc::new(QuicServerConfig::try_from(server).expect("TLS 1.3 with AES-128-GCM")),
            client: Arc::new(QuicClientConfig::try_from(client).expect("TLS 1.3 with AES-128-GCM")),
        }
    }
}

/// When the modelled stage chain answers a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckPolicy {
    /// Virtual time from `poll_batch` to `ack` (a log's commit latency).
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`, drawn per batch: batches of one shard are then
    /// acked out of order.
    pub jitter: Duration,
    /// Ack the batches that fall due together in a random order.
    pub shuffle: bool,
}

impl AckPolicy {
    /// Ack at once, in a random order.
    pub fn immediate() -> AckPolicy {
        AckPolicy {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            shuffle: true,
        }
    }

    /// Ack after `delay` plus up to `jitter`, shuffled.
    pub fn delayed(delay: Duration, jitter: Duration) -> AckPolicy {
        AckPolicy {
            delay,
            jitter,
            shuffle: true,
        }
    }
}

/// A simulation's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The one seed every random draw comes from.
    pub seed: u64,
    /// Servers, one per shard.
    pub shards: usize,
    /// The servers' profile.
    pub profile: Profile,
    /// The network between clients and servers.
    pub net: NetConfig,
    /// How the stage chain acks.
    pub acks: AckPolicy,
    /// Steps before the run is declared stuck.
    pub steps_max: u64,
    /// Model the shell's cross-shard hand-off: a datagram whose connection ID names
    /// another shard goes there. Off, it stays where SO_REUSEPORT put it.
    pub steer_by_cid: bool,
}

impl SimConfig {
    /// `shards` servers running `profile` on a clean network, acking at once.
    pub fn new(seed: u64, shards: usize, profile: Profile) -> SimConfig {
        SimConfig {
            seed,
            shards,
            profile,
            net: NetConfig::clean(),
            acks: AckPolicy::immediate(),
            steps_max: 2_000_000,
            steer_by_cid: true,
        }
    }
}

/// Counters of the simulation's shell model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SimStats {
    /// Steps taken.
    pub steps: u64,
    /// Batches `poll_batch` handed out, all shards.
    pub batches_handed: u64,
    /// `ack` calls made.
    pub acks_given: u64,
    /// Most batches of one `(client, work stream)` handed out and not yet acked, by
    /// [`batch_stream_key`].
    pub outstanding_max: BTreeMap<u32, usize>,
    /// Acks given while an earlier-handed batch of the same stream was still unacked: the
    /// server must still write the ACKs in SUBMIT order.
    pub acks_out_of_order: u64,
    /// Statuses acked, by shard: accepted and otherwise.
    pub accepted_by_shard: BTreeMap<usize, u64>,
}

struct Held {
    due: Instant,
    seq: u64,
    ticket: Ticket,
    batch_id: u64,
    statuses: Vec<Status>,
}

struct Shard {
    server: Server,
    ingest: Ingest,
    held: Vec<Held>,
    /// Per [`batch_stream_key`], the `Held::seq` of each batch handed out and not acked,
    /// in handout order.
    outstanding: BTreeMap<u32, Vec<u64>>,
}

/// The simulation. See the module docs.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    now: Instant,
    rng: StdRng,
    net: Network,
    shards: Vec<Shard>,
    clients: Vec<SimClient>,
    client_addrs: Vec<SocketAddr>,
    client_home: Vec<usize>,
    tls: SimTls,
    held_seq: u64,
    digest: Sha256,
    trace_events: u64,
    stats: SimStats,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.cfg.seed)
            .field("elapsed", &self.elapsed())
            .field("clients", &self.clients.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Trace record tags.
mod tag {
    pub const SEND: u8 = 1;
    pub const DELIVER: u8 = 2;
    pub const BATCH: u8 = 3;
    pub const ACK: u8 = 4;
    pub const CLIENT_ACK: u8 = 5;
    pub const STREAM_ERROR: u8 = 6;
    pub const CLOSED: u8 = 7;
    pub const MIGRATE: u8 = 8;
}

fn addr_id(a: SocketAddr) -> u64 {
    match a.ip() {
        IpAddr::V4(ip) => (u64::from(u32::from(ip)) << 16) | u64::from(a.port()),
        IpAddr::V6(ip) => (u128::from(ip) as u64) ^ u64::from(a.port()),
    }
}

/// The shard SO_REUSEPORT would pick for a datagram from `src`: a hash of the address.
/// FNV-1a, fixed so that traces do not depend on the standard library's hasher.
pub fn reuseport_shard(src: SocketAddr, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    match src.ip() {
        IpAddr::V4(ip) => ip.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(ip) => ip.octets().into_iter().for_each(&mut eat),
    }
    src.port().to_be_bytes().into_iter().for_each(&mut eat);
    (h % shards as u64) as usize
}

fn client_addr(index: usize, port: u16) -> SocketAddr {
    let ip = Ipv4Addr::new(10, 1, (index >> 8) as u8, index as u8);
    SocketAddr::new(IpAddr::V4(ip), port)
}

impl Sim {
    /// Servers for `cfg.shards` shards, sharing `registry`; no clients yet. Virtual time
    /// starts at `base` (any `Instant`: callers pass `Instant::now()`, since `std` has no
    /// other way to make one; nothing depends on its value).
    pub fn new(base: Instant, cfg: SimConfig, tls: &SimTls, registry: Arc<Registry>) -> Sim {
        assert!(
            (1..=usize::from(u8::MAX)).contains(&cfg.shards),
            "1 to 255 shards"
        );
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut reset_key = [0u8; 64];
        rng.fill_bytes(&mut reset_key);
        let shards = (0..cfg.shards)
            .map(|s| {
                let mut seed = [0u8; 32];
                rng.fill_bytes(&mut seed);
                let parts = ServerParts {
                    shard: s as u8,
                    crypto: tls.server.clone(),
                    reset_key,
                    seed,
                };
                Shard {
                    server: Server::new(parts, &cfg.profile, registry.clone()),
                    ingest: Ingest::new(s as u16, cfg.profile.limits.payload_bytes_max, 0),
                    held: Vec::new(),
                    outstanding: BTreeMap::new(),
                }
            })
            .collect();
        Sim {
            net: Network::new(cfg.net.clone()),
            cfg,
            base,
            now: base,
            rng,
            shards,
            clients: Vec::new(),
            client_addrs: Vec::new(),
            client_home: Vec::new(),
            tls: tls.clone(),
            held_seq: 0,
            digest: Sha256::new(),
            trace_events: 0,
            stats: SimStats::default(),
            buf: Vec::new(),
        }
    }

    /// Adds a client that starts connecting now. Returns its index.
    pub fn add_client(&mut self, plan: ClientPlan) -> usize {
        let index = self.clients.len();
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let config = quinn_proto::ClientConfig::new(self.tls.client.clone());
        let addr = client_addr(index, CLIENT_PORT_FIRST);
        let mut client = SimClient::new(
            index,
            self.cfg.seed,
            plan,
            seed,
            config,
            SERVER_ADDR,
            self.now,
        );
        client.drive(self.now);
        self.clients.push(client);
        self.client_addrs.push(addr);
        self.client_home
            .push(reuseport_shard(addr, self.shards.len()));
        self.pump_client(index);
        index
    }

    // ---- time ------------------------------------------------------------------------

    /// The virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// The instant `d` after the start.
    pub fn at(&self, d: Duration) -> Instant {
        self.base + d
    }

    /// Advances to the next event if it is due by `deadline` and handles everything due
    /// then. False when nothing is due by `deadline`.
    pub fn step(&mut self, deadline: Instant) -> bool {
        let Some(at) = self.next_event() else {
            return false;
        };
        if at > deadline {
            return false;
        }
        self.stats.steps += 1;
        assert!(
            self.stats.steps <= self.cfg.steps_max,
            "seed {}: more than {} steps by {:?}: the run does not settle",
            self.cfg.seed,
            self.cfg.steps_max,
            self.elapsed()
        );
        self.now = self.now.max(at);
        let now = self.now;
        // Bounded by the network's queue bound.
        while let Some(d) = self.net.pop_due(now) {
            self.deliver(d);
        }
        for s in 0..self.shards.len() {
            if self.shards[s]
                .server
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.shards[s].server.handle_timeout(now);
            }
            // Always pumped: held acks may have fallen due.
            self.pump_shard(s);
        }
        for c in 0..self.clients.len() {
            if self.clients[c].poll_timeout().is_some_and(|t| t <= now) {
                self.clients[c].handle_timeout(now);
                self.pump_client(c);
            }
        }
        true
    }

    /// Runs every event due by `deadline`, then sets the clock to it.
    pub fn run_until(&mut self, deadline: Instant) {
        while self.step(deadline) {}
        self.now = self.now.max(deadline);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let deadline = self.now + d;
        self.run_until(deadline);
    }

    /// Steps until `done(self)` holds or `limit` of virtual time has passed since the call.
    /// Returns whether `done` holds.
    pub fn run_until_cond(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if !self.step(deadline) {
                self.now = self.now.max(deadline);
                return done(self);
            }
        }
    }

    /// Steps until every client settled (done, closed, or every stream ended).
    pub fn run_until_settled(&mut self, limit: Duration) -> bool {
        self.run_until_cond(limit, |sim| sim.clients.iter().all(SimClient::settled))
    }

    fn next_event(&mut self) -> Option<Instant> {
        let mut next = self.net.next_arrival();
        let mut fold = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for s in &self.shards {
            fold(s.server.poll_timeout());
            fold(s.held.iter().map(|h| h.due).min());
        }
        for c in &mut self.clients {
            fold(c.poll_timeout());
        }
        next
    }

    // ---- the network and the shell model ------------------------------------------------

    fn deliver(&mut self, d: Datagram) {
        let now = self.now;
        self.trace(
            tag::DELIVER,
            &[addr_id(d.src), addr_id(d.dst), d.data.len() as u64],
        );
        if d.dst == SERVER_ADDR {
            let n = self.shards.len();
            let mut shard = reuseport_shard(d.src, n);
            if self.cfg.steer_by_cid {
                if let Some(owner) = cid::owner_shard(&d.data, n) {
                    if owner != shard {
                        self.net.stats.handoffs += 1;
                        shard = owner;
                    }
                }
            }
            self.net.stats.delivered += 1;
            let data = BytesMut::from(&d.data[..]);
            self.shards[shard]
                .server
                .handle_datagram(now, d.src, None, data);
            self.pump_shard(shard);
        } else if let Some(c) = self.client_addrs.iter().position(|a| *a == d.dst) {
            self.net.stats.delivered += 1;
            let mut responses = Vec::new();
            let data = BytesMut::from(&d.data[..]);
            self.clients[c].handle_datagram(now, d.src, data, &mut responses);
            let src = self.client_addrs[c];
            for (t, bytes) in responses {
                self.send_transmit(src, &t, &bytes);
            }
            self.pump_client(c);
        } else {
            self.net.stats.undeliverable += 1;
        }
    }

    fn send_transmit(&mut self, src: SocketAddr, t: &Transmit, bytes: &[u8]) {
        let bytes = &bytes[..t.size];
        let segment = t.segment_size.unwrap_or(bytes.len()).max(1);
        for datagram in bytes.chunks(segment) {
            let fate = self
                .net
                .send(self.now, &mut self.rng, src, t.destination, datagram);
            let fate_code = match fate {
                Fate::Queued(at) => (at - self.base).as_nanos() as u64,
                Fate::Lost => 1,
                Fate::QueueFull => 2,
                Fate::TooLarge => 3,
            };
            self.trace(
                tag::SEND,
                &[
                    addr_id(src),
                    addr_id(t.destination),
                    datagram.len() as u64,
                    fate_code,
                ],
            );
        }
    }

    /// The shell's loop for one shard after an input: batches to the stage chain, due acks
    /// back, datagrams out, until nothing moves.
    fn pump_shard(&mut self, s: usize) {
        let now = self.now;
        for _ in 0..PUMP_PASSES_MAX {
            let mut progressed = false;
            while let Some(batch) = self.shards[s].server.poll_batch() {
                progressed = true;
                self.stats.batches_handed += 1;
                let key = batch_stream_key(batch.batch_id);
                let seq = self.held_seq;
                self.held_seq += 1;
                let shard = &mut self.shards[s];
                let held = shard.outstanding.entry(key).or_default();
                held.push(seq);
                let max = self.stats.outstanding_max.entry(key).or_insert(0);
                *max = (*max).max(held.len());
                let mut statuses = Vec::with_capacity(batch.messages.len());
                shard
                    .ingest
                    .process(batch.business_id, &batch.messages, &mut statuses);
                let jitter = self
                    .rng
                    .random_range(0..=self.cfg.acks.jitter.as_nanos() as u64);
                let due = now + self.cfg.acks.delay + Duration::from_nanos(jitter);
                let messages = batch.messages.len() as u64;
                self.shards[s].held.push(Held {
                    due,
                    seq,
                    ticket: batch.ticket,
                    batch_id: batch.batch_id,
                    statuses,
                });
                self.trace(tag::BATCH, &[s as u64, batch.batch_id, messages]);
            }
            let bound = self.held_bound();
            assert!(
                self.shards[s].held.len() <= bound,
                "seed {}: shard {s} handed out {} unacked batches, more than its bounds allow ({bound})",
                self.cfg.seed,
                self.shards[s].held.len()
            );
            let (mut due, rest): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.shards[s].held)
                .into_iter()
                .partition(|h| h.due <= now);
            self.shards[s].held = rest;
            due.sort_by_key(|h| (h.due, h.seq));
            if self.cfg.acks.shuffle {
                due.shuffle(&mut self.rng);
            }
            for h in due {
                progressed = true;
                self.stats.acks_given += 1;
                let shard = &mut self.shards[s];
                let key = batch_stream_key(h.batch_id);
                let held = shard
                    .outstanding
                    .get_mut(&key)
                    .expect("counted when handed out");
                let at = held
                    .iter()
                    .position(|&q| q == h.seq)
                    .expect("handed out once, acked once");
                if at > 0 {
                    self.stats.acks_out_of_order += 1;
                }
                held.remove(at);
                if held.is_empty() {
                    shard.outstanding.remove(&key);
                }
                let accepted = h
                    .statuses
                    .iter()
                    .filter(|st| matches!(st, Status::Accepted(_)))
                    .count() as u64;
                *self.stats.accepted_by_shard.entry(s).or_insert(0) += accepted;
                shard.server.ack(now, h.ticket, &h.statuses);
                let mut rec = vec![s as u64, h.batch_id];
                rec.extend(h.statuses.iter().map(|st| match st {
                    Status::Accepted(p) | Status::Duplicate(p) => p.0,
                    Status::Throttled { retry_after_ms } => u64::from(*retry_after_ms),
                    Status::Rejected(r) => *r as u64,
                }));
                self.trace(tag::ACK, &rec);
            }
            let mut buf = std::mem::take(&mut self.buf);
            while let Some(t) =
                self.shards[s]
                    .server
                    .poll_transmit(now, TRANSMIT_DATAGRAMS_MAX, &mut buf)
            {
                progressed = true;
                self.send_transmit(SERVER_ADDR, &t, &buf);
            }
            self.buf = buf;
            if !progressed {
                return;
            }
        }
        panic!("seed {}: shard {s} never quiesced", self.cfg.seed);
    }

    /// Batches a shard can hand out before acks: the product of its bounds.
    fn held_bound(&self) -> usize {
        let l = &self.cfg.profile.limits;
        l.connections_per_shard_max as usize
            * l.streams_per_connection_max as usize
            * l.batches_in_flight_per_stream_max as usize
            // Orphans: batches of streams that failed while the stage chain held them.
            * 2
    }

    fn pump_client(&mut self, c: usize) {
        let now = self.now;
        let src = self.client_addrs[c];
        let mut buf = std::mem::take(&mut self.buf);
        for _ in 0..PUMP_PASSES_MAX {
            let Some(t) = self.clients[c].poll_transmit(now, TRANSMIT_DATAGRAMS_MAX, &mut buf)
            else {
                break;
            };
            self.send_transmit(src, &t, &buf);
        }
        self.buf = buf;
        for ev in std::mem::take(&mut self.clients[c].events) {
            match ev {
                client::ClientEvent::Ack { batch_id, statuses } => {
                    self.trace(tag::CLIENT_ACK, &[c as u64, batch_id, statuses as u64])
                }
                client::ClientEvent::StreamError { stream, code } => {
                    self.trace(tag::STREAM_ERROR, &[c as u64, stream, u64::from(code)])
                }
                client::ClientEvent::Closed => self.trace(tag::CLOSED, &[c as u64]),
            }
        }
    }

    fn trace(&mut self, tag: u8, fields: &[u64]) {
        self.trace_events += 1;
        self.digest.update([tag]);
        self.digest
            .update(((self.now - self.base).as_nanos() as u64).to_le_bytes());
        for f in fields {
            self.digest.update(f.to_le_bytes());
        }
    }

    // ---- what a test does -------------------------------------------------------------

    /// Client `c` sends HELLO now (for plans without `auto_hello`).
    pub fn client_send_hello(&mut self, c: usize) {
        self.clients[c].send_hello();
        self.after_client_action(c);
    }

    /// Client `c` opens a stream and writes `bytes` (finishing it if `fin`). `None` when
    /// the server granted no stream credit.
    pub fn client_open_raw(&mut self, c: usize, bytes: &[u8], fin: bool) -> Option<StreamId> {
        let id = self.clients[c].open_raw(bytes, fin);
        self.after_client_action(c);
        id
    }

    /// Client `c` writes `bytes` on its stream `id` after what it queued, and no SUBMIT
    /// after them.
    pub fn client_inject(&mut self, c: usize, id: StreamId, bytes: &[u8], fin: bool) {
        self.clients[c].inject(id, bytes, fin);
        self.after_client_action(c);
    }

    /// Pauses or resumes the SUBMITs of client `c`'s work stream `work_index`.
    pub fn client_pause(&mut self, c: usize, work_index: usize, paused: bool) {
        self.clients[c].pause(work_index, paused);
        self.after_client_action(c);
    }

    /// Client `c` sends STOP_SENDING with `code` on stream `id`.
    pub fn client_stop_receiving(&mut self, c: usize, id: StreamId, code: u32) {
        self.clients[c].stop_receiving(id, code);
        self.after_client_action(c);
    }

    fn after_client_action(&mut self, c: usize) {
        let now = self.now;
        self.clients[c].drive(now);
        self.pump_client(c);
    }

    /// Moves client `c` to a new address (a NAT rebinding), chosen so that SO_REUSEPORT
    /// sends its datagrams to a shard other than the one that accepted its connection
    /// (when there are several). Datagrams to the old address are lost. The client then
    /// sends a PING: a server learns a client's new address only from a datagram it sends,
    /// and a client waiting for ACKs sends nothing (no keep-alive), so without it the
    /// server would keep answering the dead address until the idle timeout. Returns the
    /// shard the new address hashes to.
    pub fn migrate_client(&mut self, c: usize) -> usize {
        let n = self.shards.len();
        let old = self.client_addrs[c];
        let home = self.client_home[c];
        // Bounded: a hash spreads 1000 ports over any number of shards up to 255.
        let new = (1..=1000u16)
            .map(|k| client_addr(c, old.port() + k))
            .find(|a| n == 1 || reuseport_shard(*a, n) != home)
            .expect("some port hashes to another shard");
        self.client_addrs[c] = new;
        self.trace(tag::MIGRATE, &[c as u64, addr_id(old), addr_id(new)]);
        self.clients[c].ping();
        self.after_client_action(c);
        reuseport_shard(new, n)
    }

    /// Shuts shard `s` down: [`Server::close_all`] with `code`, as the shell does on a
    /// signal. Batches the stage chain holds are still acked when due.
    pub fn shutdown_shard(&mut self, s: usize, code: u32, reason: &'static [u8]) {
        let now = self.now;
        self.shards[s].server.close_all(now, code, reason);
        self.pump_shard(s);
    }

    /// Replaces the network's settings (datagrams in flight keep their fate).
    pub fn set_net(&mut self, net: NetConfig) {
        self.net.set_config(net);
    }

    // ---- what a test reads ------------------------------------------------------------

    /// The settings.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Client `c`.
    pub fn client(&self, c: usize) -> &SimClient {
        &self.clients[c]
    }

    /// Every client.
    pub fn clients(&self) -> &[SimClient] {
        &self.clients
    }

    /// The shard that accepted client `c`'s connection (its first address's hash).
    pub fn client_home_shard(&self, c: usize) -> usize {
        self.client_home[c]
    }

    /// Client `c`'s current address.
    pub fn client_address(&self, c: usize) -> SocketAddr {
        self.client_addrs[c]
    }

    /// The server of shard `s`.
    pub fn server(&self, s: usize) -> &Server {
        &self.shards[s].server
    }

    /// Shard `s`'s ingest stage.
    pub fn ingest(&self, s: usize) -> &Ingest {
        &self.shards[s].ingest
    }

    /// Batches shard `s` handed out that the modelled stage chain has not acked yet.
    pub fn held_batches(&self, s: usize) -> usize {
        self.shards[s].held.len()
    }

    /// The network's counters.
    pub fn net_stats(&self) -> &NetStats {
        &self.net.stats
    }

    /// The shell model's counters.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// Datagrams in flight.
    pub fn datagrams_in_flight(&self) -> usize {
        self.net.in_flight()
    }

    /// Hash of the trace so far: every datagram's size, route, fate and time, every batch
    /// handed out, every ack and its positions, every ACK, stream error and close a client
    /// saw. Two runs from one seed have one digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut d = self.digest.clone();
        d.update(self.trace_events.to_le_bytes());
        d.finalize().into()
    }

    /// Checks that no log position was given to two messages, across every client, and
    /// that each position names a shard that exists. Returns the positions counted.
    pub fn check_positions_unique(&self) -> usize {
        let mut seen: BTreeMap<LogPosition, (usize, u64)> = BTreeMap::new();
        for (c, client) in self.clients.iter().enumerate() {
            for (&id, &p) in client.accepted() {
                assert!(
                    usize::from(p.shard()) < self.shards.len(),
                    "seed {}: position {p:?} names no shard",
                    self.cfg.seed
                );
                if let Some(prev) = seen.insert(p, (c, id)) {
                    panic!(
                        "seed {}: position {p:?} given to message {id:#x} of client {c} and {:#x} of client {}",
                        self.cfg.seed, prev.1, prev.0
                    );
                }
            }
        }
        seen.len()
    }
}
