//! Per-device sessions for delivery, and users' replies sealed to a business's key.
//!
//! ```text
//!  delivery (courier -> device), one session per (business, device):
//!    info = "courier/e2e/v1 deliver" (22) | business_id:u32 | device_id:u32 | prekey_id:u32
//!           | one_time_present:u8 | one_time_prekey_id:u32 (0 when absent)       39 bytes
//!    aad  = "courier/e2e/v1 message" (22) | business_id:u32 | client_id:u64
//!           | log_position:u64                                                    42 bytes
//!    DeviceSession::new(business_id, &VerifiedBundle, one_time) -> header (ids + enc)
//!    DeviceSession::seal_*(aad, ..) -> (seq, ciphertext | tag)
//!    device: Device::accept_session(business_id, header) -> RecipientSession::open(seq, aad, ..)
//!  replies (device -> courier), one HPKE message each (seq 0):
//!    info = "courier/e2e/v1 reply" (20) | business_id:u32 | business_key_id:u32   28 bytes
//!    aad  = "courier/e2e/v1 reply" (20) | business_id:u32 | edge_id:u64           32 bytes
//!    SealedReply = business_key_id:u32 | enc(32) | ciphertext | tag(16)
//! ```
//!
//! All integers are big endian and every field has a fixed width, so no two different
//! inputs encode alike. `info` binds the session to its business, device and prekeys (a
//! session for business A does not open business B's messages); the AAD binds each
//! message to its business, client message id and log position (a message cannot be
//! replayed as another); the sequence number is in the nonce.
//!
//! **Sequence numbers across restarts: reservations.** A [`DeviceSession`] seals at
//! increasing sequence numbers, and its key and base nonce are fixed for its life, so a
//! restored copy must never seal at a number the lost process used. A session persists
//! only through [`DeviceSession::reserve`], whose [`SessionState`] records `seq_limit`, a
//! number ahead of use, as the next sequence number; once the caller has written that
//! state durably it says so with [`DeviceSession::reserved`], and the session seals below
//! that limit only (past it: [`SessionError::SeqNotReserved`], the remedy being the next
//! reservation). [`DeviceSession::import`] resumes at the stored limit and seals nothing
//! until the caller has reserved and persisted again. So a restore from any durable copy
//! skips numbers but never repeats one:
//!
//! ```text
//!  new ─seal 0..n─> reserve(k): state S1 = n+k, limit = S1 (it may be durable any moment)
//!      ─seal < S1─> reserve(k): state S2 ─write─> reserved(S2): limit = S2 ─seal < S2─> ..
//!  crash, import(last durable Si) ─> next_seq = Si, limit = Si: reserve, write, reserved
//! ```
//!
//! This assumes the caller's writes of one session's state land in order (a later state
//! never overwritten by an earlier one). A session never persisted needs no limit: lost
//! with the process, it is replaced by a new session (a fresh ephemeral key, so a new
//! key and base nonce), whose header the next DELIVER carries.

use zeroize::Zeroizing;

use super::bundle::VerifiedBundle;
use super::hpke::{
    setup_base_r, setup_base_s, ContextSecrets, EncappedKey, HpkeError, RecipientContext,
    SenderContext, X25519SecretKey, CONTEXT_SECRETS_BYTES, PUBLIC_KEY_BYTES, TAG_BYTES,
};

/// Domain separation of a delivery session's `info`.
pub const DELIVER_INFO_PREFIX: &[u8] = b"courier/e2e/v1 deliver";
/// Domain separation of a delivered message's AAD.
pub const MESSAGE_AAD_PREFIX: &[u8] = b"courier/e2e/v1 message";
/// Domain separation of a reply's `info` and AAD.
pub const REPLY_PREFIX: &[u8] = b"courier/e2e/v1 reply";
/// Bytes of a delivery session's `info`.
pub const DELIVER_INFO_BYTES: usize = DELIVER_INFO_PREFIX.len() + 4 + 4 + 4 + 1 + 4;
/// Bytes of a delivered message's AAD.
pub const MESSAGE_AAD_BYTES: usize = MESSAGE_AAD_PREFIX.len() + 4 + 8 + 8;
/// Bytes of a reply's `info`.
pub const REPLY_INFO_BYTES: usize = REPLY_PREFIX.len() + 4 + 4;
/// Bytes of a reply's AAD.
pub const REPLY_AAD_BYTES: usize = REPLY_PREFIX.len() + 4 + 8;
/// Bytes of a [`SealedReply`] besides its ciphertext.
pub const REPLY_HEADER_BYTES: usize = 4 + PUBLIC_KEY_BYTES;
/// Bytes of a [`SessionHeader`] in [`DeviceSession::export`].
pub const SESSION_HEADER_BYTES: usize = 4 + 4 + 1 + 4 + PUBLIC_KEY_BYTES;
/// Bytes of a [`SessionState`].
pub const SESSION_STATE_BYTES: usize = 4 + SESSION_HEADER_BYTES + CONTEXT_SECRETS_BYTES + 8;

const _: () = assert!(DELIVER_INFO_BYTES == 39);
const _: () = assert!(MESSAGE_AAD_BYTES == 42);
const _: () = assert!(REPLY_INFO_BYTES == 28 && REPLY_AAD_BYTES == 32);

/// Why a session was not set up, restored or accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The HPKE setup failed (a small-order prekey or `enc`, or no randomness).
    #[error(transparent)]
    Hpke(#[from] HpkeError),
    /// The bundle offers no one-time prekey of this id (sender), or the device has no
    /// such one-time prekey, or has used it already (device).
    #[error("device {device_id}: no one-time prekey {prekey_id}")]
    UnknownOneTimePrekey {
        /// The device.
        device_id: u32,
        /// The one-time prekey asked for.
        prekey_id: u32,
    },
    /// The bundle's one-time prekey of this id is not signed by the device's identity
    /// key: the session is not set up to it (the edge published a key of its own, or a
    /// damaged one).
    #[error("device {device_id}: signature of one-time prekey {prekey_id} does not verify")]
    BadOneTimeSignature {
        /// The device.
        device_id: u32,
        /// The one-time prekey refused.
        prekey_id: u32,
    },
    /// The device holds no signed prekey of this id (rotated away long ago, or never).
    #[error("device {device_id}: no signed prekey {prekey_id}")]
    UnknownPrekey {
        /// The device.
        device_id: u32,
        /// The prekey asked for.
        prekey_id: u32,
    },
    /// The session is for another device.
    #[error("session for device {got} offered to device {expected}")]
    WrongDevice {
        /// This device.
        expected: u32,
        /// The session's device.
        got: u32,
    },
    /// Persisted session bytes that cannot be a session.
    #[error("persisted session state is malformed")]
    BadState,
    /// The session has sealed up to the limit of its last durable [`SessionState`].
    /// Remedy: persist [`DeviceSession::reserve`]'s state, then call
    /// [`DeviceSession::reserved`]; or set up a new session.
    #[error("sequence number {next_seq} not reserved (durable limit {seq_limit}); persist a reservation")]
    SeqNotReserved {
        /// The sequence number the next message would take.
        next_seq: u64,
        /// The limit of the last durable state.
        seq_limit: u64,
    },
}

/// Why a reply was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Shorter than key id, `enc` and a tag.
    #[error("sealed reply of {len} bytes is shorter than its header and tag")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Sealed to another of the business's keys: look that key up (an old one still in
    /// use) or refuse the reply.
    #[error("reply sealed to business key {got}, opened with key {expected}")]
    WrongKey {
        /// The key it was opened with.
        expected: u32,
        /// The key it names.
        got: u32,
    },
    /// It does not open: bad `enc`, wrong business, edge id or key, or changed bytes.
    #[error(transparent)]
    Hpke(#[from] HpkeError),
}

/// What a device needs to set up its side of a session: sent with the session's first
/// message (the DELIVER frame carries `enc` then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionHeader {
    /// The device sealed for.
    pub device_id: u32,
    /// Its signed prekey used.
    pub prekey_id: u32,
    /// Its one-time prekey used, if any (used once: the device deletes it).
    pub one_time_prekey_id: Option<u32>,
    /// The sender's ephemeral public key.
    pub enc: EncappedKey,
}

impl SessionHeader {
    /// Its bytes, as DELIVER_E2E carries them:
    /// `device_id:u32 | prekey_id:u32 | one_time_present:u8 | one_time_prekey_id:u32 | enc(32)`.
    pub fn to_bytes(&self) -> [u8; SESSION_HEADER_BYTES] {
        let mut out = [0; SESSION_HEADER_BYTES];
        self.encode(&mut out);
        out
    }

    /// The header of [`SessionHeader::to_bytes`].
    pub fn from_bytes(b: &[u8; SESSION_HEADER_BYTES]) -> Result<SessionHeader, SessionError> {
        SessionHeader::decode(b)
    }

    fn encode(&self, out: &mut [u8; SESSION_HEADER_BYTES]) {
        out[..4].copy_from_slice(&self.device_id.to_be_bytes());
        out[4..8].copy_from_slice(&self.prekey_id.to_be_bytes());
        out[8] = u8::from(self.one_time_prekey_id.is_some());
        out[9..13].copy_from_slice(&self.one_time_prekey_id.unwrap_or(0).to_be_bytes());
        out[13..].copy_from_slice(&self.enc);
    }

    fn decode(b: &[u8; SESSION_HEADER_BYTES]) -> Result<SessionHeader, SessionError> {
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let one_time_prekey_id = match (b[8], u32_at(9)) {
            (0, 0) => None,
            (1, id) => Some(id),
            _ => return Err(SessionError::BadState),
        };
        Ok(SessionHeader {
            device_id: u32_at(0),
            prekey_id: u32_at(4),
            one_time_prekey_id,
            enc: b[13..].try_into().expect("32 bytes"),
        })
    }
}

/// The `info` of a delivery session.
pub fn deliver_info(business_id: u32, header: &SessionHeader) -> [u8; DELIVER_INFO_BYTES] {
    const P: usize = DELIVER_INFO_PREFIX.len();
    let mut info = [0; DELIVER_INFO_BYTES];
    info[..P].copy_from_slice(DELIVER_INFO_PREFIX);
    info[P..P + 4].copy_from_slice(&business_id.to_be_bytes());
    info[P + 4..P + 8].copy_from_slice(&header.device_id.to_be_bytes());
    info[P + 8..P + 12].copy_from_slice(&header.prekey_id.to_be_bytes());
    info[P + 12] = u8::from(header.one_time_prekey_id.is_some());
    info[P + 13..].copy_from_slice(&header.one_time_prekey_id.unwrap_or(0).to_be_bytes());
    info
}

/// What a delivered message's AAD binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageAad {
    /// The sending business.
    pub business_id: u32,
    /// The business's client message id.
    pub client_id: u64,
    /// The message's log position (its DELIVER id).
    pub log_position: u64,
}

impl MessageAad {
    /// The AAD's bytes.
    pub fn encode(&self) -> [u8; MESSAGE_AAD_BYTES] {
        const P: usize = MESSAGE_AAD_PREFIX.len();
        let mut aad = [0; MESSAGE_AAD_BYTES];
        aad[..P].copy_from_slice(MESSAGE_AAD_PREFIX);
        aad[P..P + 4].copy_from_slice(&self.business_id.to_be_bytes());
        aad[P + 4..P + 12].copy_from_slice(&self.client_id.to_be_bytes());
        aad[P + 12..].copy_from_slice(&self.log_position.to_be_bytes());
        aad
    }
}

/// courier's side of a session with one device, for one business.
#[derive(Debug)]
pub struct DeviceSession {
    business_id: u32,
    header: SessionHeader,
    context: SenderContext,
    /// Seals only below this. `None` until the first [`DeviceSession::reserve`]: no copy
    /// exists that could be restored.
    seq_limit: Option<u64>,
    /// The highest limit handed out in a [`SessionState`]; at least `seq_limit`.
    seq_reserved: u64,
}

/// A session's persistent state, to write encrypted (it holds the session's key):
/// `business_id:u32 | header (45) | key(32) | base_nonce(12) | seq_limit:u64`.
/// `Debug` shows the limit only.
pub struct SessionState {
    bytes: Zeroizing<[u8; SESSION_STATE_BYTES]>,
    seq_limit: u64,
}

impl SessionState {
    /// The bytes to persist. Handle with care.
    pub fn as_bytes(&self) -> &[u8; SESSION_STATE_BYTES] {
        &self.bytes
    }

    /// The next sequence number a session restored from this state seals at; pass it to
    /// [`DeviceSession::reserved`] once the state is durable.
    pub fn seq_limit(&self) -> u64 {
        self.seq_limit
    }
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState")
            .field("seq_limit", &self.seq_limit)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// A new session to `bundle`'s signed prekey, or to its one-time prekey `one_time`
    /// when given (which must be in the bundle, signed). Costs one X25519 key
    /// generation, one agreement and the key schedule, plus the one-time prekey's
    /// signature check.
    pub fn new(
        business_id: u32,
        bundle: &VerifiedBundle,
        one_time: Option<u32>,
    ) -> Result<DeviceSession, SessionError> {
        let b = bundle.bundle();
        let pk_r = match one_time {
            None => &b.signed_prekey.public,
            Some(id) => {
                let k =
                    bundle
                        .one_time_prekey(id)
                        .map_err(|_| SessionError::BadOneTimeSignature {
                            device_id: b.device_id,
                            prekey_id: id,
                        })?;
                &k.ok_or(SessionError::UnknownOneTimePrekey {
                    device_id: b.device_id,
                    prekey_id: id,
                })?
                .public
            }
        };
        let mut header = SessionHeader {
            device_id: b.device_id,
            prekey_id: b.signed_prekey.id,
            one_time_prekey_id: one_time,
            enc: [0; PUBLIC_KEY_BYTES],
        };
        let (enc, context) = setup_base_s(pk_r, &deliver_info(business_id, &header))?;
        header.enc = enc;
        Ok(DeviceSession {
            business_id,
            header,
            context,
            seq_limit: None,
            seq_reserved: 0,
        })
    }

    /// The business it seals for.
    pub fn business_id(&self) -> u32 {
        self.business_id
    }

    /// What the device needs to open it.
    pub fn header(&self) -> &SessionHeader {
        &self.header
    }

    /// The sequence number of the next message.
    pub fn next_seq(&self) -> u64 {
        self.context.next_seq()
    }

    /// The limit it seals below (`None`: never persisted, no limit).
    pub fn seq_limit(&self) -> Option<u64> {
        self.seq_limit
    }

    fn claim(&self, aad: &MessageAad) -> Result<([u8; MESSAGE_AAD_BYTES], u64), SessionError> {
        assert_eq!(
            aad.business_id, self.business_id,
            "a session seals only its business's messages"
        );
        let next_seq = self.context.next_seq();
        match self.seq_limit {
            Some(seq_limit) if next_seq >= seq_limit => Err(SessionError::SeqNotReserved {
                next_seq,
                seq_limit,
            }),
            _ => Ok((aad.encode(), next_seq)),
        }
    }

    /// Seals `in_out` in place as the next message; returns its sequence number and tag.
    /// Allocates nothing: the hot path. On error `in_out` is unchanged.
    pub fn seal_in_place(
        &mut self,
        aad: &MessageAad,
        in_out: &mut [u8],
    ) -> Result<(u64, [u8; TAG_BYTES]), SessionError> {
        let (aad, seq) = self.claim(aad)?;
        let tag = self.context.seal_in_place(seq, &aad, in_out)?;
        Ok((seq, tag))
    }

    /// Appends `ciphertext | tag` of `plaintext` as the next message to `out` (no
    /// allocation when `out` has the capacity); returns its sequence number. On error
    /// `out` is unchanged.
    pub fn seal_append(
        &mut self,
        aad: &MessageAad,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u64, SessionError> {
        let (aad, seq) = self.claim(aad)?;
        self.context.seal_append(seq, &aad, plaintext, out)?;
        Ok(seq)
    }

    /// Reserves the next `count` sequence numbers: the state to persist, whose
    /// `seq_limit` is `count` past every number sealed or reserved so far. Once it is
    /// durable, call [`DeviceSession::reserved`] with its limit. The first reservation
    /// bounds sealing at once (the state could be durable at any moment).
    ///
    /// # Panics
    /// If `count` is 0 or the limit would pass `u64::MAX` (a bug: no session lives that
    /// long).
    pub fn reserve(&mut self, count: u64) -> SessionState {
        assert!(count > 0, "a reservation reserves something");
        let from = self.context.next_seq().max(self.seq_reserved);
        let seq_limit = from.checked_add(count).expect("sequence numbers exhausted");
        self.seq_reserved = seq_limit;
        if self.seq_limit.is_none() {
            self.seq_limit = Some(seq_limit);
        }
        let mut bytes = Zeroizing::new([0; SESSION_STATE_BYTES]);
        bytes[..4].copy_from_slice(&self.business_id.to_be_bytes());
        let (h, rest) = bytes[4..].split_at_mut(SESSION_HEADER_BYTES);
        self.header.encode(h.try_into().expect("header bytes"));
        let (secrets, _) = self.context.export();
        rest[..CONTEXT_SECRETS_BYTES].copy_from_slice(&secrets.to_bytes()[..]);
        rest[CONTEXT_SECRETS_BYTES..].copy_from_slice(&seq_limit.to_be_bytes());
        assert!(self.seq_limit.is_some_and(|l| l <= self.seq_reserved));
        SessionState { bytes, seq_limit }
    }

    /// The state of [`DeviceSession::reserve`] with this limit is durable: seal below it.
    /// A limit below the current one (an older write confirmed late) changes nothing.
    ///
    /// # Panics
    /// If no reservation handed out this limit (a bug).
    pub fn reserved(&mut self, seq_limit: u64) {
        assert!(
            seq_limit <= self.seq_reserved,
            "confirmed limit {seq_limit} was never reserved (highest {})",
            self.seq_reserved
        );
        self.seq_limit = Some(self.seq_limit.map_or(seq_limit, |l| l.max(seq_limit)));
    }

    /// The session of a durable [`SessionState`]'s bytes. It resumes at the state's limit
    /// and seals nothing until a new reservation is persisted and confirmed (until then
    /// [`SessionError::SeqNotReserved`]): the process that wrote the state may have
    /// sealed up to that limit.
    pub fn import(bytes: &[u8; SESSION_STATE_BYTES]) -> Result<DeviceSession, SessionError> {
        let business_id = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
        let (h, rest) = bytes[4..].split_at(SESSION_HEADER_BYTES);
        let header = SessionHeader::decode(h.try_into().expect("header bytes"))?;
        let secrets = ContextSecrets::from_bytes(
            rest[..CONTEXT_SECRETS_BYTES]
                .try_into()
                .expect("secret bytes"),
        );
        let seq_limit =
            u64::from_be_bytes(rest[CONTEXT_SECRETS_BYTES..].try_into().expect("8 bytes"));
        if seq_limit == u64::MAX {
            return Err(SessionError::BadState);
        }
        Ok(DeviceSession {
            business_id,
            header,
            context: SenderContext::import(secrets, seq_limit),
            seq_limit: Some(seq_limit),
            seq_reserved: seq_limit,
        })
    }
}

/// A device's side of a session: opens the messages courier sealed in it.
#[derive(Debug)]
pub struct RecipientSession {
    pub(crate) business_id: u32,
    pub(crate) header: SessionHeader,
    pub(crate) context: RecipientContext,
}

impl RecipientSession {
    /// The session's header.
    pub fn header(&self) -> &SessionHeader {
        &self.header
    }

    /// The business it is with.
    pub fn business_id(&self) -> u32 {
        self.business_id
    }

    /// Opens `ciphertext | tag` in place at `seq`; returns the plaintext.
    pub fn open_in_place<'a>(
        &mut self,
        seq: u64,
        aad: &MessageAad,
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], HpkeError> {
        self.context.open_in_place(seq, &aad.encode(), in_out)
    }

    /// The plaintext of `ciphertext | tag` at `seq`.
    pub fn open(
        &mut self,
        seq: u64,
        aad: &MessageAad,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, HpkeError> {
        self.context.open(seq, &aad.encode(), ciphertext)
    }
}

/// Sets up the device's side of a session with its prekey's (or one-time prekey's)
/// private key. [`super::Device::accept_session`] picks the key.
pub(crate) fn accept(
    business_id: u32,
    header: &SessionHeader,
    sk_r: &X25519SecretKey,
) -> Result<RecipientSession, SessionError> {
    let context = setup_base_r(&header.enc, sk_r, &deliver_info(business_id, header))?;
    Ok(RecipientSession {
        business_id,
        header: *header,
        context,
    })
}

// ---- Replies: device -> business key ----

/// A business's published X25519 key for replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessPublicKey {
    /// Its id (rotation gives a new id; old keys are kept while replies may name them).
    pub key_id: u32,
    /// The X25519 public key.
    pub public: [u8; PUBLIC_KEY_BYTES],
}

/// A business's reply key, held by courier (stored encrypted under the master key
/// hierarchy). `Debug` shows only its id.
pub struct BusinessKey {
    key_id: u32,
    secret: X25519SecretKey,
}

impl std::fmt::Debug for BusinessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusinessKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A reply as a device sealed it: `business_key_id | enc | ciphertext | tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedReply {
    /// The business key it is sealed to.
    pub business_key_id: u32,
    /// The device's ephemeral public key.
    pub enc: EncappedKey,
    /// `ciphertext | tag`.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedReply")
            .field("business_key_id", &self.business_key_id)
            .field("ciphertext_bytes", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl SealedReply {
    /// Appends its encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.business_key_id.to_be_bytes());
        out.extend_from_slice(&self.enc);
        out.extend_from_slice(&self.ciphertext);
    }

    /// Decodes a reply (its length is the frame's payload length).
    pub fn decode(bytes: &[u8]) -> Result<SealedReply, ReplyError> {
        if bytes.len() < REPLY_HEADER_BYTES + TAG_BYTES {
            return Err(ReplyError::Truncated { len: bytes.len() });
        }
        Ok(SealedReply {
            business_key_id: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
            enc: bytes[4..REPLY_HEADER_BYTES].try_into().expect("32 bytes"),
            ciphertext: bytes[REPLY_HEADER_BYTES..].to_vec(),
        })
    }
}

/// The `info` of a reply to business key `key_id`.
pub fn reply_info(business_id: u32, key_id: u32) -> [u8; REPLY_INFO_BYTES] {
    const P: usize = REPLY_PREFIX.len();
    let mut info = [0; REPLY_INFO_BYTES];
    info[..P].copy_from_slice(REPLY_PREFIX);
    info[P..P + 4].copy_from_slice(&business_id.to_be_bytes());
    info[P + 4..].copy_from_slice(&key_id.to_be_bytes());
    info
}

/// The AAD of a reply with the edge's id `edge_id`.
pub fn reply_aad(business_id: u32, edge_id: u64) -> [u8; REPLY_AAD_BYTES] {
    const P: usize = REPLY_PREFIX.len();
    let mut aad = [0; REPLY_AAD_BYTES];
    aad[..P].copy_from_slice(REPLY_PREFIX);
    aad[P..P + 4].copy_from_slice(&business_id.to_be_bytes());
    aad[P + 4..].copy_from_slice(&edge_id.to_be_bytes());
    aad
}

/// A device seals a reply to a business's key (a fresh HPKE context, sequence 0).
pub fn seal_reply(
    business: &BusinessPublicKey,
    business_id: u32,
    edge_id: u64,
    plaintext: &[u8],
) -> Result<SealedReply, HpkeError> {
    let (enc, mut ctx) = setup_base_s(&business.public, &reply_info(business_id, business.key_id))?;
    let ciphertext = ctx.seal(0, &reply_aad(business_id, edge_id), plaintext)?;
    Ok(SealedReply {
        business_key_id: business.key_id,
        enc,
        ciphertext,
    })
}

impl BusinessKey {
    /// A fresh key from the operating system's random generator.
    pub fn generate(key_id: u32) -> Result<BusinessKey, HpkeError> {
        Ok(BusinessKey {
            key_id,
            secret: X25519SecretKey::generate()?,
        })
    }

    /// The key of [`BusinessKey::to_bytes`].
    pub fn from_bytes(key_id: u32, bytes: &[u8; 32]) -> BusinessKey {
        BusinessKey {
            key_id,
            secret: X25519SecretKey::from_bytes(bytes),
        }
    }

    /// The private key's bytes, to store encrypted. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.secret.to_bytes()
    }

    /// Its id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// What is published for devices.
    pub fn public(&self) -> BusinessPublicKey {
        BusinessPublicKey {
            key_id: self.key_id,
            public: *self.secret.public_key(),
        }
    }

    /// Opens a reply to this key for `business_id` with the edge's id `edge_id`.
    pub fn open_reply(
        &self,
        business_id: u32,
        edge_id: u64,
        reply: &SealedReply,
    ) -> Result<Vec<u8>, ReplyError> {
        if reply.business_key_id != self.key_id {
            return Err(ReplyError::WrongKey {
                expected: self.key_id,
                got: reply.business_key_id,
            });
        }
        let mut ctx = setup_base_r(
            &reply.enc,
            &self.secret,
            &reply_info(business_id, self.key_id),
        )?;
        Ok(ctx.open(0, &reply_aad(business_id, edge_id), &reply.ciphertext)?)
    }
}
