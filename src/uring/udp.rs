//! [`UdpRing`]: one io_uring driving one UDP socket.
//!
//! Owns the io_uring, the socket, the eventfd, and (in `KernelMem`) all memory the
//! kernel may touch: the provided-buffer ring, the recvmsg template, the eventfd read
//! buffer and the send slots.
//!
//! Invariants:
//! - At most one SQE per operation is ever queued: one multishot recvmsg, one eventfd
//!   read, one per send slot, one cancel per long-lived operation on drop. The config
//!   check `entries >= send_slots + 4` therefore makes a full submission queue a bug.
//! - The completion queue holds `recv_buffers + send_slots + 4` entries or more: between
//!   two drains at most one completion per provided buffer plus the one that stops the
//!   multishot, one per send slot, one wake and two cancels can arrive. It cannot
//!   overflow, so no multishot is stopped for lack of CQ space.
//! - `KernelMem` is dropped only after the last completion of every operation was
//!   reaped; otherwise it is leaked (see `Drop`).
//! - `UdpRing` is not `Send` (it holds raw pointers), so it lives on the thread that
//!   created it; that is what `IORING_SETUP_SINGLE_ISSUER` requires.

use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::buf_ring::BufRing;
use super::file::{FileOpKind, FileSlots};
use super::recv::on_recv;
use super::send::{on_send, SendBuf, SendSlots};
use super::waker::Waker;
use super::{cmsg, socket};
use super::{RingConfig, RingError, RingEvent, RingStats, GSO_SEGMENTS_MAX};

/// `sizeof(struct io_uring_recvmsg_out)`: four u32 (namelen, controllen, payloadlen, flags).
pub(super) const RECVMSG_OUT_BYTES: usize = 16;
/// Room for the peer address in each received buffer.
pub(super) const RECV_NAME_BYTES: usize = size_of::<libc::sockaddr_storage>();
/// Room for control messages in each received buffer: UDP_GRO (24) + IPV6_PKTINFO (40)
/// + IP_PKTINFO (32) on a dual-stack socket, with headroom.
pub(super) const RECV_CONTROL_BYTES: usize = 128;
const _: () = assert!(
    RECV_CONTROL_BYTES >= cmsg::space(4) + cmsg::space(20) + cmsg::space(12),
    "room for GRO and both pktinfo messages"
);

/// The provided-buffer group of the recvmsg.
const BGID: u16 = 0;

// user_data: the operation kind in the top 16 bits, a send slot index in the low 16.
const UD_KIND_MASK: u64 = 0xffff << 48;
const UD_RECV: u64 = 1 << 48;
const UD_WAKE: u64 = 2 << 48;
const UD_CANCEL: u64 = 3 << 48;
const UD_SEND: u64 = 4 << 48;
const UD_FILE: u64 = 5 << 48;

/// Drop waits at most this many rounds of [`QUIESCE_ROUND`] for cancelled operations.
const QUIESCE_ROUNDS_MAX: u32 = 200;
const QUIESCE_ROUND: Duration = Duration::from_millis(10);

/// Memory the kernel may read or write while an operation is in flight.
struct KernelMem {
    buf_ring: BufRing,
    /// Template of the multishot recvmsg: only `msg_namelen` and `msg_controllen` are set.
    recv_hdr: Box<libc::msghdr>,
    /// Target of the eventfd read.
    wake_buf: Box<u64>,
    send: SendSlots,
    files: FileSlots,
}

/// Which long-lived operations have an SQE queued or in flight.
#[derive(Debug, Default)]
struct Ops {
    recv_armed: bool,
    wake_armed: bool,
    cancels_in_flight: u32,
}

/// One io_uring driving one UDP socket. See the [module docs](super).
pub struct UdpRing {
    ring: IoUring,
    setup: Setup,
    mem: ManuallyDrop<KernelMem>,
    socket: UdpSocket,
    socket_is_ipv6: bool,
    eventfd: Arc<OwnedFd>,
    ops: Ops,
    timer_fired: bool,
    gso_segments_max: usize,
    stats: RingStats,
}

impl UdpRing {
    /// Take over `socket` (nonblocking, bound; made by [`super::bind_reuseport`] for
    /// local addresses): enable UDP_GRO if `cfg.gro`, probe GSO if `cfg.gso`, register
    /// the provided-buffer ring (group 0) and arm multishot recvmsg and the eventfd read.
    pub fn new(socket: UdpSocket, cfg: &RingConfig) -> Result<Self, RingError> {
        Self::with_setup(socket, cfg, Setup::SingleIssuer)
    }

    /// [`Self::new`] with the io_uring setup tried first (tests cover every fallback).
    pub(super) fn with_setup(
        socket: UdpSocket,
        cfg: &RingConfig,
        first: Setup,
    ) -> Result<Self, RingError> {
        cfg.validate()?;
        let local = socket.local_addr().map_err(RingError::Socket)?;
        let (ring, setup) = build_ring(cfg, first)?;
        // Safety: plain syscall; blocking on purpose: io_uring polls it, and a blocking
        // write can only wait once the counter nears u64::MAX.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(RingError::Eventfd(io::Error::last_os_error()));
        }
        // Safety: `efd` is a fresh descriptor that nothing else owns.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        // Safety: msghdr is a plain C struct; all zeroes is an empty header.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_hdr.msg_namelen = RECV_NAME_BYTES as libc::socklen_t;
        recv_hdr.msg_controllen = RECV_CONTROL_BYTES as _;
        let fd = socket.as_raw_fd();
        let gro_enabled = cfg.gro && socket::enable_gro(fd);
        let gso_segments_max = if cfg.gso && socket::gso_supported(fd) {
            GSO_SEGMENTS_MAX
        } else {
            1
        };
        let mem = KernelMem {
            buf_ring: BufRing::new(cfg.recv_buffers, cfg.recv_buffer_bytes)?,
            recv_hdr,
            wake_buf: Box::new(0),
            send: SendSlots::new(cfg.send_slots, cfg.send_slot_bytes),
            files: FileSlots::new(cfg.file_slots),
        };
        // From here on `Drop` cleans up whatever fails.
        let mut this = Self {
            ring,
            setup,
            mem: ManuallyDrop::new(mem),
            socket,
            socket_is_ipv6: local.is_ipv6(),
            eventfd,
            ops: Ops::default(),
            timer_fired: false,
            gso_segments_max,
            stats: RingStats {
                gro_enabled,
                ..RingStats::default()
            },
        };
        let (ring_addr, count) = (this.mem.buf_ring.ring_addr(), this.mem.buf_ring.count());
        // Safety: the entries (page aligned, `count` long) live in `this.mem`, which Drop
        // frees only after unregistering, once no operation is left.
        unsafe {
            this.ring
                .submitter()
                .register_buf_ring_with_flags(ring_addr, count, BGID, 0)
        }
        .map_err(RingError::RegisterBufRing)?;
        this.mem.buf_ring.publish_all();
        this.arm_recv();
        this.arm_wake();
        this.ring.submit().map_err(RingError::Enter)?;
        Ok(this)
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// A handle that wakes this ring from any thread.
    pub fn waker(&self) -> Waker {
        Waker::new(Arc::clone(&self.eventfd))
    }

    /// Most datagrams one [`SendBuf`] may carry: 1 when GSO is off, unsupported or was
    /// disabled after a failure, else [`GSO_SEGMENTS_MAX`].
    pub fn max_gso_segments(&self) -> usize {
        self.gso_segments_max
    }

    /// Counters since creation.
    pub fn stats(&self) -> RingStats {
        RingStats {
            sends_in_flight: self.mem.send.in_flight() as u64,
            ..self.stats
        }
    }

    /// A free, empty send buffer, or `None` while every send slot is in flight (stop
    /// producing transmits until a drain frees one).
    pub fn send_buffer(&mut self) -> Option<SendBuf<'_>> {
        let slot = *self.mem.send.free.last()?;
        self.mem.send.slots[usize::from(slot)].data.clear();
        Some(SendBuf { ring: self, slot })
    }

    #[cfg(test)]
    pub(super) fn setup(&self) -> Setup {
        self.setup
    }

    pub(super) fn send_slots(&self) -> &SendSlots {
        &self.mem.send
    }

    pub(super) fn send_slots_mut(&mut self) -> &mut SendSlots {
        &mut self.mem.send
    }

    /// Submit queued SQEs and block until a completion is ready, `deadline` (relative)
    /// passes, or a [`Waker`] fires. The deadline is a timespec given to
    /// `io_uring_enter` (EXT_ARG), so no timeout operation outlives the call; when it
    /// expires, the next [`drain`](Self::drain) yields [`RingEvent::Timer`]. An
    /// interrupted wait returns early without an event.
    pub fn wait(&mut self, deadline: Option<Duration>) -> Result<(), RingError> {
        let started = deadline.map(|_| Instant::now());
        let entered = match deadline {
            None => self.ring.submit_and_wait(1),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match entered.as_ref().map_err(io::Error::raw_os_error) {
            Ok(_) => {}
            Err(Some(libc::ETIME)) => {
                self.timer_fired = true;
                return Ok(());
            }
            // Interrupted, or the kernel is short of memory or CQ space: the caller
            // drains and comes back.
            Err(Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => return Ok(()),
            Err(_) => return Err(RingError::Enter(entered.unwrap_err())),
        }
        // When SQEs were submitted, the kernel reports their count, not ETIME, even if
        // the wait then timed out.
        if let (Some(d), Some(t0)) = (deadline, started) {
            if self.ring.completion().is_empty() && t0.elapsed() >= d {
                self.timer_fired = true;
            }
        }
        Ok(())
    }

    /// Handle every completion that is ready, without blocking, calling `f` per event.
    ///
    /// A received buffer goes back to the kernel right after `f` returns for it. A
    /// multishot recvmsg that stopped (ENOBUFS, error) and the eventfd read after a wake
    /// are re-armed; the new SQEs go out with the next `wait`. Every completion is
    /// handled even when one fails; the first unfixable receive error is returned last.
    pub fn drain(&mut self, mut f: impl FnMut(RingEvent<'_>)) -> Result<(), RingError> {
        if std::mem::take(&mut self.timer_fired) {
            self.stats.timers += 1;
            f(RingEvent::Timer);
        }
        let mut fatal = None;
        let mem = &mut *self.mem;
        // Bounded: the iterator stops at the tail it read when created.
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            match ud & UD_KIND_MASK {
                UD_RECV => {
                    let (stats, armed) = (&mut self.stats, &mut self.ops.recv_armed);
                    let hdr = &*mem.recv_hdr;
                    if let Some(e) = on_recv(&mut mem.buf_ring, hdr, stats, armed, &cqe, &mut f) {
                        fatal.get_or_insert(e);
                    }
                }
                UD_WAKE => {
                    self.ops.wake_armed = false;
                    if cqe.result() > 0 {
                        self.stats.wakes += 1;
                        f(RingEvent::Wake);
                    } else {
                        tracing::warn!(errno = -cqe.result(), "eventfd read failed; re-arming");
                    }
                }
                UD_SEND => {
                    let gso_max = &mut self.gso_segments_max;
                    on_send(&mut mem.send, &mut self.stats, gso_max, ud, cqe.result());
                }
                UD_FILE => f(RingEvent::File(mem.files.complete(ud, cqe.result()))),
                UD_CANCEL => self.ops.cancels_in_flight -= 1,
                _ => unreachable!("unknown user_data {ud:#x}"),
            }
        }
        if !self.ops.recv_armed {
            self.arm_recv();
            self.stats.recv_rearms += 1;
        }
        if !self.ops.wake_armed {
            self.arm_wake();
        }
        fatal.map_or(Ok(()), |e| Err(RingError::Recv(e)))
    }

    fn arm_recv(&mut self) {
        assert!(!self.ops.recv_armed);
        let fd = types::Fd(self.socket.as_raw_fd());
        let hdr: *const libc::msghdr = &*self.mem.recv_hdr;
        let sqe = opcode::RecvMsgMulti::new(fd, hdr, BGID)
            .build()
            .user_data(UD_RECV);
        // Safety: the template and the registered buffer ring live in `self.mem`, which
        // is freed only after this operation's final completion (no F_MORE) is reaped.
        unsafe { self.push(&sqe) };
        self.ops.recv_armed = true;
    }

    fn arm_wake(&mut self) {
        assert!(!self.ops.wake_armed);
        let buf: *mut u64 = &mut *self.mem.wake_buf;
        let sqe = opcode::Read::new(
            types::Fd(self.eventfd.as_raw_fd()),
            buf.cast(),
            size_of::<u64>() as u32,
        )
        .build()
        .user_data(UD_WAKE);
        // Safety: `wake_buf` lives in `self.mem` until the read's completion is reaped,
        // and the eventfd is held open by `self.eventfd`.
        unsafe { self.push(&sqe) };
        self.ops.wake_armed = true;
    }

    /// Fill the send slot `idx` handed out by [`Self::send_buffer`] and queue its sendmsg.
    pub(super) fn queue_send(
        &mut self,
        idx: u16,
        dest: SocketAddr,
        src_ip: Option<IpAddr>,
        segment_size: Option<usize>,
    ) {
        let send = &mut self.mem.send;
        let slot_bytes = send.slot_bytes;
        let slot = &mut send.slots[usize::from(idx)];
        assert!(
            !slot.in_flight,
            "send slot {idx} handed out while in flight"
        );
        let len = slot.data.len();
        assert!(
            len <= slot_bytes,
            "send buffer holds {len} bytes, more than its {slot_bytes}"
        );
        if slot.data.capacity() > slot_bytes {
            // The caller reserved beyond the bound; memory stays a function of the config.
            slot.data.shrink_to(slot_bytes);
        }
        let gso_bytes = match segment_size {
            Some(s) if len > s => {
                assert!(
                    s > 0 && s <= usize::from(u16::MAX),
                    "bad GSO segment size {s}"
                );
                let segments = len.div_ceil(s);
                assert!(
                    segments <= GSO_SEGMENTS_MAX,
                    "{segments} GSO segments exceed the limit"
                );
                Some(s as u16)
            }
            _ => None,
        };
        if gso_bytes.is_some() && self.gso_segments_max == 1 {
            self.stats.send_dropped_gso_off += 1;
            return;
        }
        let dest = match dest {
            SocketAddr::V4(v4) if self.socket_is_ipv6 => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            other => other,
        };
        let src_ip = match src_ip {
            Some(IpAddr::V6(v6)) if !self.socket_is_ipv6 => v6.to_ipv4_mapped().map(IpAddr::V4),
            other => other,
        };
        let (name, name_len) = socket::SockAddrBuf::new(dest);
        slot.name = name;
        let mut control = cmsg::Writer::new(&mut slot.control.0);
        if let Some(s) = gso_bytes {
            assert!(control.push_gso(s), "SEND_CONTROL_BYTES fits UDP_SEGMENT");
        }
        if let Some(ip) = src_ip {
            assert!(control.push_src_ip(ip), "SEND_CONTROL_BYTES fits a pktinfo");
        }
        let control_len = control.len();
        slot.iov = libc::iovec {
            iov_base: slot.data.as_mut_ptr().cast(),
            iov_len: len,
        };
        // Safety: msghdr is a plain C struct; all zeroes is an empty header.
        slot.hdr = unsafe { std::mem::zeroed() };
        slot.hdr.msg_name = slot.name.as_mut_ptr();
        slot.hdr.msg_namelen = name_len;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        if control_len > 0 {
            slot.hdr.msg_control = slot.control.0.as_mut_ptr().cast();
            slot.hdr.msg_controllen = control_len as _;
        }
        slot.segments = gso_bytes.map_or(1, |s| len.div_ceil(usize::from(s)));
        slot.in_flight = true;
        let hdr: *const libc::msghdr = &slot.hdr;
        assert_eq!(
            send.free.pop(),
            Some(idx),
            "send_buffer hands out the last free slot"
        );
        let sqe = opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), hdr)
            .build()
            .user_data(UD_SEND | u64::from(idx));
        // Safety: the msghdr and everything it points at (iovec, payload, address,
        // control) live in slot `idx` of a boxed slice that never moves; the slot is in
        // flight, so nothing touches it until its completion is reaped, and `mem` is
        // freed only after that (Drop).
        unsafe { self.push(&sqe) };
    }

    /// True when a file slot is free for [`Self::submit_file`].
    pub fn file_slot_free(&self) -> bool {
        self.mem.files.has_free()
    }

    /// Number of free file slots.
    pub fn file_slots_free(&self) -> usize {
        self.mem.files.free_count()
    }

    /// Queues a file operation: `DurableWrite` writes `data[skip..]` at `offset` with
    /// `RWF_DSYNC` (durable when it completes, as write then fdatasync), `Write` only
    /// writes, `Sync` fsyncs `file` (a directory too; `data` must be empty). The
    /// outcome comes back from [`Self::drain`] as [`RingEvent::File`] with `token`, and
    /// with the buffer for reuse. The ring holds `file` and `data` until then. Returns
    /// `data` back when every file slot is busy.
    pub fn submit_file(
        &mut self,
        file: Arc<std::fs::File>,
        kind: FileOpKind,
        offset: u64,
        data: Vec<u8>,
        skip: usize,
        token: u64,
    ) -> Result<(), Vec<u8>> {
        assert!(
            kind != FileOpKind::Sync || data.is_empty(),
            "a sync carries no data"
        );
        let sqe = self
            .mem
            .files
            .prepare(UD_FILE, file, kind, offset, data, skip, token)?;
        // Safety: the write's buffer and the descriptor are owned by the file slot (`data`
        // and an `Arc<File>`), which releases them only when `complete` has seen the
        // slot's completion. The SQ has room: the config reserves two entries per file
        // slot (one is used).
        unsafe { self.push(&sqe) };
        Ok(())
    }

    /// Queue one SQE.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until the operation's last completion has
    /// been reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        // Safety: forwarded to the caller.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        pushed
            .expect("submission queue full; RingConfig::validate reserves one entry per operation");
    }

    fn in_flight(&self) -> usize {
        usize::from(self.ops.recv_armed)
            + usize::from(self.ops.wake_armed)
            + self.ops.cancels_in_flight as usize
            + self.mem.send.in_flight()
            + self.mem.files.in_flight()
    }

    /// Cancel the long-lived operations and reap completions until none is in flight;
    /// false if that did not happen within the bound.
    fn quiesce(&mut self) -> bool {
        for _ in 0..QUIESCE_ROUNDS_MAX {
            if self.in_flight() == 0 {
                return true;
            }
            if self.ops.cancels_in_flight == 0 {
                // Sends finish on their own; only the open-ended operations need a cancel.
                for (armed, target) in [
                    (self.ops.recv_armed, UD_RECV),
                    (self.ops.wake_armed, UD_WAKE),
                ] {
                    if armed {
                        let sqe = opcode::AsyncCancel::new(target)
                            .build()
                            .user_data(UD_CANCEL);
                        // Safety: a cancel carries no pointers.
                        unsafe { self.push(&sqe) };
                        self.ops.cancels_in_flight += 1;
                    }
                }
            }
            let ts = types::Timespec::from(QUIESCE_ROUND);
            let args = types::SubmitArgs::new().timespec(&ts);
            // Errors (ETIME, EINTR, ...) only cost a round; the loop is bounded.
            let _ = self.ring.submitter().submit_with_args(1, &args);
            for cqe in self.ring.completion() {
                let ud = cqe.user_data();
                match ud & UD_KIND_MASK {
                    UD_RECV if !cqueue::more(cqe.flags()) => self.ops.recv_armed = false,
                    UD_WAKE => self.ops.wake_armed = false,
                    UD_SEND => {
                        self.mem.send.complete((ud & 0xffff) as u16);
                    }
                    UD_FILE => {
                        // The outcome is lost with the ring; the log's recovery scan is
                        // what decides what reached the disk.
                        let _ = self.mem.files.complete(ud, cqe.result());
                    }
                    UD_CANCEL => self.ops.cancels_in_flight -= 1,
                    _ => {}
                }
            }
        }
        self.in_flight() == 0
    }
}

impl Drop for UdpRing {
    fn drop(&mut self) {
        if self.quiesce() {
            // Fails harmlessly if registration never happened (new() failed before it).
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
            // Safety: quiesce() reaped the last completion of every operation, so the
            // kernel holds no pointer into `mem`, and `mem` is not used after this.
            unsafe { ManuallyDrop::drop(&mut self.mem) };
        } else {
            // The kernel may still write into these buffers; freeing them could corrupt
            // whatever reuses the memory. Leaking is the sound choice. Closing the ring
            // (next, in field drop order) makes the kernel cancel what is left.
            tracing::error!(
                in_flight = self.in_flight(),
                "io_uring operations outlived drop; leaking their buffers"
            );
        }
    }
}

impl std::fmt::Debug for UdpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRing")
            .field("local_addr", &self.socket.local_addr().ok())
            .field("setup", &self.setup)
            .field("ops", &self.ops)
            .field("gso_segments_max", &self.gso_segments_max)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// io_uring setup flags, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Setup {
    /// SINGLE_ISSUER + DEFER_TASKRUN (6.1+): completions are produced only when this
    /// thread waits, with no task work interrupting it in between.
    SingleIssuer,
    /// COOP_TASKRUN (5.19+): task work runs only when the thread enters the kernel.
    CoopTaskrun,
    /// The default setup.
    Plain,
}

/// Create the io_uring with the first setup from `first` on that the kernel accepts;
/// a step back is taken only on EINVAL (flags unknown to the kernel).
fn build_ring(cfg: &RingConfig, first: Setup) -> Result<(IoUring, Setup), RingError> {
    let need = u32::from(cfg.recv_buffers) + cfg.sq_entries_needed();
    let cq_entries = need.next_power_of_two().max(2 * cfg.entries);
    let mut refused = None;
    for setup in [Setup::SingleIssuer, Setup::CoopTaskrun, Setup::Plain] {
        if setup < first {
            continue;
        }
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries);
        match setup {
            Setup::SingleIssuer => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            Setup::CoopTaskrun => {
                builder.setup_coop_taskrun();
            }
            Setup::Plain => {}
        }
        match builder.build(cfg.entries) {
            Ok(ring) => return Ok((ring, setup)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => refused = Some(e),
            Err(e) => return Err(RingError::Setup(e)),
        }
    }
    Err(RingError::Setup(
        refused.expect("Plain is always attempted"),
    ))
}
