//! The load engine against fake transports in virtual time (tokio's paused clock), so
//! that stalls, backlogs and duplicates are exact rather than at the mercy of a loaded
//! machine.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_client::{ClientError, OutgoingMessage, ReportOutcome};
use courier_loadgen::engine::{self, BoxFuture, SenderRun};
use courier_loadgen::traffic::{RecipientSpec, SizeSpec};
use courier_loadgen::{AcceptedRecord, Label};
use courier_loadgen::{LoadReport, RunOptions, SenderPlan, TokenSource, Transport};
use courier_pipeline::wire::{LogPosition, ReportEntry, Status};
use tokio::time::Instant;

/// A server that answers every batch `service` after it arrives, except that every
/// answer due inside the stall window `[stall_at, stall_at + stall_for)` is held until
/// the window ends (a GC pause, a stuck fsync). It answers `duplicate` for client ids it
/// has accepted before when `dedup` is set.
struct Fake {
    start: Instant,
    service: Duration,
    stall_at: Duration,
    stall_for: Duration,
    dedup: bool,
    /// Throttle everything (a detector that has flagged this business).
    throttle: bool,
    next: AtomicU64,
    seen: Mutex<HashSet<u64>>,
}

impl Fake {
    fn new(service: Duration, stall_at: Duration, stall_for: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            start: Instant::now(),
            service,
            stall_at,
            stall_for,
            dedup: false,
            throttle: false,
            next: AtomicU64::new(1),
            seen: Mutex::new(HashSet::new()),
        })
    }
}

impl Transport for Fake {
    fn business_id(&self) -> u32 {
        7
    }
    fn check(&self, _: &[OutgoingMessage]) -> Result<(), ClientError> {
        Ok(())
    }
    fn submit(
        &self,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        Box::pin(async move {
            let mut ack = Instant::now() + self.service;
            let (a, b) = (
                self.start + self.stall_at,
                self.start + self.stall_at + self.stall_for,
            );
            if ack >= a && ack < b {
                ack = b;
            }
            tokio::time::sleep_until(ack).await;
            let mut seen = self.seen.lock().unwrap();
            Ok(batch
                .iter()
                .map(|m| {
                    if self.throttle {
                        Status::Throttled {
                            retry_after_ms: 100,
                        }
                    } else if !seen.insert(m.client_id) && self.dedup {
                        Status::Duplicate(LogPosition(0))
                    } else {
                        Status::Accepted(LogPosition(self.next.fetch_add(1, Ordering::Relaxed)))
                    }
                })
                .collect())
        })
    }
    fn report(&self, _: Vec<ReportEntry>) -> BoxFuture<'_, Result<ReportOutcome, ClientError>> {
        Box::pin(async { Ok(ReportOutcome::Refused { code: 0x17 }) })
    }
}

fn sender(rate: f64, batch: usize, secs: f64) -> SenderPlan {
    SenderPlan {
        name: "s".into(),
        label: Label::Normal,
        token: TokenSource::Index(0),
        rate,
        rate_from: rate,
        start_secs: 0.0,
        stop_secs: secs,
        connections: 1,
        batch,
        size: SizeSpec::Fixed(100),
        recipients: RecipientSpec::Uniform { population: 1000 },
        reports_per_sec: 0.0,
        retry_rounds: 0,
    }
}

async fn drive(fake: Arc<Fake>, plan: SenderPlan, opts: RunOptions) -> LoadReport {
    let secs = plan.stop_secs;
    let run = SenderRun {
        plan,
        conns: vec![fake as Arc<dyn Transport>],
    };
    engine::drive(Duration::from_secs_f64(secs), vec![run], &opts).await
}

const STALL: Duration = Duration::from_millis(200);

#[tokio::test(start_paused = true)]
async fn open_loop_latency_runs_from_the_intended_send_time_so_a_stall_shows_in_p99() {
    // 2,000 msgs/s for 1 s, answers in 1 ms, one 200 ms stall at 300 ms.
    let fake = Fake::new(Duration::from_millis(1), Duration::from_millis(300), STALL);
    let open = drive(
        fake.clone(),
        sender(2000.0, 10, 1.0),
        RunOptions {
            in_flight: 64,
            ..RunOptions::default()
        },
    )
    .await;
    assert_eq!(open.mode, "open");
    assert_eq!(open.sent, 2000, "{open:?}");
    assert_eq!(open.accepted, 2000);
    // Every message intended during the stall waits for its end: a message intended
    // at 300 + x ms is answered at 500 ms, so latencies above L make up (200 − L) ms of
    // the 1,000 ms schedule: p99 ≥ 200 − 10 ms, p90 ≥ 200 − 100 ms.
    let l = open.latency_us;
    assert!(l.max >= 200_000, "{l:?}");
    assert!(l.p99 >= 185_000, "p99 {} µs hides the stall", l.p99);
    assert!(l.p90 >= 90_000, "p90 {} µs", l.p90);
    assert!(l.p50 < 5_000, "p50 {} µs", l.p50);

    // The same server measured closed loop (send, wait, send): the generator waits out
    // the stall with one batch in flight, so only that batch records it.
    let fake = Fake::new(Duration::from_millis(1), Duration::from_millis(300), STALL);
    let closed = drive(
        fake,
        sender(0.0, 10, 1.0),
        RunOptions {
            in_flight: 1,
            ..RunOptions::default()
        },
    )
    .await;
    assert_eq!(closed.mode, "closed");
    let c = closed.latency_us;
    assert!(
        c.max >= 200_000,
        "the closed loop saw the stall once: {c:?}"
    );
    assert!(c.p99 < 10_000, "closed-loop p99 {} µs", c.p99);
    assert!(
        c.p99 * 10 < l.p99,
        "closed loop understates p99: {} vs {} µs",
        c.p99,
        l.p99
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_that_falls_behind_makes_a_bounded_counted_backlog() {
    // 1,000 msgs/s in batches of at most 10, but one batch in flight answered in 50 ms:
    // the server takes at most 200 msgs/s.
    let fake = Fake::new(Duration::from_millis(50), Duration::ZERO, Duration::ZERO);
    let opts = RunOptions {
        in_flight: 1,
        backlog_secs_max: 0.1,
        ..RunOptions::default()
    };
    let r = drive(fake, sender(1000.0, 10, 1.0), opts).await;
    assert!(r.sent <= 220, "{r:?}");
    assert!(r.late > 0 && r.late <= r.sent);
    // Bounded at 0.1 s of schedule (100 messages) per connection, measured before the
    // excess is dropped: at most the bound plus one answer time (50 ms) of arrivals.
    assert!((100..=150).contains(&r.backlog_peak), "{r:?}");
    // Everything scheduled is either sent or counted as dropped.
    assert!(
        r.sent + r.backlog_dropped >= 995 && r.sent + r.backlog_dropped <= 1000,
        "{r:?}"
    );
    // What is sent waits at most the bound plus the answer time.
    assert!((100_000..=160_000).contains(&r.latency_us.p50), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn count_ends_the_run_and_duplicates_and_accepted_records_are_counted() {
    let fake = Arc::new(Fake {
        dedup: true,
        ..Arc::try_unwrap(Fake::new(
            Duration::from_millis(1),
            Duration::ZERO,
            Duration::ZERO,
        ))
        .ok()
        .unwrap()
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<AcceptedRecord>>(1024);
    let opts = RunOptions {
        count: Some(500),
        duplicate_rate: 0.2,
        accepted: Some(tx),
        ..RunOptions::default()
    };
    let r = drive(fake, sender(1000.0, 10, 5.0), opts).await;
    assert_eq!(r.sent, 500, "{r:?}");
    assert!(
        r.duration_secs < 1.0,
        "count ended the run early: {}",
        r.duration_secs
    );
    let d = r.duplicates;
    assert!(d.sent > 50 && d.sent < 150, "{d:?}");
    assert_eq!(d.detected, d.sent, "the fake detects every resend");
    assert_eq!(r.duplicate, d.sent);
    assert_eq!(r.accepted + r.duplicate, 500);
    let mut lines = 0;
    while let Ok(batch) = rx.try_recv() {
        for rec in batch {
            assert_eq!(rec.business_id, 7);
            lines += 1;
        }
    }
    assert_eq!(lines, r.accepted);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_run_reports_what_it_has() {
    let fake = Fake::new(Duration::from_millis(1), Duration::ZERO, Duration::ZERO);
    let opts = RunOptions::default();
    let stop = opts.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stop.stop();
    });
    let r = drive(fake, sender(1000.0, 10, 10.0), opts).await;
    assert!(r.interrupted);
    assert!((200..=300).contains(&r.sent), "{r:?}");
    assert_eq!(r.sent, r.accepted);
    assert_eq!(r.backlog_dropped, 0, "an interrupt is not a backlog");
}

#[tokio::test(start_paused = true)]
async fn detection_is_scored_per_sender_from_its_onset() {
    // A normal sender the server admits, and an abusive one (onset at 0.4 s) on a
    // connection the server throttles from its first batch, answered in 5 ms.
    let admit = Fake::new(Duration::from_millis(5), Duration::ZERO, Duration::ZERO);
    let mut flagged = Arc::try_unwrap(Fake::new(
        Duration::from_millis(5),
        Duration::ZERO,
        Duration::ZERO,
    ))
    .ok()
    .unwrap();
    flagged.throttle = true;
    let normal = sender(500.0, 10, 1.0);
    let mut abusive = sender(500.0, 10, 1.0);
    abusive.name = "spammer".into();
    abusive.label = Label::Abusive;
    abusive.start_secs = 0.4;
    let runs = vec![
        SenderRun {
            plan: normal,
            conns: vec![admit as Arc<dyn Transport>],
        },
        SenderRun {
            plan: abusive,
            conns: vec![Arc::new(flagged) as Arc<dyn Transport>],
        },
    ];
    let r = engine::drive(Duration::from_secs(1), runs, &RunOptions::default()).await;
    assert_eq!(r.senders.len(), 2);
    let (n, a) = (&r.senders[0], &r.senders[1]);
    assert!(!n.flagged() && n.first_flag_after_onset_secs.is_none());
    assert_eq!(a.throttled, a.sent);
    assert!((290..=310).contains(&a.sent), "{a:?}");
    // First message due at the onset, answered 5 ms later (plus the 1 ms timer tick).
    let t = a.first_flag_after_onset_secs.unwrap();
    assert!((0.004..0.008).contains(&t), "{t}");
    let d = &r.detection;
    assert_eq!(
        (d.true_positives, d.false_positives, d.false_negatives),
        (1, 0, 0)
    );
    assert_eq!((d.precision, d.recall), (Some(1.0), Some(1.0)));
    assert_eq!(r.throttled, a.sent);
}

/// Accepts everything at once and notes which threads it was called on.
#[derive(Default)]
struct ThreadNoting {
    threads: Mutex<HashSet<String>>,
    next: AtomicU64,
}

impl Transport for ThreadNoting {
    fn business_id(&self) -> u32 {
        7
    }
    fn check(&self, _: &[OutgoingMessage]) -> Result<(), ClientError> {
        Ok(())
    }
    fn submit(
        &self,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.threads.lock().unwrap().insert(name);
        let first = self.next.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok((first..first + batch.len() as u64)
            .map(|p| Status::Accepted(LogPosition(p)))
            .collect())))
    }
    fn report(&self, _: Vec<ReportEntry>) -> BoxFuture<'_, Result<ReportOutcome, ClientError>> {
        Box::pin(async { Ok(ReportOutcome::NotRefused) })
    }
}

#[test]
fn each_connection_sends_from_its_own_worker_thread() {
    // Real time here (the workers run runtimes of their own), but nothing below depends
    // on speed: only on which thread sent what, and that every message is counted.
    let workers = courier_loadgen::Workers::start(2, "lg-affinity").unwrap();
    let conns: Vec<Arc<ThreadNoting>> = (0..4).map(|_| Arc::default()).collect();
    let mut open = sender(2000.0, 10, 0.3);
    open.connections = 2;
    let mut closed = sender(0.0, 10, 0.3);
    closed.name = "closed".into();
    closed.connections = 2;
    let runs = vec![
        SenderRun {
            plan: open,
            conns: vec![conns[0].clone(), conns[1].clone()],
        },
        SenderRun {
            plan: closed,
            conns: vec![conns[2].clone(), conns[3].clone()],
        },
    ];
    let opts = RunOptions {
        workers: workers.handles().to_vec(),
        in_flight: 2,
        ..RunOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(engine::drive(Duration::from_millis(300), runs, &opts));
    assert!(r.sent > 0);
    assert_eq!((r.accepted, r.errors), (r.sent, 0));
    for (i, c) in conns.iter().enumerate() {
        let threads = c.threads.lock().unwrap().clone();
        let want = format!("lg-affinity-{}", i % 2);
        assert_eq!(threads, HashSet::from([want]), "connection {i}");
    }
}

/// `courier demo` runs a closed-loop bulk sender beside an open-loop abusive one: the
/// report says the run was mixed, and its target rate is the open-loop sender's.
#[tokio::test(start_paused = true)]
async fn a_run_with_open_and_closed_loop_senders_reports_mixed() {
    let no_stall = Duration::ZERO;
    let senders = vec![
        SenderRun {
            plan: sender(0.0, 10, 0.5),
            conns: vec![
                Fake::new(Duration::from_millis(1), no_stall, no_stall) as Arc<dyn Transport>
            ],
        },
        SenderRun {
            plan: sender(200.0, 10, 0.5),
            conns: vec![
                Fake::new(Duration::from_millis(1), no_stall, no_stall) as Arc<dyn Transport>
            ],
        },
    ];
    let opts = RunOptions {
        in_flight: 2,
        ..RunOptions::default()
    };
    let r = engine::drive(Duration::from_secs_f64(0.5), senders, &opts).await;
    assert_eq!(r.mode, "mixed");
    assert_eq!(r.target_rate, 200.0);
    assert_eq!(r.senders.len(), 2);
    assert_eq!(r.senders[1].sent, 100, "{r:?}");
    assert!(
        r.senders[0].sent > 0 && r.senders[0].latency_us.p50 > 0,
        "{r:?}"
    );
}
