//! The access log, `DATA_DIR/access.log`: every run of a command that decrypts stored data
//! (`courier log verify`, `audit`, `expire`) or unwraps its keys (`courier businesses
//! erase`) appends one line saying who ran what, when,
//! over which range, with which counts and outcome. Ids and counts only: never content, a
//! phone number or a key.
//!
//! ```text
//!  command starts ──> AccessLog::open (O_APPEND | O_CREAT, mode 0600, no symlink followed;
//!                     a log that cannot be opened stops the command before it reads)
//!  command reads  ──> AccessRecord (ranges and counts it saw)
//!  command ends   ──> AccessLog::append: one JSON line, written whole, fdatasync'd
//! ```
//!
//! Append-only is what the file's mode and the code hold to (every write is an append of
//! one whole line); an operator who wants it enforced against root too sets the file's
//! append-only attribute (`chattr +a DATA_DIR/access.log`), which this code never clears.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The access log's file name in the data directory.
pub const ACCESS_LOG: &str = "access.log";

/// The access log of a data directory, open for appending.
#[derive(Debug)]
pub struct AccessLog {
    file: File,
    path: PathBuf,
}

/// Why the access log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// It could not be opened, written or synced.
    #[error(
        "{path}: {source} (the access log records every read of stored data; nothing was read)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Its group or others may read it.
    #[error("{0}")]
    Insecure(String),
}

impl AccessLog {
    /// Opens (creating, mode 0600) `data_dir/access.log` for appending.
    pub fn open(data_dir: &Path) -> Result<AccessLog, AccessError> {
        let path = data_dir.join(ACCESS_LOG);
        let io = |source| AccessError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        // The file as opened (no second lookup by name): it says who read what.
        let mode = file.metadata().map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(AccessError::Insecure(format!(
                "{} has mode {:04o}: the access log must not be open to its group or others; \
                 fix it with `chmod 600 {}`",
                path.display(),
                mode & 0o7777,
                path.display()
            )));
        }
        Ok(AccessLog { file, path })
    }

    /// Appends `record` as one line and syncs it.
    pub fn append(&mut self, record: &AccessRecord) -> Result<(), AccessError> {
        let mut line = serde_json::to_vec(record).expect("an access record serializes");
        line.push(b'\n');
        let io = |source| AccessError::Io {
            path: self.path.clone(),
            source,
        };
        // One write of the whole line: with O_APPEND the kernel places it at the end in
        // one piece, so concurrent runs never interleave within a line.
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// The log positions a run covered in one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShardRange {
    /// The shard.
    pub shard: u16,
    /// Segment ids read (or dropped, for `expire`), ascending.
    pub segments: Vec<u64>,
    /// Lowest log index covered.
    pub first_index: Option<u64>,
    /// One past the highest log index covered.
    pub end_index: Option<u64>,
}

impl ShardRange {
    /// Widens the range by the indexes `first..end`.
    pub fn cover(&mut self, first: u64, end: u64) {
        self.first_index = Some(self.first_index.map_or(first, |f| f.min(first)));
        self.end_index = Some(self.end_index.map_or(end, |e| e.max(end)));
    }
}

/// One run of a command that decrypts stored data.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// When it ended, unix ms.
    pub at_unix_ms: u64,
    /// The OS user (from the passwd database; `?` when the uid has no entry).
    pub user: String,
    /// The real uid.
    pub uid: u32,
    /// The process.
    pub pid: u32,
    /// The command, e.g. `log verify`.
    pub command: String,
    /// Its arguments, by flag (paths and switches; no secret is ever an argument).
    pub args: Vec<(String, String)>,
    /// What it covered, per shard.
    pub ranges: Vec<ShardRange>,
    /// What it counted (records read, messages listed, segments dropped, ...).
    pub counts: Vec<(String, u64)>,
    /// `ok`, or `failed` (the error is not recorded: it may name more than ids).
    pub outcome: String,
}

impl AccessRecord {
    /// A record of `command` run now by this process's user.
    pub fn new(command: &str, args: Vec<(String, String)>) -> AccessRecord {
        let uid = real_uid().unwrap_or(u32::MAX);
        AccessRecord {
            at_unix_ms: 0,
            user: user_name(uid).unwrap_or_else(|| "?".to_string()),
            uid,
            pid: std::process::id(),
            command: command.to_string(),
            args,
            ranges: Vec::new(),
            counts: Vec::new(),
            outcome: "failed".to_string(),
        }
    }

    /// Stamps the end time and the outcome.
    pub fn finish(&mut self, ok: bool) {
        self.at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.outcome = if ok { "ok" } else { "failed" }.to_string();
    }

    /// The range of `shard`, created empty on first use.
    pub fn range(&mut self, shard: u16) -> &mut ShardRange {
        let i = match self.ranges.iter().position(|r| r.shard == shard) {
            Some(i) => i,
            None => {
                self.ranges.push(ShardRange {
                    shard,
                    ..ShardRange::default()
                });
                self.ranges.len() - 1
            }
        };
        &mut self.ranges[i]
    }
}

/// The real uid of this process, from `/proc/self/status` (no `unsafe` call needed).
fn real_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The user name of `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_private_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..2u64 {
            let mut log = AccessLog::open(dir.path()).unwrap();
            let mut rec = AccessRecord::new("log verify", vec![("dir".into(), "x".into())]);
            rec.range(3).cover(10, 20);
            rec.range(3).cover(5, 12);
            rec.counts.push(("records".into(), n));
            rec.finish(true);
            log.append(&rec).unwrap();
        }
        let path = dir.path().join(ACCESS_LOG);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["counts"][0], serde_json::json!(["records", 1]));
        assert_eq!(lines[0]["ranges"][0]["first_index"], 5);
        assert_eq!(lines[0]["ranges"][0]["end_index"], 20);
        assert_eq!(lines[0]["outcome"], "ok");
        assert_eq!(lines[0]["uid"], real_uid().unwrap());
    }

    #[test]
    fn a_log_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_LOG);
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AccessLog::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
