//! Inline detection on real servers: a message-everyone blast over 8 connections (on
//! both shards) is paused, the pause survives a restart, the operator lifts it with
//! `courier businesses unpause`, `courier businesses status` shows it all; sender limits
//! (tier, same recipient, rate) hold, and a registry change applies without a restart.
//! Nothing identifying reaches the logs, even at TRACE.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::serve::{self, ServeOptions};
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage, ReportOutcome};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{code, Reason, Recipient, ReportEntry, Status};
use courier_testkit::spawn::{self, Files, Serve};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "5b2e7a9c1d3f5e7a9b2d4c6e8f0a1b3c5d7e9f2a4b6c8d0e1f3a5b7c9d2e4f6a";

fn courier() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_courier"));
    c.current_dir(concat!(env!("CARGO_MANIFEST_DIR")));
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn add_business(registry: &Path, name: &str, tier: &str, mps: &str) -> String {
    let out = run_ok(courier().args([
        "businesses",
        "add",
        "--name",
        name,
        "--tier",
        tier,
        "--mps",
        mps,
        "--registry",
        registry.to_str().unwrap(),
    ]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Setup {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
}

impl Setup {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn registry(&self) -> PathBuf {
        self.dir.path().join("registry.toml")
    }
    fn log(&self, round: usize) -> PathBuf {
        self.dir.path().join(format!("serve-{round}.log"))
    }

    fn spawn(&self, round: usize) -> Child {
        let files = Files::new(self.dir.path(), MASTER_HEX);
        debug_assert_eq!(
            (&files.data, &files.registry),
            (&self.data(), &self.registry())
        );
        Serve::new(super::courier_bin(), &files, self.addr, &self.log(round))
            .env("COURIER_LOG", "trace")
            .spawn()
            .child
    }

    fn client_config(&self, token: &str) -> ClientConfig {
        let cert = CertificateDer::from(std::fs::read(self.data().join("tls/cert.der")).unwrap());
        ClientConfig {
            server: self.addr,
            server_name: "localhost".into(),
            token: token.to_string(),
            trust: ServerTrust::Pinned(cert),
            streams: 2,
            batches_in_flight_per_stream: 2,
        }
    }

    fn status(&self) -> serde_json::Value {
        let out = run_ok(courier().args([
            "businesses",
            "status",
            "--json",
            "--data-dir",
            self.data().to_str().unwrap(),
        ]));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls the status file (written once a second) until `pred` holds for business `id`.
    fn wait_status(&self, id: u64, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = courier::control::status_path(&self.data());
            if path.exists() {
                let s = self.status();
                if let Some(b) = s["businesses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["id"] == id)
                {
                    if pred(b) {
                        return b.clone();
                    }
                }
            }
            assert!(Instant::now() < deadline, "status never matched");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn stop(child: &mut Child) {
    spawn::terminate(child);
    let s = spawn::wait_exit(child, Duration::from_secs(20));
    assert!(s.success(), "exit status {s}");
}

/// A number no test elsewhere uses: `+4479` and 9 digits.
fn number(i: u64) -> Recipient {
    Recipient::parse(format!("+4479{:09}", 271_828_182 + i * 7).as_bytes()).unwrap()
}

fn batch(ids: impl Iterator<Item = u64>, to: impl Fn(u64) -> Recipient) -> Vec<OutgoingMessage> {
    ids.map(|i| OutgoingMessage {
        client_id: i,
        recipient: to(i),
        payload: Bytes::from_static(b"detect-e2e"),
    })
    .collect()
}

fn count(statuses: &[Status], pred: impl Fn(&Status) -> bool) -> usize {
    statuses.iter().filter(|s| pred(s)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blast_is_paused_across_shards_survives_restart_and_the_operator_unpauses() {
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s = Setup {
        dir: tempfile::tempdir().unwrap(),
        addr,
    };
    let steady_token = add_business(&s.registry(), "steady", "2000", "1000");
    let blast_token = add_business(&s.registry(), "blaster", "unlimited", "100000");
    let mut child = s.spawn(1);

    // A normal sender: a few messages each to ten recipients.
    let steady = Client::connect(&s.client_config(&steady_token))
        .await
        .unwrap();
    let mut steady_accepted = 0;
    for round in 0..3u64 {
        let st = steady
            .submit(batch(round * 10..round * 10 + 10, |i| number(i % 10)))
            .await
            .unwrap();
        steady_accepted += count(&st, |s| matches!(s, Status::Accepted(_)));
    }
    assert_eq!(steady_accepted, 30, "a normal sender is never held back");

    // A blast to 4,000 never-contacted numbers over 8 connections (both shards).
    let mut tasks = Vec::new();
    let mut ports = std::collections::HashSet::new();
    for c in 0..8u64 {
        let client = Arc::new(
            Client::connect(&s.client_config(&blast_token))
                .await
                .unwrap(),
        );
        ports.insert(client.local_addr().unwrap().port());
        tasks.push(tokio::spawn(async move {
            let mut all = Vec::new();
            for b in 0..10u64 {
                let first = 1_000 + (c * 10 + b) * 50;
                let st = client
                    .submit(batch(first..first + 50, number))
                    .await
                    .unwrap();
                all.push(st);
            }
            all
        }));
    }
    assert_eq!(ports.len(), 8, "eight distinct connections");
    let mut accepted = 0;
    let mut paused = 0;
    for t in tasks {
        let batches = t.await.unwrap();
        for st in &batches {
            accepted += count(st, |s| matches!(s, Status::Accepted(_)));
            paused += count(st, |s| *s == Status::Rejected(Reason::SenderPaused));
        }
        let last = batches.last().unwrap();
        assert!(
            last.iter()
                .all(|s| *s == Status::Rejected(Reason::SenderPaused)),
            "once flagged, the blast stays stopped on every connection: {last:?}"
        );
    }
    eprintln!("blast: {accepted} of 4000 accepted before the pause, {paused} rejected as paused");
    assert!(paused > 0);
    assert!(
        accepted <= 400,
        "the blast was stopped early: {accepted} of 4000 accepted"
    );

    // What operators see: the blaster paused for a fan-out surge, billed for what was
    // accepted; the steady sender green and billed for its 30.
    let b = s.wait_status(2, |b| {
        b["paused"] == true && b["accepted_today"] == accepted as u64
    });
    assert_eq!(b["why"], "fan_out_surge");
    let st = s.wait_status(1, |b| b["accepted_today"] == 30);
    assert_eq!(
        (st["paused"].clone(), st["rating"].clone()),
        (false.into(), "green".into())
    );
    let table = run_ok(courier().args([
        "businesses",
        "status",
        "--data-dir",
        s.data().to_str().unwrap(),
        "--registry",
        s.registry().to_str().unwrap(),
    ]));
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains("blaster") && l.contains("fan_out_surge")),
        "{table}"
    );

    // A restart keeps the pause (the detector checkpoint is written on the way down).
    drop(steady);
    stop(&mut child);
    let mut child = s.spawn(2);
    let blaster = Client::connect(&s.client_config(&blast_token))
        .await
        .unwrap();
    let st = blaster.submit(batch(9_000..9_003, number)).await.unwrap();
    assert!(
        st.iter()
            .all(|s| *s == Status::Rejected(Reason::SenderPaused)),
        "still paused after the restart: {st:?}"
    );

    // The operator lifts the pause; it applies within about a second, without a restart.
    run_ok(courier().args([
        "businesses",
        "unpause",
        "--id",
        "2",
        "--data-dir",
        s.data().to_str().unwrap(),
    ]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = 9_100;
    loop {
        let st = blaster.submit(batch(next..next + 3, number)).await.unwrap();
        next += 3;
        if st.iter().all(|s| matches!(s, Status::Accepted(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "unpause never applied: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = s.wait_status(2, |b| b["paused"] == false);
    assert_eq!(b["why"], "operator");
    drop(blaster);
    stop(&mut child);

    // Nothing identifying in anything either run logged, at TRACE; the signal is there.
    let mut output = std::fs::read_to_string(s.log(1)).unwrap();
    output.push_str(&std::fs::read_to_string(s.log(2)).unwrap());
    assert!(output.contains("integrity signal"), "the pause was logged");
    for i in (0..10).chain(1_000..5_000).chain(9_000..next) {
        let n = number(i);
        assert!(
            !output.contains(&n.as_str()[1..]),
            "a phone number leaked into the logs"
        );
    }
    let files = [
        courier::control::status_path(&s.data()),
        courier::control::detect_dir(&s.data()).join("shard-0.ckpt"),
    ];
    for f in files {
        // Keyed hashes of numbers: private to the server's user (issue 19).
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
        let bytes = std::fs::read(&f).unwrap();
        for i in (0..10).chain(1_000..1_100) {
            let n = number(i);
            let digits = &n.as_str()[1..];
            assert!(
                !bytes.windows(digits.len()).any(|w| w == digits.as_bytes()),
                "a phone number is in {}",
                f.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_and_registry_changes_apply_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = Profile::from_toml(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/small.toml"))
            .unwrap(),
    )
    .unwrap();
    profile.listen = "127.0.0.1:0".parse().unwrap();
    // This test sends to hundreds of new numbers at once on purpose: surge detection
    // (tested above) is set out of reach so that the limits themselves show.
    profile.detect.surge_distinct_per_sec_min = 1_000_000;
    let mut registry = Registry::default();
    let (small, small_token) = registry.add("small", Tier::T250, 1000, &[1; 32]).unwrap();
    let (_, slow_token) = registry.add("slow", Tier::T2k, 100, &[2; 32]).unwrap();
    let (rated, rated_token) = registry.add("rated", Tier::T10k, 1000, &[3; 32]).unwrap();
    let (platform, platform_token) = registry
        .add("platform", Tier::Unlimited, 1000, &[4; 32])
        .unwrap();
    registry.set_platform(platform, true);
    let registry_file = dir.path().join("registry.toml");
    std::fs::write(&registry_file, registry.to_toml()).unwrap();
    let running = serve::start(ServeOptions {
        profile,
        data_dir: dir.path().join("data"),
        registry: Arc::new(registry.clone()),
        registry_file: Some(registry_file.clone()),
        master_key: MasterKeyText::random(),
        region: None,
    })
    .unwrap();
    let cfg = |token: &str| ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams: 2,
        batches_in_flight_per_stream: 2,
    };

    // Tier 250: 300 distinct numbers, one connection: exactly 250 accepted.
    let c = Client::connect(&cfg(&small_token)).await.unwrap();
    let mut statuses = Vec::new();
    for k in 0..6u64 {
        statuses.extend(c.submit(batch(k * 50..k * 50 + 50, number)).await.unwrap());
    }
    assert_eq!(count(&statuses, |s| matches!(s, Status::Accepted(_))), 250);
    assert_eq!(
        count(&statuses, |s| *s
            == Status::Rejected(Reason::MessagingLimitReached)),
        50
    );
    // A number already messaged today is still allowed at the limit.
    // (A new client id: id 0 itself would be answered duplicate.)
    let st = c.submit(batch(500..501, |_| number(0))).await.unwrap();
    assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");

    // Same recipient: 5 per 10 s window, the rest throttled with a retry-after.
    // number(1) already had one message above (counted per number since issue 14; the
    // bound below also held for the count-min sketch before it, which over-counted).
    let st = c.submit(batch(600..606, |_| number(1))).await.unwrap();
    let ok = count(&st, |s| matches!(s, Status::Accepted(_)));
    assert!((1..=5).contains(&ok), "{st:?}");
    assert!(st[ok..]
        .iter()
        .all(|s| matches!(s, Status::Throttled { retry_after_ms } if *retry_after_ms > 0)));

    // Rate: 100 msg/s with one second of burst; 300 at once: about 100 accepted.
    let slow = Client::connect(&cfg(&slow_token)).await.unwrap();
    let mut st = Vec::new();
    for k in 0..3u64 {
        st.extend(
            slow.submit(batch(10_000 + k * 100..10_100 + k * 100, number))
                .await
                .unwrap(),
        );
    }
    let ok = count(&st, |s| matches!(s, Status::Accepted(_)));
    assert!((100..=130).contains(&ok), "{ok} accepted at 100 msg/s");
    assert_eq!(
        count(&st, |s| matches!(s, Status::Throttled { .. })),
        300 - ok
    );

    // The operator raises the tier in the registry file; the running server applies it.
    registry.set_limits(small, Tier::T2k, 1000).unwrap();
    let tmp = registry_file.with_extension("tmp");
    std::fs::write(&tmp, registry.to_toml()).unwrap();
    std::fs::rename(&tmp, &registry_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = 20_000;
    loop {
        let st = c.submit(batch(next..next + 5, number)).await.unwrap();
        next += 5;
        if st.iter().all(|s| matches!(s, Status::Accepted(_))) {
            break;
        }
        assert!(
            st.iter()
                .all(|s| *s == Status::Rejected(Reason::MessagingLimitReached)),
            "{st:?}"
        );
        assert!(Instant::now() < deadline, "the new tier never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Spam reports: only the platform's connection may send them; 20 reports on 1,000
    // delivered messages (20,000 ppm, red at 10,000) turn the sender red and lower its tier.
    let r = Client::connect(&cfg(&rated_token)).await.unwrap();
    let mut ok = 0;
    for k in 0..10u64 {
        let st = r
            .submit(batch(30_000 + k * 100..30_100 + k * 100, number))
            .await
            .unwrap();
        ok += count(&st, |s| matches!(s, Status::Accepted(_)));
    }
    assert_eq!(ok, 1000);
    let entries: Vec<ReportEntry> = (0..20u64)
        .map(|i| ReportEntry {
            business_id: rated,
            client_id: 30_000 + i,
            recipient: number(30_000 + i),
        })
        .collect();
    let refused = r.report(&entries, Duration::from_secs(2)).await.unwrap();
    assert_eq!(
        refused,
        ReportOutcome::Refused {
            code: u64::from(code::UNEXPECTED_FRAME)
        },
        "a business cannot report"
    );
    let p = Client::connect(&cfg(&platform_token)).await.unwrap();
    let sent = p
        .report(&entries, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(sent, ReportOutcome::NotRefused);
    let data = dir.path().join("data");
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = loop {
        let found = courier::control::read_status(&data).ok().and_then(|s| {
            s.businesses
                .into_iter()
                .find(|b| b.id == rated && b.rating == "red")
        });
        if let Some(b) = found {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "the sender never turned red: {:?}",
            courier::control::read_status(&data)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((b.tier.as_str(), b.paused), ("2000", false), "{b:?}");
    assert_eq!(b.why.as_deref(), Some("quality_red"));

    drop((c, slow, r, p));
    running.shutdown();
    running.join().unwrap();
}
