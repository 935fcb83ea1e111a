//! Operator checks of the log on disk: `courier log verify` and `courier log audit`.
//!
//! ```text
//!  DATA_DIR/log/shard-K/ ──> keyring + master key ──> per segment: header ─> data key
//!     verify: SegmentCodec::scan (every record: CRC, then AEAD tag) ──> SegmentReport
//!     audit:  accepted list (business_id,client_id,log_position) ──> shard + index
//!             ──> segment by first_index ──> SegmentCodec::read_record ──> compare ids
//! ```
//!
//! Both read only: they never change a file, so they are safe to run next to a live
//! server (its newest segment may then show a tail still being written). Neither report
//! ever holds a recipient or a payload: records are decrypted to check their tags and ids,
//! and only ids, counts, offsets and times leave this module.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use courier_pipeline::log::format::SEGMENT_HEADER_BYTES;
use courier_pipeline::log::{
    Before, CorruptionCause, KeyState, Keyring, MasterKey, RecordKind, ScanOutcome, SegmentCodec,
    SegmentHeader,
};
use courier_pipeline::wire::LogPosition;

use crate::store::{list_segments, MasterKeyText};

/// The payload bound the tools check record lengths against: the largest record payload a
/// log written under any profile holds (the widest `limits.payload_bytes_max`, sealed), so
/// that every log reads back (a tighter bound would call long records corrupt).
pub const PAYLOAD_BYTES_MAX: u32 = courier_pipeline::log::RECORD_PAYLOAD_BYTES_LIMIT;

/// Most lines an accepted list may hold; bounds the audit's memory.
pub const ACCEPTED_LINES_MAX: usize = 100_000_000;

/// The header line of an accepted list, as `courier-loadgen --accepted` writes it.
pub const ACCEPTED_HEADER: &str = "business_id,client_id,log_position";

/// Why a tool could not run at all (as opposed to finding damage, which it reports).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `DIR/log` does not exist: not a courier data directory.
    #[error(
        "{0}: no log directory here (expected DATA_DIR/log/shard-K/); is this a courier data dir?"
    )]
    NoLog(PathBuf),
    /// The accepted list is malformed.
    #[error("{path} line {line}: {what}")]
    AcceptedList {
        /// The list.
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What verify found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentState {
    /// Every record passed its CRC and its tag.
    Ok,
    /// The last record is partial (a write cut by a crash); recovery truncates it at `offset`.
    TornTail {
        /// Where the valid prefix ends.
        offset: u64,
        /// What is wrong there (offsets and lengths only).
        cause: String,
    },
    /// The header was never completely written; recovery removes the file.
    TornHeader,
    /// Damage before the tail or a failed tag: recovery refuses to start this shard.
    Corrupt {
        /// Byte offset of the bad record (0: the header).
        offset: u64,
        /// What is wrong.
        cause: String,
    },
    /// Its data key was destroyed by retention; recovery removes the file.
    KeyDestroyed,
    /// It was written after records lost in a crash (or follows such a segment): none of
    /// its records was acknowledged, and recovery removes the file.
    AfterLostRecords,
    /// Its data key cannot be used: wrong master key, tampered or missing keyring.
    KeyError(String),
}

impl SegmentState {
    /// Whether this state is damage an operator must act on.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            SegmentState::Corrupt { .. } | SegmentState::KeyError(_)
        )
    }
}

impl fmt::Display for SegmentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentState::Ok => f.write_str("OK"),
            SegmentState::TornTail { offset, cause } => {
                write!(
                    f,
                    "torn tail at offset {offset} (recovery truncates it): {cause}"
                )
            }
            SegmentState::TornHeader => f.write_str("torn header (recovery removes the file)"),
            SegmentState::Corrupt { offset, cause } => {
                write!(f, "CORRUPT at offset {offset}: {cause}")
            }
            SegmentState::KeyDestroyed => {
                f.write_str("key destroyed (expired; unreadable by design)")
            }
            SegmentState::AfterLostRecords => f.write_str(
                "after records lost in a crash (never acknowledged; recovery removes the file)",
            ),
            SegmentState::KeyError(e) => write!(f, "KEY ERROR: {e}"),
        }
    }
}

/// One segment as verify saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// The shard.
    pub shard: u16,
    /// The segment id (its file name).
    pub segment_id: u64,
    /// Log index of its first record (from the header; 0 when the header is unreadable).
    pub first_index: u64,
    /// Records that passed.
    pub records: u32,
    /// Bytes of the file.
    pub bytes: u64,
    /// Time of the newest valid record, unix ms.
    pub newest_ms: Option<u64>,
    /// The verdict.
    pub state: SegmentState,
}

/// What verify found in a data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every segment of every shard, by shard then id.
    pub segments: Vec<SegmentReport>,
    /// Shard-level problems (keyring missing or unreadable), as text.
    pub shard_errors: Vec<(u16, String)>,
}

impl VerifyReport {
    /// Whether nothing needs an operator: no corruption, no key error, no shard error.
    pub fn is_clean(&self) -> bool {
        self.shard_errors.is_empty() && !self.segments.iter().any(|s| s.state.is_failure())
    }

    /// Writes the per-segment table and a summary line.
    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:>5}  {:>20}  {:>12}  {:>10}  {:>12}  {:>15}  state",
            "shard", "segment", "first_index", "records", "bytes", "newest_ms"
        )?;
        for s in &self.segments {
            let newest = s.newest_ms.map_or("-".to_string(), |t| t.to_string());
            writeln!(
                out,
                "{:>5}  {:>20}  {:>12}  {:>10}  {:>12}  {:>15}  {}",
                s.shard, s.segment_id, s.first_index, s.records, s.bytes, newest, s.state
            )?;
        }
        for (shard, e) in &self.shard_errors {
            writeln!(out, "shard {shard}: ERROR: {e}")?;
        }
        let failures = self
            .segments
            .iter()
            .filter(|s| s.state.is_failure())
            .count()
            + self.shard_errors.len();
        let records: u64 = self.segments.iter().map(|s| u64::from(s.records)).sum();
        writeln!(
            out,
            "{} segment(s), {records} record(s) verified; {failures} problem(s)",
            self.segments.len()
        )
    }
}

/// The shard directories under `data_dir/log`, as (shard, path), by shard.
///
/// Shards are read as the decimal number the directory's name holds, in the 16 bits a log
/// position carries, not as a `ShardId`: the tools report what is on disk (and what an
/// accepted list names), including a directory no server writes.
pub fn shard_dirs(data_dir: &Path) -> Result<Vec<(u16, PathBuf)>, AuditError> {
    let log = data_dir.join("log");
    if !log.is_dir() {
        return Err(AuditError::NoLog(data_dir.to_path_buf()));
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&log).map_err(io_err(&log))? {
        let entry = entry.map_err(io_err(&log))?;
        let name = entry.file_name();
        if let Some(k) = name
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|k| k.parse::<u16>().ok())
        {
            out.push((k, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A shard's keyring, or why it cannot be used. `Ok(None)`: no keyring file.
pub(crate) fn read_keyring(dir: &Path) -> Result<Option<Keyring>, String> {
    let path = dir.join("keyring");
    match fs::read(&path) {
        Ok(bytes) => Keyring::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Checks every record of every segment of every shard under `data_dir`: CRC and AEAD tag.
pub fn verify(data_dir: &Path, master_key: &MasterKeyText) -> Result<VerifyReport, AuditError> {
    let master = master_key.master_key();
    let mut report = VerifyReport::default();
    for (shard, dir) in shard_dirs(data_dir)? {
        let ids = list_segments(&dir).map_err(io_err(&dir))?;
        let keyring = match read_keyring(&dir) {
            Ok(Some(k)) => k,
            Ok(None) if ids.is_empty() => continue,
            Ok(None) => {
                report.shard_errors.push((
                    shard,
                    "segment files exist but the keyring is missing".to_string(),
                ));
                Keyring::new()
            }
            Err(e) => {
                report.shard_errors.push((shard, e));
                Keyring::new()
            }
        };
        // What recovery will remove as written after lost records (its rule, in order).
        let mut before = Before::Nothing;
        let mut lost = false;
        for id in ids {
            let path = segment_path(&dir, id);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            lost = lost || SegmentHeader::decode(&bytes).is_ok_and(|h| before.lost_before(&h));
            let mut r = verify_segment(shard, id, &bytes, &keyring, &master);
            if lost {
                r.state = SegmentState::AfterLostRecords;
            }
            before = match r.state {
                SegmentState::Ok | SegmentState::TornTail { .. } => Before::Kept {
                    end: r.first_index + u64::from(r.records),
                },
                SegmentState::TornHeader => Before::TornHeader,
                _ => Before::Nothing,
            };
            report.segments.push(r);
        }
    }
    Ok(report)
}

fn verify_segment(
    shard: u16,
    segment_id: u64,
    bytes: &[u8],
    keyring: &Keyring,
    master: &MasterKey,
) -> SegmentReport {
    let mut r = SegmentReport {
        shard,
        segment_id,
        first_index: 0,
        records: 0,
        bytes: bytes.len() as u64,
        newest_ms: None,
        state: SegmentState::Ok,
    };
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(_) if bytes.len() < SEGMENT_HEADER_BYTES => {
            r.state = SegmentState::TornHeader;
            return r;
        }
        Err(e) => {
            r.state = SegmentState::Corrupt {
                offset: 0,
                cause: e.to_string(),
            };
            return r;
        }
    };
    r.first_index = header.first_index;
    if header.segment_id != segment_id {
        r.state = SegmentState::Corrupt {
            offset: 0,
            cause: CorruptionCause::IdMismatch {
                header_segment_id: header.segment_id,
            }
            .to_string(),
        };
        return r;
    }
    if keyring.state(header.data_key_id) == KeyState::Destroyed {
        r.state = SegmentState::KeyDestroyed;
        return r;
    }
    let key = match keyring.data_key(master, header.data_key_id) {
        Ok(k) => k,
        Err(e) => {
            r.state = SegmentState::KeyError(e.to_string());
            return r;
        }
    };
    let (summary, state) = match SegmentCodec::new(header, key, PAYLOAD_BYTES_MAX).scan(bytes) {
        ScanOutcome::Clean(s) => (Some(s), SegmentState::Ok),
        ScanOutcome::TornTail {
            summary,
            truncate_to,
            cause,
        } => (
            Some(summary),
            SegmentState::TornTail {
                offset: truncate_to,
                cause: cause.to_string(),
            },
        ),
        ScanOutcome::TornHeader { .. } => (None, SegmentState::TornHeader),
        ScanOutcome::Corrupt(c) => (
            None,
            SegmentState::Corrupt {
                offset: c.offset,
                cause: c.cause.to_string(),
            },
        ),
    };
    if let Some(s) = summary {
        r.records = s.records;
        r.newest_ms = s.newest_ms;
    }
    r.state = state;
    r
}

/// One line of an accepted list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedEntry {
    /// The sending business.
    pub business_id: u32,
    /// Its client message id.
    pub client_id: u64,
    /// Where courier said it keeps it.
    pub position: LogPosition,
}

/// Reads an accepted list: the header line [`ACCEPTED_HEADER`], then one
/// `business_id,client_id,log_position` line per message (blank lines ignored).
pub fn read_accepted(path: &Path) -> Result<Vec<AcceptedEntry>, AuditError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let bad = |line: usize, what: String| AuditError::AcceptedList {
        path: path.to_path_buf(),
        line,
        what,
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        let line = line.trim();
        if i == 0 {
            if line != ACCEPTED_HEADER {
                return Err(bad(1, format!("expected the header `{ACCEPTED_HEADER}`")));
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if out.len() >= ACCEPTED_LINES_MAX {
            return Err(bad(i + 1, format!("more than {ACCEPTED_LINES_MAX} lines")));
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [b, c, p] = fields[..] else {
            return Err(bad(
                i + 1,
                format!("expected 3 comma-separated fields, got {}", fields.len()),
            ));
        };
        let num = |name: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(i + 1, format!("{name} is not an unsigned integer")))
        };
        let business_id = u32::try_from(num("business_id", b)?)
            .map_err(|_| bad(i + 1, "business_id does not fit 32 bits".to_string()))?;
        out.push(AcceptedEntry {
            business_id,
            client_id: num("client_id", c)?,
            position: LogPosition(num("log_position", p)?),
        });
    }
    Ok(out)
}

/// Writes an accepted list (the format [`read_accepted`] reads).
pub fn write_accepted(
    out: &mut dyn std::io::Write,
    entries: &[AcceptedEntry],
) -> std::io::Result<()> {
    writeln!(out, "{ACCEPTED_HEADER}")?;
    for e in entries {
        writeln!(out, "{},{},{}", e.business_id, e.client_id, e.position.0)?;
    }
    Ok(())
}

/// Why an accepted message was not found intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No readable record at its position (no such shard, segment or index; key destroyed;
    /// or the record fails its checks).
    Missing {
        /// The entry.
        entry: AcceptedEntry,
        /// Why, without content.
        why: String,
    },
    /// A record is there but holds another message.
    Mismatched {
        /// The entry.
        entry: AcceptedEntry,
        /// What the record holds.
        found_business_id: u32,
        /// What the record holds.
        found_client_id: u64,
    },
}

/// What audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Entries found intact.
    pub present: u64,
    /// Entries with no readable record.
    pub missing: u64,
    /// Entries whose record holds another message.
    pub mismatched: u64,
    /// The first [`FINDINGS_KEPT_MAX`] problems, for the operator.
    pub findings: Vec<Finding>,
}

/// Problems an audit report lists one by one; the counts cover all of them.
pub const FINDINGS_KEPT_MAX: usize = 20;

impl AuditReport {
    /// Whether every listed message is present and intact.
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.mismatched == 0
    }

    fn note(&mut self, f: Finding) {
        match f {
            Finding::Missing { .. } => self.missing += 1,
            Finding::Mismatched { .. } => self.mismatched += 1,
        }
        if self.findings.len() < FINDINGS_KEPT_MAX {
            self.findings.push(f);
        }
    }

    /// Writes the findings and the counts.
    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for f in &self.findings {
            match f {
                Finding::Missing { entry, why } => writeln!(
                    out,
                    "missing: business {} client id {} at shard {} index {}: {why}",
                    entry.business_id,
                    entry.client_id,
                    entry.position.shard(),
                    entry.position.index()
                )?,
                Finding::Mismatched {
                    entry,
                    found_business_id,
                    found_client_id,
                } => writeln!(
                    out,
                    "mismatched: shard {} index {} holds business {found_business_id} client id \
                     {found_client_id}, the list says business {} client id {}",
                    entry.position.shard(),
                    entry.position.index(),
                    entry.business_id,
                    entry.client_id
                )?,
            }
        }
        writeln!(
            out,
            "present {}, missing {}, mismatched {}",
            self.present, self.missing, self.mismatched
        )
    }
}

/// Checks that every entry is present and intact in the log under `data_dir`.
pub fn audit(
    data_dir: &Path,
    master_key: &MasterKeyText,
    entries: &[AcceptedEntry],
) -> Result<AuditReport, AuditError> {
    let master = master_key.master_key();
    let shards: BTreeMap<u16, PathBuf> = shard_dirs(data_dir)?.into_iter().collect();
    // By shard, then index: each segment is read once.
    let mut by_shard: BTreeMap<u16, Vec<AcceptedEntry>> = BTreeMap::new();
    for e in entries {
        by_shard.entry(e.position.shard()).or_default().push(*e);
    }
    let mut report = AuditReport::default();
    for (shard, mut list) in by_shard {
        list.sort_by_key(|e| e.position.index());
        let Some(dir) = shards.get(&shard) else {
            for entry in list {
                report.note(Finding::Missing {
                    entry,
                    why: "no such shard directory".into(),
                });
            }
            continue;
        };
        audit_shard(dir, &master, &list, &mut report)?;
    }
    Ok(report)
}

/// The ids (business, client) and kinds of the readable records of one segment, in
/// index order, up to the first record that does not read; plus why reading stopped
/// early, if it did.
fn segment_ids(
    bytes: &[u8],
    header: SegmentHeader,
    keyring: &Keyring,
    master: &MasterKey,
) -> (Vec<(u32, u64, RecordKind)>, Option<String>) {
    let key = match keyring.data_key(master, header.data_key_id) {
        Ok(k) => k,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    let codec = SegmentCodec::new(header, key, PAYLOAD_BYTES_MAX);
    let mut ids = Vec::new();
    for r in codec.records(bytes) {
        match r {
            Ok((_, rec)) => ids.push((
                rec.header.business_id,
                rec.header.client_id,
                rec.header.kind,
            )),
            Err(e) => return (ids, Some(e.to_string())),
        }
    }
    (ids, None)
}

type LoadedSegment = (u64, Vec<(u32, u64, RecordKind)>, Option<String>);

fn audit_shard(
    dir: &Path,
    master: &MasterKey,
    list: &[AcceptedEntry],
    report: &mut AuditReport,
) -> Result<(), AuditError> {
    let keyring = match read_keyring(dir) {
        Ok(Some(k)) => k,
        Ok(None) => Keyring::new(),
        Err(why) => {
            for &entry in list {
                report.note(Finding::Missing {
                    entry,
                    why: why.clone(),
                });
            }
            return Ok(());
        }
    };
    // Headers of every segment, by first index.
    let mut segments: Vec<(SegmentHeader, PathBuf)> = Vec::new();
    for id in list_segments(dir).map_err(io_err(dir))? {
        let path = segment_path(dir, id);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        if let Ok(h) = SegmentHeader::decode(&bytes) {
            segments.push((h, path));
        }
    }
    segments.sort_by_key(|(h, _)| h.first_index);
    // The segment last read: (id, its records' ids, why reading stopped early).
    let mut loaded: Option<LoadedSegment> = None;
    for &entry in list {
        let index = entry.position.index();
        // The segment whose first index is the greatest at or below `index`.
        let at = segments.partition_point(|(h, _)| h.first_index <= index);
        let Some((header, path)) = at.checked_sub(1).map(|i| &segments[i]) else {
            report.note(Finding::Missing {
                entry,
                why: "no segment holds this index".into(),
            });
            continue;
        };
        if loaded.as_ref().map(|l| l.0) != Some(header.segment_id) {
            let bytes = fs::read(path).map_err(io_err(path))?;
            let (ids, stop) = segment_ids(&bytes, *header, &keyring, master);
            loaded = Some((header.segment_id, ids, stop));
        }
        let (segment_id, ids, stop) = loaded.as_ref().expect("loaded above");
        match ids.get((index - header.first_index) as usize) {
            // A status record carries its message's ids: only a message record counts.
            Some(&(_, _, kind)) if kind != RecordKind::Message => report.note(Finding::Missing {
                entry,
                why: format!("the record there is a {kind:?} record, not a message"),
            }),
            Some(&(b, c, _)) if b == entry.business_id && c == entry.client_id => {
                report.present += 1
            }
            Some(&(b, c, _)) => report.note(Finding::Mismatched {
                entry,
                found_business_id: b,
                found_client_id: c,
            }),
            None => report.note(Finding::Missing {
                entry,
                why: match stop {
                    Some(why) => format!(
                        "segment {segment_id} holds {} readable record(s); then {why}",
                        ids.len()
                    ),
                    None => format!("segment {segment_id} ends after {} record(s)", ids.len()),
                },
            }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> Result<Vec<AcceptedEntry>, AuditError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accepted.csv");
        fs::write(&p, text).unwrap();
        read_accepted(&p)
    }

    #[test]
    fn an_accepted_list_round_trips() {
        let entries = vec![
            AcceptedEntry {
                business_id: 7,
                client_id: 42,
                position: LogPosition::new(courier_pipeline::ShardId::new(1), 5),
            },
            AcceptedEntry {
                business_id: u32::MAX,
                client_id: u64::MAX,
                position: LogPosition::new(courier_pipeline::ShardId::new(0), 0),
            },
        ];
        let mut out = Vec::new();
        write_accepted(&mut out, &entries).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("business_id,client_id,log_position\n"));
        assert_eq!(list(&text).unwrap(), entries);
        assert_eq!(
            list(&format!("{text}\n\n")).unwrap(),
            entries,
            "blank lines"
        );
    }

    #[test]
    fn a_malformed_accepted_list_names_the_line() {
        let err = |t: &str| list(t).unwrap_err().to_string();
        assert!(err("client_id,business_id,log_position\n").contains("line 1"));
        let e = err("business_id,client_id,log_position\n1,2,3\n1,2\n");
        assert!(
            e.contains("line 3") && e.contains("3 comma-separated"),
            "{e}"
        );
        let e = err("business_id,client_id,log_position\n1,x,3\n");
        assert!(e.contains("line 2") && e.contains("client_id"), "{e}");
        let e = err("business_id,client_id,log_position\n4294967296,1,3\n");
        assert!(e.contains("32 bits"), "{e}");
    }

    #[test]
    fn a_dir_without_a_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKeyText::random();
        assert!(matches!(
            verify(dir.path(), &key),
            Err(AuditError::NoLog(_))
        ));
        assert!(matches!(
            audit(dir.path(), &key, &[]),
            Err(AuditError::NoLog(_))
        ));
    }
}
