//! courier-testkit: the one place for what the integration tests of courier's crates
//! set up again and again. Tests only (`publish = false`, a dev-dependency).
//!
//! ```text
//! server  ── in-process `courier::serve` on the small profile, its client configs
//! spawn   ── a `courier serve` child process: files, flags, log file, ready, SIGTERM, exit
//! fake    ── a fake quinn server speaking wire v1 (client library and load engine tests)
//! logkit  ── master keys, registries, traffic that records what was acked, segments
//! sendfile ── `courier send` files (messages, base64, blank lines) and their marker
//! ```
//!
//! Everything binds loopback addresses only, and every wait has a deadline.

pub mod fake;
pub mod logkit;
pub mod sendfile;
pub mod server;
pub mod spawn;

/// Writes a secret file (a master key) as courier's own tools do: mode 0600, which
/// `courier serve` requires of a key file.
pub fn write_secret(path: &std::path::Path, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("creating a secret file");
    f.write_all(bytes.as_ref()).expect("writing a secret file");
}
