//! What one shard counts, published for other threads: relaxed atomics the shard writes
//! and the metrics endpoint reads. Counts, never content.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the ack-latency buckets, microseconds (the last bucket is +Inf).
pub const ACK_LATENCY_BOUNDS_US: [u64; 11] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
];
const _: () = {
    let mut i = 1;
    while i < ACK_LATENCY_BOUNDS_US.len() {
        assert!(ACK_LATENCY_BOUNDS_US[i - 1] < ACK_LATENCY_BOUNDS_US[i]);
        i += 1;
    }
};

/// A fixed-bucket latency histogram one shard writes and the metrics thread reads.
#[derive(Debug, Default)]
pub struct AckLatency {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; ACK_LATENCY_BOUNDS_US.len() + 1],
    /// Sum of observations, microseconds. (The count is the sum of the buckets.)
    sum_us: AtomicU64,
}

/// A histogram read at one moment: cumulative bucket counts, as Prometheus wants them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Observations at or below each bound of [`ACK_LATENCY_BOUNDS_US`], then all of them.
    pub cumulative: [u64; ACK_LATENCY_BOUNDS_US.len() + 1],
    /// Sum of the observations, microseconds.
    pub sum_us: u64,
    /// Number of observations (equal to the last cumulative bucket).
    pub count: u64,
}

impl LatencySnapshot {
    /// Adds another histogram's snapshot (to sum over shards).
    pub fn add(&mut self, other: &LatencySnapshot) {
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }
}

impl AckLatency {
    /// Records one batch's time from being taken to its ACK.
    pub fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = ACK_LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The histogram now.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut s = LatencySnapshot::default();
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            s.cumulative[i] = cumulative;
        }
        s.sum_us = self.sum_us.load(Ordering::Relaxed);
        // The count is the +Inf bucket, as the format requires.
        s.count = cumulative;
        s
    }
}

/// Counters a shard publishes for the process (read by other threads).
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Messages accepted.
    pub accepted: AtomicU64,
    /// Messages with any other status.
    pub not_accepted: AtomicU64,
    /// Batches acked.
    pub batches: AtomicU64,
    /// Datagrams handed to another shard (counted by the shell, which forwards them).
    pub forwarded: AtomicU64,
    /// Datagrams dropped because a peer's inbox was full (counted by the shell).
    pub forward_dropped: AtomicU64,
    /// Datagrams copied into a buffer of their own because every receive arena was
    /// pinned by quinn (counted by the shell).
    pub recv_unpooled: AtomicU64,
    /// Receive arenas the shard has allocated (counted by the shell).
    pub recv_arenas: AtomicU64,
    /// Live connections.
    pub connections: AtomicU64,
    /// 1 while the log's file system is below `log.disk_reserve_bytes`.
    pub disk_low: AtomicU64,
    /// Messages throttled because the disk was below its reserve.
    pub disk_low_throttled: AtomicU64,
    /// New connections refused because the shard's table was full (mirrors the server).
    pub connections_refused: AtomicU64,
    /// New connections refused because their address held its share (mirrors the server).
    pub address_cap_refused: AtomicU64,
    /// Connections closed at HELLO because their credential held its share.
    pub business_cap_refused: AtomicU64,
    /// Times a stream was left unread because its business had its share of batches in
    /// flight on the shard (mirrors the server).
    pub share_paused: AtomicU64,
    /// Most batches of other businesses taken while one batch was first of its business
    /// in the shard's queue (gauge; see `server::fair` for the bound).
    pub others_ahead_max: AtomicU64,
    /// QUIC Retry packets sent to unvalidated addresses.
    pub retries_sent: AtomicU64,
    /// Handshakes in progress (gauge).
    pub half_open: AtomicU64,
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
    /// Detector deltas dropped because a peer's inbox was full (counted by the shell).
    pub deltas_dropped: AtomicU64,
    /// Bytes appended to the log (sealed records with their framing).
    pub log_appended_bytes: AtomicU64,
    /// Live log segments, updated every tick.
    pub log_segments: AtomicU64,
    /// Log segments retention deleted.
    pub log_segments_dropped: AtomicU64,
    /// Time from taking a batch to its ACK.
    pub ack_latency: AckLatency,
    /// Users' messages from the edge made durable and acked.
    pub inbound_accepted: AtomicU64,
    /// Messages answered `throttled` because delivery's bounds were full.
    pub delivery_full: AtomicU64,
    /// Messages of batches held (not answered yet) because delivery's bounds were full
    /// while an edge was draining them; counted once per batch.
    pub delivery_held: AtomicU64,
    /// Messages waiting for delivery (gauge).
    pub delivery_pending: AtomicU64,
    /// Unix ms when the oldest waiting message was accepted (gauge; 0: none waits).
    pub delivery_oldest_unix_ms: AtomicU64,
    /// Hand-offs to the edge, retransmissions included.
    pub delivery_handoffs: AtomicU64,
    /// Hand-offs after the first of a message.
    pub delivery_retransmissions: AtomicU64,
    /// Messages delivered.
    pub delivered: AtomicU64,
    /// `read` statuses.
    pub read: AtomicU64,
    /// Messages failed for good.
    pub failed: AtomicU64,
    /// Messages expired.
    pub expired: AtomicU64,
    /// Events (statuses, replies) pushed to businesses, repeats included.
    pub events_pushed: AtomicU64,
    /// Events businesses acknowledged.
    pub events_acked: AtomicU64,
    /// Events dropped past a business's bound or by retention.
    pub events_dropped: AtomicU64,
    /// Events waiting for businesses (gauge).
    pub events_backlog: AtomicU64,
    /// Statuses that could not be recorded (the log had failed).
    pub statuses_lost: AtomicU64,
    /// Payload bytes held for waiting messages (gauge).
    pub delivery_pending_bytes: AtomicU64,
    /// Delivery messages to other shards dropped because an inbox was full (counted by
    /// the shell; the owner repeats the work).
    pub peer_dropped: AtomicU64,
    /// Recipients asked for with KEYS_WANTED.
    pub e2e_keys_wanted: AtomicU64,
    /// Recipients' bundle lists refused where they came in (bad structure or signed-prekey
    /// signature).
    pub e2e_bundles_refused: AtomicU64,
    /// One-time prekeys refused when a session was about to use them (bad signature).
    pub e2e_one_time_refused: AtomicU64,
    /// Device sessions set up.
    pub e2e_sessions_new: AtomicU64,
    /// Copies sealed for devices.
    pub e2e_copies: AtomicU64,
    /// Users' replies that did not open.
    pub e2e_replies_refused: AtomicU64,
    /// Recipients in the shard's device directory (gauge).
    pub e2e_directory: AtomicU64,
    /// Device sessions the shard holds (gauge).
    pub e2e_sessions: AtomicU64,
}

/// Adds `n` to a counter.
pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Sets a gauge.
pub(super) fn set(gauge: &AtomicU64, v: u64) {
    gauge.store(v, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_is_the_last() {
        let h = AckLatency::default();
        h.observe(Duration::from_micros(500)); // le 0.0005
        h.observe(Duration::from_micros(501)); // le 0.001
        h.observe(Duration::from_secs(5)); // +Inf only
        let v = h.snapshot();
        assert_eq!(v.cumulative[0], 1);
        assert_eq!(v.cumulative[1], 2);
        assert_eq!(v.cumulative[ACK_LATENCY_BOUNDS_US.len() - 1], 2);
        assert_eq!(v.cumulative[ACK_LATENCY_BOUNDS_US.len()], 3);
        assert_eq!((v.count, v.sum_us), (3, 5_001_001));
    }
}
