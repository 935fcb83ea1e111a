//! File slots: durable appends and directory syncs through the shard's own io_uring, so
//! the log's group commit never blocks the shard thread.
//!
//! A durable append is one `write(fd, data, offset)` with `RWF_DSYNC`: it completes once
//! the bytes and the metadata needed to read them back (the file's size, its extents) are
//! on stable storage, as a write followed by `fdatasync` of its range would; a write
//! that fails (a failed flush included, `EIO`) or falls short reports it in its result. A
//! directory sync is one `fsync(dirfd)`.
//!
//! Until 2026-12-06 a durable append was two linked operations, the write with
//! IOSQE_IO_LINK and then `fsync(fd, DATASYNC)`. Each went to one of the kernel's io-wq
//! workers in turn (an appending write cannot be done without blocking), so a commit
//! waited for two worker wake-ups on cores the shards keep busy; one `RWF_DSYNC` write
//! waits for one. Measured in one sitting at half of the peak (BENCHMARKS.md "One write
//! per group commit"): the commit's p50 fell from 0.294 to 0.245 ms and the batches acked
//! within 1 ms of arriving rose from 54% to 67%.
//!
//! Invariant: a slot owns its data buffer and an `Arc` of its file from submission until
//! the completion of its operation has been reaped, so neither the memory the kernel
//! reads nor the descriptor it uses can go away under it. Every queued operation gets
//! exactly one completion (errors and cancellations included), so no slot is lost.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

/// What a file slot was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOpKind {
    /// Write at an offset with `RWF_DSYNC`: durable when it completes (as write then
    /// fdatasync).
    DurableWrite,
    /// Write at an offset, no sync (the caller syncs later).
    Write,
    /// fsync of a file or directory.
    Sync,
}

/// The outcome of one file operation, reported by [`super::UdpRing::drain`].
#[derive(Debug)]
pub struct FileDone {
    /// The caller's token.
    pub token: u64,
    /// What was asked.
    pub kind: FileOpKind,
    /// Bytes the write wrote (`Ok(0)` for a sync); an error names the errno.
    pub written: io::Result<usize>,
    /// The sync's result, for a [`FileOpKind::Sync`]; `None` for writes (a durable
    /// write's sync is part of the write and its result).
    pub synced: Option<io::Result<()>>,
    /// The data buffer, handed back for reuse (empty for a sync).
    pub data: Vec<u8>,
    /// The bytes of `data` before the ones written (alignment only).
    pub skip: usize,
}

impl FileDone {
    /// True when the write wrote every byte and the sync (if any) succeeded.
    pub fn is_complete(&self, len: usize) -> bool {
        matches!(self.written, Ok(n) if n == len) && !matches!(self.synced, Some(Err(_)))
    }
}

pub(super) struct FileSlot {
    file: Option<Arc<File>>,
    data: Vec<u8>,
    skip: usize,
    token: u64,
    kind: FileOpKind,
    /// Submitted and its completion not reaped yet (every operation is one SQE).
    busy: bool,
}

pub(super) struct FileSlots {
    slots: Box<[FileSlot]>,
    free: Vec<u16>,
}

impl FileSlots {
    pub(super) fn new(count: u16) -> Self {
        let slots = (0..count)
            .map(|_| FileSlot {
                file: None,
                data: Vec::new(),
                skip: 0,
                token: 0,
                kind: FileOpKind::Sync,
                busy: false,
            })
            .collect();
        Self {
            slots,
            free: (0..count).rev().collect(),
        }
    }

    pub(super) fn free_count(&self) -> usize {
        self.free.len()
    }

    pub(super) fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Claims a slot and builds its SQE. `ud_base` is the kind tag of the caller's
    /// user_data scheme. Returns the data back when no slot is free.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prepare(
        &mut self,
        ud_base: u64,
        file: Arc<File>,
        kind: FileOpKind,
        offset: u64,
        data: Vec<u8>,
        skip: usize,
        token: u64,
    ) -> Result<squeue::Entry, Vec<u8>> {
        assert!(skip <= data.len(), "the bytes skipped are in the buffer");
        let Some(idx) = self.free.pop() else {
            return Err(data);
        };
        let slot = &mut self.slots[usize::from(idx)];
        debug_assert!(!slot.busy);
        let fd = types::Fd(file.as_raw_fd());
        slot.file = Some(file);
        slot.data = data;
        slot.skip = skip;
        slot.token = token;
        slot.kind = kind;
        let ud = ud_base | u64::from(idx);
        let len = u32::try_from(slot.data.len() - skip).expect("a file write is below 4 GiB");
        let sqe = match kind {
            FileOpKind::DurableWrite | FileOpKind::Write => {
                let flags = match kind {
                    FileOpKind::DurableWrite => libc::RWF_DSYNC,
                    _ => 0,
                };
                opcode::Write::new(fd, slot.data[skip..].as_ptr(), len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
                    .user_data(ud)
            }
            FileOpKind::Sync => opcode::Fsync::new(fd).build().user_data(ud),
        };
        slot.busy = true;
        Ok(sqe)
    }

    /// Records a slot's completion: its operation is finished.
    pub(super) fn complete(&mut self, ud: u64, res: i32) -> FileDone {
        let idx = (ud & 0xffff) as u16;
        let slot = &mut self.slots[usize::from(idx)];
        assert!(slot.busy, "completion for idle file slot {idx}");
        slot.busy = false;
        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        };
        let (written, synced) = match slot.kind {
            FileOpKind::Sync => (Ok(0), Some(result.map(|_| ()))),
            FileOpKind::DurableWrite | FileOpKind::Write => (result, None),
        };
        let done = FileDone {
            token: slot.token,
            kind: slot.kind,
            written,
            synced,
            data: std::mem::take(&mut slot.data),
            skip: std::mem::take(&mut slot.skip),
        };
        // The kernel is done with both the buffer and the descriptor.
        slot.file = None;
        self.free.push(idx);
        done
    }
}
