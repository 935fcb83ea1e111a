//! What the shards of a node tell each other about delivery, and how a shard routes it.
//!
//! A message, a status and a user's reply are owned by the shard whose log holds them;
//! the connection that carries them (the edge's, a business's) may live on any shard,
//! since the kernel spreads connections over shards. So the owner offers the work to the
//! connection's shard, which writes it and answers:
//!
//! ```text
//!  owner S                                   connection's shard E
//!   Deliver { conn, DELIVERs } ───────────>   written: Handed (those written, in one)
//!                                             gone, no credit: Bounced (each)
//!   Push { conn, events }      ───────────>   written: (nothing) / gone: PushBounced
//!   <─────────── Outcomes (the edge's OUTCOMEs for S's messages)
//!   <─────────── EventAcks (a business's EVENT_ACKs for S's events)
//!  every shard ── Attach / Detach (its delivery connections; Attach again every tick)
//!  edge's shard ── Online (recipients online) ──> every shard
//!  with end-to-end sealing:
//!  owner S ── KeysWanted { conn, recipients } ──> the edge connection's shard (KEYS_WANTED)
//!  edge's shard ── DeviceKeys (verified there) ──> every shard
//! ```
//!
//! DELIVERs go in one message per edge connection and dispatch, and their `Handed`
//! answers in one per owner: a message (and a wake-up of the other shard) per delivered
//! message cost more than the delivery itself.
//!
//! The channels between shards are bounded and may drop a message (counted by the
//! shell); nothing is lost by it, because the owner repeats: a hand-off without an outcome
//! and a push without an acknowledgement go again after their timeouts, and attachments
//! are announced again every tick.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::devices::{SealFail, SESSIONS_PER_DISPATCH_MAX};
use super::{Event, KeyCheck, Now, Shard};
use crate::e2e::VerifiedBundle;
use crate::server::{ConnKey, DeliveryInput, NotWritten, Role};
use crate::wire::delivery::{BusinessEvent, Deliver, FailReason, OutcomeEntry};
use crate::wire::{LogPosition, Recipient};
use crate::ShardId;

/// A message between shards.
#[derive(Debug, Clone)]
pub enum PeerMsg {
    /// A connection of the sender's can take deliveries or a business's events.
    Attach {
        /// The connection.
        conn: ConnKey,
        /// What for.
        role: Role,
    },
    /// That connection is gone.
    Detach {
        /// The connection.
        conn: ConnKey,
    },
    /// To the connection's shard: write these DELIVERs on it, in order (all of one
    /// owner's).
    Deliver {
        /// The edge connection.
        conn: ConnKey,
        /// The messages.
        items: Vec<Deliver>,
    },
    /// To the messages' shard: their DELIVERs were written.
    Handed {
        /// The messages.
        messages: Vec<LogPosition>,
    },
    /// To the message's shard: the DELIVER could not be written.
    Bounced {
        /// The message.
        message: LogPosition,
        /// The connection, when it is gone.
        gone: Option<ConnKey>,
    },
    /// To the messages' shard: the edge's outcomes.
    Outcomes(Vec<OutcomeEntry>),
    /// To every shard: these recipients are online.
    Online(Vec<Recipient>),
    /// To the connection's shard: write these events of a business on it.
    Push {
        /// The business connection.
        conn: ConnKey,
        /// The business.
        business_id: u32,
        /// The events, in order.
        events: Vec<BusinessEvent>,
    },
    /// To the events' shard: the push could not be written (the connection is gone).
    PushBounced {
        /// The business.
        business_id: u32,
        /// The connection.
        conn: ConnKey,
    },
    /// To an edge connection's shard: ask it for these recipients' device keys.
    KeysWanted {
        /// The edge connection.
        conn: ConnKey,
        /// The recipients.
        recipients: Vec<Recipient>,
    },
    /// To every shard: recipients' device bundles, verified where they came in, with
    /// the bytes they were published as.
    DeviceKeys(Vec<(Recipient, Arc<[VerifiedBundle]>, bytes::Bytes)>),
    /// To the events' shard: the business acknowledged these events.
    EventAcks {
        /// The business.
        business_id: u32,
        /// The events.
        events: Vec<LogPosition>,
    },
}

/// Where a [`PeerMsg`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerTarget {
    /// One shard.
    Shard(ShardId),
    /// Every other shard.
    All,
}

impl Shard {
    /// A message from another shard (taken without a copy when this shard holds the
    /// only reference).
    pub fn handle_peer(&mut self, now: Now, msg: Arc<PeerMsg>) {
        // A peer's DELIVERs or events leave together (see `Server::begin_writes`).
        self.server.begin_writes();
        self.on_peer(now, Arc::unwrap_or_clone(msg));
        self.server.end_writes(now.at);
        self.advance(now);
    }

    /// Sends `msg` to `to`, handling it here when it is for this shard.
    pub(super) fn send_peer(&mut self, now: Now, to: ShardId, msg: PeerMsg) {
        // Positions and connections from peers were checked where they came in (`by_shard`).
        assert!(to.within(self.shards), "{to:?} is a shard of this node");
        if to == self.shard {
            self.on_peer(now, msg);
        } else {
            self.events.push_back(Event::Peer {
                to: PeerTarget::Shard(to),
                msg: Arc::new(msg),
            });
        }
    }

    fn broadcast(&mut self, msg: PeerMsg) {
        if self.shards > 1 {
            self.events.push_back(Event::Peer {
                to: PeerTarget::All,
                msg: Arc::new(msg),
            });
        }
    }

    fn on_peer(&mut self, now: Now, msg: PeerMsg) {
        match msg {
            PeerMsg::Attach { conn, role } => self.attached(conn, role),
            PeerMsg::Detach { conn } => self.detached(now, conn),
            PeerMsg::Deliver { conn, items } => {
                let Some(owner) = items.first().map(|d| owner_of(d.message)) else {
                    return;
                };
                let mut handed = Vec::with_capacity(items.len());
                for item in items {
                    let message = item.message;
                    // Behind DELIVERs already waiting for this connection's credit, in
                    // turn: no shard's offers overtake another's.
                    let result = if self.credit_wait.holds(conn) {
                        Err(NotWritten::NoCredit)
                    } else {
                        self.server.deliver(now.at, conn, &item)
                    };
                    let bounce = match result {
                        Ok(()) => {
                            handed.push(message);
                            continue;
                        }
                        Err(NotWritten::NoCredit) => match self.credit_wait.push(now, conn, item) {
                            Ok(()) => continue,
                            Err(_) => PeerMsg::Bounced {
                                message,
                                gone: None,
                            },
                        },
                        Err(NotWritten::Gone) => PeerMsg::Bounced {
                            message,
                            gone: Some(conn),
                        },
                    };
                    self.send_peer(now, owner, bounce);
                }
                if !handed.is_empty() {
                    self.send_peer(now, owner, PeerMsg::Handed { messages: handed });
                }
            }
            PeerMsg::Handed { messages } => {
                if let Some(d) = self.delivery.as_mut() {
                    for m in messages {
                        d.handed(now.unix_ms, m);
                    }
                }
            }
            PeerMsg::Bounced { message, gone } => {
                if let Some(d) = self.delivery.as_mut() {
                    d.bounced(now.unix_ms, message, gone);
                }
            }
            PeerMsg::Outcomes(entries) => {
                if let Some(d) = self.delivery.as_mut() {
                    for e in entries {
                        d.outcome(now.unix_ms, e.message, e.outcome);
                    }
                }
            }
            PeerMsg::Online(recipients) => self.online(now, &recipients),
            PeerMsg::Push {
                conn,
                business_id,
                events,
            } => {
                if self.server.push_events(now.at, conn, &events).is_err() {
                    let owner = events.first().map_or(self.shard, |e| owner_of(e.event()));
                    self.send_peer(now, owner, PeerMsg::PushBounced { business_id, conn });
                }
            }
            PeerMsg::PushBounced { business_id, conn } => self.outbox.bounced(business_id, conn),
            PeerMsg::KeysWanted { conn, recipients } => {
                // Lost when the connection is gone: the owner asks again after its retry.
                let _ = self.server.keys_wanted(now.at, conn, &recipients);
            }
            PeerMsg::DeviceKeys(learned) => self.learn_keys(now, learned),
            PeerMsg::EventAcks {
                business_id,
                events,
            } => self.outbox.acked(business_id, &events, now.unix_ms),
        }
    }

    fn attached(&mut self, conn: ConnKey, role: Role) {
        match role {
            Role::Edge => {
                if let Some(d) = self.delivery.as_mut() {
                    d.edge_attached(conn);
                }
            }
            Role::Business(b) => self.outbox.subscriber_attached(b, conn),
        }
    }

    fn detached(&mut self, now: Now, conn: ConnKey) {
        if let Some(d) = self.delivery.as_mut() {
            d.edge_detached(now.unix_ms, conn);
        }
        self.outbox.subscriber_detached(conn);
    }

    fn online(&mut self, now: Now, recipients: &[Recipient]) {
        if let Some(d) = self.delivery.as_mut() {
            for r in recipients {
                d.online(now.unix_ms, r);
            }
        }
    }

    /// What this shard's delivery connections said.
    pub(super) fn on_delivery_input(&mut self, now: Now, input: DeliveryInput) {
        match input {
            DeliveryInput::Attached { conn, role } => {
                self.local_attachments.insert(conn, role);
                self.attached(conn, role);
                self.broadcast(PeerMsg::Attach { conn, role });
                if role == Role::Edge {
                    self.publish_reply_keys_to(now, conn);
                }
            }
            DeliveryInput::DeviceKeys(entries) => {
                // Verified a few lists per turn ([`Shard::verify_published`]): a signature
                // check per key must not hold the shard's acks.
                if let Some(d) = self.devices.as_mut() {
                    d.queue_published(entries);
                }
            }
            DeliveryInput::Detached { conn } => {
                self.local_attachments.remove(&conn);
                self.detached(now, conn);
                self.broadcast(PeerMsg::Detach { conn });
            }
            DeliveryInput::Outcomes(entries) => {
                for (shard, entries) in by_shard(entries, self.shards, |e| e.message) {
                    self.send_peer(now, shard, PeerMsg::Outcomes(entries));
                }
            }
            DeliveryInput::Online(recipients) => {
                self.online(now, &recipients);
                self.broadcast(PeerMsg::Online(recipients));
            }
            DeliveryInput::EventAcks {
                business_id,
                events,
            } => {
                for (shard, events) in by_shard(events, self.shards, |e| *e) {
                    self.send_peer(
                        now,
                        shard,
                        PeerMsg::EventAcks {
                            business_id,
                            events,
                        },
                    );
                }
            }
            DeliveryInput::Inbound(batch) => self.take_inbound(now, batch),
        }
    }

    /// Announces this shard's delivery connections again (a lost Attach is repaired
    /// within a tick).
    pub(super) fn announce_attachments(&mut self) {
        let attachments: Vec<(ConnKey, Role)> = self
            .local_attachments
            .iter()
            .map(|(&c, &r)| (c, r))
            .collect();
        for (conn, role) in attachments {
            self.broadcast(PeerMsg::Attach { conn, role });
        }
    }

    /// Verifies some of the bundle lists the edge published here, and hands the good ones
    /// to every shard. A list refused (bad structure or a bad signature) is refused whole:
    /// its recipient's messages keep waiting for good keys.
    pub(super) fn verify_published(&mut self, now: Now) {
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        let learned = devices.verify_some();
        if !learned.is_empty() {
            self.broadcast(PeerMsg::DeviceKeys(learned.clone()));
            self.learn_keys(now, learned);
        }
    }

    /// Recipients' verified bundles: known from now on, their waiting messages due now.
    fn learn_keys(
        &mut self,
        now: Now,
        learned: Vec<(Recipient, Arc<[VerifiedBundle]>, bytes::Bytes)>,
    ) {
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        for (r, bundles, raw) in learned {
            let any = !bundles.is_empty();
            devices.learn(now.unix_ms, r, bundles, raw);
            if any {
                if let Some(d) = self.delivery.as_mut() {
                    d.online(now.unix_ms, &r);
                }
            }
        }
    }

    /// Sends the businesses' reply keys in force to this shard's edge connections when
    /// they changed (a rotation, a business added), or to all when `force`.
    pub(super) fn publish_reply_keys(&mut self, now: Now, force: bool) {
        let Some(devices) = self.devices.as_ref() else {
            return;
        };
        let state = (devices.reply_key_id(now.unix_ms), self.sealer.keys().len());
        if !force && self.published_reply_keys == Some(state) {
            return;
        }
        self.published_reply_keys = Some(state);
        let edges: Vec<ConnKey> = self
            .local_attachments
            .iter()
            .filter(|(_, r)| **r == Role::Edge)
            .map(|(c, _)| *c)
            .collect();
        for conn in edges {
            self.publish_reply_keys_to(now, conn);
        }
    }

    fn publish_reply_keys_to(&mut self, now: Now, conn: ConnKey) {
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        let entries = devices.reply_keys(self.sealer.keys(), now.unix_ms);
        if !entries.is_empty() {
            // A gone connection needs no keys.
            let _ = self.server.business_keys(now.at, conn, &entries);
        }
    }

    /// Writes the DELIVERs waiting for their connection's credit, in arrival order, while
    /// it lasts; those that waited too long, or whose connection is gone, go back to their
    /// owners.
    fn drain_credit_wait(&mut self, now: Now) {
        // Those written, by owner: one `Handed` each.
        let mut handed: BTreeMap<ShardId, Vec<LogPosition>> = BTreeMap::new();
        let mut next = self.credit_wait.next_conn(None);
        while let Some(conn) = next {
            next = self.credit_wait.next_conn(Some(conn));
            while let Some(item) = self.credit_wait.front(now, conn) {
                let message = item.message;
                let reply = match item.stale {
                    true => PeerMsg::Bounced {
                        message,
                        gone: None,
                    },
                    false => match self.server.deliver(now.at, conn, item.deliver) {
                        Ok(()) => {
                            self.credit_wait.pop(conn);
                            handed.entry(owner_of(message)).or_default().push(message);
                            continue;
                        }
                        Err(NotWritten::NoCredit) => break,
                        Err(NotWritten::Gone) => PeerMsg::Bounced {
                            message,
                            gone: Some(conn),
                        },
                    },
                };
                self.credit_wait.pop(conn);
                self.send_peer(now, owner_of(message), reply);
            }
        }
        for (owner, messages) in handed {
            self.send_peer(now, owner, PeerMsg::Handed { messages });
        }
    }

    /// Hands due messages to the edge and due events to businesses, within the bounds.
    pub(super) fn dispatch(&mut self, now: Now) {
        // The DELIVERs and events of one call leave together, a few large chunks per
        // stream (see `Server::begin_writes`).
        self.server.begin_writes();
        self.dispatch_deferred(now);
        self.server.end_writes(now.at);
    }

    fn dispatch_deferred(&mut self, now: Now) {
        if !self.credit_wait.is_empty() {
            self.drain_credit_wait(now);
        }
        self.verify_published(now);
        // Bounded by in_flight_max (and by the due messages, each looked at once), and by
        // the sessions one call may set up.
        let work_before = self.devices.as_ref().map_or(0, |d| d.counts().setup_work());
        // The DELIVERs of this call with their edge connections, in the order they were
        // taken; then one message to each connection's shard.
        let mut offers = std::mem::take(&mut self.scratch.offers);
        offers.clear();
        loop {
            let set_up = self
                .devices
                .as_ref()
                .map_or(0, |d| d.counts().setup_work() - work_before);
            if set_up >= SESSIONS_PER_DISPATCH_MAX {
                break;
            }
            let devices = &self.devices;
            let check = |r: &Recipient| match devices {
                Some(d) if !d.ready(r) => KeyCheck::Missing {
                    wait_ms: u64::from(d.config().device_key_wait_ms),
                    recheck_ms: u64::from(d.config().keys_wanted_retry_ms),
                },
                _ => KeyCheck::Ready,
            };
            let Some((conn, mut item)) = self
                .delivery
                .as_mut()
                .and_then(|d| d.poll_dispatch(now.unix_ms, check))
            else {
                break;
            };
            if let Some(devices) = self.devices.as_mut() {
                match devices.seal(self.sealer.keys(), now.unix_ms, &mut item) {
                    Ok(refresh) => {
                        if refresh && devices.want(now.unix_ms, item.recipient) {
                            self.ask_keys(now, vec![item.recipient]);
                        }
                    }
                    Err(fail) => {
                        let reason = match fail {
                            SealFail::AtRest => FailReason::Undeliverable,
                            SealFail::NoDevice => FailReason::NoDeviceKey,
                        };
                        if let Some(d) = self.delivery.as_mut() {
                            d.fail(item.message, reason);
                        }
                        continue;
                    }
                }
            }
            offers.push((conn, item));
        }
        // Each connection's list allocated once at its size (edge connections are few).
        let mut by_conn: Vec<(ConnKey, Vec<Deliver>)> = Vec::new();
        for &(conn, _) in &offers {
            if !by_conn.iter().any(|(c, _)| *c == conn) {
                let n = offers.iter().filter(|(c, _)| *c == conn).count();
                by_conn.push((conn, Vec::with_capacity(n)));
            }
        }
        for (conn, item) in offers.drain(..) {
            let (_, items) = by_conn
                .iter_mut()
                .find(|(c, _)| *c == conn)
                .expect("every connection was listed above");
            items.push(item);
        }
        self.scratch.offers = offers;
        for (conn, items) in by_conn {
            self.send_peer(now, conn.shard(), PeerMsg::Deliver { conn, items });
        }
        let wanted = self
            .delivery
            .as_mut()
            .map(|d| d.take_keys_wanted())
            .unwrap_or_default();
        if let Some(devices) = self.devices.as_mut() {
            let ask: Vec<Recipient> = wanted
                .into_iter()
                .filter(|r| devices.want(now.unix_ms, *r))
                .collect();
            if !ask.is_empty() {
                self.ask_keys(now, ask);
            }
        }
        let durable_end = self.commit.log().durable_end();
        let shard = self.shard;
        let home = u16::from(shard);
        let durable = |e: LogPosition| e.shard_id() == Some(shard) && e.index() < durable_end;
        // Bounded: PUSHES_IN_FLIGHT pushes in flight per business.
        while let Some((conn, business_id, events)) =
            self.outbox.poll_push(now.unix_ms, home, durable)
        {
            self.send_peer(
                now,
                conn.shard(),
                PeerMsg::Push {
                    conn,
                    business_id,
                    events,
                },
            );
        }
    }
}

impl Shard {
    /// Sends KEYS_WANTED for `recipients` through one of the edge connections.
    fn ask_keys(&mut self, now: Now, recipients: Vec<Recipient>) {
        let home = u16::from(self.shard);
        let Some(conn) = self.delivery.as_mut().and_then(|d| d.pick_edge(home)) else {
            return;
        };
        for chunk in recipients.chunks(KEYS_WANTED_PER_FRAME) {
            self.send_peer(
                now,
                conn.shard(),
                PeerMsg::KeysWanted {
                    conn,
                    recipients: chunk.to_vec(),
                },
            );
        }
    }
}

/// Recipients in one KEYS_WANTED (well under any edge's batch bound).
const KEYS_WANTED_PER_FRAME: usize = 64;

/// The shard whose log holds `position`, for a position this node wrote (a message handed
/// out, an event pushed): its shard field is one of this node's shards.
fn owner_of(position: LogPosition) -> ShardId {
    position
        .shard_id()
        .expect("a position this node wrote names a shard")
}

/// Groups items that a peer named by position (the edge's outcomes, a business's
/// acknowledgements) by the shard of that position, in shard order. A position whose
/// shard is not one of the node's `shards` cannot be a message or an event of this node:
/// it is dropped here, as its owner would ignore a position it does not hold (it used to
/// index past the shell's table of shards).
fn by_shard<T>(
    items: Vec<T>,
    shards: usize,
    pos: impl Fn(&T) -> LogPosition,
) -> BTreeMap<ShardId, Vec<T>> {
    let mut out: BTreeMap<ShardId, Vec<T>> = BTreeMap::new();
    // Usually every item is one shard's (one shard, or the edge on the messages' shard):
    // the list goes on whole, not rebuilt one push at a time.
    let first = items.first().and_then(|i| pos(i).shard_id());
    if let Some(shard) = first.filter(|s| s.within(shards)) {
        if items.iter().all(|i| pos(i).shard_id() == Some(shard)) {
            out.insert(shard, items);
            return out;
        }
    }
    for i in items {
        if let Some(shard) = pos(&i).shard_id().filter(|s| s.within(shards)) {
            out.entry(shard).or_default().push(i);
        }
    }
    out
}

/// DELIVERs that reached their edge connection's shard while the connection had no
/// credit left. Bouncing them made each owner offer again 50 ms later, and the shard
/// holding the edge connection, whose offers arrive first, took every credit the edge
/// returned: another shard could hand over nothing for seconds while its waiting
/// messages filled its bounds and its senders were throttled. Held here in arrival
/// order, from every shard alike, they are written as the edge grants credit.
///
/// Bounded: at most `len_max` DELIVERs (every shard's `in_flight_max` together, which
/// the owners' own bound already keeps them under), each for at most `wait_ms_max` (half
/// the owners' `outcome_timeout_ms`, so an owner never offers a message again while a
/// copy still waits here); past either bound a DELIVER goes back to its owner as before.
#[derive(Debug, Default)]
pub(super) struct CreditWait {
    queues: BTreeMap<ConnKey, VecDeque<(u64, Deliver)>>,
    len: usize,
    len_max: usize,
    wait_ms_max: u64,
}

/// The first DELIVER waiting for a connection.
pub(super) struct Waiting<'a> {
    pub message: LogPosition,
    pub deliver: &'a Deliver,
    /// It waited past the bound: back to its owner.
    pub stale: bool,
}

impl CreditWait {
    pub(super) fn new(len_max: usize, wait_ms_max: u64) -> CreditWait {
        CreditWait {
            queues: BTreeMap::new(),
            len: 0,
            len_max,
            wait_ms_max,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether DELIVERs wait for `conn` (a new one then waits behind them).
    pub(super) fn holds(&self, conn: ConnKey) -> bool {
        self.queues.contains_key(&conn)
    }

    /// Queues `item` for `conn`, or gives it back when the queue is full.
    pub(super) fn push(&mut self, now: Now, conn: ConnKey, item: Deliver) -> Result<(), Deliver> {
        if self.len >= self.len_max {
            return Err(item);
        }
        self.queues
            .entry(conn)
            .or_default()
            .push_back((now.unix_ms, item));
        self.len += 1;
        Ok(())
    }

    /// The first connection with DELIVERs waiting, in key order, after `after` (from the
    /// first with none): a walk over them that allocates nothing, and that a connection
    /// whose queue empties on the way does not disturb.
    pub(super) fn next_conn(&self, after: Option<ConnKey>) -> Option<ConnKey> {
        use std::ops::Bound::{Excluded, Unbounded};
        match after {
            None => self.queues.keys().next().copied(),
            Some(a) => self
                .queues
                .range((Excluded(a), Unbounded))
                .next()
                .map(|(k, _)| *k),
        }
    }

    pub(super) fn front(&self, now: Now, conn: ConnKey) -> Option<Waiting<'_>> {
        let (since_ms, d) = self.queues.get(&conn)?.front()?;
        Some(Waiting {
            message: d.message,
            deliver: d,
            stale: now.unix_ms.saturating_sub(*since_ms) > self.wait_ms_max,
        })
    }

    pub(super) fn pop(&mut self, conn: ConnKey) {
        let Some(q) = self.queues.get_mut(&conn) else {
            return;
        };
        if q.pop_front().is_some() {
            self.len -= 1;
        }
        if q.is_empty() {
            self.queues.remove(&conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(shard: u16, index: u64) -> LogPosition {
        LogPosition((u64::from(shard) << LogPosition::INDEX_BITS) | index)
    }

    #[test]
    fn one_shards_positions_go_on_whole_and_in_order() {
        let positions = vec![at(1, 7), at(1, 5), at(1, 6)];
        let routed = by_shard(positions.clone(), 3, |p| *p);
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[&ShardId::new(1)], positions);
        assert!(by_shard(vec![at(3, 1), at(3, 2)], 3, |p| *p).is_empty());
        assert!(by_shard(Vec::<LogPosition>::new(), 3, |p| *p).is_empty());
    }

    #[test]
    fn positions_of_other_nodes_shards_are_not_routed() {
        let positions = vec![at(1, 5), at(0, 2), at(3, 1), at(1, 6), at(300, 0), at(2, 9)];
        let routed = by_shard(positions, 3, |p| *p);
        let routed: Vec<(u8, Vec<LogPosition>)> =
            routed.into_iter().map(|(s, v)| (s.get(), v)).collect();
        assert_eq!(
            routed,
            [
                (0, vec![at(0, 2)]),
                (1, vec![at(1, 5), at(1, 6)]),
                (2, vec![at(2, 9)]),
            ],
            "shard 3 of a 3-shard node and shard 300 of none are dropped, the rest keep their order"
        );
    }
}
