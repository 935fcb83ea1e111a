//! Pass 2 of `courier send`: connect, read the file again, cut batches and keep up to
//! streams × in-flight of them submitted, recording each answer in the summary and the
//! state file.
//!
//! ```text
//! validate (pass 1) ──> Client::connect ──> WELCOME bounds tighter? ──> validate again
//! FILE ──LineReader──> skip done ids ──> batch (≤ --batch, ≤ WELCOME's bounds)
//!      ──> JoinSet of submit_with_retry_rounds (≤ window) ──> record: summary, state, progress
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use courier_pipeline::wire::{self, Status, Welcome};
use tokio::task::JoinSet;

use super::lines::{
    is_blank, message_bytes, parse_line, Bounds, LineProblem, LineReader, ReadLine,
};
use super::state::{read_state, StateWriter};
use super::summary::Summary;
use super::validate::validate;
use super::wait::{read_statuses, DeliverySummary, Listener};
use super::{SendError, SendOptions, LINE_BYTES_MAX, READ_BUFFER_BYTES};
use crate::progress::ProgressLine;
use crate::{Client, ClientError, OutgoingMessage, Retried};

/// Pushes of statuses and replies the listener buffers before QUIC holds the relay back.
const EVENT_FRAMES_BUFFERED: usize = 64;

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
    let book = match &opts.delivery {
        Some(w) => Some(read_statuses(&w.statuses)?),
        None => None,
    };
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
    let awaiting_before = book.as_ref().map_or(0, |b| {
        state_read
            .done
            .iter()
            .filter(|id| !b.finals.contains_key(id))
            .count()
    });
    if summary.to_send == 0 && awaiting_before == 0 {
        // Everything was acked (and has its final status) before: no need for a server.
        summary.delivery = book.map(|b| DeliverySummary::of(&state_read.done, &b));
        return Ok(summary);
    }
    let (client, events) = match &opts.delivery {
        Some(_) => {
            let (c, e) = Client::connect_with_events(&opts.client, EVENT_FRAMES_BUFFERED)
                .await
                .map_err(SendError::Connect)?;
            (c, Some(e))
        }
        None => (
            Client::connect(&opts.client)
                .await
                .map_err(SendError::Connect)?,
            None,
        ),
    };
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
    let client = Arc::new(client);
    let listener = match (&opts.delivery, events, book) {
        (Some(w), Some(events), Some(book)) => {
            match Listener::start(client.clone(), events, w, book) {
                Ok(l) => Some(l),
                Err(e) => {
                    client.close().await;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let mut state =
        StateWriter::open(&opts.state, &state_read).map_err(|source| SendError::Io {
            path: opts.state.clone(),
            source,
        })?;
    if !opts.quiet {
        eprintln!(
            "courier send: {} message(s) in {}, {} already acked per {} (skipped); sending {} to {}{}",
            v.messages,
            opts.file.display(),
            v.skipped,
            opts.state.display(),
            summary.to_send,
            opts.client.server,
            if listener.is_some() {
                format!("; waiting for their delivery ({awaiting_before} acked before still to hear of)")
            } else {
                String::new()
            }
        );
    }
    let bar = ProgressLine::new(summary.to_send, "answered", opts.quiet);
    let t0 = Instant::now();
    let mut acked = state_read.done.clone();
    if summary.to_send > 0 {
        run_batches(
            opts,
            &client,
            &welcome,
            &bounds,
            &state_read.done,
            &mut state,
            &mut summary,
            &bar,
            &mut acked,
        )
        .await;
    }
    summary.elapsed = t0.elapsed();
    bar.finish();
    if let Err(e) = state.sync() {
        let why = format!("syncing the state file {}: {e}", state.path.display());
        summary.stopped.get_or_insert(why);
    }
    if let (Some(l), Some(w)) = (listener, &opts.delivery) {
        if !opts.quiet {
            eprintln!(
                "courier send: waiting at most {:.0} s for the final statuses of {} acked message(s)",
                w.timeout.as_secs_f64(),
                acked.len()
            );
        }
        summary.delivery = Some(l.wait(&acked, w.timeout).await);
        l.stop();
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
    bar: &ProgressLine,
    acked: &mut HashSet<u64>,
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
                Some(r) => answered += record(r, state, summary, bar, acked),
                None => break,
            }
        }
        if summary.stopped.is_some() {
            break;
        }
    }
    while let Some(r) = in_flight.join_next().await {
        answered += record(r, state, summary, bar, acked);
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
    bar: &ProgressLine,
    acked: &mut HashSet<u64>,
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
                acked.insert(id);
            }
            Status::Duplicate(_) => {
                summary.duplicate += 1;
                write = write.and_then(|()| state.record(id));
                acked.insert(id);
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
    bar.inc(n, || {
        let answered = summary.accepted
            + summary.duplicate
            + summary.rejected_total()
            + summary.still_throttled;
        let secs = bar.elapsed().as_secs_f64();
        format!(
            "{:.0} msgs/s (accepted {}, not accepted {})",
            if secs > 0.0 {
                answered as f64 / secs
            } else {
                0.0
            },
            summary.accepted + summary.duplicate,
            summary.rejected_total() + summary.still_throttled
        )
    });
    n
}

/// Whether two paths name the same existing file (a state file that does not exist yet
/// cannot be the input).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
