//! Starting and stopping a whole server: TLS identity, one socket and one pinned thread per
//! shard, the hand-off channels between them.
//!
//! The shards share the listen port through SO_REUSEPORT. A reuseport program steers
//! each datagram of an established connection to the shard named in its connection ID;
//! a new connection's Initials go by the kernel's 4-tuple hash, and the shard they reach
//! places the connection on the shard with the fewest ([`crate::placement`]). Where the
//! kernel refuses the program, the hash places connections and a datagram that lands on
//! the wrong shard is forwarded by connection ID (see [`crate::shard`]).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use courier_pipeline::detect::{Delta, Detector};
use courier_pipeline::idempotency::{
    idempotency_key, Idempotency, RestoreSet, RestoredId, RESTORE_BATCH,
};
use courier_pipeline::log::{LogConfig, OwnedRecord};
use courier_pipeline::node::{self, Control, PeerMsg, Replay, ShardParts, ShardStats};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::DerivedKeys;
use courier_pipeline::seal::{Sealer, SealerConfig};
use courier_pipeline::server::{
    retry_token_key, stateless_reset_key, Server, ServerParts, ServerStats,
};
use courier_pipeline::wire::LogPosition;
use courier_pipeline::ShardId;
use crossbeam_channel::{Receiver, Sender};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::control::ToControl;
use crate::metrics::{MetricsServer, MetricsSource};
use crate::placement::{Loads, Placement};
use crate::shard::{Forwarded, Peer, Shard, DELTA_QUEUE_MAX, FORWARD_QUEUE_MAX, PEER_QUEUE_MAX};
use crate::store::{MasterKeyText, ShardStore, StoreError};
use crate::uring::{self, RingConfig, RingError, UdpRing};

/// Expanded recipient keys each shard's sealer caches (about 0.6 KiB each).
pub const SEAL_CACHE_KEYS: usize = 4096;
/// Control requests queued towards one shard.
const CONTROL_QUEUE_MAX: usize = 64;

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A file of the data directory could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint's TCP address could not be bound.
    #[error("cannot bind the metrics address {addr} (server.metrics_listen; \"\" disables it): {source}")]
    MetricsBind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The listen socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS identity is unusable.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The CPUs could not be listed or a thread not pinned.
    #[error("CPU setup failed: {0}")]
    Cpu(#[source] std::io::Error),
    /// An io_uring failed.
    #[error("shard {shard}: {source}")]
    Ring {
        /// The shard.
        shard: ShardId,
        /// The error.
        #[source]
        source: RingError,
    },
    /// A shard's log could not be opened (recovery found corruption, wrong master key, IO).
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: ShardId,
        /// The error.
        #[source]
        source: StoreError,
    },
    /// The data directory is in use by another server, or its lock file is unusable.
    #[error(transparent)]
    Lock(#[from] crate::store::LockError),
    /// A secret file is open to its group or others (the message says how to fix it).
    #[error("{0}")]
    Insecure(String),
    /// The business root keys could not be loaded or created.
    #[error("business keys: {0}")]
    BusinessKeys(String),
    /// The server's region is not in the profile, its directory is missing or not
    /// writable, or a business of the registry names a region the profile lacks.
    #[error("{0}")]
    Region(String),
    /// A shard's nonce epoch no longer fits the sealer's 32 bits: rotate the log's keyring.
    #[error("shard {0}: nonce epoch exhausted")]
    EpochExhausted(ShardId),
    /// A shard thread panicked: a bug.
    #[error("shard {0} panicked")]
    Panicked(ShardId),
}

/// What `start` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The validated profile.
    pub profile: Profile,
    /// Where the TLS identity (and later the log) lives.
    pub data_dir: PathBuf,
    /// Businesses allowed to send.
    pub registry: Arc<Registry>,
    /// The file `registry` came from, if any: re-read when it changes, so tier, rate and
    /// exemption changes (and new businesses) take effect without a restart.
    pub registry_file: Option<PathBuf>,
    /// The key that wraps the log's data keys.
    pub master_key: MasterKeyText,
    /// The region this server serves (`None`: the main server, businesses without a
    /// region). `data_dir` is then the region's directory, which must exist; only the
    /// region's businesses (and platform credentials) of `registry` are admitted.
    pub region: Option<String>,
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    shutdown: Arc<AtomicBool>,
    peers: Vec<Peer>,
    threads: Vec<JoinHandle<Result<ServerStats, ServeError>>>,
    control: Option<JoinHandle<()>>,
    counters: Vec<Arc<ShardStats>>,
    metrics: Option<MetricsServer>,
    /// Held until the shards have stopped (dropped last, with the rest of `Running`).
    _lock: crate::store::DataDirLock,
}

/// Totals over every shard, as published by the shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages accepted.
    pub accepted: u64,
    /// Messages answered with any other status.
    pub not_accepted: u64,
    /// Batches acked.
    pub batches: u64,
    /// Datagrams forwarded between shards.
    pub forwarded: u64,
    /// Live connections.
    pub connections: u64,
    /// Group commits completed.
    pub commits: u64,
    /// Shards whose log failed.
    pub logs_failed: u64,
    /// Messages answered `duplicate`.
    pub duplicates: u64,
    /// Messages the detector throttled.
    pub detect_throttled: u64,
    /// Messages the detector rejected (messaging limit reached, sender paused).
    pub detect_rejected: u64,
    /// Integrity signals raised.
    pub signals: u64,
}

impl Running {
    /// The address the shards listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's certificate, for clients to pin.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The address `GET /metrics` answers on; `None` when `server.metrics_listen` is "".
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.threads.len()
    }

    /// Each shard's live connections (index = shard).
    pub fn shard_connections(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// Counters summed over the shards.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.counters {
            let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            t.accepted += r(&c.accepted);
            t.not_accepted += r(&c.not_accepted);
            t.batches += r(&c.batches);
            t.forwarded += r(&c.forwarded);
            t.connections += r(&c.connections);
            t.commits += r(&c.commits);
            t.logs_failed += r(&c.log_failed);
            t.duplicates += r(&c.duplicates);
            t.detect_throttled += r(&c.detect_throttled);
            t.detect_rejected += r(&c.detect_rejected);
            t.signals += r(&c.signals);
        }
        t
    }

    /// Asks every shard to close its connections and stop.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        for p in &self.peers {
            p.waker.wake();
        }
    }

    /// A handle that can request shutdown from another thread (a signal handler thread).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: self.shutdown.clone(),
            peers: self.peers.clone(),
        }
    }

    /// Waits for every shard to stop, then for the control thread to write their final
    /// detector checkpoints and status, then stops the metrics endpoint (it answers until
    /// then, so a scrape can watch the drain); returns the shards' final counters.
    pub fn join(self) -> Result<Vec<ServerStats>, ServeError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for (i, t) in self.threads.into_iter().enumerate() {
            let shard = ShardId::try_from(i).expect("a thread per shard");
            match t.join().map_err(|_| ServeError::Panicked(shard)) {
                Ok(Ok(stats)) => out.push(stats),
                Ok(Err(e)) | Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(self.peers);
        if let Some(c) = self.control {
            let _ = c.join();
        }
        if let Some(m) = self.metrics {
            m.stop();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Requests shutdown of a [`Running`] server.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    peers: Vec<Peer>,
}

impl ShutdownHandle {
    /// Asks every shard to stop.
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::Release);
        for p in &self.peers {
            p.waker.wake();
        }
    }
}

/// Loads the TLS identity of `data_dir`, creating a self-signed one on first start.
/// The key file is written with mode 0600 and never overwritten.
pub fn tls_identity(
    data_dir: &Path,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), ServeError> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join("cert.der");
    let key_path = dir.join("key.der");
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServeError::File { path, source }
    };
    if cert_path.exists() && key_path.exists() {
        crate::store::check_private_file(&key_path).map_err(ServeError::Insecure)?;
        let cert = fs::read(&cert_path).map_err(file_err(&cert_path))?;
        let key = fs::read(&key_path).map_err(file_err(&key_path))?;
        return Ok((
            CertificateDer::from(cert),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    crate::store::create_private_dir(&dir).map_err(file_err(&dir))?;
    let (cert, key) = crate::tls::self_signed(&["localhost".to_string()]);
    let PrivateKeyDer::Pkcs8(pkcs8) = &key else {
        return Err(ServeError::Tls("generated key is not PKCS#8".into()));
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(file_err(&key_path))?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .and_then(|_| f.write_all(pkcs8.secret_pkcs8_der()))
        .and_then(|_| f.sync_all())
        .map_err(file_err(&key_path))?;
    crate::store::write_file_atomically(&cert_path, cert.as_ref(), 0o644)
        .map_err(file_err(&cert_path))?;
    Ok((cert, key))
}

/// The ring of one shard: the profile's `[io]` section (checked against the ring's bounds
/// when it loaded) and the two sizes that are not knobs, from the same home.
fn ring_config(profile: &Profile) -> RingConfig {
    let io = &profile.io;
    RingConfig {
        entries: io.ring_entries,
        recv_buffers: u16::try_from(io.recv_buffers)
            .expect("io.recv_buffers is validated to at most RECV_BUFFERS_MAX"),
        recv_buffer_bytes: io.recv_buffer_bytes,
        send_slots: u16::try_from(io.send_slots)
            .expect("io.send_slots is validated to at most SEND_SLOTS_MAX"),
        send_slot_bytes: courier_pipeline::profile::SEND_SLOT_BYTES,
        file_slots: courier_pipeline::profile::FILE_SLOTS as u16,
        gro: io.gro,
        gso: io.gso,
    }
}

/// Starts every shard and returns once all are listening.
pub fn start(opts: ServeOptions) -> Result<Running, ServeError> {
    let profile = Arc::new(opts.profile);
    huge_pages(&profile);
    // Which businesses this server admits, and the region's directory checked, before
    // any file is created (a region's directory is never created here).
    let regions = crate::region::RegionFilter::new(&profile, opts.region.as_deref())
        .map_err(ServeError::Region)?;
    if let Some(r) = regions.region() {
        crate::region::check_region_dir(r, &opts.data_dir).map_err(ServeError::Region)?;
    }
    let registry = Arc::new(regions.apply(&opts.registry).map_err(ServeError::Region)?);
    // First of all, before any file of it is read or written: one server per data
    // directory.
    crate::store::create_private_dir(&opts.data_dir).map_err(|source| ServeError::File {
        path: opts.data_dir.clone(),
        source,
    })?;
    let lock = crate::store::DataDirLock::acquire(&opts.data_dir)?;
    let (cert, key) = tls_identity(&opts.data_dir)?;
    let crypto = crate::tls::try_server_crypto(cert.clone(), key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let quic_crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(Arc::new(crypto))
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let quic_crypto: Arc<dyn quinn_proto::crypto::ServerConfig> = Arc::new(quic_crypto);

    // Before any shard starts: every business has a root key, and the master key unwraps
    // every existing one (a wrong master key stops here, before any data is touched).
    let business_keys =
        crate::business_keys::load_or_create(&opts.data_dir, &opts.master_key, &registry)
            .map_err(ServeError::BusinessKeys)?;

    let cpus = uring::available_cpus().map_err(ServeError::Cpu)?;
    let shards = match profile.shards {
        0 => cpus.len().max(1),
        n => n as usize,
    };
    let (sockets, addr) = bind_sockets(&profile, shards)?;
    let counters: Vec<Arc<ShardStats>> = (0..shards)
        .map(|_| Arc::new(ShardStats::default()))
        .collect();
    let loads = match shards {
        1 => None,
        _ => match uring::steer_by_connection_id(&sockets[0]) {
            Ok(()) => Some(Arc::new(Loads::new(counters.clone()))),
            Err(e) => {
                tracing::warn!(error = %e, "the kernel refused the reuseport steering program; connections stay on the shard their 4-tuple hashes to");
                None
            }
        },
    };
    // Bound before any shard starts, so a taken port stops start-up with nothing running.
    let metrics_listener = match profile.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::MetricsBind { addr, source })?,
        ),
        None => None,
    };

    let ids_max = profile.limits.idempotency_ids_max as usize;
    let common = Arc::new(Common {
        profile: profile.clone(),
        registry: registry.clone(),
        crypto: quic_crypto,
        master_key: opts.master_key.clone(),
        business_keys,
        data_dir: opts.data_dir.clone(),
        cpus,
        shards,
        idempotency: Arc::new(Idempotency::new(
            ids_max,
            profile.limits.idempotency_ids_per_business_max as usize,
        )),
        detect_secret: detect_secret(&opts.master_key),
        reset_key: stateless_reset_key(&opts.master_key.master_key()),
        token_key: retry_token_key(&opts.master_key.master_key()),
        shutdown: Arc::new(AtomicBool::new(false)),
        loads,
    });
    let restore = Arc::new(RestoreSet::new(ids_max));
    let (to_control_tx, to_control_rx) = crossbeam_channel::bounded::<ToControl>(4 * shards);
    let (waker_tx, waker_rx) = crossbeam_channel::bounded(shards);
    let mut wiring = Vec::new();
    let mut threads = Vec::new();
    for ((shard, socket), stats) in ShardId::all(shards).zip(sockets).zip(&counters) {
        let (ends, inboxes) = shard_channels();
        let (peers_tx, peers_rx) = crossbeam_channel::bounded::<Vec<Peer>>(1);
        let stats = stats.clone();
        let t = ShardThread {
            shard,
            socket,
            common: common.clone(),
            restore: restore.clone(),
            inboxes,
            to_control: to_control_tx.clone(),
            waker_tx: waker_tx.clone(),
            peers_rx,
            stats,
        };
        let thread = std::thread::Builder::new()
            .name(format!("courier-shard-{shard}"))
            .spawn(move || run_shard(t))
            .map_err(ServeError::Cpu)?;
        threads.push(thread);
        wiring.push((ends, peers_tx));
    }
    drop(waker_tx);
    drop(to_control_tx);
    let peers = match wait_ready(&waker_rx, wiring) {
        Ok(p) => p,
        Err((failed, peer_txs)) => {
            drop(peer_txs);
            let mut err = ServeError::Panicked(failed);
            for t in threads {
                if let Ok(Err(e)) = t.join() {
                    err = e;
                }
            }
            return Err(err);
        }
    };
    let (peers, peer_txs) = peers;
    // Before any shard takes a message: the ids already in the logs (every shard thread
    // dropped its handle of the set once its recovery was done).
    let rebuild_started = std::time::Instant::now();
    let restore = Arc::into_inner(restore).expect("every shard finished recovery");
    let read = restore.restore_into(&common.idempotency);
    let st = common.idempotency.stats();
    tracing::info!(
        newest_read = read,
        remembered = st.entries,
        capacity = st.capacity,
        ms = rebuild_started.elapsed().as_millis() as u64,
        "idempotency table rebuilt from the log"
    );
    for ptx in &peer_txs {
        let _ = ptx.send(peers.clone());
    }
    let status = crate::control::SharedStatus::default();
    let control = crate::control::spawn(crate::control::Control {
        data_dir: opts.data_dir.clone(),
        registry_file: opts.registry_file.clone(),
        regions,
        peers: peers.clone(),
        inbox: to_control_rx,
        status: status.clone(),
        master_key: opts.master_key.clone(),
    })
    .map_err(ServeError::Cpu)?;
    let mut running = Running {
        addr,
        cert,
        shutdown: common.shutdown.clone(),
        peers,
        threads,
        control: Some(control),
        counters: counters.clone(),
        metrics: None,
        _lock: lock,
    };
    if let Some(listener) = metrics_listener {
        let source = MetricsSource {
            counters,
            status,
            idempotency: Some(common.idempotency.clone()),
        };
        match MetricsServer::spawn(listener, source) {
            Ok(m) => running.metrics = Some(m),
            Err(e) => {
                // The shards are up: stop them before reporting.
                running.shutdown();
                let _ = running.join();
                return Err(ServeError::Cpu(e));
            }
        }
    }
    Ok(running)
}

/// One socket per shard on the profile's address (SO_REUSEPORT); returns them and the
/// bound address (a port 0 in the profile is chosen by the first bind).
fn bind_sockets(
    profile: &Profile,
    shards: usize,
) -> Result<(Vec<std::net::UdpSocket>, SocketAddr), ServeError> {
    let sockbuf = profile.io.socket_buffer_bytes as usize;
    let first = uring::bind_reuseport(profile.listen, sockbuf, sockbuf).map_err(|source| {
        ServeError::Bind {
            addr: profile.listen,
            source,
        }
    })?;
    let addr = first.local_addr().map_err(|source| ServeError::Bind {
        addr: profile.listen,
        source,
    })?;
    let mut sockets = vec![first];
    for _ in 1..shards {
        sockets.push(
            uring::bind_reuseport(addr, sockbuf, sockbuf)
                .map_err(|source| ServeError::Bind { addr, source })?,
        );
    }
    Ok((sockets, addr))
}

/// Recipients exist in detector state only as keyed hashes; the key comes from the master
/// key, so checkpoints stay valid across restarts and are useless without it.
fn detect_secret(master: &MasterKeyText) -> [u8; 16] {
    let s = master
        .master_key()
        .derive_secret(b"courier detect recipient hash v1");
    let mut k = [0u8; 16];
    k.copy_from_slice(&s[..16]);
    k
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b[..]);
    b
}

/// What every shard thread shares.
struct Common {
    profile: Arc<Profile>,
    registry: Arc<Registry>,
    crypto: Arc<dyn quinn_proto::crypto::ServerConfig>,
    master_key: MasterKeyText,
    business_keys: Arc<DerivedKeys>,
    data_dir: PathBuf,
    cpus: Vec<usize>,
    shards: usize,
    idempotency: Arc<Idempotency>,
    detect_secret: [u8; 16],
    /// Key for stateless resets: the same on every shard so any shard can reset, and at
    /// every start (from the master key) so a restarted node resets forgotten connections.
    reset_key: [u8; 64],
    token_key: [u8; 32],
    shutdown: Arc<AtomicBool>,
    /// Every shard's load, for placing new connections; `None` with one shard or
    /// without the kernel's steering.
    loads: Option<Arc<Loads>>,
}

/// The sending ends of one shard's inboxes (for its peers).
struct Ends {
    tx: Sender<Forwarded>,
    deltas: Sender<Arc<Delta>>,
    control: Sender<Control>,
    peer: Sender<Arc<PeerMsg>>,
}

/// The receiving ends of one shard's inboxes (for its thread).
struct Inboxes {
    datagrams: Receiver<Forwarded>,
    deltas: Receiver<Arc<Delta>>,
    control: Receiver<Control>,
    peer: Receiver<Arc<PeerMsg>>,
}

fn shard_channels() -> (Ends, Inboxes) {
    let (tx, datagrams) = crossbeam_channel::bounded::<Forwarded>(FORWARD_QUEUE_MAX);
    let (deltas_tx, deltas) = crossbeam_channel::bounded::<Arc<Delta>>(DELTA_QUEUE_MAX);
    let (control_tx, control) = crossbeam_channel::bounded::<Control>(CONTROL_QUEUE_MAX);
    let (peer_tx, peer) = crossbeam_channel::bounded::<Arc<PeerMsg>>(PEER_QUEUE_MAX);
    (
        Ends {
            tx,
            deltas: deltas_tx,
            control: control_tx,
            peer: peer_tx,
        },
        Inboxes {
            datagrams,
            deltas,
            control,
            peer,
        },
    )
}

/// A ready shard reports its id and waker; a failed one its id.
type Ready = Result<(ShardId, uring::Waker), ShardId>;

/// Waits for every shard to report ready; returns the peer list and the channels that
/// hand it to the shards, or the failed shard (and the channels, to drop).
#[allow(clippy::type_complexity)]
fn wait_ready(
    ready: &Receiver<Ready>,
    wiring: Vec<(Ends, Sender<Vec<Peer>>)>,
) -> Result<(Vec<Peer>, Vec<Sender<Vec<Peer>>>), (ShardId, Vec<Sender<Vec<Peer>>>)> {
    let shards = wiring.len();
    let mut wakers = vec![None; shards];
    let mut failed = None;
    for _ in 0..shards {
        match ready.recv() {
            Ok(Ok((i, w))) => wakers[i.index()] = Some(w),
            Ok(Err(i)) => failed = Some(i),
            Err(_) => break,
        }
    }
    let (ends, peer_txs): (Vec<Ends>, Vec<_>) = wiring.into_iter().unzip();
    let missing = || {
        let i = wakers.iter().position(Option::is_none)?;
        Some(ShardId::try_from(i).expect("a waker slot per shard"))
    };
    if let Some(i) = failed.or_else(missing) {
        return Err((i, peer_txs));
    }
    let peers = wakers
        .into_iter()
        .zip(ends)
        .map(|(w, e)| Peer {
            tx: e.tx,
            deltas: e.deltas,
            control: e.control,
            peer: e.peer,
            waker: w.expect("checked"),
        })
        .collect();
    Ok((peers, peer_txs))
}

/// What one shard thread starts from.
struct ShardThread {
    shard: ShardId,
    socket: std::net::UdpSocket,
    common: Arc<Common>,
    restore: Arc<RestoreSet>,
    inboxes: Inboxes,
    to_control: Sender<ToControl>,
    waker_tx: Sender<Ready>,
    peers_rx: Receiver<Vec<Peer>>,
    stats: Arc<ShardStats>,
}

/// A shard thread: pin, ring, recovery (before reporting ready: nothing is served from a
/// log that has not been checked), then the loop.
fn run_shard(t: ShardThread) -> Result<ServerStats, ServeError> {
    let c = t.common.clone();
    let prepared = prepare_shard(&c, t.shard, t.socket, &t.restore);
    // Every client id of this shard's log went to the restore set by now.
    drop(t.restore);
    let (ring, mut store, log, detector, replay) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = t.waker_tx.send(Err(t.shard));
            return Err(e);
        }
    };
    let direct_io = if c.profile.log.direct_io {
        match store.enable_direct_io(&log, c.profile.log.prepare_ahead_bytes) {
            Ok(io) => Some(io),
            Err(e) => {
                tracing::info!(shard = t.shard.index(), error = %e, "the log's file system refuses O_DIRECT; writing through the page cache");
                None
            }
        }
    } else {
        None
    };
    // The sealer's nonces use the epoch the log just persisted for this run.
    let Ok(epoch) = u32::try_from(log.epoch()) else {
        let _ = t.waker_tx.send(Err(t.shard));
        return Err(ServeError::EpochExhausted(t.shard));
    };
    let _ = t.waker_tx.send(Ok((t.shard, ring.waker())));
    let Ok(peers) = t.peers_rx.recv() else {
        return Ok(ServerStats::default());
    };
    let sealer = Sealer::new(
        c.business_keys.clone(),
        SealerConfig {
            epoch,
            shard: t.shard,
            // Fresh from the OS each run, never stored: a restored data directory cannot
            // repeat a nonce (pipeline/src/seal/mod.rs).
            nonce_mask: rand::random(),
            cache_keys_max: SEAL_CACHE_KEYS,
        },
    );
    let server = Server::new(
        ServerParts {
            shard: t.shard,
            crypto: c.crypto.clone(),
            reset_key: c.reset_key,
            token_key: c.token_key,
            seed: random_bytes(),
        },
        &c.profile.limits,
        &c.profile.quic,
        c.registry.clone(),
    );
    let parts = ShardParts {
        shard: t.shard,
        shards: c.shards,
        payload_bytes_max: c.profile.limits.payload_bytes_max,
        server,
        log,
        sealer,
        detector,
        idempotency: c.idempotency.clone(),
        seed: random_bytes(),
        stats: t.stats,
        delivery: c.profile.delivery.clone(),
        replay,
        disk_reserve_bytes: c.profile.log.disk_reserve_bytes,
        direct_io,
    };
    let shard = Shard {
        id: t.shard,
        ring,
        core: node::Shard::new(parts, crate::shard::clock()),
        store,
        deltas: t.inboxes.deltas,
        control: t.inboxes.control,
        peer_inbox: t.inboxes.peer,
        to_control: t.to_control,
        peers,
        inbox: t.inboxes.datagrams,
        shutdown: c.shutdown.clone(),
        max_datagrams: (60_000 / usize::from(c.profile.quic.mtu_upper_bound)).max(1),
        arenas: crate::recv_arena::RecvArenas::new(),
        placement: c
            .loads
            .as_ref()
            .map(|l| Placement::new(t.shard.index(), l.clone())),
    };
    shard.run().map_err(|source| ServeError::Ring {
        shard: t.shard,
        source,
    })
}

/// Sets whether this process's memory may be backed by transparent huge pages, as the
/// profile's `io.transparent_huge_pages` says (see its documentation): off by default,
/// on leaves it to the system's THP mode and the allocator. The kernel checks the flag
/// (`prctl(PR_SET_THP_DISABLE)`, inherited across fork and exec) at each page fault, so
/// memory mapped before this call follows it too. A kernel without the call (before
/// Linux 3.15) is logged, not fatal.
fn huge_pages(profile: &Profile) {
    let off = !profile.io.transparent_huge_pages;
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(off) {
        tracing::warn!(error = %e, "could not set this process's transparent huge pages");
    }
}

/// What a shard starts from.
type Prepared = (
    UdpRing,
    ShardStore,
    courier_pipeline::log::Log,
    Detector,
    Replay,
);

/// The parts of a shard that can fail to start: its pinning, its ring, its log (every
/// client id in it offered to `restore`, what delivery still owes replayed) and its
/// detector.
fn prepare_shard(
    c: &Common,
    shard: ShardId,
    socket: std::net::UdpSocket,
    restore: &RestoreSet,
) -> Result<Prepared, ServeError> {
    if c.profile.io.pin_threads {
        uring::pin_current_thread(c.cpus[shard.index() % c.cpus.len()]).map_err(ServeError::Cpu)?;
    }
    let ring = UdpRing::new(socket, &ring_config(&c.profile))
        .map_err(|source| ServeError::Ring { shard, source })?;
    let mut ids = Vec::with_capacity(RESTORE_BATCH);
    let mut replay = Replay::new(shard);
    let mut remember = |log_index: u64, rec: &OwnedRecord| {
        let h = &rec.header;
        if let Some(business_id) = idempotency_key(h) {
            ids.push(RestoredId {
                time_ms: h.time_ms,
                position: LogPosition::new(shard, log_index),
                business_id,
                client_id: h.client_id,
            });
            if ids.len() == RESTORE_BATCH {
                restore.offer(&mut ids);
            }
        }
        replay.visit(log_index, rec);
    };
    let cfg = LogConfig::new(&c.profile.log, c.profile.limits.payload_bytes_max);
    // With the businesses' keys: replay sees their users' fields, and the log writes them
    // under those keys (erasing a business hides them: `crate::erase`).
    let fields: Arc<dyn courier_pipeline::log::FieldKeys> = c.business_keys.clone();
    let opened = ShardStore::open_with_field_keys(
        &c.data_dir,
        shard,
        &c.master_key,
        Some(fields),
        cfg,
        &mut remember,
    );
    restore.offer(&mut ids);
    let (mut store, mut log) = opened.map_err(|source| ServeError::Store { shard, source })?;
    // Retention first: nothing expired is served, even after a stop across the deadline.
    let now_ms = crate::shard::clock().unix_ms;
    let expired = crate::expire::before_serving(
        &mut store,
        &mut log,
        &mut replay,
        c.profile.delivery.enabled,
        now_ms,
    )
    .map_err(|source| ServeError::Store { shard, source })?;
    log_drops(shard, &expired, now_ms);
    let mut detector = Detector::new(c.profile.detect.clone(), c.detect_secret);
    match crate::control::restore_checkpoint(&c.data_dir, shard, &mut detector) {
        Ok(true) => tracing::info!(shard = shard.index(), "detector state restored"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(shard = shard.index(), error = %e, "detector checkpoint not restored")
        }
    }
    Ok((ring, store, log, detector, replay))
}

/// Logs each segment retention dropped at start-up (ids and counts only).
fn log_drops(shard: ShardId, expired: &crate::expire::Expired, now_ms: u64) {
    for d in &expired.segments {
        tracing::info!(
            shard = shard.index(),
            segment = d.segment_id,
            records = d.records,
            oldest_age_secs = now_ms.saturating_sub(d.since_ms) / 1000,
            "retention dropped a segment before serving (its key destroyed first)"
        );
    }
    if expired.statuses > 0 {
        tracing::info!(
            shard = shard.index(),
            messages = expired.statuses,
            "messages waiting in dropped segments recorded as expired"
        );
    }
}
