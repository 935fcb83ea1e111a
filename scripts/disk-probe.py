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
    try:
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    except ValueError:
        sys.exit(f"COUNT must be a whole number, not {sys.argv[2]!r}")
    if count < 1:
        sys.exit("COUNT must be at least 1")
    try:
        fd_tmp, path = tempfile.mkstemp(prefix="courier-disk-probe.", dir=directory)
    except OSError as e:
        sys.exit(f"cannot create a scratch file in {directory}: {e.strerror}")
    os.close(fd_tmp)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_DIRECT)
        except OSError as e:
            sys.exit(f"cannot open a file in {directory} with O_DIRECT: {e.strerror}")
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
