//! `courier serve`: load the profile (with environment overrides), the registry and the
//! master key, start the shards, tell systemd when ready, and stop on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use courier::serve::{self, ServeOptions};
use courier_pipeline::registry::Registry;

use super::{load_profile, load_registry, read_master_key};

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Tuning profile (TOML); the built-in default profile when absent. Any key can be
    /// overridden with COURIER_<SECTION>__<KEY>=VALUE (e.g. COURIER_SERVER__SHARDS=4).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// UDP listen address; overrides the profile's server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (TLS identity, log, checkpoints). With --region, the main data
    /// directory only locates the registry; the region's own directory holds the data.
    #[arg(long, default_value = "courier-data")]
    data_dir: PathBuf,
    /// Serve one region ("local storage"): the businesses the registry places in
    /// `[regions.NAME]` of the profile, from that table's data_dir (which must exist),
    /// on its listen address, with its master_key_file when it names one. Without it the
    /// server serves the businesses that have no region, from --data-dir.
    #[arg(long, value_name = "NAME")]
    region: Option<String>,
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

pub(crate) fn install_signal_handler(
    handle: courier::serve::ShutdownHandle,
    notifier: Arc<courier::notify::Notifier>,
) {
    courier::signals::on_terminate(move || {
        notifier.notify("STOPPING=1");
        handle.shutdown();
    });
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let mut profile = load_profile(args.profile.as_deref())?;
    let registry_path = args
        .registry
        .clone()
        .unwrap_or_else(|| args.data_dir.join("registry.toml"));
    let mut master_key_file = args.master_key_file.clone();
    let data_dir = match &args.region {
        None => {
            courier::store::create_private_dir(&args.data_dir)
                .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
            args.data_dir.clone()
        }
        Some(name) => {
            // Checked again (with the directory) by serve::start.
            let region = profile.regions.get(name).cloned().with_context(|| {
                format!(
                    "--region {name}: the profile defines no [regions.{name}] (defined: {})",
                    region_names(&profile)
                )
            })?;
            profile.listen = region.listen;
            profile.metrics_listen = region.metrics_listen;
            if let Some(k) = region.master_key_file {
                master_key_file = Some(k);
            }
            region.data_dir
        }
    };
    if let Some(l) = args.listen {
        profile.listen = l;
    }
    if let Some(s) = args.shards {
        profile.shards = s;
    }
    // An erase that stopped half-way is finished before the registry and the keys are
    // read: rolled forward past its commit point (the master key file already holds the
    // new key), back before it.
    match courier::erase::finish_interrupted(&data_dir)? {
        Some(courier::erase::Interrupted::Completed { business_id }) => {
            tracing::info!(business_id, "completed an interrupted erase of a business")
        }
        Some(courier::erase::Interrupted::RolledBack { business_id }) => tracing::warn!(
            business_id,
            "rolled back an interrupted erase of a business: it is NOT erased; run `courier businesses erase` again"
        ),
        None => {}
    }
    let master_key = read_master_key(master_key_file.as_deref())?;
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
        data_dir: data_dir.clone(),
        registry: Arc::new(registry),
        registry_file: Some(registry_path),
        master_key,
        region: args.region.clone(),
    })?;
    tracing::info!(
        addr = %running.local_addr(),
        shards = running.shards(),
        region = args.region.as_deref().unwrap_or("none (main data directory)"),
        data_dir = %data_dir.display(),
        cert = %data_dir.join("tls/cert.der").display(),
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

fn region_names(profile: &courier_pipeline::profile::Profile) -> String {
    if profile.regions.is_empty() {
        return "none".into();
    }
    profile
        .regions
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}
