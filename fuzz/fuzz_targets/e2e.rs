#![no_main]
//! See `courier_pipeline::fuzzing::e2e` for the input layout and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_pipeline::fuzzing::e2e(data));
