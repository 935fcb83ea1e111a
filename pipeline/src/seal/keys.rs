//! Recipient sealing keys: the [`RecipientKeys`] interface, the first implementation
//! ([`DerivedKeys`]) and the wrapping of business root keys under the master key.
//!
//! ```text
//!  master key ([u8; 32], from the keyring)
//!    └─ wrap_root_key / unwrap_root_key (AES-256-GCM, AAD binds the business id)
//!         └─ business root key (random 32 bytes, RootKey)
//!              └─ HKDF-SHA256(root, info = "courier/recipient/v1" | business id | recipient)
//!                   └─ recipient key (RecipientKey, 32 bytes) ── AES-256-GCM sealing
//! ```
//!
//! The pipeline only ever asks the trait for a recipient's key; keys negotiated with the
//! recipient (X25519 sessions) can implement the same trait later without touching
//! [`Sealer`](super::Sealer).
//!
//! Invariant: no type here prints key bytes or recipient digits in `Debug`.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;
use rand::CryptoRng;

use crate::wire::Recipient;

/// Bytes of every key here: AES-256 keys, root keys, the master key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a wrapped root key: `nonce(12) | ciphertext(32) | tag(16)`.
pub const WRAPPED_ROOT_KEY_BYTES: usize = NONCE_LEN + KEY_BYTES + TAG_BYTES;
const TAG_BYTES: usize = 16;

/// HKDF info prefix of recipient keys; a new derivation gets a new version.
pub const RECIPIENT_INFO_PREFIX: &[u8] = b"courier/recipient/v1";
/// Prefix of the associated data of a wrapped root key. It separates root-key wraps
/// from any other use of the master key (segment data keys in the keyring), so that one
/// kind of wrapped key can never be unwrapped as the other.
const ROOT_WRAP_AAD_PREFIX: &[u8] = b"courier/root-key/v1";

/// Longest HKDF info: prefix, business id, recipient length byte, recipient.
const INFO_BYTES_MAX: usize =
    RECIPIENT_INFO_PREFIX.len() + 4 + 1 + crate::wire::RECIPIENT_BYTES_MAX;
// HKDF-Expand's message (info and the counter byte) and SHA-256's 9 padding bytes fit
// one block.
const _: () = assert!(INFO_BYTES_MAX + 1 + 9 <= SHA256_BLOCK);

/// Where the keys of recipients come from. One implementation per kind of key: derived
/// from a business root key ([`DerivedKeys`]) today, negotiated with the recipient later.
///
/// Implementations whose key for a recipient can change (a renegotiated session) must
/// make the caller drop the sealer's cached copy ([`Sealer::forget`](super::Sealer::forget)).
pub trait RecipientKeys {
    /// Writes the sealing key of `recipient` of business `business_id` into `out`.
    ///
    /// Called for a cache miss of a shard's sealer whose key was not asked for ahead with
    /// [`recipient_keys`](Self::recipient_keys), so it should cost no allocation.
    fn recipient_key(
        &self,
        business_id: u32,
        recipient: &Recipient,
        out: &mut RecipientKey,
    ) -> Result<(), KeyError>;

    /// Writes the keys of `recipients` (all of business `business_id`) into `out`, one
    /// per recipient, in order: the likely cache misses of a chunk of a batch (up to
    /// [`DERIVE_CHUNK`](super::DERIVE_CHUNK)), asked together so that an implementation
    /// can overlap their work. The default asks one at a time. On an error the sealer
    /// asks for each miss's key alone, so the error is reported with its message.
    fn recipient_keys(
        &self,
        business_id: u32,
        recipients: &[Recipient],
        out: &mut [RecipientKey],
    ) -> Result<(), KeyError> {
        debug_assert_eq!(recipients.len(), out.len());
        for (r, o) in recipients.iter().zip(out) {
            self.recipient_key(business_id, r, o)?;
        }
        Ok(())
    }
}

impl<K: RecipientKeys + ?Sized> RecipientKeys for &K {
    fn recipient_key(&self, b: u32, r: &Recipient, out: &mut RecipientKey) -> Result<(), KeyError> {
        (**self).recipient_key(b, r, out)
    }

    fn recipient_keys(
        &self,
        b: u32,
        r: &[Recipient],
        out: &mut [RecipientKey],
    ) -> Result<(), KeyError> {
        (**self).recipient_keys(b, r, out)
    }
}

impl<K: RecipientKeys + ?Sized> RecipientKeys for Arc<K> {
    fn recipient_key(&self, b: u32, r: &Recipient, out: &mut RecipientKey) -> Result<(), KeyError> {
        (**self).recipient_key(b, r, out)
    }

    fn recipient_keys(
        &self,
        b: u32,
        r: &[Recipient],
        out: &mut [RecipientKey],
    ) -> Result<(), KeyError> {
        (**self).recipient_keys(b, r, out)
    }
}

/// Why a key could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No root key is loaded for this business: load its wrapped root key first.
    #[error("no root key loaded for business {business_id}")]
    UnknownBusiness {
        /// The business asked for.
        business_id: u32,
    },
    /// The keys source has no key for this recipient (for negotiated keys: no session).
    #[error("no key for this recipient of business {business_id}")]
    NoRecipientKey {
        /// The business asked for.
        business_id: u32,
    },
}

/// Why a wrapped root key did not unwrap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    /// Wrong master key, wrong business id, or the wrapped bytes were changed.
    #[error("wrapped root key of business {business_id} failed authentication (wrong master key, wrong business, or corrupted)")]
    Authentication {
        /// The business the key was unwrapped for.
        business_id: u32,
    },
}

macro_rules! secret_bytes {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name([u8; $len]);

        /// Constant time: comparing keys never leaks where they differ.
        impl PartialEq for $name {
            fn eq(&self, other: &$name) -> bool {
                use subtle::ConstantTimeEq;
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> $name {
                $name(bytes)
            }

            /// The raw bytes. Handle with care: this is key material.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "(<{} bytes redacted>)"), $len)
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // Best effort: the compiler may elide this store; there is no `unsafe`
                // volatile write here by design (see STYLE.md).
                self.0 = [0; $len];
            }
        }
    };
}

secret_bytes!(
    /// A recipient's AES-256-GCM key. `Debug` never shows it.
    RecipientKey,
    KEY_BYTES
);
secret_bytes!(
    /// A business root key: 32 random bytes, stored only wrapped by the master key.
    RootKey,
    KEY_BYTES
);

impl RecipientKey {
    /// An all-zero key to be overwritten by [`RecipientKeys::recipient_key`].
    pub fn zeroed() -> RecipientKey {
        RecipientKey([0; KEY_BYTES])
    }
}

impl RootKey {
    /// A fresh random root key from the caller's generator (the shell passes the OS's).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> RootKey {
        let mut bytes = [0; KEY_BYTES];
        rng.fill_bytes(&mut bytes);
        RootKey(bytes)
    }
}

/// A root key wrapped by the master key: `nonce(12) | ciphertext(32) | tag(16)`. Safe to
/// store; `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedRootKey([u8; WRAPPED_ROOT_KEY_BYTES]);

impl WrappedRootKey {
    /// The stored form.
    pub fn from_bytes(bytes: [u8; WRAPPED_ROOT_KEY_BYTES]) -> WrappedRootKey {
        WrappedRootKey(bytes)
    }

    /// The bytes to store.
    pub fn as_bytes(&self) -> &[u8; WRAPPED_ROOT_KEY_BYTES] {
        &self.0
    }
}

impl std::fmt::Debug for WrappedRootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedRootKey(<{WRAPPED_ROOT_KEY_BYTES} bytes>)")
    }
}

fn root_wrap_aad(business_id: u32) -> [u8; ROOT_WRAP_AAD_PREFIX.len() + 4] {
    let mut aad = [0; ROOT_WRAP_AAD_PREFIX.len() + 4];
    aad[..ROOT_WRAP_AAD_PREFIX.len()].copy_from_slice(ROOT_WRAP_AAD_PREFIX);
    aad[ROOT_WRAP_AAD_PREFIX.len()..].copy_from_slice(&business_id.to_le_bytes());
    aad
}

fn master_aead(master: &[u8; KEY_BYTES]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, master).expect("32-byte AES-256 key"))
}

/// Wraps `root` under the master key with AES-256-GCM; the associated data binds
/// `business_id`, so a wrapped key cannot be moved to another business. The 96-bit
/// nonce is random from `rng`: safe for far more wraps than a relay has businesses
/// (random nonces stay collision-safe up to about 2^32 wraps under one master key).
pub fn wrap_root_key<R: CryptoRng + ?Sized>(
    master: &[u8; KEY_BYTES],
    business_id: u32,
    root: &RootKey,
    rng: &mut R,
) -> WrappedRootKey {
    let mut out = [0; WRAPPED_ROOT_KEY_BYTES];
    let (nonce, rest) = out.split_at_mut(NONCE_LEN);
    rng.fill_bytes(nonce);
    let (body, tag_out) = rest.split_at_mut(KEY_BYTES);
    body.copy_from_slice(root.as_bytes());
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12-byte nonce");
    let tag = master_aead(master)
        .seal_in_place_separate_tag(nonce, Aad::from(root_wrap_aad(business_id)), body)
        .expect("32 bytes is within AES-GCM's limit");
    tag_out.copy_from_slice(tag.as_ref());
    WrappedRootKey(out)
}

/// Unwraps a root key wrapped by [`wrap_root_key`] for the same business.
pub fn unwrap_root_key(
    master: &[u8; KEY_BYTES],
    business_id: u32,
    wrapped: &WrappedRootKey,
) -> Result<RootKey, UnwrapError> {
    let mut buf = wrapped.0;
    let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12-byte nonce");
    let plain = master_aead(master)
        .open_in_place(nonce, Aad::from(root_wrap_aad(business_id)), rest)
        .map_err(|_| UnwrapError::Authentication { business_id })?;
    let mut root = [0; KEY_BYTES];
    root.copy_from_slice(plain);
    // Best effort: the clear root key is not left in this stack copy.
    buf.fill(0);
    std::hint::black_box(&buf);
    Ok(RootKey(root))
}

/// HMAC-SHA256 with both pads already absorbed, driving SHA-256's compression function
/// directly (`sha2::compress256`, SHA-NI when the CPU has it): one HMAC of a message of
/// at most 55 bytes, such as HKDF-Expand's single block, costs exactly two compressions
/// and no hash-object bookkeeping. Measured against the `Digest` API of `sha2`, ring's
/// `hmac::sign` and aws-lc-rs's `hmac::sign`: see `parts/hkdf` and `parts/hmac_*` in
/// `benches/seal.rs` and BENCHMARKS.md, "Sealing (issue 4)".
#[derive(Clone)]
struct HmacPads {
    /// SHA-256 state after the block `key ^ ipad`.
    inner: [u32; 8],
    /// SHA-256 state after the block `key ^ opad`.
    outer: [u32; 8],
}

const SHA256_BLOCK: usize = 64;

fn compress(state: &mut [u32; 8], block: &[u8; SHA256_BLOCK]) {
    sha2::compress256(state, std::slice::from_ref(block.into()));
}

/// (The general case, for the tests' check of the pads against aws-lc-rs's HMAC.)
/// Finishes a SHA-256 whose state has absorbed `absorbed` bytes (a whole number of
/// blocks) and has `data` left: full blocks, then the padding (FIPS 180-4, 5.1.1).
#[cfg(test)]
fn finish(mut state: [u32; 8], absorbed: usize, data: &[u8], out: &mut [u8; 32]) {
    let mut blocks = data.chunks_exact(SHA256_BLOCK);
    for b in &mut blocks {
        compress(&mut state, b.try_into().expect("64-byte chunk"));
    }
    let tail = blocks.remainder();
    let bits = ((absorbed + data.len()) as u64) * 8;
    let mut last = [0u8; 2 * SHA256_BLOCK];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    // The length goes in the last 8 bytes of one block if it fits after the 0x80, else
    // of a second block.
    let end = if tail.len() < SHA256_BLOCK - 8 {
        SHA256_BLOCK
    } else {
        2 * SHA256_BLOCK
    };
    last[end - 8..end].copy_from_slice(&bits.to_be_bytes());
    for b in last[..end].chunks_exact(SHA256_BLOCK) {
        compress(&mut state, b.try_into().expect("64-byte chunk"));
    }
    write_digest(&state, out);
}

/// The outer hash's second block: the inner digest and its padding.
fn outer_block(inner: &[u32; 8]) -> [u8; SHA256_BLOCK] {
    let mut block = [0u8; SHA256_BLOCK];
    write_digest(inner, (&mut block[..32]).try_into().expect("32 bytes"));
    block[32] = 0x80;
    block[SHA256_BLOCK - 8..].copy_from_slice(&(((SHA256_BLOCK + 32) * 8) as u64).to_be_bytes());
    block
}

fn write_digest(state: &[u32; 8], out: &mut [u8; 32]) {
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
}

impl HmacPads {
    /// RFC 2104 with a key of at most one block (64 bytes).
    fn new(key: &[u8]) -> HmacPads {
        assert!(
            key.len() <= SHA256_BLOCK,
            "keys longer than a block are hashed first"
        );
        let mut ipad = [0x36u8; SHA256_BLOCK];
        let mut opad = [0x5cu8; SHA256_BLOCK];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let (mut inner, mut outer) = (courier_sha256x2::IV, courier_sha256x2::IV);
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        HmacPads { inner, outer }
    }

    /// HMAC of a message of at most 55 bytes that the caller has already laid out with
    /// its SHA-256 padding (as the second block of the inner hash) in `block`.
    fn sign_padded_block(&self, block: &[u8; SHA256_BLOCK], out: &mut [u8; 32]) {
        let mut inner = self.inner;
        compress(&mut inner, block);
        let mut outer = self.outer;
        compress(&mut outer, &outer_block(&inner));
        write_digest(&outer, out);
    }

    /// [`sign_padded_block`](Self::sign_padded_block) of two messages at once, their
    /// compressions interleaved.
    fn sign_padded_blocks2(&self, blocks: [&[u8; SHA256_BLOCK]; 2], out: [&mut [u8; 32]; 2]) {
        let (mut i0, mut i1) = (self.inner, self.inner);
        courier_sha256x2::compress2([&mut i0, &mut i1], blocks);
        let (mut o0, mut o1) = (self.outer, self.outer);
        courier_sha256x2::compress2([&mut o0, &mut o1], [&outer_block(&i0), &outer_block(&i1)]);
        let [a, b] = out;
        write_digest(&o0, a);
        write_digest(&o1, b);
    }

    #[cfg(test)]
    fn sign(&self, data: &[u8], out: &mut [u8; 32]) {
        let mut inner_hash = [0u8; 32];
        finish(self.inner, SHA256_BLOCK, data, &mut inner_hash);
        finish(self.outer, SHA256_BLOCK, &inner_hash, out);
    }
}

/// Recipient keys derived from per-business root keys with HKDF-SHA256 (RFC 5869):
/// `key = HKDF-SHA256(salt = none, ikm = root, info = "courier/recipient/v1" |
/// business id (u32 LE) | recipient length (u8) | recipient E.164 bytes, L = 32)`.
///
/// HKDF-Extract runs once per business when its root key is loaded; each recipient key
/// then costs one HMAC-SHA256 (HKDF-Expand's single block, with the HMAC pads of the
/// business's PRK already absorbed), i.e. two SHA-256 compressions, with no allocation.
/// Asked for several keys ([`RecipientKeys::recipient_keys`]), it derives them two at a
/// time with their compressions interleaved (`courier_sha256x2`): about 70 ns per key
/// instead of 124 on the machine of BENCHMARKS.md (`parts/hkdf_batch16`, `parts/hkdf`).
/// Read-only once loaded: share it between shards with an `Arc`.
pub struct DerivedKeys {
    businesses: HashMap<u32, HmacPads, BuildHasherDefault<BusinessIdHasher>>,
    /// Each business's log field root (HKDF-Expand of its PRK with [`FIELD_ROOT_INFO`]):
    /// the log derives from it the key of the user fields of its records in each segment
    /// (`log::format::FieldKeys`), so dropping the root key hides them.
    fields: HashMap<u32, hmac::Key, BuildHasherDefault<BusinessIdHasher>>,
}

/// HKDF-Expand info of a business's log field root (one block: `info | 0x01`).
const FIELD_ROOT_INFO: &[u8] = b"courier log field root v3\x01";

/// Hasher of the business-id map, looked up once per cache miss: one multiply, where
/// the default SipHash costs more than a tenth of the HKDF it precedes. Business ids
/// come from the operator's registry, not from senders, so no flooding resistance is
/// needed.
#[derive(Default)]
struct BusinessIdHasher(u64);

impl std::hash::Hasher for BusinessIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits and its tag from the top ones:
        // fold the well-mixed high half down.
        self.0 ^ (self.0 >> 32)
    }
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKeys")
            .field("businesses", &self.businesses.len())
            .finish()
    }
}

impl Default for DerivedKeys {
    fn default() -> Self {
        DerivedKeys::new()
    }
}

impl DerivedKeys {
    /// No business loaded yet.
    pub fn new() -> DerivedKeys {
        DerivedKeys {
            businesses: HashMap::default(),
            fields: HashMap::default(),
        }
    }

    /// Loads a business's root key (replacing any earlier one).
    pub fn insert_root(&mut self, business_id: u32, root: &RootKey) {
        // HKDF-Extract with no salt = HMAC(key = HashLen zero bytes, root) (RFC 5869 2.2).
        let salt = hmac::Key::new(hmac::HMAC_SHA256, &[0; KEY_BYTES]);
        let prk = hmac::sign(&salt, root.as_bytes());
        let field_root = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()),
            FIELD_ROOT_INFO,
        );
        self.fields.insert(
            business_id,
            hmac::Key::new(hmac::HMAC_SHA256, field_root.as_ref()),
        );
        self.businesses
            .insert(business_id, HmacPads::new(prk.as_ref()));
    }

    /// Unwraps a stored root key with the master key and loads it.
    pub fn insert_wrapped(
        &mut self,
        master: &[u8; KEY_BYTES],
        business_id: u32,
        wrapped: &WrappedRootKey,
    ) -> Result<(), UnwrapError> {
        let root = unwrap_root_key(master, business_id, wrapped)?;
        self.insert_root(business_id, &root);
        Ok(())
    }

    /// Unloads a business; its recipients' keys can no longer be derived here.
    pub fn remove(&mut self, business_id: u32) -> bool {
        self.fields.remove(&business_id);
        self.businesses.remove(&business_id).is_some()
    }

    /// Businesses loaded.
    pub fn len(&self) -> usize {
        self.businesses.len()
    }

    /// The ids of the businesses loaded, ascending.
    pub fn business_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.businesses.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The private X25519 key (32 bytes) of `business_id`'s reply key `key_id`, the key
    /// its users' devices seal replies to (issue 16):
    /// `HKDF-SHA256(salt = none, ikm = root, info = "courier/e2e/v1 business reply key" |
    /// business id (u32 BE) | key id (u32 BE), L = 32)`. Derived, not stored: it goes with
    /// the business's root key, and a rotation is a new key id.
    pub fn reply_secret(
        &self,
        business_id: u32,
        key_id: u32,
    ) -> Result<zeroize::Zeroizing<[u8; KEY_BYTES]>, KeyError> {
        const P: usize = REPLY_KEY_INFO_PREFIX.len();
        let prk = self.pads(business_id)?;
        let mut block = [0u8; SHA256_BLOCK];
        block[..P].copy_from_slice(REPLY_KEY_INFO_PREFIX);
        block[P..P + 4].copy_from_slice(&business_id.to_be_bytes());
        block[P + 4..P + 8].copy_from_slice(&key_id.to_be_bytes());
        let n = P + 8;
        block[n] = 1;
        block[n + 1] = 0x80;
        let bits = ((SHA256_BLOCK + n + 1) * 8) as u64;
        block[SHA256_BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        let mut out = zeroize::Zeroizing::new([0u8; KEY_BYTES]);
        prk.sign_padded_block(&block, &mut out);
        Ok(out)
    }

    /// Whether no business is loaded.
    pub fn is_empty(&self) -> bool {
        self.businesses.is_empty()
    }
}

impl DerivedKeys {
    fn pads(&self, business_id: u32) -> Result<&HmacPads, KeyError> {
        self.businesses
            .get(&business_id)
            .ok_or(KeyError::UnknownBusiness { business_id })
    }
}

/// Domain separation of a business's reply key (see [`DerivedKeys::reply_secret`]).
pub const REPLY_KEY_INFO_PREFIX: &[u8] = b"courier/e2e/v1 business reply key";
const _: () = assert!(REPLY_KEY_INFO_PREFIX.len() + 8 + 1 + 1 + 8 <= SHA256_BLOCK);

/// HKDF-Expand's one block, L = 32 = HashLen: T(1) = HMAC(PRK, info | 0x01). The
/// message (at most INFO_BYTES_MAX + 1 = 42 bytes) and its SHA-256 padding are laid out
/// in one block with fixed-size copies: the zero-padded number, then the counter byte
/// and the 0x80 over its zeros.
fn expand_block(business_id: u32, recipient: &Recipient) -> [u8; SHA256_BLOCK] {
    const P: usize = RECIPIENT_INFO_PREFIX.len();
    let r = recipient.as_bytes().len();
    let mut block = [0u8; SHA256_BLOCK];
    block[..P].copy_from_slice(RECIPIENT_INFO_PREFIX);
    block[P..P + 4].copy_from_slice(&business_id.to_le_bytes());
    block[P + 4] = r as u8;
    block[P + 5..P + 5 + crate::wire::RECIPIENT_BYTES_MAX].copy_from_slice(recipient.padded());
    let n = P + 5 + r;
    block[n] = 1;
    block[n + 1] = 0x80;
    let bits = ((SHA256_BLOCK + n + 1) * 8) as u64;
    block[SHA256_BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
    block
}

impl crate::log::format::FieldKeys for DerivedKeys {
    fn field_key(
        &self,
        business_id: u32,
        salt: &[u8; KEY_BYTES],
    ) -> Option<zeroize::Zeroizing<[u8; KEY_BYTES]>> {
        let tag = hmac::sign(self.fields.get(&business_id)?, salt);
        let mut out = zeroize::Zeroizing::new([0u8; KEY_BYTES]);
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }
}

impl RecipientKeys for DerivedKeys {
    fn recipient_key(
        &self,
        business_id: u32,
        recipient: &Recipient,
        out: &mut RecipientKey,
    ) -> Result<(), KeyError> {
        let prk = self.pads(business_id)?;
        prk.sign_padded_block(&expand_block(business_id, recipient), &mut out.0);
        Ok(())
    }

    fn recipient_keys(
        &self,
        business_id: u32,
        recipients: &[Recipient],
        out: &mut [RecipientKey],
    ) -> Result<(), KeyError> {
        debug_assert_eq!(recipients.len(), out.len());
        let prk = self.pads(business_id)?;
        let mut pairs = out.chunks_exact_mut(2);
        for (r, o) in recipients.chunks_exact(2).zip(&mut pairs) {
            let [o0, o1] = o else { unreachable!("pairs") };
            prk.sign_padded_blocks2(
                [
                    &expand_block(business_id, &r[0]),
                    &expand_block(business_id, &r[1]),
                ],
                [&mut o0.0, &mut o1.0],
            );
        }
        if let ([r], [o]) = (
            recipients.chunks_exact(2).remainder(),
            pairs.into_remainder(),
        ) {
            prk.sign_padded_block(&expand_block(business_id, r), &mut o.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hkdf;
    use rand::{rngs::StdRng, SeedableRng};

    fn recipient(s: &str) -> Recipient {
        Recipient::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn derivation_is_rfc5869_hkdf_sha256() {
        // Every recipient length (8 to 16 bytes) and a few businesses, against aws-lc-rs's
        // HKDF: the one-block layout of the info must match the generic construction.
        let root = RootKey::from_bytes([7; 32]);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(root.as_bytes());
        let mut keys = DerivedKeys::new();
        for business in [0, 42, u32::MAX] {
            keys.insert_root(business, &root);
            for digits in 7..=15 {
                let number: String = (0..digits)
                    .map(|i| char::from(b'1' + (i % 9) as u8))
                    .collect();
                let r = recipient(&format!("+{number}"));
                let mut ours = RecipientKey::zeroed();
                keys.recipient_key(business, &r, &mut ours).unwrap();
                let info: [&[u8]; 4] = [
                    RECIPIENT_INFO_PREFIX,
                    &business.to_le_bytes(),
                    &[r.as_bytes().len() as u8],
                    r.as_bytes(),
                ];
                let mut reference = [0u8; 32];
                prk.expand(&info, hkdf::HKDF_SHA256)
                    .unwrap()
                    .fill(&mut reference)
                    .unwrap();
                assert_eq!(
                    ours.as_bytes(),
                    &reference,
                    "business {business}, {digits} digits"
                );
            }
        }
    }

    #[test]
    fn reply_keys_are_rfc5869_hkdf_sha256_and_differ_by_business_and_id() {
        let root = RootKey::from_bytes([9; 32]);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(root.as_bytes());
        let mut keys = DerivedKeys::new();
        keys.insert_root(5, &root);
        keys.insert_root(6, &root);
        for (business, key_id) in [(5u32, 0u32), (5, 1), (6, 0), (5, u32::MAX)] {
            let info: [&[u8]; 3] = [
                REPLY_KEY_INFO_PREFIX,
                &business.to_be_bytes(),
                &key_id.to_be_bytes(),
            ];
            let mut reference = [0u8; 32];
            prk.expand(&info, hkdf::HKDF_SHA256)
                .unwrap()
                .fill(&mut reference)
                .unwrap();
            assert_eq!(*keys.reply_secret(business, key_id).unwrap(), reference);
        }
        assert_ne!(
            *keys.reply_secret(5, 0).unwrap(),
            *keys.reply_secret(6, 0).unwrap()
        );
        assert_ne!(
            *keys.reply_secret(5, 0).unwrap(),
            *keys.reply_secret(5, 1).unwrap()
        );
        assert!(keys.reply_secret(7, 0).is_err(), "unknown business");
        assert_eq!(keys.business_ids(), vec![5, 6]);
    }

    #[test]
    fn precomputed_pads_match_aws_lc_hmac() {
        for key_len in [0, 1, 32, 64] {
            let key: Vec<u8> = (0..key_len as u8).collect();
            for data_len in [0, 1, 55, 56, 63, 64, 119, 120, 128, 200] {
                let data: Vec<u8> = (0..data_len).map(|i| (i * 7) as u8).collect();
                let mut ours = [0; 32];
                HmacPads::new(&key).sign(&data, &mut ours);
                let theirs = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &data);
                assert_eq!(&ours[..], theirs.as_ref(), "key {key_len} data {data_len}");
            }
        }
    }

    #[test]
    fn keys_differ_by_recipient_and_business() {
        let mut keys = DerivedKeys::new();
        keys.insert_root(1, &RootKey::from_bytes([1; 32]));
        keys.insert_root(2, &RootKey::from_bytes([1; 32]));
        let get = |b, r: &str| {
            let mut k = RecipientKey::zeroed();
            keys.recipient_key(b, &recipient(r), &mut k).unwrap();
            k
        };
        assert_ne!(get(1, "+15550001111"), get(1, "+15550001112"));
        // Same root bytes, different business: the info binds the business id.
        assert_ne!(get(1, "+15550001111"), get(2, "+15550001111"));
        assert_eq!(get(1, "+15550001111"), get(1, "+15550001111"));
        let mut k = RecipientKey::zeroed();
        assert_eq!(
            keys.recipient_key(3, &recipient("+15550001111"), &mut k),
            Err(KeyError::UnknownBusiness { business_id: 3 })
        );
    }

    #[test]
    fn root_keys_round_trip_and_bind_the_business_and_master() {
        let mut rng = StdRng::seed_from_u64(1);
        let master = [9u8; 32];
        let root = RootKey::generate(&mut rng);
        let wrapped = wrap_root_key(&master, 5, &root, &mut rng);
        assert_eq!(unwrap_root_key(&master, 5, &wrapped).unwrap(), root);
        assert_eq!(
            unwrap_root_key(&master, 6, &wrapped),
            Err(UnwrapError::Authentication { business_id: 6 })
        );
        assert!(unwrap_root_key(&[8u8; 32], 5, &wrapped).is_err());
        for i in 0..WRAPPED_ROOT_KEY_BYTES {
            let mut b = *wrapped.as_bytes();
            b[i] ^= 0x10;
            assert!(unwrap_root_key(&master, 5, &WrappedRootKey::from_bytes(b)).is_err());
        }
        // The wrapped form never holds the root key in the clear.
        assert!(!wrapped.as_bytes().windows(32).any(|w| w == root.as_bytes()));

        let mut keys = DerivedKeys::new();
        keys.insert_wrapped(&master, 5, &wrapped).unwrap();
        assert!(keys.insert_wrapped(&master, 7, &wrapped).is_err());
        assert_eq!(keys.len(), 1);
    }
}
