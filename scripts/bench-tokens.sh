#!/usr/bin/env bash
# The token workload (issue 43): N answers at once, each TOKENS tokens at RATE
# tokens/s with ±JITTER spread between tokens, streamed through the text
# ingest by herald-bench (a process apart from the server), READERS sockets
# per answer. N grows through NS until the token latency's p99 (handed to the
# ingest → read by a socket) reaches 100 ms; per broker. Prints one line per
# run. Usage: scripts/bench-tokens.sh [DIR] (release herald + herald-bench;
# default target/release). Env: NS ("250 500 1000 1500 2000 3000"),
# TOKENS (300), RATE (60), JITTER (0.5), READERS (1), BROKERS ("memory redis"),
# COALESCE ("default": the server's default; "false true" runs each N
# without live coalescing, then with it: the before/after of issue 43 item 2).
# Figures: docs/BENCHMARKS.md ("The token workload").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/target/release}"
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
RPORT=6393 HPORT=8333
for broker in ${BROKERS:-memory redis}; do
 for coalesce in ${COALESCE:-default}; do
  for n in ${NS:-250 500 1000 1500 2000 3000}; do
    env=() extra=()
    [ "$coalesce" = default ] || env+=(HERALD_COALESCE_TEXT=$coalesce)
    if [ "$broker" = redis ]; then
      redis-server --port $RPORT --save "" --appendonly no --bind 127.0.0.1 >/dev/null 2>&1 &
      RP=$!; sleep 0.5
      env+=(HERALD_REDIS_URL=redis://127.0.0.1:$RPORT)
      extra=(--redis-pid $RP --redis-port $RPORT)
    fi
    # The generator holds one streaming ingest request per answer, and
    # max_http_connections (1,024 by default) answers one beyond it 503.
    env "${env[@]}" HERALD_MAX_HTTP_CONNECTIONS=$((n + 256)) HERALD_ADDR=127.0.0.1:$HPORT "$DIR/herald" serve >/dev/null 2>&1 &
    S=$!; sleep 0.5
    # The server's socket writes (every send of a frame is one of these), counted
    # by the kernel's tracepoints for the whole run (opening the sockets adds
    # one write per socket); needs perf and tracefs, else "-".
    P=""
    if command -v perf >/dev/null && perf stat -e syscalls:sys_enter_sendto -- true >/dev/null 2>&1; then
      perf stat -x, -o /tmp/bench-tokens-perf -e syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_writev,syscalls:sys_enter_write -p $S &
      P=$!; sleep 0.2
    fi
    out=$("$DIR/herald-bench" text -n "$n" --events "${TOKENS:-300}" --rate "${RATE:-60}" \
      --jitter "${JITTER:-0.5}" --readers "${READERS:-1}" --json \
      --url http://127.0.0.1:$HPORT --server-pid $S "${extra[@]}" 2>/dev/null || echo '{}')
    writes=- wakes=-
    if [ -n "$P" ]; then
      kill -INT $P; wait $P 2>/dev/null || true
      # sendto/sendmsg/writev: frames and HTTP answers to sockets; write:
      # mostly tokio's eventfd wake-ups of a parked worker.
      writes=$(awk -F, '/sys_enter_(sendto|sendmsg|writev)/ {n += $1} END {print n}' /tmp/bench-tokens-perf)
      wakes=$(awk -F, '/sys_enter_write$/ || /sys_enter_write,/ {n += $1} END {print n}' /tmp/bench-tokens-perf)
    fi
    kill -TERM $S; wait $S 2>/dev/null || true
    if [ "$broker" = redis ]; then kill $RP; wait $RP 2>/dev/null || true; fi
    line=$(echo "$out" | WRITES=$writes WAKES=$wakes python3 -c '
import json, os, sys
s = json.load(sys.stdin)
f = dict(s.get("figures", []))
l = s.get("latency_us") or {}
frames, _, tokens = f.get("delta frames received / tokens received", "0 / 0").partition(" / ")
w, wk = os.environ["WRITES"], os.environ["WAKES"]
per = lambda x: "%.3f" % (float(x) / max(1, int(tokens or 0))) if x not in ("-", "") else "-"
print("p50 %.2f ms | p99 %.2f ms | %s | tokens %s | per token: %s frames, %s socket sends, %s write(2) | %s | %s | generator %s | gaps %s" % (
    l.get("p50", 0) / 1e3, l.get("p99", 0) / 1e3, f.get("deltas/s (all answers)", "?") + " deltas/s",
    tokens, per(frames), per(w), per(wk), f.get("server CPU", "?"),
    f.get("redis CPU", "-"), f.get("generator CPU (this process)", "-"), f.get("seq gaps", "?")))
print(l.get("p99", 10**9), file=sys.stderr)' 2>/tmp/p99)
    echo "$broker coalesce=$coalesce N=$n: $line"
    [ "$(cat /tmp/p99)" -lt 100000 ] || break
  done
 done
done
