//! `courier serve` as a child process, the way an operator runs it: its files under one
//! directory, flags, a log file, waiting until it serves, SIGTERM and the exit status.
//!
//! ```text
//! Files::new(dir, key) ──> Serve::new(bin, &files, addr) [.log_level .env .stdout]
//!     ──spawn()──> Spawned (waits for "courier serving" in its log)
//!     ──terminate()──> SIGTERM ──wait_exit(timeout)──> ExitStatus
//! ```
//!
//! The binary's path comes from the test (`env!("CARGO_BIN_EXE_courier")` exists only in
//! the root package's tests). Every wait has a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::logkit::wait_for;

/// How long a spawned server may take to say it serves (recovery included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A free UDP port on loopback (bound and released; a later bind may race, which tests
/// accept).
pub fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a loopback port");
    s.local_addr().expect("bound")
}

/// The files of one spawned server: data directory, registry and master key file.
#[derive(Debug, Clone)]
pub struct Files {
    /// `DIR/data`.
    pub data: PathBuf,
    /// `DIR/registry.toml`.
    pub registry: PathBuf,
    /// `DIR/master.key`, written by [`Files::new`].
    pub key_file: PathBuf,
}

impl Files {
    /// The files under `dir`; writes the master key file (64 hex characters).
    pub fn new(dir: &Path, master_hex: &str) -> Files {
        let key_file = dir.join("master.key");
        crate::write_secret(&key_file, format!("{master_hex}\n"));
        Files {
            data: dir.join("data"),
            registry: dir.join("registry.toml"),
            key_file,
        }
    }
}

/// Runs `courier businesses add --name NAME EXTRA.. --registry REGISTRY` and returns the
/// token it printed.
pub fn add_business(bin: &Path, registry: &Path, name: &str, extra: &[&str]) -> String {
    let out = Command::new(bin)
        .args(["businesses", "add", "--name", name])
        .args(extra)
        .arg("--registry")
        .arg(registry)
        .output()
        .expect("courier runs");
    assert!(
        out.status.success(),
        "businesses add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a token is ASCII")
        .trim()
        .to_string()
}

/// A `courier serve` command, ready to spawn.
#[derive(Debug)]
pub struct Serve {
    cmd: Command,
    log: PathBuf,
}

impl Serve {
    /// `courier serve --profile tuning/small.toml --listen ADDR --data-dir --registry
    /// --master-key-file` with `COURIER_LOG=info`, stdin and stdout closed, stderr to
    /// `log`. The command runs in the workspace root (where `tuning/` is).
    pub fn new(bin: &Path, files: &Files, addr: SocketAddr, log: &Path) -> Serve {
        Serve::with_profile(bin, files, addr, log, Path::new("tuning/small.toml"))
    }

    /// [`Serve::new`] with another profile (a relative path is taken from the workspace
    /// root).
    pub fn with_profile(
        bin: &Path,
        files: &Files,
        addr: SocketAddr,
        log: &Path,
        profile: &Path,
    ) -> Serve {
        let mut cmd = Command::new(bin);
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["serve", "--profile"])
            .arg(profile)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&files.data)
            .arg("--registry")
            .arg(&files.registry)
            .arg("--master-key-file")
            .arg(&files.key_file)
            .env("COURIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Serve {
            cmd,
            log: log.to_path_buf(),
        }
    }

    /// Sets an environment variable of the server (`COURIER_LOG`, `NOTIFY_SOCKET`, ...).
    pub fn env(mut self, key: &str, value: &str) -> Serve {
        self.cmd.env(key, value);
        self
    }

    /// Adds command-line arguments (`--region NAME`, ...).
    pub fn args(mut self, args: &[&str]) -> Serve {
        self.cmd.args(args);
        self
    }

    /// Sends the server's stdout to `path` instead of nowhere.
    pub fn stdout_to(mut self, path: &Path) -> Serve {
        self.cmd
            .stdout(std::fs::File::create(path).expect("creating the stdout file"));
        self
    }

    /// Starts the server without waiting for it.
    pub fn spawn_unready(mut self) -> Spawned {
        let stderr = std::fs::File::create(&self.log).expect("creating the log file");
        let child = self
            .cmd
            .stderr(stderr)
            .spawn()
            .expect("courier serve starts");
        Spawned {
            child,
            log: self.log,
        }
    }

    /// Starts the server and waits (at most [`READY_TIMEOUT`]) until it logs that it
    /// serves; panics, showing its log, if it does not.
    pub fn spawn(self) -> Spawned {
        let spawned = self.spawn_unready();
        assert!(
            wait_for(
                &spawned.log,
                "courier serving",
                Instant::now() + READY_TIMEOUT
            ),
            "server did not start: {}",
            spawned.log_text()
        );
        spawned
    }
}

/// A running `courier serve`.
#[derive(Debug)]
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
}

impl Spawned {
    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (the graceful stop).
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_exit(&mut self.child, timeout)
    }
}

/// Sends SIGTERM to `child`.
pub fn terminate(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(ok.success(), "kill -TERM failed");
}

/// Waits at most `timeout` for `child` to exit; panics past it.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
