//! `courier serve` turns transparent huge pages off for its process unless its profile
//! allows them (`io.transparent_huge_pages`), as the kernel reports it in
//! `/proc/PID/status` (`THP_enabled`). Either way the flag is set, not inherited: the
//! test process itself may have it off (an in-process server sets it).

use std::path::Path;
use std::time::Duration;

use courier_testkit::spawn::{Files, Serve};

const MASTER_HEX: &str = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";

/// The `THP_enabled` line of a process's status: 1 allowed, 0 off.
fn thp_enabled(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)");
    line.trim().parse().unwrap()
}

/// Starts `courier serve` (tuning/small.toml, which leaves the key at false) with `env`,
/// reads its flag once it serves, and stops it.
fn flag_of_server(dir: &Path, env: &[(&str, &str)]) -> u32 {
    std::fs::create_dir_all(dir).unwrap();
    let files = Files::new(dir, MASTER_HEX);
    let mut serve = Serve::new(
        super::courier_bin(),
        &files,
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("serve.log"),
    );
    for (k, v) in env {
        serve = serve.env(k, v);
    }
    let mut server = serve.spawn();
    let flag = thp_enabled(server.child.id());
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    flag
}

#[test]
fn serve_turns_transparent_huge_pages_off_unless_the_profile_allows_them() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(flag_of_server(&dir.path().join("off"), &[]), 0);
    let on = [("COURIER_IO__TRANSPARENT_HUGE_PAGES", "true")];
    // Spawned from a process with the flag off, so that "allowed" cannot be inherited.
    rustix::thread::disable_transparent_huge_pages(true).unwrap();
    assert_eq!(flag_of_server(&dir.path().join("on"), &on), 1);
}
