//! `courier send FILE --wait delivered` as a sender runs it: the binary against a real
//! server with a simulated edge. It counts the final statuses of its messages in the
//! summary, records them in `FILE.statuses` before acknowledging them (so a rerun waits
//! only for the others), writes users' replies heard meanwhile to `FILE.replies`, and
//! says in its exit status whether every message was delivered.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_loadgen::devices::{DeviceModel, Fate};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::delivery::InboundEntry;
use courier_pipeline::wire::LogPosition;
use courier_testkit::server::{self, client_config, Setup};

use super::delivery_kit::{recipient, DeviceEdge, EdgeSim};

const MESSAGES: u64 = 60;
const DEVICES: u64 = 40;
const MARKER: &str = "PRIVATE-CONTENT-";

fn model() -> DeviceModel {
    DeviceModel {
        seed: 3,
        offline_share: 0.0,
        period_secs: 1.0,
        fail_rate: 0.25,
        read_rate: 0.5,
        reply_rate: 0.0,
    }
}

fn write_file(path: &Path) {
    let text: String = (1..=MESSAGES)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"recipient\": \"{}\", \"payload\": \"{MARKER}{i}\"}}\n",
                recipient(i, DEVICES).as_str()
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// `name value` rows of a summary.
fn rows(out: &Output) -> BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

fn send(addr: std::net::SocketAddr, cert: &Path, file: &Path, token: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("send")
        .arg(file)
        .arg("--target")
        .arg(addr.to_string())
        .arg("--ca")
        .arg(cert)
        .args(["--quiet", "--wait", "delivered", "--wait-timeout", "3"])
        .env("COURIER_TOKEN", token)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_for_final_statuses_counts_them_and_resumes() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::default();
        let token = server::add_exempt(&mut registry, "shop", &[8u8; 32]);
        // The shop's id from the registry, not from a connection of its own: a business
        // connection still open when the reply below arrives would be handed the reply,
        // and the rerun would hear it only once the server gave up on that connection.
        let shop = registry.authenticate(token.as_bytes()).unwrap().id;
        let (id, edge_token) = registry
            .add("edge", Tier::Unlimited, 1_000, &[9u8; 32])
            .unwrap();
        registry.set_platform(id, true);
        // One shard: the relay pushes a business's events in log order per shard, and the
        // rerun below stops once every final status is in. With the reply and the
        // statuses on one log, and the reply made durable before any outcome, the reply
        // is pushed before the last final status, whatever the machine's load. (On two
        // shards the reply could sit on the other one and arrive after the rerun ended:
        // not lost, it waits for the shop's next connection, but not in this run.)
        let running = server::start(&dir.path().join("data"), Setup::new(1, registry));
        let cert = dir.path().join("cert.der");
        std::fs::write(&cert, running.certificate().as_ref()).unwrap();
        let file = dir.path().join("m.jsonl");
        write_file(&file);
        let addr = running.local_addr();
        let statuses = dir.path().join("m.jsonl.statuses");
        let replies = dir.path().join("m.jsonl.replies");

        // No edge yet: every message is acked, none hears its fate in time: exit 1.
        let cmd_token = token.clone();
        let (c1, f1) = (cert.clone(), file.clone());
        let first = tokio::task::spawn_blocking(move || send(addr, &c1, &f1, &cmd_token))
            .await
            .unwrap();
        let r = rows(&first);
        assert_eq!(first.status.code(), Some(1), "{r:?}");
        assert_eq!(r["accepted"], MESSAGES.to_string());
        assert_eq!(r["no_final_status"], MESSAGES.to_string());
        assert_eq!(r["delivered"], "0");

        // The edge comes; a user has written to the shop meanwhile.
        let sim = EdgeSim::new(model());
        let (edge, deliveries) = DeviceEdge::connect(
            &client_config(&running, &edge_token, 1, 1),
            64,
            sim.world.clone(),
        )
        .await
        .unwrap();
        let edge = Arc::new(edge);
        let reply = InboundEntry {
            id: 1,
            business_id: shop,
            sender: recipient(7, DEVICES),
            payload: Bytes::from_static(b"PRIVATE-CONTENT-reply"),
        };
        edge.inbound(vec![reply]).await.unwrap();
        // Outcomes only from here: every final status comes after the durable reply.
        let serving = tokio::spawn(sim.clone().serve(edge.clone(), deliveries));

        // The rerun sends nothing and waits for every acked message's final status.
        let (c2, f2, t2) = (cert.clone(), file.clone(), token.clone());
        let second = tokio::task::spawn_blocking(move || send(addr, &c2, &f2, &t2))
            .await
            .unwrap();
        let r = rows(&second);
        let failed = (1..=MESSAGES)
            .filter(|&i| {
                model().fate(&recipient(i, DEVICES), LogPosition(0), 0.0) == Fate::NotOnPlatform
            })
            .count() as u64;
        assert!(
            failed > 0 && failed < MESSAGES,
            "the model fails some numbers"
        );
        assert_eq!(r["to_send"], "0", "{r:?}");
        assert_eq!(r["delivered"], (MESSAGES - failed).to_string(), "{r:?}");
        assert_eq!(r["failed.not_on_platform"], failed.to_string());
        assert_eq!(
            (r["no_final_status"].as_str(), r["expired"].as_str()),
            ("0", "0")
        );
        assert!(r["read"].parse::<u64>().unwrap() > 0);
        assert_eq!(r["replies"], "1");
        assert_eq!(second.status.code(), Some(1), "some failed: {r:?}");
        let lines = std::fs::read_to_string(&statuses).unwrap();
        assert!(lines.lines().count() as u64 >= MESSAGES, "{lines}");
        assert!(
            !lines.contains('+') && !lines.contains(MARKER),
            "ids and status names only: {lines}"
        );
        let reply_lines = std::fs::read_to_string(&replies).unwrap();
        assert_eq!(reply_lines.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(reply_lines.trim()).unwrap();
        assert_eq!(v["sender"], recipient(7, DEVICES).as_str());

        // Everything acked and final: a third run needs no server and says the same.
        running.shutdown();
        running.join().unwrap();
        serving.abort();
        let (c3, f3, t3) = (cert.clone(), file.clone(), token.clone());
        let third = tokio::task::spawn_blocking(move || send(addr, &c3, &f3, &t3))
            .await
            .unwrap();
        let r3 = rows(&third);
        for k in [
            "delivered",
            "read",
            "failed.not_on_platform",
            "no_final_status",
        ] {
            assert_eq!(r3[k], r[k], "{k}: {r3:?}");
        }
        // Nothing printed holds a number or the content.
        for out in [&first, &second, &third] {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!text.contains(MARKER), "{text}");
            assert!(!text.contains("+1555"), "{text}");
        }
    })
    .await
    .expect("test timed out");
}
