//! The courier client: one authenticated QUIC connection carrying pipelined SUBMITs.
//!
//! ```text
//! connect: Endpoint ──QUIC+TLS──> server
//!          stream 0: HELLO(token) ──>  <── WELCOME(bounds)   (then the stream is released)
//!
//! submit(batch) ──validate against WELCOME──> encode SUBMIT ──> pick the least-loaded lane
//!        │                                                        │ acquire an in-flight permit
//!        ▼                                                        ▼
//!   awaits its reply <───────── lane k: writer task ── SUBMIT ──> stream k ──> server
//!                        │                 │ registers the batch as pending, in write order
//!                        └──── reader task <── ACK (batch_id, statuses), in order
//!                              resolves the oldest pending batch
//! ```
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

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_pipeline::wire::{
    self, code, Frame, FrameDecoder, OutMessage, Status, Welcome, WireError, WireLimits,
};
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::tls::{self, ServerTrust};

/// How long `connect` waits for the handshake and the WELCOME together.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` waits for the endpoint to become idle.
pub const CLOSE_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most submit streams one client may use.
pub const STREAMS_MAX: usize = 1024;
/// Most batches in flight on one stream.
pub const BATCHES_IN_FLIGHT_PER_STREAM_MAX: usize = 4096;
/// Longest wait `submit_with_retry` honours between rounds, whatever the server asks.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// Most bytes taken from a stream in one read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// The WELCOME body is 16 bytes; nothing else is accepted on the HELLO stream.
const WELCOME_BODY_BYTES: u32 = 16;

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

fn connection_error(e: ConnectionError) -> ClientError {
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

fn read_error(e: ReadError) -> ClientError {
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

fn write_error(e: WriteError) -> ClientError {
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
    welcome: Welcome,
    lanes: Vec<Lane>,
    next_lane: AtomicUsize,
    next_batch_id: AtomicU64,
    frames: Arc<FramePool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.connection.remote_address())
            .field("welcome", &self.welcome)
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
    pending: Pending,
}

/// A batch written (or about to be) and not yet answered.
struct Pending {
    batch_id: u64,
    count: usize,
    reply: oneshot::Sender<Result<Vec<Status>, ClientError>>,
    /// Held until the batch is answered or failed: bounds a lane's batches in flight.
    _permit: OwnedSemaphorePermit,
}

impl Client {
    /// Connects, authenticates with HELLO and waits for WELCOME (at most
    /// [`WELCOME_TIMEOUT`]). Submit streams are opened on first use.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
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
        let (connection, welcome) =
            match tokio::time::timeout(WELCOME_TIMEOUT, handshake(&endpoint, cfg)).await {
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
                tokio::spawn(run_lane(connection.clone(), rx, welcome));
                Lane {
                    jobs: tx,
                    permits: Arc::new(Semaphore::new(cfg.batches_in_flight_per_stream)),
                }
            })
            .collect();
        Ok(Client {
            endpoint,
            connection,
            welcome,
            lanes,
            next_lane: AtomicUsize::new(0),
            next_batch_id: AtomicU64::new(1),
            frames: FramePool::new(cfg.streams * cfg.batches_in_flight_per_stream),
        })
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
        self.welcome
    }

    /// Submit streams this client spreads batches over.
    pub fn streams(&self) -> usize {
        self.lanes.len()
    }

    /// Checks `batch` against the WELCOME bounds without sending it: `submit` refuses
    /// exactly the batches this refuses.
    pub fn check(&self, batch: &[OutgoingMessage]) -> Result<(), ClientError> {
        check_batch(&self.welcome, batch).map(|_| ())
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
        let frame = encode_batch(&self.welcome, batch_id, &batch, &self.frames)?;
        let count = batch.len();
        drop(batch);
        let lane = self.pick_lane();
        let permit = lane
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            frame,
            pending: Pending {
                batch_id,
                count,
                reply,
                _permit: permit,
            },
        };
        lane.jobs.send(job).await.map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
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
        if entries.is_empty() || entries.len() > self.welcome.batch_messages_max as usize {
            return Err(ClientError::BatchTooLarge {
                count: entries.len(),
                max: self.welcome.batch_messages_max,
            });
        }
        let (mut send, mut recv) = self.connection.open_bi().await.map_err(connection_error)?;
        let mut frame = BytesMut::new();
        wire::encode_report(entries, &mut frame);
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

/// Checks `batch` against the WELCOME bounds; returns the body bytes of its SUBMIT.
fn check_batch(welcome: &Welcome, batch: &[OutgoingMessage]) -> Result<usize, ClientError> {
    if batch.is_empty() {
        return Err(ClientError::EmptyBatch);
    }
    if batch.len() > welcome.batch_messages_max as usize {
        return Err(ClientError::BatchTooLarge {
            count: batch.len(),
            max: welcome.batch_messages_max,
        });
    }
    if let Some((index, m)) = batch
        .iter()
        .enumerate()
        .find(|(_, m)| m.payload.len() > welcome.payload_bytes_max as usize)
    {
        return Err(ClientError::PayloadTooLarge {
            index,
            bytes: m.payload.len(),
            max: welcome.payload_bytes_max,
        });
    }
    let body_bytes = wire::BATCH_HEADER_BYTES
        + batch
            .iter()
            .map(|m| wire::MESSAGE_OVERHEAD_BYTES + m.recipient.as_bytes().len() + m.payload.len())
            .sum::<usize>();
    if body_bytes > welcome.frame_bytes_max as usize {
        return Err(ClientError::FrameTooLarge {
            bytes: body_bytes,
            max: welcome.frame_bytes_max,
        });
    }
    Ok(body_bytes)
}

/// Checks `batch` against the WELCOME bounds and encodes its SUBMIT frame into a buffer
/// from `pool`.
fn encode_batch(
    welcome: &Welcome,
    batch_id: u64,
    batch: &[OutgoingMessage],
    pool: &Arc<FramePool>,
) -> Result<Bytes, ClientError> {
    let body_bytes = check_batch(welcome, batch)?;
    let out: Vec<OutMessage<'_>> = batch
        .iter()
        .map(|m| OutMessage {
            client_id: m.client_id,
            recipient: &m.recipient,
            payload: &m.payload,
        })
        .collect();
    debug_assert_eq!(wire::submit_body_bytes(&out), body_bytes);
    let mut buf = pool.take();
    buf.reserve(wire::FRAME_HEADER_BYTES + body_bytes);
    wire::encode_submit_into(batch_id, &out, &mut buf);
    debug_assert_eq!(buf.len(), wire::FRAME_HEADER_BYTES + body_bytes);
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

/// Opens the connection, sends HELLO, reads WELCOME, then releases the HELLO stream so
/// that it does not hold one of the server's stream slots.
async fn handshake(
    endpoint: &quinn::Endpoint,
    cfg: &ClientConfig,
) -> Result<(quinn::Connection, Welcome), ClientError> {
    let connecting =
        endpoint.connect_with(tls::client_config(&cfg.trust), cfg.server, &cfg.server_name)?;
    let connection = connecting.await.map_err(connection_error)?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(connection_error)?;
    let mut hello = BytesMut::new();
    wire::encode_hello(cfg.token.as_bytes(), &mut hello);
    send.write_all(&hello).await.map_err(write_error)?;
    let mut decoder = FrameDecoder::new(WireLimits {
        frame_bytes_max: WELCOME_BODY_BYTES,
        batch_messages_max: 1,
    });
    let welcome = loop {
        match decoder.next_frame()? {
            Some(Frame::Welcome(w)) => break w,
            Some(_) => return Err(ClientError::Protocol("expected WELCOME")),
            None => {}
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Err(ClientError::StreamEnded),
            Err(e) => return Err(read_error(e)),
        }
    };
    if welcome.batch_messages_max == 0 || welcome.frame_bytes_max == 0 {
        return Err(ClientError::Protocol("WELCOME states unusable bounds"));
    }
    // Done with the HELLO stream: finishing our side and stopping theirs closes it fully.
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(code::CLOSE_OK));
    Ok((connection, welcome))
}

/// The decoder bounds for ACKs answering batches within `welcome`.
fn ack_limits(welcome: &Welcome) -> WireLimits {
    let body = wire::BATCH_HEADER_BYTES as u64
        + u64::from(welcome.batch_messages_max) * wire::STATUS_BYTES as u64;
    WireLimits {
        frame_bytes_max: u32::try_from(body).unwrap_or(u32::MAX),
        batch_messages_max: welcome.batch_messages_max,
    }
}

/// The state one stream's writer and reader share.
struct StreamShared {
    state: Mutex<StreamState>,
    /// Woken when the stream dies, so the writer moves to a fresh stream.
    died: Notify,
}

struct StreamState {
    /// Batches written and unanswered, in write order.
    pending: VecDeque<Pending>,
    /// Why the stream died; once set, nothing more is registered.
    dead: Option<ClientError>,
}

impl StreamShared {
    fn new() -> StreamShared {
        StreamShared {
            state: Mutex::new(StreamState {
                pending: VecDeque::new(),
                dead: None,
            }),
            died: Notify::new(),
        }
    }

    /// Registers a batch about to be written; hands it back if the stream is dead.
    fn register(&self, pending: Pending) -> Result<(), Pending> {
        let mut state = self.state.lock().expect("stream state lock");
        if state.dead.is_some() {
            return Err(pending);
        }
        state.pending.push_back(pending);
        Ok(())
    }

    /// Resolves the oldest pending batch with an ACK.
    fn resolve(&self, frame: Frame) -> Result<(), ClientError> {
        let Frame::Ack { batch_id, statuses } = frame else {
            return Err(ClientError::Protocol(
                "a frame other than ACK on a submit stream",
            ));
        };
        let pending = {
            let mut state = self.state.lock().expect("stream state lock");
            match state.pending.front() {
                None => return Err(ClientError::Protocol("ACK with no batch pending")),
                Some(p) if p.batch_id != batch_id => {
                    return Err(ClientError::Protocol(
                        "ACK for a batch other than the oldest",
                    ))
                }
                Some(p) if p.count != statuses.len() => {
                    return Err(ClientError::Protocol(
                        "ACK status count differs from the batch",
                    ))
                }
                Some(_) => state.pending.pop_front().expect("front exists"),
            }
        };
        // The submitter may have stopped waiting; its batch was answered all the same.
        let _ = pending.reply.send(Ok(statuses));
        Ok(())
    }

    /// Marks the stream dead and fails every pending batch with `err`.
    fn fail(&self, err: ClientError) {
        let drained = {
            let mut state = self.state.lock().expect("stream state lock");
            if state.dead.is_none() {
                state.dead = Some(err.clone());
            }
            std::mem::take(&mut state.pending)
        };
        for p in drained {
            let _ = p.reply.send(Err(err.clone()));
        }
        self.died.notify_one();
    }
}

/// One lane: opens a stream when there is work, writes SUBMITs on it, and replaces it
/// with a fresh one when it dies. Ends when the client drops its queue.
async fn run_lane(connection: quinn::Connection, mut jobs: mpsc::Receiver<Job>, welcome: Welcome) {
    let limits = ack_limits(&welcome);
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
                let _ = first.pending.reply.send(Err(err.clone()));
                while let Some(job) = jobs.recv().await {
                    let _ = job.pending.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        match run_stream(send, recv, first, &mut jobs, limits).await {
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
    limits: WireLimits,
) -> StreamEnd {
    let shared = Arc::new(StreamShared::new());
    let reader = tokio::spawn(read_acks(recv, shared.clone(), limits));
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
        let Job { frame, pending } = job;
        // Registered before the write, so that its ACK always finds it.
        if let Err(pending) = shared.register(pending) {
            break StreamEnd::Died {
                unsent: Some(Job { frame, pending }),
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
async fn read_acks(mut recv: RecvStream, shared: Arc<StreamShared>, limits: WireLimits) {
    let mut decoder = FrameDecoder::new(limits);
    let err = 'read: loop {
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                decoder.push(&chunk.bytes);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if let Err(e) = shared.resolve(frame) {
                                break 'read e;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => break 'read ClientError::Wire(e),
                    }
                }
            }
            Ok(None) => {
                break match decoder.finish() {
                    Ok(()) => ClientError::StreamEnded,
                    Err(e) => ClientError::Wire(e),
                }
            }
            Err(e) => break read_error(e),
        }
    };
    if let ClientError::Wire(e) = &err {
        let _ = recv.stop(VarInt::from_u32(e.code()));
    } else if let ClientError::Protocol(_) = &err {
        let _ = recv.stop(VarInt::from_u32(code::UNEXPECTED_FRAME));
    }
    shared.fail(err);
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_pipeline::wire::Recipient;

    fn welcome() -> Welcome {
        Welcome {
            business_id: 1,
            batch_messages_max: 4,
            payload_bytes_max: 10,
            frame_bytes_max: 100,
            features: None,
        }
    }

    fn msg(id: u64, payload: &'static [u8]) -> OutgoingMessage {
        OutgoingMessage {
            client_id: id,
            recipient: Recipient::parse(b"+15550000001").unwrap(),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn encode_refuses_batches_outside_welcome_bounds() {
        let w = welcome();
        let pool = FramePool::new(1);
        assert!(matches!(
            encode_batch(&w, 1, &[], &pool),
            Err(ClientError::EmptyBatch)
        ));
        let five: Vec<_> = (0..5).map(|i| msg(i, b"x")).collect();
        assert!(matches!(
            encode_batch(&w, 1, &five, &pool),
            Err(ClientError::BatchTooLarge { count: 5, max: 4 })
        ));
        assert!(matches!(
            encode_batch(&w, 1, &[msg(0, b"x"), msg(1, b"01234567890")], &pool),
            Err(ClientError::PayloadTooLarge {
                index: 1,
                bytes: 11,
                max: 10
            })
        ));
        // 4 messages of 13 + 12 + 10 bytes plus the 12 byte header: 152 > 100.
        let four: Vec<_> = (0..4).map(|i| msg(i, b"0123456789")).collect();
        assert!(matches!(
            encode_batch(&w, 1, &four, &pool),
            Err(ClientError::FrameTooLarge {
                bytes: 152,
                max: 100
            })
        ));
    }

    #[test]
    fn encoded_submit_decodes_back() {
        let pool = FramePool::new(1);
        let frame = encode_batch(&welcome(), 9, &[msg(7, b"hi"), msg(8, b"")], &pool).unwrap();
        let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
        d.push(&frame);
        let Some(Frame::Submit { batch_id, messages }) = d.next_frame().unwrap() else {
            panic!("not a SUBMIT");
        };
        assert_eq!(batch_id, 9);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].client_id, 7);
        assert_eq!(&messages[0].payload[..], b"hi");
        assert_eq!(messages[1].client_id, 8);
    }

    fn pooled(pool: &FramePool) -> usize {
        pool.free.lock().unwrap().len()
    }

    #[test]
    fn frame_buffers_come_back_once_every_copy_is_dropped() {
        let pool = FramePool::new(1);
        let first = encode_batch(&welcome(), 1, &[msg(1, b"0123456789")], &pool).unwrap();
        let at = first.as_ptr();
        // quinn holds clones and slices of a frame until its packets are acknowledged.
        let held = first.slice(3..);
        drop(first);
        assert_eq!(pooled(&pool), 0, "a slice still holds the buffer");
        drop(held);
        assert_eq!(pooled(&pool), 1);
        let second = encode_batch(&welcome(), 2, &[msg(5, b"abc")], &pool).unwrap();
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
        let third = encode_batch(&welcome(), 3, &[msg(6, b"x")], &pool).unwrap();
        drop((second, third));
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
            &welcome(),
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
    fn ack_mismatch_is_a_protocol_error_and_fails_pending() {
        let shared = StreamShared::new();
        let sem = Arc::new(Semaphore::new(2));
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        for (id, tx) in [(1, tx1), (2, tx2)] {
            let p = Pending {
                batch_id: id,
                count: 1,
                reply: tx,
                _permit: sem.clone().try_acquire_owned().unwrap(),
            };
            assert!(shared.register(p).is_ok());
        }
        let accepted = vec![Status::Accepted(wire::LogPosition(5))];
        shared
            .resolve(Frame::Ack {
                batch_id: 1,
                statuses: accepted.clone(),
            })
            .unwrap();
        assert_eq!(rx1.try_recv().unwrap().unwrap(), accepted);
        let err = shared
            .resolve(Frame::Ack {
                batch_id: 3,
                statuses: accepted,
            })
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)));
        shared.fail(err);
        assert!(matches!(
            rx2.try_recv().unwrap(),
            Err(ClientError::Protocol(_))
        ));
        assert_eq!(sem.available_permits(), 2, "permits come back");
    }
}
