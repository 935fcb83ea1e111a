//! One shard's log on disk: the files behind `courier_pipeline::log::Log`.
//!
//! ```text
//!  DATA_DIR/log/shard-K/keyring          wrapped data keys + nonce epoch (atomic replace)
//!  DATA_DIR/log/shard-K/<segment id>.seg segments, named by id (20 digits)
//!
//!  start:   keyring ─┐
//!           *.seg ───┴─> recover_segment (each) ─> truncate torn tail / remove / keep
//!                        (every record's ids to the caller: the idempotency table)
//!                        Log::open ─> actions performed synchronously before serving
//!  serving: Log::append ─> Write actions coalesced per segment into the group buffer
//!                          PersistKeyring / CreateSegment: synchronous (only on a roll)
//!           Log::begin_sync ─> one write + fdatasync (linked) per segment, via the ring
//!           completions ─> Log::on_synced (durable: ACK) | on_*_failed (failed for good)
//!           every second: Log::tick ─> retention drops (keyring first, then the files)
//! ```
//!
//! Invariants: a message is acknowledged `accepted` only after the fdatasync that covers
//! it completed; a failed write or sync fails the log for good (the engine refuses every
//! later append, and the shard answers `storage_unavailable`), it is never retried; a
//! segment's key is destroyed (keyring persisted) before its file is removed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use courier_pipeline::log::{
    recover_segment_visiting, Action, Log, LogConfig, LogFailure, MasterKey, OpenError,
    RecordHeader, RecoveryError, SegmentVerdict, SyncRequest, WriteFailure,
};
use courier_pipeline::log::{Keyring, KeyringError};
use courier_pipeline::profile::Profile;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::uring::{FileDone, FileOpKind, UdpRing};

/// Why a shard's log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written or synced.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The keyring file is damaged.
    #[error("{path}: {source}")]
    Keyring {
        /// The keyring file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: KeyringError,
    },
    /// Segments exist but the keyring does not: they can never be read.
    #[error("{dir}: segment files exist but the keyring is missing")]
    KeyringMissing {
        /// The shard's log directory.
        dir: PathBuf,
    },
    /// A segment is corrupt before its tail, or its key does not unwrap.
    #[error("{dir}: {source} (no data was changed; to serve without it, move the segment aside with a copy of the keyring: the next start destroys the keys of missing segments)")]
    Recovery {
        /// The shard's log directory.
        dir: PathBuf,
        /// What recovery found.
        #[source]
        source: RecoveryError,
    },
    /// The log could not be opened from the recovered segments (wrong master key included).
    #[error("{dir}: {source}")]
    Open {
        /// The shard's log directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: OpenError,
    },
}

/// A master key file's text, checked to parse; shared by the shards, each of which
/// parses its own [`MasterKey`]. `Debug` never shows it.
#[derive(Clone)]
pub struct MasterKeyText(Arc<Vec<u8>>);

impl std::fmt::Debug for MasterKeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeyText(<redacted>)")
    }
}

impl MasterKeyText {
    /// Checks that `text` is a master key (64 hex characters, optional newline).
    pub fn new(text: Vec<u8>) -> Result<MasterKeyText, courier_pipeline::log::KeyError> {
        MasterKey::parse(&text)?;
        Ok(MasterKeyText(Arc::new(text)))
    }

    /// Reads and checks a master key file.
    pub fn read(path: &Path) -> Result<MasterKeyText, String> {
        let text = fs::read(path).map_err(|e| format!("master key {}: {e}", path.display()))?;
        MasterKeyText::new(text).map_err(|e| format!("master key {}: {e}", path.display()))
    }

    /// A fresh random key (for `courier demo` and tests).
    pub fn random() -> MasterKeyText {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes[..]);
        let text = MasterKey::from_bytes(bytes).to_file_text();
        MasterKeyText(Arc::new(text.as_bytes().to_vec()))
    }

    /// The parsed key (for the operator tools in [`crate::audit`]).
    pub fn master_key(&self) -> MasterKey {
        MasterKey::parse(&self.0).expect("checked in new")
    }

    /// The key's 32 bytes, for wrapping the business root keys.
    pub(crate) fn key_bytes(&self) -> [u8; 32] {
        let text = self.master_key().to_file_text();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text.trim().as_bytes()[..64], &mut out).expect("parsed above");
        out
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old file or the new one: writes
/// `path` with extension `tmp` (created with `mode`, less the umask), syncs it, renames it
/// over `path` and syncs the directory.
pub fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// Writes a new random master key to `path` with mode 0600; refuses to overwrite.
pub fn write_new_master_key(path: &Path) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes[..]);
    let key = MasterKey::from_bytes(bytes);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.to_file_text().as_bytes())?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn segment_file_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The log directory of shard `shard` under `data_dir`.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join("log").join(format!("shard-{shard}"))
}

/// Segment ids present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name
            .strip_suffix(".seg")
            .and_then(|s| s.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// A group-commit write: contiguous bytes for one segment.
struct GroupWrite {
    segment_id: u64,
    offset: u64,
    bytes: Vec<u8>,
}

struct InFlight {
    sync_id: u64,
    ops_left: usize,
    failure: Option<(u64, Result<WriteFailure, ()>)>,
}

/// One shard's log and its files.
pub struct ShardStore {
    dir: PathBuf,
    dir_file: File,
    log: Log,
    files: HashMap<u64, Arc<File>>,
    group: Vec<GroupWrite>,
    in_flight: Option<InFlight>,
    rng: StdRng,
    actions: Vec<Action>,
    spare: Vec<Vec<u8>>,
    /// Bytes handed to group commits since open (for the metrics).
    appended_bytes: u64,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("dir", &self.dir)
            .field("next_index", &self.log.next_index())
            .field("durable_end", &self.log.durable_end())
            .finish_non_exhaustive()
    }
}

impl ShardStore {
    /// Opens (recovering) the log of `shard`: every segment is checked, a torn tail is
    /// truncated, a corrupt segment stops the shard with its id and offset, a new nonce
    /// epoch is persisted. Nothing is changed on disk before the master key was proven to
    /// unwrap every live key.
    ///
    /// `visit(log index, header)` sees every record that stays in the log, in log order
    /// (the idempotency table is rebuilt from them).
    pub fn open(
        data_dir: &Path,
        shard: usize,
        master_key: &MasterKeyText,
        profile: &Profile,
        visit: &mut dyn FnMut(u64, &RecordHeader),
    ) -> Result<ShardStore, StoreError> {
        let dir = shard_dir(data_dir, shard);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let master = || master_key.master_key();
        let keyring_path = dir.join("keyring");
        let ids = list_segments(&dir).map_err(io(&dir))?;
        let keyring = match fs::read(&keyring_path) {
            Ok(bytes) => Keyring::from_bytes(&bytes).map_err(|source| StoreError::Keyring {
                path: keyring_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !ids.is_empty() {
                    return Err(StoreError::KeyringMissing { dir });
                }
                Keyring::new()
            }
            Err(e) => return Err(io(&keyring_path)(e)),
        };
        let cfg = LogConfig::from_profile(profile);
        // Judge every segment before touching any.
        let mut verdicts = Vec::new();
        for &id in &ids {
            let path = dir.join(segment_file_name(id));
            let bytes = fs::read(&path).map_err(io(&path))?;
            let v = recover_segment_visiting(
                id,
                &bytes,
                &keyring,
                &master(),
                cfg.payload_bytes_max,
                visit,
            )
            .map_err(|source| StoreError::Recovery {
                dir: dir.clone(),
                source,
            })?;
            verdicts.push((id, path, v));
        }
        let mut kept = Vec::new();
        for (id, path, v) in verdicts {
            match v {
                SegmentVerdict::Keep(s) => kept.push(s),
                SegmentVerdict::Truncate { summary, to, cause } => {
                    tracing::warn!(segment = id, to, %cause, "truncating a torn tail");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io(&path))?;
                    f.set_len(to)
                        .and_then(|_| f.sync_all())
                        .map_err(io(&path))?;
                    kept.push(summary);
                }
                SegmentVerdict::Remove(reason) => {
                    tracing::warn!(
                        segment = id,
                        ?reason,
                        "removing a segment that holds no readable record"
                    );
                    fs::remove_file(&path).map_err(io(&path))?;
                }
            }
        }
        let dir_file = File::open(&dir).map_err(io(&dir))?;
        dir_file.sync_all().map_err(io(&dir))?;
        let mut actions = Vec::new();
        let log = Log::open(cfg, shard as u16, master(), keyring, kept, &mut actions).map_err(
            |source| StoreError::Open {
                dir: dir.clone(),
                source,
            },
        )?;
        let mut store = ShardStore {
            dir,
            dir_file,
            log,
            files: HashMap::new(),
            group: Vec::new(),
            in_flight: None,
            rng: StdRng::from_os_rng(),
            actions: Vec::new(),
            spare: Vec::new(),
            appended_bytes: 0,
        };
        for a in actions {
            let what = format!("{a:?}");
            store.perform_now(a).map_err(|source| StoreError::Io {
                path: store.dir.join(what),
                source,
            })?;
        }
        Ok(store)
    }

    /// The engine.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The engine, to append to. Perform what it returns with [`Self::take_actions`].
    pub fn log_mut(&mut self) -> (&mut Log, &mut StdRng, &mut Vec<Action>) {
        (&mut self.log, &mut self.rng, &mut self.actions)
    }

    /// Bytes the log appended since this store was opened (sealed records with their
    /// framing, as written to segments).
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// Performs the actions the last engine call pushed: keyring, segment creation and
    /// deletion synchronously; writes into the group buffer (sent by `commit`).
    /// An IO error here fails the log for good.
    pub fn take_actions(&mut self) -> Result<(), LogFailure> {
        let actions = std::mem::take(&mut self.actions);
        let mut result = Ok(());
        for a in actions {
            if result.is_err() {
                break;
            }
            result = match a {
                Action::Write {
                    segment_id,
                    offset,
                    bytes,
                } => {
                    self.add_to_group(segment_id, offset, &bytes);
                    Ok(())
                }
                other => {
                    let what = format!("{other:?}");
                    self.perform_now(other).map_err(|e| {
                        tracing::error!(action = %what, error = %e, "log action failed; the log stops taking messages");
                        self.log.on_keyring_failed()
                    })
                }
            };
        }
        result
    }

    fn add_to_group(&mut self, segment_id: u64, offset: u64, bytes: &[u8]) {
        self.appended_bytes += bytes.len() as u64;
        if let Some(last) = self.group.last_mut() {
            if last.segment_id == segment_id && last.offset + last.bytes.len() as u64 == offset {
                last.bytes.extend_from_slice(bytes);
                return;
            }
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.group.push(GroupWrite {
            segment_id,
            offset,
            bytes: buf,
        });
    }

    /// Starts a group commit if one is due, none is in flight and the ring has room:
    /// one write+fdatasync per segment written since the last.
    pub fn commit(&mut self, ring: &mut UdpRing) {
        if self.in_flight.is_some() || !self.log.commit_due() || self.group.is_empty() {
            return;
        }
        if ring.file_slots_free() < self.group.len() {
            return;
        }
        let SyncRequest {
            id, segment_ids, ..
        } = self.log.begin_sync().expect("commit due");
        debug_assert!(self
            .group
            .iter()
            .all(|g| segment_ids.contains(&g.segment_id)));
        let n = self.group.len();
        for g in self.group.drain(..) {
            let file = self
                .files
                .get(&g.segment_id)
                .expect("segment created")
                .clone();
            ring.submit_file(
                file,
                FileOpKind::DurableWrite,
                g.offset,
                g.bytes,
                g.segment_id << 16 | (id & 0xffff),
            )
            .expect("free slots checked");
        }
        self.in_flight = Some(InFlight {
            sync_id: id,
            ops_left: n,
            failure: None,
        });
    }

    /// A file operation of the group commit finished. Returns the failure when the log
    /// just failed.
    pub fn on_file_done(&mut self, done: FileDone) -> Option<LogFailure> {
        let inflight = self.in_flight.as_mut().expect("a group commit in flight");
        let segment_id = done.token >> 16;
        let len = done.data.len();
        if !done.is_complete(len) && inflight.failure.is_none() {
            let kind = match &done.written {
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(WriteFailure::NoSpace),
                Ok(n) if *n < len => Ok(WriteFailure::NoSpace),
                Err(_) => Ok(WriteFailure::Other),
                Ok(_) => Err(()), // the write went through, the sync failed
            };
            tracing::error!(
                segment = segment_id,
                written = ?done.written.as_ref().map_err(|e| e.to_string()),
                synced = ?done.synced.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())),
                "group commit failed; the log stops taking messages and never retries"
            );
            inflight.failure = Some((segment_id, kind));
        }
        let mut buf = done.data;
        buf.clear();
        if self.spare.len() < 4 {
            self.spare.push(buf);
        }
        inflight.ops_left -= 1;
        if inflight.ops_left > 0 {
            return None;
        }
        let inflight = self.in_flight.take().expect("checked");
        match inflight.failure {
            None => {
                self.log.on_synced(inflight.sync_id);
                // Only the newest segment is written again; close the others' files.
                if let Some(&newest) = self.files.keys().max() {
                    let group = &self.group;
                    self.files
                        .retain(|&id, _| id == newest || group.iter().any(|g| g.segment_id == id));
                }
                None
            }
            Some((segment_id, kind)) => {
                if let Ok(k) = kind {
                    self.log.on_write_failed(segment_id, k);
                }
                Some(self.log.on_sync_failed(inflight.sync_id, segment_id))
            }
        }
    }

    /// Time-driven work: roll by age, retention drops. Bounded per call by the engine.
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<u64>, LogFailure> {
        let mut actions = Vec::new();
        let dropped = self.log.tick(now_ms, &mut actions);
        self.actions.extend(actions);
        self.take_actions()?;
        Ok(dropped)
    }

    fn perform_now(&mut self, a: Action) -> std::io::Result<()> {
        match a {
            Action::PersistKeyring { bytes } => {
                let tmp = self.dir.join("keyring.tmp");
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                fs::rename(&tmp, self.dir.join("keyring"))?;
                self.dir_file.sync_all()
            }
            Action::CreateSegment { segment_id } => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(self.dir.join(segment_file_name(segment_id)))?;
                self.dir_file.sync_all()?;
                self.files.insert(segment_id, Arc::new(f));
                Ok(())
            }
            Action::Write {
                segment_id,
                offset,
                bytes,
            } => {
                let f = self.segment_file(segment_id)?;
                f.write_all_at(&bytes, offset)?;
                f.sync_data()
            }
            Action::SyncSegment { segment_id } => self.segment_file(segment_id)?.sync_data(),
            Action::DeleteSegment { segment_id } => {
                self.files.remove(&segment_id);
                match fs::remove_file(self.dir.join(segment_file_name(segment_id))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                self.dir_file.sync_all()
            }
        }
    }

    fn segment_file(&mut self, segment_id: u64) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.files.get(&segment_id) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.dir.join(segment_file_name(segment_id)))?,
        );
        self.files.insert(segment_id, f.clone());
        Ok(f)
    }
}
