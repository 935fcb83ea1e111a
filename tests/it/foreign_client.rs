//! A QUIC client written by someone else (issue 18): Python's aioquic, running
//! `tests/aioquic/client.py` against a real server, sends garbage, an oversized frame,
//! frames before HELLO and a good SUBMIT, and knocks on a full connection table. It must
//! meet the codes the README and `pipeline/src/wire/mod.rs` document, while the project's
//! own (quinn) client, connected alongside, keeps having its messages accepted.
//!
//! aioquic comes from PyPI, installed by the test set-up itself: `COURIER_PYTHON` names a
//! Python that has it (`.ci/run` sets it); otherwise the first of these tests creates a
//! virtual environment, `target/aioquic-venv` (under `CARGO_TARGET_DIR` when set), and
//! installs `aioquic==1.7.2` into it (the user's site when Python has no venv). When that fails (no network to the registry, no
//! Python) the test fails and says how to install it; `COURIER_SKIP_AIOQUIC=1` skips it
//! explicitly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::serve::Running;
use courier_client::{Client, OutgoingMessage};
use courier_pipeline::registry::Registry;
use courier_pipeline::wire::{code, Recipient, Status};
use courier_testkit::server::{self, client_config, Setup};

/// QUIC's transport error CONNECTION_REFUSED (RFC 9000, 20.1).
const QUIC_CONNECTION_REFUSED: u64 = 0x02;
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aioquic/client.py");

/// The aioquic release the tests run against.
const AIOQUIC: &str = "aioquic==1.7.2";

fn imports_aioquic(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import aioquic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The test set-up's virtual environment with aioquic, created and filled from PyPI on
/// first use (once per test binary: both tests wait for the one set-up).
fn venv_python() -> Result<std::path::PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let venv = target.join("aioquic-venv");
    let python = venv.join("bin/python");
    if imports_aioquic(&python) {
        return Ok(python);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let in_venv = run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).and_then(|()| {
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", AIOQUIC]))
    });
    if in_venv.is_ok() && imports_aioquic(&python) {
        return Ok(python);
    }
    // A Python without venv (Debian's without python3-venv): the user's site instead.
    let system = Path::new("python3");
    run(Command::new(system).args(["-m", "pip", "install", "--quiet", "--user", AIOQUIC]))
        .map_err(|e| format!("{}; then {e}", in_venv.err().unwrap_or_default()))?;
    if imports_aioquic(system) {
        Ok(system.to_path_buf())
    } else {
        Err(format!("{AIOQUIC} installed but not importable"))
    }
}

/// The Python that has aioquic, or `None` when the test is skipped on purpose.
fn python() -> Option<String> {
    static SETUP: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    let found = SETUP.get_or_init(|| match std::env::var("COURIER_PYTHON") {
        Ok(p) if imports_aioquic(Path::new(&p)) => Ok(p),
        Ok(p) => Err(format!("COURIER_PYTHON={p} cannot import aioquic")),
        Err(_) => venv_python().map(|p| p.display().to_string()),
    });
    match found {
        Ok(python) => Some(python.clone()),
        Err(_) if std::env::var("COURIER_SKIP_AIOQUIC").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: aioquic is not available and COURIER_SKIP_AIOQUIC=1");
            None
        }
        Err(why) => panic!(
            "aioquic is not available: {why}\nInstall it as the test set-up does:\n  \
             python3 -m venv target/aioquic-venv && target/aioquic-venv/bin/pip install {AIOQUIC}\n\
             or set COURIER_SKIP_AIOQUIC=1 to skip this test."
        ),
    }
}

/// Runs the aioquic client's scenarios against `running`; one JSON object per scenario.
fn aioquic(
    python: &str,
    running: &Running,
    token: &str,
    scenarios: &[&str],
) -> Vec<serde_json::Value> {
    let addr = running.local_addr();
    let mut child = Command::new(python)
        .arg(CLIENT)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(token)
        .args(scenarios)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the Python client starts");
    // Each scenario waits at most 40 s in the client; bound the whole run here too.
    let deadline = Instant::now() + Duration::from_secs(60 * scenarios.len() as u64);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the aioquic client did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "aioquic client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), scenarios.len(), "{stdout}");
    for (line, name) in lines.iter().zip(scenarios) {
        assert_eq!(line["scenario"], *name, "{stdout}");
        assert!(
            line.get("error").is_none(),
            "{name}: {line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lines
}

fn start(dir: &Path, connections_per_shard_max: u32) -> (Running, String) {
    let mut registry = Registry::default();
    let token = server::add_exempt(&mut registry, "foreign client test", &[21u8; 32]);
    let mut setup = Setup::new(1, registry);
    setup.profile.limits.connections_per_shard_max = connections_per_shard_max;
    setup.profile.limits.hello_timeout_ms = 1000;
    setup.profile.delivery.enabled = false;
    (server::start(dir, setup), token)
}

fn batch(first: u64) -> Vec<OutgoingMessage> {
    (first..first + 8)
        .map(|i| OutgoingMessage {
            client_id: i,
            recipient: Recipient::parse(format!("+4477{:08}", 20_000_000 + i).as_bytes()).unwrap(),
            payload: Bytes::from_static(b"quinn alongside"),
        })
        .collect()
}

async fn all_accepted(client: &Client, first: u64) {
    let statuses = client.submit(batch(first)).await.unwrap();
    assert_eq!(statuses.len(), 8);
    assert!(
        statuses.iter().all(|s| matches!(s, Status::Accepted(_))),
        "{statuses:?}"
    );
}

fn stream_code(line: &serde_json::Value) -> u64 {
    let s = &line["stream"];
    s.get("stop_sending")
        .or_else(|| s.get("reset"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no stream code: {line}"))
}

fn accepted_ack(line: &serde_json::Value) {
    let statuses = line["ack"]["statuses"]
        .as_array()
        .unwrap_or_else(|| panic!("no ACK: {line}"));
    assert_eq!(statuses.len(), 1, "{line}");
    assert_eq!(statuses[0], 0, "status byte 0 is accepted: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_misbehaving_meets_the_documented_codes_and_disturbs_no_one() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (running, token) = start(&dir.path().join("data"), 64);
    let quinn = Client::connect(&client_config(&running, &token, 2, 2))
        .await
        .unwrap();
    all_accepted(&quinn, 0).await;

    let scenarios = [
        "submit",
        "garbage",
        "oversized",
        "before_hello",
        "oversized_hello",
    ];
    let lines = {
        let python = python.clone();
        let token = token.clone();
        let r = &running;
        // The client runs for seconds; the quinn client's task keeps running meanwhile.
        tokio::task::block_in_place(|| aioquic(&python, r, &token, &scenarios))
    };
    for l in &lines {
        assert_eq!(l["handshake"], "completed", "{l}");
    }
    // A good SUBMIT after HELLO: one ACK, the message accepted.
    accepted_ack(&lines[0]);
    // Garbage (an unknown frame type) closes its stream only: the next SUBMIT is acked.
    assert_eq!(stream_code(&lines[1]), u64::from(code::UNKNOWN_FRAME_TYPE));
    accepted_ack(&lines[1]);
    // A header announcing more than WELCOME's frame bound: that stream only.
    assert_eq!(stream_code(&lines[2]), u64::from(code::FRAME_TOO_LARGE));
    accepted_ack(&lines[2]);
    // SUBMIT before HELLO: its stream fails, and the connection is closed at the HELLO
    // deadline with the application code HELLO_TIMEOUT.
    assert_eq!(stream_code(&lines[3]), u64::from(code::NOT_AUTHENTICATED));
    assert_eq!(
        lines[3]["then"]["close"],
        serde_json::json!({"code": code::HELLO_TIMEOUT, "transport": false}),
        "{}",
        lines[3]
    );
    // Before HELLO, a frame longer than any HELLO is too large.
    assert_eq!(stream_code(&lines[4]), u64::from(code::FRAME_TOO_LARGE));

    // The quinn client alongside was never disturbed.
    all_accepted(&quinn, 100).await;
    quinn.close().await;
    running.shutdown();
    running.join().unwrap();
}

/// What a full connection table answers, as a foreign client sees it: the QUIC transport
/// close CONNECTION_REFUSED (0x02) in answer to the Initial, before any TLS work, not the
/// application code 0x03 (an application close cannot travel in an Initial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_table_refuses_aioquic_with_the_transport_close() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (running, token) = start(&dir.path().join("data"), 1);
    let quinn = Client::connect(&client_config(&running, &token, 1, 2))
        .await
        .unwrap();
    all_accepted(&quinn, 0).await;
    let lines = {
        let r = &running;
        tokio::task::block_in_place(|| aioquic(&python, r, &token, &["submit"]))
    };
    assert_eq!(
        lines[0]["handshake"]["close"],
        serde_json::json!({"code": QUIC_CONNECTION_REFUSED, "transport": true}),
        "{}",
        lines[0]
    );
    all_accepted(&quinn, 100).await;
    quinn.close().await;
    running.shutdown();
    let stats = running.join().unwrap();
    let refused: u64 = stats.iter().map(|s| s.connections_refused).sum();
    assert!(refused >= 1, "counted as refused");
}
