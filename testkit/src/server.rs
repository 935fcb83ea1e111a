//! An in-process courier server (the real one: io_uring shards, QUIC, log) for tests, on
//! the small profile and an ephemeral loopback port.

use std::path::Path;
use std::sync::Arc;

use courier::serve::{self, Running, ServeOptions};
use courier::store::MasterKeyText;
use courier_client::{ClientConfig, ServerTrust};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};

/// The workspace's `tuning/small.toml`, whichever crate's tests run.
pub const SMALL_PROFILE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning/small.toml");

/// The small profile with `shards` shards on an ephemeral loopback port.
pub fn small_profile(shards: u32) -> Profile {
    let text = std::fs::read_to_string(SMALL_PROFILE_PATH).expect("tuning/small.toml");
    let mut p = Profile::from_toml(&text).expect("the small profile loads");
    p.listen = "127.0.0.1:0".parse().expect("literal address");
    p.shards = shards;
    p
}

/// Registers a business exempt from detection (a load sender, for tests that are not
/// about the detector) with an unlimited tier; returns its token.
pub fn add_exempt(registry: &mut Registry, name: &str, secret: &[u8; 32]) -> String {
    let (id, token) = registry
        .add(name, Tier::Unlimited, 1_000_000, secret)
        .expect("a valid business");
    registry.set_exempt(id, true);
    token
}

/// What [`start`] needs besides the data directory: the default is one shard, a random
/// master key and no registry file.
#[derive(Debug)]
pub struct Setup {
    /// The profile (see [`small_profile`]).
    pub profile: Profile,
    /// The businesses.
    pub registry: Registry,
    /// The master key.
    pub master_key: MasterKeyText,
}

impl Setup {
    /// The small profile with `shards` shards, `registry`, a random master key.
    pub fn new(shards: u32, registry: Registry) -> Setup {
        Setup {
            profile: small_profile(shards),
            registry,
            master_key: MasterKeyText::random(),
        }
    }
}

/// The serve options of `setup` on `dir`.
pub fn options(dir: &Path, setup: Setup) -> ServeOptions {
    ServeOptions {
        profile: setup.profile,
        data_dir: dir.to_path_buf(),
        registry: Arc::new(setup.registry),
        registry_file: None,
        master_key: setup.master_key,
        region: None,
    }
}

/// Starts a server on `dir` (panics if it does not start).
pub fn start(dir: &Path, setup: Setup) -> Running {
    serve::start(options(dir, setup)).expect("the server starts")
}

/// A client configuration for `running`, pinning its certificate.
pub fn client_config(
    running: &Running,
    token: &str,
    streams: usize,
    batches_in_flight_per_stream: usize,
) -> ClientConfig {
    ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams,
        batches_in_flight_per_stream,
    }
}
