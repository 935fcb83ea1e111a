//! Fair shares through the real server on loopback (issue 18): a greedy business keeps
//! far more batches in flight than its share on one shard (4 connections × 8 streams ×
//! 4 batches of 512 messages) while a modest business sends one message every 5 ms. The
//! modest sender's ACK latency percentiles are printed; the only timing assertion is a
//! generous sanity bound (speed is measured in BENCHMARKS.md, not asserted here). The
//! bound itself is asserted in commits by the simulation (`sim/tests/fair.rs`).
//!
//! Its own test binary, so that the greedy load cannot slow the timing-sensitive tests
//! of the others (cargo runs test binaries one after another).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::{Client, ClientConfig, OutgoingMessage, ServerTrust};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::server::{self, Setup};

const GREEDY_CONNECTIONS: usize = 4;
const GREEDY_STREAMS: usize = 8;
const GREEDY_DEPTH: usize = 4;
const GREEDY_BATCH: u64 = 512;
/// Modest batches (one message each) and the pause between them.
const MODEST_BATCHES: usize = 200;
const MODEST_EVERY: Duration = Duration::from_millis(5);
/// The sanity bound on any modest ACK (not a speed target).
const SANITY: Duration = Duration::from_secs(5);

fn batch(first_id: u64, n: u64) -> Vec<OutgoingMessage> {
    (first_id..first_id + n)
        .map(|id| OutgoingMessage {
            client_id: id,
            recipient: Recipient::parse(format!("+4915{:09}", id % 1_000_000).as_bytes()).unwrap(),
            payload: Bytes::from_static(&[b'x'; 64]),
        })
        .collect()
}

fn config(
    running: &courier::serve::Running,
    token: &str,
    streams: usize,
    depth: usize,
) -> ClientConfig {
    ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams,
        batches_in_flight_per_stream: depth,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modest_sender_beside_a_greedy_one_keeps_a_short_ack_latency() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::default();
    let (greedy, greedy_token) = registry
        .add("greedy", Tier::Unlimited, 1_000_000_000, &[7u8; 32])
        .unwrap();
    let (modest, modest_token) = registry
        .add("modest", Tier::Unlimited, 1_000_000, &[8u8; 32])
        .unwrap();
    registry.set_exempt(greedy, true);
    registry.set_exempt(modest, true);
    // One shard: every connection meets on it. Ingest only: no edge takes deliveries,
    // and delivery's bounds would throttle the greedy business first.
    let mut setup = Setup::new(1, registry);
    setup.profile.delivery.enabled = false;
    let running = server::start(dir.path(), setup);

    let stop = Arc::new(AtomicBool::new(false));
    let greedy_acked = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let cfg = config(&running, &greedy_token, GREEDY_STREAMS, GREEDY_DEPTH);
    for c in 0..GREEDY_CONNECTIONS {
        let client = Arc::new(Client::connect(&cfg).await.expect("greedy connects"));
        for t in 0..GREEDY_STREAMS * GREEDY_DEPTH {
            let (client, stop, acked) = (client.clone(), stop.clone(), greedy_acked.clone());
            let lane = (c * GREEDY_STREAMS * GREEDY_DEPTH + t) as u64;
            tasks.spawn(async move {
                // Bounded: the stop flag, or 100,000 batches.
                for i in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let first = (lane << 32) | (i * GREEDY_BATCH);
                    let st = client.submit(batch(first, GREEDY_BATCH)).await;
                    let st = st.expect("greedy submit");
                    let ok = st
                        .iter()
                        .filter(|s| matches!(s, Status::Accepted(_)))
                        .count();
                    acked.fetch_add(ok as u64, Ordering::Relaxed);
                }
            });
        }
    }
    // Let the greedy business fill the shard.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let greedy_before = greedy_acked.load(Ordering::Relaxed);
    let started = Instant::now();
    let modest_client = Client::connect(&config(&running, &modest_token, 1, 1))
        .await
        .expect("modest connects");
    let mut latencies = Vec::with_capacity(MODEST_BATCHES);
    for i in 0..MODEST_BATCHES as u64 {
        let sent = Instant::now();
        let st = tokio::time::timeout(SANITY, modest_client.submit(batch(1 << 60 | i, 1)))
            .await
            .expect("a modest ACK within the sanity bound")
            .expect("modest submit");
        latencies.push(sent.elapsed());
        assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        tokio::time::sleep(MODEST_EVERY).await;
    }
    let elapsed = started.elapsed();
    let greedy_during = greedy_acked.load(Ordering::Relaxed) - greedy_before;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .expect("the greedy tasks stop");
    modest_client.close().await;
    running.shutdown();
    let stats = running.join().expect("the server stops cleanly");

    latencies.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "fair shares: modest ack latency over {} batches: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         greedy {:.0} msgs/s beside it ({} messages in {:.2} s)",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1]),
        greedy_during as f64 / elapsed.as_secs_f64(),
        greedy_during,
        elapsed.as_secs_f64(),
    );
    eprintln!(
        "fair shares: streams paused at the business share {}, most batches of others ahead {}",
        stats.iter().map(|s| s.share_paused).sum::<u64>(),
        stats.iter().map(|s| s.others_ahead_max).max().unwrap_or(0),
    );
    assert!(
        greedy_during > 0,
        "the greedy business progressed beside the modest one"
    );
}
