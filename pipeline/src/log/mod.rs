//! The segmented log, sans-IO: record and segment formats, encryption at rest, the roll,
//! retention and recovery decisions, and [`Log`], the state machine the shell drives.
//!
//! This module reads no file and no clock. Time comes in as `now_ms` (unix milliseconds),
//! randomness as a `&mut dyn RngCore`, file contents as byte slices; what to do goes out as
//! [`Action`]s and [`SyncRequest`]s that the shell performs with io_uring (or the
//! simulation's in-memory disks).
//!
//! ```text
//!  start-up (per shard)
//!    keyring file ──> Keyring::from_bytes          master key file ──> MasterKey::parse
//!    each segment file (bytes) ──> recover_segment(id, bytes, &keyring, &master, ..)
//!        Keep(summary) | Truncate { to } (torn tail: shell truncates) | Remove (shell deletes)
//!        Err(Corrupt { segment, offset }) ──> stop this shard, report; never skip
//!    Log::open(cfg, shard, master, keyring, kept summaries, &mut actions)
//!        actions: PersistKeyring (new nonce epoch) ─ DeleteSegment* ─ SyncSegment*
//!        perform all of them before serving
//!
//!  steady state
//!    Log::append(now_ms, rng, records, &mut actions, &mut positions)
//!        actions: [PersistKeyring ─ CreateSegment]  (on a roll: new key, new segment)
//!                 Write { segment, offset, bytes }   (encrypted, CRC-framed records)
//!    Log::commit_due() ──> Log::begin_sync() ──> SyncRequest { id, segment_ids, through_index }
//!        shell: fdatasync each listed segment after the writes before it completed
//!    Log::on_synced(id) ──> indexes now durable ──> ACK those messages `accepted(position)`
//!    Log::on_sync_failed(..) / on_write_failed(..) ──> failed for good: stop acking,
//!        LogError::Failed ──> Status::Rejected(StorageUnavailable) for every later append
//!    Log::tick(now_ms, &mut actions) ──> close an aged segment; drop expired segments:
//!        PersistKeyring (keys destroyed) ─ DeleteSegment*   (crypto-shredding)
//!
//!  audits and retransmission
//!    SegmentHeader::decode(bytes) ──> Keyring::data_key(&master, id) ──> SegmentCodec
//!        SegmentCodec::read_record(bytes, offset, index_in_segment) / SegmentCodec::scan(bytes)
//! ```
//!
//! For the shell: name each segment file by its segment id (for example
//! `{segment_id:020}.seg`); the header carries the first log index, and
//! [`Log::segment_of`] maps a position's index to its segment. Keep the keyring in its own
//! file, replaced by write-temp, fsync, rename, fsync-directory.
//!
//! Modules: [`format`](mod@format) (bytes on disk), [`keys`] (master key, data keys, keyring),
//! [`policy`] (roll and retention), [`engine`] ([`Log`]), [`recovery`] (start-up
//! decisions).

pub mod engine;
pub mod format;
pub mod keys;
pub mod policy;
pub mod recovery;
mod settings;

pub use engine::{
    Action, AppendSink, DroppedSegment, Log, LogError, LogFailure, OpenError, SyncRequest,
    WriteFailure,
};
pub use format::{
    Corruption, CorruptionCause, FieldKeys, OwnedRecord, Record, RecordError, RecordHeader,
    RecordKind, ScanOutcome, SegmentCodec, SegmentHeader, SegmentSummary,
};
pub use keys::{DataKey, KeyError, KeyState, Keyring, KeyringError, MasterKey};
pub use policy::{LogConfig, RECORD_PAYLOAD_BYTES_LIMIT};
pub use recovery::{Before, RecoverError, Recovery, RecoveryPlan, Repair};
pub use settings::{
    LogSettings, DIRECT_IO_BLOCK_BYTES, GROUP_COMMIT_BYTES_MAX, GROUP_COMMIT_BYTES_MIN,
    GROUP_COMMIT_RECORDS_MAX, RETENTION_SECS_MAX, RETENTION_SECS_MIN, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN,
};

use format::HeaderError;

/// What recovery does with one segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentVerdict {
    /// Every record is intact.
    Keep(SegmentSummary),
    /// The tail is torn: truncate the file to `to` bytes, then keep `summary`.
    Truncate {
        /// The valid prefix.
        summary: SegmentSummary,
        /// New file length.
        to: u64,
        /// What was cut.
        cause: RecordError,
    },
    /// Delete the file: it holds no record that can ever be read.
    Remove(RemoveReason),
}

/// Why recovery removes a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its header was never completely written (a crash right after creation).
    TornHeader,
    /// Its key was destroyed (a retention step was interrupted before the file went).
    KeyDestroyed,
    /// It starts past the end of the segment before it, or follows one that did, and was
    /// written by the last run: the records in between were lost in a crash, so its
    /// records belong to group commits whose sync never completed (one sync covers every
    /// segment written since the last) and none was acknowledged. Keeping them would
    /// leave a hole in the log (a later record without the earlier ones: a `read`
    /// status without its `delivered`).
    AfterLostRecords,
}

/// Why a segment stops recovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// Corruption before the tail, or a record failing authentication.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// The segment's key cannot be unwrapped (wrong master key) or is unknown.
    #[error("segment {segment_id}: {cause}")]
    Key {
        /// The segment.
        segment_id: u64,
        /// Why.
        cause: KeyError,
    },
}

/// Decides what to do with segment file `segment_id` (its name) holding `bytes`.
pub fn recover_segment(
    segment_id: u64,
    bytes: &[u8],
    keyring: &Keyring,
    master: &MasterKey,
    payload_bytes_max: u32,
) -> Result<SegmentVerdict, RecoveryError> {
    recover_segment_visiting(
        segment_id,
        bytes,
        keyring,
        master,
        payload_bytes_max,
        &mut |_, _| {},
    )
}

/// [`recover_segment`], calling `visit(log index, record)` for every record it reads
/// (see [`SegmentCodec::scan_visiting`]). Only the records of a `Keep` or `Truncate`
/// verdict stay in the log; an error verdict stops the start anyway.
pub fn recover_segment_visiting(
    segment_id: u64,
    bytes: &[u8],
    keyring: &Keyring,
    master: &MasterKey,
    payload_bytes_max: u32,
    visit: &mut dyn FnMut(u64, &OwnedRecord),
) -> Result<SegmentVerdict, RecoveryError> {
    recover_segment_with_fields(
        segment_id,
        bytes,
        keyring,
        master,
        payload_bytes_max,
        None,
        visit,
    )
}

/// [`recover_segment_visiting`] with the businesses' field keys, so that `visit` sees
/// the user fields of version 3 records (hidden without them: see `format`).
pub fn recover_segment_with_fields(
    segment_id: u64,
    bytes: &[u8],
    keyring: &Keyring,
    master: &MasterKey,
    payload_bytes_max: u32,
    fields: Option<&std::sync::Arc<dyn FieldKeys>>,
    visit: &mut dyn FnMut(u64, &OwnedRecord),
) -> Result<SegmentVerdict, RecoveryError> {
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(HeaderError::Truncated(_)) => {
            return Ok(SegmentVerdict::Remove(RemoveReason::TornHeader))
        }
        Err(e) => {
            return Err(Corruption {
                segment_id,
                offset: 0,
                cause: CorruptionCause::Header(e),
            }
            .into())
        }
    };
    if header.segment_id != segment_id {
        return Err(Corruption {
            segment_id,
            offset: 0,
            cause: CorruptionCause::IdMismatch {
                header_segment_id: header.segment_id,
            },
        }
        .into());
    }
    if keyring.state(header.data_key_id) == KeyState::Destroyed {
        return Ok(SegmentVerdict::Remove(RemoveReason::KeyDestroyed));
    }
    let key = keyring
        .data_key(master, header.data_key_id)
        .map_err(|cause| RecoveryError::Key { segment_id, cause })?;
    match SegmentCodec::new(header, key, payload_bytes_max)
        .with_field_keys(fields.cloned())
        .scan_visiting(bytes, visit)
    {
        ScanOutcome::Clean(summary) => Ok(SegmentVerdict::Keep(summary)),
        ScanOutcome::TornTail {
            summary,
            truncate_to,
            cause,
        } => Ok(SegmentVerdict::Truncate {
            summary,
            to: truncate_to,
            cause,
        }),
        ScanOutcome::TornHeader { .. } => Ok(SegmentVerdict::Remove(RemoveReason::TornHeader)),
        ScanOutcome::Corrupt(c) => Err(c.into()),
    }
}
