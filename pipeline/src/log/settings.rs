//! `[log]`: when segments roll and expire, and how much one group commit covers, as the
//! profile writes it, with the bounds of each key. Checked against the log's own bounds
//! (record and seal overheads) and against `[limits]`, whose batches it must hold;
//! [`super::LogConfig::new`] turns it into the log's working units.

use serde::Deserialize;

use super::format::RECORD_OVERHEAD_BYTES;
use super::policy::{record_bytes_for_payload, SEAL_OVERHEAD_BYTES_MAX};
use crate::profile::Checker;
use crate::server::Limits;

/// Smallest `log.segment_bytes_max`.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest `log.segment_bytes_max`.
pub const SEGMENT_BYTES_MAX: u64 = 4 << 30;
/// Shortest `log.retention_secs`: a minute.
pub const RETENTION_SECS_MIN: u64 = 60;
/// Longest `log.retention_secs`: ten years (only with `allow_retention_over_30_days`).
pub const RETENTION_SECS_MAX: u64 = 10 * 366 * 86_400;
/// Longest `log.retention_secs` without `allow_retention_over_30_days`: the 30 days the
/// platform promises.
pub const RETENTION_SECS_PROMISED: u64 = 30 * 86_400;
/// `log.segment_age_max_secs` is at most `retention_secs / SEGMENTS_PER_RETENTION_MIN`, so
/// that the records a whole-segment drop takes early are at most a thirtieth of the
/// retention young (policy.rs).
pub const SEGMENTS_PER_RETENTION_MIN: u64 = 30;
/// Most records one group commit may cover.
pub const GROUP_COMMIT_RECORDS_MAX: u32 = 1 << 20;
/// Smallest `log.group_commit_bytes_max`.
pub const GROUP_COMMIT_BYTES_MIN: u64 = 64 << 10;
/// Largest `log.group_commit_bytes_max`.
pub const GROUP_COMMIT_BYTES_MAX: u64 = 1 << 30;
/// Largest `log.disk_reserve_bytes`: 1 TiB.
pub const DISK_RESERVE_BYTES_MAX: u64 = 1 << 40;

// A segment of the largest size holds a group commit of the largest size.
const _: () = assert!(GROUP_COMMIT_BYTES_MAX <= SEGMENT_BYTES_MAX);
// The largest segment holds two records of the widest payload any profile allows, so
// `limits.payload_bytes_max` never rules out every segment size.
const _: () =
    assert!(SEGMENT_BYTES_MAX >= 2 * record_bytes_for_payload(crate::wire::PAYLOAD_BYTES_LIMIT));

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// A segment rolls once it is this old, seconds.
    pub segment_age_max_secs: u64,
    /// A segment is dropped with its key once its oldest record is this old, seconds; at
    /// most 30 days unless `allow_retention_over_30_days`.
    pub retention_secs: u64,
    /// Allows a `retention_secs` above 30 days (the platform's promise). Optional, false
    /// when absent.
    #[serde(default)]
    pub allow_retention_over_30_days: bool,
    /// Most records one fdatasync covers.
    pub group_commit_records_max: u32,
    /// Most record bytes one fdatasync covers.
    pub group_commit_bytes_max: u64,
    /// Free space the log's file system keeps: below it, new batches and users' replies
    /// are answered `throttled` before a write could meet a full disk, and serving
    /// resumes by itself once space returns. 0: no reserve (a full disk then fails the
    /// shard's log for good, as a failed write does).
    pub disk_reserve_bytes: u64,
    /// Write commits with `O_DIRECT`, past the page cache (the shell falls back to the
    /// page cache where the file system refuses it). Optional, true when absent.
    #[serde(default = "direct_io_default")]
    pub direct_io: bool,
    /// With direct I/O, bytes of zeros kept written ahead of the open segment's records,
    /// so that commits overwrite blocks already allocated instead of appending (cheaper
    /// and quicker on file systems that overwrite in place, such as ext4 and XFS); 0
    /// writes none. A multiple of [`DIRECT_IO_BLOCK_BYTES`] (4096), at most 256 MiB.
    /// Optional, 2 MiB when absent.
    #[serde(default = "prepare_ahead_bytes_default")]
    pub prepare_ahead_bytes: u64,
}

fn direct_io_default() -> bool {
    true
}

/// Largest `log.prepare_ahead_bytes`.
pub const PREPARE_AHEAD_BYTES_MAX: u64 = 256 << 20;

/// The alignment of direct I/O log writes: in memory, file offset and length (the shell
/// opens segments with `O_DIRECT` and writes in it). A multiple of every logical block
/// size in use (512 and 4096 bytes); `log.prepare_ahead_bytes` is a multiple of it.
pub const DIRECT_IO_BLOCK_BYTES: u64 = 4096;

fn prepare_ahead_bytes_default() -> u64 {
    2 << 20
}

impl LogSettings {
    /// Checks every key of `[log]`, naming each broken one; a segment must hold two
    /// records, and a group commit one full SUBMIT, of `limits`.
    pub(crate) fn validate(&self, limits: &Limits, c: &mut Checker) {
        c.range(
            "log.segment_bytes_max",
            self.segment_bytes_max,
            SEGMENT_BYTES_MIN,
            SEGMENT_BYTES_MAX,
        );
        let record_bytes = record_bytes_for_payload(limits.payload_bytes_max);
        if self.segment_bytes_max < 2 * record_bytes {
            c.fail(
                "log.segment_bytes_max",
                format!(
                    "{} cannot hold two records of limits.payload_bytes_max ({record_bytes} bytes each)",
                    self.segment_bytes_max
                ),
            );
        }
        c.range(
            "log.retention_secs",
            self.retention_secs,
            RETENTION_SECS_MIN,
            RETENTION_SECS_MAX,
        );
        if self.retention_secs > RETENTION_SECS_PROMISED && !self.allow_retention_over_30_days {
            c.fail(
                "log.retention_secs",
                format!(
                    "{} is above 30 days ({RETENTION_SECS_PROMISED}), the most the platform \
                     promises to keep a message; set log.allow_retention_over_30_days = true \
                     to keep data longer",
                    self.retention_secs
                ),
            );
        }
        let age_max = (self.retention_secs / SEGMENTS_PER_RETENTION_MIN).max(1);
        if !(1..=age_max).contains(&self.segment_age_max_secs) {
            c.fail(
                "log.segment_age_max_secs",
                format!(
                    "{} is outside 1..={age_max} (log.retention_secs / \
                     {SEGMENTS_PER_RETENTION_MIN}): retention drops whole segments, so a \
                     segment's newer records go up to its age early",
                    self.segment_age_max_secs
                ),
            );
        }
        self.validate_group_commit(limits, c);
        c.range(
            "log.disk_reserve_bytes",
            self.disk_reserve_bytes,
            0,
            DISK_RESERVE_BYTES_MAX,
        );
        c.range(
            "log.prepare_ahead_bytes",
            self.prepare_ahead_bytes,
            0,
            PREPARE_AHEAD_BYTES_MAX,
        );
        if !self
            .prepare_ahead_bytes
            .is_multiple_of(DIRECT_IO_BLOCK_BYTES)
        {
            c.fail(
                "log.prepare_ahead_bytes",
                format!(
                    "{} is not a multiple of {DIRECT_IO_BLOCK_BYTES} (direct I/O writes whole blocks)",
                    self.prepare_ahead_bytes
                ),
            );
        }
    }

    /// One SUBMIT must fit one group commit, in records and in bytes.
    fn validate_group_commit(&self, limits: &Limits, c: &mut Checker) {
        c.range(
            "log.group_commit_records_max",
            self.group_commit_records_max,
            1,
            GROUP_COMMIT_RECORDS_MAX,
        );
        if self.group_commit_records_max < limits.batch_messages_max {
            c.fail(
                "log.group_commit_records_max",
                format!(
                    "{} is below limits.batch_messages_max ({}): one SUBMIT must fit in a group commit",
                    self.group_commit_records_max, limits.batch_messages_max
                ),
            );
        }
        c.range(
            "log.group_commit_bytes_max",
            self.group_commit_bytes_max,
            GROUP_COMMIT_BYTES_MIN,
            GROUP_COMMIT_BYTES_MAX,
        );
        // A full SUBMIT as records: its frame bytes plus the log's per-record overhead.
        let batch_log_bytes = u64::from(limits.frame_bytes_max)
            + u64::from(limits.batch_messages_max)
                * (RECORD_OVERHEAD_BYTES as u64 + u64::from(SEAL_OVERHEAD_BYTES_MAX));
        if self.group_commit_bytes_max < batch_log_bytes {
            c.fail(
                "log.group_commit_bytes_max",
                format!(
                    "{} cannot hold one full SUBMIT as log records ({batch_log_bytes} bytes)",
                    self.group_commit_bytes_max
                ),
            );
        }
    }
}
