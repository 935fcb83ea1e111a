#!/bin/bash
# One run of courier-loadgen against a fresh `courier serve`, ingest only or with a
# simulated delivery edge, for side-by-side figures (BENCHMARKS.md, issue 15 sections).
#
#   scripts/delivery-bench.sh BIN_DIR NAME ingest|deliver [LOADGEN_ARGS...]
#
# BIN_DIR holds release builds of courier and courier-loadgen (LOADGEN=path overrides the
# generator). Each run gets a fresh data directory under /tmp/dlv/NAME (removed first): a
# master key, a bench business (unlimited, exempt) and, for `deliver`, a platform
# credential for the edge (`--deliver --platform-token`). The server runs on the built-in
# default profile, on 127.0.0.1:17643, metrics on 127.0.0.1:19464, with delivery off for
# `ingest`. The report goes to /tmp/dlv/NAME.json and one summary line to stdout
# (`steady`: msgs/s over the run's seconds from the 5th on, first contacts left out).
#
# Environment: SRV_ENV="VAR=VALUE" and LG_ENV="VAR=VALUE" set a variable for the server or
# the generator only (COURIER_* overrides such as COURIER_E2E__ENABLED=false reach both
# when exported). SRV_WRAP and LG_WRAP prefix the server's or the generator's command, e.g.
# SRV_WRAP="taskset -c 0-7" LG_WRAP="taskset -c 8-15" to give each cores of its own (the
# server runs one shard per CPU it may use). PERF=1 records the server (perf record -F 999
# -g, or with PERF_CG="--call-graph dwarf"; PERF_SECS from PERF_DELAY s into the run; needs
# perf), PERFG=1 the generator. Loopback only.
set -uo pipefail
BIN=$1; NAME=$2; MODE=$3; shift 3
LG=${LOADGEN:-$BIN/courier-loadgen}
D=/tmp/dlv/$NAME
rm -rf "$D"; mkdir -p "$D"
"$BIN/courier" keys init --out "$D/master.key" >/dev/null 2>&1
TOKEN=$("$BIN/courier" businesses add --name bench --tier unlimited --mps 1000000 --exempt \
    --registry "$D/registry.toml" 2>/dev/null)
EXTRA=()
DEL=false
if [ "$MODE" = deliver ]; then
    EDGE=$("$BIN/courier" businesses add --name edge --platform --registry "$D/registry.toml" 2>/dev/null)
    EXTRA=(--deliver --platform-token "$EDGE")
    DEL=true
fi
env ${SRV_ENV:-COURIER_BENCH=1} COURIER_DELIVERY__ENABLED=$DEL \
    COURIER_SERVER__METRICS_LISTEN=127.0.0.1:19464 COURIER_LOG=warn \
    ${SRV_WRAP:-} "$BIN/courier" serve --data-dir "$D/data" --registry "$D/registry.toml" \
    --listen 127.0.0.1:17643 --master-key-file "$D/master.key" >"$D/server.log" 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null || true' EXIT
sleep 1.5
if [ -n "${PERF:-}" ]; then
    (sleep "${PERF_DELAY:-3}"; perf record -F 999 ${PERF_CG:--g} -o "$D/perf.data" -p $SP -- \
        sleep "${PERF_SECS:-3}" >/dev/null 2>&1) &
fi
env ${LG_ENV:-COURIER_BENCH=1} ${LG_WRAP:-} "$LG" --target 127.0.0.1:17643 --token "$TOKEN" "${EXTRA[@]}" \
    --server-pid $SP --json "/tmp/dlv/$NAME.json" "$@" >"$D/loadgen.txt" 2>&1 &
GP=$!
if [ -n "${PERFG:-}" ]; then
    (sleep "${PERF_DELAY:-3}"; perf record -F 999 ${PERF_CG:--g} -o "$D/perfg.data" -p $GP -- \
        sleep "${PERF_SECS:-3}" >/dev/null 2>&1) &
fi
wait $GP
echo "loadgen exit $?" >>"$D/loadgen.txt"
kill $SP
wait $SP 2>/dev/null
wait # the perf recordings, bounded by PERF_SECS
rm -rf "$D/data" # gigabytes per run; the report, logs and recordings stay
python3 - "$NAME" <<'PY'
import json, sys
n = sys.argv[1]
j = json.load(open(f"/tmp/dlv/{n}.json"))
c, d, l = j.get("cpu") or {}, j.get("delivery") or {}, j.get("latency_us") or {}
s2d = d.get("submit_to_delivered_us") or {}
ms = lambda v: "%.1f" % ((v or 0) / 1000)
# The steady rate: accepted per second over the whole seconds from the 5th on, the last
# (partial) one left out; 0 for runs shorter than 6 s. With device sealing on, the first
# seconds of a run set up a session per new device and run slower.
t = [x["accepted"] for x in j.get("timeline") or []][4:-1]
steady = sum(t) / len(t) if t else 0
print(n, "msgs/s %.0f" % j["msgs_per_sec"], "steady %.0f" % steady, "accepted", j.get("accepted"),
      "throttled", j.get("throttled"), "late", j.get("late"),
      "server_us %.1f" % (c.get("server_us_per_msg") or 0),
      "generator_us %.1f" % (c.get("generator_us_per_msg") or 0),
      "ack_p99_ms", ms(l.get("p99")), "delivered", d.get("delivered"),
      "unresolved", d.get("unresolved"), "s2d_p99_ms", ms(s2d.get("p99")))
PY
