//! A shard's bounded cache of expanded recipient keys (ring's AES-256 key schedule and
//! GHASH key powers, held inline beside the way's tag, ready to seal), so that a repeat
//! recipient costs no HKDF and no key schedule.
//!
//! Four-way set associative: the set is chosen by a hash of (business, recipient); a miss
//! fills an empty way or evicts one by CLOCK within the set (a way used since the hand
//! last passed gets a second chance). Lookup and eviction touch at most four entries
//! (the hand moves at most eight steps), so their cost is bounded whatever the traffic;
//! all entries are allocated when the cache is built, and filling a way allocates
//! nothing. Each set keeps a 16-bit fingerprint of the hash per way beside its CLOCK
//! bits, in an array apart from the ways: a lookup reads a way only when its fingerprint
//! matches, so a miss reads no way at all (it writes the one it fills) and a hit reads
//! only its own. (Two ways were measured first: with 1,000 recipients cycling through
//! 4,096 ways, 7% of lookups still missed on sets that drew three keys; four ways bring
//! that near zero.) The hash is fixed (no seed): a business that aims recipients at one
//! set only causes misses, which cost what sending to new recipients costs anyway.

use ring::aead::LessSafeKey;

use super::{expand, RecipientKey, KEY_BYTES};
use crate::wire::Recipient;

/// A way's tag: whose key it holds, the derived key, and whether the expanded key beside
/// it (in [`KeyCache::expanded`]) is this key's. One cache line: filling a way
/// on a miss writes this line only, and all tags of a 4,096-key cache (256 KiB) stay in
/// the core's L2, while the expanded keys (about 0.5 KiB each) are read only on a hit
/// and written only when a recipient's second message expands its key.
#[repr(align(64))]
struct Tag {
    business_id: u32,
    recipient: Recipient,
    derived: [u8; KEY_BYTES],
    expanded: bool,
}

/// Hits and misses since the cache was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found the recipient's key (no HKDF).
    pub hits: u64,
    /// Lookups that derived the key (HKDF) and expanded it for that one message.
    pub misses: u64,
    /// Hits on a way that held only the derived key, which was then expanded into the
    /// way (a recipient's second message since it entered the cache).
    pub expansions: u64,
}

/// Ways per set.
const WAYS: usize = 4;

/// A set's bookkeeping, apart from its ways: 12 bytes, so all sets of a 4,096-key cache
/// take 12 KiB and stay in the core's caches, while a way (tag and key, about 0.6 KiB)
/// is only read when its fingerprint matches, or written when it is filled.
#[derive(Clone, Copy, Default)]
struct SetState {
    /// Per way: 16 bits of the hash of its (business, recipient), when occupied.
    fingerprints: [u16; WAYS],
    /// Bit `w`: way `w` holds an entry.
    occupied: u8,
    /// Bit `w`: way `w` was used since the CLOCK hand last passed it.
    used: u8,
    /// The next way the CLOCK hand looks at.
    hand: u8,
}

pub(crate) struct KeyCache {
    /// `sets * WAYS` ways; way `WAYS * set + w`.
    ways: Vec<Option<Tag>>,
    /// Per way, its expanded key (ring's AES-256 key schedule and GHASH key powers,
    /// inline) once its recipient sent a second message. Holds the way's key only while
    /// its tag says `expanded`; a refilled way's old key stays until overwritten, as
    /// ring leaves its key schedules in memory anyway.
    expanded: Vec<Option<LessSafeKey>>,
    sets: Vec<SetState>,
    set_mask: usize,
    stats: CacheStats,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("capacity", &self.ways.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The cache's hash of (business, recipient): computed once per message and handed to
/// both [`KeyCache::probably_holds`] and [`KeyCache::with_key`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyHash(u64);

impl KeyHash {
    pub(crate) fn of(business_id: u32, recipient: &Recipient) -> KeyHash {
        KeyHash(hash(business_id, recipient))
    }
}

fn hash(business_id: u32, recipient: &Recipient) -> u64 {
    // FxHash-style fold of the zero-padded number (two fixed words, no variable-length
    // copy) then a murmur3 finaliser: a few multiplies, no seed.
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let p = recipient.padded();
    let lo = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(p[8..].try_into().expect("8 bytes"));
    let mut h = u64::from(business_id).wrapping_mul(K);
    h = (h.rotate_left(5) ^ lo).wrapping_mul(K);
    h = (h.rotate_left(5) ^ hi).wrapping_mul(K);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

impl KeyCache {
    /// A cache of `keys_max` keys rounded down to a power of two (minimum 4).
    pub(crate) fn new(keys_max: usize) -> KeyCache {
        let keys = keys_max.max(WAYS);
        let keys = 1usize << (usize::BITS - 1 - keys.leading_zeros());
        let sets = keys / WAYS;
        KeyCache {
            ways: (0..keys).map(|_| None).collect(),
            expanded: (0..keys).map(|_| None).collect(),
            sets: vec![SetState::default(); sets],
            set_mask: sets - 1,
            stats: CacheStats::default(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.ways.len()
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether a way of (business, recipient)'s set carries its fingerprint: true for
    /// every cached key, and for 4 in 65,536 others. Reads no way.
    pub(crate) fn probably_holds(&self, KeyHash(h): KeyHash) -> bool {
        let state = &self.sets[(h as usize) & self.set_mask];
        let fingerprint = (h >> 48) as u16;
        (0..WAYS).any(|w| state.occupied & (1 << w) != 0 && state.fingerprints[w] == fingerprint)
    }

    /// Calls `use_key` with the expanded key of (business, recipient), whose hash is `h`.
    ///
    /// On a miss, `derive` hands over the recipient's key (from the caller's scratch: no
    /// copy of the key on the stack to wipe); it is expanded on the stack for
    /// this one use, and only the 32 derived bytes go into the way (a recipient seen once
    /// costs what a new key costs, plus one HKDF, and writes one way's tag and 32 bytes
    /// rather than a 0.5 KiB expanded key into memory that is probably cold). On the
    /// recipient's next hit the way's key is expanded in place and stays expanded.
    pub(crate) fn with_key<'k, E, R>(
        &mut self,
        KeyHash(h): KeyHash,
        business_id: u32,
        recipient: &Recipient,
        derive: impl FnOnce() -> Result<&'k RecipientKey, E>,
        use_key: impl FnOnce(&LessSafeKey) -> R,
    ) -> Result<R, E> {
        debug_assert_eq!(h, hash(business_id, recipient));
        let set = (h as usize) & self.set_mask;
        let fingerprint = (h >> 48) as u16;
        let base = WAYS * set;
        let state = &mut self.sets[set];
        let ways = &self.ways;
        let hit = (0..WAYS).find(|&w| {
            state.occupied & (1 << w) != 0
                && state.fingerprints[w] == fingerprint
                && matches!(&ways[base + w],
                    Some(e) if e.business_id == business_id && e.recipient == *recipient)
        });
        if let Some(w) = hit {
            self.stats.hits += 1;
            state.used |= 1 << w;
            let tag = self.ways[base + w].as_mut().expect("way just found");
            let slot = &mut self.expanded[base + w];
            if !tag.expanded {
                *slot = Some(expand(&RecipientKey::from_bytes(tag.derived)));
                tag.expanded = true;
                self.stats.expansions += 1;
            }
            return Ok(use_key(slot.as_ref().expect("expanded with its tag")));
        }

        let derived = derive()?;
        self.stats.misses += 1;
        let key = expand(derived);
        let w = match (0..WAYS).find(|&w| state.occupied & (1 << w) == 0) {
            Some(empty) => empty,
            None => loop {
                // Bounded: each step clears a bit, so within 2 * WAYS steps the hand
                // finds a way with its bit clear.
                let h = state.hand as usize;
                state.hand = ((h + 1) % WAYS) as u8;
                if state.used & (1 << h) == 0 {
                    break h;
                }
                state.used &= !(1 << h);
            },
        };
        // Seal first, fill the way after: the way is probably cold, and ring's seal
        // starts with a load that waits for every earlier store to reach the cache
        // (measured: about 5% of a miss when the fill came first).
        let result = use_key(&key);
        self.ways[base + w] = Some(Tag {
            business_id,
            recipient: *recipient,
            derived: *derived.as_bytes(),
            expanded: false,
        });
        state.occupied |= 1 << w;
        state.fingerprints[w] = fingerprint;
        // A new key earns its second chance by being used again, so a stream of one-off
        // recipients evicts itself before the set's repeat ones.
        state.used &= !(1 << w);
        Ok(result)
    }

    /// Empties way `w` of `set`.
    fn clear(&mut self, set: usize, w: usize) {
        self.ways[WAYS * set + w] = None;
        self.expanded[WAYS * set + w] = None;
        let state = &mut self.sets[set];
        state.occupied &= !(1 << w);
        state.used &= !(1 << w);
    }

    /// Drops the cached key of (business, recipient), if any.
    pub(crate) fn forget(&mut self, business_id: u32, recipient: &Recipient) {
        let set = (hash(business_id, recipient) as usize) & self.set_mask;
        for w in 0..WAYS {
            if matches!(&self.ways[WAYS * set + w],
                Some(e) if e.business_id == business_id && e.recipient == *recipient)
            {
                self.clear(set, w);
            }
        }
    }

    /// Drops every cached key of a business (its root key was replaced or removed).
    pub(crate) fn forget_business(&mut self, business_id: u32) {
        for i in 0..self.ways.len() {
            if matches!(&self.ways[i], Some(e) if e.business_id == business_id) {
                self.clear(i / WAYS, i % WAYS);
            }
        }
    }

    /// Checks that the sets' bookkeeping agrees with the ways (tests).
    #[cfg(test)]
    fn assert_consistent(&self) {
        for (i, way) in self.ways.iter().enumerate() {
            let state = &self.sets[i / WAYS];
            let bit = 1 << (i % WAYS);
            assert_eq!(way.is_some(), state.occupied & bit != 0, "way {i}");
            if let Some(e) = way {
                let h = hash(e.business_id, &e.recipient);
                assert_eq!(h as usize & self.set_mask, i / WAYS, "way {i} in its set");
                assert_eq!(state.fingerprints[i % WAYS], (h >> 48) as u16, "way {i}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static KEY: RecipientKey = RecipientKey::from_bytes([3; 32]);

    fn key() -> Result<&'static RecipientKey, ()> {
        Ok(&KEY)
    }

    fn tag_of(k: &LessSafeKey) -> [u8; 16] {
        let tag = k
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([0; 12]),
                ring::aead::Aad::empty(),
                &mut [0u8; 4],
            )
            .unwrap();
        tag.as_ref().try_into().unwrap()
    }

    /// Looks up (business, recipient) with the test key; whether it was just derived,
    /// stored derived or stored expanded, the key handed out is that key.
    fn get(c: &mut KeyCache, business_id: u32, recipient: &Recipient) {
        let expected = tag_of(&expand(&RecipientKey::from_bytes([3; 32])));
        let h = KeyHash::of(business_id, recipient);
        let got = c.with_key(h, business_id, recipient, key, tag_of).unwrap();
        assert_eq!(got, expected);
    }

    fn r(i: u32) -> Recipient {
        Recipient::parse(format!("+1555{i:07}").as_bytes()).unwrap()
    }

    #[test]
    fn a_way_holds_its_key_inline_within_the_documented_bound() {
        // The Sealer's docs promise about 0.6 KiB per cached key, allocated up front.
        assert_eq!(
            std::mem::size_of::<Option<Tag>>(),
            64,
            "a tag in one cache line"
        );
        assert_eq!(std::mem::align_of::<Option<Tag>>(), 64);
        let way = std::mem::size_of::<Option<Tag>>() + std::mem::size_of::<Option<LessSafeKey>>();
        assert!(way <= 640, "{way} bytes per way");
    }

    #[test]
    fn capacity_is_a_bounded_power_of_two() {
        assert_eq!(KeyCache::new(0).capacity(), 4);
        assert_eq!(KeyCache::new(1000).capacity(), 512);
        assert_eq!(KeyCache::new(1024).capacity(), 1024);
    }

    #[test]
    fn repeats_hit_and_the_working_set_stays_within_capacity() {
        let mut c = KeyCache::new(4096);
        for round in 0..3 {
            for i in 0..1000 {
                get(&mut c, 1, &r(i));
            }
            let s = c.stats();
            assert_eq!(s.hits + s.misses, 1000 * (round + 1));
        }
        // With 4,096 ways for 1,000 keys a set rarely overflows: nearly all repeat
        // lookups hit.
        assert!(c.stats().hits >= 1980, "{:?}", c.stats());
        let occupied = c.ways.iter().filter(|w| w.is_some()).count();
        assert!(occupied <= c.capacity());
        c.assert_consistent();
    }

    #[test]
    fn eviction_keeps_a_hot_key_when_cold_ones_stream_through() {
        // One set: a hot recipient between every cold one. CLOCK gives the hot key a
        // second chance each time the hand passes it, so it never misses after its first.
        let mut c = KeyCache::new(4);
        for i in 0..200 {
            get(&mut c, 1, &r(0));
            get(&mut c, 1, &r(1000 + i));
        }
        assert_eq!(c.stats().hits, 199, "{:?}", c.stats());
        assert_eq!(c.stats().misses, 201);
        // Only the hot key was ever used twice: expanded into its way once.
        assert_eq!(c.stats().expansions, 1);
        assert!(c.ways.iter().all(|w| w.is_some()));
        assert_eq!(c.ways.len(), 4);
        c.assert_consistent();
    }

    #[test]
    fn a_failing_make_leaves_the_cache_unchanged_and_forget_drops() {
        let mut c = KeyCache::new(8);
        assert_eq!(c.capacity(), 8);
        assert!(c
            .with_key(
                KeyHash::of(1, &r(1)),
                1,
                &r(1),
                || Err::<&RecipientKey, _>(()),
                |_| ()
            )
            .is_err());
        assert_eq!(c.stats(), CacheStats::default());
        get(&mut c, 1, &r(1));
        get(&mut c, 1, &r(1));
        assert_eq!(c.stats().hits, 1);
        c.forget(1, &r(1));
        c.assert_consistent();
        get(&mut c, 1, &r(1));
        assert_eq!(c.stats().misses, 2);
        get(&mut c, 2, &r(1));
        c.forget_business(1);
        c.assert_consistent();
        assert_eq!(c.ways.iter().filter(|w| w.is_some()).count(), 1);
        // Business 2's key survived business 1's removal; business 1 misses again.
        get(&mut c, 2, &r(1));
        get(&mut c, 1, &r(1));
        assert_eq!(c.stats().hits, 2);
        assert_eq!(c.stats().misses, 4);
        c.forget_business(2);
        c.forget_business(1);
        assert!(c.ways.iter().all(|w| w.is_none()));
        c.assert_consistent();
    }
}
