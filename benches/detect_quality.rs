//! The labelled detection benchmark of issue 14 (not a speed benchmark): every behaviour
//! of the seeded traffic model in `pipeline/tests/detect_model` (normal ones that must
//! never be paused or rejected, abusive ones that must be flagged) over `SEEDS` seeds
//! (default 25) at full length, on the default profile's detector. Prints, per
//! behaviour, the runs flagged, paused and rejected, throttled answers per admitted
//! message, and the median and largest time to flag; then precision and recall over
//! all runs, and whether the acceptance of issue 14 holds. Any run whose outcome is not
//! its label's is printed with its seed and parameters, so it can be replayed.
//!
//! Run: `cargo bench --bench detect_quality` (or `SEEDS=100 cargo bench --bench
//! detect_quality`). The model's time is virtual: the figures do not depend on the
//! machine.

#[path = "../pipeline/tests/detect_model/mod.rs"]
mod detect_model;

use courier_pipeline::detect::DetectConfig;
use detect_model::{precision_recall, rows, run, table, Behaviour, Depth, Label};

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let seeds: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    assert!(seeds >= 1);
    let cfg = DetectConfig::default();
    let mut outcomes = Vec::new();
    for b in Behaviour::ALL {
        for seed in 1..=seeds {
            let o = run(b, seed, Depth::Full, &cfg);
            if o.flagged != (b.label() == Label::Abusive) {
                println!(
                    "{} seed {seed} ({}): {}",
                    b.name(),
                    o.params,
                    if o.flagged { "flagged" } else { "not flagged" }
                );
            }
            outcomes.push(o);
        }
    }
    println!("detect_quality: {seeds} seeds per behaviour, default profile\n");
    println!("{}", table(&outcomes));
    if let Some(e) = outcomes
        .iter()
        .find(|o| o.behaviour == Behaviour::LargeJump)
        .and_then(|o| o.evidence.clone())
    {
        println!("a large sender's jump, as its pause explains it: {e}");
    }
    let (precision, recall) = precision_recall(&outcomes);
    let mut met = precision == 1.0 && recall == 1.0;
    for r in rows(&outcomes) {
        if r.behaviour.label() == Label::Abusive {
            met &= r.median_ms().is_some_and(|m| m < 1_000);
        }
        if r.behaviour == Behaviour::LargeJump {
            met &= r.max_ms().is_some_and(|m| m < 2_000);
        }
    }
    let large_throttled: u64 = outcomes
        .iter()
        .filter(|o| o.behaviour == Behaviour::LargeDeclared)
        .map(|o| o.throttled)
        .sum();
    met &= large_throttled == 0;
    println!("large senders at their declared baselines: {large_throttled} messages throttled");
    println!(
        "acceptance (precision 1, recall 1, median time to flag < 1 s per abusive \
         behaviour, 10x jump < 2 s, no throttling at a declared baseline): {}",
        if met { "met" } else { "NOT met" }
    );
}
