//! courier: the IO shell around `courier_pipeline`.
//!
//! ```text
//!  courier serve ──> serve::start ──> one pinned thread per shard (shard::Shard::run)
//!                                        │  uring::UdpRing: multishot recvmsg + GRO,
//!                                        │  sendmsg + GSO, durable file writes,
//!                                        │  io_uring wait timeouts, eventfd wake
//!                                        ▼
//!                                     courier_pipeline::node::Shard (the sans-IO core:
//!                                        │  QUIC, stage chain, log, acks, delivery);
//!                                        │  store::ShardStore performs its file operations
//!  courier_client::Client (quinn, tokio) ┘  QUIC from senders: courier send FILE,
//!                                           courier-loadgen and courier demo
//! ```
//!
//! The client library (`courier-client`) and the load engine (`courier-loadgen`) are
//! crates of their own; this one is the server and the `courier` CLI (`src/main.rs`,
//! a module per command in `src/commands/`).
//!
//! Only `uring/` holds `unsafe` code; the rest of the crate denies it.
#![deny(unsafe_code)]

pub use courier_pipeline;

pub mod access;
pub mod audit;
pub mod business_keys;
pub mod control;
pub mod erase;
pub mod expire;
pub mod metrics;
pub mod notify;
pub mod outcomes;
pub mod placement;
pub mod recv_arena;
pub mod region;
pub mod serve;
pub mod shard;
pub mod signals;
pub mod store;
pub mod tls;

// The io_uring driver: the only module allowed to hold `unsafe` (see STYLE.md).
#[allow(unsafe_code)]
pub mod uring;
