//! The root package's integration tests, one module per concern, in one test binary:
//! whole servers on loopback (in process, and the `courier` binary spawned as an
//! operator runs it), the CLI, the README's promises. One binary instead of one per file
//! links the server and its dependencies once instead of a dozen times.
//!
//! Set-up shared with the other crates' tests (in-process server, the `courier serve`
//! spawner, the fake quinn server, log helpers) is in `courier-testkit`.

mod access_log;
mod cli;
mod crash;
mod delivery_e2e;
mod delivery_inbound;
mod delivery_kit;
mod delivery_paths;
mod delivery_send;
mod detect_e2e;
mod detect_quality;
mod erase;
mod files;
mod foreign_client;
mod graceful_stop;
mod huge_pages;
mod idempotency;
mod log_files;
mod metrics;
mod privacy;
mod readme;
mod regions;
mod retention;
mod revocation;
mod sd_notify;
mod sealed_e2e;
mod send;
mod serve;
mod signals;

/// The `courier` binary of this package.
fn courier_bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_courier"))
}
