//! `courier keys init`: a new random master key file (mode 0600), never overwriting one.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum KeysCmd {
    /// Write a new random master key (mode 0600); refuses to overwrite an existing file.
    Init {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `courier keys` subcommand.
pub(crate) fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Init { out } => {
            courier::store::write_new_master_key(&out)
                .with_context(|| format!("writing master key {}", out.display()))?;
            eprintln!(
                "wrote a new master key to {} (mode 0600); serve with --master-key-file {0} \
                 or COURIER_MASTER_KEY_FILE={0}. Keep a copy: without it the log cannot be read.",
                out.display()
            );
            Ok(())
        }
    }
}
