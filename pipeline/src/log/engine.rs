//! [`Log`]: one shard's log as a state machine. It decides and encodes; the shell performs
//! the [`Action`]s it returns against real files and reports completions back.
//!
//! Invariants:
//! - a position is reported durable (by [`Log::on_synced`]) only once an fdatasync that
//!   the shell started after every write of that record completed;
//! - after any storage failure the log is failed for good: every later append returns
//!   [`LogError::Failed`], no pending record ever becomes durable, and no sync is retried;
//! - a segment's data key is in the keyring, and the keyring persisted, before the segment
//!   is created; a key is destroyed, and the keyring persisted, before its segment file is
//!   removed (so a crash between the two leaves unreadable bytes, never a readable orphan);
//! - each new segment gets a new key; nothing is ever appended to a recovered segment;
//! - every group commit covers at most `group_commit_records_max` records and
//!   `group_commit_bytes_max` bytes; past that, appends are refused with [`LogError::Busy`].

use std::collections::VecDeque;
use std::ops::Range;

use rand::RngCore;

use super::format::{
    EncodeError, Record, SegmentCodec, SegmentHeader, SegmentSummary, RECORD_HEAD_ONLY_BYTES,
    RECORD_OVERHEAD_BYTES, SEGMENT_HEADER_BYTES, SEGMENT_VERSION,
};
use super::keys::{KeyError, KeyState, Keyring, MasterKey};
use super::policy::{expired, retained_since_ms, roll_due, LogConfig};
use crate::wire::{LogPosition, Reason, Status};
use crate::ShardId;

/// Something the shell must do, in the order the log returned them.
///
/// Ordering contract: perform actions in order. Writes may be in flight together, but a
/// [`SyncRequest`] must be started only after every action returned before it completed,
/// and [`Action::PersistKeyring`] and [`Action::CreateSegment`] must be durable when they
/// complete (write to a temporary file, fsync, rename, fsync the directory; create, fsync
/// the directory).
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    /// Replace the keyring file atomically and durably with these bytes.
    PersistKeyring {
        /// The serialized keyring.
        bytes: Vec<u8>,
    },
    /// Create the empty segment file `segment_id` and fsync the directory.
    CreateSegment {
        /// The segment.
        segment_id: u64,
    },
    /// Write `bytes` at `offset` of segment `segment_id` (not synced yet).
    Write {
        /// The segment.
        segment_id: u64,
        /// Byte offset in the segment file.
        offset: u64,
        /// Encrypted records (and the header for a new segment).
        bytes: Vec<u8>,
    },
    /// fdatasync segment `segment_id` (recovery: make the surviving tail durable).
    SyncSegment {
        /// The segment.
        segment_id: u64,
    },
    /// Remove segment file `segment_id` and fsync the directory. Its key is already gone.
    DeleteSegment {
        /// The segment.
        segment_id: u64,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::PersistKeyring { bytes } => write!(f, "PersistKeyring({} bytes)", bytes.len()),
            Action::CreateSegment { segment_id } => write!(f, "CreateSegment({segment_id})"),
            Action::Write {
                segment_id,
                offset,
                bytes,
            } => write!(
                f,
                "Write(segment {segment_id} @ {offset}, {} bytes)",
                bytes.len()
            ),
            Action::SyncSegment { segment_id } => write!(f, "SyncSegment({segment_id})"),
            Action::DeleteSegment { segment_id } => write!(f, "DeleteSegment({segment_id})"),
        }
    }
}

/// One group commit: fdatasync every listed segment, then call [`Log::on_synced`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// Identifies the request in [`Log::on_synced`] / [`Log::on_sync_failed`].
    pub id: u64,
    /// Segments written since the last sync (usually one; two or more across a roll).
    pub segment_ids: Vec<u64>,
    /// Every record with a log index below this is durable once the request completes.
    pub through_index: u64,
}

/// Why the log stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LogFailure {
    /// An fdatasync failed; the kernel may have dropped the dirty pages, so nothing written
    /// since the last good sync can be trusted.
    #[error(
        "fdatasync of segment {segment_id} failed; nothing since the last good sync is durable"
    )]
    SyncFailed {
        /// The segment.
        segment_id: u64,
    },
    /// A write found the disk full.
    #[error("disk full while writing segment {segment_id}")]
    DiskFull {
        /// The segment.
        segment_id: u64,
    },
    /// A write failed for another reason.
    #[error("write to segment {segment_id} failed")]
    WriteFailed {
        /// The segment.
        segment_id: u64,
    },
    /// The keyring could not be persisted.
    #[error("the keyring could not be persisted")]
    KeyringFailed,
    /// Every index of the log's space was handed out, or every key id (only a forged or
    /// damaged keyring or segment header gets near either: 2^48 records, 2^64 segments).
    #[error("the log's index or key id space is exhausted")]
    IndexSpaceExhausted,
}

/// Why an append was refused. Maps to a wire [`Status`] with [`LogError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The group awaiting its sync is full; retry after the next sync completes.
    #[error("log busy: the group commit is full")]
    Busy,
    /// The log failed for good (see the cause); it takes nothing more.
    #[error("log failed: {0}")]
    Failed(LogFailure),
    /// A record is larger than the log's bound.
    #[error("record {index} of the batch: {cause}")]
    Record {
        /// Index of the record in the batch.
        index: usize,
        /// What was wrong.
        cause: EncodeError,
    },
    /// The batch alone exceeds one group commit (a profile bug: validation prevents it).
    #[error("a batch of {records} records and {bytes} bytes exceeds one group commit")]
    BatchTooLarge {
        /// Records in the batch.
        records: usize,
        /// Bytes of the batch.
        bytes: u64,
    },
}

impl LogError {
    /// The status a sender gets for a message the log refused.
    pub fn status(&self) -> Status {
        match self {
            LogError::Busy => Status::Throttled { retry_after_ms: 5 },
            LogError::Failed(_) => Status::Rejected(Reason::StorageUnavailable),
            LogError::Record { .. } | LogError::BatchTooLarge { .. } => {
                Status::Rejected(Reason::PayloadTooLarge)
            }
        }
    }
}

/// Why a log could not be opened from recovered segments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A segment's key cannot be used (wrong master key, or unknown to the keyring).
    #[error("segment {segment_id}: {cause}")]
    Key {
        /// The segment.
        segment_id: u64,
        /// Why.
        cause: KeyError,
    },
    /// The keyring's nonce epoch or key id counter is at `u64::MAX`: the log cannot
    /// advance it (only a forged or damaged keyring holds one).
    #[error("the keyring's {0} is exhausted")]
    Exhausted(&'static str),
    /// The kept segments or the keyring's index floor end beyond the log's index space.
    #[error("the log would continue at index {next_index}, beyond its index space")]
    IndexSpace {
        /// Where the log would continue.
        next_index: u64,
    },
    /// Segments overlap or are out of order.
    #[error("segment {segment_id} starts at index {first_index}, before the end of the previous segment ({previous_end})")]
    Overlap {
        /// The segment.
        segment_id: u64,
        /// Its first index.
        first_index: u64,
        /// End of the previous segment.
        previous_end: u64,
    },
}

/// Storage failures the shell reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// ENOSPC or EDQUOT.
    NoSpace,
    /// Any other error.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct SegMeta {
    segment_id: u64,
    data_key_id: u64,
    first_index: u64,
    end_index: u64,
    bytes: u64,
    created_ms: u64,
    oldest_ms: Option<u64>,
}

impl SegMeta {
    /// Whether retention drops this segment at `now_ms` (its oldest record reached it).
    fn expired(&self, cfg: &LogConfig, now_ms: u64) -> bool {
        expired(
            cfg,
            retained_since_ms(self.created_ms, self.oldest_ms),
            now_ms,
        )
    }
}

/// A segment retention dropped (for the operator's log line: ids and counts only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DroppedSegment {
    /// The segment.
    pub segment_id: u64,
    /// Records it held.
    pub records: u64,
    /// Since when its records counted for retention (its oldest record), unix ms.
    pub since_ms: u64,
}

#[derive(Debug, Default)]
struct Group {
    records: u32,
    bytes: u64,
    segment_ids: Vec<u64>,
}

/// One shard's log. See the module docs of [`crate::log`] for the call order.
#[derive(Debug)]
pub struct Log {
    cfg: LogConfig,
    shard: ShardId,
    master: MasterKey,
    keyring: Keyring,
    /// Oldest first; the last one is the open segment when `active` is set.
    segments: VecDeque<SegMeta>,
    active: Option<SegmentCodec>,
    next_index: u64,
    durable_end: u64,
    pending: Group,
    /// The sync in flight: its id and the index through which it makes records durable.
    in_flight: Option<(u64, u64)>,
    next_sync_id: u64,
    failed: Option<LogFailure>,
    /// This run opened a segment already: the next one continues it (header flag).
    rolled: bool,
    /// The businesses' field keys: each new segment writes its records' user fields
    /// under them (`format`'s version 3).
    field_keys: Option<std::sync::Arc<dyn super::FieldKeys>>,
}

impl Log {
    /// Opens a log from the segments recovery kept (every one scanned clean or truncated,
    /// in any order), bumping the nonce epoch. Appends go to a new segment.
    ///
    /// Returns the log; `actions` gets, in order: the keyring to persist (new epoch, keys of
    /// missing or empty segments destroyed), the empty segments to delete, and a sync of
    /// every kept segment (their tails may sit unsynced in the page cache after a process
    /// crash). Perform them all before serving.
    pub fn open(
        cfg: LogConfig,
        shard: ShardId,
        master: MasterKey,
        mut keyring: Keyring,
        mut kept: Vec<SegmentSummary>,
        actions: &mut Vec<Action>,
    ) -> Result<Log, OpenError> {
        if keyring.epoch() == u64::MAX {
            return Err(OpenError::Exhausted("nonce epoch"));
        }
        if keyring.next_key_id() == u64::MAX {
            return Err(OpenError::Exhausted("key id counter"));
        }
        // Prove the master key before anything is touched: every live key must unwrap.
        // (An empty keyring cannot tell a wrong master key; it protects nothing yet.)
        for key_id in keyring.live_ids() {
            if let Err(cause) = keyring.data_key(&master, key_id) {
                return Err(OpenError::Key {
                    segment_id: key_id,
                    cause,
                });
            }
        }
        kept.sort_by_key(|s| s.header.segment_id);
        let mut segments = VecDeque::with_capacity(kept.len());
        let mut deletes = Vec::new();
        let mut next_index = keyring.index_floor();
        let mut previous_end = 0u64;
        for s in &kept {
            let segment_id = s.header.segment_id;
            keyring
                .data_key(&master, s.header.data_key_id)
                .map_err(|cause| OpenError::Key { segment_id, cause })?;
            if s.header.first_index < previous_end {
                return Err(OpenError::Overlap {
                    segment_id,
                    first_index: s.header.first_index,
                    previous_end,
                });
            }
            let end_index = s.header.first_index + u64::from(s.records);
            previous_end = end_index;
            next_index = next_index.max(end_index);
            if s.records == 0 {
                deletes.push((segment_id, s.header.data_key_id));
                continue;
            }
            segments.push_back(SegMeta {
                segment_id,
                data_key_id: s.header.data_key_id,
                first_index: s.header.first_index,
                end_index,
                bytes: s.bytes,
                created_ms: s.header.created_ms,
                oldest_ms: s.oldest_ms,
            });
        }
        if next_index > LogPosition::INDEX_LIMIT {
            return Err(OpenError::IndexSpace { next_index });
        }
        // Keys whose segment never made it to disk, or that held nothing.
        let kept_keys: Vec<u64> = segments.iter().map(|m| m.data_key_id).collect();
        let orphans: Vec<u64> = keyring
            .live_ids()
            .filter(|id| !kept_keys.contains(id))
            .collect();
        for id in orphans {
            keyring.destroy(id);
        }
        keyring.raise_index_floor(next_index);
        keyring.next_epoch();
        actions.push(Action::PersistKeyring {
            bytes: keyring.to_bytes(),
        });
        for (segment_id, key_id) in deletes {
            debug_assert_eq!(keyring.state(key_id), KeyState::Destroyed);
            actions.push(Action::DeleteSegment { segment_id });
        }
        for m in &segments {
            actions.push(Action::SyncSegment {
                segment_id: m.segment_id,
            });
        }
        Ok(Log {
            cfg,
            shard,
            master,
            keyring,
            segments,
            active: None,
            next_index,
            durable_end: next_index,
            pending: Group::default(),
            in_flight: None,
            next_sync_id: 1,
            failed: None,
            rolled: false,
            field_keys: None,
        })
    }

    /// Sets the businesses' field keys: the open segment and every later one use them
    /// (set right after the log opens, and again when a registry reload adds businesses;
    /// a business's key never changes, so records written before still read back).
    pub fn set_field_keys(&mut self, keys: Option<std::sync::Arc<dyn super::FieldKeys>>) {
        if let Some(active) = self.active.as_mut() {
            active.set_field_keys(keys.clone());
        }
        self.field_keys = keys;
    }

    /// The log's settings.
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// The keyring as the log holds it (persisted by the last `PersistKeyring`).
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The nonce epoch persisted by [`Log::open`].
    pub fn epoch(&self) -> u64 {
        self.keyring.epoch()
    }

    /// Records with an index below this are durable.
    pub fn durable_end(&self) -> u64 {
        self.durable_end
    }

    /// The index the next appended record gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Why the log failed, if it did.
    pub fn failure(&self) -> Option<LogFailure> {
        self.failed
    }

    /// The segment appends go to now, and its length in bytes: `None` until the first
    /// append of this run opens one (appends before serving, such as the `expired`
    /// statuses of a retention drop at start-up, may have).
    pub fn open_segment(&self) -> Option<(u64, u64)> {
        self.active.as_ref()?;
        self.segments.back().map(|m| (m.segment_id, m.bytes))
    }

    /// Ids of the segments the log holds, oldest first.
    pub fn segment_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.iter().map(|m| m.segment_id)
    }

    /// The segment holding log index `index`, if the log still holds it.
    pub fn segment_of(&self, index: u64) -> Option<u64> {
        // Segments are ordered by index; binary search keeps lookups cheap for audits.
        let i = self.segments.partition_point(|m| m.end_index <= index);
        self.segments
            .get(i)
            .filter(|m| (m.first_index..m.end_index).contains(&index))
            .map(|m| m.segment_id)
    }

    /// Appends a batch: all records or none. Hands the actions to perform to `actions`
    /// (a `Vec<Action>`, or a caller's [`AppendSink`] that takes the encoded bytes where
    /// they will be written from) and pushes one position per record to `positions`.
    /// The records become durable with the sync that covers them ([`Log::begin_sync`] /
    /// [`Log::on_synced`]), not before.
    ///
    /// `rng` supplies the new key and wrap nonce when a segment rolls (a CSPRNG in the
    /// shell, a seeded one in simulation).
    pub fn append<S: AppendSink>(
        &mut self,
        now_ms: u64,
        rng: &mut dyn RngCore,
        records: &[Record<'_>],
        actions: &mut S,
        positions: &mut Vec<LogPosition>,
    ) -> Result<(), LogError> {
        if let Some(f) = self.failed {
            return Err(LogError::Failed(f));
        }
        let mut batch_bytes = 0u64;
        for (index, r) in records.iter().enumerate() {
            if r.payload.len() > self.cfg.payload_bytes_max as usize {
                return Err(LogError::Record {
                    index,
                    cause: EncodeError::PayloadTooLarge {
                        bytes: r.payload.len(),
                        max: self.cfg.payload_bytes_max,
                    },
                });
            }
            batch_bytes += record_bytes(r);
        }
        let n = records.len();
        if n as u64 > u64::from(self.cfg.group_commit_records_max)
            || batch_bytes > self.cfg.group_commit_bytes_max
        {
            return Err(LogError::BatchTooLarge {
                records: n,
                bytes: batch_bytes,
            });
        }
        // A roll needs a key id below u64::MAX (the counter must advance past it).
        if self.next_index + n as u64 > LogPosition::INDEX_LIMIT
            || self.keyring.next_key_id() == u64::MAX
        {
            let f = LogFailure::IndexSpaceExhausted;
            self.failed = Some(f);
            return Err(LogError::Failed(f));
        }
        if self.pending.records as usize + n > self.cfg.group_commit_records_max as usize
            || self.pending.bytes + batch_bytes > self.cfg.group_commit_bytes_max
        {
            return Err(LogError::Busy);
        }

        for r in records {
            let bytes = record_bytes(r);
            let roll = match (&self.active, self.segments.back()) {
                (Some(_), Some(m)) => roll_due(
                    &self.cfg,
                    m.bytes,
                    (m.end_index - m.first_index) as u32,
                    m.created_ms,
                    now_ms,
                    bytes,
                )
                .is_some(),
                _ => true,
            };
            if roll {
                self.roll(now_ms, rng, actions);
            }
            let codec = self.active.as_ref().expect("an open segment");
            let m = self.segments.back_mut().expect("an open segment");
            let index_in_segment = (self.next_index - m.first_index) as u32;
            let written = codec
                .encode_record(index_in_segment, r, actions.buffer(m.segment_id, m.bytes))
                .expect("checked above") as u64;
            debug_assert_eq!(written, bytes);
            m.bytes += written;
            m.end_index += 1;
            m.oldest_ms = Some(m.oldest_ms.unwrap_or(u64::MAX).min(r.header.time_ms));
            if !self.pending.segment_ids.contains(&m.segment_id) {
                self.pending.segment_ids.push(m.segment_id);
            }
            positions.push(LogPosition::new(self.shard, self.next_index));
            self.next_index += 1;
        }
        self.pending.records += n as u32;
        self.pending.bytes += batch_bytes;
        Ok(())
    }

    fn roll<S: AppendSink>(&mut self, now_ms: u64, rng: &mut dyn RngCore, actions: &mut S) {
        let mut random = [0u8; 32];
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut random);
        rng.fill_bytes(&mut nonce);
        let key = self.keyring.create_key(&self.master, random, nonce);
        // Segment ids are key ids: allocated by the persisted counter, never reused.
        let header = SegmentHeader {
            segment_id: key.id(),
            data_key_id: key.id(),
            first_index: self.next_index,
            created_ms: now_ms,
            version: SEGMENT_VERSION,
            continues: self.rolled,
        };
        self.rolled = true;
        self.keyring.raise_index_floor(self.next_index);
        actions.action(Action::PersistKeyring {
            bytes: self.keyring.to_bytes(),
        });
        actions.action(Action::CreateSegment {
            segment_id: header.segment_id,
        });
        header.encode(actions.buffer(header.segment_id, 0));
        self.segments.push_back(SegMeta {
            segment_id: header.segment_id,
            data_key_id: header.data_key_id,
            first_index: header.first_index,
            end_index: header.first_index,
            bytes: SEGMENT_HEADER_BYTES as u64,
            created_ms: now_ms,
            oldest_ms: None,
        });
        self.active = Some(
            SegmentCodec::new(header, key, self.cfg.payload_bytes_max)
                .with_field_keys(self.field_keys.clone()),
        );
    }

    /// Whether a batch of `records` records and `bytes` bytes (framed, as written) would be
    /// taken now without [`LogError::Busy`]: the group awaiting its sync has room for it,
    /// or it could never fit one group commit (then `append` refuses it for good, with
    /// [`LogError::BatchTooLarge`], and waiting would not help).
    pub fn has_room(&self, records: usize, bytes: u64) -> bool {
        let max_records = self.cfg.group_commit_records_max as usize;
        let max_bytes = self.cfg.group_commit_bytes_max;
        if records > max_records || bytes > max_bytes {
            return true;
        }
        self.pending.records as usize + records <= max_records
            && self.pending.bytes + bytes <= max_bytes
    }

    /// Bytes a record with a `recipient_bytes`-byte recipient and a `payload_bytes`-byte
    /// (sealed) payload takes in a segment (of the format this build writes: a record
    /// with neither is its head alone).
    pub fn record_bytes(recipient_bytes: usize, payload_bytes: usize) -> u64 {
        match (recipient_bytes, payload_bytes) {
            (0, 0) => RECORD_HEAD_ONLY_BYTES as u64,
            _ => (RECORD_OVERHEAD_BYTES + recipient_bytes + payload_bytes) as u64,
        }
    }

    /// Whether a group commit should start now: records await a sync and none is in flight.
    pub fn commit_due(&self) -> bool {
        self.failed.is_none() && self.in_flight.is_none() && self.pending.records > 0
    }

    /// Starts a group commit covering every record appended since the last one.
    pub fn begin_sync(&mut self) -> Option<SyncRequest> {
        if !self.commit_due() {
            return None;
        }
        let g = std::mem::take(&mut self.pending);
        let req = SyncRequest {
            id: self.next_sync_id,
            segment_ids: g.segment_ids,
            through_index: self.next_index,
        };
        self.next_sync_id += 1;
        self.in_flight = Some((req.id, req.through_index));
        Some(req)
    }

    /// Gives back the segment list of a [`SyncRequest`] whose syncs were started, so that
    /// the next group commit lists its segments without allocating (the steady path's
    /// group commits allocate nothing of the log's).
    pub fn reuse_segment_ids(&mut self, mut ids: Vec<u64>) {
        if self.pending.segment_ids.capacity() == 0 {
            ids.clear();
            self.pending.segment_ids = ids;
        }
    }

    /// The sync `id` completed: returns the log indexes that just became durable.
    pub fn on_synced(&mut self, id: u64) -> Range<u64> {
        let (in_flight, through_index) = self.in_flight.take().expect("a sync in flight");
        assert_eq!(
            in_flight, id,
            "sync completions arrive for the request in flight"
        );
        if self.failed.is_some() {
            // A write failed while the sync ran: the durable end stays where it was.
            return self.durable_end..self.durable_end;
        }
        let from = self.durable_end;
        self.durable_end = through_index;
        from..self.durable_end
    }

    /// The sync `id` failed. The log fails for good; nothing pending becomes durable.
    pub fn on_sync_failed(&mut self, id: u64, segment_id: u64) -> LogFailure {
        let (in_flight, _) = self.in_flight.take().expect("a sync in flight");
        assert_eq!(
            in_flight, id,
            "sync completions arrive for the request in flight"
        );
        self.fail(LogFailure::SyncFailed { segment_id })
    }

    /// A write to `segment_id` failed. The log fails for good.
    pub fn on_write_failed(&mut self, segment_id: u64, kind: WriteFailure) -> LogFailure {
        self.fail(match kind {
            WriteFailure::NoSpace => LogFailure::DiskFull { segment_id },
            WriteFailure::Other => LogFailure::WriteFailed { segment_id },
        })
    }

    /// Persisting the keyring failed. The log fails for good.
    pub fn on_keyring_failed(&mut self) -> LogFailure {
        self.fail(LogFailure::KeyringFailed)
    }

    fn fail(&mut self, f: LogFailure) -> LogFailure {
        // The first failure is the one reported.
        *self.failed.get_or_insert(f)
    }

    /// The end index of the segments a [`Log::tick`] at `now_ms` would drop (every record
    /// below it goes), or `None` when it drops none. Records below it that still matter to
    /// delivery become `expired` first; the core asks ahead of time (`now_ms` a little in
    /// the future) so that those statuses are durable before the segments go.
    pub fn expiring_end(&self, now_ms: u64) -> Option<u64> {
        let mut end = None;
        for (i, m) in self.segments.iter().enumerate() {
            let is_last = i + 1 == self.segments.len();
            // As `tick` does: the open segment is closed first once it is past its age or
            // expired (then it is dropped too: the next append opens a new one).
            let is_open = self.active.is_some() && is_last && !self.closes_at(m, now_ms);
            if i >= self.cfg.drops_per_step_max
                || is_open
                || m.end_index > self.durable_end
                || !m.expired(&self.cfg, now_ms)
            {
                break;
            }
            end = Some(m.end_index);
        }
        end
    }

    /// Whether the open segment `m` is closed at `now_ms`: past its age, or its oldest
    /// record reached the retention (possible only with a roll interval above the
    /// retention, which the profile refuses; kept so that no record ever outlives it).
    fn closes_at(&self, m: &SegMeta, now_ms: u64) -> bool {
        now_ms.saturating_sub(m.created_ms) >= self.cfg.segment_age_max_ms
            || m.expired(&self.cfg, now_ms)
    }

    /// Time-driven work, bounded per call: closes the open segment once it reaches its age
    /// limit (the next append opens a new one), and drops up to `drops_per_step_max`
    /// segments whose oldest record reached the retention, destroying their keys. Returns
    /// the dropped segment ids; `actions` gets the keyring to persist, then the deletions.
    ///
    /// Runs even on a failed log: deleting expired data is still owed.
    pub fn tick(&mut self, now_ms: u64, actions: &mut Vec<Action>) -> Vec<u64> {
        self.tick_below(now_ms, u64::MAX, actions)
            .iter()
            .map(|d| d.segment_id)
            .collect()
    }

    /// [`Log::tick`], dropping only segments that end at or below `end_max` (the core holds
    /// back a segment until the `expired` statuses of the messages in it are durable).
    pub fn tick_below(
        &mut self,
        now_ms: u64,
        end_max: u64,
        actions: &mut Vec<Action>,
    ) -> Vec<DroppedSegment> {
        if self.active.is_some() {
            let m = self.segments.back().expect("open segment");
            if self.closes_at(m, now_ms) {
                self.active = None;
            }
        }
        let mut dropped = Vec::new();
        while dropped.len() < self.cfg.drops_per_step_max {
            let Some(m) = self.segments.front() else {
                break;
            };
            let is_open = self.active.is_some() && self.segments.len() == 1;
            if is_open
                || m.end_index > self.durable_end
                || m.end_index > end_max
                || !m.expired(&self.cfg, now_ms)
            {
                break;
            }
            dropped.push(DroppedSegment {
                segment_id: m.segment_id,
                records: m.end_index - m.first_index,
                since_ms: retained_since_ms(m.created_ms, m.oldest_ms),
            });
            self.keyring.destroy(m.data_key_id);
            self.segments.pop_front();
        }
        if !dropped.is_empty() {
            actions.push(Action::PersistKeyring {
                bytes: self.keyring.to_bytes(),
            });
            for d in &dropped {
                actions.push(Action::DeleteSegment {
                    segment_id: d.segment_id,
                });
            }
        }
        dropped
    }
}

fn record_bytes(r: &Record<'_>) -> u64 {
    Log::record_bytes(r.header.recipient_bytes(), r.payload.len())
}

/// Where [`Log::append`] hands its work: metadata actions to perform in order, and the
/// bytes of its records and segment headers, encoded straight into the buffer they will
/// be written from.
///
/// A `Vec<Action>` is one: the bytes become [`Action::Write`]s, one per contiguous run.
/// The serving shard's group commit is another: it encodes into the commit's own write
/// buffer, so a record is copied once (sealed payload into the buffer, where the at-rest
/// encryption runs in place) instead of into a batch buffer first and the commit's after.
pub trait AppendSink {
    /// A metadata action ([`Action::PersistKeyring`], [`Action::CreateSegment`]); its
    /// order relative to the writes of a segment created by it must be kept (the segment
    /// exists before anything is written to it).
    fn action(&mut self, action: Action);
    /// The buffer to append to whose next byte goes to `offset` of segment `segment_id`.
    fn buffer(&mut self, segment_id: u64, offset: u64) -> &mut Vec<u8>;
}

impl AppendSink for Vec<Action> {
    fn action(&mut self, action: Action) {
        self.push(action);
    }

    fn buffer(&mut self, segment_id: u64, offset: u64) -> &mut Vec<u8> {
        let continues = matches!(self.last(), Some(Action::Write { segment_id: s, offset: o, bytes })
            if *s == segment_id && o + bytes.len() as u64 == offset);
        if !continues {
            self.push(Action::Write {
                segment_id,
                offset,
                bytes: Vec::new(),
            });
        }
        match self.last_mut() {
            Some(Action::Write { bytes, .. }) => bytes,
            _ => unreachable!("a write was just pushed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::RecordHeader;
    use crate::wire::Recipient;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes_max: 300,
            segment_age_max_ms: 1000,
            retention_ms: 10_000,
            group_commit_records_max: 100,
            group_commit_bytes_max: 1 << 20,
            payload_bytes_max: 100,
            drops_per_step_max: 8,
        }
    }

    fn rec(payload: &[u8], time_ms: u64) -> Record<'_> {
        Record {
            header: RecordHeader::message(
                1,
                time_ms,
                1,
                Recipient::parse(b"+15550001111").unwrap(),
                0,
            ),
            payload,
        }
    }

    fn open() -> (Log, Vec<Action>) {
        open_with(cfg())
    }

    fn open_with(cfg: LogConfig) -> (Log, Vec<Action>) {
        let mut actions = Vec::new();
        let log = Log::open(
            cfg,
            ShardId::new(1),
            MasterKey::from_bytes([1; 32]),
            Keyring::new(),
            Vec::new(),
            &mut actions,
        )
        .unwrap();
        (log, actions)
    }

    #[test]
    fn a_roll_persists_the_key_before_the_segment_and_its_records() {
        let (mut log, actions) = open();
        assert!(matches!(actions[..], [Action::PersistKeyring { .. }]));
        let mut rng = StdRng::seed_from_u64(1);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(10, &mut rng, &[rec(b"x", 10)], &mut actions, &mut positions)
            .unwrap();
        let [Action::PersistKeyring { bytes }, Action::CreateSegment { segment_id }, Action::Write {
            segment_id: w,
            offset: 0,
            ..
        }] = &actions[..]
        else {
            panic!("{actions:?}");
        };
        assert_eq!(w, segment_id);
        let ring = Keyring::from_bytes(bytes).unwrap();
        assert_eq!(ring.state(*segment_id), KeyState::Live);
        assert_eq!(positions, vec![LogPosition::new(ShardId::new(1), 0)]);
        assert!(log.commit_due());
    }

    /// A segment list given back after a commit started lists the next commit's segments:
    /// the same allocation, the right ids; one not given back is simply a new list.
    #[test]
    fn a_segment_list_given_back_serves_the_next_commit() {
        let (mut log, _) = open();
        let mut rng = StdRng::seed_from_u64(1);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(10, &mut rng, &[rec(b"x", 10)], &mut actions, &mut positions)
            .unwrap();
        let first = log.begin_sync().unwrap();
        let segment = first.segment_ids[0];
        let at = first.segment_ids.as_ptr();
        log.reuse_segment_ids(first.segment_ids);
        assert_eq!(log.on_synced(first.id), 0..1);
        log.append(11, &mut rng, &[rec(b"y", 11)], &mut actions, &mut positions)
            .unwrap();
        let second = log.begin_sync().unwrap();
        assert_eq!(second.segment_ids, [segment]);
        assert_eq!(second.segment_ids.as_ptr(), at, "the same allocation");
        assert_eq!(log.on_synced(second.id), 1..2);
        // Not given back: the next commit still lists its segment.
        log.append(12, &mut rng, &[rec(b"z", 12)], &mut actions, &mut positions)
            .unwrap();
        let third = log.begin_sync().unwrap();
        let open = log.open_segment().map(|(id, _)| id).unwrap();
        assert_eq!(third.segment_ids, [open]);
        assert_eq!(log.on_synced(third.id), 2..3);
    }

    #[test]
    fn one_sync_covers_every_segment_written_since_the_last() {
        let (mut log, _) = open();
        let mut rng = StdRng::seed_from_u64(2);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        let p = [7u8; 90];
        let batch: Vec<Record<'_>> = (0..5).map(|_| rec(&p, 10)).collect();
        log.append(10, &mut rng, &batch, &mut actions, &mut positions)
            .unwrap();
        let created = actions
            .iter()
            .filter(|a| matches!(a, Action::CreateSegment { .. }))
            .count();
        assert!(created >= 2, "300-byte segments roll within the batch");
        let req = log.begin_sync().unwrap();
        assert_eq!(req.segment_ids.len(), created);
        assert_eq!(req.through_index, 5);
        assert!(log.begin_sync().is_none(), "one sync in flight at a time");
        assert_eq!(log.durable_end(), 0);
        assert_eq!(log.on_synced(req.id), 0..5);
    }

    #[test]
    fn a_write_failure_during_a_sync_makes_nothing_durable() {
        let (mut log, _) = open();
        let mut rng = StdRng::seed_from_u64(3);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(10, &mut rng, &[rec(b"a", 10)], &mut actions, &mut positions)
            .unwrap();
        let req = log.begin_sync().unwrap();
        log.on_write_failed(req.segment_ids[0], WriteFailure::NoSpace);
        assert_eq!(log.on_synced(req.id), 0..0);
        assert_eq!(log.durable_end(), 0);
        let err = log
            .append(10, &mut rng, &[rec(b"b", 10)], &mut actions, &mut positions)
            .unwrap_err();
        assert!(matches!(err, LogError::Failed(LogFailure::DiskFull { .. })));
    }

    #[test]
    fn retention_destroys_the_key_before_deleting_the_segment() {
        let (mut log, _) = open();
        let mut rng = StdRng::seed_from_u64(4);
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(0, &mut rng, &[rec(b"old", 0)], &mut actions, &mut positions)
            .unwrap();
        log.append(
            2000,
            &mut rng,
            &[rec(b"new", 2000)],
            &mut actions,
            &mut positions,
        )
        .unwrap();
        let req = log.begin_sync().unwrap();
        log.on_synced(req.id);
        let first = log.segment_ids().next().unwrap();
        actions.clear();
        assert!(log.tick(9_999, &mut actions).is_empty(), "not expired yet");
        assert_eq!(log.tick(10_000, &mut actions), vec![first]);
        let [Action::PersistKeyring { bytes }, Action::DeleteSegment { segment_id }] = &actions[..]
        else {
            panic!("{actions:?}");
        };
        assert_eq!(*segment_id, first);
        assert_eq!(
            Keyring::from_bytes(bytes).unwrap().state(first),
            KeyState::Destroyed
        );
        assert_eq!(log.segment_of(0), None);
        assert!(log.segment_of(1).is_some());
    }

    /// Appends one record at `now_ms` and makes it durable; returns its index.
    fn append_durable(log: &mut Log, rng: &mut StdRng, now_ms: u64) -> u64 {
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(
            now_ms,
            rng,
            &[rec(b"m", now_ms)],
            &mut actions,
            &mut positions,
        )
        .unwrap();
        let req = log.begin_sync().unwrap();
        log.on_synced(req.id);
        positions[0].index()
    }

    /// Issue 19, acceptance: with the default profile no record is readable 30 days and
    /// 1 s after it was accepted, wherever the segment boundaries fall around it (its
    /// offset in its segment) and whatever the phase of the one-second retention tick;
    /// and no segment goes before its oldest record reached the retention.
    #[test]
    fn default_profile_no_record_is_readable_30_days_and_1_s_after_acceptance() {
        let p = crate::profile::Profile::default_profile();
        let cfg = LogConfig::new(&p.log, p.limits.payload_bytes_max);
        let (retention, age) = (cfg.retention_ms, cfg.segment_age_max_ms);
        assert_eq!(retention, 30 * 86_400_000);
        let hour = 3_600_000;
        // Edges of a segment's life, then a deterministic spread over it.
        let mut offsets = vec![
            0,
            1,
            999,
            1000,
            1001,
            age / 2,
            age - 1001,
            age - 1,
            age,
            age + 1,
        ];
        offsets.extend((1..=40u64).map(|k| (k * 7_919_017 + k * k * 13) % (age + 1)));
        for (case, &offset) in offsets.iter().enumerate() {
            let (mut log, _) = open_with(cfg);
            let mut rng = StdRng::seed_from_u64(case as u64);
            let t0 = 1_700_000_000_000u64 + case as u64 * 37;
            let phase = (offset * 7 + case as u64 * 131) % 1000;
            append_durable(&mut log, &mut rng, t0);
            let accepted = t0 + offset;
            let watched = append_durable(&mut log, &mut rng, accepted);
            // Its segment counts from its first record: t0, unless the watched record
            // opened a segment of its own (past the roll interval).
            let since = if offset < age { t0 } else { accepted };
            let mut dropped_at = None;
            let mut now = accepted;
            let mut check = |log: &mut Log, now: u64| {
                let mut actions = Vec::new();
                log.tick(now, &mut actions);
                if dropped_at.is_none() && log.segment_of(watched).is_none() {
                    dropped_at = Some(now);
                }
            };
            // An hour of traffic at a time, ticking, up to a few seconds before the drop.
            while now + hour < since + retention - 5_000 {
                now += hour;
                append_durable(&mut log, &mut rng, now);
                check(&mut log, now);
            }
            // Then the one-second tick, at its phase, until a second past the deadline.
            let mut tick = (since + retention - 5_000) / 1000 * 1000 + phase;
            while tick <= accepted + retention + 1000 {
                check(&mut log, tick);
                tick += 1000;
            }
            let at = dropped_at.unwrap_or_else(|| panic!("offset {offset}: never dropped"));
            assert!(
                at >= since + retention,
                "offset {offset}: dropped early at {at}"
            );
            assert!(
                at < since + retention + 1000,
                "offset {offset}: dropped at {at}, not at the first tick past the retention"
            );
            assert!(at <= accepted + retention + 1000, "offset {offset}");
            assert!(log.segment_of(watched).is_none(), "offset {offset}");
        }
    }
}
