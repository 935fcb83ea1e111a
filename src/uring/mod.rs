//! The io_uring driver of one shard: the only place in courier that holds `unsafe`.
//!
//! So far: CPU pinning for shard threads (`thread`).

mod thread;

pub use thread::{available_cpus, pin_current_thread};
