//! End-to-end encryption with recipients' devices (issue 16): the cryptographic building
//! blocks that delivery wires in.
//!
//! ```text
//!  edge publishes  DeviceBundle per device ──decode_bundles──> verify ──> VerifiedBundle
//!                  (identity key Ed25519, signed X25519 prekey, one-time prekeys)
//!  hand-off        DeviceSession::new(business, &VerifiedBundle, one_time)   HPKE setup
//!                    per message: seal_in_place / seal_append(MessageAad, ..) -> (seq, ct|tag)
//!                    to persist: reserve(n) -> SessionState, write it, reserved(limit);
//!                    after a restart DeviceSession::import(state) (module session)
//!                    DELIVER carries header (device, prekey ids, enc) on the first message,
//!                    seq always
//!  device          Device::accept_session(business, header) -> RecipientSession::open
//!  inbound         device: seal_reply(BusinessPublicKey, business, edge id, reply)
//!                  courier: BusinessKey::open_reply(business, edge id, &SealedReply)
//! ```
//!
//! - [`hpke`]: RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM
//!   on aws-lc-rs, checked against the RFC's test vectors
//!   (`pipeline/tests/data/hpke_rfc9180_base.json`).
//! - [`bundle`]: device key bundles, their signatures and their bounded binary list.
//! - [`session`]: per-device delivery sessions and replies, with their `info` and AAD
//!   encodings.
//! - [`device`]: a device with its private keys, for tests and the load generator.
//! - [`world`]: every recipient's devices of a run, opening DELIVER_E2E copies and sealing
//!   replies, for tests and the load generator's edge.
//!
//! **Chosen by measurement** (`benches/device_seal.rs`, BENCHMARKS.md "Device sealing
//! (issue 16)"): this HPKE on aws-lc-rs against the `hpke` crate (pure Rust: x25519-dalek,
//! RustCrypto AES-GCM), whose setup and seal took several times as long.
//!
//! Nothing here prints a secret: `Debug` of contexts, keys, devices and sessions shows
//! ids and counts, errors carry ids and sequence numbers (a test checks both).

pub mod bundle;
pub mod device;
pub mod hpke;
pub mod session;
pub mod world;

pub use bundle::{
    decode_bundles, encode_bundles, one_time_prekey_message, signed_prekey_message, BundleError,
    DeviceBundle, OneTimePrekey, SignedPrekey, VerifiedBundle,
};
pub use device::Device;
pub use hpke::{
    setup_base_r, setup_base_s, ContextSecrets, HpkeError, RecipientContext, ReplayWindow,
    SenderContext, X25519SecretKey,
};
pub use session::{
    seal_reply, BusinessKey, BusinessPublicKey, DeviceSession, MessageAad, RecipientSession,
    ReplyError, SealedReply, SessionError, SessionHeader, SessionState,
};
pub use world::{DeviceWorld, WorldCounts};

#[cfg(test)]
mod tests;
