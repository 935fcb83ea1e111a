//! `courier-loadgen`: bulk senders against a courier server, open loop at a fixed rate
//! (latency from each message's intended send time) or closed loop at full speed, with
//! scenarios, HDR percentiles, live progress, JSON and SVG reports and verification.
//!
//! ```text
//! args ──> target + trust decision (loopback unless --allow-remote; pinned with --ca)
//!      ──> Plan: --scenario FILE, or one sender from the flags (--rate or --max)
//!      ──> courier_loadgen::run_plan (connect every sender's clients, drive, drain)
//!            ├─ progress line each second (courier_client::progress) unless --quiet;
//!            │  Ctrl-C stops early
//!            └─ --accepted FILE: writer thread, one CSV line per accepted message
//!      ──> table on stdout; --json FILE; --plot FILE.svg
//! --compare A.json B.json prints two saved runs side by side instead.
//! ```
//!
//! Tokens are never printed; prefer `COURIER_TOKEN` over `--token`, which other users
//! of the machine can read from the process list.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use courier_client::progress::ProgressLine;
use courier_client::tls::{CertificateDer, ServerTrust};
use courier_loadgen::cpu::{Meter, ServerCpu};
use courier_loadgen::deliver::DeliveryPlan;
use courier_loadgen::devices::DeviceModel;
use courier_loadgen::scenario::Defaults;
use courier_loadgen::traffic::{RecipientSpec, SizeSpec};
use courier_loadgen::{
    self as load, AcceptedRecord, Label, LoadReport, Plan, RunConfig, RunOptions, SenderPlan,
    StopSignal, TokenSource,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for courier: open loop at a fixed rate or closed loop at full speed.
#[derive(Parser)]
#[command(name = "courier-loadgen", version)]
struct Args {
    /// Server address, HOST:PORT (not needed with --compare, --dry-run or --from-json).
    #[arg(long, required_unless_present_any = ["compare", "dry_run", "from_json"])]
    target: Option<String>,
    /// No server: every batch is accepted at once in process. Measures the generator's
    /// own CPU per message (scheduling, traffic, bookkeeping), without the QUIC client.
    #[arg(long, conflicts_with_all = ["target", "compare"])]
    dry_run: bool,
    /// Bearer token(s) of the sending business(es); repeat or separate with commas.
    /// Scenario senders pick one by index (`business = N`).
    #[arg(
        long,
        env = "COURIER_TOKEN",
        hide_env_values = true,
        value_delimiter = ','
    )]
    token: Vec<String>,
    /// Token of a platform credential (`courier businesses add --platform`): scenario
    /// senders' spam REPORTs go over its connection, as the platform's would. Without it
    /// they go on the sender's own connection, and the server refuses them.
    #[arg(long, env = "COURIER_PLATFORM_TOKEN", hide_env_values = true)]
    platform_token: Option<String>,
    /// Open loop: messages per second in all, spread over the connections; latency runs
    /// from each message's intended send time.
    #[arg(long, conflicts_with = "max")]
    rate: Option<f64>,
    /// Closed loop at full speed (the default without --rate).
    #[arg(long)]
    max: bool,
    /// Connections to open (per sender in a scenario, unless it says otherwise).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Messages per batch (at most).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Payload bytes: `1024`, a uniform range `100-2000`, or weighted `100:3,4000:1`.
    #[arg(long, default_value = "1024")]
    size: String,
    /// Recipients: `uniform`, `zipf:S` (e.g. zipf:1.1) or `new` (every one new).
    #[arg(long, default_value = "uniform")]
    recipients: String,
    /// Distinct recipients for uniform and Zipf (Zipf: at most 1048576).
    #[arg(long)]
    population: Option<u64>,
    /// Seconds to send for (default 10; overrides a scenario's duration_secs).
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many messages in all.
    #[arg(long)]
    count: Option<u64>,
    /// A scenario file (TOML) of senders; see loadgen/scenarios/.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Multiply every time of the scenario (for short runs: 0.1).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Multiply every rate of the scenario.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency by percentile and throughput over time into this SVG file (FILE.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print two saved JSON reports side by side with ratios B/A, and exit.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    compare: Option<Vec<PathBuf>>,
    /// Print (and with --plot, draw) a saved JSON report instead of running.
    #[arg(long, conflicts_with_all = ["target", "compare", "dry_run"])]
    from_json: Option<PathBuf>,
    /// Write every accepted message as `business_id,client_id,log_position` (CSV).
    #[arg(long)]
    accepted: Option<PathBuf>,
    /// Fraction of messages that resend an already accepted message (same client id).
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Read the server's CPU time from /proc/PID/stat (a server in another process).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Most seconds of schedule a connection may fall behind before due messages are
    /// dropped (and counted).
    #[arg(long, default_value_t = 1.0)]
    backlog_secs: f64,
    /// Seed of the synthetic traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
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
    /// Worker threads of the generator; each owns a share of the connections. One is
    /// the cheapest per message (each thread sleeps and wakes on its own); raise it when
    /// the run warns that the generator was CPU-bound.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Deliver too: a simulated delivery edge (over --platform-token's connection, with
    /// the DELIVERY feature) takes every message, reports outcomes by its devices and
    /// hands over replies; the senders listen to their statuses. The report gains
    /// delivery counts and latencies, and the run fails (exit status 1) unless every
    /// accepted message reached exactly one final status at its business.
    #[arg(long, requires = "platform_token")]
    deliver: bool,
    /// Devices (recipients) of the run: uniform recipients over N numbers, one device
    /// each (sets --recipients uniform --population N).
    #[arg(long, conflicts_with_all = ["population", "recipients"])]
    devices: Option<u64>,
    /// Share of devices offline at any moment (0..=0.95); each is offline for that share
    /// of every --offline-period at its own phase, and the edge says ONLINE when it is back.
    #[arg(long, default_value_t = 0.0, requires = "deliver")]
    offline_share: f64,
    /// Length of a device's online/offline cycle, seconds.
    #[arg(long, default_value_t = 5.0, requires = "deliver")]
    offline_period: f64,
    /// Share of recipients not on the platform: their messages fail (not_on_platform).
    #[arg(long, default_value_t = 0.0, requires = "deliver")]
    fail_rate: f64,
    /// Share of delivered messages also read (reported `read` 50 ms after `delivered`).
    #[arg(long, default_value_t = 0.0, requires = "deliver")]
    read_rate: f64,
    /// Share of delivered messages whose recipient replies (INBOUND to its business).
    #[arg(long, default_value_t = 0.0, requires = "deliver")]
    reply_rate: f64,
    /// Edge connections. The relay places connections evenly over its shards and a
    /// shard delivers through an edge connection it holds itself when there is one: as
    /// many as the relay has shards keeps every DELIVER on its own shard.
    #[arg(long, default_value_t = 1, requires = "deliver")]
    edge_connections: usize,
    /// DELIVERs each edge connection takes ahead (its credit window).
    #[arg(long, default_value_t = 4096, requires = "deliver")]
    edge_window: u32,
    /// Longest wait after sending for the last statuses and replies, seconds.
    #[arg(long, default_value_t = 30.0, requires = "deliver")]
    settle: f64,
    /// Messages live this many seconds (SUBMIT_TTL); then they are `expired`. Default:
    /// the relay's own time to live (plain SUBMIT).
    #[arg(long)]
    ttl: Option<u32>,
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

/// The simulated edge of `--deliver`.
fn delivery_plan(args: &Args) -> anyhow::Result<Option<DeliveryPlan>> {
    if !args.deliver {
        return Ok(None);
    }
    let plan = DeliveryPlan {
        edge_token: args
            .platform_token
            .clone()
            .context("--deliver needs --platform-token (or COURIER_PLATFORM_TOKEN)")?,
        connections: args.edge_connections,
        window: args.edge_window,
        devices: DeviceModel {
            seed: args.seed,
            offline_share: args.offline_share,
            period_secs: args.offline_period,
            fail_rate: args.fail_rate,
            read_rate: args.read_rate,
            reply_rate: args.reply_rate,
        },
        settle: Duration::try_from_secs_f64(args.settle)
            .ok()
            .filter(|d| *d <= Duration::from_secs(3600))
            .context("--settle must be in 0..=3600 seconds")?,
    };
    plan.check()
        .map_err(|e| anyhow::anyhow!("--deliver: {e}"))?;
    Ok(Some(plan))
}

fn parse_recipients(s: &str, population: Option<u64>) -> anyhow::Result<RecipientSpec> {
    let spec = match s {
        "uniform" => RecipientSpec::Uniform {
            population: population.unwrap_or(load::traffic::POPULATION_MAX),
        },
        "new" => RecipientSpec::New,
        _ => match s.strip_prefix("zipf:") {
            Some(exp) => RecipientSpec::Zipf {
                s: exp
                    .parse()
                    .with_context(|| format!("--recipients {s}: bad exponent"))?,
                population: population.unwrap_or(100_000),
            },
            None => bail!("--recipients must be uniform, zipf:S or new"),
        },
    };
    spec.check()
        .map_err(|e| anyhow::anyhow!("--recipients: {e}"))?;
    Ok(spec)
}

/// The plan: the scenario file, or one sender made of the flags.
fn plan(args: &Args) -> anyhow::Result<Plan> {
    let size = SizeSpec::parse(&args.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    let recipients = match args.devices {
        Some(n) => parse_recipients("uniform", Some(n))?,
        None => parse_recipients(&args.recipients, args.population)?,
    };
    let plan = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let defaults = Defaults {
                connections: args.connections,
                batch: args.batch,
                size,
                recipients,
            };
            let p = Plan::from_toml(&text, &defaults)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                .scaled(args.time_scale, args.rate_scale);
            match args.duration {
                Some(d) => p.with_duration(d),
                None => p,
            }
        }
        None => {
            let duration = args.duration.unwrap_or(10.0);
            let rate = args.rate.unwrap_or(0.0);
            if args.rate.is_some() && rate <= 0.0 {
                bail!("--rate must be positive (use --max for full speed)");
            }
            Plan {
                duration_secs: duration,
                senders: vec![SenderPlan {
                    name: "sender-0".into(),
                    label: Label::Normal,
                    token: TokenSource::Index(0),
                    rate,
                    rate_from: rate,
                    start_secs: 0.0,
                    stop_secs: duration,
                    connections: args.connections,
                    batch: args.batch,
                    size,
                    recipients,
                    reports_per_sec: 0.0,
                    retry_rounds: 0,
                }],
            }
        }
    };
    plan.check().map_err(|e| anyhow::anyhow!(e))?;
    Ok(plan)
}

/// Whether the generator's CPU time says its worker threads were nearly always busy.
fn cpu_bound(generator_secs: f64, duration_secs: f64, threads: usize) -> bool {
    duration_secs > 0.0 && generator_secs >= CPU_BOUND_SHARE * duration_secs * threads as f64
}

/// Share of its threads' time past which the generator counts as CPU-bound.
const CPU_BOUND_SHARE: f64 = 0.9;

/// Connections of the whole plan (worker threads beyond that would idle).
fn plan_connections(plan: &Plan) -> usize {
    plan.senders
        .iter()
        .map(|s| s.connections)
        .sum::<usize>()
        .max(1)
}

fn read_report(path: &Path) -> anyhow::Result<LoadReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

type AcceptedTx = tokio::sync::mpsc::Sender<Vec<AcceptedRecord>>;
/// The writer thread; it returns the lines written.
type AcceptedWriter = std::thread::JoinHandle<std::io::Result<u64>>;

/// Writes accepted messages as CSV on a thread of its own; the channel is bounded, so a
/// slow disk slows the generator instead of growing its memory.
fn accepted_writer(path: &Path) -> anyhow::Result<(AcceptedTx, AcceptedWriter)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<AcceptedRecord>>(1024);
    let handle = std::thread::Builder::new()
        .name("loadgen-accepted".into())
        .spawn(move || -> std::io::Result<u64> {
            let mut w = std::io::BufWriter::new(file);
            writeln!(w, "business_id,client_id,log_position")?;
            let mut n = 0;
            while let Some(batch) = rx.blocking_recv() {
                for r in batch {
                    writeln!(w, "{},{},{}", r.business_id, r.client_id, r.log_position)?;
                    n += 1;
                }
            }
            w.flush()?;
            Ok(n)
        })
        .context("starting the accepted-file writer")?;
    Ok((tx, handle))
}

/// The progress line, out of the run's seconds; `None` when it would not be drawn.
fn progress(quiet: bool, duration_secs: f64) -> Option<Arc<ProgressLine>> {
    let bar = ProgressLine::new(duration_secs.ceil() as u64, "s", quiet);
    (!bar.is_hidden()).then(|| Arc::new(bar))
}

/// Writes the SVG report (the `plot` feature draws it).
#[cfg(feature = "plot")]
fn write_plot(report: &LoadReport, path: &Path) -> anyhow::Result<()> {
    Ok(load::plot::write_svg(report, path)?)
}

/// Without the `plot` feature there is nothing to draw with.
#[cfg(not(feature = "plot"))]
fn write_plot(_: &LoadReport, path: &Path) -> anyhow::Result<()> {
    bail!(
        "{}: this courier-loadgen was built without the `plot` feature",
        path.display()
    )
}

fn main() -> anyhow::Result<()> {
    // No transparent huge pages for the generator's memory (its tracking tables grow all
    // run long): a first touch of a huge page zeroes 2 MiB in one fault, a stall of
    // milliseconds that sends messages late and lengthens the latency measured
    // (BENCHMARKS.md, "Transparent huge pages off"). `courier serve` does the same
    // unless its profile says `io.transparent_huge_pages = true`.
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("courier-loadgen: could not turn transparent huge pages off: {e}");
    }
    let args = Args::parse();
    if let Some(files) = &args.compare {
        let a = read_report(&files[0])?;
        let b = read_report(&files[1])?;
        println!("A = {}\nB = {}", files[0].display(), files[1].display());
        load::report::compare(&a, &b, &mut std::io::stdout().lock())?;
        return Ok(());
    }
    if let Some(path) = &args.from_json {
        let report = read_report(path)?;
        report.print_table(&mut std::io::stdout().lock())?;
        if let Some(svg) = &args.plot {
            write_plot(&report, svg)?;
        }
        return Ok(());
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.duplicate_rate) {
        bail!("--duplicate-rate must be in 0..=1");
    }
    if args.token.is_empty() && !args.dry_run {
        bail!("give a token with --token or COURIER_TOKEN");
    }
    let (target, trust) = if args.dry_run {
        (
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerTrust::InsecureLoopback,
        )
    } else {
        let target = resolve(args.target.as_deref().expect("required unless --compare"))?;
        let trust = match choose_trust(
            target.ip().is_loopback(),
            args.ca.is_some(),
            args.allow_remote,
        )? {
            TrustChoice::Pinned => read_pinned(args.ca.as_deref().expect("--ca given"))?,
            TrustChoice::InsecureLoopback => ServerTrust::InsecureLoopback,
        };
        (target, trust)
    };
    let plan = plan(&args)?;
    let delivery = delivery_plan(&args)?;
    let (accepted_tx, writer) = match &args.accepted {
        Some(path) => {
            let (tx, h) = accepted_writer(path)?;
            (Some(tx), Some(h))
        }
        None => (None, None),
    };
    let bar = progress(args.quiet, plan.duration_secs);
    let on_second: Option<load::engine::OnSecond> = bar.clone().map(|bar| {
        let f: load::engine::OnSecond = Arc::new(move |s, (sent, accepted, errors)| {
            bar.set(s.t_secs.floor() as u64, || {
                format!(
                    "{} msgs/s sent, {} acked; total {sent} sent, {accepted} accepted, {errors} errors; p99 {:.2} ms",
                    s.sent,
                    s.accepted + s.not_accepted,
                    s.p99_us as f64 / 1e3
                )
            });
        });
        f
    });
    let stop = StopSignal::default();
    // Connections (and their quinn drivers) are spread over worker threads, each with a
    // runtime of its own; the main thread only drives the run and prints progress.
    let threads = args.threads.min(plan_connections(&plan));
    let workers = load::Workers::start(threads, "loadgen-worker")
        .context("starting the generator's worker threads")?;
    let cfg = RunConfig {
        target,
        tokens: args.token.clone(),
        platform_token: args.platform_token.clone(),
        trust,
        streams_per_connection: args.streams,
        batches_in_flight_per_stream: args.in_flight,
        plan: plan.clone(),
        options: RunOptions {
            count: args.count,
            duplicate_rate: args.duplicate_rate,
            backlog_secs_max: args.backlog_secs,
            in_flight: args.streams * args.in_flight,
            seed: args.seed,
            accepted: accepted_tx,
            on_second,
            stop: stop.clone(),
            cpu: Meter::new(match args.server_pid {
                Some(pid) => ServerCpu::Pid(pid),
                None => ServerCpu::InProcess,
            }),
            drain_timeout: load::DRAIN_TIMEOUT,
            reporter: None,
            workers: workers.handles().to_vec(),
            ttl_secs: args.ttl.unwrap_or(0),
            tracker: None,
        },
        delivery,
    };
    eprintln!(
        "courier-loadgen: {} for {:.1}s: {} sender(s), {}; {} streams x {} in flight per connection",
        if args.dry_run { "dry run (no server)".to_string() } else { cfg.target.to_string() },
        plan.duration_secs,
        plan.senders.len(),
        match (&args.scenario, args.rate) {
            (Some(p), _) => format!("scenario {}", p.display()),
            (None, Some(r)) => format!("open loop at {r} msgs/s, {} connections, batch {}, size {}", args.connections, args.batch, args.size),
            (None, None) => format!("closed loop at full speed, {} connections, batch {}, size {}", args.connections, args.batch, args.size),
        },
        args.streams,
        args.in_flight
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let dry_run = args.dry_run;
    let report = runtime.block_on(async {
        let stopper = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ncourier-loadgen: stopping; waiting for outstanding ACKs (Ctrl-C again to quit at once)");
                stopper.stop();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let cfg = cfg;
        if dry_run {
            load::run_plan_dry(&cfg.plan, &cfg.options).await
        } else {
            load::run_plan(&cfg).await
        }
    });
    // The run's options (and with them the accepted channel) are gone; stopping the
    // runtime ends the Ctrl-C task and anything still holding a sender.
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(workers);
    if let Some(bar) = &bar {
        bar.finish();
    }
    let report = report?;
    report.print_table(&mut std::io::stdout().lock())?;
    if cpu_bound(report.cpu.generator_secs, report.duration_secs, threads) {
        eprintln!(
            "courier-loadgen: warning: the generator used {:.1} s of CPU in {:.1} s on {threads} \
             worker thread(s), so it may have been the bottleneck; try --threads {}",
            report.cpu.generator_secs,
            report.duration_secs,
            threads + 1
        );
    }
    if let Some(h) = writer {
        let n = h
            .join()
            .map_err(|_| anyhow::anyhow!("the accepted-file writer panicked"))?
            .context("writing the accepted file")?;
        eprintln!("accepted file: {n} lines");
    }
    if let Some(path) = &args.json {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        write_plot(&report, path)?;
    }
    if let Some(d) = &report.delivery {
        if !d.passed() {
            eprintln!(
                "courier-loadgen: delivery check FAILED: {} accepted message(s) without a final \
                 status after {:.1} s, {} extra final status(es), {} out of order, {} reply(ies) \
                 heard by the wrong business{}",
                d.unresolved,
                d.settle_secs,
                d.extra_finals,
                d.order_violations,
                d.inbound_misrouted,
                d.e2e.as_ref().map_or(String::new(), |e| format!(
                    "; e2e: {} message(s) did not open on their devices, {} with the wrong \
                     content, {} opened on another device",
                    e.open_failures, e.content_mismatch, e.cross_device_opened
                ))
            );
            std::process::exit(1);
        }
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
    fn args_parse_with_defaults_and_v1_commands_stay_closed_loop() {
        let a = Args::try_parse_from([
            "courier-loadgen",
            "--target",
            "127.0.0.1:4433",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(
            (a.connections, a.batch, a.duration, a.threads),
            (4, 64, None, 1)
        );
        assert!(!a.allow_remote && a.ca.is_none() && a.json.is_none());
        let p = plan(&a).unwrap();
        assert_eq!(p.duration_secs, 10.0);
        assert!(p.senders[0].closed_loop());
        assert_eq!(p.senders[0].size, SizeSpec::Fixed(1024));
        let a = Args::try_parse_from([
            "courier-loadgen",
            "--target",
            "[::1]:1",
            "--token",
            "a,b",
            "--in-flight",
            "3",
            "--streams",
            "5",
            "--rate",
            "1000",
            "--size",
            "100-200",
            "--recipients",
            "zipf:1.1",
        ])
        .unwrap();
        assert_eq!((a.in_flight, a.streams), (3, 5));
        assert_eq!(a.token, vec!["a".to_string(), "b".to_string()]);
        assert!(resolve(a.target.as_deref().unwrap())
            .unwrap()
            .ip()
            .is_loopback());
        let p = plan(&a).unwrap();
        assert_eq!(p.senders[0].rate, 1000.0);
        assert!(!p.senders[0].closed_loop());
        assert!(
            Args::try_parse_from(["courier-loadgen", "--target", "x", "--rate", "5", "--max"])
                .is_err()
        );
        assert!(Args::try_parse_from(["courier-loadgen", "--compare", "a.json", "b.json"]).is_ok());
    }

    #[test]
    fn a_generator_busy_on_all_its_threads_counts_as_cpu_bound() {
        assert!(cpu_bound(9.5, 10.0, 1));
        assert!(!cpu_bound(5.0, 10.0, 1));
        assert!(!cpu_bound(9.5, 10.0, 2));
        assert!(cpu_bound(18.5, 10.0, 2));
        assert!(!cpu_bound(1.0, 0.0, 1), "an empty run says nothing");
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

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let a = Args::try_parse_from([
                "courier-loadgen",
                "--target",
                "127.0.0.1:1",
                "--token",
                "t",
                "--scenario",
                path.to_str().unwrap(),
            ])
            .unwrap();
            plan(&a).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert_eq!(n, 7);
    }
}
