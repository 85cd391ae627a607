#!/usr/bin/env bash
# The floor control (issue 43, item 5), in one command: at each delivery rate
# in RATES, a fresh release server on the memory broker and `herald-bench
# fanout` (N connections, 10 per user, ~350-byte frames), then, with the same
# connections, deliveries, frame size and rate, ../shared/bench/floor.c as is
# and its jittered variant (scripts/floor-jitter.sh: each 10-ms batch written
# in a random order, a connection's gap N/rate ± 10 ms, as a gateway's are).
# Prints per run: Herald's server CPU per delivery, both floors, and the ratio
# to each. At 50,000 writes/s and 10,000 connections a connection's gap is the
# receiver's 200-ms delayed-ACK/RTO boundary, where jitter alone costs the
# plain floor's writes more (docs/BENCHMARKS.md, "The floor's cliff at 200 ms
# per connection"); the jittered floor is the fair bound there.
# Needs release builds (cargo build --release -p herald -p herald-bench) and
# gcc. N (10000), RATES deliveries/s ("45000 50000 55000"), DUR (10), PAD (250),
# RUNS (2, alternated over the rates).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="${DIR:-$ROOT/target/release}"
OUT="$ROOT/target/floor-jitter"
RUNS=0 "$ROOT/scripts/floor-jitter.sh" >/dev/null   # builds floor and floor-jitter
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
PORT=${PORT:-8312} N=${N:-10000}
echo "rate | Herald µs/delivery | floor µs | jittered floor µs | ÷ floor | ÷ jittered floor | p99"
for run in $(seq "${RUNS:-2}"); do
  for rate in ${RATES:-45000 50000 55000}; do
    HERALD_ADDR=127.0.0.1:$PORT HERALD_LOG=warn "$B/herald" serve >/dev/null 2>&1 &
    SP=$!
    sleep 0.5
    json=$("$B/herald-bench" fanout -n "$N" --per-user 10 --rate $((rate / 10)) \
      --duration "${DUR:-10}" --event-size "${PAD:-250}" --url "http://127.0.0.1:$PORT" \
      --server-pid $SP --floor "$OUT/floor" --json 2>/dev/null)
    kill -TERM $SP; wait $SP 2>/dev/null || true
    # The jittered floor with the floor's own arguments: N, deliveries, size, rate.
    read -r d size r < <(echo "$json" | python3 -c '
import json, sys
s = json.load(sys.stdin); f = dict(s["figures"])
got = f["deliveries received"]          # "500000 (50021/s)"
d = int(got.split()[0])
r = int(got.split("(")[1].split("/")[0])  # the achieved rate, as the floor gets
size = int(float(f["mean frame written"].split()[0])) + 4
print(d, size, r)')
    jit=$("$OUT/floor-jitter" "$N" "$d" "$size" "$r")
    echo "$json" | JIT="$jit" python3 -c '
import json, os, sys
s = json.load(sys.stdin); f = dict(s["figures"])
her = float(f["server CPU per delivery"].split()[0])
flo = float(f["kernel floor per delivery (floor.c, same N, rate, size)"].split()[0])
jit = json.loads(os.environ["JIT"])["us_per_delivery"]
print("%s | %.2f | %.2f | %.2f | %.2f× | %.2f× | %.1f ms" % ('"$rate"', her, flo, jit, her / flo, her / jit, s["latency_us"]["p99"] / 1e3))'
  done
done
