//! The provided-buffer ring that multishot recvmsg picks its buffers from.
//!
//! Owns two page-aligned allocations: the ring of `io_uring_buf` entries that is
//! registered with the kernel, and `count` receive buffers of `buf_bytes` each.
//!
//! Invariants:
//! - A buffer id is either published (between the kernel's head and our tail, the
//!   kernel may write it at any time) or held by userspace (its completion was reaped
//!   and it has not been pushed back). Only held buffers are read, and each is pushed
//!   back exactly once.
//! - Entries are written before the tail that publishes them, and the tail is stored
//!   with release ordering, so the kernel never sees a half-written entry.
//! - The memory is freed only by `Drop`, which the owner runs only once no operation
//!   can use the ring any more (see `udp.rs`).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::RingError;

const PAGE_BYTES: usize = 4096;

/// The kernel's `struct io_uring_buf`; entry 0's `resv` field is the ring's tail.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}
const _: () = assert!(size_of::<RawBuf>() == size_of::<BufRingEntry>());
const _: () = assert!(size_of::<RawBuf>() == 16);

pub(super) struct BufRing {
    entries: NonNull<RawBuf>,
    entries_layout: Layout,
    bufs: NonNull<u8>,
    bufs_layout: Layout,
    count: u16,
    buf_bytes: usize,
    /// Our copy of the tail; the kernel only reads the shared one.
    tail: u16,
    /// Buffers currently published to the kernel.
    published: u32,
}

impl BufRing {
    /// Allocate `count` (a power of two) buffers of `buf_bytes`, none published yet.
    pub(super) fn new(count: u16, buf_bytes: u32) -> Result<Self, RingError> {
        assert!(count.is_power_of_two(), "validated by RingConfig");
        let buf_bytes = buf_bytes as usize;
        let oom = |what: &str| {
            RingError::Setup(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("allocating {what}"),
            ))
        };
        let entries_layout =
            Layout::from_size_align(usize::from(count) * size_of::<RawBuf>(), PAGE_BYTES)
                .map_err(|_| oom("buffer ring"))?;
        let bufs_layout = Layout::from_size_align(usize::from(count) * buf_bytes, PAGE_BYTES)
            .map_err(|_| oom("receive buffers"))?;
        // Safety: both layouts have a nonzero size (count >= 1, buf_bytes >= the minimum).
        // Zeroed memory: every byte a buffer slice can ever cover is initialized, and the
        // tail starts at 0 as the kernel expects.
        let entries = NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) }.cast::<RawBuf>())
            .ok_or_else(|| oom("buffer ring"))?;
        // Safety: as above.
        let Some(bufs) = NonNull::new(unsafe { alloc::alloc_zeroed(bufs_layout) }) else {
            // Safety: allocated just above with this layout and never shared.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(oom("receive buffers"));
        };
        Ok(Self {
            entries,
            entries_layout,
            bufs,
            bufs_layout,
            count,
            buf_bytes,
            tail: 0,
            published: 0,
        })
    }

    /// Address to pass to `register_buf_ring`.
    pub(super) fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    pub(super) fn count(&self) -> u16 {
        self.count
    }

    /// Publish every buffer; called once after registration.
    pub(super) fn publish_all(&mut self) {
        assert_eq!(self.published, 0);
        for bid in 0..self.count {
            self.write_entry(bid);
        }
        self.store_tail();
    }

    /// Give a held buffer back to the kernel.
    pub(super) fn push(&mut self, bid: u16) {
        self.write_entry(bid);
        self.store_tail();
    }

    /// The first `len` bytes of held buffer `bid`, which the kernel has finished writing.
    ///
    /// Panics if the kernel reported a buffer id or length outside what was registered
    /// (that would be a kernel contract bug, not bad input).
    pub(super) fn held(&mut self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.count,
            "kernel picked buffer {bid} of {}",
            self.count
        );
        assert!(
            len <= self.buf_bytes,
            "kernel wrote {len} bytes into a {} buffer",
            self.buf_bytes
        );
        assert!(
            self.published > 0,
            "a buffer completed while none was published"
        );
        self.published -= 1;
        // Safety: `bid < count`, so the range lies inside the `bufs` allocation; the
        // buffer is held (its completion was reaped, it is not published again until
        // `push`, which needs `&mut self` and so cannot happen while this borrow lives),
        // so the kernel does not write it; the memory was zero-initialized.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs.as_ptr().add(usize::from(bid) * self.buf_bytes),
                len,
            )
        }
    }

    fn write_entry(&mut self, bid: u16) {
        assert!(bid < self.count);
        assert!(
            self.published < u32::from(self.count),
            "buffer {bid} pushed while all are published"
        );
        let idx = usize::from(self.tail & (self.count - 1));
        // Safety: `idx < count`, inside the entries allocation. The slot at our tail is
        // not published, so the kernel does not read it; fields are written through raw
        // pointers without forming a reference, because entry 0's `resv` (the tail) may
        // be read by the kernel at any time and is left untouched.
        unsafe {
            let entry = self.entries.as_ptr().add(idx);
            std::ptr::addr_of_mut!((*entry).addr)
                .write(self.bufs.as_ptr().add(usize::from(bid) * self.buf_bytes) as u64);
            std::ptr::addr_of_mut!((*entry).len).write(self.buf_bytes as u32);
            std::ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.published += 1;
    }

    fn store_tail(&self) {
        // Safety: entry 0's `resv` is a 2-byte-aligned u16 inside the live allocation;
        // the kernel only reads it and userspace only writes it here, atomically.
        let tail =
            unsafe { AtomicU16::from_ptr(std::ptr::addr_of_mut!((*self.entries.as_ptr()).resv)) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // Safety: both pointers came from `alloc_zeroed` with these layouts. The owner
        // drops a BufRing only after every operation that could use it completed and the
        // ring was unregistered (or was never registered).
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lives_where_io_uring_expects_it() {
        let ring = BufRing::new(4, super::super::RECV_BUFFER_BYTES_MIN).unwrap();
        let base = ring.entries.as_ptr().cast::<BufRingEntry>();
        // Safety: `base` points at entry 0 of a live, zeroed allocation.
        let tail = unsafe { BufRingEntry::tail(base) };
        // Safety: only computes a field address inside the live allocation.
        let ours = unsafe { std::ptr::addr_of!((*ring.entries.as_ptr()).resv) };
        assert_eq!(tail, ours);
        assert_eq!(
            ring.ring_addr() % PAGE_BYTES as u64,
            0,
            "ring must be page aligned"
        );
    }

    #[test]
    fn publish_hold_push_accounting() {
        let mut ring = BufRing::new(2, super::super::RECV_BUFFER_BYTES_MIN).unwrap();
        ring.publish_all();
        assert_eq!(ring.published, 2);
        assert_eq!(ring.held(1, 10), &[0u8; 10]);
        assert_eq!(ring.published, 1);
        ring.push(1);
        assert_eq!(ring.published, 2);
        assert_eq!(ring.tail, 3);
    }
}
