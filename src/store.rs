//! One shard's log on disk: the files behind `courier_pipeline::log::Log`. It decides
//! nothing: recovery's decisions come from `courier_pipeline::log::Recovery`, and while
//! serving it performs the shard core's storage operations (`courier_pipeline::node::Io`).
//!
//! ```text
//!  DATA_DIR/log/shard-K/keyring          wrapped data keys + nonce epoch (atomic replace)
//!  DATA_DIR/log/shard-K/<segment id>.seg segments, named by id (20 digits)
//!
//!  start:   keyring, *.seg (bytes) ──> Recovery::judge (each; nothing touched yet)
//!           RecoveryPlan: truncate torn tails, remove dead files (here, durably)
//!           RecoveryPlan::open ──> Log + actions performed here before serving
//!  serving: Io::PersistKeyring / CreateSegment / DeleteSegment ──> perform (synchronous)
//!           Io::DurableWrite ──> segment_file() for the ring's RWF_DSYNC write
//! ```
//!
//! Invariants kept by the performing: the keyring is replaced atomically and durably
//! (temporary file, fsync, rename, directory fsync); a segment's creation and removal are
//! durable (directory fsync) before the next operation.
//!
//! Direct I/O (`log.direct_io`, on by default): the files the ring writes commits to are
//! opened with `O_DIRECT`, so a commit's bytes go from the shard's buffer to the device
//! without a copy into the page cache; the core aligns every commit write to
//! [`DIRECT_IO_BLOCK`] (`courier_pipeline::node::GroupCommit::with_direct_io`). A file
//! system that refuses it (tmpfs before Linux 6.6, some network file systems) is found by
//! a probe write at start-up, and the shard then writes through the page cache as before.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use courier_pipeline::log::{
    Action, Log, LogConfig, MasterKey, OwnedRecord, RecoverError, Recovery, RemoveReason, Repair,
};
use courier_pipeline::node::{DirectIo, Io};
use courier_pipeline::ShardId;

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
    /// The keyring is damaged or missing, a segment is corrupt before its tail, a key
    /// does not unwrap (wrong master key), or the segments do not form a log.
    #[error("{dir}: {source}{}", remedy(.source))]
    Recovery {
        /// The shard's log directory.
        dir: PathBuf,
        /// What recovery found.
        #[source]
        source: RecoverError,
    },
    /// The `expired` statuses owed before a retention drop could not be appended.
    #[error("{dir}: the expired statuses owed before a retention drop: {source}")]
    Append {
        /// The shard's log directory.
        dir: PathBuf,
        /// Why the log refused them.
        #[source]
        source: courier_pipeline::log::LogError,
    },
    /// A secret file of the log (its keyring) is open to the group or others.
    #[error("{reason}")]
    Insecure {
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// What an operator can do about a recovery error, when anything.
fn remedy(e: &RecoverError) -> &'static str {
    match e {
        RecoverError::Segment(_) => " (no data was changed; to serve without it, move the segment aside with a copy of the keyring: the next start destroys the keys of missing segments)",
        _ => "",
    }
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
        check_private_file(path).map_err(|e| format!("master key {e}"))?;
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

/// Replaces `path` with `bytes` so that a crash leaves the old file or the new one:
/// writes a new temporary file beside it (a random name, created exclusively and without
/// following symbolic links, so nothing planted at a predictable name is written through),
/// sets its mode to exactly `mode` whatever the umask, syncs it, renames it over `path`
/// and syncs the directory.
pub fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    let tmp = path.with_file_name(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = f
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// Creates `dir` and its missing parents with mode 0700 (owner only; the umask can only
/// narrow it). A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Refuses a secret file that its group or others may read or write, as ssh refuses a
/// private key: the message says how to fix it. Symbolic links are followed (a key kept
/// elsewhere and linked in is judged by its own mode).
pub fn check_private_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:04o}: a key file must not be open to its group or others; \
             fix it with `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// The data directory's single owner: an exclusive advisory lock (`flock`) on
/// `DATA_DIR/lock`, held by a running server until its shards have stopped. Two servers
/// on one directory would both append to the same logs and seal under the same nonce
/// epochs (SO_REUSEPORT lets the second bind the port silently), so the second refuses
/// to start. The kernel releases the lock when the process ends, however it ends: a
/// SIGKILLed server leaves no stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock of `data_dir`, or says that another process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held { path }),
            Err(std::fs::TryLockError::Error(source)) => Err(LockError::Io { path, source }),
        }
    }
}

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (a running `courier serve`) holds the directory.
    #[error("{path} is locked: another courier server is using this data directory; stop it first (two servers on one directory would repeat nonces and corrupt the logs)")]
    Held {
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be opened or locked.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
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
pub fn shard_dir(data_dir: &Path, shard: ShardId) -> PathBuf {
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

/// The alignment of direct I/O log writes: in memory, file offset and length (the
/// core's [`courier_pipeline::log::DIRECT_IO_BLOCK_BYTES`], which the profile's
/// `log.prepare_ahead_bytes` is checked against).
pub const DIRECT_IO_BLOCK: usize = courier_pipeline::log::DIRECT_IO_BLOCK_BYTES as usize;

/// One shard's log files, as the shard's core asks for them.
pub struct ShardStore {
    dir: PathBuf,
    dir_file: File,
    /// Open segment files: the newest, and any with a write in flight.
    files: HashMap<u64, Arc<File>>,
    /// Segment files for the ring are opened with `O_DIRECT`.
    direct: bool,
}

impl ShardStore {
    /// Bytes an unprivileged writer may still use on the log's file system (statvfs
    /// `f_bavail × f_frsize`).
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("dir", &self.dir)
            .field("open_files", &self.files.len())
            .finish()
    }
}

impl ShardStore {
    /// Opens (recovering) the log of `shard`: every segment is checked, a torn tail is
    /// truncated, a corrupt segment stops the shard with its id and offset, a new nonce
    /// epoch is persisted. Nothing is changed on disk before the master key was proven to
    /// unwrap every live key.
    ///
    /// `visit(log index, record)` sees every record that stays in the log, in log order
    /// (the idempotency table and delivery's state are rebuilt from them).
    pub fn open(
        data_dir: &Path,
        shard: ShardId,
        master_key: &MasterKeyText,
        cfg: LogConfig,
        visit: &mut dyn FnMut(u64, &OwnedRecord),
    ) -> Result<(ShardStore, Log), StoreError> {
        ShardStore::open_with_field_keys(data_dir, shard, master_key, None, cfg, visit)
    }

    /// [`ShardStore::open`] with the businesses' field keys (the server's): `visit` sees
    /// the user fields of every record of a business that has its key, and the log writes
    /// new records' user fields under them (`courier_pipeline::log::format`).
    pub fn open_with_field_keys(
        data_dir: &Path,
        shard: ShardId,
        master_key: &MasterKeyText,
        fields: Option<Arc<dyn courier_pipeline::log::FieldKeys>>,
        cfg: LogConfig,
        visit: &mut dyn FnMut(u64, &OwnedRecord),
    ) -> Result<(ShardStore, Log), StoreError> {
        let dir = shard_dir(data_dir, shard);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let recovery = |source| StoreError::Recovery {
            dir: dir.clone(),
            source,
        };
        create_private_dir(&dir).map_err(io(&dir))?;
        let keyring_path = dir.join("keyring");
        if keyring_path.exists() {
            check_private_file(&keyring_path).map_err(|reason| StoreError::Insecure { reason })?;
        }
        let ids = list_segments(&dir).map_err(io(&dir))?;
        let keyring = match fs::read(&keyring_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&keyring_path)(e)),
        };
        let mut judge = Recovery::new(
            keyring.as_deref(),
            !ids.is_empty(),
            master_key.master_key(),
            cfg.payload_bytes_max,
        )
        .map_err(recovery)?
        .with_field_keys(fields);
        // Judge every segment before touching any.
        for &id in &ids {
            let path = dir.join(segment_file_name(id));
            let bytes = fs::read(&path).map_err(io(&path))?;
            judge.judge(id, &bytes, visit).map_err(recovery)?;
        }
        let plan = judge.plan();
        for repair in &plan.repairs {
            repair_segment(&dir, repair)?;
        }
        let dir_file = File::open(&dir).map_err(io(&dir))?;
        dir_file.sync_all().map_err(io(&dir))?;
        let (log, actions) = plan.open(cfg, shard).map_err(recovery)?;
        let mut store = ShardStore {
            dir,
            dir_file,
            files: HashMap::new(),
            direct: false,
        };
        for a in actions {
            let what = format!("{a:?}");
            store.perform_action(a).map_err(|source| StoreError::Io {
                path: store.dir.join(what),
                source,
            })?;
        }
        Ok((store, log))
    }

    /// Performs a metadata operation of the core (synchronously, durably).
    ///
    /// # Panics
    /// On a [`Io::DurableWrite`] or [`Io::PrepareSpace`]: those go through the ring with
    /// [`Self::segment_file`].
    pub fn perform(&mut self, op: Io) -> std::io::Result<()> {
        let action = match op {
            Io::PersistKeyring { bytes } => Action::PersistKeyring { bytes },
            Io::CreateSegment { segment_id } => Action::CreateSegment { segment_id },
            Io::DeleteSegment { segment_id } => Action::DeleteSegment { segment_id },
            Io::DurableWrite(_) | Io::PrepareSpace(_) => {
                unreachable!("log writes go through the ring")
            }
        };
        self.perform_action(action)
    }

    /// Opens the files the ring writes with `O_DIRECT` from now on, after a probe write
    /// in the log's directory shows the file system takes it; the error says why not
    /// (the store then stays with the page cache). Returns what the core needs to align
    /// its writes: the block ([`DIRECT_IO_BLOCK`]) and `log`'s open segment's partial
    /// last block, read back (records appended before serving, such as the `expired`
    /// statuses of a retention drop, opened one), and `prepare_ahead`, the bytes of zeros
    /// to keep written ahead of the open segment's records (`log.prepare_ahead_bytes`).
    pub fn enable_direct_io(&mut self, log: &Log, prepare_ahead: u64) -> std::io::Result<DirectIo> {
        probe_direct_io(&self.dir)?;
        let mut tail = Vec::new();
        if let Some((segment_id, end)) = log.open_segment() {
            let from = end - end % DIRECT_IO_BLOCK as u64;
            tail.resize((end - from) as usize, 0);
            File::open(self.dir.join(segment_file_name(segment_id)))?
                .read_exact_at(&mut tail, from)?;
        }
        // Files opened before (the segment those records opened) are opened again.
        self.files.clear();
        self.direct = true;
        Ok(DirectIo {
            block: DIRECT_IO_BLOCK,
            tail,
            prepare_ahead,
        })
    }

    /// Whether the ring's writes go past the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// The file of a segment, for a write through the ring.
    pub fn segment_file(&mut self, segment_id: u64) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.files.get(&segment_id) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            self.ring_options()
                .open(self.dir.join(segment_file_name(segment_id)))?,
        );
        self.files.insert(segment_id, f.clone());
        Ok(f)
    }

    /// How files the ring writes are opened.
    fn ring_options(&self) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o
    }

    /// A write to `segment_id` finished: only the newest segment is written again, so the
    /// others' files are closed.
    pub fn write_done(&mut self, segment_id: u64) {
        if self.files.keys().any(|&id| id > segment_id) {
            self.files.remove(&segment_id);
        }
    }

    /// The shard's log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Performs one of the log's actions synchronously and durably (a write is synced).
    pub fn perform_action(&mut self, a: Action) -> std::io::Result<()> {
        match a {
            Action::PersistKeyring { bytes } => {
                write_file_atomically(&self.dir.join("keyring"), &bytes, 0o600)
            }
            Action::CreateSegment { segment_id } => {
                let f = self
                    .ring_options()
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
                // Through the page cache: these bytes are not aligned for O_DIRECT.
                let f = OpenOptions::new()
                    .write(true)
                    .open(self.dir.join(segment_file_name(segment_id)))?;
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
}

/// Writes one aligned block with `O_DIRECT` to a new file in `dir`, then removes it.
fn probe_direct_io(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(format!(".direct-io-probe-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)?;
        let mut buf = vec![0u8; 2 * DIRECT_IO_BLOCK];
        let at = buf.as_ptr().align_offset(DIRECT_IO_BLOCK);
        let block = &mut buf[at..at + DIRECT_IO_BLOCK];
        block.fill(0x5a);
        f.write_all_at(block, 0)?;
        f.sync_data()
    })();
    let removed = fs::remove_file(&path);
    result.and(removed)
}

/// Performs one repair of recovery, durably.
fn repair_segment(dir: &Path, repair: &Repair) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    match *repair {
        Repair::Truncate {
            segment_id,
            to,
            cause,
        } => {
            tracing::warn!(segment = segment_id, to, %cause, "truncating a torn tail");
            let path = dir.join(segment_file_name(segment_id));
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(to).and_then(|_| f.sync_all()).map_err(io(&path))
        }
        Repair::Remove { segment_id, reason } => {
            let what = match reason {
                RemoveReason::AfterLostRecords => {
                    "removing a segment written after records lost in a crash (none of its records was acknowledged)"
                }
                RemoveReason::TornHeader | RemoveReason::KeyDestroyed => {
                    "removing a segment that holds no readable record"
                }
            };
            tracing::warn!(segment = segment_id, ?reason, "{what}");
            let path = dir.join(segment_file_name(segment_id));
            fs::remove_file(&path).map_err(io(&path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_get_exactly_their_mode_leave_no_temporary_and_replace_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"untouched").unwrap();
        let path = dir.path().join("registry.toml");
        // A symbolic link planted where the file goes: the write replaces the link, it
        // does not write through it.
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        write_file_atomically(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"untouched");
        assert!(!fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        write_file_atomically(&path, b"newer", 0o640).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary left: {names:?}");
    }

    #[test]
    fn the_direct_io_probe_leaves_nothing_and_fails_where_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        probe_direct_io(dir.path()).expect("the test directory's file system takes O_DIRECT");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no probe file left"
        );
        // Where the probe cannot write, the error comes back (the shard then keeps the
        // page cache).
        let missing = dir.path().join("missing");
        assert!(probe_direct_io(&missing).is_err());
    }

    #[test]
    fn direct_io_reads_back_the_partial_block_of_a_segment_opened_before_serving() {
        use courier_pipeline::log::{Record, RecordHeader};
        use courier_pipeline::profile::Profile;
        let dir = tempfile::tempdir().unwrap();
        let p = Profile::default_profile();
        let cfg = LogConfig::new(&p.log, p.limits.payload_bytes_max);
        let key = MasterKeyText::random();
        let (mut store, mut log) =
            ShardStore::open(dir.path(), ShardId::new(0), &key, cfg, &mut |_, _| {}).unwrap();
        let fresh = store.enable_direct_io(&log, 0).unwrap();
        assert!(fresh.tail.is_empty(), "no segment open yet");
        // Records appended durably before serving (as retention's `expired` statuses are).
        let header = RecordHeader {
            kind: courier_pipeline::log::RecordKind::Status,
            business_id: 1,
            time_ms: 1,
            client_id: 7,
            recipient: None,
            reference: 0,
            code: 0,
        };
        let records = vec![
            Record {
                header,
                payload: &[]
            };
            5
        ];
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(1, &mut rand::rng(), &records, &mut actions, &mut positions)
            .unwrap();
        for a in actions {
            store.perform_action(a).unwrap();
        }
        let req = log.begin_sync().unwrap();
        log.on_synced(req.id);
        let (id, end) = log.open_segment().expect("the appends opened a segment");
        let io = store.enable_direct_io(&log, 0).unwrap();
        assert_eq!(io.block, DIRECT_IO_BLOCK);
        let file = fs::read(dir.path().join("log/shard-0").join(segment_file_name(id))).unwrap();
        assert_eq!(file.len() as u64, end);
        let from = (end - end % DIRECT_IO_BLOCK as u64) as usize;
        assert_eq!(io.tail, file[from..]);
        assert!(!io.tail.is_empty());
    }

    #[test]
    fn a_key_file_open_to_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, b"x").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_file(&path);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.contains(&format!("mode {mode:04o}")) && e.contains("chmod 600"),
                    "{e}"
                );
            }
        }
    }
}
