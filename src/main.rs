//! `courier`: the relay's command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use courier::serve::{self, ServeOptions};
use courier_pipeline::profile::{Profile, DEFAULT_PROFILE_TOML};
use courier_pipeline::registry::{Registry, Tier};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// courier: a high-throughput relay for business messaging over QUIC.
#[derive(Parser, Debug)]
#[command(name = "courier", version, about)]
struct Cli {
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors. The filter is COURIER_LOG (default `info`).
    #[arg(long, global = true, env = "COURIER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event and line (tracing-subscriber's JSON formatter).
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay: one pinned shard per core, listening on UDP (QUIC, ALPN courier/1).
    Serve(ServeArgs),
    /// Serve on the built-in default profile and drive it with built-in load for a few
    /// seconds on loopback, then print a summary.
    Demo(DemoArgs),
    /// Send a file of messages (JSON Lines) to a server: validated whole first, then
    /// pipelined; acked ids go to a state file so that a rerun sends only the rest.
    #[command(after_help = courier::send::EXIT_CODES_HELP)]
    Send(SendArgs),
    /// Manage the business registry.
    #[command(subcommand)]
    Businesses(BusinessesCmd),
    /// Check tuning profiles.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage the master key.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Check the log on disk (read only; never prints content or phone numbers).
    #[command(subcommand)]
    Log(LogCmd),
}

#[derive(Subcommand, Debug)]
enum LogCmd {
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
    /// as `courier-loadgen --accepted FILE` writes it) is present and intact; exits
    /// non-zero when any is missing or mismatched.
    Audit {
        /// The accepted list.
        #[arg(long)]
        accepted: PathBuf,
        /// The data directory (holds log/shard-K/).
        dir: PathBuf,
        /// Master key file (the one the server runs with).
        #[arg(long, env = "COURIER_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Write a new random master key (mode 0600); refuses to overwrite an existing file.
    Init {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Tuning profile (TOML); the built-in default profile when absent. Any key can be
    /// overridden with COURIER_<SECTION>__<KEY>=VALUE (e.g. COURIER_SERVER__SHARDS=4).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// UDP listen address; overrides the profile's server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (TLS identity; later the log).
    #[arg(long, default_value = "courier-data")]
    data_dir: PathBuf,
    /// Business registry (TOML); DATA_DIR/registry.toml when absent.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Number of shards; overrides the profile's server.shards (0 = one per CPU).
    #[arg(long)]
    shards: Option<u32>,
    /// Master key file (64 hex characters; create one with `courier keys init`). It wraps
    /// the log's data keys; a missing or wrong key stops start-up before any data is touched.
    #[arg(long, env = "COURIER_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Client connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Messages per SUBMIT.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// SUBMIT streams per connection.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Batches in flight per stream.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
}

#[derive(clap::Args)]
struct SendArgs {
    /// The messages, JSON Lines: one object per line with `recipient` (E.164, e.g.
    /// "+4915112345678"), exactly one of `payload` (UTF-8 text) or `payload_b64`
    /// (base64), and optionally `id` (the client message id, u64; default: the line
    /// number). Blank lines are skipped.
    file: PathBuf,
    /// Server address, HOST:PORT (not needed with --check).
    #[arg(long, required_unless_present = "check")]
    target: Option<String>,
    /// Bearer token of the sending business (prefer COURIER_TOKEN: the process list is
    /// readable by other users).
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's certificate (DER, as the server wrote it: DATA_DIR/tls/cert.der) to
    /// pin. Without it certificate checks are skipped, which is allowed for loopback
    /// targets only.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Allow a target that is not a loopback address (requires --ca).
    #[arg(long)]
    allow_remote: bool,
    /// State file of acked client ids, appended as ACKs arrive; ids in it are skipped.
    /// Default: FILE.acked.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Messages per SUBMIT at most (the server's batch bound applies too).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Submit streams (at most the server's streams_per_connection_max).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Batches in flight per stream.
    #[arg(long = "in-flight", default_value_t = 4)]
    in_flight: usize,
    /// Rounds per batch while messages come back throttled (each after the server's
    /// retry-after, at most 60 s).
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Only validate FILE (no server): report bad lines and how many ids the state file
    /// already holds.
    #[arg(long)]
    check: bool,
}

impl std::fmt::Debug for SendArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendArgs")
            .field("file", &self.file)
            .field("target", &self.target)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Subcommand, Debug)]
enum BusinessesCmd {
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
        /// businesses) and no messages.
        #[arg(long)]
        platform: bool,
        /// Distinct recipients per minute the business is known to reach: the fan-out
        /// surge check starts from it instead of from nothing (0: learn from scratch).
        #[arg(long, default_value_t = 0)]
        baseline_per_min: u32,
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

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a profile with the COURIER_<SECTION>__<KEY> environment overrides applied
    /// (as `serve` would), print the overrides and the profile, or print every error.
    Check {
        /// Profile file (TOML).
        file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_logging(format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // What `fn main() -> Result` would print.
                LogFormat::Text => eprintln!("Error: {e:?}"),
                // A log collector gets the failure as one more JSON line.
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "courier failed"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => cmd_serve(args),
        Command::Demo(args) => cmd_demo(args),
        Command::Send(args) => {
            let code = cmd_send(args);
            // process::exit skips destructors: flush what was printed first.
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(code.into())
        }
        Command::Businesses(BusinessesCmd::Add {
            name,
            tier,
            mps,
            exempt,
            platform,
            baseline_per_min,
            registry,
        }) => {
            let flags = AddFlags {
                exempt,
                platform,
                baseline_per_min,
            };
            cmd_businesses_add(&name, &tier, mps, flags, &registry)
        }
        Command::Businesses(BusinessesCmd::Set {
            id,
            tier,
            mps,
            exempt,
            baseline_per_min,
            registry,
        }) => cmd_businesses_set(
            id,
            tier.as_deref(),
            mps,
            exempt,
            baseline_per_min,
            &registry,
        ),
        Command::Businesses(BusinessesCmd::Unpause { id, data_dir }) => {
            let path = courier::control::request_unpause(&data_dir, id).with_context(|| {
                format!("writing the unpause request under {}", data_dir.display())
            })?;
            eprintln!(
                "unpause of business {id} requested ({}); a running server applies it within about a second",
                path.display()
            );
            Ok(())
        }
        Command::Businesses(BusinessesCmd::Status {
            data_dir,
            registry,
            json,
        }) => cmd_businesses_status(&data_dir, registry.as_deref(), json),
        Command::Businesses(BusinessesCmd::List { registry }) => {
            let reg = load_registry(&registry)?;
            println!(
                "{:>6}  {:<10} {:>8}  {:<6}  name",
                "id", "tier", "mps", "exempt"
            );
            for b in reg.iter() {
                println!(
                    "{:>6}  {:<10} {:>8}  {:<6}  {}",
                    b.id,
                    b.tier.name(),
                    b.mps,
                    if b.exempt { "yes" } else { "no" },
                    b.name
                );
            }
            Ok(())
        }
        Command::Keys(KeysCmd::Init { out }) => {
            courier::store::write_new_master_key(&out)
                .with_context(|| format!("writing master key {}", out.display()))?;
            eprintln!(
                "wrote a new master key to {} (mode 0600); serve with --master-key-file {0} \
                 or COURIER_MASTER_KEY_FILE={0}. Keep a copy: without it the log cannot be read.",
                out.display()
            );
            Ok(())
        }
        Command::Log(LogCmd::Verify {
            dir,
            master_key_file,
        }) => {
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
        Command::Log(LogCmd::Audit {
            accepted,
            dir,
            master_key_file,
        }) => {
            let key = read_master_key(master_key_file.as_deref())?;
            let entries = courier::audit::read_accepted(&accepted)?;
            let report = courier::audit::audit(&dir, &key, &entries)?;
            report.print(&mut std::io::stdout())?;
            if !report.is_clean() {
                bail!(
                    "{}: {} of {} accepted message(s) missing, {} mismatched",
                    dir.display(),
                    report.missing,
                    entries.len(),
                    report.mismatched
                );
            }
            Ok(())
        }
        Command::Config(ConfigCmd::Check { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match Profile::from_toml_with_env(&text, env_vars()) {
                Ok((p, applied)) => {
                    if applied.is_empty() {
                        println!("no environment overrides");
                    }
                    for o in &applied {
                        println!("override: {} = {} (from {})", o.key, o.value, o.var);
                    }
                    println!("{} is valid:\n{p:#?}", file.display());
                    Ok(())
                }
                Err(e) => bail!("{}: {e}", file.display()),
            }
        }
    }
}

fn load_profile(path: Option<&Path>) -> Result<Profile> {
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
fn env_vars() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    })
}

fn read_master_key(path: Option<&Path>) -> Result<courier::store::MasterKeyText> {
    match path {
        Some(p) => courier::store::MasterKeyText::read(p).map_err(anyhow::Error::msg),
        None => bail!(
            "no master key: pass --master-key-file FILE or set COURIER_MASTER_KEY_FILE \
             (create one with `courier keys init --out FILE`)"
        ),
    }
}

fn load_registry(path: &Path) -> Result<Registry> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading registry {}", path.display()))?;
    Registry::from_toml(&text).with_context(|| format!("loading registry {}", path.display()))
}

/// Writes the registry next to the old file and renames, so a crash (or a server
/// re-reading it) sees either the old or the new one.
fn write_registry(reg: &Registry, path: &Path) -> Result<()> {
    courier::store::write_file_atomically(path, reg.to_toml().as_bytes(), 0o666)
        .with_context(|| format!("writing {}", path.display()))
}

/// The optional settings of `businesses add`.
#[derive(Debug, Clone, Copy)]
struct AddFlags {
    exempt: bool,
    platform: bool,
    baseline_per_min: u32,
}

fn parse_tier(tier: &str) -> Result<Tier> {
    Tier::parse(tier).with_context(|| {
        format!("--tier {tier:?}: must be one of 250, 2000, 10000, 100000, unlimited")
    })
}

fn cmd_businesses_set(
    id: u32,
    tier: Option<&str>,
    mps: Option<u32>,
    exempt: Option<bool>,
    baseline_per_min: Option<u32>,
    path: &Path,
) -> Result<()> {
    if tier.is_none() && mps.is_none() && exempt.is_none() && baseline_per_min.is_none() {
        bail!("nothing to change: give --tier, --mps, --exempt or --baseline-per-min");
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
    let b = reg.get(id).expect("exists");
    write_registry(&reg, path)?;
    eprintln!(
        "business {id}: tier {}, {} msg/s, exempt {}, baseline {} recipients/min \
         (a running server applies it within about a second)",
        b.tier, b.mps, b.exempt, b.baseline_per_min
    );
    Ok(())
}

fn cmd_businesses_status(data_dir: &Path, registry: Option<&Path>, json: bool) -> Result<()> {
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

fn cmd_businesses_add(
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
    write_registry(&reg, path)?;
    eprintln!(
        "registered {} {id} ({name}, tier {tier}, {mps} msg/s{}) in {}",
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
        path.display()
    );
    eprintln!("its token follows; it is shown only this once:");
    println!("{token}");
    Ok(())
}

fn install_signal_handler(
    handle: courier::serve::ShutdownHandle,
    notifier: Arc<courier::notify::Notifier>,
) {
    courier::signals::on_terminate(move || {
        notifier.notify("STOPPING=1");
        handle.shutdown();
    });
}

fn cmd_serve(args: ServeArgs) -> Result<()> {
    let mut profile = load_profile(args.profile.as_deref())?;
    if let Some(l) = args.listen {
        profile.listen = l;
    }
    if let Some(s) = args.shards {
        profile.shards = s;
    }
    let master_key = read_master_key(args.master_key_file.as_deref())?;
    let registry_path = args
        .registry
        .unwrap_or_else(|| args.data_dir.join("registry.toml"));
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let registry = if registry_path.exists() {
        load_registry(&registry_path)?
    } else {
        tracing::warn!(
            registry = %registry_path.display(),
            "registry file not found: no business can authenticate until one is added with `courier businesses add`"
        );
        Registry::default()
    };
    let running = serve::start(ServeOptions {
        profile,
        data_dir: args.data_dir.clone(),
        registry: Arc::new(registry),
        registry_file: Some(registry_path),
        master_key,
    })?;
    tracing::info!(
        addr = %running.local_addr(),
        shards = running.shards(),
        cert = %args.data_dir.join("tls/cert.der").display(),
        "courier serving"
    );
    match running.metrics_addr() {
        Some(m) => tracing::info!("metrics on http://{m}/metrics"),
        None => tracing::info!("metrics off (server.metrics_listen is \"\")"),
    }
    // Every shard has recovered its log and is listening: tell systemd (Type=notify).
    let notifier = Arc::new(courier::notify::Notifier::from_env());
    install_signal_handler(running.shutdown_handle(), notifier.clone());
    notifier.notify("READY=1");
    let stats = running.join()?;
    let messages_in: u64 = stats.iter().map(|s| s.messages_in).sum();
    tracing::info!(messages_in, "courier stopped");
    Ok(())
}

/// Runs `courier send`; returns the exit status (see `courier::send::exit_code`).
fn cmd_send(args: SendArgs) -> u8 {
    use courier::send::{self, exit_code};
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| send::default_state_path(&args.file));
    if args.check {
        return match send::check(&args.file, &state) {
            Ok(v) => {
                println!(
                    "{}: {} message(s), all lines valid; {} already acked per {}",
                    args.file.display(),
                    v.messages,
                    v.skipped,
                    state.display()
                );
                exit_code::OK
            }
            Err(e) => {
                eprintln!("courier send: {e}");
                e.exit_code()
            }
        };
    }
    let options = match send_options(&args, state) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("courier send: {e:#}");
            return exit_code::BAD_INPUT;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("courier send: starting the tokio runtime: {e}");
            return exit_code::NOT_ALL_ACCEPTED;
        }
    };
    match runtime.block_on(send::send(&options)) {
        Ok(summary) => {
            let _ = summary.print(&mut std::io::stdout().lock());
            summary.exit_code()
        }
        Err(e) => {
            eprintln!("courier send: {e}");
            e.exit_code()
        }
    }
}

fn send_options(args: &SendArgs, state: PathBuf) -> Result<courier::send::SendOptions> {
    let target = args.target.as_deref().context("--target is required")?;
    let server = std::net::ToSocketAddrs::to_socket_addrs(target)
        .with_context(|| format!("resolving --target {target}"))?
        .next()
        .with_context(|| format!("--target {target} resolves to no address"))?;
    let token = args
        .token
        .clone()
        .context("give a token with --token or COURIER_TOKEN")?;
    let trust = courier::tls::trust_for_target(server, args.ca.as_deref(), args.allow_remote)?;
    Ok(courier::send::SendOptions {
        file: args.file.clone(),
        state,
        client: courier::client::ClientConfig {
            server,
            server_name: "localhost".to_string(),
            token,
            trust,
            streams: args.streams,
            batches_in_flight_per_stream: args.in_flight,
        },
        batch_messages_max: args.batch,
        attempts: args.attempts,
        quiet: args.quiet,
    })
}

fn cmd_demo(args: DemoArgs) -> Result<()> {
    let dir = tempfile_dir()?;
    let mut profile = Profile::default_profile();
    profile.listen = "127.0.0.1:0".parse().expect("literal address");
    // A demo next to a running server must not take its metrics port: an ephemeral one.
    profile.metrics_listen = Some("127.0.0.1:0".parse().expect("literal address"));
    let mut registry = Registry::default();
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    // The bulk sender is the platform's own load (exempt from detection); the second
    // business is judged like any customer, and blasts new numbers mid-run.
    let (id, token) = registry.add("demo bulk sender", Tier::Unlimited, 1_000_000, &secret)?;
    registry.set_exempt(id, true);
    rand::fill(&mut secret[..]);
    let (abusive_id, abusive_token) =
        registry.add("demo abusive sender", Tier::T10k, 1_000, &secret)?;
    let running = serve::start(ServeOptions {
        profile,
        data_dir: dir.clone(),
        registry: Arc::new(registry),
        registry_file: None,
        master_key: courier::store::MasterKeyText::random(),
    })?;
    let addr = running.local_addr();
    let metrics = running.metrics_addr();
    println!(
        "courier demo: serving on {addr} with {} shard(s) (built-in default profile); \
         {} connection(s) sending {}-byte messages in batches of {} for {} s",
        running.shards(),
        args.connections,
        args.size,
        args.batch,
        args.seconds
    );
    let cfg = courier::load::LoadConfig {
        target: addr,
        token,
        trust: courier::tls::ServerTrust::Pinned(running.certificate().clone()),
        connections: args.connections,
        batch: args.batch,
        size: args.size,
        duration: Duration::from_secs(args.seconds),
        streams_per_connection: args.streams,
        batches_in_flight_per_stream: args.in_flight,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let blast_cfg = courier::client::ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: abusive_token,
        trust: courier::tls::ServerTrust::Pinned(running.certificate().clone()),
        streams: 1,
        batches_in_flight_per_stream: 1,
    };
    let (report, blast) = rt.block_on(async move {
        let bulk = tokio::spawn(async move { courier::load::run(&cfg).await });
        let blast = demo_blast(&blast_cfg).await;
        (bulk.await, blast)
    });
    let report = report.map_err(|e| anyhow::anyhow!("load task failed: {e}"))?;
    // The status file is written once a second.
    std::thread::sleep(Duration::from_millis(1_200));
    let status = courier::control::read_status(&dir).ok();
    running.shutdown();
    let totals = running.totals();
    let stats = running.join()?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    report.print_table(&mut std::io::stdout())?;
    let hellos: u64 = stats.iter().map(|s| s.hellos_accepted).sum();
    println!(
        "server: {} messages accepted (durable: written and fdatasync'd) in {} batches over {hellos} \
         authenticated connection(s), {} group commits, {} datagrams forwarded between shards",
        totals.accepted, totals.batches, totals.commits, totals.forwarded
    );
    match blast {
        Ok(b) => {
            println!(
                "detector: business {abusive_id} (\"demo abusive sender\") blasted new numbers: \
                 {} accepted, then {} rejected as sender_paused{}",
                b.accepted,
                b.paused,
                b.paused_after
                    .map(|t| format!(
                        ", paused {:.0} ms after its first message",
                        t.as_secs_f64() * 1e3
                    ))
                    .unwrap_or_default()
            );
        }
        Err(e) => println!("detector: the abusive sender could not run: {e}"),
    }
    if let Some(st) = status {
        for b in st.businesses {
            println!(
                "  business {}: rating {}, tier {}, paused {}{}, accepted today {}",
                b.id,
                b.rating,
                b.tier,
                b.paused,
                b.why.map(|w| format!(" ({w})")).unwrap_or_default(),
                b.accepted_today
            );
        }
    }
    println!(
        "data: {} (removed now); a real server keeps its log, detector state and status \
         under --data-dir (see `courier businesses status`)",
        dir.display()
    );
    if let Some(m) = metrics {
        println!(
            "metrics: were at http://{m}/metrics while the demo ran (Prometheus text; \
             `server.metrics_listen` in the profile)"
        );
    }
    if report.accepted == 0 {
        bail!("demo accepted no message");
    }
    Ok(())
}

/// What the demo's abusive sender saw.
struct BlastOutcome {
    accepted: u64,
    paused: u64,
    paused_after: Option<Duration>,
}

/// After a quiet second, sends batches of never-contacted numbers as fast as the server
/// answers, until the detector pauses the sender (at most 40 batches).
async fn demo_blast(cfg: &courier::client::ClientConfig) -> Result<BlastOutcome> {
    use courier::client::{Client, OutgoingMessage};
    use courier_pipeline::wire::{Reason, Recipient, Status};
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = Client::connect(cfg).await?;
    let mut out = BlastOutcome {
        accepted: 0,
        paused: 0,
        paused_after: None,
    };
    let start = std::time::Instant::now();
    for k in 0..40u64 {
        let batch = (0..50u64)
            .map(|i| {
                let n = k * 50 + i;
                OutgoingMessage {
                    client_id: n,
                    recipient: Recipient::parse(format!("+1999{n:010}").as_bytes())
                        .expect("valid E.164"),
                    payload: bytes::Bytes::from_static(b"limited time offer"),
                }
            })
            .collect();
        let statuses = client.submit(batch).await?;
        for s in &statuses {
            match s {
                Status::Accepted(_) => out.accepted += 1,
                Status::Rejected(Reason::SenderPaused) => {
                    out.paused += 1;
                    out.paused_after.get_or_insert(start.elapsed());
                }
                _ => {}
            }
        }
        if statuses
            .iter()
            .all(|s| *s == Status::Rejected(Reason::SenderPaused))
        {
            break;
        }
    }
    client.close().await;
    Ok(out)
}

fn tempfile_dir() -> Result<PathBuf> {
    let mut rnd = [0u8; 8];
    rand::fill(&mut rnd[..]);
    let dir = std::env::temp_dir().join(format!("courier-demo-{}", hex::encode(rnd)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
