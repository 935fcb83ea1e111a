//! Starting and stopping a whole server: TLS identity, one socket and one pinned thread per
//! shard, the hand-off channels between them.
//!
//! The shards share the listen port through SO_REUSEPORT; the kernel spreads clients over
//! them by 4-tuple hash, and a datagram that lands on the wrong shard is forwarded by
//! connection ID (see [`crate::shard`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use courier_pipeline::detect::{Delta, Detector};
use courier_pipeline::idempotency::Idempotency;
use courier_pipeline::ingest::Ingest;
use courier_pipeline::log::RecordHeader;
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::{SealedBatch, Sealer, SealerConfig};
use courier_pipeline::server::{Server, ServerParts, ServerStats};
use courier_pipeline::wire::LogPosition;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Expanded recipient keys each shard's sealer caches (about 0.6 KiB each).
pub const SEAL_CACHE_KEYS: usize = 4096;

use crate::control::{ShardControl, ToControl};
use crate::metrics::{MetricsServer, MetricsSource};
use crate::shard::{Forwarded, Peer, Shard, ShardCounters, DELTA_QUEUE_MAX, FORWARD_QUEUE_MAX};

/// Control requests queued towards one shard.
const CONTROL_QUEUE_MAX: usize = 64;

/// A client id read back from a shard's log at start-up; ordered by time first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RestoredId {
    time_ms: u64,
    position: LogPosition,
    business_id: u32,
    client_id: u64,
}

/// Ids a shard's recovery hands over at a time.
const RESTORE_BATCH: usize = 4096;

/// The newest `cap` client ids of all shards' logs, gathered while the shards recover
/// in parallel: memory for `cap` ids however many the logs hold and however they are
/// spread over the shards.
#[derive(Debug)]
struct RestoreSet {
    cap: usize,
    newest: std::sync::Mutex<BinaryHeap<Reverse<RestoredId>>>,
}

impl RestoreSet {
    fn offer(&self, ids: &mut Vec<RestoredId>) {
        let mut heap = self
            .newest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in ids.drain(..) {
            if heap.len() < self.cap {
                heap.push(Reverse(id));
            } else if heap.peek().is_some_and(|Reverse(oldest)| id > *oldest) {
                heap.pop();
                heap.push(Reverse(id));
            }
        }
    }

    /// The ids, oldest first.
    fn into_sorted(self) -> Vec<RestoredId> {
        let heap = self
            .newest
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Ascending `Reverse` is descending time.
        let mut v: Vec<RestoredId> = heap.into_sorted_vec().into_iter().map(|r| r.0).collect();
        v.reverse();
        v
    }
}
use crate::store::{MasterKeyText, ShardStore, StoreError};
use crate::uring::{self, RingConfig, RingError, UdpRing};

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
        shard: usize,
        /// The error.
        #[source]
        source: RingError,
    },
    /// A shard's log could not be opened (recovery found corruption, wrong master key, IO).
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: usize,
        /// The error.
        #[source]
        source: StoreError,
    },
    /// The business root keys could not be loaded or created.
    #[error("business keys: {0}")]
    BusinessKeys(String),
    /// A shard's nonce epoch no longer fits the sealer's 32 bits: rotate the log's keyring.
    #[error("shard {0}: nonce epoch exhausted")]
    EpochExhausted(usize),
    /// A shard thread panicked: a bug.
    #[error("shard {0} panicked")]
    Panicked(usize),
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
    counters: Vec<Arc<ShardCounters>>,
    metrics: Option<MetricsServer>,
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
            match t.join().map_err(|_| ServeError::Panicked(i)) {
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
        let cert = fs::read(&cert_path).map_err(file_err(&cert_path))?;
        let key = fs::read(&key_path).map_err(file_err(&key_path))?;
        return Ok((
            CertificateDer::from(cert),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    fs::create_dir_all(&dir).map_err(file_err(&dir))?;
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
    f.write_all(pkcs8.secret_pkcs8_der())
        .and_then(|_| f.sync_all())
        .map_err(file_err(&key_path))?;
    fs::write(&cert_path, cert.as_ref()).map_err(file_err(&cert_path))?;
    Ok((cert, key))
}

fn ring_config(profile: &Profile) -> RingConfig {
    let io = &profile.io;
    RingConfig {
        entries: io.ring_entries,
        recv_buffers: u16::try_from(io.recv_buffers).unwrap_or(u16::MAX),
        recv_buffer_bytes: io.recv_buffer_bytes,
        send_slots: u16::try_from(io.send_slots).unwrap_or(u16::MAX),
        send_slot_bytes: 65_536,
        file_slots: 16,
        gro: io.gro,
        gso: io.gso,
    }
}

/// Starts every shard and returns once all are listening.
pub fn start(opts: ServeOptions) -> Result<Running, ServeError> {
    let profile = Arc::new(opts.profile);
    let (cert, key) = tls_identity(&opts.data_dir)?;
    let crypto = crate::tls::try_server_crypto(cert.clone(), key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let quic_crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(Arc::new(crypto))
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let quic_crypto: Arc<dyn quinn_proto::crypto::ServerConfig> = Arc::new(quic_crypto);

    // Before any shard starts: every business has a root key, and the master key unwraps
    // every existing one (a wrong master key stops here, before any data is touched).
    std::fs::create_dir_all(&opts.data_dir).map_err(|source| ServeError::File {
        path: opts.data_dir.clone(),
        source,
    })?;
    let business_keys =
        crate::business_keys::load_or_create(&opts.data_dir, &opts.master_key, &opts.registry)
            .map_err(ServeError::BusinessKeys)?;

    let cpus = uring::available_cpus().map_err(ServeError::Cpu)?;
    let shards = match profile.shards {
        0 => cpus.len().max(1),
        n => n as usize,
    };
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
    // Bound before any shard starts, so a taken port stops start-up with nothing running.
    let metrics_listener = match profile.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::MetricsBind { addr, source })?,
        ),
        None => None,
    };
    let mut sockets = vec![first];
    for _ in 1..shards {
        sockets.push(
            uring::bind_reuseport(addr, sockbuf, sockbuf)
                .map_err(|source| ServeError::Bind { addr, source })?,
        );
    }

    let ids_max = profile.limits.idempotency_ids_max as usize;
    let idempotency = Arc::new(Idempotency::new(ids_max));
    let restore = Arc::new(RestoreSet {
        cap: ids_max,
        newest: std::sync::Mutex::new(BinaryHeap::new()),
    });
    let mut reset_key = [0u8; 64];
    rand::fill(&mut reset_key[..]);
    let shutdown = Arc::new(AtomicBool::new(false));
    let (inbox_txs, inbox_rxs): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| crossbeam_channel::bounded::<Forwarded>(FORWARD_QUEUE_MAX))
        .unzip();
    let (delta_txs, delta_rxs): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| crossbeam_channel::bounded::<Arc<Delta>>(DELTA_QUEUE_MAX))
        .unzip();
    let (control_txs, control_rxs): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| crossbeam_channel::bounded::<ShardControl>(CONTROL_QUEUE_MAX))
        .unzip();
    let (to_control_tx, to_control_rx) = crossbeam_channel::bounded::<ToControl>(4 * shards);
    // Recipients exist in detector state only as keyed hashes; the key comes from the
    // master key, so checkpoints stay valid across restarts and are useless without it.
    let detect_secret = {
        let s = opts
            .master_key
            .master_key()
            .derive_secret(b"courier detect recipient hash v1");
        let mut k = [0u8; 16];
        k.copy_from_slice(&s[..16]);
        k
    };
    // Each thread builds its ring (rings stay on their thread), reports its waker, then
    // waits for the full peer list.
    let (waker_tx, waker_rx) = crossbeam_channel::bounded(shards);
    let mut peer_txs = Vec::new();
    let mut threads = Vec::new();
    let mut counters = Vec::new();
    let max_datagrams = (60_000 / usize::from(profile.quic.mtu_upper_bound)).max(1);
    let shard_inputs = sockets
        .into_iter()
        .zip(inbox_rxs)
        .zip(delta_rxs.into_iter().zip(control_rxs));
    for (index, ((socket, inbox), (deltas, control))) in shard_inputs.enumerate() {
        let to_control = to_control_tx.clone();
        let (peers_tx, peers_rx) = crossbeam_channel::bounded::<Vec<Peer>>(1);
        peer_txs.push(peers_tx);
        let c = Arc::new(ShardCounters::default());
        counters.push(c.clone());
        let profile = profile.clone();
        let registry = opts.registry.clone();
        let shutdown = shutdown.clone();
        let waker_tx = waker_tx.clone();
        let crypto = quic_crypto.clone();
        let master_key = opts.master_key.clone();
        let business_keys = business_keys.clone();
        let data_dir = opts.data_dir.clone();
        let cpu = profile.io.pin_threads.then(|| cpus[index % cpus.len()]);
        let idempotency = idempotency.clone();
        let restore = restore.clone();
        let thread = std::thread::Builder::new()
            .name(format!("courier-shard-{index}"))
            .spawn(move || -> Result<ServerStats, ServeError> {
                if let Some(cpu) = cpu {
                    uring::pin_current_thread(cpu).map_err(ServeError::Cpu)?;
                }
                let ring = match UdpRing::new(socket, &ring_config(&profile)) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = waker_tx.send(Err(index));
                        return Err(ServeError::Ring {
                            shard: index,
                            source: e,
                        });
                    }
                };
                // Recovery happens before the shard reports ready: nothing is served from
                // a log that has not been checked.
                // Every client id still in the log goes to the restore set: the start
                // rebuilds the shared idempotency table from the newest of them.
                let mut ids = Vec::with_capacity(RESTORE_BATCH);
                let mut remember = |log_index: u64, h: &RecordHeader| {
                    ids.push(RestoredId {
                        time_ms: h.time_ms,
                        position: LogPosition::new(index as u16, log_index),
                        business_id: h.business_id,
                        client_id: h.client_id,
                    });
                    if ids.len() == RESTORE_BATCH {
                        restore.offer(&mut ids);
                    }
                };
                let opened =
                    ShardStore::open(&data_dir, index, &master_key, &profile, &mut remember);
                restore.offer(&mut ids);
                drop(restore);
                let store = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = waker_tx.send(Err(index));
                        return Err(ServeError::Store {
                            shard: index,
                            source: e,
                        });
                    }
                };
                // The sealer's nonces use the epoch the log just persisted for this run.
                let Ok(epoch) = u32::try_from(store.log().epoch()) else {
                    let _ = waker_tx.send(Err(index));
                    return Err(ServeError::EpochExhausted(index));
                };
                let sealer = Sealer::new(
                    business_keys,
                    SealerConfig {
                        epoch,
                        shard: index as u16,
                        cache_keys_max: SEAL_CACHE_KEYS,
                    },
                );
                let mut detector = Detector::new(profile.detect.clone(), detect_secret);
                match crate::control::restore_checkpoint(&data_dir, index, &mut detector) {
                    Ok(true) => tracing::info!(shard = index, "detector state restored"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(shard = index, error = %e, "detector checkpoint not restored"),
                }
                let _ = waker_tx.send(Ok((index, ring.waker())));
                let Ok(peers) = peers_rx.recv() else {
                    return Ok(ServerStats::default());
                };
                let mut seed = [0u8; 32];
                rand::fill(&mut seed[..]);
                let server = Server::new(
                    ServerParts {
                        shard: index as u8,
                        crypto,
                        reset_key,
                        seed,
                    },
                    &profile,
                    registry,
                );
                let shard = Shard {
                    index,
                    ring,
                    server,
                    ingest: Ingest::new(index as u16, profile.limits.payload_bytes_max, 0),
                    store,
                    sealer,
                    sealed: SealedBatch::new(),
                    detector,
                    idempotency,
                    deltas,
                    control,
                    to_control,
                    peers,
                    inbox,
                    shutdown,
                    counters: c,
                    max_datagrams,
                };
                shard.run().map_err(|source| ServeError::Ring {
                    shard: index,
                    source,
                })
            })
            .map_err(ServeError::Cpu)?;
        threads.push(thread);
    }
    drop(waker_tx);
    drop(to_control_tx);
    let mut wakers = vec![None; shards];
    let mut failed = None;
    for _ in 0..shards {
        match waker_rx.recv() {
            Ok(Ok((i, w))) => wakers[i] = Some(w),
            Ok(Err(i)) => failed = Some(i),
            Err(_) => break,
        }
    }
    if let Some(i) = failed.or_else(|| wakers.iter().position(Option::is_none)) {
        drop(peer_txs);
        let mut err = ServeError::Panicked(i);
        for t in threads {
            if let Ok(Err(e)) = t.join() {
                err = e;
            }
        }
        return Err(err);
    }
    let peers: Vec<Peer> = wakers
        .into_iter()
        .zip(inbox_txs)
        .zip(delta_txs.into_iter().zip(control_txs))
        .map(|((w, tx), (deltas, control))| Peer {
            tx,
            deltas,
            control,
            waker: w.expect("checked"),
        })
        .collect();
    // Before any shard takes a message: the ids already in the logs, oldest first, so
    // that the newest stay when the logs hold more than the table.
    let rebuild_started = std::time::Instant::now();
    // Every shard thread dropped its handle once its recovery was done.
    let restored = Arc::into_inner(restore)
        .expect("every shard finished recovery")
        .into_sorted();
    for r in &restored {
        idempotency.restore(r.business_id, r.client_id, r.position, r.time_ms);
    }
    let st = idempotency.stats();
    tracing::info!(
        newest_read = restored.len(),
        remembered = st.entries,
        capacity = st.capacity,
        ms = rebuild_started.elapsed().as_millis() as u64,
        "idempotency table rebuilt from the log"
    );
    drop(restored);
    for ptx in &peer_txs {
        let _ = ptx.send(peers.clone());
    }
    let status = crate::control::SharedStatus::default();
    let control = crate::control::spawn(crate::control::Control {
        data_dir: opts.data_dir.clone(),
        registry_file: opts.registry_file.clone(),
        peers: peers.clone(),
        inbox: to_control_rx,
        status: status.clone(),
    })
    .map_err(ServeError::Cpu)?;
    let mut running = Running {
        addr,
        cert,
        shutdown,
        peers,
        threads,
        control: Some(control),
        counters: counters.clone(),
        metrics: None,
    };
    if let Some(listener) = metrics_listener {
        match MetricsServer::spawn(
            listener,
            MetricsSource {
                counters,
                status,
                idempotency: Some(idempotency),
            },
        ) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(time_ms: u64, shard: u16, index: u64) -> RestoredId {
        RestoredId {
            time_ms,
            position: LogPosition::new(shard, index),
            business_id: 1,
            client_id: index,
        }
    }

    #[test]
    fn the_restore_set_keeps_the_newest_ids_of_all_shards_oldest_first() {
        let set = RestoreSet {
            cap: 5,
            newest: std::sync::Mutex::new(BinaryHeap::new()),
        };
        // Shard 0 is all old, shard 1 all new, offered in small batches interleaved.
        let mut a: Vec<RestoredId> = (0..4).map(|i| id(100 + i, 0, i)).collect();
        let mut b: Vec<RestoredId> = (0..4).map(|i| id(200 + i, 1, i)).collect();
        let mut c: Vec<RestoredId> = (4..8).map(|i| id(100 + i, 0, i)).collect();
        set.offer(&mut b);
        set.offer(&mut a);
        set.offer(&mut c);
        assert!(a.is_empty() && b.is_empty() && c.is_empty());
        let times: Vec<u64> = set.into_sorted().iter().map(|r| r.time_ms).collect();
        assert_eq!(times, [107, 200, 201, 202, 203]);
    }
}
