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
//!               server::Server::poll_event() ──> Event::Submit { ticket, business, messages }
//!                                                    │ the shell runs the stage chain:
//!                                                    │ detect::Detector::observe_batch
//!                                                    │ (admit / throttle / reject), then
//!                                                    │ ingest::Ingest for the admitted
//!               server::Server::ack(ticket, statuses) <─┘ (now, or once durable)
//!                 │  ACK frame written on the submitting stream, in order
//!                 ▼
//!               server::Server::poll_transmit(now, buf) ──> datagrams for the shell to send
//!               server::Server::poll_timeout() ──> when to call handle_timeout(now)
//! ```
//!
//! The rule: this crate opens no socket or file, reads no clock, spawns no thread and holds
//! no `unsafe`. That lets the whole ingest path run in a seeded simulation ([`sim`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cid;
pub mod detect;
pub mod ingest;
pub mod profile;
pub mod registry;
pub mod server;
pub mod wire;
