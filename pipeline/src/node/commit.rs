//! The log's write side: [`GroupCommit`] owns a shard's [`Log`], turns its actions into
//! storage operations ([`Io`]), coalesces appended records' writes per segment, and runs
//! one group commit at a time.
//!
//! ```text
//!  append(records) ──> Log::append ──> PersistKeyring / CreateSegment ──> io queue
//!                                      Write ──> the group (joined per segment)
//!  tick(now)       ──> Log::tick ──> PersistKeyring / DeleteSegment ──> io queue
//!  poll_io(slots)  ──> the queue first; then, when a commit is due, none is in flight,
//!                      the queue is empty and the shell has the slots: Log::begin_sync,
//!                      one DurableWrite (write + fdatasync) per segment of the group
//!  complete(token) ──> when every write of the commit is back: Log::on_synced, or the
//!                      log failed for good (a failed write or sync is never retried)
//! ```
//!
//! Invariant: a commit starts only after every operation queued before it was handed out
//! (and, for metadata, performed: the shell performs those synchronously), so a segment
//! and the keyring holding its key exist before any record of it is written.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{Io, WriteOutcome};
use crate::log::{Action, AppendSink, Log, LogError, LogFailure, Record, WriteFailure};
use crate::wire::LogPosition;

/// Buffers of finished writes kept for the next commits.
const SPARE_BUFFERS_MAX: usize = 4;
/// Token bits that number a write within its commit.
const TOKEN_OP_BITS: u32 = 16;

/// Contiguous bytes for one segment, written by one `DurableWrite`.
#[derive(Debug)]
struct GroupWrite {
    segment_id: u64,
    offset: u64,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct InFlight {
    sync_id: u64,
    /// The segment of each write, by its number in the commit.
    segments: Vec<u64>,
    ops_left: usize,
    /// The first failure: its segment and how it failed.
    failure: Option<(u64, WriteOutcome)>,
}

/// What a write's completion meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Nothing to do yet: other writes of the commit are still out, or the log had
    /// already failed (and that was reported then).
    Nothing,
    /// The commit is durable: [`Log::durable_end`] moved.
    Synced,
    /// The commit failed; the log has failed for good.
    Failed(LogFailure),
}

/// A shard's log and its group commits. See the module docs.
#[derive(Debug)]
pub struct GroupCommit {
    log: Log,
    /// Randomness for new segment keys.
    rng: StdRng,
    group: Vec<GroupWrite>,
    spare: Vec<Vec<u8>>,
    in_flight: Option<InFlight>,
    io: VecDeque<Io>,
}

/// The group commit as the log's [`AppendSink`]: records are encoded straight into the
/// next commit's write for their segment, joining the previous one when they continue it
/// (one write per segment and commit, in a buffer recycled from an earlier commit);
/// metadata actions queue in order.
struct CommitSink<'a> {
    group: &'a mut Vec<GroupWrite>,
    spare: &'a mut Vec<Vec<u8>>,
    io: &'a mut VecDeque<Io>,
}

impl AppendSink for CommitSink<'_> {
    fn action(&mut self, action: Action) {
        let io = match action {
            Action::Write {
                segment_id,
                offset,
                bytes,
            } => {
                // Only a tick's actions arrive here (appends encode in place); none
                // writes today, but one that did would join the group like an append.
                self.buffer(segment_id, offset).extend_from_slice(&bytes);
                return;
            }
            Action::PersistKeyring { bytes } => Io::PersistKeyring { bytes },
            Action::CreateSegment { segment_id } => Io::CreateSegment { segment_id },
            Action::DeleteSegment { segment_id } => Io::DeleteSegment { segment_id },
            Action::SyncSegment { segment_id } => {
                // Only `Log::open` asks for these, and recovery performs them.
                unreachable!("a serving log asked to sync segment {segment_id}")
            }
        };
        self.io.push_back(io);
    }

    fn buffer(&mut self, segment_id: u64, offset: u64) -> &mut Vec<u8> {
        let continues = matches!(self.group.last(), Some(last)
            if last.segment_id == segment_id && last.offset + last.bytes.len() as u64 == offset);
        if !continues {
            let mut bytes = self.spare.pop().unwrap_or_default();
            bytes.clear();
            self.group.push(GroupWrite {
                segment_id,
                offset,
                bytes,
            });
        }
        &mut self
            .group
            .last_mut()
            .expect("a write was just pushed")
            .bytes
    }
}

impl GroupCommit {
    /// The write side of a recovered `log`; `seed` seeds the randomness of new segment
    /// keys (a CSPRNG's output in the shell, a test seed in simulation).
    pub fn new(log: Log, seed: [u8; 32]) -> GroupCommit {
        GroupCommit {
            log,
            rng: StdRng::from_seed(seed),
            group: Vec::new(),
            spare: Vec::new(),
            in_flight: None,
            io: VecDeque::new(),
        }
    }

    /// The log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Gives the log the businesses' field keys (a registry reload added businesses).
    pub fn set_field_keys(&mut self, keys: std::sync::Arc<dyn crate::log::FieldKeys>) {
        self.log.set_field_keys(Some(keys));
    }

    /// Appends a batch (all or none) at `now_ms`; `positions` gets one position per
    /// record. Durable once a commit covering it completes.
    pub fn append(
        &mut self,
        now_ms: u64,
        records: &[Record<'_>],
        positions: &mut Vec<LogPosition>,
    ) -> Result<(), LogError> {
        let mut sink = CommitSink {
            group: &mut self.group,
            spare: &mut self.spare,
            io: &mut self.io,
        };
        self.log
            .append(now_ms, &mut self.rng, records, &mut sink, positions)
    }

    /// The log's time-driven work (roll by age, retention); returns the dropped segments.
    pub fn tick(&mut self, now_ms: u64) -> Vec<u64> {
        let mut actions = Vec::new();
        let dropped = self.log.tick(now_ms, &mut actions);
        self.queue(actions);
        dropped
    }

    /// [`GroupCommit::tick`], dropping only segments ending at or below `end_max`.
    pub fn tick_below(&mut self, now_ms: u64, end_max: u64) -> Vec<crate::log::DroppedSegment> {
        let mut actions = Vec::new();
        let dropped = self.log.tick_below(now_ms, end_max, &mut actions);
        self.queue(actions);
        dropped
    }

    /// Whether nothing is left to do: no operation queued, no commit due or in flight.
    pub fn is_idle(&self) -> bool {
        self.io.is_empty() && self.in_flight.is_none() && !self.log.commit_due()
    }

    /// The next storage operation: queued ones first; then the due commit's writes, when
    /// the shell has `slots` for all of them.
    pub fn poll_io(&mut self, slots: usize) -> Option<Io> {
        if self.io.is_empty() && self.log.commit_due() {
            self.start(slots);
        }
        self.io.pop_front()
    }

    /// A metadata operation failed: the log fails for good, and the operations queued
    /// after it are dropped (nothing is written after a failure) except keyring updates
    /// and deletions, which destroy expired data.
    pub fn metadata_failed(&mut self) -> LogFailure {
        self.io
            .retain(|io| matches!(io, Io::DeleteSegment { .. } | Io::PersistKeyring { .. }));
        self.log.on_keyring_failed()
    }

    /// The segment a write of the commit in flight goes to.
    pub fn segment_of(&self, token: u64) -> Option<u64> {
        let inflight = self.in_flight.as_ref()?;
        if token >> TOKEN_OP_BITS != inflight.sync_id {
            return None;
        }
        let op = (token & ((1 << TOKEN_OP_BITS) - 1)) as usize;
        inflight.segments.get(op).copied()
    }

    /// Turns the log's actions into operations: writes join the group, the rest queue.
    fn queue(&mut self, actions: Vec<Action>) {
        let mut sink = CommitSink {
            group: &mut self.group,
            spare: &mut self.spare,
            io: &mut self.io,
        };
        for a in actions {
            sink.action(a);
        }
    }

    /// Starts the due commit when none is in flight and the shell has `slots` for all of
    /// its writes.
    fn start(&mut self, slots: usize) {
        debug_assert!(!self.group.is_empty(), "records pending have writes");
        if self.in_flight.is_some() || self.group.is_empty() || self.group.len() > slots {
            return;
        }
        assert!(
            self.group.len() < 1 << TOKEN_OP_BITS,
            "a commit's writes are numbered in 16 bits"
        );
        let req = self.log.begin_sync().expect("a commit is due");
        debug_assert!(self
            .group
            .iter()
            .all(|g| req.segment_ids.contains(&g.segment_id)));
        let mut segments = Vec::with_capacity(self.group.len());
        for (i, g) in self.group.drain(..).enumerate() {
            segments.push(g.segment_id);
            self.io.push_back(Io::DurableWrite {
                token: req.id << TOKEN_OP_BITS | i as u64,
                segment_id: g.segment_id,
                offset: g.offset,
                bytes: g.bytes,
            });
        }
        self.in_flight = Some(InFlight {
            sync_id: req.id,
            ops_left: segments.len(),
            segments,
            failure: None,
        });
    }

    /// One write of the commit in flight finished; `buf` is its buffer, for reuse.
    pub fn complete(&mut self, token: u64, outcome: WriteOutcome, mut buf: Vec<u8>) -> Completion {
        let segment_id = self
            .segment_of(token)
            .expect("a write of the commit in flight");
        let inflight = self.in_flight.as_mut().expect("checked");
        if outcome != WriteOutcome::Done && inflight.failure.is_none() {
            inflight.failure = Some((segment_id, outcome));
        }
        buf.clear();
        if self.spare.len() < SPARE_BUFFERS_MAX {
            self.spare.push(buf);
        }
        inflight.ops_left -= 1;
        if inflight.ops_left > 0 {
            return Completion::Nothing;
        }
        let inflight = self.in_flight.take().expect("checked");
        let Some((segment_id, outcome)) = inflight.failure else {
            self.log.on_synced(inflight.sync_id);
            // A metadata operation may have failed the log while the commit ran.
            return match self.log.failure() {
                Some(_) => Completion::Nothing,
                None => Completion::Synced,
            };
        };
        let kind = match outcome {
            WriteOutcome::NoSpace => Some(WriteFailure::NoSpace),
            WriteOutcome::WriteFailed => Some(WriteFailure::Other),
            WriteOutcome::SyncFailed | WriteOutcome::Done => None,
        };
        if let Some(k) = kind {
            self.log.on_write_failed(segment_id, k);
        }
        Completion::Failed(self.log.on_sync_failed(inflight.sync_id, segment_id))
    }
}
