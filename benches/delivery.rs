//! What one shard's delivery state costs per delivered message, under a backlog.
//!
//! The state has the default profile's bounds and a backlog of waiting messages (as on a
//! server whose senders outrun the edge), spread over 10,000 recipients. One step is a
//! message's whole life in the state: admitted, offered to the edge, handed, delivered,
//! its `sent` and `delivered` statuses taken; a new message joins the backlog as the
//! oldest leaves it, so the backlog stays the same. The clock moves 1 ms every 100
//! messages (about this machine's delivery rate). Nothing else of the shard runs: no
//! bus, no log, no QUIC.
//!
//! - `delivery/lifecycle/backlog=N`: per message, with N messages waiting.
//!
//! Run: `cargo bench --bench delivery -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::courier_pipeline::node::{Delivery, DeliveryConfig, E2eConfig};
use courier::courier_pipeline::server::ConnKey;
use courier::courier_pipeline::wire::delivery::Outcome;
use courier::courier_pipeline::wire::{LogPosition, Recipient};
use courier::courier_pipeline::ShardId;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RECIPIENTS: u64 = 10_000;

/// `tuning/default.toml`'s `[delivery]`.
fn config() -> DeliveryConfig {
    DeliveryConfig {
        enabled: true,
        ttl_default_secs: 2_592_000,
        ttl_max_secs: 2_592_000,
        pending_max: 1_000_000,
        pending_bytes_max: 1 << 29,
        in_flight_max: 4096,
        outcome_timeout_ms: 30_000,
        retry_backoff_min_ms: 1000,
        retry_backoff_max_ms: 300_000,
        delivered_kept_max: 65_536,
        events_per_business_max: 1_000_000,
        events_per_push_max: 4096,
        event_ack_timeout_ms: 10_000,
        e2e: E2eConfig {
            enabled: false,
            ..E2eConfig::default()
        },
    }
}

struct Run {
    d: Delivery,
    recipients: Vec<Recipient>,
    payload: Bytes,
    next: u64,
}

impl Run {
    fn new(backlog: u64) -> Run {
        let mut d = Delivery::new(config());
        d.edge_attached(ConnKey::for_benches(0, 1));
        let recipients = (0..RECIPIENTS)
            .map(|i| Recipient::parse(format!("+1555{i:07}").as_bytes()).expect("a number"))
            .collect();
        let mut r = Run {
            d,
            recipients,
            payload: Bytes::from(vec![7u8; 1024]),
            next: 0,
        };
        for _ in 0..backlog {
            r.admit();
        }
        r
    }

    fn now(&self) -> u64 {
        1_700_000_000_000 + self.next / 100
    }

    fn admit(&mut self) {
        let i = self.next;
        let now = self.now();
        self.d.admit(
            now,
            LogPosition::new(ShardId::new(0), i),
            1,
            i,
            self.recipients[(i % RECIPIENTS) as usize],
            now + 2_592_000_000,
            self.payload.clone(),
            None,
            false,
        );
        self.next += 1;
    }

    /// One message in, the oldest waiting one delivered.
    fn step(&mut self) {
        self.admit();
        let now = self.now();
        self.d.tick(now);
        let (_, deliver) = self
            .d
            .poll_dispatch(now, |_| courier::courier_pipeline::node::KeyCheck::Ready)
            .expect("a message is due");
        self.d.handed(now, deliver.message);
        self.d.outcome(now, deliver.message, Outcome::Delivered);
        while let Some(c) = self.d.poll_status() {
            black_box(c);
        }
    }
}

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("delivery/lifecycle");
    g.throughput(Throughput::Elements(1));
    for backlog in [1_000u64, 200_000] {
        let mut run = Run::new(backlog);
        g.bench_function(format!("backlog={backlog}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    run.step();
                }
                start.elapsed()
            })
        });
        assert_eq!(run.d.pending() as u64, backlog, "the backlog stayed");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = lifecycle
}
criterion_main!(benches);
