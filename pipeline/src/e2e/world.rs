//! Recipients' devices with real keys, as the platform's side holds them: for tests and
//! the load generator's simulated edge. courier itself never holds a device's private key.
//!
//! ```text
//!  KEYS_WANTED(recipient) ─> bundles(recipient): its devices (1 or 2, by a hash of the
//!                            seed and the number), created from the seed on first use,
//!                            each with one signed prekey and ONE_TIME_PREKEYS one-time ones
//!  BUSINESS_KEYS          ─> learn_business_keys
//!  DELIVER_E2E            ─> open(d): every copy opens on its device (its session set up
//!                            from the copy's header at first), all to the same plaintext;
//!                            every device of the recipient got one copy; and a copy does
//!                            not open with another device's session (cross-device check)
//!  a reply                ─> seal_reply to the business's key in force
//! ```
//!
//! Bounds: at most `recipients_max` recipients' devices and
//! [`SESSIONS_PER_RECIPIENT_MAX`] sessions per device are kept; past them nothing new is
//! created and the message counts as not opened (`refused_full`).

use std::collections::HashMap;

use bytes::Bytes;

use super::bundle::encode_bundles;
use super::device::Device;
use super::hpke::PUBLIC_KEY_BYTES;
use super::session::{seal_reply, BusinessPublicKey, MessageAad, RecipientSession, SessionHeader};
use crate::wire::delivery::{decode_device_copies, BusinessKeyEntry, Deliver, DeviceKeysEntry};
use crate::wire::Recipient;

/// One-time prekeys each simulated device publishes.
pub const ONE_TIME_PREKEYS: u32 = 2;
/// Sessions kept per device (one per business and setup; a restarted relay sets up anew).
pub const SESSIONS_PER_RECIPIENT_MAX: usize = 64;

/// What the devices counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorldCounts {
    /// Messages whose every copy opened to one plaintext.
    pub messages_opened: u64,
    /// Copies opened.
    pub copies_opened: u64,
    /// Messages with a copy that did not open, a device without a copy, two copies
    /// that disagree, or a plain DELIVER where E2E was negotiated (must be 0).
    pub open_failures: u64,
    /// Copies tried with another device's session.
    pub cross_device_checks: u64,
    /// Of those, opened (must be 0).
    pub cross_device_opened: u64,
    /// Sessions set up on devices.
    pub sessions_accepted: u64,
    /// Bundle lists published.
    pub bundles_published: u64,
    /// Replies sealed.
    pub replies_sealed: u64,
    /// Messages or replies refused because a bound was full.
    pub refused_full: u64,
}

struct Holder {
    devices: Vec<Device>,
    /// The bundle list as last encoded (signing costs; cleared when a device changes).
    published: Option<Bytes>,
    /// `(business, device id, enc)` -> the device's side of that session.
    sessions: HashMap<(u32, u32, [u8; PUBLIC_KEY_BYTES]), RecipientSession>,
}

/// The devices of every recipient of a run. See the module docs.
pub struct DeviceWorld {
    seed: u64,
    recipients_max: usize,
    holders: HashMap<Recipient, Holder>,
    business_keys: HashMap<u32, BusinessPublicKey>,
    counts: WorldCounts,
}

impl std::fmt::Debug for DeviceWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWorld")
            .field("recipients", &self.holders.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

fn mix(seed: u64, recipient: &Recipient, device: u32) -> [u8; 32] {
    // Not a secret derivation: a seeded simulation's devices, reproducible from the seed.
    let mut out = [0u8; 32];
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15 ^ (u64::from(device) << 48);
    for &b in recipient.as_bytes() {
        x = (x ^ u64::from(b))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(17);
    }
    for chunk in out.chunks_exact_mut(8) {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f);
        chunk.copy_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
    out
}

impl DeviceWorld {
    /// Devices derived from `seed`, for at most `recipients_max` recipients.
    pub fn new(seed: u64, recipients_max: usize) -> DeviceWorld {
        DeviceWorld {
            seed,
            recipients_max,
            holders: HashMap::new(),
            business_keys: HashMap::new(),
            counts: WorldCounts::default(),
        }
    }

    /// The counters.
    pub fn counts(&self) -> WorldCounts {
        self.counts
    }

    /// How many devices `recipient` has (1 or 2).
    pub fn device_count(&self, recipient: &Recipient) -> u32 {
        1 + u32::from(mix(self.seed, recipient, 0)[0] & 1)
    }

    fn holder(&mut self, recipient: &Recipient) -> Option<&mut Holder> {
        if !self.holders.contains_key(recipient) {
            if self.holders.len() >= self.recipients_max {
                self.counts.refused_full += 1;
                return None;
            }
            let devices = (1..=self.device_count(recipient))
                .map(|id| Device::from_seed(id, &mix(self.seed, recipient, id), ONE_TIME_PREKEYS))
                .collect();
            self.holders.insert(
                *recipient,
                Holder {
                    devices,
                    published: None,
                    sessions: HashMap::new(),
                },
            );
        }
        self.holders.get_mut(recipient)
    }

    /// Makes `recipient`'s devices and signs their bundle list ahead of use (a device
    /// exists before anyone writes to it); `false` when the bound on recipients is full.
    pub fn prepare(&mut self, recipient: &Recipient) -> bool {
        let published = self.counts.bundles_published;
        let made = self.bundles(recipient).is_some();
        self.counts.bundles_published = published;
        made
    }

    /// The encoded bundle list `recipient`'s devices publish now (DEVICE_KEYS); `None`
    /// when the bound on recipients is full.
    pub fn bundles(&mut self, recipient: &Recipient) -> Option<Bytes> {
        let h = self.holder(recipient)?;
        let bytes = h
            .published
            .get_or_insert_with(|| {
                let list: Vec<_> = h.devices.iter().map(Device::bundle).collect();
                let mut out = Vec::new();
                encode_bundles(&list, &mut out);
                Bytes::from(out)
            })
            .clone();
        self.counts.bundles_published += 1;
        Some(bytes)
    }

    /// The DEVICE_KEYS entries answering a KEYS_WANTED for `recipients` (those past the
    /// bound on recipients are left out).
    pub fn device_keys(&mut self, recipients: &[Recipient]) -> Vec<DeviceKeysEntry> {
        recipients
            .iter()
            .filter_map(|r| {
                Some(DeviceKeysEntry {
                    recipient: *r,
                    bundles: self.bundles(r)?,
                })
            })
            .collect()
    }

    /// Rotates every signed prekey of `recipient`'s devices (publish again afterwards).
    pub fn rotate(&mut self, recipient: &Recipient) {
        if let Some(h) = self.holder(recipient) {
            for d in &mut h.devices {
                d.rotate_prekey();
            }
            h.published = None;
        }
    }

    /// The businesses' reply keys the relay published.
    pub fn learn_business_keys(&mut self, entries: &[BusinessKeyEntry]) {
        for e in entries {
            self.business_keys.insert(e.business_id, e.key);
        }
    }

    /// Opens a DELIVER_E2E on the recipient's devices: the plaintext, when every device
    /// got one copy and every copy opened to the same bytes (else counted in
    /// `open_failures`).
    pub fn open(&mut self, d: &Deliver) -> Option<Vec<u8>> {
        let opened = self.try_open(d);
        match &opened {
            Some(_) => self.counts.messages_opened += 1,
            None => self.counts.open_failures += 1,
        }
        opened
    }

    fn try_open(&mut self, d: &Deliver) -> Option<Vec<u8>> {
        if !d.e2e {
            return None;
        }
        let copies = decode_device_copies(&d.payload).ok()?;
        let aad = MessageAad {
            business_id: d.business_id,
            client_id: d.client_id,
            log_position: d.message.0,
        };
        let want = self.device_count(&d.recipient) as usize;
        let mut counts = self.counts;
        let result = (|| {
            let h = self.holder(&d.recipient)?;
            if copies.len() != want {
                return None;
            }
            let mut plain: Option<Vec<u8>> = None;
            let mut keys = Vec::with_capacity(copies.len());
            for c in &copies {
                let header = SessionHeader::from_bytes(&c.header).ok()?;
                if header.device_id != c.device_id {
                    return None;
                }
                let key = (d.business_id, c.device_id, header.enc);
                if !h.sessions.contains_key(&key) {
                    if h.sessions.len() >= SESSIONS_PER_RECIPIENT_MAX * h.devices.len() {
                        counts.refused_full += 1;
                        return None;
                    }
                    let device = h
                        .devices
                        .iter_mut()
                        .find(|x| x.device_id() == c.device_id)?;
                    let s = device.accept_session(d.business_id, &header).ok()?;
                    if header.one_time_prekey_id.is_some() {
                        // That one-time prekey is gone from the device's bundle.
                        h.published = None;
                    }
                    counts.sessions_accepted += 1;
                    h.sessions.insert(key, s);
                }
                let s = h.sessions.get_mut(&key).expect("inserted");
                let p = s.open(c.seq, &aad, &c.ciphertext).ok()?;
                counts.copies_opened += 1;
                if plain.as_ref().is_some_and(|q| *q != p) {
                    return None;
                }
                plain = Some(p);
                keys.push(key);
            }
            // Each copy with the other devices' sessions: none may open it.
            for (i, c) in copies.iter().enumerate() {
                for (j, k) in keys.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    counts.cross_device_checks += 1;
                    let s = h.sessions.get_mut(k).expect("kept");
                    if s.open(c.seq, &aad, &c.ciphertext).is_ok() {
                        counts.cross_device_opened += 1;
                    }
                }
            }
            plain
        })();
        self.counts = counts;
        result
    }

    /// A user's reply to `business_id` sealed by their device to the business's reply
    /// key (INBOUND payload; `edge_id` is the entry's id); `None` before the relay
    /// published that business's key.
    pub fn seal_reply(
        &mut self,
        business_id: u32,
        edge_id: u64,
        plaintext: &[u8],
    ) -> Option<Bytes> {
        let key = self.business_keys.get(&business_id)?;
        let sealed = seal_reply(key, business_id, edge_id, plaintext).ok()?;
        let mut out = Vec::new();
        sealed.encode(&mut out);
        self.counts.replies_sealed += 1;
        Some(Bytes::from(out))
    }
}
