#!/usr/bin/env bash
# Herald's server CPU per delivery as a ratio to the kernel floor
# (../shared/bench/floor.c), in one run: a fresh release server on the memory
# broker, `herald-bench fanout` against it, then the floor program with the
# same connections, deliveries, frame size and rate. Figures: docs/BENCHMARKS.md.
# Needs release builds (cargo build --release -p herald -p herald-bench) and gcc.
# N (10000), RATE events/s (5000: 50,000 deliveries/s at 10 per user), DUR (10 s),
# PAD (250 B of data padding: ~350-byte frames), RUNS (1).
# At 10,000 connections, RATE 5000 writes each connection every 200 ms, which is
# the receiver's RTO on loopback: whether an ACK is paid by the sender flips with
# the gap's jitter, so the ratio swings there. RATE=4500 and RATE=5500 put both
# sides in the same regime (docs/BENCHMARKS.md, "The floor's cliff at 200 ms").
# scripts/floor-jitter.sh shows the same writes with ±10 ms of jitter paying
# for it at 50,000 writes/s and nowhere else.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="$ROOT/target/release"
FLOOR_C="${FLOOR_C:-$ROOT/../shared/bench/floor.c}"
gcc -O2 -o "$B/floor" "$FLOOR_C"
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
PORT=${PORT:-8311}
for run in $(seq "${RUNS:-1}"); do
  HERALD_ADDR=127.0.0.1:$PORT HERALD_LOG=warn "$B/herald" serve >/dev/null 2>&1 &
  SP=$!
  sleep 0.5
  "$B/herald-bench" fanout -n "${N:-10000}" --per-user 10 --rate "${RATE:-5000}" \
    --duration "${DUR:-10}" --event-size "${PAD:-250}" --url "http://127.0.0.1:$PORT" \
    --server-pid $SP --floor "$B/floor" ${JSON:+--json}
  kill -TERM $SP; wait $SP 2>/dev/null || true
done
