//! A tiny test-only courier server on quinn: HELLO/WELCOME for one token, ACKs for
//! SUBMITs with positions from a counter, and switches for throttling, stream resets and
//! holding ACKs back. It is not the real server and tests nothing of it: the client
//! library's and the load engine's tests run against it.
//!
//! Every queue here is bounded by what a test sends (each test sends a bounded number
//! of batches); it runs on the caller's tokio runtime and stops when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use courier::tls;
use courier_pipeline::wire::{
    self, code, Frame, FrameDecoder, LogPosition, Reason, Status, Welcome, WireLimits,
};
use quinn::{RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot, watch};

/// The one token the test server accepts.
pub const TOKEN: &str = "c1.1.test-token-0123456789";
/// A client id that makes the server reset the stream with `MALFORMED_FRAME` instead
/// of answering.
pub const POISON: u64 = u64::MAX - 1;
/// What the throttling server asks clients to wait.
pub const RETRY_AFTER_MS: u32 = 20;

/// Switches of the test server.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Bounds sent in WELCOME.
    pub welcome: Welcome,
    /// Throttle a client id the first time it is seen.
    pub throttle_first: bool,
    /// Hold every answer (ACK or reset) until this many SUBMITs arrived in total.
    pub barrier: Option<u64>,
    /// Reject every client id at or above this with `sender_paused`.
    pub reject_from: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            welcome: Welcome {
                business_id: 1,
                batch_messages_max: 64,
                payload_bytes_max: 4096,
                frame_bytes_max: 1 << 20,
                features: None,
            },
            throttle_first: false,
            barrier: None,
            reject_from: None,
        }
    }
}

/// One SUBMIT as the server received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The QUIC stream it came on.
    pub stream: u64,
    /// Its batch id.
    pub batch_id: u64,
    /// Its messages' client ids, in order.
    pub client_ids: Vec<u64>,
}

/// What the server saw and decided; tests read it.
#[derive(Debug)]
pub struct State {
    next_position: AtomicU64,
    /// SUBMIT frames received so far (also drives the barrier).
    submits: watch::Sender<u64>,
    /// Times each client id was seen.
    seen: Mutex<HashMap<u64, u32>>,
    /// Position given to each accepted client id.
    pub positions: Mutex<HashMap<u64, u64>>,
    /// Every SUBMIT in arrival order.
    pub arrivals: Mutex<Vec<Arrival>>,
}

impl State {
    /// SUBMIT frames received so far.
    pub fn submits(&self) -> u64 {
        *self.submits.borrow()
    }
}

/// A running test server.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its certificate, for pinning.
    pub cert: CertificateDer<'static>,
    /// What it saw.
    pub state: Arc<State>,
    endpoint: quinn::Endpoint,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(code::SHUTTING_DOWN), b"");
    }
}

impl TestServer {
    /// Starts a server on an ephemeral loopback port.
    pub fn start(options: Options) -> TestServer {
        let (cert, key) = tls::self_signed(&["localhost".to_string()]);
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_crypto(
            cert.clone(),
            key,
        ))
        .unwrap();
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(32u32.into());
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let state = Arc::new(State {
            next_position: AtomicU64::new(1),
            submits: watch::channel(0).0,
            seen: Mutex::new(HashMap::new()),
            positions: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(Vec::new()),
        });
        let accept = endpoint.clone();
        let s = state.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_connection(conn, s, options).await;
                    }
                });
            }
        });
        TestServer {
            addr: endpoint.local_addr().unwrap(),
            cert,
            state,
            endpoint,
        }
    }
}

async fn read_frame(recv: &mut RecvStream, decoder: &mut FrameDecoder) -> Option<Frame> {
    loop {
        if let Some(frame) = decoder.next_frame().ok()? {
            return Some(frame);
        }
        let chunk = recv.read_chunk(64 << 10, true).await.ok()??;
        decoder.push_bytes(chunk.bytes);
    }
}

async fn serve_connection(conn: quinn::Connection, state: Arc<State>, options: Options) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut decoder = FrameDecoder::new(WireLimits::PERMISSIVE);
    match read_frame(&mut recv, &mut decoder).await {
        Some(Frame::Hello { token, .. }) if token.0 == TOKEN.as_bytes() => {
            let mut buf = BytesMut::new();
            wire::encode_welcome(&options.welcome, &mut buf);
            if send.write_all(&buf).await.is_err() {
                return;
            }
            let _ = send.finish();
        }
        _ => {
            conn.close(VarInt::from_u32(code::UNAUTHORIZED), b"unauthorized");
            return;
        }
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(send, recv, state.clone(), options));
    }
}

async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<State>,
    options: Options,
) {
    let stream = recv.id().index();
    let (frames_tx, mut frames_rx) = mpsc::unbounded_channel();
    let (stop_tx, mut stop_rx) = oneshot::channel::<u32>();
    // Reads ahead of the answers, so that a barrier can see every SUBMIT.
    let reader_state = state.clone();
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::new(WireLimits::PERMISSIVE);
        loop {
            tokio::select! {
                stop = &mut stop_rx => {
                    if let Ok(c) = stop {
                        let _ = recv.stop(VarInt::from_u32(c));
                    }
                    return;
                }
                frame = read_frame(&mut recv, &mut decoder) => {
                    let Some(frame) = frame else { return };
                    if let Frame::Submit { batch_id, messages } = &frame {
                        reader_state.arrivals.lock().unwrap().push(Arrival {
                            stream,
                            batch_id: *batch_id,
                            client_ids: messages.iter().map(|m| m.client_id).collect(),
                        });
                        reader_state.submits.send_modify(|n| *n += 1);
                    }
                    if frames_tx.send(frame).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some(frame) = frames_rx.recv().await {
        if let Some(n) = options.barrier {
            let mut w = state.submits.subscribe();
            let _ = w.wait_for(|seen| *seen >= n).await;
        }
        let Frame::Submit { batch_id, messages } = frame else {
            let _ = send.reset(VarInt::from_u32(code::UNEXPECTED_FRAME));
            let _ = stop_tx.send(code::UNEXPECTED_FRAME);
            return;
        };
        if messages.iter().any(|m| m.client_id == POISON) {
            let _ = send.reset(VarInt::from_u32(code::MALFORMED_FRAME));
            let _ = stop_tx.send(code::MALFORMED_FRAME);
            return;
        }
        let statuses: Vec<Status> = messages
            .iter()
            .map(|m| {
                let times = {
                    let mut seen = state.seen.lock().unwrap();
                    let t = seen.entry(m.client_id).or_insert(0);
                    *t += 1;
                    *t
                };
                if m.payload.is_empty() {
                    Status::Rejected(Reason::PayloadTooLarge)
                } else if options.reject_from.is_some_and(|r| m.client_id >= r) {
                    Status::Rejected(Reason::SenderPaused)
                } else if options.throttle_first && times == 1 {
                    Status::Throttled {
                        retry_after_ms: RETRY_AFTER_MS,
                    }
                } else {
                    let p = state.next_position.fetch_add(1, Ordering::Relaxed);
                    state.positions.lock().unwrap().insert(m.client_id, p);
                    Status::Accepted(LogPosition(p))
                }
            })
            .collect();
        let mut buf = BytesMut::new();
        wire::encode_ack(batch_id, &statuses, &mut buf);
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
}
