//! Rebuilding the idempotency table at start-up: every shard's recovery reads its log's
//! client ids in parallel and offers them here; the newest `cap` of all shards are kept
//! (memory for `cap` ids however many the logs hold and however they are spread), then
//! restored oldest first, so that the newest stay when the logs hold more than the table.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use super::{Idempotency, INBOUND_NAMESPACE};
use crate::log::{RecordHeader, RecordKind};
use crate::wire::LogPosition;

/// The business id under which a record's id is remembered: a message's under its
/// business, a user's reply under its business in the inbound namespace; `None` for
/// records without an id (statuses, cursors).
pub fn idempotency_key(h: &RecordHeader) -> Option<u32> {
    match h.kind {
        RecordKind::Message => Some(h.business_id),
        RecordKind::Inbound => Some(h.business_id | INBOUND_NAMESPACE),
        RecordKind::Status | RecordKind::Cursor => None,
    }
}

/// Ids a shard's recovery should hand over at a time (see [`RestoreSet::offer`]).
pub const RESTORE_BATCH: usize = 4096;

/// A client id read back from a shard's log at start-up; ordered by time first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RestoredId {
    /// When the record was accepted, unix ms.
    pub time_ms: u64,
    /// Where it is.
    pub position: LogPosition,
    /// Its business.
    pub business_id: u32,
    /// Its client id.
    pub client_id: u64,
}

/// The newest `cap` client ids of all shards' logs, gathered while the shards recover.
#[derive(Debug)]
pub struct RestoreSet {
    cap: usize,
    newest: Mutex<BinaryHeap<Reverse<RestoredId>>>,
}

impl RestoreSet {
    /// A set keeping at most `cap` ids (the table's capacity).
    pub fn new(cap: usize) -> RestoreSet {
        RestoreSet {
            cap,
            newest: Mutex::new(BinaryHeap::new()),
        }
    }

    /// Takes a batch of ids (leaving `ids` empty), keeping the newest `cap` overall.
    pub fn offer(&self, ids: &mut Vec<RestoredId>) {
        let mut heap = self
            .newest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in ids.drain(..) {
            if heap.len() < self.cap {
                heap.push(Reverse(id));
            } else if heap.peek().is_some_and(|Reverse(oldest)| id > *oldest) {
                heap.pop();
                heap.push(Reverse(id));
            }
        }
    }

    /// The ids, oldest first.
    pub fn into_sorted(self) -> Vec<RestoredId> {
        let heap = self
            .newest
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Ascending `Reverse` is descending time.
        let mut v: Vec<RestoredId> = heap.into_sorted_vec().into_iter().map(|r| r.0).collect();
        v.reverse();
        v
    }

    /// Restores the kept ids into `table`, oldest first; returns how many were offered.
    pub fn restore_into(self, table: &Idempotency) -> usize {
        let ids = self.into_sorted();
        for r in &ids {
            table.restore(r.business_id, r.client_id, r.position, r.time_ms);
        }
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(time_ms: u64, shard: u8, index: u64) -> RestoredId {
        RestoredId {
            time_ms,
            position: LogPosition::new(crate::ShardId::new(shard), index),
            business_id: 1,
            client_id: index,
        }
    }

    #[test]
    fn the_restore_set_keeps_the_newest_ids_of_all_shards_oldest_first() {
        let set = RestoreSet::new(5);
        // Shard 0 is all old, shard 1 all new, offered in small batches interleaved.
        let mut a: Vec<RestoredId> = (0..4).map(|i| id(100 + i, 0, i)).collect();
        let mut b: Vec<RestoredId> = (0..4).map(|i| id(200 + i, 1, i)).collect();
        let mut c: Vec<RestoredId> = (4..8).map(|i| id(100 + i, 0, i)).collect();
        set.offer(&mut b);
        set.offer(&mut a);
        set.offer(&mut c);
        assert!(a.is_empty() && b.is_empty() && c.is_empty());
        let times: Vec<u64> = set.into_sorted().iter().map(|r| r.time_ms).collect();
        assert_eq!(times, [107, 200, 201, 202, 203]);
    }
}
