//! A one-line progress display on stderr, for `courier send` and `courier-loadgen`.
//!
//! ```text
//! caller ──set(done, text)──> ProgressLine ──at most every REDRAW_INTERVAL──> "\r<line>\x1b[K" on stderr
//!                                  └─ stderr not a terminal, or hidden: draws nothing
//! finish() ──> clears the line, so that the summary printed next starts on a clean row
//! ```
//!
//! It replaces `indicatif`, which pulled in the unmaintained `number_prefix`
//! (RUSTSEC-2025-0119) for a bar this small. Invariants:
//! - it draws only when stderr is a terminal: a log file or a pipe never gets carriage
//!   returns or escape codes;
//! - it redraws at most every [`REDRAW_INTERVAL`], however often it is updated, so that
//!   a fast sender does not spend its time writing to the terminal;
//! - it shows what its caller gives it (counts, rates, latencies), never message content,
//!   a recipient or a token: callers pass figures only.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest time between two redraws.
pub const REDRAW_INTERVAL: Duration = Duration::from_millis(200);
/// Longest line drawn, in characters; longer text is cut (terminals wrap otherwise, and
/// a wrapped line cannot be redrawn in place).
pub const LINE_CHARS_MAX: usize = 160;
/// Width of the bar between the brackets.
const BAR_CHARS: usize = 20;

/// A progress line: `elapsed [=====>    ] done/total unit, text`.
#[derive(Debug)]
pub struct ProgressLine {
    /// Nothing is drawn (quiet, or stderr is not a terminal).
    hidden: bool,
    total: u64,
    unit: &'static str,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    done: u64,
    text: String,
    drawn: Option<Instant>,
}

impl ProgressLine {
    /// A line out of `total` (`unit` names what is counted, e.g. "answered"). It stays
    /// hidden when `quiet` or when stderr is not a terminal.
    pub fn new(total: u64, unit: &'static str, quiet: bool) -> ProgressLine {
        Self::with_terminal(total, unit, quiet || !std::io::stderr().is_terminal())
    }

    fn with_terminal(total: u64, unit: &'static str, hidden: bool) -> ProgressLine {
        ProgressLine {
            hidden,
            total,
            unit,
            started: Instant::now(),
            state: Mutex::new(State {
                done: 0,
                text: String::new(),
                drawn: None,
            }),
        }
    }

    /// A line that never draws.
    pub fn hidden() -> ProgressLine {
        Self::with_terminal(0, "", true)
    }

    /// Time since the line was made.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether it draws at all.
    pub fn is_hidden(&self) -> bool {
        self.hidden
    }

    /// Adds `n` to the count done; redraws, with `text` after the count (figures
    /// only), if the last draw is old enough. `text` is built only for a redraw.
    pub fn inc(&self, n: u64, text: impl FnOnce() -> String) {
        self.update(|s| s.done = s.done.saturating_add(n), text);
    }

    /// Sets the count done; redraws, with `text`, if the last draw is old enough.
    pub fn set(&self, done: u64, text: impl FnOnce() -> String) {
        self.update(|s| s.done = done, text);
    }

    fn update(&self, count: impl FnOnce(&mut State), text: impl FnOnce() -> String) {
        if self.hidden {
            return;
        }
        let mut s = self.state.lock().expect("progress lock");
        count(&mut s);
        let now = Instant::now();
        if !due(&mut s, now) {
            return;
        }
        s.text = text();
        let line = self.render(&s, now.duration_since(self.started));
        let mut err = std::io::stderr().lock();
        // A progress line that cannot be written is not worth failing a send for.
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }

    /// The line's text.
    fn render(&self, s: &State, elapsed: Duration) -> String {
        let secs = elapsed.as_secs();
        let mut line = format!(
            "{:02}:{:02}:{:02} ",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        );
        if self.total > 0 {
            let filled =
                (s.done.min(self.total) as u128 * BAR_CHARS as u128 / self.total as u128) as usize;
            line.push('[');
            line.extend(std::iter::repeat_n('=', filled));
            if filled < BAR_CHARS {
                line.push('>');
                line.extend(std::iter::repeat_n(' ', BAR_CHARS - filled - 1));
            }
            line.push_str(&format!("] {}/{} {}", s.done, self.total, self.unit));
        }
        if !s.text.is_empty() {
            line.push_str(if self.total > 0 { ", " } else { "" });
            line.push_str(&s.text);
        }
        if line.chars().count() > LINE_CHARS_MAX {
            line = line.chars().take(LINE_CHARS_MAX).collect();
        }
        line
    }

    /// Clears the line (if one was drawn), leaving the cursor at the start of the row.
    pub fn finish(&self) {
        if self.hidden {
            return;
        }
        let s = self.state.lock().expect("progress lock");
        if s.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// Whether a redraw is due at `now`; if so, records it as drawn.
fn due(s: &mut State, now: Instant) -> bool {
    if s.drawn
        .is_some_and(|at| now.duration_since(at) < REDRAW_INTERVAL)
    {
        return false;
    }
    s.drawn = Some(now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_elapsed_bar_counts_and_text() {
        let p = ProgressLine::with_terminal(10, "answered", false);
        let s = State {
            done: 5,
            text: "120 msgs/s".into(),
            drawn: None,
        };
        assert_eq!(
            p.render(&s, Duration::from_secs(3723)),
            "01:02:03 [==========>         ] 5/10 answered, 120 msgs/s"
        );
        let full = State {
            done: 12,
            text: String::new(),
            drawn: None,
        };
        assert_eq!(
            p.render(&full, Duration::ZERO),
            "00:00:00 [====================] 12/10 answered"
        );
    }

    #[test]
    fn long_text_is_cut_to_one_row() {
        let p = ProgressLine::with_terminal(0, "", false);
        let s = State {
            done: 0,
            text: "x".repeat(1000),
            drawn: None,
        };
        assert_eq!(p.render(&s, Duration::ZERO).chars().count(), LINE_CHARS_MAX);
    }

    #[test]
    fn redraws_are_rate_limited() {
        let mut s = State {
            done: 1,
            text: String::new(),
            drawn: None,
        };
        let t0 = Instant::now();
        assert!(due(&mut s, t0), "the first draw is due at once");
        assert!(!due(&mut s, t0 + Duration::from_millis(50)), "too soon");
        assert_eq!(s.drawn, Some(t0));
        assert!(due(&mut s, t0 + REDRAW_INTERVAL));
        assert_eq!(s.drawn, Some(t0 + REDRAW_INTERVAL));
    }

    #[test]
    fn a_hidden_line_never_draws() {
        let p = ProgressLine::hidden();
        p.inc(5, || {
            unreachable!("the text of a hidden line is never built")
        });
        p.set(7, || {
            unreachable!("the text of a hidden line is never built")
        });
        assert!(p.state.lock().unwrap().drawn.is_none());
        p.finish();
    }
}
