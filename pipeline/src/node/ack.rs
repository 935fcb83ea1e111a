//! What waits for a group commit, and what follows it: the ACKs of batches, messages
//! handed to delivery, events queued for businesses.
//!
//! Invariants: a batch's accepted messages are acked only once the log's durable end
//! passed its last record, with their idempotency claims settled first; a message enters
//! delivery, and an event the outbox, only once its record is durable; when the log
//! fails, every waiting batch not yet durable is answered `storage_unavailable` and its
//! claims released, so its ids are free for a resend.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{stats, Now, Shard};
use crate::idempotency::ClaimTicket;
use crate::server::Ticket;
use crate::wire::delivery::BusinessEvent;
use crate::wire::{LogPosition, Reason, Recipient, Status};

/// The ACK a batch is owed once durable.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) ticket: Ticket,
    /// When the shard took the batch (for the ack-latency histogram).
    pub(super) taken: Instant,
    pub(super) business_id: u32,
    pub(super) statuses: Vec<Status>,
    /// The idempotency claims of the accepted messages, in order: settled with their
    /// positions once durable, released if the log fails first.
    pub(super) claims: Vec<ClaimTicket>,
    /// A business's SUBMIT (its accepted messages are billed), not the edge's INBOUND.
    pub(super) billed: bool,
}

/// A message that enters delivery once durable.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) message: LogPosition,
    pub(super) business_id: u32,
    pub(super) client_id: u64,
    pub(super) recipient: Recipient,
    pub(super) expires_ms: u64,
    pub(super) payload: Bytes,
}

/// Records waiting for the fdatasync that covers them, and what follows it.
#[derive(Debug)]
pub(super) struct Awaiting {
    pub(super) answer: Option<Answer>,
    pub(super) admitted: Vec<Admitted>,
    /// Bytes of the buffer the admitted payloads are slices of (0 when each has its own).
    pub(super) shared_bytes: usize,
    pub(super) events: Vec<(u32, BusinessEvent)>,
    /// Durable once the log's durable end reaches this index.
    pub(super) end_index: u64,
}

/// The waiting batches, in log order.
#[derive(Debug, Default)]
pub(super) struct AwaitingQueue(VecDeque<Awaiting>);

impl AwaitingQueue {
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn push(&mut self, a: Awaiting) {
        debug_assert!(self.0.back().is_none_or(|b| b.end_index <= a.end_index));
        self.0.push_back(a);
    }

    /// The oldest waiting batch, if the log's durable end covers it.
    fn pop_durable(&mut self, durable_end: u64) -> Option<Awaiting> {
        if self.0.front().is_some_and(|a| a.end_index <= durable_end) {
            self.0.pop_front()
        } else {
            None
        }
    }

    fn pop(&mut self) -> Option<Awaiting> {
        self.0.pop_front()
    }
}

impl Shard {
    /// Answers and hands on everything the log's durable end now covers.
    pub(super) fn ack_durable(&mut self, now: Now) {
        let durable = self.commit.log().durable_end();
        // The commit's ACKs leave together: one write per stream, one drive per connection.
        self.server.begin_writes();
        while let Some(a) = self.awaiting.pop_durable(durable) {
            self.durable(now, a);
        }
        self.server.end_writes(now.at);
    }

    /// The log failed: what it made durable is answered and handed on, the other
    /// batches hear `storage_unavailable` for their accepted messages.
    pub(super) fn fail_awaiting(&mut self, now: Now) {
        let durable = self.commit.log().durable_end();
        while let Some(a) = self.awaiting.pop() {
            if a.end_index <= durable {
                self.durable(now, a);
                continue;
            }
            let Some(mut answer) = a.answer else {
                continue;
            };
            self.release_claims(&answer.claims);
            for s in answer.statuses.iter_mut() {
                if matches!(s, Status::Accepted(_)) {
                    *s = Status::Rejected(Reason::StorageUnavailable);
                }
            }
            self.answer(now, &answer);
        }
    }

    /// Records just became durable: their batch is answered, their messages enter
    /// delivery, their events the outbox.
    pub(super) fn durable(&mut self, now: Now, a: Awaiting) {
        if let Some(answer) = a.answer {
            self.settle_claims(&answer);
            self.answer(now, &answer);
            self.scratch.give_back(answer.statuses, answer.claims);
        }
        // Promised until now; owed by delivery (the messages) or queued (the events) from
        // here.
        for m in &a.admitted {
            self.events_promised.sub(m.business_id, 2);
        }
        for (business_id, _) in &a.events {
            self.events_promised.sub(*business_id, 1);
        }
        if let Some(d) = self.delivery.as_mut() {
            let block = (a.shared_bytes > 0 && !a.admitted.is_empty())
                .then(|| d.hold_block(a.shared_bytes as u64, a.admitted.len()));
            for m in a.admitted {
                d.admit(
                    now.unix_ms,
                    m.message,
                    m.business_id,
                    m.client_id,
                    m.recipient,
                    m.expires_ms,
                    m.payload,
                    block,
                    false,
                );
            }
        }
        for (business_id, e) in a.events {
            if let BusinessEvent::Inbound(i) = &e {
                self.inbound_today.count(business_id, i.at_ms);
            }
            self.outbox.add(business_id, e);
        }
    }

    fn answer(&mut self, now: Now, a: &Answer) {
        self.ack(now, a.taken, a.ticket, a.business_id, &a.statuses, a.billed);
    }

    /// A durable batch's ids answer `duplicate` from now on; done before its ACK leaves,
    /// so a client can never resend an acked id and have it stored again.
    pub(super) fn settle_claims(&self, a: &Answer) {
        if self.bugs.release_instead_of_settle {
            self.release_claims(&a.claims);
            return;
        }
        let positions = a.statuses.iter().filter_map(|s| match s {
            Status::Accepted(p) => Some(*p),
            _ => None,
        });
        let mut settled = 0;
        for (claim, p) in a.claims.iter().zip(positions) {
            self.idempotency.settle(*claim, p);
            settled += 1;
        }
        debug_assert_eq!(settled, a.claims.len(), "one claim per accepted message");
    }

    pub(super) fn release_claims(&self, claims: &[ClaimTicket]) {
        for c in claims {
            self.idempotency.release(*c);
        }
    }

    /// Sends a batch's final statuses; the accepted messages of a business's batch are
    /// durable, so they count for billing here.
    pub(super) fn ack(
        &mut self,
        now: Now,
        taken: Instant,
        ticket: Ticket,
        business_id: u32,
        statuses: &[Status],
        billed: bool,
    ) {
        let accepted = statuses
            .iter()
            .filter(|s| matches!(s, Status::Accepted(_)))
            .count() as u64;
        if billed {
            if accepted > 0 {
                self.detector
                    .record_accepted(now.unix_ms, business_id, accepted);
            }
            stats::add(&self.stats.accepted, accepted);
            stats::add(&self.stats.not_accepted, statuses.len() as u64 - accepted);
            stats::add(&self.stats.batches, 1);
        } else {
            stats::add(&self.stats.inbound_accepted, accepted);
        }
        self.stats
            .ack_latency
            .observe(now.at.saturating_duration_since(taken));
        self.server.ack(now.at, ticket, statuses);
    }
}
