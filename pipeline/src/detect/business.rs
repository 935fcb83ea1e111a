//! One business's detector state: limits, rate bucket, recipient sketches, fan-out
//! baseline, quality rating and billing count. Every field has a fixed size or a bound
//! from [`DetectConfig`](super::DetectConfig); [`BusinessState::bytes`] counts them.

use super::fanout::FanOut;
use super::recent::RecentRecipients;
use super::recipients::{Recipients, HOURS};
use super::sketches::PastFilter;
use super::{DetectConfig, Evidence, Rating, Why};
use crate::registry::Tier;

pub(crate) const MS_PER_HOUR: u64 = 3_600_000;
pub(crate) const MS_PER_DAY: u64 = 86_400_000;
/// A share of the per-business rate is never below 1/64 (see `Detector::export_delta`).
pub(crate) const SHARE_FULL_PPM: u32 = 1_000_000;
pub(crate) const SHARE_MIN_PPM: u32 = SHARE_FULL_PPM / 64;
/// One token, in micro-tokens.
const TOKEN: i64 = 1_000_000;

/// Pause and limits as decided here, by a peer or by the operator; merged by epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Control {
    pub(crate) pause_epoch: u32,
    pub(crate) paused: bool,
    pub(crate) why: Option<Why>,
    pub(crate) limits_epoch: u32,
    pub(crate) demotions: u8,
    pub(crate) limits_override: Option<(Tier, u32)>,
    /// What the last pause or rating change was measured on (issue 14): shown with the
    /// pause, travels and is kept with it.
    pub(crate) evidence: Option<Evidence>,
}

pub(crate) struct BusinessState {
    pub(crate) control: Control,
    /// Limits the caller passed last (from the registry).
    pub(crate) caller_limits: (Tier, u32),
    /// `caller_limits` came from a peer's delta, not from a caller here: a shard that has
    /// not seen the business's traffic takes the registry's limits from its peers.
    pub(crate) limits_from_peer: bool,

    pub(crate) tokens: i64,
    pub(crate) bucket_ms: u64,
    /// The latest time a rate-throttled message was told to come back (issue 14): the
    /// next one is told to come a token later, so a batch throttled at once is not
    /// told, every message of it, to retry when only one token will be there.
    pub(crate) promised_ms: u64,
    pub(crate) share_ppm: u32,
    pub(crate) demand: u32,
    pub(crate) peer_demand: u32,

    pub(crate) hour: u32,
    pub(crate) recipients: Recipients,
    /// Messages admitted at the tier limit to recipients the sketches could only call
    /// "probably known" (sketch mode); capped at 0.5 % of the limit per episode.
    pub(crate) overdraft: u32,
    pub(crate) filter: PastFilter,
    pub(crate) recent: RecentRecipients,
    pub(crate) fanout: FanOut,

    pub(crate) q_hour: [u32; HOURS],
    pub(crate) q_delivered: [u32; HOURS],
    pub(crate) q_reports: [u32; HOURS],
    pub(crate) rating: Rating,

    pub(crate) day: u32,
    pub(crate) accepted_today: u64,

    // Since the last export_delta.
    pub(crate) dirty: bool,
    pub(crate) iv_distinct: u32,
    pub(crate) iv_new: u32,
    pub(crate) iv_delivered: u32,
    pub(crate) iv_reports: u32,
    pub(crate) iv_accepted: u64,
}

impl std::fmt::Debug for BusinessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counters only: sketches hold recipient hashes and are never printed.
        f.debug_struct("BusinessState")
            .field("control", &self.control)
            .field("rating", &self.rating)
            .field("recipients_24h", &self.recipients.count())
            .field("baseline_per_min", &self.fanout.baseline_per_min)
            .field("accepted_today", &self.accepted_today)
            .finish_non_exhaustive()
    }
}

impl BusinessState {
    /// Drops what was built from recipient hashes (the recipient window, the
    /// past-recipient filter, the same-recipient table): used when those hashes were
    /// made with another hash function.
    pub(crate) fn forget_recipient_hashes(&mut self, cfg: &DetectConfig) {
        let fresh = BusinessState::new(cfg, self.caller_limits);
        self.recipients = fresh.recipients;
        self.filter = fresh.filter;
        self.recent = fresh.recent;
    }

    pub(crate) fn new(cfg: &DetectConfig, limits: (Tier, u32)) -> BusinessState {
        BusinessState {
            control: Control {
                pause_epoch: 0,
                paused: false,
                why: None,
                limits_epoch: 0,
                demotions: 0,
                limits_override: None,
                evidence: None,
            },
            caller_limits: limits,
            limits_from_peer: false,
            tokens: i64::from(limits.1) * i64::from(SHARE_FULL_PPM),
            bucket_ms: 0,
            promised_ms: 0,
            share_ppm: SHARE_FULL_PPM,
            demand: 0,
            peer_demand: 0,
            hour: 0,
            recipients: Recipients::new(cfg.exact_recipients_max as usize),
            overdraft: 0,
            filter: PastFilter::new(cfg.past_filter_bytes as usize),
            recent: RecentRecipients::new(
                cfg.same_recipient_table_entries as usize,
                cfg.same_recipient_window_ms,
            ),
            fanout: FanOut::new(),
            q_hour: [u32::MAX; HOURS],
            q_delivered: [0; HOURS],
            q_reports: [0; HOURS],
            rating: Rating::Green,
            day: 0,
            accepted_today: 0,
            dirty: false,
            iv_distinct: 0,
            iv_new: 0,
            iv_delivered: 0,
            iv_reports: 0,
            iv_accepted: 0,
        }
    }

    /// Bytes this business holds: the struct and everything it owns on the heap.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<BusinessState>()
            + self.recipients.heap_bytes()
            + self.filter.heap_bytes()
            + self.recent.heap_bytes()
    }

    /// The tier and rate in force: the operator's override, else the caller's, lowered
    /// by one tier per quality demotion.
    pub(crate) fn effective(&self) -> (Tier, u32) {
        let (mut tier, mps) = self.control.limits_override.unwrap_or(self.caller_limits);
        for _ in 0..self.control.demotions {
            tier = lower(tier);
        }
        (tier, mps)
    }

    /// Reads, up front, every cache line that deciding a message for `h` will touch:
    /// the loads are independent, so their misses overlap instead of queueing one after
    /// another behind the checks' branches (state of a cold business is mostly out of
    /// cache). `black_box` keeps the loads from being sunk to their later uses.
    #[inline(always)]
    pub(crate) fn touch(&self, h: u64, hour: u32) {
        let x = self.recent.touch(h)
            ^ self.filter.touch(h)
            ^ self.fanout.touch(h)
            ^ self.recipients.touch((h >> 32) as u32, hour);
        std::hint::black_box(x);
    }

    /// Moves every clock-driven structure to `now_ms`.
    #[inline]
    pub(crate) fn advance(&mut self, now_ms: u64, cfg: &DetectConfig) {
        let hour = (now_ms / MS_PER_HOUR) as u32;
        if hour > self.hour {
            self.hour = hour;
            self.recipients.advance(hour);
            self.refresh_rating_with(cfg);
            let (tier, _) = self.effective();
            if tier
                .recipients_per_day()
                .is_none_or(|limit| self.recipients.count() < limit)
            {
                self.overdraft = 0; // the episode at the limit is over
            }
        }
        if cfg.recipient_memory_ms < MS_PER_DAY {
            // A retention shorter than the 24 h window (issue 19): the tags of every hour
            // that is as old as the retention go (their counts stay). The hour holding
            // `now - memory` may hold a tag that old, so it goes too.
            if let Some(t) = now_ms.checked_sub(cfg.recipient_memory_ms) {
                self.recipients.forget_before(
                    (t / MS_PER_HOUR).saturating_add(1).min(u64::from(u32::MAX)) as u32,
                );
            }
        }
        self.recent.advance(now_ms);
        self.fanout.advance(now_ms, cfg);
        self.filter.age(now_ms, cfg.recipient_memory_ms);
        let day = (now_ms / MS_PER_DAY) as u32;
        if day > self.day {
            self.day = day;
            self.accepted_today = 0;
        }
    }

    /// Takes one message's token; `Err(retry_after_ms)` when the bucket is empty.
    #[inline]
    pub(crate) fn take_token(&mut self, now_ms: u64, mps: u32) -> Result<(), u32> {
        // micro-tokens per ms: mps tokens/s * share
        let rate = (i64::from(mps) * i64::from(self.share_ppm) / 1000).max(1);
        let cap = (i64::from(mps) * i64::from(self.share_ppm)).max(TOKEN);
        let elapsed = now_ms.saturating_sub(self.bucket_ms).min(3_600_000) as i64;
        self.bucket_ms = self.bucket_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        if self.tokens >= TOKEN {
            self.tokens -= TOKEN;
            Ok(())
        } else {
            // The first message throttled waits for the next token; each one throttled
            // while earlier ones still wait is told to come a token after the last one
            // told, up to the time the bucket is full again (a client coming back later
            // finds no more tokens than that). So a client that resends a throttled
            // batch after its largest retry-after finds tokens for all of it, or a full
            // bucket, instead of one token and another round per message (issue 14).
            let first_ms = ((TOKEN - self.tokens + rate - 1) / rate).max(1) as u64;
            let token_ms = ((TOKEN + rate - 1) / rate).max(1) as u64;
            let full_ms = ((cap - self.tokens + rate - 1) / rate).max(1) as u64;
            let mut at = now_ms + first_ms;
            if self.promised_ms >= at {
                at = self.promised_ms + token_ms;
            }
            at = at.min(now_ms + full_ms.max(first_ms));
            self.promised_ms = at;
            debug_assert!(at > now_ms);
            Err((at - now_ms).min(u64::from(u32::MAX)) as u32)
        }
    }

    fn q_slot(&mut self, hour: u32) -> Option<usize> {
        if u64::from(hour) + HOURS as u64 <= u64::from(self.hour) {
            return None;
        }
        let s = (hour % HOURS as u32) as usize;
        if self.q_hour[s] != hour {
            if self.q_hour[s] != u32::MAX && self.q_hour[s] > hour {
                return None;
            }
            self.q_hour[s] = hour;
            self.q_delivered[s] = 0;
            self.q_reports[s] = 0;
        }
        Some(s)
    }

    pub(crate) fn add_delivered(&mut self, n: u32) {
        if let Some(s) = self.q_slot(self.hour) {
            self.q_delivered[s] = self.q_delivered[s].saturating_add(n);
        }
    }

    pub(crate) fn add_reports(&mut self, n: u32) {
        if let Some(s) = self.q_slot(self.hour) {
            self.q_reports[s] = self.q_reports[s].saturating_add(n);
        }
    }

    /// Reports and delivered messages in the rolling 24 hours.
    pub(crate) fn quality_window(&self) -> (u64, u64) {
        let mut d = 0u64;
        let mut r = 0u64;
        for s in 0..HOURS {
            let h = self.q_hour[s];
            if h != u32::MAX && u64::from(h) + HOURS as u64 > u64::from(self.hour) {
                d += u64::from(self.q_delivered[s]);
                r += u64::from(self.q_reports[s]);
            }
        }
        (d, r)
    }

    /// Recomputes the rating; returns the previous one.
    pub(crate) fn refresh_rating_with(&mut self, cfg: &DetectConfig) -> Rating {
        let before = self.rating;
        let (d, r) = self.quality_window();
        if d == 0 {
            // Nothing delivered in the window (here): no basis for a rating.
            return before;
        }
        self.rating = if r < u64::from(cfg.rating_reports_min) {
            Rating::Green
        } else {
            let ppm = r * 1_000_000 / d.max(1);
            if ppm >= u64::from(cfg.rating_red_ppm) {
                Rating::Red
            } else if ppm >= u64::from(cfg.rating_yellow_ppm) {
                Rating::Yellow
            } else {
                Rating::Green
            }
        };
        before
    }
}

/// The next tier down; the lowest stays.
pub(crate) fn lower(t: Tier) -> Tier {
    match t {
        Tier::Unlimited => Tier::T100k,
        Tier::T100k => Tier::T10k,
        Tier::T10k => Tier::T2k,
        Tier::T2k | Tier::T250 => Tier::T250,
    }
}
