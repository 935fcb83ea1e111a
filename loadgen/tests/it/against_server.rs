//! courier-loadgen against a real courier server (in this test process) on loopback:
//! the v1 closed loop, the open loop, every shipped scenario (scaled down to about a
//! second), verification files and the plot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use courier::serve::Running;
use courier_loadgen::scenario::Defaults;
use courier_loadgen::traffic::{RecipientSpec, SizeSpec};
use courier_loadgen::Plan;
use courier_pipeline::registry::{Registry, Tier};
use courier_testkit::server::{self, Setup};

/// Businesses registered: the shipped scenarios use indices 0 to 4.
const BUSINESSES: usize = 5;

fn start_server(dir: &Path) -> (Running, Vec<String>) {
    let mut registry = Registry::default();
    // Full-speed load senders: exempt from detection, as an operator would set up a
    // benchmark.
    let tokens = (0..BUSINESSES)
        .map(|i| server::add_exempt(&mut registry, &format!("loadgen test {i}"), &[5u8; 32]))
        .collect();
    let mut setup = Setup::new(2, registry);
    // Ingest only: no delivery edge connects here, so a long run would fill delivery's
    // bounds (pending_max) and be throttled by design.
    setup.profile.delivery.enabled = false;
    (server::start(dir, setup), tokens)
}

fn loadgen(running: &Running, tokens: &[String], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier-loadgen"))
        .arg("--target")
        .arg(running.local_addr().to_string())
        .args(args)
        .env("COURIER_TOKEN", tokens.join(","))
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn loadgen_drives_a_server_and_writes_its_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let (running, tokens) = start_server(dir.path());
    let out_json = dir.path().join("run.json");
    let out = loadgen(
        &running,
        &tokens[..1],
        &[
            "--connections",
            "2",
            "--batch",
            "16",
            "--size",
            "256",
            "--duration",
            "1",
            "--quiet",
            "--json",
            out_json.to_str().unwrap(),
        ],
    );
    running.shutdown();
    let stats = running.join().unwrap();
    let table = ok(&out);
    assert!(
        table.contains("mode") && table.contains("closed"),
        "{table}"
    );
    let report = json(&out_json);
    let accepted = report["accepted"].as_u64().unwrap();
    assert!(accepted > 0);
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["errors"].as_u64(), Some(0));
    assert_eq!(report["sent"].as_u64(), Some(accepted));
    assert!(report["latency_us"]["p99"].as_u64().unwrap() > 0);
    // What loadgen counted is what the server took in.
    let server_messages: u64 = stats.iter().map(|s| s.messages_in).sum();
    assert_eq!(server_messages, accepted);
}

#[test]
fn open_loop_sends_at_the_rate_and_verifies_what_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let (running, tokens) = start_server(dir.path());
    let out_json = dir.path().join("open.json");
    let accepted_csv = dir.path().join("accepted.csv");
    let svg = dir.path().join("open.svg");
    let pid = std::process::id().to_string();
    let out = loadgen(
        &running,
        &tokens[..1],
        &[
            "--rate",
            "2000",
            "--duration",
            "1",
            "--connections",
            "2",
            "--batch",
            "16",
            "--size",
            "100-300",
            "--recipients",
            "zipf:1.1",
            "--duplicate-rate",
            "0.1",
            "--server-pid",
            &pid,
            "--quiet",
            "--json",
            out_json.to_str().unwrap(),
            "--accepted",
            accepted_csv.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    running.shutdown();
    let stats = running.join().unwrap();
    let table = ok(&out);
    let r = json(&out_json);
    assert_eq!(r["mode"], "open");
    let sent = r["sent"].as_u64().unwrap();
    // 2,000 msgs/s for 1 s: all of it, less what a loaded machine left in the backlog.
    let dropped = r["backlog_dropped"].as_u64().unwrap();
    assert_eq!(sent + dropped, 2000, "{r}");
    assert!(sent >= 1500, "{r}");
    let accepted = r["accepted"].as_u64().unwrap();
    let duplicate = r["duplicate"].as_u64().unwrap();
    assert_eq!(accepted + duplicate + r["errors"].as_u64().unwrap(), sent);
    let server_messages: u64 = stats.iter().map(|s| s.messages_in).sum();
    assert_eq!(server_messages, accepted + duplicate);
    // Resends of accepted ids (on either connection, whichever shard it landed on) come
    // back `duplicate`, and are not stored again.
    let d = &r["duplicates"];
    assert!(d["sent"].as_u64().unwrap() > 50, "{d}");
    assert_eq!(d["detected"], d["sent"], "{d}");
    assert_eq!(d["not_detected"], 0, "{d}");
    assert_eq!(r["duplicate"], d["sent"], "{r}");
    assert!(table.contains("duplicates not detected: 0"), "{table}");
    // One CSV line per accepted message, for `courier log audit`.
    let csv = std::fs::read_to_string(&accepted_csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("business_id,client_id,log_position"));
    assert_eq!(lines.clone().count() as u64, accepted);
    assert!(
        lines.all(|l| l.split(',').count() == 3 && l.split(',').all(|f| f.parse::<u64>().is_ok()))
    );
    // CPU of both sides; the server here is this test process.
    assert!(r["cpu"]["server_secs"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["cpu"]["server_source"], format!("pid {pid}"));
    assert!(!r["timeline"].as_array().unwrap().is_empty());
    // The plot is SVG, its titles SVG text (no font is parsed to draw them).
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("latency by percentile"),
        "the panel titles are text"
    );
    assert!(svg.contains("<polyline"), "the curves are drawn");
}

fn scenarios() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn every_shipped_scenario_runs_briefly_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let (running, tokens) = start_server(dir.path());
    let defaults = Defaults {
        connections: 1,
        batch: 16,
        size: SizeSpec::Fixed(100),
        recipients: RecipientSpec::New,
    };
    let names: Vec<String> = scenarios()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "blast.toml",
            "everything.toml",
            "large-sender.toml",
            "report-storm.toml",
            "retry-after.toml",
            "slow-ramp.toml",
            "steady-mix.toml"
        ]
    );
    for path in scenarios() {
        let plan = Plan::from_toml(&std::fs::read_to_string(&path).unwrap(), &defaults).unwrap();
        // About one second per scenario, at a tenth of its rates: the shape is kept.
        let scale = (1.0 / plan.duration_secs).to_string();
        let out_json = dir.path().join("scenario.json");
        let out = loadgen(
            &running,
            &tokens,
            &[
                "--scenario",
                path.to_str().unwrap(),
                "--time-scale",
                &scale,
                "--rate-scale",
                "0.1",
                "--quiet",
                "--json",
                out_json.to_str().unwrap(),
            ],
        );
        let table = ok(&out);
        let r = json(&out_json);
        let name = path.display();
        assert_eq!(r["mode"], "open", "{name}");
        assert!(r["accepted"].as_u64().unwrap() > 0, "{name}: {r}");
        assert_eq!(r["errors"], 0, "{name}: {r}");
        let senders = r["senders"].as_array().unwrap();
        assert_eq!(senders.len(), plan.senders.len(), "{name}");
        // These businesses are exempt from detection (a throughput setup): every sender is
        // admitted, and the scores say so rather than inventing numbers. Scoring against
        // the detector is `scenarios_score_the_real_detector`.
        let abusive = plan
            .senders
            .iter()
            .filter(|s| s.label == courier_loadgen::Label::Abusive)
            .count();
        assert_eq!(r["detection"]["abusive"], abusive as u64, "{name}");
        assert!(r["detection"]["precision"].is_null(), "{name}: {r}");
        if abusive > 0 {
            assert_eq!(r["detection"]["recall"], 0.0, "{name}");
        }
        assert!(table.contains("precision n/a"), "{name}: {table}");
        // Without a platform token, REPORT frames go out on the sender's own connection
        // and are refused with UNEXPECTED_FRAME; SUBMITs are unaffected.
        if plan.senders.iter().any(|s| s.reports_per_sec > 0.0) {
            let refused = r["reports"]["refused_by_code"]["0x17"]
                .as_u64()
                .unwrap_or(0);
            assert!(refused > 0, "{name}: {r}");
            assert_eq!(
                r["reports"]["sent"].as_u64().unwrap(),
                refused,
                "{name}: {r}"
            );
        }
    }
    running.shutdown();
    running.join().unwrap();
}

#[test]
fn ctrl_c_prints_the_partial_report() {
    let dir = tempfile::tempdir().unwrap();
    let (running, tokens) = start_server(dir.path());
    let out_json = dir.path().join("partial.json");
    let child = Command::new(env!("CARGO_BIN_EXE_courier-loadgen"))
        .arg("--target")
        .arg(running.local_addr().to_string())
        .args(["--rate", "1000", "--duration", "60", "--quiet", "--json"])
        .arg(&out_json)
        .env("COURIER_TOKEN", &tokens[0])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Give it time to connect and send, then interrupt it as a terminal would.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    running.shutdown();
    running.join().unwrap();
    let table = ok(&out);
    assert!(table.contains("INTERRUPTED: partial report"), "{table}");
    let r = json(&out_json);
    assert_eq!(r["interrupted"], true);
    assert!(r["sent"].as_u64().unwrap() > 0, "{r}");
    assert!(r["duration_secs"].as_f64().unwrap() < 30.0, "{r}");
    assert_eq!(r["sent"], r["accepted"], "{r}");
}

/// A server whose businesses are judged by the detector, registered as an operator would
/// for the blast and report-storm scenarios (see their headers), scaled to the test's
/// tenth of the rates: declared baselines of 6,000 recipients a minute (100 a second:
/// surge above 500 a second at the shipped factor of 5), tier 2000 for business 1, a
/// platform credential for spam reports.
fn start_detecting_server(dir: &Path) -> (Running, Vec<String>, String) {
    let mut registry = Registry::default();
    let (b0, t0) = registry
        .add("normal sender", Tier::Unlimited, 1_000_000, &[11; 32])
        .unwrap();
    registry.set_baseline(b0, 6_000);
    let (b1, t1) = registry
        .add("suspect sender", Tier::T2k, 1_000_000, &[12; 32])
        .unwrap();
    registry.set_baseline(b1, 6_000);
    let (p, platform) = registry
        .add("platform", Tier::Unlimited, 1_000, &[13; 32])
        .unwrap();
    registry.set_platform(p, true);
    let running = server::start(dir, Setup::new(2, registry));
    (running, vec![t0, t1], platform)
}

#[test]
fn scenarios_score_the_real_detector() {
    let scenarios = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    // Each scenario compressed to 4 s at a tenth of its rates, on a fresh server: the
    // blast starts at 1.33 s at 1,000 new numbers a second against a declared 100 a
    // second; reports start at 0.67 s.
    for name in ["blast.toml", "report-storm.toml"] {
        let dir = tempfile::tempdir().unwrap();
        let (running, tokens, platform) = start_detecting_server(dir.path());
        let out_json = dir.path().join(format!("{name}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_courier-loadgen"))
            .arg("--target")
            .arg(running.local_addr().to_string())
            .args(["--scenario", &format!("{scenarios}/{name}")])
            .args(["--time-scale", "0.13333", "--rate-scale", "0.1", "--quiet"])
            .arg("--json")
            .arg(&out_json)
            .env("COURIER_TOKEN", tokens.join(","))
            .env("COURIER_PLATFORM_TOKEN", &platform)
            .output()
            .unwrap();
        let table = ok(&out);
        let r = json(&out_json);
        let d = &r["detection"];
        eprintln!("{name}: {d}");
        assert_eq!(d["abusive"], 1, "{name}: {r}");
        assert_eq!(
            d["true_positives"], 1,
            "{name}: the abusive sender is caught: {r}"
        );
        assert_eq!(d["false_positives"], 0, "{name}: no normal sender is: {r}");
        assert_eq!(
            (d["precision"].as_f64(), d["recall"].as_f64()),
            (Some(1.0), Some(1.0))
        );
        let t = d["median_time_to_flag_secs"].as_f64().unwrap();
        // A blast within one second of its onset; a reported sender once its lowered tier
        // (250) is used up, about 1.25 s at 200 new numbers a second.
        let bound = if name == "blast.toml" { 1.0 } else { 3.0 };
        assert!(t > 0.0 && t < bound, "{name}: flagged {t} s after onset");
        assert!(table.contains("precision"), "{table}");
        if name == "report-storm.toml" {
            let rep = &r["reports"];
            assert!(rep["taken"].as_u64().unwrap() > 10, "{name}: {rep}");
            assert!(
                rep["refused_by_code"]
                    .as_object()
                    .is_none_or(|m| m.is_empty()),
                "{rep}"
            );
        }
        running.shutdown();
        running.join().unwrap();
    }
}
