//! Targets `checkpoint` (detector checkpoints), `profile` (profile TOML and its
//! environment overrides) and `registry` (the businesses file).

use crate::detect::{BusinessLimits, DetectConfig, Detector};
use crate::profile::Profile;
use crate::registry::{Registry, Tier};
use crate::wire::Recipient;

const SECRET: [u8; 16] = *b"fuzzing secret..";

fn detector() -> Detector {
    Detector::new(DetectConfig::default(), SECRET)
}

/// `data[0]` bit 0 set: the trailing CRC is recomputed. The rest is a checkpoint; one that
/// restores checkpoints again to bytes that restore to the same bytes, and takes a few
/// messages of each restored business; a failed restore leaves the detector as it was.
pub fn checkpoint(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if ctl & 1 != 0 {
        super::fix_trailing_crc(&mut bytes);
    }
    let mut d = detector();
    let before = d.checkpoint();
    match d.restore(&bytes) {
        Ok(()) => {
            // A restored detector meets traffic: a shard observes right after a restore
            // (the seeds hold businesses 1 and 2).
            for id in 1..=3 {
                for i in 0..3u64 {
                    d.observe(NOW_MS + i * 61_000, &limits(id), &num(i));
                }
            }
            let _ = d.checkpoint();
            let mut d = detector();
            d.restore(&bytes).expect("restored once, restores again");
            let once = d.checkpoint();
            let mut again = detector();
            again
                .restore(&once)
                .expect("a restored detector's checkpoint restores");
            assert!(
                again.checkpoint() == once,
                "checkpoint(restore(checkpoint)) is stable"
            );
        }
        Err(_) => assert!(d.checkpoint() == before, "a failed restore changes nothing"),
    }
}

/// The input up to the first NUL is profile TOML; after it, `NAME=value` lines are the
/// environment. A profile that loads is valid: loading it again with no environment
/// overrides applied twice gives the same profile.
pub fn profile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(&str, &str)> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let _ = Profile::from_toml(toml);
    if let Ok((p, applied)) = Profile::from_toml_with_env(toml, env.iter().copied()) {
        assert!(
            applied.len() <= env.len(),
            "at most one override per variable"
        );
        if env.is_empty() {
            assert!(
                Profile::from_toml(toml).as_ref() == Ok(&p),
                "no environment: the same profile"
            );
        }
    }
}

/// The input is registry TOML; a registry that loads writes TOML that loads to a
/// registry writing the same TOML.
pub fn registry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(reg) = Registry::from_toml(text) else {
        return;
    };
    let written = reg.to_toml();
    let back = Registry::from_toml(&written).expect("a written registry loads");
    assert_eq!(back.len(), reg.len(), "every business is written");
    assert!(
        back.to_toml() == written,
        "to_toml(from_toml(to_toml)) is stable"
    );
    for b in reg.iter() {
        assert!(
            back.get(b.id).is_some_and(|c| c == b),
            "each business reads back"
        );
    }
}

/// A time near the seeds' (late 2023), in unix ms.
const NOW_MS: u64 = 1_700_000_100_000;

fn limits(id: u32) -> BusinessLimits {
    BusinessLimits {
        id,
        tier: Tier::T2k,
        mps: 100,
        exempt: false,
        baseline_per_min: 0,
    }
}

fn num(i: u64) -> Recipient {
    Recipient::parse(format!("+1555{i:07}").as_bytes()).expect("valid")
}

pub(super) fn checkpoint_seeds() -> Vec<(String, Vec<u8>)> {
    let mut d = detector();
    let empty = d.checkpoint();
    let mut t = 1_700_000_000_000u64;
    for i in 0..40 {
        t += 250;
        d.observe(t, &limits(1), &num(i));
        d.observe(t, &limits(2), &num(i % 3));
    }
    let two = d.checkpoint();
    let mut seeds = Vec::new();
    for (name, bytes) in [("empty", empty), ("two-businesses", two)] {
        let mut input = vec![0];
        input.extend_from_slice(&bytes);
        seeds.push((name.to_string(), input));
    }
    seeds
}

pub(super) fn profile_seeds() -> Vec<(String, Vec<u8>)> {
    let small = include_str!("../../../tuning/small.toml");
    vec![
        ("small".to_string(), small.as_bytes().to_vec()),
        (
            "small-with-env".to_string(),
            format!("{small}\0COURIER_LIMITS__PAYLOAD_BYTES_MAX=2048\nCOURIER_LOG__RETENTION_SECS=3600\n")
                .into_bytes(),
        ),
        (
            "minimal-broken".to_string(),
            b"[limits]\npayload_bytes_max = 0\n".to_vec(),
        ),
    ]
}

pub(super) fn registry_seeds() -> Vec<(String, Vec<u8>)> {
    let mut reg = Registry::default();
    reg.add("Acme", Tier::T10k, 500, &[1; 32]).expect("adds");
    reg.add("Platform", Tier::Unlimited, 10_000, &[2; 32])
        .expect("adds");
    reg.set_platform(2, true);
    reg.set_exempt(1, true);
    reg.set_baseline(1, 40);
    vec![
        ("two-businesses".to_string(), reg.to_toml().into_bytes()),
        ("empty".to_string(), Vec::new()),
    ]
}
