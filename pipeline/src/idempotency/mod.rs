//! The idempotency table: which client message ids each business already has in the
//! log, so that a resend is answered `duplicate(original position)` instead of being
//! stored (and later delivered) twice.
//!
//! ```text
//!  shard k, per message (after Ingest::check, before the detector):
//!    claim(business, client id, now) ──> Duplicate(position)  answered at once
//!                                   ├──> InFlight            the first copy is not durable yet:
//!                                   │                        answered throttled(retry after)
//!                                   └──> Fresh(ticket) ──> detector, seal, log append
//!        not accepted after all (throttled, rejected, log refused) ──> release(ticket)
//!        durable (its group commit's fdatasync done), before the ACK ──> settle(ticket, pos)
//!  start-up: every record the recovery scan reads ──> restore(business, id, pos, time)
//! ```
//!
//! **One table for all shards.** A business's connections land on any shard, and a
//! client resends on a new connection after a failure, so a per-shard table would miss
//! most real resends. The table is therefore shared: [`STRIPES`] stripes, each behind its
//! own mutex, chosen by a keyed hash of (business, client id); a claim holds one stripe
//! lock for one hash probe. This is the one departure from shared-nothing in the
//! ingest path (see README "Where the code departs").
//!
//! **Exact.** Keys are stored whole (business id and client id), never as fingerprints:
//! a false `duplicate` would lose a message.
//!
//! **Bounded.** Each stripe is a ring of `entries / STRIPES` slots (24 bytes each) and an
//! index of slot numbers (hashbrown, 4 bytes per entry plus a control byte, at most 7/8
//! full), both allocated whole when the table is made: about 35 bytes per id. When a
//! stripe is full its oldest id is forgotten (counted in
//! [`IdStats::evicted`]); a resend of a forgotten id is stored again. The profile sets
//! `limits.idempotency_ids_max`; an operator sizes it as accepted messages per second ×
//! the resend window wanted (the metrics show the window actually held).
//!
//! **Only durable ids answer `duplicate`.** A copy whose first instance is still waiting
//! for its fdatasync gets `InFlight`: answering `duplicate` then, and losing the first
//! copy to a failed sync, would lose an acknowledged message.
//!
//! **Survives restarts.** The table is rebuilt from the log itself when the server starts
//! (the recovery scan reads every record anyway), so it needs no file of its own and can
//! never disagree with what is stored.

mod restore;

pub use restore::{idempotency_key, RestoreSet, RestoredId, RESTORE_BATCH};

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use hashbrown::HashTable;

use crate::wire::LogPosition;

/// Stripes of the table: enough that shards rarely wait for one another's lock.
pub const STRIPES: usize = 64;
/// Fewest ids a table remembers (the profile's bound is checked against it).
pub const ENTRIES_MIN: usize = 1024;
/// Most ids a table may remember.
pub const ENTRIES_MAX: usize = 1 << 30;

/// Set in the business id of a key that names a user's reply from the edge (its id is
/// the edge's), so replies and a business's own message ids never collide. Business
/// ids stay below `registry::BUSINESSES_MAX` (2^20).
pub const INBOUND_NAMESPACE: u32 = 1 << 31;
const _: () = assert!(crate::registry::BUSINESSES_MAX < INBOUND_NAMESPACE as usize);

/// Marks a slot whose message is claimed but not durable yet.
const PENDING: u64 = u64::MAX;
/// Marks a slot that holds nothing (released).
const VACANT: u64 = u64::MAX - 1;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The id is new: the caller owns it until it calls [`Idempotency::settle`] or
    /// [`Idempotency::release`] with the ticket.
    Fresh(ClaimTicket),
    /// The id is durable in the log at this position.
    Duplicate(LogPosition),
    /// Another copy of the id is being stored right now; ask again shortly.
    InFlight,
}

/// Proof of a fresh claim, to settle or release it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTicket {
    stripe: u32,
    slot: u32,
    business_id: u32,
    client_id: u64,
}

/// Figures for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdStats {
    /// Ids remembered now (durable and in flight).
    pub entries: u64,
    /// Most ids the table remembers.
    pub capacity: u64,
    /// Ids forgotten to make room, since start.
    pub evicted: u64,
    /// Of those, ids forgotten while their message was still in flight (the table is far
    /// too small for the load when this grows).
    pub evicted_in_flight: u64,
    /// Unix seconds of the oldest id still remembered (`None`: empty): the resend window
    /// the table holds is now minus this.
    pub oldest_secs: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    client_id: u64,
    /// A log position, [`PENDING`] or [`VACANT`].
    position: u64,
    business_id: u32,
    /// Unix seconds when the id was claimed (or stored, for restored ids).
    time_secs: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 24);

#[derive(Debug)]
struct Stripe {
    /// Grows to `capacity`, then used as a ring starting at `head`.
    slots: Vec<Slot>,
    capacity: usize,
    /// Next slot to overwrite once `slots` is full (the oldest).
    head: usize,
    /// Slot numbers of live slots, by the hash of their key.
    index: HashTable<u32>,
    evicted: u64,
    evicted_in_flight: u64,
}

/// One stripe on cache lines of its own: shards locking neighbouring stripes must not
/// bounce a shared line between their cores.
#[derive(Debug)]
#[repr(align(128))]
struct Padded(Mutex<Stripe>);

/// The shared idempotency table. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct Idempotency {
    stripes: Box<[Padded]>,
    hasher: RandomState,
}

impl Idempotency {
    /// A table remembering about `entries` ids (rounded up to whole stripes).
    /// Panics if `entries` is outside [`ENTRIES_MIN`]..=[`ENTRIES_MAX`] (profiles are
    /// checked against those bounds when they load).
    pub fn new(entries: usize) -> Idempotency {
        assert!(
            (ENTRIES_MIN..=ENTRIES_MAX).contains(&entries),
            "idempotency entries {entries} out of bounds"
        );
        let capacity = entries.div_ceil(STRIPES);
        let stripes = (0..STRIPES)
            .map(|_| {
                // Allocated whole up front: growing the index would rehash every id
                // (a cache miss each) in the middle of serving. Pages of the ring are
                // only touched as it fills.
                Padded(Mutex::new(Stripe {
                    slots: Vec::with_capacity(capacity),
                    capacity,
                    head: 0,
                    index: HashTable::with_capacity(capacity),
                    evicted: 0,
                    evicted_in_flight: 0,
                }))
            })
            .collect();
        Idempotency {
            stripes,
            hasher: RandomState::new(),
        }
    }

    /// Looks `client_id` of `business_id` up and, when it is new, claims it.
    pub fn claim(&self, business_id: u32, client_id: u64, now_ms: u64) -> Claim {
        let hash = self.hash(business_id, client_id);
        let stripe_no = stripe_of(hash);
        let mut stripe = self.lock(stripe_no);
        if let Some(slot) = stripe.find(hash, business_id, client_id) {
            return match stripe.slots[slot].position {
                PENDING => Claim::InFlight,
                p => Claim::Duplicate(LogPosition(p)),
            };
        }
        let slot = stripe.insert(
            &self.hasher,
            hash,
            Slot {
                client_id,
                position: PENDING,
                business_id,
                time_secs: secs(now_ms),
            },
        );
        Claim::Fresh(ClaimTicket {
            stripe: stripe_no as u32,
            slot: slot as u32,
            business_id,
            client_id,
        })
    }

    /// The claimed message is durable at `position`: later copies are `Duplicate`.
    /// A claim forgotten meanwhile (the table was too small) is not remembered again.
    pub fn settle(&self, ticket: ClaimTicket, position: LogPosition) {
        debug_assert!(position.0 < VACANT, "not a log position");
        let mut stripe = self.lock(ticket.stripe as usize);
        if let Some(s) = stripe.claimed(ticket) {
            s.position = position.0;
        }
    }

    /// The claimed message was not stored: its id is free again.
    pub fn release(&self, ticket: ClaimTicket) {
        let hash = self.hash(ticket.business_id, ticket.client_id);
        let mut stripe = self.lock(ticket.stripe as usize);
        if stripe.claimed(ticket).is_some() {
            stripe.remove(hash, ticket.slot as usize);
        }
    }

    /// Remembers an id read back from the log at start-up. Restore in time order (oldest
    /// first) so that, when the log holds more ids than the table, the newest stay.
    pub fn restore(&self, business_id: u32, client_id: u64, position: LogPosition, time_ms: u64) {
        let hash = self.hash(business_id, client_id);
        let mut stripe = self.lock(stripe_of(hash));
        if let Some(slot) = stripe.find(hash, business_id, client_id) {
            // The same id twice in the log (stored again after it was forgotten): the
            // newest copy answers.
            stripe.slots[slot].position = position.0;
            return;
        }
        stripe.insert(
            &self.hasher,
            hash,
            Slot {
                client_id,
                position: position.0,
                business_id,
                time_secs: secs(time_ms),
            },
        );
    }

    /// Current figures (locks each stripe in turn, briefly).
    pub fn stats(&self) -> IdStats {
        let mut st = IdStats::default();
        for i in 0..self.stripes.len() {
            let s = self.lock(i);
            st.entries += s.index.len() as u64;
            st.capacity += s.capacity as u64;
            st.evicted += s.evicted;
            st.evicted_in_flight += s.evicted_in_flight;
            if let Some(t) = s.oldest_secs() {
                st.oldest_secs = Some(st.oldest_secs.map_or(t, |o| o.min(t)));
            }
        }
        st
    }

    fn hash(&self, business_id: u32, client_id: u64) -> u64 {
        self.hasher.hash_one((business_id, client_id))
    }

    fn lock(&self, stripe: usize) -> MutexGuard<'_, Stripe> {
        // A panic while a stripe was locked leaves it consistent (every change is a few
        // field writes after the last fallible step), so a poisoned lock is still used.
        self.stripes[stripe]
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn stripe_of(hash: u64) -> usize {
    // The high bits: hashbrown uses the low ones for the bucket and the top 7 for tags;
    // these 6 sit in between so the three do not correlate.
    ((hash >> 40) as usize) % STRIPES
}

fn secs(ms: u64) -> u32 {
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}

fn slot_hash(hasher: &RandomState, s: &Slot) -> u64 {
    hasher.hash_one((s.business_id, s.client_id))
}

impl Stripe {
    fn find(&self, hash: u64, business_id: u32, client_id: u64) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| {
                let s = &slots[i as usize];
                s.business_id == business_id && s.client_id == client_id
            })
            .map(|&i| i as usize)
    }

    /// The slot of a fresh claim, if it is still that claim's and still in flight.
    fn claimed(&mut self, t: ClaimTicket) -> Option<&mut Slot> {
        self.slots.get_mut(t.slot as usize).filter(|s| {
            s.position == PENDING && s.business_id == t.business_id && s.client_id == t.client_id
        })
    }

    /// Drops live slot `slot` (whose key hashes to `hash`) from the index; the slot is
    /// vacant until the ring comes round to it.
    fn remove(&mut self, hash: u64, slot: usize) {
        let found = self.index.find_entry(hash, |&i| i as usize == slot);
        let entry = found.expect("a live slot is in the index");
        entry.remove();
        self.slots[slot].position = VACANT;
    }

    /// Writes `new` into the next slot (the oldest, once the ring is full) and indexes it.
    fn insert(&mut self, hasher: &RandomState, hash: u64, new: Slot) -> usize {
        let slot = if self.slots.len() < self.capacity {
            self.slots.push(new);
            self.slots.len() - 1
        } else {
            let slot = self.head;
            self.head = (self.head + 1) % self.capacity;
            let old = self.slots[slot];
            if old.position != VACANT {
                self.evicted += 1;
                if old.position == PENDING {
                    self.evicted_in_flight += 1;
                }
                self.remove(slot_hash(hasher, &old), slot);
            }
            self.slots[slot] = new;
            slot
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, slot as u32, |&i| {
            slot_hash(hasher, &slots[i as usize])
        });
        slot
    }

    fn oldest_secs(&self) -> Option<u32> {
        if self.index.is_empty() {
            return None;
        }
        // The ring's order is claim order; released slots are skipped. Bounded by the
        // ring's length.
        let n = self.slots.len();
        let start = if n < self.capacity { 0 } else { self.head };
        (0..n)
            .map(|k| &self.slots[(start + k) % n])
            .find(|s| s.position != VACANT)
            .map(|s| s.time_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pos(i: u64) -> LogPosition {
        LogPosition::new(crate::ShardId::new(1), i)
    }

    fn fresh(c: Claim) -> ClaimTicket {
        match c {
            Claim::Fresh(t) => t,
            other => panic!("expected a fresh claim, got {other:?}"),
        }
    }

    #[test]
    fn a_settled_id_is_a_duplicate_with_its_position_and_only_for_its_business() {
        let t = Idempotency::new(ENTRIES_MIN);
        let tk = fresh(t.claim(7, 42, 1_000));
        assert_eq!(t.claim(7, 42, 1_001), Claim::InFlight);
        t.settle(tk, pos(9));
        assert_eq!(t.claim(7, 42, 2_000), Claim::Duplicate(pos(9)));
        // Another business's id 42 is its own.
        let other = fresh(t.claim(8, 42, 2_000));
        t.settle(other, pos(10));
        assert_eq!(t.claim(8, 42, 2_000), Claim::Duplicate(pos(10)));
        assert_eq!(t.claim(7, 42, 2_000), Claim::Duplicate(pos(9)));
        assert_eq!(t.stats().entries, 2);
    }

    #[test]
    fn a_released_claim_frees_the_id_and_stale_tickets_do_nothing() {
        let t = Idempotency::new(ENTRIES_MIN);
        let first = fresh(t.claim(1, 5, 0));
        t.release(first);
        assert_eq!(t.stats().entries, 0);
        let second = fresh(t.claim(1, 5, 0));
        // The old ticket no longer owns the id: neither release nor settle touch it.
        t.release(first);
        t.settle(first, pos(1));
        assert_eq!(t.claim(1, 5, 0), Claim::InFlight);
        t.settle(second, pos(2));
        t.release(second);
        assert_eq!(t.claim(1, 5, 0), Claim::Duplicate(pos(2)));
    }

    #[test]
    fn a_full_table_forgets_the_oldest_ids_first_and_counts_them() {
        let t = Idempotency::new(ENTRIES_MIN);
        let cap = t.stats().capacity;
        assert!(cap >= ENTRIES_MIN as u64);
        let n = 4 * cap;
        for id in 0..n {
            let tk = fresh(t.claim(3, id, id * 1000));
            t.settle(tk, pos(id));
        }
        let st = t.stats();
        assert_eq!(st.entries + st.evicted, n);
        assert!(st.entries <= cap);
        assert_eq!(st.evicted_in_flight, 0);
        // The newest quarter is remembered in full (each stripe keeps its newest).
        for id in n - cap / 4..n {
            assert_eq!(t.claim(3, id, 0), Claim::Duplicate(pos(id)), "id {id}");
        }
        // The first ids are gone: they are fresh again.
        assert!(matches!(t.claim(3, 0, 0), Claim::Fresh(_)));
        // The oldest remembered time moved past the start.
        assert!(st.oldest_secs.unwrap() > 0);
    }

    #[test]
    fn restore_keeps_the_newest_position_of_an_id_and_answers_duplicate() {
        let t = Idempotency::new(ENTRIES_MIN);
        t.restore(2, 77, pos(1), 5_000);
        t.restore(2, 77, pos(8), 6_000);
        t.restore(2, 78, pos(9), 6_000);
        assert_eq!(t.claim(2, 77, 7_000), Claim::Duplicate(pos(8)));
        assert_eq!(t.claim(2, 78, 7_000), Claim::Duplicate(pos(9)));
        assert_eq!(t.stats().entries, 2);
        assert_eq!(t.stats().oldest_secs, Some(5));
    }

    /// Random claims, settles and releases against a model without a capacity limit:
    /// the ring never wraps here (fewer inserts than slots), so the table answers exactly
    /// as the model.
    #[test]
    fn matches_a_model_map_under_random_operations() {
        let t = Idempotency::new(ENTRIES_MIN * 64);
        let mut model: HashMap<(u32, u64), Option<u64>> = HashMap::new();
        let mut open: Vec<ClaimTicket> = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut position = 0;
        for _ in 0..20_000 {
            let r = next();
            match r % 4 {
                0 | 1 => {
                    let key = ((r >> 8) as u32 % 4, (r >> 16) % 1_500);
                    let got = t.claim(key.0, key.1, 0);
                    match model.get(&key) {
                        None => {
                            open.push(fresh(got));
                            model.insert(key, None);
                        }
                        Some(None) => assert_eq!(got, Claim::InFlight),
                        Some(Some(p)) => assert_eq!(got, Claim::Duplicate(LogPosition(*p))),
                    }
                }
                2 if !open.is_empty() => {
                    let tk = open.swap_remove((r >> 8) as usize % open.len());
                    position += 1;
                    t.settle(tk, LogPosition(position));
                    model.insert((tk.business_id, tk.client_id), Some(position));
                }
                3 if !open.is_empty() => {
                    let tk = open.swap_remove((r >> 8) as usize % open.len());
                    t.release(tk);
                    model.remove(&(tk.business_id, tk.client_id));
                }
                _ => {}
            }
        }
        let st = t.stats();
        assert_eq!(st.evicted, 0);
        assert_eq!(st.entries, model.len() as u64);
    }
}
