//! Replays the committed inputs of the `send_line` fuzz target (`fuzz/corpus/send_line/`
//! and the past findings in `fuzz/regressions/send_line/`) through its body, on stable, in
//! `cargo test`. `COURIER_FUZZ_WRITE_SEEDS=1` (re)writes the seeds into the corpus.

use std::path::{Path, PathBuf};

use courier_client::fuzzing;

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join("send_line")
}

fn replay(kind: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir(kind)) else {
        return 0;
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for p in &files {
        eprintln!("send_line: {}", p.display());
        fuzzing::send_line(&std::fs::read(p).expect("a readable corpus file"));
    }
    files.len()
}

#[test]
fn send_line_passes_its_committed_corpus() {
    if std::env::var_os("COURIER_FUZZ_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(dir("corpus")).expect("corpus directory");
        for (name, bytes) in fuzzing::seeds() {
            std::fs::write(dir("corpus").join(format!("seed-{name}")), bytes).expect("written");
        }
    }
    assert!(replay("corpus") > 0, "fuzz/corpus/send_line holds no input");
}

#[test]
fn send_line_past_findings_stay_fixed() {
    replay("regressions");
}

#[test]
fn send_line_seeds_pass() {
    let seeds = fuzzing::seeds();
    assert!(!seeds.is_empty());
    for (_, bytes) in seeds {
        fuzzing::send_line(&bytes);
    }
}
