//! SIGTERM under load, as an operator sends it: several connections keep submitting when
//! `courier serve` gets SIGTERM. At the client, every batch ends with a status (its ACK)
//! or with the server's `SHUTTING_DOWN` connection close, never a timeout or another
//! error; the server exits 0; `courier log audit` finds every acknowledged message in
//! the log, and the log holds no message whose ACK the stop swallowed.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, ClientError, OutgoingMessage};
use courier_pipeline::wire::{code, Recipient, Status};
use courier_testkit::spawn::{self, Files, Serve};
use quinn::{ConnectionError, VarInt};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "5d2e8a1c3b7f9e0d4a6c8b2f1e3d5c7a9b0e2d4f6a8c1b3e5d7f9a0c2e4b6d8f";
const CONNECTIONS: usize = 4;
/// Submit loops per connection: with 2 streams of 2 batches each, every loop has a batch
/// in flight at all times.
const SENDERS_PER_CONNECTION: usize = 4;
const BATCH_MESSAGES: usize = 16;
/// Bounds each sender's loop; a run ends long before (the server stops).
const BATCHES_PER_SENDER_MAX: u64 = 100_000;
/// Answered batches (all senders) before the signal: the load is in full swing.
const ANSWERED_BEFORE_SIGNAL: u64 = 200;
/// Longer than any wait of a graceful stop; reaching it is a failure, not an outcome.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a sender's last batch ended, seen from the client (every earlier one was
/// answered with a status per message).
#[derive(Debug)]
enum Outcome {
    /// The server closed the connection with SHUTTING_DOWN before answering it.
    ClosedByShutdown,
    /// Anything else: a failure of the graceful stop.
    Failed(String),
}

/// Submits batches back to back until the connection goes; returns the accepted
/// messages (client id, log position) and how the last batch ended.
async fn sender(
    client: Arc<Client>,
    first_id: u64,
    answered: Arc<AtomicU64>,
) -> (Vec<(u64, u64)>, u64, Outcome) {
    let mut accepted = Vec::new();
    let mut batches_answered = 0u64;
    for seq in 0..BATCHES_PER_SENDER_MAX {
        let base = first_id + seq * BATCH_MESSAGES as u64;
        let batch: Vec<OutgoingMessage> = (0..BATCH_MESSAGES as u64)
            .map(|i| {
                let id = base + i;
                // A distinct recipient per message, as a bulk sender's list would have.
                let number = format!("+1555{:07}", id % 10_000_000);
                OutgoingMessage {
                    client_id: id,
                    recipient: Recipient::parse(number.as_bytes()).unwrap(),
                    payload: Bytes::from(vec![b'x'; 256]),
                }
            })
            .collect();
        let ids: Vec<u64> = batch.iter().map(|m| m.client_id).collect();
        match tokio::time::timeout(SUBMIT_TIMEOUT, client.submit(batch)).await {
            Ok(Ok(statuses)) => {
                assert_eq!(statuses.len(), ids.len(), "one status per message");
                for (id, s) in ids.iter().zip(&statuses) {
                    if let Status::Accepted(p) = s {
                        accepted.push((*id, p.0));
                    }
                }
                batches_answered += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(ClientError::ConnectionLost(ConnectionError::ApplicationClosed(c))))
                if c.error_code == VarInt::from_u32(code::SHUTTING_DOWN) =>
            {
                return (accepted, batches_answered, Outcome::ClosedByShutdown);
            }
            Ok(Err(e)) => return (accepted, batches_answered, Outcome::Failed(e.to_string())),
            Err(_) => {
                return (
                    accepted,
                    batches_answered,
                    Outcome::Failed(format!("no answer within {SUBMIT_TIMEOUT:?}")),
                )
            }
        }
    }
    (
        accepted,
        batches_answered,
        Outcome::Failed("the server never stopped".into()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_or_cleanly_closes_every_batch_and_keeps_every_ack() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), MASTER_HEX);
    let data = files.data.clone();
    let key_file = files.key_file.clone();
    let token = spawn::add_business(
        super::courier_bin(),
        &files.registry,
        "bulk",
        &["--tier", "unlimited", "--mps", "10000000"],
    );
    let addr = spawn::free_port();
    let log_path = dir.path().join("serve.log");
    let mut server = Serve::new(super::courier_bin(), &files, addr, &log_path).spawn();
    let cert = CertificateDer::from(std::fs::read(data.join("tls/cert.der")).unwrap());
    let cfg = ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token,
        trust: ServerTrust::Pinned(cert),
        streams: 2,
        batches_in_flight_per_stream: 2,
    };

    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut senders = Vec::new();
    for c in 0..CONNECTIONS {
        let client = Arc::new(
            tokio::time::timeout(Duration::from_secs(30), Client::connect(&cfg))
                .await
                .expect("connect timed out")
                .unwrap(),
        );
        for s in 0..SENDERS_PER_CONNECTION {
            // Disjoint client ids per sender.
            let first_id = ((c * SENDERS_PER_CONNECTION + s) as u64 + 1) << 40;
            senders.push(tokio::spawn(sender(
                client.clone(),
                first_id,
                answered.clone(),
            )));
        }
        clients.push(client);
    }
    let business = clients[0].welcome().business_id;

    // Let the load run, then signal while every sender still has a batch in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::Relaxed) < ANSWERED_BEFORE_SIGNAL {
        assert!(Instant::now() < deadline, "the load never got going");
        assert!(
            senders.iter().all(|s| !s.is_finished()),
            "a sender stopped before the signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.terminate();
    let answered_at_signal = answered.load(Ordering::Relaxed);

    let mut accepted = Vec::new();
    let mut closed = 0;
    for s in senders {
        let (acc, batches, outcome) = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("a sender hung")
            .unwrap();
        assert!(
            batches > 0,
            "every sender had batches answered before the stop"
        );
        match outcome {
            Outcome::ClosedByShutdown => closed += 1,
            Outcome::Failed(e) => panic!("a batch in flight at SIGTERM failed: {e}"),
        }
        accepted.extend(acc);
    }
    // Every sender was still sending when the signal came: its last batch ended with the
    // server's close, not with an answer.
    assert_eq!(closed, CONNECTIONS * SENDERS_PER_CONNECTION);
    assert!(answered.load(Ordering::Relaxed) >= answered_at_signal);
    assert!(!accepted.is_empty(), "some messages were accepted");

    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("courier stopped"), "{log}");

    // Every acknowledged message is in the log: the operator's audit, from a list in the
    // format `courier-loadgen --accepted` writes.
    let list = dir.path().join("accepted.csv");
    let mut csv = String::from("business_id,client_id,log_position\n");
    for (id, pos) in &accepted {
        csv.push_str(&format!("{business},{id},{pos}\n"));
    }
    std::fs::write(&list, csv).unwrap();
    let audit = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["log", "audit", "--accepted"])
        .arg(&list)
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(
        report.contains(&format!(
            "present {}, missing 0, mismatched 0",
            accepted.len()
        )),
        "{report}"
    );

    // And no more: every durable message was acknowledged to its sender. Closing right
    // after the last group commit used to discard ACKs that quinn had not sent yet, so
    // the log held whole batches their senders only saw fail with the close.
    let verify = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["log", "verify"])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let verified = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{verified}");
    let records: usize = verified
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" segment(s), ")?;
            rest.split_once(" record(s) verified")?.0.parse().ok()
        })
        .unwrap_or_else(|| panic!("no summary line: {verified}"));
    assert_eq!(
        records,
        accepted.len(),
        "records in the log vs messages acknowledged to the clients"
    );
}
