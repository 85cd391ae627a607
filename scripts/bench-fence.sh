#!/usr/bin/env bash
# The failover fence's cost: ordinary publishes on Redis (fanout: 2,000 users × 1
# socket, 2,000 publishes/s, 10 s), the builds in DIR… alternated twice in one
# run. Usage: scripts/bench-fence.sh DIR [DIR…] (release herald + herald-bench).
# Figures: docs/BENCHMARKS.md ("The failover fence").
#
set -euo pipefail
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
for run in 1 2; do
  for dir in "$@"; do
    redis-server --port 6392 --save "" --appendonly no --bind 127.0.0.1 >/dev/null 2>&1 &
    RP=$!; sleep 0.5
    HERALD_REDIS_URL=redis://127.0.0.1:6392 HERALD_ADDR=127.0.0.1:8320 $dir/herald serve >/dev/null 2>&1 &
    S=$!; sleep 0.5
    echo "== run $run $dir"
    $dir/herald-bench fanout -n 2000 --per-user 1 --rate 2000 --duration 10 --secret $HERALD_JWT_HS256_SECRET --api-key $HERALD_API_KEY --url http://127.0.0.1:8320 --server-pid $S --redis-pid $RP 2>&1 | grep -i -E "cpu|deliver|p50|p99|lost" | head -12
    kill -TERM $S; wait $S 2>/dev/null || true; kill $RP; wait $RP 2>/dev/null || true
  done
done
