//! courier
pub use courier_pipeline;
