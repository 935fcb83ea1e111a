#!/bin/bash
# Heap allocations of `courier serve` per accepted message, counted exactly (not sampled)
# with uprobes on mimalloc's entry points while courier-loadgen drives the server.
#
#   scripts/allocs-per-message.sh [BIN_DIR] [BATCH] [SECONDS]
#
# BIN_DIR holds release builds of courier and courier-loadgen (default target/release);
# BATCH is the loadgen's --batch (default 64). Needs perf and the right to add uprobes
# (root). Loopback only; the data directory is removed at the end. Prints the calls of
# each entry point and allocations per accepted message.
#
# DELIVER=1 runs delivery as well (issue 15's held mode: a simulated edge of 10,000
# devices on 2 connections, `delivery.pending_bytes_max` 64 MiB, end-to-end sealing off
# unless E2E=true), so the count covers hand-offs, outcomes, status records and events too.
#
# Uprobes slow every allocation down by a few microseconds, so the msgs/s printed here
# is not a throughput figure. Allocations per message that do not change with BATCH are
# per-message allocations; ones that fall as BATCH grows are per batch (or per packet).
set -euo pipefail
BIN=$(cd "${1:-target/release}" && pwd)
BATCH=${2:-64}
SECS=${3:-8}
D=$(mktemp -d /tmp/courier-allocs.XXXXXX)
trap 'kill $SP 2>/dev/null || true; rm -rf "$D"' EXIT
PROBES=(mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned)
EVENTS=""
for f in "${PROBES[@]}"; do
    perf probe -q -d "probe_courier:$f" 2>/dev/null || true
    perf probe -q -x "$BIN/courier" -a "$f"
    EVENTS="$EVENTS${EVENTS:+,}probe_courier:$f"
done
"$BIN/courier" keys init --out "$D/master.key" >/dev/null 2>&1
TOKEN=$("$BIN/courier" businesses add --name allocs --tier unlimited --mps 1000000 --exempt \
    --registry "$D/registry.toml" 2>/dev/null)
DELIVERY=(COURIER_DELIVERY__ENABLED=false)
EDGE=()
if [ -n "${DELIVER:-}" ]; then
    DELIVERY=(COURIER_DELIVERY__ENABLED=true COURIER_DELIVERY__PENDING_BYTES_MAX=67108864
        COURIER_E2E__ENABLED=${E2E:-false})
    EDGE=(--deliver --platform-token "$("$BIN/courier" businesses add --name edge --platform \
        --registry "$D/registry.toml" 2>/dev/null)" --devices 10000 --edge-connections 2)
fi
env "${DELIVERY[@]}" COURIER_LOG=warn "$BIN/courier" serve --data-dir "$D/data" \
    --registry "$D/registry.toml" --listen 127.0.0.1:7443 --master-key-file "$D/master.key" \
    >"$D/serve.log" 2>&1 &
SP=$!
sleep 1.5
perf stat -e "$EVENTS" -p $SP -o "$D/stat.txt" &
PS=$!
env "${DELIVERY[@]}" "$BIN/courier-loadgen" --target 127.0.0.1:7443 --token "$TOKEN" \
    --connections 4 --batch "$BATCH" --size 1024 --duration "$SECS" "${EDGE[@]}" --quiet \
    --json "$D/run.json" >/dev/null 2>&1
kill -INT $PS
wait $PS 2>/dev/null || true
for f in "${PROBES[@]}"; do perf probe -q -d "probe_courier:$f" 2>/dev/null || true; done
python3 - "$D" "$BATCH" <<'PY'
import json, re, sys
d, batch = sys.argv[1], sys.argv[2]
run = json.load(open(d + "/run.json"))
total = 0
for line in open(d + "/stat.txt"):
    m = re.match(r"\s*([\d,]+)\s+probe_courier:(\S+)", line)
    if m:
        n = int(m.group(1).replace(",", ""))
        total += n
        print(f"{m.group(2)}: {n}")
acc = max(1, run["accepted"])
print(f"batch {batch}: accepted {run['accepted']}, allocations {total}, "
      f"per message {total / acc:.3f}, per batch {total * int(batch) / acc:.2f}")
PY
