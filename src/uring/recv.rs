//! What happens to one multishot recvmsg completion: parse the buffer the kernel
//! filled (header, peer address, control messages, payload), hand the payload to the
//! caller, give the buffer back.
//!
//! Invariant: every buffer a completion names goes back to the buffer ring exactly once,
//! right after the callback returns, whether or not its content could be delivered; a
//! payload that is not delivered is counted in [`RingStats`].

use std::io;

use io_uring::{cqueue, types};

use super::buf_ring::BufRing;
use super::{cmsg, socket, RingEvent, RingStats};

/// Errors of multishot recvmsg that re-arming cannot fix.
const RECV_FATAL_ERRNOS: [i32; 5] = [
    libc::EINVAL,
    libc::EBADF,
    libc::ENOTSOCK,
    libc::EOPNOTSUPP,
    libc::EFAULT,
];

/// One multishot recvmsg completion; returns an error re-arming cannot fix.
pub(super) fn on_recv(
    buf_ring: &mut BufRing,
    recv_hdr: &libc::msghdr,
    stats: &mut RingStats,
    recv_armed: &mut bool,
    cqe: &cqueue::Entry,
    f: &mut impl FnMut(RingEvent<'_>),
) -> Option<io::Error> {
    let (res, flags) = (cqe.result(), cqe.flags());
    if !cqueue::more(flags) {
        *recv_armed = false;
    }
    if res < 0 {
        match -res {
            libc::ENOBUFS => stats.recv_enobufs += 1,
            libc::ECANCELED => {}
            errno => {
                stats.recv_errors += 1;
                if RECV_FATAL_ERRNOS.contains(&errno) {
                    return Some(io::Error::from_raw_os_error(errno));
                }
            }
        }
        return None;
    }
    let bid = cqueue::buffer_select(flags).expect("a successful recvmsg names its buffer");
    let buf = buf_ring.held(bid, res as usize);
    deliver(buf, recv_hdr, stats, f);
    buf_ring.push(bid);
    None
}

/// Parse one received buffer and hand its payload to `f`.
fn deliver(
    buf: &[u8],
    hdr: &libc::msghdr,
    stats: &mut RingStats,
    f: &mut impl FnMut(RingEvent<'_>),
) {
    let Ok(out) = types::RecvMsgOut::parse(buf, hdr) else {
        stats.recv_malformed += 1;
        return;
    };
    let Some(from) = socket::decode(out.name_data()) else {
        stats.recv_malformed += 1;
        return;
    };
    let meta = cmsg::parse(out.control_data());
    let mut data = out.payload_data();
    if out.is_payload_truncated() {
        // The datagram cut by the buffer end is lost; whole GRO segments before it are
        // intact.
        stats.recv_truncated += 1;
        let whole = meta.gro_segment_bytes.map_or(0, |s| data.len() / s * s);
        data = &data[..whole];
        if data.is_empty() {
            return;
        }
    }
    let segment_size = meta.gro_segment_bytes.filter(|&s| data.len() > s);
    stats.datagrams_received += segment_size.map_or(1, |s| data.len().div_ceil(s)) as u64;
    stats.bytes_received += data.len() as u64;
    f(RingEvent::Recv {
        data,
        segment_size,
        from,
        local_ip: meta.local_ip,
    });
}
