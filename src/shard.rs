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
//!     -> Server::poll_batch ---> Ingest::process ---> Server::ack
//!     -> Server::poll_transmit ---> SendBuf::submit (GSO) while send slots are free
//! ```
//!
//! The loop is the shell half of the polling contract in `courier_pipeline::server`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier_pipeline::cid::owner_shard;
use courier_pipeline::ingest::Ingest;
use courier_pipeline::server::{Server, ServerStats};
use courier_pipeline::wire::{code, Status};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::uring::{RingEvent, UdpRing, Waker};

/// Datagrams queued towards one other shard; more are dropped (QUIC recovers them).
pub const FORWARD_QUEUE_MAX: usize = 4096;
/// How long a shutting-down shard waits for its connections to close.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

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
}

/// Everything a shard thread owns.
pub struct Shard {
    /// Index, also carried in connection IDs.
    pub index: usize,
    /// The ring over the shard's socket.
    pub ring: UdpRing,
    /// The QUIC server.
    pub server: Server,
    /// The ingest stage.
    pub ingest: Ingest,
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
    /// Runs until shutdown is requested and the connections have closed (or
    /// [`DRAIN_TIMEOUT`] passed). Returns the server's final counters.
    pub fn run(mut self) -> Result<ServerStats, crate::uring::RingError> {
        let mut statuses: Vec<Status> = Vec::new();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if drain_deadline.is_none() && self.shutdown.load(Ordering::Acquire) {
                self.server
                    .close_all(now, code::SHUTTING_DOWN, b"server shutting down");
                drain_deadline = Some(now + DRAIN_TIMEOUT);
            }
            if let Some(d) = drain_deadline {
                if self.server.connection_count() == 0 || now >= d {
                    self.flush_transmits(now);
                    return Ok(self.server.stats().clone());
                }
            }
            self.flush_transmits(now);
            let timeout = self
                .server
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now));
            // While draining, wake at least every 50 ms to check the deadline.
            let timeout = match drain_deadline {
                Some(_) => Some(timeout.map_or(Duration::from_millis(50), |t| {
                    t.min(Duration::from_millis(50))
                })),
                None => timeout,
            };
            self.ring.wait(timeout)?;
            let now = Instant::now();
            self.receive(now)?;
            if self.server.poll_timeout().is_some_and(|t| t <= now) {
                self.server.handle_timeout(now);
            }
            while let Some(batch) = self.server.poll_batch() {
                statuses.clear();
                self.ingest
                    .process(batch.business_id, &batch.messages, &mut statuses);
                let accepted = statuses
                    .iter()
                    .filter(|s| matches!(s, Status::Accepted(_)))
                    .count() as u64;
                self.counters
                    .accepted
                    .fetch_add(accepted, Ordering::Relaxed);
                self.counters
                    .not_accepted
                    .fetch_add(statuses.len() as u64 - accepted, Ordering::Relaxed);
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                self.server.ack(now, batch.ticket, &statuses);
            }
            self.counters
                .connections
                .store(self.server.connection_count() as u64, Ordering::Relaxed);
        }
    }

    fn receive(&mut self, now: Instant) -> Result<(), crate::uring::RingError> {
        let shards = self.peers.len();
        let me = self.index;
        let server = &mut self.server;
        let peers = &self.peers;
        let counters = &self.counters;
        self.ring.drain(|ev| {
            let RingEvent::Recv {
                data,
                segment_size,
                from,
                local_ip,
            } = ev
            else {
                return;
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
