//! `courier demo`: a server on the built-in default profile in a temporary directory,
//! driven for a few seconds by the load generator's engine (`courier_loadgen`): a bulk
//! sender exempt from detection and an abusive business that blasts new numbers; then
//! the load report, what the detector did and each business's status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use courier::serve::{self, ServeOptions};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
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

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    use courier_loadgen::traffic::{RecipientSpec, SizeSpec, POPULATION_MAX};
    use courier_loadgen::{Label, Plan, RunConfig, RunOptions, SenderPlan, TokenSource};

    let dir = tempfile_dir()?;
    let mut profile = Profile::default_profile();
    profile.listen = "127.0.0.1:0".parse().expect("literal address");
    // A demo next to a running server must not take its metrics port: an ephemeral one.
    profile.metrics_listen = Some("127.0.0.1:0".parse().expect("literal address"));
    // No delivery edge runs in the demo: with delivery on, the messages would wait for
    // one until delivery's memory bounds filled (within about two seconds at the bulk
    // sender's rate) and every batch after would be throttled, which the report would
    // count against the detector. `courier-loadgen --deliver` runs an edge.
    profile.delivery.enabled = false;
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
        region: None,
    })?;
    let addr = running.local_addr();
    let metrics = running.metrics_addr();
    println!(
        "courier demo: serving on {addr} with {} shard(s) (built-in default profile, \
         delivery off: no delivery edge runs in the demo); \
         {} connection(s) sending {}-byte messages in batches of {} for {} s",
        running.shards(),
        args.connections,
        args.size,
        args.batch,
        args.seconds
    );
    let seconds = args.seconds as f64;
    // The abusive sender starts after a quiet second (sooner in a very short demo) and
    // messages never-contacted numbers at half its messages-per-second limit, so what
    // stops it is the fan-out surge check, not its rate.
    let onset_secs = DEMO_ABUSE_ONSET_SECS.min(seconds * 0.2);
    let plan = Plan {
        duration_secs: seconds,
        senders: vec![
            SenderPlan {
                name: "bulk".into(),
                label: Label::Normal,
                token: TokenSource::Index(0),
                rate: 0.0,
                rate_from: 0.0,
                start_secs: 0.0,
                stop_secs: seconds,
                connections: args.connections,
                batch: args.batch,
                size: SizeSpec::Fixed(args.size),
                recipients: RecipientSpec::Uniform {
                    population: POPULATION_MAX,
                },
                reports_per_sec: 0.0,
                retry_rounds: 0,
            },
            SenderPlan {
                name: "abusive".into(),
                label: Label::Abusive,
                token: TokenSource::Index(1),
                rate: DEMO_ABUSE_RATE,
                rate_from: DEMO_ABUSE_RATE,
                start_secs: onset_secs,
                stop_secs: seconds,
                connections: 1,
                batch: 50,
                size: SizeSpec::Fixed(DEMO_ABUSE_PAYLOAD_BYTES),
                recipients: RecipientSpec::New,
                reports_per_sec: 0.0,
                retry_rounds: 0,
            },
        ],
    };
    let cfg = RunConfig {
        target: addr,
        tokens: vec![token, abusive_token],
        platform_token: None,
        trust: courier_client::ServerTrust::Pinned(running.certificate().clone()),
        streams_per_connection: args.streams,
        batches_in_flight_per_stream: args.in_flight,
        plan,
        options: RunOptions {
            in_flight: args.streams * args.in_flight,
            ..RunOptions::default()
        },
        delivery: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = rt.block_on(courier_loadgen::run_plan(&cfg));
    rt.shutdown_timeout(Duration::from_secs(1));
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
        "server: {} messages accepted (durable: written and synced) in {} batches over {hellos} \
         authenticated connection(s), {} group commits, {} datagrams forwarded between shards",
        totals.accepted, totals.batches, totals.commits, totals.forwarded
    );
    if let Some(bulk) = report.senders.iter().find(|s| s.label == Label::Normal) {
        let l = &bulk.latency_us;
        println!(
            "bulk sender: business {id}, {} accepted, ack latency p50 {:.2} ms, p99 {:.2} ms, \
             p99.9 {:.2} ms",
            bulk.accepted,
            l.p50 as f64 / 1e3,
            l.p99 as f64 / 1e3,
            l.p999 as f64 / 1e3
        );
    }
    if let Some(b) = report.senders.iter().find(|s| s.label == Label::Abusive) {
        let paused = b
            .rejected_by_reason
            .get("sender_paused")
            .copied()
            .unwrap_or(0);
        println!(
            "detector: business {abusive_id} (\"demo abusive sender\") blasted new numbers from \
             {onset_secs:.1} s on: {} accepted, {paused} rejected as sender_paused, {} other \
             rejections, {} throttled{}",
            b.accepted,
            b.rejected - paused,
            b.throttled,
            b.first_flag_after_onset_secs
                .map(|t| format!("; first flagged {:.0} ms after its onset", t * 1e3))
                .unwrap_or_else(|| "; never flagged".to_string())
        );
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

/// When the demo's abusive sender starts, seconds into the run (at most).
pub(crate) const DEMO_ABUSE_ONSET_SECS: f64 = 1.0;
/// Its rate, messages per second: half its registered `mps`, every one to a new number.
pub(crate) const DEMO_ABUSE_RATE: f64 = 500.0;
/// Its payload size, bytes (a short marketing text).
pub(crate) const DEMO_ABUSE_PAYLOAD_BYTES: usize = 18;

pub(crate) fn tempfile_dir() -> Result<PathBuf> {
    let mut rnd = [0u8; 8];
    rand::fill(&mut rnd[..]);
    let dir = std::env::temp_dir().join(format!("courier-demo-{}", hex::encode(rnd)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
