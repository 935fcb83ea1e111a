//! The control thread: the slow side of detection and operator control, off the shards'
//! hot loops.
//!
//! ```text
//!  shards ──ToControl::Status (1 s)──────────> DATA_DIR/detect/status.json   (courier businesses status)
//!                                            └─> SharedStatus ──> crate::metrics (GET /metrics)
//!         ──ToControl::Checkpoint (10 s, stop)─> DATA_DIR/detect/shard-K.ckpt (restored at start)
//!  registry file changed (polled each second) ──Control::Registry──> every shard
//!  DATA_DIR/control/unpause-<id> (courier businesses unpause) ──Control::Unpause──> every shard
//! ```
//!
//! Every file here holds business ids, ratings, counters and keyed recipient hashes;
//! never a phone number, a payload or a key. Files are written to a temporary name,
//! synced and renamed, so a crash leaves the previous version.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use courier_pipeline::detect::{BusinessSignal, Detector};
use courier_pipeline::node::Control as ShardControl;
use courier_pipeline::registry::Registry;
use courier_pipeline::ShardId;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use crate::shard::Peer;

/// How often the registry file and the request spool are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What shards tell the control thread.
#[derive(Debug)]
pub enum ToControl {
    /// The shard's view of every business it knows.
    Status {
        /// The shard.
        shard: ShardId,
        /// When, unix ms.
        at_unix_ms: u64,
        /// One signal per business.
        signals: Vec<BusinessSignal>,
        /// Events (statuses, replies) waiting for their business on this shard.
        event_backlogs: Vec<(u32, u64)>,
        /// Users' replies each business received today (UTC) on this shard.
        inbound_today: Vec<(u32, u64)>,
    },
    /// The shard's detector checkpoint.
    Checkpoint {
        /// The shard.
        shard: ShardId,
        /// [`Detector::checkpoint`] bytes.
        bytes: Vec<u8>,
    },
}

/// One business in the status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessStatus {
    /// Business id.
    pub id: u32,
    /// Quality rating: green, yellow or red.
    pub rating: String,
    /// Tier in force (after demotions and operator changes).
    pub tier: String,
    /// Every message is rejected with `sender_paused`.
    pub paused: bool,
    /// Why the last signal was raised (fan_out_surge, quality_yellow, quality_red,
    /// operator), if any.
    pub why: Option<String>,
    /// What was measured against which threshold for `why` (issue 14), in counts only:
    /// e.g. "distinct new recipients 212/s over the last 1 s (...) against a threshold
    /// of 50/s: ...". Absent for the operator's own changes (and in status files
    /// written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<String>,
    /// Accepted (durable) messages today, UTC, all shards.
    pub accepted_today: u64,
}

/// `DATA_DIR/detect/status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    /// When it was written, unix ms.
    pub updated_unix_ms: u64,
    /// Shards whose status it includes.
    pub shards_reporting: usize,
    /// Shards of the server.
    pub shards: usize,
    /// Businesses by id.
    pub businesses: Vec<BusinessStatus>,
    /// Events (statuses, users' replies) waiting for each business, all shards, by id.
    #[serde(default)]
    pub event_backlogs: BTreeMap<u32, u64>,
    /// Users' replies each business received today (UTC), all shards, by id: the
    /// business's inbound figure (rebuilt from the log at start-up).
    #[serde(default)]
    pub inbound_today: BTreeMap<u32, u64>,
}

/// The latest merged status, shared with the metrics thread (`None` until the first
/// status arrives).
pub type SharedStatus = Arc<Mutex<Option<StatusFile>>>;

/// The detector files' directory.
pub fn detect_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("detect")
}

/// The status file.
pub fn status_path(data_dir: &Path) -> PathBuf {
    detect_dir(data_dir).join("status.json")
}

/// The request spool.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("control")
}

fn checkpoint_path(data_dir: &Path, shard: ShardId) -> PathBuf {
    detect_dir(data_dir).join(format!("shard-{shard}.ckpt"))
}

/// Queues an unpause request for a running (or the next) server: the control thread
/// applies it within about a second and removes the file.
pub fn request_unpause(data_dir: &Path, business_id: u32) -> std::io::Result<PathBuf> {
    let dir = spool_dir(data_dir);
    crate::store::create_private_dir(&dir)?;
    let path = dir.join(format!("unpause-{business_id}"));
    write_atomically(&path, b"")?;
    Ok(path)
}

/// Reads the status file.
pub fn read_status(data_dir: &Path) -> Result<StatusFile, String> {
    let path = status_path(data_dir);
    let text = fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (the server writes it once a second while running)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Restores a shard's detector from its checkpoint, if there is one. A shard without
/// one of its own (the server now runs more shards) starts from shard 0's, since every
/// shard's detector holds the merged view of every business. A checkpoint that does not
/// restore (corrupt, or written under other `[detect]` settings) is renamed to `.bad`
/// and the detector starts empty; the error is returned for the log.
pub fn restore_checkpoint(
    data_dir: &Path,
    shard: ShardId,
    detector: &mut Detector,
) -> Result<bool, String> {
    let own = checkpoint_path(data_dir, shard);
    let path = if own.exists() {
        own
    } else {
        checkpoint_path(data_dir, ShardId::new(0))
    };
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    match detector.restore(&bytes) {
        Ok(()) => Ok(true),
        Err(e) => {
            let bad = path.with_extension("ckpt.bad");
            if path == checkpoint_path(data_dir, shard) {
                let _ = fs::rename(&path, &bad);
            }
            Err(format!(
                "{}: {e}; detector state starts empty (file kept as {})",
                path.display(),
                bad.display()
            ))
        }
    }
}

/// What the control thread needs.
#[derive(Debug)]
pub struct Control {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The registry file to watch, if the server was started from one.
    pub registry_file: Option<PathBuf>,
    /// The part of the registry file this server admits (its region's businesses).
    pub regions: crate::region::RegionFilter,
    /// Every shard.
    pub peers: Vec<Peer>,
    /// From every shard; the thread ends once every shard dropped its sender.
    pub inbox: Receiver<ToControl>,
    /// Where the latest merged status is published for the metrics.
    pub status: SharedStatus,
    /// Unwraps (and wraps, for businesses added while running) the business root keys.
    pub master_key: crate::store::MasterKeyText,
}

/// Starts the control thread. It ends after every shard has stopped, having written
/// their final checkpoints and status.
pub fn spawn(c: Control) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("courier-control".into())
        .spawn(move || run(c))
}

fn run(c: Control) {
    let mut registry_seen = c.registry_file.as_deref().and_then(file_stamp);
    let mut latest: BTreeMap<ShardId, Vec<BusinessSignal>> = BTreeMap::new();
    let mut backlogs: BTreeMap<ShardId, ShardFigures> = BTreeMap::new();
    let mut status_dirty = false;
    let mut next_poll = Instant::now();
    if let Err(e) = crate::store::create_private_dir(&detect_dir(&c.data_dir)) {
        tracing::error!(error = %e, "cannot create the detector directory; no status or checkpoints");
    }
    loop {
        let wait = next_poll.saturating_duration_since(Instant::now());
        match c.inbox.recv_timeout(wait) {
            Ok(ToControl::Status {
                shard,
                signals,
                event_backlogs,
                inbound_today,
                ..
            }) => {
                latest.insert(shard, signals);
                backlogs.insert(
                    shard,
                    ShardFigures {
                        event_backlogs,
                        inbound_today,
                    },
                );
                status_dirty = true;
            }
            Ok(ToControl::Checkpoint { shard, bytes }) => {
                let path = checkpoint_path(&c.data_dir, shard);
                if let Err(e) = write_atomically(&path, &bytes) {
                    tracing::error!(shard = shard.index(), error = %e, "detector checkpoint not written");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if status_dirty {
                    publish_status(&c, &latest, &backlogs);
                }
                return;
            }
        }
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + POLL_INTERVAL;
            if status_dirty {
                publish_status(&c, &latest, &backlogs);
                status_dirty = false;
            }
            if let Some(file) = &c.registry_file {
                reload_registry(&c, file, &mut registry_seen);
            }
            apply_spool(&c.data_dir, &c.peers);
        }
    }
}

/// Modification time and length: a cheap "did it change".
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn reload_registry(c: &Control, file: &Path, seen: &mut Option<(SystemTime, u64)>) {
    let stamp = file_stamp(file);
    if stamp.is_none() || stamp == *seen {
        return;
    }
    *seen = stamp;
    let parsed = fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|t| Registry::from_toml(&t).map_err(|e| e.to_string()))
        .and_then(|reg| c.regions.apply(&reg))
        // Root keys for the businesses added since start, persisted before any shard
        // seals for them; every key is checked to unwrap, as at start.
        .and_then(|reg| {
            crate::business_keys::load_or_create(&c.data_dir, &c.master_key, &reg)
                .map(|keys| (reg, keys))
        });
    match parsed {
        Ok((reg, keys)) => {
            let reg = Arc::new(reg);
            for p in &c.peers {
                let _ = p
                    .control
                    .send(ShardControl::Registry(reg.clone(), keys.clone()));
                p.waker.wake();
            }
            tracing::info!(businesses = reg.len(), file = %file.display(), "registry reloaded");
        }
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "registry not reloaded; the previous one stays in force");
        }
    }
}

fn apply_spool(data_dir: &Path, peers: &[Peer]) {
    let Ok(entries) = fs::read_dir(spool_dir(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("unpause-"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        for p in peers {
            let _ = p.control.send(ShardControl::Unpause(id));
            p.waker.wake();
        }
        if let Err(err) = fs::remove_file(e.path()) {
            tracing::error!(business = id, error = %err, "unpause request applied but not removed");
        }
    }
}

/// Merges the shards' views: each shard's detector already holds every shard's traffic
/// (deltas), so per business the most severe view and the highest count win.
fn merge_status(latest: &BTreeMap<ShardId, Vec<BusinessSignal>>) -> Vec<BusinessStatus> {
    let mut by_id: BTreeMap<u32, BusinessSignal> = BTreeMap::new();
    for s in latest.values().flatten() {
        by_id
            .entry(s.business_id)
            .and_modify(|m| {
                m.paused |= s.paused;
                if s.rating > m.rating {
                    m.rating = s.rating;
                }
                if s.tier < m.tier {
                    m.tier = s.tier;
                }
                if s.why.is_some() && (m.why.is_none() || s.paused) {
                    m.why = s.why;
                    m.evidence = s.evidence;
                }
                m.accepted_today = m.accepted_today.max(s.accepted_today);
            })
            .or_insert(*s);
    }
    by_id
        .into_values()
        .map(|s| BusinessStatus {
            id: s.business_id,
            rating: s.rating.name().to_string(),
            tier: s.tier.name().to_string(),
            paused: s.paused,
            why: s.why.map(|w| w.name().to_string()),
            measured: s.evidence.map(|e| e.to_string()),
            accepted_today: s.accepted_today,
        })
        .collect()
}

fn status_file(latest: &BTreeMap<ShardId, Vec<BusinessSignal>>, shards: usize) -> StatusFile {
    StatusFile {
        updated_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        shards_reporting: latest.len(),
        shards,
        businesses: merge_status(latest),
        event_backlogs: BTreeMap::new(),
        inbound_today: BTreeMap::new(),
    }
}

/// A shard's per-business figures besides its detector's signals.
#[derive(Debug, Default)]
struct ShardFigures {
    event_backlogs: Vec<(u32, u64)>,
    inbound_today: Vec<(u32, u64)>,
}

/// Writes the status file and hands the same status to the metrics.
fn publish_status(
    c: &Control,
    latest: &BTreeMap<ShardId, Vec<BusinessSignal>>,
    figures: &BTreeMap<ShardId, ShardFigures>,
) {
    let mut file = status_file(latest, c.peers.len());
    for f in figures.values() {
        for &(b, n) in &f.event_backlogs {
            *file.event_backlogs.entry(b).or_insert(0) += n;
        }
        for &(b, n) in &f.inbound_today {
            *file.inbound_today.entry(b).or_insert(0) += n;
        }
    }
    write_status(&c.data_dir, &file);
    *c.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

fn write_status(data_dir: &Path, file: &StatusFile) {
    let text = serde_json::to_vec_pretty(file).expect("status serializes");
    if let Err(e) = write_atomically(&status_path(data_dir), &text) {
        tracing::error!(error = %e, "detector status not written");
    }
}

/// Replaces `path` atomically, readable by the server's user only (checkpoints and the
/// status file tell which businesses are paused and why).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::store::write_file_atomically(path, bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_pipeline::detect::{Evidence, Rating, Why};
    use courier_pipeline::registry::Tier;

    fn sig(id: u32, paused: bool, rating: Rating, accepted: u64) -> BusinessSignal {
        BusinessSignal {
            business_id: id,
            rating,
            tier: Tier::T10k,
            paused,
            why: paused.then_some(Why::FanOutSurge),
            evidence: paused.then_some(Evidence::FanOut {
                distinct_per_sec: 212,
                new_pct: 96,
                baseline_per_min: 480,
                baseline_declared: false,
                threshold_per_sec: 50,
                floor_per_sec: 50,
                factor: 5,
                new_pct_min: 80,
            }),
            accepted_today: accepted,
        }
    }

    #[test]
    fn status_takes_the_most_severe_view_per_business() {
        let mut latest = BTreeMap::new();
        latest.insert(
            ShardId::new(0),
            vec![
                sig(1, false, Rating::Green, 10),
                sig(2, false, Rating::Green, 5),
            ],
        );
        latest.insert(ShardId::new(1), vec![sig(1, true, Rating::Yellow, 12)]);
        let s = merge_status(&latest);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].id,
                s[0].paused,
                s[0].rating.as_str(),
                s[0].accepted_today
            ),
            (1, true, "yellow", 12)
        );
        assert_eq!(s[0].why.as_deref(), Some("fan_out_surge"));
        assert_eq!(
            s[0].measured.as_deref(),
            Some(
                "distinct new recipients 212/s over the last 1 s (96 % never contacted, at \
                 least 80 % needed) against a threshold of 50/s: 5 x the learned baseline \
                 of 8.0/s (480/min), at least 50/s"
            )
        );
        assert_eq!(s[1].measured, None);
        assert_eq!((s[1].id, s[1].paused, s[1].accepted_today), (2, false, 5));
    }

    #[test]
    fn unpause_requests_are_spooled_files_and_status_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = request_unpause(dir.path(), 42).unwrap();
        assert!(p.ends_with("control/unpause-42"));
        assert!(read_status(dir.path()).unwrap_err().contains("status.json"));
        fs::create_dir_all(detect_dir(dir.path())).unwrap();
        let mut latest = BTreeMap::new();
        latest.insert(ShardId::new(0), vec![sig(3, true, Rating::Red, 7)]);
        write_status(dir.path(), &status_file(&latest, 2));
        let back = read_status(dir.path()).unwrap();
        assert_eq!((back.shards, back.shards_reporting), (2, 1));
        assert_eq!(back.businesses, merge_status(&latest));
    }
}
