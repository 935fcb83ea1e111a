//! End to end at hand-off (issue 16): what one shard knows of recipients' devices, its
//! sessions with them, and the businesses' reply keys.
//!
//! ```text
//!  a message due ──ready(recipient)?── no ──> Delivery parks it (at most device_key_wait_ms,
//!        │                                    then failed(no_device_key)); KEYS_WANTED
//!        │                                    to an edge at most every keys_wanted_retry_ms
//!        yes
//!        └─> seal(): open the relay's at-rest seal (the recipient key of the business)
//!            ─> per device of the recipient: its session (new: HPKE to the one-time
//!               prekey the bundle offers, its signature checked now, else to the
//!               signed prekey) ─> seal_append
//!            ─> DELIVER_E2E payload: copies (device_id, seq, session header, ct|tag)
//!  DEVICE_KEYS (any shard's edge) ─> decode + verify the signed prekeys (the edge's shard)
//!        ─> every shard: learn(recipient, bundles); its parked messages are due now
//!  INBOUND (with E2E) ─> open_reply with the business's reply key (current or previous
//!        rotation) ─> the plaintext is stored and forwarded; else rejected(bad_ciphertext)
//! ```
//!
//! **What is kept, and where.** Bundles are public keys, but linked to a phone number:
//! the directory lives in memory only (bounded by `directory_max`, oldest learned out
//! first, asked again after `directory_refresh_secs`), never on disk, so nothing of it
//! outlives the process or the retention; after a restart the relay asks the edge again.
//! One-time prekeys are split between shards by id (a shard takes those whose id is its
//! index modulo the shard count), so two shards never set up sessions to the same one.
//! Sessions (`sessions_max` per shard, oldest out first) are never persisted either: a
//! session lost with the process or evicted is replaced by a new one with a fresh
//! ephemeral key, so a (key, nonce) pair can never repeat, at the price of one HPKE setup
//! per (business, device) after a restart. Every copy carries its session's header (see
//! `wire::delivery`), so the device can set up its side from any message.
//!
//! **Reply keys** are derived from the business's root key
//! ([`crate::seal::keys::DerivedKeys::reply_secret`]), with the key id the number of
//! whole `reply_key_rotation_secs` periods since the epoch: nothing to store, a rotation
//! at every period, and the previous period's key still opens replies sealed just before
//! the rotation (older ones are refused). Gone with the business's root key.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::e2e::{
    decode_bundles, BundleError, BusinessKey, DeviceSession, MessageAad, ReplyError, SealedReply,
    SessionError, VerifiedBundle,
};
use crate::profile::ProfileIssue;
use crate::seal::keys::{DerivedKeys, RecipientKey, RecipientKeys};
use crate::wire::delivery::{put_device_copy, BusinessKeyEntry, Deliver};
use crate::wire::Recipient;

/// `[e2e]`: end-to-end sealing for recipients' devices and replies (with delivery on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct E2eConfig {
    /// Seal every message for the recipient's devices at hand-off, open users' replies
    /// sealed to the business's key; the edge must negotiate E2E to take deliveries.
    pub enabled: bool,
    /// Longest wait for a recipient's device keys before its message fails with
    /// `no_device_key`, milliseconds.
    pub device_key_wait_ms: u32,
    /// Least time between two KEYS_WANTED for one recipient, milliseconds.
    pub keys_wanted_retry_ms: u32,
    /// Recipients whose bundles a shard keeps in memory.
    pub directory_max: u32,
    /// Seconds after which a recipient's bundles are asked for again (still used
    /// meanwhile).
    pub directory_refresh_secs: u32,
    /// Device sessions a shard keeps.
    pub sessions_max: u32,
    /// Seconds between rotations of the businesses' reply keys.
    pub reply_key_rotation_secs: u64,
}

impl Default for E2eConfig {
    fn default() -> E2eConfig {
        E2eConfig {
            enabled: false,
            device_key_wait_ms: 30_000,
            keys_wanted_retry_ms: 1_000,
            directory_max: 65_536,
            directory_refresh_secs: 86_400,
            sessions_max: 65_536,
            reply_key_rotation_secs: 7 * 86_400,
        }
    }
}

impl E2eConfig {
    /// The problems of this section, each naming its key.
    pub fn issues(&self) -> Vec<ProfileIssue> {
        let mut out = Vec::new();
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                out.push(ProfileIssue {
                    key: format!("e2e.{key}"),
                    problem: format!("{v} is outside {lo}..={hi}"),
                });
            }
        };
        range(
            "device_key_wait_ms",
            self.device_key_wait_ms.into(),
            100,
            86_400_000,
        );
        range(
            "keys_wanted_retry_ms",
            self.keys_wanted_retry_ms.into(),
            10,
            600_000,
        );
        range("directory_max", self.directory_max.into(), 16, 1 << 24);
        range(
            "directory_refresh_secs",
            self.directory_refresh_secs.into(),
            1,
            30 * 86_400,
        );
        range("sessions_max", self.sessions_max.into(), 16, 1 << 24);
        range(
            "reply_key_rotation_secs",
            self.reply_key_rotation_secs,
            60,
            30 * 86_400,
        );
        out
    }
}

/// Most new device sessions one dispatch sets up (an X25519 key and agreement each,
/// and a signature check for a one-time prekey, tens of µs each), one-time prekeys
/// refused on the way counted too: past it the due messages wait for the next call, so
/// that a burst of new recipients spreads over many turns of the shard's loop instead of
/// holding its acks.
pub const SESSIONS_PER_DISPATCH_MAX: u64 = 16;
/// Most published bundle lists one turn verifies (a signature check per key); the rest
/// wait in [`Devices::queue_published`]'s bounded queue.
pub const LISTS_VERIFIED_PER_TURN_MAX: usize = 8;

/// Why a message could not be sealed for its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealFail {
    /// The relay's own seal did not open (no key for the business, or corrupt bytes).
    AtRest,
    /// No device of the recipient could get a session.
    NoDevice,
}

/// What the end-to-end stage counts (per shard).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DevicesCounts {
    /// Sessions set up.
    pub sessions_new: u64,
    /// Copies sealed for devices.
    pub copies: u64,
    /// Recipients asked for with KEYS_WANTED.
    pub keys_wanted: u64,
    /// Recipients' bundle lists learned (from any shard's edge).
    pub bundles_learned: u64,
    /// Recipients' bundle lists refused (bad structure or signed-prekey signature).
    pub bundles_refused: u64,
    /// One-time prekeys refused when a session was about to use them (bad signature).
    pub one_time_refused: u64,
    /// Replies opened.
    pub replies_opened: u64,
    /// Replies refused (did not open).
    pub replies_refused: u64,
    /// Messages whose relay seal did not open at hand-off.
    pub open_failures: u64,
}

impl DevicesCounts {
    /// Sessions set up and one-time prekeys refused: the work [`SESSIONS_PER_DISPATCH_MAX`]
    /// bounds.
    pub fn setup_work(&self) -> u64 {
        self.sessions_new + self.one_time_refused
    }
}

struct Entry {
    bundles: Arc<[VerifiedBundle]>,
    /// The published list's bytes: the same list again needs no verification.
    raw: Bytes,
    learned_ms: u64,
    serial: u64,
    /// One-time prekeys already used for a session, `(device_id, prekey_id)`.
    used_one_time: Vec<(u32, u32)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey {
    business_id: u32,
    recipient: Recipient,
    device_id: u32,
}

struct Slot {
    session: DeviceSession,
    identity: [u8; 32],
    prekey_id: u32,
    serial: u64,
}

/// One shard's end-to-end state. See the module docs.
pub struct Devices {
    cfg: E2eConfig,
    /// This shard's index and the node's shard count: a shard uses only the one-time
    /// prekeys whose id is its index modulo the count, so that no two shards (whose
    /// directories are apart) set up two sessions to one one-time prekey.
    shard: u32,
    shards: u32,
    directory: HashMap<Recipient, Entry>,
    directory_order: VecDeque<(u64, Recipient)>,
    asked: HashMap<Recipient, u64>,
    sessions: HashMap<SessionKey, Slot>,
    session_order: VecDeque<(u64, SessionKey)>,
    serial: u64,
    reply_keys: HashMap<(u32, u32), BusinessKey>,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    counts: DevicesCounts,
    /// Bundle lists published and not yet verified, oldest first (at most
    /// `directory_max`; past it the oldest go, and their recipients are asked again).
    published: VecDeque<crate::wire::delivery::DeviceKeysEntry>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("recipients", &self.directory.len())
            .field("sessions", &self.sessions.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// Decodes one recipient's published bundle list and verifies every device's signed
/// prekey in it; the list is refused whole when one is bad. One-time prekeys are checked
/// when a session is about to use one ([`VerifiedBundle::one_time_prekey`]).
pub fn verify_bundles(bytes: &[u8]) -> Result<Arc<[VerifiedBundle]>, BundleError> {
    decode_bundles(bytes)?
        .into_iter()
        .map(VerifiedBundle::new)
        .collect::<Result<Vec<_>, _>>()
        .map(Arc::from)
}

impl Devices {
    /// Empty state.
    pub fn new(cfg: E2eConfig, shard: u32, shards: u32) -> Devices {
        assert!(shard < shards.max(1), "a shard of the node");
        Devices {
            cfg,
            shard,
            shards: shards.max(1),
            directory: HashMap::new(),
            directory_order: VecDeque::new(),
            asked: HashMap::new(),
            sessions: HashMap::new(),
            session_order: VecDeque::new(),
            serial: 0,
            reply_keys: HashMap::new(),
            plain: Vec::new(),
            sealed: Vec::new(),
            counts: DevicesCounts::default(),
            published: VecDeque::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &E2eConfig {
        &self.cfg
    }

    /// The counters.
    pub fn counts(&self) -> DevicesCounts {
        self.counts
    }

    /// Recipients in the directory and sessions held.
    pub fn sizes(&self) -> (usize, usize) {
        (self.directory.len(), self.sessions.len())
    }

    /// Queues published bundle lists for verification ([`Devices::verify_some`]).
    pub fn queue_published(&mut self, entries: Vec<crate::wire::delivery::DeviceKeysEntry>) {
        self.published.extend(entries);
        while self.published.len() > self.cfg.directory_max as usize {
            self.published.pop_front();
        }
    }

    /// Whether published lists wait for verification.
    pub fn has_published(&self) -> bool {
        !self.published.is_empty()
    }

    /// Verifies up to [`LISTS_VERIFIED_PER_TURN_MAX`] queued lists (a list this shard
    /// holds already costs no check): the verified ones, with their bytes. Refused ones
    /// are counted in [`DevicesCounts::bundles_refused`].
    pub fn verify_some(&mut self) -> Vec<(Recipient, Arc<[VerifiedBundle]>, Bytes)> {
        let mut learned = Vec::new();
        let mut checked = 0;
        while checked < LISTS_VERIFIED_PER_TURN_MAX {
            let Some(e) = self.published.pop_front() else {
                break;
            };
            let result = match self.known(&e.recipient, &e.bundles) {
                Some(b) => Ok(b),
                None => {
                    checked += 1;
                    verify_bundles(&e.bundles)
                }
            };
            match result {
                Ok(bundles) => learned.push((e.recipient, bundles, e.bundles)),
                Err(_) => self.counts.bundles_refused += 1,
            }
        }
        learned
    }

    /// Whether a message for `recipient` can be sealed now: at least one device known.
    pub fn ready(&self, recipient: &Recipient) -> bool {
        self.directory
            .get(recipient)
            .is_some_and(|e| !e.bundles.is_empty())
    }

    /// Whether to ask the edge for `recipient`'s keys now (not asked within
    /// `keys_wanted_retry_ms`); records the asking.
    pub fn want(&mut self, now_ms: u64, recipient: Recipient) -> bool {
        let retry = u64::from(self.cfg.keys_wanted_retry_ms);
        if self
            .asked
            .get(&recipient)
            .is_some_and(|&at| now_ms < at + retry)
        {
            return false;
        }
        // Bounded like the directory: old askings are forgotten first.
        if self.asked.len() >= self.cfg.directory_max as usize {
            self.asked.retain(|_, at| now_ms < *at + retry);
            if self.asked.len() >= self.cfg.directory_max as usize {
                return false;
            }
        }
        self.asked.insert(recipient, now_ms);
        self.counts.keys_wanted += 1;
        true
    }

    /// The verified bundles of `recipient` when `raw` is the list this shard already
    /// holds for it (an edge answering twice, or a refresh that changed nothing): no
    /// signature needs checking again.
    pub fn known(&self, recipient: &Recipient, raw: &[u8]) -> Option<Arc<[VerifiedBundle]>> {
        self.directory
            .get(recipient)
            .filter(|e| e.raw == raw)
            .map(|e| Arc::clone(&e.bundles))
    }

    /// A recipient's verified bundles, published as `raw` (none: it has no device now).
    pub fn learn(
        &mut self,
        now_ms: u64,
        recipient: Recipient,
        bundles: Arc<[VerifiedBundle]>,
        raw: Bytes,
    ) {
        self.counts.bundles_learned += 1;
        self.asked.remove(&recipient);
        self.serial += 1;
        let serial = self.serial;
        let used_one_time = self
            .directory
            .remove(&recipient)
            .map(|e| e.used_one_time)
            .unwrap_or_default();
        self.directory.insert(
            recipient,
            Entry {
                bundles,
                raw,
                learned_ms: now_ms,
                serial,
                used_one_time,
            },
        );
        self.directory_order.push_back((serial, recipient));
        while self.directory.len() > self.cfg.directory_max as usize {
            let Some((s, r)) = self.directory_order.pop_front() else {
                break;
            };
            if self.directory.get(&r).is_some_and(|e| e.serial == s) {
                self.directory.remove(&r);
            }
        }
        // The order queue holds stale pairs of re-learned recipients: bounded at twice
        // the directory by dropping them.
        if self.directory_order.len() > 2 * self.cfg.directory_max as usize {
            let directory = &self.directory;
            self.directory_order
                .retain(|(s, r)| directory.get(r).is_some_and(|e| e.serial == *s));
        }
    }

    /// Seals `d` (its payload the relay's at-rest seal) for each of its recipient's
    /// devices: its payload becomes the DELIVER_E2E copies. Returns whether the
    /// recipient's bundles are due for a refresh (ask the edge again); the sessions set
    /// up are counted in [`DevicesCounts::sessions_new`].
    pub fn seal(
        &mut self,
        keys: &DerivedKeys,
        now_ms: u64,
        d: &mut Deliver,
    ) -> Result<bool, SealFail> {
        let Some(entry) = self.directory.get(&d.recipient) else {
            return Err(SealFail::NoDevice);
        };
        let bundles = Arc::clone(&entry.bundles);
        let refresh =
            now_ms >= entry.learned_ms + u64::from(self.cfg.directory_refresh_secs) * 1000;
        let mut key = RecipientKey::zeroed();
        let opened = keys
            .recipient_key(d.business_id, &d.recipient, &mut key)
            .ok()
            .and_then(|()| {
                crate::seal::open(
                    &key,
                    d.business_id,
                    &d.recipient,
                    d.client_id,
                    &d.payload,
                    &mut self.plain,
                )
                .ok()
                .map(|p| p.len())
            });
        if opened.is_none() {
            self.counts.open_failures += 1;
            return Err(SealFail::AtRest);
        }
        let aad = MessageAad {
            business_id: d.business_id,
            client_id: d.client_id,
            log_position: d.message.0,
        };
        let mut out = Vec::with_capacity(
            1 + bundles.len()
                * (crate::wire::delivery::DEVICE_COPY_FIXED_BYTES
                    + self.plain.len()
                    + crate::e2e::hpke::TAG_BYTES),
        );
        out.push(0u8);
        let mut copies = 0u8;
        let (mut plain, mut sealed) = (
            std::mem::take(&mut self.plain),
            std::mem::take(&mut self.sealed),
        );
        for b in bundles.iter() {
            let Some(session) = self.session_for(d.business_id, d.recipient, b) else {
                continue;
            };
            sealed.clear();
            let Ok(seq) = session.seal_append(&aad, &plain, &mut sealed) else {
                continue;
            };
            let header = session.header().to_bytes();
            put_device_copy(&mut out, b.bundle().device_id, seq, &header, &sealed);
            copies += 1;
        }
        plain.fill(0);
        (self.plain, self.sealed) = (plain, sealed);
        if copies == 0 {
            return Err(SealFail::NoDevice);
        }
        out[0] = copies;
        self.counts.copies += u64::from(copies);
        d.payload = Bytes::from(out);
        d.e2e = true;
        Ok(refresh)
    }

    /// The session with `bundle`'s device for `business_id`: the cached one while the
    /// device keeps its identity and signed prekey, else a new one (to a one-time prekey
    /// not used before, when the bundle offers one).
    fn session_for(
        &mut self,
        business_id: u32,
        recipient: Recipient,
        bundle: &VerifiedBundle,
    ) -> Option<&mut DeviceSession> {
        let b = bundle.bundle();
        let key = SessionKey {
            business_id,
            recipient,
            device_id: b.device_id,
        };
        let current = self
            .sessions
            .get(&key)
            .is_some_and(|s| s.identity == b.identity_key && s.prekey_id == b.signed_prekey.id);
        if !current {
            // The first one-time prekey of this shard's not used before; one whose
            // signature does not verify is never used (and not tried again), the next
            // one or the signed prekey is.
            let (shard, shards) = (self.shard, self.shards);
            let mut refused: Vec<u32> = Vec::new();
            let made = {
                let used = self
                    .directory
                    .get(&recipient)
                    .map(|e| e.used_one_time.as_slice())
                    .unwrap_or_default();
                let mut candidates = b
                    .one_time_prekeys
                    .iter()
                    .map(|k| k.id)
                    .filter(|id| id % shards == shard)
                    .filter(|id| !used.contains(&(b.device_id, *id)));
                loop {
                    let one_time = candidates.next();
                    match DeviceSession::new(business_id, bundle, one_time) {
                        Ok(session) => break Some((session, one_time)),
                        Err(SessionError::BadOneTimeSignature { prekey_id, .. }) => {
                            refused.push(prekey_id);
                        }
                        Err(_) => break None,
                    }
                }
            };
            self.counts.one_time_refused += refused.len() as u64;
            if let Some(e) = self.directory.get_mut(&recipient) {
                let taken = made.as_ref().and_then(|(_, id)| *id);
                for id in refused.iter().copied().chain(taken) {
                    if e.used_one_time.len() < crate::e2e::bundle::ONE_TIME_PREKEYS_MAX * 16 {
                        e.used_one_time.push((b.device_id, id));
                    }
                }
            }
            let (session, _) = made?;
            self.counts.sessions_new += 1;
            self.serial += 1;
            self.sessions.insert(
                key,
                Slot {
                    session,
                    identity: b.identity_key,
                    prekey_id: b.signed_prekey.id,
                    serial: self.serial,
                },
            );
            self.session_order.push_back((self.serial, key));
            self.evict_sessions(key);
        }
        self.sessions.get_mut(&key).map(|s| &mut s.session)
    }

    fn evict_sessions(&mut self, keep: SessionKey) {
        while self.sessions.len() > self.cfg.sessions_max as usize {
            let Some((s, k)) = self.session_order.pop_front() else {
                break;
            };
            if k != keep && self.sessions.get(&k).is_some_and(|slot| slot.serial == s) {
                self.sessions.remove(&k);
            }
        }
        if self.session_order.len() > 2 * self.cfg.sessions_max as usize {
            let sessions = &self.sessions;
            self.session_order
                .retain(|(s, k)| sessions.get(k).is_some_and(|slot| slot.serial == *s));
        }
    }

    /// The reply key id in force at `now_ms`.
    pub fn reply_key_id(&self, now_ms: u64) -> u32 {
        let period = self.cfg.reply_key_rotation_secs.max(1) * 1000;
        u32::try_from(now_ms / period).unwrap_or(u32::MAX)
    }

    fn reply_key(
        &mut self,
        keys: &DerivedKeys,
        business_id: u32,
        key_id: u32,
    ) -> Option<&BusinessKey> {
        if !self.reply_keys.contains_key(&(business_id, key_id)) {
            let secret = keys.reply_secret(business_id, key_id).ok()?;
            // Bounded: two ids per business are in use; a full cache starts over.
            if self.reply_keys.len() >= 2 * keys.len().max(1) + 16 {
                self.reply_keys.clear();
            }
            self.reply_keys.insert(
                (business_id, key_id),
                BusinessKey::from_bytes(key_id, &secret),
            );
        }
        self.reply_keys.get(&(business_id, key_id))
    }

    /// The reply keys in force at `now_ms` of every business loaded, for BUSINESS_KEYS.
    pub fn reply_keys(&mut self, keys: &DerivedKeys, now_ms: u64) -> Vec<BusinessKeyEntry> {
        let key_id = self.reply_key_id(now_ms);
        keys.business_ids()
            .into_iter()
            .filter_map(|business_id| {
                let k = self.reply_key(keys, business_id, key_id)?;
                Some(BusinessKeyEntry {
                    business_id,
                    key: k.public(),
                })
            })
            .collect()
    }

    /// Opens a user's reply to `business_id` sealed by a device (`payload`: a
    /// [`SealedReply`]) with the edge's id `edge_id`: to the key in force or the one
    /// before it.
    pub fn open_reply(
        &mut self,
        keys: &DerivedKeys,
        now_ms: u64,
        business_id: u32,
        edge_id: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, ReplyError> {
        let result = self.try_open_reply(keys, now_ms, business_id, edge_id, payload);
        match result {
            Ok(_) => self.counts.replies_opened += 1,
            Err(_) => self.counts.replies_refused += 1,
        }
        result
    }

    fn try_open_reply(
        &mut self,
        keys: &DerivedKeys,
        now_ms: u64,
        business_id: u32,
        edge_id: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, ReplyError> {
        let reply = SealedReply::decode(payload)?;
        let current = self.reply_key_id(now_ms);
        if reply.business_key_id != current && reply.business_key_id.wrapping_add(1) != current {
            return Err(ReplyError::WrongKey {
                expected: current,
                got: reply.business_key_id,
            });
        }
        let key = self
            .reply_key(keys, business_id, reply.business_key_id)
            .ok_or(ReplyError::WrongKey {
                expected: current,
                got: reply.business_key_id,
            })?;
        key.open_reply(business_id, edge_id, &reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{encode_bundles, seal_reply, Device, DeviceBundle, SessionHeader};
    use crate::seal::keys::RootKey;
    use crate::seal::{Sealer, SealerConfig};
    use crate::wire::delivery::decode_device_copies;
    use crate::wire::{LogPosition, Message};
    use crate::ShardId;

    fn r(s: &str) -> Recipient {
        Recipient::parse(s.as_bytes()).unwrap()
    }

    fn keys() -> DerivedKeys {
        let mut k = DerivedKeys::new();
        k.insert_root(7, &RootKey::from_bytes([3; 32]));
        k.insert_root(8, &RootKey::from_bytes([4; 32]));
        k
    }

    /// A DELIVER for `recipient` of business 7 whose payload is the relay's seal of `text`.
    fn deliver(keys: &DerivedKeys, recipient: Recipient, text: &[u8]) -> Deliver {
        deliver_of(7, keys, recipient, text)
    }

    /// The same for `business_id`.
    fn deliver_of(
        business_id: u32,
        keys: &DerivedKeys,
        recipient: Recipient,
        text: &[u8],
    ) -> Deliver {
        let mut sealer = Sealer::new(
            keys,
            SealerConfig {
                epoch: 1,
                shard: ShardId::new(0),
                nonce_mask: [0; 12],
                cache_keys_max: 4,
            },
        );
        let msg = Message {
            client_id: 11,
            recipient,
            payload: Bytes::copy_from_slice(text),
        };
        let mut out = crate::seal::SealedBatch::new();
        sealer.seal_batch(business_id, &[msg], &mut out).unwrap();
        Deliver {
            message: LogPosition::new(ShardId::new(0), 42),
            business_id,
            client_id: 11,
            expires_ms: 1,
            recipient,
            payload: Bytes::copy_from_slice(out.get(0).unwrap()),
            e2e: false,
        }
    }

    fn bundles(devices: &[&Device]) -> Arc<[VerifiedBundle]> {
        let list: Vec<_> = devices.iter().map(|d| d.bundle()).collect();
        published(&list)
    }

    /// `list` as the edge publishes it, verified as a shard does.
    fn published(list: &[DeviceBundle]) -> Arc<[VerifiedBundle]> {
        let mut bytes = Vec::new();
        encode_bundles(list, &mut bytes);
        verify_bundles(&bytes).expect("every signed prekey verifies")
    }

    /// The session header and sequence number of `d`'s first device copy.
    fn first_copy(d: &Deliver) -> (SessionHeader, u64) {
        let c = &decode_device_copies(&d.payload).unwrap()[0];
        (SessionHeader::from_bytes(&c.header).unwrap(), c.seq)
    }

    #[test]
    fn every_device_opens_its_copy_and_no_other_device_does() {
        let keys = keys();
        let alice = r("+15550001111");
        let (mut phone, mut laptop) = (
            Device::from_seed(1, &[1; 32], 2),
            Device::from_seed(2, &[2; 32], 0),
        );
        let mut stranger = Device::from_seed(1, &[9; 32], 0);
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        assert!(!devices.ready(&alice));
        devices.learn(0, alice, bundles(&[&phone, &laptop]), Bytes::new());
        assert!(devices.ready(&alice));
        let mut d = deliver(&keys, alice, b"hello from the business");
        assert_eq!(devices.seal(&keys, 0, &mut d), Ok(false));
        assert!(d.e2e);
        let copies = decode_device_copies(&d.payload).unwrap();
        assert_eq!(copies.len(), 2);
        let aad = MessageAad {
            business_id: 7,
            client_id: 11,
            log_position: d.message.0,
        };
        for (c, dev) in copies.iter().zip([&mut phone, &mut laptop]) {
            assert_eq!(c.device_id, dev.device_id());
            let header = SessionHeader::from_bytes(&c.header).unwrap();
            // The phone offered one-time prekeys: the session uses one.
            assert_eq!(header.one_time_prekey_id.is_some(), c.device_id == 1);
            let mut s = dev.accept_session(7, &header).unwrap();
            assert_eq!(
                s.open(c.seq, &aad, &c.ciphertext).unwrap(),
                b"hello from the business"
            );
            // Replayed sequence number: refused.
            assert!(s.open(c.seq, &aad, &c.ciphertext).is_err());
        }
        // Another device with the same id (another recipient's phone) cannot open it.
        let header = SessionHeader::from_bytes(&copies[1].header).unwrap();
        let mut h = header;
        h.device_id = 1;
        h.one_time_prekey_id = None;
        h.prekey_id = stranger.prekey_id();
        if let Ok(mut s) = stranger.accept_session(7, &h) {
            assert!(s.open(copies[1].seq, &aad, &copies[1].ciphertext).is_err());
        }
        // The copy does not open as another message (AAD binds the position).
        let mut laptop2 = Device::from_seed(2, &[2; 32], 0);
        let mut s = laptop2.accept_session(7, &header).unwrap();
        let other = MessageAad {
            log_position: 43,
            ..aad
        };
        assert!(s
            .open(copies[1].seq, &other, &copies[1].ciphertext)
            .is_err());
        // A second message reuses the sessions: next sequence number, one setup each.
        let mut d2 = deliver(&keys, alice, b"again");
        devices.seal(&keys, 1, &mut d2).unwrap();
        let copies2 = decode_device_copies(&d2.payload).unwrap();
        assert_eq!(copies2[0].seq, copies[0].seq + 1);
        assert_eq!(copies2[0].header, copies[0].header);
        assert_eq!(devices.counts().sessions_new, 2);
        assert_eq!(devices.counts().copies, 4);
    }

    #[test]
    fn a_rotated_prekey_gets_a_new_session() {
        let keys = keys();
        let bob = r("+15550002222");
        let mut dev = Device::from_seed(1, &[5; 32], 0);
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        devices.learn(0, bob, bundles(&[&dev]), Bytes::new());
        let mut d = deliver(&keys, bob, b"one");
        devices.seal(&keys, 0, &mut d).unwrap();
        let first = decode_device_copies(&d.payload).unwrap()[0].header;
        dev.rotate_prekey();
        devices.learn(1, bob, bundles(&[&dev]), Bytes::new());
        let mut d = deliver(&keys, bob, b"two");
        devices.seal(&keys, 1, &mut d).unwrap();
        let c = &decode_device_copies(&d.payload).unwrap()[0];
        assert_ne!(c.header, first);
        let header = SessionHeader::from_bytes(&c.header).unwrap();
        assert_eq!(header.prekey_id, dev.prekey_id());
        assert_eq!(c.seq, 0);
        assert_eq!(devices.counts().sessions_new, 2);
    }

    #[test]
    fn no_device_and_a_bad_relay_seal_are_refused() {
        let keys = keys();
        let carol = r("+15550003333");
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        let mut d = deliver(&keys, carol, b"x");
        assert_eq!(devices.seal(&keys, 0, &mut d), Err(SealFail::NoDevice));
        devices.learn(0, carol, Arc::from(Vec::new()), Bytes::new());
        assert!(!devices.ready(&carol), "a recipient without devices");
        devices.learn(
            0,
            carol,
            bundles(&[&Device::from_seed(1, &[6; 32], 0)]),
            Bytes::new(),
        );
        let mut bad = d.clone();
        let mut p = bad.payload.to_vec();
        p[20] ^= 1;
        bad.payload = Bytes::from(p);
        assert_eq!(devices.seal(&keys, 0, &mut bad), Err(SealFail::AtRest));
        assert!(!bad.e2e);
        assert_eq!(devices.counts().open_failures, 1);
    }

    #[test]
    fn a_one_time_prekey_that_is_not_signed_is_never_used_and_the_next_one_is() {
        let keys = keys();
        let alice = r("+15550003333");
        let mut phone = Device::from_seed(1, &[6; 32], 3);
        let mut bundle = phone.bundle();
        let ids: Vec<u32> = bundle.one_time_prekeys.iter().map(|k| k.id).collect();
        // The first one-time prekey's signature is broken (an edge's key of its own, or a
        // damaged one); the list is still learned, its signed prekey being good.
        bundle.one_time_prekeys[0].signature[0] ^= 1;
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        devices.learn(0, alice, published(&[bundle]), Bytes::new());
        let mut d = deliver(&keys, alice, b"first contact");
        devices.seal(&keys, 0, &mut d).unwrap();
        let (header, seq) = first_copy(&d);
        assert_eq!(
            header.one_time_prekey_id,
            Some(ids[1]),
            "the next one is used"
        );
        assert_eq!(devices.counts().one_time_refused, 1);
        let aad = MessageAad {
            business_id: 7,
            client_id: 11,
            log_position: d.message.0,
        };
        let c = &decode_device_copies(&d.payload).unwrap()[0];
        let mut s = phone.accept_session(7, &header).unwrap();
        assert_eq!(s.open(seq, &aad, &c.ciphertext).unwrap(), b"first contact");
        // Another business's session: the third one-time prekey; the refused one is not
        // tried (nor counted) again.
        let mut d8 = deliver_of(8, &keys, alice, b"x");
        devices.seal(&keys, 1, &mut d8).unwrap();
        assert_eq!(first_copy(&d8).0.one_time_prekey_id, Some(ids[2]));
        assert_eq!(devices.counts().sessions_new, 2);
        assert_eq!(devices.counts().one_time_refused, 1);
    }

    #[test]
    fn with_no_good_one_time_prekey_the_session_is_to_the_signed_prekey() {
        let keys = keys();
        let bob = r("+15550004444");
        let dev = Device::from_seed(1, &[7; 32], 2);
        let mut bundle = dev.bundle();
        for k in &mut bundle.one_time_prekeys {
            k.signature[5] ^= 0x40;
        }
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        devices.learn(0, bob, published(&[bundle]), Bytes::new());
        let mut d = deliver(&keys, bob, b"hi");
        devices.seal(&keys, 0, &mut d).unwrap();
        let (header, _) = first_copy(&d);
        assert_eq!(header.one_time_prekey_id, None);
        assert_eq!(header.prekey_id, dev.prekey_id());
        assert_eq!(devices.counts().one_time_refused, 2);
    }

    #[test]
    fn a_bad_signed_prekey_signature_refuses_the_whole_list() {
        let dev = Device::from_seed(1, &[7; 32], 1);
        let mut b = dev.bundle();
        b.signed_prekey.public[0] ^= 1;
        let mut bytes = Vec::new();
        encode_bundles(&[Device::from_seed(2, &[8; 32], 0).bundle(), b], &mut bytes);
        assert!(verify_bundles(&bytes).is_err());
    }

    #[test]
    fn the_directory_and_the_sessions_stay_within_their_bounds() {
        let keys = keys();
        let cfg = E2eConfig {
            directory_max: 16,
            sessions_max: 16,
            ..E2eConfig::default()
        };
        let mut devices = Devices::new(cfg, 0, 1);
        let dev = Device::from_seed(1, &[1; 32], 0);
        let list = bundles(&[&dev]);
        for i in 0..100u64 {
            let rcpt = r(&format!("+1555{:07}", i));
            devices.learn(i, rcpt, Arc::clone(&list), Bytes::new());
            let mut d = deliver(&keys, rcpt, b"m");
            devices.seal(&keys, i, &mut d).unwrap();
            let (dir, sessions) = devices.sizes();
            assert!(dir <= 16 && sessions <= 16, "{dir} {sessions}");
        }
        assert!(devices.directory_order.len() <= 32);
        assert!(devices.session_order.len() <= 32);
    }

    #[test]
    fn the_same_list_again_is_known_without_verifying() {
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        let erin = r("+15550005555");
        let dev = Device::from_seed(1, &[3; 32], 0);
        let mut raw = Vec::new();
        encode_bundles(&[dev.bundle()], &mut raw);
        let raw = Bytes::from(raw);
        assert!(devices.known(&erin, &raw).is_none());
        devices.learn(0, erin, verify_bundles(&raw).unwrap(), raw.clone());
        assert_eq!(devices.known(&erin, &raw).unwrap().len(), 1);
        let mut other = raw.to_vec();
        other[10] ^= 1;
        assert!(devices.known(&erin, &other).is_none(), "changed bytes");
    }

    #[test]
    fn published_lists_are_verified_a_few_per_turn_and_bad_ones_refused() {
        use crate::wire::delivery::DeviceKeysEntry;
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        let list = |seed: u8, bad: bool| {
            let mut b = Device::from_seed(1, &[seed; 32], 1).bundle();
            if bad {
                b.signed_prekey.public[0] ^= 1;
            }
            let mut raw = Vec::new();
            encode_bundles(&[b], &mut raw);
            Bytes::from(raw)
        };
        let entries: Vec<DeviceKeysEntry> = (0..20u8)
            .map(|i| DeviceKeysEntry {
                recipient: r(&format!("+1555000{:04}", i)),
                bundles: list(i, i == 3),
            })
            .collect();
        devices.queue_published(entries.clone());
        let first = devices.verify_some();
        assert_eq!(first.len(), LISTS_VERIFIED_PER_TURN_MAX - 1);
        assert_eq!(devices.counts().bundles_refused, 1);
        for (r, b, raw) in first {
            devices.learn(0, r, b, raw);
        }
        let mut turns = 1;
        while devices.has_published() {
            let more = devices.verify_some();
            assert_eq!(devices.counts().bundles_refused, 1);
            for (r, b, raw) in more {
                devices.learn(0, r, b, raw);
            }
            turns += 1;
        }
        assert_eq!(turns, 3);
        assert_eq!(devices.sizes().0, 19, "every good list learned");
        // The same lists again cost no check: all in one turn.
        devices.queue_published(entries);
        let again = devices.verify_some();
        assert!(again.len() > LISTS_VERIFIED_PER_TURN_MAX);
        assert_eq!(devices.counts().bundles_refused, 2, "the bad list again");
    }

    #[test]
    fn keys_wanted_is_asked_again_only_after_the_retry() {
        let mut devices = Devices::new(E2eConfig::default(), 0, 1);
        let dave = r("+15550004444");
        assert!(devices.want(0, dave));
        assert!(!devices.want(999, dave));
        assert!(devices.want(1_000, dave));
    }

    #[test]
    fn replies_open_with_the_current_and_previous_key_only() {
        let keys = keys();
        let cfg = E2eConfig {
            reply_key_rotation_secs: 60,
            ..E2eConfig::default()
        };
        let mut devices = Devices::new(cfg, 0, 1);
        let at = |period: u64| period * 60_000;
        let published = devices.reply_keys(&keys, at(5));
        assert_eq!(published.len(), 2);
        let k7 = published.iter().find(|e| e.business_id == 7).unwrap().key;
        assert_eq!(k7.key_id, 5);
        let mut bytes = Vec::new();
        seal_reply(&k7, 7, 99, b"yes please")
            .unwrap()
            .encode(&mut bytes);
        for period in [5, 6] {
            assert_eq!(
                devices
                    .open_reply(&keys, at(period), 7, 99, &bytes)
                    .unwrap(),
                b"yes please"
            );
        }
        assert!(
            devices.open_reply(&keys, at(7), 7, 99, &bytes).is_err(),
            "retired"
        );
        assert!(
            devices.open_reply(&keys, at(5), 8, 99, &bytes).is_err(),
            "other business"
        );
        assert!(
            devices.open_reply(&keys, at(5), 7, 98, &bytes).is_err(),
            "other edge id"
        );
        let mut tampered = bytes.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(devices.open_reply(&keys, at(5), 7, 99, &tampered).is_err());
        assert!(devices
            .open_reply(&keys, at(5), 7, 99, &bytes[..10])
            .is_err());
        assert_eq!(devices.counts().replies_opened, 2);
        assert_eq!(devices.counts().replies_refused, 5);
    }
}
