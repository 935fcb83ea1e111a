//! One shard's core: the whole message path of one core as one sans-IO state machine.
//!
//! ```text
//!  handle_datagram(now, ..) ──> server::Server (QUIC, TLS, wire decoding, HELLO)
//!                                  │ SUBMIT batches, one business per turn, each business
//!                                  │ held to its share in flight (server/fair.rs)
//!                                  ▼
//!  the stage chain (chain.rs), per batch, in order:
//!    payload checks ─> Idempotency::claim (shared by the shards: a resend is `duplicate`)
//!    ─> Detector::observe_batch ─> Sealer::seal_batch ─> Log::append
//!    not admitted: answered now          admitted: waits for its group commit
//!                                  │ writes coalesced per segment (commit.rs)
//!                                  ▼
//!  poll_io(file slots) ──> Io::{PersistKeyring, CreateSegment, DeleteSegment}  (at once)
//!                          Io::DurableWrite(LogWrite { token, segment, offset, skip,
//!                                                      bytes })  (an RWF_DSYNC write)
//!                          Io::PrepareSpace { .. } (zeros ahead of the records, direct I/O)
//!  handle_write_done(now, token, outcome, buf) ──> Log::on_synced ──> idempotency settled,
//!                                 detector billing, Server::ack ──> poll_transmit
//!  handle_timeout(now) ──> QUIC timers; every tick: roll and retention (Io out), status
//!                          (Event::Status); every exchange: Event::Delta to the peers
//!  handle_delta / handle_control ──> the detector, the registry
//!  begin_stop(now) ──> new batches answered `rejected(shutting_down)`; commits of the
//!                      taken ones flushed and acked; linger; close; is_stopped()
//! ```
//!
//! The shell's loop, after every wake-up: feed every input (`handle_*`), then drain
//! `poll_transmit`, `poll_io` and `poll_event`, then sleep until `poll_timeout` or the next
//! input. Time comes in as [`Now`] (a monotonic instant for QUIC and deadlines, unix
//! milliseconds for record times and retention); randomness from the seed the caller
//! gives; nothing here touches a file, a socket or a clock, so the seeded simulation
//! (`sim/`) runs exactly this code.
//!
//! Invariants:
//! - a message is acked `accepted` only after the fdatasync covering it completed, and its
//!   idempotency claim is settled before the ACK is written (so a resend after the ACK is
//!   answered `duplicate`);
//! - every batch taken is answered exactly once: now (nothing to store), once durable, or
//!   with `storage_unavailable` when the log fails first; a batch the log has no room for
//!   is held, untouched (not claimed, judged or sealed), until a commit frees room, and
//!   so is one delivery has no room for while an edge drains it, for at most
//!   `chain::DELIVERY_FULL_HOLD` (then it is answered `throttled`);
//! - at most one group commit is in flight, and it starts only after every metadata
//!   operation returned before it was performed; a zero write of prepared space never
//!   overlaps the records or a commit write in flight.

mod ack;
mod bus;
mod chain;
mod commit;
mod delivery;
mod devices;
mod inbound_today;
mod outbox;
mod records;
mod replay;
mod retention;
mod stats;
mod stop;
mod timers;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::Transmit;

use crate::detect::{BusinessSignal, Delta, Detector};
use crate::idempotency::Idempotency;
use crate::log::RecordHeader;
use crate::log::{Log, LogFailure};
use crate::registry::Registry;
use crate::seal::keys::DerivedKeys;
use crate::seal::{SealedBatch, Sealer};
use crate::server::{ConnKey, Role, Server, SubmitBatch};
use crate::wire::delivery::{BusinessEvent, StatusEvent};
use crate::wire::{Reason, Status};
use crate::ShardId;

pub use bus::{PeerMsg, PeerTarget};
pub use commit::{Completion, DirectIo, GroupCommit};
/// One shard's delivery state, for `benches/delivery.rs` only (the shard owns it).
#[doc(hidden)]
pub use delivery::Delivery;
pub use delivery::{DeliveryConfig, DeliveryCounts, KeyCheck, StatusChange};
pub use devices::E2eConfig;
pub use outbox::OutboxCounts;
pub use replay::Replay;
pub use retention::RETENTION_LEAD_MS;
pub use stats::{AckLatency, LatencySnapshot, ShardStats, ACK_LATENCY_BOUNDS_US};

use ack::AwaitingQueue;
use devices::Devices;
use outbox::Outbox;
use stop::Stopping;

/// How often the log's time-driven work (roll by age, retention) runs, and how often a
/// shard publishes its detector status.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a shard sends its detector delta to the other shards (staleness of the
/// cross-shard view is at most about this plus one loop).
pub const DELTA_INTERVAL: Duration = Duration::from_millis(50);
/// How often a shard checkpoints its detector (and once more when it stops).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Retry-after for a copy of a message whose first copy is still waiting for its group
/// commit (about one fdatasync): by then the answer is `duplicate` or the id is free.
pub const IN_FLIGHT_RETRY_MS: u32 = 20;

/// The time of an input: a monotonic instant (QUIC, deadlines, latencies) and the wall
/// clock in unix milliseconds (record times, retention, detector windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Wall-clock time, unix milliseconds.
    pub unix_ms: u64,
}

/// A request of the control thread.
#[derive(Debug, Clone)]
pub enum Control {
    /// The registry file changed: new limits, exemptions, businesses, and the root keys
    /// of every business in it (those of businesses added since start included).
    Registry(Arc<Registry>, Arc<DerivedKeys>),
    /// The operator lifts a business's pause.
    Unpause(u32),
}

/// What the shell carries to other threads.
#[derive(Debug)]
pub enum Event {
    /// What this shard's detector learned since the last exchange: send it to every
    /// other shard (dropping it when a peer's inbox is full is allowed, and counted).
    Delta(Arc<Delta>),
    /// The detector's view of every business it knows, for the status file, and when
    /// `checkpoint` is set the detector's checkpoint bytes, to persist. The one with
    /// `last` set comes once, when the shard has stopped: deliver it even if that waits.
    Status {
        /// When, unix ms.
        at_unix_ms: u64,
        /// One signal per business.
        signals: Vec<BusinessSignal>,
        /// [`Detector::checkpoint`] bytes, every [`CHECKPOINT_INTERVAL`] and at the end.
        checkpoint: Option<Vec<u8>>,
        /// Events (statuses, replies) waiting for their business, by business id.
        event_backlogs: Vec<(u32, u64)>,
        /// Users' replies each business received today (UTC) on this shard, by id.
        inbound_today: Vec<(u32, u64)>,
        /// The final status of a stopped shard.
        last: bool,
    },
    /// A message for another shard (or every other one): deliver it with
    /// [`Shard::handle_peer`]. Dropping it when a peer's inbox is full is allowed (and
    /// counted): the owner of the work repeats it.
    Peer {
        /// Where it goes.
        to: PeerTarget,
        /// What.
        msg: Arc<PeerMsg>,
    },
}

/// A storage operation for the shell. Perform them in the order they come.
#[derive(Clone, PartialEq, Eq)]
pub enum Io {
    /// Replace the keyring file atomically and durably (temporary file, fsync, rename,
    /// fsync the directory) before the next operation. Report a failure with
    /// [`Shard::handle_metadata_failed`].
    PersistKeyring {
        /// The serialized keyring.
        bytes: Vec<u8>,
    },
    /// Create the empty segment file and fsync the directory, before the next operation.
    CreateSegment {
        /// The segment.
        segment_id: u64,
    },
    /// Remove the segment file and fsync the directory (its key is already destroyed).
    DeleteSegment {
        /// The segment.
        segment_id: u64,
    },
    /// Write `bytes[skip..]` at `offset` of the segment, durably (an `RWF_DSYNC` write:
    /// no sync without the whole write): encrypted, framed records (with direct I/O, from
    /// the start of a block and padded with zeros to its end). Complete with
    /// [`Shard::handle_write_done`], in any order and at any later time, handing the
    /// buffer back.
    DurableWrite(LogWrite),
    /// Write zeros (`bytes[skip..]`, a multiple of the block) at `offset` of the open
    /// segment, past its records, durably (as a [`Io::DurableWrite`]; direct I/O only):
    /// the later commits that write there overwrite allocated blocks instead of
    /// appending. Complete it with [`Shard::handle_write_done`] like a commit write; its
    /// failure is not the log's.
    PrepareSpace(LogWrite),
}

/// A log write ([`Io::DurableWrite`] or [`Io::PrepareSpace`]), as the shell submits it.
#[derive(Clone, PartialEq, Eq)]
pub struct LogWrite {
    /// Names the write in its completion.
    pub token: u64,
    /// The segment.
    pub segment_id: u64,
    /// Byte offset in the segment file.
    pub offset: u64,
    /// `bytes[skip..]` are written; the bytes before only align their address (with
    /// direct I/O; 0 otherwise).
    pub skip: usize,
    /// The buffer.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for LogWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{}: segment {} @ {}, {} bytes",
            self.token,
            self.segment_id,
            self.offset,
            self.bytes.len() - self.skip
        )
    }
}

impl Io {
    /// The write this operation is (a commit's or zeros ahead), or the metadata operation
    /// as it was.
    pub fn into_write(self) -> Result<LogWrite, Io> {
        match self {
            Io::DurableWrite(w) | Io::PrepareSpace(w) => Ok(w),
            other => Err(other),
        }
    }
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Io::PersistKeyring { bytes } => write!(f, "PersistKeyring({} bytes)", bytes.len()),
            Io::CreateSegment { segment_id } => write!(f, "CreateSegment({segment_id})"),
            Io::DeleteSegment { segment_id } => write!(f, "DeleteSegment({segment_id})"),
            Io::DurableWrite(w) => write!(f, "DurableWrite({w:?})"),
            Io::PrepareSpace(w) => write!(f, "PrepareSpace({w:?})"),
        }
    }
}

/// How a [`Io::DurableWrite`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written whole and synced.
    Done,
    /// The disk was full (ENOSPC, EDQUOT, or a short write).
    NoSpace,
    /// The write failed for another reason.
    WriteFailed,
    /// The write went through; its sync failed (a shell that syncs apart from the write;
    /// courier's writes carry their sync, `RWF_DSYNC`, and report a failed one as
    /// `WriteFailed`).
    SyncFailed,
}

/// Test-only faults planted in the real state machine, so the simulation can show that
/// it catches them (`sim/`). Never set in production: the setter exists only with the
/// `planted-bugs` feature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Acknowledge accepted messages when they are appended, before their group commit.
    pub ack_before_sync: bool,
    /// Release idempotency claims instead of settling them once durable: a resend after
    /// the ACK is stored again.
    pub release_instead_of_settle: bool,
}

/// The parts of a shard, built by the shell at start-up (the log from recovery, the
/// detector from its checkpoint).
pub struct ShardParts {
    /// This shard's index (also in its connection IDs and log positions).
    pub shard: ShardId,
    /// How many shards the node runs (deltas are exchanged when more than one).
    pub shards: usize,
    /// Largest message payload taken, bytes (larger or empty ones are rejected).
    pub payload_bytes_max: u32,
    /// The QUIC server.
    pub server: Server,
    /// The recovered log.
    pub log: Log,
    /// The sealer, on the epoch the log persisted at open.
    pub sealer: Sealer<Arc<DerivedKeys>>,
    /// The detector.
    pub detector: Detector,
    /// The node's idempotency table (shared by every shard).
    pub idempotency: Arc<Idempotency>,
    /// Seed of the randomness the log uses for new segment keys (a CSPRNG's output in
    /// the shell, a test seed in simulation).
    pub seed: [u8; 32],
    /// Where the shard publishes its counters.
    pub stats: Arc<ShardStats>,
    /// How messages are delivered (with `enabled` off they are stored and acked, never
    /// delivered).
    pub delivery: DeliveryConfig,
    /// What recovery found in the log about delivery.
    pub replay: Replay,
    /// `log.disk_reserve_bytes`: below this much free space new batches are throttled.
    pub disk_reserve_bytes: u64,
    /// Set when the shell writes segments with `O_DIRECT`: commit writes are then
    /// aligned ([`GroupCommit::with_direct_io`]).
    pub direct_io: Option<DirectIo>,
}

impl std::fmt::Debug for ShardParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardParts")
            .field("shard", &self.shard)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

/// A record the core writes for itself (a status, a cursor), waiting for room in the log.
#[derive(Debug)]
struct Internal {
    header: RecordHeader,
    /// For a status: the event its business hears (its id filled in once appended).
    event: Option<StatusEvent>,
}

/// A batch the log, or delivery, had no room for, and when it was first taken.
struct Held {
    batch: SubmitBatch,
    taken: Instant,
    /// It was held for delivery's room at least once (counted then).
    for_delivery: bool,
}

/// Periodic work: when each kind is next due.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    next_tick: Instant,
    next_exchange: Instant,
    next_checkpoint: Instant,
}

/// One shard's core. See the module docs for the calls and their order.
pub struct Shard {
    shard: ShardId,
    shards: usize,
    payload_bytes_max: u32,
    server: Server,
    idempotency: Arc<Idempotency>,
    detector: Detector,
    sealer: Sealer<Arc<DerivedKeys>>,
    sealed: SealedBatch,
    /// The stage chain's working lists.
    scratch: chain::Scratch,
    /// The log and its group commits.
    commit: GroupCommit,
    /// Batches waiting for their group commit.
    awaiting: AwaitingQueue,
    held: Option<Held>,
    /// Messages waiting for delivery (`None`: delivery is off).
    delivery: Option<Delivery>,
    /// Devices' keys and sessions (`None`: no end-to-end sealing).
    devices: Option<Devices>,
    /// The reply key id and business keys last published to this shard's edges.
    published_reply_keys: Option<(u32, usize)>,
    /// Events owed to businesses.
    outbox: Outbox,
    /// Events for each business of records appended and not durable yet (two per message
    /// entering delivery, one per status or reply): owed to it, not in the outbox yet
    /// (`Shard::events_room`).
    events_promised: delivery::PerBusiness,
    /// Users' replies each business received today.
    inbound_today: inbound_today::InboundToday,
    /// Free bytes the log's file system must keep, and what the shell last measured
    /// (`None` before the first measurement: nothing is throttled on a guess).
    disk_reserve_bytes: u64,
    disk_free_bytes: Option<u64>,
    /// DELIVERs for this shard's edge connections waiting for their credit.
    credit_wait: bus::CreditWait,
    /// This shard's connections that take deliveries or events.
    local_attachments: BTreeMap<ConnKey, Role>,
    /// Statuses and cursors to append.
    internal: VecDeque<Internal>,
    /// What retention announced to delivery, and which segments may go.
    expiry: retention::ExpiryGate,
    /// The time of the last input.
    clock: Now,
    events: VecDeque<Event>,
    schedule: Schedule,
    stop: Option<Stopping>,
    stats: Arc<ShardStats>,
    bugs: PlantedBugs,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("shard", &self.shard)
            .field("log_next_index", &self.commit.log().next_index())
            .field("log_durable_end", &self.commit.log().durable_end())
            .field("awaiting", &self.awaiting.len())
            .field("stopping", &self.stop.is_some())
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// A shard from its parts, at `now`.
    pub fn new(parts: ShardParts, now: Now) -> Shard {
        assert!(parts.shards >= 1, "a node has at least one shard");
        assert!(
            parts.shard.within(parts.shards),
            "shard index within the node"
        );
        assert_eq!(parts.server.shard(), parts.shard, "one shard id");
        let c = &parts.delivery;
        // What admission does not reserve for (see `outbox.rs`): a `read` for each
        // message pending (each owes at least one event the bound counts, so at most
        // the bound's worth) and for each remembered after its delivery, and a first
        // batch's statuses and reads (three per message) when nothing waited.
        let past_bound_max = (c.events_per_business_max as usize)
            .saturating_add(c.delivered_kept_max as usize)
            .saturating_add(3 * parts.server.batch_messages_max() as usize);
        let outbox = Outbox::new(
            c.events_per_business_max,
            past_bound_max,
            c.events_per_push_max,
            c.event_ack_timeout_ms,
        );
        let cfg = c.enabled.then(|| c.clone());
        let devices = (c.enabled && c.e2e.enabled).then(|| {
            Devices::new(
                c.e2e.clone(),
                u32::from(parts.shard.get()),
                parts.shards as u32,
            )
        });
        let mut server = parts.server;
        server.set_end_to_end(devices.is_some());
        let mut shard = Shard {
            shard: parts.shard,
            shards: parts.shards,
            payload_bytes_max: parts.payload_bytes_max,
            server,
            idempotency: parts.idempotency,
            detector: parts.detector,
            sealer: parts.sealer,
            sealed: SealedBatch::new(),
            scratch: chain::Scratch::default(),
            commit: match parts.direct_io {
                Some(io) => GroupCommit::new(parts.log, parts.seed).with_direct_io(io),
                None => GroupCommit::new(parts.log, parts.seed),
            },
            awaiting: AwaitingQueue::default(),
            held: None,
            delivery: cfg.map(Delivery::new),
            devices,
            published_reply_keys: None,
            outbox,
            events_promised: delivery::PerBusiness::default(),
            inbound_today: inbound_today::InboundToday::default(),
            disk_reserve_bytes: parts.disk_reserve_bytes,
            disk_free_bytes: None,
            credit_wait: bus::CreditWait::new(
                (c.in_flight_max as usize).saturating_mul(parts.shards),
                u64::from(c.outcome_timeout_ms / 2),
            ),
            local_attachments: BTreeMap::new(),
            internal: VecDeque::new(),
            expiry: retention::ExpiryGate::default(),
            clock: now,
            events: VecDeque::new(),
            schedule: Schedule {
                next_tick: now.at + TICK_INTERVAL,
                next_exchange: now.at + DELTA_INTERVAL,
                next_checkpoint: now.at + CHECKPOINT_INTERVAL,
            },
            stop: None,
            stats: parts.stats,
            bugs: PlantedBugs::default(),
        };
        // A detector restored from a checkpoint written before a stop: what the
        // retention passed meanwhile goes before any traffic (issue 19).
        shard.detector.expire(now.unix_ms);
        shard.publish_log_figures();
        shard.resume(now, parts.replay);
        shard
    }

    /// Takes up delivery where the log left it: waiting messages, unacknowledged events.
    fn resume(&mut self, now: Now, replay: Replay) {
        for (b, cursor) in &replay.cursors {
            self.outbox.restore_cursor(*b, *cursor);
        }
        if self.delivery.is_none() {
            return;
        }
        for (b, e) in replay.events {
            if let BusinessEvent::Inbound(i) = &e {
                self.inbound_today.count(b, i.at_ms);
            }
            self.outbox.add(b, e);
        }
        let delivery = self.delivery.as_mut().expect("checked");
        for (m, r) in replay.messages {
            delivery.admit(
                now.unix_ms,
                m,
                r.business_id,
                r.client_id,
                r.recipient,
                r.expires_ms,
                r.payload,
                None,
                r.sent,
            );
        }
        if !delivery.has_room(0, 0, self.outbox.payload_bytes()) {
            tracing::warn!(
                shard = self.shard.index(),
                pending = delivery.pending(),
                "the log holds more undelivered messages than delivery.pending_max or \
                 pending_bytes_max allow: new messages are throttled until they drain"
            );
        }
    }

    /// Plants test-only faults (see [`PlantedBugs`]).
    #[cfg(feature = "planted-bugs")]
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    /// This shard's index.
    pub fn index(&self) -> ShardId {
        self.shard
    }

    /// The counters it publishes.
    pub fn stats(&self) -> &Arc<ShardStats> {
        &self.stats
    }

    /// The QUIC server (read-only: counters, connections).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The log (read-only: positions, segments, failure).
    pub fn log(&self) -> &Log {
        self.commit.log()
    }

    /// Batches taken and not answered yet: waiting for their group commit, or held until
    /// the log has room.
    pub fn batches_waiting(&self) -> usize {
        self.awaiting.len() + usize::from(self.held.is_some())
    }

    /// Delivery's counters, and the messages waiting (`None`: delivery is off).
    pub fn delivery_counts(&self) -> Option<(DeliveryCounts, usize)> {
        self.delivery.as_ref().map(|d| (d.counts(), d.pending()))
    }

    /// Statuses and cursors waiting for room in the log.
    pub fn records_waiting(&self) -> usize {
        self.internal.len()
    }

    /// The outbox's counters and the events waiting.
    pub fn outbox_counts(&self) -> (OutboxCounts, usize) {
        (self.outbox.counts(), self.outbox.len())
    }

    /// The detector (read-only: signals, figures).
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// Feeds one received datagram.
    pub fn handle_datagram(
        &mut self,
        now: Now,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        data: BytesMut,
    ) {
        self.server.handle_datagram(now.at, remote, local_ip, data);
        self.advance(now);
    }

    /// Another shard's detector delta.
    pub fn handle_delta(&mut self, now: Now, delta: &Delta) {
        self.detector.merge(now.unix_ms, delta);
        self.advance(now);
    }

    /// The shell measured the free space of the log's file system (about once a
    /// second). Below `log.disk_reserve_bytes` new batches and users' replies are
    /// throttled; above it they are taken again.
    pub fn handle_disk_free(&mut self, now: Now, bytes: u64) {
        let was_low = self.disk_low();
        self.disk_free_bytes = Some(bytes);
        let low = self.disk_low();
        if low != was_low {
            stats::set(&self.stats.disk_low, u64::from(low));
            if low {
                tracing::warn!(
                    shard = self.shard.index(),
                    free_bytes = bytes,
                    reserve_bytes = self.disk_reserve_bytes,
                    "disk space below the reserve: new batches are throttled until it returns"
                );
            } else {
                tracing::info!(
                    shard = self.shard.index(),
                    free_bytes = bytes,
                    "disk space above the reserve again: taking batches"
                );
            }
        }
        self.advance(now);
    }

    /// Whether the log's file system has less free space than the reserve.
    fn disk_low(&self) -> bool {
        self.disk_free_bytes
            .is_some_and(|free| free < self.disk_reserve_bytes)
    }

    /// A request of the control thread.
    pub fn handle_control(&mut self, now: Now, control: Control) {
        match control {
            Control::Registry(reg, keys) => {
                // A business added since start can be sealed for from now on; the keys of
                // the others are the same (root keys are never replaced).
                self.commit.set_field_keys(keys.clone());
                self.sealer.set_keys(keys);
                for b in reg.iter() {
                    let changed = self
                        .server
                        .registry()
                        .get(b.id)
                        .is_none_or(|old| (old.tier, old.mps) != (b.tier, b.mps));
                    if changed {
                        self.detector.set_limits(b.id, b.tier, b.mps);
                    }
                }
                let revoked = self.server.set_registry(now.at, reg);
                if revoked > 0 {
                    tracing::warn!(
                        shard = self.shard.index(),
                        connections = revoked,
                        "connections closed: the reloaded registry revoked their credentials"
                    );
                }
            }
            Control::Unpause(id) => {
                if self.detector.unpause(id) {
                    tracing::info!(
                        shard = self.shard.index(),
                        business = id,
                        "business unpaused by the operator"
                    );
                }
            }
        }
        self.advance(now);
    }

    /// When [`Shard::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.schedule.next_tick;
        if let Some(t) = self.server.poll_timeout() {
            next = next.min(t);
        }
        if self.shards > 1 {
            next = next.min(self.schedule.next_exchange);
        }
        if let Some(t) = self.stop.as_ref().and_then(Stopping::next_deadline) {
            next = next.min(t);
        }
        // A batch held for delivery's room is answered when its hold ends.
        if let Some(h) = self.held.as_ref().filter(|h| h.for_delivery) {
            next = next.min(h.taken + chain::DELIVERY_FULL_HOLD);
        }
        // Lists the edge published wait for their verification, a few per turn.
        if self.devices.as_ref().is_some_and(Devices::has_published) {
            next = next.min(self.clock.at);
        }
        let delivery = self.delivery.as_ref().and_then(Delivery::next_due_ms);
        for ms in [delivery, self.outbox.next_deadline_ms()]
            .into_iter()
            .flatten()
        {
            next = next.min(self.instant_of(ms));
        }
        Some(next)
    }

    /// The monotonic instant of wall-clock time `unix_ms`, by the last input's clock.
    fn instant_of(&self, unix_ms: u64) -> Instant {
        self.clock.at + Duration::from_millis(unix_ms.saturating_sub(self.clock.unix_ms))
    }

    /// Does whatever is due at `now`: QUIC timers, the log's tick (roll, retention), the
    /// status, the delta exchange, the stop's deadlines.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.server.poll_timeout().is_some_and(|t| t <= now.at) {
            self.server.handle_timeout(now.at);
        }
        if let Some(d) = self.delivery.as_mut() {
            d.tick(now.unix_ms);
        }
        self.outbox.tick(now.unix_ms);
        if self.shards > 1 && now.at >= self.schedule.next_exchange {
            self.schedule.next_exchange = now.at + DELTA_INTERVAL;
            let delta = self.detector.export_delta(now.unix_ms);
            if !delta.is_empty() {
                self.events.push_back(Event::Delta(Arc::new(delta)));
            }
        }
        if now.at >= self.schedule.next_tick {
            self.schedule.next_tick = now.at + TICK_INTERVAL;
            self.tick(now);
        }
        self.advance(now);
    }

    /// The log's time-driven work and the periodic status.
    fn tick(&mut self, now: Now) {
        // What retention is about to drop (a little ahead: retention.rs): undelivered
        // messages become `expired` first, events leave the outbox.
        let soon = now.unix_ms + retention::RETENTION_LEAD_MS;
        if let Some(end) = self.commit.log().expiring_end(soon) {
            if self.expiry.announce(end) {
                if let Some(d) = self.delivery.as_mut() {
                    d.expire_below(self.shard, end);
                }
                self.outbox.drop_below(self.shard, end);
            }
        }
        while let Some((business_id, cursor)) = self.outbox.poll_cursor() {
            self.internal.push_back(Internal {
                header: RecordHeader {
                    kind: crate::log::RecordKind::Cursor,
                    business_id,
                    time_ms: now.unix_ms,
                    client_id: 0,
                    recipient: None,
                    reference: cursor.0,
                    code: 0,
                },
                event: None,
            });
        }
        self.announce_attachments();
        self.publish_reply_keys(now, false);
        let log = self.commit.log();
        // A failed log writes no status any more; deleting expired data is still owed.
        let end_max = match log.failure() {
            Some(_) => u64::MAX,
            None => self.expiry.drop_end_max(log.durable_end()),
        };
        let dropped = self.commit.tick_below(now.unix_ms, end_max);
        for d in &dropped {
            tracing::info!(
                shard = self.shard.index(),
                segment = d.segment_id,
                records = d.records,
                oldest_age_secs = now.unix_ms.saturating_sub(d.since_ms) / 1000,
                "retention dropped a segment (its key destroyed first)"
            );
        }
        stats::add(&self.stats.log_segments_dropped, dropped.len() as u64);
        self.publish_log_figures();
        let checkpoint = now.at >= self.schedule.next_checkpoint;
        if checkpoint {
            self.schedule.next_checkpoint = now.at + CHECKPOINT_INTERVAL;
        }
        self.publish_status(now, checkpoint, false);
    }

    fn publish_status(&mut self, now: Now, checkpoint: bool, last: bool) {
        if checkpoint {
            // Nothing older than the retention goes into the file (issue 19); quiet
            // businesses' state ages here, every checkpoint interval.
            self.detector.expire(now.unix_ms);
        }
        self.events.push_back(Event::Status {
            at_unix_ms: now.unix_ms,
            signals: self.detector.signals(),
            checkpoint: checkpoint.then(|| self.detector.checkpoint()),
            event_backlogs: self.outbox.backlogs(),
            inbound_today: self.inbound_today.figures(now.unix_ms),
            last,
        });
    }

    /// Delivery's counters and gauges, for the metrics.
    fn publish_delivery_figures(&self) {
        let st = &self.stats;
        if let Some(d) = &self.delivery {
            let c = d.counts();
            stats::set(&st.delivery_pending, d.pending() as u64);
            stats::set(&st.delivery_pending_bytes, d.payload_bytes());
            stats::set(&st.delivery_handoffs, c.handoffs);
            stats::set(&st.delivery_retransmissions, c.retransmissions);
            stats::set(&st.delivered, c.delivered);
            stats::set(&st.read, c.read);
            stats::set(&st.failed, c.failed);
            stats::set(&st.expired, c.expired);
            let oldest = d.oldest_accepted_ms().unwrap_or(0);
            stats::set(&st.delivery_oldest_unix_ms, oldest);
        }
        let o = self.outbox.counts();
        stats::set(&st.events_pushed, o.events_pushed);
        stats::set(&st.events_acked, o.acked);
        stats::set(&st.events_dropped, o.dropped);
        stats::set(&st.events_backlog, self.outbox.len() as u64);
        if let Some(d) = &self.devices {
            let c = d.counts();
            let (directory, sessions) = d.sizes();
            stats::set(&st.e2e_keys_wanted, c.keys_wanted);
            stats::set(&st.e2e_bundles_refused, c.bundles_refused);
            stats::set(&st.e2e_one_time_refused, c.one_time_refused);
            stats::set(&st.e2e_sessions_new, c.sessions_new);
            stats::set(&st.e2e_copies, c.copies);
            stats::set(&st.e2e_replies_refused, c.replies_refused);
            stats::set(&st.e2e_directory, directory as u64);
            stats::set(&st.e2e_sessions, sessions as u64);
        }
    }

    /// Log figures that change slowly (segment count), for the metrics.
    fn publish_log_figures(&self) {
        let segments = self.commit.log().segment_ids().count();
        stats::set(&self.stats.log_segments, segments as u64);
    }

    /// The next datagram(s) to send, written into `buf` (cleared first), at most
    /// `max_datagrams` of one GSO batch.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        if let Some(t) = self.server.poll_transmit(now, max_datagrams, buf) {
            return Some(t);
        }
        // Closing waits until what could still go out went: closing a QUIC connection
        // discards stream data not yet sent.
        if self.stop.as_mut().is_some_and(|s| s.take_close_due(now)) {
            self.server.close_all(
                now,
                crate::wire::code::SHUTTING_DOWN,
                b"server shutting down",
            );
            return self.server.poll_transmit(now, max_datagrams, buf);
        }
        None
    }

    /// The next storage operation, if any. Group-commit writes are handed out only when
    /// the shell has `file_slots_free` slots for all of one commit's writes.
    pub fn poll_io(&mut self, file_slots_free: usize) -> Option<Io> {
        let io = self.commit.poll_io(file_slots_free);
        if let Some(Io::DurableWrite(LogWrite { bytes, .. })) = &io {
            stats::add(&self.stats.log_appended_bytes, bytes.len() as u64);
        }
        io
    }

    /// The next event for other threads, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A metadata operation ([`Io::PersistKeyring`], [`Io::CreateSegment`],
    /// [`Io::DeleteSegment`]) failed: the log fails for good; waiting batches hear
    /// `storage_unavailable`, and so does every later message. Operations queued after it
    /// are dropped (nothing is written after a failure), except deletions of expired data.
    pub fn handle_metadata_failed(&mut self, now: Now) {
        let failure = self.commit.metadata_failed();
        self.log_failed(now, failure);
        self.advance(now);
    }

    /// A [`Io::DurableWrite`] completed (`buf` is its buffer, handed back for reuse).
    pub fn handle_write_done(&mut self, now: Now, token: u64, outcome: WriteOutcome, buf: Vec<u8>) {
        match self.commit.complete(token, outcome, buf) {
            Completion::Nothing => {}
            Completion::Synced => {
                stats::add(&self.stats.commits, 1);
                self.ack_durable(now);
            }
            Completion::Failed(f) => self.log_failed(now, f),
        }
        self.advance(now);
    }

    /// The segment a [`Io::DurableWrite`] or [`Io::PrepareSpace`] still in flight goes
    /// to (for the shell's file bookkeeping).
    pub fn segment_of_write(&self, token: u64) -> Option<u64> {
        self.commit.segment_of(token)
    }

    /// Whether `token` names an [`Io::PrepareSpace`] write (whose failure only means
    /// that later commits append).
    pub fn is_prepare_write(token: u64) -> bool {
        GroupCommit::is_prepare(token)
    }

    /// Stops taking batches (a batch decoded from now on is answered
    /// `rejected(shutting_down)`); finishes the group commits of those already taken and
    /// acks them, lingers a few round trips so the ACKs leave, then closes every
    /// connection with `SHUTTING_DOWN`. [`Shard::is_stopped`] says when it is over.
    pub fn begin_stop(&mut self, now: Now) {
        if self.stop.is_none() {
            self.stop = Some(Stopping::new(now.at));
            self.advance(now);
        }
    }

    /// Whether the stop is over (every connection closed, or its bounds passed). The
    /// final [`Event::Status`] is queued by then.
    pub fn is_stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(Stopping::is_done)
    }

    /// After every input: reports and signals drained, held and new batches through the
    /// stage chain, the stop advanced.
    fn advance(&mut self, now: Now) {
        self.clock = now;
        // Bounded by the server's report queue.
        while let Some(entries) = self.server.poll_report() {
            self.detector.report_entries(now.unix_ms, &entries);
        }
        // Bounded by the server's delivery input queue.
        while let Some(input) = self.server.poll_delivery() {
            self.on_delivery_input(now, input);
        }
        if let Some(h) = self.held.take() {
            self.held = self.take_batch(now, h);
        }
        // Bounded by the batches the server holds (connections x streams x depth, and
        // each business's share of batches in flight).
        while self.held.is_none() {
            let Some(batch) = self.server.poll_batch() else {
                break;
            };
            if self.stop.is_some() {
                // Stopping takes no new batch; its sender hears so rather than a close.
                let statuses = vec![Status::Rejected(Reason::ShuttingDown); batch.messages.len()];
                self.ack(
                    now,
                    now.at,
                    batch.ticket,
                    batch.business_id,
                    &statuses,
                    true,
                );
                continue;
            }
            self.held = self.take_batch(
                now,
                Held {
                    batch,
                    taken: now.at,
                    for_delivery: false,
                },
            );
        }
        self.append_internal(now);
        if self.delivery.is_some() {
            self.dispatch(now);
            self.append_internal(now);
        }
        let next_index = self.commit.log().next_index();
        self.expiry.appended(self.internal.is_empty(), next_index);
        self.drain_signals();
        self.advance_stop(now);
        stats::set(
            &self.stats.connections,
            self.server.connection_count() as u64,
        );
        let server = self.server.stats();
        stats::set(&self.stats.connections_refused, server.connections_refused);
        stats::set(&self.stats.address_cap_refused, server.address_cap_refused);
        stats::set(
            &self.stats.business_cap_refused,
            server.business_cap_refused,
        );
        stats::set(&self.stats.share_paused, server.share_paused);
        stats::set(&self.stats.others_ahead_max, server.others_ahead_max);
        stats::set(&self.stats.retries_sent, server.retries_sent);
        stats::set(&self.stats.half_open, server.half_open);
        self.publish_delivery_figures();
    }

    fn drain_signals(&mut self) {
        while let Some(sig) = self.detector.poll_signal() {
            stats::add(&self.stats.signals, 1);
            tracing::warn!(
                shard = self.shard.index(),
                business = sig.business_id,
                rating = sig.rating.name(),
                tier = sig.tier.name(),
                paused = sig.paused,
                why = sig.why.map_or("none", |w| w.name()),
                measured = %sig.evidence.map_or_else(String::new, |e| e.to_string()),
                "integrity signal"
            );
        }
    }

    fn advance_stop(&mut self, now: Now) {
        let Some(stop) = self.stop.as_mut() else {
            return;
        };
        let flushed = self.awaiting.len() == 0
            && self.held.is_none()
            && self.internal.is_empty()
            && self.commit.is_idle();
        let was_done = stop.is_done();
        stop.advance(
            now.at,
            flushed,
            self.server.rtt_max(),
            self.server.connection_count(),
        );
        if stop.is_done() && !was_done {
            self.publish_status(now, true, true);
        }
    }

    /// The log failed for good: nothing waiting becomes durable; its senders hear
    /// `storage_unavailable`, and so does every later message.
    fn log_failed(&mut self, now: Now, failure: LogFailure) {
        tracing::error!(shard = self.shard.index(), %failure, "log failed: this shard takes no more messages");
        stats::set(&self.stats.log_failed, 1);
        self.fail_awaiting(now);
    }
}
