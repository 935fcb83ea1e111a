//! [`Sim`]: sim clients and one simulated courier node ([`SimNode`]: the real shard
//! cores over fault-injecting disks), joined by a simulated network, all on a virtual
//! clock.
//!
//! ```text
//!   SimClient 0..n  (quinn-proto client Endpoint + Connection, wire v1 sender)
//!        │ datagrams ▲
//!        ▼           │
//!   Network: delay + jitter, loss, duplication, reordering, bounded queue (net.rs)
//!        │
//!        ▼  SO_REUSEPORT: shard = hash(client address) % shards
//!   shell model: cid::owner_shard(datagram) names another shard? hand it over
//!   (the real shell's placement of new connections, `courier::placement`, and the
//!   kernel's steering by connection ID are not modelled: the core sees the same
//!   datagrams either way, only on other shards)
//!        │
//!        ▼
//!   SimNode: courier_pipeline::node::Shard per shard (QUIC, stage chain, group commit)
//!        │ Io ──> MemStorage per shard (latency, torn writes at a crash, failed fsync,
//!        │        full disk); deltas between shards; checkpoints kept
//!        └── crash (armed after any storage operation, or at any step) ──> boot: recovery
//! ```
//!
//! The harness plays the shell's part of the polling contract (see
//! `courier_pipeline::node`): after every input to a shard it drains `poll_transmit` into
//! the network, performs `poll_io` on the shard's disk and delivers `poll_event`, and it
//! fires `handle_timeout` when `poll_timeout` is reached.
//!
//! Invariants it keeps:
//! - the harness reads no clock: [`Sim::new`] takes the base of virtual time from its
//!   caller; every instant is `base + offset`, wall-clock time is a fixed epoch plus the
//!   same offset, and nothing depends on the base's value;
//! - every random draw (network, disk latency and tearing, endpoint, connection ID, log
//!   key and node seeds) comes from one [`StdRng`] seeded by [`SimConfig::seed`], and
//!   every collection that is iterated is ordered, so one seed gives one trace;
//!   [`Sim::digest`] hashes that trace (sizes and times, not ciphertexts: rustls draws
//!   its own key shares);
//! - every loop and queue is bounded, and a run that exceeds [`SimConfig::steps_max`]
//!   panics, naming the seed and the step.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier_pipeline::cid;
use courier_pipeline::node::{Now, PlantedBugs};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::{DerivedKeys, RootKey};
use courier_pipeline::server::Server;
use courier_pipeline::wire::{self, LogPosition};
use courier_pipeline::ShardId;
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{StreamId, Transmit};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::client::{self, ClientPlan, SimClient, SERVER_NAME};
use crate::net::{Datagram, Fate, NetConfig, NetStats, Network};
use crate::node::{DiskOp, NodeSetup, SimNode, StorageConfig};

/// The address every shard listens on (they share it, as with SO_REUSEPORT).
pub const SERVER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7443);
/// Wall-clock time at the start of every simulation, unix ms (2026-01-01).
pub const EPOCH_UNIX_MS: u64 = 1_767_225_600_000;
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
    /// Builds both configs from a certificate for [`SERVER_NAME`] and its key. An Ed25519
    /// key keeps handshake sizes, and so traces, fixed.
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

    /// A self-signed certificate for [`SERVER_NAME`] with an Ed25519 key from a fixed
    /// seed: the same bytes every run, and fixed-size signatures.
    pub fn fixed() -> SimTls {
        let kp = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32])
            .expect("a 32-byte seed");
        let pkcs8 = kp.to_pkcs8().expect("pkcs8").as_ref().to_vec();
        let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).expect("an Ed25519 key");
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .expect("a valid name")
            .self_signed(&key)
            .expect("self-signed");
        SimTls::new(
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8)),
        )
    }
}

/// A simulation's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The one seed every random draw comes from.
    pub seed: u64,
    /// Shards of the node.
    pub shards: usize,
    /// The node's profile.
    pub profile: Profile,
    /// The network between clients and the node.
    pub net: NetConfig,
    /// The node's disks.
    pub storage: StorageConfig,
    /// Steps before the run is declared stuck.
    pub steps_max: u64,
    /// Model the shell's cross-shard hand-off: a datagram whose connection ID names
    /// another shard goes there. Off, it stays where SO_REUSEPORT put it.
    pub steer_by_cid: bool,
    /// Test-only faults planted in the shard cores.
    pub bugs: PlantedBugs,
}

impl SimConfig {
    /// `shards` shards running `profile` on a clean network and a fast disk.
    pub fn new(seed: u64, shards: usize, profile: Profile) -> SimConfig {
        SimConfig {
            seed,
            shards,
            profile,
            net: NetConfig::clean(),
            storage: StorageConfig::fast(),
            steps_max: 2_000_000,
            steer_by_cid: true,
            bugs: PlantedBugs::default(),
        }
    }
}

/// Counters of the simulation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SimStats {
    /// Steps taken.
    pub steps: u64,
    /// Crashes of the node.
    pub crashes: u64,
    /// Commit writes completed.
    pub writes_completed: u64,
}

/// Trace record tags.
mod tag {
    pub const SEND: u8 = 1;
    pub const DELIVER: u8 = 2;
    pub const DISK: u8 = 3;
    pub const CLIENT_ACK: u8 = 5;
    pub const STREAM_ERROR: u8 = 6;
    pub const CLOSED: u8 = 7;
    pub const MIGRATE: u8 = 8;
    pub const CRASH: u8 = 9;
    pub const BOOT: u8 = 10;
}

fn addr_id(a: SocketAddr) -> u64 {
    match a.ip() {
        IpAddr::V4(ip) => (u64::from(u32::from(ip)) << 16) | u64::from(a.port()),
        IpAddr::V6(ip) => (u128::from(ip) as u64) ^ u64::from(a.port()),
    }
}

/// The shard SO_REUSEPORT would pick for a datagram from `src`: a hash of the address.
/// FNV-1a, fixed so that traces do not depend on the standard library's hasher.
pub fn reuseport_shard(src: SocketAddr, shards: usize) -> ShardId {
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
    ShardId::try_from((h % shards as u64) as usize).expect("shards are at most SHARDS_MAX")
}

fn client_addr(index: usize, port: u16) -> SocketAddr {
    let ip = Ipv4Addr::new(10, 1, (index >> 8) as u8, index as u8);
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The simulation. See the module docs.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    now: Instant,
    rng: StdRng,
    net: Network,
    node: SimNode,
    clients: Vec<SimClient>,
    client_addrs: Vec<SocketAddr>,
    client_home: Vec<ShardId>,
    tls: SimTls,
    digest: Sha256,
    trace_events: u64,
    stats: SimStats,
    buf: Vec<u8>,
    disk_trace: Vec<DiskOp>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.cfg.seed)
            .field("elapsed", &self.elapsed())
            .field("clients", &self.clients)
            .field("node", &self.node)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// A node of `cfg.shards` shards for the businesses of `registry` (each gets a root
    /// key drawn from the seed), booted on empty disks; no clients yet. Virtual time
    /// starts at `base` (any `Instant`: callers pass `Instant::now()`, since `std` has no
    /// other way to make one; nothing depends on its value).
    pub fn new(base: Instant, cfg: SimConfig, tls: &SimTls, registry: Arc<Registry>) -> Sim {
        assert!(
            (1..=usize::from(u8::MAX)).contains(&cfg.shards),
            "1 to 255 shards"
        );
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut keys = DerivedKeys::new();
        for b in registry.iter() {
            let mut root = [0u8; 32];
            rng.fill_bytes(&mut root);
            keys.insert_root(b.id, &RootKey::from_bytes(root));
        }
        let mut master = [0u8; 32];
        rng.fill_bytes(&mut master);
        let setup = NodeSetup {
            shards: cfg.shards,
            profile: cfg.profile.clone(),
            registry,
            crypto: tls.server.clone(),
            master,
            keys: Arc::new(keys),
            storage: cfg.storage.clone(),
            bugs: cfg.bugs,
        };
        let node = SimNode::new(setup, rng.next_u64());
        let mut sim = Sim {
            net: Network::new(cfg.net.clone()),
            cfg,
            base,
            now: base,
            rng,
            node,
            clients: Vec::new(),
            client_addrs: Vec::new(),
            client_home: Vec::new(),
            tls: tls.clone(),
            digest: Sha256::new(),
            trace_events: 0,
            stats: SimStats::default(),
            buf: Vec::new(),
            disk_trace: Vec::new(),
        };
        sim.boot().expect("empty disks boot");
        sim
    }

    /// Adds a client that starts connecting now. Returns its index.
    pub fn add_client(&mut self, plan: ClientPlan) -> usize {
        assert!(
            !(plan.reconnect || plan.duplicate_every > 0) || plan.resend,
            "reconnects and duplicates need resends"
        );
        let index = self.clients.len();
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let config = quinn_proto::ClientConfig::new(self.tls.client.clone());
        let addr = match plan.host {
            // Ports above the ones migrations take (1000 past the first).
            Some(host) => client_addr(host, CLIENT_PORT_FIRST + 1001 + index as u16),
            None => client_addr(index, CLIENT_PORT_FIRST),
        };
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
            .push(reuseport_shard(addr, self.cfg.shards));
        self.pump_client(index);
        index
    }

    // ---- time ------------------------------------------------------------------------

    /// The virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    fn clock(&self) -> Now {
        Now {
            at: self.now,
            unix_ms: EPOCH_UNIX_MS + (self.now - self.base).as_millis() as u64,
        }
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
            "seed {}: more than {} steps by {:?} (step {}): the run does not settle",
            self.cfg.seed,
            self.cfg.steps_max,
            self.elapsed(),
            self.stats.steps,
        );
        self.now = self.now.max(at);
        let now = self.clock();
        // Bounded by the network's queue bound.
        while let Some(d) = self.net.pop_due(now.at) {
            self.deliver(d);
        }
        let done = self.node.complete_writes(now);
        self.stats.writes_completed += done as u64;
        self.node.handle_timeouts(now);
        self.pump_node();
        for c in 0..self.clients.len() {
            if self.clients[c].poll_timeout().is_some_and(|t| t <= now.at) {
                self.clients[c].handle_timeout(now.at);
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
        fold(self.node.next_timeout());
        fold(self.node.next_write_due());
        for c in &mut self.clients {
            fold(c.poll_timeout());
        }
        next
    }

    // ---- the network and the shell model ------------------------------------------------

    fn deliver(&mut self, d: Datagram) {
        let now = self.clock();
        self.trace(
            tag::DELIVER,
            &[addr_id(d.src), addr_id(d.dst), d.data.len() as u64],
        );
        if d.dst == SERVER_ADDR {
            if !self.node.is_up() {
                self.net.stats.undeliverable += 1;
                return;
            }
            let n = self.cfg.shards;
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
            self.node.handle_datagram(shard, now, d.src, data);
            self.pump_node();
        } else if let Some(c) = self.client_addrs.iter().position(|a| *a == d.dst) {
            self.net.stats.delivered += 1;
            let mut responses = Vec::new();
            let data = BytesMut::from(&d.data[..]);
            self.clients[c].handle_datagram(now.at, d.src, data, &mut responses);
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

    /// The shell's loop for every shard after an input: storage operations, events and
    /// datagrams out, until nothing moves. An armed crash that struck takes the node down.
    fn pump_node(&mut self) {
        for _ in 0..PUMP_PASSES_MAX {
            if !self.node.is_up() {
                return;
            }
            let mut progressed = false;
            for s in 0..self.cfg.shards {
                let now = self.clock();
                let mut trace = std::mem::take(&mut self.disk_trace);
                progressed |= self.node.pump(s, now, &mut self.rng, &mut trace);
                for op in trace.drain(..) {
                    let code = match op {
                        DiskOp::Write(n) => n,
                        DiskOp::Completed => 1,
                        DiskOp::Metadata => 2,
                    };
                    self.trace(tag::DISK, &[s as u64, code]);
                }
                self.disk_trace = trace;
                if self.node.crash_due() {
                    self.crash_node();
                    return;
                }
                let mut buf = std::mem::take(&mut self.buf);
                while let Some(t) =
                    self.node
                        .poll_transmit(s, now.at, TRANSMIT_DATAGRAMS_MAX, &mut buf)
                {
                    progressed = true;
                    self.send_transmit(SERVER_ADDR, &t, &buf);
                }
                self.buf = buf;
            }
            if !progressed {
                return;
            }
        }
        panic!("seed {}: the node never quiesced", self.cfg.seed);
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
    pub fn migrate_client(&mut self, c: usize) -> ShardId {
        let n = self.cfg.shards;
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

    /// Power loss of the node: every shard's state and writes in flight are gone, and
    /// every disk keeps its synced bytes and a random prefix of the rest.
    pub fn crash_node(&mut self) {
        self.stats.crashes += 1;
        self.trace(tag::CRASH, &[self.stats.crashes]);
        self.node.crash();
    }

    /// Cuts the node's power after `ops` more storage operations.
    pub fn arm_crash(&mut self, ops: usize) {
        self.node.arm_crash(ops);
    }

    /// Starts the node again: every shard recovers its log, the idempotency table is
    /// rebuilt from them, detectors restore their checkpoints.
    pub fn boot(&mut self) -> Result<(), courier_pipeline::log::RecoverError> {
        let now = self.clock();
        self.node.boot(now, &mut self.rng)?;
        self.trace(tag::BOOT, &[u64::from(self.node.boots())]);
        self.pump_node();
        Ok(())
    }

    /// Asks every shard to stop gracefully (as on SIGTERM).
    pub fn stop_node(&mut self) {
        let now = self.clock();
        self.node.begin_stop(now);
        self.pump_node();
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

    /// The shard that accepted client `c`'s first connection (its first address's hash).
    pub fn client_home_shard(&self, c: usize) -> ShardId {
        self.client_home[c]
    }

    /// Client `c`'s current address.
    pub fn client_address(&self, c: usize) -> SocketAddr {
        self.client_addrs[c]
    }

    /// The node.
    pub fn node(&self) -> &SimNode {
        &self.node
    }

    /// The node, to inject disk faults.
    pub fn node_mut(&mut self) -> &mut SimNode {
        &mut self.node
    }

    /// The QUIC server of shard `s` (panics while the node is down).
    pub fn server(&self, s: usize) -> &Server {
        self.node.core(s).server()
    }

    /// Batches shard `s` took and has not answered yet (0 while the node is down).
    pub fn batches_waiting(&self, s: usize) -> usize {
        if self.node.is_up() {
            self.node.core(s).batches_waiting()
        } else {
            0
        }
    }

    /// Server counters summed over the shards (`None` while the node is down).
    pub fn server_totals(&self) -> Option<courier_pipeline::server::ServerStats> {
        if !self.node.is_up() {
            return None;
        }
        let mut t = courier_pipeline::server::ServerStats::default();
        for s in 0..self.cfg.shards {
            let st = self.server(s).stats();
            t.batches_in += st.batches_in;
            t.acks_out += st.acks_out;
            t.acks_orphaned += st.acks_orphaned;
            t.acks_reordered += st.acks_reordered;
            t.stream_errors += st.stream_errors;
            t.auth_failures += st.auth_failures;
            t.stream_pending_max = t.stream_pending_max.max(st.stream_pending_max);
        }
        Some(t)
    }

    /// The network's counters.
    pub fn net_stats(&self) -> &NetStats {
        &self.net.stats
    }

    /// The simulation's counters.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// Datagrams in flight.
    pub fn datagrams_in_flight(&self) -> usize {
        self.net.in_flight()
    }

    /// Hash of the trace so far: every datagram's size, route, fate and time, every disk
    /// operation, crash and boot, every ACK, stream error and close a client saw. Two runs
    /// from one seed have one digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut d = self.digest.clone();
        d.update(self.trace_events.to_le_bytes());
        d.finalize().into()
    }

    /// Every status the connections of `business_id` heard, merged (copies of an event
    /// dropped), by client message id, in the order the business first heard each:
    /// (event, status). A business dedupes by event id across its connections, so a copy
    /// heard later on another connection (a push repeated after a crash) is no new event.
    pub fn business_statuses(
        &self,
        business_id: u32,
    ) -> BTreeMap<u64, Vec<(LogPosition, courier_pipeline::wire::delivery::StatusKind)>> {
        let mut all = Vec::new();
        for (c, client) in self.clients.iter().enumerate() {
            if client.business_id() != Some(business_id) {
                continue;
            }
            let l = client.ledger();
            for (&(event, id, kind), &(at, _)) in l.heard.iter().zip(&l.heard_at) {
                all.push((at, c, event, id, kind));
            }
        }
        all.sort_by_key(|&(at, c, ..)| (at, c));
        let mut seen = std::collections::BTreeSet::new();
        let mut out: BTreeMap<u64, Vec<_>> = BTreeMap::new();
        for (_, _, event, id, kind) in all {
            if seen.insert(event) {
                out.entry(id).or_default().push((event, kind));
            }
        }
        out
    }

    /// Whether every message stored for a client with events has its final status,
    /// heard by some connection of its business.
    pub fn statuses_settled(&self) -> bool {
        use courier_pipeline::wire::delivery::StatusKind;
        self.clients.iter().enumerate().all(|(c, client)| {
            let Some(b) = client.business_id().filter(|_| client.plan().events) else {
                return true;
            };
            let merged = self.business_statuses(b);
            client.ledger().outcomes.keys().all(|&n| {
                client.ledger().stored_at(n).is_none()
                    || merged.get(&client::message_id(c, n)).is_some_and(|h| {
                        h.iter()
                            .any(|(_, k)| k.is_final() && *k != StatusKind::Read)
                    })
            })
        })
    }

    /// Whether every reply the edge had accepted reached a connection of its business
    /// (when the business takes events at all).
    pub fn replies_settled(&self) -> bool {
        self.clients.iter().filter_map(|c| c.devices()).all(|d| {
            d.ledger.replies_accepted.iter().all(|(event, reply)| {
                let mut subscribers = self
                    .clients
                    .iter()
                    .filter(|c| c.plan().events && c.business_id() == Some(reply.business_id))
                    .peekable();
                subscribers.peek().is_none()
                    || subscribers.any(|c| c.ledger().inbound.contains_key(event))
            })
        })
    }

    /// Checks that no log position was given to two messages, across every client, and
    /// that each position names a shard that exists. Returns the positions counted.
    pub fn check_positions_unique(&self) -> usize {
        let mut seen: BTreeMap<LogPosition, (usize, u64)> = BTreeMap::new();
        for (c, client) in self.clients.iter().enumerate() {
            for (&id, &p) in client.accepted() {
                assert!(
                    p.shard_id().is_some_and(|s| s.within(self.cfg.shards)),
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
