//! The key hierarchy of the log: a master key wraps per-segment data keys, kept in a
//! [`Keyring`] apart from the segments.
//!
//! ```text
//!   master key file (64 hex chars) ──> MasterKey ──wrap/unwrap──> DataKey (one per segment)
//!                                                      │
//!   Keyring { epoch, next_key_id, id -> wrapped key }──┘   to_bytes() ──> the shell writes it atomically
//! ```
//!
//! Invariants:
//! - key material never shows through `Debug`/`Display`, and is zeroized on drop;
//! - a data key is wrapped with AES-256-GCM under the master key with the key id in the
//!   AAD, so a wrapped key cannot be swapped to another id, and a wrong master key fails
//!   with [`KeyError::UnwrapFailed`] rather than yielding garbage;
//! - [`Keyring::destroy`] drops the wrapped key: once the keyring bytes without it are
//!   persisted, the segment it protected cannot be decrypted by anyone (crypto-shredding);
//! - key ids come from a counter persisted in the keyring and are never reused, so a
//!   destroyed id can be told apart from one never issued.

use std::collections::BTreeMap;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use crate::wire::LogPosition;

/// Bytes of a master or data key (AES-256).
pub const KEY_BYTES: usize = 32;
/// Bytes of an AES-GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Bytes of an AES-GCM tag.
pub const TAG_BYTES: usize = 16;
/// Most live keys a keyring holds; bounds parsing and memory.
pub const KEYRING_KEYS_MAX: usize = 1 << 20;

const KEYRING_MAGIC: [u8; 4] = *b"CRKR";
const KEYRING_VERSION: u16 = 1;
/// magic | version | reserved | epoch | next_key_id | index_floor | count
const KEYRING_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 8 + 4;
/// key_id | nonce | wrapped key | tag
const KEYRING_ENTRY_BYTES: usize = 8 + NONCE_BYTES + KEY_BYTES + TAG_BYTES;
const WRAP_AAD_PREFIX: &[u8; 16] = b"courier-dk-wrap1";

/// Why a key could not be loaded or used. Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The master key text is not 64 hex characters (an optional trailing newline allowed).
    #[error("master key must be 64 hex characters (32 bytes), optionally followed by a newline; got {chars} characters")]
    MasterKeyFormat {
        /// Characters found, newline excluded.
        chars: usize,
    },
    /// The master key text has a character that is not a hex digit.
    #[error("master key has a non-hex character at position {position}")]
    MasterKeyNotHex {
        /// Zero-based position of the first bad character.
        position: usize,
    },
    /// Unwrapping failed: a wrong master key, or a tampered keyring entry.
    #[error("data key {key_id} does not unwrap: wrong master key or tampered keyring")]
    UnwrapFailed {
        /// The data key id.
        key_id: u64,
    },
    /// The key was destroyed (its segment passed retention); its data is gone for good.
    #[error("data key {key_id} was destroyed")]
    Destroyed {
        /// The data key id.
        key_id: u64,
    },
    /// The keyring never issued this key id.
    #[error("data key {key_id} is unknown to this keyring")]
    Unknown {
        /// The data key id.
        key_id: u64,
    },
}

/// Why keyring bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// Fewer bytes than the header or than the entries it announces.
    #[error("keyring is truncated: {bytes} bytes, {needed} needed")]
    Truncated {
        /// Bytes given.
        bytes: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Not a keyring (bad magic).
    #[error("not a courier keyring (bad magic)")]
    Magic,
    /// A keyring version this build cannot read.
    #[error("keyring version {0} is not supported")]
    Version(u16),
    /// The CRC does not match: the file is corrupt.
    #[error("keyring CRC mismatch: the keyring file is corrupt")]
    Crc,
    /// More entries than [`KEYRING_KEYS_MAX`].
    #[error("keyring announces {0} keys, more than the bound")]
    TooManyKeys(u32),
    /// A counter is out of its range: the key id counter at 0 (ids start at 1), or the
    /// index floor beyond the log's index space. No log writes such a keyring. (Counters
    /// at `u64::MAX` parse, so that every keyring a log writes reads back; the log refuses
    /// to advance them, see `OpenError::Exhausted`.)
    #[error("keyring {0} is out of its range")]
    Counter(&'static str),
    /// Entries out of order, duplicated, or not below `next_key_id`.
    #[error("keyring entry {index} is inconsistent")]
    Inconsistent {
        /// Entry index.
        index: usize,
    },
    /// Bytes after the CRC.
    #[error("keyring has {0} trailing bytes")]
    Trailing(usize),
}

/// The key-encryption key. `Debug` is redacted; the bytes are zeroized on drop.
pub struct MasterKey {
    aead: LessSafeKey,
    bytes: Zeroizing<[u8; KEY_BYTES]>,
}

impl MasterKey {
    /// A master key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> MasterKey {
        let bytes = Zeroizing::new(bytes);
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes[..]).expect("32 bytes is an AES-256 key"),
        );
        MasterKey { aead, bytes }
    }

    /// Parses a master key file's contents: 64 hex characters, optionally followed by
    /// `\n` or `\r\n`.
    pub fn parse(text: &[u8]) -> Result<MasterKey, KeyError> {
        let text = text
            .strip_suffix(b"\n")
            .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
            .unwrap_or(text);
        if text.len() != 2 * KEY_BYTES {
            return Err(KeyError::MasterKeyFormat { chars: text.len() });
        }
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(KeyError::MasterKeyNotHex { position: 2 * i })?;
            let lo = hex_val(pair[1]).ok_or(KeyError::MasterKeyNotHex {
                position: 2 * i + 1,
            })?;
            bytes[i] = (hi << 4) | lo;
        }
        Ok(MasterKey::from_bytes(*bytes))
    }

    /// The text of a master key file for `bytes` (64 lowercase hex chars and a newline),
    /// for `courier keys init`. Handle with care: this is the secret.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(2 * KEY_BYTES + 1));
        for b in self.bytes.iter() {
            s.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble"));
            s.push(char::from_digit(u32::from(b & 15), 16).expect("nibble"));
        }
        s.push('\n');
        s
    }

    /// A 32-byte secret for another purpose, derived from this key with HKDF-SHA256 and a
    /// purpose label (`info`), so that one master key file serves every keyed function of
    /// the relay and the purposes stay independent.
    pub fn derive_secret(&self, info: &[u8]) -> Zeroizing<[u8; KEY_BYTES]> {
        use aws_lc_rs::hkdf;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"courier master key derivation v1")
            .extract(&self.bytes[..]);
        let mut out = Zeroizing::new([0u8; KEY_BYTES]);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out[..]))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// Wraps `key` under this master key. `nonce` must be 12 fresh random bytes.
    pub fn wrap(&self, key: &DataKey, nonce: [u8; NONCE_BYTES]) -> WrappedKey {
        let mut ct = *key.bytes;
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(key.id)),
                &mut ct,
            )
            .expect("AES-GCM seal of 32 bytes cannot fail");
        let mut t = [0u8; TAG_BYTES];
        t.copy_from_slice(tag.as_ref());
        WrappedKey {
            key_id: key.id,
            nonce,
            ciphertext: ct,
            tag: t,
        }
    }

    /// Unwraps a data key; fails with [`KeyError::UnwrapFailed`] under a wrong master key.
    pub fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        let mut buf = Zeroizing::new([0u8; KEY_BYTES + TAG_BYTES]);
        buf[..KEY_BYTES].copy_from_slice(&wrapped.ciphertext);
        buf[KEY_BYTES..].copy_from_slice(&wrapped.tag);
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(wrapped.nonce),
                Aad::from(wrap_aad(wrapped.key_id)),
                &mut buf[..],
            )
            .map_err(|_| KeyError::UnwrapFailed {
                key_id: wrapped.key_id,
            })?;
        let mut k = [0u8; KEY_BYTES];
        k.copy_from_slice(plain);
        Ok(DataKey::from_random(wrapped.key_id, k))
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

fn wrap_aad(key_id: u64) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..16].copy_from_slice(WRAP_AAD_PREFIX);
    aad[16..].copy_from_slice(&key_id.to_le_bytes());
    aad
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One segment's data key, in the clear (in memory only). `Debug` is redacted; the bytes
/// are zeroized on drop.
pub struct DataKey {
    id: u64,
    bytes: Zeroizing<[u8; KEY_BYTES]>,
    pub(crate) aead: LessSafeKey,
}

impl DataKey {
    /// A data key with id `id` from 32 bytes the caller drew from a CSPRNG.
    pub fn from_random(id: u64, random: [u8; KEY_BYTES]) -> DataKey {
        let bytes = Zeroizing::new(random);
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes[..]).expect("32 bytes is an AES-256 key"),
        );
        DataKey { id, bytes, aead }
    }

    /// The key id (in the keyring and in the segment header).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// HMAC-SHA256(this key, `label`): a secret of this segment for another purpose (the
    /// record format's field salt and field key), independent of the key itself.
    pub(crate) fn derive(&self, label: &[u8]) -> Zeroizing<[u8; KEY_BYTES]> {
        use aws_lc_rs::hmac;
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.bytes[..]), label);
        let mut out = Zeroizing::new([0u8; KEY_BYTES]);
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(id {}, <redacted>)", self.id)
    }
}

/// A data key wrapped by the master key: safe to store, useless without the master key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    key_id: u64,
    nonce: [u8; NONCE_BYTES],
    ciphertext: [u8; KEY_BYTES],
    tag: [u8; TAG_BYTES],
}

impl WrappedKey {
    /// The id of the wrapped key.
    pub fn key_id(&self) -> u64 {
        self.key_id
    }
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedKey(id {}, <redacted>)", self.key_id)
    }
}

/// What a keyring knows about a key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The wrapped key is held.
    Live,
    /// Issued once and destroyed since: the data it protected is unreadable.
    Destroyed,
    /// Never issued by this keyring.
    Unknown,
}

/// The set of wrapped data keys of one log, with the nonce epoch and the key id counter.
///
/// Serialized form (little endian), written atomically by the shell:
///
/// ```text
/// "CRKR" | version:u16 | 0:u16 | epoch:u64 | next_key_id:u64 | index_floor:u64 | count:u32
///        | count * (key_id:u64 | nonce[12] | wrapped[32] | tag[16])   (ids ascending)
///        | crc32c:u32 of everything before
/// ```
///
/// Destroyed keys leave no entry: an id below `next_key_id` that has no entry is
/// destroyed. That keeps the keyring's size a function of the live segments only.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    epoch: u64,
    next_key_id: u64,
    index_floor: u64,
    live: BTreeMap<u64, WrappedKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("epoch", &self.epoch)
            .field("next_key_id", &self.next_key_id)
            .field("index_floor", &self.index_floor)
            .field("live_keys", &self.live.len())
            .finish()
    }
}

impl Default for Keyring {
    fn default() -> Self {
        Keyring::new()
    }
}

impl Keyring {
    /// An empty keyring: epoch 0, no keys; ids start at 1.
    pub fn new() -> Keyring {
        Keyring {
            epoch: 0,
            next_key_id: 1,
            index_floor: 0,
            live: BTreeMap::new(),
        }
    }

    /// The current nonce epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bumps and returns the nonce epoch. The caller must persist [`Keyring::to_bytes`]
    /// durably before using the new epoch for any nonce: a crash then can only skip an
    /// epoch, never repeat one.
    pub fn next_epoch(&mut self) -> u64 {
        self.epoch = self.epoch.checked_add(1).expect("nonce epoch overflow");
        self.epoch
    }

    /// The lowest log index the log may hand out next (raised at every roll), so that
    /// positions are never reused even after every segment has expired.
    pub fn index_floor(&self) -> u64 {
        self.index_floor
    }

    /// Raises the index floor to `index` (never lowers it).
    pub fn raise_index_floor(&mut self, index: u64) {
        self.index_floor = self.index_floor.max(index);
    }

    /// The id the next created key will get.
    pub fn next_key_id(&self) -> u64 {
        self.next_key_id
    }

    /// Creates a data key from 32 random bytes, wraps it with `master` using the 12 random
    /// bytes `wrap_nonce`, and records it live. Returns the key in the clear. The keyring
    /// must be persisted before anything is encrypted under the key.
    pub fn create_key(
        &mut self,
        master: &MasterKey,
        random: [u8; KEY_BYTES],
        wrap_nonce: [u8; NONCE_BYTES],
    ) -> DataKey {
        assert!(self.live.len() < KEYRING_KEYS_MAX, "keyring is full");
        let id = self.next_key_id;
        self.next_key_id += 1;
        let key = DataKey::from_random(id, random);
        self.live.insert(id, master.wrap(&key, wrap_nonce));
        key
    }

    /// The state of `key_id`.
    pub fn state(&self, key_id: u64) -> KeyState {
        if self.live.contains_key(&key_id) {
            KeyState::Live
        } else if key_id != 0 && key_id < self.next_key_id {
            KeyState::Destroyed
        } else {
            KeyState::Unknown
        }
    }

    /// Unwraps live key `key_id` with `master`.
    pub fn data_key(&self, master: &MasterKey, key_id: u64) -> Result<DataKey, KeyError> {
        match self.live.get(&key_id) {
            Some(w) => master.unwrap(w),
            None if self.state(key_id) == KeyState::Destroyed => {
                Err(KeyError::Destroyed { key_id })
            }
            None => Err(KeyError::Unknown { key_id }),
        }
    }

    /// Destroys `key_id` for good: its wrapped bytes leave the keyring. Returns whether it
    /// was live. Persist the keyring before removing the segment file.
    pub fn destroy(&mut self, key_id: u64) -> bool {
        self.live.remove(&key_id).is_some()
    }

    /// The same keyring with every live key rewrapped from `old` to `new` (a master key
    /// rotation: `courier businesses erase`). Epoch, counters and destroyed ids are kept;
    /// each rewrapped key gets a fresh wrap nonce from `wrap_nonce`. Fails with
    /// [`KeyError::UnwrapFailed`] (changing nothing) when `old` does not unwrap a key.
    pub fn rewrapped(
        &self,
        old: &MasterKey,
        new: &MasterKey,
        wrap_nonce: &mut dyn FnMut() -> [u8; NONCE_BYTES],
    ) -> Result<Keyring, KeyError> {
        let mut live = BTreeMap::new();
        for (&id, w) in &self.live {
            let key = old.unwrap(w)?;
            live.insert(id, new.wrap(&key, wrap_nonce()));
        }
        assert_eq!(live.len(), self.live.len());
        Ok(Keyring {
            live,
            ..self.clone()
        })
    }

    /// Ids of the live keys, ascending.
    pub fn live_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.live.keys().copied()
    }

    /// Serializes the keyring (see the type docs for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(KEYRING_HEADER_BYTES + self.live.len() * KEYRING_ENTRY_BYTES + 4);
        out.extend_from_slice(&KEYRING_MAGIC);
        out.extend_from_slice(&KEYRING_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.next_key_id.to_le_bytes());
        out.extend_from_slice(&self.index_floor.to_le_bytes());
        out.extend_from_slice(&(self.live.len() as u32).to_le_bytes());
        for w in self.live.values() {
            out.extend_from_slice(&w.key_id.to_le_bytes());
            out.extend_from_slice(&w.nonce);
            out.extend_from_slice(&w.ciphertext);
            out.extend_from_slice(&w.tag);
        }
        let crc = crate::log::format::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(Keyring::from_bytes(&out).as_ref(), Ok(self));
        out
    }

    /// Parses keyring bytes; every length is checked before anything is allocated.
    pub fn from_bytes(bytes: &[u8]) -> Result<Keyring, KeyringError> {
        let truncated = |needed| KeyringError::Truncated {
            bytes: bytes.len(),
            needed,
        };
        if bytes.len() < KEYRING_HEADER_BYTES + 4 {
            return Err(truncated(KEYRING_HEADER_BYTES + 4));
        }
        if bytes[..4] != KEYRING_MAGIC {
            return Err(KeyringError::Magic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != KEYRING_VERSION {
            return Err(KeyringError::Version(version));
        }
        let count = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
        if count as usize > KEYRING_KEYS_MAX {
            return Err(KeyringError::TooManyKeys(count));
        }
        let body = KEYRING_HEADER_BYTES + count as usize * KEYRING_ENTRY_BYTES;
        if bytes.len() < body + 4 {
            return Err(truncated(body + 4));
        }
        if bytes.len() > body + 4 {
            return Err(KeyringError::Trailing(bytes.len() - body - 4));
        }
        let crc = u32::from_le_bytes(bytes[body..].try_into().expect("4 bytes"));
        if crate::log::format::crc32c(&bytes[..body]) != crc {
            return Err(KeyringError::Crc);
        }
        let epoch = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let next_key_id = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let index_floor = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        if next_key_id == 0 {
            return Err(KeyringError::Counter("key id counter"));
        }
        if index_floor > LogPosition::INDEX_LIMIT {
            return Err(KeyringError::Counter("index floor"));
        }
        let mut live = BTreeMap::new();
        let mut prev = 0u64;
        for (index, e) in bytes[KEYRING_HEADER_BYTES..body]
            .chunks_exact(KEYRING_ENTRY_BYTES)
            .enumerate()
        {
            let key_id = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            if key_id <= prev || key_id >= next_key_id {
                return Err(KeyringError::Inconsistent { index });
            }
            prev = key_id;
            let mut w = WrappedKey {
                key_id,
                nonce: [0; NONCE_BYTES],
                ciphertext: [0; KEY_BYTES],
                tag: [0; TAG_BYTES],
            };
            w.nonce.copy_from_slice(&e[8..20]);
            w.ciphertext.copy_from_slice(&e[20..52]);
            w.tag.copy_from_slice(&e[52..68]);
            live.insert(key_id, w);
        }
        Ok(Keyring {
            epoch,
            next_key_id,
            index_floor,
            live,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    #[test]
    fn master_key_parses_hex_with_optional_newline() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let a = MasterKey::parse(hex.as_bytes()).unwrap();
        let b = MasterKey::parse(format!("{hex}\n").as_bytes()).unwrap();
        assert_eq!(*a.bytes, *b.bytes);
        assert_eq!(a.bytes[1], 0x11);
        assert_eq!(
            MasterKey::parse(&hex.as_bytes()[..63]).unwrap_err(),
            KeyError::MasterKeyFormat { chars: 63 }
        );
        let bad = hex.replacen('a', "g", 1);
        assert!(matches!(
            MasterKey::parse(bad.as_bytes()),
            Err(KeyError::MasterKeyNotHex { .. })
        ));
        let text = a.to_file_text();
        assert_eq!(*MasterKey::parse(text.as_bytes()).unwrap().bytes, *a.bytes);
    }

    #[test]
    fn derived_secrets_depend_on_key_and_purpose_and_are_not_the_key() {
        let a = master(1).derive_secret(b"detect recipients");
        assert_eq!(*a, *master(1).derive_secret(b"detect recipients"));
        assert_ne!(*a, *master(2).derive_secret(b"detect recipients"));
        assert_ne!(*a, *master(1).derive_secret(b"other purpose"));
        assert_ne!(*a, [1u8; 32]);
    }

    #[test]
    fn wrong_master_key_fails_to_unwrap() {
        let mut ring = Keyring::new();
        let k = ring.create_key(&master(1), [7; 32], [9; 12]);
        assert!(ring.data_key(&master(1), k.id()).is_ok());
        assert_eq!(
            ring.data_key(&master(2), k.id()).unwrap_err(),
            KeyError::UnwrapFailed { key_id: k.id() }
        );
    }

    #[test]
    fn keyring_round_trips_and_detects_corruption() {
        let m = master(3);
        let mut ring = Keyring::new();
        for i in 0..5u8 {
            ring.create_key(&m, [i; 32], [i; 12]);
        }
        assert!(ring.destroy(2));
        assert!(!ring.destroy(2));
        ring.next_epoch();
        let bytes = ring.to_bytes();
        let back = Keyring::from_bytes(&bytes).unwrap();
        assert_eq!(back, ring);
        assert_eq!(back.state(2), KeyState::Destroyed);
        assert_eq!(back.state(3), KeyState::Live);
        assert_eq!(back.state(6), KeyState::Unknown);
        assert_eq!(back.epoch(), 1);
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                Keyring::from_bytes(&b).is_err(),
                "bit {i} flipped unnoticed"
            );
        }
        for cut in 0..bytes.len() {
            assert!(Keyring::from_bytes(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn rewrapped_keyring_opens_under_the_new_master_key_only() {
        let (old, new) = (master(4), master(5));
        let mut ring = Keyring::new();
        for i in 0..3u8 {
            ring.create_key(&old, [i; 32], [i; 12]);
        }
        assert!(ring.destroy(2));
        ring.next_epoch();
        let mut n = 0u8;
        let mut nonce = || {
            n += 1;
            [n; 12]
        };
        let moved = ring.rewrapped(&old, &new, &mut nonce).unwrap();
        assert_eq!(
            (moved.epoch(), moved.next_key_id(), moved.state(2)),
            (1, 4, KeyState::Destroyed)
        );
        assert_eq!(moved.live_ids().collect::<Vec<_>>(), vec![1, 3]);
        for id in [1, 3] {
            let before = ring.data_key(&old, id).unwrap();
            let after = moved.data_key(&new, id).unwrap();
            assert_eq!(*before.bytes, *after.bytes);
            assert_eq!(
                moved.data_key(&old, id).unwrap_err(),
                KeyError::UnwrapFailed { key_id: id }
            );
        }
        // A wrong old key changes nothing and says so.
        assert_eq!(
            ring.rewrapped(&new, &old, &mut || [0; 12]).unwrap_err(),
            KeyError::UnwrapFailed { key_id: 1 }
        );
    }
}
