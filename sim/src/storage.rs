//! Fault-injecting in-memory storage, recovery over it ([`recover`]), an auditor's read
//! of everything on it ([`read_all`]), and [`SimShell`], a shell over it that performs a
//! bare [`Log`]'s actions the way `src/` does with files (for the log's own tests).
//! Everything is seeded: a failing seed replays exactly.
//!
//! The storage model, per segment file: bytes written since the last successful sync are
//! *unsynced*. A crash keeps every synced byte and, of the unsynced ones, a random prefix
//! (possibly none, possibly all): the last write can be torn at any byte. A write may
//! also go over bytes already there (direct I/O rewrites the block the previous commit
//! ended in, and its zero padding): past the torn prefix a crash then leaves the bytes
//! the last sync made durable. A failed sync
//! syncs nothing, and its bytes stay readable until the crash that loses them (as Linux
//! may drop dirty pages after a writeback error while reads still see them). Creating and
//! deleting a file, truncating it, and replacing the keyring are durable at once (the
//! shell fsyncs the directory, and the keyring is replaced by rename).

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use courier_pipeline::log::format::{HeaderError, SEGMENT_HEADER_BYTES};
use courier_pipeline::log::{
    Action, Keyring, Log, LogConfig, LogError, LogFailure, MasterKey, OwnedRecord, Record,
    RecoverError, Recovery, Repair, ScanOutcome, SegmentCodec, SegmentHeader, WriteFailure,
};
use courier_pipeline::wire::LogPosition;
use courier_pipeline::ShardId;

/// A storage error the simulation injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SimIoError {
    /// The capacity is used up (ENOSPC).
    #[error("no space left on device")]
    NoSpace,
    /// fsync failed (EIO).
    #[error("input/output error")]
    Io,
}

#[derive(Debug, Default, Clone)]
struct MemFile {
    data: Vec<u8>,
    /// Length of the durable image (what the last sync covered).
    synced: usize,
    /// The lowest offset written since the last sync, when below `synced`: the durable
    /// image's bytes from there to `synced` are kept in `durable_over`.
    dirty_from: Option<usize>,
    durable_over: Vec<u8>,
}

impl MemFile {
    /// Where the bytes a crash may tear start.
    fn unsynced_from(&self) -> usize {
        self.dirty_from.unwrap_or(self.synced)
    }
}

/// Files with synced and unsynced bytes, and injectable faults.
#[derive(Debug)]
pub struct MemStorage {
    files: BTreeMap<u64, MemFile>,
    /// Every segment id ever created: an id created twice would reuse its nonces.
    ever_created: BTreeSet<u64>,
    keyring: Option<Vec<u8>>,
    rng: StdRng,
    /// Total bytes the segment files may hold; a write past it stores what fits and fails.
    pub capacity_bytes: Option<u64>,
    /// Every sync from now on fails.
    pub fail_syncs: bool,
    /// Every keyring replacement from now on fails (the old keyring stays).
    pub fail_keyring_writes: bool,
}

impl MemStorage {
    /// Empty storage whose crashes tear writes with randomness from `seed`.
    pub fn new(seed: u64) -> MemStorage {
        MemStorage {
            files: BTreeMap::new(),
            ever_created: BTreeSet::new(),
            keyring: None,
            rng: StdRng::seed_from_u64(seed),
            capacity_bytes: None,
            fail_syncs: false,
            fail_keyring_writes: false,
        }
    }

    fn used_bytes(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }

    /// Creates an empty file (durable). Panics if `id` was ever created before: segment
    /// ids are never reused, or nonces would be.
    pub fn create(&mut self, id: u64) {
        assert!(self.ever_created.insert(id), "segment id {id} reused");
        self.files.insert(id, MemFile::default());
    }

    /// Writes `bytes` at `offset`: the log appends, and with direct I/O writes its last
    /// block again and writes zeros ahead of its records (prepared space), possibly past
    /// the file's end: the hole reads as zeros, as a file system's does.
    pub fn write(&mut self, id: u64, offset: u64, bytes: &[u8]) -> Result<(), SimIoError> {
        let room = match self.capacity_bytes {
            Some(cap) => cap.saturating_sub(self.used_bytes()),
            None => u64::MAX,
        };
        let f = self.files.get_mut(&id).expect("write to an existing file");
        let offset = offset as usize;
        if offset > f.data.len() {
            // The hole reads as zeros (and counts as used space here).
            f.data.resize(offset, 0);
        }
        let over = (f.data.len() - offset).min(bytes.len());
        let n = over + (bytes.len() - over).min(usize::try_from(room).unwrap_or(usize::MAX));
        let from = f.unsynced_from();
        if offset < from {
            // Keep the durable bytes this write goes over, for a crash.
            let mut kept = f.data[offset..from].to_vec();
            kept.extend_from_slice(&f.durable_over);
            f.durable_over = kept;
            f.dirty_from = Some(offset);
        }
        f.data[offset..offset + over].copy_from_slice(&bytes[..over]);
        f.data.extend_from_slice(&bytes[over..n]);
        if n < bytes.len() {
            return Err(SimIoError::NoSpace);
        }
        Ok(())
    }

    /// fdatasync.
    pub fn sync(&mut self, id: u64) -> Result<(), SimIoError> {
        if self.fail_syncs {
            return Err(SimIoError::Io);
        }
        let f = self.files.get_mut(&id).expect("sync of an existing file");
        f.synced = f.data.len();
        f.dirty_from = None;
        f.durable_over.clear();
        Ok(())
    }

    /// Truncates a file (durable).
    pub fn truncate(&mut self, id: u64, len: u64) {
        let f = self.files.get_mut(&id).expect("truncate an existing file");
        f.data.truncate(len as usize);
        let len = f.data.len();
        if let Some(from) = f.dirty_from {
            if len <= from {
                f.dirty_from = None;
                f.durable_over.clear();
            } else {
                f.durable_over.truncate(len - from);
            }
        }
        f.synced = f.synced.min(len);
    }

    /// Removes a file (durable).
    pub fn delete(&mut self, id: u64) {
        self.files.remove(&id);
    }

    /// Replaces the keyring (atomic and durable).
    pub fn put_keyring(&mut self, bytes: &[u8]) -> Result<(), SimIoError> {
        if self.fail_keyring_writes {
            return Err(SimIoError::Io);
        }
        self.keyring = Some(bytes.to_vec());
        Ok(())
    }

    /// The keyring's bytes, if one was written.
    pub fn keyring(&self) -> Option<&[u8]> {
        self.keyring.as_deref()
    }

    /// Segment file ids, ascending.
    pub fn file_ids(&self) -> Vec<u64> {
        self.files.keys().copied().collect()
    }

    /// A file's current bytes (synced or not), as a reader would see them.
    pub fn file(&self, id: u64) -> Option<&[u8]> {
        self.files.get(&id).map(|f| f.data.as_slice())
    }

    /// Mutable access for tests that corrupt bytes on "disk" (the change counts as synced).
    pub fn file_mut(&mut self, id: u64) -> Option<&mut Vec<u8>> {
        self.files.get_mut(&id).map(|f| {
            f.synced = 0;
            f.dirty_from = None;
            f.durable_over.clear();
            &mut f.data
        })
    }

    /// Power loss: every file keeps its synced bytes plus a random prefix of its unsynced
    /// ones (none in half of the cases); where the unsynced bytes went over durable ones,
    /// those durable bytes are left past the prefix. What survives is on disk afterwards.
    pub fn crash(&mut self) {
        for f in self.files.values_mut() {
            let from = f.unsynced_from();
            let unsynced = f.data.len() - from;
            let keep = if unsynced == 0 || self.rng.random_bool(0.5) {
                0
            } else {
                self.rng.random_range(0..=unsynced)
            };
            f.data.truncate(from + keep);
            if f.data.len() < f.synced {
                let at = f.data.len() - from;
                f.data
                    .extend_from_slice(&f.durable_over[at..f.synced - from]);
            }
            f.synced = f.data.len();
            f.dirty_from = None;
            f.durable_over.clear();
        }
    }
}

/// Why the simulated shell could not start a log.
pub type BootError = RecoverError;

/// What a boot found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootReport {
    /// Segments whose torn tail was truncated.
    pub truncated: usize,
    /// Segment files removed (torn header, destroyed key, or empty).
    pub removed: usize,
    /// Records found intact.
    pub records: u64,
}

/// A shell over [`MemStorage`] that performs a [`Log`]'s actions, as `src/` does.
///
/// Besides performing actions it checks the log's storage invariants: a write only goes
/// to a segment created since the last boot (recovered segments are never appended to).
/// [`SimShell::arm_power_loss`] cuts the power after a given number of storage
/// operations, so a crash can land between any two actions of one call.
#[derive(Debug)]
pub struct SimShell {
    /// The storage, faults included.
    pub storage: MemStorage,
    log: Option<Log>,
    cfg: LogConfig,
    shard: ShardId,
    master: [u8; 32],
    rng: StdRng,
    actions: Vec<Action>,
    created_this_boot: BTreeSet<u64>,
    ops_until_power_loss: Option<usize>,
}

impl SimShell {
    /// A shell over `storage`; call [`SimShell::boot`] before use.
    pub fn new(
        storage: MemStorage,
        cfg: LogConfig,
        shard: ShardId,
        master: [u8; 32],
        seed: u64,
    ) -> SimShell {
        SimShell {
            storage,
            log: None,
            cfg,
            shard,
            master,
            rng: StdRng::seed_from_u64(seed),
            actions: Vec::new(),
            created_this_boot: BTreeSet::new(),
            ops_until_power_loss: None,
        }
    }

    /// Recovery as the shell runs it at start: load the keyring, judge every segment,
    /// truncate torn tails, remove dead files, open the log and perform its actions.
    pub fn boot(&mut self) -> Result<BootReport, BootError> {
        self.created_this_boot.clear();
        self.ops_until_power_loss = None;
        let master = MasterKey::from_bytes(self.master);
        let (log, mut actions, report) = recover(
            &mut self.storage,
            master,
            self.cfg,
            self.shard,
            &mut |_, _| {},
        )?;
        self.log = Some(log);
        self.perform(&mut actions);
        Ok(report)
    }

    /// Cuts the power after `ops` more storage operations: later actions are not performed
    /// (call [`SimShell::crash_and_boot`] next).
    pub fn arm_power_loss(&mut self, ops: usize) {
        self.ops_until_power_loss = Some(ops);
    }

    /// Whether the power is off (an armed power loss struck).
    pub fn powered_off(&self) -> bool {
        self.ops_until_power_loss == Some(0)
    }

    /// The log (panics before [`SimShell::boot`]).
    pub fn log(&self) -> &Log {
        self.log.as_ref().expect("booted")
    }

    fn log_mut(&mut self) -> &mut Log {
        self.log.as_mut().expect("booted")
    }

    fn perform(&mut self, actions: &mut Vec<Action>) {
        for a in actions.drain(..) {
            match &mut self.ops_until_power_loss {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            if self.log().failure().is_some()
                && !matches!(
                    a,
                    Action::PersistKeyring { .. } | Action::DeleteSegment { .. }
                )
            {
                // After a failure nothing more is written; the log refuses appends anyway.
                continue;
            }
            match a {
                Action::PersistKeyring { bytes } => {
                    if self.storage.put_keyring(&bytes).is_err() {
                        self.log_mut().on_keyring_failed();
                    }
                }
                Action::CreateSegment { segment_id } => {
                    self.storage.create(segment_id);
                    self.created_this_boot.insert(segment_id);
                }
                Action::Write {
                    segment_id,
                    offset,
                    bytes,
                } => {
                    assert!(
                        self.created_this_boot.contains(&segment_id),
                        "write to segment {segment_id}, which was not created since the last boot"
                    );
                    if let Err(e) = self.storage.write(segment_id, offset, &bytes) {
                        let kind = match e {
                            SimIoError::NoSpace => WriteFailure::NoSpace,
                            SimIoError::Io => WriteFailure::Other,
                        };
                        self.log_mut().on_write_failed(segment_id, kind);
                    }
                }
                Action::SyncSegment { segment_id } => {
                    if self.storage.sync(segment_id).is_err() {
                        self.log_mut()
                            .on_write_failed(segment_id, WriteFailure::Other);
                    }
                }
                Action::DeleteSegment { segment_id } => self.storage.delete(segment_id),
            }
        }
    }

    /// Appends a batch at `now_ms` and performs the writes; returns the positions (not
    /// durable yet).
    pub fn append(
        &mut self,
        now_ms: u64,
        records: &[Record<'_>],
    ) -> Result<Vec<LogPosition>, LogError> {
        let mut actions = std::mem::take(&mut self.actions);
        let mut positions = Vec::with_capacity(records.len());
        let log = self.log.as_mut().expect("booted");
        let r = log.append(now_ms, &mut self.rng, records, &mut actions, &mut positions);
        self.perform(&mut actions);
        self.actions = actions;
        r?;
        // A write that failed while performing this append: its positions never become
        // durable, and the sender hears so now.
        match self.log().failure() {
            Some(f) => Err(LogError::Failed(f)),
            None => Ok(positions),
        }
    }

    /// Runs one group commit if one is due: returns the log indexes made durable.
    pub fn sync(&mut self) -> Result<std::ops::Range<u64>, LogFailure> {
        if let Some(f) = self.log().failure() {
            return Err(f);
        }
        assert!(
            !self.powered_off(),
            "sync after a power loss: crash_and_boot first"
        );
        let Some(req) = self.log_mut().begin_sync() else {
            let d = self.log().durable_end();
            return Ok(d..d);
        };
        for &segment_id in &req.segment_ids {
            if self.storage.sync(segment_id).is_err() {
                return Err(self.log_mut().on_sync_failed(req.id, segment_id));
            }
        }
        let range = self.log_mut().on_synced(req.id);
        match self.log().failure() {
            Some(f) => Err(f),
            None => Ok(range),
        }
    }

    /// Time-driven work; returns the dropped segment ids.
    pub fn tick(&mut self, now_ms: u64) -> Vec<u64> {
        let mut actions = std::mem::take(&mut self.actions);
        let dropped = self.log_mut().tick(now_ms, &mut actions);
        self.perform(&mut actions);
        self.actions = actions;
        dropped
    }

    /// Power loss, then a fresh boot.
    pub fn crash_and_boot(&mut self) -> Result<BootReport, BootError> {
        self.log = None;
        self.storage.crash();
        self.boot()
    }

    /// Reads every record on storage, segment by segment, as an auditor does (see
    /// [`read_all`]).
    pub fn read_all(&self) -> Result<Vec<(u64, OwnedRecord)>, String> {
        read_all(&self.storage, &self.master, self.cfg.payload_bytes_max)
    }
}

/// Recovery as the shell runs it at start: load the keyring, judge every segment
/// (`visit` sees every record that stays), truncate torn tails, remove dead files, open
/// the log. Returns it with the actions to perform before serving.
pub fn recover(
    storage: &mut MemStorage,
    master: MasterKey,
    cfg: LogConfig,
    shard: ShardId,
    visit: &mut dyn FnMut(u64, &OwnedRecord),
) -> Result<(Log, Vec<Action>, BootReport), BootError> {
    let mut report = BootReport::default();
    let ids = storage.file_ids();
    // Judge every segment before touching any: a wrong master key or corruption stops
    // the boot with storage as it was.
    let mut recovery = Recovery::new(
        storage.keyring(),
        !ids.is_empty(),
        master,
        cfg.payload_bytes_max,
    )?;
    for id in ids {
        let bytes = storage.file(id).expect("listed");
        recovery.judge(id, bytes, visit)?;
    }
    let plan = recovery.plan();
    for repair in &plan.repairs {
        match *repair {
            Repair::Truncate { segment_id, to, .. } => {
                storage.truncate(segment_id, to);
                report.truncated += 1;
            }
            Repair::Remove { segment_id, .. } => {
                storage.delete(segment_id);
                report.removed += 1;
            }
        }
    }
    report.records = plan.records();
    let (log, actions) = plan.open(cfg, shard)?;
    report.removed += actions
        .iter()
        .filter(|a| matches!(a, Action::DeleteSegment { .. }))
        .count();
    Ok((log, actions, report))
}

/// Reads every record on storage, segment by segment, as an auditor does: each one
/// authenticated, with its log index. A torn tail (a write cut by a crash or a full
/// disk, which the next recovery truncates) ends its segment; anything else is returned
/// as a problem.
pub fn read_all(
    storage: &MemStorage,
    master: &[u8; 32],
    payload_bytes_max: u32,
) -> Result<Vec<(u64, OwnedRecord)>, String> {
    let master = MasterKey::from_bytes(*master);
    let keyring =
        Keyring::from_bytes(storage.keyring().ok_or("no keyring")?).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for id in storage.file_ids() {
        let bytes = storage.file(id).expect("listed");
        let header = match SegmentHeader::decode(bytes) {
            Ok(h) => h,
            // Created, header never written whole (recovery removes it): no records.
            Err(HeaderError::Truncated(_)) => continue,
            Err(e) => return Err(format!("segment {id}: {e}")),
        };
        let key = keyring
            .data_key(&master, header.data_key_id)
            .map_err(|e| format!("segment {id}: {e}"))?;
        let codec = SegmentCodec::new(header, key, payload_bytes_max);
        let end = match codec.scan(bytes) {
            ScanOutcome::Clean(s) => s.bytes,
            ScanOutcome::TornTail { truncate_to, .. } => truncate_to,
            ScanOutcome::TornHeader { .. } => continue,
            ScanOutcome::Corrupt(c) => return Err(format!("segment {id}: {c}")),
        };
        let mut offset = SEGMENT_HEADER_BYTES as u64;
        let mut index = 0u32;
        while offset < end {
            let (rec, next) = codec
                .read_record(bytes, offset, index)
                .map_err(|e| format!("segment {id}: {e}"))?;
            out.push((header.first_index + u64::from(index), rec));
            offset = next;
            index += 1;
        }
    }
    Ok(out)
}
