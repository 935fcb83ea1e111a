//! Detection that judges senders, not retries (issue 14), on real servers (in process,
//! io_uring shards, the log on disk, `tuning/small.toml` with two shards):
//!
//! - a business at 10 msg/s sending 30 distinct numbers, resending the throttled ones
//!   after their retry-after as the client library and `courier send` do, ends with all
//!   30 accepted and is not paused (it used to end with 11 accepted and 19
//!   `sender_paused`, paused for a fan-out surge);
//! - a sender declared at 60,000 recipients a minute sending 1,000 fresh numbers a
//!   second gets no `throttled` and no `rejected` (5-18 % were throttled), and its jump
//!   to 10,000 a second is paused as a surge within 2 s, the pause saying what was
//!   measured against which threshold;
//!
//! The scenarios `loadgen/scenarios/retry-after.toml` and `large-sender.toml` are run by
//! the load generator's own tests (`loadgen/tests/it/detect_scenarios.rs`).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::serve::Running;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{Reason, Recipient, Status};
use courier_testkit::server::{self, Setup};

/// The tests here measure how fast a pause comes at 10,000 messages a second: one
/// server at a time, so that they do not slow each other down.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

struct Server {
    running: Option<Running>,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(registry: &Registry) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let running = server::start(&dir.path().join("data"), Setup::new(2, registry.clone()));
        Server {
            running: Some(running),
            dir,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn client_config(&self, token: &str, streams: usize) -> ClientConfig {
        server::client_config(self.running(), token, streams, 4)
    }

    /// The business's entry in the status file once `pred` holds for it (the file is
    /// written once a second), as the operator's `businesses status --json` shows it.
    fn wait_status(&self, id: u32, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = courier::control::read_status(&self.data())
                .ok()
                .and_then(|s| s.businesses.into_iter().find(|b| b.id == id))
                .map(|b| serde_json::to_value(b).unwrap());
            if let Some(b) = found {
                if pred(&b) {
                    return b;
                }
            }
            assert!(Instant::now() < deadline, "status never matched");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            let _ = r.join();
        }
    }
}

/// `+4478`, a digit for the test, eight for the message: numbers no other test uses.
fn number(test: u64, i: u64) -> Recipient {
    Recipient::parse(format!("+4478{test}{i:08}").as_bytes()).unwrap()
}

fn messages(test: u64, ids: std::ops::Range<u64>) -> Vec<OutgoingMessage> {
    ids.map(|i| OutgoingMessage {
        client_id: i,
        recipient: number(test, i),
        payload: Bytes::from_static(b"detect-quality"),
    })
    .collect()
}

fn business(registry: &mut Registry, name: &str, tier: Tier, mps: u32, seed: u8) -> (u32, String) {
    registry.add(name, tier, mps, &[seed; 32]).unwrap()
}

/// Issue 14, first case, through the client library and through `courier send`.
#[test]
fn thirty_numbers_at_10_per_second_resent_after_retry_after_are_all_accepted() {
    let _serial = one_at_a_time();
    let mut registry = Registry::default();
    let (lib_id, lib_token) = business(&mut registry, "follows the README", Tier::T2k, 10, 1);
    let (send_id, send_token) = business(&mut registry, "courier send user", Tier::T2k, 10, 2);
    let server = Server::start(&registry);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The client library: one batch of 30, resent after the retry-after (10 rounds, as
    // `courier send` does by default).
    let (statuses, rounds) = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                let c = Client::connect(&server.client_config(&lib_token, 1))
                    .await
                    .unwrap();
                let out = c
                    .submit_with_retry_rounds(messages(1, 0..30), 10)
                    .await
                    .unwrap();
                c.close().await;
                out
            })
            .await
            .expect("the client finished")
        })
        .into_iter()
        .map(|r| (r.status, r.rounds))
        .unzip::<_, _, Vec<_>, Vec<_>>();
    assert!(
        statuses.iter().all(|s| matches!(s, Status::Accepted(_))),
        "{statuses:?}"
    );
    let rounds_max = rounds.iter().max().copied().unwrap();
    eprintln!("client library: 30 of 30 accepted in {rounds_max} rounds");
    assert!(
        rounds_max > 1,
        "some were throttled first: the rate is 10/s"
    );
    let b = server.wait_status(lib_id, |b| b["accepted_today"] == 30);
    assert_eq!(b["paused"], false, "{b}");
    assert_eq!(b["why"], serde_json::Value::Null, "{b}");

    // `courier send FILE`, a 30-line file, as the README shows it.
    let file = server.dir.path().join("thirty.jsonl");
    let text: String = (0..30u64)
        .map(|i| {
            format!(
                "{{\"recipient\": \"{}\", \"payload\": \"message {i}\"}}\n",
                number(2, i).as_str()
            )
        })
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = Command::new(crate::courier_bin())
        .arg("send")
        .arg(&file)
        .arg("--target")
        .arg(server.running().local_addr().to_string())
        .arg("--ca")
        .arg(server.data().join("tls/cert.der"))
        .arg("--quiet")
        .env("COURIER_TOKEN", &send_token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "courier send: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| {
        stdout
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next().unwrap().parse::<u64>().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} row:\n{stdout}"))
    };
    assert_eq!(row("accepted"), 30, "{stdout}");
    assert_eq!(row("rejected"), 0, "{stdout}");
    eprintln!(
        "courier send: 30 of 30 accepted, {} throttled first",
        row("throttled_then_accepted")
    );
    let b = server.wait_status(send_id, |b| b["accepted_today"] == 30);
    assert_eq!(b["paused"], false, "{b}");
    assert_eq!(server.running().totals().detect_rejected, 0);
}

/// What one open-loop phase got back.
#[derive(Debug, Default)]
struct Phase {
    accepted: u64,
    throttled: u64,
    rejected: u64,
    /// First `sender_paused` answer, from the phase's start.
    first_paused: Option<Duration>,
}

/// Sends `per_sec` fresh numbers a second for `secs`, in batches of `batch`, over the
/// clients in turn, without waiting for answers (open loop, like a sender's queue);
/// stops early once a batch comes back `sender_paused` if `stop_on_pause`.
async fn open_loop(
    clients: &[Arc<Client>],
    first_id: u64,
    per_sec: u64,
    secs: u64,
    batch: u64,
    stop_on_pause: bool,
) -> Phase {
    let start = tokio::time::Instant::now();
    let batches = per_sec * secs / batch;
    let every = Duration::from_micros(1_000_000 * batch / per_sec);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    let mut phase = Phase::default();
    for k in 0..batches {
        tokio::time::sleep_until(start + every * k as u32).await;
        while let Ok(d) = rx.try_recv() {
            phase.first_paused.get_or_insert(d);
        }
        if stop_on_pause && phase.first_paused.is_some() {
            break;
        }
        let c = clients[(k % clients.len() as u64) as usize].clone();
        let first = first_id + k * batch;
        let tx = tx.clone();
        tasks.spawn(async move {
            let st = c.submit(messages(3, first..first + batch)).await.unwrap();
            if st.contains(&Status::Rejected(Reason::SenderPaused)) {
                let _ = tx.send(start.elapsed());
            }
            st
        });
    }
    while let Some(st) = tasks.join_next().await {
        for s in st.unwrap() {
            match s {
                Status::Accepted(_) => phase.accepted += 1,
                Status::Throttled { .. } => phase.throttled += 1,
                Status::Rejected(_) => phase.rejected += 1,
                Status::Duplicate(_) => panic!("fresh ids only"),
            }
        }
    }
    while let Ok(d) = rx.try_recv() {
        phase.first_paused = Some(phase.first_paused.map_or(d, |p| p.min(d)));
    }
    phase
}

/// Issue 14, second case.
#[test]
fn a_declared_large_sender_is_never_throttled_and_its_10x_jump_is_paused_within_2_s() {
    let _serial = one_at_a_time();
    let mut registry = Registry::default();
    let (id, token) = business(&mut registry, "large sender", Tier::Unlimited, 100_000, 3);
    assert!(registry.set_baseline(id, 60_000));
    let server = Server::start(&registry);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (steady, jump) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), async {
            // Two connections, so that both shards may see it.
            let mut clients = Vec::new();
            for _ in 0..2 {
                clients.push(Arc::new(
                    Client::connect(&server.client_config(&token, 4))
                        .await
                        .unwrap(),
                ));
            }
            // 1,000 fresh numbers a second for 8 s.
            let steady = open_loop(&clients, 0, 1_000, 8, 50, false).await;
            // Then ten times that.
            let jump = open_loop(&clients, 1_000_000, 10_000, 4, 100, true).await;
            for c in &clients {
                c.close().await;
            }
            (steady, jump)
        })
        .await
        .expect("the sender finished")
    });
    eprintln!("steady 1,000/s for 8 s: {steady:?}");
    eprintln!("jump to 10,000/s: {jump:?}");
    assert_eq!(
        (steady.accepted, steady.throttled, steady.rejected),
        (8_000, 0, 0),
        "the steady phase is neither throttled nor rejected"
    );
    let at = jump.first_paused.expect("the jump was paused");
    assert!(at < Duration::from_secs(2), "paused {at:?} after the jump");
    let b = server.wait_status(id, |b| b["paused"] == true);
    assert_eq!(b["why"], "fan_out_surge", "{b}");
    let measured = b["measured"]
        .as_str()
        .expect("the pause says what was measured");
    eprintln!("businesses status: {measured}");
    assert!(
        measured.contains("against a threshold of 5000/s")
            && measured.contains("declared baseline of 1000.0/s (60000/min)"),
        "{measured}"
    );
    assert!(!measured.contains("+4478"), "no number in the explanation");
}
