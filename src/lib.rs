//! courier
pub use courier_pipeline;

pub mod client;
pub mod tls;
