#!/usr/bin/env bash
# Answers streamed as text deltas (herald-bench text), on the memory broker
# and on Redis, with the herald binaries of one or more builds alternated in
# one run, so before/after come from the same machine state.
# Usage: scripts/bench-text.sh DIR [DIR…]   (each DIR holds release builds of
# herald and herald-bench; default target/release). Env: N (answers at once,
# 1000), TOKENS (per answer, 500), RATE (tokens/s per answer, 100),
# BROKERS ("memory redis"), RUNS (1). Prints one line of figures per run.
# Figures: docs/BENCHMARKS.md ("Answer text streamed as deltas").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -gt 0 ] || set -- "$ROOT/target/release"
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
RPORT=6391 HPORT=8311
for run in $(seq 1 "${RUNS:-1}"); do
  for broker in ${BROKERS:-memory redis}; do
    for dir in "$@"; do
      env=()
      if [ "$broker" = redis ]; then
        redis-server --port $RPORT --save "" --appendonly no --bind 127.0.0.1 >/dev/null 2>&1 &
        RP=$!
        sleep 0.5
        env=(HERALD_REDIS_URL=redis://127.0.0.1:$RPORT)
        extra=(--redis-pid $RP --redis-port $RPORT)
      else
        extra=()
      fi
      env "${env[@]}" HERALD_ADDR=127.0.0.1:$HPORT "$dir/herald" serve >/dev/null 2>&1 &
      S=$!
      sleep 0.5
      echo "== run $run, $broker, $dir"
      "$dir/herald-bench" text -n "${N:-1000}" --events "${TOKENS:-500}" --rate "${RATE:-100}" \
        --url http://127.0.0.1:$HPORT --server-pid $S "${extra[@]}" 2>&1 | grep -v '^ *\(at \|[0-9]*: \)' | tail -25 \
        || echo "(the bench failed)"
      kill -TERM $S; wait $S 2>/dev/null || true
      if [ "$broker" = redis ]; then kill $RP; wait $RP 2>/dev/null || true; fi
    done
  done
done
