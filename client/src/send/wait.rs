//! `courier send --wait delivered`: listening to the business's statuses while sending,
//! then waiting until every acked message of the file has a final status; resumable
//! like the acks are.
//!
//! ```text
//! FILE.statuses (earlier runs) ──read──> finals by client id
//! connect with EVENTS ── EventReceiver ──> listener task:
//!     STATUS delivered | read | failed(reason) | expired ──> appended to FILE.statuses,
//!     flushed, then acknowledged (EVENT_ACK)      sent ──> acknowledged only
//!     a user's reply ──> appended to FILE.replies (JSON Lines), flushed, acknowledged
//! sending as before; each id acked joins `awaiting`
//! after the last ACK: wait until every awaited id has a final status, at most --wait-timeout
//! ```
//!
//! Invariants:
//! - an event is acknowledged only after what it says is in a file and flushed, so a kill
//!   loses nothing: the relay pushes unacknowledged events again on the next connection;
//! - every event heard is acknowledged (statuses of messages of other files included),
//!   or the relay, which pushes a business's events in order, would stall on it;
//! - the statuses file holds ids, status names and reasons only; replies go to their own
//!   file, which the sender asked for (they are its users' words and numbers), and never
//!   to the terminal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use courier_pipeline::wire::delivery::{BusinessEvent, InboundEvent, StatusEvent, StatusKind};
use tokio::sync::Notify;

use super::{SendError, STATE_BYTES_MAX};
use crate::{Client, EventReceiver};

/// Events acknowledged per EVENT_ACK batch at most.
const ACK_BATCH_MAX: usize = 1024;
/// Largest statuses file read (an id, a name and a reason per line).
pub const STATUSES_BYTES_MAX: u64 = STATE_BYTES_MAX * 3;

/// How `courier send` waits for delivery.
#[derive(Debug, Clone)]
pub struct DeliveryWait {
    /// The statuses file: one `ID STATUS` line per final status (and `read`) heard.
    pub statuses: PathBuf,
    /// Where users' replies heard while waiting are appended, as JSON Lines.
    pub replies: PathBuf,
    /// Longest wait after the last ACK for the last final statuses.
    pub timeout: Duration,
}

/// The final status of one message: `delivered`, `failed.REASON` or `expired`.
pub type Final = String;

/// What the statuses file and the events say about the file's messages.
#[derive(Debug, Clone, Default)]
pub struct StatusBook {
    /// The final status of each client id heard.
    pub finals: HashMap<u64, Final>,
    /// Client ids reported `read`.
    pub read: HashSet<u64>,
}

impl StatusBook {
    fn note(&mut self, id: u64, name: &str) {
        if name == "read" {
            self.read.insert(id);
        } else {
            // The first final status counts; a copy says the same.
            self.finals.entry(id).or_insert_with(|| name.to_string());
        }
    }
}

/// The delivery part of the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliverySummary {
    /// Acked messages of the file (this run and earlier ones) delivered.
    pub delivered: u64,
    /// Of those, read.
    pub read: u64,
    /// Failed, by reason name.
    pub failed: BTreeMap<String, u64>,
    /// Expired.
    pub expired: u64,
    /// Acked and without a final status when the wait ended.
    pub no_final_status: u64,
    /// Users' replies written to the replies file this run.
    pub replies: u64,
    /// Why listening stopped early, if it did.
    pub stopped: Option<String>,
    /// Time waited after the last ACK.
    pub waited: Duration,
}

impl DeliverySummary {
    /// Failed messages, all reasons together.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Whether every acked message was delivered.
    pub fn all_delivered(&self) -> bool {
        self.failed_total() + self.expired + self.no_final_status == 0 && self.stopped.is_none()
    }

    /// Counts the finals of `ids` in `book`.
    pub fn of(ids: &HashSet<u64>, book: &StatusBook) -> DeliverySummary {
        let mut s = DeliverySummary::default();
        for id in ids {
            match book.finals.get(id).map(String::as_str) {
                Some("delivered") => {
                    s.delivered += 1;
                    s.read += u64::from(book.read.contains(id));
                }
                Some("expired") => s.expired += 1,
                Some(f) => {
                    let reason = f.strip_prefix("failed.").unwrap_or(f);
                    *s.failed.entry(reason.to_string()).or_default() += 1;
                }
                None => s.no_final_status += 1,
            }
        }
        s
    }
}

/// The name a status is recorded under; `None` for `sent` (nothing to resume).
fn status_name(s: &StatusEvent) -> Option<String> {
    match (s.kind, s.reason) {
        (StatusKind::Sent, _) => None,
        (StatusKind::Failed, Some(r)) => Some(format!("failed.{}", r.name())),
        (k, _) => Some(k.name().to_string()),
    }
}

/// Reads a statuses file: `ID STATUS` per line. A missing file is empty; a last line
/// without its newline (a write cut short) is ignored; anything else is an error.
pub fn read_statuses(path: &Path) -> Result<StatusBook, SendError> {
    let io_err = |source| SendError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut book = StatusBook::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(book),
        Err(e) => return Err(io_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(STATUSES_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > STATUSES_BYTES_MAX {
        return Err(SendError::State {
            path: path.to_path_buf(),
            line: 0,
            what: format!("larger than {STATUSES_BYTES_MAX} bytes; is it a statuses file?"),
        });
    }
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = || SendError::State {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            what: "not `ID STATUS` (a client id and a status name)".into(),
        };
        let text = std::str::from_utf8(line).map_err(|_| bad())?;
        let (id, name) = text.split_once(' ').ok_or_else(bad)?;
        let id: u64 = id.parse().map_err(|_| bad())?;
        let known = ["delivered", "read", "expired"].contains(&name)
            || name.strip_prefix("failed.").is_some_and(|r| !r.is_empty());
        if !known {
            return Err(bad());
        }
        book.note(id, name);
    }
    Ok(book)
}

/// What the listener shares with the sender.
#[derive(Debug, Default)]
struct Heard {
    book: StatusBook,
    replies: u64,
    stopped: Option<String>,
}

/// The listener task of one send: records and acknowledges events as they come.
#[derive(Debug)]
pub(crate) struct Listener {
    heard: Arc<Mutex<Heard>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// Opens a file for appending, first cutting off a last line without its newline (a
/// write cut short by a kill), found by reading the file backwards in chunks.
fn append(path: &Path) -> std::io::Result<BufWriter<File>> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 << 10];
    // Bounded: each pass moves `end` back by a chunk, or stops.
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
    }
    Ok(BufWriter::new(file))
}

/// One reply as a JSON line.
fn reply_line(r: &InboundEvent) -> String {
    serde_json::json!({
        "event": r.event.0,
        "at_ms": r.at_ms,
        "sender": r.sender.as_str(),
        "payload_b64": base64::engine::general_purpose::STANDARD.encode(&r.payload),
    })
    .to_string()
}

impl Listener {
    /// Starts listening: statuses go to `wait.statuses`, replies to `wait.replies`.
    pub(crate) fn start(
        client: Arc<Client>,
        events: EventReceiver,
        wait: &DeliveryWait,
        book: StatusBook,
    ) -> Result<Listener, SendError> {
        let open = |p: &Path| {
            append(p).map_err(|source| SendError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let statuses = open(&wait.statuses)?;
        let replies = open(&wait.replies)?;
        let heard = Arc::new(Mutex::new(Heard {
            book,
            ..Heard::default()
        }));
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn(listen(
            client,
            events,
            statuses,
            replies,
            heard.clone(),
            changed.clone(),
        ));
        Ok(Listener {
            heard,
            changed,
            task,
        })
    }

    /// Waits until every id of `awaiting` has a final status, the listener stopped, or
    /// `timeout` passed; returns what the book says of `ids` (the file's acked ids).
    pub(crate) async fn wait(&self, ids: &HashSet<u64>, timeout: Duration) -> DeliverySummary {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        loop {
            // Registered before checking, so a change in between is not missed.
            let changed = self.changed.notified();
            {
                let h = self.heard.lock().expect("listener lock");
                let done = ids.iter().all(|id| h.book.finals.contains_key(id));
                if done || h.stopped.is_some() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let h = self.heard.lock().expect("listener lock");
        let mut s = DeliverySummary::of(ids, &h.book);
        s.replies = h.replies;
        s.stopped = h.stopped.clone();
        s.waited = start.elapsed();
        s
    }

    /// Stops listening.
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

/// Records every event (then flushes) and acknowledges it, batch by batch.
async fn listen(
    client: Arc<Client>,
    mut events: EventReceiver,
    mut statuses: BufWriter<File>,
    mut replies: BufWriter<File>,
    heard: Arc<Mutex<Heard>>,
    changed: Arc<Notify>,
) {
    let stop = |why: String| {
        heard.lock().expect("listener lock").stopped = Some(why);
        changed.notify_one();
    };
    loop {
        let first = match events.recv().await {
            Ok(e) => e,
            Err(e) => return stop(e.to_string()),
        };
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH_MAX {
            match events.try_recv() {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let mut noted = Vec::new();
        let mut written = Ok(());
        let mut n_replies = 0;
        for e in &batch {
            match e {
                BusinessEvent::Status(s) => {
                    if let Some(name) = status_name(s) {
                        written =
                            written.and_then(|()| writeln!(statuses, "{} {name}", s.client_id));
                        noted.push((s.client_id, name));
                    }
                }
                BusinessEvent::Inbound(r) => {
                    written = written.and_then(|()| writeln!(replies, "{}", reply_line(r)));
                    n_replies += 1;
                }
            }
        }
        if let Err(e) = written
            .and_then(|()| statuses.flush())
            .and_then(|()| replies.flush())
        {
            // Not recorded, so not acknowledged: the relay keeps them.
            return stop(format!("writing the statuses or replies file: {e}"));
        }
        {
            let mut h = heard.lock().expect("listener lock");
            for (id, name) in &noted {
                h.book.note(*id, name);
            }
            h.replies += n_replies;
        }
        changed.notify_one();
        let ids: Vec<_> = batch.iter().map(BusinessEvent::event).collect();
        if let Err(e) = client.ack_events(&ids).await {
            return stop(e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statuses_file_is_ids_and_names_a_torn_tail_is_ignored_and_junk_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_statuses(&dir.path().join("none"))
            .unwrap()
            .finals
            .is_empty());
        let p = dir.path().join("s");
        std::fs::write(
            &p,
            "1 delivered\n1 read\n2 failed.not_on_platform\n3 expired\n3 expired\n4 deliv",
        )
        .unwrap();
        let b = read_statuses(&p).unwrap();
        assert_eq!(b.finals.len(), 3, "the torn line is not read");
        assert!(b.read.contains(&1));
        let ids: HashSet<u64> = [1, 2, 3, 4].into();
        let s = DeliverySummary::of(&ids, &b);
        assert_eq!(
            (s.delivered, s.read, s.expired, s.no_final_status),
            (1, 1, 1, 1)
        );
        assert_eq!(s.failed["not_on_platform"], 1);
        assert!(!s.all_delivered());
        // Appending cuts the torn tail first.
        let mut w = append(&p).unwrap();
        writeln!(w, "4 delivered").unwrap();
        w.flush().unwrap();
        assert_eq!(read_statuses(&p).unwrap().finals[&4], "delivered");
        for junk in ["x delivered\n", "5 sent\n", "5\n", "5 failed.\n"] {
            std::fs::write(&p, junk).unwrap();
            let e = read_statuses(&p).unwrap_err();
            assert!(matches!(e, SendError::State { line: 1, .. }), "{junk}: {e}");
        }
    }
}
