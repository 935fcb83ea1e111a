//! Start-up recovery of one shard's log, as decisions: the shell (files in `src/store.rs`,
//! memory in the simulation) reads the keyring and every segment, hands their bytes here,
//! performs the plan, then opens the log.
//!
//! ```text
//!  keyring bytes ──> Recovery::new ──┐
//!  each segment's bytes ──> Recovery::judge (nothing touched yet; an error stops the start)
//!                                    ▼
//!  Recovery::plan() ──> truncate torn tails, remove dead files   (the shell, durably)
//!  RecoveryPlan::open(cfg, shard, master) ──> Log + actions       (the shell performs them
//!                                                                  before serving)
//! ```
//!
//! Invariant: nothing is changed on storage before every segment was judged, so a wrong
//! master key or corruption in the middle of a segment stops the start with storage as it
//! was.
//!
//! Invariant: recovery keeps no record past records lost in a crash. A segment opened by
//! a roll starts where the one before it ended (its header says it `continues`); when it
//! starts past the end of what recovery kept of that one, records between were lost (an
//! unsynced write can vanish whole, leaving a clean-looking shorter segment, or the
//! earlier segment's header was torn). That segment and every later one then hold only
//! records of group commits whose sync never completed (one sync covers every segment
//! written since the last, so an acknowledged record has every earlier one durable):
//! none was acknowledged, and they are removed unread, before any torn tail is cut, so an
//! interrupted repair meets the same gap at the next start. A gap before a segment that
//! does not continue (the first of a run, which starts at the keyring's index floor, or
//! one written by an older build) is where an earlier start resumed: it stays.

use super::engine::{Action, Log, OpenError};
use super::format::{OwnedRecord, RecordError, SegmentHeader, SegmentSummary};
use super::keys::{Keyring, KeyringError, MasterKey};
use super::policy::LogConfig;
use super::{recover_segment_with_fields, FieldKeys, RecoveryError, RemoveReason, SegmentVerdict};
use crate::ShardId;

/// Why a log could not be recovered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverError {
    /// The keyring is damaged.
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    /// Segments exist but no keyring does: they can never be read.
    #[error("segment files exist but the keyring is missing")]
    KeyringMissing,
    /// A segment is corrupt before its tail, or its key does not unwrap.
    #[error(transparent)]
    Segment(#[from] RecoveryError),
    /// The shell judged segments out of order (a bug in the shell, not in the files).
    #[error("segment {segment_id} judged after segment {after}: segments must be judged in ascending order")]
    OutOfOrder {
        /// The segment judged.
        segment_id: u64,
        /// The segment judged before it.
        after: u64,
    },
    /// The kept segments do not form a log (wrong master key included).
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// What the segment before another one left in the log (see the module docs): recovery's
/// rule, also applied by `courier log verify` to say what recovery will remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// No segment, or one retention removed (or one that stops recovery).
    Nothing,
    /// A segment whose records end at `end`.
    Kept {
        /// Log index after its last readable record.
        end: u64,
    },
    /// A segment whose header was torn: a segment continuing it follows lost records.
    TornHeader,
}

impl Before {
    /// A segment kept with `s`'s records.
    pub fn kept(s: &SegmentSummary) -> Before {
        Before::Kept {
            end: s.header.first_index + u64::from(s.records),
        }
    }

    /// Whether a segment with `header` after this one was written after records lost in
    /// a crash (recovery removes it and every later segment of the shard).
    pub fn lost_before(self, header: &SegmentHeader) -> bool {
        match self {
            Before::Kept { end } => header.continues && header.first_index > end,
            Before::TornHeader => header.continues,
            Before::Nothing => false,
        }
    }
}

/// What recovery does to one segment file before the log opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Cut the torn tail: truncate the file to `to` bytes and sync it.
    Truncate {
        /// The segment.
        segment_id: u64,
        /// New length.
        to: u64,
        /// What was cut.
        cause: RecordError,
    },
    /// Delete the file: it holds no record that can ever be read.
    Remove {
        /// The segment.
        segment_id: u64,
        /// Why.
        reason: RemoveReason,
    },
}

/// Recovery in progress: the keyring, and the verdicts of the segments judged so far.
#[derive(Debug)]
pub struct Recovery {
    /// The businesses' field keys, for records' user fields (and for the log opened).
    fields: Option<std::sync::Arc<dyn FieldKeys>>,
    keyring: Keyring,
    master: MasterKey,
    payload_bytes_max: u32,
    kept: Vec<SegmentSummary>,
    repairs: Vec<Repair>,
    /// The last segment judged.
    last: Option<u64>,
    /// What the segment judged last left in the log.
    before: Before,
    /// Records were lost before the segment judged last: every later one is removed
    /// unread.
    lost: bool,
}

impl Recovery {
    /// Starts recovery from the keyring file's bytes (`None`: there is no keyring file)
    /// and whether any segment file exists.
    pub fn new(
        keyring: Option<&[u8]>,
        segments_exist: bool,
        master: MasterKey,
        payload_bytes_max: u32,
    ) -> Result<Recovery, RecoverError> {
        let keyring = match keyring {
            Some(bytes) => Keyring::from_bytes(bytes)?,
            None if segments_exist => return Err(RecoverError::KeyringMissing),
            None => Keyring::new(),
        };
        Ok(Recovery {
            fields: None,
            keyring,
            master,
            payload_bytes_max,
            kept: Vec::new(),
            repairs: Vec::new(),
            last: None,
            before: Before::Nothing,
            lost: false,
        })
    }

    /// Gives recovery (and the log it opens) the businesses' field keys: records' user
    /// fields are visited in the clear, and new records are written under them.
    pub fn with_field_keys(mut self, fields: Option<std::sync::Arc<dyn FieldKeys>>) -> Recovery {
        self.fields = fields;
        self
    }

    /// Judges segment file `segment_id` holding `bytes`; segments are judged in ascending
    /// order of id. `visit(log index, record)` sees every record that stays in the log, in
    /// order (the idempotency table and delivery are rebuilt from them). Changes nothing.
    pub fn judge(
        &mut self,
        segment_id: u64,
        bytes: &[u8],
        visit: &mut dyn FnMut(u64, &OwnedRecord),
    ) -> Result<(), RecoverError> {
        if let Some(after) = self.last.filter(|&l| l >= segment_id) {
            return Err(RecoverError::OutOfOrder { segment_id, after });
        }
        self.last = Some(segment_id);
        if !self.lost {
            self.lost = SegmentHeader::decode(bytes).is_ok_and(|h| self.before.lost_before(&h));
        }
        if self.lost {
            // Removed before a torn tail is cut (see the module docs).
            self.repairs.insert(
                0,
                Repair::Remove {
                    segment_id,
                    reason: RemoveReason::AfterLostRecords,
                },
            );
            return Ok(());
        }
        let verdict = recover_segment_with_fields(
            segment_id,
            bytes,
            &self.keyring,
            &self.master,
            self.payload_bytes_max,
            self.fields.as_ref(),
            visit,
        )?;
        match verdict {
            SegmentVerdict::Keep(s) => {
                self.before = Before::kept(&s);
                self.kept.push(s);
            }
            SegmentVerdict::Truncate { summary, to, cause } => {
                self.before = Before::kept(&summary);
                self.kept.push(summary);
                self.repairs.push(Repair::Truncate {
                    segment_id,
                    to,
                    cause,
                });
            }
            SegmentVerdict::Remove(reason) => {
                self.before = match reason {
                    // Its records, if any reached the disk, cannot be read.
                    RemoveReason::TornHeader => Before::TornHeader,
                    // Retention's (the oldest segments): nothing before is owed.
                    RemoveReason::KeyDestroyed | RemoveReason::AfterLostRecords => Before::Nothing,
                };
                self.repairs.push(Repair::Remove { segment_id, reason })
            }
        }
        Ok(())
    }

    /// Every segment was judged: what to repair, then [`RecoveryPlan::open`].
    pub fn plan(self) -> RecoveryPlan {
        RecoveryPlan {
            fields: self.fields,
            repairs: self.repairs,
            keyring: self.keyring,
            master: self.master,
            kept: self.kept,
        }
    }
}

/// What recovery decided: repairs to perform, then the log to open.
#[derive(Debug)]
pub struct RecoveryPlan {
    /// Perform these (durably) before [`RecoveryPlan::open`].
    pub repairs: Vec<Repair>,
    fields: Option<std::sync::Arc<dyn FieldKeys>>,
    keyring: Keyring,
    master: MasterKey,
    kept: Vec<SegmentSummary>,
}

impl RecoveryPlan {
    /// Records found intact in the kept segments.
    pub fn records(&self) -> u64 {
        self.kept.iter().map(|s| u64::from(s.records)).sum()
    }

    /// Opens the log (after the repairs were performed): returns it and the actions to
    /// perform before serving (a new nonce epoch persisted, empty segments deleted, kept
    /// segments synced).
    pub fn open(self, cfg: LogConfig, shard: ShardId) -> Result<(Log, Vec<Action>), RecoverError> {
        let mut actions = Vec::new();
        let mut log = Log::open(
            cfg,
            shard,
            self.master,
            self.keyring,
            self.kept,
            &mut actions,
        )?;
        log.set_field_keys(self.fields);
        Ok((log, actions))
    }
}
