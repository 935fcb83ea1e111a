//! `courier log verify|audit`: read-only checks of the log on disk (CRCs and AEAD tags;
//! an accepted list against what is stored, and what became of it by its status
//! records). `courier log expire`: retention with the server stopped. They never print
//! content or numbers.

use std::path::PathBuf;

use anyhow::{bail, Result};

use courier::access::{AccessLog, AccessRecord};

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

/// Runs a `courier log` subcommand. Each one decrypts stored data, so each run leaves
/// one line in `DIR/access.log` (`src/access.rs`): the log is opened before anything is
/// read, and a run that cannot leave its trace reads nothing.
pub(crate) fn run(cmd: LogCmd) -> Result<()> {
    let (dir, record) = describe(&cmd);
    let mut access = AccessLog::open(&dir)?;
    let mut record = record;
    let result = match cmd {
        LogCmd::Verify {
            dir,
            master_key_file,
        } => verify(&dir, master_key_file.as_deref(), &mut record),
        LogCmd::Expire {
            dir,
            profile,
            master_key_file,
        } => expire(
            &dir,
            profile.as_deref(),
            master_key_file.as_deref(),
            &mut record,
        ),
        LogCmd::Audit {
            accepted,
            require_outcome,
            dir,
            master_key_file,
        } => audit(
            &dir,
            &accepted,
            require_outcome,
            master_key_file.as_deref(),
            &mut record,
        ),
    };
    record.finish(result.is_ok());
    let traced = access.append(&record);
    result?;
    Ok(traced?)
}

/// The data directory of a subcommand, and the access record of its run so far: the
/// command and its arguments (paths and switches; no secret is ever an argument).
fn describe(cmd: &LogCmd) -> (PathBuf, AccessRecord) {
    let path = |p: &std::path::Path| p.display().to_string();
    let key = |k: &Option<PathBuf>| k.as_deref().map_or("-".to_string(), path);
    let (dir, command, mut args) = match cmd {
        LogCmd::Verify {
            dir,
            master_key_file,
        } => (
            dir,
            "log verify",
            vec![("master_key_file", key(master_key_file))],
        ),
        LogCmd::Expire {
            dir,
            profile,
            master_key_file,
        } => (
            dir,
            "log expire",
            vec![
                (
                    "profile",
                    profile.as_deref().map_or("built-in default".into(), path),
                ),
                ("master_key_file", key(master_key_file)),
            ],
        ),
        LogCmd::Audit {
            accepted,
            require_outcome,
            dir,
            master_key_file,
            ..
        } => (
            dir,
            "log audit",
            vec![
                ("accepted", path(accepted)),
                ("require_outcome", require_outcome.to_string()),
                ("master_key_file", key(master_key_file)),
            ],
        ),
    };
    args.insert(0, ("dir", path(dir)));
    let args = args.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    (dir.clone(), AccessRecord::new(command, args))
}

fn verify(
    dir: &std::path::Path,
    master_key_file: Option<&std::path::Path>,
    record: &mut AccessRecord,
) -> Result<()> {
    let key = read_master_key(master_key_file)?;
    let report = courier::audit::verify(dir, &key)?;
    let mut records = 0u64;
    for s in &report.segments {
        let r = record.range(s.shard);
        r.segments.push(s.segment_id);
        r.cover(s.first_index, s.first_index + u64::from(s.records));
        records += u64::from(s.records);
    }
    let problems = report
        .segments
        .iter()
        .filter(|s| s.state.is_failure())
        .count();
    record.counts = vec![
        ("segments".into(), report.segments.len() as u64),
        ("records".into(), records),
        (
            "problems".into(),
            (problems + report.shard_errors.len()) as u64,
        ),
    ];
    report.print(&mut std::io::stdout())?;
    if !report.is_clean() {
        bail!(
            "{}: the log is damaged (see the table above)",
            dir.display()
        );
    }
    Ok(())
}

fn audit(
    dir: &std::path::Path,
    accepted: &std::path::Path,
    require_outcome: bool,
    master_key_file: Option<&std::path::Path>,
    record: &mut AccessRecord,
) -> Result<()> {
    let key = read_master_key(master_key_file)?;
    let entries = courier::audit::read_accepted(accepted)?;
    for e in &entries {
        let index = e.position.index();
        record.range(e.position.shard()).cover(index, index + 1);
    }
    let report = courier::audit::audit(dir, &key, &entries)?;
    report.print(&mut std::io::stdout())?;
    let outcomes = courier::outcomes::outcomes(dir, &key, &entries)?;
    outcomes.print(&mut std::io::stdout())?;
    record.counts = vec![
        ("listed".into(), entries.len() as u64),
        ("present".into(), report.present),
        ("missing".into(), report.missing),
        ("mismatched".into(), report.mismatched),
    ];
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

/// `courier log expire`: what `courier serve` does before serving, with no server.
fn expire(
    dir: &std::path::Path,
    profile: Option<&std::path::Path>,
    master_key_file: Option<&std::path::Path>,
    record: &mut AccessRecord,
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
    // The businesses' keys, as the server's start-up has them: messages waiting in a
    // dropped segment are known by their (per-business encrypted) fields.
    let fields: std::sync::Arc<dyn courier_pipeline::log::FieldKeys> =
        courier::business_keys::load(dir, &key).map_err(anyhow::Error::msg)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let mut out = std::io::stdout().lock();
    let (mut segments, mut records, mut statuses, mut read) = (0usize, 0u64, 0u64, 0u64);
    for (k, _) in courier::audit::shard_dirs(dir)? {
        let shard = u8::try_from(k).map(ShardId::new).with_context(|| {
            format!(
                "{}: log/shard-{k} is no shard a server writes",
                dir.display()
            )
        })?;
        let mut replay = Replay::new(shard);
        let (mut store, mut log) = courier::store::ShardStore::open_with_field_keys(
            dir,
            shard,
            &key,
            Some(fields.clone()),
            cfg,
            &mut |i, r| replay.visit(i, r),
        )?;
        read += replay.records;
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
        let r = record.range(k);
        r.segments
            .extend(expired.segments.iter().map(|d| d.segment_id));
        records += expired.segments.iter().map(|d| d.records).sum::<u64>();
        segments += expired.segments.len();
        statuses += expired.statuses;
        record.counts = vec![
            ("records_read".into(), read),
            ("segments_dropped".into(), segments as u64),
            ("records_dropped".into(), records),
            ("expired_statuses".into(), statuses),
        ];
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
