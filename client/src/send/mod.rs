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
//!        ──> progress line (answered / to send, rate); summary by status at the end
//! ```
//!
//! With `--wait delivered` ([`SendOptions::delivery`]) the connection also asks for the
//! business's events (HELLO version 2): a listener records every final status in
//! `FILE.statuses` and every user's reply in `FILE.replies` before acknowledging it, and
//! after the last ACK the send waits until each acked id of the file (this run's and
//! earlier runs') has a final status; a rerun waits only for the ids the statuses file
//! does not settle.
//!
//! Modules, by concern: [`lines`] (one line: parse, bound), [`validate`] (pass 1),
//! [`state`] (the resume file), [`engine`] (pass 2: connect and send), [`wait`]
//! (statuses and replies while sending, then the wait), [`summary`] (counts, verdict,
//! exit status).
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

pub mod engine;
pub mod lines;
pub mod state;
pub mod summary;
pub mod validate;
pub mod wait;

use std::path::{Path, PathBuf};

pub use engine::send;
pub use lines::{is_blank, parse_line, Bounds, LineProblem, LineReader, ReadLine};
pub use state::{read_state, StateRead};
pub use summary::{NotAccepted, Summary};
pub use validate::{validate, BadLine, Validation};
pub use wait::{read_statuses, DeliverySummary, DeliveryWait, StatusBook};

use courier_pipeline::wire::PAYLOAD_BYTES_LIMIT;

use crate::{ClientConfig, ClientError};

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

// A line holds the largest payload any profile allows, base64 (4 bytes per 3) with room
// for the rest of the line.
const _: () = assert!(LINE_BYTES_MAX >= 4 * (PAYLOAD_BYTES_LIMIT as usize).div_ceil(3) + 1024);

/// Exit statuses of `courier send`.
pub mod exit_code {
    /// Every message was accepted, or acknowledged by an earlier run (and with
    /// `--wait delivered`, delivered).
    pub const OK: u8 = 0;
    /// Some message was not accepted: rejected, still throttled after the last round,
    /// or unanswered; or, waiting for delivery, failed, expired or without a final
    /// status in time.
    pub const NOT_ALL_ACCEPTED: u8 = 1;
    /// Bad input (a bad line, a bad state file) or bad usage; nothing was sent.
    pub const BAD_INPUT: u8 = 2;
    /// The server could not be reached or refused the token; nothing was sent.
    pub const NO_CONNECTION: u8 = 3;
}

/// The exit statuses, for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0  every message was accepted (or acked by an earlier run, per the state file), and
     with --wait delivered every one was delivered
  1  some message was not accepted: rejected, still throttled after --attempts rounds,
     or unanswered (e.g. the connection was lost); a rerun resends all but the acked ones;
     with --wait delivered also: some message failed, expired or had no final status
     within --wait-timeout (a rerun waits for those again)
  2  bad input or usage: a bad line or duplicate id (nothing was sent), a bad state file
  3  no connection: the server could not be reached or refused the token (nothing sent)";

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
    /// `--wait delivered`: listen to the business's statuses and wait for every acked
    /// message's final status (`None`: stop at the acks, as before).
    pub delivery: Option<DeliveryWait>,
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
            .field("delivery", &self.delivery)
            .finish()
    }
}

/// The state file used when none is given: `FILE.acked`.
pub fn default_state_path(file: &Path) -> PathBuf {
    with_suffix(file, ".acked")
}

/// The statuses file of `--wait delivered` when none is given: `FILE.statuses`.
pub fn default_statuses_path(file: &Path) -> PathBuf {
    with_suffix(file, ".statuses")
}

/// The replies file of `--wait delivered` when none is given: `FILE.replies`.
pub fn default_replies_path(file: &Path) -> PathBuf {
    with_suffix(file, ".replies")
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
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
