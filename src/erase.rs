//! Erasing a business (`courier businesses erase`, issue 19 item 6): everything stored
//! for it becomes unreadable at once, in the data directory and in every copy of it taken
//! before, by destroying keys rather than rewriting segments.
//!
//! ```text
//!  lock DATA_DIR (the server is stopped) ──> finish an earlier, interrupted erase
//!  plan, in memory: every keyring rewrapped from the old master key to a new one, every
//!        business root key but the erased one rewrapped, every detector checkpoint
//!        without its recipient hashes (a new master key, a new hash secret)
//!  1. DATA_DIR/erase.journal  (business id, registry, master key file, a check of the new key)
//!  2. staged beside their targets: MASTER.next, log/shard-K/keyring.next,
//!     business-keys.next, detect/shard-K.ckpt.next         (all fsync'd)
//!  3. COMMIT: rename MASTER.next over MASTER (directory fsync'd); the old key's bytes
//!     are overwritten through a descriptor opened before the rename
//!  4. install: every *.next renamed over its target, the business marked erased in the
//!     registry (its id never reused), the journal removed
//! ```
//!
//! **What makes the business unreadable.** What a record says about a business's users
//! (a message's recipient number and sealed payload, a user's reply and number) is
//! encrypted, since segment format version 3, under a key derived in each segment from
//! both the segment's data key and the business's root key (`courier_pipeline::log::
//! format`); the payload is besides sealed under recipient keys derived from the root
//! key (`seal::DerivedKeys`). The root key exists only wrapped by the master key in
//! `business-keys`. Erasing drops it from the file: in the live directory those fields
//! no longer open under any key (the records read back hidden, with their ids), and no
//! segment is rewritten.
//!
//! **Why the master key must change too.** A copy of the data directory taken before
//! holds the wrapped root key, and every segment's data key wrapped by the master key, so
//! with the old master key it would yield everything. So the erase rotates the master
//! key: every keyring entry and every other business's root key
//! is rewrapped under a new random key, the new key replaces the old in the master key
//! file, and the old key is destroyed. Nothing in an old copy opens under the new key, for
//! any business: **a backup taken before an erase can no longer be read at all**. That is
//! the price of "even from a copy taken before" without rewriting 30 days of segments;
//! the README says so to operators, who keep no copy of the old master key file.
//!
//! **What the live directory still holds.** Until retention drops them (30 days at
//! most), the erased business's records stay in the live segments under data keys the
//! new master key still unwraps: their ids, times and status codes read, their user
//! fields do not. Records written before format version 3 (by an older build) keep their
//! user fields under the data key alone, so their numbers (not their payloads, sealed
//! under the root key) stay readable until those segments age out; the run counts such
//! segments ([`Erased::old_format_segments`]) and the command says so.
//!
//! **Crash safety.** The commit point is the rename of the new master key file over the
//! old one. Before it, the old key and every old file are untouched (staged files lie
//! beside them), so a stop rolls back: the next `courier serve` or `courier businesses
//! erase` finds the journal, sees that the master key file is not the journal's new key,
//! and removes the staged files and the journal (the business is not erased; run the
//! command again). After it, the old key is gone and the staged files are the only ones
//! that open: the next start finds the master key file is the journal's new key and rolls
//! forward (renames every staged file that is still there, marks the business erased,
//! removes the journal). Every step of the roll-forward can be repeated.
//!
//! **Detector checkpoints** hold recipients as hashes keyed by a secret derived from the
//! master key, so after the rotation they could neither be used nor, in an old copy, be
//! tested against numbers. They are rewritten without anything derived from recipient
//! hashes (as a version-1 checkpoint is restored): pauses, limits, ratings, fan-out
//! baselines and billing counts stay, the erased business's billing count included (a
//! count). Until the retention passes again the fan-out check counts every recipient as
//! never contacted. A checkpoint that does not restore under the given profile is dropped
//! (the detector starts that shard afresh), and the run says how many.
//!
//! Everything this module prints or logs is ids, counts and paths: never a key, a number
//! or content.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use courier_pipeline::detect::{DetectConfig, Detector};
use courier_pipeline::log::{Keyring, MasterKey};
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::{unwrap_root_key, wrap_root_key};
use serde::{Deserialize, Serialize};

use crate::store::{write_file_atomically, DataDirLock, MasterKeyText};

/// The journal of an erase in progress, in the data directory.
pub const JOURNAL: &str = "erase.journal";
const JOURNAL_VERSION: u32 = 1;
/// The suffix of a staged file: `keyring.next` replaces `keyring` at install.
const STAGED_SUFFIX: &str = ".next";
/// What the journal's key check is derived with (HKDF label; see [`key_check`]).
const KEY_CHECK_LABEL: &[u8] = b"courier erase: master key check v1";

/// Why an erase was refused or failed. What was kept is in each message.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    /// The data directory is locked: a server is running on it.
    #[error("{0} (erase works on a stopped server only)")]
    Lock(#[from] crate::store::LockError),
    /// The registry has no business with this id.
    #[error("no business with id {id} in {registry}; nothing was changed")]
    Unknown {
        /// The id asked for.
        id: u32,
        /// The registry file.
        registry: PathBuf,
    },
    /// The business was erased before.
    #[error(
        "business {id} was already erased ({registry} lists it as erased); nothing was changed"
    )]
    AlreadyErased {
        /// The id asked for.
        id: u32,
        /// The registry file.
        registry: PathBuf,
    },
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not parse or does not open under the master key (a wrong key file).
    #[error("{0}")]
    Invalid(String),
    /// A test stopped the run after a step, as a crash would.
    #[error("stopped after {0:?}")]
    Stopped(Step),
}

/// The steps of an erase, for tests that stop it between two of them as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The journal is written; nothing is staged.
    Journaled,
    /// Every new file is staged beside its target; the old master key is in force.
    Staged,
    /// The new master key replaced the old one (the commit point); nothing installed.
    Committed,
}

/// What to erase, and where.
#[derive(Debug, Clone)]
pub struct EraseRequest<'a> {
    /// The data directory (of a stopped server).
    pub data_dir: &'a Path,
    /// The master key file the server uses; replaced by a new key.
    pub master_key_file: &'a Path,
    /// The registry file the server uses.
    pub registry: &'a Path,
    /// The detector configuration of the server's profile (its checkpoints are rewritten).
    pub detect: &'a DetectConfig,
    /// The business.
    pub business_id: u32,
}

/// What an erase did: ids and counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    /// The erased business.
    pub business_id: u32,
    /// Whether it had a root key (none if the server never ran with it registered).
    pub root_key_destroyed: bool,
    /// Root keys of the other businesses, rewrapped under the new master key.
    pub root_keys_rewrapped: u64,
    /// Shard keyrings rewritten.
    pub keyrings: u64,
    /// Segment data keys rewrapped under the new master key.
    pub segment_keys_rewrapped: u64,
    /// Detector checkpoints rewritten without recipient hashes.
    pub checkpoints_rewritten: u64,
    /// Detector checkpoints dropped (they did not restore under the profile).
    pub checkpoints_dropped: u64,
    /// Segments written before per-business field keys (format version 1 or 2): the
    /// user fields of their records stay under their data keys alone, readable under the
    /// new master key until retention drops them.
    pub old_format_segments: u64,
}

/// What the start-up check found of an interrupted erase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// It had passed its commit point: it was completed now.
    Completed {
        /// The erased business.
        business_id: u32,
    },
    /// It had not: its staged files were removed; the business is not erased.
    RolledBack {
        /// The business that was being erased.
        business_id: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    version: u32,
    business_id: u32,
    registry: PathBuf,
    master_key_file: PathBuf,
    /// [`key_check`] of the new master key: tells after a crash which key is in force.
    new_key_check: String,
}

/// 16 bytes derived from a master key (HKDF, a label of its own): says which key a file
/// holds without holding the key; useless for deriving it (the key has 256 bits).
fn key_check(master: &MasterKey) -> String {
    hex::encode(&master.derive_secret(KEY_CHECK_LABEL)[..16])
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EraseError + '_ {
    move |source| EraseError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn staged(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(STAGED_SUFFIX);
    path.with_file_name(name)
}

fn sync_dir(dir: &Path) -> Result<(), EraseError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Erases a business: see the module docs. Takes the data directory's lock (a running
/// server holds it), finishes an interrupted earlier erase first, and returns when the
/// business is erased for good. `stop_after` stops it after a step, as a crash would
/// (tests only).
pub fn erase(req: &EraseRequest<'_>, stop_after: Option<Step>) -> Result<Erased, EraseError> {
    let _lock = DataDirLock::acquire(req.data_dir)?;
    if let Some(done) = finish_locked(req.data_dir)? {
        tracing::info!(?done, "an interrupted erase was finished first");
    }
    let id = req.business_id;
    let registry = load_registry(req.registry)?;
    // A business erased already may still have a root key in another data directory it
    // stored in (a region it was moved out of): erasing it there destroys that key and
    // rotates that directory's master key the same way; the registry stays as it is.
    if registry.is_erased(id) && !holds_root_key(req.data_dir, id)? {
        return Err(EraseError::AlreadyErased {
            id,
            registry: req.registry.to_path_buf(),
        });
    }
    if !registry.is_erased(id) && registry.get(id).is_none() {
        return Err(EraseError::Unknown {
            id,
            registry: req.registry.to_path_buf(),
        });
    }
    // The real file: a key kept elsewhere and linked in is replaced where it lives, so
    // the old key does not survive behind the link.
    let master_key_file = fs::canonicalize(req.master_key_file).map_err(io(req.master_key_file))?;
    let old = MasterKeyText::read(&master_key_file).map_err(EraseError::Invalid)?;
    let new = MasterKeyText::random();
    // Everything is computed (and every old key unwrapped) before anything is written:
    // a wrong master key file changes nothing.
    let (plan, mut out) = plan(req, &old, &new)?;
    out.business_id = id;
    let journal = Journal {
        version: JOURNAL_VERSION,
        business_id: id,
        registry: fs::canonicalize(req.registry).map_err(io(req.registry))?,
        master_key_file: master_key_file.clone(),
        new_key_check: key_check(&new.master_key()),
    };
    let text = serde_json::to_vec(&journal).map_err(|e| EraseError::Invalid(e.to_string()))?;
    let journal_path = req.data_dir.join(JOURNAL);
    write_file_atomically(&journal_path, &text, 0o600).map_err(io(&journal_path))?;
    stop(stop_after, Step::Journaled)?;

    let key_next = staged(&master_key_file);
    write_file_atomically(&key_next, new.master_key().to_file_text().as_bytes(), 0o600)
        .map_err(io(&key_next))?;
    for (target, bytes) in &plan {
        let next = staged(target);
        write_file_atomically(&next, bytes, 0o600).map_err(io(&next))?;
    }
    stop(stop_after, Step::Staged)?;

    commit(&master_key_file, &key_next)?;
    stop(stop_after, Step::Committed)?;

    install(req.data_dir, &journal)?;
    tracing::info!(
        business_id = id,
        keyrings = out.keyrings,
        segment_keys = out.segment_keys_rewrapped,
        root_keys = out.root_keys_rewrapped,
        "business erased; the master key was rotated"
    );
    Ok(out)
}

/// Whether `data_dir`'s business keys hold a root key of business `id`.
fn holds_root_key(data_dir: &Path, id: u32) -> Result<bool, EraseError> {
    let path = data_dir.join(crate::business_keys::FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(crate::business_keys::parse(&text)
            .map_err(EraseError::Invalid)?
            .contains_key(&id)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&path)(e)),
    }
}

fn stop(stop_after: Option<Step>, step: Step) -> Result<(), EraseError> {
    match stop_after == Some(step) {
        true => Err(EraseError::Stopped(step)),
        false => Ok(()),
    }
}

fn load_registry(path: &Path) -> Result<Registry, EraseError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    Registry::from_toml(&text).map_err(|e| EraseError::Invalid(format!("{}: {e}", path.display())))
}

/// The new bytes of every file the rotation rewrites, by target path; an empty
/// checkpoint means "drop it".
type Plan = Vec<(PathBuf, Vec<u8>)>;

fn plan(
    req: &EraseRequest<'_>,
    old: &MasterKeyText,
    new: &MasterKeyText,
) -> Result<(Plan, Erased), EraseError> {
    let mut out = Erased::default();
    let mut plan = Plan::new();
    let (old_key, new_key) = (old.master_key(), new.master_key());
    let mut nonce = || rand::random::<[u8; 12]>();
    let shards = match crate::audit::shard_dirs(req.data_dir) {
        Ok(s) => s,
        Err(crate::audit::AuditError::NoLog(_)) => Vec::new(),
        Err(e) => return Err(EraseError::Invalid(e.to_string())),
    };
    for (_, dir) in shards {
        out.old_format_segments += old_format_segments(&dir)?;
        let path = dir.join("keyring");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let bad = |e: String| EraseError::Invalid(format!("{}: {e}", path.display()));
        let ring = Keyring::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        let moved = ring
            .rewrapped(&old_key, &new_key, &mut nonce)
            .map_err(|e| bad(format!("{e}; nothing was changed")))?;
        out.keyrings += 1;
        out.segment_keys_rewrapped += moved.live_ids().count() as u64;
        plan.push((path, moved.to_bytes()));
    }
    let path = req.data_dir.join(crate::business_keys::FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let wrapped = crate::business_keys::parse(&text).map_err(EraseError::Invalid)?;
            let (old_bytes, new_bytes) = (old.key_bytes(), new.key_bytes());
            let mut kept = BTreeMap::new();
            for (&id, w) in &wrapped {
                let root = unwrap_root_key(&old_bytes, id, w).map_err(|e| {
                    EraseError::Invalid(format!(
                        "{}: business {id}: {e} (wrong master key?); nothing was changed",
                        path.display()
                    ))
                })?;
                if id == req.business_id {
                    out.root_key_destroyed = true;
                    continue;
                }
                kept.insert(id, wrap_root_key(&new_bytes, id, &root, &mut rand::rng()));
            }
            out.root_keys_rewrapped = kept.len() as u64;
            plan.push((path, crate::business_keys::render(&kept).into_bytes()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    for path in checkpoints(req.data_dir)? {
        let bytes = fs::read(&path).map_err(io(&path))?;
        let mut detector = Detector::new(req.detect.clone(), [0; 16]);
        match detector.restore(&bytes) {
            Ok(()) => {
                detector.forget_recipient_hashes();
                out.checkpoints_rewritten += 1;
                plan.push((path, detector.checkpoint()));
            }
            Err(_) => {
                out.checkpoints_dropped += 1;
                plan.push((path, Vec::new()));
            }
        }
    }
    Ok((plan, out))
}

/// Segments of a shard directory whose header names a format before version 3 (a
/// header that does not decode is left to recovery).
fn old_format_segments(dir: &Path) -> Result<u64, EraseError> {
    use std::io::Read;
    let mut n = 0;
    for id in crate::store::list_segments(dir).map_err(io(dir))? {
        let path = dir.join(format!("{id:020}.seg"));
        let mut head = [0u8; courier_pipeline::log::format::SEGMENT_HEADER_BYTES];
        let read = File::open(&path).and_then(|mut f| f.read_exact(&mut head));
        if read.is_ok() {
            let header = courier_pipeline::log::SegmentHeader::decode(&head);
            n += u64::from(header.is_ok_and(|h| h.version < 3));
        }
    }
    Ok(n)
}

/// The detector checkpoints of `data_dir` (`detect/shard-K.ckpt`).
fn checkpoints(data_dir: &Path) -> Result<Vec<PathBuf>, EraseError> {
    let dir = crate::control::detect_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(&dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("shard-") && name.ends_with(".ckpt") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The commit point: the new key replaces the old. The old file's bytes are overwritten
/// through a descriptor opened before the rename (best effort: a copy-on-write file
/// system or a flash translation layer may keep the old blocks; no backup of the old key
/// file may be kept).
fn commit(master_key_file: &Path, key_next: &Path) -> Result<(), EraseError> {
    // A key file the owner made read-only (0400) cannot be opened for writing: it is
    // replaced all the same, unscrubbed, and the run says so.
    let old = OpenOptions::new().write(true).open(master_key_file);
    fs::rename(key_next, master_key_file).map_err(io(master_key_file))?;
    if let Some(dir) = master_key_file.parent() {
        sync_dir(dir)?;
    }
    // Committed: a failure to scrub the unlinked old inode is reported, not undone.
    let scrubbed = old.and_then(|mut old| {
        let len = old.metadata()?.len();
        old.write_all(&vec![0u8; len as usize])?;
        old.sync_all()
    });
    if let Err(e) = scrubbed {
        tracing::warn!(error = %e, "the old master key file's bytes could not be overwritten");
    }
    Ok(())
}

/// Every staged file of `data_dir` and the file it replaces.
fn staged_files(data_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, EraseError> {
    let mut targets = Vec::new();
    if let Ok(shards) = crate::audit::shard_dirs(data_dir) {
        targets.extend(shards.into_iter().map(|(_, d)| d.join("keyring")));
    }
    targets.push(data_dir.join(crate::business_keys::FILE_NAME));
    let dir = crate::control::detect_dir(data_dir);
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries {
            let path = entry.map_err(io(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(target) = name.strip_suffix(STAGED_SUFFIX) {
                if target.starts_with("shard-") && target.ends_with(".ckpt") {
                    targets.push(dir.join(target));
                }
            }
        }
    }
    Ok(targets
        .into_iter()
        .map(|t| (staged(&t), t))
        .filter(|(next, _)| next.exists())
        .collect())
}

/// Installs the staged files, marks the business erased, removes the journal. Every
/// step can be repeated after a crash.
fn install(data_dir: &Path, journal: &Journal) -> Result<(), EraseError> {
    let detect = crate::control::detect_dir(data_dir);
    for (next, target) in staged_files(data_dir)? {
        let empty = fs::metadata(&next).map_err(io(&next))?.len() == 0;
        if empty && target.parent() == Some(detect.as_path()) {
            // A checkpoint that did not restore: dropped.
            match fs::remove_file(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&target)(e)),
            }
            fs::remove_file(&next).map_err(io(&next))?;
        } else {
            fs::rename(&next, &target).map_err(io(&target))?;
        }
        sync_dir(target.parent().unwrap_or(data_dir))?;
    }
    let mut registry = load_registry(&journal.registry)?;
    if registry.get(journal.business_id).is_some() {
        registry
            .erase(journal.business_id)
            .map_err(|e| EraseError::Invalid(e.to_string()))?;
        write_file_atomically(&journal.registry, registry.to_toml().as_bytes(), 0o600)
            .map_err(io(&journal.registry))?;
    }
    let path = data_dir.join(JOURNAL);
    fs::remove_file(&path).map_err(io(&path))?;
    sync_dir(data_dir)
}

/// Removes what an erase that stopped before its commit point staged, and its journal.
fn roll_back(data_dir: &Path, journal: &Journal) -> Result<(), EraseError> {
    let key_next = staged(&journal.master_key_file);
    let mut doomed = vec![key_next];
    doomed.extend(staged_files(data_dir)?.into_iter().map(|(next, _)| next));
    for path in doomed {
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(data_dir))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    let path = data_dir.join(JOURNAL);
    fs::remove_file(&path).map_err(io(&path))?;
    sync_dir(data_dir)
}

/// At start-up (`courier serve`, before the registry and the keys are read): finishes an
/// erase that stopped half-way, forward past its commit point and back before it. `None`
/// when there was none.
pub fn finish_interrupted(data_dir: &Path) -> Result<Option<Interrupted>, EraseError> {
    if !data_dir.join(JOURNAL).exists() {
        return Ok(None);
    }
    let _lock = DataDirLock::acquire(data_dir)?;
    finish_locked(data_dir)
}

fn finish_locked(data_dir: &Path) -> Result<Option<Interrupted>, EraseError> {
    let path = data_dir.join(JOURNAL);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let journal: Journal = serde_json::from_slice(&text)
        .ok()
        .filter(|j: &Journal| j.version == JOURNAL_VERSION)
        .ok_or_else(|| {
            EraseError::Invalid(format!(
                "{} is not an erase journal this build reads; nothing was changed",
                path.display()
            ))
        })?;
    let current = MasterKeyText::read(&journal.master_key_file).map_err(EraseError::Invalid)?;
    let business_id = journal.business_id;
    if key_check(&current.master_key()) == journal.new_key_check {
        install(data_dir, &journal)?;
        tracing::info!(
            business_id,
            "an interrupted erase was completed (it had committed)"
        );
        Ok(Some(Interrupted::Completed { business_id }))
    } else {
        roll_back(data_dir, &journal)?;
        tracing::info!(
            business_id,
            "an interrupted erase was rolled back (it had not committed); the business is not erased"
        );
        Ok(Some(Interrupted::RolledBack { business_id }))
    }
}
