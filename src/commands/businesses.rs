//! `courier businesses add|list|set|unpause|status|erase`: the registry file (tokens shown
//! once, only their hashes stored), the running server's status file, and erasing a
//! business with the server stopped (`courier::erase`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use courier_pipeline::registry::Registry;

use super::{load_registry, parse_tier, write_registry};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum BusinessesCmd {
    /// Register a business and print its token (shown once; only its hash is stored).
    Add {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Unique recipients per rolling 24 h: 250, 2000, 10000, 100000 or unlimited.
        #[arg(long, default_value = "250")]
        tier: String,
        /// Messages per second.
        #[arg(long, default_value_t = 80)]
        mps: u32,
        /// Exempt from abnormal-sending detection (the platform's own load and test
        /// senders only; never a customer).
        #[arg(long)]
        exempt: bool,
        /// A platform credential: its connections send spam REPORTs (which rate
        /// businesses) and no messages, and may be the delivery edge (HELLO version 2
        /// with the DELIVERY feature: they take DELIVERs, report outcomes, say when
        /// recipients are online and hand over users' replies).
        #[arg(long)]
        platform: bool,
        /// Distinct recipients per minute the business is known to reach: the fan-out
        /// surge check starts from it instead of from nothing (0: learn from scratch).
        #[arg(long, default_value_t = 0)]
        baseline_per_min: u32,
        /// Region whose data directory keeps the business's data at rest (a
        /// `[regions.NAME]` of the profile; served by `courier serve --region NAME`).
        /// Absent: the main data directory.
        #[arg(long)]
        region: Option<String>,
        /// Registry file (created if missing).
        #[arg(long)]
        registry: PathBuf,
    },
    /// List the businesses of a registry (never tokens).
    List {
        /// Registry file.
        #[arg(long)]
        registry: PathBuf,
    },
    /// Change a business's tier, rate or exemption; a running server applies it within
    /// about a second (it watches the registry file).
    Set {
        /// Business id.
        #[arg(long)]
        id: u32,
        /// New unique-recipient tier: 250, 2000, 10000, 100000 or unlimited.
        #[arg(long)]
        tier: Option<String>,
        /// New messages per second.
        #[arg(long)]
        mps: Option<u32>,
        /// Exempt from detection (true or false).
        #[arg(long)]
        exempt: Option<bool>,
        /// Distinct recipients per minute the business is known to reach.
        #[arg(long)]
        baseline_per_min: Option<u32>,
        /// Move the business to this region ("" for the main data directory): its
        /// region's server serves it from then on, and its connections elsewhere are
        /// closed; what it stored before stays where it was until retention drops it.
        #[arg(long)]
        region: Option<String>,
        /// Registry file.
        #[arg(long)]
        registry: PathBuf,
    },
    /// Lift a business's pause (the detector's or a red rating's). A running server
    /// applies it within about a second; otherwise the next start does.
    Unpause {
        /// Business id.
        #[arg(long)]
        id: u32,
        /// The server's data directory.
        #[arg(long, default_value = "courier-data")]
        data_dir: PathBuf,
    },
    /// Erase a business for good, with the server stopped: its stored messages, statuses and replies become unreadable, here and in any copy taken before (the master key is replaced)
    ///
    /// Its root key is destroyed and the master key rotated: every keyring and every other
    /// business's root key is rewrapped under a new key written to the master key file,
    /// so every backup of the data directory taken before can no longer be read, for any
    /// business. Its id is never reused; its billing counts stay. Asks to type the id
    /// unless --yes.
    Erase {
        /// Business id.
        #[arg(long)]
        id: u32,
        /// The server's data directory.
        #[arg(long, default_value = "courier-data")]
        data_dir: PathBuf,
        /// Registry file; DATA_DIR/registry.toml when absent.
        #[arg(long)]
        registry: Option<PathBuf>,
        /// The server's tuning profile (its detector checkpoints are rewritten); the
        /// built-in default profile when absent.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The master key file the server uses; replaced by a new key.
        #[arg(long, env = "COURIER_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Integrity signals and billing counts per business (rating, tier in force, paused
    /// and why, messages accepted today), as the running server last wrote them.
    Status {
        /// The server's data directory.
        #[arg(long, default_value = "courier-data")]
        data_dir: PathBuf,
        /// Registry file, for business names; DATA_DIR/registry.toml when absent.
        #[arg(long)]
        registry: Option<PathBuf>,
        /// Print the status file's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `courier businesses` subcommand.
pub(crate) fn run(cmd: BusinessesCmd) -> Result<()> {
    match cmd {
        BusinessesCmd::Add {
            name,
            tier,
            mps,
            exempt,
            platform,
            baseline_per_min,
            region,
            registry,
        } => {
            let flags = AddFlags {
                exempt,
                platform,
                baseline_per_min,
                region,
            };
            cmd_businesses_add(&name, &tier, mps, flags, &registry)
        }
        BusinessesCmd::Set {
            id,
            tier,
            mps,
            exempt,
            baseline_per_min,
            region,
            registry,
        } => cmd_businesses_set(
            id,
            SetFlags {
                tier: tier.as_deref(),
                mps,
                exempt,
                baseline_per_min,
                region: region.as_deref(),
            },
            &registry,
        ),
        BusinessesCmd::Unpause { id, data_dir } => {
            let path = courier::control::request_unpause(&data_dir, id).with_context(|| {
                format!("writing the unpause request under {}", data_dir.display())
            })?;
            eprintln!(
                "unpause of business {id} requested ({}); a running server applies it within about a second",
                path.display()
            );
            Ok(())
        }
        BusinessesCmd::Status {
            data_dir,
            registry,
            json,
        } => cmd_businesses_status(&data_dir, registry.as_deref(), json),
        BusinessesCmd::Erase {
            id,
            data_dir,
            registry,
            profile,
            master_key_file,
            yes,
        } => {
            let registry = registry.unwrap_or_else(|| data_dir.join("registry.toml"));
            let args = EraseArgs {
                id,
                data_dir: &data_dir,
                registry: &registry,
                profile: profile.as_deref(),
                master_key_file: master_key_file.as_deref(),
                yes,
            };
            cmd_businesses_erase(&args, &mut std::io::stdin().lock())
        }
        BusinessesCmd::List { registry } => {
            let reg = load_registry(&registry)?;
            println!(
                "{:>6}  {:<10} {:>8}  {:<6}  {:<12}  name",
                "id", "tier", "mps", "exempt", "region"
            );
            for b in reg.iter() {
                println!(
                    "{:>6}  {:<10} {:>8}  {:<6}  {:<12}  {}",
                    b.id,
                    b.tier.name(),
                    b.mps,
                    if b.exempt { "yes" } else { "no" },
                    b.region.as_deref().unwrap_or("-"),
                    b.name
                );
            }
            Ok(())
        }
    }
}

/// The optional settings of `businesses add`.
#[derive(Debug, Clone)]
pub(crate) struct AddFlags {
    exempt: bool,
    platform: bool,
    baseline_per_min: u32,
    region: Option<String>,
}

/// What `businesses set` changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SetFlags<'a> {
    tier: Option<&'a str>,
    mps: Option<u32>,
    exempt: Option<bool>,
    baseline_per_min: Option<u32>,
    /// `Some("")`: back to the main data directory.
    region: Option<&'a str>,
}

pub(crate) fn cmd_businesses_set(id: u32, flags: SetFlags<'_>, path: &Path) -> Result<()> {
    let SetFlags {
        tier,
        mps,
        exempt,
        baseline_per_min,
        region,
    } = flags;
    if tier.is_none()
        && mps.is_none()
        && exempt.is_none()
        && baseline_per_min.is_none()
        && region.is_none()
    {
        bail!("nothing to change: give --tier, --mps, --exempt, --baseline-per-min or --region");
    }
    let mut reg = load_registry(path)?;
    let b = reg
        .get(id)
        .with_context(|| format!("no business with id {id} in {}", path.display()))?;
    let tier = match tier {
        Some(t) => parse_tier(t)?,
        None => b.tier,
    };
    let mps = mps.unwrap_or(b.mps);
    reg.set_limits(id, tier, mps)
        .map_err(|e| anyhow::anyhow!("--mps: {e}"))?;
    if let Some(e) = exempt {
        reg.set_exempt(id, e);
    }
    if let Some(b) = baseline_per_min {
        reg.set_baseline(id, b);
    }
    if let Some(r) = region {
        reg.set_region(id, Some(r).filter(|r| !r.is_empty()))
            .map_err(|e| anyhow::anyhow!("--region: {e}"))?;
    }
    let b = reg.get(id).expect("exists");
    write_registry(&reg, path)?;
    eprintln!(
        "business {id}: tier {}, {} msg/s, exempt {}, baseline {} recipients/min, region {} \
         (a running server applies it within about a second)",
        b.tier,
        b.mps,
        b.exempt,
        b.baseline_per_min,
        b.region.as_deref().unwrap_or("none (main data directory)")
    );
    Ok(())
}

pub(crate) fn cmd_businesses_status(
    data_dir: &Path,
    registry: Option<&Path>,
    json: bool,
) -> Result<()> {
    let status = courier::control::read_status(data_dir).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let reg_path = registry.map_or_else(|| data_dir.join("registry.toml"), Path::to_path_buf);
    let reg = load_registry(&reg_path).ok();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "as of {:.1} s ago, {} of {} shard(s) reporting",
        now_ms.saturating_sub(status.updated_unix_ms) as f64 / 1000.0,
        status.shards_reporting,
        status.shards
    );
    println!(
        "{:>6}  {:<7} {:<10} {:<7} {:<15} {:>14}  name",
        "id", "rating", "tier", "paused", "why", "accepted today"
    );
    for b in &status.businesses {
        let name = reg
            .as_ref()
            .and_then(|r| r.get(b.id))
            .map_or("?", |x| x.name.as_str());
        println!(
            "{:>6}  {:<7} {:<10} {:<7} {:<15} {:>14}  {name}",
            b.id,
            b.rating,
            b.tier,
            if b.paused { "yes" } else { "no" },
            b.why.as_deref().unwrap_or("-"),
            b.accepted_today
        );
        // What the pause or rating change was measured on (issue 14): counts only.
        if let Some(m) = &b.measured {
            println!("{:>6}  measured: {m}", "");
        }
    }
    Ok(())
}

pub(crate) fn cmd_businesses_add(
    name: &str,
    tier: &str,
    mps: u32,
    flags: AddFlags,
    path: &Path,
) -> Result<()> {
    let AddFlags {
        exempt,
        platform,
        baseline_per_min,
        region,
    } = flags;
    let tier = parse_tier(tier)?;
    let mut reg = if path.exists() {
        load_registry(path)?
    } else {
        Registry::default()
    };
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    let (id, token) = reg.add(name, tier, mps, &secret)?;
    reg.set_exempt(id, exempt);
    reg.set_platform(id, platform);
    reg.set_baseline(id, baseline_per_min);
    if let Some(r) = &region {
        reg.set_region(id, Some(r))
            .map_err(|e| anyhow::anyhow!("--region: {e}"))?;
    }
    write_registry(&reg, path)?;
    eprintln!(
        "registered {} {id} ({name}, tier {tier}, {mps} msg/s{}{}) in {}",
        if platform {
            "platform credential"
        } else {
            "business"
        },
        if exempt {
            ", exempt from detection"
        } else {
            ""
        },
        region.map_or_else(String::new, |r| format!(", region {r}")),
        path.display()
    );
    eprintln!("its token follows; it is shown only this once:");
    println!("{token}");
    Ok(())
}

/// The arguments of `businesses erase`.
pub(crate) struct EraseArgs<'a> {
    id: u32,
    data_dir: &'a Path,
    registry: &'a Path,
    profile: Option<&'a Path>,
    master_key_file: Option<&'a Path>,
    yes: bool,
}

/// `courier businesses erase`: confirmation, then `courier::erase::erase`, with one line
/// in the access log (it rewrites every keyring) and ids and counts on stdout.
pub(crate) fn cmd_businesses_erase(
    a: &EraseArgs<'_>,
    confirm: &mut dyn std::io::BufRead,
) -> Result<()> {
    use courier::access::{AccessLog, AccessRecord};
    let profile = super::load_profile(a.profile)?;
    let key_file = a
        .master_key_file
        .context("no master key: pass --master-key-file FILE or set COURIER_MASTER_KEY_FILE")?;
    if !a.data_dir.is_dir() {
        bail!("{}: no such data directory", a.data_dir.display());
    }
    if !a.yes {
        eprintln!(
            "This erases business {id} for good: its stored messages, statuses and replies \
             become unreadable, and the master key in {} is replaced (backups of the data \
             directory taken before can no longer be read, for any business). Type the id \
             ({id}) to go on:",
            key_file.display(),
            id = a.id
        );
        let mut line = String::new();
        confirm
            .read_line(&mut line)
            .context("reading the confirmation")?;
        if line.trim() != a.id.to_string() {
            bail!(
                "not confirmed (expected {}); nothing was changed (pass --yes to skip the question)",
                a.id
            );
        }
    }
    let path = |p: &Path| p.display().to_string();
    let mut record = AccessRecord::new(
        "businesses erase",
        vec![
            ("dir".into(), path(a.data_dir)),
            ("id".into(), a.id.to_string()),
            ("registry".into(), path(a.registry)),
            ("master_key_file".into(), path(key_file)),
        ],
    );
    let mut access = AccessLog::open(a.data_dir)?;
    let req = courier::erase::EraseRequest {
        data_dir: a.data_dir,
        master_key_file: key_file,
        registry: a.registry,
        detect: &profile.detect,
        business_id: a.id,
    };
    let result = courier::erase::erase(&req, None);
    if let Ok(e) = &result {
        record.counts = vec![
            ("root_key_destroyed".into(), u64::from(e.root_key_destroyed)),
            ("root_keys_rewrapped".into(), e.root_keys_rewrapped),
            ("keyrings".into(), e.keyrings),
            ("segment_keys_rewrapped".into(), e.segment_keys_rewrapped),
            ("checkpoints_rewritten".into(), e.checkpoints_rewritten),
            ("checkpoints_dropped".into(), e.checkpoints_dropped),
            ("old_format_segments".into(), e.old_format_segments),
        ];
    }
    record.finish(result.is_ok());
    let traced = access.append(&record);
    let e = result?;
    traced?;
    println!(
        "business {} erased: root key {}, {} other root key(s) and {} segment key(s) in {} \
         keyring(s) rewrapped under a new master key (written to {}), {} detector \
         checkpoint(s) rewritten without recipient hashes, {} dropped",
        e.business_id,
        if e.root_key_destroyed {
            "destroyed"
        } else {
            "absent (never served)"
        },
        e.root_keys_rewrapped,
        e.segment_keys_rewrapped,
        e.keyrings,
        key_file.display(),
        e.checkpoints_rewritten,
        e.checkpoints_dropped
    );
    if e.old_format_segments > 0 {
        println!(
            "{} segment(s) were written before per-business field keys (format version 2): \
             the recipients' numbers and replies in their records stay readable under the new \
             master key until retention drops them",
            e.old_format_segments
        );
    }
    Ok(())
}
