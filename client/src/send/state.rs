//! The resume state of `courier send`: a file of acked client ids, one decimal id per
//! line, appended as answers arrive.
//!
//! ```text
//! read_state(FILE.acked) ──> done ids (a torn last line ignored, junk refused)
//! StateWriter::open ──cuts the torn tail──> record(id) per accepted/duplicate answer
//!                                           flush() after every answered batch
//!                                           sync() at the end
//! ```
//!
//! Invariant: an id is written only after the server answered it `accepted` or
//! `duplicate`, so a rerun after a kill resends exactly what was not acknowledged.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::{SendError, STATE_BYTES_MAX};

/// The ids recorded by earlier runs in a state file.
#[derive(Debug, Clone, Default)]
pub struct StateRead {
    /// The acked ids.
    pub done: HashSet<u64>,
    /// Bytes of the file up to its last complete line.
    pub complete_bytes: u64,
    /// Whether the file ended in a partial line (a write cut short); it is ignored and
    /// cut off before anything is appended.
    pub torn_tail: bool,
}

/// Reads a state file: one decimal id per line. A missing file is an empty state. A
/// last line without its newline was cut short by a kill and is ignored; any other line
/// that is not an id is an error (a wrong file given as `--state`).
pub fn read_state(path: &Path) -> Result<StateRead, SendError> {
    let io_err = |source| SendError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateRead::default()),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len > STATE_BYTES_MAX {
        return Err(SendError::State {
            path: path.to_path_buf(),
            line: 0,
            what: format!("larger than {STATE_BYTES_MAX} bytes; is it a state file?"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(STATE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut state = StateRead {
        done: HashSet::new(),
        complete_bytes: complete as u64,
        torn_tail: complete < bytes.len(),
    };
    // The complete part ends with a newline; without it, splitting yields the lines.
    let body = &bytes[..complete.saturating_sub(1)];
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if complete == 0 {
            break;
        }
        let id = std::str::from_utf8(line)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| SendError::State {
                path: path.to_path_buf(),
                line: i as u64 + 1,
                what: "not a client id (one decimal id per line)".into(),
            })?;
        state.done.insert(id);
    }
    Ok(state)
}

/// Appends acked ids to the state file.
pub(crate) struct StateWriter {
    pub(crate) path: PathBuf,
    out: BufWriter<File>,
}

impl StateWriter {
    /// Opens (creating) the state file for appending, first cutting off a torn tail.
    pub(crate) fn open(path: &Path, read: &StateRead) -> std::io::Result<StateWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if read.torn_tail {
            file.set_len(read.complete_bytes)?;
        }
        Ok(StateWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub(crate) fn record(&mut self, id: u64) -> std::io::Result<()> {
        writeln!(self.out, "{id}")
    }

    /// Hands what was recorded to the kernel: it survives a kill of this process.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Flushes and syncs: it survives a crash of the machine.
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_state_file_is_ids_a_torn_tail_is_ignored_and_junk_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_state(&dir.path().join("none")).unwrap();
        assert!(missing.done.is_empty() && !missing.torn_tail);
        let p = write(dir.path(), "s", "1\n22\n333\n45");
        let s = read_state(&p).unwrap();
        assert_eq!(s.done, HashSet::from([1, 22, 333]));
        assert!(s.torn_tail);
        assert_eq!(s.complete_bytes, 9);
        // Appending cuts the torn tail off first, so `45` cannot become id 45 or 4512.
        let mut w = StateWriter::open(&p, &s).unwrap();
        w.record(12).unwrap();
        w.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1\n22\n333\n12\n");
        let bad = write(dir.path(), "bad", "1\n{\"recipient\":1}\n");
        let e = read_state(&bad).unwrap_err();
        assert!(matches!(e, SendError::State { line: 2, .. }), "{e}");
        assert!(!e.to_string().contains("recipient"), "{e}");
        let empty = write(dir.path(), "empty", "");
        assert!(read_state(&empty).unwrap().done.is_empty());
    }
}
