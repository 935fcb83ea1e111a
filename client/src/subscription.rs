//! The HELLO stream of a connection granted delivery features, over quinn: a reader task
//! turning what the server pushes into a bounded channel, and a writer task for the frames
//! the client sends back on the same stream.
//!
//! ```text
//!  HELLO stream ──read──> EventStream (sans-IO, crate::events) ──> channel (bounded)
//!                                      ├─ EventReceiver (business): statuses, replies
//!                                      └─ Deliveries (edge): DELIVERs; taking one grants
//!                                         credit back (CREDIT), so the channel is the window
//!  Client::ack_events / DeliveryEdge::{outcomes, online, grant} ──> Control (bounded queue)
//!       ──writer task──> HELLO stream
//! ```
//!
//! Bounds: the channel holds at most the pushes it was made for (a business's
//! `buffered_frames`, an edge's credit window); when it is full the reader stops reading
//! and QUIC flow control holds the server back. The writer's queue holds at most
//! [`CONTROL_FRAMES_QUEUED_MAX`] frames; a sender waits for room.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use courier_pipeline::wire::delivery::{BusinessEvent, Deliver};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::client::{read_error, stopped, write_error, EventHalves};
use crate::events::{encode_credit, EventStream, Incoming};
use crate::ClientError;

/// Frames queued for the HELLO stream's writer; more wait.
pub const CONTROL_FRAMES_QUEUED_MAX: usize = 256;
/// Most bytes taken from the stream in one read.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// What the reader task hands over: a push, or why the stream ended (last).
pub(crate) type IncomingRx = mpsc::Receiver<Result<Incoming, ClientError>>;

/// The writer of a connection's HELLO stream.
#[derive(Clone)]
pub(crate) struct Control {
    tx: mpsc::Sender<Bytes>,
    error: Arc<Mutex<Option<ClientError>>>,
}

impl Control {
    /// Queues encoded frames for the HELLO stream (waits while the queue is full).
    pub(crate) async fn send(&self, frames: Bytes) -> Result<(), ClientError> {
        if frames.is_empty() {
            return Ok(());
        }
        match self.tx.send(frames).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self
                .error
                .lock()
                .expect("control error lock")
                .clone()
                .unwrap_or(ClientError::Closed)),
        }
    }
}

/// Starts the reader and writer tasks of a HELLO stream kept for events; the channel
/// holds at most `buffered` pushes.
pub(crate) fn start(halves: EventHalves, buffered: usize) -> (Control, IncomingRx) {
    let (tx, rx) = mpsc::channel(buffered.max(1));
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_FRAMES_QUEUED_MAX);
    let error = Arc::new(Mutex::new(None));
    tokio::spawn(write_control(halves.send, ctl_rx, error.clone()));
    tokio::spawn(read_events(halves.recv, halves.stream, tx));
    (Control { tx: ctl_tx, error }, rx)
}

async fn write_control(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Bytes>,
    error: Arc<Mutex<Option<ClientError>>>,
) {
    while let Some(frames) = rx.recv().await {
        if let Err(e) = send.write_chunk(frames).await {
            *error.lock().expect("control error lock") = Some(write_error(e));
            return;
        }
    }
    // The client is gone; the connection closes with it.
    let _ = send.finish();
}

/// Hands every decoded push to the channel; false when nobody listens any more.
async fn drain(stream: &mut EventStream, tx: &mpsc::Sender<Result<Incoming, ClientError>>) -> bool {
    while let Some(item) = stream.poll() {
        if tx.send(Ok(item)).await.is_err() {
            return false;
        }
    }
    true
}

async fn read_events(
    mut recv: RecvStream,
    mut stream: EventStream,
    tx: mpsc::Sender<Result<Incoming, ClientError>>,
) {
    let err = loop {
        if !drain(&mut stream, &tx).await {
            return;
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = stream.handle_data(&chunk.bytes) {
                    // What decoded before the bad frame still counts.
                    if !drain(&mut stream, &tx).await {
                        return;
                    }
                    break stopped(&mut recv, e);
                }
            }
            Ok(None) => {
                let e = stream.handle_finish();
                if !drain(&mut stream, &tx).await {
                    return;
                }
                break e.into();
            }
            Err(e) => break read_error(e),
        }
    };
    let _ = tx
        .send(Err(ClientError::EventStreamEnded(Arc::new(err))))
        .await;
}

/// The events a business hears: its messages' statuses and its users' replies, in the
/// order each shard of the relay recorded them, each at least once until acknowledged
/// with [`crate::Client::ack_events`] (drop copies by [`BusinessEvent::event`]).
pub struct EventReceiver {
    rx: IncomingRx,
    buffered: VecDeque<BusinessEvent>,
    ended: Option<ClientError>,
}

impl std::fmt::Debug for EventReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReceiver")
            .field("buffered", &self.buffered.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl EventReceiver {
    pub(crate) fn new(rx: IncomingRx) -> EventReceiver {
        EventReceiver {
            rx,
            buffered: VecDeque::new(),
            ended: None,
        }
    }

    /// The next event; an error once the stream is over (and again on every later call):
    /// the connection is lost or closed, or the server broke the protocol.
    pub async fn recv(&mut self) -> Result<BusinessEvent, ClientError> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Ok(e);
            }
            if let Some(err) = &self.ended {
                return Err(err.clone());
            }
            let item = self.rx.recv().await;
            self.take(item);
        }
    }

    /// The next event if one is ready now (`Ok(None)`: none yet).
    pub fn try_recv(&mut self) -> Result<Option<BusinessEvent>, ClientError> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Ok(Some(e));
            }
            if let Some(err) = &self.ended {
                return Err(err.clone());
            }
            match self.rx.try_recv() {
                Ok(item) => self.take(Some(item)),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => self.take(None),
            }
        }
    }

    fn take(&mut self, item: Option<Result<Incoming, ClientError>>) {
        match item {
            Some(Ok(i)) => self.buffered.extend(i.into_events()),
            Some(Err(e)) => self.ended = Some(e),
            None => self.ended = Some(ClientError::EventStreamEnded(Arc::new(ClientError::Closed))),
        }
    }
}

/// The messages an edge is handed (DELIVER), at least once each until their outcome
/// arrives (drop copies by [`Deliver::message`]). Taking one from here grants the relay
/// one more credit (in CREDIT frames of a quarter window), so at most the window waits
/// here.
/// What the relay sends an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeItem {
    /// A message to deliver (DELIVER, or DELIVER_E2E: see its `e2e`).
    Deliver(Deliver),
    /// Recipients whose device keys the relay wants: answer with
    /// [`crate::DeliveryEdge::device_keys`].
    KeysWanted(Vec<courier_pipeline::wire::Recipient>),
    /// The businesses' reply keys (sent at connect and at each rotation).
    BusinessKeys(Vec<courier_pipeline::wire::delivery::BusinessKeyEntry>),
}

pub struct Deliveries {
    rx: IncomingRx,
    control: Control,
    window: u32,
    taken: u32,
    ended: Option<ClientError>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("window", &self.window)
            .field("taken", &self.taken)
            .field("ended", &self.ended)
            .finish()
    }
}

impl Deliveries {
    pub(crate) fn new(rx: IncomingRx, control: Control, window: u32) -> Deliveries {
        Deliveries {
            rx,
            control,
            window,
            taken: 0,
            ended: None,
        }
    }

    /// The next message to deliver; an error once the stream is over. What an edge with
    /// E2E also receives (key requests, reply keys) is skipped: such an edge uses
    /// [`Deliveries::recv_item`].
    pub async fn recv(&mut self) -> Result<Deliver, ClientError> {
        loop {
            if let EdgeItem::Deliver(d) = self.recv_item().await? {
                return Ok(d);
            }
        }
    }

    /// The next message if one is ready now (`Ok(None)`: none yet); skips what
    /// [`Deliveries::recv`] skips.
    pub async fn try_recv(&mut self) -> Result<Option<Deliver>, ClientError> {
        loop {
            match self.try_recv_item().await? {
                Some(EdgeItem::Deliver(d)) => return Ok(Some(d)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The next thing the relay sent: a message, or (with E2E) a key request or the
    /// businesses' reply keys.
    pub async fn recv_item(&mut self) -> Result<EdgeItem, ClientError> {
        if let Some(err) = &self.ended {
            return Err(err.clone());
        }
        let item = self.rx.recv().await;
        self.take(item).await
    }

    /// [`Deliveries::recv_item`] if something is ready now.
    pub async fn try_recv_item(&mut self) -> Result<Option<EdgeItem>, ClientError> {
        if let Some(err) = &self.ended {
            return Err(err.clone());
        }
        match self.rx.try_recv() {
            Ok(item) => self.take(Some(item)).await.map(Some),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => self.take(None).await.map(Some),
        }
    }

    async fn take(
        &mut self,
        item: Option<Result<Incoming, ClientError>>,
    ) -> Result<EdgeItem, ClientError> {
        let err = match item {
            Some(Ok(Incoming::Deliver(d))) => {
                self.taken += 1;
                if self.taken >= (self.window / 4).max(1) {
                    let mut out = BytesMut::new();
                    encode_credit(self.taken, &mut out);
                    self.taken = 0;
                    self.control.send(out.freeze()).await?;
                }
                return Ok(EdgeItem::Deliver(d));
            }
            Some(Ok(Incoming::KeysWanted(r))) => return Ok(EdgeItem::KeysWanted(r)),
            Some(Ok(Incoming::BusinessKeys(k))) => return Ok(EdgeItem::BusinessKeys(k)),
            Some(Ok(_)) => unreachable!("an edge stream yields edge frames only"),
            Some(Err(e)) => e,
            None => ClientError::EventStreamEnded(Arc::new(ClientError::Closed)),
        };
        self.ended = Some(err.clone());
        Err(err)
    }
}
