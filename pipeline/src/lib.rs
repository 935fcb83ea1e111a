//! courier's sans-IO core.
//!
//! Everything that decides lives here; everything that touches the operating system lives
//! in the `courier` crate. Data flows through this crate as calls that take `now` and
//! caller-owned buffers and return what to do:
//!
//! ```text
//!  datagram ──> server::Server::handle_datagram(now, ..)
//!                 │  quinn-proto Endpoint + Connections (TLS 1.3, rustls)
//!                 │  stream chunks ──> wire::FrameDecoder ──> Frame
//!                 │  HELLO ──> registry::Registry::authenticate
//!                 ▼
//!               server::Server::poll_batch() ──> SubmitBatch { ticket, business_id, messages }
//!                                                    │ the shell runs the stage chain:
//!                                                    │ ingest::Ingest::check,
//!                                                    │ idempotency::Idempotency::claim,
//!                                                    │ detect::Detector::observe_batch,
//!                                                    │ seal::Sealer (per-recipient AES-GCM),
//!                                                    │ log::Log::append + group commit
//!               server::Server::ack(ticket, statuses) <─┘ (now, or once durable)
//!                 │  ACK frame written on the submitting stream, in order
//!                 ▼
//!               server::Server::poll_transmit(now, buf) ──> datagrams for the shell to send
//!               server::Server::poll_timeout() ──> when to call handle_timeout(now)
//! ```
//!
//! Between `poll_batch` and `ack`, accepted messages go through [`log::Log`]: `append`
//! returns encrypted, CRC-framed writes for the shell to perform, and `on_synced` says which
//! log positions the shell's fdatasync made durable, so only those are ACKed `accepted`
//! (see [`log`] for the whole call order, recovery and retention included).
//!
//! The rule: this crate opens no socket or file, reads no clock, spawns no thread and holds
//! no `unsafe`. That lets the whole ingest path run in a seeded simulation ([`sim`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cid;
pub mod detect;
pub mod idempotency;
pub mod ingest;
pub mod log;
pub mod profile;
pub mod registry;
pub mod seal;
pub mod server;
pub mod sim;
pub mod wire;
