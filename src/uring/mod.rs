//! The io_uring driver of one shard: the only place in courier that holds `unsafe`.
//!
//! One [`UdpRing`] per core owns a UDP socket (bound with [`bind_reuseport`], so every
//! shard shares the port), an io_uring, a provided-buffer ring for receives, a fixed set
//! of send slots and an eventfd that other threads poke through a [`Waker`]:
//!
//! ```text
//!             kernel                          UdpRing (one shard thread)
//!  UDP socket --multishot recvmsg--> provided buffer bid --drain()--> RingEvent::Recv --> f()
//!      ^                                  ^                                               |
//!      |                                  +---------- buffer returned after f() <--------+
//!      +---- sendmsg (+UDP_SEGMENT) <---- send slot <-- SendBuf::submit() <-- caller (quinn)
//!  eventfd <-- Waker::wake() (any thread)     read completes --drain()--> RingEvent::Wake
//!  wait(deadline) timeout ------------------------------------drain()--> RingEvent::Timer
//! ```
//!
//! The loop of a shard is `wait(deadline)` then `drain(f)`, then fill send buffers.
//!
//! Invariants kept here:
//! - Memory handed to the kernel (buffer ring, receive buffers, the recvmsg template, the
//!   eventfd read buffer, send slots) is owned by the ring until the completion of every
//!   operation that uses it has been reaped, cancelled operations included. On drop the
//!   ring cancels and waits (bounded); if the kernel still holds something it leaks that
//!   memory instead of freeing it.
//! - Every queue is bounded by [`RingConfig`]: the submission queue holds at most one
//!   entry per possible operation (checked when the config is validated), and the
//!   completion queue is sized so that it cannot overflow between two drains.
//! - A failure never goes unnoticed: dropped, truncated or failed datagrams are counted
//!   in [`RingStats`].
//!
//! Files: `udp` (the ring: setup, wait, drain, drop), `recv` (one received buffer),
//! `send` (send slots), `buf_ring` (provided buffers), `cmsg` (control messages),
//! `socket` (socket options and addresses), `waker` (the eventfd handle), `thread`
//! (CPU pinning).

mod buf_ring;
mod cmsg;
mod file;
mod recv;
mod send;
mod socket;
mod thread;
mod udp;
mod waker;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, SocketAddr};

use courier_pipeline::profile as io_bounds;
use courier_pipeline::server::MTU_MIN;

pub use file::{FileDone, FileOpKind};
pub use send::SendBuf;
pub use socket::{bind_reuseport, steer_by_connection_id};
pub use thread::{available_cpus, pin_current_thread};
pub use udp::UdpRing;
pub use waker::Waker;

// The ring's bounds are the profile's `[io]` bounds (courier_pipeline::profile::io), so
// that a profile is refused when it loads rather than when a shard starts; they are
// restated here in the ring's own types.

/// The kernel's largest io_uring submission queue (`IORING_MAX_ENTRIES`).
pub const SQ_ENTRIES_MAX: u32 = io_bounds::RING_ENTRIES_MAX;
/// The kernel's largest provided-buffer ring.
pub const RECV_BUFFERS_MAX: u16 = io_bounds::RECV_BUFFERS_MAX as u16;
/// Upper bound on the memory of all receive buffers of one ring.
pub const RECV_MEMORY_BYTES_MAX: u64 = io_bounds::RECV_MEMORY_BYTES_MAX;
/// Upper bound on the number of send slots of one ring.
pub const SEND_SLOTS_MAX: u16 = io_bounds::SEND_SLOTS_MAX as u16;
/// Smallest send slot: one QUIC datagram of the minimum size (RFC 9000, 14.1).
pub const SEND_SLOT_BYTES_MIN: u32 = MTU_MIN as u32;
/// Largest send slot: one UDP payload can never exceed 64 KiB, GSO batches included.
pub const SEND_SLOT_BYTES_MAX: u32 = io_bounds::SEND_SLOT_BYTES;
/// The kernel's `UDP_MAX_SEGMENTS` (64 on every kernel that has GSO; quinn-udp uses the same).
pub const GSO_SEGMENTS_MAX: usize = 64;

/// Space reserved at the start of every provided buffer by multishot recvmsg: the
/// `io_uring_recvmsg_out` header, the peer address and the control messages.
pub const RECV_HEADER_BYTES: u32 =
    (udp::RECVMSG_OUT_BYTES + udp::RECV_NAME_BYTES + udp::RECV_CONTROL_BYTES) as u32;
/// Smallest provided buffer: the header plus one QUIC datagram of the minimum size.
pub const RECV_BUFFER_BYTES_MIN: u32 = RECV_HEADER_BYTES + MTU_MIN as u32;
/// Largest provided buffer.
pub const RECV_BUFFER_BYTES_MAX: u32 = io_bounds::RECV_BUFFER_BYTES_MAX;

/// Submission entries kept for operations other than sends: the multishot recvmsg, the
/// eventfd read and one cancel for each of them (used on drop).
const SQ_RESERVED_ENTRIES: u32 = io_bounds::SQ_RESERVED_ENTRIES;

// The profile's bounds fit the ring's types.
const _: () = assert!(io_bounds::RECV_BUFFERS_MAX <= u16::MAX as u32);
const _: () = assert!(io_bounds::SEND_SLOTS_MAX <= u16::MAX as u32);
const _: () = assert!(io_bounds::FILE_SLOTS <= FILE_SLOTS_MAX as u32);
// The profile keeps room for this ring's recvmsg header in every buffer, so a buffer it
// allows is one the ring takes.
const _: () = assert!(RECV_HEADER_BYTES <= io_bounds::RECV_HEADER_BYTES_MAX);
const _: () = assert!(io_bounds::RECV_BUFFER_BYTES_MIN >= RECV_BUFFER_BYTES_MIN);
const _: () = assert!(io_bounds::RING_ENTRIES_MIN >= 8);

/// Sizes of one ring; all bounded and checked by [`RingConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingConfig {
    /// Submission queue entries; a power of two, at least `send_slots + 4`.
    pub entries: u32,
    /// Provided receive buffers; a power of two.
    pub recv_buffers: u16,
    /// Bytes per provided buffer, [`RECV_HEADER_BYTES`] of which hold the recvmsg header.
    /// A GRO batch larger than the rest is truncated to whole datagrams and counted.
    pub recv_buffer_bytes: u32,
    /// Most sendmsg operations in flight at once.
    pub send_slots: u16,
    /// Capacity of each send buffer.
    pub send_slot_bytes: u32,
    /// Most file operations (durable appends, syncs) in flight at once; each takes two
    /// submission queue entries.
    pub file_slots: u16,
    /// Ask the kernel to coalesce received datagrams (UDP_GRO).
    pub gro: bool,
    /// Send batches of datagrams with one sendmsg (UDP_SEGMENT).
    pub gso: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            entries: 1_024,
            recv_buffers: 256,
            // 64 KiB of payload (the largest GRO batch) plus the recvmsg header, page-rounded.
            recv_buffer_bytes: 65_536 + 4_096,
            send_slots: 64,
            send_slot_bytes: SEND_SLOT_BYTES_MAX,
            file_slots: 8,
            gro: true,
            gso: true,
        }
    }
}

// The default provided buffer holds the largest UDP payload after the recvmsg header.
const _: () = assert!(65_536 + 4_096 - RECV_HEADER_BYTES >= 65_535);

/// Upper bound on the file slots of one ring.
pub const FILE_SLOTS_MAX: u16 = 256;

impl RingConfig {
    /// Submission queue entries every possible operation needs at once.
    pub(crate) fn sq_entries_needed(&self) -> u32 {
        io_bounds::sq_entries_needed(u32::from(self.send_slots), u32::from(self.file_slots))
    }

    /// Check every bound; the error names the offending key.
    pub fn validate(&self) -> Result<(), RingError> {
        let bad = |key: &'static str, reason: String| Err(RingError::InvalidConfig { key, reason });
        if !self.entries.is_power_of_two() || !(8..=SQ_ENTRIES_MAX).contains(&self.entries) {
            return bad(
                "entries",
                format!(
                    "{} is not a power of two in 8..={SQ_ENTRIES_MAX}",
                    self.entries
                ),
            );
        }
        if !self.recv_buffers.is_power_of_two() || self.recv_buffers > RECV_BUFFERS_MAX {
            return bad(
                "recv_buffers",
                format!(
                    "{} is not a power of two in 1..={RECV_BUFFERS_MAX}",
                    self.recv_buffers
                ),
            );
        }
        if !(RECV_BUFFER_BYTES_MIN..=RECV_BUFFER_BYTES_MAX).contains(&self.recv_buffer_bytes) {
            return bad(
                "recv_buffer_bytes",
                format!(
                    "{} is outside {RECV_BUFFER_BYTES_MIN}..={RECV_BUFFER_BYTES_MAX}",
                    self.recv_buffer_bytes
                ),
            );
        }
        let recv_memory_bytes = u64::from(self.recv_buffers) * u64::from(self.recv_buffer_bytes);
        if recv_memory_bytes > RECV_MEMORY_BYTES_MAX {
            return bad(
                "recv_buffer_bytes",
                format!(
                    "recv_buffers * recv_buffer_bytes = {recv_memory_bytes} exceeds {RECV_MEMORY_BYTES_MAX}"
                ),
            );
        }
        if !(1..=SEND_SLOTS_MAX).contains(&self.send_slots) {
            return bad(
                "send_slots",
                format!("{} is outside 1..={SEND_SLOTS_MAX}", self.send_slots),
            );
        }
        if u32::from(self.send_slots) + SQ_RESERVED_ENTRIES > self.entries {
            return bad(
                "send_slots",
                format!(
                    "{} send slots need entries >= {}, have {}",
                    self.send_slots,
                    u32::from(self.send_slots) + SQ_RESERVED_ENTRIES,
                    self.entries
                ),
            );
        }
        if self.file_slots > FILE_SLOTS_MAX {
            return bad(
                "file_slots",
                format!("{} is outside 0..={FILE_SLOTS_MAX}", self.file_slots),
            );
        }
        if self.sq_entries_needed() > self.entries {
            return bad(
                "entries",
                format!(
                    "send_slots + 2 * file_slots + {SQ_RESERVED_ENTRIES} = {} exceeds entries {}",
                    self.sq_entries_needed(),
                    self.entries
                ),
            );
        }
        if !(SEND_SLOT_BYTES_MIN..=SEND_SLOT_BYTES_MAX).contains(&self.send_slot_bytes) {
            return bad(
                "send_slot_bytes",
                format!(
                    "{} is outside {SEND_SLOT_BYTES_MIN}..={SEND_SLOT_BYTES_MAX}",
                    self.send_slot_bytes
                ),
            );
        }
        Ok(())
    }
}

/// What can go wrong while setting up or driving a [`UdpRing`].
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A [`RingConfig`] field is out of bounds; nothing was allocated.
    #[error("invalid ring config `{key}`: {reason}")]
    InvalidConfig {
        /// The offending field.
        key: &'static str,
        /// Which bound it breaks.
        reason: String,
    },
    /// The kernel refused to create the io_uring (check `ulimit -l` and io_uring sysctls).
    #[error("creating io_uring failed: {0}")]
    Setup(#[source] io::Error),
    /// Registering the provided-buffer ring failed (needs Linux 5.19 or later).
    #[error("registering the provided-buffer ring failed: {0}")]
    RegisterBufRing(#[source] io::Error),
    /// Creating the wake-up eventfd failed.
    #[error("creating the eventfd failed: {0}")]
    Eventfd(#[source] io::Error),
    /// Querying the socket failed (it must be a bound UDP socket).
    #[error("socket is unusable: {0}")]
    Socket(#[source] io::Error),
    /// `io_uring_enter` failed; the ring is unusable.
    #[error("io_uring_enter failed: {0}")]
    Enter(#[source] io::Error),
    /// Multishot recvmsg failed with an error that re-arming cannot fix (e.g. EINVAL on a
    /// kernel without it); the ring re-arms anyway, but will keep failing.
    #[error("receiving on the socket failed: {0}")]
    Recv(#[source] io::Error),
}

/// One thing [`UdpRing::drain`] reports.
#[derive(Debug)]
pub enum RingEvent<'a> {
    /// One received UDP payload. With GRO it may hold several datagrams coalesced, each of
    /// `segment_size` bytes except possibly the last; `None` means one datagram.
    Recv {
        /// The payload, borrowed from a provided buffer that goes back to the kernel
        /// when the callback returns.
        data: &'a [u8],
        /// The GRO segment size when `data` holds more than one datagram.
        segment_size: Option<usize>,
        /// The sender.
        from: SocketAddr,
        /// The local address the datagram was sent to (from IP_PKTINFO / IPV6_PKTINFO).
        local_ip: Option<IpAddr>,
    },
    /// A [`Waker`] was woken (several wakes may fold into one event).
    Wake,
    /// [`UdpRing::wait`] returned because its deadline passed.
    Timer,
    /// A file operation queued with [`UdpRing::submit_file`] finished.
    File(FileDone),
}

/// Counters of one ring since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Datagrams delivered to the callback (each GRO segment counts).
    pub datagrams_received: u64,
    /// Payload bytes delivered to the callback.
    pub bytes_received: u64,
    /// Times multishot recvmsg stopped because every provided buffer was in use.
    pub recv_enobufs: u64,
    /// Times multishot recvmsg was armed again after it stopped.
    pub recv_rearms: u64,
    /// Receive completions that failed with an error other than ENOBUFS.
    pub recv_errors: u64,
    /// Received payloads that did not fit a provided buffer; their tail (the cut datagram)
    /// was dropped, whole GRO segments before it were delivered.
    pub recv_truncated: u64,
    /// Received buffers that could not be parsed (unknown address family, bad header).
    pub recv_malformed: u64,
    /// Completed sendmsg operations.
    pub sends_ok: u64,
    /// Datagrams in completed sendmsg operations (each GSO segment counts).
    pub datagrams_sent: u64,
    /// Payload bytes in completed sendmsg operations.
    pub bytes_sent: u64,
    /// sendmsg operations that failed; their datagrams are lost (QUIC retransmits).
    pub send_errors: u64,
    /// GSO batches dropped at submit because GSO had been disabled meanwhile.
    pub send_dropped_gso_off: u64,
    /// sendmsg operations in flight now.
    pub sends_in_flight: u64,
    /// Wake events delivered.
    pub wakes: u64,
    /// Timer events delivered.
    pub timers: u64,
    /// Whether UDP_GRO is enabled on the socket.
    pub gro_enabled: bool,
    /// Whether GSO was turned off after a send failed with EIO or EINVAL (as quinn-udp does).
    pub gso_disabled: bool,
}
