//! One shard: a pinned thread that owns a UDP socket, its io_uring, a sans-IO QUIC
//! [`Server`] and the ingest stage, and shares nothing with other shards but a bounded
//! hand-off channel for datagrams that belong to them.
//!
//! ```text
//!   UdpRing::wait(timeout)             io_uring: multishot recvmsg, sendmsg, timeout, eventfd
//!     -> drain: Recv (GRO batch) ---> split into datagrams
//!          owner_shard(dcid) == other ---> forward (crossbeam, bounded) + wake it
//!          else ---> Server::handle_datagram
//!     -> inbox: forwarded datagrams ---> Server::handle_datagram
//!     -> Server::handle_timeout when due
//!     -> Server::poll_batch ---> Ingest::check, Idempotency::claim (shared by all shards:
//!          a resend is answered duplicate here), Detector::observe_batch, per message
//!          Sealer::seal ---> Log::append ---> (fdatasync) ---> Idempotency::settle,
//!          Server::ack, Detector::record_accepted
//!     -> Server::poll_transmit ---> SendBuf::submit (GSO) while send slots are free
//!     -> every DELTA_INTERVAL: Detector::export_delta to every peer; peers' deltas merged
//!     -> control inbox (registry reloads, unpause requests); status and checkpoints out
//! ```
//!
//! The loop is the shell half of the polling contract in `courier_pipeline::server`.
//!
//! Detection: each shard judges the businesses it sees with its own
//! [`Detector`]; every [`DELTA_INTERVAL`] it sends what it learned to every other shard
//! (over a bounded crossbeam channel) and merges theirs, so a business spread over
//! several shards is judged on all its traffic at most about 100 ms late. The control
//! thread ([`crate::control`]) persists the detectors' checkpoints and status.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use courier_pipeline::cid::owner_shard;
use courier_pipeline::detect::{BusinessLimits, Delta, Detector, Verdict};
use courier_pipeline::idempotency::{Claim, ClaimTicket, Idempotency};
use courier_pipeline::ingest::Ingest;
use courier_pipeline::log::{LogError, Record, RecordHeader};
use courier_pipeline::seal::keys::DerivedKeys;
use courier_pipeline::seal::{SealError, SealedBatch, Sealer};
use courier_pipeline::server::{Server, ServerStats, SubmitBatch, Ticket};
use courier_pipeline::wire::{code, LogPosition, Message, Reason, Status};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::Arc as StdArc;

use crate::control::{ShardControl, ToControl};
use crate::metrics::AckLatency;
use crate::store::ShardStore;
use crate::uring::{FileDone, RingEvent, UdpRing, Waker};

/// Datagrams queued towards one other shard; more are dropped (QUIC recovers them).
pub const FORWARD_QUEUE_MAX: usize = 4096;
/// How long a shutting-down shard waits for its connections to close.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a shutting-down shard waits for the group commits of batches it took.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// A stopping shard keeps its connections open this many round trips after its last
/// ACK, within [`ACK_LINGER_MIN`]..=[`ACK_LINGER_MAX`]: closing a QUIC connection
/// discards stream data not yet sent or not yet acknowledged, so closing right after the
/// last group commit lost the ACKs of batches already durable (tests/graceful_stop.rs
/// counted them).
pub const ACK_LINGER_RTTS: u32 = 3;
/// Shortest linger after the last ACK: one probe timeout on a short path (the peer's
/// 25 ms ack delay plus a little), so a lost ACK packet is still retransmitted.
pub const ACK_LINGER_MIN: Duration = Duration::from_millis(50);
/// Longest linger after the last ACK.
pub const ACK_LINGER_MAX: Duration = Duration::from_millis(500);
/// How often the log's time-driven work (roll by age, retention) runs, and how often a
/// shard publishes its detector status.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a shard sends its detector delta to the other shards (staleness of the
/// cross-shard view is at most about this plus one loop).
pub const DELTA_INTERVAL: Duration = Duration::from_millis(50);
/// Deltas queued towards one shard; more are dropped and counted.
pub const DELTA_QUEUE_MAX: usize = 64;
/// How often a shard checkpoints its detector (and once more when it stops).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Retry-after for a copy of a message whose first copy is still waiting for its group
/// commit (about one fdatasync): by then the answer is `duplicate` or the id is free.
pub const IN_FLIGHT_RETRY_MS: u32 = 20;

/// A batch whose accepted messages wait for the fdatasync that covers them.
struct Awaiting {
    ticket: Ticket,
    /// When the shard took the batch (for the ack-latency histogram).
    taken: Instant,
    business_id: u32,
    statuses: Vec<Status>,
    /// The idempotency claims of the accepted messages, in order: settled with their
    /// positions once durable, released if the log fails first.
    claims: Vec<ClaimTicket>,
    /// Durable once the log's durable end reaches this index.
    end_index: u64,
}

/// A datagram received by one shard for a connection that another shard owns.
#[derive(Debug)]
pub struct Forwarded {
    /// The datagram.
    pub data: BytesMut,
    /// Its sender.
    pub from: SocketAddr,
    /// The local address it was sent to.
    pub local_ip: Option<IpAddr>,
}

/// The way to reach one shard from another.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its inbox.
    pub tx: Sender<Forwarded>,
    /// Its detector deltas inbox.
    pub deltas: Sender<Arc<Delta>>,
    /// Its control inbox (from the control thread).
    pub control: Sender<ShardControl>,
    /// Wakes its ring.
    pub waker: Waker,
}

/// Counters a shard publishes for the process (read by other threads).
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Messages accepted.
    pub accepted: AtomicU64,
    /// Messages with any other status.
    pub not_accepted: AtomicU64,
    /// Batches acked.
    pub batches: AtomicU64,
    /// Datagrams handed to another shard.
    pub forwarded: AtomicU64,
    /// Datagrams dropped because a peer's inbox was full.
    pub forward_dropped: AtomicU64,
    /// Live connections.
    pub connections: AtomicU64,
    /// Group commits (write + fdatasync) completed.
    pub commits: AtomicU64,
    /// 1 once the shard's log failed for good.
    pub log_failed: AtomicU64,
    /// Messages answered `duplicate` (their client id already durable in the log).
    pub duplicates: AtomicU64,
    /// Messages answered `throttled` because another copy of their id was in flight.
    pub in_flight_retries: AtomicU64,
    /// Messages the detector throttled.
    pub detect_throttled: AtomicU64,
    /// Messages the detector rejected (limit reached, sender paused).
    pub detect_rejected: AtomicU64,
    /// Integrity signals raised on this shard.
    pub signals: AtomicU64,
    /// Detector deltas dropped because a peer's inbox was full.
    pub deltas_dropped: AtomicU64,
    /// Bytes appended to the log (sealed records with their framing).
    pub log_appended_bytes: AtomicU64,
    /// Live log segments, updated every [`TICK_INTERVAL`].
    pub log_segments: AtomicU64,
    /// Log segments retention deleted.
    pub log_segments_dropped: AtomicU64,
    /// Time from taking a batch to its ACK.
    pub ack_latency: AckLatency,
}

/// Everything a shard thread owns.
pub struct Shard {
    /// Index, also carried in connection IDs.
    pub index: usize,
    /// The ring over the shard's socket.
    pub ring: UdpRing,
    /// The QUIC server.
    pub server: Server,
    /// The ingest stage (per-message checks).
    pub ingest: Ingest,
    /// The shard's log.
    pub store: ShardStore,
    /// Seals each accepted message for its recipient before it reaches the log.
    pub sealer: Sealer<StdArc<DerivedKeys>>,
    /// Reused output of the sealer.
    pub sealed: SealedBatch,
    /// Judges each message of each business (limits, surges, reports).
    pub detector: Detector,
    /// Client ids already stored, shared by every shard.
    pub idempotency: Arc<Idempotency>,
    /// Deltas other shards' detectors sent here.
    pub deltas: Receiver<Arc<Delta>>,
    /// Requests from the control thread.
    pub control: Receiver<ShardControl>,
    /// Status and checkpoints to the control thread.
    pub to_control: Sender<ToControl>,
    /// Every shard's peer handle, this one's included (index = shard).
    pub peers: Vec<Peer>,
    /// Datagrams other shards forwarded here.
    pub inbox: Receiver<Forwarded>,
    /// Set once to stop.
    pub shutdown: Arc<AtomicBool>,
    /// Published counters.
    pub counters: Arc<ShardCounters>,
    /// Most datagrams per GSO send.
    pub max_datagrams: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Runs until shutdown is requested and the connections have closed (or the drain
    /// bounds passed). Returns the server's final counters.
    ///
    /// Shutdown: stop taking batches (their streams stay unread), finish the group
    /// commits of every batch already taken and ACK them, linger a few round trips so
    /// the ACKs are transmitted, then close every connection with SHUTTING_DOWN.
    pub fn run(mut self) -> Result<ServerStats, crate::uring::RingError> {
        let mut state = LoopState {
            awaiting: VecDeque::new(),
            held: None,
            files: Vec::new(),
            next_tick: Instant::now() + TICK_INTERVAL,
            next_exchange: Instant::now() + DELTA_INTERVAL,
            next_checkpoint: Instant::now() + CHECKPOINT_INTERVAL,
        };
        self.publish_log_figures();
        let mut flush_deadline: Option<Instant> = None;
        let mut linger_deadline: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if flush_deadline.is_none() && self.shutdown.load(Ordering::Acquire) {
                flush_deadline = Some(now + FLUSH_TIMEOUT);
            }
            if let (Some(f), None) = (flush_deadline, drain_deadline) {
                let flushed = state.awaiting.is_empty()
                    && state.held.is_none()
                    && !self.store.log().commit_due();
                if flushed && linger_deadline.is_none() {
                    let linger = (self.server.rtt_max() * ACK_LINGER_RTTS)
                        .clamp(ACK_LINGER_MIN, ACK_LINGER_MAX);
                    linger_deadline = Some(now + linger);
                }
                if linger_deadline.is_some_and(|l| now >= l) || now >= f {
                    // What can still go out goes before the close.
                    self.flush_transmits(now);
                    self.server
                        .close_all(now, code::SHUTTING_DOWN, b"server shutting down");
                    drain_deadline = Some(now + DRAIN_TIMEOUT);
                }
            }
            if let Some(d) = drain_deadline {
                if self.server.connection_count() == 0 || now >= d {
                    self.flush_transmits(now);
                    self.publish(unix_ms(), true);
                    return Ok(self.server.stats().clone());
                }
            }
            self.flush_transmits(now);
            let mut timeout = self
                .server
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(TICK_INTERVAL)
                .min(state.next_tick.saturating_duration_since(now));
            if self.peers.len() > 1 {
                timeout = timeout.min(state.next_exchange.saturating_duration_since(now));
            }
            if flush_deadline.is_some() {
                // While stopping, wake often enough to check the deadlines.
                timeout = timeout.min(Duration::from_millis(50));
            }
            if let Some(l) = linger_deadline {
                timeout = timeout.min(l.saturating_duration_since(now));
            }
            self.ring.wait(Some(timeout))?;
            let now = Instant::now();
            self.receive(now, &mut state.files)?;
            for done in state.files.drain(..) {
                self.on_file_done(done, &mut state.awaiting);
            }
            if self.server.poll_timeout().is_some_and(|t| t <= now) {
                self.server.handle_timeout(now);
            }
            let now_ms = unix_ms();
            self.detection(now, now_ms, &mut state);
            if now >= state.next_tick {
                state.next_tick = now + TICK_INTERVAL;
                match self.store.tick(now_ms) {
                    Ok(dropped) => {
                        self.counters
                            .log_segments_dropped
                            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                    }
                    Err(f) => self.log_failed(f, &mut state.awaiting),
                }
                self.publish_log_figures();
            }
            // A batch the log could not take (its group commit was full) goes first; its
            // latency counts from when it was first taken.
            if let Some((batch, taken)) = state.held.take() {
                state.held = self
                    .take_batch(now, now_ms, taken, batch, &mut state.awaiting)
                    .map(|b| (b, taken));
            }
            while state.held.is_none() && flush_deadline.is_none() {
                let Some(batch) = self.server.poll_batch() else {
                    break;
                };
                state.held = self
                    .take_batch(now, now_ms, now, batch, &mut state.awaiting)
                    .map(|b| (b, now));
            }
            self.store.commit(&mut self.ring);
            self.counters
                .connections
                .store(self.server.connection_count() as u64, Ordering::Relaxed);
            self.counters
                .log_appended_bytes
                .store(self.store.appended_bytes(), Ordering::Relaxed);
        }
    }

    /// Checks a batch and appends its accepted messages to the log. Returns the batch when
    /// the log's group commit is full (retry after the next sync).
    fn take_batch(
        &mut self,
        now: Instant,
        now_ms: u64,
        taken: Instant,
        batch: SubmitBatch,
        awaiting: &mut VecDeque<Awaiting>,
    ) -> Option<SubmitBatch> {
        let mut statuses = Vec::with_capacity(batch.messages.len());
        self.sealed.clear();
        // The registry in force decides the business's limits; a business removed from
        // it since its connection authenticated sends no more.
        let Some(limits) = self
            .server
            .registry()
            .get(batch.business_id)
            .map(BusinessLimits::from)
        else {
            statuses.resize(batch.messages.len(), Status::Rejected(Reason::Unauthorized));
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses);
            return None;
        };
        // Per message: the checks, then sealing for its recipient; the sealed bytes are
        // what the log stores.
        // First the ingest checks and the idempotency claims: a resend is answered before
        // it counts for detection or billing. `early[i]` is message i's answer when it
        // stops here; `fresh` holds the claims of the others, in order.
        let mut early: Vec<Option<Status>> = Vec::with_capacity(batch.messages.len());
        let mut fresh = Vec::with_capacity(batch.messages.len());
        for m in &batch.messages {
            if let Some(reason) = self.ingest.check(m) {
                early.push(Some(Status::Rejected(reason)));
                continue;
            }
            match self
                .idempotency
                .claim(batch.business_id, m.client_id, now_ms)
            {
                Claim::Fresh(t) => {
                    fresh.push(t);
                    early.push(None);
                }
                Claim::Duplicate(p) => {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    early.push(Some(Status::Duplicate(p)));
                }
                Claim::InFlight => {
                    self.counters
                        .in_flight_retries
                        .fetch_add(1, Ordering::Relaxed);
                    early.push(Some(Status::Throttled {
                        retry_after_ms: IN_FLIGHT_RETRY_MS,
                    }));
                }
            }
        }
        // The detector decides the rest in one call (it hashes them all first and
        // overlaps their state's cache misses), in batch order.
        let mut verdicts = Vec::with_capacity(fresh.len());
        self.detector.observe_batch(
            now_ms,
            &limits,
            batch
                .messages
                .iter()
                .zip(&early)
                .filter(|(_, e)| e.is_none())
                .map(|(m, _)| &m.recipient),
            &mut verdicts,
        );
        let mut verdicts = verdicts.into_iter();
        let mut fresh = fresh.into_iter();
        // The claim of each message still headed for the log, and the messages to seal.
        let mut claims = Vec::with_capacity(batch.messages.len());
        let mut admitted: Vec<&Message> = Vec::with_capacity(batch.messages.len());
        for (m, early) in batch.messages.iter().zip(early) {
            if let Some(status) = early {
                statuses.push(status);
                continue;
            }
            let claim = fresh.next().expect("one claim per message past the checks");
            let verdict = verdicts
                .next()
                .expect("one verdict per message past the checks");
            let status = match verdict {
                Verdict::Throttle { retry_after_ms } => {
                    self.counters
                        .detect_throttled
                        .fetch_add(1, Ordering::Relaxed);
                    Status::Throttled { retry_after_ms }
                }
                Verdict::Reject(reason) => {
                    if matches!(reason, Reason::MessagingLimitReached | Reason::SenderPaused) {
                        self.counters
                            .detect_rejected
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Status::Rejected(reason)
                }
                Verdict::Admit => {
                    admitted.push(m);
                    // Placeholder until sealed and the log gives the position.
                    Status::Accepted(LogPosition(u64::MAX))
                }
            };
            if matches!(status, Status::Accepted(_)) {
                claims.push(claim);
            } else {
                self.idempotency.release(claim);
            }
            statuses.push(status);
        }
        // The admitted messages are sealed in one call, so the keys of new recipients are
        // derived together; sealed message i is admitted message i.
        if !admitted.is_empty() {
            let refused = match self.sealer.seal_batch(
                batch.business_id,
                &admitted,
                &mut self.sealed,
            ) {
                Ok(()) => None,
                Err(SealError::Key(e)) => {
                    tracing::warn!(business = batch.business_id, error = %e, "no sealing key for this business");
                    Some(Status::Rejected(Reason::Unauthorized))
                }
                Err(e @ SealError::NoncesExhausted { .. }) => {
                    tracing::error!(shard = self.index, error = %e, "sealer exhausted: restart the shard");
                    Some(Status::Rejected(Reason::StorageUnavailable))
                }
            };
            if let Some(refused) = refused {
                for s in statuses
                    .iter_mut()
                    .filter(|s| matches!(s, Status::Accepted(_)))
                {
                    *s = refused;
                }
                for claim in claims.drain(..) {
                    self.idempotency.release(claim);
                }
            }
        }
        let mut records = Vec::with_capacity(self.sealed.len());
        let mut next_sealed = 0..self.sealed.len();
        for (m, s) in batch.messages.iter().zip(&statuses) {
            if matches!(s, Status::Accepted(_)) {
                let i = next_sealed
                    .next()
                    .expect("one sealed message per accepted one");
                records.push(Record {
                    header: RecordHeader {
                        business_id: batch.business_id,
                        time_ms: now_ms,
                        client_id: m.client_id,
                        recipient: m.recipient,
                    },
                    payload: self.sealed.get(i).expect("sealed above"),
                });
            }
        }
        if records.is_empty() {
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses);
            return None;
        }
        let mut positions = Vec::with_capacity(records.len());
        let (log, rng, actions) = self.store.log_mut();
        let appended = log.append(now_ms, rng, &records, actions, &mut positions);
        drop(records);
        match appended {
            Ok(()) => {
                if let Err(f) = self.store.take_actions() {
                    self.log_failed(f, awaiting);
                }
                let mut pos = positions.into_iter();
                for s in statuses.iter_mut() {
                    if let Status::Accepted(p) = s {
                        *p = pos.next().expect("one position per record");
                    }
                }
                awaiting.push_back(Awaiting {
                    ticket: batch.ticket,
                    taken,
                    business_id: batch.business_id,
                    statuses,
                    claims,
                    end_index: self.store.log().next_index(),
                });
                if self.store.log().failure().is_some() {
                    self.fail_awaiting(now, awaiting);
                }
                None
            }
            Err(LogError::Busy) => {
                // Taken again from the start after the next sync.
                self.release_claims(&claims);
                Some(batch)
            }
            Err(e) => {
                self.release_claims(&claims);
                let refused = e.status();
                for s in statuses.iter_mut() {
                    if matches!(s, Status::Accepted(_)) {
                        *s = refused;
                    }
                }
                self.ack(now, taken, batch.ticket, batch.business_id, &statuses);
                None
            }
        }
    }

    /// Sends a batch's final statuses; its accepted messages are durable, so they count
    /// for billing here.
    fn ack(
        &mut self,
        now: Instant,
        taken: Instant,
        ticket: Ticket,
        business_id: u32,
        statuses: &[Status],
    ) {
        let accepted = statuses
            .iter()
            .filter(|s| matches!(s, Status::Accepted(_)))
            .count() as u64;
        if accepted > 0 {
            self.detector
                .record_accepted(unix_ms(), business_id, accepted);
        }
        self.counters
            .accepted
            .fetch_add(accepted, Ordering::Relaxed);
        self.counters
            .not_accepted
            .fetch_add(statuses.len() as u64 - accepted, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .ack_latency
            .observe(now.saturating_duration_since(taken));
        self.server.ack(now, ticket, statuses);
    }

    /// Log figures that change slowly (segment count), for the metrics.
    fn publish_log_figures(&self) {
        self.counters.log_segments.store(
            self.store.log().segment_ids().count() as u64,
            Ordering::Relaxed,
        );
    }

    fn on_file_done(&mut self, done: FileDone, awaiting: &mut VecDeque<Awaiting>) {
        let now = Instant::now();
        if let Some(f) = self.store.on_file_done(done) {
            self.log_failed(f, awaiting);
            return;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        let durable = self.store.log().durable_end();
        while awaiting.front().is_some_and(|a| a.end_index <= durable) {
            let a = awaiting.pop_front().expect("checked");
            self.settle_claims(&a);
            self.ack(now, a.taken, a.ticket, a.business_id, &a.statuses);
        }
    }

    /// A durable batch's ids answer `duplicate` from now on; done before its ACK leaves,
    /// so a client can never resend an acked id and have it stored again.
    fn settle_claims(&self, a: &Awaiting) {
        let positions = a.statuses.iter().filter_map(|s| match s {
            Status::Accepted(p) => Some(*p),
            _ => None,
        });
        for (claim, p) in a.claims.iter().zip(positions) {
            self.idempotency.settle(*claim, p);
        }
    }

    fn release_claims(&self, claims: &[ClaimTicket]) {
        for c in claims {
            self.idempotency.release(*c);
        }
    }

    /// The log failed for good: nothing waiting becomes durable; its senders hear
    /// `storage_unavailable`, and so does every later message.
    fn log_failed(
        &mut self,
        failure: courier_pipeline::log::LogFailure,
        awaiting: &mut VecDeque<Awaiting>,
    ) {
        tracing::error!(shard = self.index, %failure, "log failed: this shard takes no more messages");
        self.counters.log_failed.store(1, Ordering::Relaxed);
        self.fail_awaiting(Instant::now(), awaiting);
    }

    fn fail_awaiting(&mut self, now: Instant, awaiting: &mut VecDeque<Awaiting>) {
        let durable = self.store.log().durable_end();
        while let Some(mut a) = awaiting.pop_front() {
            if a.end_index > durable {
                self.release_claims(&a.claims);
                for s in a.statuses.iter_mut() {
                    if matches!(s, Status::Accepted(_)) {
                        *s = Status::Rejected(Reason::StorageUnavailable);
                    }
                }
            } else {
                self.settle_claims(&a);
            }
            self.ack(now, a.taken, a.ticket, a.business_id, &a.statuses);
        }
    }

    /// The detector's side of the loop: peers' deltas and control requests in, this
    /// shard's delta out every [`DELTA_INTERVAL`], signals logged, status and checkpoints
    /// to the control thread.
    fn detection(&mut self, now: Instant, now_ms: u64, state: &mut LoopState) {
        // Bounded by the channels' capacities.
        while let Ok(d) = self.deltas.try_recv() {
            self.detector.merge(now_ms, &d);
        }
        while let Ok(c) = self.control.try_recv() {
            match c {
                ShardControl::Registry(reg) => {
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
                    self.server.set_registry(reg);
                }
                ShardControl::Unpause(id) => {
                    if self.detector.unpause(id) {
                        tracing::info!(
                            shard = self.index,
                            business = id,
                            "business unpaused by the operator"
                        );
                    }
                }
            }
        }
        if self.peers.len() > 1 && now >= state.next_exchange {
            state.next_exchange = now + DELTA_INTERVAL;
            let delta = Arc::new(self.detector.export_delta(now_ms));
            if !delta.is_empty() {
                for (i, p) in self.peers.iter().enumerate() {
                    if i == self.index {
                        continue;
                    }
                    if p.deltas.try_send(delta.clone()).is_ok() {
                        p.waker.wake();
                    } else {
                        self.counters.deltas_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Bounded by the server's report queue.
        while let Some(entries) = self.server.poll_report() {
            self.detector.report_entries(now_ms, &entries);
        }
        while let Some(sig) = self.detector.poll_signal() {
            self.counters.signals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                shard = self.index,
                business = sig.business_id,
                rating = sig.rating.name(),
                tier = sig.tier.name(),
                paused = sig.paused,
                why = sig.why.map_or("none", |w| w.name()),
                measured = %sig.evidence.map_or_else(String::new, |e| e.to_string()),
                "integrity signal"
            );
        }
        if now >= state.next_tick {
            let checkpoint = now >= state.next_checkpoint;
            if checkpoint {
                state.next_checkpoint = now + CHECKPOINT_INTERVAL;
            }
            self.publish(now_ms, checkpoint);
        }
    }

    /// Sends the detector's status (and a checkpoint) to the control thread. Periodic
    /// ones are dropped when the control thread lags; the final one waits.
    fn publish(&mut self, now_ms: u64, checkpoint: bool) {
        let status = ToControl::Status {
            shard: self.index,
            at_unix_ms: now_ms,
            signals: self.detector.signals(),
        };
        let _ = self.to_control.try_send(status);
        if checkpoint {
            let c = ToControl::Checkpoint {
                shard: self.index,
                bytes: self.detector.checkpoint(),
            };
            if self.shutdown.load(Ordering::Acquire) {
                let _ = self.to_control.send(c);
            } else {
                let _ = self.to_control.try_send(c);
            }
        }
    }

    fn receive(
        &mut self,
        now: Instant,
        files: &mut Vec<FileDone>,
    ) -> Result<(), crate::uring::RingError> {
        let shards = self.peers.len();
        let me = self.index;
        let server = &mut self.server;
        let peers = &self.peers;
        let counters = &self.counters;
        self.ring.drain(|ev| {
            let (data, segment_size, from, local_ip) = match ev {
                RingEvent::Recv {
                    data,
                    segment_size,
                    from,
                    local_ip,
                } => (data, segment_size, from, local_ip),
                RingEvent::File(done) => {
                    files.push(done);
                    return;
                }
                RingEvent::Wake | RingEvent::Timer => return,
            };
            let stride = segment_size.unwrap_or(data.len()).max(1);
            for datagram in data.chunks(stride) {
                match owner_shard(datagram, shards) {
                    Some(owner) if owner != me => {
                        let fwd = Forwarded {
                            data: BytesMut::from(datagram),
                            from,
                            local_ip,
                        };
                        match peers[owner].tx.try_send(fwd) {
                            Ok(()) => {
                                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                                peers[owner].waker.wake();
                            }
                            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                                counters.forward_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => server.handle_datagram(now, from, local_ip, BytesMut::from(datagram)),
                }
            }
        })?;
        // Bounded by the channel's capacity.
        while let Ok(f) = self.inbox.try_recv() {
            self.server.handle_datagram(now, f.from, f.local_ip, f.data);
        }
        Ok(())
    }

    /// Hands every ready transmit to the ring while it has free send slots.
    fn flush_transmits(&mut self, now: Instant) {
        let max = self.max_datagrams.min(self.ring.max_gso_segments()).max(1);
        while let Some(mut buf) = self.ring.send_buffer() {
            match self.server.poll_transmit(now, max, &mut buf) {
                Some(t) => {
                    let seg = t.segment_size.filter(|&s| s < t.size);
                    buf.truncate(t.size);
                    buf.submit(t.destination, t.src_ip, seg);
                }
                None => break,
            }
        }
    }
}

struct LoopState {
    awaiting: VecDeque<Awaiting>,
    /// A batch the log could not take yet, and when it was first taken.
    held: Option<(SubmitBatch, Instant)>,
    files: Vec<FileDone>,
    next_tick: Instant,
    next_exchange: Instant,
    next_checkpoint: Instant,
}

/// Wall-clock time for record headers and retention, unix ms.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
