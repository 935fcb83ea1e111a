//! courier
#![deny(unsafe_code)]
pub use courier_pipeline;

pub mod client;
pub mod load;
pub mod tls;

// The io_uring driver: the only module allowed to hold `unsafe` (see STYLE.md).
#[allow(unsafe_code)]
pub mod uring;
