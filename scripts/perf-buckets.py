#!/usr/bin/env python3
"""Shares of a server profile by activity, from its call stacks.

    perf script -i /tmp/dlv/NAME/perf.data | scripts/perf-buckets.py

Reads `perf script` output of a recording with call graphs (scripts/delivery-bench.sh with
PERF=1 PERF_CG="--call-graph dwarf,16384") and puts each sample in the first activity of
the list below that names a frame anywhere in its stack (so a sample of a DELIVER's
encoding counts there, not in the dispatch that called it). Samples matching none are
listed by their leaf frame. Self-time attribution on this machine's `cpu-clock` samples
lands on the instruction after a slow one; whole call stacks are the steadier measure.
"""
import collections
import sys

ACTIVITIES = [
    ("DELIVER encoding", ["Server::deliver"]),
    ("delivery: dispatch", ["poll_dispatch"]),
    ("delivery: outcomes, timers", ["Delivery::finish", "Delivery::outcome", "Delivery::handed", "Delivery::tick"]),
    ("status records", ["append_internal"]),
    ("events pushed to businesses", ["outbox::", "Outbox", "poll_push"]),
    ("durable: ACKs answered, delivery admitted", ["Delivery::admit", "ack::<impl courier_pipeline::node::Shard>::durable"]),
    ("recipient seal", ["seal_batch", "seal_admitted"]),
    ("idempotency", ["idempotency::"]),
    ("log append (records encoded, sealed at rest)", ["GroupCommit::append", "encode_record"]),
    ("ingest: the rest of a batch", ["take_batch", "run_batch"]),
    ("QUIC transmit", ["poll_transmit", "flush_transmits"]),
    ("QUIC receive, frames decoded", ["handle_datagram", "handle_event", "Endpoint::handle", "read_stream"]),
    ("kernel: io_uring, sockets, disk", ["io_uring_enter", "io_submit_sqes", "io_wq", "do_syscall_64"]),
]


def main():
    counts = collections.Counter()
    total = 0
    frames = []

    def flush():
        nonlocal total
        if not frames:
            return
        total += 1
        for name, keys in ACTIVITIES:
            if any(k in f for f in frames for k in keys):
                counts[name] += 1
                return
        leaf = frames[0].split(None, 1)
        counts["other: " + (leaf[1][:70] if len(leaf) > 1 else "?")] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            frames = []
        elif line.startswith((" ", "\t")):
            frames.append(line.strip())
        else:
            flush()
            frames = []
    flush()
    if total == 0:
        sys.exit("no samples with call stacks on stdin")
    for name, n in counts.most_common(25):
        print(f"{100 * n / total:6.2f}%  {name}")
    print(f"{total} samples")


if __name__ == "__main__":
    main()
