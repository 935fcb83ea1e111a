//! `courier-loadgen`: closed-loop bulk senders against a courier server, with HDR latency
//! percentiles and a JSON report.
//!
//! ```text
//! args ──> target + trust decision (loopback unless --allow-remote; pinned with --ca)
//!      ──> courier::load::run (connections × streams × in-flight batches, full speed)
//!      ──> table on stdout, JSON with --json
//! ```
//!
//! The token is never printed; prefer `COURIER_TOKEN` over `--token`, which other users
//! of the machine can read from the process list.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use courier::load::{self, LoadConfig};
use courier::tls::{CertificateDer, ServerTrust};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Closed-loop load generator for courier.
#[derive(Parser)]
#[command(name = "courier-loadgen", version)]
struct Args {
    /// Server address, HOST:PORT.
    #[arg(long)]
    target: String,
    /// Bearer token of the sending business.
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    token: String,
    /// Connections to open.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Messages per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The server's certificate (DER, as the server wrote it) to pin.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Allow a target that is not a loopback address (requires --ca).
    #[arg(long)]
    allow_remote: bool,
    /// Submit streams per connection (at most the server's streams_per_connection_max).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Batches in flight per stream.
    #[arg(long = "in-flight", default_value_t = 8)]
    in_flight: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// How the server will be trusted, decided before any file is read.
#[derive(Debug, PartialEq, Eq)]
enum TrustChoice {
    Pinned,
    InsecureLoopback,
}

fn choose_trust(loopback: bool, has_ca: bool, allow_remote: bool) -> anyhow::Result<TrustChoice> {
    if !loopback && !allow_remote {
        bail!("the target is not a loopback address; pass --allow-remote to load a remote server");
    }
    match (has_ca, loopback) {
        (true, _) => Ok(TrustChoice::Pinned),
        (false, true) => Ok(TrustChoice::InsecureLoopback),
        (false, false) => bail!("a remote target needs --ca CERT.der to pin its certificate"),
    }
}

fn read_pinned(path: &Path) -> anyhow::Result<ServerTrust> {
    let der = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if der.starts_with(b"-----BEGIN") {
        bail!(
            "{} is PEM; --ca expects the DER file the server wrote",
            path.display()
        );
    }
    Ok(ServerTrust::Pinned(CertificateDer::from(der)))
}

fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving --target {target}"))?
        .next()
        .with_context(|| format!("--target {target} resolves to no address"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let target = resolve(&args.target)?;
    let trust = match choose_trust(
        target.ip().is_loopback(),
        args.ca.is_some(),
        args.allow_remote,
    )? {
        TrustChoice::Pinned => read_pinned(args.ca.as_deref().expect("--ca given"))?,
        TrustChoice::InsecureLoopback => ServerTrust::InsecureLoopback,
    };
    let cfg = LoadConfig {
        target,
        token: args.token,
        trust,
        connections: args.connections,
        batch: args.batch,
        size: args.size,
        duration: Duration::from_secs(args.duration),
        streams_per_connection: args.streams,
        batches_in_flight_per_stream: args.in_flight,
    };
    eprintln!(
        "courier-loadgen: {} for {}s: {} connections x {} streams x {} in flight, batch {}, {} B payload",
        cfg.target,
        args.duration,
        cfg.connections,
        cfg.streams_per_connection,
        cfg.batches_in_flight_per_stream,
        cfg.batch,
        cfg.size
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = runtime.block_on(load::run(&cfg))?;
    report.print_table(&mut std::io::stdout().lock())?;
    if let Some(path) = &args.json {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_targets_need_allow_remote_and_a_pinned_cert() {
        assert_eq!(
            choose_trust(true, false, false).unwrap(),
            TrustChoice::InsecureLoopback
        );
        assert_eq!(
            choose_trust(true, true, false).unwrap(),
            TrustChoice::Pinned
        );
        assert!(
            choose_trust(false, true, false).is_err(),
            "no --allow-remote"
        );
        assert!(choose_trust(false, false, true).is_err(), "no --ca");
        assert_eq!(
            choose_trust(false, true, true).unwrap(),
            TrustChoice::Pinned
        );
    }

    #[test]
    fn args_parse_with_defaults() {
        let a = Args::try_parse_from([
            "courier-loadgen",
            "--target",
            "127.0.0.1:4433",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(
            (a.connections, a.batch, a.size, a.duration, a.threads),
            (4, 64, 1024, 10, 2)
        );
        assert!(!a.allow_remote && a.ca.is_none() && a.json.is_none());
        let a = Args::try_parse_from([
            "courier-loadgen",
            "--target",
            "[::1]:1",
            "--token",
            "t",
            "--in-flight",
            "3",
            "--streams",
            "5",
        ])
        .unwrap();
        assert_eq!((a.in_flight, a.streams), (3, 5));
        assert!(resolve(&a.target).unwrap().ip().is_loopback());
    }

    #[test]
    fn pem_is_refused_for_ca() {
        let dir = std::env::temp_dir().join(format!("courier-loadgen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("cert.pem");
        std::fs::write(&pem, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(read_pinned(&pem).is_err());
        let der = dir.join("cert.der");
        std::fs::write(&der, [0x30, 0x82, 0x01]).unwrap();
        assert!(matches!(read_pinned(&der), Ok(ServerTrust::Pinned(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
