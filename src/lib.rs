//! courier: the IO shell around `courier_pipeline`.
//!
//! ```text
//!  courier serve ──> serve::start ──> one pinned thread per shard (shard::Shard::run)
//!                                        │  uring::UdpRing: multishot recvmsg + GRO,
//!                                        │  sendmsg + GSO, io_uring wait timeouts, eventfd wake
//!                                        ▼
//!                                     courier_pipeline::server::Server (sans-IO QUIC)
//!                                        │  batches ──> courier_pipeline::ingest ──> ack
//!  client::Client (quinn, tokio) ────────┘  used by load (courier demo, courier-loadgen)
//!                                           and send (courier send FILE)
//! ```
//!
//! Only `uring/` holds `unsafe` code; the rest of the crate denies it.
#![deny(unsafe_code)]

pub use courier_pipeline;

pub mod audit;
pub mod business_keys;
pub mod control;
pub mod metrics;
pub mod notify;
pub mod serve;
pub mod shard;
pub mod signals;
pub mod store;
pub mod tls;

// The io_uring driver: the only module allowed to hold `unsafe` (see STYLE.md).
#[allow(unsafe_code)]
pub mod uring;
