#!/bin/bash
# Issue 15's goodput point in one command: ingest only against delivery on, held at the
# edge's pace, alternated for ROUNDS rounds with the same binaries, then the medians, their
# ratio (the issue asks for at least 0.8) and the check that every message accepted in a
# delivery run was delivered (0 unresolved).
#
#   scripts/delivery-goodput.sh BIN_DIR [ROUNDS] [SECONDS]
#
# BIN_DIR holds release builds of courier and courier-loadgen. Each run is one
# scripts/delivery-bench.sh run (a fresh server on its built-in default profile, loopback
# only): `--connections 4 --batch 64 --size 1024`, closed loop, SECONDS long (default 10);
# delivery runs add `--devices 10000 --edge-connections 2`, all devices online, with the
# server's `delivery.pending_bytes_max` at 64 MiB, so that ingest waits for delivery
# instead of filling its 512 MiB buffer (BENCHMARKS.md, "Delivery at the edge's pace").
# Rounds alternate which mode goes first. E2E=true turns end-to-end device sealing on
# (default false, as in the BENCHMARKS sections); SRV_WRAP / LG_WRAP (see
# delivery-bench.sh) pin the server and the generator to cores of their own where the
# machine has them. Reports stay in /tmp/dlv/gp-*.json.
set -euo pipefail
BIN=$(cd "$1" && pwd)
ROUNDS=${2:-3}
SECS=${3:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
export COURIER_E2E__ENABLED=${E2E:-false}
C=(--connections 4 --batch 64 --size 1024 --duration "$SECS")
ingest() { "$HERE/delivery-bench.sh" "$BIN" "gp-ingest-$1" ingest "${C[@]}"; }
held() {
    SRV_ENV=COURIER_DELIVERY__PENDING_BYTES_MAX=67108864 \
        "$HERE/delivery-bench.sh" "$BIN" "gp-held-$1" deliver "${C[@]}" --devices 10000 \
        --edge-connections 2
}
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then ingest "$r"; held "$r"; else held "$r"; ingest "$r"; fi
done
python3 - "$ROUNDS" <<'PY'
import json, statistics, sys
rounds = int(sys.argv[1])
ing, held, ok = [], [], True
print("round | ingest msgs/s (server / generator µs) | held msgs/s (server / generator µs) | held: accepted, delivered, unresolved")
for r in range(1, rounds + 1):
    i = json.load(open(f"/tmp/dlv/gp-ingest-{r}.json"))
    h = json.load(open(f"/tmp/dlv/gp-held-{r}.json"))
    ci, ch, d = i.get("cpu") or {}, h.get("cpu") or {}, h.get("delivery") or {}
    ing.append(i["msgs_per_sec"])
    held.append(h["msgs_per_sec"])
    good = d.get("unresolved") == 0 and d.get("delivered") == h.get("accepted")
    ok = ok and good
    print(f"{r} | {i['msgs_per_sec']:,.0f} ({ci.get('server_us_per_msg') or 0:.1f} / "
          f"{ci.get('generator_us_per_msg') or 0:.1f}) | {h['msgs_per_sec']:,.0f} "
          f"({ch.get('server_us_per_msg') or 0:.1f} / {ch.get('generator_us_per_msg') or 0:.1f}) | "
          f"{h.get('accepted')}, {d.get('delivered')}, {d.get('unresolved')}")
mi, mh = statistics.median(ing), statistics.median(held)
print(f"median: ingest {mi:,.0f}, held {mh:,.0f} msgs/s; held / ingest {mh / mi:.3f} (target 0.8: "
      f"{'met' if mh / mi >= 0.8 else 'not met'}); every accepted message delivered: "
      f"{'yes' if ok else 'NO'}")
sys.exit(0 if ok else 1)
PY
