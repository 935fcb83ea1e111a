//! The detector's configuration: the profile's `[detect]` section as it is written, the
//! bounds each key keeps (checked when a profile loads, every broken key named) and the
//! key that profiles written before issue 14 still use.

use serde::Deserialize;

use super::business::BusinessState;
use super::{recent, recipients};
use crate::profile::Checker;

/// Most bytes one business's state may take (issue 5): the ceiling of
/// `detect.business_state_bytes_max`.
pub const BUSINESS_STATE_BYTES_LIMIT: usize = 64 << 10;
/// Fewest HyperLogLog registers per hourly sketch, as a precision (2^8).
pub const HLL_PRECISION_MIN: u8 = 8;
/// Most HyperLogLog registers per hourly sketch, as a precision (2^12).
pub const HLL_PRECISION_MAX: u8 = 12;
/// Fewest slots of the same-recipient table: 8 slots make one bucket; 32 is what the
/// older sketch width's least value converts to.
pub const SAME_RECIPIENT_TABLE_ENTRIES_MIN: u32 = 32;
/// Most slots of the same-recipient table: 8192 slots are 64 KiB, the whole
/// per-business bound.
pub const SAME_RECIPIENT_TABLE_ENTRIES_MAX: u32 = 8192;
/// Bounds of the count-min sketch width that the same-recipient table replaced (issue 14),
/// as its profile key and its checkpoints held it.
pub const SKETCH_WIDTH_MIN: u32 = 64;
/// See [`SKETCH_WIDTH_MIN`].
pub const SKETCH_WIDTH_MAX: u32 = 8192;

const _: () = assert!(
    recent::RecentRecipients::heap_bytes_for(SAME_RECIPIENT_TABLE_ENTRIES_MAX as usize)
        <= BUSINESS_STATE_BYTES_LIMIT
);
const _: () = assert!(SKETCH_WIDTH_MIN / 2 == SAME_RECIPIENT_TABLE_ENTRIES_MIN);
const _: () = assert!(SKETCH_WIDTH_MAX / 2 <= SAME_RECIPIENT_TABLE_ENTRIES_MAX);

/// `[detect]`: the detector's bounds and thresholds. Deserialized from the profile as it
/// is (unknown keys refused); [`crate::profile::Profile`] holds it only once
/// [`DetectConfig::validate`] found nothing wrong.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Most businesses one detector (shard) holds state for.
    pub businesses_max: u32,
    /// Ceiling on one business's state, bytes, at most [`BUSINESS_STATE_BYTES_LIMIT`]:
    /// the sizes below must need no more ([`DetectConfig::business_state_bytes_needed`]).
    pub business_state_bytes_max: u32,
    /// HyperLogLog precision p (2^p one-byte registers per hourly sketch).
    pub hll_precision: u8,
    /// Distinct recipients per 24 h counted exactly before switching to the sketches.
    pub exact_recipients_max: u32,
    /// Bytes of the past-recipient filter (both generations), power of two.
    pub past_filter_bytes: u32,
    /// Most messages to one recipient in the sliding window.
    pub same_recipient_max: u32,
    /// Length of the same-recipient window, ms.
    pub same_recipient_window_ms: u32,
    /// Slots of the same-recipient table (recipients of the window), power of two,
    /// at least 8 (8 bytes each).
    pub same_recipient_table_entries: u32,
    /// Fewest distinct recipients in one second that can be a surge.
    pub surge_distinct_per_sec_min: u32,
    /// A surge is this many times the business's baseline rate of distinct recipients.
    pub surge_baseline_factor: u32,
    /// Least share of never-contacted recipients in a surge, percent.
    pub surge_new_share_pct: u32,
    /// EWMA weight of the latest minute in the baseline, percent.
    pub baseline_alpha_pct: u32,
    /// Reports per million delivered messages (24 h) from which the rating is yellow.
    pub rating_yellow_ppm: u32,
    /// Reports per million delivered messages (24 h) from which the rating is red.
    pub rating_red_ppm: u32,
    /// Fewest reports in 24 h before the rating can leave green.
    pub rating_reports_min: u32,
    /// Red pauses the business instead of lowering its tier.
    pub red_pauses: bool,
    /// Most recipient events one delta carries; more are dropped (and counted).
    pub delta_events_max: u32,
    /// Most integrity signals queued for `poll_signal`; older ones are dropped.
    pub signals_max: u32,
    /// How long the detector may remember a recipient, ms (issue 19): the log's
    /// retention, which the profile sets here from `log.retention_secs` (not a key of
    /// `[detect]`: a profile giving it is refused as an unknown key). Keyed hashes of
    /// numbers may not outlive the messages they were taken from: the past-recipient
    /// filter forgets a recipient within it (see `sketches::PastFilter`), every other
    /// structure within its own, shorter window (24 h, the same-recipient window, one
    /// second).
    #[serde(skip, default = "default_recipient_memory_ms")]
    pub recipient_memory_ms: u64,
}

/// The default profile's retention, 30 days, as ms.
pub const RECIPIENT_MEMORY_MS_DEFAULT: u64 = 30 * 86_400_000;

fn default_recipient_memory_ms() -> u64 {
    RECIPIENT_MEMORY_MS_DEFAULT
}

impl Default for DetectConfig {
    fn default() -> DetectConfig {
        DetectConfig {
            businesses_max: 4096,
            business_state_bytes_max: BUSINESS_STATE_BYTES_LIMIT as u32,
            hll_precision: 11,
            exact_recipients_max: 2048,
            past_filter_bytes: 8192,
            same_recipient_max: 5,
            same_recipient_window_ms: 10_000,
            same_recipient_table_entries: 512,
            surge_distinct_per_sec_min: 50,
            surge_baseline_factor: 5,
            surge_new_share_pct: 80,
            baseline_alpha_pct: 10,
            rating_yellow_ppm: 2_000,
            rating_red_ppm: 10_000,
            rating_reports_min: 10,
            red_pauses: false,
            delta_events_max: 65_536,
            signals_max: 4096,
            recipient_memory_ms: RECIPIENT_MEMORY_MS_DEFAULT,
        }
    }
}

impl DetectConfig {
    /// Sets [`recipient_memory_ms`](Self::recipient_memory_ms) from the log's retention
    /// (at least 2 ms, so that a generation of the filter lasts at least 1 ms).
    pub fn remember_recipients_for(&mut self, retention_secs: u64) {
        self.recipient_memory_ms = retention_secs.saturating_mul(1000).max(2);
    }

    /// Worst-case bytes of one business's state under this configuration: the struct,
    /// the larger of the exact table and the sketch ring, the filter and the
    /// same-recipient table.
    pub fn business_state_bytes_needed(&self) -> usize {
        std::mem::size_of::<BusinessState>()
            + recipients::ExactSet::heap_bytes_for(self.exact_recipients_max as usize).max(
                std::mem::size_of::<recipients::HllRing>()
                    + recipients::HllRing::heap_bytes_for(self.hll_precision),
            )
            + self.past_filter_bytes as usize
            + recent::RecentRecipients::heap_bytes_for(self.same_recipient_table_entries as usize)
    }

    /// Worst-case bytes of a whole detector's business state.
    pub fn state_bytes_max(&self) -> usize {
        self.businesses_max as usize * self.business_state_bytes_needed()
    }

    /// Checks every key of `[detect]`, naming each broken one.
    pub(crate) fn validate(&self, c: &mut Checker) {
        c.range("detect.businesses_max", self.businesses_max, 1, 1 << 20);
        c.range(
            "detect.business_state_bytes_max",
            self.business_state_bytes_max,
            4096,
            BUSINESS_STATE_BYTES_LIMIT as u32,
        );
        c.range(
            "detect.hll_precision",
            self.hll_precision,
            HLL_PRECISION_MIN,
            HLL_PRECISION_MAX,
        );
        c.range(
            "detect.exact_recipients_max",
            self.exact_recipients_max,
            16,
            8192,
        );
        c.range(
            "detect.past_filter_bytes",
            self.past_filter_bytes,
            1024,
            32768,
        );
        c.pow2("detect.past_filter_bytes", self.past_filter_bytes);
        c.range("detect.same_recipient_max", self.same_recipient_max, 1, 250);
        c.range(
            "detect.same_recipient_window_ms",
            self.same_recipient_window_ms,
            100,
            3_600_000,
        );
        c.range(
            "detect.same_recipient_table_entries",
            self.same_recipient_table_entries,
            SAME_RECIPIENT_TABLE_ENTRIES_MIN,
            SAME_RECIPIENT_TABLE_ENTRIES_MAX,
        );
        c.pow2(
            "detect.same_recipient_table_entries",
            self.same_recipient_table_entries,
        );
        self.validate_thresholds(c);
        self.validate_state_bytes(c);
    }

    /// The surge, rating and queue keys.
    fn validate_thresholds(&self, c: &mut Checker) {
        c.range(
            "detect.surge_distinct_per_sec_min",
            self.surge_distinct_per_sec_min,
            1,
            1_000_000,
        );
        c.range(
            "detect.surge_baseline_factor",
            self.surge_baseline_factor,
            1,
            1000,
        );
        c.range(
            "detect.surge_new_share_pct",
            self.surge_new_share_pct,
            0,
            100,
        );
        c.range("detect.baseline_alpha_pct", self.baseline_alpha_pct, 1, 100);
        c.range(
            "detect.rating_yellow_ppm",
            self.rating_yellow_ppm,
            1,
            1_000_000,
        );
        c.range("detect.rating_red_ppm", self.rating_red_ppm, 1, 1_000_000);
        if self.rating_red_ppm <= self.rating_yellow_ppm {
            c.fail(
                "detect.rating_red_ppm",
                "must be above detect.rating_yellow_ppm".into(),
            );
        }
        c.range(
            "detect.rating_reports_min",
            self.rating_reports_min,
            1,
            1_000_000,
        );
        c.range("detect.delta_events_max", self.delta_events_max, 1, 1 << 24);
        c.range("detect.signals_max", self.signals_max, 1, 1 << 20);
    }

    /// The sizes must fit the declared ceiling. Only judged when the sizes themselves are
    /// well formed (their own keys report them otherwise).
    fn validate_state_bytes(&self, c: &mut Checker) {
        let sizes_valid = (HLL_PRECISION_MIN..=HLL_PRECISION_MAX).contains(&self.hll_precision)
            && self.past_filter_bytes.is_power_of_two()
            && self.same_recipient_table_entries.is_power_of_two()
            && self.same_recipient_table_entries >= 8;
        if !sizes_valid {
            return;
        }
        let need = self.business_state_bytes_needed();
        if need > self.business_state_bytes_max as usize {
            c.fail(
                "detect.business_state_bytes_max",
                format!(
                    "{} is below the {need} bytes that hll_precision, exact_recipients_max, \
                     past_filter_bytes and same_recipient_table_entries need per business",
                    self.business_state_bytes_max
                ),
            );
        }
    }
}

/// Keys of `[detect]` that profiles written before issue 14 hold, read as today's keys.
///
/// `same_recipient_sketch_width = W` (counters per row of the count-min sketch, `4 W`
/// bytes) loads as `same_recipient_table_entries = W / 2` (8 bytes per slot: the same
/// bytes), so that an operator's profile keeps loading; giving both keys is an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegacyDetectKeys {
    /// The older key's value, when the profile gave it.
    sketch_width: Option<u32>,
    /// The profile gave the older key and today's.
    both: bool,
}

impl LegacyDetectKeys {
    const SKETCH_WIDTH: &'static str = "same_recipient_sketch_width";
    const TABLE_ENTRIES: &'static str = "same_recipient_table_entries";

    /// Takes the older keys out of a `[detect]` table before it is deserialized, writing
    /// what they mean into today's keys. Errs (naming the key) when the older key does
    /// not hold a `u32`.
    pub fn take(detect: &mut toml::Table) -> Result<LegacyDetectKeys, String> {
        let Some(value) = detect.remove(Self::SKETCH_WIDTH) else {
            return Ok(LegacyDetectKeys::default());
        };
        let width = value
            .as_integer()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| format!("detect.{}: {value} is not a u32", Self::SKETCH_WIDTH))?;
        let both = detect.contains_key(Self::TABLE_ENTRIES);
        if !both {
            detect.insert(
                Self::TABLE_ENTRIES.into(),
                toml::Value::Integer(i64::from(width / 2)),
            );
        }
        Ok(LegacyDetectKeys {
            sketch_width: Some(width),
            both,
        })
    }

    /// Checks the older keys by their own bounds (today's key they became is checked by
    /// [`DetectConfig::validate`]).
    pub(crate) fn validate(&self, c: &mut Checker) {
        const KEY: &str = "detect.same_recipient_sketch_width";
        let Some(width) = self.sketch_width else {
            return;
        };
        if self.both {
            c.fail(
                KEY,
                "give same_recipient_table_entries only (the width is its older form)".into(),
            );
            return;
        }
        c.range(KEY, width, SKETCH_WIDTH_MIN, SKETCH_WIDTH_MAX);
        c.pow2(KEY, width);
    }
}
