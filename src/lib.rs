//! courier
pub use courier_pipeline;

pub mod client;
pub mod load;
pub mod tls;
