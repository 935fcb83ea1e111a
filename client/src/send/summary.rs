//! What `courier send` prints at the end: one `name value` row per count, what was not
//! accepted (by line and id, never by content), errors and a verdict; and the exit
//! status that goes with it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use courier_pipeline::wire::Status;

use super::wait::DeliverySummary;
use super::{exit_code, ERRORS_SHOWN_MAX, NOT_ACCEPTED_SHOWN_MAX};
use crate::ClientError;

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
    /// With `--wait delivered`: the final statuses of the file's acked messages.
    pub delivery: Option<DeliverySummary>,
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
        let delivered = self
            .delivery
            .as_ref()
            .is_none_or(DeliverySummary::all_delivered);
        if self.all_done() && delivered {
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
        if let Some(d) = &self.delivery {
            row(out, "delivered", d.delivered)?;
            row(out, "read", d.read)?;
            row(out, "failed", d.failed_total())?;
            for (reason, n) in &d.failed {
                row(out, &format!("failed.{reason}"), *n)?;
            }
            row(out, "expired", d.expired)?;
            row(out, "no_final_status", d.no_final_status)?;
            row(out, "replies", d.replies)?;
            writeln!(out, "{:<32}{:>12.3} s", "waited", d.waited.as_secs_f64())?;
        }
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
        if let Some(why) = self.delivery.as_ref().and_then(|d| d.stopped.as_ref()) {
            writeln!(out, "stopped listening early: {why}")?;
        }
        if let Some(d) = self.delivery.as_ref().filter(|d| !d.all_delivered()) {
            writeln!(
                out,
                "delivery: {} failed, {} expired, {} without a final status yet (a rerun waits \
                 for those again)",
                d.failed_total(),
                d.expired,
                d.no_final_status
            )?;
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

    pub(crate) fn not_accepted(&mut self, line: u64, id: u64, status: Status) {
        if self.not_accepted.len() < NOT_ACCEPTED_SHOWN_MAX {
            self.not_accepted.push(NotAccepted { line, id, status });
        }
    }

    pub(crate) fn error(&mut self, e: &ClientError) {
        let text = e.to_string();
        if self.errors.len() < ERRORS_SHOWN_MAX && !self.errors.contains(&text) {
            self.errors.push(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
