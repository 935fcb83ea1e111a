//! The courier client: one authenticated QUIC connection carrying pipelined SUBMITs.
//!
//! ```text
//! connect: Endpoint ──QUIC+TLS──> server
//!          stream 0: session::Hello ── HELLO(token) ──>  <── WELCOME(bounds) ──> Session
//!          (then the stream is released)
//!
//! submit(batch) ──Session::encode_submit (WELCOME's bounds)──> pick the least-loaded lane
//!        │                                                        │ acquire an in-flight permit
//!        ▼                                                        ▼
//!   awaits its reply <───────── lane k: writer task ── SUBMIT ──> stream k ──> server
//!                        │                 │ AckQueue::push: pending, in write order
//!                        └──── reader task <── bytes ── AckQueue::handle_data ──> answers,
//!                              oldest first, each to its batch's reply channel
//! ```
//!
//! The wire logic (HELLO/WELCOME, bounds, SUBMIT encoding, matching ACKs with pending
//! batches) is [`crate::session`]'s; this module adds the QUIC streams, tasks, permits
//! and buffers around it.
//!
//! Invariants this module keeps:
//! - a batch is validated against the server's WELCOME bounds before a byte is sent;
//! - each lane has at most `batches_in_flight_per_stream` batches queued or unanswered
//!   (a semaphore permit travels with the batch until its ACK or failure), so memory is
//!   bounded by the configuration, not by the caller; SUBMIT buffers are recycled
//!   through a pool that keeps no more buffers than may be in flight;
//! - ACKs resolve pending batches strictly in order; an ACK whose `batch_id` or status
//!   count does not match the oldest pending batch is a protocol error;
//! - a stream that dies (reset by the server, ended, protocol error) fails exactly the
//!   batches pending on it; batches not yet written move to a fresh stream, other lanes
//!   are untouched;
//! - no error, log line or `Debug` output carries a token, a recipient or a payload.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_pipeline::wire::delivery::features;
use courier_pipeline::wire::{self, code, LogPosition, Status, Welcome, WireError};
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::events::EventStream;
use crate::session::{AckQueue, Hello, PushRefused, Session, SessionError};
use crate::subscription::{self, Control, EventReceiver, IncomingRx};
use crate::tls::{self, ServerTrust};

/// How long `connect` waits for the handshake and the WELCOME together.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` waits for the endpoint to become idle.
pub const CLOSE_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most submit streams one client may use: as many as the widest server profile lets
/// one connection open.
pub const STREAMS_MAX: usize = courier_pipeline::server::STREAMS_PER_CONNECTION_LIMIT as usize;
/// Most batches in flight on one stream.
pub const BATCHES_IN_FLIGHT_PER_STREAM_MAX: usize = crate::session::PENDING_PER_STREAM_MAX;
// `connect`'s messages state these bounds (they are `&'static str`).
const _: () = assert!(STREAMS_MAX == 1024);
const _: () = assert!(BATCHES_IN_FLIGHT_PER_STREAM_MAX == 4096);
const _: () = assert!(wire::TOKEN_BYTES_MAX == 256);
/// Longest wait `submit_with_retry` honours between rounds, whatever the server asks.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// Most bytes taken from a stream in one read.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Where and how to connect.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server's UDP address.
    pub server: SocketAddr,
    /// The name sent in TLS SNI.
    pub server_name: String,
    /// The bearer token sent in HELLO (at most 256 bytes).
    pub token: String,
    /// How to trust the server's certificate.
    pub trust: ServerTrust,
    /// Submit streams to use (at most the server's `streams_per_connection_max`).
    pub streams: usize,
    /// Batches sent ahead of their ACK on each stream.
    pub batches_in_flight_per_stream: usize,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field(
                "token",
                &format_args!("<{} bytes redacted>", self.token.len()),
            )
            .field("trust", &self.trust)
            .field("streams", &self.streams)
            .field(
                "batches_in_flight_per_stream",
                &self.batches_in_flight_per_stream,
            )
            .finish()
    }
}

/// One message to submit.
///
/// The same type the server decodes ([`wire::Message`]): client id, recipient, payload;
/// its `Debug` shows neither the number nor the content.
pub type OutgoingMessage = wire::Message;

/// One message's last status from [`Client::submit_with_retry_rounds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retried {
    /// The last status the server gave it.
    pub status: Status,
    /// The round that gave it (1 = the first submit; more = throttled before).
    pub rounds: u32,
}

/// How the server answered a REPORT frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The server stopped the stream with this code (see `wire::code`).
    Refused {
        /// The application error code of STOP_SENDING.
        code: u64,
    },
    /// No refusal arrived within the wait.
    NotRefused,
}

/// What went wrong. No variant carries a token, a recipient or a payload.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The client configuration cannot work; names the field.
    #[error("invalid client configuration: {0}")]
    Config(&'static str),
    /// Binding the local UDP socket failed.
    #[error("binding the local UDP socket failed: {0}")]
    Bind(Arc<std::io::Error>),
    /// quinn refused to start connecting (invalid server name, endpoint stopping).
    #[error("cannot start connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The server refused the token: it closed the connection with `UNAUTHORIZED`.
    #[error("the server refused the token")]
    Unauthorized,
    /// The handshake and WELCOME did not complete within the bound (is a server there?).
    #[error("no QUIC handshake and WELCOME within {0:?}")]
    WelcomeTimeout(Duration),
    /// The connection failed or the server closed it; holds the transport's reason.
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
    /// The server reset the stream that carried this batch, with this stream error code
    /// (see `wire::code`); the batch was not answered. Other streams are unaffected.
    #[error("the server reset the stream with code 0x{code:02x}")]
    StreamReset {
        /// The application error code of the reset.
        code: u64,
    },
    /// The server ended the stream before answering this batch.
    #[error("the server ended the stream before answering")]
    StreamEnded,
    /// The server broke wire v1 (an ACK out of order, a wrong status count, an
    /// unexpected frame); the stream was dropped.
    #[error("protocol violation by the server: {0}")]
    Protocol(&'static str),
    /// A frame from the server did not decode; the stream was dropped.
    #[error("undecodable frame from the server: {0}")]
    Wire(#[from] WireError),
    /// A batch with no message; nothing was sent.
    #[error("empty batch")]
    EmptyBatch,
    /// More messages than the server's `batch_messages_max`; nothing was sent. Split it.
    #[error("batch of {count} messages exceeds the server's batch_messages_max {max}")]
    BatchTooLarge {
        /// Messages in the batch.
        count: usize,
        /// The server's bound.
        max: u32,
    },
    /// A payload larger than the server's `payload_bytes_max`; nothing was sent.
    #[error(
        "payload of message {index} is {bytes} bytes, over the server's payload_bytes_max {max}"
    )]
    PayloadTooLarge {
        /// Index of the message in its batch.
        index: usize,
        /// Its payload size.
        bytes: usize,
        /// The server's bound.
        max: u32,
    },
    /// The encoded SUBMIT is larger than the server's `frame_bytes_max`; nothing was
    /// sent. Send fewer or smaller messages per batch.
    #[error("SUBMIT body of {bytes} bytes exceeds the server's frame_bytes_max {max}")]
    FrameTooLarge {
        /// Body bytes of the SUBMIT.
        bytes: usize,
        /// The server's bound.
        max: u32,
    },
    /// The client was closed; the batch was not (or not completely) answered.
    #[error("the client is closed")]
    Closed,
    /// The server did not grant the delivery feature this needs (events for a business,
    /// deliveries for a platform credential), or the connection did not ask for it.
    #[error("the server did not grant the delivery feature this needs")]
    FeatureRefused,
    /// The event stream (the HELLO stream of a connection with delivery features) ended
    /// or broke; holds why. Reconnect to hear events again.
    #[error("the event stream ended: {0}")]
    EventStreamEnded(Arc<ClientError>),
}

impl From<SessionError> for ClientError {
    fn from(e: SessionError) -> ClientError {
        match e {
            SessionError::TokenTooLong { .. } => {
                ClientError::Config("token is longer than 256 bytes")
            }
            SessionError::Protocol(what) => ClientError::Protocol(what),
            SessionError::Wire(e) => ClientError::Wire(e),
            SessionError::StreamEnded => ClientError::StreamEnded,
            SessionError::EmptyBatch => ClientError::EmptyBatch,
            SessionError::BatchTooLarge { count, max } => ClientError::BatchTooLarge { count, max },
            SessionError::PayloadTooLarge { index, bytes, max } => {
                ClientError::PayloadTooLarge { index, bytes, max }
            }
            SessionError::FrameTooLarge { bytes, max } => ClientError::FrameTooLarge { bytes, max },
        }
    }
}

impl ClientError {
    /// Whether the connection is gone, so that no later submit can succeed.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ClientError::Unauthorized | ClientError::ConnectionLost(_) | ClientError::Closed
        )
    }
}

pub(crate) fn connection_error(e: ConnectionError) -> ClientError {
    match &e {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(code::UNAUTHORIZED) =>
        {
            ClientError::Unauthorized
        }
        ConnectionError::LocallyClosed => ClientError::Closed,
        _ => ClientError::ConnectionLost(e),
    }
}

pub(crate) fn read_error(e: ReadError) -> ClientError {
    match e {
        ReadError::Reset(code) => ClientError::StreamReset {
            code: code.into_inner(),
        },
        ReadError::ConnectionLost(e) => connection_error(e),
        ReadError::ClosedStream => ClientError::StreamEnded,
        ReadError::IllegalOrderedRead => unreachable!("the client reads streams in order only"),
        ReadError::ZeroRttRejected => unreachable!("the client never sends 0-RTT"),
    }
}

pub(crate) fn write_error(e: WriteError) -> ClientError {
    match e {
        WriteError::Stopped(code) => ClientError::StreamReset {
            code: code.into_inner(),
        },
        WriteError::ConnectionLost(e) => connection_error(e),
        WriteError::ClosedStream => ClientError::StreamEnded,
        WriteError::ZeroRttRejected => unreachable!("the client never sends 0-RTT"),
    }
}

/// A connected, authenticated client. Share it (`Arc<Client>` or `&Client`) between
/// tasks: every method takes `&self` and many submits may be in flight at once.
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    session: Session,
    lanes: Vec<Lane>,
    next_lane: AtomicUsize,
    next_batch_id: AtomicU64,
    frames: Arc<FramePool>,
    /// The HELLO stream's writer, when delivery features were granted.
    control: Option<Control>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.connection.remote_address())
            .field("welcome", &self.session.welcome())
            .field("streams", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

/// One submit stream as seen by `submit`: a queue to its writer and its permits.
struct Lane {
    jobs: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
}

/// A batch on its way to a lane's writer.
struct Job {
    frame: Bytes,
    batch_id: u64,
    count: usize,
    reply: Reply,
}

/// Where a batch's answer goes; the tag of its entry in the stream's [`AckQueue`].
struct Reply {
    tx: oneshot::Sender<Result<Vec<Status>, ClientError>>,
    /// Held until the batch is answered or failed: bounds a lane's batches in flight.
    _permit: OwnedSemaphorePermit,
}

impl Reply {
    /// Answers the batch. The submitter may have stopped waiting; its batch was
    /// answered all the same.
    fn send(self, answer: Result<Vec<Status>, ClientError>) {
        let _ = self.tx.send(answer);
    }
}

impl Client {
    /// Connects, authenticates with HELLO and waits for WELCOME (at most
    /// [`WELCOME_TIMEOUT`]). Submit streams are opened on first use.
    ///
    /// This is wire v1's HELLO (version 1): the connection submits and hears ACKs, and
    /// never receives statuses or replies. [`Client::connect_with_events`] asks for them.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        Ok(Client::connect_inner(cfg, None, 0).await?.0)
    }

    /// Connects as [`Client::connect`] does, with HELLO version 2 asking for the EVENTS
    /// feature: the business's statuses and its users' replies come out of the returned
    /// [`EventReceiver`], each at least once until acknowledged with
    /// [`Client::ack_events`]. Fails with [`ClientError::FeatureRefused`] when the
    /// server grants no events (a platform credential, say).
    ///
    /// Up to `buffered_frames` pushes wait in the receiver; past that the client stops
    /// reading them and QUIC flow control holds the server back.
    pub async fn connect_with_events(
        cfg: &ClientConfig,
        buffered_frames: usize,
    ) -> Result<(Client, EventReceiver), ClientError> {
        let (client, events) =
            Client::connect_inner(cfg, Some(features::EVENTS), buffered_frames).await?;
        match events {
            Some(rx) if client.session.features() & features::EVENTS != 0 => {
                Ok((client, EventReceiver::new(rx)))
            }
            _ => {
                client.close().await;
                Err(ClientError::FeatureRefused)
            }
        }
    }

    /// Connects and, when `features` is given, keeps the HELLO stream for events (a
    /// channel of at most `buffered` pushes).
    pub(crate) async fn connect_inner(
        cfg: &ClientConfig,
        features: Option<u32>,
        buffered: usize,
    ) -> Result<(Client, Option<IncomingRx>), ClientError> {
        if cfg.streams == 0 || cfg.streams > STREAMS_MAX {
            return Err(ClientError::Config("streams must be in 1..=1024"));
        }
        if cfg.batches_in_flight_per_stream == 0
            || cfg.batches_in_flight_per_stream > BATCHES_IN_FLIGHT_PER_STREAM_MAX
        {
            return Err(ClientError::Config(
                "batches_in_flight_per_stream must be in 1..=4096",
            ));
        }
        if cfg.token.len() > wire::TOKEN_BYTES_MAX {
            return Err(ClientError::Config("token is longer than 256 bytes"));
        }
        let bind: SocketAddr = if cfg.server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Bind(Arc::new(e)))?;
        let (connection, session, halves) = match tokio::time::timeout(
            WELCOME_TIMEOUT,
            handshake(&endpoint, cfg, features),
        )
        .await
        {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                endpoint.close(VarInt::from_u32(code::CLOSE_OK), b"");
                return Err(e);
            }
            Err(_) => {
                endpoint.close(VarInt::from_u32(code::CLOSE_OK), b"");
                return Err(ClientError::WelcomeTimeout(WELCOME_TIMEOUT));
            }
        };
        let lanes = (0..cfg.streams)
            .map(|_| {
                let (tx, rx) = mpsc::channel(cfg.batches_in_flight_per_stream);
                tokio::spawn(run_lane(
                    connection.clone(),
                    rx,
                    session,
                    cfg.batches_in_flight_per_stream,
                ));
                Lane {
                    jobs: tx,
                    permits: Arc::new(Semaphore::new(cfg.batches_in_flight_per_stream)),
                }
            })
            .collect();
        let (control, incoming) = match halves {
            Some(h) => {
                let (control, rx) = subscription::start(h, buffered);
                (Some(control), Some(rx))
            }
            None => (None, None),
        };
        let client = Client {
            endpoint,
            connection,
            session,
            lanes,
            next_lane: AtomicUsize::new(0),
            next_batch_id: AtomicU64::new(1),
            frames: FramePool::new(cfg.streams * cfg.batches_in_flight_per_stream),
            control,
        };
        Ok((client, incoming))
    }

    /// Moves the connection to a fresh local UDP socket (a new port), as a client behind
    /// a NAT rebinding or a phone changing networks would. The connection carries on;
    /// the server follows the connection ID, whichever of its shards receives the packets.
    pub fn rebind(&self) -> Result<(), ClientError> {
        let local = self
            .endpoint
            .local_addr()
            .map_err(|e| ClientError::Bind(Arc::new(e)))?;
        let socket = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0))
            .map_err(|e| ClientError::Bind(Arc::new(e)))?;
        self.endpoint
            .rebind(socket)
            .map_err(|e| ClientError::Bind(Arc::new(e)))
    }

    /// The local address the connection currently sends from.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The bounds the server stated in WELCOME.
    pub fn welcome(&self) -> Welcome {
        self.session.welcome()
    }

    /// Submit streams this client spreads batches over.
    pub fn streams(&self) -> usize {
        self.lanes.len()
    }

    /// Checks `batch` against the WELCOME bounds without sending it: `submit` refuses
    /// exactly the batches this refuses.
    pub fn check(&self, batch: &[OutgoingMessage]) -> Result<(), ClientError> {
        self.session.check(batch).map(|_| ()).map_err(Into::into)
    }

    /// Submits one batch and returns one status per message, in batch order.
    ///
    /// Many calls may run at once; they are spread over the streams and pipelined. A
    /// batch outside the WELCOME bounds is refused before anything is sent. Waits while
    /// the chosen stream already has `batches_in_flight_per_stream` batches in flight.
    pub async fn submit(&self, batch: Vec<OutgoingMessage>) -> Result<Vec<Status>, ClientError> {
        if let Some(reason) = self.connection.close_reason() {
            return Err(connection_error(reason));
        }
        let batch_id = self.next_batch_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_batch(&self.session, batch_id, &batch, &self.frames)?;
        let count = batch.len();
        drop(batch);
        self.send_job(frame, batch_id, count).await
    }

    /// Submits one batch whose messages live `ttl_secs` (SUBMIT_TTL; 0: the relay's
    /// default, which is also what [`Client::submit`] gets). A message not delivered by
    /// then is reported `expired`. The relay caps the time at its `delivery.ttl_max_secs`.
    pub async fn submit_ttl(
        &self,
        batch: Vec<OutgoingMessage>,
        ttl_secs: u32,
    ) -> Result<Vec<Status>, ClientError> {
        if let Some(reason) = self.connection.close_reason() {
            return Err(connection_error(reason));
        }
        let batch_id = self.next_batch_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::new();
        self.session
            .encode_submit_ttl(batch_id, ttl_secs, &batch, &mut frame)?;
        self.send_job(frame.freeze(), batch_id, batch.len()).await
    }

    /// Sends an encoded frame answered by one ACK of `count` statuses (SUBMIT,
    /// SUBMIT_TTL, INBOUND) on the least-loaded lane and waits for its answer.
    pub(crate) async fn send_job(
        &self,
        frame: Bytes,
        batch_id: u64,
        count: usize,
    ) -> Result<Vec<Status>, ClientError> {
        let lane = self.pick_lane();
        let permit = lane
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (tx, answer) = oneshot::channel();
        let job = Job {
            frame,
            batch_id,
            count,
            reply: Reply {
                tx,
                _permit: permit,
            },
        };
        lane.jobs.send(job).await.map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    /// A fresh batch id for this connection.
    pub(crate) fn next_batch_id(&self) -> u64 {
        self.next_batch_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The session (WELCOME's bounds and features).
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Whether the connection is closed (by either side), and why.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.connection.close_reason().map(connection_error)
    }

    /// Acknowledges events (statuses, replies) heard on the [`EventReceiver`]: the
    /// server stops pushing them and records how far the business got, so they are not
    /// pushed again after a reconnect or a restart (a copy may still come when this
    /// acknowledgement is lost; drop it by its event id). Acknowledge an event only once
    /// it is handled: the server keeps it only until then.
    pub async fn ack_events(&self, events: &[LogPosition]) -> Result<(), ClientError> {
        if events.is_empty() {
            return Ok(());
        }
        let control = self.control_for(features::EVENTS)?;
        let mut out = BytesMut::new();
        crate::events::encode_event_acks(&self.session, events, &mut out);
        control.send(out.freeze()).await
    }

    /// The HELLO stream's writer, when `feature` was granted.
    pub(crate) fn control_for(&self, feature: u32) -> Result<&Control, ClientError> {
        if self.session.features() & feature == 0 {
            return Err(ClientError::FeatureRefused);
        }
        self.control.as_ref().ok_or(ClientError::FeatureRefused)
    }

    /// Sends one REPORT frame (spam reports) on a stream of its own and waits at most
    /// `wait` for the server to refuse it.
    ///
    /// Wire v1 takes REPORT only from platform connections, which do not exist yet, so
    /// a server answers REPORT on a business connection by stopping the stream with
    /// `UNEXPECTED_FRAME`: that comes back as [`ReportOutcome::Refused`]. The stream is
    /// left unfinished while waiting, so that a refusal cannot race with the
    /// acknowledgement of a FIN; [`ReportOutcome::NotRefused`] means no refusal arrived
    /// within `wait`. Either way the stream is then released.
    pub async fn report(
        &self,
        entries: &[wire::ReportEntry],
        wait: Duration,
    ) -> Result<ReportOutcome, ClientError> {
        let mut frame = BytesMut::new();
        self.session.encode_report(entries, &mut frame)?;
        let (mut send, mut recv) = self.connection.open_bi().await.map_err(connection_error)?;
        let outcome = match send.write_all(&frame).await {
            Err(WriteError::Stopped(code)) => ReportOutcome::Refused {
                code: code.into_inner(),
            },
            Err(e) => return Err(write_error(e)),
            Ok(()) => match tokio::time::timeout(wait, send.stopped()).await {
                Ok(Ok(Some(code))) => ReportOutcome::Refused {
                    code: code.into_inner(),
                },
                // Only after finish() can stopped() end without a code.
                Ok(Ok(None)) => ReportOutcome::NotRefused,
                Ok(Err(quinn::StoppedError::ConnectionLost(e))) => return Err(connection_error(e)),
                Ok(Err(quinn::StoppedError::ZeroRttRejected)) => {
                    unreachable!("the client never sends 0-RTT")
                }
                Err(_) => ReportOutcome::NotRefused,
            },
        };
        let _ = send.reset(VarInt::from_u32(code::CLOSE_OK));
        let _ = recv.stop(VarInt::from_u32(code::CLOSE_OK));
        Ok(outcome)
    }

    /// Submits `batch`, resubmitting the messages that came back `Throttled` after the
    /// largest `retry_after_ms` of that round (capped at [`RETRY_AFTER_MAX`]), for at
    /// most `max_attempts` rounds in all (0 counts as 1). Returns the last status of
    /// every message, in the original order; a message still throttled after the last
    /// round stays `Throttled`. An error in any round is returned as is.
    pub async fn submit_with_retry(
        &self,
        batch: Vec<OutgoingMessage>,
        max_attempts: u32,
    ) -> Result<Vec<Status>, ClientError> {
        let outcomes = self.submit_with_retry_rounds(batch, max_attempts).await?;
        Ok(outcomes.into_iter().map(|o| o.status).collect())
    }

    /// [`Client::submit_with_retry`], also saying in how many rounds each message got
    /// its last status (1: answered at once; more: it was throttled first), so that a
    /// sender can count the messages that were throttled before they were taken.
    pub async fn submit_with_retry_rounds(
        &self,
        batch: Vec<OutgoingMessage>,
        max_attempts: u32,
    ) -> Result<Vec<Retried>, ClientError> {
        let max_attempts = max_attempts.max(1);
        let mut last: Vec<Retried> = Vec::with_capacity(batch.len());
        let mut todo: Vec<usize> = (0..batch.len()).collect();
        for attempt in 1..=max_attempts {
            let round: Vec<OutgoingMessage> = if attempt == 1 {
                batch.clone()
            } else {
                todo.iter().map(|&i| batch[i].clone()).collect()
            };
            let statuses = self.submit(round).await?;
            if attempt == 1 {
                last = statuses
                    .iter()
                    .map(|&status| Retried { status, rounds: 1 })
                    .collect();
            }
            let mut wait_ms = 0u32;
            let mut again = Vec::new();
            for (&i, status) in todo.iter().zip(&statuses) {
                last[i] = Retried {
                    status: *status,
                    rounds: attempt,
                };
                if let Status::Throttled { retry_after_ms } = *status {
                    wait_ms = wait_ms.max(retry_after_ms);
                    again.push(i);
                }
            }
            if again.is_empty() || attempt == max_attempts {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait_ms.into()).min(RETRY_AFTER_MAX)).await;
            todo = again;
        }
        Ok(last)
    }

    /// Closes the connection with `CLOSE_OK` and waits (at most [`CLOSE_IDLE_TIMEOUT`])
    /// for the endpoint to become idle. Batches still in flight fail with `Closed`.
    pub async fn close(&self) {
        self.connection
            .close(VarInt::from_u32(code::CLOSE_OK), b"done");
        let _ = tokio::time::timeout(CLOSE_IDLE_TIMEOUT, self.endpoint.wait_idle()).await;
    }

    /// The lane with the most free permits; ties go round-robin.
    fn pick_lane(&self) -> &Lane {
        let n = self.lanes.len();
        let start = self.next_lane.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| &self.lanes[(start + k) % n])
            .max_by_key(|lane| lane.permits.available_permits())
            .expect("a client has at least one lane")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Lane readers hold stream handles; closing ends them.
        self.connection
            .close(VarInt::from_u32(code::CLOSE_OK), b"dropped");
    }
}

/// Encodes `batch`'s SUBMIT frame (checked against `session`'s bounds) into a buffer
/// from `pool`.
fn encode_batch(
    session: &Session,
    batch_id: u64,
    batch: &[OutgoingMessage],
    pool: &Arc<FramePool>,
) -> Result<Bytes, ClientError> {
    let mut buf = pool.take();
    if let Err(e) = session.encode_submit(batch_id, batch, &mut buf) {
        pool.put(buf);
        return Err(e.into());
    }
    Ok(pool.frame(buf))
}

/// Recycles SUBMIT frame buffers.
///
/// quinn keeps a frame until the server has acknowledged its packets, then drops it; a
/// fresh buffer for every batch made the allocator hand back and fault in whole pages
/// again and again (a tenth of the client's CPU at 50 k msgs/s). A frame made here goes
/// back to the pool when quinn drops it. The pool keeps at most as many buffers as the
/// client may have batches in flight, so it at most doubles the memory those take.
#[derive(Debug)]
struct FramePool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// A frame's buffer, returned to its pool on drop.
struct PooledFrame {
    buf: Vec<u8>,
    pool: Arc<FramePool>,
}

impl AsRef<[u8]> for PooledFrame {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledFrame {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

impl FramePool {
    fn new(keep: usize) -> Arc<FramePool> {
        Arc::new(FramePool {
            free: Mutex::new(Vec::with_capacity(keep)),
            keep,
        })
    }

    /// An empty buffer, recycled when one is free.
    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .expect("frame pool lock")
            .pop()
            .unwrap_or_default()
    }

    /// Wraps an encoded frame; its buffer comes back here once every copy is dropped.
    fn frame(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledFrame {
            buf,
            pool: self.clone(),
        })
    }

    fn put(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock().expect("frame pool lock");
        if free.len() < self.keep && buf.capacity() > 0 {
            free.push(buf);
        }
    }
}

/// The HELLO stream of a connection granted delivery features, kept open for events:
/// its halves and the event decoder (holding what followed WELCOME).
pub(crate) struct EventHalves {
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    pub(crate) stream: EventStream,
}

/// Opens the connection, sends HELLO (version 2 asking for `features` when given), reads
/// WELCOME. Without features, or when none was granted, it then releases the HELLO stream
/// so that it does not hold one of the server's stream slots; with features granted it
/// keeps it for events.
async fn handshake(
    endpoint: &quinn::Endpoint,
    cfg: &ClientConfig,
    features: Option<u32>,
) -> Result<(quinn::Connection, Session, Option<EventHalves>), ClientError> {
    let connecting =
        endpoint.connect_with(tls::client_config(&cfg.trust), cfg.server, &cfg.server_name)?;
    let connection = connecting.await.map_err(connection_error)?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(connection_error)?;
    let mut hello_frame = BytesMut::new();
    let mut hello = match features {
        None => Hello::new(cfg.token.as_bytes(), &mut hello_frame)?,
        Some(f) => Hello::with_features(cfg.token.as_bytes(), f, &mut hello_frame)?,
    };
    send.write_all(&hello_frame).await.map_err(write_error)?;
    let session = loop {
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                if let Some(session) = hello.handle_data(&chunk.bytes)? {
                    break session;
                }
            }
            Ok(None) => return Err(hello.handle_finish().into()),
            Err(e) => return Err(read_error(e)),
        }
    };
    if features.is_some() && session.features() != 0 {
        let stream = EventStream::new(&session, &hello.leftover())?;
        return Ok((
            connection,
            session,
            Some(EventHalves { send, recv, stream }),
        ));
    }
    // Done with the HELLO stream: finishing our side and stopping theirs closes it fully.
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(code::CLOSE_OK));
    Ok((connection, session, None))
}

/// The state one stream's writer and reader share.
struct StreamShared {
    queue: Mutex<AckQueue<Reply>>,
    /// Woken when the stream dies, so the writer moves to a fresh stream.
    died: Notify,
}

impl StreamShared {
    fn new(session: &Session, depth: usize) -> StreamShared {
        StreamShared {
            queue: Mutex::new(session.ack_queue(depth)),
            died: Notify::new(),
        }
    }

    /// Registers a batch about to be written; hands its reply back if the stream is dead.
    fn register(&self, batch_id: u64, count: usize, reply: Reply) -> Result<(), Reply> {
        let mut queue = self.queue.lock().expect("stream queue lock");
        match queue.push(batch_id, count, reply) {
            Ok(()) => Ok(()),
            Err((PushRefused::Dead, reply)) => Err(reply),
            Err((PushRefused::Full, _)) => {
                unreachable!("a lane's permits keep its batches within the stream's depth")
            }
        }
    }

    /// Takes bytes read from the stream and answers every batch they complete, in order.
    fn on_data(&self, data: &[u8]) -> Result<(), SessionError> {
        let mut queue = self.queue.lock().expect("stream queue lock");
        let result = queue.handle_data(data);
        while let Some(answer) = queue.poll_answer() {
            answer.tag.send(Ok(answer.statuses));
        }
        result
    }

    /// The server finished its half: why nothing more will be answered.
    fn on_finish(&self) -> SessionError {
        self.queue
            .lock()
            .expect("stream queue lock")
            .handle_finish()
    }

    /// Marks the stream dead and fails every pending batch with `err`.
    fn fail(&self, err: ClientError) {
        let drained: Vec<Reply> = self
            .queue
            .lock()
            .expect("stream queue lock")
            .fail()
            .collect();
        for reply in drained {
            reply.send(Err(err.clone()));
        }
        self.died.notify_one();
    }
}

/// One lane: opens a stream when there is work, writes SUBMITs on it, and replaces it
/// with a fresh one when it dies. Ends when the client drops its queue.
async fn run_lane(
    connection: quinn::Connection,
    mut jobs: mpsc::Receiver<Job>,
    session: Session,
    depth: usize,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let (send, recv) = match connection.open_bi().await {
            Ok(pair) => pair,
            Err(e) => {
                // The connection is gone: fail this batch and every later one.
                let err = connection_error(e);
                first.reply.send(Err(err.clone()));
                while let Some(job) = jobs.recv().await {
                    job.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let shared = Arc::new(StreamShared::new(&session, depth));
        match run_stream(send, recv, first, &mut jobs, shared).await {
            StreamEnd::Died { unsent } => carried = unsent,
            StreamEnd::QueueClosed => return,
        }
    }
}

enum StreamEnd {
    /// The stream died; `unsent` was taken from the queue but not written.
    Died { unsent: Option<Job> },
    /// The client is gone.
    QueueClosed,
}

/// Writes jobs on one stream until it dies or the queue closes; a reader task resolves
/// the ACKs meanwhile.
async fn run_stream(
    mut send: SendStream,
    recv: RecvStream,
    first: Job,
    jobs: &mut mpsc::Receiver<Job>,
    shared: Arc<StreamShared>,
) -> StreamEnd {
    let reader = tokio::spawn(read_acks(recv, shared.clone()));
    let mut next = Some(first);
    let end = loop {
        let job = match next.take() {
            Some(job) => job,
            None => tokio::select! {
                biased;
                () = shared.died.notified() => break StreamEnd::Died { unsent: None },
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => break StreamEnd::QueueClosed,
                },
            },
        };
        let Job {
            frame,
            batch_id,
            count,
            reply,
        } = job;
        // Registered before the write, so that its ACK always finds it.
        if let Err(reply) = shared.register(batch_id, count, reply) {
            break StreamEnd::Died {
                unsent: Some(Job {
                    frame,
                    batch_id,
                    count,
                    reply,
                }),
            };
        }
        if let Err(e) = send.write_chunk(frame).await {
            shared.fail(write_error(e));
            break StreamEnd::Died { unsent: None };
        }
    };
    match end {
        StreamEnd::QueueClosed => {
            // Nobody waits for answers any more; the reader ends with the connection.
            let _ = send.finish();
        }
        StreamEnd::Died { .. } => {
            // Release the stream on our side too, so its slot returns to the server.
            let _ = send.reset(VarInt::from_u32(code::CLOSE_OK));
            reader.abort();
        }
    }
    end
}

/// Reads ACKs from one stream and resolves pending batches in order; on any failure
/// marks the stream dead and fails what is pending.
async fn read_acks(mut recv: RecvStream, shared: Arc<StreamShared>) {
    let err = loop {
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = shared.on_data(&chunk.bytes) {
                    break stopped(&mut recv, e);
                }
            }
            Ok(None) => break stopped(&mut recv, shared.on_finish()),
            Err(e) => break read_error(e),
        }
    };
    shared.fail(err);
}

/// Stops the server's half of a stream that broke by a frame, with the code that names
/// why (see `wire::code`).
pub(crate) fn stopped(recv: &mut RecvStream, e: SessionError) -> ClientError {
    if let Some(c) = e.stop_code() {
        let _ = recv.stop(VarInt::from_u32(c));
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_pipeline::wire::{Frame, FrameDecoder, Recipient, WireLimits};

    fn session() -> Session {
        Session::new(Welcome {
            business_id: 1,
            batch_messages_max: 4,
            payload_bytes_max: 10,
            frame_bytes_max: 100,
            features: None,
        })
        .unwrap()
    }

    fn msg(id: u64, payload: &'static [u8]) -> OutgoingMessage {
        OutgoingMessage {
            client_id: id,
            recipient: Recipient::parse(b"+15550000001").unwrap(),
            payload: Bytes::from_static(payload),
        }
    }

    fn pooled(pool: &FramePool) -> usize {
        pool.free.lock().unwrap().len()
    }

    #[test]
    fn frame_buffers_come_back_once_every_copy_is_dropped() {
        let pool = FramePool::new(1);
        let first = encode_batch(&session(), 1, &[msg(1, b"0123456789")], &pool).unwrap();
        let at = first.as_ptr();
        // quinn holds clones and slices of a frame until its packets are acknowledged.
        let held = first.slice(3..);
        drop(first);
        assert_eq!(pooled(&pool), 0, "a slice still holds the buffer");
        drop(held);
        assert_eq!(pooled(&pool), 1);
        let second = encode_batch(&session(), 2, &[msg(5, b"abc")], &pool).unwrap();
        assert_eq!(second.as_ptr(), at, "the buffer is reused");
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&second);
        let Some(Frame::Submit { batch_id, messages }) = d.next_frame().unwrap() else {
            panic!("not a SUBMIT");
        };
        assert_eq!((batch_id, messages.len()), (2, 1));
        assert_eq!(&messages[0].payload[..], b"abc");
        assert!(
            d.next_frame().unwrap().is_none(),
            "nothing left of the old frame"
        );
        // The pool keeps at most `keep` buffers.
        let third = encode_batch(&session(), 3, &[msg(6, b"x")], &pool).unwrap();
        drop((second, third));
        assert_eq!(pooled(&pool), 1);
        // A refused batch gives its buffer back at once.
        let err = encode_batch(&session(), 4, &[], &pool).unwrap_err();
        assert!(matches!(err, ClientError::EmptyBatch));
        assert_eq!(pooled(&pool), 1);
    }

    #[test]
    fn errors_and_debug_never_show_content() {
        let cfg = ClientConfig {
            server: "127.0.0.1:1".parse().unwrap(),
            server_name: "localhost".into(),
            token: "c1.1.secret-token-value".into(),
            trust: ServerTrust::InsecureLoopback,
            streams: 1,
            batches_in_flight_per_stream: 1,
        };
        let m = OutgoingMessage {
            client_id: 1,
            recipient: Recipient::parse(b"+4915112345678").unwrap(),
            payload: Bytes::from_static(b"secret words"),
        };
        let err = encode_batch(
            &session(),
            1,
            &[OutgoingMessage {
                payload: Bytes::from_static(b"secret words, too long"),
                ..m.clone()
            }],
            &FramePool::new(1),
        )
        .unwrap_err();
        let s = format!("{cfg:?} {m:?} {err} {err:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(!s.contains("4915112345678"), "{s}");
    }

    #[test]
    fn a_protocol_error_fails_the_pending_batches_and_returns_their_permits() {
        let shared = StreamShared::new(&session(), 2);
        let sem = Arc::new(Semaphore::new(2));
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        for (id, tx) in [(1, tx1), (2, tx2)] {
            let reply = Reply {
                tx,
                _permit: sem.clone().try_acquire_owned().unwrap(),
            };
            assert!(shared.register(id, 1, reply).is_ok());
        }
        let accepted = vec![Status::Accepted(wire::LogPosition(5))];
        let mut acks = BytesMut::new();
        wire::encode_ack(1, &accepted, &mut acks);
        wire::encode_ack(3, &accepted, &mut acks);
        let err = shared.on_data(&acks).unwrap_err();
        assert_eq!(rx1.try_recv().unwrap().unwrap(), accepted);
        assert!(matches!(err, SessionError::Protocol(_)));
        shared.fail(err.into());
        assert!(matches!(
            rx2.try_recv().unwrap(),
            Err(ClientError::Protocol(_))
        ));
        assert_eq!(sem.available_permits(), 2, "permits come back");
        let (tx, _rx) = oneshot::channel();
        let reply = Reply {
            tx,
            _permit: sem.clone().try_acquire_owned().unwrap(),
        };
        assert!(
            shared.register(9, 1, reply).is_err(),
            "a dead stream takes no more"
        );
    }
}
