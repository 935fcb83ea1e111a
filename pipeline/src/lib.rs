#![forbid(unsafe_code)]
//! courier-pipeline
pub fn placeholder() {}
