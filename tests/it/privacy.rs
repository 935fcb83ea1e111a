//! Privacy and graceful stop, as an operator sees them: `courier serve` at the most verbose
//! log level, under traffic with known phone numbers and payloads, stopped with SIGTERM.
//! Its output never holds a phone number, a payload, the token or the master key, in
//! text or JSON log format (where every line is a JSON object), nor does the access log
//! a `courier log verify` of its data leaves; it exits 0; and every message it
//! acknowledged is in its log.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::audit::{self, AcceptedEntry};
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::spawn::{self, Files, Serve};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "3c1f5e7a9b2d4c6e8f0a1b3c5d7e9f2a4b6c8d0e1f3a5b7c9d2e4f6a8b0c1d3e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_content_and_sigterm_keeps_every_ack() {
    let stderr = serve_at_trace_under_traffic_then_sigterm(None).await;
    assert!(
        !stderr.trim_start().starts_with('{'),
        "text is the default format"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_trace_logs_hold_no_content_and_every_line_is_json() {
    let stderr = serve_at_trace_under_traffic_then_sigterm(Some("json")).await;
    let mut lines = 0;
    let mut messages = Vec::new();
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        if let Some(m) = v.pointer("/fields/message").and_then(|m| m.as_str()) {
            messages.push(m.to_string());
        }
        lines += 1;
    }
    assert!(lines > 10, "trace logging produced {lines} lines");
    for expected in ["courier serving", "courier stopped"] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} event in {messages:?}"
        );
    }
}

/// Runs `courier serve` at TRACE (with `COURIER_LOG_FORMAT` when given) under traffic
/// with known numbers and payloads, stops it with SIGTERM, and checks the exit status,
/// the log and that no number, payload, token or key appears in its output. Returns
/// what it wrote to stderr.
async fn serve_at_trace_under_traffic_then_sigterm(log_format: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), MASTER_HEX);
    let data = files.data.clone();
    let token = spawn::add_business(
        super::courier_bin(),
        &files.registry,
        "privacy",
        &[
            "--tier",
            "unlimited",
            "--mps",
            "100000",
            // 60 new numbers in well under a second is a surge; this test is about logs.
            "--exempt",
        ],
    );
    let addr = spawn::free_port();
    let log_path = dir.path().join("serve.log");
    let mut server = Serve::new(super::courier_bin(), &files, addr, &log_path)
        .env("COURIER_LOG", "trace")
        .env("COURIER_LOG_FORMAT", log_format.unwrap_or("text"))
        .stdout_to(&dir.path().join("serve.out"))
        .spawn();

    // Distinctive numbers and payloads, to be searched for in the output afterwards.
    let messages: Vec<(u64, Recipient, String)> = (0..60u64)
        .map(|i| {
            let number = format!("+4478{:08}", 31_415_926 + i * 1_009);
            let payload = format!("PRIVATE-PAYLOAD-{i}-the-door-code-is-{}", 7_000 + i);
            (i + 1, Recipient::parse(number.as_bytes()).unwrap(), payload)
        })
        .collect();
    let cert = CertificateDer::from(std::fs::read(data.join("tls/cert.der")).unwrap());
    let cfg = ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: token.clone(),
        trust: ServerTrust::Pinned(cert),
        streams: 2,
        batches_in_flight_per_stream: 2,
    };
    let acked = tokio::time::timeout(Duration::from_secs(60), async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let business = client.welcome().business_id;
        let mut acked = Vec::new();
        for chunk in messages.chunks(10) {
            let batch = chunk
                .iter()
                .map(|(id, r, p)| OutgoingMessage {
                    client_id: *id,
                    recipient: *r,
                    payload: Bytes::from(p.clone().into_bytes()),
                })
                .collect();
            let statuses = client.submit(batch).await.unwrap();
            for ((id, _, _), s) in chunk.iter().zip(statuses) {
                let Status::Accepted(position) = s else {
                    panic!("expected accepted, got {s:?}");
                };
                acked.push(AcceptedEntry {
                    business_id: business,
                    client_id: *id,
                    position,
                });
            }
        }
        acked
    })
    .await
    .expect("traffic timed out");

    // SIGTERM: a graceful stop, exit status 0 within a bound.
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");

    // Every acknowledged message is in the log.
    let master = MasterKeyText::new(MASTER_HEX.as_bytes().to_vec()).unwrap();
    let report = audit::audit(&data, &master, &acked).unwrap();
    assert_eq!(
        (report.present, report.missing, report.mismatched),
        (acked.len() as u64, 0, 0)
    );

    // The operator's read of the log leaves a trace in the access log (issue 19).
    let verify = std::process::Command::new(super::courier_bin())
        .args(["log", "verify"])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&files.key_file)
        .output()
        .unwrap();
    assert!(verify.status.success());
    let access = std::fs::read_to_string(data.join("access.log")).unwrap();
    assert_eq!(access.lines().count(), 1, "{access}");
    assert!(access.contains("\"log verify\""), "{access}");

    // Nothing identifying or secret in anything the server wrote, nor in the access log.
    let stderr = std::fs::read_to_string(&log_path).unwrap();
    let mut output = stderr.clone();
    output.push_str(&std::fs::read_to_string(dir.path().join("serve.out")).unwrap());
    output.push_str(&access);
    output.push_str(&String::from_utf8_lossy(&verify.stdout));
    assert!(output.len() > 1000, "trace logging produced output");
    // The metrics address is logged at start-up (small.toml asks for port 0: a real one).
    assert!(output.contains("metrics on http://127.0.0.1:"), "{output}");
    assert!(!output.contains("metrics on http://127.0.0.1:0/"));
    for (_, recipient, payload) in &messages {
        let digits = &recipient.as_str()[1..];
        assert!(
            !output.contains(digits),
            "a phone number leaked into the logs"
        );
        assert!(
            !output.contains(payload.as_str()),
            "a payload leaked into the logs"
        );
    }
    assert!(!output.contains("PRIVATE-PAYLOAD"), "payload text leaked");
    assert!(!output.contains(&token[5..]), "the token leaked");
    assert!(!output.contains(MASTER_HEX), "the master key leaked");
    stderr
}

/// Delivery at TRACE: statuses (sent, delivered, read, failed, expired after a short
/// time to live), a recipient offline then back (retry_later, ONLINE), users' replies
/// with their own numbers and words, and events acknowledged; nothing of a number, a
/// payload, a reply, a token or the key reaches the server's output, nor the `Debug`
/// output of what the business hears. Sealed end to end (the default profile, issue 16):
/// no device's key (identity, prekeys) reaches the output or any file of the data
/// directory (the device directory and the sessions live in memory only), and every
/// message opened on its devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_at_trace_logs_ids_never_numbers_or_content() {
    use super::delivery_kit::{device_world, DeviceEdge};
    use courier_pipeline::wire::delivery::{
        BusinessEvent, FailReason, InboundEntry, Outcome, OutcomeEntry,
    };
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), MASTER_HEX);
    let bin = super::courier_bin();
    let token = spawn::add_business(
        bin,
        &files.registry,
        "privacy shop",
        &["--tier", "unlimited", "--mps", "100000", "--exempt"],
    );
    let edge_token = spawn::add_business(bin, &files.registry, "privacy edge", &["--platform"]);
    let addr = spawn::free_port();
    let log_path = dir.path().join("serve.log");
    let mut server = Serve::new(bin, &files, addr, &log_path)
        .env("COURIER_LOG", "trace")
        .stdout_to(&dir.path().join("serve.out"))
        .spawn();
    let numbers: Vec<Recipient> = (0..20u64)
        .map(|i| {
            Recipient::parse(format!("+4479{:08}", 27_182_818 + i * 7_919).as_bytes()).unwrap()
        })
        .collect();
    let repliers: Vec<Recipient> = (0..5u64)
        .map(|i| Recipient::parse(format!("+3361{:07}", 4_142_135 + i * 31).as_bytes()).unwrap())
        .collect();
    let cert = CertificateDer::from(std::fs::read(files.data.join("tls/cert.der")).unwrap());
    let cfg = |token: &str| ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(cert.clone()),
        streams: 1,
        batches_in_flight_per_stream: 2,
    };
    let world = device_world(11);
    // What the devices publish: public, but linked to numbers.
    let mut device_keys: Vec<[u8; 32]> = Vec::new();
    let heard = tokio::time::timeout(Duration::from_secs(60), async {
        let (client, mut events) = Client::connect_with_events(&cfg(&token), 8).await.unwrap();
        let (edge, mut deliveries) = DeviceEdge::connect(&cfg(&edge_token), 64, world.clone())
            .await
            .unwrap();
        assert!(edge.e2e());
        let shop = client.welcome().business_id;
        let batch: Vec<OutgoingMessage> = numbers
            .iter()
            .enumerate()
            .map(|(i, r)| OutgoingMessage {
                client_id: i as u64,
                recipient: *r,
                payload: Bytes::from(format!(
                    "PRIVATE-PAYLOAD-{i}-the-door-code-is-{}",
                    9_000 + i
                )),
            })
            .collect();
        let (short, long) = batch.split_at(2);
        client.submit_ttl(short.to_vec(), 1).await.unwrap();
        client.submit(long.to_vec()).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..numbers.len() {
            let d = deliveries.recv().await.unwrap();
            assert!(
                d.payload.starts_with(b"PRIVATE-PAYLOAD-"),
                "opened on the devices"
            );
            let outcome = match d.client_id % 5 {
                _ if d.client_id < 2 => Outcome::RetryLater,
                0 => Outcome::Failed(FailReason::BlockedByUser),
                1 => {
                    waiting.push(d.recipient);
                    Outcome::RetryLater
                }
                2 => Outcome::Read,
                _ => Outcome::Delivered,
            };
            edge.outcomes(&[OutcomeEntry {
                message: d.message,
                outcome,
            }])
            .await
            .unwrap();
        }
        edge.online(&waiting).await.unwrap();
        for _ in 0..waiting.len() {
            let d = deliveries.recv().await.unwrap();
            edge.outcomes(&[OutcomeEntry {
                message: d.message,
                outcome: Outcome::Delivered,
            }])
            .await
            .unwrap();
        }
        let replies: Vec<InboundEntry> = repliers
            .iter()
            .enumerate()
            .map(|(i, r)| InboundEntry {
                id: i as u64,
                business_id: shop,
                sender: *r,
                payload: Bytes::from(format!("PRIVATE-REPLY-{i}-call-me-at-home")),
            })
            .collect();
        edge.inbound(replies).await.unwrap();
        // Everything the shop hears, acknowledged, until both short-lived ones expired.
        let mut heard = Vec::new();
        let mut expired = 0;
        while expired < 2 {
            let e = events.recv().await.unwrap();
            client.ack_events(&[e.event()]).await.unwrap();
            if let BusinessEvent::Status(s) = &e {
                expired += usize::from(s.kind.name() == "expired");
            }
            heard.push(e);
        }
        client.close().await;
        edge.close().await;
        {
            let mut w = world.lock().unwrap();
            for r in &numbers {
                let list = w.bundles(r).unwrap();
                for b in courier_pipeline::e2e::decode_bundles(&list).unwrap() {
                    device_keys.push(b.identity_key);
                    device_keys.push(b.signed_prekey.public);
                    device_keys.extend(b.one_time_prekeys.iter().map(|k| k.public));
                }
            }
        }
        heard
    })
    .await
    .expect("traffic timed out");
    assert!(heard.iter().any(|e| matches!(e, BusinessEvent::Inbound(_))));

    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    let mut output = std::fs::read_to_string(&log_path).unwrap();
    output.push_str(&std::fs::read_to_string(dir.path().join("serve.out")).unwrap());
    assert!(output.len() > 1000, "trace logging produced output");
    for r in numbers.iter().chain(&repliers) {
        assert!(
            !output.contains(&r.as_str()[1..]),
            "a phone number leaked into the logs"
        );
    }
    for secret in [
        "PRIVATE-PAYLOAD",
        "PRIVATE-REPLY",
        "door-code",
        "call-me-at-home",
    ] {
        assert!(
            !output.contains(secret),
            "content leaked into the logs: {secret}"
        );
    }
    for t in [&token, &edge_token] {
        assert!(!output.contains(&t[5..]), "a token leaked");
    }
    assert!(!output.contains(MASTER_HEX), "the master key leaked");
    let c = world.lock().unwrap().counts();
    assert!(c.messages_opened > 0 && c.replies_sealed == 5, "{c:?}");
    assert_eq!((c.open_failures, c.cross_device_opened), (0, 0), "{c:?}");
    // No device key in the output or in any file the server wrote (raw or hex).
    let mut files_bytes = Vec::new();
    let mut stack = vec![files.data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files_bytes.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    assert!(!device_keys.is_empty());
    for k in &device_keys {
        let hexed = hex::encode(k);
        assert!(
            !output.contains(&hexed),
            "a device key leaked into the logs"
        );
        for (p, bytes) in &files_bytes {
            assert!(
                !bytes.windows(32).any(|w| w == k),
                "a device key is in {}",
                p.display()
            );
            assert!(
                !bytes.windows(64).any(|w| w == hexed.as_bytes()),
                "a device key (hex) is in {}",
                p.display()
            );
        }
    }
    // The events' own Debug output (what a business might log) hides numbers and words.
    let debug = format!("{heard:?}");
    assert!(!debug.contains("PRIVATE-REPLY"), "{debug}");
    for r in &repliers {
        assert!(!debug.contains(&r.as_str()[1..]), "{debug}");
    }
}
