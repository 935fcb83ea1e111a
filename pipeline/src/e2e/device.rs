//! A recipient's device with its private keys: for tests, the simulation and the load
//! generator's simulated edge. courier itself never holds a device's private key.
//!
//! A device has an Ed25519 identity key, a signed X25519 prekey (the previous one is kept
//! after a rotation, so that sessions set up just before it still open) and one-time
//! prekeys, each used for one session and then deleted. [`Device::from_seed`] derives all
//! of them from 32 bytes, so a seeded simulation replays the same devices.

use aws_lc_rs::hmac;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use super::bundle::{
    one_time_prekey_message, signed_prekey_message, DeviceBundle, OneTimePrekey, SignedPrekey,
    ONE_TIME_PREKEYS_MAX, SIGNATURE_BYTES,
};
use super::hpke::{HpkeError, X25519SecretKey};
use super::session::{accept, RecipientSession, SessionError, SessionHeader};

/// Signed prekeys a device keeps: the current one and the one before the last rotation.
pub const PREKEYS_KEPT: usize = 2;

struct Prekey {
    id: u32,
    secret: X25519SecretKey,
    signature: [u8; SIGNATURE_BYTES],
}

/// A device and its private keys. `Debug` shows ids and counts only.
pub struct Device {
    device_id: u32,
    seed: Zeroizing<[u8; 32]>,
    identity: Ed25519KeyPair,
    /// Newest last; at most [`PREKEYS_KEPT`].
    prekeys: Vec<Prekey>,
    one_time: Vec<(u32, X25519SecretKey)>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("device_id", &self.device_id)
            .field("prekey_id", &self.prekey_id())
            .field("one_time_prekeys", &self.one_time.len())
            .finish_non_exhaustive()
    }
}

/// `HMAC-SHA256(seed, label | id)`: one of the device's private keys.
fn derive(seed: &[u8; 32], label: &[u8], id: u32) -> Zeroizing<[u8; 32]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, seed);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"courier/e2e/v1 device ");
    ctx.update(label);
    ctx.update(&id.to_be_bytes());
    let mut out = Zeroizing::new([0; 32]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

impl Device {
    /// A device with fresh random keys: signed prekey 1 and one-time prekeys `1..=n`.
    pub fn generate(device_id: u32, one_time_prekeys: u32) -> Result<Device, HpkeError> {
        let mut seed = Zeroizing::new([0; 32]);
        aws_lc_rs::rand::fill(&mut seed[..]).map_err(|_| HpkeError::Random)?;
        Ok(Device::from_seed(device_id, &seed, one_time_prekeys))
    }

    /// A device whose keys all derive from `seed` (seeded simulations and tests).
    ///
    /// # Panics
    /// With more than [`ONE_TIME_PREKEYS_MAX`] one-time prekeys.
    pub fn from_seed(device_id: u32, seed: &[u8; 32], one_time_prekeys: u32) -> Device {
        assert!(
            one_time_prekeys as usize <= ONE_TIME_PREKEYS_MAX,
            "one-time prekeys bound"
        );
        let identity = Ed25519KeyPair::from_seed_unchecked(&derive(seed, b"identity", 0)[..])
            .expect("32 bytes are an Ed25519 seed");
        let one_time = (1..=one_time_prekeys)
            .map(|id| {
                (
                    id,
                    X25519SecretKey::from_bytes(&derive(seed, b"one-time", id)),
                )
            })
            .collect();
        let mut device = Device {
            device_id,
            seed: Zeroizing::new(*seed),
            identity,
            prekeys: Vec::with_capacity(PREKEYS_KEPT + 1),
            one_time,
        };
        device.add_prekey(1);
        device
    }

    fn add_prekey(&mut self, id: u32) {
        let secret = X25519SecretKey::from_bytes(&derive(&self.seed, b"prekey", id));
        let signature = self.sign(&signed_prekey_message(
            self.device_id,
            id,
            secret.public_key(),
        ));
        self.prekeys.push(Prekey {
            id,
            secret,
            signature,
        });
        if self.prekeys.len() > PREKEYS_KEPT {
            self.prekeys.remove(0);
        }
        assert!(self.prekeys.len() <= PREKEYS_KEPT);
    }

    /// Rotates the signed prekey (the next id); the previous one is kept, older ones
    /// are deleted. Returns the new prekey's id.
    pub fn rotate_prekey(&mut self) -> u32 {
        let id = self
            .prekey_id()
            .checked_add(1)
            .expect("prekey ids exhausted");
        self.add_prekey(id);
        id
    }

    /// Its id.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The current signed prekey's id.
    pub fn prekey_id(&self) -> u32 {
        self.prekeys.last().expect("a device has a prekey").id
    }

    /// Its Ed25519 identity public key.
    pub fn identity_key(&self) -> [u8; 32] {
        let mut k = [0; 32];
        k.copy_from_slice(self.identity.public_key().as_ref());
        k
    }

    fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let mut signature = [0; SIGNATURE_BYTES];
        signature.copy_from_slice(self.identity.sign(message).as_ref());
        signature
    }

    /// What the edge publishes for it: identity key, current signed prekey, the one-time
    /// prekeys not used yet (each signed).
    pub fn bundle(&self) -> DeviceBundle {
        let p = self.prekeys.last().expect("a device has a prekey");
        DeviceBundle {
            device_id: self.device_id,
            identity_key: self.identity_key(),
            signed_prekey: SignedPrekey {
                id: p.id,
                public: *p.secret.public_key(),
                signature: p.signature,
            },
            one_time_prekeys: self
                .one_time
                .iter()
                .map(|(id, k)| OneTimePrekey {
                    id: *id,
                    public: *k.public_key(),
                    signature: self.sign(&one_time_prekey_message(
                        self.device_id,
                        *id,
                        k.public_key(),
                    )),
                })
                .collect(),
        }
    }

    /// Sets up its side of a session courier opened to it for `business_id`. A one-time
    /// prekey is deleted as it is used: a second session to it is refused.
    pub fn accept_session(
        &mut self,
        business_id: u32,
        header: &SessionHeader,
    ) -> Result<RecipientSession, SessionError> {
        if header.device_id != self.device_id {
            return Err(SessionError::WrongDevice {
                expected: self.device_id,
                got: header.device_id,
            });
        }
        if !self.prekeys.iter().any(|p| p.id == header.prekey_id) {
            return Err(SessionError::UnknownPrekey {
                device_id: self.device_id,
                prekey_id: header.prekey_id,
            });
        }
        match header.one_time_prekey_id {
            None => {
                let p = self.prekeys.iter().find(|p| p.id == header.prekey_id);
                accept(business_id, header, &p.expect("checked above").secret)
            }
            Some(id) => {
                let at = self.one_time.iter().position(|(i, _)| *i == id).ok_or(
                    SessionError::UnknownOneTimePrekey {
                        device_id: self.device_id,
                        prekey_id: id,
                    },
                )?;
                let session = accept(business_id, header, &self.one_time[at].1)?;
                self.one_time.remove(at);
                Ok(session)
            }
        }
    }
}
