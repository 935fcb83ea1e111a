//! Users' replies through the real `courier serve` binary: the edge hands them over
//! (INBOUND, ACKed `accepted(position)` once durable), each reaches the business it was
//! written to, never another; a business that drops its connection before acknowledging
//! hears them again (same event ids), and once acknowledged never again, across a
//! graceful restart; a reply not yet acknowledged survives a SIGKILL. Each business's
//! inbound figure (replies received today) counts each reply once, across both restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::{Client, ClientConfig, EventReceiver};
use courier_pipeline::wire::delivery::{BusinessEvent, InboundEntry};
use courier_pipeline::wire::{Reason, Recipient, Status};
use courier_testkit::logkit::client_config;

use super::delivery_kit::DeviceEdge;
use courier_testkit::spawn::{self, free_port, Files, Serve, Spawned};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "7a1e2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

struct World {
    files: Files,
    addr: std::net::SocketAddr,
    shops: [String; 2],
    edge: String,
}

impl World {
    fn serve(&self, round: usize) -> Spawned {
        let log = self.files.data.with_extension(format!("stderr-{round}"));
        Serve::new(super::courier_bin(), &self.files, self.addr, &log).spawn()
    }

    fn config(&self, token: &str) -> ClientConfig {
        let cert = std::fs::read(self.files.data.join("tls/cert.der")).unwrap();
        client_config(self.addr, CertificateDer::from(cert), token)
    }

    async fn shop(&self, i: usize) -> (Client, EventReceiver) {
        Client::connect_with_events(&self.config(&self.shops[i]), 8)
            .await
            .unwrap()
    }

    /// An edge whose devices seal replies to the businesses' keys (the relay opens
    /// them: issue 16).
    async fn edge(&self) -> DeviceEdge {
        let world = super::delivery_kit::device_world(3);
        let edge = DeviceEdge::connect(&self.config(&self.edge), 16, world)
            .await
            .unwrap()
            .0;
        assert!(edge.e2e(), "the default profile seals end to end");
        edge
    }
}

fn business_of(token: &str) -> u32 {
    token.split('.').nth(1).unwrap().parse().unwrap()
}

fn reply(business_id: u32, n: u32) -> InboundEntry {
    InboundEntry {
        id: u64::from(n),
        business_id,
        sender: Recipient::parse(format!("+44770090{n:04}").as_bytes()).unwrap(),
        payload: Bytes::from(format!("reply {n} to business {business_id}")),
    }
}

/// Hands replies over; returns their event ids (positions) from the ACK.
async fn hand_over(edge: &DeviceEdge, entries: Vec<InboundEntry>) -> Vec<u64> {
    edge.inbound(entries)
        .await
        .unwrap()
        .into_iter()
        .map(|s| match s {
            Status::Accepted(p) => p.0,
            other => panic!("reply not accepted: {other:?}"),
        })
        .collect()
}

/// The replies heard within `within` (event id -> payload), acknowledged or not.
async fn hear(
    client: &Client,
    events: &mut EventReceiver,
    within: Duration,
    ack: bool,
) -> BTreeMap<u64, Bytes> {
    let mut heard = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, events.recv()).await {
        let BusinessEvent::Inbound(i) = &e else {
            panic!("only replies were handed over: {e:?}");
        };
        assert!(
            heard.insert(i.event.0, i.payload.clone()).is_none(),
            "a copy within one connection"
        );
        if ack {
            client.ack_events(&[e.event()]).await.unwrap();
        }
    }
    heard
}

/// Waits until `status.json` shows `want` as the businesses' inbound figures (replies
/// received today), or fails after 15 s with what it showed.
async fn inbound_today_is(w: &World, want: &[(u32, u64)]) {
    let path = w.files.data.join("detect/status.json");
    let want: BTreeMap<String, u64> = want.iter().map(|(b, n)| (b.to_string(), *n)).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got: Option<BTreeMap<String, u64>> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| serde_json::from_value(v["inbound_today"].clone()).ok());
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "inbound_today in status.json is {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn payloads(heard: &BTreeMap<u64, Bytes>) -> BTreeSet<String> {
    heard
        .values()
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_their_business_once_across_a_reconnect_and_restarts() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path(), MASTER_HEX);
        let bin = super::courier_bin();
        let shops = ["a", "b"].map(|n| spawn::add_business(bin, &files.registry, n, &[]));
        let edge_token = spawn::add_business(bin, &files.registry, "edge", &["--platform"]);
        let w = World {
            files,
            addr: free_port(),
            shops,
            edge: edge_token,
        };
        let (a, b) = (business_of(&w.shops[0]), business_of(&w.shops[1]));
        let quiet = Duration::from_millis(700);

        let mut server = w.serve(0);
        let edge = w.edge().await;
        let to_a = hand_over(&edge, vec![reply(a, 1), reply(b, 2), reply(a, 3)]).await;
        let to_b = vec![to_a[1]];
        let to_a = vec![to_a[0], to_a[2]];
        // The businesses' inbound figures (billing-style counts of today's replies).
        inbound_today_is(&w, &[(a, 2), (b, 1)]).await;

        // A hears its two, and drops its connection before acknowledging them.
        let (shop_a, mut events_a) = w.shop(0).await;
        let first = hear(&shop_a, &mut events_a, quiet, false).await;
        assert_eq!(first.keys().copied().collect::<Vec<_>>(), to_a);
        assert_eq!(
            payloads(&first),
            BTreeSet::from([
                format!("reply 1 to business {a}"),
                format!("reply 3 to business {a}")
            ])
        );
        shop_a.close().await;
        // Again, the same events; acknowledged this time.
        let (shop_a, mut events_a) = w.shop(0).await;
        let again = hear(&shop_a, &mut events_a, quiet, true).await;
        assert_eq!(again, first, "the same replies, by the same event ids");
        // B hears only its own.
        let (shop_b, mut events_b) = w.shop(1).await;
        let heard_b = hear(&shop_b, &mut events_b, quiet, true).await;
        assert_eq!(heard_b.keys().copied().collect::<Vec<_>>(), to_b);
        assert_eq!(
            payloads(&heard_b),
            BTreeSet::from([format!("reply 2 to business {b}")])
        );
        // Replies that do not open at the relay are refused (rejected, bad_ciphertext),
        // never stored nor heard: sealed for another business, changed on the way, or
        // not sealed at all (issue 16).
        let sealed_for_a = edge.seal_reply(a, 90, b"reply 90").unwrap();
        let mut tampered = sealed_for_a.to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        let bad = |id: u64, business_id: u32, payload: Bytes| InboundEntry {
            id,
            business_id,
            sender: Recipient::parse(b"+447700900090").unwrap(),
            payload,
        };
        let statuses = (*edge)
            .inbound(vec![
                bad(90, b, sealed_for_a.clone()),
                bad(91, a, Bytes::from(tampered)),
                bad(92, a, Bytes::from_static(b"reply 92 in the clear")),
            ])
            .await
            .unwrap();
        assert_eq!(
            statuses,
            vec![Status::Rejected(Reason::BadCiphertext); 3],
            "bad replies are refused"
        );
        // Acknowledgements are recorded once a second (cursor records): let one pass.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for c in [&shop_a, &shop_b] {
            c.close().await;
        }
        edge.close().await;

        // A graceful restart: what was acknowledged is not pushed again.
        server.terminate();
        assert!(server.wait_exit(Duration::from_secs(20)).success());
        let mut server = w.serve(1);
        let edge = w.edge().await;
        let later_a = hand_over(&edge, vec![reply(a, 4)]).await;
        // Today's figures survive the restart (rebuilt from the log) and go on counting.
        inbound_today_is(&w, &[(a, 3), (b, 1)]).await;
        let (shop_a, mut events_a) = w.shop(0).await;
        let heard = hear(&shop_a, &mut events_a, quiet, true).await;
        assert_eq!(
            heard.keys().copied().collect::<Vec<_>>(),
            later_a,
            "only the new one"
        );
        let (shop_b, mut events_b) = w.shop(1).await;
        assert!(hear(&shop_b, &mut events_b, quiet, true).await.is_empty());
        shop_b.close().await;

        // A reply accepted (durable) but not yet acknowledged survives a SIGKILL.
        let unheard_b = hand_over(&edge, vec![reply(b, 5)]).await;
        let kill_at = Instant::now();
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        shop_a.close().await;
        edge.close().await;
        let mut server = w.serve(2);
        inbound_today_is(&w, &[(a, 3), (b, 2)]).await;
        let (shop_b, mut events_b) = w.shop(1).await;
        let heard = hear(&shop_b, &mut events_b, quiet, true).await;
        assert_eq!(heard.keys().copied().collect::<Vec<_>>(), unheard_b);
        assert_eq!(
            payloads(&heard),
            BTreeSet::from([format!("reply 5 to business {b}")])
        );
        let (shop_a, mut events_a) = w.shop(0).await;
        let heard_a = hear(&shop_a, &mut events_a, quiet, true).await;
        assert!(
            heard_a.keys().all(|e| later_a.contains(e)),
            "A hears nothing of B's, and at most its own last reply again (acknowledged \
             less than a second before the kill {:?} ago): {heard_a:?}",
            kill_at.elapsed()
        );
        shop_a.close().await;
        shop_b.close().await;
        server.terminate();
        assert!(server.wait_exit(Duration::from_secs(20)).success());
    })
    .await
    .expect("test timed out");
}
