//! The log's decisions that depend on time and size: when a segment rolls and which
//! segments retention drops. Pure functions of their arguments.
//!
//! Invariant: no record is readable more than `retention_ms` (plus one retention step,
//! a second while serving) after it was accepted, because a segment is dropped whole once
//! its *oldest* record (or its creation, whichever is earlier) reaches the retention. The
//! other records of a segment go early, by at most the segment's age when it rolled
//! (`segment_age_max_ms`, which the profile holds at or below `retention_ms / 30`: one day
//! of 30 by default).
//!
//! Why the oldest and not the newest record: deletion is by whole segment (the key is the
//! segment's), so one of the two ends of a segment must be early or late. Dropping at the
//! newest record kept the oldest one a whole roll interval past the retention (31 days of
//! a promised 30); the promise is a maximum age, so the segment goes when its oldest record
//! reaches it, and the newer ones go up to one roll interval early.

use super::format::{sealed_bytes_max, RECORD_OVERHEAD_BYTES_MAX};
use super::LogSettings;
use crate::wire::PAYLOAD_BYTES_LIMIT;

/// Room left in a record's payload for the sealing layer (nonce, tag, key id) on top of the
/// client's payload bound.
pub const SEAL_OVERHEAD_BYTES_MAX: u32 = 64;
/// The largest record payload (a sealed message) of a log written under any profile: the
/// bound the operator tools read every log with.
pub const RECORD_PAYLOAD_BYTES_LIMIT: u32 = PAYLOAD_BYTES_LIMIT + SEAL_OVERHEAD_BYTES_MAX;

// The sealer's own overhead (nonce and tag) fits the room the log keeps for it.
const _: () = assert!(crate::seal::SEAL_OVERHEAD_BYTES <= SEAL_OVERHEAD_BYTES_MAX as usize);
/// Most segments one retention step drops, so that one step's work is bounded.
pub const DROPS_PER_STEP_MAX: usize = 16;

/// Bytes one record takes at most on disk when it holds a client payload of
/// `payload_bytes`, sealed: the one formula for the profile's checks and [`LogConfig`].
pub const fn record_bytes_for_payload(payload_bytes: u32) -> u64 {
    RECORD_OVERHEAD_BYTES_MAX as u64 + payload_bytes as u64 + SEAL_OVERHEAD_BYTES_MAX as u64
}

// The largest record's `len` field fits its 32 bits.
const _: () = assert!(sealed_bytes_max(RECORD_PAYLOAD_BYTES_LIMIT) <= u32::MAX as usize);

/// The log's bounds, from the profile's `[log]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// A segment rolls once it is this old, ms.
    pub segment_age_max_ms: u64,
    /// A segment is dropped once its oldest record is this old, ms.
    pub retention_ms: u64,
    /// Most records one fdatasync covers.
    pub group_commit_records_max: u32,
    /// Most record bytes one fdatasync covers.
    pub group_commit_bytes_max: u64,
    /// Largest record payload (the sealed message), bytes.
    pub payload_bytes_max: u32,
    /// Most segments one retention step drops.
    pub drops_per_step_max: usize,
}

impl LogConfig {
    /// The log's configuration from its validated `[log]` section, for client payloads of
    /// at most `payload_bytes_max` (the profile's `limits.payload_bytes_max`).
    pub fn new(settings: &LogSettings, payload_bytes_max: u32) -> LogConfig {
        LogConfig {
            segment_bytes_max: settings.segment_bytes_max,
            segment_age_max_ms: settings.segment_age_max_secs * 1000,
            retention_ms: settings.retention_secs * 1000,
            group_commit_records_max: settings.group_commit_records_max,
            group_commit_bytes_max: settings.group_commit_bytes_max,
            payload_bytes_max: payload_bytes_max + SEAL_OVERHEAD_BYTES_MAX,
            drops_per_step_max: DROPS_PER_STEP_MAX,
        }
    }

    /// Bytes one record takes at most on disk.
    pub fn record_bytes_max(&self) -> u64 {
        RECORD_OVERHEAD_BYTES_MAX as u64 + u64::from(self.payload_bytes_max)
    }
}

/// Why a segment rolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollReason {
    /// Appending would pass `segment_bytes_max`.
    Size,
    /// The segment is `segment_age_max_ms` old.
    Age,
    /// The segment has as many records as a record index can count.
    Records,
}

/// Whether a segment of `bytes` bytes and `records` records, created at `created_ms`,
/// must roll before a record of `next_record_bytes` is appended at `now_ms`.
pub fn roll_due(
    cfg: &LogConfig,
    bytes: u64,
    records: u32,
    created_ms: u64,
    now_ms: u64,
    next_record_bytes: u64,
) -> Option<RollReason> {
    if records == u32::MAX {
        Some(RollReason::Records)
    } else if records > 0 && bytes + next_record_bytes > cfg.segment_bytes_max {
        Some(RollReason::Size)
    } else if now_ms.saturating_sub(created_ms) >= cfg.segment_age_max_ms {
        Some(RollReason::Age)
    } else {
        None
    }
}

/// Since when a segment's records count for retention: its oldest record's time, or its
/// creation when that is earlier (records are appended after the segment was created, so
/// the two agree unless the wall clock went back; the earlier one never keeps a record too
/// long). A segment without records counts from its creation.
pub fn retained_since_ms(created_ms: u64, oldest_ms: Option<u64>) -> u64 {
    oldest_ms.map_or(created_ms, |o| o.min(created_ms))
}

/// Whether a segment whose records count from `since_ms` (see [`retained_since_ms`]) has
/// reached retention at `now_ms`: its oldest record is `retention_ms` old.
pub fn expired(cfg: &LogConfig, since_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(since_ms) >= cfg.retention_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes_max: 1000,
            segment_age_max_ms: 100,
            retention_ms: 3000,
            group_commit_records_max: 10,
            group_commit_bytes_max: 10_000,
            payload_bytes_max: 100,
            drops_per_step_max: 4,
        }
    }

    #[test]
    fn rolls_at_size_or_age() {
        let c = cfg();
        assert_eq!(roll_due(&c, 900, 3, 0, 50, 100), None);
        assert_eq!(roll_due(&c, 901, 3, 0, 50, 100), Some(RollReason::Size));
        // An empty segment takes one record however large.
        assert_eq!(roll_due(&c, 44, 0, 0, 50, 5000), None);
        assert_eq!(roll_due(&c, 100, 3, 0, 100, 1), Some(RollReason::Age));
        assert_eq!(roll_due(&c, 100, 3, 0, 99, 1), None);
    }

    #[test]
    fn config_from_the_default_profile() {
        let c = {
            let p = crate::profile::Profile::default_profile();
            LogConfig::new(&p.log, p.limits.payload_bytes_max)
        };
        assert_eq!(c.retention_ms, 30 * 86_400_000);
        assert_eq!(c.segment_age_max_ms, c.retention_ms / 30);
        assert_eq!(c.segment_bytes_max, 256 << 20);
        assert_eq!(c.payload_bytes_max, 65_536 + SEAL_OVERHEAD_BYTES_MAX);
        assert!(c.record_bytes_max() < c.group_commit_bytes_max);
    }

    /// Issue 19: segments were dropped once their newest record passed the retention, so
    /// the oldest record of a segment was kept up to one roll interval longer (31 days).
    #[test]
    fn expiry_is_when_the_oldest_record_reaches_retention() {
        let c = cfg();
        assert!(!expired(&c, 1000, 3999));
        assert!(expired(&c, 1000, 4000));
        assert_eq!(retained_since_ms(500, Some(700)), 500);
        assert_eq!(
            retained_since_ms(500, Some(400)),
            400,
            "a clock that went back"
        );
        assert_eq!(retained_since_ms(500, None), 500);
    }
}
