//! Fair shares of one shard's ingest between businesses (issue 18): one business's
//! backlog must not delay another's batches beyond a stated bound.
//!
//! ```text
//!  stream readable ──> business at its share?  yes ──> the stream is not read (QUIC flow
//!        │             (Shares::is_full)                control holds the sender back);
//!        │                                              resumed by that business's ACKs
//!        ▼ no: SUBMIT decoded (Shares::took)
//!  FairQueue: one queue per business ──> poll_batch takes one batch from the business
//!        whose turn it is, then moves it to the back of the turn
//!  Server::ack (Shares::acked) ──> below its share again: its waiting streams are read
//! ```
//!
//! **Two rules.**
//! 1. *A share per business*: at most `limits.batches_in_flight_per_business_max` SUBMITs
//!    of one business are decoded on a shard and not yet acked, all its connections and
//!    streams together. At the share its streams are simply not read: backpressure, not
//!    rejection; the sender sees its ACKs arrive and may send more. This bounds what one
//!    business can put in front of the shard whatever its connections × streams × depth.
//! 2. *Turns*: decoded batches wait in one queue per business, and the stage chain takes
//!    them round-robin, one batch per business per turn; a business whose queue was empty
//!    joins at the back of the turn.
//!
//! **The bound.** Let `B` be the number of other businesses with batches waiting in the
//! shard. From the moment a batch is decoded (and it is decoded as it arrives: its
//! stream is not paused while its business is below its share) until the stage chain
//! takes it into the log, **at most `B + 1` batches of other businesses are taken before
//! it** when it is the only batch its business has waiting: at most one per other
//! business ahead of it in the turn, plus the one batch the shard may hold while its
//! group commit has no room (`node::Held`). A batch with `k` earlier batches of its own
//! business waiting waits `k + 1` turns, so at most `(k + 1) × B + 1`. Every group commit
//! takes at least one whole batch (the log refuses a profile whose commit cannot), so the
//! batch is in the log by the `B + 2`-th group to open after it was decoded, and durable
//! (acked) once the commit in flight, the group filling then and those `B + 2` groups
//! are: within `B + 4` group commits. When batches are smaller than a group commit,
//! several share one, and the wait is shorter. The figure is measured
//! ([`FairQueue::others_ahead_max`], exported as `courier_batch_others_ahead_max`: the
//! most batches of other businesses taken while a batch was first of its business, the
//! queue's part `B` of the bound, without the held batch).
//!
//! Without the turns the queue was one FIFO for the shard, and a greedy business with many
//! connections and streams put its whole backlog (up to connections × streams ×
//! `batches_in_flight_per_stream_max` batches) in front of every other business's batch.
//!
//! Only SUBMITs count; a platform connection's REPORTs and an edge's INBOUNDs do not.
//! Memory: one queue entry per business with batches waiting or streams paused, at most
//! one per connection of the shard.

use std::collections::VecDeque;

use quinn_proto::{ConnectionHandle, StreamId};

use super::SubmitBatch;

/// One business's waiting batches.
#[derive(Debug)]
struct Queue {
    batches: VecDeque<SubmitBatch>,
    /// The shard's take count when the first batch became first.
    head_since: u64,
}

/// Decoded batches of every business of a shard, taken in turns. See the module docs.
#[derive(Debug, Default)]
pub(super) struct FairQueue {
    queues: crate::LocalMap<u32, Queue>,
    /// Businesses with batches waiting, in turn order (each once).
    turn: VecDeque<u32>,
    /// Batches taken since start.
    taken: u64,
    /// Most batches of other businesses taken while one batch was first of its business.
    others_ahead_max: u64,
    /// Emptied queues kept for the next businesses (at most [`SPARE_QUEUES_MAX`]), so a
    /// business whose queue empties and fills again between batches allocates nothing.
    spare: Vec<VecDeque<SubmitBatch>>,
}

/// Emptied queues a shard keeps for reuse.
const SPARE_QUEUES_MAX: usize = 16;

impl FairQueue {
    /// Queues a decoded batch behind its business's earlier ones.
    pub(super) fn push(&mut self, batch: SubmitBatch) {
        let business = batch.business_id;
        let taken = self.taken;
        let spare = &mut self.spare;
        let q = self.queues.entry(business).or_insert_with(|| Queue {
            batches: spare.pop().unwrap_or_default(),
            head_since: taken,
        });
        if q.batches.is_empty() {
            self.turn.push_back(business);
        }
        q.batches.push_back(batch);
    }

    /// The next batch: the first of the business whose turn it is.
    pub(super) fn pop(&mut self) -> Option<SubmitBatch> {
        let business = self.turn.pop_front()?;
        let q = self
            .queues
            .get_mut(&business)
            .expect("a business in the turn has a queue");
        let batch = q
            .batches
            .pop_front()
            .expect("a business in the turn has a batch");
        // Every batch taken while this one was first was another business's.
        let others = self.taken - q.head_since;
        self.others_ahead_max = self.others_ahead_max.max(others);
        self.taken += 1;
        q.head_since = self.taken;
        if q.batches.is_empty() {
            let q = self.queues.remove(&business).expect("just found");
            if self.spare.len() < SPARE_QUEUES_MAX {
                self.spare.push(q.batches);
            }
        } else {
            self.turn.push_back(business);
        }
        debug_assert_eq!(self.turn.len(), self.queues.len());
        Some(batch)
    }

    /// Batches waiting, all businesses together.
    pub(super) fn len(&self) -> usize {
        self.queues.values().map(|q| q.batches.len()).sum()
    }

    /// Most batches of other businesses taken while one batch was the first of its
    /// business here (the `B` of the module docs' bound, as it happened).
    pub(super) fn others_ahead_max(&self) -> u64 {
        self.others_ahead_max
    }
}

/// One business's batches in flight on the shard and its streams left unread.
#[derive(Debug, Default)]
struct Share {
    in_flight: u32,
    waiting: Vec<(ConnectionHandle, StreamId)>,
}

/// Every business's batches in flight on the shard, against its share.
#[derive(Debug)]
pub(super) struct Shares {
    share: u32,
    by_business: crate::LocalMap<u32, Share>,
}

impl Shares {
    /// Shares of `share` batches each (`limits.batches_in_flight_per_business_max`).
    pub(super) fn new(share: u32) -> Shares {
        assert!(share >= 1, "a share holds a batch");
        Shares {
            share,
            by_business: crate::LocalMap::default(),
        }
    }

    /// Whether `business` has its whole share in flight.
    pub(super) fn is_full(&self, business: u32) -> bool {
        self.by_business
            .get(&business)
            .is_some_and(|s| s.in_flight >= self.share)
    }

    /// A stream of `business` left unread because its share is full; read it again once
    /// an ACK frees room. The caller files each stream once until it is resumed.
    pub(super) fn wait(&mut self, business: u32, ch: ConnectionHandle, id: StreamId) {
        debug_assert!(self.is_full(business));
        self.by_business
            .entry(business)
            .or_default()
            .waiting
            .push((ch, id));
    }

    /// A SUBMIT of `business` was decoded.
    pub(super) fn took(&mut self, business: u32) {
        let s = self.by_business.entry(business).or_default();
        assert!(
            s.in_flight < self.share,
            "a full share's streams are not read"
        );
        s.in_flight += 1;
    }

    /// A SUBMIT of `business` was acked. Returns the streams to read again (all of its
    /// waiting ones once it is below its share; each pauses again at the share).
    pub(super) fn acked(&mut self, business: u32) -> Vec<(ConnectionHandle, StreamId)> {
        let std::collections::hash_map::Entry::Occupied(mut e) = self.by_business.entry(business)
        else {
            panic!("an ACK for a batch that was not counted");
        };
        let s = e.get_mut();
        assert!(s.in_flight > 0, "a batch is acked once");
        s.in_flight -= 1;
        let resumed = std::mem::take(&mut s.waiting);
        if s.in_flight == 0 {
            e.remove();
        }
        resumed
    }

    /// Batches of `business` in flight now.
    #[cfg(test)]
    pub(super) fn in_flight(&self, business: u32) -> u32 {
        self.by_business.get(&business).map_or(0, |s| s.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(business_id: u32, batch_id: u64) -> SubmitBatch {
        SubmitBatch {
            ticket: super::super::Ticket::for_tests(batch_id),
            business_id,
            batch_id,
            ttl_secs: 0,
            messages: Vec::new(),
        }
    }

    /// A greedy business with 100 batches waiting and a modest one with one: the modest
    /// batch is taken after at most one greedy batch (B = 1), and the greedy business
    /// keeps every other turn.
    #[test]
    fn a_modest_batch_waits_behind_one_batch_of_each_other_business() {
        let mut q = FairQueue::default();
        for i in 0..100 {
            q.push(batch(1, i));
        }
        let mut taken = Vec::new();
        for round in 0..20u64 {
            q.push(batch(2, 1_000 + round));
            let mut greedy_before = 0;
            loop {
                let b = q.pop().expect("batches wait");
                taken.push(b.business_id);
                if b.business_id == 2 {
                    break;
                }
                greedy_before += 1;
            }
            assert!(greedy_before <= 1, "round {round}: {greedy_before} ahead");
            // The greedy business progresses between the modest batches.
            assert_eq!(q.pop().map(|b| b.business_id), Some(1));
        }
        assert!(q.others_ahead_max() <= 1);
        let greedy_taken = taken.iter().filter(|&&b| b == 1).count() + 20;
        assert_eq!(q.len(), 100 - greedy_taken);
    }

    /// Batches of one business keep their order; three businesses alternate.
    #[test]
    fn turns_go_round_and_each_business_keeps_its_order() {
        let mut q = FairQueue::default();
        for i in 0..3 {
            for b in 1..=3 {
                q.push(batch(b, u64::from(b) * 10 + i));
            }
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|b| b.batch_id)).collect();
        assert_eq!(order, vec![10, 20, 30, 11, 21, 31, 12, 22, 32]);
        assert_eq!(
            q.others_ahead_max(),
            2,
            "one batch of each other business per turn"
        );
        assert_eq!(q.len(), 0);
    }

    /// The share: full at `share` decoded and unacked, streams filed while full are handed
    /// back by the next ACK, and an emptied business is forgotten.
    #[test]
    fn a_share_fills_hands_back_its_waiting_streams_and_empties() {
        let mut s = Shares::new(2);
        s.took(7);
        assert!(!s.is_full(7));
        s.took(7);
        assert!(s.is_full(7));
        assert!(!s.is_full(8), "another business has its own share");
        let ch = ConnectionHandle(3);
        let id = StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 1);
        s.wait(7, ch, id);
        assert_eq!(s.acked(7), vec![(ch, id)]);
        assert!(!s.is_full(7));
        assert!(s.acked(7).is_empty());
        assert_eq!(s.in_flight(7), 0);
        assert!(s.by_business.is_empty());
    }
}
