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
//! **Bounded.** Each stripe holds `entries / STRIPES` slots (40 bytes each: the key,
//! the position, the time and two pairs of list links) and an index of slot numbers
//! (hashbrown, 4 bytes per entry plus a control byte, at most 7/8 full), both allocated
//! whole when the table is made: about 51 bytes per id. The profile sets
//! `limits.idempotency_ids_max`; an operator sizes it as accepted messages per second ×
//! the resend window wanted (the metrics show the window actually held).
//!
//! **Fair shares.** One table serves every business, so without a rule one business
//! submitting many fresh ids would push every other business's ids out, and their
//! resends would be stored twice. Each business has a share,
//! `limits.idempotency_ids_per_business_max` (per stripe: that over [`STRIPES`], rounded
//! up). A business may use free room beyond its share, but when a stripe is full the id
//! it forgets is, in this order:
//!
//! 1. the inserting business's own oldest id, if it holds its share or more;
//! 2. else the oldest id of a business holding more than its share;
//! 3. else the oldest id of the stripe.
//!
//! So **a business within its share loses an id to another business only when no
//! business exceeds its share** (step 3): a flood from one business, however large,
//! recycles that business's own ids once it holds its share, and the others keep their
//! newest ids up to their share. Step 3 happens only when the businesses within their
//! share fill a stripe by themselves, that is when shares × businesses sending exceed the
//! table; it is counted ([`IdStats::evicted_within_share`]) so an operator sees that the
//! table or the share needs sizing. Each stripe keeps two lists through its slots: all
//! ids in claim order (step 3) and each business's ids in claim order (steps 1 and 2),
//! plus the businesses above their share; every step is O(1).
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

use std::collections::HashMap;
use std::hash::BuildHasher;

/// The table's hasher: foldhash, keyed with a random seed per process. Ids are chosen by
/// senders, so with a hasher without a secret key one sender could make many ids collide
/// on purpose; SipHash (the standard library's) resists that too but took 2-3% of the
/// server's profile samples under load (two hashes per claim once the table is full: the
/// id's and the forgotten id's; BENCHMARKS.md "Zero-copy ingest"). foldhash is not a cryptographic hash: its seed could in principle be
/// learnt from timing by a sender that measures the table for a long time; the stripes'
/// bounded size and the per-business shares bound what such a sender could slow down.
type RandomState = foldhash::quality::RandomState;
/// Business ids come from the registry, not from senders: a fast hasher without a key.
type OwnerHasher = foldhash::fast::FixedState;
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

/// The top byte of a log position is 0 (shard ids are below 256 and take 16 bits over
/// 48 index bits), so positions with a top byte of 0xFF or 0xFE are free for markers.
/// A slot whose message is claimed but not durable yet holds `PENDING | claim number`:
/// the number (unique in its stripe for 2^56 claims) tells a stale ticket from the
/// current claim of a reused slot.
const PENDING: u64 = 0xFF << 56;
/// Claim numbers: the low 56 bits.
const CLAIM_MASK: u64 = (1 << 56) - 1;
/// Marks a slot that holds nothing (released or never used).
const VACANT: u64 = 0xFE << 56;
const _: () = assert!(
    (crate::shard_id::SHARDS_MAX as u64) << LogPosition::INDEX_BITS <= VACANT,
    "no log position looks like a marker"
);

fn is_pending(position: u64) -> bool {
    position & !CLAIM_MASK == PENDING
}
/// The end of a list of slots.
const NIL: u32 = u32::MAX;

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
    /// The claim's number: the slot's position while it is in flight.
    claim: u64,
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
    /// Of those, ids of a business within its share forgotten to make room for another
    /// business (rule 3 of the module docs): shares × businesses sending exceed the table.
    pub evicted_within_share: u64,
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
    /// Neighbours in the stripe's claim order (older, newer); a vacant slot's `newer`
    /// links the free list.
    older: u32,
    newer: u32,
    /// Neighbours among the same business's slots, in claim order.
    business_older: u32,
    business_newer: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 40);

/// One business's ids in a stripe.
#[derive(Debug, Clone, Copy)]
struct Owner {
    count: u32,
    oldest: u32,
    newest: u32,
    /// Its place in `Stripe::over` while it holds more than its share, else [`NIL`].
    over_at: u32,
}

#[derive(Debug)]
struct Stripe {
    /// Grows to `capacity`; slots are then reused through the free list or by eviction.
    slots: Vec<Slot>,
    capacity: usize,
    /// Most ids of one business this stripe keeps when it is full.
    share: u32,
    /// Oldest and newest live slot (claim order), and the first free slot.
    oldest: u32,
    newest: u32,
    free: u32,
    /// Slot numbers of live slots, by the hash of their key.
    index: HashTable<u32>,
    /// Businesses with live ids here (at most one entry per live slot).
    owners: HashMap<u32, Owner, OwnerHasher>,
    /// Businesses holding more than their share.
    over: Vec<u32>,
    /// Number of the next claim (see [`PENDING`]).
    claims: u64,
    evicted: u64,
    evicted_in_flight: u64,
    evicted_within_share: u64,
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
    /// A table remembering about `entries` ids (rounded up to whole stripes), of which
    /// each business is guaranteed about `share` (see the module docs). Panics if
    /// `entries` is outside [`ENTRIES_MIN`]..=[`ENTRIES_MAX`] or `share` outside
    /// [`ENTRIES_MIN`]..=`entries` (profiles are checked against those bounds when they
    /// load).
    pub fn new(entries: usize, share: usize) -> Idempotency {
        assert!(
            (ENTRIES_MIN..=ENTRIES_MAX).contains(&entries),
            "idempotency entries {entries} out of bounds"
        );
        assert!(
            (ENTRIES_MIN..=entries).contains(&share),
            "idempotency share {share} out of bounds"
        );
        let capacity = entries.div_ceil(STRIPES);
        let share = u32::try_from(share.div_ceil(STRIPES)).expect("bounded by ENTRIES_MAX");
        assert!(capacity < NIL as usize && share >= 1);
        let stripes = (0..STRIPES)
            .map(|_| {
                // Allocated whole up front: growing the index would rehash every id
                // (a cache miss each) in the middle of serving. Pages of the slots are
                // only touched as they fill.
                Padded(Mutex::new(Stripe {
                    slots: Vec::with_capacity(capacity),
                    capacity,
                    share,
                    oldest: NIL,
                    newest: NIL,
                    free: NIL,
                    index: HashTable::with_capacity(capacity),
                    owners: HashMap::default(),
                    over: Vec::new(),
                    claims: 0,
                    evicted: 0,
                    evicted_in_flight: 0,
                    evicted_within_share: 0,
                }))
            })
            .collect();
        Idempotency {
            stripes,
            hasher: RandomState::default(),
        }
    }

    /// Looks `client_id` of `business_id` up and, when it is new, claims it.
    pub fn claim(&self, business_id: u32, client_id: u64, now_ms: u64) -> Claim {
        let hash = self.hash(business_id, client_id);
        let stripe_no = stripe_of(hash);
        let mut stripe = self.lock(stripe_no);
        if let Some(slot) = stripe.find(hash, business_id, client_id) {
            let p = stripe.slots[slot].position;
            return match is_pending(p) {
                true => Claim::InFlight,
                false => Claim::Duplicate(LogPosition(p)),
            };
        }
        let claim = stripe.claims;
        stripe.claims = (claim + 1) & CLAIM_MASK;
        let pending = PENDING | claim;
        let slot = stripe.insert(&self.hasher, hash, business_id, client_id, pending, now_ms);
        Claim::Fresh(ClaimTicket {
            stripe: stripe_no as u32,
            slot: slot as u32,
            business_id,
            client_id,
            claim,
        })
    }

    /// The claimed message is durable at `position`: later copies are `Duplicate`.
    /// A claim forgotten meanwhile (the table was too small) is not remembered again.
    pub fn settle(&self, ticket: ClaimTicket, position: LogPosition) {
        assert!(position.0 < VACANT, "not a log position");
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
            business_id,
            client_id,
            position.0,
            time_ms,
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
            st.evicted_within_share += s.evicted_within_share;
            if let Some(t) = s.oldest_secs() {
                st.oldest_secs = Some(st.oldest_secs.map_or(t, |o| o.min(t)));
            }
        }
        st
    }

    /// Ids of `business_id` remembered now (a scan of every stripe's owners; for tests
    /// and diagnostics, not the hot path).
    pub fn entries_of(&self, business_id: u32) -> u64 {
        (0..self.stripes.len())
            .map(|i| {
                self.lock(i)
                    .owners
                    .get(&business_id)
                    .map_or(0, |o| u64::from(o.count))
            })
            .sum()
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
            s.position == PENDING | t.claim
                && s.business_id == t.business_id
                && s.client_id == t.client_id
        })
    }

    /// Remembers a new id in a free slot, or in the slot of the id the fair-share rule
    /// forgets when the stripe is full (see the module docs), and indexes it.
    fn insert(
        &mut self,
        hasher: &RandomState,
        hash: u64,
        business_id: u32,
        client_id: u64,
        position: u64,
        time_ms: u64,
    ) -> usize {
        let slot = match self.take_free() {
            Some(slot) => slot,
            None => {
                let victim = self.victim(business_id);
                let old = self.slots[victim];
                debug_assert_ne!(old.position, VACANT, "a victim is live");
                self.evicted += 1;
                if is_pending(old.position) {
                    self.evicted_in_flight += 1;
                }
                self.remove(slot_hash(hasher, &old), victim);
                self.take_free().expect("the victim's slot was freed")
            }
        };
        self.slots[slot] = Slot {
            client_id,
            position,
            business_id,
            time_secs: secs(time_ms),
            older: NIL,
            newer: NIL,
            business_older: NIL,
            business_newer: NIL,
        };
        self.link(slot);
        let slots = &self.slots;
        self.index.insert_unique(hash, slot as u32, |&i| {
            slot_hash(hasher, &slots[i as usize])
        });
        debug_assert!(self.index.len() <= self.capacity);
        slot
    }

    /// A slot never used or released, if any.
    fn take_free(&mut self) -> Option<usize> {
        if self.free != NIL {
            let slot = self.free as usize;
            self.free = self.slots[slot].newer;
            return Some(slot);
        }
        if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                client_id: 0,
                position: VACANT,
                business_id: 0,
                time_secs: 0,
                older: NIL,
                newer: NIL,
                business_older: NIL,
                business_newer: NIL,
            });
            return Some(self.slots.len() - 1);
        }
        None
    }

    /// The live slot a full stripe forgets to make room for an id of `business_id`.
    fn victim(&mut self, business_id: u32) -> usize {
        if let Some(own) = self.owners.get(&business_id) {
            if own.count >= self.share {
                return own.oldest as usize;
            }
        }
        if let Some(&greedy) = self.over.last() {
            return self.owners[&greedy].oldest as usize;
        }
        // Every business is within its share and the stripe is full.
        self.evicted_within_share += 1;
        assert_ne!(self.oldest, NIL, "a full stripe has an oldest id");
        self.oldest as usize
    }

    /// Appends live slot `slot` to the claim order and to its business's list.
    fn link(&mut self, slot: usize) {
        let s = slot as u32;
        let business_id = self.slots[slot].business_id;
        self.slots[slot].older = self.newest;
        match self.newest {
            NIL => self.oldest = s,
            n => self.slots[n as usize].newer = s,
        }
        self.newest = s;
        let share = self.share;
        let owner = self.owners.entry(business_id).or_insert(Owner {
            count: 0,
            oldest: NIL,
            newest: NIL,
            over_at: NIL,
        });
        let prev = owner.newest;
        owner.newest = s;
        if prev == NIL {
            owner.oldest = s;
        }
        owner.count += 1;
        let over = owner.count > share && owner.over_at == NIL;
        if over {
            owner.over_at = self.over.len() as u32;
        }
        if prev != NIL {
            self.slots[prev as usize].business_newer = s;
        }
        self.slots[slot].business_older = prev;
        if over {
            self.over.push(business_id);
        }
    }

    /// Takes live slot `slot` out of both lists and of its business's count.
    fn unlink(&mut self, slot: usize) {
        let Slot {
            older,
            newer,
            business_older,
            business_newer,
            business_id,
            ..
        } = self.slots[slot];
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        if business_older != NIL {
            self.slots[business_older as usize].business_newer = business_newer;
        }
        if business_newer != NIL {
            self.slots[business_newer as usize].business_older = business_older;
        }
        let owner = self
            .owners
            .get_mut(&business_id)
            .expect("a live slot's owner");
        if owner.oldest == slot as u32 {
            owner.oldest = business_newer;
        }
        if owner.newest == slot as u32 {
            owner.newest = business_older;
        }
        owner.count -= 1;
        let (count, over_at) = (owner.count, owner.over_at);
        if over_at != NIL && count <= self.share {
            owner.over_at = NIL;
            self.over.swap_remove(over_at as usize);
            if let Some(&moved) = self.over.get(over_at as usize) {
                self.owners.get_mut(&moved).expect("listed over").over_at = over_at;
            }
        }
        if count == 0 {
            self.owners.remove(&business_id);
        }
    }

    /// Forgets live slot `slot` (whose key hashes to `hash`): out of the index and the
    /// lists, onto the free list.
    fn remove(&mut self, hash: u64, slot: usize) {
        let found = self.index.find_entry(hash, |&i| i as usize == slot);
        let entry = found.expect("a live slot is in the index");
        entry.remove();
        self.unlink(slot);
        let s = &mut self.slots[slot];
        s.position = VACANT;
        s.older = NIL;
        s.newer = self.free;
        self.free = slot as u32;
    }

    /// Walks both lists and checks them against the index, the counts and `over`.
    #[cfg(test)]
    fn check(&self) {
        let mut n = 0;
        let mut at = self.oldest;
        let mut prev = NIL;
        while at != NIL {
            let s = &self.slots[at as usize];
            assert_ne!(s.position, VACANT);
            assert_eq!(s.older, prev);
            n += 1;
            assert!(n <= self.capacity, "a cycle in the claim order");
            prev = at;
            at = s.newer;
        }
        assert_eq!(prev, self.newest);
        assert_eq!(n, self.index.len());
        let mut by_owner = 0;
        for (&b, o) in &self.owners {
            let mut k = 0;
            let mut at = o.oldest;
            let mut prev = NIL;
            while at != NIL {
                let s = &self.slots[at as usize];
                assert_eq!(s.business_id, b);
                assert_eq!(s.business_older, prev);
                k += 1;
                assert!(k <= o.count, "a cycle in a business's list");
                prev = at;
                at = s.business_newer;
            }
            assert_eq!(prev, o.newest);
            assert_eq!(k, o.count);
            by_owner += k as usize;
            let over = o.count > self.share;
            assert_eq!(o.over_at != NIL, over);
            if over {
                assert_eq!(self.over[o.over_at as usize], b);
            }
        }
        assert_eq!(by_owner, n);
        assert!(self.over.iter().all(|b| self.owners[b].count > self.share));
    }

    fn oldest_secs(&self) -> Option<u32> {
        (self.oldest != NIL).then(|| self.slots[self.oldest as usize].time_secs)
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
        let t = Idempotency::new(ENTRIES_MIN, ENTRIES_MIN);
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
        let t = Idempotency::new(ENTRIES_MIN, ENTRIES_MIN);
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
        let t = Idempotency::new(ENTRIES_MIN, ENTRIES_MIN);
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
        let t = Idempotency::new(ENTRIES_MIN, ENTRIES_MIN);
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
        let t = Idempotency::new(ENTRIES_MIN * 64, ENTRIES_MIN * 64);
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

    /// Business 2 keeps a few hundred recent ids; business 1 then floods the table with
    /// four times its capacity of fresh ids. With shares, every id of business 2 still
    /// answers `duplicate` (a resend is not stored twice); without (one share = the whole
    /// table, as before issue 18), the flood forgets them.
    #[test]
    fn a_flood_from_one_business_leaves_the_others_ids_within_their_share() {
        let entries = ENTRIES_MIN * 64;
        let run = |share: usize| -> (u64, IdStats) {
            let t = Idempotency::new(entries, share);
            for id in 0..500 {
                let tk = fresh(t.claim(2, id, 1_000));
                t.settle(tk, pos(id));
            }
            let flood = 4 * t.stats().capacity;
            for id in 0..flood {
                let tk = fresh(t.claim(1, id, 2_000 + id));
                t.settle(tk, pos(1_000_000 + id));
            }
            let kept = (0..500)
                .filter(|&id| t.claim(2, id, 3_000) == Claim::Duplicate(pos(id)))
                .count() as u64;
            for s in t.stripes.iter() {
                s.0.lock().unwrap().check();
            }
            (kept, t.stats())
        };
        let (kept, st) = run(entries / 4);
        assert_eq!(kept, 500, "every id of the modest business is remembered");
        assert_eq!(st.evicted_within_share, 0);
        assert_eq!(st.entries, st.capacity, "the flood still uses the rest");
        let (kept_unfair, _) = run(entries);
        assert!(
            kept_unfair < 50,
            "without shares the flood forgets them: {kept_unfair}"
        );
    }

    /// A business alone may use the whole table, beyond its share (free room is lent).
    #[test]
    fn a_lone_business_uses_the_free_room_beyond_its_share() {
        let t = Idempotency::new(ENTRIES_MIN * 4, ENTRIES_MIN);
        let cap = t.stats().capacity;
        for id in 0..2 * cap {
            let tk = fresh(t.claim(5, id, 0));
            t.settle(tk, pos(id));
        }
        assert_eq!(t.stats().entries, cap);
        assert_eq!(t.entries_of(5), cap);
        // Its newest ids are the ones kept.
        assert_eq!(
            t.claim(5, 2 * cap - 1, 0),
            Claim::Duplicate(pos(2 * cap - 1))
        );
        assert!(matches!(t.claim(5, 0, 0), Claim::Fresh(_)));
        assert_eq!(t.stats().evicted_within_share, 0);
    }

    /// Businesses all within their share that fill the table lose their oldest ids to
    /// each other, and the table counts it (the operator's sign to resize).
    #[test]
    fn businesses_within_their_share_filling_the_table_are_counted() {
        let t = Idempotency::new(ENTRIES_MIN * 4, ENTRIES_MIN * 2);
        let cap = t.stats().capacity;
        // Eight businesses with a quarter of the table each: twice the table.
        for id in 0..cap / 4 {
            for b in 0..8 {
                let tk = fresh(t.claim(b, id, id));
                t.settle(tk, pos(id));
            }
        }
        let st = t.stats();
        assert_eq!(st.entries, cap);
        assert!(st.evicted_within_share > 0);
        assert_eq!(st.evicted, 2 * (cap / 4) * 4 - cap);
    }

    /// Random claims, settles and releases of five businesses, one of them greedy, on a
    /// small table: the lists, counts and the set of businesses over their share stay
    /// consistent with the index after every operation.
    #[test]
    fn lists_stay_consistent_under_random_operations_on_a_full_table() {
        let t = Idempotency::new(ENTRIES_MIN, ENTRIES_MIN);
        // A share of 4 per stripe, by hand: the profile's floor is the whole table here.
        for s in t.stripes.iter() {
            s.0.lock().unwrap().share = 4;
        }
        let mut open: Vec<ClaimTicket> = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for step in 0..40_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = if x.is_multiple_of(3) {
                (x >> 8) as u32 % 5
            } else {
                0
            };
            match (x >> 16) % 4 {
                0 | 1 => {
                    if let Claim::Fresh(tk) = t.claim(b, (x >> 24) % 5_000, step) {
                        open.push(tk);
                    }
                }
                2 if !open.is_empty() => {
                    let tk = open.swap_remove((x >> 32) as usize % open.len());
                    t.settle(tk, pos(step));
                }
                3 if !open.is_empty() => {
                    let tk = open.swap_remove((x >> 32) as usize % open.len());
                    t.release(tk);
                }
                _ => {}
            }
            if step % 997 == 0 {
                for s in t.stripes.iter() {
                    s.0.lock().unwrap().check();
                }
            }
        }
        let st = t.stats();
        assert!(st.evicted > 0, "the table was full");
        assert!(st.entries <= st.capacity);
    }
}
