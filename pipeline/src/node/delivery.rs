//! Delivery of one shard's messages to the platform's delivery edge: the pending index,
//! retransmission, time to live, and the statuses they produce.
//!
//! ```text
//!  a message durable (its ACK sent) ──> admit: pending, due now (payload kept, budgeted)
//!  poll_dispatch(now, keys) ──> due, an edge attached, fewer than in_flight_max out:
//!                          (edge connection, DELIVER) for the shell of the edge's shard;
//!                          with end-to-end sealing, a recipient without device keys
//!                          waits (KEYS_WANTED) at most e2e.device_key_wait_ms, then
//!                          failed(no_device_key)
//!  handed(message) ──> `sent` (once) ; outcome timer armed
//!  bounced(message) ──> that edge forgotten, due again shortly
//!  outcome: delivered / read / failed(reason) ──> status, final (read may follow delivered)
//!           retry_later ──> due after a backoff (doubling, capped), or at ONLINE
//!  no outcome by outcome_timeout ──> due again (at-least-once; the edge drops copies by id)
//!  expiry (the message's time to live) ──> `expired`, final
//! ```
//!
//! Every status it produces comes out of [`Delivery::poll_status`] in the order it
//! happened; the core makes each durable (a status record) before its business hears it.
//!
//! Bounds: at most `pending_max` messages and `pending_bytes_max` payload bytes wait here
//! (past either, new SUBMITs are throttled: [`Delivery::has_room`]); at most
//! `in_flight_max` are out with the edge at once; `delivered_kept_max` delivered messages
//! are remembered for a later `read`. The indexes beside them remove lazily and sweep, so
//! each holds at most about twice its live entries plus a constant: each timer queue
//! (see `timers.rs`) `2 × pending + 4096` entries, each recipient's list `2 × its pending
//! messages + 8`, the delivered list `2 × delivered_kept_max + 1024`.
//!
//! Timers of the same millisecond fire in the order they were set, not by position.
//!
//! Payload buffers: the messages of one stored batch come with their payloads as slices
//! of one shared buffer (the batch's sealed bytes, taken over without a copy), and
//! `pending_bytes_max` counts that buffer whole while any of its messages is pending: one
//! slice keeps all of it. So that a message that waits (a backoff, an offline recipient,
//! a hand-off without an outcome, device keys missing) does not keep its batch's buffer
//! for long, it gets a copy of its own the first time it waits for later; a bounce (the
//! edge out of credit) keeps the slice. Messages read back at start-up own their payloads.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::timers::TimerQueue;
use crate::by_position::ByPosition;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::profile::ProfileIssue;
use crate::server::ConnKey;
use crate::wire::delivery::{Deliver, FailReason, Outcome, StatusKind};
use crate::wire::{LogPosition, Recipient};
use crate::ShardId;

/// Delay before a bounced message (its edge connection was gone or out of credit) is
/// offered again.
const BOUNCE_RETRY_MS: u64 = 50;

/// `[delivery]`: how messages are handed to the edge, and statuses and replies to
/// businesses. Owned here; the profile composes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deliver messages at all: off, they are stored and acked as before delivery
    /// existed (and no status is produced).
    pub enabled: bool,
    /// Time to live of a message when its SUBMIT names none, seconds.
    pub ttl_default_secs: u64,
    /// Longest time to live a SUBMIT may ask for, seconds (at most the log's retention).
    pub ttl_max_secs: u64,
    /// Most messages waiting for delivery per shard.
    pub pending_max: u32,
    /// Most payload bytes of waiting messages and unacknowledged replies per shard.
    pub pending_bytes_max: u64,
    /// Most messages handed to the edge and awaiting their outcome per shard.
    pub in_flight_max: u32,
    /// Milliseconds after a hand-off without an outcome before it is handed again.
    pub outcome_timeout_ms: u32,
    /// First retry delay after `retry_later`, milliseconds (doubling per attempt).
    pub retry_backoff_min_ms: u32,
    /// Longest retry delay, milliseconds.
    pub retry_backoff_max_ms: u32,
    /// Delivered messages remembered per shard for a later `read`.
    pub delivered_kept_max: u32,
    /// Most unacknowledged events (statuses, replies) kept per business and shard; older
    /// ones are dropped (counted) and stay in the log only.
    pub events_per_business_max: u32,
    /// Most events in one push to a business.
    pub events_per_push_max: u32,
    /// Milliseconds without an acknowledgement from a business before what is in flight
    /// to it is pushed again.
    pub event_ack_timeout_ms: u32,
    /// The profile's `[e2e]` section (sealing for recipients' devices), set by the
    /// profile's validation; not a key of `[delivery]`.
    #[serde(skip, default)]
    pub e2e: super::devices::E2eConfig,
}

impl DeliveryConfig {
    /// The problems of this section, each naming its key.
    pub fn issues(&self) -> Vec<ProfileIssue> {
        let mut out = Vec::new();
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                out.push(ProfileIssue {
                    key: format!("delivery.{key}"),
                    problem: format!("{v} is outside {lo}..={hi}"),
                });
            }
        };
        range("ttl_max_secs", self.ttl_max_secs, 60, 10 * 366 * 86_400);
        range(
            "ttl_default_secs",
            self.ttl_default_secs,
            1,
            self.ttl_max_secs,
        );
        range("pending_max", self.pending_max.into(), 16, 1 << 26);
        range(
            "pending_bytes_max",
            self.pending_bytes_max,
            1 << 20,
            1 << 40,
        );
        range("in_flight_max", self.in_flight_max.into(), 1, 1 << 20);
        range(
            "outcome_timeout_ms",
            self.outcome_timeout_ms.into(),
            100,
            3_600_000,
        );
        range(
            "retry_backoff_min_ms",
            self.retry_backoff_min_ms.into(),
            10,
            3_600_000,
        );
        range(
            "retry_backoff_max_ms",
            self.retry_backoff_max_ms.into(),
            self.retry_backoff_min_ms.into(),
            86_400_000,
        );
        range(
            "delivered_kept_max",
            self.delivered_kept_max.into(),
            0,
            1 << 26,
        );
        range(
            "events_per_business_max",
            self.events_per_business_max.into(),
            16,
            1 << 26,
        );
        range(
            "events_per_push_max",
            self.events_per_push_max.into(),
            1,
            4096,
        );
        range(
            "event_ack_timeout_ms",
            self.event_ack_timeout_ms.into(),
            100,
            3_600_000,
        );
        out
    }

    /// Caps the times to live at the log's retention: a message never outlives its
    /// record.
    pub fn clamp_to_retention(&mut self, retention_secs: u64) {
        self.ttl_max_secs = self.ttl_max_secs.min(retention_secs);
        self.ttl_default_secs = self.ttl_default_secs.min(self.ttl_max_secs);
    }

    /// The expiry of a message accepted at `now_ms` whose SUBMIT asked for `ttl_secs`
    /// (0: the default), clamped to the maximum.
    pub fn expiry(&self, now_ms: u64, ttl_secs: u32) -> u64 {
        let ttl = match ttl_secs {
            0 => self.ttl_default_secs,
            t => u64::from(t).min(self.ttl_max_secs),
        };
        now_ms + ttl * 1000
    }
}

/// A count per business that goes when it reaches zero: the statuses owed to each
/// business (`Delivery::owed_to`, and the core's events promised by records not durable
/// yet).
#[derive(Debug, Default)]
pub(super) struct PerBusiness(crate::LocalMap<u32, usize>);

impl PerBusiness {
    /// The count of `business_id`.
    pub(super) fn get(&self, business_id: u32) -> usize {
        self.0.get(&business_id).copied().unwrap_or(0)
    }

    /// Adds `n` to the count of `business_id`.
    pub(super) fn add(&mut self, business_id: u32, n: usize) {
        if n > 0 {
            *self.0.entry(business_id).or_default() += n;
        }
    }

    /// Takes `n` from the count of `business_id` (at most down to zero, when it goes).
    pub(super) fn sub(&mut self, business_id: u32, n: usize) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.0.entry(business_id) {
            *e.get_mut() = e.get().saturating_sub(n);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Whether no business has a count.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A message waiting for delivery.
#[derive(Debug, Clone)]
struct Pending {
    /// When it entered delivery, unix ms.
    accepted_ms: u64,
    business_id: u32,
    client_id: u64,
    recipient: Recipient,
    expires_ms: u64,
    payload: Bytes,
    /// The shared buffer `payload` is a slice of (counted there), or none: its own
    /// (counted by its length).
    block: Option<PayloadBlock>,
    attempts: u32,
    /// With end-to-end sealing: when waiting for the recipient's device keys ends in
    /// `failed(no_device_key)` (set when its first wait starts).
    keys_wait_until: Option<u64>,
    /// `sent` was recorded (it was handed at least once).
    sent: bool,
    /// In its recipient's list (`Delivery::by_recipient`).
    listed: bool,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Due for a hand-off at this time.
    Waiting { due_ms: u64 },
    /// Offered to an edge connection's shard; not confirmed handed yet.
    Offered { conn: ConnKey, since_ms: u64 },
    /// On the edge; an outcome is due by this time.
    Handed { deadline_ms: u64 },
}

/// A shared buffer that pending payloads are slices of ([`Delivery::hold_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadBlock(u32);

/// The shared payload buffers held, each with its bytes and how many pending messages
/// still hold a slice of it. At most one per pending message (and free slots reused).
#[derive(Debug, Default)]
struct Blocks {
    slots: Vec<(u64, usize)>,
    free: Vec<u32>,
}

impl Blocks {
    fn hold(&mut self, bytes: u64, messages: usize) -> PayloadBlock {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = (bytes, messages);
                PayloadBlock(i)
            }
            None => {
                let i = u32::try_from(self.slots.len()).expect("fewer blocks than messages");
                self.slots.push((bytes, messages));
                PayloadBlock(i)
            }
        }
    }

    /// One message lets go of `block`: the buffer's bytes if it was the last, else 0.
    fn release(&mut self, block: PayloadBlock) -> u64 {
        let slot = &mut self.slots[block.0 as usize];
        assert!(slot.1 > 0, "a block let go of more often than held");
        slot.1 -= 1;
        if slot.1 > 0 {
            return 0;
        }
        self.free.push(block.0);
        std::mem::take(&mut slot.0)
    }
}

/// Whether a due message's recipient can be sealed for now ([`Delivery::poll_dispatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// Yes (or no end-to-end sealing).
    Ready,
    /// Its device keys are missing: it waits at most `wait_ms` in all (then
    /// `failed(no_device_key)`), looked at again after `recheck_ms` or when keys arrive.
    Missing {
        /// The longest wait.
        wait_ms: u64,
        /// When to look again.
        recheck_ms: u64,
    },
}

/// A status a message just reached, for its business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// The message.
    pub message: LogPosition,
    /// Its business.
    pub business_id: u32,
    /// The business's client message id.
    pub client_id: u64,
    /// The status.
    pub kind: StatusKind,
    /// Why, for `failed`.
    pub reason: Option<FailReason>,
}

/// What delivery counts (per shard; for the metrics and the simulation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Hand-offs (first ones and retransmissions).
    pub handoffs: u64,
    /// Hand-offs after the first of a message.
    pub retransmissions: u64,
    /// Messages the edge bounced back (its connection gone or out of credit).
    pub bounced: u64,
    /// Outcomes for messages no longer waiting (copies, or after a final status).
    pub outcomes_stale: u64,
    /// Final statuses by kind: delivered, failed, expired.
    pub delivered: u64,
    /// `read` statuses.
    pub read: u64,
    /// `failed` statuses.
    pub failed: u64,
    /// `expired` statuses.
    pub expired: u64,
}

/// One shard's delivery state. See the module docs.
#[derive(Debug)]
pub struct Delivery {
    cfg: DeliveryConfig,
    /// Every pending message by position, stored in log order (see `by_position.rs`), and
    /// their positions in log order for the oldest and for retention's ranges (see
    /// [`Delivery::admit`]).
    pending: ByPosition<Pending>,
    order: VecDeque<LogPosition>,
    /// `(due_ms, message)` of every waiting message (and stale entries: see
    /// [`TimerQueue`]; live: [`live_due`]).
    due: TimerQueue,
    /// `(deadline_ms, message)` of every message out with the edge ([`live_handed`]).
    deadlines: TimerQueue,
    /// `(since_ms, message)` of every message offered and not yet confirmed handed
    /// ([`live_offered`]).
    offered: TimerQueue,
    /// `(expires_ms, message)` of every pending message ([`live_pending`]).
    expiries: TimerQueue,
    /// The pending messages of each recipient that waited for a later time at least once
    /// (a backoff, a bounce, a key recheck): the ones an ONLINE can make due now. A
    /// message is listed when it first waits for later, not when admitted: most are due
    /// at once and delivered at the first hand-off, and listing them all cost a random
    /// access of this map at each admission and each finish (BENCHMARKS.md, "Pending
    /// messages in log order"). Removal is lazy: a list holds its recipient's listed
    /// pending messages (`live` of them) and finished ones, swept out when they
    /// outnumber the pending ones; a list with none pending goes. Recipients are chosen
    /// by senders: keyed with a random per-process seed.
    by_recipient: HashMap<Recipient, RecipientList, foldhash::quality::RandomState>,
    /// Edge connections that take deliveries, by their shard (every shard's).
    edges: BTreeSet<ConnKey>,
    next_edge: usize,
    out: usize,
    payload_bytes: u64,
    blocks: Blocks,
    /// Delivered messages awaiting a possible `read`, oldest first (read ones stay until
    /// they reach the front or a sweep: those not in `delivered_index`).
    delivered: VecDeque<LogPosition>,
    /// Business and client id of each delivered message remembered.
    /// In log order too (`by_position.rs`): delivered, and so remembered, mostly in order.
    delivered_index: ByPosition<(u32, u64)>,
    changes: VecDeque<StatusChange>,
    /// Statuses owed to each business ([`Delivery::owed_to`]).
    owed: PerBusiness,
    counts: DeliveryCounts,
    /// Recipients whose device keys a due message lacks, for KEYS_WANTED.
    keys_wanted: Vec<Recipient>,
}

impl Delivery {
    /// Empty delivery state.
    pub fn new(cfg: DeliveryConfig) -> Delivery {
        Delivery {
            cfg,
            pending: ByPosition::default(),
            order: VecDeque::new(),
            due: TimerQueue::default(),
            deadlines: TimerQueue::default(),
            offered: TimerQueue::default(),
            expiries: TimerQueue::default(),
            by_recipient: HashMap::default(),
            edges: BTreeSet::new(),
            next_edge: 0,
            out: 0,
            payload_bytes: 0,
            blocks: Blocks::default(),
            delivered: VecDeque::new(),
            delivered_index: ByPosition::default(),
            changes: VecDeque::new(),
            owed: PerBusiness::default(),
            counts: DeliveryCounts::default(),
            keys_wanted: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &DeliveryConfig {
        &self.cfg
    }

    /// Messages waiting (not final yet).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Statuses `business_id`'s messages owe it from here: two for each pending message
    /// not handed yet (`sent` and a final one), one for each handed one, and those reached
    /// but not taken yet ([`Delivery::poll_status`]). A `read` is not counted before it
    /// is reached.
    pub fn owed_to(&self, business_id: u32) -> usize {
        self.owed.get(business_id)
    }

    /// Queues a status reached (owed until taken).
    fn reached(&mut self, c: StatusChange) {
        self.owed.add(c.business_id, 1);
        self.changes.push_back(c);
    }

    /// Payload bytes held for waiting messages: each shared buffer whole while any of its
    /// messages waits, each payload of its own by its length.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// When the oldest waiting message entered delivery, unix ms.
    pub fn oldest_accepted_ms(&self) -> Option<u64> {
        let oldest = self.order.front()?;
        self.pending.get(oldest).map(|p| p.accepted_ms)
    }

    /// The counters.
    pub fn counts(&self) -> DeliveryCounts {
        self.counts
    }

    /// Whether `messages` more messages of `bytes` payload bytes fit the bounds (with
    /// `extra_bytes` already promised to other holders of the same budget).
    pub fn has_room(&self, messages: usize, bytes: u64, extra_bytes: u64) -> bool {
        self.pending.len() + messages <= self.cfg.pending_max as usize
            && self.payload_bytes + extra_bytes + bytes <= self.cfg.pending_bytes_max
    }

    /// The payloads of `messages` messages about to be admitted are slices of one shared
    /// buffer of `bytes` bytes: it is counted once, whole, until the last of them lets go
    /// of it (finished, or given a copy of its own). Pass the block to each
    /// [`Delivery::admit`].
    pub fn hold_block(&mut self, bytes: u64, messages: usize) -> PayloadBlock {
        assert!(messages > 0, "a shared buffer of no message");
        self.payload_bytes += bytes;
        self.blocks.hold(bytes, messages)
    }

    /// A message became durable: it waits for delivery, due now. `sent` when a status
    /// `sent` was already recorded for it (a restart found it). With a `block`, the
    /// payload is a slice of that shared buffer ([`Delivery::hold_block`]); without, it
    /// is counted by its length.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        now_ms: u64,
        message: LogPosition,
        business_id: u32,
        client_id: u64,
        recipient: Recipient,
        expires_ms: u64,
        payload: Bytes,
        block: Option<PayloadBlock>,
        sent: bool,
    ) {
        assert!(
            !self.pending.contains_key(&message),
            "a message is admitted once"
        );
        if block.is_none() {
            self.payload_bytes += payload.len() as u64;
        }
        // Messages enter in log order (as they become durable, or as the log is read
        // back at start-up): appended at the back. One out of order is placed by search.
        match self.order.back() {
            Some(&last) if last > message => {
                let at = self.order.partition_point(|&m| m < message);
                self.order.insert(at, message);
            }
            _ => self.order.push_back(message),
        }
        let admitted = self.pending.insert(
            message,
            Pending {
                accepted_ms: now_ms,
                business_id,
                client_id,
                recipient,
                expires_ms,
                payload,
                block,
                attempts: u32::from(sent),
                keys_wait_until: None,
                sent,
                listed: false,
                state: State::Waiting { due_ms: now_ms },
            },
        );
        assert!(admitted.is_ok(), "checked above");
        self.owed.add(business_id, if sent { 1 } else { 2 });
        let (pending, live_max) = (&self.pending, self.pending.len());
        self.due
            .push(now_ms, message, live_max, |t, m| live_due(pending, t, m));
        self.expiries.push(expires_ms, message, live_max, |t, m| {
            live_pending(pending, t, m)
        });
    }

    /// Recipients whose device keys due messages lacked since the last call (repeats
    /// possible; the caller asks the edge at most once per retry interval).
    pub fn take_keys_wanted(&mut self) -> Vec<Recipient> {
        std::mem::take(&mut self.keys_wanted)
    }

    /// Whether an edge is taking messages, so that outcomes can free room by `by_ms`:
    /// one is attached, and messages are out with it or due for it by then.
    pub fn is_draining(&self, by_ms: u64) -> bool {
        !self.edges.is_empty()
            && (self.out > 0 || self.due.first().is_some_and(|(due_ms, _)| due_ms <= by_ms))
    }

    /// An edge connection to send a request of shard `home` through, if any: one on
    /// `home` itself when there is one (its DELIVER then needs no other shard), else any;
    /// round robin among them.
    pub fn pick_edge(&mut self, home: u16) -> Option<ConnKey> {
        let on_home = |c: &&ConnKey| u16::from(c.shard()) == home;
        let local = self.edges.iter().filter(on_home).count();
        let candidates = if local > 0 { local } else { self.edges.len() };
        if candidates == 0 {
            return None;
        }
        let nth = self.next_edge % candidates;
        self.next_edge = self.next_edge.wrapping_add(1);
        let conn = if local > 0 {
            self.edges.iter().filter(on_home).nth(nth)
        } else {
            self.edges.iter().nth(nth)
        };
        conn.copied()
    }

    /// A message offered for a hand-off cannot be handed, for good (its seal for the
    /// devices failed): it fails with `reason`.
    pub fn fail(&mut self, message: LogPosition, reason: FailReason) {
        self.finish(message, StatusKind::Failed, Some(reason), false);
    }

    /// An edge connection can take deliveries.
    pub fn edge_attached(&mut self, conn: ConnKey) {
        self.edges.insert(conn);
    }

    /// An edge connection is gone: messages offered to it are due again.
    pub fn edge_detached(&mut self, now_ms: u64, conn: ConnKey) {
        self.edges.remove(&conn);
        // Rare (an edge connection closing): a pass over the pending messages.
        let mut offered: Vec<(u64, LogPosition)> = self
            .pending
            .iter()
            .filter_map(|(m, p)| match p.state {
                State::Offered { conn: c, since_ms } if c == conn => Some((since_ms, m)),
                _ => None,
            })
            .collect();
        // In the order they were offered, as before.
        offered.sort_unstable();
        let offered = offered.into_iter().map(|(_, m)| m);
        for m in offered {
            self.wait(m, now_ms, now_ms);
        }
    }

    /// The next message to hand to the edge at `now_ms`, and the edge connection to hand
    /// it through, while fewer than `in_flight_max` are out. `keys` says whether a due
    /// message's recipient can be sealed for: one that cannot waits (its recipient is
    /// queued for [`Delivery::take_keys_wanted`]) or, past its wait, fails with
    /// `no_device_key`.
    pub fn poll_dispatch(
        &mut self,
        now_ms: u64,
        mut keys: impl FnMut(&Recipient) -> KeyCheck,
    ) -> Option<(ConnKey, Deliver)> {
        let (due_ms, message) = loop {
            if self.edges.is_empty() || self.out >= self.cfg.in_flight_max as usize {
                return None;
            }
            let (due_ms, message) = self.due.first()?;
            if due_ms > now_ms {
                return None;
            }
            let p = self
                .pending
                .get_mut(&message)
                .expect("due messages are pending");
            match keys(&p.recipient) {
                KeyCheck::Ready => break (due_ms, message),
                KeyCheck::Missing {
                    wait_ms,
                    recheck_ms,
                } => {
                    let until = *p.keys_wait_until.get_or_insert(now_ms + wait_ms);
                    if now_ms >= until {
                        self.finish(
                            message,
                            StatusKind::Failed,
                            Some(FailReason::NoDeviceKey),
                            false,
                        );
                    } else {
                        self.keys_wanted.push(p.recipient);
                        self.wait(message, (now_ms + recheck_ms.max(1)).min(until), now_ms);
                    }
                }
            }
        };
        let conn = self
            .pick_edge(message.shard())
            .expect("an edge is attached");
        let p = self
            .pending
            .get_mut(&message)
            .expect("due messages are pending");
        p.state = State::Offered {
            conn,
            since_ms: now_ms,
        };
        let d = Deliver {
            message,
            business_id: p.business_id,
            client_id: p.client_id,
            expires_ms: p.expires_ms,
            recipient: p.recipient,
            payload: p.payload.clone(),
            e2e: false,
        };
        let (pending, live_max) = (&self.pending, self.pending.len());
        self.due
            .remove(due_ms, message, |t, m| live_due(pending, t, m));
        self.offered.push(now_ms, message, live_max, |t, m| {
            live_offered(pending, t, m)
        });
        self.out += 1;
        Some((conn, d))
    }

    /// The edge connection took the message: its outcome is due by the timeout. The first
    /// hand-off of a message records `sent`.
    ///
    /// Hand-offs, retransmissions and the attempts that set the backoff are counted here,
    /// not when the message is offered: an offer that bounces (the edge out of credit)
    /// reached no edge, and once counted them by the hundred per message.
    pub fn handed(&mut self, now_ms: u64, message: LogPosition) {
        let Some(p) = self.pending.get_mut(&message) else {
            return;
        };
        let State::Offered { since_ms, .. } = p.state else {
            return;
        };
        self.counts.handoffs += 1;
        if p.attempts > 0 {
            self.counts.retransmissions += 1;
        }
        p.attempts += 1;
        let deadline_ms = now_ms + u64::from(self.cfg.outcome_timeout_ms);
        p.state = State::Handed { deadline_ms };
        if !p.sent {
            p.sent = true;
            let change = change(message, p, StatusKind::Sent, None);
            // Owed by the message until now, and by the queue from here.
            self.changes.push_back(change);
        }
        let (pending, live_max) = (&self.pending, self.pending.len());
        self.offered
            .remove(since_ms, message, |t, m| live_offered(pending, t, m));
        self.deadlines.push(deadline_ms, message, live_max, |t, m| {
            live_handed(pending, t, m)
        });
    }

    /// The edge connection could not take the message (gone, out of credit): it is
    /// offered again shortly; a gone connection is forgotten.
    pub fn bounced(&mut self, now_ms: u64, message: LogPosition, conn_gone: Option<ConnKey>) {
        self.counts.bounced += 1;
        if let Some(conn) = conn_gone {
            self.edges.remove(&conn);
        }
        if self
            .pending
            .get(&message)
            .is_some_and(|p| matches!(p.state, State::Offered { .. }))
        {
            // Shortly due again, still on its first pass: it keeps its slice.
            self.reschedule(message, now_ms + BOUNCE_RETRY_MS, now_ms);
        }
    }

    /// The edge reported an outcome.
    pub fn outcome(&mut self, now_ms: u64, message: LogPosition, outcome: Outcome) {
        if !self.pending.contains_key(&message) {
            // A read after the delivery, for a message remembered.
            let remembered = match outcome {
                Outcome::Read => self.delivered_index.remove(&message),
                _ => None,
            };
            if let Some((business_id, client_id)) = remembered {
                self.counts.read += 1;
                self.reached(StatusChange {
                    message,
                    business_id,
                    client_id,
                    kind: StatusKind::Read,
                    reason: None,
                });
            } else {
                self.counts.outcomes_stale += 1;
            }
            return;
        }
        match outcome {
            Outcome::Delivered => self.finish(message, StatusKind::Delivered, None, true),
            Outcome::Read => {
                self.finish(message, StatusKind::Delivered, None, false);
                self.counts.read += 1;
                let last = *self.changes.back().expect("delivered just queued");
                self.reached(StatusChange {
                    kind: StatusKind::Read,
                    ..last
                });
            }
            Outcome::Failed(r) => self.finish(message, StatusKind::Failed, Some(r), false),
            Outcome::RetryLater => {
                let p = &self.pending[&message];
                let shift = p.attempts.saturating_sub(1).min(20);
                let backoff = (u64::from(self.cfg.retry_backoff_min_ms) << shift)
                    .min(u64::from(self.cfg.retry_backoff_max_ms));
                self.wait(message, now_ms + backoff, now_ms);
            }
        }
    }

    /// Recipients came online: their waiting messages are due now.
    pub fn online(&mut self, now_ms: u64, recipient: &Recipient) {
        let Some(ms) = self.by_recipient.get(recipient) else {
            return;
        };
        let mut waiting: Vec<LogPosition> = ms
            .messages
            .iter()
            .copied()
            .filter(|m| self.pending.contains_key(m))
            .filter(
                |m| matches!(self.pending[m].state, State::Waiting { due_ms } if due_ms > now_ms),
            )
            .collect();
        // In log order (the list is in the order they first waited).
        waiting.sort_unstable();
        for m in waiting {
            self.wait(m, now_ms, now_ms);
        }
    }

    /// Time-driven work at `now_ms`: messages past their expiry become `expired`;
    /// hand-offs without an outcome by their deadline, or offers unanswered as long, are
    /// due again.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some((at, m)) = self.expiries.first() {
            if at > now_ms {
                break;
            }
            self.finish(m, StatusKind::Expired, None, false);
        }
        while let Some((at, m)) = self.deadlines.first() {
            if at > now_ms {
                break;
            }
            self.wait(m, now_ms, now_ms);
        }
        let timeout = u64::from(self.cfg.outcome_timeout_ms);
        while let Some((since, m)) = self.offered.first() {
            if since + timeout > now_ms {
                break;
            }
            self.wait(m, now_ms, now_ms);
        }
    }

    /// Messages of log indexes below `index_end` of this shard are about to be dropped by
    /// retention: every one still waiting becomes `expired` first.
    pub fn expire_below(&mut self, shard: ShardId, index_end: u64) {
        let end = LogPosition::new(shard, index_end);
        let doomed: Vec<LogPosition> = self
            .order
            .iter()
            .take_while(|&&m| m < end)
            .filter(|m| self.pending.contains_key(m))
            .copied()
            .collect();
        for m in doomed {
            self.finish(m, StatusKind::Expired, None, false);
        }
    }

    /// When [`Delivery::tick`] or [`Delivery::poll_dispatch`] next has work.
    pub fn next_due_ms(&self) -> Option<u64> {
        let can_dispatch = !self.edges.is_empty() && self.out < self.cfg.in_flight_max as usize;
        let dispatch = self.due.first().map(|d| d.0).filter(|_| can_dispatch);
        let timeout = u64::from(self.cfg.outcome_timeout_ms);
        [
            dispatch,
            self.deadlines.first().map(|d| d.0),
            self.offered.first().map(|d| d.0 + timeout),
            self.expiries.first().map(|d| d.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next status reached, in the order they happened.
    pub fn poll_status(&mut self) -> Option<StatusChange> {
        let c = self.changes.pop_front()?;
        self.owed.sub(c.business_id, 1);
        Some(c)
    }

    /// The message waits again, until `due_ms`, with a payload of its own (see "Payload
    /// buffers" in the module docs).
    fn wait(&mut self, message: LogPosition, due_ms: u64, now_ms: u64) {
        self.own_payload(message);
        self.reschedule(message, due_ms, now_ms);
    }

    /// A pending message's payload stops being a slice of a shared buffer: copied into
    /// one of its own, counted by its length, and the buffer let go of.
    fn own_payload(&mut self, message: LogPosition) {
        let p = self.pending.get_mut(&message).expect("a pending message");
        let Some(block) = p.block.take() else {
            return;
        };
        p.payload = Bytes::copy_from_slice(&p.payload);
        self.payload_bytes += p.payload.len() as u64;
        self.payload_bytes -= self.blocks.release(block);
    }

    /// Makes a message due at `due_ms` (waiting), whatever its state; one due later than
    /// `now_ms` is listed for its recipient's ONLINE (once).
    fn reschedule(&mut self, message: LogPosition, due_ms: u64, now_ms: u64) {
        let p = self.pending.get_mut(&message).expect("a pending message");
        let old = std::mem::replace(&mut p.state, State::Waiting { due_ms });
        if due_ms > now_ms && !p.listed {
            p.listed = true;
            let list = self.by_recipient.entry(p.recipient).or_default();
            list.messages.push(message);
            list.live += 1;
        }
        let (pending, live_max) = (&self.pending, self.pending.len());
        match old {
            State::Waiting { due_ms: old } => {
                self.due
                    .remove(old, message, |t, m| live_due(pending, t, m));
            }
            State::Offered { since_ms, .. } => {
                self.offered
                    .remove(since_ms, message, |t, m| live_offered(pending, t, m));
                self.out -= 1;
            }
            State::Handed { deadline_ms } => {
                self.deadlines
                    .remove(deadline_ms, message, |t, m| live_handed(pending, t, m));
                self.out -= 1;
            }
        }
        self.due
            .push(due_ms, message, live_max, |t, m| live_due(pending, t, m));
    }

    /// A message reached a final status: it waits no more; its status is queued.
    fn finish(
        &mut self,
        message: LogPosition,
        kind: StatusKind,
        reason: Option<FailReason>,
        remember: bool,
    ) {
        let Some(p) = self.remove(message) else {
            return;
        };
        match kind {
            StatusKind::Delivered => self.counts.delivered += 1,
            StatusKind::Failed => self.counts.failed += 1,
            StatusKind::Expired => self.counts.expired += 1,
            StatusKind::Sent | StatusKind::Read => {}
        }
        self.reached(change(message, &p, kind, reason));
        if remember && self.cfg.delivered_kept_max > 0 {
            let kept_max = self.cfg.delivered_kept_max as usize;
            // The oldest remembered goes (read ones before it are dropped on the way).
            while self.delivered_index.len() >= kept_max {
                let old = self
                    .delivered
                    .pop_front()
                    .expect("remembered ones are listed");
                self.delivered_index.remove(&old);
            }
            self.delivered.push_back(message);
            let fresh = self
                .delivered_index
                .insert(message, (p.business_id, p.client_id))
                .is_ok();
            debug_assert!(fresh, "a message finishes once");
            // Read ones in the middle: swept once they outnumber the remembered ones.
            if self.delivered.len() > 2 * kept_max + 1024 {
                let index = &self.delivered_index;
                self.delivered.retain(|m| index.contains_key(m));
            }
        }
    }

    fn remove(&mut self, message: LogPosition) -> Option<Pending> {
        let p = self.pending.remove(&message)?;
        let pending = &self.pending;
        match p.state {
            State::Waiting { due_ms } => {
                self.due
                    .remove(due_ms, message, |t, m| live_due(pending, t, m));
            }
            State::Offered { since_ms, .. } => {
                self.offered
                    .remove(since_ms, message, |t, m| live_offered(pending, t, m));
                self.out -= 1;
            }
            State::Handed { deadline_ms } => {
                self.deadlines
                    .remove(deadline_ms, message, |t, m| live_handed(pending, t, m));
                self.out -= 1;
            }
        }
        self.expiries
            .remove(p.expires_ms, message, |t, m| live_pending(pending, t, m));
        if let Some(list) = p
            .listed
            .then(|| self.by_recipient.get_mut(&p.recipient))
            .flatten()
        {
            list.live -= 1;
            if list.live == 0 {
                self.by_recipient.remove(&p.recipient);
            } else if list.messages.last() == Some(&message) {
                list.messages.pop();
            } else if list.messages.len() > 2 * list.live + 8 {
                list.messages.retain(|m| pending.contains_key(m));
            }
        }
        self.payload_bytes -= match p.block {
            Some(block) => self.blocks.release(block),
            None => p.payload.len() as u64,
        };
        debug_assert!(
            !self.pending.is_empty() || self.payload_bytes == 0,
            "no message waits, yet {} payload bytes are counted",
            self.payload_bytes
        );
        // What it still owed becomes the status it reached (queued by the caller).
        self.owed.sub(p.business_id, if p.sent { 1 } else { 2 });
        self.trim_order();
        Some(p)
    }

    /// Drops finished messages from the order: from its front at once (so its first is
    /// the oldest pending message), from the rest when they outnumber the pending ones
    /// (amortized, so the order holds at most about twice the pending messages).
    fn trim_order(&mut self) {
        while let Some(m) = self.order.front() {
            if self.pending.contains_key(m) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.order.retain(|m| pending.contains_key(m));
        }
    }
}

/// A recipient's pending messages (see `Delivery::by_recipient`).
#[derive(Debug, Default)]
struct RecipientList {
    /// In the order admitted; finished ones among them until swept.
    messages: Vec<LogPosition>,
    /// Those of them still pending.
    live: usize,
}

/// Whether `(t, m)` is a live timer of the due queue: `m` waits, due at `t`.
fn live_due(pending: &ByPosition<Pending>, t: u64, m: LogPosition) -> bool {
    pending
        .get(&m)
        .is_some_and(|p| p.state == State::Waiting { due_ms: t })
}

/// Whether `(t, m)` is a live timer of the offered queue: `m` was offered at `t`.
fn live_offered(pending: &ByPosition<Pending>, t: u64, m: LogPosition) -> bool {
    pending
        .get(&m)
        .is_some_and(|p| matches!(p.state, State::Offered { since_ms, .. } if since_ms == t))
}

/// Whether `(t, m)` is a live timer of the deadlines: `m` is handed, its outcome due at `t`.
fn live_handed(pending: &ByPosition<Pending>, t: u64, m: LogPosition) -> bool {
    pending
        .get(&m)
        .is_some_and(|p| p.state == State::Handed { deadline_ms: t })
}

/// Whether `(t, m)` is a live timer of the expiries: `m` is pending (a message's expiry
/// never changes).
fn live_pending(pending: &ByPosition<Pending>, t: u64, m: LogPosition) -> bool {
    pending.get(&m).is_some_and(|p| p.expires_ms == t)
}

fn change(
    message: LogPosition,
    p: &Pending,
    kind: StatusKind,
    reason: Option<FailReason>,
) -> StatusChange {
    StatusChange {
        message,
        business_id: p.business_id,
        client_id: p.client_id,
        kind,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(_: &Recipient) -> KeyCheck {
        KeyCheck::Ready
    }

    pub(crate) fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            enabled: true,
            ttl_default_secs: 3600,
            ttl_max_secs: 86_400,
            pending_max: 100,
            pending_bytes_max: 1 << 20,
            in_flight_max: 2,
            outcome_timeout_ms: 1000,
            retry_backoff_min_ms: 100,
            retry_backoff_max_ms: 1000,
            delivered_kept_max: 4,
            events_per_business_max: 64,
            events_per_push_max: 8,
            event_ack_timeout_ms: 1000,
            e2e: Default::default(),
        }
    }

    fn to() -> Recipient {
        Recipient::parse(b"+15550001111").unwrap()
    }

    fn conn() -> ConnKey {
        ConnKey::for_tests(0, 1)
    }

    fn admit(d: &mut Delivery, i: u64, now: u64) -> LogPosition {
        let m = LogPosition::new(ShardId::new(0), i);
        d.admit(
            now,
            m,
            7,
            i,
            to(),
            now + 10_000,
            Bytes::from_static(b"x"),
            None,
            false,
        );
        m
    }

    fn kinds(d: &mut Delivery) -> Vec<StatusKind> {
        std::iter::from_fn(|| d.poll_status())
            .map(|c| c.kind)
            .collect()
    }

    #[test]
    fn a_message_is_sent_once_then_delivered_then_read() {
        let mut d = Delivery::new(cfg());
        let m = admit(&mut d, 1, 0);
        assert!(d.poll_dispatch(0, ready).is_none(), "no edge yet");
        d.edge_attached(conn());
        let (c, deliver) = d.poll_dispatch(0, ready).unwrap();
        assert_eq!((c, deliver.message), (conn(), m));
        d.handed(0, m);
        d.outcome(5, m, Outcome::Delivered);
        d.outcome(6, m, Outcome::Read);
        d.outcome(7, m, Outcome::Read);
        assert_eq!(
            kinds(&mut d),
            [StatusKind::Sent, StatusKind::Delivered, StatusKind::Read]
        );
        assert_eq!(d.pending(), 0);
        assert_eq!(d.counts().outcomes_stale, 1);
    }

    #[test]
    fn no_outcome_means_a_retransmission_and_sent_is_recorded_once() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        let m = admit(&mut d, 1, 0);
        d.poll_dispatch(0, ready).unwrap();
        d.handed(0, m);
        d.tick(999);
        assert!(d.poll_dispatch(999, ready).is_none());
        d.tick(1000);
        let (_, again) = d.poll_dispatch(1000, ready).unwrap();
        assert_eq!(again.message, m);
        d.handed(1000, m);
        assert_eq!(kinds(&mut d), [StatusKind::Sent]);
        assert_eq!(d.counts().retransmissions, 1);
    }

    #[test]
    fn retry_later_backs_off_and_online_makes_it_due_at_once() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        let m = admit(&mut d, 1, 0);
        d.poll_dispatch(0, ready).unwrap();
        d.handed(0, m);
        d.outcome(10, m, Outcome::RetryLater);
        assert!(d.poll_dispatch(50, ready).is_none());
        assert_eq!(d.next_due_ms(), Some(110));
        d.online(60, &to());
        assert!(d.poll_dispatch(60, ready).is_some(), "online: due now");
    }

    #[test]
    fn in_flight_is_bounded_and_expiry_is_final() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        for i in 0..3 {
            admit(&mut d, i, 0);
        }
        assert!(d.poll_dispatch(0, ready).is_some());
        assert!(d.poll_dispatch(0, ready).is_some());
        assert!(d.poll_dispatch(0, ready).is_none(), "in_flight_max 2");
        d.tick(10_000);
        assert_eq!(kinds(&mut d), [StatusKind::Expired; 3]);
        assert_eq!(d.pending(), 0);
        assert_eq!(d.payload_bytes(), 0);
    }

    /// A message goes through an edge connection on its own shard when there is one, so
    /// that its DELIVER crosses no other shard; else through any, in turn.
    #[test]
    fn an_edge_on_the_messages_shard_is_preferred() {
        let mut d = Delivery::new(cfg());
        let (a0, b0, c1) = (
            ConnKey::for_tests(0, 1),
            ConnKey::for_tests(0, 2),
            ConnKey::for_tests(1, 3),
        );
        for c in [a0, b0, c1] {
            d.edge_attached(c);
        }
        let picks: Vec<ConnKey> = (0..4).filter_map(|_| d.pick_edge(1)).collect();
        assert_eq!(picks, [c1; 4]);
        let mut picks: Vec<ConnKey> = (0..4).filter_map(|_| d.pick_edge(0)).collect();
        picks.sort();
        assert_eq!(picks, [a0, a0, b0, b0]);
        let mut picks: Vec<ConnKey> = (0..3).filter_map(|_| d.pick_edge(2)).collect();
        picks.sort();
        assert_eq!(picks, [a0, b0, c1], "no edge on shard 2: each in turn");
        d.edge_detached(0, c1);
        assert!(matches!(d.pick_edge(1), Some(c) if c.shard().index() == 0));
        d.edge_detached(0, a0);
        d.edge_detached(0, b0);
        assert_eq!(d.pick_edge(0), None);
    }

    #[test]
    fn a_bounce_offers_again_and_forgets_a_gone_edge() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        let m = admit(&mut d, 1, 0);
        d.poll_dispatch(0, ready).unwrap();
        d.bounced(0, m, Some(conn()));
        assert!(d.edges.is_empty());
        d.edge_attached(conn());
        assert!(d.poll_dispatch(10, ready).is_none());
        assert!(d.poll_dispatch(BOUNCE_RETRY_MS, ready).is_some());
    }

    /// Bounced offers (the edge out of credit) once counted as hand-offs and
    /// retransmissions, and as attempts, so a message bounced a few times then answered
    /// `retry_later` waited out the longest backoff.
    #[test]
    fn bounced_offers_are_no_hand_offs_and_do_not_lengthen_the_backoff() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        let m = admit(&mut d, 1, 0);
        let mut now = 0;
        for _ in 0..5 {
            d.poll_dispatch(now, ready).unwrap();
            d.bounced(now, m, None);
            now += BOUNCE_RETRY_MS;
        }
        assert_eq!((d.counts().handoffs, d.counts().retransmissions), (0, 0));
        assert_eq!(d.counts().bounced, 5);
        d.poll_dispatch(now, ready).unwrap();
        d.handed(now, m);
        assert_eq!((d.counts().handoffs, d.counts().retransmissions), (1, 0));
        d.outcome(now, m, Outcome::RetryLater);
        let min = u64::from(cfg().retry_backoff_min_ms);
        assert_eq!(d.next_due_ms(), Some(now + min), "the first backoff");
    }

    #[test]
    fn a_shared_buffer_counts_whole_until_its_last_message_lets_go_of_it() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        // Three payloads of 100 bytes, slices of one buffer with 20 bytes to spare.
        let buffer = Bytes::from((0..300).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let slice = |i: u64| buffer.slice(i as usize * 100..(i as usize + 1) * 100);
        let block = d.hold_block(320, 3);
        let ms: Vec<LogPosition> = (0..3)
            .map(|i| {
                let m = LogPosition::new(ShardId::new(0), i + 1);
                d.admit(0, m, 7, i, to(), 10_000, slice(i), Some(block), false);
                m
            })
            .collect();
        assert_eq!(d.payload_bytes(), 320, "the buffer, counted once and whole");
        let next = |d: &mut Delivery, now: u64| d.poll_dispatch(now, ready).unwrap().1;
        // The first is delivered: the other two still hold the buffer.
        assert_eq!(next(&mut d, 0).message, ms[0]);
        d.handed(0, ms[0]);
        d.outcome(0, ms[0], Outcome::Delivered);
        assert_eq!(d.payload_bytes(), 320);
        // The second bounces: due again shortly, it keeps its slice.
        assert_eq!(next(&mut d, 0).message, ms[1]);
        d.bounced(0, ms[1], None);
        assert_eq!(d.payload_bytes(), 320);
        // The third is told to retry later: it waits with a copy of its own.
        assert_eq!(next(&mut d, 0).message, ms[2]);
        d.handed(0, ms[2]);
        d.outcome(0, ms[2], Outcome::RetryLater);
        assert_eq!(d.payload_bytes(), 320 + 100);
        // The second, delivered, was the last slice: the buffer is let go of.
        let again = next(&mut d, BOUNCE_RETRY_MS);
        assert_eq!((again.message, &again.payload[..]), (ms[1], &slice(1)[..]));
        d.handed(BOUNCE_RETRY_MS, ms[1]);
        d.outcome(BOUNCE_RETRY_MS, ms[1], Outcome::Delivered);
        assert_eq!(d.payload_bytes(), 100, "the copy alone");
        // The copy is the same payload, and goes with its message.
        let due = d.next_due_ms().unwrap();
        let last = next(&mut d, due);
        assert_eq!((last.message, &last.payload[..]), (ms[2], &slice(2)[..]));
        d.handed(due, ms[2]);
        d.outcome(due, ms[2], Outcome::Delivered);
        assert_eq!((d.payload_bytes(), d.pending()), (0, 0));
        // The slot is reused by the next buffer.
        let again = d.hold_block(64, 1);
        assert_eq!(again, block);
        d.admit(
            due,
            LogPosition::new(ShardId::new(0), 9),
            7,
            9,
            to(),
            10_000,
            slice(0),
            Some(again),
            false,
        );
        d.expire_below(ShardId::new(0), 10);
        assert_eq!(
            d.payload_bytes(),
            0,
            "an expired message lets go of its buffer too"
        );
    }

    #[test]
    fn retention_expires_what_it_is_about_to_drop() {
        let mut d = Delivery::new(cfg());
        admit(&mut d, 1, 0);
        admit(&mut d, 5, 0);
        d.expire_below(ShardId::new(0), 3);
        let c: Vec<StatusChange> = std::iter::from_fn(|| d.poll_status()).collect();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].client_id, c[0].kind), (1, StatusKind::Expired));
        assert_eq!(d.pending(), 1);
    }

    #[test]
    fn the_order_of_pending_messages_survives_finishes_and_late_arrivals() {
        let mut d = Delivery::new(cfg());
        // Admitted at times 10, 20, ..., one out of log order (index 4 after index 6).
        for (i, now) in [(2, 10), (3, 20), (6, 30), (4, 40), (8, 50)] {
            admit(&mut d, i, now);
        }
        assert_eq!(d.oldest_accepted_ms(), Some(10));
        // Indexes 2 and 3 expire; first in log order is then index 4 (admitted at 40,
        // after index 6 at 30: "oldest" follows the log).
        d.expire_below(ShardId::new(0), 4);
        assert_eq!(kinds(&mut d), [StatusKind::Expired, StatusKind::Expired]);
        assert_eq!(d.oldest_accepted_ms(), Some(40));
        // Below 7: indexes 4 and 6, not 8.
        d.expire_below(ShardId::new(0), 7);
        let ids: Vec<u64> = std::iter::from_fn(|| d.poll_status())
            .map(|c| c.client_id)
            .collect();
        assert_eq!(ids, [4, 6]);
        assert_eq!(d.pending(), 1);
        assert_eq!(d.oldest_accepted_ms(), Some(50));
        d.expire_below(ShardId::new(0), 100);
        assert_eq!(kinds(&mut d), [StatusKind::Expired]);
        assert_eq!(d.oldest_accepted_ms(), None);
    }

    #[test]
    fn finished_messages_behind_an_old_one_do_not_pile_up_in_the_order() {
        let mut cfg = cfg();
        cfg.pending_max = 10_000;
        let mut d = Delivery::new(cfg);
        let ms: Vec<LogPosition> = (0..5000).map(|i| admit(&mut d, i, 0)).collect();
        // The first stays pending; every later one fails.
        for &m in &ms[1..] {
            d.fail(m, FailReason::NotOnPlatform);
        }
        assert_eq!(d.pending(), 1);
        assert!(
            d.order.len() <= 2 * d.pending() + 1024 + 1,
            "{}",
            d.order.len()
        );
        assert_eq!(d.oldest_accepted_ms(), Some(0));
    }

    #[test]
    fn the_statuses_owed_to_a_business_follow_each_message() {
        let mut cfg = cfg();
        cfg.pending_max = 10_000;
        let mut d = Delivery::new(cfg);
        d.edge_attached(conn());
        let a = admit(&mut d, 0, 0);
        let b = admit(&mut d, 1, 0);
        assert_eq!(d.owed_to(7), 4, "sent and a final one each");
        assert_eq!(d.owed_to(8), 0);
        d.poll_dispatch(0, ready).unwrap();
        d.handed(0, a);
        assert_eq!(d.owed_to(7), 4, "a's `sent` reached, not taken");
        assert_eq!(kinds(&mut d), [StatusKind::Sent]);
        assert_eq!(d.owed_to(7), 3);
        d.outcome(1, a, Outcome::Delivered);
        assert_eq!(d.owed_to(7), 3, "a's final one reached, not taken");
        assert_eq!(kinds(&mut d), [StatusKind::Delivered]);
        assert_eq!(d.owed_to(7), 2, "b's two");
        // A read of a remembered delivery is not reserved for: owed once reached.
        d.outcome(2, a, Outcome::Read);
        assert_eq!(d.owed_to(7), 3);
        assert_eq!(kinds(&mut d), [StatusKind::Read]);
        // b fails before any hand-off: one status, the rest of its reservation released.
        d.fail(b, FailReason::NotOnPlatform);
        assert_eq!(kinds(&mut d), [StatusKind::Failed]);
        assert_eq!(d.owed_to(7), 0);
        assert!(d.owed.is_empty(), "no entry for a business owed nothing");
    }

    #[test]
    fn a_recipients_list_sheds_finished_messages_and_goes_with_its_last() {
        let mut cfg = cfg();
        cfg.pending_max = 10_000;
        let mut d = Delivery::new(cfg);
        d.edge_attached(conn());
        // The first waits on a backoff; thousands after it fail, oldest first (a lazy
        // removal each: none is the list's last).
        let first = admit(&mut d, 0, 0);
        d.poll_dispatch(0, ready).unwrap();
        d.handed(0, first);
        d.outcome(0, first, Outcome::RetryLater);
        // The later ones wait on a backoff too (so they are listed), then fail.
        let later: Vec<LogPosition> = (1..5000)
            .map(|i| {
                let m = admit(&mut d, i, 0);
                d.poll_dispatch(0, ready).unwrap();
                d.handed(0, m);
                d.outcome(0, m, Outcome::RetryLater);
                m
            })
            .collect();
        assert_eq!(d.by_recipient[&to()].live, 5000);
        for &m in &later {
            d.fail(m, FailReason::NotOnPlatform);
            let list = &d.by_recipient[&to()];
            assert!(
                list.messages.len() <= 2 * list.live + 8 + 1,
                "{} listed for {} pending",
                list.messages.len(),
                list.live
            );
        }
        assert_eq!(d.by_recipient[&to()].live, 1);
        // ONLINE finds the one still pending.
        d.online(10, &to());
        let (_, got) = d.poll_dispatch(10, ready).unwrap();
        assert_eq!(got.message, first);
        d.handed(10, first);
        d.outcome(11, first, Outcome::Delivered);
        assert!(
            d.by_recipient.is_empty(),
            "no list without a pending message"
        );
    }

    #[test]
    fn reads_are_reported_once_for_remembered_messages_within_the_bound() {
        let mut cfg = cfg();
        cfg.pending_max = 10_000;
        // delivered_kept_max 4.
        let kept = cfg.delivered_kept_max as usize;
        let mut d = Delivery::new(cfg);
        d.edge_attached(conn());
        for i in 0..3000 {
            let m = admit(&mut d, i, 0);
            let (_, got) = d.poll_dispatch(0, ready).unwrap();
            assert_eq!(got.message, m);
            d.handed(0, m);
            d.outcome(1, m, Outcome::Delivered);
            // The first is never read; the next 1999 are read at once (they pile up
            // behind it until swept), then every even one.
            if i > 0 && (i < 2000 || i % 2 == 0) {
                d.outcome(2, m, Outcome::Read);
            }
            assert!(d.delivered_index.len() <= kept);
            assert!(
                d.delivered.len() <= 2 * kept + 1024 + 1,
                "{}",
                d.delivered.len()
            );
        }
        let reads = |d: &mut Delivery| -> Vec<u64> {
            std::iter::from_fn(|| d.poll_status())
                .filter(|c| c.kind == StatusKind::Read)
                .map(|c| c.client_id)
                .collect()
        };
        assert_eq!(reads(&mut d).len(), 1999 + 500);
        let stale = d.counts().outcomes_stale;
        let at = |i| LogPosition::new(ShardId::new(0), i);
        // Remembered: the last four unread (2993, 2995, 2997, 2999). A read already
        // reported and one of a message forgotten are stale.
        for i in [2999, 2993, 2998, 2991, 2999] {
            d.outcome(3, at(i), Outcome::Read);
        }
        assert_eq!(reads(&mut d), [2999, 2993]);
        assert_eq!(d.counts().outcomes_stale, stale + 3);
    }

    #[test]
    fn ttl_is_clamped() {
        let c = cfg();
        assert_eq!(c.expiry(1000, 0), 1000 + 3_600_000);
        assert_eq!(c.expiry(1000, 10), 11_000);
        assert_eq!(c.expiry(0, u32::MAX), 86_400_000);
    }

    #[test]
    fn a_message_waits_for_device_keys_then_fails_no_device_key() {
        let mut d = Delivery::new(cfg());
        d.edge_attached(conn());
        let m = admit(&mut d, 1, 0);
        let missing = |_: &Recipient| KeyCheck::Missing {
            wait_ms: 500,
            recheck_ms: 100,
        };
        assert!(d.poll_dispatch(0, missing).is_none());
        assert_eq!(d.take_keys_wanted(), vec![to()]);
        assert!(d.take_keys_wanted().is_empty());
        // Looked at again after the recheck interval, asked for again.
        assert!(d.poll_dispatch(99, missing).is_none());
        assert!(d.take_keys_wanted().is_empty());
        assert!(d.poll_dispatch(100, missing).is_none());
        assert_eq!(d.take_keys_wanted(), vec![to()]);
        // Keys arrive: due at once (as at ONLINE), handed.
        d.online(150, &to());
        let (_, got) = d.poll_dispatch(150, ready).unwrap();
        assert_eq!(got.message, m);
        // Another message never gets keys: failed(no_device_key) at the end of its wait,
        // counted from its first wait, with no `sent` before it.
        let m2 = admit(&mut d, 2, 200);
        for t in (200..700).step_by(100) {
            assert!(d.poll_dispatch(t, missing).is_none());
        }
        assert_eq!(d.pending(), 2);
        assert!(d.poll_dispatch(700, missing).is_none());
        assert_eq!(d.pending(), 1);
        let changes: Vec<StatusChange> = std::iter::from_fn(|| d.poll_status()).collect();
        let last = changes.last().unwrap();
        assert_eq!(
            (last.message, last.kind, last.reason),
            (m2, StatusKind::Failed, Some(FailReason::NoDeviceKey))
        );
        assert!(!changes
            .iter()
            .any(|c| c.message == m2 && c.kind == StatusKind::Sent));
    }
}
