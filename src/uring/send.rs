//! Send slots: the fixed set of buffers that sendmsg operations read from.
//!
//! Each slot holds the payload and everything its `msghdr` points at (iovec, peer
//! address, control messages), at an address that never moves (`Box<[SendSlot]>`).
//!
//! Invariant: a slot is either free (on the free list; userspace may write it through a
//! [`SendBuf`]) or in flight (its SQE was queued; nothing in userspace touches it until
//! its completion is reaped). Every queued slot gets exactly one completion, errors and
//! cancellations included, so no slot is ever lost.

use std::ops::{Deref, DerefMut};

use super::cmsg::SEND_CONTROL_BYTES;
use super::socket::SockAddrBuf;
use super::udp::UdpRing;
use super::RingStats;

/// Control message space of one slot, aligned as `cmsghdr` requires.
#[repr(C, align(8))]
pub(super) struct ControlBuf(pub(super) [u8; SEND_CONTROL_BYTES]);

pub(super) struct SendSlot {
    pub(super) data: Vec<u8>,
    pub(super) iov: libc::iovec,
    pub(super) hdr: libc::msghdr,
    pub(super) name: SockAddrBuf,
    pub(super) control: ControlBuf,
    /// Datagrams this send carries (1 without GSO).
    pub(super) segments: usize,
    pub(super) in_flight: bool,
}

pub(super) struct SendSlots {
    pub(super) slots: Box<[SendSlot]>,
    /// Free slot indices; bounded by `slots.len()`.
    pub(super) free: Vec<u16>,
    pub(super) slot_bytes: usize,
}

impl SendSlots {
    pub(super) fn new(count: u16, slot_bytes: u32) -> Self {
        let slot_bytes = slot_bytes as usize;
        let slots = (0..count)
            .map(|_| SendSlot {
                data: Vec::with_capacity(slot_bytes),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                // Safety: msghdr is a plain C struct; all zeroes is an empty header
                // (null pointers, zero lengths).
                hdr: unsafe { std::mem::zeroed() },
                name: SockAddrBuf::new(std::net::SocketAddr::from(([0, 0, 0, 0], 0))).0,
                control: ControlBuf([0; SEND_CONTROL_BYTES]),
                segments: 0,
                in_flight: false,
            })
            .collect();
        // Reversed so that slot 0 is handed out first.
        let free = (0..count).rev().collect();
        Self {
            slots,
            free,
            slot_bytes,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Mark slot `idx` free again after its completion; returns its segment count.
    pub(super) fn complete(&mut self, idx: u16) -> usize {
        assert!(self.free.len() < self.slots.len());
        let slot = &mut self.slots[usize::from(idx)];
        assert!(
            slot.in_flight,
            "completion for send slot {idx} that was not in flight"
        );
        slot.in_flight = false;
        self.free.push(idx);
        slot.segments
    }
}

/// A free send buffer, borrowed from a [`UdpRing`].
///
/// Derefs to a `Vec<u8>` that starts empty with capacity `send_slot_bytes`; append the
/// datagram(s) and call [`SendBuf::submit`]. Dropping it without submitting leaves the
/// slot free. Holding more than `send_slot_bytes` at submit is a bug and panics.
pub struct SendBuf<'a> {
    pub(super) ring: &'a mut UdpRing,
    pub(super) slot: u16,
}

impl SendBuf<'_> {
    /// Queue one sendmsg of the buffer to `dest`; it reaches the kernel with the next
    /// [`UdpRing::wait`].
    ///
    /// - `src_ip`: send from this local address (IP_PKTINFO / IPV6_PKTINFO), e.g. the
    ///   `local_ip` the peer's datagrams arrived on.
    /// - `segment_size`: when `Some(s)` and the buffer is longer than `s`, the kernel
    ///   splits it into datagrams of `s` bytes (the last may be shorter) with GSO. The
    ///   caller must keep the count within [`UdpRing::max_gso_segments`]; a batch that
    ///   meets GSO disabled meanwhile is dropped and counted (QUIC retransmits).
    pub fn submit(
        self,
        dest: std::net::SocketAddr,
        src_ip: Option<std::net::IpAddr>,
        segment_size: Option<usize>,
    ) {
        self.ring.queue_send(self.slot, dest, src_ip, segment_size);
    }
}

impl Deref for SendBuf<'_> {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.ring.send_slots().slots[usize::from(self.slot)].data
    }
}

impl DerefMut for SendBuf<'_> {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.ring.send_slots_mut().slots[usize::from(self.slot)].data
    }
}

impl std::fmt::Debug for SendBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBuf")
            .field("slot", &self.slot)
            .field("len", &self.len())
            .finish()
    }
}

/// One sendmsg completion: free the slot, count, and turn GSO off on the errors that
/// mean the device cannot do it (quinn-udp does the same).
pub(super) fn on_send(
    send: &mut SendSlots,
    stats: &mut RingStats,
    gso_max: &mut usize,
    ud: u64,
    res: i32,
) {
    let segments = send.complete((ud & 0xffff) as u16);
    if res >= 0 {
        stats.sends_ok += 1;
        stats.datagrams_sent += segments as u64;
        stats.bytes_sent += res as u64;
        return;
    }
    stats.send_errors += 1;
    let errno = -res;
    if segments > 1 && matches!(errno, libc::EIO | libc::EINVAL) && *gso_max > 1 {
        tracing::info!(errno, "GSO send failed; disabling segmentation offload");
        *gso_max = 1;
        stats.gso_disabled = true;
    }
}
