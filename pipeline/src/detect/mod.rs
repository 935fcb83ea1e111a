//! Inline detection of abnormal bulk sending, sender limits, integrity signals and
//! billing counts (issue 5). Sans-IO: every call takes `now_ms` from the caller.
//!
//! ```text
//!  per SUBMIT batch (shard thread, next to ingest::Ingest):
//!    Detector::observe_batch(now, &BusinessLimits, recipients, &mut verdicts)
//!      hash every recipient, load the state lines of AHEAD messages at a time, then
//!      per message, in this order:
//!        paused?                      -> Reject(SenderPaused)
//!        first attempt in the window? -> counted for fan-out (a retry or a repeat is not)
//!          fan-out surge (last 1 s)?  -> pause + IntegritySignal (with its Evidence)
//!                                        -> Reject(SenderPaused)
//!        same recipient over window?  -> Throttle { retry_after_ms }
//!        new recipient, 24 h at tier? -> Reject(MessagingLimitReached)
//!        rate bucket empty (mps)?     -> Throttle { retry_after_ms }
//!        else Admit (counted in sketches, rating denominator, peer delta)
//!      a message not admitted is remembered as attempted, so its retry is known as one
//!    Verdict::status() gives the ACK status of a non-admitted message; admitted ones go
//!    on to sealing and the log, and record_accepted(now, id, n) counts them for billing
//!    once durable.
//!  platform REPORT frame -> Detector::report_entries(now, entries)
//!  every <= 100 ms (shell, crossbeam channel between shards):
//!    let d = det.export_delta(now); send d to every peer; peer.merge(now, &d)
//!  operator: unpause(id), set_limits(id, tier, mps); status: signals(), poll_signal()
//!  on shutdown / every 10 s: expire(now); checkpoint() -> bytes
//!  on start: restore(&bytes); expire(now)
//! ```
//!
//! ## Calling it per batch (for the integrator)
//!
//! ```text
//! // once per shard: Detector::new(profile.detect.clone(), process_secret)
//! // Event::Submit { ticket, business, messages }:
//! let limits = BusinessLimits::from(registry.get(business).unwrap());
//! verdicts.clear();
//! // The messages that passed the ingest checks, in batch order:
//! let recipients = messages.iter().filter(|m| ingest.check(m).is_none()).map(|m| &m.recipient);
//! detector.observe_batch(now_ms, &limits, recipients, &mut verdicts);
//! // Admit -> the message goes on to sealing and the log; any other verdict's
//! // verdict.status() is its ACK status, in batch order.
//! // Once durable: detector.record_accepted(now_ms, business, accepted_count).
//! // REPORT (platform token only): detector.report_entries(now_ms, &entries).
//! // Every <= 100 ms per shard: detector.export_delta(now_ms) to every peer,
//! // peer.merge(now_ms, &delta); then drain detector.poll_signal().
//! ```
//!
//! ## What each mechanism keeps, and its error
//! - **Unique recipients, rolling 24 h** ([`recipients`]): exact below
//!   `exact_recipients_max` (tiers 250 and 2,000 are enforced exactly), a ring of 24
//!   hourly HyperLogLogs of `2^hll_precision` registers above it (standard error
//!   `1.04/sqrt(2^p)` = 2.3 % at p = 11: the 5 % bound holds at 2.2 σ). At the limit a
//!   message to a recipient already counted is admitted, a new one is rejected; in sketch
//!   mode "already counted" is approximated by the past-recipient filter plus "adding it
//!   would raise no register"; the filter's false positives would let new recipients
//!   through, so such admissions at the limit are capped at 0.5 % of the limit per
//!   episode (after which every message is rejected until the window drops below the
//!   limit). So in sketch mode the limit holds within the HLL error plus 0.5 %: within
//!   5 % at about 2 σ, not always (the seeded tier-10,000 ramp test ends 2.2 % over).
//! - **Rate** (`mps`): a token bucket with one second of burst. Across shards each shard
//!   holds a *share* of the rate proportional to its part of the business's recent demand
//!   (rebalanced at every delta exchange), so the shares sum to the whole rate and the
//!   global admitted rate stays within the limit however traffic is spread.
//! - **Same recipient** ([`recent`]): a table of the recipients of the window, each by a
//!   32-bit tag with its own admitted count (current and previous tumbling window,
//!   weighted into a sliding one). A number is throttled only on its own count (or, 2 in a
//!   billion per message, a tag collision in its bucket), whatever the sender's volume: a
//!   full bucket reuses the slot with the fewest messages, so its errors fall on admitting
//!   a message, never on throttling one. (Until issue 14 a count-min sketch of
//!   `same_recipient_sketch_width` counters a row did this; it never under-counted, so a
//!   sender of 1,000 new numbers a second filled it and had fresh numbers throttled.)
//! - **Retries** (issue 14): a message that is throttled or refused leaves its recipient
//!   marked as attempted in that table (and in the delta to the peers). Its retry, with
//!   the same client id or not, finds the mark and is not a new recipient for fan-out;
//!   the 24 h tier counts admitted messages only, so a retry never counted there. The
//!   recipient, not the client id, is the key: a resend of a client id always carries
//!   the same recipient, and a resend under a new id is caught too.
//! - **Rate retry-after**: the first message throttled by the rate waits for the next
//!   token, the next one a token later, and so on up to a full bucket, so that a client
//!   resending a throttled batch after its largest `retry_after_ms` finds room for it.
//! - **Fan-out surge** ([`fanout`]): recipients reached for the first time in the
//!   same-recipient window, per trailing second (ten 100 ms slots), counted exactly and
//!   capped, for a business that counted at least 256 in the second before, by a short
//!   HyperLogLog (2^8 registers per tumbling second) that counts a
//!   recipient once per second whatever the volume; never-contacted ones (missing from a
//!   two-generation Bloom filter of past recipients) counted alongside. A surge is at
//!   least `surge_distinct_per_sec_min` distinct recipients in the last second, at least
//!   `surge_baseline_factor` times the business's own EWMA of distinct recipients per
//!   minute (scaled to a second), with at least `surge_new_share_pct` % never contacted.
//!   It is checked on every counted message, so a blast is flagged as soon as its
//!   trailing second crosses the threshold: well within one second of its onset, and a
//!   large sender jumping to ten times its baseline within about half a second at the
//!   shipped factor of 5 (the factor must sit below the jump that has to be caught: at a
//!   factor of 10, a 10x jump reaches the threshold only as the trailing second fills,
//!   and the estimate's error decides). The baseline starts from the registry's
//!   `baseline_per_min` when that is higher (a large sender new to the relay). The
//!   measurement behind a pause is kept as its [`Evidence`] and shown with it.
//! - **Quality**: reports per million delivered (admitted) messages over 24 hours;
//!   green / yellow / red; on turning red the tier is lowered one step (or the business
//!   is paused, when `red_pauses` or already at the lowest tier). The counts behind the
//!   change are kept as its [`Evidence`].
//!
//! ## Privacy
//! A recipient exists here only as `SipHash-1-3(secret, number)` ([`RecipientHasher`]),
//! the secret coming from the caller per process. No number is stored, `Debug` prints
//! counters only, and checkpoints hold hashes and counters. Signals carry a business id,
//! rating, tier, paused flag, an enum reason and a count.
//!
//! **Keyed hashes age by time** (issue 19). A hash of a number may not outlive the
//! messages it came from, so every structure holding recipient hashes (or bits of them)
//! forgets them within `recipient_memory_ms`, which the profile sets to the log's
//! retention (`log.retention_secs`):
//!
//! | structure | holds | forgets after |
//! |---|---|---|
//! | 24 h window ([`recipients`]) | high 32 bits per recipient, or HLL registers | 24 h (the hour it was last seen); under a retention below a day, tags at the retention, counts kept (registers: 24 h, they name no recipient) |
//! | same-recipient table ([`recent`]) | low 32 bits per recipient | two `same_recipient_window_ms` windows |
//! | short fan-out sketches ([`fanout`]) | HLL registers | the next second (a sketch not in use is zeroed) |
//! | past-recipient filter (`sketches::PastFilter`) | Bloom bits | `recipient_memory_ms` at most (two generations of half of it, each dropped by its start's age) |
//! | unsent delta events | whole hashes | the next exchange (≤ 100 ms), else `recipient_memory_ms` |
//! | `observe_batch`'s scratch | whole hashes | the end of the batch |
//!
//! Each of these moves with its business's traffic, so for a business that goes quiet
//! [`Detector::expire`] moves them all to the shell's clock: the shell calls it after a
//! restore and before every checkpoint (every 10 s), so `detect/shard-K.ckpt` holds no
//! hash older than the retention, and memory none older than the retention plus 10 s.
//! Why by generation
//! start rather than per entry: the filter keeps no time per recipient (it has no room
//! for one), and two generations of half the memory each bound every entry's age at the
//! memory while a recipient messaged within the last half of it is still known (one
//! found only in a generation retired by time is copied forward when messaged again).
//! What the filter forgets sooner costs only this: a recipient last messaged more than
//! half the retention ago may count as never contacted in a surge test.
//!
//! ## Across shards
//! Each shard holds its own detector. The shell calls [`Detector::export_delta`] on every
//! shard every ≤ 100 ms, sends each delta to every other shard over a crossbeam channel,
//! and calls [`Detector::merge`] with it. A delta carries the recipient hashes admitted
//! in the interval (bounded by `delta_events_max`), per-business counters (demand,
//! distinct and new recipients, delivered, reports, accepted) and the pause / limits
//! control, merged by epoch. So every shard judges a business on all its traffic, at
//! most one exchange interval stale.
//!
//! ## Memory
//! At most `businesses_max` businesses per detector, each at most
//! [`DetectConfig::business_state_bytes_needed`] bytes (≤ 64 KiB with the default and every
//! shipped profile; checked when the profile loads).

mod business;
mod checkpoint;
mod config;
pub mod fanout;
mod keyed;
pub mod recent;
pub mod recipients;
mod sketches;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

pub use checkpoint::CheckpointError;
pub use config::{
    DetectConfig, LegacyDetectKeys, BUSINESS_STATE_BYTES_LIMIT, HLL_PRECISION_MAX,
    HLL_PRECISION_MIN, RECIPIENT_MEMORY_MS_DEFAULT, SAME_RECIPIENT_TABLE_ENTRIES_MAX,
    SAME_RECIPIENT_TABLE_ENTRIES_MIN, SKETCH_WIDTH_MAX, SKETCH_WIDTH_MIN,
};
pub use keyed::RecipientHasher;

use crate::registry::{Business, Tier};
use crate::wire::{Reason, Recipient, ReportEntry, Status};
use business::{BusinessState, Control, MS_PER_HOUR, SHARE_FULL_PPM, SHARE_MIN_PPM};

/// The limits of one business as the registry states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessLimits {
    /// Business id.
    pub id: u32,
    /// Unique-recipient tier.
    pub tier: Tier,
    /// Messages per second.
    pub mps: u32,
    /// Exempt from every check (the platform's own load and test senders): always
    /// admitted, still counted for billing.
    pub exempt: bool,
    /// Distinct recipients per minute the operator declared for this business: the
    /// surge check's baseline until the learned one is higher.
    pub baseline_per_min: u32,
}

impl From<&Business> for BusinessLimits {
    fn from(b: &Business) -> BusinessLimits {
        BusinessLimits {
            id: b.id,
            tier: b.tier,
            mps: b.mps,
            exempt: b.exempt,
            baseline_per_min: b.baseline_per_min,
        }
    }
}

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Go on to sealing and the log.
    Admit,
    /// Not now; retry after this long.
    Throttle {
        /// Milliseconds.
        retry_after_ms: u32,
    },
    /// Refused.
    Reject(Reason),
}

impl Verdict {
    /// The ACK status of a message that is not admitted; `None` for [`Verdict::Admit`].
    pub fn status(self) -> Option<Status> {
        match self {
            Verdict::Admit => None,
            Verdict::Throttle { retry_after_ms } => Some(Status::Throttled { retry_after_ms }),
            Verdict::Reject(r) => Some(Status::Rejected(r)),
        }
    }
}

/// Quality rating from spam reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rating {
    /// Few reports.
    Green,
    /// Reports at or above `rating_yellow_ppm`.
    Yellow,
    /// Reports at or above `rating_red_ppm`: the tier is lowered or the business paused.
    Red,
}

/// Why a signal was raised or a business is paused. Never identifies a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Why {
    /// Distinct, never-contacted recipients per second far above the business's baseline.
    FanOutSurge = 1,
    /// The quality rating turned yellow.
    QualityYellow = 2,
    /// The quality rating turned red (tier lowered, or paused).
    QualityRed = 3,
    /// The operator changed the pause or the limits.
    Operator = 4,
}

impl Rating {
    /// Lower-case name, for status output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Rating::Green => "green",
            Rating::Yellow => "yellow",
            Rating::Red => "red",
        }
    }
}

impl Why {
    /// Snake-case name, for status output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Why::FanOutSurge => "fan_out_surge",
            Why::QualityYellow => "quality_yellow",
            Why::QualityRed => "quality_red",
            Why::Operator => "operator",
        }
    }

    fn from_u8(v: u8) -> Option<Why> {
        [
            Why::FanOutSurge,
            Why::QualityYellow,
            Why::QualityRed,
            Why::Operator,
        ]
        .into_iter()
        .find(|w| *w as u8 == v)
    }
}

/// What a pause or a rating change was measured on, against which threshold (issue 14):
/// counts and thresholds only, never a recipient. Its `Display` is the one-line
/// explanation `businesses status` and the integrity signal show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The fan-out surge test fired (see [`fanout`]).
    FanOut {
        /// Recipients reached for the first time in the same-recipient window, in the
        /// last second, all shards (retries and repeats not counted).
        distinct_per_sec: u32,
        /// The share of them never contacted before, percent.
        new_pct: u32,
        /// The baseline in force, distinct recipients per minute.
        baseline_per_min: u32,
        /// That baseline is the registry's declared one (else the one learned).
        baseline_declared: bool,
        /// The threshold crossed: the larger of `floor_per_sec` and `factor` times the
        /// baseline per second.
        threshold_per_sec: u32,
        /// `surge_distinct_per_sec_min` in force.
        floor_per_sec: u32,
        /// `surge_baseline_factor` in force.
        factor: u32,
        /// The least share of never-contacted recipients in a surge, percent.
        new_pct_min: u32,
    },
    /// The quality rating changed (yellow or red).
    Quality {
        /// Spam reports in the rolling 24 h.
        reports: u32,
        /// Delivered (admitted) messages in the rolling 24 h.
        delivered: u32,
        /// The threshold crossed, reports per million delivered.
        threshold_ppm: u32,
    },
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Evidence::FanOut {
                distinct_per_sec,
                new_pct,
                baseline_per_min,
                baseline_declared,
                threshold_per_sec,
                floor_per_sec,
                factor,
                new_pct_min,
            } => write!(
                f,
                "distinct new recipients {distinct_per_sec}/s over the last 1 s \
                 ({new_pct} % never contacted, at least {new_pct_min} % needed) against \
                 a threshold of {threshold_per_sec}/s: {factor} x the {} baseline of \
                 {:.1}/s ({baseline_per_min}/min), at least {floor_per_sec}/s",
                if baseline_declared {
                    "declared"
                } else {
                    "learned"
                },
                f64::from(baseline_per_min) / 60.0,
            ),
            Evidence::Quality {
                reports,
                delivered,
                threshold_ppm,
            } => write!(
                f,
                "{reports} spam reports on {delivered} delivered messages in 24 h \
                 ({} per million) against a threshold of {threshold_ppm} per million",
                u64::from(reports) * 1_000_000 / u64::from(delivered.max(1)),
            ),
        }
    }
}

/// Integrity signal and billing count of one business: plain data for operators and the
/// platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessSignal {
    /// Business id.
    pub business_id: u32,
    /// Quality rating.
    pub rating: Rating,
    /// Tier in force (after demotions and operator overrides).
    pub tier: Tier,
    /// Paused: every message is rejected with `sender_paused`.
    pub paused: bool,
    /// Why it was raised or why the business is paused.
    pub why: Option<Why>,
    /// What was measured against which threshold, for `why` (none for the operator's
    /// own changes).
    pub evidence: Option<Evidence>,
    /// Accepted messages today (UTC day of `now_ms`), all shards included.
    pub accepted_today: u64,
}

/// Detector counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectStats {
    /// Businesses with state.
    pub businesses: u64,
    /// Messages of businesses turned away because the table was full.
    pub table_full: u64,
    /// Recipient events not exported because a delta was full.
    pub events_dropped: u64,
    /// Signals dropped because nobody polled them.
    pub signals_dropped: u64,
}

/// A recipient this shard admitted a message to, or (issue 14) judged a first attempt
/// to without admitting it: peers record it in their same-recipient tables, so a retry
/// or a repeat arriving on another shard is not a new recipient there either.
#[derive(Debug, Clone, Copy)]
struct Event {
    business: u32,
    /// Admitted (else only attempted).
    admitted: bool,
    /// Counted here as a first attempt for fan-out: a peer that counted it too takes
    /// its own count back (see `FanOut::uncount`).
    counted: bool,
    hash: u64,
    at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct BusinessDelta {
    id: u32,
    demand: u32,
    distinct: u32,
    new: u32,
    delivered: u32,
    reports: u32,
    accepted: u64,
    day: u32,
    caller_limits: (Tier, u32),
    control: Control,
}

/// What one shard tells the others every exchange interval. Holds recipient hashes
/// (keyed), never numbers; `Debug` shows sizes only.
#[derive(Clone, Default)]
pub struct Delta {
    events: Vec<Event>,
    businesses: Vec<BusinessDelta>,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta")
            .field("events", &self.events.len())
            .field("businesses", &self.businesses.len())
            .finish()
    }
}

impl Delta {
    /// True when there is nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.businesses.is_empty()
    }
}

/// u32 keys are business ids: a multiply-shift hash is enough and costs ~1 ns.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Table = HashMap<u32, Box<BusinessState>, BuildHasherDefault<IdHasher>>;

/// Messages whose state lines `observe_batch` loads together before deciding them.
const AHEAD: usize = 8;

/// One shard's detector.
pub struct Detector {
    cfg: DetectConfig,
    hasher: RecipientHasher,
    businesses: Table,
    dirty: Vec<u32>,
    events: Vec<Event>,
    exporting: bool,
    last_export_ms: u64,
    peers_merged: u32,
    signals: VecDeque<BusinessSignal>,
    stats: DetectStats,
    /// `observe_batch`'s recipient hashes, kept between calls (no allocation per batch).
    batch_hashes: Vec<u64>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("cfg", &self.cfg)
            .field("businesses", &self.businesses.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// An empty detector; `secret` keys the recipient hashes (16 random bytes per process;
    /// every shard of one process, and a restore of its checkpoint, must use the same).
    pub fn new(cfg: DetectConfig, secret: [u8; 16]) -> Detector {
        Detector {
            cfg,
            hasher: RecipientHasher::new(secret),
            businesses: Table::default(),
            dirty: Vec::new(),
            events: Vec::new(),
            exporting: false,
            last_export_ms: 0,
            peers_merged: 0,
            signals: VecDeque::new(),
            stats: DetectStats::default(),
            batch_hashes: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Counters for metrics.
    pub fn stats(&self) -> DetectStats {
        DetectStats {
            businesses: self.businesses.len() as u64,
            ..self.stats
        }
    }

    /// Bytes of one business's state (struct and heap), `None` if it has none.
    pub fn business_state_bytes(&self, business_id: u32) -> Option<usize> {
        self.businesses.get(&business_id).map(|s| s.bytes())
    }

    fn mark_dirty(dirty: &mut Vec<u32>, id: u32, st: &mut BusinessState) {
        if !st.dirty {
            st.dirty = true;
            dirty.push(id);
        }
    }

    /// Decides one message.
    #[inline]
    pub fn observe(
        &mut self,
        now_ms: u64,
        business: &BusinessLimits,
        recipient: &Recipient,
    ) -> Verdict {
        if business.exempt {
            return self.observe_exempt(now_ms, business);
        }
        let h = self.hasher.hash(recipient);
        let mut verdict = Verdict::Admit;
        self.decide_hashes(now_ms, business, &[h], &mut |v| verdict = v);
        verdict
    }

    /// Decides the messages of one SUBMIT batch of a business, in order, to `recipients`;
    /// appends one verdict per recipient to `out`. The verdicts are those of
    /// [`observe`](Self::observe) called on each recipient in turn, only cheaper: every
    /// recipient is hashed first, then the state lines of `AHEAD` (8) messages at a time are
    /// loaded together before they are decided, so the cache misses of a business whose
    /// state is not in cache overlap instead of costing one memory latency per message.
    pub fn observe_batch<'a>(
        &mut self,
        now_ms: u64,
        business: &BusinessLimits,
        recipients: impl IntoIterator<Item = &'a Recipient>,
        out: &mut Vec<Verdict>,
    ) {
        if business.exempt {
            // Nothing is judged: no recipient needs hashing.
            for _ in recipients {
                out.push(self.observe_exempt(now_ms, business));
            }
            return;
        }
        let mut hashes = std::mem::take(&mut self.batch_hashes);
        hashes.clear();
        hashes.extend(recipients.into_iter().map(|r| self.hasher.hash(r)));
        out.reserve(hashes.len());
        self.decide_hashes(now_ms, business, &hashes, &mut |v| out.push(v));
        // Kept for its capacity only: no recipient hash stays here between batches.
        hashes.clear();
        self.batch_hashes = hashes;
    }

    /// Decides messages of a non-exempt business by their recipient hashes, in order,
    /// handing each verdict to `verdict`: the one path of [`observe`](Self::observe) and
    /// [`observe_batch`](Self::observe_batch).
    fn decide_hashes(
        &mut self,
        now_ms: u64,
        business: &BusinessLimits,
        hashes: &[u64],
        verdict: &mut impl FnMut(Verdict),
    ) {
        if let Some(st) = get_or_create(
            &mut self.businesses,
            &self.cfg,
            business.id,
            (business.tier, business.mps),
        ) {
            // The table holds the same state for every message of the batch.
            let mut o = Outputs {
                cfg: &self.cfg,
                dirty: &mut self.dirty,
                signals: &mut self.signals,
                stats: &mut self.stats,
                events: &mut self.events,
                exporting: self.exporting,
            };
            let hour = (now_ms / MS_PER_HOUR) as u32;
            for group in hashes.chunks(AHEAD) {
                for &h in group {
                    st.touch(h, hour);
                }
                for &h in group {
                    verdict(decide(st, &mut o, now_ms, business, h));
                }
            }
        } else {
            // Table full: each message is turned away.
            self.stats.table_full += hashes.len() as u64;
            for _ in hashes {
                verdict(Verdict::Throttle {
                    retry_after_ms: 1000,
                });
            }
        }
    }

    /// An exempt business: admitted without checks; its state exists only for billing.
    fn observe_exempt(&mut self, now_ms: u64, business: &BusinessLimits) -> Verdict {
        let cfg = &self.cfg;
        let Some(st) = get_or_create(
            &mut self.businesses,
            cfg,
            business.id,
            (business.tier, business.mps),
        ) else {
            self.stats.table_full += 1;
            return Verdict::Throttle {
                retry_after_ms: 1000,
            };
        };
        st.caller_limits = (business.tier, business.mps);
        st.limits_from_peer = false;
        st.advance(now_ms, cfg);
        Verdict::Admit
    }

    /// Moves every business's state to `now_ms`, so that what it holds of recipients'
    /// numbers (keyed hashes, in the 24 h window, the same-recipient table, the short
    /// fan-out sketches and the past-recipient filter) ages out on time even for a
    /// business that sends nothing more (each of them otherwise moves only with its
    /// business's own traffic). The shell calls it before every [`checkpoint`] and once
    /// after a [`restore`](Self::restore), with its clock: so a
    /// checkpoint holds no recipient hash older than `recipient_memory_ms` (issue 19).
    /// Costs one pass over the businesses; the clearing it does would otherwise happen at
    /// the business's next message.
    ///
    /// [`checkpoint`]: Self::checkpoint
    pub fn expire(&mut self, now_ms: u64) {
        let cfg = &self.cfg;
        for st in self.businesses.values_mut() {
            st.advance(now_ms, cfg);
        }
        // Unsent events: a shell that exchanges deltas takes them every 100 ms; one that
        // stopped exchanging keeps none older than the memory.
        self.events
            .retain(|e| now_ms.saturating_sub(e.at_ms) < cfg.recipient_memory_ms);
    }

    /// Counts `n` accepted (durable) messages of a business for billing.
    pub fn record_accepted(&mut self, now_ms: u64, business_id: u32, n: u64) {
        let cfg = self.cfg.clone();
        let Some(st) = self.businesses.get_mut(&business_id) else {
            return;
        };
        st.advance(now_ms, &cfg);
        st.accepted_today += n;
        st.iv_accepted += n;
        Self::mark_dirty(&mut self.dirty, business_id, st);
    }

    /// Counts `n` spam reports against a business (from a platform-authenticated REPORT
    /// frame); may turn its rating yellow or red and act on red.
    ///
    /// A business this detector has not seen yet (its traffic went to another shard, and
    /// that shard's delta has not arrived) gets state holding just the reports: they go
    /// to the peers with the next delta, and the shards that know its delivered messages
    /// rate it. A rating needs delivered messages in the window; without any it stays.
    pub fn report(&mut self, now_ms: u64, business_id: u32, n: u32) {
        let cfg = self.cfg.clone();
        let created = !self.businesses.contains_key(&business_id);
        let Some(st) = get_or_create(
            &mut self.businesses,
            &cfg,
            business_id,
            (Tier::Unlimited, 1),
        ) else {
            self.stats.table_full += 1;
            return;
        };
        if created {
            st.share_ppm = SHARE_MIN_PPM;
            st.limits_from_peer = true;
        }
        st.advance(now_ms, &cfg);
        st.add_reports(n);
        st.iv_reports += n;
        Self::mark_dirty(&mut self.dirty, business_id, st);
        self.rerate(business_id);
    }

    /// Counts every entry of a REPORT frame against its business.
    pub fn report_entries(&mut self, now_ms: u64, entries: &[ReportEntry]) {
        for e in entries {
            self.report(now_ms, e.business_id, 1);
        }
    }

    fn rerate(&mut self, id: u32) {
        let Some(st) = self.businesses.get_mut(&id) else {
            return;
        };
        let before = st.refresh_rating_with(&self.cfg);
        let after = st.rating;
        if after <= before {
            return;
        }
        let (delivered, reports) = st.quality_window();
        let evidence = Evidence::Quality {
            reports: reports.min(u64::from(u32::MAX)) as u32,
            delivered: delivered.min(u64::from(u32::MAX)) as u32,
            threshold_ppm: if after == Rating::Red {
                self.cfg.rating_red_ppm
            } else {
                self.cfg.rating_yellow_ppm
            },
        };
        match after {
            Rating::Yellow => {}
            // A peer shard already acted on this red episode (its control merged first).
            Rating::Red if st.control.why == Some(Why::QualityRed) => return,
            Rating::Red => {
                let (tier, _) = st.effective();
                if self.cfg.red_pauses || tier == Tier::T250 {
                    if !st.control.paused {
                        st.control.paused = true;
                        st.control.pause_epoch += 1;
                    }
                } else {
                    st.control.demotions += 1;
                }
                st.control.why = Some(Why::QualityRed);
                st.control.evidence = Some(evidence);
            }
            Rating::Green => {}
        }
        let mut sig = signal_of(id, st);
        if after == Rating::Yellow {
            sig.why = Some(Why::QualityYellow);
            sig.evidence = Some(evidence);
        }
        Self::mark_dirty(&mut self.dirty, id, st);
        push_signal(&mut self.signals, &mut self.stats, &self.cfg, sig);
    }

    /// Operator: lifts a pause now. False if the business has no state here.
    pub fn unpause(&mut self, business_id: u32) -> bool {
        let Some(st) = self.businesses.get_mut(&business_id) else {
            return false;
        };
        st.control.paused = false;
        st.control.pause_epoch += 1;
        st.control.why = Some(Why::Operator);
        st.control.evidence = None;
        // Forget the trailing second, so the sender is not re-flagged at once by its own
        // pre-pause traffic; a surge that goes on is flagged again within a second.
        st.fanout.clear();
        Self::mark_dirty(&mut self.dirty, business_id, st);
        true
    }

    /// Operator: sets the tier and rate now, overriding the registry's and clearing
    /// quality demotions.
    pub fn set_limits(&mut self, business_id: u32, tier: Tier, mps: u32) -> bool {
        assert!(mps > 0, "mps must be positive");
        let Some(st) = get_or_create(&mut self.businesses, &self.cfg, business_id, (tier, mps))
        else {
            return false;
        };
        st.control.limits_override = Some((tier, mps));
        st.control.limits_epoch += 1;
        st.control.demotions = 0;
        st.control.why = Some(Why::Operator);
        st.control.evidence = None;
        Self::mark_dirty(&mut self.dirty, business_id, st);
        true
    }

    /// The next queued integrity signal (pauses, rating changes, demotions).
    pub fn poll_signal(&mut self) -> Option<BusinessSignal> {
        self.signals.pop_front()
    }

    /// The current signal of one business.
    pub fn signal(&self, business_id: u32) -> Option<BusinessSignal> {
        self.businesses
            .get(&business_id)
            .map(|s| signal_of(business_id, s))
    }

    /// Current signals of every business, by id (`courier businesses status`).
    pub fn signals(&self) -> Vec<BusinessSignal> {
        let mut v: Vec<_> = self
            .businesses
            .iter()
            .map(|(id, s)| signal_of(*id, s))
            .collect();
        v.sort_by_key(|s| s.business_id);
        v
    }

    /// Unique recipients of a business in the rolling 24 h (estimate above the exact
    /// threshold).
    pub fn recipients_24h(&self, business_id: u32) -> Option<u64> {
        self.businesses
            .get(&business_id)
            .map(|s| s.recipients.count())
    }

    /// Takes what this shard learned since the last call, for every peer, and rebalances
    /// this shard's share of each business's rate. Call every ≤ 100 ms when the process
    /// runs more than one shard, after merging the peers' previous deltas; a single shard
    /// never needs to (and then records no events).
    ///
    /// Shares: over the last interval the business could send `L = mps × interval`
    /// messages. When the shards together wanted fewer, each gets its own demand plus an
    /// equal part of the spare; otherwise each gets its part of the demand. The shares sum
    /// to one, so the admitted rate over all shards stays within `mps` (plus one
    /// second of burst), and a business far below its limit is never throttled by the
    /// split. No share falls below 1/64, so a shard that starts seeing a business can
    /// admit at once and make its demand known.
    pub fn export_delta(&mut self, now_ms: u64) -> Delta {
        self.exporting = true;
        let interval_ms = now_ms.saturating_sub(self.last_export_ms).clamp(1, 1_000);
        self.last_export_ms = now_ms;
        let shards = u64::from(self.peers_merged) + 1;
        self.peers_merged = 0;
        let mut d = Delta {
            events: std::mem::take(&mut self.events),
            businesses: Vec::with_capacity(self.dirty.len()),
        };
        for id in std::mem::take(&mut self.dirty) {
            let Some(st) = self.businesses.get_mut(&id) else {
                continue;
            };
            d.businesses.push(BusinessDelta {
                id,
                demand: st.demand,
                distinct: st.iv_distinct,
                new: st.iv_new,
                delivered: st.iv_delivered,
                reports: st.iv_reports,
                accepted: st.iv_accepted,
                day: st.day,
                caller_limits: st.caller_limits,
                control: st.control,
            });
            st.share_ppm = share_ppm(
                u64::from(st.demand),
                u64::from(st.peer_demand),
                u64::from(st.effective().1) * interval_ms,
                shards,
            );
            st.demand = 0;
            st.peer_demand = 0;
            st.iv_distinct = 0;
            st.iv_new = 0;
            st.iv_delivered = 0;
            st.iv_reports = 0;
            st.iv_accepted = 0;
            st.dirty = false;
        }
        // Businesses quiet here while peers send: own demand 0.
        for st in self.businesses.values_mut() {
            if st.peer_demand > 0 {
                st.share_ppm = share_ppm(
                    0,
                    u64::from(st.peer_demand),
                    u64::from(st.effective().1) * interval_ms,
                    shards,
                );
                st.peer_demand = 0;
            }
        }
        d
    }

    /// Folds a peer shard's delta into this detector.
    pub fn merge(&mut self, now_ms: u64, delta: &Delta) {
        self.exporting = true;
        self.peers_merged = self.peers_merged.saturating_add(1);
        let mut rerate = Vec::new();
        for b in &delta.businesses {
            let cfg = &self.cfg;
            let limits = b.caller_limits;
            let created = !self.businesses.contains_key(&b.id);
            let Some(st) = get_or_create(&mut self.businesses, cfg, b.id, limits) else {
                self.stats.table_full += 1;
                continue;
            };
            if created {
                // Until this shard sees the business itself it holds only the floor share
                // of its rate, and the registry's limits arrive with its first message
                // (until then, the peer's).
                st.share_ppm = SHARE_MIN_PPM;
                st.limits_from_peer = true;
            }
            if st.limits_from_peer {
                st.caller_limits = b.caller_limits;
            }
            st.advance(now_ms, cfg);
            st.peer_demand = st.peer_demand.saturating_add(b.demand);
            st.fanout.add_peer(b.distinct, b.new);
            st.add_delivered(b.delivered);
            st.add_reports(b.reports);
            if b.day == st.day {
                st.accepted_today += b.accepted;
            }
            if b.reports > 0 {
                rerate.push(b.id);
            }
            let c = b.control;
            if c.pause_epoch > st.control.pause_epoch {
                st.control.pause_epoch = c.pause_epoch;
                st.control.paused = c.paused;
                st.control.why = c.why;
                st.control.evidence = c.evidence;
                st.fanout.clear();
            }
            if (c.limits_epoch, c.demotions) > (st.control.limits_epoch, st.control.demotions) {
                st.control.limits_epoch = c.limits_epoch;
                st.control.demotions = c.demotions;
                st.control.limits_override = c.limits_override;
                if !st.control.paused {
                    st.control.why = c.why;
                    st.control.evidence = c.evidence;
                }
            }
        }
        let cfg = &self.cfg;
        for e in &delta.events {
            let Some(st) = self.businesses.get_mut(&e.business) else {
                continue;
            };
            st.advance(now_ms.max(e.at_ms), cfg);
            let window = st.recent.window_of(e.at_ms);
            if e.counted && window.is_some() {
                if let Some((tick, new)) = st.recent.take_counted(e.hash) {
                    // Both shards counted this first attempt: each takes its own back.
                    st.fanout.uncount(tick, new);
                }
            }
            match window {
                Some(false) => {
                    let slot = st.recent.find(e.hash);
                    if e.admitted {
                        st.recent.admit(e.hash, slot);
                    } else {
                        st.recent.attempt(e.hash, slot);
                    }
                }
                // Sent before the window turned here: still in the sliding window.
                Some(true) => st.recent.record_previous(e.hash, e.admitted),
                None => {}
            }
            if !e.admitted {
                continue;
            }
            st.recipients.insert(
                (e.hash >> 32) as u32,
                (e.at_ms / MS_PER_HOUR) as u32,
                cfg.hll_precision,
            );
            st.filter.insert(e.hash, now_ms.max(e.at_ms));
        }
        for id in rerate {
            self.rerate(id);
        }
    }
}

/// The detector's outputs a decision may write, apart from the business's own state.
struct Outputs<'a> {
    cfg: &'a DetectConfig,
    dirty: &'a mut Vec<u32>,
    signals: &'a mut VecDeque<BusinessSignal>,
    stats: &'a mut DetectStats,
    events: &'a mut Vec<Event>,
    exporting: bool,
}

/// Decides one message of a (not exempt) business to the recipient hashed `h`.
#[inline(always)]
fn decide(
    st: &mut BusinessState,
    o: &mut Outputs<'_>,
    now_ms: u64,
    business: &BusinessLimits,
    h: u64,
) -> Verdict {
    let cfg = o.cfg;
    st.caller_limits = (business.tier, business.mps);
    st.limits_from_peer = false;
    st.advance(now_ms, cfg);
    st.demand = st.demand.saturating_add(1);
    Detector::mark_dirty(o.dirty, business.id, st);
    if st.control.paused {
        return Verdict::Reject(Reason::SenderPaused);
    }

    // Fan-out: every first attempt in the window counts (a throttled blast is still a
    // blast); a retry or a repeat finds its recipient's slot and does not (issue 14).
    let slot = st.recent.find(h);
    let counted = slot.is_none();
    let mut new = false;
    if counted {
        new = !st.filter.contains(h);
        st.fanout.add_local(h, new);
        st.iv_distinct += 1;
        st.iv_new += u32::from(new);
        if let Some(evidence) = st.fanout.surge(cfg, now_ms, business.baseline_per_min) {
            st.control.paused = true;
            st.control.pause_epoch += 1;
            st.control.why = Some(Why::FanOutSurge);
            st.control.evidence = Some(evidence);
            st.fanout.clear();
            let sig = signal_of(business.id, st);
            push_signal(o.signals, o.stats, cfg, sig);
            return Verdict::Reject(Reason::SenderPaused);
        }
    }
    let verdict = judge(st, now_ms, cfg, h, slot);
    let slot = if verdict == Verdict::Admit {
        st.iv_delivered += 1;
        push_event(o, business.id, true, counted, h, now_ms);
        admitted(st, cfg, now_ms, h, slot)
    } else {
        if counted {
            // Its peers learn it too, so that its retry on another connection is not a
            // new recipient there (the first attempt only: a retry storm adds nothing).
            push_event(o, business.id, false, true, h, now_ms);
        }
        // Remembered, so that its retry is not a new recipient here.
        st.recent.attempt(h, slot)
    };
    if let (true, Some(slot)) = (counted, slot) {
        st.recent.mark_counted(slot, st.fanout.tick, new);
    }
    verdict
}

/// The same-recipient, tier and rate checks of one message (its recipient's slot in the
/// same-recipient table, if any); takes a rate token when it admits.
#[inline(always)]
fn judge(
    st: &mut BusinessState,
    now_ms: u64,
    cfg: &DetectConfig,
    h: u64,
    slot: Option<recent::Slot>,
) -> Verdict {
    if let Some(slot) = slot {
        if st.recent.at_limit(slot, now_ms, cfg.same_recipient_max) {
            return Verdict::Throttle {
                retry_after_ms: st.recent.retry_ms(now_ms),
            };
        }
    }

    let (tier, mps) = st.effective();
    let tag = (h >> 32) as u32;
    if let Some(limit) = tier.recipients_per_day() {
        let over = st.recipients.count() >= limit;
        if over {
            let known = match st.recipients.member(tag) {
                recipients::Member::Yes => true,
                recipients::Member::No => false,
                // The filter's false positives would let a steady stream of new
                // recipients through; an overdraft of 0.5 % of the limit bounds them
                // (and, once spent, also turns away known ones until the window
                // drops below the limit).
                recipients::Member::Maybe => {
                    st.filter.contains(h) && u64::from(st.overdraft) < limit / 200
                }
            };
            if !known {
                return Verdict::Reject(Reason::MessagingLimitReached);
            }
            if matches!(st.recipients, recipients::Recipients::Sketch(_)) {
                st.overdraft += 1;
            }
        }
    }

    if let Err(retry_after_ms) = st.take_token(now_ms, mps) {
        return Verdict::Throttle { retry_after_ms };
    }
    Verdict::Admit
}

/// Counts an admitted message: same-recipient table, 24 h window, past recipients and
/// rating denominator. Returns its slot in the same-recipient table.
#[inline(always)]
fn admitted(
    st: &mut BusinessState,
    cfg: &DetectConfig,
    now_ms: u64,
    h: u64,
    slot: Option<recent::Slot>,
) -> Option<recent::Slot> {
    st.recipients.insert(
        (h >> 32) as u32,
        (now_ms / MS_PER_HOUR) as u32,
        cfg.hll_precision,
    );
    st.filter.insert(h, now_ms);
    st.add_delivered(1);
    st.recent.admit(h, slot)
}

/// Queues a recipient event for the peers (when exchanging), bounded by
/// `delta_events_max`; past it the event is dropped and counted.
#[inline(always)]
fn push_event(
    o: &mut Outputs<'_>,
    business: u32,
    admitted: bool,
    counted: bool,
    h: u64,
    now_ms: u64,
) {
    if !o.exporting {
        return;
    }
    if o.events.len() < o.cfg.delta_events_max as usize {
        o.events.push(Event {
            business,
            admitted,
            counted,
            hash: h,
            at_ms: now_ms,
        });
    } else {
        o.stats.events_dropped += 1;
    }
}

/// This shard's share of a rate, in ppm: `own` and `peers` messages wanted in the last
/// interval, `allowed_milli` = mps × interval ms (messages × 1000), over `shards`.
fn share_ppm(own: u64, peers: u64, allowed_milli: u64, shards: u64) -> u32 {
    let full = u64::from(SHARE_FULL_PPM);
    let own = own * 1000;
    let want = own + peers * 1000;
    let share = if want == 0 {
        full / shards
    } else if want < allowed_milli {
        let spare = allowed_milli - want;
        (own + spare / shards) * full / allowed_milli
    } else {
        own * full / want
    };
    (share as u32).clamp(SHARE_MIN_PPM, SHARE_FULL_PPM)
}

fn get_or_create<'a>(
    table: &'a mut Table,
    cfg: &DetectConfig,
    id: u32,
    limits: (Tier, u32),
) -> Option<&'a mut BusinessState> {
    let full = table.len() >= cfg.businesses_max as usize;
    match table.entry(id) {
        std::collections::hash_map::Entry::Occupied(e) => Some(&mut **e.into_mut()),
        std::collections::hash_map::Entry::Vacant(_) if full => None,
        std::collections::hash_map::Entry::Vacant(v) => {
            Some(&mut **v.insert(Box::new(BusinessState::new(cfg, limits))))
        }
    }
}

fn signal_of(id: u32, st: &BusinessState) -> BusinessSignal {
    BusinessSignal {
        business_id: id,
        rating: st.rating,
        tier: st.effective().0,
        paused: st.control.paused,
        why: st.control.why,
        evidence: st.control.evidence,
        accepted_today: st.accepted_today,
    }
}

fn push_signal(
    q: &mut VecDeque<BusinessSignal>,
    stats: &mut DetectStats,
    cfg: &DetectConfig,
    s: BusinessSignal,
) {
    if q.len() >= cfg.signals_max as usize {
        q.pop_front();
        stats.signals_dropped += 1;
    }
    q.push_back(s);
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_aging;
