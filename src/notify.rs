//! sd_notify(3) readiness for systemd `Type=notify` units, without libsystemd: when
//! `NOTIFY_SOCKET` is set, `courier serve` sends `READY=1` once every shard is listening
//! and `STOPPING=1` when a graceful stop begins.
//!
//! The protocol is one datagram per state change on a Unix datagram socket named by
//! `NOTIFY_SOCKET`: an absolute path, or an abstract name written with a leading `@`.
//! Sending is best effort: a failure is logged and the server carries on (systemd then
//! reports the unit as failing to start, which is where an operator looks).
//!
//! Why not the `sd-notify` crate: its releases 0.4.5 and 0.5.0 (read for issue 13) both
//! `connect` to the value of `NOTIFY_SOCKET` as a file path, so an abstract socket
//! (`@name`, which systemd hands to services in containers and `tests/sd_notify.rs`
//! covers) fails with ENOENT. The standard library has what the abstract namespace needs
//! (`SocketAddrExt::from_abstract_name`), so these few lines stay; they also never touch
//! the environment (the crate's `*_and_unset_env` calls `env::remove_var`, which is not
//! sound while other threads run, as the shards do by then).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(std::path::PathBuf),
    /// A name in the abstract namespace (the value without its leading `@`).
    Abstract(Vec<u8>),
}

/// Why a `NOTIFY_SOCKET` value is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// Neither an absolute path nor `@name` (systemd's `vsock:` form is not supported).
    #[error("NOTIFY_SOCKET={0:?}: expected an absolute path or @abstract-name")]
    Unsupported(String),
}

impl NotifyTarget {
    /// Reads a `NOTIFY_SOCKET` value.
    pub fn parse(value: &str) -> Result<NotifyTarget, NotifyError> {
        if let Some(name) = value.strip_prefix('@') {
            if !name.is_empty() {
                return Ok(NotifyTarget::Abstract(name.as_bytes().to_vec()));
            }
        } else if value.starts_with('/') {
            return Ok(NotifyTarget::Path(value.into()));
        }
        Err(NotifyError::Unsupported(value.to_string()))
    }

    fn address(&self) -> std::io::Result<SocketAddr> {
        match self {
            NotifyTarget::Path(p) => SocketAddr::from_pathname(p),
            NotifyTarget::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
    }
}

/// A handle that sends state changes to the service manager; does nothing when the
/// process was not started with `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(NotifyTarget, UnixDatagram)>,
}

impl Notifier {
    /// From the process environment. An unusable `NOTIFY_SOCKET` is logged and ignored.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        let value = value.to_string_lossy();
        let target = match NotifyTarget::parse(&value) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "not notifying the service manager");
                return Notifier { target: None };
            }
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Notifier {
                target: Some((target, socket)),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the sd_notify socket");
                Notifier { target: None }
            }
        }
    }

    /// Whether `NOTIFY_SOCKET` named a usable socket.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (e.g. `READY=1`) if enabled; a failure is logged.
    pub fn notify(&self, state: &str) {
        let Some((target, socket)) = &self.target else {
            return;
        };
        let sent = target
            .address()
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr));
        match sent {
            Ok(_) => tracing::debug!(state, "notified the service manager"),
            Err(e) => tracing::warn!(state, error = %e, ?target, "sd_notify failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_values_parse() {
        assert_eq!(
            NotifyTarget::parse("/run/systemd/notify"),
            Ok(NotifyTarget::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyTarget::parse("@courier/notify"),
            Ok(NotifyTarget::Abstract(b"courier/notify".to_vec()))
        );
        for bad in ["", "@", "relative/path", "vsock:2:9999"] {
            let e = NotifyTarget::parse(bad).unwrap_err();
            assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
        }
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("courier-notify-unit-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let n = Notifier {
            target: Some((
                NotifyTarget::Abstract(name.into_bytes()),
                UnixDatagram::unbound().unwrap(),
            )),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}
