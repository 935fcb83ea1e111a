//! One shard's IO loop: a pinned thread that owns a UDP socket, its io_uring and the
//! shard's files, and feeds the shard's sans-IO core (`courier_pipeline::node::Shard`),
//! which decides everything. It shares nothing with other shards but bounded channels:
//! datagrams that belong to them, detector deltas, and the control thread's requests.
//!
//! ```text
//!   UdpRing::wait(until the core's poll_timeout)   io_uring: multishot recvmsg, sendmsg,
//!     │                                              file writes, eventfd wake
//!     ├─ Recv (GRO batch) ──> split into datagrams
//!     │     owner: owner_shard(dcid), else a new connection's placement
//!     │       (crate::placement: Initials to the shard with the fewest connections)
//!     │     owner == other ──> forward (crossbeam, bounded) + wake it
//!     │     else ──> core.handle_datagram
//!     ├─ File done ──> core.handle_write_done
//!     ├─ inbox (forwarded datagrams) ──> core.handle_datagram
//!     ├─ peers' deltas ──> core.handle_delta;  control requests ──> core.handle_control
//!     ├─ due ──> core.handle_timeout
//!     └─ then drain: core.poll_transmit ──> SendBuf (GSO) while send slots are free
//!                    core.poll_io ──> ShardStore (keyring, segment files) or the ring
//!                    core.poll_event ──> deltas to peers, status/checkpoints to control
//! ```
//!
//! Nothing here decides what happens to a message: that is `courier_pipeline::node`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use courier_pipeline::cid::owner_shard;
use courier_pipeline::detect::Delta;
use courier_pipeline::node::{
    self, Control, Event, Now, PeerMsg, PeerTarget, ShardStats, WriteOutcome,
};
use courier_pipeline::server::ServerStats;
use courier_pipeline::ShardId;
use crossbeam_channel::{Receiver, Sender};

use crate::control::ToControl;
use crate::placement::Placement;
use crate::recv_arena::RecvArenas;
use crate::store::ShardStore;
use crate::uring::{FileDone, FileOpKind, RingEvent, UdpRing, Waker};

/// How often a shard measures the free space of its log's file system.
const DISK_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Datagrams queued towards one other shard; more are dropped (QUIC recovers them).
pub const FORWARD_QUEUE_MAX: usize = 4096;
/// Deltas queued towards one shard; more are dropped and counted.
pub const DELTA_QUEUE_MAX: usize = 64;
/// Delivery messages queued towards one shard; more are dropped and counted (their owner
/// repeats them after its timeouts).
pub const PEER_QUEUE_MAX: usize = 16_384;

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
    pub control: Sender<Control>,
    /// Its inbox of delivery messages from other shards.
    pub peer: Sender<Arc<PeerMsg>>,
    /// Wakes its ring.
    pub waker: Waker,
}

/// Everything a shard thread owns.
pub struct Shard {
    /// This shard, also carried in connection IDs.
    pub id: ShardId,
    /// The ring over the shard's socket and files.
    pub ring: UdpRing,
    /// The sans-IO core that decides.
    pub core: node::Shard,
    /// The shard's log files.
    pub store: ShardStore,
    /// Deltas other shards' detectors sent here.
    pub deltas: Receiver<Arc<Delta>>,
    /// Requests from the control thread.
    pub control: Receiver<Control>,
    /// Delivery messages other shards sent here.
    pub peer_inbox: Receiver<Arc<PeerMsg>>,
    /// Status and checkpoints to the control thread.
    pub to_control: Sender<ToControl>,
    /// Every shard's peer handle, this one's included (index = shard).
    pub peers: Vec<Peer>,
    /// Datagrams other shards forwarded here.
    pub inbox: Receiver<Forwarded>,
    /// Set once to stop.
    pub shutdown: Arc<AtomicBool>,
    /// Most datagrams per GSO send.
    pub max_datagrams: usize,
    /// The buffers received datagrams are copied into for quinn.
    pub arenas: RecvArenas,
    /// Where new connections go (`None`: where the kernel's hash put them).
    pub placement: Option<Placement>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Runs until the core has stopped (after shutdown was requested). Returns the
    /// server's final counters.
    pub fn run(mut self) -> Result<ServerStats, crate::uring::RingError> {
        let mut files = Vec::new();
        let mut next_disk_check = Instant::now();
        loop {
            let now = clock();
            if now.at >= next_disk_check {
                next_disk_check = now.at + DISK_CHECK_INTERVAL;
                self.measure_disk(now);
            }
            if self.shutdown.load(Ordering::Acquire) {
                self.core.begin_stop(now);
            }
            self.drain_outputs(now);
            if self.core.is_stopped() {
                self.drain_outputs(now);
                return Ok(self.core.server().stats().clone());
            }
            let timeout = self
                .core
                .poll_timeout()
                .map_or(node::TICK_INTERVAL, |t| t.saturating_duration_since(now.at));
            self.ring.wait(Some(timeout))?;
            let now = clock();
            self.receive(now, &mut files)?;
            for done in files.drain(..) {
                self.write_done(now, done);
            }
            self.take_messages(now);
            if self.core.poll_timeout().is_some_and(|t| t <= now.at) {
                self.core.handle_timeout(now);
            }
        }
    }

    /// Tells the core the free space of the log's file system (a statvfs, no IO on the
    /// disk itself). A failed measurement leaves the last one in force, logged.
    fn measure_disk(&mut self, now: Now) {
        match self.store.free_bytes() {
            Ok(free) => self.core.handle_disk_free(now, free),
            Err(e) => {
                tracing::warn!(shard = self.id.index(), error = %e, "free disk space not measured")
            }
        }
    }

    /// Everything the core has for the outside: datagrams, storage operations, events.
    fn drain_outputs(&mut self, now: Now) {
        self.flush_transmits(now.at);
        self.perform_io(now);
        // The writes just submitted may have let a held batch through, with ACKs to send.
        self.flush_transmits(now.at);
        // Each peer is woken once for everything queued to it here, not once per message
        // (an eventfd write each: a system call per delivery message, with the wake-up it
        // causes on the other side).
        let mut wake = Vec::new();
        while let Some(ev) = self.core.poll_event() {
            self.deliver(ev, &mut wake);
        }
        for i in wake {
            self.peers[i].waker.wake();
        }
    }

    /// Peers' deltas and control requests, bounded by their channels' capacities.
    fn take_messages(&mut self, now: Now) {
        while let Ok(d) = self.deltas.try_recv() {
            self.core.handle_delta(now, &d);
        }
        while let Ok(c) = self.control.try_recv() {
            self.core.handle_control(now, c);
        }
        while let Ok(m) = self.peer_inbox.try_recv() {
            self.core.handle_peer(now, m);
        }
    }

    /// Hands an event on; the peers to wake afterwards are added to `wake`.
    fn deliver(&mut self, ev: Event, wake: &mut Vec<usize>) {
        match ev {
            Event::Delta(delta) => {
                for (i, p) in self.peers.iter().enumerate() {
                    if i == self.id.index() {
                        continue;
                    }
                    if p.deltas.try_send(delta.clone()).is_ok() {
                        to_wake(wake, i);
                    } else {
                        self.stats().deltas_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Event::Peer { to, msg } => self.send_peer(to, msg, wake),
            Event::Status {
                at_unix_ms,
                signals,
                checkpoint,
                event_backlogs,
                inbound_today,
                last,
            } => {
                // Periodic ones are dropped when the control thread lags; the last waits.
                let status = ToControl::Status {
                    shard: self.id,
                    at_unix_ms,
                    signals,
                    event_backlogs,
                    inbound_today,
                };
                let _ = self.to_control.try_send(status);
                if let Some(bytes) = checkpoint {
                    let c = ToControl::Checkpoint {
                        shard: self.id,
                        bytes,
                    };
                    if last {
                        let _ = self.to_control.send(c);
                    } else {
                        let _ = self.to_control.try_send(c);
                    }
                }
            }
        }
    }

    /// Hands a delivery message to one shard or every other one (to be woken: added to
    /// `wake`); a full inbox drops it (counted): its owner repeats the work after a
    /// timeout.
    fn send_peer(&self, to: PeerTarget, msg: Arc<PeerMsg>, wake: &mut Vec<usize>) {
        let mut send = |i: usize, msg: Arc<PeerMsg>| {
            let p = &self.peers[i];
            if p.peer.try_send(msg).is_ok() {
                to_wake(wake, i);
            } else {
                self.stats().peer_dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        match to {
            // The only reference goes: the peer takes the message without a copy.
            PeerTarget::Shard(s) => send(s.index(), msg),
            PeerTarget::All => (0..self.peers.len())
                .filter(|&i| i != self.id.index())
                .for_each(|i| send(i, msg.clone())),
        }
    }

    fn stats(&self) -> &ShardStats {
        self.core.stats()
    }

    /// Performs the core's storage operations: metadata at once, commit writes through
    /// the ring while it has file slots.
    fn perform_io(&mut self, now: Now) {
        while let Some(op) = self.core.poll_io(self.ring.file_slots_free()) {
            let node::LogWrite {
                token,
                segment_id,
                offset,
                skip,
                bytes,
            } = match op.into_write() {
                Ok(w) => w,
                Err(op) => {
                    let what = format!("{op:?}");
                    if let Err(e) = self.store.perform(op) {
                        tracing::error!(shard = self.id.index(), action = %what, error = %e, "log action failed; the log stops taking messages");
                        self.core.handle_metadata_failed(now);
                    }
                    continue;
                }
            };
            let file = match self.store.segment_file(segment_id) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(shard = self.id.index(), segment = segment_id, error = %e, "segment file not opened for a log write");
                    self.core
                        .handle_write_done(now, token, WriteOutcome::WriteFailed, bytes);
                    continue;
                }
            };
            // Zeros of prepared space are written as durably as a commit: the blocks and
            // the file's size must be on disk for later commits to only overwrite.
            let queued =
                self.ring
                    .submit_file(file, FileOpKind::DurableWrite, offset, bytes, skip, token);
            // The core hands out a write only when it has a free slot (a commit's writes
            // only when all of them fit).
            assert!(
                queued.is_ok(),
                "a file slot for every write the core hands out"
            );
        }
    }

    /// A commit write came back from the ring.
    fn write_done(&mut self, now: Now, done: FileDone) {
        let len = done.data.len() - done.skip;
        let outcome = if done.is_complete(len) {
            WriteOutcome::Done
        } else if node::Shard::is_prepare_write(done.token) {
            tracing::warn!(
                shard = self.id.index(),
                written = ?done.written.as_ref().map_err(|e| e.to_string()),
                "writing zeros ahead of the log's records failed; commits append instead"
            );
            WriteOutcome::WriteFailed
        } else {
            tracing::error!(
                shard = self.id.index(),
                written = ?done.written.as_ref().map_err(|e| e.to_string()),
                "group commit failed; the log stops taking messages and never retries"
            );
            // The write carries its own sync (RWF_DSYNC): a failed flush is the write's
            // error (EIO), reported as a failed write.
            match &done.written {
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => WriteOutcome::NoSpace,
                Ok(n) if *n < len => WriteOutcome::NoSpace,
                _ => WriteOutcome::WriteFailed,
            }
        };
        if let Some(segment_id) = self.core.segment_of_write(done.token) {
            self.store.write_done(segment_id);
        }
        self.core
            .handle_write_done(now, done.token, outcome, done.data);
    }

    fn receive(
        &mut self,
        now: Now,
        files: &mut Vec<FileDone>,
    ) -> Result<(), crate::uring::RingError> {
        let shards = self.peers.len();
        let me = self.id;
        let core = &mut self.core;
        let peers = &self.peers;
        let arenas = &mut self.arenas;
        let placement = &mut self.placement;
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
                let owner = owner_shard(datagram, shards).or_else(|| {
                    let p = placement.as_mut()?;
                    ShardId::try_from(p.route(now.at, datagram, from)).ok()
                });
                match owner {
                    Some(owner) if owner != me => {
                        let fwd = Forwarded {
                            data: BytesMut::from(datagram),
                            from,
                            local_ip,
                        };
                        let stats = core.stats();
                        let peer = &peers[owner.index()];
                        if peer.tx.try_send(fwd).is_ok() {
                            stats.forwarded.fetch_add(1, Ordering::Relaxed);
                            peer.waker.wake();
                        } else {
                            stats.forward_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        let (data, pooled) = arenas.copy(datagram);
                        if !pooled {
                            core.stats().recv_unpooled.fetch_add(1, Ordering::Relaxed);
                        }
                        core.handle_datagram(now, from, local_ip, data);
                    }
                }
            }
        })?;
        self.core
            .stats()
            .recv_arenas
            .store(self.arenas.arenas() as u64, Ordering::Relaxed);
        // Bounded by the channel's capacity.
        while let Ok(f) = self.inbox.try_recv() {
            self.core.handle_datagram(now, f.from, f.local_ip, f.data);
        }
        Ok(())
    }

    /// Hands every ready transmit to the ring while it has free send slots.
    fn flush_transmits(&mut self, now: Instant) {
        let max = self.max_datagrams.min(self.ring.max_gso_segments()).max(1);
        while let Some(mut buf) = self.ring.send_buffer() {
            match self.core.poll_transmit(now, max, &mut buf) {
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

/// Now, from the two clocks: monotonic for QUIC and deadlines, wall for records.
pub(crate) fn clock() -> Now {
    Now {
        at: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Notes peer `i` for a wake-up, once.
fn to_wake(wake: &mut Vec<usize>, i: usize) {
    if !wake.contains(&i) {
        wake.push(i);
    }
}
