//! courier's sans-IO core.
//!
//! Everything that decides lives here; everything that touches the operating system lives
//! in the `courier` crate. Each shard's core is one state machine, [`node::Shard`], fed by
//! calls that take `now` and caller-owned buffers and answered by `poll_*` calls that say
//! what to do:
//!
//! ```text
//!  datagram ──> node::Shard::handle_datagram(now, ..)
//!                 │  server::Server: quinn-proto Endpoint + Connections (TLS 1.3, rustls)
//!                 │  stream chunks ──> wire::FrameDecoder ──> Frame; HELLO ──> registry
//!                 ▼  SUBMIT batch
//!               the stage chain (node): payload checks, idempotency::Idempotency::claim,
//!                 detect::Detector::observe_batch, seal::Sealer::seal_batch,
//!                 node::GroupCommit (log::Log::append, writes grouped per segment)
//!                 │
//!  poll_io ──> node::Io: keyring / segment files / write + fdatasync, for the shell
//!  handle_write_done ──> log::Log::on_synced ──> ACKs `accepted(position)` (once durable)
//!  poll_transmit ──> datagrams to send;  poll_event ──> detector deltas, status
//!  poll_timeout / handle_timeout ──> QUIC timers, roll and retention, exchanges
//! ```
//!
//! Start-up recovery is a decision too ([`log::Recovery`]): the shell hands over the
//! keyring's and the segments' bytes and performs the repairs it is told.
//!
//! The rule: this crate opens no socket or file, reads no clock, spawns no thread and holds
//! no `unsafe`. That lets the whole path run in a seeded simulation (the `sim/` crate).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod by_position;
pub mod cid;
pub mod detect;
pub mod e2e;
#[doc(hidden)]
pub mod fuzzing;
pub mod idempotency;
pub mod log;
pub mod node;
pub mod profile;
pub mod registry;
pub mod seal;
pub mod server;
pub mod shard_id;
pub mod wire;

pub use shard_id::ShardId;

/// A hash map for keys that no peer chooses freely (connection handles the endpoint
/// assigns, business ids from the registry, stream ids bounded per connection): foldhash
/// without a key, cheaper on the hot path than the standard library's SipHash. Keys a
/// peer picks without bound (addresses, message ids) keep a keyed hasher.
pub(crate) type LocalMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
