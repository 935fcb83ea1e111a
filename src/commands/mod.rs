//! The `courier` subcommands, one module each: the arguments clap parses and the code
//! that runs them. Errors are `anyhow` here, and only here: this is the binary.
//!
//! ```text
//! main: Cli::parse ──> init_logging ──> Command
//!   serve ──> commands::serve (profile, registry, master key) ──> courier::serve::start
//!   demo  ──> commands::demo (in-process server) ──> courier_loadgen::run_plan
//!   send  ──> commands::send ──> courier_client::send
//!   businesses / config / keys / log ──> files (registry, profile, key, log segments)
//! ```

pub(crate) mod businesses;
pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod keys;
pub(crate) mod log;
pub(crate) mod send;
pub(crate) mod serve;

use std::path::Path;

use anyhow::{bail, Context, Result};
use courier_pipeline::profile::{Profile, DEFAULT_PROFILE_TOML};
use courier_pipeline::registry::{Registry, Tier};

pub(crate) fn load_profile(path: Option<&Path>) -> Result<Profile> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading profile {}", p.display()))?,
        None => DEFAULT_PROFILE_TOML.to_string(),
    };
    let name = path.map_or("built-in default profile".to_string(), |p| {
        p.display().to_string()
    });
    let (profile, applied) = Profile::from_toml_with_env(&text, env_vars())
        .with_context(|| format!("loading {name}"))?;
    for o in &applied {
        tracing::info!(key = %o.key, value = %o.value, var = %o.var, "profile key set from the environment");
    }
    Ok(profile)
}

/// The process environment for profile overrides. A variable that is not UTF-8 is passed
/// on lossily, so that an override among them fails by name instead of being skipped.
pub(crate) fn env_vars() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    })
}

pub(crate) fn read_master_key(path: Option<&Path>) -> Result<courier::store::MasterKeyText> {
    match path {
        Some(p) => courier::store::MasterKeyText::read(p).map_err(anyhow::Error::msg),
        None => bail!(
            "no master key: pass --master-key-file FILE or set COURIER_MASTER_KEY_FILE \
             (create one with `courier keys init --out FILE`)"
        ),
    }
}

pub(crate) fn load_registry(path: &Path) -> Result<Registry> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading registry {}", path.display()))?;
    Registry::from_toml(&text).with_context(|| format!("loading registry {}", path.display()))
}

/// Writes the registry next to the old file and renames, so a crash (or a server
/// re-reading it) sees either the old or the new one. Mode 0600: the registry decides who
/// authenticates and who is exempt.
pub(crate) fn write_registry(reg: &Registry, path: &Path) -> Result<()> {
    courier::store::write_file_atomically(path, reg.to_toml().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn parse_tier(tier: &str) -> Result<Tier> {
    Tier::parse(tier).with_context(|| {
        format!("--tier {tier:?}: must be one of 250, 2000, 10000, 100000, unlimited")
    })
}
