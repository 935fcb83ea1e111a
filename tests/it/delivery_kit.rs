//! What the delivery tests share: a ledger of what was accepted and what each business
//! heard, checked against each other; a simulated edge whose memory outlives its
//! connections; listeners and senders that end when their connection does. So a test can
//! drop connections, or kill the server, and carry on with fresh ones.
//!
//! ```text
//!  send_outstanding(client) ── SUBMIT ──> ACK accepted | duplicate ──> Ledger::answered
//!  listen(client, events)   <── STATUS / INBOUND_EVENT ──> Ledger::heard ──> EVENT_ACK
//!  EdgeSim::serve(edge)     <── DELIVER ──> DeviceModel ──> OUTCOME, ONLINE (at return)
//!  DeviceEdge / DeviceDeliveries: an edge connection with E2E whose devices hold real
//!                   keys (DeviceWorld): answers KEYS_WANTED, opens every DELIVER_E2E on
//!                   every device of its recipient (the tests read the plaintext), seals
//!                   replies to the business's key
//!  Ledger::check ── one final status per accepted message (after dropping copies by
//!                   event id), heard by its own business, `sent` never after it, `read`
//!                   only after `delivered`
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_client::edge::DeliveryEdge;
use courier_client::{
    Client, ClientConfig, ClientError, Deliveries, EdgeItem, EventReceiver, OutgoingMessage,
};
use courier_loadgen::devices::{DeviceModel, Fate};
use courier_pipeline::e2e::{DeviceWorld, WorldCounts};
use courier_pipeline::wire::delivery::{
    BusinessEvent, Deliver, FailReason, InboundEntry, Outcome, OutcomeEntry, StatusKind,
};
use courier_pipeline::wire::{LogPosition, Recipient, Status};
use tokio::time::Instant;

/// Messages per SUBMIT of the senders.
pub const PER_BATCH: usize = 32;

/// The recipient of message `id` among `devices` numbers.
pub fn recipient(id: u64, devices: u64) -> Recipient {
    Recipient::parse(format!("+1555{:07}", 2_000_000 + id % devices).as_bytes()).unwrap()
}

/// What one business heard about one message, copies dropped.
#[derive(Debug, Default)]
struct Heard {
    kinds: Vec<StatusKind>,
    /// Businesses that heard a status of it.
    by: BTreeSet<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Accepted messages: position -> (business, client id).
    accepted: HashMap<LogPosition, (u32, u64)>,
    /// Client ids not answered yet, per business.
    outstanding: BTreeMap<u32, BTreeSet<u64>>,
    heard: HashMap<LogPosition, Heard>,
    events: HashSet<u64>,
    copies: u64,
    /// Replies heard: event id -> (business that heard it, payload).
    replies: BTreeMap<u64, (u32, Bytes)>,
}

/// What the tests know: see the module docs. Shared by every task of a test.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<Inner>);

/// The final statuses counted by [`Ledger::check`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// Accepted messages.
    pub accepted: usize,
    /// Delivered (read or not).
    pub delivered: usize,
    /// Of those, read.
    pub read: usize,
    /// Failed.
    pub failed: usize,
    /// Expired.
    pub expired: usize,
    /// Event copies dropped by id.
    pub copies: u64,
}

impl Ledger {
    /// Ids `ids` of `business` are to be sent (again, until answered).
    pub fn want(&self, business: u32, ids: impl IntoIterator<Item = u64>) {
        self.0
            .lock()
            .unwrap()
            .outstanding
            .entry(business)
            .or_default()
            .extend(ids);
    }

    /// The ids of `business` not answered yet.
    pub fn outstanding(&self, business: u32) -> Vec<u64> {
        let g = self.0.lock().unwrap();
        g.outstanding
            .get(&business)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Ids not answered yet, all businesses together.
    pub fn outstanding_total(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .outstanding
            .values()
            .map(BTreeSet::len)
            .sum()
    }

    /// `business`'s message `id` was answered `status`.
    pub fn answered(&self, business: u32, id: u64, status: Status) {
        let position = match status {
            Status::Accepted(p) | Status::Duplicate(p) => p,
            // Throttled (delivery's bounds full): sent again later.
            Status::Throttled { .. } => return,
            Status::Rejected(r) => panic!("message {id} rejected: {}", r.name()),
        };
        let mut g = self.0.lock().unwrap();
        if let Some(set) = g.outstanding.get_mut(&business) {
            set.remove(&id);
        }
        let old = g.accepted.insert(position, (business, id));
        assert!(
            old.is_none_or(|o| o == (business, id)),
            "position {position:?} answered for two messages"
        );
    }

    /// `business` heard `e`; false for a copy (same event id).
    pub fn heard(&self, business: u32, e: &BusinessEvent) -> bool {
        let mut g = self.0.lock().unwrap();
        if !g.events.insert(e.event().0) {
            g.copies += 1;
            return false;
        }
        match e {
            BusinessEvent::Status(s) => {
                let h = g.heard.entry(s.message).or_default();
                h.kinds.push(s.kind);
                h.by.insert(business);
            }
            BusinessEvent::Inbound(i) => {
                g.replies.insert(i.event.0, (business, i.payload.clone()));
            }
        }
        true
    }

    /// The accepted messages as `courier log audit` lists them.
    pub fn accepted_list(&self) -> Vec<courier::audit::AcceptedEntry> {
        let g = self.0.lock().unwrap();
        g.accepted
            .iter()
            .map(
                |(&position, &(business_id, client_id))| courier::audit::AcceptedEntry {
                    business_id,
                    client_id,
                    position,
                },
            )
            .collect()
    }

    /// Accepted messages without a final status yet.
    pub fn unresolved(&self) -> usize {
        let g = self.0.lock().unwrap();
        g.accepted
            .keys()
            .filter(|m| {
                g.heard
                    .get(m)
                    .is_none_or(|h| !h.kinds.iter().any(|k| is_final(*k)))
            })
            .count()
    }

    /// Panics unless every accepted message has exactly one final status, heard by its
    /// own business only, with `sent` never after it and `read` only after `delivered`.
    pub fn check(&self) -> Outcomes {
        let g = self.0.lock().unwrap();
        let mut o = Outcomes {
            accepted: g.accepted.len(),
            copies: g.copies,
            ..Outcomes::default()
        };
        for (m, (business, id)) in &g.accepted {
            let h = g
                .heard
                .get(m)
                .unwrap_or_else(|| panic!("message {id} of business {business}: no status"));
            assert_eq!(
                h.by,
                BTreeSet::from([*business]),
                "message {id}: heard by the wrong business"
            );
            let finals: Vec<StatusKind> =
                h.kinds.iter().copied().filter(|k| is_final(*k)).collect();
            assert_eq!(
                finals.len(),
                1,
                "message {id} of business {business}: final statuses {:?}",
                h.kinds
            );
            let at = h.kinds.iter().position(|k| is_final(*k)).unwrap();
            assert!(
                !h.kinds[at..].contains(&StatusKind::Sent),
                "message {id}: sent after its final status: {:?}",
                h.kinds
            );
            if let Some(r) = h.kinds.iter().position(|k| *k == StatusKind::Read) {
                assert!(
                    finals[0] == StatusKind::Delivered && r > at,
                    "message {id}: read not after delivered: {:?}",
                    h.kinds
                );
                o.read += 1;
            }
            match finals[0] {
                StatusKind::Delivered => o.delivered += 1,
                StatusKind::Failed => o.failed += 1,
                StatusKind::Expired => o.expired += 1,
                _ => unreachable!(),
            }
        }
        o
    }
}

/// `delivered`, `failed` and `expired` end a message (`read` may follow `delivered`).
fn is_final(k: StatusKind) -> bool {
    matches!(
        k,
        StatusKind::Delivered | StatusKind::Failed | StatusKind::Expired
    )
}

/// Records `client`'s events in `ledger`, acknowledging each once recorded, until the
/// stream ends.
pub async fn listen(client: Arc<Client>, mut events: EventReceiver, ledger: Arc<Ledger>) {
    let business = client.welcome().business_id;
    while let Ok(first) = events.recv().await {
        let mut ids = vec![first.event()];
        ledger.heard(business, &first);
        while let Ok(Some(e)) = events.try_recv() {
            ids.push(e.event());
            ledger.heard(business, &e);
        }
        if client.ack_events(&ids).await.is_err() {
            return;
        }
    }
}

/// Sends `business`'s outstanding ids on `client` (`PER_BATCH` a SUBMIT, four at a time)
/// until none is left or the connection fails; the ledger keeps what was answered.
pub async fn send_outstanding(client: Arc<Client>, ledger: Arc<Ledger>, devices: u64) {
    let business = client.welcome().business_id;
    let ids = ledger.outstanding(business);
    let chunks: Vec<Vec<u64>> = ids.chunks(PER_BATCH).map(<[u64]>::to_vec).collect();
    let queue = Arc::new(Mutex::new(chunks));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, ledger, queue) = (client.clone(), ledger.clone(), queue.clone());
        tasks.spawn(async move {
            loop {
                let Some(ids) = queue.lock().unwrap().pop() else {
                    return;
                };
                let batch = ids
                    .iter()
                    .map(|&id| OutgoingMessage {
                        client_id: id,
                        recipient: recipient(id, devices),
                        payload: Bytes::from(format!("delivery test message {id}")),
                    })
                    .collect();
                let Ok(statuses) = client.submit(batch).await else {
                    return;
                };
                for (id, s) in ids.iter().zip(statuses) {
                    ledger.answered(business, *id, s);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Recipients whose devices a test's world holds.
const WORLD_RECIPIENTS_MAX: usize = 1 << 16;

/// A test's devices, shared by its edge connections (and kept across them).
pub fn device_world(seed: u64) -> Arc<Mutex<DeviceWorld>> {
    Arc::new(Mutex::new(DeviceWorld::new(seed, WORLD_RECIPIENTS_MAX)))
}

/// An edge connection asking for E2E, with devices behind it (see the module docs).
/// Derefs to the [`DeliveryEdge`] for outcomes, ONLINE and closing.
pub struct DeviceEdge {
    edge: Arc<DeliveryEdge>,
    world: Arc<Mutex<DeviceWorld>>,
}

impl std::ops::Deref for DeviceEdge {
    type Target = DeliveryEdge;
    fn deref(&self) -> &DeliveryEdge {
        &self.edge
    }
}

/// The messages of a [`DeviceEdge`], opened on their devices.
pub struct DeviceDeliveries {
    rx: Deliveries,
    /// Items read while waiting for the reply keys at connect.
    early: std::collections::VecDeque<EdgeItem>,
    edge: Arc<DeliveryEdge>,
    world: Arc<Mutex<DeviceWorld>>,
}

impl DeviceEdge {
    /// Connects with DELIVERY and E2E (a relay without E2E grants DELIVERY alone); with
    /// E2E, returns once the relay published the businesses' reply keys (it does so
    /// right after WELCOME), so that replies can be sealed at once.
    pub async fn connect(
        cfg: &ClientConfig,
        window: u32,
        world: Arc<Mutex<DeviceWorld>>,
    ) -> Result<(DeviceEdge, DeviceDeliveries), ClientError> {
        let (edge, mut rx) = DeliveryEdge::connect_e2e(cfg, window).await?;
        let mut early = std::collections::VecDeque::new();
        if edge.e2e() {
            let wait = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match rx.recv_item().await? {
                        EdgeItem::BusinessKeys(k) => {
                            world.lock().unwrap().learn_business_keys(&k);
                            return Ok::<(), ClientError>(());
                        }
                        other => early.push_back(other),
                    }
                }
            });
            wait.await.expect("the relay publishes its reply keys")?;
        }
        let edge = Arc::new(edge);
        Ok((
            DeviceEdge {
                edge: edge.clone(),
                world: world.clone(),
            },
            DeviceDeliveries {
                rx,
                early,
                edge,
                world,
            },
        ))
    }

    /// `plaintext` sealed by a device as a reply to `business_id` with the edge's id
    /// `edge_id` (None before the relay published that business's key).
    pub fn seal_reply(&self, business_id: u32, edge_id: u64, plaintext: &[u8]) -> Option<Bytes> {
        self.world
            .lock()
            .unwrap()
            .seal_reply(business_id, edge_id, plaintext)
    }

    /// Hands over users' replies, sealed by their devices to the business's key when the
    /// relay seals end to end (a reply whose business's key is not known yet goes as it
    /// is, and the relay refuses it).
    pub async fn inbound(
        &self,
        mut entries: Vec<InboundEntry>,
    ) -> Result<Vec<Status>, ClientError> {
        if self.edge.e2e() {
            let mut w = self.world.lock().unwrap();
            for e in &mut entries {
                if let Some(sealed) = w.seal_reply(e.business_id, e.id, &e.payload) {
                    e.payload = sealed;
                }
            }
        }
        self.edge.inbound(entries).await
    }
}

impl DeviceDeliveries {
    /// The next message, its payload the plaintext its devices opened (empty when they
    /// could not: counted in the world's `open_failures`); key requests and reply keys
    /// are handled on the way.
    pub async fn recv(&mut self) -> Result<Deliver, ClientError> {
        loop {
            let item = match self.early.pop_front() {
                Some(item) => item,
                None => self.rx.recv_item().await?,
            };
            if let Some(d) = self.take(item).await? {
                return Ok(d);
            }
        }
    }

    /// [`DeviceDeliveries::recv`] if something is ready now.
    pub async fn try_recv(&mut self) -> Result<Option<Deliver>, ClientError> {
        while let Some(item) = match self.early.pop_front() {
            Some(item) => Some(item),
            None => self.rx.try_recv_item().await?,
        } {
            if let Some(d) = self.take(item).await? {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    async fn take(&mut self, item: EdgeItem) -> Result<Option<Deliver>, ClientError> {
        match item {
            EdgeItem::Deliver(mut d) => {
                if d.e2e {
                    let plain = self.world.lock().unwrap().open(&d);
                    d.payload = plain.map(Bytes::from).unwrap_or_default();
                    d.e2e = false;
                }
                Ok(Some(d))
            }
            EdgeItem::KeysWanted(rs) => {
                let entries = self.world.lock().unwrap().device_keys(&rs);
                self.edge.device_keys(&entries).await?;
                Ok(None)
            }
            EdgeItem::BusinessKeys(k) => {
                self.world.lock().unwrap().learn_business_keys(&k);
                Ok(None)
            }
        }
    }
}

/// The edge's memory, kept across its connections: what it delivered (a copy is
/// delivered again) and which offline recipients to announce when.
#[derive(Debug)]
pub struct EdgeSim {
    model: DeviceModel,
    t0: Instant,
    state: Mutex<EdgeState>,
    /// The devices behind every connection of the edge.
    pub world: Arc<Mutex<DeviceWorld>>,
}

#[derive(Debug, Default)]
struct EdgeState {
    delivered: HashSet<u64>,
    online: BTreeMap<Instant, HashSet<Recipient>>,
    handoffs: u64,
    /// What each message's devices opened (the last hand-off's plaintext).
    opened: HashMap<u64, Bytes>,
}

impl EdgeSim {
    /// An edge whose devices behave as `model` says.
    pub fn new(model: DeviceModel) -> Arc<EdgeSim> {
        Arc::new(EdgeSim {
            model,
            t0: Instant::now(),
            state: Mutex::new(EdgeState::default()),
            world: device_world(model.seed),
        })
    }

    /// What the devices of `message` opened at its last hand-off (None: never handed).
    pub fn opened(&self, message: LogPosition) -> Option<Bytes> {
        self.state.lock().unwrap().opened.get(&message.0).cloned()
    }

    /// What the devices counted.
    pub fn device_counts(&self) -> WorldCounts {
        self.world.lock().unwrap().counts()
    }

    /// DELIVERs taken, copies included.
    pub fn handoffs(&self) -> u64 {
        self.state.lock().unwrap().handoffs
    }

    fn outcome(&self, d: &Deliver, now: Instant) -> Outcome {
        let (message, r) = (d.message, &d.recipient);
        let mut st = self.state.lock().unwrap();
        st.handoffs += 1;
        st.opened.insert(message.0, d.payload.clone());
        if st.delivered.contains(&message.0) {
            return Outcome::Delivered;
        }
        let t = now.saturating_duration_since(self.t0).as_secs_f64();
        match self.model.fate(r, message, t) {
            Fate::NotOnPlatform => Outcome::Failed(FailReason::NotOnPlatform),
            Fate::Offline { online_in_ms } => {
                let at = now + Duration::from_millis(online_in_ms + 1);
                st.online.entry(at).or_default().insert(*r);
                Outcome::RetryLater
            }
            Fate::Delivered { read, .. } => {
                st.delivered.insert(message.0);
                if read {
                    Outcome::Read
                } else {
                    Outcome::Delivered
                }
            }
        }
    }

    fn due_online(&self, now: Instant) -> (Vec<Recipient>, Option<Instant>) {
        let mut st = self.state.lock().unwrap();
        let mut due = HashSet::new();
        while let Some(e) = st.online.first_entry() {
            if *e.key() > now {
                break;
            }
            due.extend(e.remove());
        }
        (due.into_iter().collect(), st.online.keys().next().copied())
    }

    /// Serves one edge connection until it ends: answers DELIVERs, announces devices
    /// back online.
    pub async fn serve(self: Arc<Self>, edge: Arc<DeviceEdge>, mut rx: DeviceDeliveries) {
        loop {
            let (due, next) = self.due_online(Instant::now());
            if !due.is_empty() && edge.online(&due).await.is_err() {
                return;
            }
            let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let d = tokio::select! {
                d = rx.recv() => match d { Ok(d) => d, Err(_) => return },
                () = tokio::time::sleep_until(wake) => continue,
            };
            let now = Instant::now();
            let mut outcomes = vec![OutcomeEntry {
                message: d.message,
                outcome: self.outcome(&d, now),
            }];
            while let Ok(Some(d)) = rx.try_recv().await {
                outcomes.push(OutcomeEntry {
                    message: d.message,
                    outcome: self.outcome(&d, now),
                });
            }
            if edge.outcomes(&outcomes).await.is_err() {
                return;
            }
        }
    }
}

/// Waits (polling, at most `within`) until `done` holds; false if it never did.
pub async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}
