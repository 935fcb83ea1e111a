//! Pass 1 of `courier send`: every line of the file checked before anything is sent,
//! keeping ids only (16 bytes per message), so that a bad line or a duplicate id stops
//! the send before its first byte.
//!
//! ```text
//! FILE ──LineReader──> parse_line(bounds) ──> counts, largest sizes, (id, line) pairs
//!                            └─ bad line ──> first BAD_LINES_SHOWN_MAX kept, all counted
//! (id, line) pairs ──sort──> runs of equal ids ──> DuplicateId{first_line}
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use super::lines::{
    is_blank, message_alone_bytes, parse_line, Bounds, LineProblem, LineReader, ReadLine,
};
use super::{SendError, BAD_LINES_SHOWN_MAX, LINE_BYTES_MAX, MESSAGES_MAX, READ_BUFFER_BYTES};

/// One bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// Its 1-based number.
    pub line: u64,
    /// What is wrong.
    pub problem: LineProblem,
}

/// What pass 1 found.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// Lines read (blank ones included).
    pub lines: u64,
    /// Valid messages.
    pub messages: u64,
    /// Valid messages whose id is already done (in the state file).
    pub skipped: u64,
    /// Bad lines in all (duplicate ids included).
    pub bad_count: u64,
    /// The first [`BAD_LINES_SHOWN_MAX`] bad lines, by line number.
    pub bad: Vec<BadLine>,
    /// Largest payload of a valid message.
    pub payload_bytes_largest: usize,
    /// Largest SUBMIT body of a valid message alone in a batch.
    pub message_bytes_largest: usize,
}

impl Validation {
    /// No bad line.
    pub fn is_clean(&self) -> bool {
        self.bad_count == 0
    }

    /// Whether some valid message is outside `bounds` (a server's, tighter than those
    /// the file was validated with).
    pub fn exceeds(&self, bounds: &Bounds) -> bool {
        self.payload_bytes_largest > bounds.payload_bytes_max as usize
            || self.message_bytes_largest > bounds.frame_bytes_max as usize
    }
}

/// Pass 1: checks every line of `path` against `bounds` and the ids for duplicates,
/// keeping only ids; counts the valid messages whose id is in `done`.
pub fn validate(
    path: &Path,
    bounds: &Bounds,
    done: &HashSet<u64>,
) -> Result<Validation, SendError> {
    validate_with(path, bounds, done, LINE_BYTES_MAX, MESSAGES_MAX)
}

fn validate_with(
    path: &Path,
    bounds: &Bounds,
    done: &HashSet<u64>,
    line_bytes_max: usize,
    messages_max: u64,
) -> Result<Validation, SendError> {
    let io_err = |source| SendError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut lines = LineReader::new(
        BufReader::with_capacity(READ_BUFFER_BYTES, file),
        line_bytes_max,
    );
    let mut v = Validation::default();
    let mut ids: Vec<(u64, u64)> = Vec::new();
    let mut bad: Vec<BadLine> = Vec::new();
    while let Some((line_no, line)) = lines.next_line().map_err(io_err)? {
        v.lines = line_no;
        let parsed = match line {
            ReadLine::TooLong => Err(LineProblem::TooLong {
                max: line_bytes_max,
            }),
            ReadLine::Line(text) if is_blank(text) => continue,
            ReadLine::Line(text) => parse_line(text, line_no, bounds),
        };
        let parsed = parsed.and_then(|m| {
            if v.messages >= messages_max {
                Err(LineProblem::TooManyMessages { max: messages_max })
            } else {
                Ok(m)
            }
        });
        match parsed {
            Ok(m) => {
                v.messages += 1;
                v.payload_bytes_largest = v.payload_bytes_largest.max(m.payload.len());
                v.message_bytes_largest = v.message_bytes_largest.max(message_alone_bytes(&m));
                if done.contains(&m.client_id) {
                    v.skipped += 1;
                }
                ids.push((m.client_id, line_no));
            }
            Err(problem) => {
                v.bad_count += 1;
                if bad.len() < BAD_LINES_SHOWN_MAX {
                    bad.push(BadLine {
                        line: line_no,
                        problem,
                    });
                }
            }
        }
    }
    // Duplicate ids: after sorting by (id, line) each run of equal ids starts at the
    // first line that used the id.
    ids.sort_unstable();
    let mut duplicates: Vec<BadLine> = Vec::new();
    let mut first = 0;
    for i in 1..ids.len() {
        if ids[i].0 != ids[first].0 {
            first = i;
            continue;
        }
        v.bad_count += 1;
        let b = BadLine {
            line: ids[i].1,
            problem: LineProblem::DuplicateId {
                id: ids[i].0,
                first_line: ids[first].1,
            },
        };
        // Keep the duplicates with the smallest line numbers only.
        if duplicates.len() < BAD_LINES_SHOWN_MAX {
            duplicates.push(b);
        } else if let Some(worst) = duplicates.iter_mut().max_by_key(|d| d.line) {
            if b.line < worst.line {
                *worst = b;
            }
        }
    }
    bad.extend(duplicates);
    bad.sort_by_key(|b| b.line);
    bad.truncate(BAD_LINES_SHOWN_MAX);
    v.bad = bad;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn good(id: Option<u64>, i: u64) -> String {
        let id = id.map_or(String::new(), |id| format!(r#""id":{id},"#));
        format!(
            r#"{{{id}"recipient":"+1555{:07}","payload":"hello {i}"}}"#,
            i
        )
    }

    #[test]
    fn validation_finds_duplicate_ids_with_both_lines_and_counts_skips() {
        let dir = tempfile::tempdir().unwrap();
        // Line 2 has no id (so id 2); line 4 says id 2; line 5 repeats id 9 of line 1.
        let text = [
            good(Some(9), 1),
            good(None, 2),
            String::new(),
            good(Some(2), 4),
            good(Some(9), 5),
            good(Some(10), 6),
        ]
        .join("\n");
        let f = write(dir.path(), "in.jsonl", &text);
        let v = validate(&f, &Bounds::WIDEST, &HashSet::from([10, 77])).unwrap();
        assert_eq!((v.lines, v.messages, v.skipped), (6, 5, 1));
        assert_eq!(v.bad_count, 2);
        assert_eq!(
            v.bad,
            vec![
                BadLine {
                    line: 4,
                    problem: LineProblem::DuplicateId {
                        id: 2,
                        first_line: 2
                    }
                },
                BadLine {
                    line: 5,
                    problem: LineProblem::DuplicateId {
                        id: 9,
                        first_line: 1
                    }
                },
            ]
        );
    }

    #[test]
    fn validation_lists_the_first_bad_lines_and_counts_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines: Vec<String> = (1..=60).map(|i| good(None, i)).collect();
        for i in (0..60).step_by(2) {
            lines[i] = "{".into();
        }
        lines.push("x".repeat(100));
        let f = write(dir.path(), "in.jsonl", &lines.join("\n"));
        let v = validate_with(&f, &Bounds::WIDEST, &HashSet::new(), 64, 20).unwrap();
        // 30 bad lines, 1 too long, 30 good of which 10 over the messages bound.
        assert_eq!(v.bad_count, 41);
        assert_eq!(v.messages, 20);
        assert_eq!(v.bad.len(), BAD_LINES_SHOWN_MAX);
        let numbers: Vec<u64> = v.bad.iter().map(|b| b.line).collect();
        assert_eq!(numbers, (1..=39).step_by(2).collect::<Vec<u64>>());
        let text = SendError::BadInput {
            path: f.clone(),
            validation: v,
        }
        .to_string();
        assert!(text.contains("41 bad line(s)"), "{text}");
        assert!(
            text.contains("line 39: the JSON object is cut short"),
            "{text}"
        );
        assert!(text.contains("and 21 more"), "{text}");
    }
}
