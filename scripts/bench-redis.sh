#!/usr/bin/env bash
# One node on the memory broker, one node on Redis, and two nodes on Redis
# (clients on one, publishes through the other), with the same fanout load in
# one run; then Redis memory per stored event. Figures: docs/BENCHMARKS.md.
# Needs release builds (cargo build --release -p herald -p herald-bench) and
# redis-server; writes mem.json, redis1.json, redis2.json, redismem.txt to $PWD.
set -euo pipefail
B="$(cd "$(dirname "$0")/.." && pwd)/target/release"
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
redis-server --port 6390 --save "" --appendonly no --bind 127.0.0.1 >/dev/null 2>&1 &
RP=$!
sleep 0.5
start() { # $1 port, $2 redis url or ""
  if [ -n "$2" ]; then HERALD_REDIS_URL=$2 HERALD_ADDR=127.0.0.1:$1 $B/herald serve >/dev/null 2>&1 & else HERALD_ADDR=127.0.0.1:$1 $B/herald serve >/dev/null 2>&1 & fi
  echo $!
}
ARGS="fanout -n ${N:-2000} --per-user 10 --rate ${RATE:-5000} --duration ${DUR:-10} --secret $HERALD_JWT_HS256_SECRET --api-key $HERALD_API_KEY --json"
M=$(start 8301 ""); sleep 0.5
$B/herald-bench $ARGS --url http://127.0.0.1:8301 --server-pid $M > mem.json
kill -TERM $M; wait $M 2>/dev/null || true
A=$(start 8302 redis://127.0.0.1:6390); sleep 0.5
$B/herald-bench $ARGS --url http://127.0.0.1:8302 --server-pid $A --redis-pid $RP > redis1.json
C=$(start 8303 redis://127.0.0.1:6390); sleep 0.5
redis-cli -p 6390 FLUSHALL >/dev/null
$B/herald-bench $ARGS --url http://127.0.0.1:8302 --publish-url http://127.0.0.1:8303 --server-pid $A --server-pid $C --redis-pid $RP > redis2.json
kill -TERM $A $C; wait $A $C 2>/dev/null || true
# Redis memory per stored event: 10,000 events of the bench's size into a fresh Redis.
redis-cli -p 6390 FLUSHALL >/dev/null
B0=$(redis-cli -p 6390 INFO memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
D=$(start 8304 redis://127.0.0.1:6390); sleep 0.5
python3 - <<'PY'
import json, urllib.request
pad = "x" * 100
for b in range(10):
    events = [{"user_id": f"mem-u{(b*1000+i) % 100}", "event": "bench", "data": {"t": 1, "pad": pad}} for i in range(1000)]
    req = urllib.request.Request("http://127.0.0.1:8304/api/v1/events", data=json.dumps({"events": events}).encode(),
        headers={"Authorization": "Bearer bench-api-key-0123", "Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
PY
B1=$(redis-cli -p 6390 INFO memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
echo "redis_bytes_per_event $(( (B1 - B0) / 10000 ))" > redismem.txt
kill -TERM $D; wait $D 2>/dev/null || true
kill $RP
