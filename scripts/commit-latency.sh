#!/bin/bash
# Where `courier serve`'s ack latency goes: the group commits' write and fdatasync times,
# read from the kernel's io_uring tracepoints while courier-loadgen drives the server in
# open loop, beside the loadgen's own ack latency and the server's ack histogram.
#
#   scripts/commit-latency.sh RATE [BIN_DIR] [SECONDS]
#
# RATE is the loadgen's --rate (msgs/s, 4 connections, 1 KiB); BIN_DIR holds release builds
# of courier and courier-loadgen (default target/release). Needs perf and the right to
# record tracepoints (root). Loopback only; the data directory is removed at the end.
#
# Each group commit is one linked write + fdatasync per segment (src/uring/file.rs). The
# trace times each from its submission to its completion; "commit" is from the write's
# submission to the fdatasync's completion, the time a batch waits for its own commit.
# A batch that arrives while a commit is in flight waits for that one first (one commit
# in flight per shard), so its ack latency is up to about two commits.
set -euo pipefail
RATE=$1
BIN=$(cd "${2:-target/release}" && pwd)
SECS=${3:-8}
D=$(mktemp -d /tmp/courier-commits.XXXXXX)
trap 'kill $SP 2>/dev/null || true; rm -rf "$D"' EXIT
"$BIN/courier" keys init --out "$D/master.key" >/dev/null 2>&1
TOKEN=$("$BIN/courier" businesses add --name commits --tier unlimited --mps 1000000 --exempt \
    --registry "$D/registry.toml" 2>/dev/null)
PORT=17449
COURIER_SERVER__METRICS_LISTEN=127.0.0.1:19467 COURIER_DELIVERY__ENABLED=false COURIER_LOG=warn \
    "$BIN/courier" serve --data-dir "$D/data" --registry "$D/registry.toml" \
    --listen 127.0.0.1:$PORT --master-key-file "$D/master.key" >"$D/serve.log" 2>&1 &
SP=$!
sleep 1.5
# The middle of the run: 2 s in, for half of it.
(sleep 2; perf record -q -e io_uring:io_uring_submit_req -e io_uring:io_uring_complete \
    -p $SP -o "$D/perf.data" -- sleep $((SECS / 2)) >/dev/null 2>&1) &
REC=$!
"$BIN/courier-loadgen" --target 127.0.0.1:$PORT --token "$TOKEN" --connections 4 --size 1024 \
    --rate "$RATE" --duration "$SECS" --quiet --json "$D/run.json" >"$D/lg.txt" 2>&1
wait $REC
curl -s 127.0.0.1:19467/metrics | grep '^courier_ack_latency_seconds_bucket' >"$D/hist.txt" || true
perf script -i "$D/perf.data" 2>/dev/null >"$D/trace.txt"
python3 - "$D/trace.txt" "$D/run.json" "$D/hist.txt" <<'PY'
import json, re, sys
submitted, started, lat = {}, {}, {'write': [], 'fdatasync': [], 'commit': []}
pat = re.compile(r'\s(\d+\.\d+):\s+io_uring:(\w+): ring (\w+).*?user_data (\w+)(?:, opcode (\w+))?')
for line in open(sys.argv[1]):
    m = pat.search(line)
    if not m:
        continue
    t, ev, ring, ud, op = float(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
    if ev == 'io_uring_submit_req' and op in ('WRITE', 'FSYNC'):
        submitted[(ring, ud)] = (t, op)
        if op == 'WRITE':
            started[ring] = t
    elif ev == 'io_uring_complete' and (ring, ud) in submitted:
        t0, op = submitted.pop((ring, ud))
        lat['write' if op == 'WRITE' else 'fdatasync'].append((t - t0) * 1e3)
        if op == 'FSYNC' and ring in started:
            lat['commit'].append((t - started.pop(ring)) * 1e3)
def pct(v, p):
    return v[min(len(v) - 1, int(len(v) * p))]
for k, v in lat.items():
    v.sort()
    if v:
        print(f"{k:>9}: {len(v)} ops, p50 {pct(v, .5):.3f} ms, p90 {pct(v, .9):.3f}, "
              f"p99 {pct(v, .99):.3f}, max {v[-1]:.3f}")
j = json.load(open(sys.argv[2]))
l = j['latency_us']
print(f"  loadgen: {round(j['msgs_per_sec'])} msgs/s, ack p50 {l.get('p50')} µs, "
      f"p99 {l.get('p99')} µs, p99.9 {l.get('p999')} µs, late {j['late']}")
b = []
for x in open(sys.argv[3]):
    m = re.search(r'le="([^"]+)"\} (\d+)', x)
    if m:
        b.append((float('inf') if m.group(1) == '+Inf' else float(m.group(1)), int(m.group(2))))
if b and b[-1][1]:
    tot = b[-1][1]
    print("   server: batches acked within " + ", ".join(
        f"{le * 1e3:g} ms {c / tot:.1%}" for le, c in b if le <= 0.01))
PY
