//! Tests of the e2e building blocks, one file per module.

mod bundle;
mod hpke;
mod session;

use super::{setup_base_r, setup_base_s, Device, RecipientContext, SenderContext, X25519SecretKey};

/// A device whose keys derive from its id: the same in every run.
fn device(id: u32, one_time: u32) -> Device {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&id.to_be_bytes());
    Device::from_seed(id, &seed, one_time)
}

/// A fresh context pair of the public API.
fn pair(info: &[u8]) -> (SenderContext, RecipientContext, X25519SecretKey) {
    let sk_r = X25519SecretKey::generate().expect("keygen");
    let (enc, s) = setup_base_s(sk_r.public_key(), info).expect("setup_s");
    let r = setup_base_r(&enc, &sk_r, info).expect("setup_r");
    (s, r, sk_r)
}
