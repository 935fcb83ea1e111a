//! UDP socket setup and socket addresses in their kernel form.
//!
//! Owns the translation between `SocketAddr` and `sockaddr_in`/`sockaddr_in6`. Decoding
//! reads received address bytes with safe slice code and never trusts a length the
//! kernel did not give; encoding produces a value whose length matches its family.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use courier_pipeline::cid::CID_BYTES;

/// Create a UDP socket bound to `addr` for one shard.
///
/// - `SO_REUSEPORT`, so that one socket per shard shares the port (the kernel spreads
///   flows across them by hash);
/// - `SO_RCVBUF`/`SO_SNDBUF` raised to `rcvbuf`/`sndbuf` bytes, best effort: the
///   `*FORCE` variants first (they need CAP_NET_ADMIN), then the plain ones, which the
///   kernel caps at `net.core.rmem_max`/`wmem_max`; 0 leaves the default;
/// - `IP_PKTINFO` (IPv4) or `IPV6_RECVPKTINFO` (IPv6, plus `IP_PKTINFO` for v4-mapped
///   peers, best effort) so the local address of each datagram is known;
/// - nonblocking and close-on-exec.
pub fn bind_reuseport(addr: SocketAddr, rcvbuf: usize, sndbuf: usize) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let flags = libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // Safety: plain syscall with constant arguments.
    let raw = unsafe { libc::socket(domain, flags, libc::IPPROTO_UDP) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let raw = fd.as_raw_fd();

    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    for (size, force, plain) in [
        (rcvbuf, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (sndbuf, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if size > 0 {
            let size = i32::try_from(size).unwrap_or(i32::MAX);
            // Best effort by design: a small buffer costs drops under load, not correctness.
            if set_int(raw, libc::SOL_SOCKET, force, size).is_err() {
                let _ = set_int(raw, libc::SOL_SOCKET, plain, size);
            }
        }
    }
    if addr.is_ipv4() {
        set_int(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    } else {
        set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // Only matters for v4-mapped peers on a dual-stack socket.
        let _ = set_int(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
    }

    let (name, len) = SockAddrBuf::new(addr);
    // Safety: `name` is a valid sockaddr of `len` bytes for the socket's family.
    let rc = unsafe { libc::bind(raw, name.as_ptr(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UdpSocket::from(fd))
}

/// `SO_ATTACH_REUSEPORT_CBPF` (the asm-generic value, x86-64 and arm64 alike; the libc
/// crate names it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: i32 = 51;

/// The classic BPF program that picks a datagram's socket in the reuseport group by the
/// connection ID courier issued (`cid.rs`: its first byte is the shard): a short-header
/// packet's DCID starts at byte 1; a Handshake packet's (`CID_BYTES`, its length at
/// byte 5) at byte 6. Anything else (Initial and 0-RTT packets carry a DCID the client
/// chose) returns an index past the group, and the kernel falls back to its 4-tuple hash.
/// The program sees the UDP payload from its first byte; a load past the end returns 0.
fn steering_program() -> [libc::sock_filter; 11] {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ldb = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
    [
        /* 0 */ op(ldb, 0, 0, 0),
        // Long header (bit 7 set): to 4.
        /* 1 */
        op(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 2, 0, 0x80),
        /* 2 */ op(ldb, 0, 0, 1),
        /* 3 */ op(libc::BPF_RET | libc::BPF_A, 0, 0, 0),
        // The long header's type (bits 4-5); 2 = Handshake, else to 10.
        /* 4 */
        op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, 0x30),
        /* 5 */ op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 4, 0x20),
        // DCID length courier's own, else to 10.
        /* 6 */ op(ldb, 0, 0, 5),
        /* 7 */
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            2,
            CID_BYTES as u32,
        ),
        /* 8 */ op(ldb, 0, 0, 6),
        /* 9 */ op(libc::BPF_RET | libc::BPF_A, 0, 0, 0),
        /* 10 */ op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ]
}

/// Makes the kernel deliver each datagram of an established connection to the socket of
/// the shard that owns it, by the shard index in courier's connection IDs, instead of by
/// the 4-tuple hash. `socket` is any member of the reuseport group; the group's sockets
/// are indexed in the order they were bound, which must be the shards' order. Datagrams
/// without such an ID (a new connection's Initials) still go by the hash.
pub fn steer_by_connection_id(socket: &UdpSocket) -> io::Result<()> {
    let mut program = steering_program();
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    // Safety: `fprog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setsockopt` with an `int` value.
pub(super) fn set_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // Safety: the option value is a live i32 and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turn on UDP_GRO; false if the kernel refuses.
pub(super) fn enable_gro(fd: RawFd) -> bool {
    set_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// Whether the kernel knows UDP_SEGMENT. Probes by setting the socket's default segment
/// size to 0, which is also the value that leaves plain sends unsegmented.
pub(super) fn gso_supported(fd: RawFd) -> bool {
    set_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

/// A socket address in kernel form, big enough for either family.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) union SockAddrBuf {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl SockAddrBuf {
    /// The kernel form of `addr` and its length.
    pub(super) fn new(addr: SocketAddr) -> (Self, libc::socklen_t) {
        match addr {
            SocketAddr::V4(a) => {
                let v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                (
                    Self { v4 },
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                (
                    Self { v6 },
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    }

    pub(super) fn as_ptr(&self) -> *const libc::sockaddr {
        std::ptr::from_ref(self).cast()
    }

    pub(super) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        std::ptr::from_mut(self).cast()
    }
}

/// Decode the peer address the kernel wrote into a recvmsg name field; `None` for an
/// unknown family or a short name.
pub(super) fn decode(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into())
        }
        libc::AF_INET6 if name.len() >= size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id).into())
        }
        _ => None,
    }
}

// `decode` reads fields at the offsets of the Linux layout.
const _: () = {
    assert!(std::mem::offset_of!(libc::sockaddr_in, sin_port) == 2);
    assert!(std::mem::offset_of!(libc::sockaddr_in, sin_addr) == 4);
    assert!(std::mem::offset_of!(libc::sockaddr_in6, sin6_flowinfo) == 4);
    assert!(std::mem::offset_of!(libc::sockaddr_in6, sin6_addr) == 8);
    assert!(std::mem::offset_of!(libc::sockaddr_in6, sin6_scope_id) == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(buf: &SockAddrBuf, len: libc::socklen_t) -> Vec<u8> {
        // Safety: test-only view of a plain C value of `len` initialized bytes; both
        // union variants are fully initialized by `new` for the family it chose.
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len as usize).to_vec() }
    }

    #[test]
    fn address_round_trips_through_kernel_form() {
        for addr in [
            "127.0.0.1:4433".parse::<SocketAddr>().unwrap(),
            "[::1]:443".parse().unwrap(),
            SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0x12345, 3).into(),
        ] {
            let (buf, len) = SockAddrBuf::new(addr);
            assert_eq!(decode(&bytes_of(&buf, len)), Some(addr));
        }
        assert_eq!(decode(&[0u8; 16]), None, "family 0 is unknown");
        assert_eq!(decode(&[]), None);
    }
}
