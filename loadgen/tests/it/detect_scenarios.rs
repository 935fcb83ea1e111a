//! The scenarios of issue 14 (`loadgen/scenarios/retry-after.toml` and
//! `large-sender.toml`) run by the load generator's engine, as `courier-loadgen
//! --scenario` runs them, against a real server (in process, `tuning/small.toml` with two
//! shards): they score precision 1 and recall 1. The rest of issue 14's real-server
//! tests are the root package's (`tests/it/detect_quality.rs`).

use std::path::Path;
use std::time::Duration;

use courier::serve::Running;
use courier_client::ServerTrust;
use courier_loadgen::scenario::Defaults;
use courier_loadgen::traffic::{RecipientSpec, SizeSpec};
use courier_loadgen::{LoadReport, Plan, RunConfig, RunOptions};
use courier_pipeline::registry::{Registry, Tier};
use courier_testkit::server::{self, Setup};

fn business(registry: &mut Registry, name: &str, tier: Tier, mps: u32, seed: u8) -> (u32, String) {
    registry.add(name, tier, mps, &[seed; 32]).unwrap()
}

fn start(dir: &Path, registry: Registry) -> Running {
    server::start(dir, Setup::new(2, registry))
}

/// Runs a shipped scenario, at `time` of its length, with the load generator's engine
/// (what `courier-loadgen --scenario` does) against `server`.
fn run_scenario(server: &Running, name: &str, time: f64, tokens: Vec<String>) -> LoadReport {
    let path = format!("{}/scenarios/{name}", env!("CARGO_MANIFEST_DIR"));
    let defaults = Defaults {
        connections: 1,
        batch: 32,
        size: SizeSpec::Fixed(200),
        recipients: RecipientSpec::New,
    };
    let plan = Plan::from_toml(&std::fs::read_to_string(path).unwrap(), &defaults)
        .unwrap()
        .scaled(time, 1.0);
    let cfg = RunConfig {
        target: server.local_addr(),
        tokens,
        platform_token: None,
        trust: ServerTrust::Pinned(server.certificate().clone()),
        streams_per_connection: 4,
        batches_in_flight_per_stream: 4,
        plan,
        options: RunOptions::default(),
        delivery: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), courier_loadgen::run_plan(&cfg))
            .await
            .expect("the run ended")
            .unwrap()
    })
}

/// The issue's scenarios as the load generator runs them against a real server, each
/// at half its length, businesses registered as the scenario headers say.
#[test]
fn the_loadgen_scenarios_of_issue_14_score_precision_and_recall_1() {
    // retry-after.toml: business 0 at 10 msg/s, 1 and 2 at 100.
    let mut registry = Registry::default();
    let tokens = [10, 100, 100]
        .iter()
        .enumerate()
        .map(|(i, &mps)| {
            business(
                &mut registry,
                &format!("b{i}"),
                Tier::T10k,
                mps,
                20 + i as u8,
            )
            .1
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), registry);
    let r = run_scenario(&server, "retry-after.toml", 0.5, tokens);
    for s in &r.senders {
        eprintln!(
            "retry-after {}: sent {} accepted {} throttled {} rejected {} flag after {:?}",
            s.name, s.sent, s.accepted, s.throttled, s.rejected, s.first_flag_after_onset_secs
        );
    }
    let d = &r.detection;
    assert_eq!(
        (d.abusive, d.true_positives, d.false_positives),
        (1, 1, 0),
        "{d:?}"
    );
    assert!(
        r.senders
            .iter()
            .filter(|s| s.name.starts_with("customer"))
            .all(|s| s.sent > 0 && s.accepted == s.sent),
        "every customer message accepted in the end"
    );
    server.shutdown();
    server.join().unwrap();

    // large-sender.toml: one business, declared 60,000 a minute.
    let mut registry = Registry::default();
    let (id, token) = business(&mut registry, "large", Tier::Unlimited, 100_000, 30);
    assert!(registry.set_baseline(id, 60_000));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), registry);
    let r = run_scenario(&server, "large-sender.toml", 0.5, vec![token]);
    for s in &r.senders {
        eprintln!(
            "large-sender {}: sent {} accepted {} throttled {} rejected {} flag after {:?}",
            s.name, s.sent, s.accepted, s.throttled, s.rejected, s.first_flag_after_onset_secs
        );
    }
    let d = &r.detection;
    assert_eq!((d.precision, d.recall), (Some(1.0), Some(1.0)), "{d:?}");
    let t = d.median_time_to_flag_secs.unwrap();
    assert!(t < 2.0, "the jump was flagged {t} s after its onset");
    let steady = r.senders.iter().find(|s| s.name == "steady").unwrap();
    assert_eq!((steady.throttled, steady.rejected), (0, 0));
    server.shutdown();
    server.join().unwrap();
}
