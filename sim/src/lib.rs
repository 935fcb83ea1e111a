//! courier's deterministic whole-path simulation (tests only; nothing ships it).
//!
//! It runs the real shard state machine, `courier_pipeline::node::Shard`, for every shard
//! of a simulated node, with many sim clients speaking wire v1 over quinn-proto, a
//! simulated network (delay, jitter, loss, duplication, reordering) and simulated disks
//! (latency, torn writes at a crash, failed fsync, full disk), on a virtual clock, with
//! crashes and restarts at any step. One seed replays a run exactly.
//!
//! ```text
//!   world::Sim ── clients (client.rs) ── net.rs ── node::SimNode ── storage::MemStorage
//!        │                                              │ real node::Shard cores
//!        └── oracle::Oracle: what the clients were told against what the disks hold
//! ```
//!
//! - [`world`]: the harness: time, steps, the shell's part of the polling contract, a
//!   trace digest;
//! - [`node`]: the node: boot (recovery, idempotency rebuilt), crash, the disks' latency;
//! - [`client`]: the sim client (plans, resends, reconnects, a ledger per message);
//! - [`net`]: the network;
//! - [`storage`]: fault-injecting disks, recovery over them, an auditor's read, and a
//!   bare-log shell for the log's own tests;
//! - [`oracle`]: the invariants.
//!
//! The tests (`tests/`) hold the scenarios: `whole_path.rs` (seeded runs with crashes and
//! faults, planted bugs, the long mode), `quic.rs` (the wire over a faulty network),
//! `log.rs` (the log alone under disk faults). Planted bugs come from the pipeline's
//! `planted-bugs` feature, which only this crate switches on.

pub mod client;
pub mod edge;
pub mod net;
pub mod node;
pub mod oracle;
pub mod storage;
pub mod world;

pub use client::{
    batch_id, batch_stream_key, message_id, payload_for, recipient_for, ClientPlan, ClientStream,
    Ledger, Outcome, Phase, SimClient, StreamKind, RECONNECT_DELAY, SERVER_NAME,
};
pub use edge::{reply_payload, Devices, EdgeLedger, EdgePlan, Reply};
pub use net::{Fate, NetConfig, NetStats};
pub use node::{NodeSetup, SimNode, StorageConfig};
pub use oracle::{Oracle, Violation};
pub use world::{reuseport_shard, Sim, SimConfig, SimStats, SimTls, SERVER_ADDR};
