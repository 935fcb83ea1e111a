//! courier-testkit: the one place for what the integration tests of courier's crates
//! set up again and again. Tests only (`publish = false`, a dev-dependency).
//!
//! ```text
//! server  ── in-process `courier::serve` on the small profile, its client configs
//! spawn   ── a `courier serve` child process: files, flags, log file, ready, SIGTERM, exit
//! fake    ── a fake quinn server speaking wire v1 (client library and load engine tests)
//! logkit  ── master keys, registries, traffic that records what was acked, segments
//! ```
//!
//! Everything binds loopback addresses only, and every wait has a deadline.

pub mod fake;
pub mod logkit;
pub mod server;
pub mod spawn;
