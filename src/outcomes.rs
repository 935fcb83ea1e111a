//! `courier log audit`'s delivery part: what the log's status records say became of the
//! messages of an accepted list.
//!
//! ```text
//!  accepted list ──> positions wanted
//!  DATA_DIR/log/shard-K/ ──> every readable record of every segment, in order
//!     status record (reference = a wanted message's position) ──> its statuses
//!  per message: the first of delivered | failed(reason) | expired is its final status,
//!               `read` counted after `delivered`; none: still waiting (or never entered
//!               delivery: delivery off, a version 1 log); more than one: counted, a bug
//! ```
//!
//! A status record lives in the log of the shard that holds its message, so each shard
//! is read on its own. Read only, like the rest of the audit; only ids, counts and status
//! names leave this module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;

use courier_pipeline::log::{Keyring, MasterKey, RecordKind, SegmentCodec, SegmentHeader};
use courier_pipeline::wire::delivery::{StatusEvent, StatusKind};

use crate::audit::{
    read_keyring, segment_path, shard_dirs, AcceptedEntry, AuditError, PAYLOAD_BYTES_MAX,
};
use crate::store::{list_segments, MasterKeyText};

/// What became of the listed messages, by their status records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeReport {
    /// Listed messages delivered.
    pub delivered: u64,
    /// Of those, read.
    pub read: u64,
    /// Listed messages failed, by reason name.
    pub failed: BTreeMap<String, u64>,
    /// Listed messages expired.
    pub expired: u64,
    /// Listed messages without a final status record: still waiting for delivery (or
    /// stored while delivery was off, or before it existed).
    pub pending: u64,
    /// Listed messages with more than one final status record (must be 0).
    pub extra_finals: u64,
    /// Segments whose records could not all be read (statuses after the first unreadable
    /// record are not counted; `courier log verify` says why).
    pub unreadable_segments: u64,
}

impl OutcomeReport {
    /// Failed messages, all reasons together.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Whether every listed message has exactly one final status.
    pub fn all_final(&self) -> bool {
        self.pending == 0 && self.extra_finals == 0
    }

    /// Writes one line of counts.
    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let failed: Vec<String> = self
            .failed
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        writeln!(
            out,
            "outcomes: delivered {} (read {}), failed {}{}, expired {}, no final status {}, \
             more than one final status {}{}",
            self.delivered,
            self.read,
            self.failed_total(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed.join(", "))
            },
            self.expired,
            self.pending,
            self.extra_finals,
            if self.unreadable_segments > 0 {
                format!(
                    "; {} segment(s) not readable to the end",
                    self.unreadable_segments
                )
            } else {
                String::new()
            }
        )
    }
}

/// What the status records of one message say.
#[derive(Debug, Default)]
struct Seen {
    finals: Vec<(StatusKind, Option<&'static str>)>,
    read: bool,
}

/// Reads the status records of every shard under `data_dir` and reports the outcome of
/// each message of `entries`.
pub fn outcomes(
    data_dir: &Path,
    master_key: &MasterKeyText,
    entries: &[AcceptedEntry],
) -> Result<OutcomeReport, AuditError> {
    let master = master_key.master_key();
    let wanted: HashSet<u64> = entries.iter().map(|e| e.position.0).collect();
    let shards: HashSet<u16> = entries.iter().map(|e| e.position.shard()).collect();
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let mut report = OutcomeReport::default();
    for (shard, dir) in shard_dirs(data_dir)? {
        if !shards.contains(&shard) {
            continue;
        }
        let keyring = match read_keyring(&dir) {
            Ok(Some(k)) => k,
            // No keyring: no readable segment; `audit` reports those messages missing.
            Ok(None) | Err(_) => continue,
        };
        for id in list_segments(&dir).map_err(|source| AuditError::Io {
            path: dir.clone(),
            source,
        })? {
            let path = segment_path(&dir, id);
            let bytes = fs::read(&path).map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
            let whole = statuses(&bytes, &keyring, &master, &wanted, &mut seen);
            report.unreadable_segments += u64::from(!whole);
        }
    }
    for e in entries {
        let Some(s) = seen.get(&e.position.0) else {
            report.pending += 1;
            continue;
        };
        report.extra_finals += u64::from(s.finals.len() > 1);
        match s.finals.first() {
            None => report.pending += 1,
            Some((StatusKind::Delivered, _)) => {
                report.delivered += 1;
                report.read += u64::from(s.read);
            }
            Some((StatusKind::Expired, _)) => report.expired += 1,
            Some((_, reason)) => {
                *report
                    .failed
                    .entry(reason.unwrap_or("unknown").to_string())
                    .or_default() += 1;
            }
        }
    }
    Ok(report)
}

/// Notes the status records of one segment about `wanted` messages; false when a record
/// could not be read (the rest of the segment is skipped).
fn statuses(
    bytes: &[u8],
    keyring: &Keyring,
    master: &MasterKey,
    wanted: &HashSet<u64>,
    seen: &mut HashMap<u64, Seen>,
) -> bool {
    let Ok(header) = SegmentHeader::decode(bytes) else {
        return false;
    };
    let Ok(key) = keyring.data_key(master, header.data_key_id) else {
        // Destroyed by retention (its messages are gone too) or unreadable.
        return false;
    };
    let codec = SegmentCodec::new(header, key, PAYLOAD_BYTES_MAX);
    for r in codec.records(bytes) {
        let Ok((_, rec)) = r else {
            return false;
        };
        let h = rec.header;
        if h.kind != RecordKind::Status || !wanted.contains(&h.reference) {
            continue;
        }
        let Some((kind, reason)) = StatusEvent::from_code(h.code) else {
            continue;
        };
        let s = seen.entry(h.reference).or_default();
        match kind {
            StatusKind::Sent => {}
            StatusKind::Read => s.read = true,
            final_kind => s.finals.push((final_kind, reason.map(|r| r.name()))),
        }
    }
    true
}
