//! courier-client's integration tests in one binary: the quinn client and the `send`
//! engine against the fake server of courier-testkit, on loopback.

mod client;
mod send;
