//! A registry reload reaches live sessions (issue 18): within about a second every
//! connection whose credential the new registry removed, rotated or stripped of its
//! platform role is closed `unauthorized`; the others carry on. A business added while it
//! runs sends at once (its root key is created by the reload).

use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::{Client, ClientConfig, ClientError, OutgoingMessage, ServerTrust};
use courier_pipeline::registry::Registry;
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::spawn::{self, Files, Serve};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "5b1c2d3e4a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f0a1b2c3d4e5f";

fn batch(id: u64) -> Vec<OutgoingMessage> {
    vec![OutgoingMessage {
        client_id: id,
        recipient: Recipient::parse(b"+447700900123").unwrap(),
        payload: Bytes::from_static(b"revocation test"),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_revoked_sessions_within_a_second_and_spares_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), MASTER_HEX);
    let bin = super::courier_bin();
    let add = |name: &str, extra: &[&str]| {
        let mut args = vec!["--tier", "unlimited", "--mps", "100000", "--exempt"];
        args.extend_from_slice(extra);
        spawn::add_business(bin, &files.registry, name, &args)
    };
    let keep = add("keep", &[]);
    let gone = add("gone", &[]);
    let rotated = add("rotated", &[]);
    let edge = add("edge", &["--platform"]);
    let addr = spawn::free_port();
    let mut server = Serve::new(bin, &files, addr, &dir.path().join("serve.log")).spawn();
    let cert = CertificateDer::from(std::fs::read(files.data.join("tls/cert.der")).unwrap());
    let config = |token: &str| ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: token.into(),
        trust: ServerTrust::Pinned(cert.clone()),
        streams: 1,
        batches_in_flight_per_stream: 1,
    };

    tokio::time::timeout(Duration::from_secs(60), async {
        let mut clients = Vec::new();
        for token in [&keep, &gone, &rotated, &edge] {
            clients.push(Client::connect(&config(token)).await.unwrap());
        }
        for (i, c) in clients.iter().take(3).enumerate() {
            let st = c.submit(batch(i as u64 + 1)).await.unwrap();
            assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        }

        // The operator's new registry: "gone" removed, "rotated" with a new token hash,
        // "edge" no longer a platform credential; "keep" as it was.
        let text = std::fs::read_to_string(&files.registry).unwrap();
        let mut reg = Registry::from_toml(&text).unwrap();
        let edge_id = clients[3].welcome().business_id;
        assert!(reg.set_platform(edge_id, false));
        let gone_id = clients[1].welcome().business_id;
        let rotated_id = clients[2].welcome().business_id;
        let mut out = String::new();
        for block in reg
            .to_toml()
            .split("[[business]]")
            .filter(|b| !b.trim().is_empty())
        {
            if block.contains(&format!("\nid = {gone_id}\n")) {
                continue;
            }
            let block = if block.contains(&format!("\nid = {rotated_id}\n")) {
                let at = block.find("token_sha256 = \"").unwrap() + "token_sha256 = \"".len();
                format!("{}{}{}", &block[..at], "ab".repeat(32), &block[at + 64..])
            } else {
                block.to_string()
            };
            out.push_str("[[business]]");
            out.push_str(&block);
        }
        let changed = Instant::now();
        std::fs::write(&files.registry, out).unwrap();

        // The control thread polls the file once a second; the shards close at once.
        let mut closed_after = [None; 4];
        let deadline = changed + Duration::from_secs(5);
        while Instant::now() < deadline && closed_after[1..].iter().any(Option::is_none) {
            for (i, c) in clients.iter().enumerate() {
                if closed_after[i].is_none() {
                    if let Some(reason) = c.close_reason() {
                        assert!(
                            matches!(reason, ClientError::Unauthorized),
                            "{i}: {reason:?}"
                        );
                        closed_after[i] = Some(changed.elapsed());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (i, name) in [(1, "removed"), (2, "rotated"), (3, "no longer platform")] {
            let after = closed_after[i].unwrap_or_else(|| panic!("the {name} session lives on"));
            // One poll interval of the control thread plus a round trip.
            assert!(
                after < Duration::from_millis(2_500),
                "{name}: closed after {after:?}"
            );
        }
        assert!(
            closed_after[0].is_none(),
            "the unchanged credential was closed"
        );
        let st = clients[0].submit(batch(10)).await.unwrap();
        assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        eprintln!("revoked sessions closed after {:?}", &closed_after[1..]);

        // A business added while the server runs sends at once: the reload creates its
        // root key, and its first message is sealed and accepted.
        let late = add("late", &[]);
        let added = Instant::now();
        let late_client = loop {
            match Client::connect(&config(&late)).await {
                Ok(c) => break c,
                Err(ClientError::Unauthorized) if added.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the added business cannot connect: {e}"),
            }
        };
        let st = late_client.submit(batch(20)).await.unwrap();
        assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        eprintln!(
            "a business added while running sent after {:?}",
            added.elapsed()
        );
    })
    .await
    .expect("test timed out");
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert!(server.log_text().contains("revoked their credentials"));
}
