//! courier-client: what a bulk sender embeds to talk to a courier relay (wire v1 over
//! QUIC), and the engine of `courier send FILE`.
//!
//! ```text
//!            your code / courier send / courier-loadgen
//!                │ submit(batch) -> statuses
//!                ▼
//!  client::Client (quinn + tokio: connection, lanes of streams, permits, buffers)
//!                │ bytes in, frames and answers out
//!                ▼
//!  session (sans-IO: HELLO/WELCOME, WELCOME's bounds, SUBMIT encoding,
//!           per-stream AckQueue matching ACKs with pending batches)
//!                │ frames
//!                ▼
//!  courier_pipeline::wire (the codec the server decodes with)
//!
//!  delivery (HELLO version 2; wire v1 clients are unchanged):
//!    Client::connect_with_events ── EventReceiver: statuses and users' replies,
//!                                   Client::ack_events (events: the sans-IO decoder)
//!    edge::DeliveryEdge ── Deliveries: DELIVERs within a credit window;
//!                          outcomes, online, inbound (ACKed like SUBMIT)
//!  tls: ServerTrust (pin the server's certificate, or loopback-only insecure) -> quinn config
//!  send: a JSON Lines file, validated whole, sent pipelined, resumable (state file)
//!  progress: the one-line progress display of `courier send` and `courier-loadgen`
//! ```
//!
//! The library pulls in no server code: no io_uring, no log, no detector. No error, log
//! line or `Debug` output of it carries a token, a recipient or a payload.
#![forbid(unsafe_code)]

pub mod client;
pub mod edge;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod progress;
pub mod send;
pub mod session;
pub mod subscription;
pub mod tls;

pub use client::{Client, ClientConfig, ClientError, OutgoingMessage, ReportOutcome, Retried};
pub use edge::DeliveryEdge;
pub use subscription::{Deliveries, EdgeItem, EventReceiver};
pub use tls::ServerTrust;
