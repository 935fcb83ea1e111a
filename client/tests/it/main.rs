//! courier-client's integration tests in one binary: the quinn client and the `send`
//! engine against the fake server of courier-testkit, on loopback; and the replay of the
//! `send_line` fuzz target's committed inputs.

mod client;
mod fuzz_corpus;
mod send;
