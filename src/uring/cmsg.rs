//! Control messages (`cmsghdr` sequences) read from received buffers and written into
//! send slots, in safe slice code.
//!
//! Invariant: parsing never reads past the bytes the kernel reported and always makes
//! progress, so a malformed sequence ends the walk instead of looping; writing never
//! exceeds the buffer it was given (a message that does not fit is refused).

use std::mem::offset_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `sizeof(struct cmsghdr)`, already aligned on Linux.
const HDR_BYTES: usize = size_of::<libc::cmsghdr>();
/// `cmsg_len` is a `size_t`, followed by two ints (the glibc and kernel layout).
const _: () = {
    assert!(offset_of!(libc::cmsghdr, cmsg_len) == 0);
    assert!(offset_of!(libc::cmsghdr, cmsg_level) == size_of::<usize>());
    assert!(offset_of!(libc::cmsghdr, cmsg_type) == size_of::<usize>() + 4);
    assert!(HDR_BYTES == align(HDR_BYTES));
};
const LEVEL_AT: usize = offset_of!(libc::cmsghdr, cmsg_level);
const TYPE_AT: usize = offset_of!(libc::cmsghdr, cmsg_type);

const IN_PKTINFO_BYTES: usize = size_of::<libc::in_pktinfo>();
const IN6_PKTINFO_BYTES: usize = size_of::<libc::in6_pktinfo>();
const IN_PKTINFO_SPEC_DST_AT: usize = offset_of!(libc::in_pktinfo, ipi_spec_dst);
const IN_PKTINFO_ADDR_AT: usize = offset_of!(libc::in_pktinfo, ipi_addr);
const IN6_PKTINFO_ADDR_AT: usize = offset_of!(libc::in6_pktinfo, ipi6_addr);

/// `CMSG_ALIGN`.
const fn align(len: usize) -> usize {
    (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}

/// `CMSG_SPACE`: bytes one message with `data` bytes of payload takes.
pub(super) const fn space(data: usize) -> usize {
    HDR_BYTES + align(data)
}

/// Control bytes a send slot needs: one UDP_SEGMENT and one (IPv6) pktinfo.
pub(super) const SEND_CONTROL_BYTES: usize = space(size_of::<u16>()) + space(IN6_PKTINFO_BYTES);
const _: () = assert!(IN6_PKTINFO_BYTES >= IN_PKTINFO_BYTES);

/// What the receive path wants from a datagram's control messages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecvMeta {
    /// UDP_GRO: size of each coalesced segment.
    pub gro_segment_bytes: Option<usize>,
    /// IP_PKTINFO / IPV6_PKTINFO: the destination address of the datagram. An IPv4
    /// peer of a dual-stack socket can bring both; IP_PKTINFO wins, so the answer does
    /// not depend on message order.
    pub local_ip: Option<IpAddr>,
}

/// Walk the control messages the kernel wrote.
pub(super) fn parse(control: &[u8]) -> RecvMeta {
    let mut meta = RecvMeta::default();
    let mut have_v4 = false;
    let mut at = 0;
    while let Some(hdr) = control.get(at..at + HDR_BYTES) {
        let len = usize::from_ne_bytes(hdr[..size_of::<usize>()].try_into().unwrap());
        let level = i32::from_ne_bytes(hdr[LEVEL_AT..LEVEL_AT + 4].try_into().unwrap());
        let kind = i32::from_ne_bytes(hdr[TYPE_AT..TYPE_AT + 4].try_into().unwrap());
        let Some(data) = control.get(at + HDR_BYTES..at.saturating_add(len)) else {
            break; // shorter than its header or longer than the buffer: malformed
        };
        match (level, kind) {
            (libc::SOL_UDP, libc::UDP_GRO) => {
                if let Some(b) = data.get(..4) {
                    let size = i32::from_ne_bytes(b.try_into().unwrap());
                    meta.gro_segment_bytes = usize::try_from(size).ok().filter(|&s| s > 0);
                }
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                if let Some(b) = data.get(IN_PKTINFO_ADDR_AT..IN_PKTINFO_ADDR_AT + 4) {
                    let ip: [u8; 4] = b.try_into().unwrap();
                    meta.local_ip = Some(Ipv4Addr::from(ip).into());
                    have_v4 = true;
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                if let Some(b) = data.get(IN6_PKTINFO_ADDR_AT..IN6_PKTINFO_ADDR_AT + 16) {
                    let ip: [u8; 16] = b.try_into().unwrap();
                    if !have_v4 {
                        meta.local_ip = Some(Ipv6Addr::from(ip).into());
                    }
                }
            }
            _ => {}
        }
        // `len >= HDR_BYTES > 0` here, so the walk advances.
        at += align(len);
    }
    meta
}

/// Appends control messages to a buffer, as `CMSG_NXTHDR` would lay them out.
pub(super) struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    pub(super) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes written so far (the `msg_controllen` to pass).
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Append one message; false (and nothing written) if it does not fit.
    pub(super) fn push(&mut self, level: i32, kind: i32, data: &[u8]) -> bool {
        let Some(dst) = self.buf.get_mut(self.len..self.len + space(data.len())) else {
            return false;
        };
        dst.fill(0);
        dst[..size_of::<usize>()].copy_from_slice(&(HDR_BYTES + data.len()).to_ne_bytes());
        dst[LEVEL_AT..LEVEL_AT + 4].copy_from_slice(&level.to_ne_bytes());
        dst[TYPE_AT..TYPE_AT + 4].copy_from_slice(&kind.to_ne_bytes());
        dst[HDR_BYTES..HDR_BYTES + data.len()].copy_from_slice(data);
        self.len += dst.len();
        true
    }

    /// UDP_SEGMENT: the kernel splits the payload into datagrams of `segment_bytes`.
    pub(super) fn push_gso(&mut self, segment_bytes: u16) -> bool {
        self.push(
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &segment_bytes.to_ne_bytes(),
        )
    }

    /// IP_PKTINFO / IPV6_PKTINFO: send from `src` (interface chosen by routing).
    pub(super) fn push_src_ip(&mut self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(ip) => {
                let mut info = [0u8; IN_PKTINFO_BYTES];
                info[IN_PKTINFO_SPEC_DST_AT..IN_PKTINFO_SPEC_DST_AT + 4]
                    .copy_from_slice(&ip.octets());
                self.push(libc::IPPROTO_IP, libc::IP_PKTINFO, &info)
            }
            IpAddr::V6(ip) => {
                let mut info = [0u8; IN6_PKTINFO_BYTES];
                info[IN6_PKTINFO_ADDR_AT..IN6_PKTINFO_ADDR_AT + 16].copy_from_slice(&ip.octets());
                self.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_and_pktinfo_round_trip() {
        let mut buf = [0u8; 128];
        let mut w = Writer::new(&mut buf);
        assert!(w.push(libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes()));
        let mut info = [0u8; IN_PKTINFO_BYTES];
        info[IN_PKTINFO_ADDR_AT..IN_PKTINFO_ADDR_AT + 4].copy_from_slice(&[10, 0, 0, 7]);
        assert!(w.push(libc::IPPROTO_IP, libc::IP_PKTINFO, &info));
        let len = w.len();
        assert_eq!(len, space(4) + space(IN_PKTINFO_BYTES));
        let meta = parse(&buf[..len]);
        assert_eq!(meta.gro_segment_bytes, Some(1200));
        assert_eq!(meta.local_ip, Some("10.0.0.7".parse().unwrap()));

        let mut buf = [0u8; SEND_CONTROL_BYTES];
        let mut w = Writer::new(&mut buf);
        assert!(w.push_gso(1200));
        assert!(w.push_src_ip("::1".parse().unwrap()));
        assert_eq!(w.len(), SEND_CONTROL_BYTES, "both messages fit exactly");
        assert!(!w.push_gso(1), "a full buffer refuses more");
        let meta = parse(&buf);
        assert_eq!(meta.local_ip, Some("::1".parse().unwrap()));
    }

    #[test]
    fn ipv4_pktinfo_wins_in_either_order() {
        let mut v4 = [0u8; IN_PKTINFO_BYTES];
        v4[IN_PKTINFO_ADDR_AT..IN_PKTINFO_ADDR_AT + 4].copy_from_slice(&[127, 0, 0, 1]);
        let mut v6 = [0u8; IN6_PKTINFO_BYTES];
        let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        v6[IN6_PKTINFO_ADDR_AT..IN6_PKTINFO_ADDR_AT + 16].copy_from_slice(&mapped);
        for v4_first in [true, false] {
            let mut buf = [0u8; 128];
            let mut w = Writer::new(&mut buf);
            let msgs = [
                (libc::IPPROTO_IP, libc::IP_PKTINFO, &v4[..]),
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &v6[..]),
            ];
            for i in [0, 1] {
                let (level, kind, data) = msgs[if v4_first { i } else { 1 - i }];
                assert!(w.push(level, kind, data));
            }
            let len = w.len();
            assert_eq!(
                parse(&buf[..len]).local_ip,
                Some(Ipv4Addr::LOCALHOST.into())
            );
        }
    }

    #[test]
    fn malformed_sequences_end_the_walk() {
        // cmsg_len 0 would loop forever if the walk trusted it.
        assert_eq!(parse(&[0u8; 64]), RecvMeta::default());
        // cmsg_len beyond the buffer.
        let mut buf = [0u8; 32];
        buf[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse(&buf), RecvMeta::default());
        assert_eq!(parse(&[]), RecvMeta::default());
    }
}
