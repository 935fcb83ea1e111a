//! The stage chain one SUBMIT batch runs through, in order:
//!
//! ```text
//!  room in the group commit?  no ──> held, untouched, until a commit frees room
//!  room in delivery's bounds?  no, and an edge is taking messages ──> held, untouched,
//!                              until outcomes free room, for at most DELIVERY_FULL_HOLD
//!  business still registered? no ──> every message `rejected(unauthorized)`
//!  room in delivery's bounds?  no ──> every message `throttled(DELIVERY_FULL_RETRY_MS)`
//!  per message: payload empty or over the bound ──> `rejected(payload_too_large)`
//!               Idempotency::claim: durable copy ──> `duplicate(position)`,
//!                                   copy in flight ──> `throttled(IN_FLIGHT_RETRY_MS)`
//!  the rest, in one call: Detector::observe_batch ──> throttled / rejected / admitted
//!  the admitted, in one call: Sealer::seal_batch (per-recipient AES-256-GCM)
//!  the sealed: Log::append ──> positions; acked once their group commit is durable,
//!              then handed to delivery
//! ```
//!
//! A resend is answered before it counts for detection or billing; only a message headed
//! for the log keeps its claim, every other claim is released at once.

use std::time::Instant;

use super::ack::{Admitted, Answer, Awaiting};
use super::{stats, Held, Now, Shard, IN_FLIGHT_RETRY_MS};
use crate::detect::{BusinessLimits, Verdict};
use crate::idempotency::{Claim, ClaimTicket};
use crate::log::{Log, LogError, Record, RecordHeader};
use crate::seal::{SealError, SEAL_OVERHEAD_BYTES};
use crate::server::SubmitBatch;
use crate::wire::{LogPosition, Message, Reason, Status};

/// A message's answer before detection, or its fresh claim.
#[derive(Debug)]
pub(super) enum Early {
    Answered(Status),
    Claimed(ClaimTicket),
}

/// Placeholder of an admitted message until the log gives its position.
const UNPLACED: Status = Status::Accepted(LogPosition(u64::MAX));
/// Retry-after of a batch refused because delivery's bounds are full (messages waiting
/// for an edge that is slow or absent).
pub const DELIVERY_FULL_RETRY_MS: u32 = 1000;
/// Longest a batch is held while delivery's bounds are full and an edge is taking
/// messages, before it is answered `throttled` after all.
///
/// Answering such a batch `throttled` at once (as before issue 15's measurements) made
/// its sender resend it: under load with delivery slower than ingest, half to two thirds
/// of the messages sent were refused, each decoded, answered, resent and decoded again
/// on the same cores that deliver. Held, the batch waits untouched while outcomes free
/// room; the shard takes no other batch meanwhile (they would find the same shard-wide
/// bound full), so the server stops reading SUBMITs and QUIC's flow control pushes back
/// on the senders. With no edge taking messages (none attached, or nothing out with it
/// nor due for it within the hold) nothing would free room soon, and the batch is
/// throttled at once, as before.
pub const DELIVERY_FULL_HOLD: std::time::Duration =
    std::time::Duration::from_millis(DELIVERY_FULL_RETRY_MS as u64);
/// `retry_after_ms` of messages throttled because the disk is below its reserve: about
/// when the shell measures the free space again.
pub const DISK_LOW_RETRY_MS: u32 = 1000;

/// The chain's working lists, kept by the shard between batches so that a batch
/// allocates none of them (each is emptied before use and keeps its capacity).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    early: Vec<Early>,
    verdicts: Vec<Verdict>,
    admitted: Vec<usize>,
    pub(super) positions: Vec<LogPosition>,
    /// The records of a batch, kept empty between batches (see [`reuse`]).
    pub(super) records: Vec<Record<'static>>,
    /// The DELIVERs of one dispatch with their edge connections, in the order taken
    /// (`bus.rs`, `dispatch_deferred`).
    pub(super) offers: Vec<(crate::server::ConnKey, crate::wire::delivery::Deliver)>,
    /// Lists of answered batches ([`Answer`]'s statuses and claims), for the next ones.
    spare_statuses: Vec<Vec<Status>>,
    spare_claims: Vec<Vec<ClaimTicket>>,
}

/// Lists of answered batches kept for reuse, of each kind: about as many as batches wait
/// for a group commit at a time.
const SPARE_LISTS_MAX: usize = 64;

/// An empty list of any lifetime in the memory of `v` (emptied first): collecting a
/// `Vec`'s own iterator into a `Vec` of an element of the same size and alignment reuses
/// its allocation (the standard library's in-place collection), so a list of borrowed
/// records keeps its capacity from batch to batch without `unsafe`.
pub(super) fn reuse<'a, 'b>(mut v: Vec<Record<'a>>) -> Vec<Record<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("emptied")).collect()
}

impl Scratch {
    /// An answered batch's lists, kept for a later batch.
    pub(super) fn give_back(&mut self, mut statuses: Vec<Status>, mut claims: Vec<ClaimTicket>) {
        if self.spare_statuses.len() < SPARE_LISTS_MAX {
            statuses.clear();
            self.spare_statuses.push(statuses);
        }
        if self.spare_claims.len() < SPARE_LISTS_MAX {
            claims.clear();
            self.spare_claims.push(claims);
        }
    }
}

/// Whether a business's events have room ([`Shard::events_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventsRoom {
    Room,
    /// Most of the bound waits for the business to acknowledge: throttled at once.
    BusinessBehind,
    /// Most of it is owed by messages still in delivery: held while an edge drains them,
    /// as when delivery's own bounds are full.
    DeliveryBehind,
}

impl Shard {
    /// Runs one batch through the chain. Returns it, untouched, when the log's group
    /// commit has no room for it yet, or delivery has none while an edge drains it (for
    /// at most [`DELIVERY_FULL_HOLD`] from `taken`).
    pub(super) fn take_batch(&mut self, now: Now, mut held: Held) -> Option<Held> {
        if !self.has_room(&held.batch) {
            return Some(held);
        }
        let events = self.events_room(held.batch.business_id, 2 * held.batch.messages.len());
        let room = self.delivery_room(&held.batch) && events == EventsRoom::Room;
        // A business behind on its own events is throttled at once: holding its batch
        // would hold every business of the shard, and only the business can make room.
        if !room && events != EventsRoom::BusinessBehind && self.waits_for_delivery(now, held.taken)
        {
            if !std::mem::replace(&mut held.for_delivery, true) {
                stats::add(&self.stats.delivery_held, held.batch.messages.len() as u64);
            }
            return Some(held);
        }
        let Held { batch, taken, .. } = held;
        self.run_batch(now, taken, &batch, room);
        // Its payloads are sealed into the commit by now: the list goes back to the
        // decoder for the next SUBMIT.
        self.server.give_messages(batch.messages);
        None
    }

    /// Whether a batch taken at `taken` that finds delivery's bounds full waits for room
    /// rather than being throttled: the shard is not stopping, the batch has waited less
    /// than [`DELIVERY_FULL_HOLD`], and an edge is taking messages.
    fn waits_for_delivery(&self, now: Now, taken: Instant) -> bool {
        let waited = now.at.saturating_duration_since(taken);
        self.stop.is_none()
            && waited < DELIVERY_FULL_HOLD
            && self.delivery.as_ref().is_some_and(|d| {
                d.is_draining(now.unix_ms + (DELIVERY_FULL_HOLD - waited).as_millis() as u64)
            })
    }

    /// Runs a batch that the log has room for through the chain; `delivery_room`: whether
    /// delivery's bounds can take it ([`Shard::delivery_room`], computed by the caller).
    fn run_batch(&mut self, now: Now, taken: Instant, batch: &SubmitBatch, delivery_room: bool) {
        // The registry in force decides the business's limits; a business removed from it
        // since its connection authenticated sends no more.
        let Some(limits) = self
            .server
            .registry()
            .get(batch.business_id)
            .map(BusinessLimits::from)
        else {
            let statuses = vec![Status::Rejected(Reason::Unauthorized); batch.messages.len()];
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses, true);
            return;
        };
        if self.disk_low() {
            stats::add(&self.stats.disk_low_throttled, batch.messages.len() as u64);
            let statuses = vec![
                Status::Throttled {
                    retry_after_ms: DISK_LOW_RETRY_MS
                };
                batch.messages.len()
            ];
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses, true);
            return;
        }
        if !delivery_room {
            stats::add(&self.stats.delivery_full, batch.messages.len() as u64);
            let statuses = vec![
                Status::Throttled {
                    retry_after_ms: DELIVERY_FULL_RETRY_MS
                };
                batch.messages.len()
            ];
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses, true);
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        self.claim_all(now, batch, &mut scratch.early);
        let (mut statuses, mut claims) = self.judge(now, &limits, batch, &mut scratch);
        self.seal_admitted(batch, &scratch.admitted, &mut statuses, &mut claims);
        self.append(now, taken, batch, statuses, claims, &mut scratch);
        self.scratch = scratch;
    }

    /// Whether the log's next group commit can take every message of `batch` (counted as
    /// if all were admitted, so the append that follows cannot find it full).
    fn has_room(&self, batch: &SubmitBatch) -> bool {
        let bytes: u64 = batch
            .messages
            .iter()
            .map(|m| {
                Log::record_bytes(
                    m.recipient.as_bytes().len(),
                    m.payload.len() + SEAL_OVERHEAD_BYTES,
                )
            })
            .sum();
        self.commit.log().has_room(batch.messages.len(), bytes)
    }

    /// Whether delivery can hold every message of `batch` once stored (always, with
    /// delivery off).
    fn delivery_room(&self, batch: &SubmitBatch) -> bool {
        let Some(d) = &self.delivery else {
            return true;
        };
        let bytes: u64 = batch
            .messages
            .iter()
            .map(|m| (m.payload.len() + SEAL_OVERHEAD_BYTES) as u64)
            .sum();
        d.has_room(batch.messages.len(), bytes, self.outbox.payload_bytes())
    }

    /// Whether `business_id`'s outbox can take `events` more beside the events waiting,
    /// those promised by records not durable yet, and those its pending messages still
    /// owe (two each: `sent` and a final one), so that no event is dropped for room (see
    /// `outbox.rs`). A business with nothing waiting or owed has room for one batch of
    /// any size. Without room, whose turn it is: the business's (most of it waits for
    /// its acknowledgements) or delivery's.
    pub(super) fn events_room(&self, business_id: u32, events: usize) -> EventsRoom {
        let Some(d) = &self.delivery else {
            return EventsRoom::Room;
        };
        let waiting = self.outbox.backlog(business_id) + self.events_promised.get(business_id);
        let owed = d.owed_to(business_id);
        if waiting + owed == 0 || waiting + owed + events <= self.outbox.per_business_max() {
            EventsRoom::Room
        } else if waiting >= owed {
            EventsRoom::BusinessBehind
        } else {
            EventsRoom::DeliveryBehind
        }
    }

    /// The payload checks and the idempotency claims, per message in order.
    fn claim_all(&mut self, now: Now, batch: &SubmitBatch, early: &mut Vec<Early>) {
        early.clear();
        for m in &batch.messages {
            let len = m.payload.len();
            if len == 0 || len > self.payload_bytes_max as usize {
                early.push(Early::Answered(Status::Rejected(Reason::PayloadTooLarge)));
                continue;
            }
            let answer = match self
                .idempotency
                .claim(batch.business_id, m.client_id, now.unix_ms)
            {
                Claim::Fresh(t) => Early::Claimed(t),
                Claim::Duplicate(p) => {
                    stats::add(&self.stats.duplicates, 1);
                    Early::Answered(Status::Duplicate(p))
                }
                Claim::InFlight => {
                    stats::add(&self.stats.in_flight_retries, 1);
                    Early::Answered(Status::Throttled {
                        retry_after_ms: IN_FLIGHT_RETRY_MS,
                    })
                }
            };
            early.push(answer);
        }
    }

    /// The detector's verdicts on the claimed messages (`scratch.early`), in one call.
    /// Returns every message's status (admitted ones as [`UNPLACED`]) and the claims of
    /// the admitted ones; their indexes in the batch go to `scratch.admitted`. Other
    /// claims are released.
    fn judge(
        &mut self,
        now: Now,
        limits: &BusinessLimits,
        batch: &SubmitBatch,
        scratch: &mut Scratch,
    ) -> (Vec<Status>, Vec<ClaimTicket>) {
        let Scratch {
            early,
            verdicts,
            admitted,
            spare_statuses,
            spare_claims,
            ..
        } = scratch;
        verdicts.clear();
        admitted.clear();
        let judged = batch
            .messages
            .iter()
            .zip(early.iter())
            .filter(|(_, e)| matches!(e, Early::Claimed(_)))
            .map(|(m, _)| &m.recipient);
        self.detector
            .observe_batch(now.unix_ms, limits, judged, verdicts);
        let mut verdicts = verdicts.drain(..);
        let mut statuses = spare_statuses.pop().unwrap_or_default();
        let mut claims = spare_claims.pop().unwrap_or_default();
        statuses.reserve(early.len());
        claims.reserve(early.len());
        for (i, e) in early.drain(..).enumerate() {
            let claim = match e {
                Early::Answered(status) => {
                    statuses.push(status);
                    continue;
                }
                Early::Claimed(claim) => claim,
            };
            let verdict = verdicts.next().expect("one verdict per claimed message");
            let status = match verdict {
                Verdict::Admit => {
                    admitted.push(i);
                    claims.push(claim);
                    statuses.push(UNPLACED);
                    continue;
                }
                Verdict::Throttle { retry_after_ms } => {
                    stats::add(&self.stats.detect_throttled, 1);
                    Status::Throttled { retry_after_ms }
                }
                Verdict::Reject(reason) => {
                    if matches!(reason, Reason::MessagingLimitReached | Reason::SenderPaused) {
                        stats::add(&self.stats.detect_rejected, 1);
                    }
                    Status::Rejected(reason)
                }
            };
            self.idempotency.release(claim);
            statuses.push(status);
        }
        assert!(verdicts.next().is_none(), "one verdict per claimed message");
        (statuses, claims)
    }

    /// Seals the admitted messages in one call (the keys of new recipients are derived
    /// together); sealed message k is admitted message k. A refusal answers every
    /// admitted message and releases its claim.
    fn seal_admitted(
        &mut self,
        batch: &SubmitBatch,
        admitted: &[usize],
        statuses: &mut [Status],
        claims: &mut Vec<ClaimTicket>,
    ) {
        self.sealed.clear();
        if admitted.is_empty() {
            return;
        }
        // Usually every message is admitted: then the batch's own list is sealed, and
        // only a batch with refusals builds a list of the admitted ones.
        let sealed = if admitted.len() == batch.messages.len() {
            self.sealer
                .seal_batch(batch.business_id, &batch.messages, &mut self.sealed)
        } else {
            let messages: Vec<&Message> = admitted.iter().map(|&i| &batch.messages[i]).collect();
            self.sealer
                .seal_batch(batch.business_id, &messages, &mut self.sealed)
        };
        let refused = match sealed {
            Ok(()) => return,
            Err(SealError::Key(e)) => {
                tracing::warn!(business = batch.business_id, error = %e, "no sealing key for this business");
                Status::Rejected(Reason::Unauthorized)
            }
            Err(e @ SealError::NoncesExhausted { .. }) => {
                tracing::error!(shard = self.shard.index(), error = %e, "sealer exhausted: restart the shard");
                Status::Rejected(Reason::StorageUnavailable)
            }
        };
        for &i in admitted {
            statuses[i] = refused;
        }
        for claim in claims.drain(..) {
            self.idempotency.release(claim);
        }
    }

    /// Appends the sealed messages and files the batch to wait for its group commit, or
    /// acks it now when nothing is stored.
    fn append(
        &mut self,
        now: Now,
        taken: Instant,
        batch: &SubmitBatch,
        mut statuses: Vec<Status>,
        claims: Vec<ClaimTicket>,
        scratch: &mut Scratch,
    ) {
        let positions = &mut scratch.positions;
        debug_assert_eq!(statuses.len(), batch.messages.len());
        let placed = statuses.iter().filter(|s| **s == UNPLACED).count();
        assert_eq!(
            placed,
            self.sealed.len(),
            "one sealed message per admitted one"
        );
        assert_eq!(placed, claims.len(), "one claim per admitted message");
        if placed == 0 {
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses, true);
            return;
        }
        let expires_ms = self
            .delivery
            .as_ref()
            .map_or(0, |d| d.config().expiry(now.unix_ms, batch.ttl_secs));
        let mut records = reuse(std::mem::take(&mut scratch.records));
        records.reserve(placed);
        let mut sealed = self.sealed.iter();
        for (m, s) in batch.messages.iter().zip(&statuses) {
            if *s == UNPLACED {
                records.push(Record {
                    header: RecordHeader::message(
                        batch.business_id,
                        now.unix_ms,
                        m.client_id,
                        m.recipient,
                        expires_ms,
                    ),
                    payload: sealed.next().expect("counted above"),
                });
            }
        }
        positions.clear();
        let appended = self.commit.append(now.unix_ms, &records, positions);
        // The records borrow the sealed bytes (through an opaque iterator, which lives
        // to the end of its scope unless dropped).
        drop(sealed);
        scratch.records = reuse(records);
        if let Err(e) = appended {
            assert!(
                e != LogError::Busy,
                "room was checked before the batch was taken"
            );
            self.release_claims(&claims);
            let refused = e.status();
            for s in statuses.iter_mut().filter(|s| **s == UNPLACED) {
                *s = refused;
            }
            self.ack(now, taken, batch.ticket, batch.business_id, &statuses, true);
            return;
        }
        let (admitted, shared_bytes) = self.admitted(batch, &statuses, positions, expires_ms);
        // Owed to the business once durable (then by delivery).
        self.events_promised
            .add(batch.business_id, 2 * admitted.len());
        let mut positions = positions.drain(..);
        for s in statuses.iter_mut().filter(|s| **s == UNPLACED) {
            *s = Status::Accepted(positions.next().expect("one position per record"));
        }
        let answer = Answer {
            ticket: batch.ticket,
            taken,
            business_id: batch.business_id,
            statuses,
            claims,
            billed: true,
        };
        if self.bugs.ack_before_sync {
            self.settle_claims(&answer);
            self.ack(
                now,
                taken,
                answer.ticket,
                answer.business_id,
                &answer.statuses,
                true,
            );
            // Delivery still waits for durability: the planted bug is in the ACK only.
            self.awaiting.push(Awaiting {
                answer: None,
                admitted,
                shared_bytes,
                events: Vec::new(),
                end_index: self.commit.log().next_index(),
            });
            return;
        }
        self.awaiting.push(Awaiting {
            answer: Some(answer),
            admitted,
            shared_bytes,
            events: Vec::new(),
            end_index: self.commit.log().next_index(),
        });
    }

    /// The messages of a batch just appended that enter delivery once durable (none with
    /// delivery off): their positions and sealed payloads, with the bytes of the buffer
    /// those payloads share. The payloads are slices of the batch's sealed buffer, taken
    /// over whole (no copy, no allocation per message); delivery counts that buffer in
    /// full while any of them waits (`delivery.rs`, "Payload buffers").
    fn admitted(
        &mut self,
        batch: &SubmitBatch,
        statuses: &[Status],
        positions: &[LogPosition],
        expires_ms: u64,
    ) -> (Vec<Admitted>, usize) {
        if self.delivery.is_none() {
            return (Vec::new(), 0);
        }
        let placed = batch
            .messages
            .iter()
            .zip(statuses)
            .filter(|(_, s)| **s == UNPLACED)
            .map(|(m, _)| m);
        let mut admitted = Vec::with_capacity(self.sealed.len());
        let (shared_bytes, payloads) = self.sealed.take_shared();
        admitted.extend(
            placed
                .zip(positions)
                .zip(payloads)
                .map(|((m, &message), payload)| Admitted {
                    message,
                    business_id: batch.business_id,
                    client_id: m.client_id,
                    recipient: m.recipient,
                    expires_ms,
                    payload,
                }),
        );
        (admitted, shared_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Recipient;

    #[test]
    fn a_reused_record_list_keeps_its_memory_across_lifetimes() {
        let first: Vec<Record<'static>> = Vec::with_capacity(64);
        let at = first.as_ptr() as usize;
        let payload = vec![7u8; 16];
        let mut records: Vec<Record<'_>> = reuse(first);
        assert_eq!(records.as_ptr() as usize, at, "the same allocation");
        assert!(records.capacity() >= 64);
        for i in 0..64 {
            records.push(Record {
                header: RecordHeader::message(1, 2, i, Recipient::parse(b"+15550100").unwrap(), 0),
                payload: &payload,
            });
        }
        let back: Vec<Record<'static>> = reuse(records);
        assert!(back.is_empty());
        assert_eq!(back.as_ptr() as usize, at, "still the same allocation");
    }
}
