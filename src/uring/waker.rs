//! [`Waker`]: lets any thread interrupt a shard blocked in [`UdpRing::wait`].
//!
//! Owns a shared handle on the ring's eventfd; the ring keeps one read on it in flight
//! and re-arms it after every wake, so a wake is never missed and several fold into one
//! [`RingEvent::Wake`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

#[cfg(doc)]
use super::{RingEvent, UdpRing};

/// Wakes a [`UdpRing`] blocked in [`UdpRing::wait`] from any thread.
#[derive(Debug, Clone)]
pub struct Waker {
    eventfd: Arc<OwnedFd>,
}

impl Waker {
    pub(super) fn new(eventfd: Arc<OwnedFd>) -> Self {
        Self { eventfd }
    }
}

impl Waker {
    /// Make the ring's current or next `wait` return and its `drain` yield
    /// [`RingEvent::Wake`]. Wakes before the ring drains fold into one event.
    pub fn wake(&self) {
        let one: u64 = 1;
        for _ in 0..8 {
            // Safety: writes 8 bytes from a live u64 to an eventfd we keep open.
            let n = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    std::ptr::from_ref(&one).cast(),
                    size_of::<u64>(),
                )
            };
            // Only EINTR is worth retrying: the counter cannot realistically overflow
            // (the ring reads it back to 0 on every wake), and a ring that is gone
            // has nobody to wake.
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }
}
