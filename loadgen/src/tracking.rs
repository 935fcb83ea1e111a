//! What happened to every accepted message of a delivery run, from the three sides that
//! see it: the sender (its ACK), the simulated edge (DELIVERs, outcomes, ONLINE) and the
//! business (statuses), checked against each other.
//!
//! ```text
//!  sender: accepted(position) at t_submit ──┐
//!  edge:   DELIVER (copies counted), delivered at t_del, ONLINE at t_online
//!  business: STATUS events (copies dropped by event id) at t_status
//!            ──> submit→delivered = t_del − t_submit, delivered→STATUS = t_status − t_del,
//!                ONLINE→delivered = t_del − t_online (after retry_later)
//!  checks: one final status (delivered | failed | expired) per message, `read` only after
//!          `delivered`, `sent` never after the final one; every accepted message final
//!          by the end (`unresolved` counts those that are not)
//! ```
//!
//! Bounds: at most [`TRACKED_MAX`] messages are tracked per run (more are counted in
//! `untracked` and left out of the checks); replies are told apart by their event ids in
//! a window of the same size.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use courier_client::events::SeenIds;
use courier_pipeline::by_position::ByPosition;
use courier_pipeline::wire::delivery::{FailReason, InboundEvent, StatusEvent, StatusKind};
use courier_pipeline::wire::LogPosition;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::report::Percentiles;
use crate::LATENCY_US_MAX;

/// Most messages one run tracks.
pub const TRACKED_MAX: usize = 4_000_000;
/// Lock stripes of the message table: one per relay shard (a shard's positions are
/// its log's indexes, in order), shards past this sharing them.
const STRIPES: usize = 64;
/// Slots of [`Tracker::finals`]: a status kind's wire code, or 8 plus a failure reason's.
const FINAL_SLOTS: usize = 16;

/// The slot of [`Tracker::finals`] that counts a final status or read of `kind` (and
/// `reason`, for `failed`): counted without a lock or a name built per status, named
/// when the report is made.
fn final_slot(kind: StatusKind, reason: Option<FailReason>) -> usize {
    match (kind, reason) {
        (StatusKind::Failed, Some(r)) => 8 + r as usize,
        (k, _) => k as usize,
    }
}

/// Bytes that start a simulated reply: `reply:` then the business id and the message.
pub const REPLY_PREFIX: &[u8] = b"reply:";

/// One message as the three sides saw it.
#[derive(Debug, Default, Clone, Copy)]
struct Track {
    submitted: Option<Instant>,
    delivered_at: Option<Instant>,
    online_at: Option<Instant>,
    delivers: u32,
    sent_event: u64,
    final_event: u64,
    final_kind: Option<StatusKind>,
    read_event: u64,
}

/// What a delivery run reports (`courier-loadgen --deliver`; the `delivery` object of
/// the JSON report).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// Messages whose business heard `delivered`.
    pub delivered: u64,
    /// Of those, also `read`.
    pub read: u64,
    /// Messages whose business heard `failed`.
    pub failed: u64,
    /// `failed` by reason name.
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Messages whose business heard `expired`.
    pub expired: u64,
    /// `sent` statuses heard.
    pub sent: u64,
    /// DELIVERs the edge took, copies included.
    pub handoffs: u64,
    /// DELIVERs of a message after its first (outcome timeouts, reconnects, restarts).
    pub retransmissions: u64,
    /// `retry_later` outcomes (device offline).
    pub retry_later: u64,
    /// Recipients the edge announced ONLINE.
    pub online: u64,
    /// Users' replies the relay accepted (ACKed to the edge).
    pub inbound: u64,
    /// Distinct replies (by event id) the businesses heard.
    pub inbound_received: u64,
    /// Replies heard by a business they were not written to (must be 0).
    pub inbound_misrouted: u64,
    /// Replies the relay throttled (sent again), or that found the edge's queue full.
    pub inbound_throttled: u64,
    /// Replies never handed over (rejected, or given up after retries).
    pub inbound_lost: u64,
    /// Event copies dropped by event id (at-least-once repeats).
    pub events_duplicate: u64,
    /// From a message's submit (its ACK latency's start) to the edge reporting it
    /// delivered, microseconds.
    pub submit_to_delivered_us: Percentiles,
    /// From the edge reporting a message delivered to its business hearing `delivered`.
    pub delivered_to_status_us: Percentiles,
    /// From ONLINE naming an offline recipient to its waiting message being delivered.
    pub online_to_delivered_us: Percentiles,
    /// Accepted messages tracked (every accepted message up to [`TRACKED_MAX`]).
    pub tracked: u64,
    /// Accepted messages past [`TRACKED_MAX`], left out of the checks.
    pub untracked: u64,
    /// Tracked accepted messages without a final status at the end (must be 0 for the
    /// run to pass).
    pub unresolved: u64,
    /// Second final statuses (another event id) for one message (must be 0).
    pub extra_finals: u64,
    /// Statuses out of order: `read` before `delivered`, `sent` after a final one (must
    /// be 0).
    pub order_violations: u64,
    /// Seconds waited after sending for the last statuses.
    pub settle_secs: f64,
    /// End-to-end sealing, when the relay granted it: what the devices saw.
    #[serde(default)]
    pub e2e: Option<E2eReport>,
}

/// What the simulated devices saw of end-to-end sealing (`e2e` of the delivery report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2eReport {
    /// DELIVERs whose every copy opened on its device to one plaintext.
    pub messages_opened: u64,
    /// Device copies opened.
    pub copies_opened: u64,
    /// DELIVERs that did not open (a copy that failed, a device without a copy, copies
    /// that disagree, a DELIVER not sealed for devices): must be 0.
    pub open_failures: u64,
    /// Opened messages whose plaintext was not what the senders sent: must be 0.
    pub content_mismatch: u64,
    /// Copies tried with another device's session.
    pub cross_device_checks: u64,
    /// Of those, opened: must be 0.
    pub cross_device_opened: u64,
    /// Device sessions set up.
    pub sessions_accepted: u64,
    /// Recipients' bundle lists the edge published (KEYS_WANTED answered).
    pub bundles_published: u64,
    /// Replies sealed to their business's key.
    pub replies_sealed: u64,
}

impl E2eReport {
    /// Whether every device check holds.
    pub fn passed(&self) -> bool {
        self.open_failures == 0 && self.content_mismatch == 0 && self.cross_device_opened == 0
    }
}

impl DeliveryReport {
    /// Whether every check holds: each tracked accepted message has exactly one final
    /// status at its business, in order, and no reply went astray.
    pub fn passed(&self) -> bool {
        self.unresolved == 0
            && self.extra_finals == 0
            && self.order_violations == 0
            && self.inbound_misrouted == 0
            && self.e2e.as_ref().is_none_or(E2eReport::passed)
    }
}

#[derive(Debug, Default)]
struct Counts {
    handoffs: AtomicU64,
    retransmissions: AtomicU64,
    retry_later: AtomicU64,
    online: AtomicU64,
    inbound: AtomicU64,
    inbound_misrouted: AtomicU64,
    inbound_throttled: AtomicU64,
    inbound_lost: AtomicU64,
    events_duplicate: AtomicU64,
    untracked: AtomicU64,
    extra_finals: AtomicU64,
    order_violations: AtomicU64,
    sent: AtomicU64,
}

#[derive(Debug)]
struct Latencies {
    submit_to_delivered: Histogram<u64>,
    delivered_to_status: Histogram<u64>,
    online_to_delivered: Histogram<u64>,
}

/// The run's shared record of delivery; see the module docs.
#[derive(Debug)]
pub struct Tracker {
    /// Keyed by the relay's log positions, each shard's in its stripe in log order, as
    /// the relay keeps its pending messages: the messages are accepted, handed, delivered
    /// and reported mostly in log order, so their entries are reached in memory order
    /// (in a hash map each was a cache miss, most of the generator's own time in the
    /// tracker: BENCHMARKS.md, "Pending messages in log order").
    stripes: Vec<Mutex<ByPosition<Track>>>,
    /// Entries of `stripes` (accepted messages and those only the edge or a status named).
    entries: AtomicU64,
    /// Accepted messages without a final status yet (kept as they change).
    unresolved: AtomicU64,
    /// Replies handed to the edge's reply queue and not yet accepted or given up.
    replies_pending: AtomicU64,
    counts: Counts,
    latencies: Mutex<Latencies>,
    /// Final statuses and reads heard, by [`final_slot`].
    finals: [AtomicU64; FINAL_SLOTS],
    replies: Mutex<SeenIds>,
    inbound_received: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

fn micros(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, LATENCY_US_MAX)
}

impl Default for Tracker {
    fn default() -> Tracker {
        Tracker::new()
    }
}

impl Tracker {
    /// An empty record.
    pub fn new() -> Tracker {
        Tracker {
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(ByPosition::default()))
                .collect(),
            entries: AtomicU64::new(0),
            unresolved: AtomicU64::new(0),
            replies_pending: AtomicU64::new(0),
            counts: Counts::default(),
            latencies: Mutex::new(Latencies {
                submit_to_delivered: histogram(),
                delivered_to_status: histogram(),
                online_to_delivered: histogram(),
            }),
            finals: Default::default(),
            replies: Mutex::new(SeenIds::new(TRACKED_MAX)),
            inbound_received: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the message's entry, creating it while fewer than [`TRACKED_MAX`] are
    /// tracked; `None` past that.
    fn with<R>(&self, message: LogPosition, f: impl FnOnce(&mut Track) -> R) -> Option<R> {
        let i = usize::from(message.shard()) % STRIPES;
        let mut map = self.stripes[i].lock().expect("tracker lock");
        if let Some(t) = map.get_mut(&message) {
            return Some(f(t));
        }
        if self.entries.fetch_add(1, Ordering::Relaxed) >= TRACKED_MAX as u64 {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let mut t = Track::default();
        let r = f(&mut t);
        let inserted = map.insert(message, t);
        debug_assert!(inserted.is_ok(), "looked up above");
        Some(r)
    }

    /// The sender's ACK said `accepted(message)`; `submitted` is when its latency began.
    pub fn accepted(&self, message: LogPosition, submitted: Instant) {
        let delivered = self.with(message, |t| {
            if t.submitted.is_none() && t.final_kind.is_none() {
                self.unresolved.fetch_add(1, Ordering::Relaxed);
            }
            t.submitted.get_or_insert(submitted);
            t.delivered_at
        });
        match delivered {
            None => {
                self.counts.untracked.fetch_add(1, Ordering::Relaxed);
            }
            // The DELIVER overtook the ACK.
            Some(Some(at)) => self.lat(|l| {
                l.submit_to_delivered
                    .saturating_record(micros(submitted, at))
            }),
            Some(None) => {}
        }
    }

    /// The edge was handed `message`: whether this is its first copy, and whether the
    /// edge already delivered it (a copy of a delivered message is answered `delivered`
    /// again: the device has it).
    pub fn handed(&self, message: LogPosition) -> (bool, bool) {
        self.counts.handoffs.fetch_add(1, Ordering::Relaxed);
        let (first, delivered) = self
            .with(message, |t| {
                t.delivers += 1;
                (t.delivers == 1, t.delivered_at.is_some())
            })
            .unwrap_or((true, false));
        if !first {
            self.counts.retransmissions.fetch_add(1, Ordering::Relaxed);
        }
        (first, delivered)
    }

    /// The edge answered `retry_later` (the device is offline).
    pub fn retry_later(&self) {
        self.counts.retry_later.fetch_add(1, Ordering::Relaxed);
    }

    /// The edge announced these messages' recipient online at `at`.
    pub fn online(&self, messages: &[LogPosition], at: Instant) {
        self.counts.online.fetch_add(1, Ordering::Relaxed);
        for &m in messages {
            self.with(m, |t| t.online_at = Some(at));
        }
    }

    /// The edge reports `message` delivered at `at` (its first delivery counts).
    pub fn delivered(&self, message: LogPosition, at: Instant) {
        let times = self.with(message, |t| {
            if t.delivered_at.is_some() {
                return None;
            }
            t.delivered_at = Some(at);
            Some((t.submitted, t.online_at.take()))
        });
        if let Some(Some((submitted, online))) = times {
            self.lat(|l| {
                if let Some(s) = submitted {
                    l.submit_to_delivered.saturating_record(micros(s, at));
                }
                if let Some(o) = online {
                    l.online_to_delivered.saturating_record(micros(o, at));
                }
            });
        }
    }

    /// A business heard a status at `at` (copies are dropped here by event id).
    pub fn status(&self, s: &StatusEvent, at: Instant) {
        let e = s.event.0;
        let verdict = self.with(s.message, |t| {
            let known = [t.sent_event, t.final_event, t.read_event];
            if known.contains(&e) {
                return Verdict::Copy;
            }
            match s.kind {
                StatusKind::Sent => {
                    t.sent_event = e;
                    if t.final_kind.is_some() {
                        Verdict::OutOfOrder
                    } else {
                        Verdict::Sent
                    }
                }
                StatusKind::Read => {
                    t.read_event = e;
                    if t.final_kind == Some(StatusKind::Delivered) {
                        Verdict::Read
                    } else {
                        Verdict::OutOfOrder
                    }
                }
                kind => {
                    if t.final_kind.is_some() {
                        return Verdict::ExtraFinal;
                    }
                    t.final_event = e;
                    t.final_kind = Some(kind);
                    if t.submitted.is_some() {
                        self.unresolved.fetch_sub(1, Ordering::Relaxed);
                    }
                    Verdict::Final(t.delivered_at.filter(|_| kind == StatusKind::Delivered))
                }
            }
        });
        let c = &self.counts;
        match verdict.unwrap_or(Verdict::Untracked) {
            Verdict::Copy => {
                c.events_duplicate.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Sent => {
                c.sent.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::OutOfOrder => {
                c.order_violations.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::ExtraFinal => {
                c.extra_finals.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Read | Verdict::Final(_) | Verdict::Untracked => {
                self.finals[final_slot(s.kind, s.reason)].fetch_add(1, Ordering::Relaxed);
                if let Verdict::Final(Some(d)) = verdict.unwrap_or(Verdict::Untracked) {
                    self.lat(|l| l.delivered_to_status.saturating_record(micros(d, at)));
                }
            }
        }
    }

    /// A business (`business_id`) heard a reply (copies dropped by event id).
    pub fn reply(&self, i: &InboundEvent, business_id: u32) {
        if !self.replies.lock().expect("replies lock").insert(i.event.0) {
            self.counts.events_duplicate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inbound_received.fetch_add(1, Ordering::Relaxed);
        if reply_business(&i.payload) != Some(business_id) {
            self.counts
                .inbound_misrouted
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A reply entered the edge's queue.
    pub fn reply_queued(&self) {
        self.replies_pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Replies the relay accepted, throttled (to be sent again), or that were lost
    /// (rejected, given up, or never queued); accepted and lost ones leave the queue.
    pub fn inbound(&self, accepted: u64, throttled: u64, lost: u64, queued: bool) {
        let c = &self.counts;
        c.inbound.fetch_add(accepted, Ordering::Relaxed);
        c.inbound_throttled.fetch_add(throttled, Ordering::Relaxed);
        c.inbound_lost.fetch_add(lost, Ordering::Relaxed);
        if queued {
            self.replies_pending
                .fetch_sub(accepted + lost, Ordering::Relaxed);
        }
    }

    fn lat(&self, f: impl FnOnce(&mut Latencies)) {
        f(&mut self.latencies.lock().expect("latency lock"));
    }

    /// Tracked accepted messages without a final status, and replies queued or accepted
    /// but not yet heard: what a run waits for before it reports. Cheap (counters).
    pub fn outstanding(&self) -> (u64, u64) {
        let heard = self.inbound_received.load(Ordering::Relaxed);
        let accepted = self.counts.inbound.load(Ordering::Relaxed);
        let replies = self.replies_pending.load(Ordering::Relaxed) + accepted.saturating_sub(heard);
        (self.unresolved.load(Ordering::Relaxed), replies)
    }

    /// Accepted messages tracked, and those of them without a final status.
    fn scan(&self) -> (u64, u64) {
        let mut accepted = 0;
        let mut unresolved = 0;
        for s in &self.stripes {
            for (_, t) in s.lock().expect("tracker lock").iter() {
                if t.submitted.is_some() {
                    accepted += 1;
                    unresolved += u64::from(t.final_kind.is_none());
                }
            }
        }
        (accepted, unresolved)
    }

    /// The report now.
    pub fn report(&self, settle_secs: f64) -> DeliveryReport {
        let c = &self.counts;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let get = |k: StatusKind| ld(&self.finals[final_slot(k, None)]);
        let failed_by_reason: BTreeMap<String, u64> = FailReason::ALL
            .iter()
            .map(|&r| (r, ld(&self.finals[final_slot(StatusKind::Failed, Some(r))])))
            .filter(|&(_, n)| n > 0)
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        let (tracked, unresolved) = self.scan();
        let l = self.latencies.lock().expect("latency lock");
        DeliveryReport {
            delivered: get(StatusKind::Delivered),
            read: get(StatusKind::Read),
            failed: failed_by_reason.values().sum(),
            failed_by_reason,
            expired: get(StatusKind::Expired),
            sent: ld(&c.sent),
            handoffs: ld(&c.handoffs),
            retransmissions: ld(&c.retransmissions),
            retry_later: ld(&c.retry_later),
            online: ld(&c.online),
            inbound: ld(&c.inbound),
            inbound_received: ld(&self.inbound_received),
            inbound_misrouted: ld(&c.inbound_misrouted),
            inbound_throttled: ld(&c.inbound_throttled),
            inbound_lost: ld(&c.inbound_lost),
            events_duplicate: ld(&c.events_duplicate),
            submit_to_delivered_us: Percentiles::of(&l.submit_to_delivered),
            delivered_to_status_us: Percentiles::of(&l.delivered_to_status),
            online_to_delivered_us: Percentiles::of(&l.online_to_delivered),
            tracked,
            untracked: ld(&c.untracked),
            unresolved,
            extra_finals: ld(&c.extra_finals),
            order_violations: ld(&c.order_violations),
            settle_secs,
            e2e: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Verdict {
    Copy,
    Sent,
    Read,
    OutOfOrder,
    ExtraFinal,
    /// A final status; the edge's delivery time when it is `delivered`.
    Final(Option<Instant>),
    Untracked,
}

/// The payload of a simulated reply: it names the business it is written to (synthetic
/// content; never a real person's words).
pub fn reply_payload(business_id: u32, message: LogPosition) -> Vec<u8> {
    let mut p = REPLY_PREFIX.to_vec();
    p.extend_from_slice(format!("{business_id}:{}", message.0).as_bytes());
    p
}

/// The business a simulated reply names.
pub fn reply_business(payload: &[u8]) -> Option<u32> {
    let rest = payload.strip_prefix(REPLY_PREFIX)?;
    let text = std::str::from_utf8(rest).ok()?;
    text.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use courier_pipeline::wire::delivery::FailReason;
    use courier_pipeline::wire::Recipient;

    fn st(event: u64, message: u64, kind: StatusKind) -> StatusEvent {
        StatusEvent {
            event: LogPosition(event),
            message: LogPosition(message),
            client_id: message,
            kind,
            reason: (kind == StatusKind::Failed).then_some(FailReason::BlockedByUser),
            at_ms: 0,
        }
    }

    #[test]
    fn the_checks_count_copies_extra_finals_and_order() {
        let t = Tracker::new();
        let now = Instant::now();
        for m in 1..=4 {
            t.accepted(LogPosition(m), now);
        }
        assert_eq!(t.handed(LogPosition(1)), (true, false));
        assert_eq!(t.handed(LogPosition(1)), (false, false), "a copy");
        t.delivered(LogPosition(1), now);
        assert_eq!(
            t.handed(LogPosition(1)),
            (false, true),
            "a copy of a delivered one"
        );
        t.status(&st(10, 1, StatusKind::Sent), now);
        t.status(&st(11, 1, StatusKind::Delivered), now);
        t.status(&st(11, 1, StatusKind::Delivered), now); // a copy: dropped
        t.status(&st(12, 1, StatusKind::Read), now);
        t.status(&st(13, 2, StatusKind::Failed), now);
        t.status(&st(14, 2, StatusKind::Expired), now); // a second final
        t.status(&st(15, 3, StatusKind::Read), now); // read before delivered
        t.status(&st(16, 3, StatusKind::Expired), now);
        t.status(&st(17, 3, StatusKind::Sent), now); // sent after final
        let r = t.report(0.0);
        assert_eq!((r.delivered, r.read, r.failed, r.expired), (1, 1, 1, 1));
        assert_eq!(r.failed_by_reason["blocked_by_user"], 1);
        assert_eq!((r.handoffs, r.retransmissions, r.sent), (3, 2, 1));
        assert_eq!(r.events_duplicate, 1);
        assert_eq!((r.extra_finals, r.order_violations), (1, 2));
        assert_eq!((r.tracked, r.unresolved), (4, 1), "message 4 is waiting");
        assert_eq!(r.submit_to_delivered_us.max, 1, "clamped to 1 us");
        assert!(!r.passed());
    }

    #[test]
    fn replies_are_told_apart_by_event_and_checked_against_their_business() {
        let t = Tracker::new();
        let reply = |event: u64, business: u32| InboundEvent {
            event: LogPosition(event),
            at_ms: 0,
            sender: Recipient::parse(b"+15550001111").unwrap(),
            payload: Bytes::from(reply_payload(business, LogPosition(5))),
        };
        t.reply_queued();
        t.reply_queued();
        t.inbound(2, 0, 0, true);
        t.reply(&reply(1, 7), 7);
        t.reply(&reply(1, 7), 7);
        assert_eq!(t.outstanding(), (0, 1));
        t.reply(&reply(2, 8), 7);
        let r = t.report(0.0);
        assert_eq!((r.inbound_received, r.events_duplicate), (2, 1));
        assert_eq!(r.inbound_misrouted, 1);
        assert_eq!(reply_business(b"reply:12:99"), Some(12));
        assert_eq!(reply_business(b"other"), None);
    }
}
