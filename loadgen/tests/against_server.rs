//! courier-loadgen against a real courier server on loopback.

use std::process::Command;
use std::sync::Arc;

use courier::serve::{self, ServeOptions};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};

#[test]
fn loadgen_drives_a_server_and_writes_its_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = Profile::from_toml(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning/small.toml"))
            .unwrap(),
    )
    .unwrap();
    profile.listen = "127.0.0.1:0".parse().unwrap();
    let mut registry = Registry::default();
    let (_, token) = registry
        .add("loadgen test", Tier::Unlimited, 1_000_000, &[5u8; 32])
        .unwrap();
    let running = serve::start(ServeOptions {
        profile,
        data_dir: dir.path().to_path_buf(),
        registry: Arc::new(registry),
        master_key: courier::store::MasterKeyText::random(),
    })
    .unwrap();
    let json = dir.path().join("run.json");
    let out = Command::new(env!("CARGO_BIN_EXE_courier-loadgen"))
        .arg("--target")
        .arg(running.local_addr().to_string())
        .args([
            "--connections",
            "2",
            "--batch",
            "16",
            "--size",
            "256",
            "--duration",
            "1",
        ])
        .arg("--json")
        .arg(&json)
        .env("COURIER_TOKEN", &token)
        .output()
        .unwrap();
    running.shutdown();
    let stats = running.join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let accepted = report["accepted"].as_u64().unwrap();
    assert!(accepted > 0);
    assert_eq!(report["errors"].as_u64(), Some(0));
    assert_eq!(report["sent"].as_u64(), Some(accepted));
    assert!(report["latency_us"]["p99"].as_u64().unwrap() > 0);
    // What loadgen counted is what the server took in.
    let server_messages: u64 = stats.iter().map(|s| s.messages_in).sum();
    assert_eq!(server_messages, accepted);
}
