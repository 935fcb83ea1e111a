//! Records the core writes besides businesses' messages: users' replies the edge hands
//! over (acked to the edge once durable, then queued for their business), statuses of
//! messages and acknowledgement cursors.
//!
//! ```text
//!  INBOUND batch ──> per entry: registered business? payload in bounds? room in the
//!                    business's outbox? ──> inbound record | rejected / throttled
//!                    ──> ACK once durable; then INBOUND_EVENT queued for the business
//!  Delivery::poll_status ──> status record ──> once durable: STATUS queued
//!  Outbox::poll_cursor (every tick) ──> cursor record (what the business acknowledged)
//! ```
//!
//! Statuses and cursors wait in `internal` (in order) while the group commit is full;
//! they are appended in the next advance, so a status is never reordered after a later
//! one of the same message.

use bytes::Bytes;

use super::ack::{Answer, Awaiting};
use super::{stats, Internal, Now, Shard};
use crate::log::{LogError, Record, RecordHeader, RecordKind};
use crate::server::InboundBatch;
use crate::wire::delivery::{BusinessEvent, InboundEvent, StatusEvent};
use crate::wire::{LogPosition, Reason, Status};

/// Retry-after of a reply refused because its business's outbox is full.
const INBOUND_FULL_RETRY_MS: u32 = 1000;

impl Shard {
    /// Takes the users' messages of an INBOUND batch from the edge.
    pub(super) fn take_inbound(&mut self, now: Now, batch: InboundBatch) {
        let mut statuses = Vec::with_capacity(batch.entries.len());
        let mut records = Vec::new();
        let mut budget = 0u64;
        for e in &batch.entries {
            let registered = self
                .server
                .registry()
                .get(e.business_id)
                .is_some_and(|b| !b.platform);
            let room = self.delivery.as_ref().is_some_and(|d| {
                d.has_room(
                    0,
                    budget + e.payload.len() as u64,
                    self.outbox.payload_bytes(),
                )
            }) && self.outbox.has_room(e.business_id);
            let status = if !registered {
                Status::Rejected(Reason::Unauthorized)
            } else if e.payload.is_empty() || e.payload.len() > self.payload_bytes_max as usize {
                Status::Rejected(Reason::PayloadTooLarge)
            } else if !room {
                Status::Throttled {
                    retry_after_ms: INBOUND_FULL_RETRY_MS,
                }
            } else {
                budget += e.payload.len() as u64;
                records.push(RecordHeader {
                    kind: RecordKind::Inbound,
                    business_id: e.business_id,
                    time_ms: now.unix_ms,
                    client_id: 0,
                    recipient: Some(e.sender),
                    reference: 0,
                    code: 0,
                });
                Status::Accepted(LogPosition(u64::MAX))
            };
            statuses.push(status);
        }
        let placed: Vec<&crate::wire::delivery::InboundEntry> = batch
            .entries
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| matches!(s, Status::Accepted(_)))
            .map(|(e, _)| e)
            .collect();
        let bytes: u64 = records
            .iter()
            .zip(&placed)
            .map(|(h, e)| crate::log::Log::record_bytes(h.recipient_bytes(), e.payload.len()))
            .sum();
        if !records.is_empty() && !self.commit.log().has_room(records.len(), bytes) {
            // The group commit is full: the edge tries again shortly.
            for s in statuses
                .iter_mut()
                .filter(|s| matches!(s, Status::Accepted(_)))
            {
                *s = Status::Throttled {
                    retry_after_ms: super::chain::DELIVERY_FULL_RETRY_MS,
                };
            }
            records.clear();
        }
        let recs: Vec<Record<'_>> = records
            .iter()
            .zip(&placed)
            .map(|(h, e)| Record {
                header: *h,
                payload: &e.payload,
            })
            .collect();
        let mut positions = Vec::with_capacity(recs.len());
        let appended = match recs.is_empty() {
            true => Ok(()),
            false => self.commit.append(now.unix_ms, &recs, &mut positions),
        };
        drop(recs);
        let answer = |statuses| Answer {
            ticket: batch.ticket,
            taken: now.at,
            business_id: 0,
            statuses,
            claims: Vec::new(),
            billed: false,
        };
        if let Err(e) = appended {
            for s in statuses
                .iter_mut()
                .filter(|s| matches!(s, Status::Accepted(_)))
            {
                *s = e.status();
            }
            let a = answer(statuses);
            self.ack(now, a.taken, a.ticket, 0, &a.statuses, false);
            return;
        }
        let mut events = Vec::with_capacity(positions.len());
        let mut next = positions.iter().zip(&placed);
        for s in statuses
            .iter_mut()
            .filter(|s| matches!(s, Status::Accepted(_)))
        {
            let (&p, e) = next.next().expect("one position per record");
            *s = Status::Accepted(p);
            events.push((
                e.business_id,
                BusinessEvent::Inbound(InboundEvent {
                    event: p,
                    at_ms: now.unix_ms,
                    sender: e.sender,
                    payload: Bytes::clone(&e.payload),
                }),
            ));
        }
        let a = answer(statuses);
        if events.is_empty() {
            self.ack(now, a.taken, a.ticket, 0, &a.statuses, false);
            return;
        }
        self.awaiting.push(Awaiting {
            answer: Some(a),
            admitted: Vec::new(),
            events,
            end_index: self.commit.log().next_index(),
        });
    }

    /// Appends the statuses delivery reached and the cursors queued, in order, as far as
    /// the group commit has room.
    pub(super) fn append_internal(&mut self, now: Now) {
        if let Some(d) = self.delivery.as_mut() {
            while let Some(c) = d.poll_status() {
                let code = StatusEvent::code(c.kind, c.reason);
                self.internal.push_back(Internal {
                    header: RecordHeader {
                        kind: RecordKind::Status,
                        business_id: c.business_id,
                        time_ms: now.unix_ms,
                        client_id: c.client_id,
                        recipient: None,
                        reference: c.message.0,
                        code,
                    },
                    event: Some(StatusEvent {
                        event: LogPosition(0),
                        message: c.message,
                        client_id: c.client_id,
                        kind: c.kind,
                        reason: c.reason,
                        at_ms: now.unix_ms,
                    }),
                });
            }
        }
        if self.internal.is_empty() {
            return;
        }
        let each = crate::log::Log::record_bytes(0, 0);
        let max = self.commit.log().config().group_commit_records_max as usize;
        let mut n = self.internal.len().min(max);
        while n > 0 && !self.commit.log().has_room(n, each * n as u64) {
            n /= 2;
        }
        if n == 0 {
            return; // the next commit frees room
        }
        let taken: Vec<Internal> = self.internal.drain(..n).collect();
        let records: Vec<Record<'_>> = taken
            .iter()
            .map(|i| Record {
                header: i.header,
                payload: &[],
            })
            .collect();
        let mut positions = Vec::with_capacity(n);
        let appended = self.commit.append(now.unix_ms, &records, &mut positions);
        drop(records);
        match appended {
            Ok(()) => {
                let events = taken
                    .iter()
                    .zip(&positions)
                    .filter_map(|(i, &p)| {
                        i.event.map(|e| {
                            (
                                i.header.business_id,
                                BusinessEvent::Status(StatusEvent { event: p, ..e }),
                            )
                        })
                    })
                    .collect();
                self.awaiting.push(Awaiting {
                    answer: None,
                    admitted: Vec::new(),
                    events,
                    end_index: self.commit.log().next_index(),
                });
            }
            Err(LogError::Busy) => unreachable!("room was checked"),
            Err(_) => {
                // The log failed for good: what it cannot record is counted, not retried.
                stats::add(&self.stats.statuses_lost, n as u64);
            }
        }
    }
}
