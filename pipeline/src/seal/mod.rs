//! Per-recipient sealing of whole batches: AES-256-GCM under each recipient's key, with
//! nonces that never repeat under a key, across crashes and restarts included.
//!
//! ```text
//!  Submit batch (business, [Message])
//!    └─ Sealer::seal_batch(business, messages, &mut SealedBatch)    one Sealer per shard
//!         per chunk of 16: keys of the likely cache misses, RecipientKeys::recipient_keys
//!                          (DerivedKeys: HKDF two at a time, SHA-256 interleaved)
//!         per message:
//!           key   = KeyCache hit, or that key + AES key schedule (ring) on the stack
//!           nonce = (epoch (u32 BE) | shard (u16 BE) | counter (48-bit BE)) XOR run mask
//!           aad   = "courier/seal/v1" | business (u32 LE) | client id (u64 LE)
//!                   | recipient length (u8) | recipient E.164 bytes
//!           out  += nonce(12) | ciphertext | tag(16)
//!  recipient side: open(key, business, recipient, client id, sealed, &mut out)
//! ```
//!
//! **Nonce uniqueness.** Two guarantees, one for a data directory that only ever moves
//! forward and one for a data directory restored from an older copy:
//!
//! - *Deterministic, while the keyrings are intact.* Before the mask, a nonce is unique
//!   across the whole relay: the shard index separates shards, the counter separates
//!   messages of one sealer, and the epoch separates runs. The caller must **persist a
//!   fresh epoch before each start** (the log's keyring does: read the last epoch, write
//!   and fsync epoch + 1, then build the sealers), and must never build two sealers with
//!   the same (epoch, shard). XOR with one mask is a bijection, so a sealer's nonces stay
//!   distinct among themselves whatever its mask.
//! - *Probabilistic, whatever was restored.* The recipient keys come from the business
//!   root keys (`business-keys`), the epochs from each shard's keyring: restoring the log
//!   (or losing a shard's folder) from an older copy hands out epochs a second time under
//!   the same keys. So every sealer also XORs its nonces with a 96-bit **run mask** the
//!   shell draws from the operating system's random source when it builds the sealer and
//!   never stores. Two sealers repeat a nonce under one key only if their masks differ by
//!   exactly the XOR of two of their structured nonces for that key: for `q` messages
//!   sealed under a key over its whole life, across any number of runs, restores and
//!   crashes, the chance that any two share a nonce is at most `q² / 2^97`, below 2^-33
//!   even for 2^32 messages to one recipient (and NIST SP 800-38D's bound for random
//!   nonces, 2^32 per key, is far from any recipient's traffic). A mask costs no
//!   randomness per message: one XOR. The opener reads the nonce from the message and
//!   needs no mask.
//!
//! The counter is 48 bits; a sealer refuses to seal past it ([`SealError::NoncesExhausted`])
//! instead of wrapping, and the remedy is a new epoch, i.e. a restart of the shard.
//!
//! **Hot path without allocation.** [`SealedBatch`] is owned by the caller and reused
//! across batches: `clear()` keeps its capacity, so once it has grown to the largest batch
//! seen, sealing appends into memory it already holds. Neither a cache hit nor a miss
//! allocates: ring's keys are plain inline values, and the cache's ways are allocated
//! when it is built. A miss derives the key (HKDF), expands it on the stack for that
//! message and stores only the 32 derived bytes (after sealing, so the seal does not wait
//! behind the store to a cold way); the recipient's next message expands it into its way
//! for good.
//!
//! **Implementations, chosen by measurement** (`benches/seal.rs`, BENCHMARKS.md,
//! "Sealing (issue 4)"): the sealer seals with ring (its VAES/VPCLMULQDQ AES-GCM sealed
//! more messages per second than aws-lc-rs and the `aes-gcm` crate at 256 B and 1 KiB,
//! with one key and with a new key per message, and its key is built without a heap
//! allocation). [`open`] and the root-key wrapping use aws-lc-rs; both are AES-256-GCM
//! and produce the same bytes (checked by a differential test), so every round trip in
//! the tests also crosses the two implementations.

mod cache;
pub mod keys;

use std::borrow::Borrow;

use bytes::Bytes;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

pub use cache::CacheStats;
use cache::{KeyCache, KeyHash};
pub use keys::{
    unwrap_root_key, wrap_root_key, DerivedKeys, KeyError, RecipientKey, RecipientKeys, RootKey,
    UnwrapError, WrappedRootKey, KEY_BYTES,
};

use crate::wire::{Message, Recipient, RECIPIENT_BYTES_MAX};
use crate::ShardId;

/// Bytes of the nonce at the start of a sealed message.
pub const SEAL_NONCE_BYTES: usize = NONCE_LEN;
/// Bytes of the tag at the end of a sealed message.
pub const SEAL_TAG_BYTES: usize = 16;
/// Bytes a sealed message adds to its payload.
pub const SEAL_OVERHEAD_BYTES: usize = SEAL_NONCE_BYTES + SEAL_TAG_BYTES;
/// Counters per (epoch, shard): 2^48. The sealer stops before the counter would wrap.
pub const COUNTER_END: u64 = 1 << 48;
/// Domain-separation prefix of the associated data; a new layout gets a new version.
pub const AAD_PREFIX: &[u8] = b"courier/seal/v1";

/// Messages of a batch whose missing keys are asked of the key source together: enough
/// for pairs to form, few enough that the keys stay in a small scratch of the sealer.
pub const DERIVE_CHUNK: usize = 16;
const AAD_BYTES_MAX: usize = AAD_PREFIX.len() + 4 + 8 + 1 + RECIPIENT_BYTES_MAX;
const _: () = assert!(4 + 2 + 6 == SEAL_NONCE_BYTES);

/// Why a batch was not sealed. A failed [`Sealer::seal_batch`] leaves `out` as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The sealer's 48-bit counter would wrap: restart the shard with a fresh, persisted
    /// epoch. Nothing of the batch was sealed.
    #[error("nonce counter of epoch {epoch}, shard {shard} exhausted; restart with a new epoch")]
    NoncesExhausted {
        /// Epoch of the exhausted sealer.
        epoch: u32,
        /// Shard of the exhausted sealer.
        shard: ShardId,
    },
    /// No key for a recipient of this batch; nothing of the batch was kept.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Why a sealed message did not open. Deliberately one opaque cause: an attacker learns
/// nothing from which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short to hold a nonce and a tag.
    #[error("sealed message shorter than nonce and tag")]
    Truncated,
    /// Wrong key, wrong business, recipient or client id, or changed bytes.
    #[error("sealed message failed authentication")]
    Authentication,
}

/// The 12-byte structured nonce of `(epoch, shard, counter)`, big endian, counter in 48
/// bits, before the run mask.
pub fn nonce_bytes(epoch: u32, shard: ShardId, counter: u64) -> [u8; SEAL_NONCE_BYTES] {
    assert!(counter < COUNTER_END, "counter is 48 bits");
    let mut n = [0; SEAL_NONCE_BYTES];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..6].copy_from_slice(&u16::from(shard).to_be_bytes());
    n[6..].copy_from_slice(&counter.to_be_bytes()[2..]);
    n
}

/// Writes the associated data of a message into `buf`; returns its length. Fixed-size
/// copies only: the recipient goes in zero-padded and the length cuts the padding off.
fn aad(
    business_id: u32,
    recipient: &Recipient,
    client_id: u64,
    buf: &mut [u8; AAD_BYTES_MAX],
) -> usize {
    const P: usize = AAD_PREFIX.len();
    buf[..P].copy_from_slice(AAD_PREFIX);
    buf[P..P + 4].copy_from_slice(&business_id.to_le_bytes());
    buf[P + 4..P + 12].copy_from_slice(&client_id.to_le_bytes());
    let r = recipient.as_bytes().len();
    buf[P + 12] = r as u8;
    buf[P + 13..].copy_from_slice(recipient.padded());
    P + 13 + r
}

/// The sealer's expanded key (ring): AES-256 key schedule and GHASH key powers, held
/// inline (no heap).
fn expand(key: &RecipientKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_bytes()).expect("32-byte key"))
}

/// The opening key (aws-lc-rs).
fn expand_for_open(key: &RecipientKey) -> aws_lc_rs::aead::LessSafeKey {
    use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_bytes()).expect("32-byte key"))
}

/// The sealed messages of a batch, back to back in one buffer the caller reuses:
/// message `i` is `nonce(12) | ciphertext | tag(16)`, in the order sealed. `Debug`
/// shows counts only.
#[derive(Default, Clone)]
pub struct SealedBatch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl std::fmt::Debug for SealedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBatch")
            .field("messages", &self.ends.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl SealedBatch {
    /// An empty batch.
    pub fn new() -> SealedBatch {
        SealedBatch::default()
    }

    /// An empty batch that holds `messages` sealed messages of `bytes` in total without
    /// growing (each sealed message is its payload plus [`SEAL_OVERHEAD_BYTES`]).
    pub fn with_capacity(messages: usize, bytes: usize) -> SealedBatch {
        SealedBatch {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(messages),
        }
    }

    /// Empties the batch, keeping its memory for the next one.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Sealed messages held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Sealed message `i`.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }

    /// The sealed messages in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }

    /// All sealed bytes, back to back.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Hands the sealed messages over as slices of one shared buffer, in order, with
    /// that buffer's capacity in bytes, and empties the batch: no message is copied, and
    /// the batch's next use allocates a buffer anew. Every slice keeps the whole buffer.
    pub fn take_shared(&mut self) -> (usize, impl Iterator<Item = Bytes> + '_) {
        let capacity = self.bytes.capacity();
        let shared = Bytes::from(std::mem::take(&mut self.bytes));
        let mut start = 0;
        let slices = self.ends.drain(..).map(move |end| {
            let slice = shared.slice(start..end);
            start = end;
            slice
        });
        (capacity, slices)
    }

    /// Bytes of memory held (for limits and metrics).
    pub fn capacity_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    fn truncate(&mut self, messages: usize) {
        self.ends.truncate(messages);
        self.bytes.truncate(self.ends.last().copied().unwrap_or(0));
    }
}

/// How to build a shard's [`Sealer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealerConfig {
    /// The run's nonce epoch. The caller must have persisted it (durably) before this
    /// start, and never hand the same epoch to two runs: see the module docs.
    pub epoch: u32,
    /// The shard this sealer serves; no two sealers of one epoch share it.
    pub shard: ShardId,
    /// XORed into every nonce: drawn from the operating system's random source for each
    /// sealer and never stored, so that a data directory restored from an older copy
    /// cannot make a nonce repeat (see the module docs). Zero only in tests that check
    /// the structured nonces.
    pub nonce_mask: [u8; SEAL_NONCE_BYTES],
    /// Expanded keys the shard keeps (rounded down to a power of two, at least 4: one set
    /// of the 4-way cache).
    pub cache_keys_max: usize,
}

/// One shard's sealer: its nonce counter, its cache of expanded keys and a source of
/// recipient keys. Sans-IO: no clock, no randomness, no threads.
///
/// For the integrator: build one per shard at start, with the epoch the keyring
/// persisted; per batch call [`seal_batch`](Sealer::seal_batch) once with the messages
/// admitted (a slice of them or of references to them: new recipients' keys are derived
/// together) into a `SealedBatch` the shard reuses, then append the sealed messages to
/// the log. [`seal`](Sealer::seal) seals a single message. On
/// [`SealError::NoncesExhausted`] stop acking and restart the shard.
///
/// Memory is bounded by the profile: the cache holds `cache_keys_max` keys (about
/// 0.6 KiB each, allocated when the sealer is built: ring's expanded key inline), the output batch the largest batch's payload
/// plus 28 bytes per message.
///
/// ```
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use courier_pipeline::seal::{open, DerivedKeys, RecipientKey, RecipientKeys, RootKey,
///     SealedBatch, Sealer, SealerConfig};
/// use courier_pipeline::wire::{Message, Recipient};
/// use courier_pipeline::ShardId;
///
/// // At start: root keys unwrapped from the keyring, epoch persisted by the keyring.
/// let mut keys = DerivedKeys::new();
/// keys.insert_root(7, &RootKey::from_bytes([1; 32]));
/// let keys = Arc::new(keys);
/// let config = SealerConfig { epoch: 42, shard: ShardId::new(0), nonce_mask: rand::random(), cache_keys_max: 4096 };
/// let mut sealer = Sealer::new(keys.clone(), config);
/// let mut sealed = SealedBatch::new();
///
/// // Per batch.
/// let to = Recipient::parse(b"+15550001111").unwrap();
/// let batch = [Message { client_id: 1, recipient: to, payload: Bytes::from_static(b"hi") }];
/// sealed.clear();
/// sealer.seal_batch(7, &batch, &mut sealed).unwrap();
///
/// // The recipient's side.
/// let mut key = RecipientKey::zeroed();
/// keys.recipient_key(7, &to, &mut key).unwrap();
/// let mut plain = Vec::new();
/// assert_eq!(open(&key, 7, &to, 1, sealed.get(0).unwrap(), &mut plain).unwrap(), b"hi");
/// ```
pub struct Sealer<K> {
    keys: K,
    cache: KeyCache,
    epoch: u32,
    shard: ShardId,
    nonce_mask: [u8; SEAL_NONCE_BYTES],
    counter: u64,
    /// The keys derived ahead for a chunk of a batch, and in the last slot the key of a
    /// miss that was not (reused; the cache's ways hold such keys anyway).
    derived: [RecipientKey; DERIVE_CHUNK + 1],
}

impl<K> std::fmt::Debug for Sealer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("epoch", &self.epoch)
            .field("shard", &self.shard)
            .field("counter", &self.counter)
            .field("cache", &self.cache)
            .finish()
    }
}

impl<K: RecipientKeys> Sealer<K> {
    /// Replaces the key source, keeping the counter and the cache: the caller hands a
    /// source that derives the same key as the old one for every (business, recipient)
    /// the old one knew (new businesses added), so cached keys stay right.
    pub fn set_keys(&mut self, keys: K) {
        self.keys = keys;
    }

    /// A sealer whose counter starts at 0 under `config.epoch`.
    pub fn new(keys: K, config: SealerConfig) -> Sealer<K> {
        Sealer {
            keys,
            cache: KeyCache::new(config.cache_keys_max),
            epoch: config.epoch,
            shard: config.shard,
            nonce_mask: config.nonce_mask,
            counter: 0,
            derived: std::array::from_fn(|_| RecipientKey::zeroed()),
        }
    }

    /// Seals every message of a batch of `business_id` (messages or references to
    /// them), appending them in order to `out` (which the caller clears between
    /// batches). All or nothing: on error `out` holds what it held before; the counters
    /// of a failed batch are skipped, never reused.
    ///
    /// Per chunk of [`DERIVE_CHUNK`] messages, the keys of the recipients the cache
    /// probably lacks are asked of the key source together
    /// ([`RecipientKeys::recipient_keys`]: [`DerivedKeys`] derives them two at a time,
    /// their SHA-256 compressions interleaved), then each message is sealed in order.
    pub fn seal_batch<M: Borrow<Message>>(
        &mut self,
        business_id: u32,
        messages: &[M],
        out: &mut SealedBatch,
    ) -> Result<(), SealError> {
        self.reserve(messages.len() as u64)?;
        let before = out.len();
        let payload_bytes: usize = messages.iter().map(|m| m.borrow().payload.len()).sum();
        out.bytes
            .reserve(payload_bytes + messages.len() * SEAL_OVERHEAD_BYTES);
        out.ends.reserve(messages.len());
        for chunk in messages.chunks(DERIVE_CHUNK) {
            // The keys of the recipients the cache probably lacks. A guess: `with_key`
            // still decides hit or miss, and a miss without a key here (the guess said
            // hit, or the source failed, which the message's own lookup then reports)
            // derives its own.
            let mut recipients = [chunk[0].borrow().recipient; DERIVE_CHUNK];
            let mut slot = [usize::MAX; DERIVE_CHUNK];
            let mut hashes = [KeyHash::default(); DERIVE_CHUNK];
            let mut n = 0;
            for (i, m) in chunk.iter().enumerate() {
                let recipient = &m.borrow().recipient;
                hashes[i] = KeyHash::of(business_id, recipient);
                if !self.cache.probably_holds(hashes[i]) {
                    recipients[n] = *recipient;
                    slot[i] = n;
                    n += 1;
                }
            }
            let have = n > 0
                && self
                    .keys
                    .recipient_keys(business_id, &recipients[..n], &mut self.derived[..n])
                    .is_ok();
            for (i, m) in chunk.iter().enumerate() {
                let pre = (have && slot[i] != usize::MAX).then_some(slot[i]);
                if let Err(e) = self.seal_unchecked(business_id, m.borrow(), hashes[i], pre, out) {
                    out.truncate(before);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Seals one message, appending it to `out`.
    pub fn seal(
        &mut self,
        business_id: u32,
        message: &Message,
        out: &mut SealedBatch,
    ) -> Result<(), SealError> {
        self.reserve(1)?;
        let h = KeyHash::of(business_id, &message.recipient);
        self.seal_unchecked(business_id, message, h, None, out)
    }

    /// Fails unless `n` more counters fit before the counter would wrap.
    fn reserve(&self, n: u64) -> Result<(), SealError> {
        match self.counter.checked_add(n) {
            Some(end) if end <= COUNTER_END => Ok(()),
            _ => Err(SealError::NoncesExhausted {
                epoch: self.epoch,
                shard: self.shard,
            }),
        }
    }

    /// Seals one message; the caller has checked the counter.
    #[inline(always)]
    fn seal_unchecked(
        &mut self,
        business_id: u32,
        m: &Message,
        h: KeyHash,
        derived: Option<usize>,
        out: &mut SealedBatch,
    ) -> Result<(), SealError> {
        let counter = self.counter;
        // The counter moves before the key lookup: a failed lookup burns the nonce.
        self.counter += 1;
        let mut nonce = nonce_bytes(self.epoch, self.shard, counter);
        for (n, m) in nonce.iter_mut().zip(&self.nonce_mask) {
            *n ^= m;
        }
        let mut aad_buf = [0; AAD_BYTES_MAX];
        let aad_len = aad(business_id, &m.recipient, m.client_id, &mut aad_buf);
        let start = out.bytes.len();
        out.bytes.extend_from_slice(&nonce);
        out.bytes.extend_from_slice(&m.payload);
        let keys = &self.keys;
        let scratch = &mut self.derived;
        let sealed: Result<_, KeyError> = self.cache.with_key(
            h,
            business_id,
            &m.recipient,
            move || match derived {
                Some(d) => Ok(&scratch[d]),
                None => {
                    // Not derived ahead: into the scratch's own slot for this, apart
                    // from the keys derived ahead for later messages of the chunk.
                    let single = &mut scratch[DERIVE_CHUNK];
                    keys.recipient_key(business_id, &m.recipient, single)?;
                    Ok(&*single)
                }
            },
            |key| {
                key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad_buf[..aad_len]),
                    &mut out.bytes[start + SEAL_NONCE_BYTES..],
                )
                .expect("payload within AES-GCM's 64 GiB limit")
            },
        );
        let tag = match sealed {
            Ok(tag) => tag,
            Err(e) => {
                out.bytes.truncate(start);
                return Err(e.into());
            }
        };
        out.bytes.extend_from_slice(tag.as_ref());
        debug_assert_eq!(
            out.bytes.len() - start,
            m.payload.len() + SEAL_OVERHEAD_BYTES
        );
        out.ends.push(out.bytes.len());
        Ok(())
    }

    /// Drops the cached key of one recipient (its key source changed it).
    pub fn forget(&mut self, business_id: u32, recipient: &Recipient) {
        self.cache.forget(business_id, recipient);
    }

    /// Drops every cached key of a business (its root key was replaced or removed).
    pub fn forget_business(&mut self, business_id: u32) {
        self.cache.forget_business(business_id);
    }

    /// The key source.
    pub fn keys(&self) -> &K {
        &self.keys
    }

    /// The key source, e.g. to load a business's root key.
    pub fn keys_mut(&mut self) -> &mut K {
        &mut self.keys
    }

    /// Messages this sealer can still seal before it needs a new epoch.
    pub fn nonces_left(&self) -> u64 {
        COUNTER_END - self.counter
    }

    /// Cache hits and misses so far.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Keys the cache holds at most.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Test hook: continue from `counter`, to exercise exhaustion. Not public: a counter
    /// set back under a live epoch would repeat nonces.
    #[cfg(test)]
    pub(crate) fn with_counter(mut self, counter: u64) -> Sealer<K> {
        assert!(counter <= COUNTER_END);
        self.counter = counter;
        self
    }
}

/// Opens a message sealed for `recipient` of `business_id` with client message id
/// `client_id`, with the recipient's key; writes the payload into `out` (cleared first)
/// and returns it.
pub fn open<'o>(
    key: &RecipientKey,
    business_id: u32,
    recipient: &Recipient,
    client_id: u64,
    sealed: &[u8],
    out: &'o mut Vec<u8>,
) -> Result<&'o [u8], OpenError> {
    if sealed.len() < SEAL_OVERHEAD_BYTES {
        return Err(OpenError::Truncated);
    }
    let (nonce, body) = sealed.split_at(SEAL_NONCE_BYTES);
    let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
    let mut aad_buf = [0; AAD_BYTES_MAX];
    let aad_len = aad(business_id, recipient, client_id, &mut aad_buf);
    out.clear();
    out.extend_from_slice(body);
    let opened = expand_for_open(key)
        .open_in_place(nonce, aws_lc_rs::aead::Aad::from(&aad_buf[..aad_len]), out)
        .map(|plain| plain.len());
    match opened {
        Ok(plain_len) => {
            out.truncate(plain_len);
            Ok(out)
        }
        Err(_) => {
            // Nothing unauthenticated is handed back.
            out.clear();
            Err(OpenError::Authentication)
        }
    }
}

#[cfg(test)]
mod tests;
