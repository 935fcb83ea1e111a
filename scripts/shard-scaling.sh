#!/bin/bash
# Issue 17's scaling figure: ingest goodput with 1 KiB messages as the server gets more
# cores, one shard per core, with the load generator on the cores left over.
#
#   scripts/shard-scaling.sh BIN_DIR ["1 2 4 8"] [SECONDS] [CONNECTIONS]
#
# For each count N the server runs under `taskset -c 0-(N-1)` (so it starts N shards,
# one pinned to each core) and courier-loadgen under `taskset` on the remaining cores,
# closed loop, `--batch 64 --size 1024`, CONNECTIONS connections (default 4 × N, so that
# every shard can get some: connections are placed on the shard with the fewest).
# Each run is one scripts/delivery-bench.sh run (fresh server, default profile,
# loopback only). Where N leaves no core over, the generator shares the server's cores
# and the row says so. Prints msgs/s, the server's µs per message and msgs/s per server
# core for each N. Reports stay in /tmp/dlv/scale-N.json.
set -euo pipefail
BIN=$(cd "$1" && pwd)
COUNTS=${2:-"1 2 4 8"}
SECS=${3:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
CPUS=$(nproc)
for n in $COUNTS; do
    if [ "$n" -lt 1 ] || [ "$n" -gt "$CPUS" ]; then
        echo "shard count $n outside 1..$CPUS (this machine's CPUs)" >&2
        exit 2
    fi
done
for n in $COUNTS; do
    conns=${4:-$((4 * n))}
    if [ "$n" -lt "$CPUS" ]; then
        gen="$n-$((CPUS - 1))"
    else
        gen="0-$((CPUS - 1))"
    fi
    SRV_WRAP="taskset -c 0-$((n - 1))" LG_WRAP="taskset -c $gen" \
        "$HERE/delivery-bench.sh" "$BIN" "scale-$n" ingest --connections "$conns" \
        --batch 64 --size 1024 --duration "$SECS"
done
python3 - "$CPUS" $COUNTS <<'PY'
import json, sys
cpus, counts = int(sys.argv[1]), [int(x) for x in sys.argv[2:]]
print("shards | msgs/s | server µs per message | msgs/s per server core | generator")
for n in counts:
    j = json.load(open(f"/tmp/dlv/scale-{n}.json"))
    c = j.get("cpu") or {}
    where = f"cores {n}-{cpus - 1}" if n < cpus else "shares the server's cores"
    print(f"{n} | {j['msgs_per_sec']:,.0f} | {c.get('server_us_per_msg') or 0:.2f} | "
          f"{j['msgs_per_sec'] / n:,.0f} | {where}")
PY
