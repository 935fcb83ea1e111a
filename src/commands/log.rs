//! `courier log verify|audit`: read-only checks of the log on disk (CRCs and AEAD tags;
//! an accepted list against what is stored, and what became of it by its status
//! records). `courier log expire`: retention with the server stopped. They never print
//! content or numbers.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{load_profile, read_master_key};

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
    /// Drop, with the server stopped, every segment whose oldest record reached the
    /// retention (keys destroyed first), recording `expired` for messages still waiting in
    /// them, as the next start would; refuses while a server holds DIR.
    Expire {
        /// The data directory (holds log/shard-K/).
        dir: PathBuf,
        /// Tuning profile (TOML) whose `[log]` retention applies; the built-in default
        /// profile when absent. `COURIER_<SECTION>__<KEY>` overrides apply, as for serve.
        #[arg(long)]
        profile: Option<PathBuf>,
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
        LogCmd::Expire {
            dir,
            profile,
            master_key_file,
        } => expire(&dir, profile.as_deref(), master_key_file.as_deref()),
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

/// `courier log expire`: what `courier serve` does before serving, with no server.
fn expire(
    dir: &std::path::Path,
    profile: Option<&std::path::Path>,
    master_key_file: Option<&std::path::Path>,
) -> Result<()> {
    use anyhow::Context;
    use courier_pipeline::log::LogConfig;
    use courier_pipeline::node::Replay;
    use courier_pipeline::ShardId;

    let profile = load_profile(profile)?;
    let key = read_master_key(master_key_file)?;
    // The server's lock: a running server owns the log (and drops by itself).
    let _lock = courier::store::DataDirLock::acquire(dir)?;
    let cfg = LogConfig::new(&profile.log, profile.limits.payload_bytes_max);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let mut out = std::io::stdout().lock();
    let (mut segments, mut statuses) = (0usize, 0u64);
    for (k, _) in courier::audit::shard_dirs(dir)? {
        let shard = u8::try_from(k).map(ShardId::new).with_context(|| {
            format!(
                "{}: log/shard-{k} is no shard a server writes",
                dir.display()
            )
        })?;
        let mut replay = Replay::new(shard);
        let (mut store, mut log) =
            courier::store::ShardStore::open(dir, shard, &key, cfg, &mut |i, r| {
                replay.visit(i, r)
            })?;
        let expired = courier::expire::before_serving(
            &mut store,
            &mut log,
            &mut replay,
            profile.delivery.enabled,
            now_ms,
        )?;
        for d in &expired.segments {
            use std::io::Write;
            writeln!(
                out,
                "shard {k}: dropped segment {} ({} records, oldest {} s old)",
                d.segment_id,
                d.records,
                now_ms.saturating_sub(d.since_ms) / 1000
            )?;
        }
        segments += expired.segments.len();
        statuses += expired.statuses;
    }
    use std::io::Write;
    writeln!(
        out,
        "{segments} segment(s) dropped, {statuses} waiting message(s) recorded as expired \
         (retention {} s)",
        profile.log.retention_secs
    )?;
    Ok(())
}
