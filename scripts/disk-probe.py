#!/usr/bin/env python3
"""The disk's own write latency, for issue 17's ack-latency bound (BENCHMARKS.md).

    python3 scripts/disk-probe.py [DIR] [COUNT]

Appends COUNT (default 2,000) blocks of 64 KiB with O_DIRECT to a scratch file in DIR
(default /tmp, the disk the benchmark scripts' data directories use), each followed by
fdatasync, one at a time, and prints the p50 / p90 / p99 of each write + fdatasync in
milliseconds. The file is removed at the end. Linux only (O_DIRECT).
"""
import mmap
import os
import sys
import tempfile
import time

BLOCK = 65536


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    if count < 1:
        sys.exit("COUNT must be at least 1")
    fd_tmp, path = tempfile.mkstemp(prefix="courier-disk-probe.", dir=directory)
    os.close(fd_tmp)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_DIRECT)
        # An anonymous mapping is page-aligned, as O_DIRECT needs.
        buf = mmap.mmap(-1, BLOCK)
        buf.write(b"\x5a" * BLOCK)
        times = []
        for i in range(count):
            start = time.perf_counter()
            os.pwrite(fd, buf, i * BLOCK)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
        os.close(fd)
    finally:
        os.unlink(path)
    times.sort()

    def q(p):
        return times[int(p * (len(times) - 1))] * 1000

    print("disk 64 KiB write+fdatasync p50 %.3f p90 %.3f p99 %.3f ms" % (q(0.5), q(0.9), q(0.99)))


if __name__ == "__main__":
    main()
