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
//!                      one DurableWrite (a write durable when done) per segment of the group
//!  complete(token) ──> when every write of the commit is back: Log::on_synced, or the
//!                      log failed for good (a failed write or sync is never retried)
//! ```
//!
//! Invariant: a commit starts only after every operation queued before it was handed out
//! (and, for metadata, performed: the shell performs those synchronously), so a segment
//! and the keyring holding its key exist before any record of it is written.
//!
//! Direct I/O ([`GroupCommit::with_direct_io`]): the shell writes segments with
//! `O_DIRECT`, past the page cache (which otherwise costs a kernel copy of every byte
//! logged). Such a write must start and end on a block boundary of the file and come
//! from memory aligned to the block. So each commit write starts at the block holding its
//! first byte, carrying again the bytes of that block an earlier commit wrote (the
//! *tail*, kept here: at most a block), and ends padded with zeros to the next boundary;
//! the next commit rewrites that block with the same leading bytes. Its records start
//! `skip` bytes into its buffer, where the buffer's address is aligned. Recovery reads
//! zeros after the last record as the end of the segment (`format`'s scan), so the
//! padding costs nothing there. A torn rewrite of the tail block cannot lose what an
//! earlier commit made durable in it: every sector of it is either the old bytes or the
//! new ones, and both hold the same leading bytes (the page cache rewrites whole pages
//! the same way). A run's first appends open a new segment, so at start-up there is a
//! tail only when records were appended before serving (the `expired` statuses of a
//! retention drop): the shell reads it back from the file ([`DirectIo::tail`]).
//!
//! Prepared space ([`DirectIo::prepare_ahead`], `log.prepare_ahead_bytes`): with direct
//! I/O the group commit also keeps the open segment written with zeros some way past its
//! records ([`Io::PrepareSpace`], one chunk at a time, each as durable as a commit), so
//! that a commit overwrites blocks the file system has already allocated and recorded.
//! An appending `RWF_DSYNC` write has to allocate blocks and change the file's size,
//! which io_uring always hands to a kernel worker thread and the file system journals; an
//! overwrite of written blocks mostly runs from the shard's own thread (BENCHMARKS.md,
//! "Space prepared ahead of the log's records"). Zeros are what recovery already reads as
//! a segment's end, so a crash anywhere leaves a segment it reads as before. Two rules
//! keep the zeros off records: a zero write starts on a chunk boundary past everything
//! appended when it is handed out, and a commit whose bytes would reach a zero write
//! still in flight waits for it (otherwise the zeros could land after the records); and
//! a segment is prepared only after a commit into it completed, so that its header is
//! durable (zeros written past a header not yet on disk leave a hole where it belongs,
//! which recovery must call corruption: the simulation found this). A
//! segment file ends in at most `prepare_ahead` plus a chunk of zeros past its records,
//! and none past `segment_bytes_max` rounded up to a chunk. A failed zero write (a full
//! disk) stops the preparing of that segment; its commits append, and meet the disk's
//! state themselves.

use std::collections::VecDeque;
use std::ops::Range;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{Io, LogWrite, WriteOutcome};
use crate::log::{Action, AppendSink, Log, LogError, LogFailure, Record, WriteFailure};
use crate::wire::LogPosition;

/// Buffers of finished writes kept for the next commits.
const SPARE_BUFFERS_MAX: usize = 4;
/// Token bits that number a write within its commit.
const TOKEN_OP_BITS: u32 = 16;
/// With direct I/O, the capacity a new commit buffer starts with (a reallocation
/// loses the alignment, restored by one move when the commit starts).
const DIRECT_BUFFER_MIN_BYTES: usize = 256 * 1024;
/// Most bytes one zero write of prepared space covers.
const PREPARE_CHUNK_BYTES_MAX: u64 = 1 << 20;
/// Tokens of zero writes have this bit set (commit writes' tokens never reach it).
const PREPARE_TOKEN: u64 = 1 << 63;

/// Contiguous bytes for one segment, written by one `DurableWrite`: `bytes[skip..]` go
/// to `offset` (`bytes[..skip]` only align the rest's address, with direct I/O).
#[derive(Debug)]
struct GroupWrite {
    segment_id: u64,
    offset: u64,
    skip: usize,
    bytes: Vec<u8>,
}

impl GroupWrite {
    /// The file offset right after its last byte.
    fn end(&self) -> u64 {
        self.offset + (self.bytes.len() - self.skip) as u64
    }
}

/// How the shell writes segments with `O_DIRECT` ([`GroupCommit::with_direct_io`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectIo {
    /// Writes start and end on multiples of this (a power of two, the file system's
    /// block or a multiple of it), from memory aligned to it.
    pub block: usize,
    /// The bytes of the log's open segment ([`Log::open_segment`]) from its last block
    /// boundary to its end, read back from the file; empty when no segment is open.
    pub tail: Vec<u8>,
    /// Bytes of the open segment kept written with zeros ahead of its records, so that
    /// commits overwrite blocks the file system has already allocated instead of
    /// appending (see the module docs); 0 prepares nothing. A multiple of `block`.
    pub prepare_ahead: u64,
}

/// Direct I/O's alignment and the newest segment's partial last block.
#[derive(Debug)]
struct Direct {
    /// Writes start and end on multiples of this (a power of two), from memory aligned to
    /// it.
    block: usize,
    /// The bytes of the newest segment's last partial block that a commit wrote: the
    /// next write to that segment starts with them.
    tail: Option<Tail>,
}

#[derive(Debug)]
struct Tail {
    segment_id: u64,
    /// Where the block starts (aligned).
    offset: u64,
    /// Fewer than `block` bytes.
    bytes: Vec<u8>,
}

/// Space prepared ahead of the open segment's records ([`DirectIo::prepare_ahead`]).
#[derive(Debug)]
struct Prepare {
    /// Keep the segment written this far past its records.
    ahead: u64,
    /// One zero write covers this much (half of `ahead`, at least a block, at most
    /// [`PREPARE_CHUNK_BYTES_MAX`], a multiple of the block), starting on a multiple of
    /// it.
    chunk: u64,
    /// The segment being prepared, and how far its zeros are durable.
    segment_id: u64,
    end: u64,
    /// A zero write to this segment failed (a full disk): its later commits append.
    stopped: bool,
    /// The newest segment a commit completed in: a segment is prepared only once its
    /// header is durable (zeros ahead of it could otherwise leave a hole where the
    /// header belongs, which recovery must call corruption).
    written: Option<u64>,
    /// The zero write in flight: its token, segment and byte range.
    in_flight: Option<(u64, u64, Range<u64>)>,
    next_token: u64,
    /// The zeros (from the first address aligned to the block on), lent to the write in
    /// flight.
    zeros: Option<Vec<u8>>,
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

/// Readies a commit write for `O_DIRECT`: its bytes' address aligned again if a
/// reallocation moved them, the partial last block kept as the segment's tail, zeros up
/// to the next block boundary.
fn align_for_direct_io(g: &mut GroupWrite, d: &mut Direct) {
    let block = d.block;
    debug_assert_eq!(
        g.offset % block as u64,
        0,
        "a direct write starts on a block"
    );
    let len = g.bytes.len() - g.skip;
    // Room for the realignment and the padding below, so neither reallocates.
    g.bytes.reserve(2 * block);
    if g.bytes[g.skip..].as_ptr().align_offset(block) != 0 {
        // The buffer grew past its capacity and moved: one move puts it back in line.
        let skip = g.bytes.as_ptr().align_offset(block);
        if skip > g.skip {
            g.bytes.resize(skip + len, 0);
            g.bytes.copy_within(g.skip..g.skip + len, skip);
        } else {
            g.bytes.copy_within(g.skip..g.skip + len, skip);
            g.bytes.truncate(skip + len);
        }
        g.skip = skip;
    }
    let whole = len - len % block;
    let tail = d.tail.get_or_insert_with(|| Tail {
        segment_id: g.segment_id,
        offset: 0,
        bytes: Vec::with_capacity(block),
    });
    tail.segment_id = g.segment_id;
    tail.offset = g.offset + whole as u64;
    tail.bytes.clear();
    tail.bytes.extend_from_slice(&g.bytes[g.skip + whole..]);
    let padded = len.next_multiple_of(block);
    g.bytes.resize(g.skip + padded, 0);
    debug_assert_eq!(g.bytes[g.skip..].as_ptr().align_offset(block), 0);
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
    /// The segment list of the last commit, kept for the next one's.
    spare_segments: Vec<u64>,
    in_flight: Option<InFlight>,
    io: VecDeque<Io>,
    direct: Option<Direct>,
    prepare: Option<Prepare>,
}

/// The group commit as the log's [`AppendSink`]: records are encoded straight into the
/// next commit's write for their segment, joining the previous one when they continue it
/// (one write per segment and commit, in a buffer recycled from an earlier commit);
/// metadata actions queue in order.
struct CommitSink<'a> {
    group: &'a mut Vec<GroupWrite>,
    spare: &'a mut Vec<Vec<u8>>,
    io: &'a mut VecDeque<Io>,
    direct: Option<&'a Direct>,
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
            if last.segment_id == segment_id && last.end() == offset);
        if !continues {
            let mut bytes = self.spare.pop().unwrap_or_default();
            bytes.clear();
            let (skip, start) = match self.direct {
                None => (0, offset),
                Some(d) => {
                    // Room for a commit of a few hundred records before a reallocation
                    // (which `GroupCommit::start` realigns after).
                    bytes.reserve(DIRECT_BUFFER_MIN_BYTES + d.block);
                    let skip = bytes.as_ptr().align_offset(d.block);
                    bytes.resize(skip, 0);
                    match &d.tail {
                        Some(t)
                            if t.segment_id == segment_id
                                && t.offset + t.bytes.len() as u64 == offset =>
                        {
                            bytes.extend_from_slice(&t.bytes);
                            (skip, t.offset)
                        }
                        _ => {
                            assert!(
                                offset.is_multiple_of(d.block as u64),
                                "a direct write to segment {segment_id} at {offset} continues no known block"
                            );
                            (skip, offset)
                        }
                    }
                }
            };
            self.group.push(GroupWrite {
                segment_id,
                offset: start,
                skip,
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
            spare_segments: Vec::new(),
            in_flight: None,
            io: VecDeque::new(),
            direct: None,
            prepare: None,
        }
    }

    /// Commit writes for a shell that writes segments with `O_DIRECT`: aligned to
    /// `io.block` in memory, file offset and length, the open segment continuing from
    /// `io.tail` (see the module docs). Set before the first append.
    ///
    /// # Panics
    /// When `io.tail` is not the open segment's partial last block in length.
    pub fn with_direct_io(mut self, io: DirectIo) -> GroupCommit {
        let block = io.block;
        assert!(block.is_power_of_two(), "a block is a power of two");
        assert!(
            self.group.is_empty() && self.in_flight.is_none(),
            "direct I/O is chosen before the first append"
        );
        let tail = match self.log.open_segment() {
            Some((segment_id, end)) => {
                let offset = end - end % block as u64;
                assert_eq!(
                    io.tail.len() as u64,
                    end - offset,
                    "the tail is the open segment's partial last block"
                );
                Some(Tail {
                    segment_id,
                    offset,
                    bytes: io.tail,
                })
            }
            None => {
                assert!(io.tail.is_empty(), "no segment is open: no tail");
                None
            }
        };
        self.direct = Some(Direct { block, tail });
        assert!(
            io.prepare_ahead.is_multiple_of(block as u64),
            "space is prepared in whole blocks"
        );
        if io.prepare_ahead > 0 {
            // Two zero writes or more per `ahead`, so that one is written while the
            // records reach the other.
            let chunk = (io.prepare_ahead / 2).clamp(block as u64, PREPARE_CHUNK_BYTES_MAX);
            self.prepare = Some(Prepare {
                ahead: io.prepare_ahead,
                chunk: chunk - chunk % block as u64,
                segment_id: u64::MAX,
                end: 0,
                stopped: false,
                written: None,
                in_flight: None,
                next_token: 0,
                zeros: None,
            });
        }
        self
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
            direct: self.direct.as_ref(),
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

    /// Whether nothing is left to do: no operation queued, no commit due or in flight,
    /// no zero write in flight.
    pub fn is_idle(&self) -> bool {
        self.io.is_empty()
            && self.in_flight.is_none()
            && !self.log.commit_due()
            && self.prepare.as_ref().is_none_or(|p| p.in_flight.is_none())
    }

    /// The next storage operation: queued ones first; then the due commit's writes, when
    /// the shell has `slots` for all of them; then a zero write of space ahead.
    pub fn poll_io(&mut self, slots: usize) -> Option<Io> {
        if self.io.is_empty() && self.log.commit_due() {
            self.start(slots);
        }
        if let Some(io) = self.io.pop_front() {
            return Some(io);
        }
        self.poll_prepare(slots)
    }

    /// A zero write of the open segment's next chunk, when the prepared space reaches
    /// less than `ahead` past its records and none is in flight. Only after every queued
    /// operation was handed out (the segment exists), and always past the records and
    /// the commit in flight, on a chunk boundary beyond the records' end.
    fn poll_prepare(&mut self, slots: usize) -> Option<Io> {
        let p = self.prepare.as_mut()?;
        if p.in_flight.is_some() || slots == 0 || self.log.failure().is_some() {
            return None;
        }
        let (segment_id, end) = self.log.open_segment()?;
        if p.written.is_none_or(|w| w < segment_id) {
            return None;
        }
        if segment_id != p.segment_id {
            p.segment_id = segment_id;
            p.end = 0;
            p.stopped = false;
        }
        // The segment rolls once it holds `segment_bytes_max`: nothing past that.
        let cap = self
            .log
            .config()
            .segment_bytes_max
            .next_multiple_of(p.chunk);
        let from = p.end.max((end / p.chunk + 1) * p.chunk);
        if p.stopped || p.end >= end + p.ahead || from >= cap {
            return None;
        }
        let range = from..from + p.chunk;
        let token = PREPARE_TOKEN | p.next_token;
        p.next_token = (p.next_token + 1) % PREPARE_TOKEN;
        let block = self
            .direct
            .as_ref()
            .expect("prepared only with direct I/O")
            .block;
        let bytes = p.zeros.take().unwrap_or_else(|| {
            let mut z: Vec<u8> = Vec::with_capacity(p.chunk as usize + block);
            z.resize(z.as_ptr().align_offset(block) + p.chunk as usize, 0);
            z
        });
        // The buffer never grows, so its aligned start stays where it was.
        let skip = bytes.as_ptr().align_offset(block);
        p.in_flight = Some((token, segment_id, range.clone()));
        Some(Io::PrepareSpace(LogWrite {
            token,
            segment_id,
            offset: range.start,
            skip,
            bytes,
        }))
    }

    /// Whether `token` names a zero write of prepared space ([`Io::PrepareSpace`]).
    pub fn is_prepare(token: u64) -> bool {
        token & PREPARE_TOKEN != 0
    }

    /// A metadata operation failed: the log fails for good, and the operations queued
    /// after it are dropped (nothing is written after a failure) except keyring updates
    /// and deletions, which destroy expired data.
    pub fn metadata_failed(&mut self) -> LogFailure {
        self.io
            .retain(|io| matches!(io, Io::DeleteSegment { .. } | Io::PersistKeyring { .. }));
        self.log.on_keyring_failed()
    }

    /// The segment a write in flight goes to (a commit's or a zero write's).
    pub fn segment_of(&self, token: u64) -> Option<u64> {
        if Self::is_prepare(token) {
            let (t, segment_id, _) = self.prepare.as_ref()?.in_flight.as_ref()?;
            return (*t == token).then_some(*segment_id);
        }
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
            direct: self.direct.as_ref(),
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
        // A zero write in flight may not land after records written over it: such a
        // commit waits for it (rare: zeros are written a chunk or more ahead).
        if let Some((_, segment_id, range)) =
            self.prepare.as_ref().and_then(|p| p.in_flight.as_ref())
        {
            let block = self
                .direct
                .as_ref()
                .expect("prepared only with direct I/O")
                .block as u64;
            let overlaps = self.group.iter().any(|g| {
                let end = g.end().next_multiple_of(block);
                g.segment_id == *segment_id && g.offset < range.end && range.start < end
            });
            if overlaps {
                return;
            }
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
        self.log.reuse_segment_ids(req.segment_ids);
        let mut segments = std::mem::take(&mut self.spare_segments);
        segments.clear();
        for (i, mut g) in self.group.drain(..).enumerate() {
            if let Some(d) = self.direct.as_mut() {
                align_for_direct_io(&mut g, d);
            }
            segments.push(g.segment_id);
            self.io.push_back(Io::DurableWrite(LogWrite {
                token: req.id << TOKEN_OP_BITS | i as u64,
                segment_id: g.segment_id,
                offset: g.offset,
                skip: g.skip,
                bytes: g.bytes,
            }));
        }
        self.in_flight = Some(InFlight {
            sync_id: req.id,
            ops_left: segments.len(),
            segments,
            failure: None,
        });
    }

    /// One write finished (of the commit in flight, or a zero write); `buf` is its
    /// buffer, for reuse.
    pub fn complete(&mut self, token: u64, outcome: WriteOutcome, mut buf: Vec<u8>) -> Completion {
        if Self::is_prepare(token) {
            let p = self
                .prepare
                .as_mut()
                .expect("zero writes only when preparing");
            let (t, segment_id, range) = p.in_flight.take().expect("a zero write in flight");
            assert_eq!(t, token, "the zero write in flight completed");
            if segment_id == p.segment_id {
                match outcome {
                    WriteOutcome::Done => p.end = range.end,
                    // Not the log's failure: its commits append, and meet the disk's
                    // state themselves.
                    _ => p.stopped = true,
                }
            }
            debug_assert!(buf.iter().all(|&b| b == 0), "zeros come back as zeros");
            p.zeros = Some(buf);
            return Completion::Nothing;
        }
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
            if let Some(p) = self.prepare.as_mut() {
                p.written = p.written.max(inflight.segments.iter().max().copied());
            }
            self.spare_segments = inflight.segments;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::log::format::RecordHeader;
    use crate::log::{Keyring, LogConfig, MasterKey, Recovery};
    use crate::node::LogWrite;
    use crate::wire::Recipient;
    use crate::ShardId;
    use rand::{Rng, SeedableRng};

    const MASTER: [u8; 32] = [3; 32];

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes_max: 600 * 1024,
            segment_age_max_ms: 1 << 40,
            retention_ms: 1 << 41,
            group_commit_records_max: 10_000,
            group_commit_bytes_max: 4 << 20,
            payload_bytes_max: 1024,
            drops_per_step_max: 8,
        }
    }

    /// A fresh log (every test's the same), and the keyring persisting it asked for.
    fn open_log() -> (Log, Vec<Action>) {
        let mut actions = Vec::new();
        let log = Log::open(
            cfg(),
            ShardId::new(1),
            MasterKey::from_bytes(MASTER),
            Keyring::new(),
            Vec::new(),
            &mut actions,
        )
        .unwrap();
        (log, actions)
    }

    fn commit(direct: Option<usize>) -> GroupCommit {
        let c = GroupCommit::new(open_log().0, [9; 32]);
        match direct {
            Some(block) => c.with_direct_io(DirectIo {
                block,
                tail: Vec::new(),
                prepare_ahead: 0,
            }),
            None => c,
        }
    }

    /// A disk: the files and the keyring as the writes left them.
    #[derive(Default)]
    struct Disk {
        files: BTreeMap<u64, Vec<u8>>,
        keyring: Vec<u8>,
        writes: usize,
    }

    impl Disk {
        /// Performs a metadata operation at once; a write comes back, to be landed.
        fn perform(&mut self, io: Io) -> Option<LogWrite> {
            match io.into_write() {
                Ok(w) => return Some(w),
                Err(Io::PersistKeyring { bytes }) => self.keyring = bytes,
                Err(Io::CreateSegment { segment_id }) => {
                    self.files.insert(segment_id, Vec::new());
                }
                Err(Io::DeleteSegment { segment_id }) => {
                    self.files.remove(&segment_id);
                }
                Err(other) => unreachable!("{other:?} is a write"),
            }
            None
        }

        /// A write reaches the disk (past the file's end, the gap reads as zeros).
        fn land(&mut self, segment_id: u64, offset: u64, data: &[u8]) {
            let file = self.files.get_mut(&segment_id).expect("created first");
            let (start, end) = (offset as usize, offset as usize + data.len());
            if file.len() < end {
                file.resize(end, 0);
            }
            file[start..end].copy_from_slice(data);
        }
    }

    /// Performs every operation the commit hands out and completes its writes, as a shell
    /// would; a direct write is checked for its alignment first.
    fn run_commit(c: &mut GroupCommit, disk: &mut Disk, direct: Option<usize>) {
        let mut done = Vec::new();
        while let Some(io) = c.poll_io(16) {
            let Some(w) = disk.perform(io) else {
                continue;
            };
            assert!(
                !GroupCommit::is_prepare(w.token),
                "these tests prepare no space"
            );
            let data = &w.bytes[w.skip..];
            if let Some(block) = direct {
                assert_eq!(w.offset % block as u64, 0, "offset aligned");
                assert_eq!(data.len() % block, 0, "length aligned");
                assert_eq!(data.as_ptr().align_offset(block), 0, "memory aligned");
            } else {
                assert_eq!(w.skip, 0);
            }
            disk.land(w.segment_id, w.offset, data);
            disk.writes += 1;
            done.push((w.token, w.bytes));
        }
        for (token, buf) in done {
            c.complete(token, WriteOutcome::Done, buf);
        }
    }

    fn records(payload: &[u8], n: usize, t: u64) -> Vec<Record<'_>> {
        (0..n)
            .map(|i| Record {
                header: RecordHeader::message(
                    7,
                    t,
                    i as u64,
                    Recipient::parse(b"+15550001111").unwrap(),
                    0,
                ),
                payload: &payload[..(i * 37) % payload.len()],
            })
            .collect()
    }

    /// Records per commit: small commits (most end inside a block), then ones past the
    /// commit buffer's first capacity (the buffer grows and moves), over segment rolls.
    const COMMITS: &[usize] = &[1, 2, 3, 1, 40, 1, 700, 5, 900, 1, 2, 600, 3, 800, 1];

    /// Runs the same commits through a plain and a direct group commit: after each, every
    /// segment holds the same bytes, then only zeros up to a block boundary.
    fn commit_side_by_side(
        plain: &mut GroupCommit,
        direct: &mut GroupCommit,
        plain_disk: &mut Disk,
        direct_disk: &mut Disk,
        block: usize,
    ) {
        let payload = vec![0xab; 1000];
        for (i, &n) in COMMITS.iter().enumerate() {
            let t = 1_000 + i as u64;
            let batch = records(&payload, n, t);
            let (mut p1, mut p2) = (Vec::new(), Vec::new());
            plain.append(t, &batch, &mut p1).unwrap();
            direct.append(t, &batch, &mut p2).unwrap();
            assert_eq!(p1, p2);
            run_commit(plain, plain_disk, None);
            run_commit(direct, direct_disk, Some(block));
            assert_eq!(plain.log().durable_end(), direct.log().durable_end());
            assert_eq!(
                plain_disk.files.keys().collect::<Vec<_>>(),
                direct_disk.files.keys().collect::<Vec<_>>()
            );
            for (id, want) in &plain_disk.files {
                let got = &direct_disk.files[id];
                assert_eq!(
                    &got[..want.len()],
                    &want[..],
                    "segment {id} after commit {i}"
                );
                assert!(got[want.len()..].iter().all(|&b| b == 0));
                assert_eq!(got.len() % block, 0);
                assert!(got.len() - want.len() < block);
            }
        }
        assert!(plain_disk.files.len() >= 3, "the log rolled");
        assert_eq!(plain_disk.writes, direct_disk.writes);
    }

    /// Recovers a disk: no repair is needed; returns the records it holds.
    fn recover(disk: &Disk) -> u64 {
        let mut judge = Recovery::new(
            Some(&disk.keyring),
            true,
            MasterKey::from_bytes(MASTER),
            cfg().payload_bytes_max,
        )
        .unwrap();
        let mut seen = 0u64;
        for (&id, bytes) in &disk.files {
            judge.judge(id, bytes, &mut |_, _| seen += 1).unwrap();
        }
        let plan = judge.plan();
        assert!(plan.repairs.is_empty(), "{:?}", plan.repairs);
        seen
    }

    /// A write handed out and not completed: where it goes, and its bytes, which reach
    /// the disk only when it completes (so writes in flight land in any order).
    struct Pending {
        token: u64,
        segment_id: u64,
        range: Range<u64>,
        skip: usize,
        bytes: Vec<u8>,
        zeros: bool,
    }

    impl From<LogWrite> for Pending {
        fn from(w: LogWrite) -> Pending {
            Pending {
                token: w.token,
                segment_id: w.segment_id,
                range: w.offset..w.offset + (w.bytes.len() - w.skip) as u64,
                skip: w.skip,
                zeros: GroupCommit::is_prepare(w.token),
                bytes: w.bytes,
            }
        }
    }

    #[test]
    fn zeros_written_ahead_never_land_over_records_and_commits_go_over_them() {
        let block = 64;
        let payload = vec![0x5c; 300];
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = GroupCommit::new(open_log().0, [9; 32]).with_direct_io(DirectIo {
                block,
                tail: Vec::new(),
                prepare_ahead: 16 * block as u64,
            });
            let mut disk = Disk::default();
            let mut pending: Vec<Pending> = Vec::new();
            let (mut zero_writes, mut over_zeros, mut appended) = (0, 0, 0u64);
            // Ranges of each segment that completed zero writes covered.
            let mut zeroed: Vec<(u64, Range<u64>)> = Vec::new();
            for step in 0..400u64 {
                match rng.random_range(0..4) {
                    0 => {
                        let n = rng.random_range(1..6);
                        let mut positions = Vec::new();
                        c.append(step, &records(&payload, n, step), &mut positions)
                            .unwrap();
                        appended += n as u64;
                    }
                    1 | 2 => {
                        while let Some(io) = c.poll_io(16) {
                            let Some(w) = disk.perform(io) else {
                                continue;
                            };
                            let p = Pending::from(w);
                            assert_eq!(p.range.start % block as u64, 0);
                            assert_eq!(p.range.end % block as u64, 0);
                            assert_eq!(p.bytes[p.skip..].as_ptr().align_offset(block), 0);
                            for q in &pending {
                                assert!(
                                    q.segment_id != p.segment_id
                                        || q.range.end <= p.range.start
                                        || p.range.end <= q.range.start,
                                    "seed {seed}: {:?} handed out over {:?} in flight",
                                    p.range,
                                    q.range
                                );
                            }
                            if p.zeros {
                                zero_writes += 1;
                                assert!(p.bytes[p.skip..].iter().all(|&b| b == 0));
                                let end = disk.files[&p.segment_id].len() as u64;
                                assert!(p.range.start >= end, "zeros past what is on disk");
                                assert!(
                                    end > 0,
                                    "seed {seed}: zeros before the segment's header is on disk"
                                );
                            } else if zeroed.iter().any(|(s, z)| {
                                // New bytes (past the block carried again) on prepared
                                // space.
                                *s == p.segment_id
                                    && z.start < p.range.end
                                    && p.range.start + (block as u64) < z.end
                            }) {
                                over_zeros += 1;
                            }
                            pending.push(p);
                        }
                    }
                    _ if !pending.is_empty() => {
                        // Any write in flight completes: it lands now.
                        let p = pending.swap_remove(rng.random_range(0..pending.len()));
                        disk.land(p.segment_id, p.range.start, &p.bytes[p.skip..]);
                        if p.zeros {
                            zeroed.push((p.segment_id, p.range.clone()));
                        }
                        c.complete(p.token, WriteOutcome::Done, p.bytes);
                    }
                    _ => {}
                }
            }
            // Everything left lands; every record is durable and reads back.
            while !c.is_idle() || !pending.is_empty() {
                while let Some(io) = c.poll_io(16) {
                    let w = io.into_write().expect("no metadata after the last append");
                    pending.push(Pending::from(w));
                }
                if let Some(p) = pending.pop() {
                    disk.land(p.segment_id, p.range.start, &p.bytes[p.skip..]);
                    c.complete(p.token, WriteOutcome::Done, p.bytes);
                }
            }
            assert_eq!(c.log().durable_end(), appended);
            assert_eq!(recover(&disk), appended, "seed {seed}");
            assert!(
                zero_writes > 0 && over_zeros > 0,
                "seed {seed}: {zero_writes} zero writes, {over_zeros} commits over zeros"
            );
        }
    }

    #[test]
    fn direct_writes_are_aligned_and_leave_the_same_records_as_the_page_cache() {
        let block = 512;
        let (mut plain, mut direct) = (commit(None), commit(Some(block)));
        let (mut plain_disk, mut direct_disk) = (Disk::default(), Disk::default());
        commit_side_by_side(
            &mut plain,
            &mut direct,
            &mut plain_disk,
            &mut direct_disk,
            block,
        );
        // Recovery reads the padded segments as clean, with every record.
        let total: usize = COMMITS.iter().sum();
        assert_eq!(recover(&plain_disk), total as u64);
        assert_eq!(recover(&direct_disk), total as u64);
    }

    #[test]
    fn a_segment_opened_before_serving_continues_from_its_tail() {
        let block = 512;
        // Before serving, records appended through the log alone and synced, as the
        // `expired` statuses of a retention drop at start-up are: the segment they open
        // stays open, ending inside a block.
        let opened = || {
            let (mut log, mut actions) = open_log();
            let mut rng = StdRng::from_seed([5; 32]);
            let payload = vec![0xcd; 300];
            let mut positions = Vec::new();
            log.append(
                900,
                &mut rng,
                &records(&payload, 3, 900),
                &mut actions,
                &mut positions,
            )
            .unwrap();
            let req = log.begin_sync().expect("a sync is due");
            log.on_synced(req.id);
            let mut disk = Disk::default();
            for a in actions {
                match a {
                    Action::PersistKeyring { bytes } => disk.keyring = bytes,
                    Action::CreateSegment { segment_id } => {
                        disk.files.insert(segment_id, Vec::new());
                    }
                    Action::Write {
                        segment_id,
                        offset,
                        bytes,
                    } => {
                        let f = disk.files.get_mut(&segment_id).unwrap();
                        assert_eq!(f.len() as u64, offset);
                        f.extend_from_slice(&bytes);
                    }
                    other => panic!("{other:?}"),
                }
            }
            (log, disk)
        };
        let ((plain_log, mut plain_disk), (direct_log, mut direct_disk)) = (opened(), opened());
        let (id, end) = direct_log.open_segment().expect("the appends opened one");
        assert_ne!(end % block as u64, 0, "it ends inside a block");
        let from = (end - end % block as u64) as usize;
        let tail = direct_disk.files[&id][from..end as usize].to_vec();
        let mut plain = GroupCommit::new(plain_log, [9; 32]);
        let mut direct = GroupCommit::new(direct_log, [9; 32]).with_direct_io(DirectIo {
            block,
            tail,
            prepare_ahead: 0,
        });
        commit_side_by_side(
            &mut plain,
            &mut direct,
            &mut plain_disk,
            &mut direct_disk,
            block,
        );
        let total: usize = COMMITS.iter().sum::<usize>() + 3;
        assert_eq!(recover(&plain_disk), total as u64);
        assert_eq!(recover(&direct_disk), total as u64);
    }

    #[test]
    fn a_buffer_that_moved_is_aligned_again_and_padded_and_its_tail_kept() {
        let block = 64;
        for shift in [1, 5, 63] {
            for len in [1usize, 63, 64, 65, 200] {
                // Records starting `shift` bytes past an aligned address, as after a
                // reallocation.
                let mut bytes: Vec<u8> = Vec::with_capacity(1024);
                let skip = bytes.as_ptr().align_offset(block) + shift;
                bytes.resize(skip, 0);
                let data: Vec<u8> = (0..len).map(|i| (i % 251 + 1) as u8).collect();
                bytes.extend_from_slice(&data);
                let mut g = GroupWrite {
                    segment_id: 4,
                    offset: 128,
                    skip,
                    bytes,
                };
                let mut d = Direct { block, tail: None };
                align_for_direct_io(&mut g, &mut d);
                let out = &g.bytes[g.skip..];
                assert_eq!(out.as_ptr().align_offset(block), 0);
                assert_eq!(out.len(), len.next_multiple_of(block));
                assert_eq!(&out[..len], &data[..]);
                assert!(out[len..].iter().all(|&b| b == 0));
                let tail = d.tail.expect("kept");
                assert_eq!(tail.segment_id, 4);
                assert_eq!(tail.offset, 128 + (len - len % block) as u64);
                assert_eq!(tail.bytes, data[len - len % block..]);
            }
        }
    }
}
