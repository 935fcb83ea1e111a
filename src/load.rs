//! The closed-loop load driver behind `courier-loadgen` and `courier demo`.
//!
//! ```text
//! run(cfg): connect `connections` clients (not timed)
//!   per connection: streams × in-flight workers, each in a loop until the duration ends:
//!       build a batch (fresh client ids, pseudo-random recipients, shared filler payload)
//!       t0 ── client.submit(batch) ──> statuses ── latency = now − t0 per message
//!   then wait for outstanding ACKs (at most DRAIN_TIMEOUT); merge every worker's tally
//!   and HDR histogram into one LoadReport.
//! ```
//!
//! Invariants this module keeps:
//! - every message sent is counted exactly once as accepted, duplicate, throttled,
//!   rejected or error (`sent` is their sum);
//! - workers equal the connection's in-flight capacity, so its streams stay full
//!   without unbounded queues;
//! - recipients are synthetic (`+1555` and 7 digits) and the payload is filler: the
//!   driver never sees real personal data, and prints none either way.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_pipeline::wire::{Reason, Recipient, Status};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{Client, ClientConfig, ClientError, OutgoingMessage};
use crate::tls::ServerTrust;

/// How long the driver waits for outstanding ACKs after the duration ends.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest latency the histogram tracks; longer ones are recorded as this.
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Most connections one run opens.
pub const CONNECTIONS_MAX: usize = 4096;
/// Bits of a client id that hold the per-connection counter; the connection index sits
/// above them.
pub const CLIENT_ID_COUNTER_BITS: u32 = 40;
/// The synthetic recipients' prefix; 7 digits follow.
const RECIPIENT_PREFIX: &[u8; 5] = b"+1555";
const FILLER: &[u8] = b"courier load filler; ";

const _: () = assert!((CONNECTIONS_MAX as u64) < (1 << (64 - CLIENT_ID_COUNTER_BITS)));

/// What to run.
#[derive(Clone)]
pub struct LoadConfig {
    /// The server's UDP address.
    pub target: SocketAddr,
    /// The bearer token every connection authenticates with.
    pub token: String,
    /// How to trust the server's certificate.
    pub trust: ServerTrust,
    /// Connections, each with its own client.
    pub connections: usize,
    /// Messages per batch.
    pub batch: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// How long to keep sending.
    pub duration: Duration,
    /// Submit streams per connection.
    pub streams_per_connection: usize,
    /// Batches in flight per stream.
    pub batches_in_flight_per_stream: usize,
}

impl std::fmt::Debug for LoadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadConfig")
            .field("target", &self.target)
            .field(
                "token",
                &format_args!("<{} bytes redacted>", self.token.len()),
            )
            .field("trust", &self.trust)
            .field("connections", &self.connections)
            .field("batch", &self.batch)
            .field("size", &self.size)
            .field("duration", &self.duration)
            .field("streams_per_connection", &self.streams_per_connection)
            .field(
                "batches_in_flight_per_stream",
                &self.batches_in_flight_per_stream,
            )
            .finish()
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The load configuration cannot work; names the field.
    #[error("invalid load configuration: {0}")]
    Config(&'static str),
    /// A connection could not be set up (refused token, handshake, timeout).
    #[error("connection {index} could not connect")]
    Connect {
        /// Which connection, from 0.
        index: usize,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The configured batch does not fit the bounds the server stated in WELCOME;
    /// lower `batch` or `size`.
    #[error("the configured batch does not fit the server's bounds")]
    BatchOutOfBounds(#[source] ClientError),
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest recorded.
    pub max: u64,
}

impl Percentiles {
    /// Reads the percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The outcome of a run; its JSON form is what `courier-loadgen --json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged as accepted.
    pub accepted: u64,
    /// Messages acknowledged as duplicates.
    pub duplicate: u64,
    /// Messages throttled (not retried by the driver).
    pub throttled: u64,
    /// Messages rejected.
    pub rejected: u64,
    /// Messages whose batch got no ACK (stream reset, connection lost, drain timeout).
    pub errors: u64,
    /// Seconds from the first send to the last ACK (the drain included).
    pub duration_secs: f64,
    /// Accepted messages per second over `duration_secs`.
    pub msgs_per_sec: f64,
    /// Payload bytes of accepted messages per second over `duration_secs`.
    pub payload_bytes_per_sec: f64,
    /// Latency per message: ACK time minus send time of its batch.
    pub latency_us: Percentiles,
    /// Rejected messages by reason name (`Reason::name`).
    pub rejected_by_reason: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Writes the report as a human-readable table.
    pub fn print_table(&self, w: &mut impl Write) -> std::io::Result<()> {
        let l = &self.latency_us;
        writeln!(w, "duration       {:>12.2} s", self.duration_secs)?;
        writeln!(w, "throughput     {:>12.0} msgs/s", self.msgs_per_sec)?;
        writeln!(
            w,
            "payload        {:>12.2} MB/s",
            self.payload_bytes_per_sec / 1e6
        )?;
        writeln!(
            w,
            "latency (us)   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        writeln!(w, "sent           {:>12}", self.sent)?;
        writeln!(w, "accepted       {:>12}", self.accepted)?;
        writeln!(w, "duplicate      {:>12}", self.duplicate)?;
        writeln!(w, "throttled      {:>12}", self.throttled)?;
        writeln!(w, "rejected       {:>12}", self.rejected)?;
        for (reason, n) in &self.rejected_by_reason {
            writeln!(w, "  {reason:<27} {n:>12}")?;
        }
        writeln!(w, "errors         {:>12}", self.errors)?;
        Ok(())
    }
}

/// One worker's counts; merged at the end.
struct Tally {
    sent: u64,
    accepted: u64,
    duplicate: u64,
    throttled: u64,
    rejected: u64,
    errors: u64,
    rejected_by_reason: [u64; Reason::ALL.len()],
    latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            sent: 0,
            accepted: 0,
            duplicate: 0,
            throttled: 0,
            rejected: 0,
            errors: 0,
            rejected_by_reason: [0; Reason::ALL.len()],
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    fn count(&mut self, status: Status) {
        match status {
            Status::Accepted(_) => self.accepted += 1,
            Status::Duplicate(_) => self.duplicate += 1,
            Status::Throttled { .. } => self.throttled += 1,
            Status::Rejected(reason) => {
                self.rejected += 1;
                let i = Reason::ALL
                    .iter()
                    .position(|r| *r == reason)
                    .expect("every reason is in Reason::ALL");
                self.rejected_by_reason[i] += 1;
            }
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.duplicate += other.duplicate;
        self.throttled += other.throttled;
        self.rejected += other.rejected;
        self.errors += other.errors;
        for (a, b) in self
            .rejected_by_reason
            .iter_mut()
            .zip(other.rejected_by_reason)
        {
            *a += b;
        }
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
    }
}

/// xorshift64*: a fast deterministic generator for synthetic recipients.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 spreads small seeds; the state must not be 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `+1555` followed by 7 pseudo-random digits.
    fn recipient(&mut self) -> Recipient {
        let mut n = self.next() % 10_000_000;
        let mut s = [0u8; 12];
        s[..5].copy_from_slice(RECIPIENT_PREFIX);
        for d in s[5..].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        Recipient::parse(&s).expect("+1555 and 7 digits is valid E.164")
    }
}

/// `size` bytes of filler.
fn filler(size: usize) -> Bytes {
    FILLER
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect::<Vec<u8>>()
        .into()
}

/// A connection's share of the run.
struct Worker {
    client: Arc<Client>,
    /// The connection's client id counter, shared by its workers.
    ids: Arc<AtomicU64>,
    connection_index: u64,
    rng: XorShift,
    payload: Bytes,
    batch: usize,
}

impl Worker {
    fn next_batch(&mut self) -> Vec<OutgoingMessage> {
        let base = self.ids.fetch_add(self.batch as u64, Ordering::Relaxed);
        assert!(
            base + (self.batch as u64) < 1 << CLIENT_ID_COUNTER_BITS,
            "client id counter overflow"
        );
        (0..self.batch as u64)
            .map(|k| OutgoingMessage {
                client_id: (self.connection_index << CLIENT_ID_COUNTER_BITS) | (base + k),
                recipient: self.rng.recipient(),
                payload: self.payload.clone(),
            })
            .collect()
    }

    /// Sends batches back to back until `stop_at`; gives up waiting at `give_up_at`.
    async fn run(mut self, stop_at: Instant, give_up_at: Instant) -> Tally {
        let mut tally = Tally::new();
        while Instant::now() < stop_at {
            let batch = self.next_batch();
            let n = batch.len() as u64;
            tally.sent += n;
            let t0 = Instant::now();
            match tokio::time::timeout_at(give_up_at, self.client.submit(batch)).await {
                Ok(Ok(statuses)) => {
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    tally
                        .latency_us
                        .saturating_record_n(us.clamp(1, LATENCY_US_MAX), n);
                    statuses.into_iter().for_each(|s| tally.count(s));
                }
                Ok(Err(e)) => {
                    tally.errors += n;
                    if e.is_fatal() {
                        break;
                    }
                }
                Err(_) => {
                    tally.errors += n;
                    break;
                }
            }
        }
        tally
    }
}

fn check(cfg: &LoadConfig) -> Result<(), LoadError> {
    if cfg.connections == 0 || cfg.connections > CONNECTIONS_MAX {
        return Err(LoadError::Config("connections must be in 1..=4096"));
    }
    if cfg.batch == 0 {
        return Err(LoadError::Config("batch must be at least 1"));
    }
    if cfg.duration.is_zero() {
        return Err(LoadError::Config("duration must be positive"));
    }
    Ok(())
}

/// Runs the closed loop described in the module docs and reports.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    check(cfg)?;
    let client_cfg = ClientConfig {
        server: cfg.target,
        server_name: "localhost".to_string(),
        token: cfg.token.clone(),
        trust: cfg.trust.clone(),
        streams: cfg.streams_per_connection,
        batches_in_flight_per_stream: cfg.batches_in_flight_per_stream,
    };
    let mut clients = Vec::with_capacity(cfg.connections);
    for index in 0..cfg.connections {
        let client = Client::connect(&client_cfg)
            .await
            .map_err(|source| LoadError::Connect { index, source })?;
        clients.push(Arc::new(client));
    }
    let payload = filler(cfg.size);
    let mut workers = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let ids = Arc::new(AtomicU64::new(0));
        let per_connection = cfg.streams_per_connection * cfg.batches_in_flight_per_stream;
        for w in 0..per_connection {
            workers.push(Worker {
                client: client.clone(),
                ids: ids.clone(),
                connection_index: index as u64,
                rng: XorShift::new(((index as u64) << 32) | w as u64),
                payload: payload.clone(),
                batch: cfg.batch,
            });
        }
    }
    if let Some(w) = workers.first_mut() {
        let probe = w.next_batch();
        w.client
            .check(&probe)
            .map_err(LoadError::BatchOutOfBounds)?;
    }

    let start = Instant::now();
    let stop_at = start + cfg.duration;
    let give_up_at = stop_at + DRAIN_TIMEOUT;
    let mut set = tokio::task::JoinSet::new();
    for w in workers {
        set.spawn(w.run(stop_at, give_up_at));
    }
    let mut total = Tally::new();
    while let Some(done) = set.join_next().await {
        total.merge(&done.expect("load workers do not panic"));
    }
    let duration_secs = start.elapsed().as_secs_f64();
    for client in &clients {
        client.close().await;
    }
    Ok(report(&total, duration_secs, cfg.size))
}

fn report(t: &Tally, duration_secs: f64, size: usize) -> LoadReport {
    let per_sec = |n: f64| {
        if duration_secs > 0.0 {
            n / duration_secs
        } else {
            0.0
        }
    };
    LoadReport {
        sent: t.sent,
        accepted: t.accepted,
        duplicate: t.duplicate,
        throttled: t.throttled,
        rejected: t.rejected,
        errors: t.errors,
        duration_secs,
        msgs_per_sec: per_sec(t.accepted as f64),
        payload_bytes_per_sec: per_sec(t.accepted as f64 * size as f64),
        latency_us: Percentiles::of(&t.latency_us),
        rejected_by_reason: Reason::ALL
            .iter()
            .zip(t.rejected_by_reason)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.name().to_string(), n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_pipeline::wire::LogPosition;

    #[test]
    fn recipients_are_valid_deterministic_and_spread() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let r = a.recipient();
            assert_eq!(r, b.recipient());
            assert!(r.as_str().starts_with("+1555") && r.as_str().len() == 12);
            seen.insert(r);
        }
        assert!(seen.len() > 990, "only {} distinct", seen.len());
    }

    #[test]
    fn filler_has_the_requested_size() {
        assert_eq!(filler(0).len(), 0);
        assert_eq!(filler(1000).len(), 1000);
        assert_eq!(&filler(7)[..], b"courier");
    }

    #[test]
    fn report_counts_and_rates() {
        let mut t = Tally::new();
        t.sent = 5;
        t.count(Status::Accepted(LogPosition(1)));
        t.count(Status::Accepted(LogPosition(2)));
        t.count(Status::Duplicate(LogPosition(1)));
        t.count(Status::Throttled { retry_after_ms: 5 });
        t.count(Status::Rejected(Reason::SenderPaused));
        t.latency_us.saturating_record_n(100, 4);
        t.latency_us.saturating_record(5000);
        let mut merged = Tally::new();
        merged.merge(&t);
        let r = report(&merged, 2.0, 10);
        assert_eq!(
            (
                r.sent,
                r.accepted,
                r.duplicate,
                r.throttled,
                r.rejected,
                r.errors
            ),
            (5, 2, 1, 1, 1, 0)
        );
        assert_eq!(r.msgs_per_sec, 1.0);
        assert_eq!(r.payload_bytes_per_sec, 10.0);
        assert_eq!(r.rejected_by_reason.get("sender_paused"), Some(&1));
        assert_eq!(r.latency_us.p50, 100);
        assert!(r.latency_us.max >= 5000 && r.latency_us.max < 5010);
        let mut table = Vec::new();
        r.print_table(&mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("sender_paused"), "{table}");
        assert!(table.contains("p99.9"), "{table}");
    }
}
