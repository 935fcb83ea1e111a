//! Delivery runs (`courier-loadgen --deliver`): a simulated delivery edge with devices
//! beside the senders, and the senders' businesses listening to their statuses and
//! replies.
//!
//! ```text
//!  edge connection(s) (DeliveryEdge, platform token) ── per DELIVER batch:
//!     copy of a delivered message ──> delivered again
//!     DeviceModel::fate: not on platform ──> failed(not_on_platform)
//!                        offline ──> retry_later; ONLINE at the device's return
//!                        online  ──> delivered (read later, a share); a reply, a share
//!     ──> OUTCOME frames; replies ──> reply queue ──> INBOUND batches (ACKed; throttled
//!         ones sent again)
//!  each sender connection (Client with EVENTS) ── statuses, replies ──> Tracker ──>
//!     EVENT_ACK (every event, copies included, once handled)
//!  finish: wait until every accepted message has its final status and every reply was
//!          heard (or `settle` passes), then stop and report
//!  with E2E (the relay seals for devices; the edge always asks for it):
//!     KEYS_WANTED ──> DeviceWorld::bundles ──> DEVICE_KEYS (real keys, 1 or 2 devices
//!     per recipient); BUSINESS_KEYS ──> the reply keys; every DELIVER_E2E is opened on
//!     every device of its recipient (content checked, and not opening on the other
//!     device); replies are sealed to the business's key
//! ```
//!
//! Bounds: the edge holds at most its credit window of DELIVERs, [`READS_QUEUED_MAX`]
//! pending `read` outcomes, [`ONLINE_SCHEDULED_MAX`] recipients waiting to come online
//! (each with at most [`MESSAGES_PER_RECIPIENT_MAX`] messages remembered) and
//! [`REPLIES_QUEUED_MAX`] replies; what does not fit is sent at once or counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_client::edge::DeliveryEdge;
use courier_client::{Client, ClientConfig, ClientError, Deliveries, EdgeItem, EventReceiver};
use courier_pipeline::e2e::DeviceWorld;
use courier_pipeline::wire::delivery::{
    BusinessEvent, Deliver, FailReason, InboundEntry, Outcome, OutcomeEntry,
};
use courier_pipeline::wire::{LogPosition, Recipient, Status};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::devices::{DeviceModel, Fate};
use crate::engine::StopSignal;
use crate::tracking::{reply_payload, DeliveryReport, E2eReport, Tracker};
use crate::traffic::is_filler;

/// Recipients whose devices the simulated edge holds (their keys and sessions).
pub const DEVICE_RECIPIENTS_MAX: usize = 1 << 20;

/// `read` outcomes waiting to be sent (each some time after its `delivered`); past it a
/// message is reported `read` at once.
pub const READS_QUEUED_MAX: usize = 65_536;
/// Offline recipients waiting for their ONLINE; past it the relay's backoff retries them.
pub const ONLINE_SCHEDULED_MAX: usize = 1 << 20;
/// Messages remembered per offline recipient (to time ONLINE → delivered).
pub const MESSAGES_PER_RECIPIENT_MAX: usize = 64;
/// Replies waiting for an INBOUND batch; past it a reply is dropped (counted lost).
pub const REPLIES_QUEUED_MAX: usize = 4096;
/// How long after `delivered` a read message is reported `read`.
pub const READ_DELAY: Duration = Duration::from_millis(50);
/// DELIVERs answered per OUTCOME batch, and events acknowledged per EVENT_ACK batch.
const BATCH_MAX: usize = 1024;
/// Rounds a throttled reply batch is sent before its replies count as lost.
const REPLY_ROUNDS_MAX: u32 = 20;
/// Pushes a business connection buffers before QUIC flow control holds the relay back.
pub const EVENT_FRAMES_BUFFERED: usize = 64;

/// The simulated edge of a run.
#[derive(Clone)]
pub struct DeliveryPlan {
    /// A platform credential's token.
    pub edge_token: String,
    /// Edge connections.
    pub connections: usize,
    /// DELIVERs each edge connection takes ahead (its credit window).
    pub window: u32,
    /// How the devices behave.
    pub devices: DeviceModel,
    /// Longest wait after sending for the last statuses and replies.
    pub settle: Duration,
}

impl std::fmt::Debug for DeliveryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryPlan")
            .field("edge_token", &"<redacted>")
            .field("connections", &self.connections)
            .field("window", &self.window)
            .field("devices", &self.devices)
            .field("settle", &self.settle)
            .finish()
    }
}

impl DeliveryPlan {
    /// The plan's bounds; names what is off.
    pub fn check(&self) -> Result<(), String> {
        if self.connections == 0 || self.connections > 64 {
            return Err("edge connections must be in 1..=64".into());
        }
        if self.window == 0 || self.window > courier_client::edge::WINDOW_MAX {
            return Err("the edge's credit window must be in 1..=1048576".into());
        }
        self.devices.check()
    }
}

/// A delivery run in progress: the edge's tasks and the businesses' listeners.
#[derive(Debug)]
pub struct DeliveryRun {
    tracker: Arc<Tracker>,
    stop: StopSignal,
    tasks: JoinSet<()>,
    edges: Vec<Arc<DeliveryEdge>>,
    settle: Duration,
    ctx: Arc<EdgeCtx>,
}

/// What every edge task of a run shares.
struct EdgeCtx {
    model: DeviceModel,
    tracker: Arc<Tracker>,
    t0: Instant,
    replies: mpsc::Sender<InboundEntry>,
    stop: StopSignal,
    /// The recipients' devices (used when the relay granted E2E).
    world: Mutex<DeviceWorld>,
    /// Whether the relay granted E2E (the same for every connection of a relay).
    e2e: std::sync::atomic::AtomicBool,
    content_mismatch: AtomicU64,
}

impl std::fmt::Debug for EdgeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeCtx").finish_non_exhaustive()
    }
}

impl DeliveryRun {
    /// Connects the edge (`base` gives target and trust; the plan's token replaces its
    /// token) and starts its tasks on the caller's runtime.
    /// The devices of the first `population` numbers of the shared population
    /// (`traffic::population_recipient`) are made, and their bundles signed, before the
    /// edge connects (capped at [`DEVICE_RECIPIENTS_MAX`]).
    pub async fn start(
        base: &ClientConfig,
        plan: &DeliveryPlan,
        population: u64,
    ) -> Result<DeliveryRun, ClientError> {
        let tracker = Arc::new(Tracker::new());
        let stop = StopSignal::default();
        let mut tasks = JoinSet::new();
        let (replies_tx, replies_rx) = mpsc::channel(REPLIES_QUEUED_MAX);
        let ctx = Arc::new(EdgeCtx {
            model: plan.devices,
            tracker: tracker.clone(),
            t0: Instant::now(),
            replies: replies_tx,
            stop: stop.clone(),
            world: Mutex::new(prepared_world(plan.devices.seed, population)),
            e2e: std::sync::atomic::AtomicBool::new(false),
            content_mismatch: AtomicU64::new(0),
        });
        let cfg = ClientConfig {
            token: plan.edge_token.clone(),
            streams: 1,
            batches_in_flight_per_stream: 4,
            ..base.clone()
        };
        let mut edges = Vec::new();
        for _ in 0..plan.connections {
            // Asks for E2E always: a relay that does not seal for devices grants DELIVERY
            // alone, one that does refuses DELIVERY without E2E.
            let (edge, deliveries) = DeliveryEdge::connect_e2e(&cfg, plan.window).await?;
            ctx.e2e.store(edge.e2e(), Ordering::Relaxed);
            let edge = Arc::new(edge);
            tasks.spawn(run_edge(edge.clone(), deliveries, ctx.clone()));
            edges.push(edge);
        }
        tasks.spawn(run_replies(
            edges[0].clone(),
            replies_rx,
            tracker.clone(),
            stop.clone(),
        ));
        Ok(DeliveryRun {
            tracker,
            stop,
            tasks,
            edges,
            settle: plan.settle,
            ctx,
        })
    }

    /// The run's record (the senders report accepted messages to it).
    pub fn tracker(&self) -> Arc<Tracker> {
        self.tracker.clone()
    }

    /// Listens to a sender connection's events (on the caller's runtime).
    pub fn listen(&mut self, client: Arc<Client>, events: EventReceiver) {
        self.tasks.spawn(run_business(
            client,
            events,
            self.tracker.clone(),
            self.stop.clone(),
        ));
    }

    /// Waits until every accepted message has its final status and every reply was
    /// heard, at most the plan's `settle` (or until `early` is asked), then stops the edge
    /// and the listeners and reports.
    pub async fn finish(mut self, early: &StopSignal) -> DeliveryReport {
        let start = Instant::now();
        // Bounded by `settle`.
        while start.elapsed() < self.settle && !early.is_stopped() {
            if self.tracker.outstanding() == (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settle_secs = start.elapsed().as_secs_f64();
        self.stop.stop();
        for e in &self.edges {
            e.close().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        let mut report = self.tracker.report(settle_secs);
        if self.ctx.e2e.load(Ordering::Relaxed) {
            let w = self.ctx.world.lock().expect("world lock").counts();
            report.e2e = Some(E2eReport {
                messages_opened: w.messages_opened,
                copies_opened: w.copies_opened,
                open_failures: w.open_failures,
                content_mismatch: self.ctx.content_mismatch.load(Ordering::Relaxed),
                cross_device_checks: w.cross_device_checks,
                cross_device_opened: w.cross_device_opened,
                sessions_accepted: w.sessions_accepted,
                bundles_published: w.bundles_published,
                replies_sealed: w.replies_sealed,
            });
        }
        report
    }
}

/// A world whose first `population` numbers' devices exist and have signed bundles.
fn prepared_world(seed: u64, population: u64) -> DeviceWorld {
    let mut world = DeviceWorld::new(seed, DEVICE_RECIPIENTS_MAX);
    let n = population.min(DEVICE_RECIPIENTS_MAX as u64);
    for i in 0..n {
        world.prepare(&crate::traffic::population_recipient(i));
    }
    world
}

/// Offline recipients with messages waiting, by when they come online.
#[derive(Default)]
struct OnlineSchedule {
    by_time: BTreeMap<Instant, Vec<Recipient>>,
    waiting: HashMap<Recipient, (Instant, Vec<LogPosition>)>,
}

impl OnlineSchedule {
    fn add(&mut self, r: Recipient, message: LogPosition, at: Instant) {
        if let Some((_, ms)) = self.waiting.get_mut(&r) {
            if ms.len() < MESSAGES_PER_RECIPIENT_MAX {
                ms.push(message);
            }
            return;
        }
        if self.waiting.len() >= ONLINE_SCHEDULED_MAX {
            return;
        }
        self.waiting.insert(r, (at, vec![message]));
        self.by_time.entry(at).or_default().push(r);
    }

    fn next(&self) -> Option<Instant> {
        self.by_time.keys().next().copied()
    }

    /// The recipients online by `now`, with their messages.
    fn take_due(&mut self, now: Instant) -> Vec<(Recipient, Vec<LogPosition>)> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_time.first_entry() {
            if *entry.key() > now {
                break;
            }
            for r in entry.remove() {
                if let Some((_, ms)) = self.waiting.remove(&r) {
                    out.push((r, ms));
                }
            }
        }
        out
    }
}

/// What the edge does with one DELIVER at `now`.
fn decide(
    ctx: &EdgeCtx,
    d: &Deliver,
    now: Instant,
    onlines: &mut OnlineSchedule,
    reads: &mut VecDeque<(Instant, LogPosition)>,
) -> Outcome {
    if ctx.e2e.load(Ordering::Relaxed) {
        // Every copy handed over is opened, repeats included.
        let opened = ctx.world.lock().expect("world lock").open(d);
        if opened.as_deref().is_some_and(|p| !is_filler(p)) {
            ctx.content_mismatch.fetch_add(1, Ordering::Relaxed);
        }
    }
    let (_, delivered_before) = ctx.tracker.handed(d.message);
    if delivered_before {
        return Outcome::Delivered;
    }
    let t = now.saturating_duration_since(ctx.t0).as_secs_f64();
    match ctx.model.fate(&d.recipient, d.message, t) {
        Fate::NotOnPlatform => Outcome::Failed(FailReason::NotOnPlatform),
        Fate::Offline { online_in_ms } => {
            ctx.tracker.retry_later();
            // A millisecond late, so the device is surely back when the DELIVER comes.
            onlines.add(
                d.recipient,
                d.message,
                now + Duration::from_millis(online_in_ms + 1),
            );
            Outcome::RetryLater
        }
        Fate::Delivered { read, reply } => {
            ctx.tracker.delivered(d.message, now);
            let plain = reply.then(|| reply_payload(d.business_id, d.message));
            // One reply per message: the message's position is a unique id.
            let payload = match plain {
                Some(p) if ctx.e2e.load(Ordering::Relaxed) => ctx
                    .world
                    .lock()
                    .expect("world lock")
                    .seal_reply(d.business_id, d.message.0, &p),
                p => p.map(Bytes::from),
            };
            if reply {
                let entry = payload.map(|payload| InboundEntry {
                    id: d.message.0,
                    business_id: d.business_id,
                    sender: d.recipient,
                    payload,
                });
                if entry.is_some_and(|e| ctx.replies.try_send(e).is_ok()) {
                    ctx.tracker.reply_queued();
                } else {
                    ctx.tracker.inbound(0, 0, 1, false);
                }
            }
            if read && reads.len() >= READS_QUEUED_MAX {
                return Outcome::Read;
            }
            if read {
                reads.push_back((now + READ_DELAY, d.message));
            }
            Outcome::Delivered
        }
    }
}

/// One edge connection: answers DELIVERs by batch, announces devices coming online and
/// reports reads, until the run stops or the connection ends.
async fn run_edge(edge: Arc<DeliveryEdge>, mut rx: Deliveries, ctx: Arc<EdgeCtx>) {
    let mut onlines = OnlineSchedule::default();
    let mut reads: VecDeque<(Instant, LogPosition)> = VecDeque::new();
    loop {
        let wake = [onlines.next(), reads.front().map(|r| r.0)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            biased;
            () = ctx.stop.wait() => return,
            item = rx.recv_item() => {
                let Ok(item) = item else { return };
                let mut batch = Vec::new();
                let mut wanted = Vec::new();
                let mut next = Some(item);
                // Bounded by BATCH_MAX.
                while let Some(item) = next.take() {
                    match item {
                        EdgeItem::Deliver(d) => batch.push(d),
                        EdgeItem::KeysWanted(r) => wanted.extend(r),
                        EdgeItem::BusinessKeys(k) => {
                            ctx.world.lock().expect("world lock").learn_business_keys(&k);
                        }
                    }
                    if batch.len() + wanted.len() < BATCH_MAX {
                        next = rx.try_recv_item().await.ok().flatten();
                    }
                }
                if !wanted.is_empty() {
                    let entries = ctx.world.lock().expect("world lock").device_keys(&wanted);
                    if edge.device_keys(&entries).await.is_err() {
                        return;
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let now = Instant::now();
                let outcomes: Vec<OutcomeEntry> = batch
                    .iter()
                    .map(|d| OutcomeEntry {
                        message: d.message,
                        outcome: decide(&ctx, d, now, &mut onlines, &mut reads),
                    })
                    .collect();
                if edge.outcomes(&outcomes).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                let now = Instant::now();
                let due = onlines.take_due(now);
                if !due.is_empty() {
                    let recipients: Vec<Recipient> = due.iter().map(|(r, _)| *r).collect();
                    for (_, ms) in &due {
                        ctx.tracker.online(ms, now);
                    }
                    if edge.online(&recipients).await.is_err() {
                        return;
                    }
                }
                let mut read = Vec::new();
                while reads.front().is_some_and(|r| r.0 <= now) {
                    let (_, message) = reads.pop_front().expect("checked");
                    read.push(OutcomeEntry { message, outcome: Outcome::Read });
                }
                if edge.outcomes(&read).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Hands queued replies to the relay in INBOUND batches; throttled ones go again after
/// the relay's retry-after.
async fn run_replies(
    edge: Arc<DeliveryEdge>,
    mut rx: mpsc::Receiver<InboundEntry>,
    tracker: Arc<Tracker>,
    stop: StopSignal,
) {
    let max = (edge.welcome().batch_messages_max as usize).clamp(1, 256);
    loop {
        let first = tokio::select! {
            biased;
            () = stop.wait() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut round = 0;
        while !batch.is_empty() {
            round += 1;
            let statuses = match edge.inbound(batch.clone()).await {
                Ok(s) => s,
                Err(_) => {
                    tracker.inbound(0, 0, batch.len() as u64, true);
                    return;
                }
            };
            let (mut accepted, mut lost, mut wait_ms) = (0, 0, 0u32);
            let mut again = Vec::new();
            for (e, s) in batch.into_iter().zip(statuses) {
                match s {
                    Status::Accepted(_) | Status::Duplicate(_) => accepted += 1,
                    Status::Throttled { retry_after_ms } => {
                        wait_ms = wait_ms.max(retry_after_ms);
                        again.push(e);
                    }
                    Status::Rejected(_) => lost += 1,
                }
            }
            if round >= REPLY_ROUNDS_MAX && !again.is_empty() {
                lost += again.len() as u64;
                again.clear();
            }
            tracker.inbound(accepted, again.len() as u64, lost, true);
            batch = again;
            if !batch.is_empty() {
                tokio::select! {
                    biased;
                    () = stop.wait() => return,
                    () = tokio::time::sleep(Duration::from_millis(wait_ms.clamp(10, 1000).into())) => {}
                }
            }
        }
    }
}

/// One sender connection's events: recorded, then acknowledged (copies too, or the relay
/// would push them again).
async fn run_business(
    client: Arc<Client>,
    mut events: EventReceiver,
    tracker: Arc<Tracker>,
    stop: StopSignal,
) {
    let business = client.welcome().business_id;
    loop {
        let first = tokio::select! {
            biased;
            () = stop.wait() => return,
            e = events.recv() => match e { Ok(e) => e, Err(_) => return },
        };
        let now = Instant::now();
        let mut acks = Vec::with_capacity(64);
        let mut next = Some(first);
        // Bounded by BATCH_MAX.
        while let Some(e) = next.take() {
            acks.push(e.event());
            match e {
                BusinessEvent::Status(s) => tracker.status(&s, now),
                BusinessEvent::Inbound(i) => tracker.reply(&i, business),
            }
            if acks.len() < BATCH_MAX {
                next = events.try_recv().ok().flatten();
            }
        }
        if client.ack_events(&acks).await.is_err() {
            return;
        }
    }
}
