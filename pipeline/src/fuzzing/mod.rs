//! The bodies of courier's fuzz targets (the `fuzz/` crate, run with `cargo fuzz`), kept in
//! normal code so that `cargo test` replays every committed corpus and regression input
//! through exactly what the fuzzer runs (`pipeline/tests/fuzz_corpus.rs`).
//!
//! Each body takes the fuzzer's bytes, feeds them to the real parser and checks what is
//! cheap to check: no panic, an error is an error value, and where an encoder exists,
//! decode -> encode -> decode gives the same value (and, for the wire, the same bytes).
//! A failed property panics: that is how the fuzzer learns of it.
//!
//! Several formats end in a CRC that a mutation almost never keeps valid; their bodies
//! read a control byte first whose low bit asks the body to recompute the CRC, so the
//! fuzzer reaches the parsing behind it as well as the CRC check itself.
//!
//! Not part of the public API: the names and inputs change with the targets.

mod e2e;
mod log;
mod state;
mod wire;

pub use e2e::e2e;
pub use log::{keyring, segment};
pub use state::{checkpoint, profile, registry};
pub use wire::wire;

/// Seed inputs of every target, made by the real encoders: `(target, name, bytes)`.
/// `pipeline/tests/fuzz_corpus.rs` writes them to `fuzz/corpus/` when asked to.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, bytes) in wire::seeds() {
        out.push(("wire", name, bytes));
    }
    for (name, bytes) in log::segment_seeds() {
        out.push(("segment", name, bytes));
    }
    for (name, bytes) in log::keyring_seeds() {
        out.push(("keyring", name, bytes));
    }
    for (name, bytes) in state::checkpoint_seeds() {
        out.push(("checkpoint", name, bytes));
    }
    for (name, bytes) in state::profile_seeds() {
        out.push(("profile", name, bytes));
    }
    for (name, bytes) in state::registry_seeds() {
        out.push(("registry", name, bytes));
    }
    for (name, bytes) in e2e::seeds() {
        out.push(("e2e", name, bytes));
    }
    out
}

/// The body of target `name` (for the corpus replay).
pub fn target(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "wire" => wire,
        "segment" => segment,
        "keyring" => keyring,
        "checkpoint" => checkpoint,
        "profile" => profile,
        "registry" => registry,
        "e2e" => e2e,
        _ => return None,
    })
}

/// Replaces the last 4 bytes of `bytes` with the CRC32C of the bytes before them.
fn fix_trailing_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let (body, crc) = bytes.split_at_mut(bytes.len() - 4);
        crc.copy_from_slice(&crate::log::format::crc32c(body).to_le_bytes());
    }
}
