//! CPU time of the generator and of the server, read from `/proc` (no `unsafe`: getrusage
//! would need it, and only `src/uring/` may hold any).
//!
//! - The process's own CPU time is `utime + stime` of `/proc/self/stat`, which includes
//!   threads that already exited.
//! - A server started in the same process (`courier::serve::start`, as in tests and
//!   `courier demo`) runs on threads named `courier-shard-N`: their time is read from
//!   `/proc/self/task/TID/stat` and moved from the generator's figure to the server's.
//! - A server in another process is read from `/proc/PID/stat` (`--server-pid`).
//!
//! Times are in clock ticks; Linux fixes USER_HZ at 100 for every architecture it runs
//! on, so a tick is 10 ms. Runs shorter than a few seconds therefore carry ±10 ms per
//! reading.

use std::path::Path;

/// Seconds per clock tick in `/proc/*/stat` (USER_HZ, fixed at 100 by the Linux ABI).
pub const SECS_PER_TICK: f64 = 0.01;
const SHARD_THREAD_PREFIX: &str = "courier-shard-";

/// utime + stime of a `stat` file, in ticks.
pub fn stat_ticks(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_stat_ticks(&text)
}

/// utime + stime (fields 14 and 15) of a `/proc/*/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted after its last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ")" comes field 3 (state); utime is field 14, so skip 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Ticks of this process's threads named `courier-shard-*` (an in-process server).
fn shard_ticks() -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(SHARD_THREAD_PREFIX) {
            if let Some(t) = stat_ticks(&entry.path().join("stat")) {
                total = Some(total.unwrap_or(0) + t);
            }
        }
    }
    total
}

/// Where the server's CPU time is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCpu {
    /// Threads `courier-shard-*` of this process, when there are any.
    InProcess,
    /// Another process.
    Pid(u32),
}

/// A reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    process: Option<u64>,
    shards: Option<u64>,
    server_pid: Option<u64>,
}

/// Reads both clocks, as configured.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    server: ServerCpu,
}

impl Meter {
    /// A meter for the server `server`.
    pub fn new(server: ServerCpu) -> Meter {
        Meter { server }
    }

    /// Reads now.
    pub fn sample(&self) -> Sample {
        Sample {
            process: stat_ticks(Path::new("/proc/self/stat")),
            shards: shard_ticks(),
            server_pid: match self.server {
                ServerCpu::Pid(pid) => {
                    stat_ticks(&Path::new("/proc").join(pid.to_string()).join("stat"))
                }
                ServerCpu::InProcess => None,
            },
        }
    }

    /// (generator seconds, server seconds and where they come from) between two samples.
    pub fn between(&self, a: &Sample, b: &Sample) -> (f64, Option<(f64, String)>) {
        let d = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        let process = d(a.process, b.process).unwrap_or(0);
        let shards = d(a.shards, b.shards);
        let generator = process.saturating_sub(shards.unwrap_or(0)) as f64 * SECS_PER_TICK;
        let server = match self.server {
            ServerCpu::Pid(pid) => d(a.server_pid, b.server_pid)
                .map(|t| (t as f64 * SECS_PER_TICK, format!("pid {pid}"))),
            ServerCpu::InProcess => shards.map(|t| {
                (
                    t as f64 * SECS_PER_TICK,
                    "in-process shard threads".to_string(),
                )
            }),
        };
        (generator, server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_ticks(line), Some(280));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert!(stat_ticks(Path::new("/proc/self/stat")).is_some());
    }

    #[test]
    fn burning_cpu_shows_in_the_generator_figure() {
        let m = Meter::new(ServerCpu::InProcess);
        let a = m.sample();
        let ticks = || stat_ticks(Path::new("/proc/self/stat")).unwrap();
        let t0 = ticks();
        // Spin until the kernel has charged 20 ticks (the machine may be shared, so wall
        // time says little), at most 20 s.
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while ticks() < t0 + 20 && wall.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let (generator, _) = m.between(&a, &m.sample());
        assert!(generator >= 0.2, "{generator}");
    }
}
