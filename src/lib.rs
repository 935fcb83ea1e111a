//! courier
pub use courier_pipeline;

pub mod tls;
