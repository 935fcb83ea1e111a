//! A shard's graceful stop, as deadlines:
//!
//! ```text
//!  begin_stop ─> flushing: no new batches; group commits of taken batches finish, ACKed
//!     │          (at most FLUSH_TIMEOUT)
//!     ▼ flushed
//!  lingering: connections stay open ACK_LINGER_RTTS round trips (clamped to
//!     │       ACK_LINGER_MIN..=ACK_LINGER_MAX) so the last ACKs are sent and acknowledged
//!     ▼
//!  closing: every connection closed with SHUTTING_DOWN once what could still be sent
//!     │     went (the close is taken by the next `poll_transmit`)
//!     ▼ no connection left, or DRAIN_TIMEOUT
//!  done
//! ```
//!
//! Closing a QUIC connection discards stream data not yet sent or not yet acknowledged, so
//! closing right after the last group commit lost the ACKs of batches already durable
//! (`tests/graceful_stop.rs` counted them): hence the linger.

use std::time::{Duration, Instant};

/// How long a stopping shard waits for the group commits of batches it took.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping shard waits for its connections to close.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Round trips a stopping shard keeps its connections open after its last ACK.
pub const ACK_LINGER_RTTS: u32 = 3;
/// Shortest linger after the last ACK: one probe timeout on a short path (the peer's
/// 25 ms ack delay plus a little), so a lost ACK packet is still retransmitted.
pub const ACK_LINGER_MIN: Duration = Duration::from_millis(50);
/// Longest linger after the last ACK.
pub const ACK_LINGER_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Flushing,
    Lingering {
        until: Instant,
    },
    /// The close is due; `poll_transmit` takes it.
    CloseDue,
    Draining {
        until: Instant,
    },
    Done,
}

/// Where a stop stands.
#[derive(Debug)]
pub(super) struct Stopping {
    flush_deadline: Instant,
    phase: Phase,
}

impl Stopping {
    pub(super) fn new(now: Instant) -> Stopping {
        Stopping {
            flush_deadline: now + FLUSH_TIMEOUT,
            phase: Phase::Flushing,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The next deadline the stop waits for.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Flushing => Some(self.flush_deadline),
            Phase::Lingering { until } => Some(until.min(self.flush_deadline)),
            Phase::Draining { until } => Some(until),
            Phase::CloseDue | Phase::Done => None,
        }
    }

    /// Moves the stop on at `now`: `flushed` when no batch waits for the log,
    /// `rtt_max` the largest round trip of the live connections, `connections` how many
    /// are left.
    pub(super) fn advance(
        &mut self,
        now: Instant,
        flushed: bool,
        rtt_max: Duration,
        connections: usize,
    ) {
        if let Phase::Flushing = self.phase {
            if flushed {
                let linger = (rtt_max * ACK_LINGER_RTTS).clamp(ACK_LINGER_MIN, ACK_LINGER_MAX);
                self.phase = Phase::Lingering {
                    until: now + linger,
                };
            } else if now >= self.flush_deadline {
                self.phase = Phase::CloseDue;
            }
        }
        if let Phase::Lingering { until } = self.phase {
            if now >= until || now >= self.flush_deadline {
                self.phase = Phase::CloseDue;
            }
        }
        if let Phase::Draining { until } = self.phase {
            if connections == 0 || now >= until {
                self.phase = Phase::Done;
            }
        }
    }

    /// Whether the close is due now; if so the stop moves on to draining (from `now`).
    pub(super) fn take_close_due(&mut self, now: Instant) -> bool {
        if self.phase != Phase::CloseDue {
            return false;
        }
        self.phase = Phase::Draining {
            until: now + DRAIN_TIMEOUT,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_lingers_after_the_flush_then_closes_then_drains() {
        let t0 = Instant::now();
        let mut s = Stopping::new(t0);
        s.advance(t0, false, Duration::ZERO, 2);
        assert_eq!(s.next_deadline(), Some(t0 + FLUSH_TIMEOUT));
        let t1 = t0 + Duration::from_millis(10);
        s.advance(t1, true, Duration::from_millis(40), 2);
        assert_eq!(s.next_deadline(), Some(t1 + Duration::from_millis(120)));
        assert!(!s.take_close_due(t1));
        let t2 = t1 + Duration::from_millis(120);
        s.advance(t2, true, Duration::ZERO, 2);
        assert!(s.take_close_due(t2));
        s.advance(t2, true, Duration::ZERO, 1);
        assert!(!s.is_done());
        s.advance(t2, true, Duration::ZERO, 0);
        assert!(s.is_done());
    }

    #[test]
    fn a_stop_that_cannot_flush_closes_at_its_deadline() {
        let t0 = Instant::now();
        let mut s = Stopping::new(t0);
        s.advance(t0 + FLUSH_TIMEOUT, false, Duration::ZERO, 1);
        let t = t0 + FLUSH_TIMEOUT;
        assert!(s.take_close_due(t));
        s.advance(t + DRAIN_TIMEOUT, false, Duration::ZERO, 1);
        assert!(
            s.is_done(),
            "a connection that never closes does not hold the stop"
        );
    }
}
