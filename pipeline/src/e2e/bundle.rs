//! Device key bundles: what the delivery edge publishes for each of a recipient's devices,
//! their signatures, and the compact binary list of one recipient's bundles.
//!
//! ```text
//!  signed messages (what the identity key signs; fixed layouts):
//!    "courier/e2e/v1 signed prekey" (28)   | device_id:u32 | prekey_id:u32 | prekey(32)  68 B
//!    "courier/e2e/v1 one-time prekey" (30) | device_id:u32 | prekey_id:u32 | prekey(32)  70 B
//!  bundle list (all integers big endian):
//!    version:u8 (=1) | device_count:u8 (<= DEVICES_PER_RECIPIENT_MAX)
//!    device_count * ( device_id:u32 | identity_key(32) | prekey_id:u32 | prekey(32)
//!                     | signature(64) | one_time_count:u8 (<= ONE_TIME_PREKEYS_MAX)
//!                     | one_time_count * (id:u32 | key(32) | signature(64)) )
//! ```
//!
//! Decoding checks the structure only (bounds, no duplicate device or one-time prekey id,
//! no trailing byte); [`DeviceBundle::verify`] checks every signature. A
//! [`VerifiedBundle`] (its signed prekey checked; each one-time prekey checked when a
//! session is set up to it) is the only thing a session is set up to.
//!
//! **Why one-time prekeys are signed too** (unlike Signal's X3DH). X3DH mixes the one-time
//! prekey's agreement with the signed prekey's, so an unsigned one-time key cannot
//! redirect a session. HPKE base mode has one recipient key: a session to a one-time
//! prekey depends on that key alone, so an unsigned one would let whoever publishes the
//! bundles (the edge) read the messages. The two contexts differ, so a signature over a
//! signed prekey is never taken for one over a one-time prekey, or back.

use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};

use super::hpke::PUBLIC_KEY_BYTES;

/// Bytes of an Ed25519 public key.
pub const IDENTITY_KEY_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Devices per recipient a bundle list may hold.
pub const DEVICES_PER_RECIPIENT_MAX: usize = 16;
/// One-time prekeys per device a bundle may hold.
pub const ONE_TIME_PREKEYS_MAX: usize = 32;
/// Version byte of the bundle list encoding.
pub const BUNDLE_LIST_VERSION: u8 = 1;
/// Domain separation of the prekey signature; a new layout gets a new version.
pub const SIGNED_PREKEY_CONTEXT: &[u8] = b"courier/e2e/v1 signed prekey";
/// Domain separation of a one-time prekey's signature.
pub const ONE_TIME_PREKEY_CONTEXT: &[u8] = b"courier/e2e/v1 one-time prekey";
/// Bytes of the message the identity key signs for the signed prekey.
pub const SIGNED_PREKEY_MESSAGE_BYTES: usize =
    SIGNED_PREKEY_CONTEXT.len() + 4 + 4 + PUBLIC_KEY_BYTES;
/// Bytes of the message the identity key signs for a one-time prekey.
pub const ONE_TIME_PREKEY_MESSAGE_BYTES: usize =
    ONE_TIME_PREKEY_CONTEXT.len() + 4 + 4 + PUBLIC_KEY_BYTES;
/// Bytes of one one-time prekey in the list.
pub const ONE_TIME_PREKEY_BYTES: usize = 4 + PUBLIC_KEY_BYTES + SIGNATURE_BYTES;
/// Bytes of one bundle without its one-time prekeys.
pub const BUNDLE_FIXED_BYTES: usize =
    4 + IDENTITY_KEY_BYTES + 4 + PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 1;
/// The largest bundle list.
pub const BUNDLE_LIST_BYTES_MAX: usize = 2 + DEVICES_PER_RECIPIENT_MAX
    * (BUNDLE_FIXED_BYTES + ONE_TIME_PREKEYS_MAX * ONE_TIME_PREKEY_BYTES);

const _: () = assert!(DEVICES_PER_RECIPIENT_MAX <= u8::MAX as usize);
const _: () = assert!(ONE_TIME_PREKEYS_MAX <= u8::MAX as usize);
const _: () = assert!(SIGNED_PREKEY_MESSAGE_BYTES == 68);
const _: () = assert!(ONE_TIME_PREKEY_MESSAGE_BYTES == 70);

/// Why a bundle or a bundle list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The prekey's signature does not verify under the device's identity key (or the
    /// identity key is not a valid Ed25519 key). The bundle must not be used.
    #[error("device {device_id}: signature of prekey {prekey_id} does not verify")]
    BadSignature {
        /// The device.
        device_id: u32,
        /// Its signed prekey's id.
        prekey_id: u32,
    },
    /// A one-time prekey's signature does not verify under the device's identity key.
    /// The whole bundle must not be used (its publisher changed what the device signed).
    #[error("device {device_id}: signature of one-time prekey {prekey_id} does not verify")]
    BadOneTimeSignature {
        /// The device.
        device_id: u32,
        /// The one-time prekey's id.
        prekey_id: u32,
    },
    /// The list ended inside a field.
    #[error("bundle list truncated at byte {at}")]
    Truncated {
        /// Where the missing field starts.
        at: usize,
    },
    /// An unknown version byte.
    #[error("bundle list version {0} (this build reads {BUNDLE_LIST_VERSION})")]
    Version(u8),
    /// More devices than [`DEVICES_PER_RECIPIENT_MAX`].
    #[error("{count} devices in a bundle list (at most {DEVICES_PER_RECIPIENT_MAX})")]
    TooManyDevices {
        /// The count the list claims.
        count: usize,
    },
    /// More one-time prekeys than [`ONE_TIME_PREKEYS_MAX`].
    #[error("device {device_id}: {count} one-time prekeys (at most {ONE_TIME_PREKEYS_MAX})")]
    TooManyOneTimePrekeys {
        /// The device.
        device_id: u32,
        /// The count the bundle claims.
        count: usize,
    },
    /// Two bundles of one device.
    #[error("device {device_id} listed twice")]
    DuplicateDevice {
        /// The device.
        device_id: u32,
    },
    /// Two one-time prekeys of one device with the same id.
    #[error("device {device_id}: one-time prekey {prekey_id} listed twice")]
    DuplicateOneTimePrekey {
        /// The device.
        device_id: u32,
        /// The repeated id.
        prekey_id: u32,
    },
    /// Bytes after the last bundle.
    #[error("{count} bytes after the bundle list")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

/// A device's signed X25519 prekey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPrekey {
    /// Its id (the device's; a rotation gives a new id).
    pub id: u32,
    /// The X25519 public key.
    pub public: [u8; PUBLIC_KEY_BYTES],
    /// Ed25519 signature by the identity key over [`signed_prekey_message`].
    pub signature: [u8; SIGNATURE_BYTES],
}

/// A one-time X25519 prekey, signed by the identity key like the signed prekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneTimePrekey {
    /// Its id, unique among the device's one-time prekeys.
    pub id: u32,
    /// The X25519 public key.
    pub public: [u8; PUBLIC_KEY_BYTES],
    /// Ed25519 signature by the identity key over [`one_time_prekey_message`].
    pub signature: [u8; SIGNATURE_BYTES],
}

/// What the edge publishes for one device. Public keys only: `Debug` may show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    /// The device, unique among its recipient's devices.
    pub device_id: u32,
    /// Its long-term Ed25519 identity key.
    pub identity_key: [u8; IDENTITY_KEY_BYTES],
    /// Its signed prekey.
    pub signed_prekey: SignedPrekey,
    /// Its one-time prekeys (at most [`ONE_TIME_PREKEYS_MAX`]).
    pub one_time_prekeys: Vec<OneTimePrekey>,
}

/// The message a device's identity key signs for its prekey:
/// `SIGNED_PREKEY_CONTEXT | device_id (u32 BE) | prekey_id (u32 BE) | prekey (32)`.
pub fn signed_prekey_message(
    device_id: u32,
    prekey_id: u32,
    prekey: &[u8; PUBLIC_KEY_BYTES],
) -> [u8; SIGNED_PREKEY_MESSAGE_BYTES] {
    const C: usize = SIGNED_PREKEY_CONTEXT.len();
    let mut m = [0; SIGNED_PREKEY_MESSAGE_BYTES];
    m[..C].copy_from_slice(SIGNED_PREKEY_CONTEXT);
    m[C..C + 4].copy_from_slice(&device_id.to_be_bytes());
    m[C + 4..C + 8].copy_from_slice(&prekey_id.to_be_bytes());
    m[C + 8..].copy_from_slice(prekey);
    m
}

/// The message a device's identity key signs for a one-time prekey:
/// `ONE_TIME_PREKEY_CONTEXT | device_id (u32 BE) | prekey_id (u32 BE) | prekey (32)`.
pub fn one_time_prekey_message(
    device_id: u32,
    prekey_id: u32,
    prekey: &[u8; PUBLIC_KEY_BYTES],
) -> [u8; ONE_TIME_PREKEY_MESSAGE_BYTES] {
    const C: usize = ONE_TIME_PREKEY_CONTEXT.len();
    let mut m = [0; ONE_TIME_PREKEY_MESSAGE_BYTES];
    m[..C].copy_from_slice(ONE_TIME_PREKEY_CONTEXT);
    m[C..C + 4].copy_from_slice(&device_id.to_be_bytes());
    m[C + 4..C + 8].copy_from_slice(&prekey_id.to_be_bytes());
    m[C + 8..].copy_from_slice(prekey);
    m
}

impl DeviceBundle {
    /// Checks the signed prekey's and every one-time prekey's signature under the
    /// identity key (an invalid identity key fails them all).
    pub fn verify(&self) -> Result<(), BundleError> {
        assert!(self.one_time_prekeys.len() <= ONE_TIME_PREKEYS_MAX);
        self.verify_signed_prekey()?;
        self.one_time_prekeys
            .iter()
            .try_for_each(|k| self.verify_one_time_prekey(k))
    }

    /// Checks the signed prekey's signature under the identity key.
    pub fn verify_signed_prekey(&self) -> Result<(), BundleError> {
        let p = &self.signed_prekey;
        let message = signed_prekey_message(self.device_id, p.id, &p.public);
        self.signed_by_identity(&message, &p.signature)
            .ok_or(BundleError::BadSignature {
                device_id: self.device_id,
                prekey_id: p.id,
            })
    }

    /// Checks one one-time prekey's signature under the identity key.
    pub fn verify_one_time_prekey(&self, k: &OneTimePrekey) -> Result<(), BundleError> {
        let message = one_time_prekey_message(self.device_id, k.id, &k.public);
        self.signed_by_identity(&message, &k.signature)
            .ok_or(BundleError::BadOneTimeSignature {
                device_id: self.device_id,
                prekey_id: k.id,
            })
    }

    /// `Some(())` when `signature` is the identity key's over `message`.
    fn signed_by_identity(&self, message: &[u8], signature: &[u8]) -> Option<()> {
        UnparsedPublicKey::new(&ED25519, &self.identity_key)
            .verify(message, signature)
            .ok()
    }

    /// Bytes of this bundle in a list.
    pub fn encoded_len(&self) -> usize {
        BUNDLE_FIXED_BYTES + self.one_time_prekeys.len() * ONE_TIME_PREKEY_BYTES
    }

    fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.one_time_prekeys.len() <= ONE_TIME_PREKEYS_MAX,
            "one-time prekeys bound"
        );
        out.extend_from_slice(&self.device_id.to_be_bytes());
        out.extend_from_slice(&self.identity_key);
        out.extend_from_slice(&self.signed_prekey.id.to_be_bytes());
        out.extend_from_slice(&self.signed_prekey.public);
        out.extend_from_slice(&self.signed_prekey.signature);
        out.push(self.one_time_prekeys.len() as u8);
        for k in &self.one_time_prekeys {
            out.extend_from_slice(&k.id.to_be_bytes());
            out.extend_from_slice(&k.public);
            out.extend_from_slice(&k.signature);
        }
    }
}

/// A bundle whose signed prekey's signature verified: the only kind a session is set up
/// to. Its one-time prekeys are checked one at a time, when a session is set up to one
/// ([`VerifiedBundle::one_time_prekey`]): a relay uses at most one per device and shard,
/// so checking all of them when it learns the bundle (up to [`ONE_TIME_PREKEYS_MAX`]
/// signatures, about 35 µs each) made first contact with a device cost up to 30 times
/// what the session itself costs (BENCHMARKS.md, "One-time prekeys checked when used").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle(DeviceBundle);

impl VerifiedBundle {
    /// Verifies `bundle`'s signed prekey ([`DeviceBundle::verify_signed_prekey`]).
    pub fn new(bundle: DeviceBundle) -> Result<VerifiedBundle, BundleError> {
        assert!(bundle.one_time_prekeys.len() <= ONE_TIME_PREKEYS_MAX);
        bundle.verify_signed_prekey()?;
        Ok(VerifiedBundle(bundle))
    }

    /// The bundle.
    pub fn bundle(&self) -> &DeviceBundle {
        &self.0
    }

    /// The one-time prekey of this id, its signature checked: `Ok(None)` if the bundle
    /// offers none of this id, an error if its signature does not verify (never use it).
    pub fn one_time_prekey(&self, id: u32) -> Result<Option<&OneTimePrekey>, BundleError> {
        let Some(k) = self.0.one_time_prekeys.iter().find(|k| k.id == id) else {
            return Ok(None);
        };
        self.0.verify_one_time_prekey(k)?;
        Ok(Some(k))
    }
}

/// Appends the list of one recipient's bundles to `out`.
///
/// # Panics
/// With more than [`DEVICES_PER_RECIPIENT_MAX`] bundles or more than
/// [`ONE_TIME_PREKEYS_MAX`] one-time prekeys in one: the caller bounds its lists.
pub fn encode_bundles(bundles: &[DeviceBundle], out: &mut Vec<u8>) {
    assert!(
        bundles.len() <= DEVICES_PER_RECIPIENT_MAX,
        "devices per recipient bound"
    );
    let start = out.len();
    out.push(BUNDLE_LIST_VERSION);
    out.push(bundles.len() as u8);
    for b in bundles {
        b.encode(out);
    }
    assert!(out.len() - start <= BUNDLE_LIST_BYTES_MAX);
}

/// A cursor over untrusted bytes that reports where it ran out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], BundleError> {
        let end = self.at.checked_add(N).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(BundleError::Truncated { at: self.at })?;
        let out = self.bytes[self.at..end].try_into().expect("N bytes");
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, BundleError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, BundleError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
}

/// Decodes a bundle list (structure only: verify each bundle before use). Hostile input
/// is refused with an error, never a panic, and allocates at most the bounds allow.
pub fn decode_bundles(bytes: &[u8]) -> Result<Vec<DeviceBundle>, BundleError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != BUNDLE_LIST_VERSION {
        return Err(BundleError::Version(version));
    }
    let count = usize::from(r.u8()?);
    if count > DEVICES_PER_RECIPIENT_MAX {
        return Err(BundleError::TooManyDevices { count });
    }
    let mut bundles: Vec<DeviceBundle> = Vec::with_capacity(count);
    for _ in 0..count {
        let bundle = decode_bundle(&mut r)?;
        if bundles.iter().any(|b| b.device_id == bundle.device_id) {
            return Err(BundleError::DuplicateDevice {
                device_id: bundle.device_id,
            });
        }
        bundles.push(bundle);
    }
    if r.at != bytes.len() {
        return Err(BundleError::TrailingBytes {
            count: bytes.len() - r.at,
        });
    }
    Ok(bundles)
}

fn decode_bundle(r: &mut Reader<'_>) -> Result<DeviceBundle, BundleError> {
    let device_id = r.u32()?;
    let identity_key = r.take()?;
    let signed_prekey = SignedPrekey {
        id: r.u32()?,
        public: r.take()?,
        signature: r.take()?,
    };
    let count = usize::from(r.u8()?);
    if count > ONE_TIME_PREKEYS_MAX {
        return Err(BundleError::TooManyOneTimePrekeys { device_id, count });
    }
    let mut one_time_prekeys: Vec<OneTimePrekey> = Vec::with_capacity(count);
    for _ in 0..count {
        let k = OneTimePrekey {
            id: r.u32()?,
            public: r.take()?,
            signature: r.take()?,
        };
        if one_time_prekeys.iter().any(|o| o.id == k.id) {
            return Err(BundleError::DuplicateOneTimePrekey {
                device_id,
                prekey_id: k.id,
            });
        }
        one_time_prekeys.push(k);
    }
    Ok(DeviceBundle {
        device_id,
        identity_key,
        signed_prekey,
        one_time_prekeys,
    })
}
