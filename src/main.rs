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
        Command::Businesses(BusinessesCmd::Add {
            name,
            tier,
            mps,
            registry,
        }) => cmd_businesses_add(&name, &tier, mps, &registry),
        Command::Businesses(BusinessesCmd::List { registry }) => {
            let reg = load_registry(&registry)?;
            println!("{:>6}  {:<10} {:>6}  name", "id", "tier", "mps");
            for b in reg.iter() {
                println!(
                    "{:>6}  {:<10} {:>6}  {}",
                    b.id,
                    b.tier.name(),
                    b.mps,
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

fn cmd_businesses_add(name: &str, tier: &str, mps: u32, path: &Path) -> Result<()> {
    let tier = Tier::parse(tier).with_context(|| {
        format!("--tier {tier:?}: must be one of 250, 2000, 10000, 100000, unlimited")
    })?;
    let mut reg = if path.exists() {
        load_registry(path)?
    } else {
        Registry::default()
    };
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    let (id, token) = reg.add(name, tier, mps, &secret)?;
    // Write the new registry next to the old one and rename, so a crash leaves either.
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, reg.to_toml()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    eprintln!(
        "registered business {id} ({name}, tier {tier}, {mps} msg/s) in {}",
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
        master_key,
    })?;
    tracing::info!(
        addr = %running.local_addr(),
        shards = running.shards(),
        cert = %args.data_dir.join("tls/cert.der").display(),
        "courier serving"
    );
    // Every shard has recovered its log and is listening: tell systemd (Type=notify).
    let notifier = Arc::new(courier::notify::Notifier::from_env());
    install_signal_handler(running.shutdown_handle(), notifier.clone());
    notifier.notify("READY=1");
    let stats = running.join()?;
    let messages_in: u64 = stats.iter().map(|s| s.messages_in).sum();
    tracing::info!(messages_in, "courier stopped");
    Ok(())
}

fn cmd_demo(args: DemoArgs) -> Result<()> {
    let dir = tempfile_dir()?;
    let mut profile = Profile::default_profile();
    profile.listen = "127.0.0.1:0".parse().expect("literal address");
    let mut registry = Registry::default();
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    let (_, token) = registry.add("demo sender", Tier::Unlimited, 1_000_000, &secret)?;
    let running = serve::start(ServeOptions {
        profile,
        data_dir: dir.clone(),
        registry: Arc::new(registry),
        master_key: courier::store::MasterKeyText::random(),
    })?;
    let addr = running.local_addr();
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
    let report = rt.block_on(courier::load::run(&cfg));
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
    if report.accepted == 0 {
        bail!("demo accepted no message");
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let mut rnd = [0u8; 8];
    rand::fill(&mut rnd[..]);
    let dir = std::env::temp_dir().join(format!("courier-demo-{}", hex::encode(rnd)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
