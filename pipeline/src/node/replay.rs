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
//! Messages of version 1 segments (written before delivery existed) are not delivered.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::log::{OwnedRecord, RecordKind};
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
