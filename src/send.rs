//! `courier send FILE`: a bulk sender's file of messages, checked whole, then sent
//! pipelined over one connection and resumable from a state file of acked ids.
//!
//! ```text
//! STATE (ids acked by earlier runs) ──read──> done set
//! FILE (JSON Lines) ──pass 1: validate every line (wire's widest bounds), keep only ids
//!        │             ├─ any bad line or duplicate id ──> list them, send nothing (exit 2)
//!        │             └─ counts: messages, already done (skipped), largest payload
//!        ▼
//! connect (HELLO / WELCOME) ── a message outside WELCOME's bounds? ──> revalidate, list
//!        │                                                              them (exit 2)
//!        ▼
//! pass 2: read FILE again, skip done ids, cut batches (--batch, WELCOME's bounds)
//!        ──> up to streams x in-flight batches at once, each `submit_with_retry_rounds`
//!        ──> per answered batch: accepted and duplicate ids appended to STATE, flushed
//!        ──> progress bar (answered / to send, rate); summary by status at the end
//! ```
//!
//! Invariants this module keeps:
//! - nothing is sent unless every line of the file is valid: a bad line is reported by
//!   its number and reason, never dropped;
//! - no output, error or `Debug` carries a recipient number, a payload or the token
//!   (lines are named by number, messages by client id);
//! - an id enters the state file only after the server answered it `accepted` or
//!   `duplicate`, and the file is flushed after every answered batch, so a rerun after a
//!   kill resends only what was not acknowledged;
//! - memory is bounded by the file's message count (ids only, [`MESSAGES_MAX`] at most)
//!   plus the batches in flight, never by payload bytes of the file.
//!
//! Why not one pass: refusing a file with a bad line in the middle after half of it was
//! sent would leave the sender with a partial send to sort out; validating first keeps
//! "bad file" and "sent" apart. Payload bounds are known for sure only after WELCOME, so
//! pass 1 checks the widest bounds any profile allows, and a file with a message over
//! the server's own bounds is refused, whole, right after connecting.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use courier_pipeline::wire::{self, Recipient, Status, Welcome};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::client::{Client, ClientConfig, ClientError, OutgoingMessage, Retried};

/// Most messages one file may hold (pass 1 keeps 16 bytes per message: id and line).
pub const MESSAGES_MAX: u64 = 10_000_000;
/// Longest line read; a longer one is a bad line (its bytes are skipped, not kept).
/// Room for the largest payload a profile allows, base64 or JSON-escaped text.
pub const LINE_BYTES_MAX: usize = 64 << 20;
/// Bad lines listed in an error (all are counted).
pub const BAD_LINES_SHOWN_MAX: usize = 20;
/// Messages not accepted listed in the summary (all are counted).
pub const NOT_ACCEPTED_SHOWN_MAX: usize = 20;
/// Distinct client errors listed in the summary.
pub const ERRORS_SHOWN_MAX: usize = 5;
/// Largest state file read (a decimal id and a newline per line).
pub const STATE_BYTES_MAX: u64 = MESSAGES_MAX * 21;
/// Bytes read from the input file at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;

const _: () =
    assert!(LINE_BYTES_MAX >= 4 * (BOUNDS_WIDEST_PAYLOAD_BYTES as usize).div_ceil(3) + 1024);

/// Exit statuses of `courier send`.
pub mod exit_code {
    /// Every message was accepted, or acknowledged by an earlier run.
    pub const OK: u8 = 0;
    /// Some message was not accepted: rejected, still throttled after the last round,
    /// or unanswered.
    pub const NOT_ALL_ACCEPTED: u8 = 1;
    /// Bad input (a bad line, a bad state file) or bad usage; nothing was sent.
    pub const BAD_INPUT: u8 = 2;
    /// The server could not be reached or refused the token; nothing was sent.
    pub const NO_CONNECTION: u8 = 3;
}

/// The exit statuses, for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0  every message was accepted (or acked by an earlier run, per the state file)
  1  some message was not accepted: rejected, still throttled after --attempts rounds,
     or unanswered (e.g. the connection was lost); a rerun resends all but the acked ones
  2  bad input or usage: a bad line or duplicate id (nothing was sent), a bad state file
  3  no connection: the server could not be reached or refused the token (nothing sent)";

const BOUNDS_WIDEST_PAYLOAD_BYTES: u32 = 16 << 20;
const BOUNDS_WIDEST_FRAME_BYTES: u32 = 64 << 20;

/// The size bounds a line is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Largest payload.
    pub payload_bytes_max: u32,
    /// Largest SUBMIT body: one message with its batch header must fit.
    pub frame_bytes_max: u32,
}

impl Bounds {
    /// The widest bounds any valid profile allows (`limits.payload_bytes_max` at most
    /// 16 MiB, `limits.frame_bytes_max` at most 64 MiB): a line outside them is bad for
    /// every server.
    pub const WIDEST: Bounds = Bounds {
        payload_bytes_max: BOUNDS_WIDEST_PAYLOAD_BYTES,
        frame_bytes_max: BOUNDS_WIDEST_FRAME_BYTES,
    };

    /// The bounds a server stated in WELCOME.
    pub fn of(welcome: &Welcome) -> Bounds {
        Bounds {
            payload_bytes_max: welcome.payload_bytes_max,
            frame_bytes_max: welcome.frame_bytes_max,
        }
    }
}

/// SUBMIT body bytes of `m` alone in a batch.
fn message_alone_bytes(m: &OutgoingMessage) -> usize {
    wire::BATCH_HEADER_BYTES + message_bytes(m)
}

/// Bytes `m` adds to a SUBMIT body.
fn message_bytes(m: &OutgoingMessage) -> usize {
    wire::MESSAGE_OVERHEAD_BYTES + m.recipient.as_bytes().len() + m.payload.len()
}

/// What is wrong with one line. Never carries the line's content: no number, no payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// Longer than [`LINE_BYTES_MAX`].
    #[error("the line is longer than {max} bytes")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// Not JSON (or not UTF-8, or trailing characters after the object).
    #[error("invalid JSON at column {column}")]
    InvalidJson {
        /// Where the parser stopped, 1-based.
        column: usize,
    },
    /// The JSON ends before the object does.
    #[error("the JSON object is cut short")]
    Truncated,
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A field other than `recipient`, `payload`, `payload_b64`, `id`. Its name is shown
    /// only when it looks like a field name (letters and `_`), so that a stray number or
    /// text used as a key is not echoed.
    #[error(
        "unknown field {} (allowed: recipient, payload, payload_b64, id)",
        .0.as_deref().map_or("(name not shown)".to_string(), |n| format!("`{n}`"))
    )]
    UnknownField(Option<String>),
    /// A field given twice.
    #[error("field `{0}` appears twice")]
    DuplicateField(&'static str),
    /// No `recipient`.
    #[error("no `recipient`")]
    MissingRecipient,
    /// `recipient` is not a string.
    #[error("`recipient` is not a string")]
    RecipientNotString,
    /// `recipient` is not E.164.
    #[error("`recipient` is not an E.164 number (`+` then 7 to 15 digits, the first not 0)")]
    InvalidRecipient,
    /// Neither `payload` nor `payload_b64`.
    #[error("no payload: give `payload` (UTF-8 text) or `payload_b64` (base64)")]
    NoPayload,
    /// Both `payload` and `payload_b64`.
    #[error("both `payload` and `payload_b64`: give exactly one")]
    BothPayloads,
    /// `payload` or `payload_b64` is not a string.
    #[error("`{0}` is not a string")]
    PayloadNotString(&'static str),
    /// `payload_b64` does not decode.
    #[error("`payload_b64` is not valid base64 (standard alphabet, padding optional)")]
    InvalidBase64,
    /// A payload of zero bytes (the server rejects those).
    #[error("the payload is empty")]
    EmptyPayload,
    /// A payload over the bound.
    #[error("the payload is {bytes} bytes, over the limit of {max}")]
    PayloadTooLarge {
        /// Payload bytes.
        bytes: usize,
        /// The bound.
        max: u32,
    },
    /// The message does not fit a SUBMIT frame even alone.
    #[error("the message takes {bytes} bytes in a SUBMIT, over the frame limit of {max}")]
    MessageTooLarge {
        /// SUBMIT body bytes of the message alone.
        bytes: usize,
        /// The bound.
        max: u32,
    },
    /// `id` is not an unsigned 64-bit integer.
    #[error("`id` is not an integer in 0..=18446744073709551615")]
    BadId,
    /// The same id as an earlier line (explicit, or that line's number by default).
    #[error("id {id} is already used on line {first_line}")]
    DuplicateId {
        /// The id.
        id: u64,
        /// The first line using it.
        first_line: u64,
    },
    /// The file holds more than [`MESSAGES_MAX`] messages.
    #[error("more than {max} messages in one file; split the file")]
    TooManyMessages {
        /// The bound.
        max: u64,
    },
}

const FIELDS: [&str; 4] = ["recipient", "payload", "payload_b64", "id"];

/// The fields of one line as JSON values, before their checks.
#[derive(Default)]
struct RawLine {
    values: [Option<Value>; 4],
    problem: Option<LineProblem>,
}

struct RawLineVisitor;

impl<'de> Visitor<'de> for RawLineVisitor {
    type Value = RawLine;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLine, A::Error> {
        let mut raw = RawLine::default();
        // Values are taken as `Value` (which accepts any JSON) and checked afterwards, so
        // that serde's type errors, which quote the offending value, never arise.
        while let Some(key) = map.next_key::<String>()? {
            match FIELDS.iter().position(|f| *f == key) {
                Some(i) => {
                    let v: Value = map.next_value()?;
                    if raw.values[i].is_some() {
                        raw.problem
                            .get_or_insert(LineProblem::DuplicateField(FIELDS[i]));
                    } else if !v.is_null() {
                        raw.values[i] = Some(v);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                    let shown = (key.len() <= 32
                        && !key.is_empty()
                        && key.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_'))
                    .then_some(key);
                    raw.problem.get_or_insert(LineProblem::UnknownField(shown));
                }
            }
        }
        Ok(raw)
    }
}

impl<'de> Deserialize<'de> for RawLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawLine, D::Error> {
        d.deserialize_map(RawLineVisitor)
    }
}

/// Whether a line holds only whitespace (such lines are skipped, not messages).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Parses one line (`line_no` is 1-based; it is the client id when `id` is absent).
/// `null` counts as absent. The line must not be blank (see [`is_blank`]).
pub fn parse_line(
    line: &[u8],
    line_no: u64,
    bounds: &Bounds,
) -> Result<OutgoingMessage, LineProblem> {
    let raw: RawLine = serde_json::from_slice(line).map_err(|e| {
        // serde_json's own messages may quote a value; only the category and column
        // are used.
        match e.classify() {
            serde_json::error::Category::Eof => LineProblem::Truncated,
            serde_json::error::Category::Data => LineProblem::NotAnObject,
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                LineProblem::InvalidJson { column: e.column() }
            }
        }
    })?;
    if let Some(p) = raw.problem {
        return Err(p);
    }
    let [recipient, payload, payload_b64, id] = raw.values;
    let client_id = match id {
        None => line_no,
        Some(v) => v.as_u64().ok_or(LineProblem::BadId)?,
    };
    let recipient = match recipient {
        None => return Err(LineProblem::MissingRecipient),
        Some(Value::String(s)) => {
            Recipient::parse(s.as_bytes()).ok_or(LineProblem::InvalidRecipient)?
        }
        Some(_) => return Err(LineProblem::RecipientNotString),
    };
    let payload: Vec<u8> = match (payload, payload_b64) {
        (Some(_), Some(_)) => return Err(LineProblem::BothPayloads),
        (None, None) => return Err(LineProblem::NoPayload),
        (Some(Value::String(s)), None) => s.into_bytes(),
        (Some(_), None) => return Err(LineProblem::PayloadNotString("payload")),
        (None, Some(Value::String(s))) => base64_engine()
            .decode(s.trim_end_matches('='))
            .map_err(|_| LineProblem::InvalidBase64)?,
        (None, Some(_)) => return Err(LineProblem::PayloadNotString("payload_b64")),
    };
    if payload.is_empty() {
        return Err(LineProblem::EmptyPayload);
    }
    if payload.len() > bounds.payload_bytes_max as usize {
        return Err(LineProblem::PayloadTooLarge {
            bytes: payload.len(),
            max: bounds.payload_bytes_max,
        });
    }
    let m = OutgoingMessage {
        client_id,
        recipient,
        payload: Bytes::from(payload),
    };
    let alone = message_alone_bytes(&m);
    if alone > bounds.frame_bytes_max as usize {
        return Err(LineProblem::MessageTooLarge {
            bytes: alone,
            max: bounds.frame_bytes_max,
        });
    }
    Ok(m)
}

/// Standard alphabet; padding is stripped before decoding, so it is optional.
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    )
}

/// Reads a file line by line, each at most `max` bytes kept; longer lines are consumed
/// and reported without being kept.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    buf: Vec<u8>,
    line_no: u64,
    max: usize,
}

/// One line read by [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum ReadLine<'a> {
    /// The line, without its `\n`.
    Line(&'a [u8]),
    /// Over the bound; its bytes were skipped.
    TooLong,
}

impl<R: BufRead> LineReader<R> {
    /// Lines of `reader`, each at most `max` bytes.
    pub fn new(reader: R, max: usize) -> LineReader<R> {
        LineReader {
            reader,
            buf: Vec::new(),
            line_no: 0,
            max,
        }
    }

    /// The next line and its 1-based number; `None` at the end.
    pub fn next_line(&mut self) -> std::io::Result<Option<(u64, ReadLine<'_>)>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            if !too_long {
                if self.buf.len() + chunk.len() > self.max {
                    too_long = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            let used = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(used);
            if newline.is_some() {
                break;
            }
        }
        self.line_no += 1;
        let line = if too_long {
            ReadLine::TooLong
        } else {
            ReadLine::Line(&self.buf)
        };
        Ok(Some((self.line_no, line)))
    }
}

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
struct StateWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl StateWriter {
    /// Opens (creating) the state file for appending, first cutting off a torn tail.
    fn open(path: &Path, read: &StateRead) -> std::io::Result<StateWriter> {
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

    fn record(&mut self, id: u64) -> std::io::Result<()> {
        writeln!(self.out, "{id}")
    }

    /// Hands what was recorded to the kernel: it survives a kill of this process.
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Flushes and syncs: it survives a crash of the machine.
    fn sync(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

/// What went wrong before sending could start. Never carries content or the token.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The input file has bad lines; nothing was sent.
    #[error("{}", bad_input_text(.path, .validation))]
    BadInput {
        /// The input file.
        path: PathBuf,
        /// What pass 1 found.
        validation: Validation,
    },
    /// The state file holds something other than ids.
    #[error("state file {path}, line {line}: {what}")]
    State {
        /// The state file.
        path: PathBuf,
        /// The 1-based line (0: the file as a whole).
        line: u64,
        /// What is wrong.
        what: String,
    },
    /// The options cannot work.
    #[error("{0}")]
    Usage(String),
    /// Connecting or authenticating failed; nothing was sent.
    #[error("connecting to the server failed: {0}")]
    Connect(ClientError),
}

impl SendError {
    /// The exit status for this error (see [`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            SendError::Connect(_) => exit_code::NO_CONNECTION,
            _ => exit_code::BAD_INPUT,
        }
    }
}

fn bad_input_text(path: &Path, v: &Validation) -> String {
    let mut s = format!(
        "{}: {} bad line(s); nothing was sent",
        path.display(),
        v.bad_count
    );
    for b in &v.bad {
        s.push_str(&format!("\n  line {}: {}", b.line, b.problem));
    }
    if v.bad_count > v.bad.len() as u64 {
        s.push_str(&format!(
            "\n  ... and {} more (the first {} are shown)",
            v.bad_count - v.bad.len() as u64,
            v.bad.len()
        ));
    }
    s
}

/// How to send a file.
#[derive(Clone)]
pub struct SendOptions {
    /// The input file (JSON Lines).
    pub file: PathBuf,
    /// The state file of acked ids.
    pub state: PathBuf,
    /// Where and how to connect (token, trust, streams, batches in flight per stream).
    pub client: ClientConfig,
    /// Messages per SUBMIT at most (also bounded by the server's WELCOME).
    pub batch_messages_max: usize,
    /// Rounds per batch while messages come back throttled (see
    /// [`Client::submit_with_retry_rounds`]).
    pub attempts: u32,
    /// No progress bar and no start line.
    pub quiet: bool,
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // ClientConfig's Debug redacts the token.
        f.debug_struct("SendOptions")
            .field("file", &self.file)
            .field("state", &self.state)
            .field("client", &self.client)
            .field("batch_messages_max", &self.batch_messages_max)
            .field("attempts", &self.attempts)
            .field("quiet", &self.quiet)
            .finish()
    }
}

/// The state file used when none is given: `FILE.acked`.
pub fn default_state_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".acked");
    PathBuf::from(s)
}

/// A message that was answered but not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAccepted {
    /// Its line in the file.
    pub line: u64,
    /// Its client id.
    pub id: u64,
    /// Its last status (`Rejected` or `Throttled`).
    pub status: Status,
}

/// The outcome of a send.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Valid messages in the file.
    pub messages: u64,
    /// Messages skipped because the state file already held their id.
    pub skipped: u64,
    /// Messages to send this run (`messages - skipped`).
    pub to_send: u64,
    /// Accepted (durable) this run, throttled first or not.
    pub accepted: u64,
    /// Of `accepted`, those throttled at least once first.
    pub throttled_then_accepted: u64,
    /// Answered `duplicate`: taken under their id before (by an earlier run).
    pub duplicate: u64,
    /// Rejected, by reason name.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Still throttled after the last round.
    pub still_throttled: u64,
    /// Not answered: their batch failed, or they were never sent after a fatal error.
    pub unacked: u64,
    /// The first [`NOT_ACCEPTED_SHOWN_MAX`] rejected or still throttled messages.
    pub not_accepted: Vec<NotAccepted>,
    /// The first [`ERRORS_SHOWN_MAX`] distinct errors that left messages unanswered.
    pub errors: Vec<String>,
    /// Why sending stopped before the end of the file, if it did.
    pub stopped: Option<String>,
    /// The state file written.
    pub state: PathBuf,
    /// Time from the first SUBMIT to the last answer.
    pub elapsed: Duration,
}

impl Summary {
    /// Messages rejected, all reasons together.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Whether every message of the file is now acked (accepted or duplicate, this run
    /// or an earlier one).
    pub fn all_done(&self) -> bool {
        self.stopped.is_none() && self.skipped + self.accepted + self.duplicate == self.messages
    }

    /// The exit status (see [`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        if self.all_done() {
            exit_code::OK
        } else {
            exit_code::NOT_ALL_ACCEPTED
        }
    }

    /// Prints the summary: one `name value` line per count, then what was not accepted
    /// (by line and id), errors, and a verdict.
    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let row = |out: &mut dyn Write, name: &str, v: u64| writeln!(out, "{name:<32}{v:>12}");
        row(out, "messages", self.messages)?;
        row(out, "skipped", self.skipped)?;
        row(out, "to_send", self.to_send)?;
        row(out, "accepted", self.accepted)?;
        row(out, "throttled_then_accepted", self.throttled_then_accepted)?;
        row(out, "duplicate", self.duplicate)?;
        row(out, "rejected", self.rejected_total())?;
        for (reason, n) in &self.rejected {
            row(out, &format!("rejected.{reason}"), *n)?;
        }
        row(out, "still_throttled", self.still_throttled)?;
        row(out, "unacked", self.unacked)?;
        let secs = self.elapsed.as_secs_f64();
        let answered =
            self.accepted + self.duplicate + self.rejected_total() + self.still_throttled;
        writeln!(
            out,
            "{:<32}{:>12.3} s ({:.0} msgs/s)",
            "elapsed",
            secs,
            if secs > 0.0 {
                answered as f64 / secs
            } else {
                0.0
            }
        )?;
        for n in &self.not_accepted {
            let what = match n.status {
                Status::Rejected(r) => format!("rejected ({})", r.name()),
                Status::Throttled { .. } => "still throttled".to_string(),
                Status::Accepted(_) | Status::Duplicate(_) => "accepted".to_string(),
            };
            writeln!(out, "not accepted: line {} id {}: {what}", n.line, n.id)?;
        }
        let not_accepted = self.rejected_total() + self.still_throttled;
        if not_accepted > self.not_accepted.len() as u64 {
            writeln!(
                out,
                "not accepted: ... and {} more",
                not_accepted - self.not_accepted.len() as u64
            )?;
        }
        for e in &self.errors {
            writeln!(out, "error: {e}")?;
        }
        if let Some(why) = &self.stopped {
            writeln!(out, "stopped early: {why}")?;
        }
        if self.all_done() {
            writeln!(
                out,
                "result: all {} message(s) acked ({} skipped as acked before); state in {}",
                self.messages,
                self.skipped,
                self.state.display()
            )
        } else {
            writeln!(
                out,
                "result: {} of {} message(s) not acked; acked ids are in {}, so a rerun \
                 resends only the others (rejected ones too)",
                self.messages
                    .saturating_sub(self.skipped + self.accepted + self.duplicate),
                self.messages,
                self.state.display()
            )
        }
    }

    fn not_accepted(&mut self, line: u64, id: u64, status: Status) {
        if self.not_accepted.len() < NOT_ACCEPTED_SHOWN_MAX {
            self.not_accepted.push(NotAccepted { line, id, status });
        }
    }

    fn error(&mut self, e: &ClientError) {
        let text = e.to_string();
        if self.errors.len() < ERRORS_SHOWN_MAX && !self.errors.contains(&text) {
            self.errors.push(text);
        }
    }
}

/// Pass 1 without a server (`courier send --check`): validates `file` against the
/// widest bounds and counts the ids already in `state`.
pub fn check(file: &Path, state: &Path) -> Result<Validation, SendError> {
    let read = read_state(state)?;
    let v = validate(file, &Bounds::WIDEST, &read.done)?;
    if v.is_clean() {
        Ok(v)
    } else {
        Err(SendError::BadInput {
            path: file.to_path_buf(),
            validation: v,
        })
    }
}

/// One batch in flight: the lines and ids of its messages, in order.
type Meta = Vec<(u64, u64)>;
type BatchResult = (Meta, Result<Vec<Retried>, ClientError>);

/// Validates, connects and sends `opts.file`; see the module docs.
pub async fn send(opts: &SendOptions) -> Result<Summary, SendError> {
    if opts.batch_messages_max == 0 {
        return Err(SendError::Usage("--batch must be at least 1".into()));
    }
    if same_file(&opts.file, &opts.state) {
        return Err(SendError::Usage(format!(
            "the state file {} is the input file; give another --state",
            opts.state.display()
        )));
    }
    let state_read = read_state(&opts.state)?;
    let v = validate(&opts.file, &Bounds::WIDEST, &state_read.done)?;
    if !v.is_clean() {
        return Err(SendError::BadInput {
            path: opts.file.clone(),
            validation: v,
        });
    }
    let mut summary = Summary {
        messages: v.messages,
        skipped: v.skipped,
        to_send: v.messages - v.skipped,
        state: opts.state.clone(),
        ..Summary::default()
    };
    if summary.to_send == 0 {
        // Everything was acked before: no need for a server.
        return Ok(summary);
    }
    let client = Client::connect(&opts.client)
        .await
        .map_err(SendError::Connect)?;
    let welcome = client.welcome();
    let bounds = Bounds::of(&welcome);
    if v.exceeds(&bounds) {
        let tight = validate(&opts.file, &bounds, &state_read.done)?;
        if !tight.is_clean() {
            client.close().await;
            return Err(SendError::BadInput {
                path: opts.file.clone(),
                validation: tight,
            });
        }
        // Clean now: the file changed since pass 1; pass 2 checks every line again.
    }
    let mut state =
        StateWriter::open(&opts.state, &state_read).map_err(|source| SendError::Io {
            path: opts.state.clone(),
            source,
        })?;
    if !opts.quiet {
        eprintln!(
            "courier send: {} message(s) in {}, {} already acked per {} (skipped); sending {} to {}",
            v.messages,
            opts.file.display(),
            v.skipped,
            opts.state.display(),
            summary.to_send,
            opts.client.server
        );
    }
    let bar = progress_bar(opts.quiet, summary.to_send);
    let client = Arc::new(client);
    let t0 = Instant::now();
    run_batches(
        opts,
        &client,
        &welcome,
        &bounds,
        &state_read.done,
        &mut state,
        &mut summary,
        &bar,
    )
    .await;
    summary.elapsed = t0.elapsed();
    bar.finish_and_clear();
    if let Err(e) = state.sync() {
        let why = format!("syncing the state file {}: {e}", state.path.display());
        summary.stopped.get_or_insert(why);
    }
    client.close().await;
    Ok(summary)
}

/// Pass 2: reads the file again and keeps up to streams x in-flight batches submitted,
/// recording answers as they come. Stops early on a fatal client error, a state file
/// write error or a file that changed since pass 1 (`summary.stopped` says which).
#[allow(clippy::too_many_arguments)]
async fn run_batches(
    opts: &SendOptions,
    client: &Arc<Client>,
    welcome: &Welcome,
    bounds: &Bounds,
    done: &HashSet<u64>,
    state: &mut StateWriter,
    summary: &mut Summary,
    bar: &ProgressBar,
) {
    let window = client.streams() * opts.client.batches_in_flight_per_stream;
    let batch_max = opts
        .batch_messages_max
        .min(welcome.batch_messages_max as usize);
    let frame_max = welcome.frame_bytes_max as usize;
    let mut in_flight: JoinSet<BatchResult> = JoinSet::new();
    let mut submitted: u64 = 0;
    let mut answered: u64 = 0;

    let file = match File::open(&opts.file) {
        Ok(f) => f,
        Err(e) => {
            summary.stopped = Some(format!("reopening {}: {e}", opts.file.display()));
            summary.unacked = summary.to_send;
            return;
        }
    };
    let mut lines = LineReader::new(
        BufReader::with_capacity(READ_BUFFER_BYTES, file),
        LINE_BYTES_MAX,
    );
    let mut batch: Vec<OutgoingMessage> = Vec::new();
    let mut meta: Meta = Vec::new();
    let mut batch_bytes = wire::BATCH_HEADER_BYTES;
    let mut reading = true;
    while reading || !batch.is_empty() {
        // Cut the next batch. The file is read synchronously on this task, between
        // awaits: local reads are short next to a round trip, and the client's lanes run
        // on the runtime's other worker meanwhile.
        while reading {
            let next = match lines.next_line() {
                Ok(n) => n,
                Err(e) => {
                    summary.stopped = Some(format!("reading {}: {e}", opts.file.display()));
                    reading = false;
                    break;
                }
            };
            let Some((line_no, line)) = next else {
                reading = false;
                break;
            };
            let m = match line {
                ReadLine::Line(text) if is_blank(text) => continue,
                ReadLine::Line(text) => parse_line(text, line_no, bounds),
                ReadLine::TooLong => Err(LineProblem::TooLong {
                    max: LINE_BYTES_MAX,
                }),
            };
            let m = match m {
                Ok(m) => m,
                Err(p) => {
                    summary.stopped = Some(format!(
                        "{} changed while sending: line {line_no}: {p}",
                        opts.file.display()
                    ));
                    reading = false;
                    break;
                }
            };
            if done.contains(&m.client_id) {
                continue;
            }
            let bytes = message_bytes(&m);
            if !batch.is_empty() && batch_bytes + bytes > frame_max {
                // Full by bytes: this message opens the next batch.
                let full = std::mem::take(&mut batch);
                let full_meta = std::mem::take(&mut meta);
                batch_bytes = wire::BATCH_HEADER_BYTES + bytes;
                meta.push((line_no, m.client_id));
                batch.push(m);
                submitted += full.len() as u64;
                launch(&mut in_flight, client, full, full_meta, opts.attempts);
                break;
            }
            batch_bytes += bytes;
            meta.push((line_no, m.client_id));
            batch.push(m);
            if batch.len() == batch_max {
                break;
            }
        }
        if summary.stopped.is_some() {
            break;
        }
        // The final, partial batch, or a batch full by count.
        if batch.len() == batch_max || (!reading && !batch.is_empty()) {
            let full = std::mem::take(&mut batch);
            let full_meta = std::mem::take(&mut meta);
            batch_bytes = wire::BATCH_HEADER_BYTES;
            submitted += full.len() as u64;
            launch(&mut in_flight, client, full, full_meta, opts.attempts);
        }
        while in_flight.len() >= window {
            match in_flight.join_next().await {
                Some(r) => answered += record(r, state, summary, bar),
                None => break,
            }
        }
        if summary.stopped.is_some() {
            break;
        }
    }
    while let Some(r) = in_flight.join_next().await {
        answered += record(r, state, summary, bar);
    }
    if let Err(e) = state.flush() {
        summary.stopped.get_or_insert(format!(
            "writing the state file {}: {e}",
            state.path.display()
        ));
    }
    // Messages never submitted (stopped early) are unacked too.
    summary.unacked += summary.to_send.saturating_sub(submitted);
    debug_assert!(answered <= submitted);
}

fn launch(
    in_flight: &mut JoinSet<BatchResult>,
    client: &Arc<Client>,
    batch: Vec<OutgoingMessage>,
    meta: Meta,
    attempts: u32,
) {
    let client = client.clone();
    in_flight.spawn(async move {
        let r = client.submit_with_retry_rounds(batch, attempts).await;
        (meta, r)
    });
}

/// Records one answered batch; returns how many of its messages it answered. A fatal
/// client error or a failed state write sets `summary.stopped`.
fn record(
    joined: Result<BatchResult, tokio::task::JoinError>,
    state: &mut StateWriter,
    summary: &mut Summary,
    bar: &ProgressBar,
) -> u64 {
    let (meta, result) = match joined {
        Ok(r) => r,
        // The submit tasks neither panic nor get cancelled while joined.
        Err(e) => panic!("a submit task failed: {e}"),
    };
    let n = meta.len() as u64;
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            summary.unacked += n;
            summary.error(&e);
            if e.is_fatal() {
                summary.stopped.get_or_insert(e.to_string());
            }
            return 0;
        }
    };
    let mut write = Ok(());
    for (&(line, id), o) in meta.iter().zip(&outcomes) {
        match o.status {
            Status::Accepted(_) => {
                summary.accepted += 1;
                if o.rounds > 1 {
                    summary.throttled_then_accepted += 1;
                }
                write = write.and_then(|()| state.record(id));
            }
            Status::Duplicate(_) => {
                summary.duplicate += 1;
                write = write.and_then(|()| state.record(id));
            }
            Status::Throttled { .. } => {
                summary.still_throttled += 1;
                summary.not_accepted(line, id, o.status);
            }
            Status::Rejected(reason) => {
                *summary.rejected.entry(reason.name()).or_insert(0) += 1;
                summary.not_accepted(line, id, o.status);
            }
        }
    }
    if let Err(e) = write.and_then(|()| state.flush()) {
        summary.stopped.get_or_insert(format!(
            "writing the state file {}: {e}",
            state.path.display()
        ));
    }
    bar.inc(n);
    bar.set_message(format!(
        "accepted {}, not accepted {}",
        summary.accepted + summary.duplicate,
        summary.rejected_total() + summary.still_throttled
    ));
    n
}

fn progress_bar(quiet: bool, total: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} answered, {per_sec}, eta {eta} ({msg})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Whether two paths name the same existing file (a state file that does not exist yet
/// cannot be the input).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NUMBER: &str = "+4915112345678";
    const SECRET: &str = "secret words for the door";

    fn parse(s: &str) -> Result<OutgoingMessage, LineProblem> {
        parse_line(s.as_bytes(), 7, &Bounds::WIDEST)
    }

    #[test]
    fn a_line_gives_a_message_with_its_id_or_its_line_number() {
        let m = parse(&format!(
            r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, 7, "the line number by default");
        assert_eq!(m.recipient.as_str(), NUMBER);
        assert_eq!(&m.payload[..], SECRET.as_bytes());
        let m = parse(&format!(
            r#"{{"id": 42, "recipient":"{NUMBER}","payload_b64":"AAEC/w=="}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, 42);
        assert_eq!(&m.payload[..], &[0, 1, 2, 255]);
        // Padding is optional; null counts as absent.
        let m = parse(&format!(
            r#"{{"id":null,"recipient":"{NUMBER}","payload":null,"payload_b64":"AAEC/w"}}"#
        ))
        .unwrap();
        assert_eq!((m.client_id, &m.payload[..]), (7, &[0u8, 1, 2, 255][..]));
        let m = parse(&format!(
            r#"{{"id":18446744073709551615,"recipient":"{NUMBER}","payload":"é"}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, u64::MAX);
        assert_eq!(&m.payload[..], "é".as_bytes());
    }

    #[test]
    fn each_bad_line_gets_its_reason() {
        let r = NUMBER;
        let cases: Vec<(String, LineProblem)> = vec![
            ("{".into(), LineProblem::Truncated),
            (
                "{\"recipient\" 1}".into(),
                LineProblem::InvalidJson { column: 14 },
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x"}} x"#),
                LineProblem::InvalidJson { column: 46 },
            ),
            (format!(r#"["{r}"]"#), LineProblem::NotAnObject),
            (format!(r#""{SECRET}""#), LineProblem::NotAnObject),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","to":1}}"#),
                LineProblem::UnknownField(Some("to".into())),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","{r}":1}}"#),
                LineProblem::UnknownField(None),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","payload":"y"}}"#),
                LineProblem::DuplicateField("payload"),
            ),
            (r#"{"payload":"x"}"#.into(), LineProblem::MissingRecipient),
            (
                r#"{"recipient":4915112345678,"payload":"x"}"#.into(),
                LineProblem::RecipientNotString,
            ),
            (
                r#"{"recipient":"4915112345678","payload":"x"}"#.into(),
                LineProblem::InvalidRecipient,
            ),
            (
                r#"{"recipient":"+0915112345678","payload":"x"}"#.into(),
                LineProblem::InvalidRecipient,
            ),
            (format!(r#"{{"recipient":"{r}"}}"#), LineProblem::NoPayload),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","payload_b64":"eA=="}}"#),
                LineProblem::BothPayloads,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":5}}"#),
                LineProblem::PayloadNotString("payload"),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload_b64":"not base64!"}}"#),
                LineProblem::InvalidBase64,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":""}}"#),
                LineProblem::EmptyPayload,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":-1}}"#),
                LineProblem::BadId,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":"{r}"}}"#),
                LineProblem::BadId,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":1.5}}"#),
                LineProblem::BadId,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(&line).unwrap_err(), want, "{line}");
        }
    }

    #[test]
    fn payloads_and_messages_over_the_bounds_are_bad() {
        let b = Bounds {
            payload_bytes_max: 10,
            frame_bytes_max: 40,
        };
        let line = |p: &str| format!(r#"{{"recipient":"{NUMBER}","payload":"{p}"}}"#);
        assert!(parse_line(line("0123456789").as_bytes(), 1, &b).is_err());
        assert_eq!(
            parse_line(line("01234567890").as_bytes(), 1, &b).unwrap_err(),
            LineProblem::PayloadTooLarge { bytes: 11, max: 10 }
        );
        // 12 + 13 + 14 + 10 = 49 bytes in a SUBMIT.
        assert_eq!(
            parse_line(line("0123456789").as_bytes(), 1, &b).unwrap_err(),
            LineProblem::MessageTooLarge { bytes: 49, max: 40 }
        );
        let wide = Bounds {
            payload_bytes_max: 10,
            frame_bytes_max: 49,
        };
        assert!(parse_line(line("0123456789").as_bytes(), 1, &wide).is_ok());
    }

    #[test]
    fn problems_never_show_the_number_or_the_payload() {
        let lines = [
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}","{NUMBER}":"{SECRET}"}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}","id":"{NUMBER}"}}"#),
            format!(r#"{{"recipient":{},"payload":"{SECRET}"}}"#, &NUMBER[1..]),
            format!(r#"{{"recipient":"{NUMBER}","payload":["{SECRET}"]}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload_b64":"{SECRET}"}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"}} {SECRET}"#),
            format!(r#"{{"recipient":"{NUMBER}x","payload":"{SECRET}"}}"#),
            format!(r#"["{NUMBER}","{SECRET}"]"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"#),
        ];
        for line in &lines {
            let p = parse(line).unwrap_err();
            let shown = format!("{p} {p:?}");
            assert!(!shown.contains(&NUMBER[1..]), "{shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn the_line_reader_bounds_lines_and_numbers_them() {
        let text = b"short\r\n0123456789abcdef\n\nlast";
        let mut r = LineReader::new(BufReader::with_capacity(4, &text[..]), 8);
        let mut got = Vec::new();
        while let Some((n, line)) = r.next_line().unwrap() {
            got.push((
                n,
                match line {
                    ReadLine::Line(l) => Some(l.to_vec()),
                    ReadLine::TooLong => None,
                },
            ));
        }
        assert_eq!(
            got,
            vec![
                (1, Some(b"short\r".to_vec())),
                (2, None),
                (3, Some(Vec::new())),
                (4, Some(b"last".to_vec())),
            ]
        );
    }

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

    #[test]
    fn summary_exit_codes() {
        let mut s = Summary {
            messages: 5,
            skipped: 2,
            to_send: 3,
            accepted: 2,
            duplicate: 1,
            ..Summary::default()
        };
        assert_eq!(s.exit_code(), exit_code::OK);
        s.duplicate = 0;
        s.rejected.insert("sender_paused", 1);
        assert_eq!(s.exit_code(), exit_code::NOT_ALL_ACCEPTED);
        let mut out = Vec::new();
        s.print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("rejected.sender_paused"), "{text}");
        assert!(text.contains("1 of 5 message(s) not acked"), "{text}");
    }
}
