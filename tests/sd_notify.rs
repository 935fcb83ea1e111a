//! `courier serve` under a service manager: with `NOTIFY_SOCKET` set it sends `READY=1`
//! once every shard listens and `STOPPING=1` when SIGTERM starts the graceful stop, to a
//! socket file or an abstract socket (`@name`), and still exits 0.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MASTER_HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// Starts `courier serve` on a loopback port with `NOTIFY_SOCKET=notify_socket`.
fn serve(dir: &Path, notify_socket: &str) -> Child {
    let key_file = dir.join("master.key");
    std::fs::write(&key_file, format!("{MASTER_HEX}\n")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "serve",
            "--profile",
            "tuning/small.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(&key_file)
        .env("NOTIFY_SOCKET", notify_socket)
        .env("COURIER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap()
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the read timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// READY=1, then SIGTERM, then STOPPING=1 and exit status 0.
fn ready_then_stopping(socket: &UnixDatagram, child: &mut Child) {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ready = recv(socket);
    assert_eq!(ready, "READY=1");
    assert!(child.try_wait().unwrap().is_none(), "serving after READY");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(recv(socket), "STOPPING=1");
    let status = wait_exit(child);
    assert!(status.success(), "exit status {status}");
    // Nothing more was sent.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(socket.recv(&mut buf).is_err(), "exactly two notifications");
}

#[test]
fn serve_notifies_ready_and_stopping_on_a_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut child = serve(dir.path(), path.to_str().unwrap());
    ready_then_stopping(&socket, &mut child);
}

#[test]
fn serve_notifies_an_abstract_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("courier-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let mut child = serve(dir.path(), &format!("@{name}"));
    ready_then_stopping(&socket, &mut child);
}
