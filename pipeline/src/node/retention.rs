//! Retention's hand-over to delivery: before the log drops a segment, the messages still
//! waiting in it become `expired`, and their status records are durable.
//!
//! ```text
//!  tick(now): Log::expiring_end(now + RETENTION_LEAD_MS) ──> announce(end): waiting
//!             messages below `end` expire, their events leave the outbox
//!  advance:   status records appended ──> appended(internal empty, next index): barrier
//!  tick(now): drop_end_max(durable end) ──> Log::tick_below(now, end): segments ending
//!             at or below it, and past the retention at `now`, go
//! ```
//!
//! Invariant: a segment is dropped only after every `expired` status of a message in it
//! is durable (unless the log failed: then no status can be written, and deleting expired
//! data is still owed). The announcement runs [`RETENTION_LEAD_MS`] ahead, so that the
//! statuses are durable by the time the segment reaches the retention and the drop is not
//! late: a segment still goes at the first tick past its oldest record's retention.

/// How far ahead of a segment's drop its waiting messages become `expired`, ms: two
/// retention ticks, one for the status records' group commit to complete.
pub const RETENTION_LEAD_MS: u64 = 2 * super::TICK_INTERVAL.as_millis() as u64;

// The statuses are announced at least one whole tick before the tick that drops.
const _: () = assert!(RETENTION_LEAD_MS > super::TICK_INTERVAL.as_millis() as u64);

/// What retention announced and what may go (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExpiryGate {
    /// Log end below which waiting messages were made `expired`.
    announced_end: u64,
    /// Every status record of the last announcement sits below this log index (`None`:
    /// some still wait for room in the log, or none was announced since the last clear).
    barrier: Option<u64>,
    /// Segments ending at or below this may go: their statuses are durable.
    cleared_end: u64,
}

impl ExpiryGate {
    /// Retention will drop everything below `end`: returns whether that is news (the
    /// caller then expires the waiting messages below it).
    pub(super) fn announce(&mut self, end: u64) -> bool {
        if end <= self.announced_end {
            return false;
        }
        self.announced_end = end;
        self.barrier = None;
        true
    }

    /// After the core appended what it could of its own records: once none waits
    /// (`internal_empty`), the statuses announced so far all sit below `next_index`.
    pub(super) fn appended(&mut self, internal_empty: bool, next_index: u64) {
        if internal_empty && self.barrier.is_none() && self.announced_end > self.cleared_end {
            self.barrier = Some(next_index);
        }
    }

    /// The end below which segments may be dropped now that the log is durable below
    /// `durable_end`.
    pub(super) fn drop_end_max(&mut self, durable_end: u64) -> u64 {
        if self.barrier.is_some_and(|b| b <= durable_end) {
            self.cleared_end = self.announced_end;
            self.barrier = None;
        }
        self.cleared_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_goes_before_its_statuses_are_durable() {
        let mut g = ExpiryGate::default();
        assert_eq!(g.drop_end_max(100), 0, "nothing announced");
        assert!(g.announce(10));
        assert!(!g.announce(10), "the same end is no news");
        // The statuses still wait for room in the log: no barrier yet.
        g.appended(false, 50);
        assert_eq!(g.drop_end_max(1000), 0);
        // Appended below 60; durable below 55 only.
        g.appended(true, 60);
        assert_eq!(g.drop_end_max(55), 0);
        assert_eq!(g.drop_end_max(60), 10);
        // A later announcement waits for its own statuses; the earlier clearance stays.
        assert!(g.announce(20));
        assert_eq!(g.drop_end_max(1000), 10);
        g.appended(true, 70);
        assert_eq!(g.drop_end_max(69), 10);
        assert_eq!(g.drop_end_max(70), 20);
    }
}
