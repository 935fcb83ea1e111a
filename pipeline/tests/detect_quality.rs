//! The labelled detection benchmark of issue 14, short: every behaviour of the model
//! (`detect_model`) over a few seeds at `Depth::Quick`, with the acceptance bounds of the
//! full benchmark (`cargo bench --bench detect_quality`, at least 20 seeds):
//! no normal behaviour paused or rejected, every abusive one flagged, median time to
//! flag under 1 s per abusive behaviour, a large sender's 10x jump within 2 s, and a
//! large sender at its declared baseline never throttled.

mod detect_model;

use courier_pipeline::detect::DetectConfig;
use detect_model::{precision_recall, rows, run, table, Behaviour, Depth, Label, Outcome};

const SEEDS: u64 = 3;

fn outcomes(behaviours: &[Behaviour]) -> Vec<Outcome> {
    let cfg = DetectConfig::default();
    let mut v = Vec::new();
    for &b in behaviours {
        for seed in 1..=SEEDS {
            v.push(run(b, seed, Depth::Quick, &cfg));
        }
    }
    v
}

fn check(outcomes: &[Outcome]) {
    eprintln!("{}", table(outcomes));
    for o in outcomes {
        match o.behaviour.label() {
            Label::Normal => assert!(
                !o.flagged,
                "{} (seed {}, {}) was paused or rejected: {o:?}",
                o.behaviour.name(),
                o.seed,
                o.params
            ),
            Label::Abusive => assert!(
                o.flagged,
                "{} (seed {}, {}) was not flagged: {o:?}",
                o.behaviour.name(),
                o.seed,
                o.params
            ),
        }
    }
    for r in rows(outcomes) {
        if r.behaviour.label() == Label::Abusive {
            let median = r.median_ms().expect("flagged runs");
            assert!(median < 1_000, "{}: median {median} ms", r.behaviour.name());
        }
        if r.behaviour == Behaviour::LargeJump {
            let max = r.max_ms().expect("flagged runs");
            assert!(max < 2_000, "large sender's jump flagged after {max} ms");
        }
    }
}

#[test]
fn normal_behaviours_are_never_paused_or_rejected() {
    let normal: Vec<Behaviour> = Behaviour::ALL
        .into_iter()
        .filter(|b| b.label() == Label::Normal)
        .collect();
    let o = outcomes(&normal);
    check(&o);
    for o in o.iter().filter(|o| o.behaviour == Behaviour::LargeDeclared) {
        assert_eq!(
            o.throttled, 0,
            "a large sender at its declared baseline is never throttled ({})",
            o.params
        );
    }
}

#[test]
fn abusive_behaviours_are_flagged_in_time() {
    let abusive: Vec<Behaviour> = Behaviour::ALL
        .into_iter()
        .filter(|b| b.label() == Label::Abusive)
        .collect();
    let o = outcomes(&abusive);
    check(&o);
    assert_eq!(precision_recall(&o).1, 1.0);
}
