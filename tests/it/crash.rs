//! The real `courier serve` binary killed with SIGKILL at random moments under load, 20
//! rounds: after every restart each message that was acked before the kill is present and
//! readable, and the log holds no partial record except a torn tail at the very end of a
//! shard's newest segment, which recovery then truncates.
//!
//! Replay a failure with `COURIER_CRASH_SEED=<seed printed by the failing run>`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier::audit::{self, AcceptedEntry, SegmentState, VerifyReport};
use courier_client::Client;
use courier_testkit::logkit::*;
use courier_testkit::spawn::{free_port, Files, Serve};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;

const ROUNDS: usize = 20;
/// Load per round, before the kill.
const LOAD_MS: std::ops::Range<u64> = 300..1000;
/// Messages one round sends at most (keeps the log, and every restart's scan, small).
const MESSAGES_PER_ROUND_MAX: u64 = 8_000;
const PER_BATCH: u64 = 32;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

struct Setup {
    files: Files,
    token: String,
    addr: SocketAddr,
}

fn spawn_server(s: &Setup, round: usize) -> Child {
    let log = s.files.data.with_extension(format!("stderr-{round}"));
    Serve::new(super::courier_bin(), &s.files, s.addr, &log)
        .spawn_unready()
        .child
}

fn server_log(s: &Setup, round: usize) -> String {
    std::fs::read_to_string(s.files.data.with_extension(format!("stderr-{round}")))
        .unwrap_or_default()
}

/// Connects once the server answers; panics if it exits or takes too long.
async fn connect(s: &Setup, child: &mut Child, round: usize) -> Arc<Client> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "round {round}: server exited with {status}: {}",
                server_log(s, round)
            );
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: server not ready in time"
        );
        // Connect once the server says it listens: a handshake sent before that waits
        // for its full timeout.
        if server_log(s, round).contains("courier serving") {
            let cert = std::fs::read(s.files.data.join("tls/cert.der")).unwrap();
            let cfg = client_config(s.addr, CertificateDer::from(cert), &s.token);
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(2), Client::connect(&cfg)).await
            {
                return Arc::new(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends until `stop` messages were sent, four batches at a time; records every ack.
async fn load(
    client: Arc<Client>,
    next_id: Arc<AtomicU64>,
    stop: u64,
    acked: Arc<Mutex<Vec<AcceptedEntry>>>,
) {
    let business = client.welcome().business_id;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, next_id, acked) = (client.clone(), next_id.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next_id.fetch_add(PER_BATCH, Ordering::Relaxed);
                if first >= stop {
                    return;
                }
                let Ok(statuses) = client.submit(batch(first, PER_BATCH, 64)).await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .extend(accepted(business, first, &statuses));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// No damage at all; a torn tail or header only in a shard's newest segment, and only
/// when `torn_allowed`. Returns how many torn tails it saw.
fn check_verify(report: &VerifyReport, torn_allowed: bool, when: &str) -> usize {
    assert!(report.is_clean(), "{when}: {report:#?}");
    let mut torn = 0;
    for (i, s) in report.segments.iter().enumerate() {
        let newest_of_shard = report
            .segments
            .get(i + 1)
            .is_none_or(|n| n.shard != s.shard);
        match s.state {
            SegmentState::Ok => {}
            SegmentState::TornTail { .. } | SegmentState::TornHeader
                if torn_allowed && newest_of_shard =>
            {
                torn += 1
            }
            _ => panic!(
                "{when}: segment {} of shard {}: {}",
                s.segment_id, s.shard, s.state
            ),
        }
    }
    torn
}

fn check_audit(
    data: &Path,
    key: &courier::store::MasterKeyText,
    acked: &[AcceptedEntry],
    when: &str,
) {
    let a = audit::audit(data, key, acked).unwrap();
    assert!(
        a.is_clean() && a.present == acked.len() as u64,
        "{when}: {} acked; {a:?}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acked_message() {
    let seed: u64 = std::env::var("COURIER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    eprintln!("crash test seed {seed} (replay with COURIER_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let hex = String::from_utf8(key_text(9)).unwrap();
    let files = Files::new(tmp.path(), hex.trim());
    let key = master_key(9);
    let (reg, token) = registry();
    std::fs::write(&files.registry, reg.to_toml()).unwrap();
    let s = Setup {
        files,
        token,
        addr: free_port(),
    };
    let acked: Arc<Mutex<Vec<AcceptedEntry>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut torn_tails = 0;
    let (mut ready_secs, mut check_secs) = (0.0, 0.0);
    tokio::time::timeout(TEST_TIMEOUT, async {
        for round in 0..=ROUNDS {
            let t0 = Instant::now();
            let mut child = spawn_server(&s, round);
            let client = connect(&s, &mut child, round).await;
            ready_secs += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            // Recovery ran and nothing is being written yet: the log must be spotless,
            // and every message acked before any earlier kill readable.
            let snapshot = acked.lock().unwrap().clone();
            check_verify(
                &audit::verify(&s.files.data, &key).unwrap(),
                false,
                &format!("after restart {round}"),
            );
            check_audit(
                &s.files.data,
                &key,
                &snapshot,
                &format!("after restart {round}"),
            );
            check_secs += t0.elapsed().as_secs_f64();
            if round == ROUNDS {
                child.kill().unwrap();
                child.wait().unwrap();
                break;
            }
            let stop = next_id.load(Ordering::Relaxed) + MESSAGES_PER_ROUND_MAX;
            let sender = tokio::spawn(load(client.clone(), next_id.clone(), stop, acked.clone()));
            tokio::time::sleep(Duration::from_millis(rng.random_range(LOAD_MS))).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            sender.abort();
            let _ = sender.await;
            drop(client);
            // Acks seen so far all came before the kill.
            let t0 = Instant::now();
            let snapshot = acked.lock().unwrap().clone();
            let report = audit::verify(&s.files.data, &key).unwrap();
            torn_tails += check_verify(&report, true, &format!("after kill {round}"));
            check_audit(
                &s.files.data,
                &key,
                &snapshot,
                &format!("after kill {round}"),
            );
            check_secs += t0.elapsed().as_secs_f64();
            next_id.store(stop, Ordering::Relaxed);
        }
    })
    .await
    .expect("crash test timed out");
    let acked = acked.lock().unwrap().len();
    eprintln!(
        "crash test: {ROUNDS} kills, {acked} acked messages all present, {torn_tails} torn tail(s) seen \
         and truncated, {:.1} s ({ready_secs:.1} s starting servers, {check_secs:.1} s verify+audit)",
        started.elapsed().as_secs_f64()
    );
    assert!(acked > 0);
}
