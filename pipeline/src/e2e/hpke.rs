//! HPKE (RFC 9180), base mode, one suite: DHKEM(X25519, HKDF-SHA256) (kem 0x0020),
//! HKDF-SHA256 (kdf 0x0001), AES-256-GCM (aead 0x0002), on aws-lc-rs.
//!
//! ```text
//!  sender                                            recipient (sk_r, pk_r)
//!  setup_base_s(pk_r, info)                          setup_base_r(enc, sk_r, info)
//!    sk_e, pk_e = X25519 keygen (OS randomness)        dh = X25519(sk_r, enc)
//!    dh = X25519(sk_e, pk_r)                           same schedule as the sender
//!    shared_secret = ExtractAndExpand(dh, enc | pk_r)
//!    key, base_nonce = KeySchedule(shared_secret, info)
//!  -> (enc = pk_e, SenderContext)                    -> RecipientContext
//!  seal(seq, aad, pt): nonce = base_nonce XOR I2OSP(seq, 12)           open(seq, aad, ct)
//! ```
//!
//! **The caller owns sequence numbers.** RFC 9180 keeps a counter inside the context;
//! here `seal` and `open` take `seq` because sessions are persisted and resumed (and a
//! message may be opened out of order). The contexts still refuse what would break the
//! AEAD: a [`SenderContext`] never seals twice at one `seq` (it keeps the lowest unused
//! one and refuses anything below it), and a [`RecipientContext`] refuses a `seq` it has
//! already opened or one too far behind its [`ReplayWindow`].
//!
//! **Secrets.** Context keys live in aws-lc-rs (an `EVP_AEAD_CTX` that aws-lc cleanses when
//! it frees it) and, for export, in [`ContextSecrets`], which zeroizes on drop; the
//! intermediate secrets of the key schedule are zeroized when they go out of scope.
//! `Debug` of every type here shows no key byte; errors carry sequence numbers only.
//!
//! **Why HMAC and not `aws_lc_rs::hkdf`.** The key schedule uses extract outputs as data
//! (`psk_id_hash`, `info_hash` go into `key_schedule_context`), which aws-lc-rs's `hkdf`
//! does not hand out, and its `Prk` re-runs the extract on every expand. HKDF is two lines
//! of HMAC (RFC 5869), done here with `aws_lc_rs::hmac` and checked by the RFC's vectors.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::hmac;
use zeroize::{Zeroize, Zeroizing};

/// Bytes of an X25519 public key, and so of `enc`.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Bytes of an X25519 private key.
pub const PRIVATE_KEY_BYTES: usize = 32;
/// Bytes of an AES-256-GCM key (Nk).
pub const KEY_BYTES: usize = 32;
/// Bytes of the AEAD nonce (Nn).
pub const NONCE_BYTES: usize = 12;
/// Bytes of the AEAD tag (Nt), the ciphertext's overhead.
pub const TAG_BYTES: usize = 16;
/// Sequence numbers a [`RecipientContext`] remembers below the newest it opened.
pub const REPLAY_WINDOW: u64 = 64;
/// Bytes of [`ContextSecrets::to_bytes`].
pub const CONTEXT_SECRETS_BYTES: usize = KEY_BYTES + NONCE_BYTES;
/// Bytes of [`ReplayWindow::to_bytes`].
pub const REPLAY_WINDOW_BYTES: usize = 1 + 8 + 8;

/// The suite's identifiers (RFC 9180 section 7).
pub const KEM_ID: u16 = 0x0020;
/// HKDF-SHA256.
pub const KDF_ID: u16 = 0x0001;
/// AES-256-GCM.
pub const AEAD_ID: u16 = 0x0002;

const HASH_BYTES: usize = 32;
const VERSION_LABEL: &[u8] = b"HPKE-v1";
const KEM_SUITE_ID: [u8; 5] = [b'K', b'E', b'M', (KEM_ID >> 8) as u8, KEM_ID as u8];
const _: () = assert!(
    REPLAY_WINDOW == u64::BITS as u64,
    "the window is one u64 bitmap"
);

/// Why an HPKE operation was refused. No variant carries key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpkeError {
    /// The peer's X25519 public key gave the all-zero shared value (a small-order point):
    /// RFC 9180 requires refusing it. Remedy: the key (a prekey, `enc`) is bad; drop it.
    #[error("invalid X25519 public key (small-order point)")]
    InvalidPublicKey,
    /// The operating system's random generator failed while making an ephemeral key.
    #[error("random generator failed")]
    Random,
    /// `seq` was sealed already (sender), or opened already (recipient). The sender's
    /// remedy is a higher `seq` (`next` is the lowest unused); the recipient refuses a
    /// replayed message.
    #[error("sequence number {seq} already used (lowest unused is {next})")]
    SequenceReused {
        /// The refused sequence number.
        seq: u64,
        /// The lowest sequence number the context would take.
        next: u64,
    },
    /// `seq` is more than [`REPLAY_WINDOW`] below the newest message opened: the recipient
    /// can no longer tell whether it was opened, so it refuses it.
    #[error("sequence number {seq} is behind the replay window (newest opened {newest})")]
    SequenceTooOld {
        /// The refused sequence number.
        seq: u64,
        /// The newest sequence number opened.
        newest: u64,
    },
    /// `u64::MAX` is never used: the context's sequence numbers are exhausted. Remedy: a
    /// new session.
    #[error("sequence numbers exhausted; set up a new session")]
    SequenceExhausted,
    /// Shorter than a tag: cannot be a ciphertext.
    #[error("ciphertext shorter than its {TAG_BYTES}-byte tag")]
    Truncated,
    /// Authentication failed: wrong key or recipient, wrong sequence number, wrong AAD
    /// or changed bytes. Deliberately one cause: which check failed is not told.
    #[error(
        "ciphertext failed authentication (wrong key, sequence number or AAD, or changed bytes)"
    )]
    Open,
}

/// The AEAD of a context. AES-128-GCM exists only to check RFC 9180's appendix A.1
/// vectors with the same code; the public API always makes AES-256-GCM contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aead {
    #[cfg_attr(not(test), allow(dead_code))]
    Aes128Gcm,
    Aes256Gcm,
}

impl Aead {
    fn id(self) -> u16 {
        match self {
            Aead::Aes128Gcm => 0x0001,
            Aead::Aes256Gcm => AEAD_ID,
        }
    }

    pub(crate) fn key_bytes(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm => KEY_BYTES,
        }
    }

    /// `"HPKE" | kem_id | kdf_id | aead_id`.
    fn suite_id(self) -> [u8; 10] {
        let mut s = [0; 10];
        s[..4].copy_from_slice(b"HPKE");
        s[4..6].copy_from_slice(&KEM_ID.to_be_bytes());
        s[6..8].copy_from_slice(&KDF_ID.to_be_bytes());
        s[8..].copy_from_slice(&self.id().to_be_bytes());
        s
    }

    fn aead_key(self, key: &[u8]) -> LessSafeKey {
        assert_eq!(key.len(), self.key_bytes());
        let alg = match self {
            Aead::Aes128Gcm => &AES_128_GCM,
            Aead::Aes256Gcm => &AES_256_GCM,
        };
        LessSafeKey::new(UnboundKey::new(alg, key).expect("key of the AEAD's length"))
    }
}

// ---- HKDF-SHA256 (RFC 5869) on aws-lc-rs's HMAC, and RFC 9180's labeled forms ----

/// `Extract(salt, ikm)` with `ikm` given in parts. An empty salt is HMAC's all-zero key,
/// as RFC 5869 says.
fn extract(salt: &[u8], ikm: &[&[u8]]) -> Zeroizing<[u8; HASH_BYTES]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    for part in ikm {
        ctx.update(part);
    }
    let mut prk = Zeroizing::new([0; HASH_BYTES]);
    prk.copy_from_slice(ctx.sign().as_ref());
    prk
}

/// `Expand(prk, info, L)` into `out` (`L = out.len()`, at most 255 blocks).
fn expand(prk: &[u8; HASH_BYTES], info: &[&[u8]], out: &mut [u8]) {
    assert!(out.len() <= 255 * HASH_BYTES, "HKDF-Expand length");
    let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
    let mut previous = Zeroizing::new([0; HASH_BYTES]);
    for (i, chunk) in out.chunks_mut(HASH_BYTES).enumerate() {
        let mut ctx = hmac::Context::with_key(&key);
        if i > 0 {
            ctx.update(&previous[..]);
        }
        for part in info {
            ctx.update(part);
        }
        ctx.update(&[(i + 1) as u8]);
        previous.copy_from_slice(ctx.sign().as_ref());
        chunk.copy_from_slice(&previous[..chunk.len()]);
    }
}

/// `LabeledExtract(salt, label, ikm)`.
fn labeled_extract(
    suite_id: &[u8],
    salt: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> Zeroizing<[u8; HASH_BYTES]> {
    extract(salt, &[VERSION_LABEL, suite_id, label, ikm])
}

/// `LabeledExpand(prk, label, info, L)` into `out`.
fn labeled_expand(
    prk: &[u8; HASH_BYTES],
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) {
    let length = u16::try_from(out.len()).expect("L fits two bytes");
    expand(
        prk,
        &[&length.to_be_bytes(), VERSION_LABEL, suite_id, label, info],
        out,
    );
}

// ---- DHKEM(X25519, HKDF-SHA256) ----

/// An X25519 private key (a device's prekey, a business's reply key, an ephemeral key in
/// tests). `Debug` shows nothing of it; aws-lc cleanses it when it is dropped.
pub struct X25519SecretKey {
    key: PrivateKey,
    public: [u8; PUBLIC_KEY_BYTES],
}

impl X25519SecretKey {
    /// A fresh key from the operating system's random generator.
    pub fn generate() -> Result<X25519SecretKey, HpkeError> {
        let key = PrivateKey::generate(&X25519).map_err(|_| HpkeError::Random)?;
        Ok(X25519SecretKey::with_public(key))
    }

    /// The key of these 32 bytes (any 32 bytes are a key: X25519 clamps them).
    pub fn from_bytes(bytes: &[u8; PRIVATE_KEY_BYTES]) -> X25519SecretKey {
        let key = PrivateKey::from_private_key(&X25519, bytes).expect("32 bytes are an X25519 key");
        X25519SecretKey::with_public(key)
    }

    fn with_public(key: PrivateKey) -> X25519SecretKey {
        let mut public = [0; PUBLIC_KEY_BYTES];
        public.copy_from_slice(
            key.compute_public_key()
                .expect("an X25519 key has a public key")
                .as_ref(),
        );
        X25519SecretKey { key, public }
    }

    /// The private key's bytes, to be stored encrypted. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; PRIVATE_KEY_BYTES]> {
        use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin};
        let seed: Curve25519SeedBin<'_> = self.key.as_be_bytes().expect("X25519 key bytes");
        let mut out = Zeroizing::new([0; PRIVATE_KEY_BYTES]);
        out.copy_from_slice(seed.as_ref());
        out
    }

    /// The public key.
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_BYTES] {
        &self.public
    }

    /// `DH(sk, pk)` fed straight into `LabeledExtract("", "eae_prk", dh)`, so that the raw
    /// shared value never leaves aws-lc-rs's buffer.
    fn dh_eae_prk(&self, pk: &[u8; PUBLIC_KEY_BYTES]) -> Result<Zeroizing<[u8; 32]>, HpkeError> {
        agreement::agree(
            &self.key,
            UnparsedPublicKey::new(&X25519, pk),
            HpkeError::InvalidPublicKey,
            |dh| Ok(labeled_extract(&KEM_SUITE_ID, b"", b"eae_prk", dh)),
        )
    }
}

impl std::fmt::Debug for X25519SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X25519SecretKey(<redacted>)")
    }
}

/// `shared_secret = LabeledExpand(eae_prk, "shared_secret", enc | pk_r, Nsecret)`.
fn kem_shared_secret(
    eae_prk: &[u8; HASH_BYTES],
    enc: &[u8; PUBLIC_KEY_BYTES],
    pk_r: &[u8; PUBLIC_KEY_BYTES],
) -> Zeroizing<[u8; HASH_BYTES]> {
    let mut kem_context = [0; 2 * PUBLIC_KEY_BYTES];
    kem_context[..PUBLIC_KEY_BYTES].copy_from_slice(enc);
    kem_context[PUBLIC_KEY_BYTES..].copy_from_slice(pk_r);
    let mut shared = Zeroizing::new([0; HASH_BYTES]);
    labeled_expand(
        eae_prk,
        &KEM_SUITE_ID,
        b"shared_secret",
        &kem_context,
        &mut shared[..],
    );
    shared
}

// ---- Key schedule (base mode: psk and psk_id empty) ----

/// What the key schedule derives; `secret` and `key_schedule_context` are kept for the
/// test vectors (and the exporter secret is derived from them there).
pub(crate) struct Schedule {
    pub(crate) key: Zeroizing<[u8; KEY_BYTES]>,
    pub(crate) base_nonce: [u8; NONCE_BYTES],
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) secret: Zeroizing<[u8; HASH_BYTES]>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) key_schedule_context: [u8; 1 + 2 * HASH_BYTES],
}

const MODE_BASE: u8 = 0x00;

pub(crate) fn key_schedule(aead: Aead, shared_secret: &[u8; HASH_BYTES], info: &[u8]) -> Schedule {
    let suite_id = aead.suite_id();
    let psk_id_hash = labeled_extract(&suite_id, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(&suite_id, b"", b"info_hash", info);
    let mut ksc = [0; 1 + 2 * HASH_BYTES];
    ksc[0] = MODE_BASE;
    ksc[1..1 + HASH_BYTES].copy_from_slice(&psk_id_hash[..]);
    ksc[1 + HASH_BYTES..].copy_from_slice(&info_hash[..]);
    let secret = labeled_extract(&suite_id, shared_secret, b"secret", b"");
    let mut key = Zeroizing::new([0; KEY_BYTES]);
    labeled_expand(
        &secret,
        &suite_id,
        b"key",
        &ksc,
        &mut key[..aead.key_bytes()],
    );
    let mut base_nonce = [0; NONCE_BYTES];
    labeled_expand(&secret, &suite_id, b"base_nonce", &ksc, &mut base_nonce);
    Schedule {
        key,
        base_nonce,
        secret,
        key_schedule_context: ksc,
    }
}

/// `LabeledExpand(exporter_secret, "sec", exporter_context, L)`; the exporter secret is
/// `LabeledExpand(secret, "exp", key_schedule_context, Nh)`. Only the tests export (to
/// check the vectors' exported values); the contexts keep no exporter secret.
#[cfg(test)]
pub(crate) fn export(
    aead: Aead,
    schedule: &Schedule,
    exporter_context: &[u8],
    out: &mut [u8],
) -> [u8; 32] {
    let suite_id = aead.suite_id();
    let mut exporter_secret = [0; HASH_BYTES];
    labeled_expand(
        &schedule.secret,
        &suite_id,
        b"exp",
        &schedule.key_schedule_context,
        &mut exporter_secret,
    );
    labeled_expand(&exporter_secret, &suite_id, b"sec", exporter_context, out);
    exporter_secret
}

// ---- Setup ----

/// `enc`: the sender's ephemeral public key, sent to the recipient with the first message.
pub type EncappedKey = [u8; PUBLIC_KEY_BYTES];

/// A sender's context to `pk_r`, with a fresh ephemeral key from the operating system's
/// random generator. Returns `enc` (to send along) and the context.
pub fn setup_base_s(
    pk_r: &[u8; PUBLIC_KEY_BYTES],
    info: &[u8],
) -> Result<(EncappedKey, SenderContext), HpkeError> {
    let sk_e = X25519SecretKey::generate()?;
    setup_s_with(Aead::Aes256Gcm, pk_r, info, &sk_e)
}

/// [`setup_base_s`] with the ephemeral private key given: for test vectors and seeded
/// simulations only. Never reuse an ephemeral key in production: two contexts with the
/// same `(sk_e, pk_r, info)` share key and nonces.
#[doc(hidden)]
pub fn setup_base_s_derand(
    pk_r: &[u8; PUBLIC_KEY_BYTES],
    info: &[u8],
    sk_e: &[u8; PRIVATE_KEY_BYTES],
) -> Result<(EncappedKey, SenderContext), HpkeError> {
    setup_s_with(
        Aead::Aes256Gcm,
        pk_r,
        info,
        &X25519SecretKey::from_bytes(sk_e),
    )
}

pub(crate) fn setup_s_with(
    aead: Aead,
    pk_r: &[u8; PUBLIC_KEY_BYTES],
    info: &[u8],
    sk_e: &X25519SecretKey,
) -> Result<(EncappedKey, SenderContext), HpkeError> {
    let (enc, schedule) = encap_schedule(aead, pk_r, info, sk_e)?;
    let secrets = ContextSecrets {
        key: *schedule.key,
        base_nonce: schedule.base_nonce,
    };
    Ok((enc, SenderContext::new(aead, secrets, 0)))
}

/// Encap and key schedule, with everything the vectors check.
pub(crate) fn encap_schedule(
    aead: Aead,
    pk_r: &[u8; PUBLIC_KEY_BYTES],
    info: &[u8],
    sk_e: &X25519SecretKey,
) -> Result<(EncappedKey, Schedule), HpkeError> {
    let enc = *sk_e.public_key();
    let eae_prk = sk_e.dh_eae_prk(pk_r)?;
    let shared_secret = kem_shared_secret(&eae_prk, &enc, pk_r);
    Ok((enc, key_schedule(aead, &shared_secret, info)))
}

/// Decap and key schedule; `shared_secret` is returned for the vectors.
pub(crate) fn decap_schedule(
    aead: Aead,
    enc: &[u8; PUBLIC_KEY_BYTES],
    sk_r: &X25519SecretKey,
    info: &[u8],
) -> Result<(Zeroizing<[u8; HASH_BYTES]>, Schedule), HpkeError> {
    let eae_prk = sk_r.dh_eae_prk(enc)?;
    let shared_secret = kem_shared_secret(&eae_prk, enc, sk_r.public_key());
    let schedule = key_schedule(aead, &shared_secret, info);
    Ok((shared_secret, schedule))
}

/// The recipient's context for a sender's `enc`, with the recipient's private key.
pub fn setup_base_r(
    enc: &[u8; PUBLIC_KEY_BYTES],
    sk_r: &X25519SecretKey,
    info: &[u8],
) -> Result<RecipientContext, HpkeError> {
    setup_r_with(Aead::Aes256Gcm, enc, sk_r, info)
}

pub(crate) fn setup_r_with(
    aead: Aead,
    enc: &[u8; PUBLIC_KEY_BYTES],
    sk_r: &X25519SecretKey,
    info: &[u8],
) -> Result<RecipientContext, HpkeError> {
    let (_, schedule) = decap_schedule(aead, enc, sk_r, info)?;
    let secrets = ContextSecrets {
        key: *schedule.key,
        base_nonce: schedule.base_nonce,
    };
    Ok(RecipientContext::new(aead, secrets, ReplayWindow::new()))
}

// ---- Contexts ----

/// A context's key and base nonce, for persisting a session (encrypted at rest: these
/// bytes are as secret as the messages). Zeroized on drop; `Debug` shows nothing.
pub struct ContextSecrets {
    key: [u8; KEY_BYTES],
    base_nonce: [u8; NONCE_BYTES],
}

impl ContextSecrets {
    /// `key(32) | base_nonce(12)`. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; CONTEXT_SECRETS_BYTES]> {
        let mut out = Zeroizing::new([0; CONTEXT_SECRETS_BYTES]);
        out[..KEY_BYTES].copy_from_slice(&self.key);
        out[KEY_BYTES..].copy_from_slice(&self.base_nonce);
        out
    }

    /// The secrets of [`ContextSecrets::to_bytes`].
    pub fn from_bytes(bytes: &[u8; CONTEXT_SECRETS_BYTES]) -> ContextSecrets {
        let mut key = [0; KEY_BYTES];
        key.copy_from_slice(&bytes[..KEY_BYTES]);
        let mut base_nonce = [0; NONCE_BYTES];
        base_nonce.copy_from_slice(&bytes[KEY_BYTES..]);
        ContextSecrets { key, base_nonce }
    }
}

impl Drop for ContextSecrets {
    fn drop(&mut self) {
        self.key.zeroize();
        self.base_nonce.zeroize();
    }
}

impl std::fmt::Debug for ContextSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextSecrets(<redacted>)")
    }
}

/// `ComputeNonce(seq)`: the base nonce XOR `seq` as a 12-byte big-endian integer.
pub(crate) fn compute_nonce(base_nonce: &[u8; NONCE_BYTES], seq: u64) -> Nonce {
    let mut nonce = *base_nonce;
    for (n, s) in nonce[NONCE_BYTES - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    Nonce::assume_unique_for_key(nonce)
}

/// A sender's HPKE context. Not `Clone`: two copies would seal at the same sequence
/// numbers. It keeps the lowest unused sequence number and refuses any below it.
pub struct SenderContext {
    aead: Aead,
    key: LessSafeKey,
    secrets: ContextSecrets,
    next_seq: u64,
}

impl SenderContext {
    fn new(aead: Aead, secrets: ContextSecrets, next_seq: u64) -> SenderContext {
        SenderContext {
            aead,
            key: aead.aead_key(&secrets.key[..aead.key_bytes()]),
            secrets,
            next_seq,
        }
    }

    /// A context restored from [`SenderContext::export`]: `next_seq` must be at least every
    /// sequence number ever sealed under these secrets, across crashes too (persist a
    /// floor ahead of use, as the log's sealer persists its epoch).
    pub fn import(secrets: ContextSecrets, next_seq: u64) -> SenderContext {
        SenderContext::new(Aead::Aes256Gcm, secrets, next_seq)
    }

    /// Its secrets and lowest unused sequence number, to persist.
    pub fn export(&self) -> (ContextSecrets, u64) {
        assert_eq!(
            self.aead,
            Aead::Aes256Gcm,
            "only AES-256-GCM contexts exist outside the vector tests"
        );
        let secrets = ContextSecrets::from_bytes(&self.secrets.to_bytes());
        (secrets, self.next_seq)
    }

    /// The lowest sequence number not sealed yet.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn claim(&self, seq: u64) -> Result<Nonce, HpkeError> {
        if seq < self.next_seq {
            return Err(HpkeError::SequenceReused {
                seq,
                next: self.next_seq,
            });
        }
        if seq == u64::MAX {
            return Err(HpkeError::SequenceExhausted);
        }
        Ok(compute_nonce(&self.secrets.base_nonce, seq))
    }

    /// Seals `in_out` in place at `seq` and returns the tag (to go after the ciphertext).
    /// Allocates nothing.
    pub fn seal_in_place(
        &mut self,
        seq: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_BYTES], HpkeError> {
        let nonce = self.claim(seq)?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), in_out)
            .expect("AES-GCM seals any message below 64 GiB");
        self.next_seq = seq + 1;
        let mut out = [0; TAG_BYTES];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Appends `ciphertext | tag` of `plaintext` at `seq` to `out`; allocates only if
    /// `out` lacks the capacity. On error `out` is unchanged.
    pub fn seal_append(
        &mut self,
        seq: u64,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), HpkeError> {
        self.claim(seq)?;
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self.seal_in_place(seq, aad, &mut out[start..])?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// `ciphertext | tag` of `plaintext` at `seq`, in a new buffer.
    pub fn seal(&mut self, seq: u64, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_BYTES);
        self.seal_append(seq, aad, plaintext, &mut out)?;
        Ok(out)
    }
}

impl std::fmt::Debug for SenderContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderContext")
            .field("aead", &self.aead)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// Which sequence numbers a recipient has opened: the newest, and a bitmap of the
/// [`REPLAY_WINDOW`] below it. Older ones are refused as too old.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayWindow {
    newest: Option<u64>,
    /// Bit `i`: `newest - i` was opened.
    seen: u64,
}

impl ReplayWindow {
    /// Nothing opened yet.
    pub fn new() -> ReplayWindow {
        ReplayWindow::default()
    }

    /// The newest sequence number opened.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    fn check(&self, seq: u64) -> Result<(), HpkeError> {
        let Some(newest) = self.newest else {
            return Ok(());
        };
        if seq > newest {
            return Ok(());
        }
        let behind = newest - seq;
        if behind >= REPLAY_WINDOW {
            return Err(HpkeError::SequenceTooOld { seq, newest });
        }
        if self.seen & (1 << behind) != 0 {
            return Err(HpkeError::SequenceReused {
                seq,
                next: newest + 1,
            });
        }
        Ok(())
    }

    fn mark(&mut self, seq: u64) {
        match self.newest {
            None => {
                self.newest = Some(seq);
                self.seen = 1;
            }
            Some(newest) if seq > newest => {
                let shift = seq - newest;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.newest = Some(seq);
            }
            Some(newest) => self.seen |= 1 << (newest - seq),
        }
    }

    /// `present(1) | newest(8, BE) | seen(8, BE)`.
    pub fn to_bytes(&self) -> [u8; REPLAY_WINDOW_BYTES] {
        let mut out = [0; REPLAY_WINDOW_BYTES];
        out[0] = u8::from(self.newest.is_some());
        out[1..9].copy_from_slice(&self.newest.unwrap_or(0).to_be_bytes());
        out[9..].copy_from_slice(&self.seen.to_be_bytes());
        out
    }

    /// The window of [`ReplayWindow::to_bytes`]; `None` if the bytes cannot be one.
    pub fn from_bytes(bytes: &[u8; REPLAY_WINDOW_BYTES]) -> Option<ReplayWindow> {
        let newest = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let seen = u64::from_be_bytes(bytes[9..].try_into().expect("8 bytes"));
        match bytes[0] {
            0 if newest == 0 && seen == 0 => Some(ReplayWindow::new()),
            1 if seen & 1 == 1 => Some(ReplayWindow {
                newest: Some(newest),
                seen,
            }),
            _ => None,
        }
    }
}

/// A recipient's HPKE context: opens at any sequence number it has not opened, within
/// the replay window. Not `Clone`: a copy would open a message twice.
pub struct RecipientContext {
    aead: Aead,
    key: LessSafeKey,
    secrets: ContextSecrets,
    window: ReplayWindow,
}

impl RecipientContext {
    fn new(aead: Aead, secrets: ContextSecrets, window: ReplayWindow) -> RecipientContext {
        RecipientContext {
            aead,
            key: aead.aead_key(&secrets.key[..aead.key_bytes()]),
            secrets,
            window,
        }
    }

    /// A context restored from [`RecipientContext::export`].
    pub fn import(secrets: ContextSecrets, window: ReplayWindow) -> RecipientContext {
        RecipientContext::new(Aead::Aes256Gcm, secrets, window)
    }

    /// Its secrets and replay window, to persist.
    pub fn export(&self) -> (ContextSecrets, ReplayWindow) {
        assert_eq!(
            self.aead,
            Aead::Aes256Gcm,
            "only AES-256-GCM contexts exist outside the vector tests"
        );
        let secrets = ContextSecrets::from_bytes(&self.secrets.to_bytes());
        (secrets, self.window)
    }

    /// What it has opened.
    pub fn window(&self) -> ReplayWindow {
        self.window
    }

    /// Opens `ciphertext | tag` in place at `seq`; returns the plaintext (the front of
    /// `in_out`). Allocates nothing. On error the sequence number stays unused and the
    /// bytes of `in_out` are unspecified.
    pub fn open_in_place<'a>(
        &mut self,
        seq: u64,
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], HpkeError> {
        if in_out.len() < TAG_BYTES {
            return Err(HpkeError::Truncated);
        }
        if seq == u64::MAX {
            return Err(HpkeError::SequenceExhausted);
        }
        self.window.check(seq)?;
        let nonce = compute_nonce(&self.secrets.base_nonce, seq);
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(aad), in_out)
            .map_err(|_| HpkeError::Open)?;
        self.window.mark(seq);
        Ok(plaintext)
    }

    /// The plaintext of `ciphertext | tag` at `seq`, in a new buffer.
    pub fn open(&mut self, seq: u64, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let mut buf = ciphertext.to_vec();
        let len = self.open_in_place(seq, aad, &mut buf)?.len();
        buf.truncate(len);
        Ok(buf)
    }
}

impl std::fmt::Debug for RecipientContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientContext")
            .field("aead", &self.aead)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}
