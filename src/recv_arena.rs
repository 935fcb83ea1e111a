//! Where a shard puts the datagrams it hands to quinn: slices of a few shared 16 KiB
//! arenas, reused once quinn lets go of every slice, instead of a fresh buffer per datagram.
//!
//! quinn takes each datagram as a `BytesMut`, decrypts it in place and keeps slices of it
//! (stream chunks) until the stream is read. Copying every datagram into a buffer of its
//! own cost two heap allocations per datagram: the buffer, and the shared header that
//! quinn's first `split_to` of the packet makes. Here a datagram is copied into the spare
//! room of the current arena and split off it; the arena's header is made once, on its
//! first split, and kept while the arena is reused.
//!
//! An arena is reused only when no slice of it is alive (`BytesMut::try_reclaim` succeeds
//! on the empty tail kept here). quinn bounds the stream data it holds by payload length,
//! not by the buffers behind it, so one held 60-byte chunk pins a whole arena. The arenas
//! are therefore bounded per shard ([`ARENAS_MAX`] × [`ARENA_BYTES`] = 4 MiB): when every
//! one is pinned, datagrams get buffers of their own again (one allocation each, as
//! before, counted in `recv_unpooled`), and the arenas are looked at again only after
//! [`PINNED_SKIP`] such datagrams. A peer that pauses streams can slow a shard's receive
//! path down that way, not make it hold more memory.
//!
//! Arenas are small (16 KiB, about 13 datagrams) and the most recently filled free one is
//! taken first, so the memory a datagram is copied into is likely still in the cache: with
//! 64 KiB arenas taken oldest first, the copy wrote to lines evicted since, and the
//! refcount increment after it waited for those writes (2.6% of the server's samples in
//! `BytesMut::split_to` under closed-loop load, 1.6% with these choices; BENCHMARKS.md).

use std::collections::VecDeque;

use bytes::BytesMut;

/// Bytes in one arena: about 13 full-size datagrams.
pub const ARENA_BYTES: usize = 16 * 1024;
/// Arenas one shard may hold, in use or pinned by quinn.
pub const ARENAS_MAX: usize = 256;
/// Datagrams given buffers of their own, once every arena was found pinned, before the
/// arenas are looked at again (a scan checks up to [`ARENAS_MAX`] of them).
pub const PINNED_SKIP: u32 = 64;

/// One shard's receive arenas.
#[derive(Debug, Default)]
pub struct RecvArenas {
    /// The arena datagrams are copied into now (empty: its slices are all split off).
    current: BytesMut,
    /// The empty tails of full arenas, oldest first, each waiting for its slices to drop.
    retired: VecDeque<BytesMut>,
    /// Whether `current` is an arena (else the empty default: none free).
    in_arena: bool,
    /// Arenas allocated (current, retired and being reused).
    arenas: usize,
    /// Datagrams still to get buffers of their own before the next scan (every arena
    /// was pinned at the last one).
    skip: u32,
}

impl RecvArenas {
    /// No arena yet; the first datagram allocates one.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of `datagram` for quinn. Returns whether it went into an arena (`false`: it
    /// got a buffer of its own, because it is larger than an arena or every arena is
    /// pinned).
    pub fn copy(&mut self, datagram: &[u8]) -> (BytesMut, bool) {
        let n = datagram.len();
        if n > ARENA_BYTES {
            return (BytesMut::from(datagram), false);
        }
        if self.current.capacity() < n {
            if self.skip > 0 {
                self.skip -= 1;
                return (BytesMut::from(datagram), false);
            }
            if !self.next_arena() {
                self.skip = PINNED_SKIP;
                return (BytesMut::from(datagram), false);
            }
        }
        self.current.extend_from_slice(datagram);
        (self.current.split_to(n), true)
    }

    /// Arenas allocated so far (at most [`ARENAS_MAX`]).
    pub fn arenas(&self) -> usize {
        self.arenas
    }

    /// Makes `current` an arena with room for any datagram: a retired one that quinn has
    /// let go of entirely, else a new one while fewer than [`ARENAS_MAX`] exist.
    fn next_arena(&mut self) -> bool {
        let old = std::mem::take(&mut self.current);
        if std::mem::take(&mut self.in_arena) {
            self.retired.push_back(old);
        }
        // Newest first: the most recently written free arena is the likeliest to be in
        // the cache. Reclaiming moves the tail back to the arena's start when no other
        // handle to the arena is left; nothing is copied.
        for i in (0..self.retired.len()).rev() {
            if self.retired[i].try_reclaim(ARENA_BYTES) {
                self.current = self.retired.remove(i).unwrap_or_default();
                self.in_arena = true;
                return true;
            }
        }
        if self.arenas < ARENAS_MAX {
            self.arenas += 1;
            self.current = BytesMut::with_capacity(ARENA_BYTES);
            self.in_arena = true;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_share_one_arena_and_keep_their_bytes() {
        let mut a = RecvArenas::new();
        let (x, pooled_x) = a.copy(&[1u8; 1200]);
        let (y, pooled_y) = a.copy(&[2u8; 1200]);
        assert!(pooled_x && pooled_y);
        assert_eq!(a.arenas(), 1);
        // Adjacent slices of one buffer.
        assert_eq!(x.as_ptr().wrapping_add(1200), y.as_ptr());
        assert!(x.iter().all(|&b| b == 1) && y.iter().all(|&b| b == 2));
    }

    #[test]
    fn an_arena_is_reused_only_once_every_slice_is_dropped() {
        let mut a = RecvArenas::new();
        let per_arena = ARENA_BYTES / 1000;
        let first: Vec<BytesMut> = (0..per_arena).map(|_| a.copy(&[7u8; 1000]).0).collect();
        let base = first[0].as_ptr();
        // The next datagram does not fit: a second arena, since the first is still held.
        let held = a.copy(&[8u8; 1000]).0;
        assert_eq!(a.arenas(), 2);
        assert_ne!(held.as_ptr(), base);
        // Keep one slice of the first arena alive (quinn holding a chunk): fill the second,
        // and a third arena is allocated rather than the first overwritten.
        let keep = first.into_iter().last().unwrap();
        let second: Vec<BytesMut> = (1..per_arena).map(|_| a.copy(&[9u8; 1000]).0).collect();
        let third = a.copy(&[3u8; 1000]).0;
        assert_eq!(a.arenas(), 3);
        assert!(
            keep.iter().all(|&b| b == 7),
            "a held slice is never overwritten"
        );
        // Once the first arena's last slice is gone, it is reused from its start.
        drop(keep);
        let rest: Vec<BytesMut> = (1..per_arena).map(|_| a.copy(&[4u8; 1000]).0).collect();
        let reused = a.copy(&[5u8; 1000]).0;
        assert_eq!(a.arenas(), 3);
        assert_eq!(reused.as_ptr(), base);
        assert!(second.iter().all(|s| s.iter().all(|&b| b == 9)));
        assert!(held.iter().all(|&b| b == 8) && third.iter().all(|&b| b == 3));
        assert!(rest.iter().all(|s| s.iter().all(|&b| b == 4)));
    }

    #[test]
    fn pinned_arenas_are_bounded_and_datagrams_get_their_own_buffers() {
        let mut a = RecvArenas::new();
        // One slice kept from every arena pins them all.
        let mut pins = Vec::new();
        let mut unpooled = 0;
        for _ in 0..(ARENAS_MAX + 4) * (ARENA_BYTES / 1400 + 1) {
            let (d, pooled) = a.copy(&[6u8; 1400]);
            if pooled {
                pins.push(d);
            } else {
                unpooled += 1;
                assert_eq!(d.len(), 1400);
            }
        }
        assert_eq!(a.arenas(), ARENAS_MAX);
        assert!(unpooled > 0);
        // Freed arenas are taken up again, within PINNED_SKIP datagrams.
        pins.clear();
        let again = (0..=PINNED_SKIP)
            .map(|_| a.copy(&[6u8; 1400]))
            .position(|(_, pooled)| pooled);
        assert!(again.is_some());
        assert_eq!(a.arenas(), ARENAS_MAX);
    }

    #[test]
    fn an_arena_filled_to_the_last_byte_is_reused() {
        let mut a = RecvArenas::new();
        let slices: Vec<BytesMut> = (0..ARENA_BYTES / 1024)
            .map(|_| a.copy(&[1u8; 1024]).0)
            .collect();
        let base = slices[0].as_ptr();
        drop(slices);
        let (d, pooled) = a.copy(&[2u8; 1024]);
        assert!(pooled);
        assert_eq!(d.as_ptr(), base);
        assert_eq!(a.arenas(), 1);
    }

    #[test]
    fn a_datagram_larger_than_an_arena_gets_its_own_buffer() {
        let mut a = RecvArenas::new();
        let big = vec![1u8; ARENA_BYTES + 1];
        let (d, pooled) = a.copy(&big);
        assert!(!pooled);
        assert_eq!(&d[..], &big[..]);
        assert_eq!(a.arenas(), 0);
    }
}
