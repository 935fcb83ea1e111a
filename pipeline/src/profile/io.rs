//! `[io]`: the sizes of each shard's io_uring ring and socket, and the bounds of the ring.
//!
//! The ring is driven by the shell (`src/uring/` in the `courier` crate), which this crate
//! cannot see; its bounds live here so that a profile is checked against them when it
//! loads, instead of failing when a shard starts. The driver takes the same constants and
//! asserts its own facts against them at compile time (the recvmsg header fits
//! [`RECV_HEADER_BYTES_MAX`], a buffer of [`RECV_BUFFER_BYTES_MIN`] holds a datagram).
//!
//! Two sizes of the ring are not operator knobs and are constants here:
//! [`SEND_SLOT_BYTES`] (a UDP payload, a GSO batch included, is never larger, so a smaller
//! slot would only cap GSO) and [`FILE_SLOTS`] (the group commit keeps one commit in flight
//! and writes one operation per segment it touches, usually one).

use serde::Deserialize;

use super::Checker;
use crate::server::Quic;

/// Fewest submission queue entries of a shard's ring.
pub const RING_ENTRIES_MIN: u32 = 64;
/// Most submission queue entries of a ring: the kernel's `IORING_MAX_ENTRIES`.
pub const RING_ENTRIES_MAX: u32 = 32_768;
/// Fewest provided receive buffers per shard.
pub const RECV_BUFFERS_MIN: u32 = 4;
/// Most provided receive buffers per shard: the kernel's largest provided-buffer ring.
pub const RECV_BUFFERS_MAX: u32 = 32_768;
/// Smallest receive buffer, bytes.
pub const RECV_BUFFER_BYTES_MIN: u32 = 2048;
/// Largest receive buffer, bytes.
pub const RECV_BUFFER_BYTES_MAX: u32 = 1 << 20;
/// Room every receive buffer keeps for the recvmsg header (the driver's header fits it).
pub const RECV_HEADER_BYTES_MAX: u32 = 512;
/// Most memory of one ring's receive buffers, bytes.
pub const RECV_MEMORY_BYTES_MAX: u64 = 1 << 30;
/// Most sendmsg operations in flight per shard.
pub const SEND_SLOTS_MAX: u32 = 4096;
/// Bytes of each send slot: one UDP payload can never exceed 64 KiB, GSO batches included.
pub const SEND_SLOT_BYTES: u32 = 65_536;
/// File operations (a commit's write + fdatasync each) a shard keeps in flight. The core
/// hands out a group commit only when all its writes fit the free slots; a commit writes
/// once per segment it touches: one, or two across a roll, while
/// `log.group_commit_bytes_max` is well below `log.segment_bytes_max`.
pub const FILE_SLOTS: u32 = 16;
/// Submission queue entries a ring keeps for operations other than sends and file
/// operations: the multishot recvmsg, the eventfd read and one cancel for each.
pub const SQ_RESERVED_ENTRIES: u32 = 4;
/// Smallest socket buffer requested, bytes.
pub const SOCKET_BUFFER_BYTES_MIN: u32 = 64 << 10;
/// Largest socket buffer requested, bytes.
pub const SOCKET_BUFFER_BYTES_MAX: u32 = 1 << 30;

// A profile's largest ring still has room for every send slot and file operation.
const _: () = assert!(sq_entries_needed(SEND_SLOTS_MAX, FILE_SLOTS) <= RING_ENTRIES_MAX);
// The smallest buffer holds the header and one datagram of the smallest MTU.
const _: () =
    assert!(RECV_BUFFER_BYTES_MIN >= RECV_HEADER_BYTES_MAX + crate::server::MTU_MIN as u32);

/// Submission queue entries a ring needs for every operation it may have in flight at
/// once: a send per slot, a write and a sync per file slot, and the reserved ones.
pub const fn sq_entries_needed(send_slots: u32, file_slots: u32) -> u32 {
    send_slots + 2 * file_slots + SQ_RESERVED_ENTRIES
}

/// `[io]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Io {
    /// io_uring submission queue entries (power of two).
    pub ring_entries: u32,
    /// Provided receive buffers per shard (power of two).
    pub recv_buffers: u32,
    /// Bytes per receive buffer; 65536 lets GRO coalesce.
    pub recv_buffer_bytes: u32,
    /// sendmsg operations in flight per shard.
    pub send_slots: u32,
    /// SO_RCVBUF and SO_SNDBUF requested per socket, bytes.
    pub socket_buffer_bytes: u32,
    /// Coalesce received datagrams (UDP GRO).
    pub gro: bool,
    /// Send batches of datagrams in one call (UDP GSO).
    pub gso: bool,
    /// Pin each shard thread to its own CPU.
    pub pin_threads: bool,
    /// Let the kernel back the process's memory with transparent huge pages. Off (the
    /// default, and when absent), `courier serve` turns them off for its process
    /// (`prctl(PR_SET_THP_DISABLE)`): the allocator asks for them, and a first touch of
    /// a huge page zeroes 2 MiB in one fault, which stalls a shard for milliseconds
    /// (BENCHMARKS.md, "Transparent huge pages off"). On, they are allowed (the flag
    /// cleared), and the system's THP mode and the allocator decide.
    #[serde(default)]
    pub transparent_huge_pages: bool,
}

impl Io {
    /// Checks every key of `[io]`, naming each broken one; a receive buffer must hold a
    /// datagram of `quic`'s largest MTU.
    pub(crate) fn validate(&self, quic: &Quic, c: &mut Checker) {
        c.range(
            "io.ring_entries",
            self.ring_entries,
            RING_ENTRIES_MIN,
            RING_ENTRIES_MAX,
        );
        c.pow2("io.ring_entries", self.ring_entries);
        c.range(
            "io.recv_buffers",
            self.recv_buffers,
            RECV_BUFFERS_MIN,
            RECV_BUFFERS_MAX,
        );
        c.pow2("io.recv_buffers", self.recv_buffers);
        c.range(
            "io.recv_buffer_bytes",
            self.recv_buffer_bytes,
            RECV_BUFFER_BYTES_MIN,
            RECV_BUFFER_BYTES_MAX,
        );
        self.validate_receive_memory(quic, c);
        c.range("io.send_slots", self.send_slots, 1, SEND_SLOTS_MAX);
        let needed = sq_entries_needed(self.send_slots, FILE_SLOTS);
        if needed > self.ring_entries {
            c.fail(
                "io.send_slots",
                format!(
                    "{} send slots need io.ring_entries >= {needed} (with {FILE_SLOTS} file \
                     slots, each a write and a sync, and {SQ_RESERVED_ENTRIES} entries so \
                     receives always find room), have {}",
                    self.send_slots, self.ring_entries
                ),
            );
        }
        c.range(
            "io.socket_buffer_bytes",
            self.socket_buffer_bytes,
            SOCKET_BUFFER_BYTES_MIN,
            SOCKET_BUFFER_BYTES_MAX,
        );
    }

    /// A buffer holds one datagram after its header, and all buffers together stay
    /// within the ring's memory bound.
    fn validate_receive_memory(&self, quic: &Quic, c: &mut Checker) {
        if self.recv_buffer_bytes < u32::from(quic.mtu_upper_bound) + RECV_HEADER_BYTES_MAX {
            c.fail(
                "io.recv_buffer_bytes",
                format!(
                    "must hold one datagram of quic.mtu_upper_bound plus {RECV_HEADER_BYTES_MAX} \
                     bytes of headers"
                ),
            );
        }
        let memory = u64::from(self.recv_buffers) * u64::from(self.recv_buffer_bytes);
        if memory > RECV_MEMORY_BYTES_MAX {
            c.fail(
                "io.recv_buffer_bytes",
                format!(
                    "io.recv_buffers * io.recv_buffer_bytes = {memory} exceeds \
                     {RECV_MEMORY_BYTES_MAX} bytes per shard"
                ),
            );
        }
    }
}
