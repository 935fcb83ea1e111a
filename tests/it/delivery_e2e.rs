//! Delivery end to end through the real `courier serve` binary: two businesses send
//! messages, a simulated edge delivers them with a fifth of the devices offline for a
//! while (and some numbers not on the platform), and every accepted message ends
//! `delivered` (maybe `read`), `failed` or `expired` at its own business, with exactly one
//! final status after copies are dropped by event id. The same with the server SIGKILLed
//! at random moments (10 rounds), and with the edge's and the businesses' connections
//! dropped and made again.
//!
//! The server seals for devices (the default profile's `[e2e]`, issue 16): the edge's
//! devices hold real keys, and every message they were handed opened on every device of
//! its recipient to exactly what its business sent, and on no other device.
//!
//! Replay a failure with `COURIER_DELIVERY_SEED=<seed printed by the failing run>`.

use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_client::Client;
use courier_loadgen::devices::DeviceModel;
use courier_testkit::logkit::client_config;
use courier_testkit::spawn::{self, free_port, Files, Serve};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;
use tokio::task::JoinSet;

use super::delivery_kit::{
    eventually, listen, send_outstanding, DeviceEdge, EdgeSim, Ledger, Outcomes,
};

const MASTER_HEX: &str = "5d2e8f1a3c4b6d7e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";
/// Devices (recipients) of a run.
const DEVICES: u64 = 300;
/// New messages per business per cycle.
const PER_CYCLE: u64 = 400;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The wait for the last statuses once nothing is killed or dropped any more.
const SETTLE: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    std::env::var("COURIER_DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

struct World {
    files: Files,
    addr: SocketAddr,
    businesses: Vec<String>,
    edge: String,
    ledger: Arc<Ledger>,
    sim: Arc<EdgeSim>,
}

impl World {
    fn new(dir: &std::path::Path) -> World {
        let files = Files::new(dir, MASTER_HEX);
        let bin = super::courier_bin();
        let load = ["--tier", "unlimited", "--mps", "1000000", "--exempt"];
        let businesses = (0..2)
            .map(|i| spawn::add_business(bin, &files.registry, &format!("shop {i}"), &load))
            .collect();
        let edge = spawn::add_business(bin, &files.registry, "edge", &["--platform"]);
        World {
            files,
            addr: free_port(),
            businesses,
            edge,
            ledger: Arc::new(Ledger::default()),
            sim: EdgeSim::new(DeviceModel {
                seed: 1,
                offline_share: 0.2,
                period_secs: 1.0,
                fail_rate: 0.05,
                read_rate: 0.3,
                reply_rate: 0.0,
            }),
        }
    }

    fn spawn(&self, round: usize) -> Child {
        let log = self.files.data.with_extension(format!("stderr-{round}"));
        Serve::new(super::courier_bin(), &self.files, self.addr, &log)
            // A DELIVER handed to a connection that went away is handed again after
            // this (the default is 30 s); pushes unacknowledged as long are repeated.
            .env("COURIER_DELIVERY__OUTCOME_TIMEOUT_MS", "300")
            .env("COURIER_DELIVERY__EVENT_ACK_TIMEOUT_MS", "300")
            .spawn_unready()
            .child
    }

    fn log(&self, round: usize) -> String {
        std::fs::read_to_string(self.files.data.with_extension(format!("stderr-{round}")))
            .unwrap_or_default()
    }

    /// Waits until the server of `round` serves; panics if it exits or takes too long.
    async fn ready(&self, child: &mut Child, round: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log(round).contains("courier serving") {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: exited with {status}: {}", self.log(round));
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: not ready in time"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn config(&self, token: &str) -> courier_client::ClientConfig {
        let cert = std::fs::read(self.files.data.join("tls/cert.der")).unwrap();
        client_config(self.addr, CertificateDer::from(cert), token)
    }

    /// Connects the edge and both businesses, and starts the edge and the listeners on
    /// `tasks`; returns the connections.
    async fn connect(&self, tasks: &mut JoinSet<()>) -> (Arc<DeviceEdge>, Vec<Arc<Client>>) {
        let (edge, deliveries) =
            DeviceEdge::connect(&self.config(&self.edge), 256, self.sim.world.clone())
                .await
                .expect("the edge connects");
        assert!(edge.e2e(), "the default profile seals for devices");
        let edge = Arc::new(edge);
        tasks.spawn(self.sim.clone().serve(edge.clone(), deliveries));
        let mut clients = Vec::new();
        for token in &self.businesses {
            let (client, events) = Client::connect_with_events(&self.config(token), 16)
                .await
                .expect("a business connects");
            let client = Arc::new(client);
            tasks.spawn(listen(client.clone(), events, self.ledger.clone()));
            clients.push(client);
        }
        (edge, clients)
    }

    /// New messages for every business (their ids continue from the last ones), then
    /// senders of everything outstanding on `tasks`.
    fn more(&self, cycle: Option<u64>, clients: &[Arc<Client>], tasks: &mut JoinSet<()>) {
        for c in clients {
            if let Some(cycle) = cycle {
                let first = cycle * PER_CYCLE;
                self.ledger
                    .want(c.welcome().business_id, first..first + PER_CYCLE);
            }
            tasks.spawn(send_outstanding(c.clone(), self.ledger.clone(), DEVICES));
        }
    }
}

async fn close_all(edge: &DeviceEdge, clients: &[Arc<Client>], tasks: &mut JoinSet<()>) {
    edge.close().await;
    for c in clients {
        c.close().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}

/// The final phase: one server, connections kept until every message is answered and
/// every accepted one has its final status; then the ledger's checks.
async fn settle(w: &World, round: usize, first_cycle: Option<u64>) -> Outcomes {
    let mut child = w.spawn(round);
    w.ready(&mut child, round).await;
    let mut tasks = JoinSet::new();
    let (edge, clients) = w.connect(&mut tasks).await;
    w.more(first_cycle, &clients, &mut tasks);
    let done = eventually(SETTLE, || {
        w.ledger.outstanding_total() == 0 && w.ledger.unresolved() == 0
    })
    .await;
    close_all(&edge, &clients, &mut tasks).await;
    spawn::terminate(&child);
    let status = spawn::wait_exit(&mut child, Duration::from_secs(20));
    assert!(
        done,
        "{} unanswered, {} accepted without a final status after {SETTLE:?}",
        w.ledger.outstanding_total(),
        w.ledger.unresolved()
    );
    assert!(status.success(), "exit status {status}");
    let o = w.ledger.check();
    assert_opened(w, &o);
    o
}

/// Every accepted message the edge was handed opened on its devices to what its
/// business sent, and no copy opened on another device.
fn assert_opened(w: &World, o: &Outcomes) {
    let c = w.sim.device_counts();
    assert_eq!(
        (c.open_failures, c.cross_device_opened),
        (0, 0),
        "device checks: {c:?}"
    );
    assert!(
        c.cross_device_checks > 0 && c.sessions_accepted > 0,
        "{c:?}"
    );
    let mut handed = 0;
    for m in w.ledger.accepted_list() {
        if let Some(plain) = w.sim.opened(m.position) {
            handed += 1;
            assert_eq!(
                plain,
                format!("delivery test message {}", m.client_id).as_bytes(),
                "message {} of business {}",
                m.client_id,
                m.business_id
            );
        }
    }
    // Every delivered or failed (not on the platform) message was handed over.
    assert!(handed >= o.delivered + o.failed, "{handed} handed, {o:?}");
}

fn assert_outcomes(o: &Outcomes, min_accepted: usize) {
    assert!(o.accepted >= min_accepted, "{o:?}");
    assert_eq!(o.delivered + o.failed + o.expired, o.accepted, "{o:?}");
    assert!(o.delivered > 0 && o.failed > 0 && o.read > 0, "{o:?}");
    assert_eq!(o.expired, 0, "nothing lives shorter than the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_ends_with_one_final_status_at_its_business() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(dir.path());
        let o = settle(&w, 0, Some(0)).await;
        assert_outcomes(&o, 2 * PER_CYCLE as usize);
        assert!(
            w.sim.handoffs() > o.accepted as u64,
            "offline devices' messages were handed more than once"
        );
        // The operator's view agrees: `courier log audit` reads the status records.
        let list = dir.path().join("accepted.csv");
        let mut csv = Vec::new();
        courier::audit::write_accepted(&mut csv, &w.ledger.accepted_list()).unwrap();
        std::fs::write(&list, csv).unwrap();
        let out = std::process::Command::new(super::courier_bin())
            .args(["log", "audit", "--require-outcome", "--accepted"])
            .arg(&list)
            .arg(&w.files.data)
            .arg("--master-key-file")
            .arg(&w.files.key_file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("present {}, missing 0, mismatched 0", o.accepted)),
            "{text}"
        );
        let line = format!(
            "outcomes: delivered {} (read {}), failed {} (not_on_platform {}), expired 0, \
             no final status 0, more than one final status 0",
            o.delivered, o.read, o.failed, o.failed
        );
        assert!(text.contains(&line), "{text}\nwant {line}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_at_random_moments_no_status_is_lost_or_doubled() {
    const KILLS: usize = 10;
    let seed = seed();
    eprintln!("COURIER_DELIVERY_SEED={seed}");
    tokio::time::timeout(Duration::from_secs(240), async {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(dir.path());
        for round in 0..KILLS {
            let mut child = w.spawn(round);
            w.ready(&mut child, round).await;
            let mut tasks = JoinSet::new();
            let (edge, clients) = w.connect(&mut tasks).await;
            w.more(Some(round as u64), &clients, &mut tasks);
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
            child.kill().unwrap();
            child.wait().unwrap();
            close_all(&edge, &clients, &mut tasks).await;
        }
        let o = settle(&w, KILLS, None).await;
        assert_outcomes(&o, PER_CYCLE as usize);
        eprintln!("after {KILLS} kills: {o:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; COURIER_DELIVERY_SEED={seed}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_edge_and_business_connections_lose_nothing() {
    const CYCLES: u64 = 6;
    let seed = seed();
    eprintln!("COURIER_DELIVERY_SEED={seed}");
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(dir.path());
        let mut child = w.spawn(0);
        w.ready(&mut child, 0).await;
        for cycle in 0..CYCLES {
            let mut tasks = JoinSet::new();
            let (edge, clients) = w.connect(&mut tasks).await;
            w.more(Some(cycle), &clients, &mut tasks);
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
            // Drop one side first, the other a little later, in either order.
            let gap = Duration::from_millis(rng.random_range(0..200));
            if rng.random_bool(0.5) {
                edge.close().await;
                tokio::time::sleep(gap).await;
            } else {
                for c in &clients {
                    c.close().await;
                }
                tokio::time::sleep(gap).await;
            }
            close_all(&edge, &clients, &mut tasks).await;
        }
        spawn::terminate(&child);
        spawn::wait_exit(&mut child, Duration::from_secs(20));
        let o = settle(&w, 1, None).await;
        assert_outcomes(&o, (CYCLES * PER_CYCLE) as usize);
        eprintln!("after {CYCLES} drops: {o:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; COURIER_DELIVERY_SEED={seed}"));
}
