//! `courier log verify|audit`: read-only checks of the log on disk (CRCs and AEAD tags;
//! an accepted list against what is stored, and what became of it by its status
//! records). They never print content or numbers.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::read_master_key;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum LogCmd {
    /// Check every record's CRC and AEAD tag in every segment of every shard under DIR
    /// (the data dir) and report per segment; exits non-zero on any corruption.
    Verify {
        /// The data directory (holds log/shard-K/).
        dir: PathBuf,
        /// Master key file (the one the server runs with).
        #[arg(long, env = "COURIER_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
    /// Check that every message of an accepted list (CSV `business_id,client_id,log_position`,
    /// as `courier-loadgen --accepted FILE` writes it) is present and intact, and count
    /// what became of it by its status records (delivered, read, failed, expired, no final
    /// status yet); exits non-zero when any is missing or mismatched.
    Audit {
        /// The accepted list.
        #[arg(long)]
        accepted: PathBuf,
        /// Also exit non-zero unless every listed message has exactly one final status
        /// (delivered, failed or expired) in the log.
        #[arg(long)]
        require_outcome: bool,
        /// The data directory (holds log/shard-K/).
        dir: PathBuf,
        /// Master key file (the one the server runs with).
        #[arg(long, env = "COURIER_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
}

/// Runs a `courier log` subcommand.
pub(crate) fn run(cmd: LogCmd) -> Result<()> {
    match cmd {
        LogCmd::Verify {
            dir,
            master_key_file,
        } => {
            let key = read_master_key(master_key_file.as_deref())?;
            let report = courier::audit::verify(&dir, &key)?;
            report.print(&mut std::io::stdout())?;
            if !report.is_clean() {
                bail!(
                    "{}: the log is damaged (see the table above)",
                    dir.display()
                );
            }
            Ok(())
        }
        LogCmd::Audit {
            accepted,
            require_outcome,
            dir,
            master_key_file,
        } => {
            let key = read_master_key(master_key_file.as_deref())?;
            let entries = courier::audit::read_accepted(&accepted)?;
            let report = courier::audit::audit(&dir, &key, &entries)?;
            report.print(&mut std::io::stdout())?;
            let outcomes = courier::outcomes::outcomes(&dir, &key, &entries)?;
            outcomes.print(&mut std::io::stdout())?;
            if !report.is_clean() {
                bail!(
                    "{}: {} of {} accepted message(s) missing, {} mismatched",
                    dir.display(),
                    report.missing,
                    entries.len(),
                    report.mismatched
                );
            }
            if require_outcome && !outcomes.all_final() {
                bail!(
                    "{}: {} of {} accepted message(s) without a final status, {} with more \
                     than one",
                    dir.display(),
                    outcomes.pending,
                    entries.len(),
                    outcomes.extra_finals
                );
            }
            Ok(())
        }
    }
}
