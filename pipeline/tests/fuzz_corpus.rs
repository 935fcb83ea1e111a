//! Replays every committed fuzz input through its target's body (`courier_pipeline::fuzzing`),
//! on stable, in `cargo test`: the corpus of each target (`fuzz/corpus/<target>/`) and the
//! inputs that once found a bug (`fuzz/regressions/<target>/`, each named after the bug).
//! A body panics on a broken property, so a regression fails here as it did in the fuzzer.
//!
//! `COURIER_FUZZ_WRITE_SEEDS=1 cargo test -p courier-pipeline --test fuzz_corpus` (re)writes
//! the seed inputs the real encoders make into the corpus directories.

use std::path::{Path, PathBuf};

use courier_pipeline::fuzzing;

const TARGETS: [&str; 7] = [
    "wire",
    "segment",
    "keyring",
    "checkpoint",
    "profile",
    "registry",
    "e2e",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("a readable corpus file");
            (p, bytes)
        })
        .collect()
}

fn replay(target: &str, dir: &str) -> usize {
    let body = fuzzing::target(target).expect("a known target");
    let files = inputs(&fuzz_dir().join(dir).join(target));
    for (path, bytes) in &files {
        // The file name says which input broke, should one panic.
        eprintln!("{target}: {}", path.display());
        body(bytes);
    }
    files.len()
}

#[test]
fn every_target_passes_its_committed_corpus() {
    if std::env::var_os("COURIER_FUZZ_WRITE_SEEDS").is_some() {
        for (target, name, bytes) in fuzzing::seeds() {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).expect("corpus directory");
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
        }
    }
    for target in TARGETS {
        let n = replay(target, "corpus");
        assert!(n > 0, "fuzz/corpus/{target} holds no input");
    }
}

#[test]
fn every_past_finding_stays_fixed() {
    for target in TARGETS {
        replay(target, "regressions");
    }
}

#[test]
fn every_seed_passes_its_target() {
    let seeds = fuzzing::seeds();
    for target in TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| *t == target),
            "{target} has seeds"
        );
    }
    for (target, _name, bytes) in seeds {
        fuzzing::target(target).expect("a known target")(&bytes);
    }
}
