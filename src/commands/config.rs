//! `courier config check FILE`: validate a profile as `serve` would (environment overrides
//! applied), print the overrides and the effective profile, or every error.
//!
//! The effective profile is printed as TOML: the file's keys with the overrides applied,
//! exactly the document that was validated (every key of a profile is required, so it is
//! the whole profile). What is said about it is written as TOML comments, so that stdout
//! as a whole is a profile `courier serve --profile` takes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use courier_pipeline::profile::{apply_env_overrides, EnvOverride, Profile};

use super::env_vars;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum ConfigCmd {
    /// Validate a profile with the COURIER_<SECTION>__<KEY> environment overrides applied
    /// (as `serve` would), print the overrides and the effective profile as TOML, or print
    /// every error.
    Check {
        /// Profile file (TOML).
        file: PathBuf,
    },
}

/// Runs a `courier config` subcommand.
pub(crate) fn run(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let applied = match Profile::from_toml_with_env(&text, env_vars()) {
                Ok((_, applied)) => applied,
                Err(e) => bail!("{}: {e}", file.display()),
            };
            print!("{}", effective_toml(&file, &text, &applied)?);
            Ok(())
        }
    }
}

/// The effective profile as TOML, headed by comments: the file is valid, and which
/// overrides were applied.
fn effective_toml(file: &Path, text: &str, applied: &[EnvOverride]) -> Result<String> {
    let mut doc: toml::Table = toml::from_str(text).context("the profile parsed once already")?;
    // The same overrides again, on the document this time; they were valid a moment ago.
    apply_env_overrides(&mut doc, env_vars()).context("applying the overrides")?;
    // A path could hold a newline, which would end the comment.
    let name = file.display().to_string().replace(['\n', '\r'], " ");
    let mut out =
        format!("# {name} is valid; the effective profile follows (overrides applied).\n");
    if applied.is_empty() {
        out.push_str("# no environment overrides\n");
    }
    for o in applied {
        out.push_str(&format!(
            "# override: {} = {} (from {})\n",
            o.key, o.value, o.var
        ));
    }
    out.push_str(&toml::to_string(&doc).context("writing the profile as TOML")?);
    Ok(out)
}
