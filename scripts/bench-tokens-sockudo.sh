#!/usr/bin/env bash
# The token workload (issue 43, item 4) on Herald and on Sockudo 5.2, alternated
# per N in one run with the same generator: N answers at once, each TOKENS
# tokens at RATE tokens/s with ±JITTER spread between tokens, READERS sockets
# per answer. Herald: the text ingest (one streaming request per answer,
# `herald-bench text`), memory broker. Sockudo: its AI transport's appends
# (one signed HTTP request per token, `herald-bench text --target sockudo`,
# crates/herald-bench/src/sockudo_text.rs), local adapter, history and
# versioned messages in memory, its AI rollup window ROLLUP ms (its default
# 40; "off" sends each append as its own frame). Sockudo runs on one node
# only: with the AI transport on it refuses its Redis adapter unless history
# and versions are on a durable store (Postgres, MySQL, …), which the build
# asked for (--features local,v2,redis,ai-transport) does not have.
# N grows through NS while both servers keep p99 < 100 ms (each stops at its
# first N past it). Env: NS ("50 100 200 400"), TOKENS (300), RATE (60),
# JITTER (0.5), READERS (1), ROLLUP (40), SOCKUDO (~/.cargo/bin/sockudo).
# Usage: scripts/bench-tokens-sockudo.sh [DIR] (release herald + herald-bench).
# Figures: docs/BENCHMARKS.md ("Sockudo's appends against Herald's ingest").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/target/release}"
SOCKUDO="${SOCKUDO:-$HOME/.cargo/bin/sockudo}"
SPORT=${SPORT:-6331} HPORT=${HPORT:-8336}
APP_ID=bench APP_KEY=bench-app-key APP_SECRET=bench-app-secret-0123456789abcdef
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rollup=${ROLLUP:-40}
if [ "$rollup" = off ]; then r='{"enabled": false}'; else r="{\"default_window_ms\": $rollup}"; fi
cat >"$WORK/sockudo.json" <<JSON
{
  "host": "127.0.0.1", "port": $SPORT, "debug": false,
  "adapter": {"driver": "local"}, "cache": {"driver": "memory"}, "database": {},
  "queue": {"driver": "memory"}, "websocket": {},
  "metrics": {"enabled": false}, "rate_limiter": {"enabled": false},
  "history": {"enabled": true, "backend": "memory"},
  "versioned_messages": {"enabled": true, "driver": "memory"},
  "ai_transport": {"enabled": true, "channels": [{"prefix": "ai-"}], "rollup": $r},
  "app_manager": {"driver": "memory", "array": {"apps": [
    {"id": "$APP_ID", "key": "$APP_KEY", "secret": "$APP_SECRET", "enabled": true,
     "max_connections": 0, "max_client_events_per_second": 0}
  ]}}
}
JSON
# One line from a herald-bench JSON summary on stdin; the p99 (µs) to $WORK/p99.
summarize() {
  python3 -c '
import json, sys
s = json.load(sys.stdin)
f = dict(s.get("figures", []))
l = s.get("latency_us") or {}
cpu = f.get("server CPU", "?").split(", ")
late = f.get("appends sent > 1 ms behind schedule (mean lateness)")
print("p50 %.2f ms | p99 %.2f ms | %s deltas/s of %s asked%s | frames / tokens %s | server CPU %s | RSS/answer %s | missing %s" % (
    l.get("p50", 0) / 1e3, l.get("p99", 0) / 1e3, f.get("deltas/s (all answers)", "?"),
    sys.argv[1], " (sent late: %s)" % late if late else "",
    f.get("delta frames received / tokens received", "?"), cpu[-1] if cpu else "?",
    f.get("server RSS per answer", "?"),
    f.get("tokens missing / out of order", f.get("seq gaps", "?") + " seq gaps")))
print(l.get("p99", 10**9), file=sys.stderr)' "$1" 2>"$WORK/p99"
}
load=(-n N --events "${TOKENS:-300}" --rate "${RATE:-60}" --jitter "${JITTER:-0.5}" --readers "${READERS:-1}" --json)
herald_on=1 sockudo_on=1
for n in ${NS:-50 100 200 400}; do
  load[1]=$n
  if [ $herald_on = 1 ]; then
    HERALD_ADDR=127.0.0.1:$HPORT "$DIR/herald" serve >/dev/null 2>&1 &
    S=$!; sleep 0.5
    out=$("$DIR/herald-bench" text "${load[@]}" --url http://127.0.0.1:$HPORT --server-pid $S 2>/dev/null || echo '{}')
    kill -TERM $S; wait $S 2>/dev/null || true
    echo "herald (ingest, memory) N=$n: $(echo "$out" | summarize $((n * ${RATE:-60})))"
    [ "$(cat "$WORK/p99")" -lt 100000 ] || herald_on=0
  fi
  if [ $sockudo_on = 1 ]; then
    (cd "$WORK" && RUST_LOG=warn exec "$SOCKUDO" -c "$WORK/sockudo.json" >"$WORK/sockudo.log" 2>&1) &
    S=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SPORT") 2>/dev/null && break; sleep 0.1; done
    out=$("$DIR/herald-bench" text --target sockudo --app-id $APP_ID --api-key $APP_KEY \
      --secret $APP_SECRET --url http://127.0.0.1:$SPORT "${load[@]}" --server-pid $S 2>/dev/null || echo '{}')
    kill -TERM $S; wait $S 2>/dev/null || true
    echo "sockudo (appends, rollup $rollup) N=$n: $(echo "$out" | summarize $((n * ${RATE:-60})))"
    [ "$(cat "$WORK/p99")" -lt 100000 ] || sockudo_on=0
  fi
  [ $herald_on = 1 ] || [ $sockudo_on = 1 ] || break
done
