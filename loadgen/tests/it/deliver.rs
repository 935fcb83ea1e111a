//! `courier-loadgen --deliver` against a real courier server (in this test process): the
//! simulated edge delivers every message with devices offline for a while, failures,
//! reads and replies; the report carries the delivery counts, latencies and the check.

use std::path::Path;
use std::process::Command;

use courier::serve::Running;
use courier_pipeline::registry::{Registry, Tier};
use courier_testkit::server::{self, Setup};

/// Two exempt senders and a platform credential; returns their tokens.
fn start(dir: &Path) -> (Running, Vec<String>, String) {
    let mut registry = Registry::default();
    let senders = (0..2)
        .map(|i| server::add_exempt(&mut registry, &format!("sender {i}"), &[6u8; 32]))
        .collect();
    let (id, edge) = registry
        .add("edge", Tier::Unlimited, 1_000, &[7u8; 32])
        .unwrap();
    registry.set_platform(id, true);
    (server::start(dir, Setup::new(2, registry)), senders, edge)
}

#[test]
fn the_simulated_edge_delivers_every_accepted_message_and_the_report_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let (running, senders, edge) = start(dir.path());
    let json = dir.path().join("deliver.json");
    let out = Command::new(env!("CARGO_BIN_EXE_courier-loadgen"))
        .arg("--target")
        .arg(running.local_addr().to_string())
        .args([
            "--rate",
            "1500",
            "--duration",
            "2",
            "--connections",
            "2",
            "--batch",
            "32",
            "--size",
            "200",
            "--devices",
            "400",
            "--deliver",
            "--offline-share",
            "0.2",
            "--offline-period",
            "1",
            "--fail-rate",
            "0.05",
            "--read-rate",
            "0.3",
            "--reply-rate",
            "0.1",
            "--settle",
            "20",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .env("COURIER_TOKEN", senders.join(","))
        .env("COURIER_PLATFORM_TOKEN", &edge)
        .output()
        .unwrap();
    running.shutdown();
    running.join().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{table}");
    assert!(
        table.contains("delivery") && table.contains("PASS"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let d = &r["delivery"];
    let n = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
    let accepted = r["accepted"].as_u64().unwrap();
    assert!(accepted > 1000, "{r}");
    assert_eq!(n("tracked"), accepted);
    assert_eq!(
        (n("unresolved"), n("extra_finals"), n("order_violations")),
        (0, 0, 0)
    );
    // Every accepted message ended delivered, failed or expired (nothing expires here).
    assert_eq!(n("delivered") + n("failed") + n("expired"), accepted, "{d}");
    assert!(
        d["failed_by_reason"]["not_on_platform"].as_u64().unwrap() > 0,
        "{d}"
    );
    assert!(n("read") > 0 && n("read") < n("delivered"), "{d}");
    // A fifth of the devices is offline at any time: their messages wait for ONLINE.
    assert!(n("retry_later") > 0 && n("online") > 0, "{d}");
    assert!(n("retransmissions") >= n("retry_later") / 2, "{d}");
    assert!(
        d["online_to_delivered_us"]["max"].as_u64().unwrap() > 0,
        "{d}"
    );
    // Replies: accepted by the relay and heard once each by the business written to.
    assert!(n("inbound") > 0, "{d}");
    assert_eq!(n("inbound_received"), n("inbound"));
    assert_eq!(n("inbound_misrouted"), 0);
    for k in ["submit_to_delivered_us", "delivered_to_status_us"] {
        assert!(d[k]["p50"].as_u64().unwrap() > 0, "{k}: {d}");
    }
    // The default profile seals for devices (issue 16): every DELIVER the edge took
    // opened on every device of its recipient to what was sent, never on another
    // device, and every reply was sealed to its business's key and opened by the relay
    // (the businesses heard them above).
    let e = &d["e2e"];
    let e2e = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
    assert_eq!(e2e("messages_opened"), n("handoffs"), "{e}");
    assert!(
        e2e("copies_opened") > e2e("messages_opened"),
        "two-device recipients: {e}"
    );
    assert_eq!(
        (
            e2e("open_failures"),
            e2e("content_mismatch"),
            e2e("cross_device_opened")
        ),
        (0, 0, 0),
        "{e}"
    );
    assert!(e2e("cross_device_checks") > 0, "{e}");
    assert!(
        e2e("sessions_accepted") > 0 && e2e("bundles_published") > 0,
        "{e}"
    );
    assert_eq!(
        e2e("replies_sealed"),
        n("inbound") + n("inbound_lost"),
        "{e} {d}"
    );
}
