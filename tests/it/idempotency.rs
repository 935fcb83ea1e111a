//! A resend of a stored client message id is answered `duplicate` with the original log
//! position, whichever shard the resend lands on, and after a restart; it is not stored
//! again, not counted as accepted, and another business's equal id is its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::serve::Running;
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::idempotency::{Claim, Idempotency};
use courier_pipeline::node::IN_FLIGHT_RETRY_MS;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{LogPosition, Recipient, Status};
use courier_testkit::server::{self, Setup};

const MASTER_HEX: &str = "8f1c2d3e4a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f0a1b2c3d4e5f";

fn start(dir: &Path, registry: &Registry) -> Running {
    let setup = Setup {
        master_key: MasterKeyText::new(format!("{MASTER_HEX}\n").into_bytes()).unwrap(),
        ..Setup::new(2, registry.clone())
    };
    server::start(dir, setup)
}

fn config(running: &Running, token: &str) -> ClientConfig {
    ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams: 1,
        batches_in_flight_per_stream: 1,
    }
}

fn messages(ids: impl IntoIterator<Item = u64>) -> Vec<OutgoingMessage> {
    ids.into_iter()
        .map(|id| OutgoingMessage {
            client_id: id,
            recipient: Recipient::parse(format!("+4917{:09}", 200_000 + id).as_bytes()).unwrap(),
            payload: Bytes::from(format!("message {id}")),
        })
        .collect()
}

fn accepted(s: &Status) -> LogPosition {
    match s {
        Status::Accepted(p) => *p,
        other => panic!("expected accepted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_duplicates_across_shards_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::default();
    let (business, token) = registry
        .add("idempotency test", Tier::Unlimited, 1_000_000, &[3u8; 32])
        .unwrap();
    let (other, other_token) = registry
        .add("another business", Tier::Unlimited, 1_000_000, &[4u8; 32])
        .unwrap();
    registry.set_exempt(business, true);
    registry.set_exempt(other, true);

    let running = start(dir.path(), &registry);
    let originals: HashMap<u64, LogPosition> =
        tokio::time::timeout(Duration::from_secs(60), async {
            // Connections land on shards by the kernel's 4-tuple hash; open some until two
            // landed on different shards (each one's first message says where it is stored).
            let mut by_shard: HashMap<u16, Client> = HashMap::new();
            let mut originals = HashMap::new();
            let mut probe_id = 1_000_000;
            for _ in 0..24 {
                let c = Client::connect(&config(&running, &token)).await.unwrap();
                probe_id += 1;
                let st = c.submit(messages([probe_id])).await.unwrap();
                let p = accepted(&st[0]);
                originals.insert(probe_id, p);
                by_shard.entry(p.shard()).or_insert(c);
                if by_shard.len() == 2 {
                    break;
                }
            }
            assert_eq!(by_shard.len(), 2, "24 connections all landed on one shard");
            let a = by_shard.remove(&0).unwrap();
            let b = by_shard.remove(&1).unwrap();

            // Stored through shard 0.
            let st = a.submit(messages(1..=50)).await.unwrap();
            for (id, s) in (1..=50).zip(&st) {
                let p = accepted(s);
                assert_eq!(p.shard(), 0);
                originals.insert(id, p);
            }
            // Resent through shard 1: every one a duplicate of the original position.
            let st = b.submit(messages(1..=50)).await.unwrap();
            for (id, s) in (1..=50).zip(&st) {
                assert_eq!(*s, Status::Duplicate(originals[&id]), "id {id}");
            }
            // A mixed batch: resends answered duplicate, new ids stored.
            let st = b.submit(messages(41..=60)).await.unwrap();
            for (id, s) in (41..=60).zip(&st) {
                if id <= 50 {
                    assert_eq!(*s, Status::Duplicate(originals[&id]), "id {id}");
                } else {
                    originals.insert(id, accepted(s));
                }
            }
            // The same id twice in one batch: the second copy is told to retry, and the
            // retry finds the first one stored.
            let st = a.submit(messages([70, 70])).await.unwrap();
            let p70 = accepted(&st[0]);
            originals.insert(70, p70);
            assert_eq!(
                st[1],
                Status::Throttled {
                    retry_after_ms: IN_FLIGHT_RETRY_MS
                }
            );
            let st = b.submit(messages([70])).await.unwrap();
            assert_eq!(st[0], Status::Duplicate(p70));
            // Another business's ids are its own.
            let o = Client::connect(&config(&running, &other_token))
                .await
                .unwrap();
            let st = o.submit(messages(1..=5)).await.unwrap();
            for s in &st {
                let p = accepted(s);
                assert!(!originals.values().any(|q| *q == p));
            }
            o.close().await;
            a.close().await;
            b.close().await;
            originals
        })
        .await
        .expect("test timed out");
    let totals = running.totals();
    // 50 + 10 + 1 duplicates; accepted: probes, 1..=50, 51..=60, 70 and the other
    // business's 5, nothing twice.
    assert_eq!(totals.duplicates, 61);
    assert_eq!(totals.accepted, originals.len() as u64 + 5);
    running.shutdown();
    running.join().unwrap();

    // After a restart the table is rebuilt from the log: the same answers.
    let running = start(dir.path(), &registry);
    tokio::time::timeout(Duration::from_secs(60), async {
        let c = Client::connect(&config(&running, &token)).await.unwrap();
        let mut ids: Vec<u64> = originals.keys().copied().collect();
        ids.sort_unstable();
        let st = c.submit(messages(ids.iter().copied())).await.unwrap();
        for (id, s) in ids.iter().zip(&st) {
            assert_eq!(
                *s,
                Status::Duplicate(originals[id]),
                "id {id} after restart"
            );
        }
        // New ids still go in.
        let st = c.submit(messages([5_000])).await.unwrap();
        accepted(&st[0]);
        c.close().await;
    })
    .await
    .expect("test timed out");
    let totals = running.totals();
    assert_eq!(totals.accepted, 1);
    assert_eq!(totals.duplicates, originals.len() as u64);
    running.shutdown();
    running.join().unwrap();
}

/// The table is shared by the shard threads (the pipeline crate spawns none, so this
/// lives here): four threads claiming the same ids get each one fresh exactly once.
#[test]
fn shared_between_threads_every_id_is_claimed_fresh_exactly_once() {
    let t = Arc::new(Idempotency::new(1 << 16, 1 << 16));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut fresh_ids = Vec::new();
                for id in 0..5_000u64 {
                    if let Claim::Fresh(tk) = t.claim(1, id, 0) {
                        t.settle(tk, LogPosition(id));
                        fresh_ids.push(id);
                    }
                }
                fresh_ids
            })
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..5_000).collect::<Vec<_>>());
}

/// Fair shares of the table (issue 18): a business flooding the shards with fresh ids
/// does not make the table forget another business's recent ids. Business B stores 200
/// ids; business A then stores four times the table's capacity of fresh ids; every
/// resend of B's ids is still answered `duplicate` with its original position, and
/// nothing of B's is stored twice. (With one shared table and no shares, the flood
/// forgets them: see the table's unit test
/// `a_flood_from_one_business_leaves_the_others_ids_within_their_share`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_ids_from_one_business_keeps_the_others_resends_duplicate() {
    const TABLE: u32 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::default();
    let (flooder, flooder_token) = registry
        .add("flooder", Tier::Unlimited, 1_000_000, &[5u8; 32])
        .unwrap();
    let (modest, modest_token) = registry
        .add("modest", Tier::Unlimited, 1_000_000, &[6u8; 32])
        .unwrap();
    registry.set_exempt(flooder, true);
    registry.set_exempt(modest, true);
    let mut setup = Setup {
        master_key: MasterKeyText::new(format!("{MASTER_HEX}\n").into_bytes()).unwrap(),
        ..Setup::new(2, registry.clone())
    };
    setup.profile.limits.idempotency_ids_max = TABLE;
    setup.profile.limits.idempotency_ids_per_business_max = TABLE / 4;
    let running = server::start(dir.path(), setup);
    tokio::time::timeout(Duration::from_secs(120), async {
        let b = Client::connect(&config(&running, &modest_token))
            .await
            .unwrap();
        let originals: Vec<LogPosition> = b
            .submit(messages(1..=200))
            .await
            .unwrap()
            .iter()
            .map(accepted)
            .collect();
        let a = Client::connect(&config(&running, &flooder_token))
            .await
            .unwrap();
        let flood = 4 * u64::from(TABLE);
        for first in (0..flood).step_by(1000) {
            let ids = 1_000_000 + first..1_000_000 + (first + 1000).min(flood);
            for s in a.submit(messages(ids)).await.unwrap() {
                accepted(&s);
            }
        }
        let st = b.submit(messages(1..=200)).await.unwrap();
        for (id, (s, p)) in (1..=200).zip(st.iter().zip(&originals)) {
            assert_eq!(*s, Status::Duplicate(*p), "modest id {id} after the flood");
        }
        a.close().await;
        b.close().await;
    })
    .await
    .expect("test timed out");
    let totals = running.totals();
    assert_eq!(totals.duplicates, 200);
    assert_eq!(totals.accepted, 200 + 4 * u64::from(TABLE));
    running.shutdown();
    running.join().unwrap();
}
