//! Rebuilding a shard's delivery state from its log at start-up: recovery visits every
//! record that stays in the log, in order, and [`Replay`] keeps what still matters.
//!
//! ```text
//!  message record (version 2) ──> waiting for delivery, unless a final status follows
//!  status record ──> `sent`: the message was handed before; final: it waits no more;
//!                    and an event for its business
//!  inbound record ──> an event for its business
//!  cursor record ──> the business acknowledged events through it: those are not pushed
//! ```
//!
//! Messages of version 1 segments (written before delivery existed) are not delivered,
//! nor are messages and replies whose user fields are hidden (their business was erased).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::log::{OwnedRecord, RecordHeader, RecordKind};
use crate::wire::delivery::{BusinessEvent, InboundEvent, StatusEvent, StatusKind};
use crate::wire::{LogPosition, Recipient};
use crate::ShardId;

/// A message that may still need delivering.
#[derive(Debug, Clone)]
pub(super) struct Replayed {
    pub(super) business_id: u32,
    pub(super) client_id: u64,
    pub(super) recipient: Recipient,
    pub(super) expires_ms: u64,
    pub(super) payload: Bytes,
    pub(super) sent: bool,
}

/// What a shard's log says about delivery; fed by recovery, consumed by the core.
#[derive(Debug, Default)]
pub struct Replay {
    shard: ShardId,
    pub(super) messages: BTreeMap<LogPosition, Replayed>,
    pub(super) events: Vec<(u32, BusinessEvent)>,
    pub(super) cursors: BTreeMap<u32, LogPosition>,
    /// Records visited.
    pub records: u64,
}

impl Replay {
    /// An empty replay of the log of `shard`.
    pub fn new(shard: ShardId) -> Replay {
        Replay {
            shard,
            ..Replay::default()
        }
    }

    /// One record that stays in the log, at `index`, in log order.
    pub fn visit(&mut self, index: u64, rec: &OwnedRecord) {
        self.records += 1;
        let position = LogPosition::new(self.shard, index);
        let h = &rec.header;
        if rec.fields_hidden {
            // Its business was erased (its key is gone): nothing of it is delivered or
            // pushed; its statuses and cursors (ids only) are still read below.
            return;
        }
        match h.kind {
            // Version 1 messages carry no expiry: they predate delivery.
            RecordKind::Message if h.reference > 0 => {
                let recipient = h.recipient.expect("a message has a recipient");
                self.messages.insert(
                    position,
                    Replayed {
                        business_id: h.business_id,
                        client_id: h.client_id,
                        recipient,
                        expires_ms: h.reference,
                        payload: Bytes::copy_from_slice(&rec.payload),
                        sent: false,
                    },
                );
            }
            RecordKind::Message => {}
            RecordKind::Status => self.status(position, rec),
            RecordKind::Inbound => {
                let sender = h.recipient.expect("an inbound message has a sender");
                self.events.push((
                    h.business_id,
                    BusinessEvent::Inbound(InboundEvent {
                        event: position,
                        at_ms: h.time_ms,
                        sender,
                        payload: Bytes::copy_from_slice(&rec.payload),
                    }),
                ));
            }
            RecordKind::Cursor => {
                let c = self.cursors.entry(h.business_id).or_insert(LogPosition(0));
                *c = (*c).max(LogPosition(h.reference));
            }
        }
    }

    /// Retention drops every record of this shard below log index `end` before the shard
    /// serves (start-up, or `courier log expire`): the messages still waiting there leave
    /// the replay, and the status records that make them `expired` are returned, to be
    /// appended (and made durable) before the drop; events below `end` go with their
    /// records. Feed the appended statuses back with [`Replay::visit`], so that their
    /// businesses hear them.
    pub fn expire_below(&mut self, end: u64, now_ms: u64) -> Vec<RecordHeader> {
        let end = LogPosition::new(self.shard, end);
        let rest = self.messages.split_off(&end);
        let doomed = std::mem::replace(&mut self.messages, rest);
        self.events.retain(|(_, e)| e.event() >= end);
        doomed
            .into_iter()
            .map(|(m, r)| RecordHeader {
                kind: RecordKind::Status,
                business_id: r.business_id,
                time_ms: now_ms,
                client_id: r.client_id,
                recipient: None,
                reference: m.0,
                code: StatusEvent::code(StatusKind::Expired, None),
            })
            .collect()
    }

    /// Messages still waiting for delivery.
    pub fn waiting(&self) -> usize {
        self.messages.len()
    }

    fn status(&mut self, position: LogPosition, rec: &OwnedRecord) {
        let h = &rec.header;
        let Some((kind, reason)) = StatusEvent::from_code(h.code) else {
            // Written by this build's encoder only; a code it cannot read is not acted on.
            return;
        };
        let message = LogPosition(h.reference);
        match kind {
            StatusKind::Sent => {
                if let Some(m) = self.messages.get_mut(&message) {
                    m.sent = true;
                }
            }
            StatusKind::Delivered | StatusKind::Read | StatusKind::Failed | StatusKind::Expired => {
                self.messages.remove(&message);
            }
        }
        self.events.push((
            h.business_id,
            BusinessEvent::Status(StatusEvent {
                event: position,
                message,
                client_id: h.client_id,
                kind,
                reason,
                at_ms: h.time_ms,
            }),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(client_id: u64) -> OwnedRecord {
        let r = Recipient::parse(b"+15550001111").unwrap();
        OwnedRecord {
            header: RecordHeader::message(7, 1_000, client_id, r, 9_000),
            payload: b"sealed".to_vec(),
            fields_hidden: false,
        }
    }

    /// Issue 19: a start-up retention drop turns the messages still waiting below the
    /// drop into `expired` status records, and the events below it go with their records.
    #[test]
    fn expiring_below_a_drop_owes_a_status_per_waiting_message() {
        let shard = ShardId::new(2);
        let mut r = Replay::new(shard);
        let status = |client_id: u64, message: u64, kind| OwnedRecord {
            header: RecordHeader {
                kind: RecordKind::Status,
                business_id: 7,
                time_ms: 1_100,
                client_id,
                recipient: None,
                reference: LogPosition::new(shard, message).0,
                code: StatusEvent::code(kind, None),
            },
            payload: Vec::new(),
            fields_hidden: false,
        };
        r.visit(0, &message(10));
        r.visit(1, &message(11));
        // Message 11 already has its final status (an event at index 2).
        r.visit(2, &status(11, 1, StatusKind::Delivered));
        r.visit(3, &message(12));
        r.visit(4, &status(12, 3, StatusKind::Sent));
        assert_eq!((r.waiting(), r.events.len()), (2, 2));
        let owed = r.expire_below(3, 5_000);
        assert_eq!(owed.len(), 1, "only message 10 waits below index 3");
        let h = owed[0];
        assert_eq!(
            (h.kind, h.business_id, h.client_id),
            (RecordKind::Status, 7, 10)
        );
        assert_eq!(h.reference, LogPosition::new(shard, 0).0);
        assert_eq!(h.time_ms, 5_000);
        assert_eq!(
            StatusEvent::from_code(h.code),
            Some((StatusKind::Expired, None))
        );
        assert_eq!(r.waiting(), 1, "message 12 still waits");
        // The event at index 2 went with its record; the one at 4 stays.
        let events: Vec<u64> = r.events.iter().map(|(_, e)| e.event().index()).collect();
        assert_eq!(events, [4]);
        // Fed back as appended, the status reaches its business.
        r.visit(
            5,
            &OwnedRecord {
                header: h,
                payload: Vec::new(),
                fields_hidden: false,
            },
        );
        assert_eq!(r.events.len(), 2);
    }
}
