//! The driving loop: open loop at a fixed rate (wrk2-style) or closed loop at full speed,
//! over any [`Transport`] (a real [`Client`] or a test's fake).
//!
//! ```text
//! open loop, per connection:                       closed loop, per connection:
//!   message k is due at start + schedule.time_of(k)  streams × in-flight workers, each
//!   sleep until the next one is due                    build batch, t0 = now,
//!   take an in-flight slot (waits if the server        submit, wait, record now − t0
//!     is behind: the backlog grows, in time only)
//!   batch = every message due by now (≤ batch)
//!   spawn: submit, then record ack − intended
//!          for each message of the batch
//! a ticker samples counters and a 1 s histogram window: progress line and timeline
//! ```
//!
//! Invariants this module keeps:
//! - open loop: latency runs from a message's *intended* send time, so a stall of the
//!   server shows in the percentiles instead of silently slowing the sender
//!   (no coordinated omission);
//! - the backlog (messages due and not sent) is implicit in the schedule (an index), so
//!   it costs no memory; it is bounded in time by `backlog_secs_max` and what is dropped
//!   beyond it, or left unsent at the end, is counted in `backlog_dropped`;
//! - at most `in_flight` batches per connection are unanswered;
//! - every message sent is counted exactly once as accepted, duplicate, throttled,
//!   rejected or error (`sent` is their sum).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_pipeline::wire::{Reason, Recipient, ReportEntry, Status};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::cpu::Meter;
use crate::report::{
    self, Cpu, Detection, Duplicates, LoadReport, Percentiles, Reports, Second, SenderReport,
};
use crate::scenario::{Plan, SenderPlan};
use crate::tracking::Tracker;
use crate::traffic::{filler, zipf_table, RecipientGen, RecipientSpec, Schedule, XorShift};
use crate::{CLIENT_ID_COUNTER_BITS, LATENCY_US_MAX};
use courier_client::{Client, ClientError, OutgoingMessage, ReportOutcome};

/// A message sent this long after its intended time counts as late.
pub const LATE_AFTER: Duration = Duration::from_millis(10);
/// Accepted messages remembered per sender, for duplicates and spam reports.
pub const RECENT_ACCEPTED_MAX: usize = 4096;
/// How long a REPORT waits for the server's refusal.
pub const REPORT_WAIT: Duration = Duration::from_secs(1);
/// REPORT frames in flight per reporting sender.
pub const REPORTS_IN_FLIGHT_MAX: usize = 64;

/// A boxed future, so that [`Transport`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the engine needs from a connection. [`Client`] is the real one; tests inject
/// fakes (a stalling server, say).
pub trait Transport: Send + Sync + 'static {
    /// The business the connection is authenticated as.
    fn business_id(&self) -> u32;
    /// Whether `batch` fits the server's bounds (nothing is sent).
    fn check(&self, batch: &[OutgoingMessage]) -> Result<(), ClientError>;
    /// Submits a batch; one status per message.
    fn submit(
        &self,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>>;
    /// Submits a batch whose messages live `ttl_secs` (SUBMIT_TTL); 0 is the relay's
    /// default, a plain SUBMIT. Transports without a time to live submit plainly.
    fn submit_ttl(
        &self,
        batch: Vec<OutgoingMessage>,
        ttl_secs: u32,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        let _ = ttl_secs;
        self.submit(batch)
    }
    /// Sends one REPORT frame on a stream of its own.
    fn report(
        &self,
        entries: Vec<ReportEntry>,
    ) -> BoxFuture<'_, Result<ReportOutcome, ClientError>>;
    /// Closes the connection once the run is over.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Transport for Client {
    fn business_id(&self) -> u32 {
        self.welcome().business_id
    }
    fn check(&self, batch: &[OutgoingMessage]) -> Result<(), ClientError> {
        Client::check(self, batch)
    }
    fn submit(
        &self,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        Box::pin(Client::submit(self, batch))
    }
    fn submit_ttl(
        &self,
        batch: Vec<OutgoingMessage>,
        ttl_secs: u32,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        if ttl_secs == 0 {
            Box::pin(Client::submit(self, batch))
        } else {
            Box::pin(Client::submit_ttl(self, batch, ttl_secs))
        }
    }
    fn report(
        &self,
        entries: Vec<ReportEntry>,
    ) -> BoxFuture<'_, Result<ReportOutcome, ClientError>> {
        Box::pin(async move { Client::report(self, &entries, REPORT_WAIT).await })
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(Client::close(self))
    }
}

/// A transport with no server behind it: every batch is accepted at once, in process.
/// `courier-loadgen --dry-run` drives it to measure the generator's own cost per
/// message, apart from the QUIC client's.
#[derive(Debug, Default)]
pub struct NullTransport {
    next: AtomicU64,
}

impl Transport for NullTransport {
    fn business_id(&self) -> u32 {
        0
    }
    fn check(&self, _: &[OutgoingMessage]) -> Result<(), ClientError> {
        Ok(())
    }
    fn submit(
        &self,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'_, Result<Vec<Status>, ClientError>> {
        let first = self.next.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let statuses = (first..first + batch.len() as u64)
            .map(|p| Status::Accepted(courier_pipeline::wire::LogPosition(p)))
            .collect();
        Box::pin(std::future::ready(Ok(statuses)))
    }
    fn report(&self, _: Vec<ReportEntry>) -> BoxFuture<'_, Result<ReportOutcome, ClientError>> {
        Box::pin(std::future::ready(Ok(ReportOutcome::NotRefused)))
    }
}

/// One accepted message, for `courier log audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedRecord {
    /// The sender's business.
    pub business_id: u32,
    /// Its client message id.
    pub client_id: u64,
    /// Where the server stored it.
    pub log_position: u64,
}

/// Asks a run to stop early (Ctrl-C); the run then reports what it has.
#[derive(Debug, Clone)]
pub struct StopSignal(Arc<watch::Sender<bool>>);

impl Default for StopSignal {
    fn default() -> StopSignal {
        StopSignal(Arc::new(watch::channel(false).0))
    }
}

impl StopSignal {
    /// Stops the run.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
    /// Whether stop was asked.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
    /// Completes once stop was asked.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Called once a second with that second and the totals so far (sent, accepted,
/// errors): drives the progress line.
pub type OnSecond = Arc<dyn Fn(&Second, (u64, u64, u64)) + Send + Sync>;

/// How to run, beyond the plan.
#[derive(Clone)]
pub struct RunOptions {
    /// Stop after this many messages in all.
    pub count: Option<u64>,
    /// Fraction of messages replaced by resends of already accepted ones (same client id).
    pub duplicate_rate: f64,
    /// Most seconds of schedule a connection may fall behind before due messages are
    /// dropped (counted in `backlog_dropped`).
    pub backlog_secs_max: f64,
    /// Open loop: unanswered batches per connection. Closed loop: workers per connection.
    pub in_flight: usize,
    /// Seeds the synthetic traffic.
    pub seed: u64,
    /// Where accepted messages go (`--accepted`).
    pub accepted: Option<mpsc::Sender<Vec<AcceptedRecord>>>,
    /// Progress callback.
    pub on_second: Option<OnSecond>,
    /// Early stop.
    pub stop: StopSignal,
    /// Reads CPU time.
    pub cpu: Meter,
    /// How long to wait for outstanding ACKs once sending stops.
    pub drain_timeout: Duration,
    /// The platform connection that sends every sender's spam REPORTs (servers take
    /// REPORTs only from platform credentials); without one, each sender's first
    /// connection sends them and the server refuses them.
    pub reporter: Option<Arc<dyn Transport>>,
    /// Runtimes to spread connections over: connection `i` (counted over all senders)
    /// connects and sends on `workers[i % len]` (see [`crate::Workers`]). Empty: the
    /// caller's runtime.
    pub workers: Vec<tokio::runtime::Handle>,
    /// Seconds every message lives (SUBMIT_TTL); 0: the relay's default (plain SUBMIT).
    pub ttl_secs: u32,
    /// Where accepted messages are recorded for a delivery run (`--deliver`).
    pub tracker: Option<Arc<Tracker>>,
}

impl RunOptions {
    /// The runtime connection `index` runs on, if not the caller's.
    pub fn worker_for(&self, index: usize) -> Option<&tokio::runtime::Handle> {
        (!self.workers.is_empty()).then(|| &self.workers[index % self.workers.len()])
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("count", &self.count)
            .field("duplicate_rate", &self.duplicate_rate)
            .field("backlog_secs_max", &self.backlog_secs_max)
            .field("in_flight", &self.in_flight)
            .field("seed", &self.seed)
            .field("workers", &self.workers.len())
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            count: None,
            duplicate_rate: 0.0,
            backlog_secs_max: 1.0,
            in_flight: 32,
            seed: 1,
            accepted: None,
            on_second: None,
            stop: StopSignal::default(),
            cpu: Meter::new(crate::cpu::ServerCpu::InProcess),
            drain_timeout: crate::DRAIN_TIMEOUT,
            reporter: None,
            workers: Vec::new(),
            ttl_secs: 0,
            tracker: None,
        }
    }
}

/// A sender of the plan with its connected transports.
pub struct SenderRun {
    /// What it does.
    pub plan: SenderPlan,
    /// Its connections.
    pub conns: Vec<Arc<dyn Transport>>,
}

impl std::fmt::Debug for SenderRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderRun")
            .field("plan", &self.plan)
            .field("conns", &self.conns.len())
            .finish()
    }
}

/// Counts of one sender (or of everything, once merged).
struct Tally {
    sent: u64,
    accepted: u64,
    duplicate: u64,
    throttled: u64,
    rejected: u64,
    errors: u64,
    accepted_bytes: u64,
    rejected_by_reason: [u64; Reason::ALL.len()],
    latency_us: Histogram<u64>,
    late: u64,
    backlog_peak: u64,
    backlog_dropped: u64,
    dups: Duplicates,
    reports: Reports,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

impl Tally {
    fn new() -> Tally {
        Tally {
            sent: 0,
            accepted: 0,
            duplicate: 0,
            throttled: 0,
            rejected: 0,
            errors: 0,
            accepted_bytes: 0,
            rejected_by_reason: [0; Reason::ALL.len()],
            latency_us: histogram(),
            late: 0,
            backlog_peak: 0,
            backlog_dropped: 0,
            dups: Duplicates::default(),
            reports: Reports::default(),
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.throttled += o.throttled;
        self.rejected += o.rejected;
        self.errors += o.errors;
        self.accepted_bytes += o.accepted_bytes;
        for (a, b) in self.rejected_by_reason.iter_mut().zip(o.rejected_by_reason) {
            *a += b;
        }
        self.latency_us
            .add(&o.latency_us)
            .expect("histograms share their bounds");
        self.late += o.late;
        self.backlog_peak = self.backlog_peak.max(o.backlog_peak);
        self.backlog_dropped += o.backlog_dropped;
        self.dups.sent += o.dups.sent;
        self.dups.detected += o.dups.detected;
        self.dups.not_detected += o.dups.not_detected;
        self.dups.other += o.dups.other;
        let r = &mut self.reports;
        r.sent += o.reports.sent;
        r.entries += o.reports.entries;
        r.taken += o.reports.taken;
        r.errors += o.reports.errors;
        for (c, n) in &o.reports.refused_by_code {
            *r.refused_by_code.entry(c.clone()).or_default() += n;
        }
    }
}

/// What all tasks of a run share.
struct Shared {
    start: Instant,
    /// When sending stops.
    stop_at: Instant,
    stop: StopSignal,
    /// Remaining message budget (`--count`), if any.
    budget: Option<AtomicU64>,
    sent: AtomicU64,
    accepted: AtomicU64,
    not_accepted: AtomicU64,
    errors: AtomicU64,
    /// Latencies answered since the last tick.
    window: Mutex<Histogram<u64>>,
    accepted_tx: Option<mpsc::Sender<Vec<AcceptedRecord>>>,
    duplicate_rate: f64,
    backlog_secs_max: f64,
    in_flight: usize,
    drain_timeout: Duration,
    ttl_secs: u32,
    tracker: Option<Arc<Tracker>>,
}

impl Shared {
    /// Takes up to `n` messages from the budget.
    fn reserve(&self, n: u64) -> u64 {
        let Some(b) = &self.budget else { return n };
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            let take = cur.min(n);
            if take == 0 {
                return 0;
            }
            match b.compare_exchange_weak(cur, cur - take, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return take,
                Err(c) => cur = c,
            }
        }
    }

    fn sending(&self) -> bool {
        !self.stop.is_stopped() && Instant::now() < self.stop_at
    }
}

/// What one sender's tasks share.
struct SenderShared {
    index: usize,
    plan: SenderPlan,
    business_id: u32,
    onset: Instant,
    tally: Mutex<Tally>,
    /// Nanoseconds from onset to the first rejected/throttled (u64::MAX: none yet).
    first_flag_ns: AtomicU64,
    /// Recently accepted (client id, recipient): resent as duplicates, reported as spam.
    recent: Mutex<VecDeque<(u64, Recipient)>>,
    zipf: Option<Arc<[f64]>>,
}

/// One message of a batch besides what the transport sends.
#[derive(Clone, Copy)]
struct Meta {
    intended: Instant,
    resend: bool,
    bytes: u32,
    client_id: u64,
    recipient: Recipient,
}

/// Builds the messages of one connection.
struct Builder {
    rng: XorShift,
    recipients: RecipientGen,
    next_id: u64,
    id_base: u64,
    /// Filler that payloads are slices of: one copy per worker thread, so that taking a
    /// slice does not contend for a reference count shared with other threads.
    payload: Bytes,
}

impl Builder {
    fn message(
        &mut self,
        s: &SenderShared,
        dup_rate: f64,
        intended: Instant,
    ) -> (OutgoingMessage, Meta) {
        if dup_rate > 0.0 && self.rng.unit() < dup_rate {
            let recent = s.recent.lock().expect("recent lock");
            if !recent.is_empty() {
                let (client_id, recipient) = recent[self.rng.below(recent.len() as u64) as usize];
                drop(recent);
                let size = s.plan.size.draw(&mut self.rng);
                return (
                    OutgoingMessage {
                        client_id,
                        recipient,
                        payload: self.payload.slice(..size),
                    },
                    Meta {
                        intended,
                        resend: true,
                        bytes: size as u32,
                        client_id,
                        recipient,
                    },
                );
            }
        }
        assert!(
            self.next_id < 1 << CLIENT_ID_COUNTER_BITS,
            "client id counter overflow"
        );
        let client_id = self.id_base | self.next_id;
        self.next_id += 1;
        let recipient = self.recipients.next(&mut self.rng);
        let size = s.plan.size.draw(&mut self.rng);
        (
            OutgoingMessage {
                client_id,
                recipient,
                payload: self.payload.slice(..size),
            },
            Meta {
                intended,
                resend: false,
                bytes: size as u32,
                client_id,
                recipient,
            },
        )
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, LATENCY_US_MAX)
}

/// Records the answer to one batch and hands its accepted messages to the `--accepted`
/// writer. The channel is bounded and the send is awaited while the batch still holds
/// its in-flight slot, so a slow disk slows the generator instead of growing its memory.
async fn record(
    sh: &Shared,
    s: &SenderShared,
    metas: &[Meta],
    answer: Result<Vec<Status>, ClientError>,
) {
    if let Some(records) = tally_answer(sh, s, metas, answer) {
        if let Some(tx) = &sh.accepted_tx {
            let _ = tx.send(records).await;
        }
    }
}

/// Counts the answer to one batch; returns its accepted messages when they are wanted.
fn tally_answer(
    sh: &Shared,
    s: &SenderShared,
    metas: &[Meta],
    answer: Result<Vec<Status>, ClientError>,
) -> Option<Vec<AcceptedRecord>> {
    let now = Instant::now();
    let n = metas.len() as u64;
    let mut t = s.tally.lock().expect("tally lock");
    t.dups.sent += metas.iter().filter(|m| m.resend).count() as u64;
    let statuses = match answer {
        Ok(st) => st,
        Err(_) => {
            t.errors += n;
            t.dups.other += metas.iter().filter(|m| m.resend).count() as u64;
            sh.errors.fetch_add(n, Ordering::Relaxed);
            return None;
        }
    };
    let mut window = sh.window.lock().expect("window lock");
    let mut accepted_now = 0;
    let mut records = Vec::new();
    let mut flagged = false;
    let mut fresh = Vec::new();
    for (m, st) in metas.iter().zip(&statuses) {
        let us = micros(now.saturating_duration_since(m.intended));
        t.latency_us.saturating_record(us);
        window.saturating_record(us);
        match *st {
            Status::Accepted(pos) => {
                if let Some(tracker) = &sh.tracker {
                    tracker.accepted(pos, m.intended);
                }
                t.accepted += 1;
                t.accepted_bytes += u64::from(m.bytes);
                accepted_now += 1;
                if m.resend {
                    t.dups.not_detected += 1;
                } else {
                    fresh.push((m.client_id, m.recipient));
                }
                if sh.accepted_tx.is_some() {
                    records.push(AcceptedRecord {
                        business_id: s.business_id,
                        client_id: m.client_id,
                        log_position: pos.0,
                    });
                }
            }
            Status::Duplicate(_) => {
                t.duplicate += 1;
                if m.resend {
                    t.dups.detected += 1;
                }
            }
            Status::Throttled { .. } => {
                t.throttled += 1;
                flagged = true;
                if m.resend {
                    t.dups.other += 1;
                }
            }
            Status::Rejected(reason) => {
                t.rejected += 1;
                flagged = true;
                let i = Reason::ALL
                    .iter()
                    .position(|r| *r == reason)
                    .expect("every reason is in Reason::ALL");
                t.rejected_by_reason[i] += 1;
                if m.resend {
                    t.dups.other += 1;
                }
            }
        }
    }
    drop(window);
    drop(t);
    sh.accepted.fetch_add(accepted_now, Ordering::Relaxed);
    sh.not_accepted
        .fetch_add(n - accepted_now, Ordering::Relaxed);
    if flagged {
        let since = now.saturating_duration_since(s.onset).as_nanos();
        s.first_flag_ns.fetch_min(
            u64::try_from(since).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
    }
    if !fresh.is_empty() && (sh.duplicate_rate > 0.0 || s.plan.reports_per_sec > 0.0) {
        let mut recent = s.recent.lock().expect("recent lock");
        for f in fresh {
            if recent.len() == RECENT_ACCEPTED_MAX {
                recent.pop_front();
            }
            recent.push_back(f);
        }
    }
    (!records.is_empty()).then_some(records)
}

/// Submits a batch; with `rounds` above 1, resends the messages that came back
/// throttled after the largest retry-after of the round (at most
/// [`courier_client::client::RETRY_AFTER_MAX`]), for at most `rounds` rounds in all, as
/// `Client::submit_with_retry` does (issue 14: a retrying sender is judged on its
/// messages, not its retries). Returns each message's last status, in order.
async fn submit_retrying(
    t: &dyn Transport,
    batch: Vec<OutgoingMessage>,
    rounds: u32,
    ttl_secs: u32,
) -> Result<Vec<Status>, ClientError> {
    if rounds <= 1 {
        return t.submit_ttl(batch, ttl_secs).await;
    }
    let mut last = t.submit_ttl(batch.clone(), ttl_secs).await?;
    for _ in 1..rounds {
        let todo: Vec<usize> = (0..last.len())
            .filter(|&i| matches!(last[i], Status::Throttled { .. }))
            .collect();
        let Some(wait_ms) = todo
            .iter()
            .filter_map(|&i| match last[i] {
                Status::Throttled { retry_after_ms } => Some(retry_after_ms),
                _ => None,
            })
            .max()
        else {
            break;
        };
        tokio::time::sleep(
            Duration::from_millis(wait_ms.into()).min(courier_client::client::RETRY_AFTER_MAX),
        )
        .await;
        let again = t
            .submit_ttl(todo.iter().map(|&i| batch[i].clone()).collect(), ttl_secs)
            .await?;
        for (&i, st) in todo.iter().zip(again) {
            last[i] = st;
        }
    }
    Ok(last)
}

/// Open loop on one connection.
async fn open_loop(
    sh: Arc<Shared>,
    s: Arc<SenderShared>,
    t: Arc<dyn Transport>,
    sched: Schedule,
    mut b: Builder,
) {
    let sem = Arc::new(Semaphore::new(sh.in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let give_up_at = sh.stop_at + sh.drain_timeout;
    let mut k = 0u64;
    let (mut late, mut peak, mut dropped, mut sent) = (0u64, 0u64, 0u64, 0u64);
    let rate_max = s.plan.rate.max(s.plan.rate_from) / s.plan.connections as f64;
    let cap = ((rate_max * sh.backlog_secs_max) as u64).max(s.plan.batch as u64);
    while let Some(due_secs) = sched.time_of(k) {
        let due_at = sh.start + Duration::from_secs_f64(due_secs);
        if due_at >= sh.stop_at {
            break;
        }
        tokio::select! {
            biased;
            () = sh.stop.wait() => break,
            () = tokio::time::sleep_until(due_at) => {}
        }
        let permit = tokio::select! {
            biased;
            () = sh.stop.wait() => break,
            p = sem.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let now = Instant::now();
        // Messages intended before the end are still sent when the timer fires a little
        // late; a server so far behind that slots free up only later is left with them
        // (counted as dropped below).
        if now >= sh.stop_at + LATE_AFTER {
            break;
        }
        let due = sched.due_by(now.duration_since(sh.start).as_secs_f64());
        let mut backlog = due.saturating_sub(k);
        peak = peak.max(backlog);
        if backlog > cap {
            dropped += backlog - cap;
            k += backlog - cap;
            backlog = cap;
        }
        let n = sh.reserve(backlog.min(s.plan.batch as u64).max(1));
        if n == 0 {
            break;
        }
        let mut batch = Vec::with_capacity(n as usize);
        let mut metas = Vec::with_capacity(n as usize);
        for i in k..k + n {
            let intended = sh.start + Duration::from_secs_f64(sched.time_of(i).unwrap_or(due_secs));
            if now.saturating_duration_since(intended) >= LATE_AFTER {
                late += 1;
            }
            let (m, meta) = b.message(&s, sh.duplicate_rate, intended);
            batch.push(m);
            metas.push(meta);
        }
        k += n;
        sent += n;
        sh.sent.fetch_add(n, Ordering::Relaxed);
        let (sh2, s2, t2) = (sh.clone(), s.clone(), t.clone());
        tasks.spawn(async move {
            let rounds = s2.plan.retry_rounds;
            let answer = match tokio::time::timeout_at(
                give_up_at,
                submit_retrying(&*t2, batch, rounds, sh2.ttl_secs),
            )
            .await
            {
                Ok(a) => a,
                Err(_) => Err(ClientError::Closed),
            };
            record(&sh2, &s2, &metas, answer).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    // What was due and never sent: the server was behind when the run ended.
    let end = Instant::now()
        .min(sh.stop_at)
        .duration_since(sh.start)
        .as_secs_f64();
    if !sh.stop.is_stopped()
        && sh
            .budget
            .as_ref()
            .is_none_or(|b| b.load(Ordering::Relaxed) > 0)
    {
        dropped += sched.due_by(end).saturating_sub(k);
    }
    while tasks.join_next().await.is_some() {}
    let mut t = s.tally.lock().expect("tally lock");
    t.sent += sent;
    t.late += late;
    t.backlog_peak = t.backlog_peak.max(peak);
    t.backlog_dropped += dropped;
}

/// Closed loop: one worker of one connection, batches back to back.
async fn closed_loop(sh: Arc<Shared>, s: Arc<SenderShared>, t: Arc<dyn Transport>, mut b: Builder) {
    let give_up_at = sh.stop_at + sh.drain_timeout;
    let onset = s.onset;
    tokio::select! {
        biased;
        () = sh.stop.wait() => return,
        () = tokio::time::sleep_until(onset) => {}
    }
    let stop_at = sh.start + Duration::from_secs_f64(s.plan.stop_secs);
    let mut sent = 0;
    while sh.sending() && Instant::now() < stop_at {
        let n = sh.reserve(s.plan.batch as u64);
        if n == 0 {
            break;
        }
        let now = Instant::now();
        let (batch, metas): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| b.message(&s, sh.duplicate_rate, now))
            .unzip();
        sent += n;
        sh.sent.fetch_add(n, Ordering::Relaxed);
        let answer = match tokio::time::timeout_at(
            give_up_at,
            submit_retrying(&*t, batch, s.plan.retry_rounds, sh.ttl_secs),
        )
        .await
        {
            Ok(a) => a,
            Err(_) => Err(ClientError::Closed),
        };
        let fatal = matches!(&answer, Err(e) if e.is_fatal());
        record(&sh, &s, &metas, answer).await;
        if fatal {
            break;
        }
    }
    s.tally.lock().expect("tally lock").sent += sent;
}

/// Sends REPORT frames (one entry each, about recently accepted messages) at the
/// sender's `reports_per_sec`, on the platform connection when there is one, else on the
/// sender's first connection.
async fn reporter(sh: Arc<Shared>, s: Arc<SenderShared>, t: Arc<dyn Transport>) {
    let sched = Schedule {
        start_secs: s.plan.start_secs,
        stop_secs: s.plan.stop_secs,
        rate_from: s.plan.reports_per_sec,
        rate_to: s.plan.reports_per_sec,
        phase: 0.5,
    };
    let sem = Arc::new(Semaphore::new(REPORTS_IN_FLIGHT_MAX));
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = XorShift::new(s.index as u64 ^ 0x5eed);
    let mut k = 0;
    while let Some(at) = sched.time_of(k) {
        k += 1;
        let at = sh.start + Duration::from_secs_f64(at);
        if at >= sh.stop_at {
            break;
        }
        tokio::select! {
            biased;
            () = sh.stop.wait() => break,
            () = tokio::time::sleep_until(at) => {}
        }
        let entry = {
            let recent = s.recent.lock().expect("recent lock");
            if recent.is_empty() {
                continue;
            }
            let (client_id, recipient) = recent[rng.below(recent.len() as u64) as usize];
            ReportEntry {
                business_id: s.business_id,
                client_id,
                recipient,
            }
        };
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (s2, t2) = (s.clone(), t.clone());
        tasks.spawn(async move {
            let outcome = t2.report(vec![entry]).await;
            let mut tally = s2.tally.lock().expect("tally lock");
            let r = &mut tally.reports;
            r.sent += 1;
            r.entries += 1;
            match outcome {
                Ok(ReportOutcome::Refused { code }) => {
                    *r.refused_by_code
                        .entry(format!("0x{code:02x}"))
                        .or_default() += 1;
                }
                Ok(ReportOutcome::NotRefused) => r.taken += 1,
                Err(_) => r.errors += 1,
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Samples the counters once a second until `done`.
async fn ticker(
    sh: Arc<Shared>,
    on_second: Option<OnSecond>,
    done: Arc<watch::Sender<bool>>,
) -> Vec<Second> {
    let mut timeline = Vec::new();
    let mut last = (0u64, 0u64, 0u64, 0u64);
    let mut interval =
        tokio::time::interval_at(sh.start + Duration::from_secs(1), Duration::from_secs(1));
    let mut done_rx = done.subscribe();
    loop {
        let finished = tokio::select! {
            _ = interval.tick() => false,
            _ = done_rx.wait_for(|d| *d) => true,
        };
        let now = (
            sh.sent.load(Ordering::Relaxed),
            sh.accepted.load(Ordering::Relaxed),
            sh.not_accepted.load(Ordering::Relaxed),
            sh.errors.load(Ordering::Relaxed),
        );
        let (p50, p99, max) = {
            let mut w = sh.window.lock().expect("window lock");
            let r = if w.is_empty() {
                (0, 0, 0)
            } else {
                (w.value_at_quantile(0.5), w.value_at_quantile(0.99), w.max())
            };
            w.reset();
            r
        };
        let sec = Second {
            t_secs: sh.start.elapsed().as_secs_f64(),
            sent: now.0 - last.0,
            accepted: now.1 - last.1,
            not_accepted: now.2 - last.2,
            errors: now.3 - last.3,
            p50_us: p50,
            p99_us: p99,
            max_us: max,
        };
        last = now;
        // A last partial interval is kept only if something happened in it.
        if !finished || sec.sent + sec.accepted + sec.not_accepted + sec.errors > 0 {
            if let Some(f) = &on_second {
                f(&sec, (now.0, now.1, now.3));
            }
            timeline.push(sec);
        }
        if finished {
            return timeline;
        }
    }
}

/// Spawns `task` on `worker`, or on the caller's runtime.
fn spawn_at<F>(set: &mut tokio::task::JoinSet<()>, worker: Option<&tokio::runtime::Handle>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match worker {
        Some(h) => set.spawn_on(task, h),
        None => set.spawn(task),
    };
}

/// Runs `plan` over the given senders' transports and reports.
pub async fn drive(duration: Duration, senders: Vec<SenderRun>, opts: &RunOptions) -> LoadReport {
    let plan_max = senders.iter().map(|s| s.plan.size.max()).max().unwrap_or(0);
    let payload = filler(plan_max);
    let payloads: Vec<Bytes> = (0..opts.workers.len().max(1))
        .map(|_| Bytes::copy_from_slice(&payload))
        .collect();
    let cpu_before = opts.cpu.sample();
    let start = Instant::now();
    let sh = Arc::new(Shared {
        start,
        stop_at: start + duration,
        stop: opts.stop.clone(),
        budget: opts.count.map(AtomicU64::new),
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        not_accepted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        window: Mutex::new(histogram()),
        accepted_tx: opts.accepted.clone(),
        duplicate_rate: opts.duplicate_rate,
        backlog_secs_max: opts.backlog_secs_max,
        in_flight: opts.in_flight.max(1),
        drain_timeout: opts.drain_timeout,
        ttl_secs: opts.ttl_secs,
        tracker: opts.tracker.clone(),
    });
    let done = Arc::new(watch::channel(false).0);
    let tick = tokio::spawn(ticker(sh.clone(), opts.on_second.clone(), done.clone()));
    let mut set = tokio::task::JoinSet::new();
    let mut shared_senders = Vec::new();
    let mut conn_index = 0u64;
    let open = senders.iter().any(|s| !s.plan.closed_loop());
    let closed = senders.iter().any(|s| s.plan.closed_loop());
    let target_rate: f64 = senders
        .iter()
        .map(|s| s.plan.rate.max(s.plan.rate_from))
        .sum();
    for (index, run) in senders.into_iter().enumerate() {
        let p = &run.plan;
        let zipf = match p.recipients {
            RecipientSpec::Zipf { s, population } => Some(zipf_table(s, population)),
            _ => None,
        };
        let s = Arc::new(SenderShared {
            index,
            business_id: run.conns.first().map_or(0, |c| c.business_id()),
            onset: start + Duration::from_secs_f64(p.start_secs),
            tally: Mutex::new(Tally::new()),
            first_flag_ns: AtomicU64::new(u64::MAX),
            recent: Mutex::new(VecDeque::new()),
            zipf,
            plan: run.plan.clone(),
        });
        shared_senders.push(s.clone());
        let conns = run.conns.len() as u64;
        let first_conn = conn_index;
        for (c, t) in run.conns.iter().enumerate() {
            let worker = opts.worker_for(conn_index as usize);
            let filler = &payloads[conn_index as usize % payloads.len()];
            let builder = |w: u64| Builder {
                rng: XorShift::new(opts.seed ^ ((index as u64) << 48) ^ ((c as u64) << 32) ^ w),
                recipients: RecipientGen::new(&s.plan.recipients, index, c as u64, s.zipf.clone()),
                next_id: 0,
                id_base: conn_index << CLIENT_ID_COUNTER_BITS,
                payload: filler.clone(),
            };
            if s.plan.closed_loop() {
                // Workers of one connection share its id space through disjoint ranges.
                let workers = opts.in_flight.max(1) as u64;
                let per = (1u64 << CLIENT_ID_COUNTER_BITS) / workers;
                for w in 0..workers {
                    let mut b = builder(w);
                    b.next_id = w * per;
                    spawn_at(
                        &mut set,
                        worker,
                        closed_loop(sh.clone(), s.clone(), t.clone(), b),
                    );
                }
            } else {
                let p = &s.plan;
                let sched = Schedule {
                    start_secs: p.start_secs,
                    stop_secs: p.stop_secs,
                    rate_from: p.rate_from / conns as f64,
                    rate_to: p.rate / conns as f64,
                    phase: (c as f64 + 0.5) / conns as f64,
                };
                spawn_at(
                    &mut set,
                    worker,
                    open_loop(sh.clone(), s.clone(), t.clone(), sched, builder(0)),
                );
            }
            conn_index += 1;
        }
        if p.reports_per_sec > 0.0 {
            if let Some(t) = &opts.reporter {
                // The platform connection was made on the caller's runtime.
                spawn_at(&mut set, None, reporter(sh.clone(), s.clone(), t.clone()));
            } else if let Some(t) = run.conns.first() {
                let worker = opts.worker_for(first_conn as usize);
                spawn_at(&mut set, worker, reporter(sh.clone(), s.clone(), t.clone()));
            }
        }
    }
    while set.join_next().await.is_some() {}
    let duration_secs = start.elapsed().as_secs_f64();
    let cpu_after = opts.cpu.sample();
    done.send_replace(true);
    let timeline = tick.await.unwrap_or_default();

    let mut total = Tally::new();
    let mut sender_reports = Vec::new();
    for s in &shared_senders {
        let t = s.tally.lock().expect("tally lock");
        total.merge(&t);
        let ns = s.first_flag_ns.load(Ordering::Relaxed);
        sender_reports.push(SenderReport {
            name: s.plan.name.clone(),
            label: s.plan.label,
            business_id: s.business_id,
            rate: s.plan.rate,
            start_secs: s.plan.start_secs,
            sent: t.sent,
            accepted: t.accepted,
            throttled: t.throttled,
            rejected: t.rejected,
            errors: t.errors,
            first_flag_after_onset_secs: (ns != u64::MAX).then(|| ns as f64 / 1e9),
            rejected_by_reason: by_reason(&t.rejected_by_reason),
            latency_us: Percentiles::of(&t.latency_us),
        });
    }
    let (generator_secs, server) = opts.cpu.between(&cpu_before, &cpu_after);
    let per_msg = |secs: f64| {
        if total.sent > 0 {
            secs * 1e6 / total.sent as f64
        } else {
            0.0
        }
    };
    let per_sec = |n: f64| {
        if duration_secs > 0.0 {
            n / duration_secs
        } else {
            0.0
        }
    };
    LoadReport {
        sent: total.sent,
        accepted: total.accepted,
        duplicate: total.duplicate,
        throttled: total.throttled,
        rejected: total.rejected,
        errors: total.errors,
        duration_secs,
        msgs_per_sec: per_sec(total.accepted as f64),
        payload_bytes_per_sec: per_sec(total.accepted_bytes as f64),
        latency_us: Percentiles::of(&total.latency_us),
        rejected_by_reason: by_reason(&total.rejected_by_reason),
        mode: match (open, closed) {
            (true, true) => "mixed",
            (true, false) => "open",
            (false, _) => "closed",
        }
        .to_string(),
        target_rate: if open { target_rate } else { 0.0 },
        late: total.late,
        backlog_peak: total.backlog_peak,
        backlog_dropped: total.backlog_dropped,
        interrupted: opts.stop.is_stopped(),
        latency_curve: report::curve(&total.latency_us),
        timeline,
        detection: Detection::score(&sender_reports),
        senders: sender_reports,
        duplicates: total.dups,
        reports: total.reports,
        delivery: None,
        cpu: Cpu {
            generator_secs,
            generator_us_per_msg: per_msg(generator_secs),
            server_us_per_msg: server.as_ref().map(|(s, _)| per_msg(*s)),
            server_secs: server.as_ref().map(|(s, _)| *s),
            server_source: server.map(|(_, src)| src),
        },
    }
}

/// Counts by reason name, the reasons that occurred only.
fn by_reason(counts: &[u64; Reason::ALL.len()]) -> std::collections::BTreeMap<String, u64> {
    Reason::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| (r.name().to_string(), *n))
        .collect()
}

/// The plan's length as a `Duration`.
pub fn plan_duration(plan: &Plan) -> Duration {
    Duration::from_secs_f64(plan.duration_secs)
}
