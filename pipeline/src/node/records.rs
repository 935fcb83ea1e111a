//! Records the core writes besides businesses' messages: users' replies the edge hands
//! over (acked to the edge once durable, then queued for their business), statuses of
//! messages and acknowledgement cursors.
//!
//! ```text
//!  INBOUND batch ──> per entry: registered business? payload in bounds? room in the
//!                    business's outbox? the edge's id new (idempotency, in a namespace
//!                    of its own)? ──> inbound record | rejected / throttled / duplicate
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
use super::{stats, Internal, Now, Shard, IN_FLIGHT_RETRY_MS};
use crate::idempotency::{Claim, INBOUND_NAMESPACE};
use crate::log::{Log, LogError, Record, RecordHeader, RecordKind};
use crate::server::InboundBatch;
use crate::wire::delivery::{BusinessEvent, InboundEntry, InboundEvent, StatusEvent};
use crate::wire::{LogPosition, Reason, Status};

/// Placeholder of a stored reply until the log gives its position.
const UNPLACED: Status = Status::Accepted(LogPosition(u64::MAX));

/// Retry-after of a reply refused because its business's outbox is full.
const INBOUND_FULL_RETRY_MS: u32 = 1000;

impl Shard {
    /// Takes the users' messages of an INBOUND batch from the edge.
    pub(super) fn take_inbound(&mut self, now: Now, mut batch: InboundBatch) {
        // Replies sealed end to end are opened first; one that does not open is refused
        // and never stored.
        let mut unopened = vec![false; batch.entries.len()];
        if batch.e2e {
            for (e, bad) in batch.entries.iter_mut().zip(unopened.iter_mut()) {
                let opened = self.devices.as_mut().and_then(|d| {
                    d.open_reply(
                        self.sealer.keys(),
                        now.unix_ms,
                        e.business_id,
                        e.id,
                        &e.payload,
                    )
                    .ok()
                });
                match opened {
                    Some(plain) => e.payload = bytes::Bytes::from(plain),
                    None => *bad = true,
                }
            }
        }
        let mut statuses = Vec::with_capacity(batch.entries.len());
        let mut claims = Vec::new();
        let mut placed: Vec<&InboundEntry> = Vec::new();
        let mut budget = 0u64;
        for (e, &bad) in batch.entries.iter().zip(&unopened) {
            let mut status = match bad {
                true => Some(Status::Rejected(Reason::BadCiphertext)),
                false => self.judge_inbound(e, budget),
            };
            if status.is_none() {
                let key = e.business_id | INBOUND_NAMESPACE;
                status = match self.idempotency.claim(key, e.id, now.unix_ms) {
                    Claim::Fresh(t) => {
                        claims.push(t);
                        placed.push(e);
                        budget += e.payload.len() as u64;
                        None
                    }
                    Claim::Duplicate(p) => Some(Status::Duplicate(p)),
                    Claim::InFlight => Some(Status::Throttled {
                        retry_after_ms: IN_FLIGHT_RETRY_MS,
                    }),
                };
            }
            statuses.push(status.unwrap_or(UNPLACED));
        }
        let headers: Vec<RecordHeader> = placed
            .iter()
            .map(|e| RecordHeader {
                kind: RecordKind::Inbound,
                business_id: e.business_id,
                time_ms: now.unix_ms,
                client_id: e.id,
                recipient: Some(e.sender),
                reference: 0,
                code: 0,
            })
            .collect();
        let bytes: u64 = placed
            .iter()
            .map(|e| Log::record_bytes(e.sender.as_bytes().len(), e.payload.len()))
            .sum();
        let mut refused = None;
        if !placed.is_empty() && !self.commit.log().has_room(placed.len(), bytes) {
            // The group commit is full: the edge tries again shortly.
            refused = Some(Status::Throttled {
                retry_after_ms: super::chain::DELIVERY_FULL_RETRY_MS,
            });
        }
        let mut positions = Vec::with_capacity(placed.len());
        if refused.is_none() && !placed.is_empty() {
            let recs: Vec<Record<'_>> = headers
                .iter()
                .zip(&placed)
                .map(|(h, e)| Record {
                    header: *h,
                    payload: &e.payload,
                })
                .collect();
            if let Err(e) = self.commit.append(now.unix_ms, &recs, &mut positions) {
                refused = Some(e.status());
            }
        }
        let mut answer = Answer {
            ticket: batch.ticket,
            taken: now.at,
            business_id: 0,
            statuses,
            claims,
            billed: false,
        };
        if let Some(r) = refused {
            self.release_claims(&answer.claims);
            answer.claims.clear();
            for s in answer.statuses.iter_mut().filter(|s| **s == UNPLACED) {
                *s = r;
            }
        }
        if answer.claims.is_empty() {
            self.ack(now, answer.taken, answer.ticket, 0, &answer.statuses, false);
            return;
        }
        let mut events = Vec::with_capacity(positions.len());
        let mut next = positions.iter().zip(&placed);
        for s in answer.statuses.iter_mut().filter(|s| **s == UNPLACED) {
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
        for (business_id, _) in &events {
            self.events_promised.add(*business_id, 1);
        }
        self.awaiting.push(Awaiting {
            answer: Some(answer),
            admitted: Vec::new(),
            shared_bytes: 0,
            events,
            end_index: self.commit.log().next_index(),
        });
    }

    /// An inbound entry's answer when it is not stored: its business unknown (or a
    /// platform credential), its payload out of bounds, or no room for it (delivery off,
    /// the budget or its business's outbox full). `budget` bytes are already promised
    /// to the entries before it.
    fn judge_inbound(&self, e: &InboundEntry, budget: u64) -> Option<Status> {
        let registered = self
            .server
            .registry()
            .get(e.business_id)
            .is_some_and(|b| !b.platform);
        if !registered {
            return Some(Status::Rejected(Reason::Unauthorized));
        }
        if e.payload.is_empty() || e.payload.len() > self.payload_bytes_max as usize {
            return Some(Status::Rejected(Reason::PayloadTooLarge));
        }
        if self.disk_low() {
            return Some(Status::Throttled {
                retry_after_ms: super::chain::DISK_LOW_RETRY_MS,
            });
        }
        let room = self.delivery.as_ref().is_some_and(|d| {
            d.has_room(
                0,
                budget + e.payload.len() as u64,
                self.outbox.payload_bytes(),
            )
        }) && self.events_room(e.business_id, 1) == super::chain::EventsRoom::Room;
        (!room).then_some(Status::Throttled {
            retry_after_ms: INBOUND_FULL_RETRY_MS,
        })
    }

    /// Appends the statuses delivery reached and the cursors queued, in order, as far as
    /// the group commit has room.
    pub(super) fn append_internal(&mut self, now: Now) {
        if let Some(d) = self.delivery.as_mut() {
            while let Some(c) = d.poll_status() {
                // Owed by delivery until now; promised from here until durable.
                self.events_promised.add(c.business_id, 1);
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
        // The records borrow the first `n` queued; the lists are the chain's, kept between
        // calls, so that a call allocates only its events' list.
        let mut records = super::chain::reuse(std::mem::take(&mut self.scratch.records));
        records.extend(self.internal.iter().take(n).map(|i| Record {
            header: i.header,
            payload: &[],
        }));
        let mut positions = std::mem::take(&mut self.scratch.positions);
        positions.clear();
        let appended = self.commit.append(now.unix_ms, &records, &mut positions);
        self.scratch.records = super::chain::reuse(records);
        let taken = self.internal.drain(..n);
        match appended {
            Ok(()) => {
                let mut events = Vec::with_capacity(n);
                events.extend(taken.zip(&positions).filter_map(|(i, &p)| {
                    i.event.map(|e| {
                        (
                            i.header.business_id,
                            BusinessEvent::Status(StatusEvent { event: p, ..e }),
                        )
                    })
                }));
                self.awaiting.push(Awaiting {
                    answer: None,
                    admitted: Vec::new(),
                    shared_bytes: 0,
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
        self.scratch.positions = positions;
    }
}
