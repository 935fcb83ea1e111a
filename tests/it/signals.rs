//! `courier::signals::on_terminate`, as `courier serve` uses it: the first SIGTERM runs
//! the graceful stop, a second one during that stop exits at once with status 130.
//!
//! Signals are process-wide, so the test runs itself again as a child process (selected
//! by an environment variable) and signals the child.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "COURIER_TEST_SIGNALS_CHILD";

/// The child: a graceful stop that never finishes, as a shard stuck draining would.
fn child() {
    courier::signals::on_terminate(|| {
        println!("CHILD-STOPPING");
        // The stop hangs; only the second signal can end the process now.
    });
    println!("CHILD-READY");
    // Bounded: the parent signals within seconds; exit 0 here would fail the test.
    std::thread::sleep(Duration::from_secs(60));
}

fn term(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn a_second_sigterm_during_the_stop_forces_exit() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    // This test's name in the test binary: its module path (less the crate) and name.
    let name = format!(
        "{}::a_second_sigterm_during_the_stop_forces_exit",
        module_path!().split_once("::").map_or("", |(_, m)| m)
    );
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    let mut wait_line = |want: &str| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("child ended before {want:?}"))
            .unwrap();
        // libtest may print "test NAME ... " on the same line first.
        if line.contains(want) {
            break;
        }
    };
    wait_line("CHILD-READY");
    term(proc.id());
    wait_line("CHILD-STOPPING");
    assert!(
        proc.try_wait().unwrap().is_none(),
        "the first signal only starts the stop"
    );
    term(proc.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = proc.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a second signal must end the process"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{status}");
}
