//! The events one shard owes businesses: statuses of the messages in its log and users'
//! replies it took, each pushed to a connection of its business until acknowledged.
//!
//! ```text
//!  add(business, event) ──> the business's queue (log order; the event's record is
//!                           durable before it is pushed)
//!  poll_push(now, home) ──> a subscriber connection of the business (one on this
//!                     shard if it has one) and the next events of
//!                     its queue not in flight (at most events_per_push_max), up to
//!                     PUSHES_IN_FLIGHT pushes in flight per business, all on one
//!                     connection (one ordered stream): a business hears its events in
//!                     order, never reordered
//!  acked(events) ──> the acknowledged prefix leaves; the cursor (acknowledged through)
//!                    moves, and is persisted as a cursor record (poll_cursor)
//!  no acknowledgement for event_ack_timeout, or a bounce ──> everything in flight is
//!                    pushed again, from the first unacknowledged (at least once)
//! ```
//!
//! Bounds: `events_per_business_max` events per business. The core keeps a business
//! within it by admission, not by dropping: a SUBMIT whose messages' statuses would not
//! fit beside the events waiting and those its pending messages still owe is held or
//! throttled, and so is an INBOUND for it (`Shard::events_room`). What admission does
//! not reserve for may take a business past the bound, and is kept: a `read` (at most
//! one per message, for a message still pending, which the bound counts, or remembered
//! after its delivery) and the statuses of a business's first batch when nothing waited. The
//! shard sizes that allowance (`past_bound_max`, see `Shard::new`); only past it is the
//! oldest event dropped (counted; it stays in the log, and the cursor moves past it),
//! which admission never lets happen.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::server::ConnKey;
use crate::wire::delivery::BusinessEvent as EventItem;
use crate::wire::LogPosition;
use crate::ShardId;

/// Pushes a business may have in flight at once. With one, a business heard at most
/// `events_per_push_max` events per round trip: a closed-loop delivery run heard its
/// statuses 3 to 5 s after delivery, and fell a million events behind on a slow round
/// (BENCHMARKS.md, "Pending messages in log order").
const PUSHES_IN_FLIGHT: usize = 4;

/// The events in flight to a business: the first `count` of its queue, on `conn`.
#[derive(Debug, Clone, Copy)]
struct Push {
    conn: ConnKey,
    count: usize,
    /// Pushed again from the front unless an acknowledgement comes by then (set by the
    /// first push, moved on by each acknowledgement that frees events).
    deadline_ms: u64,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<EventItem>,
    /// Events acknowledged out of order (not at the front yet).
    acked: BTreeSet<LogPosition>,
    push: Option<Push>,
    /// Every event of this business through this position is acknowledged (or dropped).
    cursor: Option<LogPosition>,
    cursor_dirty: bool,
}

/// What the outbox counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboxCounts {
    /// Pushes made (first ones and repeats).
    pub pushes: u64,
    /// Events pushed (counting repeats).
    pub events_pushed: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Events dropped past `events_per_business_max` and its allowance, or by retention.
    pub dropped: u64,
    /// Pushes bounced by a gone connection.
    pub bounced: u64,
}

/// One shard's outbox. See the module docs.
#[derive(Debug)]
pub struct Outbox {
    per_business_max: usize,
    /// `per_business_max` and the allowance past it: the most a business's queue holds.
    kept_max: usize,
    per_push_max: usize,
    ack_timeout_ms: u64,
    queues: BTreeMap<u32, Queue>,
    subscribers: BTreeMap<u32, BTreeSet<ConnKey>>,
    /// Business whose turn it is to push first.
    next_business: u32,
    payload_bytes: u64,
    events: usize,
    counts: OutboxCounts,
}

impl Outbox {
    /// An empty outbox with the delivery section's bounds, keeping up to
    /// `past_bound_max` events of a business past `per_business_max` (those admission
    /// does not reserve for) before it drops any.
    pub fn new(
        per_business_max: u32,
        past_bound_max: usize,
        per_push_max: u32,
        ack_timeout_ms: u32,
    ) -> Outbox {
        assert!(per_business_max > 0 && per_push_max > 0);
        Outbox {
            per_business_max: per_business_max as usize,
            kept_max: (per_business_max as usize).saturating_add(past_bound_max),
            per_push_max: per_push_max as usize,
            ack_timeout_ms: u64::from(ack_timeout_ms),
            queues: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            next_business: 0,
            payload_bytes: 0,
            events: 0,
            counts: OutboxCounts::default(),
        }
    }

    /// Events waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Events waiting for one business.
    pub fn backlog(&self, business_id: u32) -> usize {
        self.queues.get(&business_id).map_or(0, |q| q.items.len())
    }

    /// Events waiting, by business (for the per-business metric).
    pub fn backlogs(&self) -> Vec<(u32, u64)> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.items.is_empty())
            .map(|(&b, q)| (b, q.items.len() as u64))
            .collect()
    }

    /// Payload bytes of the replies waiting.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// The bound on each business's events (`events_per_business_max`).
    pub fn per_business_max(&self) -> usize {
        self.per_business_max
    }

    /// The counters.
    pub fn counts(&self) -> OutboxCounts {
        self.counts
    }

    /// The business acknowledged everything through `cursor` before a restart.
    pub fn restore_cursor(&mut self, business_id: u32, cursor: LogPosition) {
        let q = self.queues.entry(business_id).or_default();
        q.cursor = Some(q.cursor.map_or(cursor, |c| c.max(cursor)));
        while q.items.front().is_some_and(|e| e.event() <= cursor) {
            let e = q.items.pop_front().expect("checked");
            self.events -= 1;
            self.payload_bytes -= e.bytes();
        }
    }

    /// Queues an event (in log order per business). Events at or below the business's
    /// cursor were acknowledged before and are not queued again.
    pub fn add(&mut self, business_id: u32, item: EventItem) {
        let q = self.queues.entry(business_id).or_default();
        if q.cursor.is_some_and(|c| item.event() <= c) {
            return;
        }
        debug_assert!(q.items.back().is_none_or(|b| b.event() < item.event()));
        if q.items.len() >= self.kept_max {
            let old = q.items.pop_front().expect("the bound is positive");
            q.cursor = Some(old.event());
            q.cursor_dirty = true;
            q.acked.remove(&old.event());
            if let Some(p) = q.push.as_mut() {
                p.count = p.count.saturating_sub(1);
            }
            self.events -= 1;
            self.payload_bytes -= old.bytes();
            self.counts.dropped += 1;
        }
        self.events += 1;
        self.payload_bytes += item.bytes();
        q.items.push_back(item);
    }

    /// A connection of `business_id` takes its events.
    pub fn subscriber_attached(&mut self, business_id: u32, conn: ConnKey) {
        self.subscribers
            .entry(business_id)
            .or_default()
            .insert(conn);
    }

    /// A connection no longer takes events; a push in flight to it is repeated.
    pub fn subscriber_detached(&mut self, conn: ConnKey) {
        for (b, subs) in self.subscribers.iter_mut() {
            if subs.remove(&conn) {
                if let Some(q) = self.queues.get_mut(b) {
                    if q.push.is_some_and(|p| p.conn == conn) {
                        q.push = None;
                    }
                }
            }
        }
        self.subscribers.retain(|_, s| !s.is_empty());
    }

    /// The next push at `now_ms`: a subscriber of a business with events ready (one on
    /// shard `home`, whose outbox this is, when the business has one there: its push then
    /// crosses no other shard), and its first events whose records are durable
    /// (`durable(event)`).
    pub fn poll_push(
        &mut self,
        now_ms: u64,
        home: u16,
        durable: impl Fn(LogPosition) -> bool,
    ) -> Option<(ConnKey, u32, Vec<EventItem>)> {
        let start = self.next_business;
        let order = self
            .queues
            .range(start..)
            .chain(self.queues.range(..start))
            .map(|(&b, _)| b);
        let window = PUSHES_IN_FLIGHT * self.per_push_max;
        let mut chosen = None;
        for b in order {
            let q = &self.queues[&b];
            let in_flight = q.push.map_or(0, |p| p.count);
            if in_flight >= window
                || q.items.len() <= in_flight
                || !durable(q.items[in_flight].event())
            {
                continue;
            }
            // More goes on the connection that has the rest in flight.
            let conn = match q.push {
                Some(p) => Some(p.conn),
                None => self.subscribers.get(&b).and_then(|s| {
                    s.iter()
                        .find(|c| u16::from(c.shard()) == home)
                        .or_else(|| s.first())
                        .copied()
                }),
            };
            if let Some(conn) = conn {
                chosen = Some((b, conn, in_flight));
                break;
            }
        }
        let (b, conn, in_flight) = chosen?;
        self.next_business = b.wrapping_add(1);
        let q = self.queues.get_mut(&b).expect("chosen");
        let items: Vec<EventItem> = q
            .items
            .iter()
            .skip(in_flight)
            .take(self.per_push_max.min(window - in_flight))
            .take_while(|e| durable(e.event()))
            .cloned()
            .collect();
        q.push = Some(Push {
            conn,
            count: in_flight + items.len(),
            deadline_ms: q
                .push
                .map_or(now_ms + self.ack_timeout_ms, |p| p.deadline_ms),
        });
        self.counts.pushes += 1;
        self.counts.events_pushed += items.len() as u64;
        Some((conn, b, items))
    }

    /// The business acknowledged these events at `now_ms`.
    pub fn acked(&mut self, business_id: u32, events: &[LogPosition], now_ms: u64) {
        let Some(q) = self.queues.get_mut(&business_id) else {
            return;
        };
        let mut popped = 0;
        for &e in events {
            // Most acknowledgements come in order: the front's leaves at once.
            if q.acked.is_empty() && q.items.front().is_some_and(|f| f.event() == e) {
                let item = q.items.pop_front().expect("checked");
                self.payload_bytes -= item.bytes();
                q.cursor = Some(e);
                q.cursor_dirty = true;
                popped += 1;
                continue;
            }
            // The queue is in log order (`add`): an event is found by binary search (a
            // scan per acknowledged event made a long backlog's acknowledgements
            // quadratic).
            if q.items.binary_search_by_key(&e, EventItem::event).is_ok() {
                q.acked.insert(e);
            }
        }
        while let Some(front) = q.items.front() {
            let e = front.event();
            if !q.acked.remove(&e) {
                break;
            }
            let item = q.items.pop_front().expect("checked");
            self.payload_bytes -= item.bytes();
            q.cursor = Some(e);
            q.cursor_dirty = true;
            popped += 1;
        }
        self.events -= popped;
        self.counts.acked += popped as u64;
        if let Some(p) = q.push.as_mut() {
            p.count = p.count.saturating_sub(popped);
            if p.count == 0 {
                q.push = None;
            } else if popped > 0 {
                p.deadline_ms = now_ms + self.ack_timeout_ms;
            }
        }
    }

    /// A push could not be written (the connection is gone): it is repeated elsewhere.
    pub fn bounced(&mut self, business_id: u32, conn: ConnKey) {
        self.counts.bounced += 1;
        self.subscriber_detached(conn);
        if let Some(q) = self.queues.get_mut(&business_id) {
            if q.push.is_some_and(|p| p.conn == conn) {
                q.push = None;
            }
        }
    }

    /// Pushes unacknowledged past their deadline may go again.
    pub fn tick(&mut self, now_ms: u64) {
        for q in self.queues.values_mut() {
            if q.push.is_some_and(|p| p.deadline_ms <= now_ms) {
                q.push = None;
            }
        }
    }

    /// Events of this shard with log indexes below `index_end` are being dropped by
    /// retention: they leave the outbox (counted).
    pub fn drop_below(&mut self, shard: ShardId, index_end: u64) {
        let end = LogPosition::new(shard, index_end);
        for q in self.queues.values_mut() {
            while q.items.front().is_some_and(|e| e.event() < end) {
                let e = q.items.pop_front().expect("checked");
                q.acked.remove(&e.event());
                q.cursor = Some(e.event());
                q.cursor_dirty = true;
                self.events -= 1;
                self.payload_bytes -= e.bytes();
                self.counts.dropped += 1;
                q.push = None;
            }
        }
    }

    /// A cursor that moved since it was last persisted.
    pub fn poll_cursor(&mut self) -> Option<(u32, LogPosition)> {
        for (&b, q) in self.queues.iter_mut() {
            if q.cursor_dirty {
                q.cursor_dirty = false;
                return q.cursor.map(|c| (b, c));
            }
        }
        None
    }

    /// When a push times out next.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.queues
            .values()
            .filter_map(|q| q.push.map(|p| p.deadline_ms))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::delivery::{StatusEvent, StatusKind};

    fn status(i: u64) -> EventItem {
        EventItem::Status(StatusEvent {
            event: LogPosition::new(ShardId::new(0), i),
            message: LogPosition::new(ShardId::new(0), 0),
            client_id: i,
            kind: StatusKind::Sent,
            reason: None,
            at_ms: 0,
        })
    }

    fn ids(items: &[EventItem]) -> Vec<u64> {
        items.iter().map(|e| e.event().index()).collect()
    }

    #[test]
    fn pushes_in_flight_per_business_in_order_up_to_the_window() {
        let mut o = Outbox::new(100, 0, 2, 1000);
        let c = ConnKey::for_tests(0, 1);
        let at = |i| LogPosition::new(ShardId::new(0), i);
        for i in 1..=10 {
            o.add(7, status(i));
        }
        assert!(o.poll_push(0, 0, |_| true).is_none(), "no subscriber yet");
        o.subscriber_attached(7, c);
        o.subscriber_attached(7, ConnKey::for_tests(1, 2));
        let mut pushed = Vec::new();
        while let Some((conn, b, items)) = o.poll_push(0, 0, |_| true) {
            assert_eq!((conn, b), (c, 7), "all on one connection");
            pushed.push(ids(&items));
        }
        assert_eq!(
            pushed,
            [vec![1, 2], vec![3, 4], vec![5, 6], vec![7, 8]],
            "in order, PUSHES_IN_FLIGHT pushes of events_per_push_max"
        );
        o.acked(7, &[at(2)], 10);
        assert!(
            o.poll_push(10, 0, |_| true).is_none(),
            "1 not acked: none freed"
        );
        o.acked(7, &[at(1)], 20);
        let (_, _, items) = o.poll_push(20, 0, |_| true).unwrap();
        assert_eq!(ids(&items), vec![9, 10], "two freed, the next two go");
        assert!(o.poll_push(20, 0, |_| true).is_none());
        assert_eq!(o.poll_cursor(), Some((7, at(2))));
        assert_eq!(o.poll_cursor(), None);
        // The acknowledgement at 20 moved the deadline to 1020: still in flight at 1019;
        // past it, everything unacknowledged goes again from the front.
        o.tick(1019);
        assert!(o.poll_push(1019, 0, |_| true).is_none());
        o.tick(1020);
        let (_, _, items) = o.poll_push(1020, 0, |_| true).unwrap();
        assert_eq!(ids(&items), vec![3, 4]);
    }

    /// A business's events go to a connection of its on the outbox's own shard when it
    /// has one there (no other shard in the way), else to one elsewhere.
    #[test]
    fn a_subscriber_on_the_outboxs_shard_is_preferred() {
        let mut o = Outbox::new(100, 0, 2, 1000);
        let (c0, c1) = (ConnKey::for_tests(0, 1), ConnKey::for_tests(1, 2));
        o.subscriber_attached(7, c0);
        o.subscriber_attached(7, c1);
        o.add(7, status(1));
        let (conn, _, _) = o.poll_push(0, 1, |_| true).unwrap();
        assert_eq!(conn, c1);
        let mut o = Outbox::new(100, 0, 2, 1000);
        o.subscriber_attached(7, c1);
        o.add(7, status(1));
        let (conn, _, _) = o.poll_push(0, 0, |_| true).unwrap();
        assert_eq!(conn, c1, "none on shard 0: the one elsewhere");
    }

    #[test]
    fn an_unacknowledged_push_is_repeated_and_non_durable_events_wait() {
        let mut o = Outbox::new(100, 0, 8, 1000);
        o.subscriber_attached(1, ConnKey::for_tests(0, 1));
        o.add(1, status(1));
        o.add(1, status(2));
        let (_, _, items) = o.poll_push(0, 0, |e| e.index() < 2).unwrap();
        assert_eq!(ids(&items), vec![1]);
        o.tick(999);
        // 2 is durable now: it follows 1 (the deadline stays the first push's).
        let (_, _, items) = o.poll_push(999, 0, |_| true).unwrap();
        assert_eq!(ids(&items), vec![2]);
        assert!(o.poll_push(999, 0, |_| true).is_none());
        o.tick(1000);
        let (_, _, items) = o.poll_push(1000, 0, |_| true).unwrap();
        assert_eq!(ids(&items), vec![1, 2]);
    }

    #[test]
    fn acknowledgements_in_any_order_and_unknown_ones_leave_the_right_events() {
        let mut o = Outbox::new(100, 0, 8, 1000);
        for i in 1..=6 {
            o.add(1, status(i));
        }
        let at = |i| LogPosition::new(ShardId::new(0), i);
        // In order (1, 2), then out of order (4 before 3), an unknown one (9) and a
        // repeat (2).
        o.acked(1, &[at(1), at(2), at(4), at(9), at(2)], 0);
        assert_eq!((o.backlog(1), o.counts().acked), (4, 2));
        o.acked(1, &[at(3)], 0);
        assert_eq!((o.backlog(1), o.counts().acked), (2, 4));
        assert_eq!(o.poll_cursor(), Some((1, at(4))));
        o.acked(1, &[at(6), at(5)], 0);
        assert_eq!((o.backlog(1), o.len(), o.counts().acked), (0, 0, 6));
        assert_eq!(o.poll_cursor(), Some((1, at(6))));
    }

    #[test]
    fn past_the_bound_and_its_allowance_the_oldest_drops_and_the_cursor_moves() {
        let mut o = Outbox::new(2, 1, 8, 1000);
        for i in 1..=3 {
            o.add(1, status(i));
        }
        assert_eq!(
            (o.backlog(1), o.counts().dropped),
            (3, 0),
            "kept past the bound"
        );
        assert_eq!(o.poll_cursor(), None);
        o.add(1, status(4));
        assert_eq!(o.backlog(1), 3);
        assert_eq!(o.counts().dropped, 1);
        assert_eq!(
            o.poll_cursor(),
            Some((1, LogPosition::new(ShardId::new(0), 1)))
        );
        let mut fresh = Outbox::new(2, 0, 8, 1000);
        fresh.restore_cursor(1, LogPosition::new(ShardId::new(0), 2));
        fresh.add(1, status(2));
        fresh.add(1, status(3));
        assert_eq!(fresh.backlog(1), 1, "acknowledged before the restart");
    }
}
