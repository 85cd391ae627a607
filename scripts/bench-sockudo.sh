#!/usr/bin/env bash
# Herald and Sockudo side by side on this machine (issue 43, item 4), alternated
# in one run with the same load generator (`herald-bench --target sockudo` drives
# Sockudo over the Pusher protocol; see crates/herald-bench/src/pusher.rs):
#   1. fanout, one node, memory broker / local adapter: N connections (USERS ×
#      PER_USER), RATE events/s = RATE × PER_USER deliveries/s for DUR s, PAD bytes
#      of padding, with the kernel floor (floor.c) run after each;
#   2. the same on Redis (a fresh redis-server for each server's run, its CPU read
#      with --redis-pid);
#   3. idle memory per connection at IDLE_N connections over --procs 2.
# Figures: docs/sockudo-run.md. Needs release builds (cargo build --release -p
# herald -p herald-bench), gcc, redis-server, and Sockudo (SOCKUDO, default
# ~/.cargo/bin/sockudo). Writes one JSON summary per run to OUT (./sockudo-run)
# and prints a table at the end.
# N (10000), PER_USER (10), RATE (5000), DUR (10), PAD (250), IDLE_N (19000),
# RUNS (1), SOCKUDO_BATCH_MAX (1000: Sockudo gets the same batches as Herald, one
# request per 20-ms tick; 10 = the Pusher spec's batch limit), SKIP_IDLE=1,
# SKIP_REDIS=1, SKIP_MEMORY=1, TWO_NODES=1 (also: two nodes of each server on one
# Redis, events published to the first, sockets on the second; server CPU is
# both nodes'), SOCKUDO_MAX_MESSAGES (unset: Sockudo's default
# per-socket buffer of 1,000 messages; set, e.g. 100, to see what the buffer's
# preallocation costs an idle connection). `top` samples the machine every 5 s
# into OUT/top.log, to tell a run disturbed by another process.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="$ROOT/target/release"
SOCKUDO="${SOCKUDO:-$HOME/.cargo/bin/sockudo}"
FLOOR_C="${FLOOR_C:-$ROOT/../shared/bench/floor.c}"
OUT="${OUT:-$PWD/sockudo-run}"
N=${N:-10000} PER_USER=${PER_USER:-10} RATE=${RATE:-5000} DUR=${DUR:-10} PAD=${PAD:-250}
IDLE_N=${IDLE_N:-19000} RUNS=${RUNS:-1} SOCKUDO_BATCH_MAX=${SOCKUDO_BATCH_MAX:-1000}
HPORT=${HPORT:-8321} SPORT=${SPORT:-6321} RPORT=${RPORT:-6392}
mkdir -p "$OUT"
top -b -d 5 >"$OUT/top.log" 2>&1 &
TOP=$!
gcc -O2 -o "$B/floor" "$FLOOR_C"
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789abcdefghijkl HERALD_API_KEY=bench-api-key-0123456789
APP_ID=bench APP_KEY=bench-app-key APP_SECRET=bench-app-secret-0123456789abcdef
WORK="$(mktemp -d)"
trap 'kill $TOP 2>/dev/null; rm -rf "$WORK"' EXIT

# Sockudo's configuration: one app without connection or event limits, the HTTP
# API and WebSockets on SPORT, metrics and rate limits off, caches and queues in
# memory; everything else (per-socket buffer of 1,000 messages, 2 × 1,000 in its
# channel, disconnect when full; idempotency, delta compression, echo control as
# shipped) at its defaults. $1 = local | redis.
sockudo_config() {
  local adapter='{"driver": "local"}' cache='{"driver": "memory"}' db='{}' ws='{}'
  if [ -n "${SOCKUDO_MAX_MESSAGES:-}" ]; then ws="{\"max_messages\": $SOCKUDO_MAX_MESSAGES}"; fi
  if [ "$1" = redis ]; then
    adapter='{"driver": "redis"}'
    # Sockudo refuses a clustered adapter with a node-local cache while its
    # idempotency (on by default) is on: the cache goes to the same Redis.
    cache='{"driver": "redis"}'
    db="{\"redis\": {\"host\": \"127.0.0.1\", \"port\": $RPORT}}"
  fi
  cat <<EOF
{
  "host": "127.0.0.1",
  "port": $SPORT,
  "debug": false,
  "adapter": $adapter,
  "cache": $cache,
  "database": $db,
  "queue": {"driver": "memory"},
  "websocket": $ws,
  "metrics": {"enabled": false},
  "rate_limiter": {"enabled": false},
  "app_manager": {"driver": "memory", "array": {"apps": [
    {"id": "$APP_ID", "key": "$APP_KEY", "secret": "$APP_SECRET", "enabled": true,
     "max_connections": 0, "max_client_events_per_second": 0}
  ]}}
}
EOF
}

wait_port() { # $1 port: until it accepts connections (10 s at most)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}

start_redis() {
  redis-server --port "$RPORT" --save "" --appendonly no --bind 127.0.0.1 >/dev/null 2>&1 &
  RP=$!
  wait_port "$RPORT"
}

start_herald() { # $1 = memory | redis
  if [ "$1" = redis ]; then
    HERALD_REDIS_URL=redis://127.0.0.1:$RPORT HERALD_ADDR=127.0.0.1:$HPORT HERALD_LOG=warn "$B/herald" serve >"$WORK/herald.log" 2>&1 &
  else
    HERALD_ADDR=127.0.0.1:$HPORT HERALD_LOG=warn "$B/herald" serve >"$WORK/herald.log" 2>&1 &
  fi
  SP=$!
  wait_port "$HPORT"
  URL=http://127.0.0.1:$HPORT
  TARGET_ARGS=(--secret "$HERALD_JWT_HS256_SECRET" --api-key "$HERALD_API_KEY")
}

start_sockudo() { # $1 = local | redis
  sockudo_config "$1" >"$WORK/sockudo-$1.json"
  # From an empty directory: Sockudo also reads ./config/config.{toml,json}.
  (cd "$WORK" && RUST_LOG=warn exec "$SOCKUDO" -c "$WORK/sockudo-$1.json" >"$WORK/sockudo.log" 2>&1) &
  SP=$!
  wait_port "$SPORT"
  URL=http://127.0.0.1:$SPORT
  TARGET_ARGS=(--target sockudo --app-id "$APP_ID" --api-key "$APP_KEY" --secret "$APP_SECRET"
    --batch-max "$SOCKUDO_BATCH_MAX")
}

stop() { # $@ pids
  kill -TERM "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}

fanout() { # $1 server, $2 broker, $3 run
  local redis_args=()
  if [ "$2" = redis ]; then start_redis; redis_args=(--redis-pid "$RP"); fi
  if [ "$1" = herald ]; then start_herald "$2"; else start_sockudo "$([ "$2" = redis ] && echo redis || echo local)"; fi
  echo "== fanout $1 $2 run $3" >&2
  "$B/herald-bench" fanout "${TARGET_ARGS[@]}" --url "$URL" -n "$N" --per-user "$PER_USER" \
    --rate "$RATE" --duration "$DUR" --event-size "$PAD" --server-pid "$SP" "${redis_args[@]}" \
    --floor "$B/floor" --json >"$OUT/fanout-$1-$2-$3.json"
  stop "$SP"
  if [ "$2" = redis ]; then stop "$RP"; fi
}

fanout2() { # $1 server, $2 run: two nodes on one Redis, publish to A, sockets on B
  start_redis
  local a b
  if [ "$1" = herald ]; then
    HERALD_REDIS_URL=redis://127.0.0.1:$RPORT HERALD_ADDR=127.0.0.1:$HPORT HERALD_LOG=warn "$B/herald" serve >"$WORK/herald-a.log" 2>&1 &
    a=$!
    HERALD_REDIS_URL=redis://127.0.0.1:$RPORT HERALD_ADDR=127.0.0.1:$((HPORT + 1)) HERALD_LOG=warn "$B/herald" serve >"$WORK/herald-b.log" 2>&1 &
    b=$!
    wait_port "$HPORT"; wait_port $((HPORT + 1))
    URL=http://127.0.0.1:$HPORT URL2=http://127.0.0.1:$((HPORT + 1))
    TARGET_ARGS=(--secret "$HERALD_JWT_HS256_SECRET" --api-key "$HERALD_API_KEY")
  else
    sockudo_config redis >"$WORK/sockudo-a.json"
    SPORT=$((SPORT + 1)) sockudo_config redis >"$WORK/sockudo-b.json"
    mkdir -p "$WORK/a" "$WORK/b"
    (cd "$WORK/a" && RUST_LOG=warn exec "$SOCKUDO" -c "$WORK/sockudo-a.json" >"$WORK/sockudo-a.log" 2>&1) &
    a=$!
    (cd "$WORK/b" && RUST_LOG=warn exec "$SOCKUDO" -c "$WORK/sockudo-b.json" >"$WORK/sockudo-b.log" 2>&1) &
    b=$!
    wait_port "$SPORT"; wait_port $((SPORT + 1))
    URL=http://127.0.0.1:$SPORT URL2=http://127.0.0.1:$((SPORT + 1))
    TARGET_ARGS=(--target sockudo --app-id "$APP_ID" --api-key "$APP_KEY" --secret "$APP_SECRET"
      --batch-max "$SOCKUDO_BATCH_MAX")
  fi
  echo "== fanout $1 two-nodes run $2" >&2
  "$B/herald-bench" fanout "${TARGET_ARGS[@]}" --url "$URL2" --publish-url "$URL" -n "$N" \
    --per-user "$PER_USER" --rate "$RATE" --duration "$DUR" --event-size "$PAD" \
    --server-pid "$a" --server-pid "$b" --redis-pid "$RP" \
    --floor "$B/floor" --json >"$OUT/fanout-$1-twonodes-$2.json"
  stop "$a" "$b"
  stop "$RP"
}

idle() { # $1 server, $2 run
  if [ "$1" = herald ]; then start_herald memory; else start_sockudo local; fi
  sleep 1
  echo "== idle $1 run $2" >&2
  "$B/herald-bench" idle "${TARGET_ARGS[@]}" --url "$URL" -n "$IDLE_N" --procs 2 \
    --duration 10 --server-pid "$SP" --json >"$OUT/idle-$1-$2.json"
  stop "$SP"
}

for run in $(seq "$RUNS"); do
  # Alternate which server goes first.
  if [ $((run % 2)) = 1 ]; then ORDER="herald sockudo"; else ORDER="sockudo herald"; fi
  [ -n "${SKIP_MEMORY:-}" ] || for s in $ORDER; do fanout "$s" memory "$run"; done
  [ -n "${SKIP_REDIS:-}" ] || for s in $ORDER; do fanout "$s" redis "$run"; done
  [ -z "${TWO_NODES:-}" ] || for s in $ORDER; do fanout2 "$s" "$run"; done
  [ -n "${SKIP_IDLE:-}" ] || for s in $ORDER; do idle "$s" "$run"; done
done

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def fig(d, prefix):
    for k, v in d["figures"]:
        if k.startswith(prefix):
            return v
    return "—"
print("| scenario | server | broker | run | deliveries/s | server CPU per delivery | floor | ÷ floor | p50 / p99 | lost / gaps | frame | Redis CPU per 1,000 publishes |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(out, "fanout-*.json"))):
    _, server, broker, run = os.path.basename(f)[:-5].split("-")
    d = json.load(open(f))
    p = d.get("latency_us") or {}
    rx = fig(d, "deliveries received").split("(")[-1].rstrip(")")
    print(f"| fanout | {server} | {broker} | {run} | {rx} | {fig(d, 'server CPU per delivery')} "
          f"| {fig(d, 'kernel floor')} | {fig(d, 'server CPU per delivery ÷')} "
          f"| {p.get('p50', 0)/1000:.1f} / {p.get('p99', 0)/1000:.1f} ms "
          f"| {fig(d, 'lost')} / {fig(d, 'seq gaps')} | {fig(d, 'mean')} | {fig(d, 'Redis CPU')} |")
print()
print("| scenario | server | run | connections | RSS before → with | RSS per idle connection | after 10 s | CPU while idle |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(out, "idle-*.json"))):
    _, server, run = os.path.basename(f)[:-5].split("-")
    d = json.load(open(f))
    print(f"| idle | {server} | {run} | {d['connections']} ({d['failed_connections']} failed) "
          f"| {fig(d, 'server RSS before')} → {fig(d, 'server RSS with')} "
          f"| {fig(d, 'RSS per idle connection')} | {fig(d, 'RSS per idle connection after')} "
          f"| {fig(d, 'server CPU while idle')} |")
PY
