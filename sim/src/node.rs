//! One simulated courier node: the real shard cores (`courier_pipeline::node::Shard`) of
//! every shard, each over its own fault-injecting [`MemStorage`], with the shell's part
//! played here: storage operations performed (commit writes complete after a simulated
//! latency), detector deltas handed between shards, checkpoints kept, the idempotency
//! table rebuilt from the logs at every boot, exactly as `src/serve.rs` and
//! `src/shard.rs` do with files and threads.
//!
//! A crash drops every core (and the writes in flight) and tears what was not synced
//! ([`MemStorage::crash`]); a boot recovers every shard's log as the server does at start.
//! A crash can be armed to strike after a number of storage operations, so it can land
//! between any two of them (a keyring persisted and its segment not yet created, say).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier_pipeline::detect::Detector;
use courier_pipeline::idempotency::{idempotency_key, Idempotency, RestoreSet, RestoredId};
use courier_pipeline::log::{Action, LogConfig, MasterKey, RecoverError};
use courier_pipeline::node::{
    self, DirectIo, Event, Io, LogWrite, Now, PeerMsg, PeerTarget, PlantedBugs, Replay, ShardParts,
    ShardStats, WriteOutcome,
};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::DerivedKeys;
use courier_pipeline::seal::{Sealer, SealerConfig};
use courier_pipeline::server::{retry_token_key, stateless_reset_key, Server, ServerParts};
use courier_pipeline::wire::LogPosition;
use courier_pipeline::ShardId;
use quinn_proto::Transmit;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use crate::storage::{recover, MemStorage, SimIoError};

/// File slots of a shard's ring (as `src/serve.rs` configures it).
const FILE_SLOTS: usize = 16;
/// Expanded keys a simulated sealer caches: small, so misses happen.
const SEAL_CACHE_KEYS: usize = 64;
/// The block of the shards that write as with `O_DIRECT` (odd shards).
const SIM_DIRECT_IO_BLOCK: usize = 512;
/// Zeros kept ahead of a direct I/O shard's records: a few blocks, so that zero writes
/// are frequent, and often still in flight when a commit would reach them.
const SIM_PREPARE_AHEAD_BYTES: u64 = 4 * SIM_DIRECT_IO_BLOCK as u64;

/// How the simulated disks behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Time from submitting a commit write to its completion (write + fdatasync).
    pub latency: Duration,
    /// Extra latency, uniform in `0..=jitter`, per write.
    pub jitter: Duration,
}

impl StorageConfig {
    /// A fast disk: 1 ms per commit, 1 ms of jitter.
    pub fn fast() -> StorageConfig {
        StorageConfig {
            latency: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
        }
    }
}

/// The secrets and settings a node keeps across restarts (its files and configuration).
#[derive(Clone)]
pub struct NodeSetup {
    /// Shards.
    pub shards: usize,
    /// The profile.
    pub profile: Profile,
    /// Businesses.
    pub registry: Arc<Registry>,
    /// TLS for the servers.
    pub crypto: Arc<dyn quinn_proto::crypto::ServerConfig>,
    /// Master key bytes (wraps segment keys).
    pub master: [u8; 32],
    /// Business root keys, unwrapped.
    pub keys: Arc<DerivedKeys>,
    /// Storage behaviour.
    pub storage: StorageConfig,
    /// Test-only faults planted in the cores.
    pub bugs: PlantedBugs,
}

impl std::fmt::Debug for NodeSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSetup")
            .field("shards", &self.shards)
            .field("storage", &self.storage)
            .field("bugs", &self.bugs)
            .finish_non_exhaustive()
    }
}

/// A commit write submitted to the simulated disk.
#[derive(Debug)]
struct PendingWrite {
    due: Instant,
    token: u64,
    segment_id: u64,
    /// How it ends unless the sync fails.
    outcome: WriteOutcome,
    buf: Vec<u8>,
}

/// One running shard: its core and its writes in flight.
struct RunningShard {
    core: node::Shard,
    writes: Vec<PendingWrite>,
}

/// What one storage operation of the node did to a shard's disk, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// A commit write submitted (bytes).
    Write(u64),
    /// A commit write completed.
    Completed,
    /// Keyring replaced, segment created or deleted.
    Metadata,
}

/// The simulated node. See the module docs.
pub struct SimNode {
    setup: NodeSetup,
    storage: Vec<MemStorage>,
    checkpoints: Vec<Option<Vec<u8>>>,
    running: Option<Vec<RunningShard>>,
    stats: Vec<Arc<ShardStats>>,
    /// Key for stateless resets: derived from the master key, so the same every start.
    reset_key: [u8; 64],
    token_key: [u8; 32],
    boots: u32,
    /// Delivery messages between shards, not yet handed over.
    peer_queue: std::collections::VecDeque<(usize, Arc<PeerMsg>)>,
    /// Wall-clock time of every boot, unix ms.
    boot_times_ms: Vec<u64>,
    ops_until_crash: Option<usize>,
    /// Storage operations performed since the start, by shard.
    pub disk_ops: Vec<u64>,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode")
            .field("setup", &self.setup)
            .field("up", &self.running.is_some())
            .field("boots", &self.boots)
            .finish_non_exhaustive()
    }
}

impl SimNode {
    /// A node whose disks are empty; call [`SimNode::boot`] to start it.
    pub fn new(setup: NodeSetup, seed: u64) -> SimNode {
        let storage = (0..setup.shards)
            .map(|s| MemStorage::new(seed ^ ((s as u64 + 1) * 0x9e37_79b9)))
            .collect();
        let reset_key = stateless_reset_key(&MasterKey::from_bytes(setup.master));
        let token_key = retry_token_key(&MasterKey::from_bytes(setup.master));
        SimNode {
            checkpoints: vec![None; setup.shards],
            stats: Vec::new(),
            disk_ops: vec![0; setup.shards],
            setup,
            storage,
            running: None,
            reset_key,
            token_key,
            boots: 0,
            peer_queue: std::collections::VecDeque::new(),
            boot_times_ms: Vec::new(),
            ops_until_crash: None,
        }
    }

    /// The setup.
    pub fn setup(&self) -> &NodeSetup {
        &self.setup
    }

    /// Whether the node runs.
    pub fn is_up(&self) -> bool {
        self.running.is_some()
    }

    /// Starts so far.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// Wall-clock time of every boot so far, unix ms, oldest first.
    pub fn boot_times_ms(&self) -> &[u64] {
        &self.boot_times_ms
    }

    /// Shard `s`'s disk.
    pub fn storage(&self, s: usize) -> &MemStorage {
        &self.storage[s]
    }

    /// Shard `s`'s disk, to inject faults.
    pub fn storage_mut(&mut self, s: usize) -> &mut MemStorage {
        &mut self.storage[s]
    }

    /// Shard `s`'s core (panics while the node is down).
    pub fn core(&self, s: usize) -> &node::Shard {
        &self.running.as_ref().expect("the node runs")[s].core
    }

    /// The counters of shard `s` in this run.
    pub fn stats(&self, s: usize) -> &ShardStats {
        &self.stats[s]
    }

    /// Recovers every shard's log and starts every core, as `courier serve` does.
    pub fn boot(&mut self, now: Now, rng: &mut StdRng) -> Result<(), RecoverError> {
        assert!(self.running.is_none(), "boot a stopped node");
        let profile = &self.setup.profile;
        let ids_max = profile.limits.idempotency_ids_max as usize;
        let restore = RestoreSet::new(ids_max);
        let mut logs = Vec::with_capacity(self.setup.shards);
        for shard in ShardId::all(self.setup.shards) {
            let s = shard.index();
            let mut ids = Vec::new();
            let mut replay = Replay::new(shard);
            let (log, actions, _) = recover(
                &mut self.storage[s],
                MasterKey::from_bytes(self.setup.master),
                LogConfig::new(&profile.log, profile.limits.payload_bytes_max),
                shard,
                &mut |index, rec| {
                    let h = &rec.header;
                    if let Some(business_id) = idempotency_key(h) {
                        ids.push(RestoredId {
                            time_ms: h.time_ms,
                            position: LogPosition::new(shard, index),
                            business_id,
                            client_id: h.client_id,
                        });
                    }
                    replay.visit(index, rec);
                },
            )?;
            restore.offer(&mut ids);
            perform_open_actions(&mut self.storage[s], actions);
            logs.push((log, replay));
        }
        let share = profile.limits.idempotency_ids_per_business_max as usize;
        let idempotency = Arc::new(Idempotency::new(ids_max, share));
        restore.restore_into(&idempotency);
        self.stats = (0..self.setup.shards)
            .map(|_| Arc::new(ShardStats::default()))
            .collect();
        let mut running = Vec::with_capacity(logs.len());
        for (shard, (log, replay)) in ShardId::all(self.setup.shards).zip(logs) {
            let parts = self.parts(shard, log, replay, idempotency.clone(), rng);
            let mut core = node::Shard::new(parts, now);
            core.plant_bugs(self.setup.bugs);
            running.push(RunningShard {
                core,
                writes: Vec::new(),
            });
        }
        self.running = Some(running);
        self.boots += 1;
        self.boot_times_ms.push(now.unix_ms);
        Ok(())
    }

    fn parts(
        &self,
        shard: ShardId,
        log: courier_pipeline::log::Log,
        replay: Replay,
        idempotency: Arc<Idempotency>,
        rng: &mut StdRng,
    ) -> ShardParts {
        let profile = &self.setup.profile;
        let epoch = u32::try_from(log.epoch()).expect("epochs fit 32 bits in a simulation");
        let sealer = Sealer::new(
            self.setup.keys.clone(),
            SealerConfig {
                epoch,
                shard,
                // From the simulation's seeded generator: a replay seals the same bytes.
                nonce_mask: rng.random(),
                cache_keys_max: SEAL_CACHE_KEYS,
            },
        );
        let secret = MasterKey::from_bytes(self.setup.master)
            .derive_secret(b"courier detect recipient hash v1");
        let mut detector = Detector::new(profile.detect.clone(), secret[..16].try_into().unwrap());
        if let Some(bytes) = &self.checkpoints[shard.index()] {
            detector
                .restore(bytes)
                .expect("a checkpoint the detector wrote restores");
        }
        let mut server_seed = [0u8; 32];
        rng.fill_bytes(&mut server_seed);
        let server = Server::new(
            ServerParts {
                shard,
                crypto: self.setup.crypto.clone(),
                reset_key: self.reset_key,
                token_key: self.token_key,
                seed: server_seed,
            },
            &profile.limits,
            &profile.quic,
            self.setup.registry.clone(),
        );
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let direct_io = (shard.index() % 2 == 1).then(|| self.direct_io(shard, &log));
        ShardParts {
            shard,
            shards: self.setup.shards,
            payload_bytes_max: profile.limits.payload_bytes_max,
            server,
            log,
            sealer,
            detector,
            idempotency,
            seed,
            stats: self.stats[shard.index()].clone(),
            delivery: profile.delivery.clone(),
            replay,
            // The simulated disks report no free space: nothing is throttled for it
            // (their full-disk faults exercise the failure path instead).
            disk_reserve_bytes: profile.log.disk_reserve_bytes,
            // Odd shards write as the shell does with O_DIRECT (aligned blocks, the
            // partial last block written again by the next commit, zero padding that
            // recovery reads as the segment's end), to small blocks so that most commits
            // rewrite one; even shards as through the page cache.
            direct_io,
        }
    }

    /// Direct I/O for `shard`, its log's open segment (if records were appended before
    /// serving) continuing from the bytes its disk holds, as `ShardStore` reads them.
    fn direct_io(&self, shard: ShardId, log: &courier_pipeline::log::Log) -> DirectIo {
        let block = SIM_DIRECT_IO_BLOCK;
        let tail = log.open_segment().map_or_else(Vec::new, |(id, end)| {
            let file = self.storage[shard.index()]
                .file(id)
                .expect("the open segment's file");
            file[(end - end % block as u64) as usize..end as usize].to_vec()
        });
        DirectIo {
            block,
            tail,
            prepare_ahead: SIM_PREPARE_AHEAD_BYTES,
        }
    }

    /// Power loss: every core and write in flight is gone; every disk keeps what was
    /// synced and a random prefix of the rest. Injected disk faults are cleared (the
    /// operator replaced or freed the disk before the restart).
    pub fn crash(&mut self) {
        self.running = None;
        self.peer_queue.clear();
        self.ops_until_crash = None;
        for st in &mut self.storage {
            st.crash();
            st.fail_syncs = false;
            st.fail_keyring_writes = false;
            st.capacity_bytes = None;
        }
    }

    /// Cuts the power after `ops` more storage operations (any shard).
    pub fn arm_crash(&mut self, ops: usize) {
        self.ops_until_crash = Some(ops);
    }

    /// Whether an armed crash struck (the caller then calls [`SimNode::crash`]).
    pub fn crash_due(&self) -> bool {
        self.ops_until_crash == Some(0)
    }

    /// Counts one storage operation; false when the power is out.
    fn power(&mut self, s: usize) -> bool {
        self.disk_ops[s] += 1;
        match &mut self.ops_until_crash {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None => true,
        }
    }

    /// When the next commit write of any shard completes.
    pub fn next_write_due(&self) -> Option<Instant> {
        self.running
            .as_ref()?
            .iter()
            .flat_map(|r| r.writes.iter().map(|w| w.due))
            .min()
    }

    /// The earliest deadline of any core.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.running
            .as_ref()?
            .iter()
            .filter_map(|r| r.core.poll_timeout())
            .min()
    }

    /// Feeds a datagram to `shard`.
    pub fn handle_datagram(&mut self, shard: ShardId, now: Now, from: SocketAddr, data: BytesMut) {
        if let Some(r) = self.running.as_mut() {
            r[shard.index()].core.handle_datagram(now, from, None, data);
        }
    }

    /// Completes every commit write due at `now` (syncing its segment); returns how many.
    pub fn complete_writes(&mut self, now: Now) -> usize {
        let mut done = 0;
        for s in 0..self.setup.shards {
            let due: Vec<PendingWrite> = match self.running.as_mut() {
                Some(r) => {
                    let writes = &mut r[s].writes;
                    writes.sort_by_key(|w| (w.due, w.token));
                    let n = writes.partition_point(|w| w.due <= now.at);
                    writes.drain(..n).collect()
                }
                None => return done,
            };
            for w in due {
                if !self.power(s) {
                    return done;
                }
                let mut outcome = w.outcome;
                if outcome == WriteOutcome::Done && self.storage[s].sync(w.segment_id).is_err() {
                    outcome = WriteOutcome::SyncFailed;
                }
                let r = self.running.as_mut().expect("checked");
                r[s].core.handle_write_done(now, w.token, outcome, w.buf);
                done += 1;
            }
        }
        done
    }

    /// Fires shard timers due at `now`.
    pub fn handle_timeouts(&mut self, now: Now) {
        if let Some(r) = self.running.as_mut() {
            for shard in r.iter_mut() {
                if shard.core.poll_timeout().is_some_and(|t| t <= now.at) {
                    shard.core.handle_timeout(now);
                }
            }
        }
    }

    /// Asks every core to stop gracefully.
    pub fn begin_stop(&mut self, now: Now) {
        if let Some(r) = self.running.as_mut() {
            for shard in r.iter_mut() {
                shard.core.begin_stop(now);
            }
        }
    }

    /// Whether every core has stopped.
    pub fn all_stopped(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.iter().all(|s| s.core.is_stopped()))
    }

    /// Takes the node down after a graceful stop (disks stay as they are).
    pub fn shut_down(&mut self) {
        self.running = None;
    }

    /// The shell's work for shard `s` after an input: storage operations performed,
    /// events delivered. Returns whether anything happened. Datagrams are taken with
    /// [`SimNode::poll_transmit`].
    pub fn pump(&mut self, s: usize, now: Now, rng: &mut StdRng, trace: &mut Vec<DiskOp>) -> bool {
        let mut progressed = self.perform_io(s, now, rng, trace);
        let events: Vec<Event> = match self.running.as_mut() {
            Some(r) => std::iter::from_fn(|| r[s].core.poll_event()).collect(),
            None => return progressed,
        };
        for ev in events {
            progressed = true;
            self.deliver(s, now, ev);
        }
        progressed |= self.deliver_peer_messages(now);
        progressed
    }

    /// The next datagram of shard `s`.
    pub fn poll_transmit(
        &mut self,
        s: usize,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        let r = self.running.as_mut()?;
        r[s].core.poll_transmit(now, max_datagrams, buf)
    }

    fn deliver(&mut self, s: usize, now: Now, ev: Event) {
        match ev {
            // Deltas reach every other shard at once (the real exchange adds one loop).
            Event::Delta(delta) => {
                if let Some(r) = self.running.as_mut() {
                    for (i, peer) in r.iter_mut().enumerate() {
                        if i != s {
                            peer.core.handle_delta(now, &delta);
                        }
                    }
                }
            }
            // The checkpoint file is replaced atomically.
            Event::Status { checkpoint, .. } => {
                if let Some(bytes) = checkpoint {
                    self.checkpoints[s] = Some(bytes);
                }
            }
            // Delivery messages reach their shard after the other events of this pass
            // (the real exchange adds a loop or more).
            Event::Peer { to, msg } => {
                let targets: Vec<usize> = match to {
                    PeerTarget::Shard(t) => vec![t.index()],
                    PeerTarget::All => (0..self.setup.shards).filter(|&t| t != s).collect(),
                };
                for t in targets {
                    self.peer_queue.push_back((t, msg.clone()));
                }
            }
        }
    }

    /// Hands the delivery messages between shards that are queued; returns whether any
    /// was.
    fn deliver_peer_messages(&mut self, now: Now) -> bool {
        let mut any = false;
        // Bounded: each handled message may queue a reply, which is handled next pass.
        let queued: Vec<(usize, Arc<PeerMsg>)> = self.peer_queue.drain(..).collect();
        for (t, msg) in queued {
            any = true;
            if let Some(r) = self.running.as_mut() {
                r[t].core.handle_peer(now, msg);
            }
        }
        any
    }

    fn perform_io(
        &mut self,
        s: usize,
        now: Now,
        rng: &mut StdRng,
        trace: &mut Vec<DiskOp>,
    ) -> bool {
        let mut progressed = false;
        loop {
            let Some(r) = self.running.as_mut() else {
                return progressed;
            };
            let slots = FILE_SLOTS - r[s].writes.len();
            let Some(op) = r[s].core.poll_io(slots) else {
                return progressed;
            };
            progressed = true;
            if !self.power(s) {
                return progressed;
            }
            match op.into_write() {
                Ok(LogWrite {
                    token,
                    segment_id,
                    offset,
                    skip,
                    bytes,
                }) => {
                    trace.push(DiskOp::Write((bytes.len() - skip) as u64));
                    let outcome = match self.storage[s].write(segment_id, offset, &bytes[skip..]) {
                        Ok(()) => WriteOutcome::Done,
                        Err(SimIoError::NoSpace) => WriteOutcome::NoSpace,
                        Err(SimIoError::Io) => WriteOutcome::WriteFailed,
                    };
                    let cfg = &self.setup.storage;
                    let jitter = rng.random_range(0..=cfg.jitter.as_nanos() as u64);
                    let due = now.at + cfg.latency + Duration::from_nanos(jitter);
                    let r = self.running.as_mut().expect("checked");
                    r[s].writes.push(PendingWrite {
                        due,
                        token,
                        segment_id,
                        outcome,
                        buf: bytes,
                    });
                }
                Err(other) => {
                    trace.push(DiskOp::Metadata);
                    if perform_metadata(&mut self.storage[s], other).is_err() {
                        let r = self.running.as_mut().expect("checked");
                        r[s].core.handle_metadata_failed(now);
                    }
                }
            }
        }
    }

    /// Every shard's writes in flight, by shard (for the digest of a trace).
    pub fn writes_in_flight(&self) -> BTreeMap<usize, usize> {
        self.running
            .iter()
            .flatten()
            .enumerate()
            .map(|(s, r)| (s, r.writes.len()))
            .collect()
    }
}

/// Performs a keyring replacement, segment creation or deletion (durable at once).
fn perform_metadata(st: &mut MemStorage, op: Io) -> Result<(), SimIoError> {
    match op {
        Io::PersistKeyring { bytes } => st.put_keyring(&bytes),
        Io::CreateSegment { segment_id } => {
            st.create(segment_id);
            Ok(())
        }
        Io::DeleteSegment { segment_id } => {
            st.delete(segment_id);
            Ok(())
        }
        Io::DurableWrite(_) | Io::PrepareSpace(_) => {
            unreachable!("log writes are asynchronous")
        }
    }
}

/// The actions `Log::open` returns, performed before serving (as `ShardStore::open` does).
fn perform_open_actions(st: &mut MemStorage, actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::PersistKeyring { bytes } => st
                .put_keyring(&bytes)
                .expect("faults are cleared before a boot"),
            Action::DeleteSegment { segment_id } => st.delete(segment_id),
            Action::SyncSegment { segment_id } => st
                .sync(segment_id)
                .expect("faults are cleared before a boot"),
            Action::CreateSegment { .. } | Action::Write { .. } => {
                unreachable!("opening a log creates and writes nothing")
            }
        }
    }
}
