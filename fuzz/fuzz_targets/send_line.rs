#![no_main]
//! See `courier_client::fuzzing::send_line` for the input layout and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_client::fuzzing::send_line(data));
