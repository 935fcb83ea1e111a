//! courier-loadgen's integration tests in one binary: the engine against fakes (open
//! loop, closed loop), the JSON report contract, and the binary against a real server.

mod against_server;
mod deliver;
mod detect_scenarios;
mod load;
mod open_loop;
mod report_json;
