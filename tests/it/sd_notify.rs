//! `courier serve` under a service manager: with `NOTIFY_SOCKET` set it sends `READY=1`
//! once every shard listens and `STOPPING=1` when SIGTERM starts the graceful stop, to a
//! socket file or an abstract socket (`@name`), and still exits 0.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use courier_testkit::spawn::{Files, Serve, Spawned};

const MASTER_HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// Starts `courier serve` on a loopback port with `NOTIFY_SOCKET=notify_socket`; READY=1
/// says when it serves.
fn serve(dir: &Path, notify_socket: &str) -> Spawned {
    let files = Files::new(dir, MASTER_HEX);
    let log = dir.join("serve.log");
    Serve::new(
        super::courier_bin(),
        &files,
        "127.0.0.1:0".parse().unwrap(),
        &log,
    )
    .env("NOTIFY_SOCKET", notify_socket)
    .env("COURIER_LOG", "warn")
    .spawn_unready()
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the read timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// READY=1, then SIGTERM, then STOPPING=1 and exit status 0.
fn ready_then_stopping(socket: &UnixDatagram, server: &mut Spawned) {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ready = recv(socket);
    assert_eq!(ready, "READY=1");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "serving after READY"
    );
    server.terminate();
    assert_eq!(recv(socket), "STOPPING=1");
    let status = server.wait_exit(Duration::from_secs(30));
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
    let mut server = serve(dir.path(), path.to_str().unwrap());
    ready_then_stopping(&socket, &mut server);
}

#[test]
fn serve_notifies_an_abstract_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("courier-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let mut server = serve(dir.path(), &format!("@{name}"));
    ready_then_stopping(&socket, &mut server);
}
