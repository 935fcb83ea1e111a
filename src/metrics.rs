//! The Prometheus endpoint: `GET /metrics` over plain TCP (HTTP/1.1, hyper's server) with
//! the text exposition format 0.0.4.
//!
//! ```text
//!  shards ──ShardStats (atomics, per shard)──┐
//!  control thread ──SharedStatus (1 s, merged)──┴─> render ─> GET /metrics ─> scraper
//!
//!  thread courier-metrics: tokio current-thread runtime
//!    accept ─(a permit of CONNECTIONS_MAX)─> task: hyper http1, whole connection
//!                                             under REQUEST_DEADLINE, then closed
//! ```
//!
//! What it exports is counters, gauges, the ack-latency histogram, shard indices and
//! business ids: never a business name, a phone number, a payload, a token or a key.
//! Nothing of the request is echoed back.
//!
//! Work is bounded, and no client can hold up another or the shards:
//! - HTTP parsing, its bounds and its error answers are hyper's (a maintained server,
//!   not a hand-written parser): a request head over [`REQUEST_BYTES_MAX`] gets `431`, one
//!   that does not parse `400`; a path other than `/metrics` gets `404`, another method on
//!   it `405`.
//! - Each connection is one request and its answer, and the whole of it, request read and
//!   answer written, must finish within [`REQUEST_DEADLINE`]: a client that trickles its
//!   request or never reads the answer is closed then (the deadline is on the connection,
//!   not on each read, so trickling a byte at a time does not extend it).
//! - Up to [`CONNECTIONS_MAX`] connections are served at once, each in its own task, so a
//!   stuck client delays no other scrape; past that, new connections wait in the kernel's
//!   listen queue until a slot frees, which is at most one deadline.
//! - The shards' figures are atomics the shards update and this thread only loads: no lock
//!   a shard could wait on. The business figures sit behind the control thread's mutex,
//!   held only to clone them.
//!
//! The exposition text is written here rather than with a Prometheus client crate
//! (`prometheus`, `prometheus-client`): those keep each metric as a registered object
//! that the code updates, whereas courier's figures already live in the shards' atomics
//! (`ShardStats`) and the control thread's merged status, read at scrape time. A crate
//! would mean either mirroring every figure into its objects or a custom collector per
//! family that writes the same lines as now; the format is small, and the test below
//! checks every family against it.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{oneshot, Semaphore};

use courier_pipeline::idempotency::{IdStats, Idempotency};
use courier_pipeline::registry::Tier;

use crate::control::SharedStatus;
use courier_pipeline::node::{LatencySnapshot, ShardStats, ACK_LATENCY_BOUNDS_US};

/// Largest request head (request line and headers) read; a longer one gets 431. hyper's
/// smallest read buffer bound.
pub const REQUEST_BYTES_MAX: usize = 8192;
/// How long one connection may take, from accept to the last byte of the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Connections served at once; more wait in the listen queue.
pub const CONNECTIONS_MAX: usize = 16;

const TEXT: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics are read from.
#[derive(Debug, Clone)]
pub struct MetricsSource {
    /// Every shard's counters, by shard index.
    pub counters: Vec<Arc<ShardStats>>,
    /// The control thread's latest merged detector status.
    pub status: SharedStatus,
    /// The shared idempotency table (`None` in unit tests).
    pub idempotency: Option<Arc<Idempotency>>,
}

/// The running endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Starts answering on an already bound listener.
    pub fn spawn(listener: TcpListener, source: MetricsSource) -> std::io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("courier-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => serve(l, Arc::new(source), stopped).await,
                        Err(e) => tracing::error!(error = %e, "metrics listener not usable"),
                    }
                });
                // Dropping the runtime here ends the connections still open.
            })?;
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the endpoint and waits for its thread; connections still open are closed.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Accepts until told to stop, each connection in a task of its own while a permit holds.
async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<MetricsSource>,
    mut stopped: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            _ = &mut stopped => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed
            },
        };
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    connection(stream, source).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection: one request, one answer, all of it within [`REQUEST_DEADLINE`].
async fn connection(stream: tokio::net::TcpStream, source: Arc<MetricsSource>) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let answer = answer(&req, &source);
        async move { Ok::<_, std::convert::Infallible>(answer) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .title_case_headers(true)
        .max_buf_size(REQUEST_BYTES_MAX)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match tokio::time::timeout(REQUEST_DEADLINE, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request not answered"),
        // Dropping the connection closes it.
        Err(_) => tracing::debug!("metrics connection closed at its deadline"),
    }
}

/// The answer to one request: the metrics, or a short plain-text refusal.
fn answer<B>(req: &Request<B>, source: &MetricsSource) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the only resource is GET /metrics\n",
        );
    }
    if req.method() != Method::GET {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: the only resource is GET /metrics\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let mut body = String::new();
    render(source, &mut body);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(EXPOSITION));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT));
    r
}

/// One counter or gauge read from every shard.
struct ShardFamily {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    read: fn(&ShardStats) -> &AtomicU64,
}

const SHARD_FAMILIES: &[ShardFamily] = &[
    ShardFamily {
        name: "messages_accepted_total",
        kind: "counter",
        help: "Messages accepted (durable in the log) and acked.",
        read: |c| &c.accepted,
    },
    ShardFamily {
        name: "messages_not_accepted_total",
        kind: "counter",
        help: "Messages acked with any status other than accepted.",
        read: |c| &c.not_accepted,
    },
    ShardFamily {
        name: "batches_acked_total",
        kind: "counter",
        help: "SUBMIT batches acked.",
        read: |c| &c.batches,
    },
    ShardFamily {
        name: "datagrams_forwarded_total",
        kind: "counter",
        help: "Datagrams handed to the shard that owns their connection.",
        read: |c| &c.forwarded,
    },
    ShardFamily {
        name: "datagrams_forward_dropped_total",
        kind: "counter",
        help: "Datagrams dropped because the owning shard's inbox was full.",
        read: |c| &c.forward_dropped,
    },
    ShardFamily {
        name: "datagrams_unpooled_total",
        kind: "counter",
        help: "Datagrams given a buffer of their own because every receive arena was pinned.",
        read: |c| &c.recv_unpooled,
    },
    ShardFamily {
        name: "receive_arenas",
        kind: "gauge",
        help: "16 KiB receive arenas allocated (at most 256 per shard).",
        read: |c| &c.recv_arenas,
    },
    ShardFamily {
        name: "connections",
        kind: "gauge",
        help: "Live client connections.",
        read: |c| &c.connections,
    },
    ShardFamily {
        name: "disk_below_reserve",
        kind: "gauge",
        help: "Logs whose file system is below log.disk_reserve_bytes (new batches throttled).",
        read: |c| &c.disk_low,
    },
    ShardFamily {
        name: "disk_low_throttled_total",
        kind: "counter",
        help: "Messages throttled because the disk was below its reserve.",
        read: |c| &c.disk_low_throttled,
    },
    ShardFamily {
        name: "connections_refused_total",
        kind: "counter",
        help: "New connections refused because the shard's connection table was full.",
        read: |c| &c.connections_refused,
    },
    ShardFamily {
        name: "connections_address_cap_refused_total",
        kind: "counter",
        help: "New connections refused because their source address held its share.",
        read: |c| &c.address_cap_refused,
    },
    ShardFamily {
        name: "connections_business_cap_refused_total",
        kind: "counter",
        help: "Connections closed at HELLO because their credential held its share.",
        read: |c| &c.business_cap_refused,
    },
    ShardFamily {
        name: "streams_paused_at_share_total",
        kind: "counter",
        help: "Times a stream was left unread because its business had limits.batches_in_flight_per_business_max batches in flight on the shard (backpressure).",
        read: |c| &c.share_paused,
    },
    ShardFamily {
        name: "batch_others_ahead_max",
        kind: "gauge",
        help: "Most batches of other businesses taken while one batch was first of its business in the shard's queue (one per other business with batches waiting, at most).",
        read: |c| &c.others_ahead_max,
    },
    ShardFamily {
        name: "quic_retries_sent_total",
        kind: "counter",
        help: "QUIC Retry packets sent to unvalidated client addresses.",
        read: |c| &c.retries_sent,
    },
    ShardFamily {
        name: "handshakes_half_open",
        kind: "gauge",
        help: "QUIC handshakes in progress.",
        read: |c| &c.half_open,
    },
    ShardFamily {
        name: "group_commits_total",
        kind: "counter",
        help: "Log group commits (durable writes) completed.",
        read: |c| &c.commits,
    },
    ShardFamily {
        name: "log_failed",
        kind: "gauge",
        help: "Logs failed for good (1 per shard whose log takes no more messages).",
        read: |c| &c.log_failed,
    },
    ShardFamily {
        name: "log_appended_bytes_total",
        kind: "counter",
        help: "Bytes appended to the log (sealed records with their framing).",
        read: |c| &c.log_appended_bytes,
    },
    ShardFamily {
        name: "log_segments",
        kind: "gauge",
        help: "Live log segments (updated each second).",
        read: |c| &c.log_segments,
    },
    ShardFamily {
        name: "log_segments_dropped_total",
        kind: "counter",
        help: "Log segments deleted by retention, their keys destroyed.",
        read: |c| &c.log_segments_dropped,
    },
    ShardFamily {
        name: "messages_duplicate_total",
        kind: "counter",
        help: "Messages answered duplicate: their client id is already durable in the log.",
        read: |c| &c.duplicates,
    },
    ShardFamily {
        name: "messages_in_flight_retry_total",
        kind: "counter",
        help: "Messages answered throttled because a copy with their client id was still being stored.",
        read: |c| &c.in_flight_retries,
    },
    ShardFamily {
        name: "detect_throttled_total",
        kind: "counter",
        help: "Messages the detector throttled.",
        read: |c| &c.detect_throttled,
    },
    ShardFamily {
        name: "detect_rejected_total",
        kind: "counter",
        help: "Messages the detector rejected (messaging limit reached, sender paused).",
        read: |c| &c.detect_rejected,
    },
    ShardFamily {
        name: "integrity_signals_total",
        kind: "counter",
        help: "Integrity signals raised.",
        read: |c| &c.signals,
    },
    ShardFamily {
        name: "detect_deltas_dropped_total",
        kind: "counter",
        help: "Detector deltas dropped because a peer shard's inbox was full.",
        read: |c| &c.deltas_dropped,
    },
    ShardFamily {
        name: "delivery_pending",
        kind: "gauge",
        help: "Messages waiting for delivery (durable, no final status yet), held in memory.",
        read: |c| &c.delivery_pending,
    },
    ShardFamily {
        name: "delivery_pending_bytes",
        kind: "gauge",
        help: "Payload bytes held in memory for waiting messages.",
        read: |c| &c.delivery_pending_bytes,
    },
    ShardFamily {
        name: "delivery_handoffs_total",
        kind: "counter",
        help: "Messages handed to the delivery edge (DELIVER), retransmissions included.",
        read: |c| &c.delivery_handoffs,
    },
    ShardFamily {
        name: "delivery_retransmissions_total",
        kind: "counter",
        help: "Hand-offs of a message after its first (retry_later, ONLINE, outcome timeout, a gone edge).",
        read: |c| &c.delivery_retransmissions,
    },
    ShardFamily {
        name: "delivery_full_total",
        kind: "counter",
        help: "Messages answered throttled because delivery's memory bounds (delivery.pending_max, pending_bytes_max) were full.",
        read: |c| &c.delivery_full,
    },
    ShardFamily {
        name: "delivery_held_total",
        kind: "counter",
        help: "Messages whose batch was held (back-pressure, at most 1 s) because delivery's memory bounds were full while an edge was taking messages.",
        read: |c| &c.delivery_held,
    },
    ShardFamily {
        name: "inbound_accepted_total",
        kind: "counter",
        help: "Users' replies from the edge made durable and acked.",
        read: |c| &c.inbound_accepted,
    },
    ShardFamily {
        name: "events_pushed_total",
        kind: "counter",
        help: "Events (statuses, replies) pushed to businesses, repeats included.",
        read: |c| &c.events_pushed,
    },
    ShardFamily {
        name: "events_acked_total",
        kind: "counter",
        help: "Events businesses acknowledged.",
        read: |c| &c.events_acked,
    },
    ShardFamily {
        name: "events_dropped_total",
        kind: "counter",
        help: "Events dropped past delivery.events_per_business_max or by retention (they stay in the log).",
        read: |c| &c.events_dropped,
    },
    ShardFamily {
        name: "events_backlog",
        kind: "gauge",
        help: "Events waiting for their business's acknowledgement.",
        read: |c| &c.events_backlog,
    },
    ShardFamily {
        name: "delivery_statuses_lost_total",
        kind: "counter",
        help: "Statuses that could not be recorded because the shard's log had failed.",
        read: |c| &c.statuses_lost,
    },
    ShardFamily {
        name: "e2e_keys_wanted_total",
        kind: "counter",
        help: "Recipients whose device keys were asked of the edge (KEYS_WANTED).",
        read: |c| &c.e2e_keys_wanted,
    },
    ShardFamily {
        name: "e2e_bundles_refused_total",
        kind: "counter",
        help: "Recipients' device bundle lists refused (bad structure or signed-prekey signature).",
        read: |c| &c.e2e_bundles_refused,
    },
    ShardFamily {
        name: "e2e_one_time_prekeys_refused_total",
        kind: "counter",
        help: "Devices' one-time prekeys not used for a session: their signature did not verify.",
        read: |c| &c.e2e_one_time_refused,
    },
    ShardFamily {
        name: "e2e_sessions_new_total",
        kind: "counter",
        help: "Device sessions set up (HPKE to a device's prekey).",
        read: |c| &c.e2e_sessions_new,
    },
    ShardFamily {
        name: "e2e_copies_total",
        kind: "counter",
        help: "Message copies sealed for devices.",
        read: |c| &c.e2e_copies,
    },
    ShardFamily {
        name: "e2e_replies_refused_total",
        kind: "counter",
        help: "Users' replies sealed end to end that did not open (answered rejected).",
        read: |c| &c.e2e_replies_refused,
    },
    ShardFamily {
        name: "e2e_directory_recipients",
        kind: "gauge",
        help: "Recipients whose device bundles the shard holds in memory (delivery.e2e.directory_max).",
        read: |c| &c.e2e_directory,
    },
    ShardFamily {
        name: "e2e_sessions",
        kind: "gauge",
        help: "Device sessions the shard holds (delivery.e2e.sessions_max).",
        read: |c| &c.e2e_sessions,
    },
    ShardFamily {
        name: "delivery_peer_dropped_total",
        kind: "counter",
        help: "Delivery messages between shards dropped because an inbox was full (the owner repeats the work).",
        read: |c| &c.peer_dropped,
    },
];

/// Reads one counter of a shard's figures.
type ReadCounter = fn(&ShardStats) -> &AtomicU64;

/// Final statuses by kind (`read` follows `delivered`): the label values and counters of
/// `courier_delivery_outcomes_total`.
const OUTCOMES: [(&str, ReadCounter); 4] = [
    ("delivered", |c| &c.delivered),
    ("read", |c| &c.read),
    ("failed", |c| &c.failed),
    ("expired", |c| &c.expired),
];

/// Writes every metric in the text exposition format 0.0.4.
///
/// Each per-shard figure appears twice: `courier_shard_<name>{shard="K"}` and its sum
/// over shards `courier_<name>` (two names, so `sum()` over either never counts twice).
pub fn render(source: &MetricsSource, out: &mut String) {
    // `write!` into a String cannot fail.
    let w = out;
    let _ = writeln!(
        w,
        "# HELP courier_shards Shards of this server.\n# TYPE courier_shards gauge\ncourier_shards {}",
        source.counters.len()
    );
    for f in SHARD_FAMILIES {
        let total: u64 = source
            .counters
            .iter()
            .map(|c| (f.read)(c).load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(
            w,
            "# HELP courier_{n} {h} All shards.\n# TYPE courier_{n} {k}\ncourier_{n} {total}",
            n = f.name,
            h = f.help,
            k = f.kind
        );
    }
    for f in SHARD_FAMILIES {
        let _ = writeln!(
            w,
            "# HELP courier_shard_{n} {h} Per shard.\n# TYPE courier_shard_{n} {k}",
            n = f.name,
            h = f.help,
            k = f.kind
        );
        for (i, c) in source.counters.iter().enumerate() {
            let v = (f.read)(c).load(Ordering::Relaxed);
            let _ = writeln!(w, "courier_shard_{}{{shard=\"{i}\"}} {v}", f.name);
        }
    }

    let help = "Time from a shard taking a SUBMIT batch to sending its ACK (the group \
                commit's fdatasync included), seconds.";
    let mut all = LatencySnapshot::default();
    let mut per_shard = Vec::with_capacity(source.counters.len());
    for c in &source.counters {
        let h = c.ack_latency.snapshot();
        all.add(&h);
        per_shard.push(h);
    }
    let _ = writeln!(
        w,
        "# HELP courier_ack_latency_seconds {help} All shards.\n# TYPE courier_ack_latency_seconds histogram"
    );
    histogram(w, "courier_ack_latency_seconds", "", &all);
    let _ = writeln!(
        w,
        "# HELP courier_shard_ack_latency_seconds {help} Per shard.\n# TYPE courier_shard_ack_latency_seconds histogram"
    );
    for (i, h) in per_shard.iter().enumerate() {
        histogram(
            w,
            "courier_shard_ack_latency_seconds",
            &format!("shard=\"{i}\","),
            h,
        );
    }

    delivery(source, now_unix_ms(), w);
    if let Some(t) = &source.idempotency {
        idempotency(&t.stats(), w);
    }
    businesses(source, w);
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Delivery's labelled figures: outcomes by kind, and the age of the oldest waiting
/// message at `now_unix_ms` (0 when nothing waits).
fn delivery(source: &MetricsSource, now_unix_ms: u64, w: &mut String) {
    let help = "Messages that reached a status, by kind: delivered, read (after delivered), \
                failed, expired.";
    let _ = writeln!(
        w,
        "# HELP courier_delivery_outcomes_total {help} All shards.\n# TYPE courier_delivery_outcomes_total counter"
    );
    for (kind, read) in OUTCOMES {
        let total: u64 = source
            .counters
            .iter()
            .map(|c| read(c).load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(
            w,
            "courier_delivery_outcomes_total{{kind=\"{kind}\"}} {total}"
        );
    }
    let _ = writeln!(
        w,
        "# HELP courier_shard_delivery_outcomes_total {help} Per shard.\n# TYPE courier_shard_delivery_outcomes_total counter"
    );
    for (i, c) in source.counters.iter().enumerate() {
        for (kind, read) in OUTCOMES {
            let v = read(c).load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "courier_shard_delivery_outcomes_total{{shard=\"{i}\",kind=\"{kind}\"}} {v}"
            );
        }
    }
    let age = |c: &ShardStats| match c.delivery_oldest_unix_ms.load(Ordering::Relaxed) {
        0 => 0,
        oldest => now_unix_ms.saturating_sub(oldest),
    };
    let help = "Age of the oldest message waiting for delivery, seconds (0: none waits).";
    let oldest = source.counters.iter().map(|c| age(c)).max().unwrap_or(0);
    let _ = writeln!(
        w,
        "# HELP courier_delivery_oldest_pending_age_seconds {help} Oldest of all shards.\n\
         # TYPE courier_delivery_oldest_pending_age_seconds gauge\n\
         courier_delivery_oldest_pending_age_seconds {}",
        seconds(oldest * 1000)
    );
    let _ = writeln!(
        w,
        "# HELP courier_shard_delivery_oldest_pending_age_seconds {help} Per shard.\n\
         # TYPE courier_shard_delivery_oldest_pending_age_seconds gauge"
    );
    for (i, c) in source.counters.iter().enumerate() {
        let _ = writeln!(
            w,
            "courier_shard_delivery_oldest_pending_age_seconds{{shard=\"{i}\"}} {}",
            seconds(age(c) * 1000)
        );
    }
}

/// The shared idempotency table's fill and the resend window it holds.
fn idempotency(st: &IdStats, w: &mut String) {
    let gauges = [
        (
            "idempotency_ids",
            "gauge",
            "Client ids the idempotency table remembers now.",
            st.entries,
        ),
        (
            "idempotency_ids_capacity",
            "gauge",
            "Most client ids the idempotency table remembers (limits.idempotency_ids_max).",
            st.capacity,
        ),
        (
            "idempotency_evicted_total",
            "counter",
            "Client ids forgotten to make room (a resend of one is stored again).",
            st.evicted,
        ),
        (
            "idempotency_evicted_in_flight_total",
            "counter",
            "Client ids forgotten while their message was still being stored (table far too small).",
            st.evicted_in_flight,
        ),
        (
            "idempotency_evicted_within_share_total",
            "counter",
            "Client ids of a business within limits.idempotency_ids_per_business_max forgotten for another business (every business within its share and the table full: size the table or the share).",
            st.evicted_within_share,
        ),
    ];
    for (name, kind, help, v) in gauges {
        let _ = writeln!(
            w,
            "# HELP courier_{name} {help}\n# TYPE courier_{name} {kind}\ncourier_{name} {v}"
        );
    }
    if let Some(t) = st.oldest_secs {
        let _ = writeln!(
            w,
            "# HELP courier_idempotency_oldest_unix_seconds When the oldest remembered client id was taken; time() minus it is the resend window held.\n# TYPE courier_idempotency_oldest_unix_seconds gauge\ncourier_idempotency_oldest_unix_seconds {t}"
        );
    }
}

/// Writes one histogram's series; `labels` is empty or ends with a comma.
fn histogram(w: &mut String, name: &str, labels: &str, h: &LatencySnapshot) {
    for (i, &bound) in ACK_LATENCY_BOUNDS_US.iter().enumerate() {
        let _ = writeln!(
            w,
            "{name}_bucket{{{labels}le=\"{}\"}} {}",
            seconds(bound),
            h.cumulative[i]
        );
    }
    let _ = writeln!(
        w,
        "{name}_bucket{{{labels}le=\"+Inf\"}} {}",
        h.cumulative[ACK_LATENCY_BOUNDS_US.len()]
    );
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(w, "{name}_sum{braces} {}", seconds(h.sum_us));
    let _ = writeln!(w, "{name}_count{braces} {}", h.count);
}

/// Microseconds as decimal seconds, exactly (no float rounding).
fn seconds(us: u64) -> String {
    let frac = us % 1_000_000;
    if frac == 0 {
        return format!("{}", us / 1_000_000);
    }
    let digits = format!("{frac:06}");
    format!("{}.{}", us / 1_000_000, digits.trim_end_matches('0'))
}

/// Per-business figures from the control thread's merged status: ids only, never names.
fn businesses(source: &MetricsSource, w: &mut String) {
    let status = source
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (reporting, list) = match &status {
        Some(s) => (s.shards_reporting, s.businesses.as_slice()),
        None => (0, &[][..]),
    };
    let _ = writeln!(
        w,
        "# HELP courier_status_shards_reporting Shards whose detector status the business figures include (refreshed each second).\n\
         # TYPE courier_status_shards_reporting gauge\ncourier_status_shards_reporting {reporting}"
    );
    let _ = writeln!(
        w,
        "# HELP courier_business_accepted_today Accepted (durable) messages today, UTC, all shards: the billing count.\n\
         # TYPE courier_business_accepted_today gauge"
    );
    for b in list {
        let _ = writeln!(
            w,
            "courier_business_accepted_today{{business=\"{}\"}} {}",
            b.id, b.accepted_today
        );
    }
    let _ = writeln!(
        w,
        "# HELP courier_business_paused 1 while the business is paused (every message rejected with sender_paused).\n\
         # TYPE courier_business_paused gauge"
    );
    for b in list {
        let _ = writeln!(
            w,
            "courier_business_paused{{business=\"{}\"}} {}",
            b.id,
            u8::from(b.paused)
        );
    }
    let _ = writeln!(
        w,
        "# HELP courier_business_rating Quality rating: 1 for the business's current rating, 0 for the others.\n\
         # TYPE courier_business_rating gauge"
    );
    for b in list {
        for r in ["green", "yellow", "red"] {
            let _ = writeln!(
                w,
                "courier_business_rating{{business=\"{}\",rating=\"{r}\"}} {}",
                b.id,
                u8::from(b.rating == r)
            );
        }
    }
    let backlogs = status.as_ref().map(|s| &s.event_backlogs);
    let _ = writeln!(
        w,
        "# HELP courier_business_event_backlog Events (statuses, replies) waiting for the business's acknowledgement, all shards.\n\
         # TYPE courier_business_event_backlog gauge"
    );
    for (b, n) in backlogs.into_iter().flatten() {
        let _ = writeln!(w, "courier_business_event_backlog{{business=\"{b}\"}} {n}");
    }
    let inbound = status.as_ref().map(|s| &s.inbound_today);
    let _ = writeln!(
        w,
        "# HELP courier_business_inbound_today Users' replies the business received today, UTC, all shards (durable; rebuilt from the log at start-up).\n\
         # TYPE courier_business_inbound_today gauge"
    );
    for (b, n) in inbound.into_iter().flatten() {
        let _ = writeln!(w, "courier_business_inbound_today{{business=\"{b}\"}} {n}");
    }
    let _ = writeln!(
        w,
        "# HELP courier_business_tier_recipients Unique recipients per 24 h the tier in force allows; absent for unlimited.\n\
         # TYPE courier_business_tier_recipients gauge"
    );
    for b in list {
        if let Some(n) = Tier::parse(&b.tier).and_then(Tier::recipients_per_day) {
            let _ = writeln!(
                w,
                "courier_business_tier_recipients{{business=\"{}\"}} {n}",
                b.id
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BusinessStatus, StatusFile};
    use std::sync::Mutex;

    fn source() -> MetricsSource {
        let counters: Vec<Arc<ShardStats>> =
            (0..2).map(|_| Arc::new(ShardStats::default())).collect();
        counters[0].accepted.store(3, Ordering::Relaxed);
        counters[1].accepted.store(4, Ordering::Relaxed);
        counters[0].ack_latency.observe(Duration::from_micros(700));
        counters[1].ack_latency.observe(Duration::from_secs(3));
        counters[0].delivered.store(5, Ordering::Relaxed);
        counters[1].delivered.store(6, Ordering::Relaxed);
        counters[1].failed.store(2, Ordering::Relaxed);
        counters[0].delivery_pending.store(9, Ordering::Relaxed);
        counters[1]
            .delivery_oldest_unix_ms
            .store(now_unix_ms() - 90_000, Ordering::Relaxed);
        let status = StatusFile {
            event_backlogs: [(7, 4)].into(),
            inbound_today: [(7, 2)].into(),
            updated_unix_ms: 1,
            shards_reporting: 2,
            shards: 2,
            businesses: vec![
                BusinessStatus {
                    id: 7,
                    rating: "yellow".into(),
                    tier: "2000".into(),
                    paused: true,
                    why: Some("fan_out_surge".into()),
                    measured: None,
                    accepted_today: 11,
                },
                BusinessStatus {
                    id: 8,
                    rating: "green".into(),
                    tier: "unlimited".into(),
                    paused: false,
                    why: None,
                    measured: None,
                    accepted_today: 0,
                },
            ],
        };
        MetricsSource {
            counters,
            status: Arc::new(Mutex::new(Some(status))),
            idempotency: None,
        }
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(500), "0.0005");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(0), "0");
    }

    #[test]
    fn render_sums_shards_and_shows_businesses_by_id() {
        let mut out = String::new();
        render(&source(), &mut out);
        let has = |line: &str| out.lines().any(|l| l == line);
        assert!(has("courier_shards 2"), "{out}");
        assert!(has("courier_messages_accepted_total 7"), "{out}");
        assert!(has("courier_shard_messages_accepted_total{shard=\"1\"} 4"));
        assert!(has("courier_ack_latency_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(has("courier_ack_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(has("courier_ack_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(has("courier_ack_latency_seconds_sum 3.0007"));
        assert!(has(
            "courier_shard_ack_latency_seconds_count{shard=\"0\"} 1"
        ));
        assert!(has("courier_business_accepted_today{business=\"7\"} 11"));
        assert!(has("courier_business_paused{business=\"7\"} 1"));
        assert!(has("courier_business_paused{business=\"8\"} 0"));
        assert!(has(
            "courier_business_rating{business=\"7\",rating=\"yellow\"} 1"
        ));
        assert!(has(
            "courier_business_rating{business=\"7\",rating=\"green\"} 0"
        ));
        assert!(has("courier_business_tier_recipients{business=\"7\"} 2000"));
        assert!(!out.contains("courier_business_tier_recipients{business=\"8\"}"));
        assert!(has(
            "courier_delivery_outcomes_total{kind=\"delivered\"} 11"
        ));
        assert!(has("courier_delivery_outcomes_total{kind=\"failed\"} 2"));
        assert!(has(
            "courier_shard_delivery_outcomes_total{shard=\"1\",kind=\"delivered\"} 6"
        ));
        assert!(has("courier_delivery_pending 9"));
        assert!(has("courier_business_event_backlog{business=\"7\"} 4"));
        assert!(!out.contains("courier_business_event_backlog{business=\"8\"}"));
        assert!(has("courier_business_inbound_today{business=\"7\"} 2"));
        assert!(has(
            "courier_shard_delivery_oldest_pending_age_seconds{shard=\"0\"} 0"
        ));
        let age: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("courier_delivery_oldest_pending_age_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((90.0..100.0).contains(&age), "{age}");
        // Every family is declared once, before its samples.
        let mut declared = std::collections::HashSet::new();
        for l in out.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{l}: no TYPE before it");
            }
        }
    }
}
