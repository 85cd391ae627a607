#!/bin/bash
# Delivery cost: one shared thread of 100 members vs 100 user streams vs one user with 100 connections, 20,000 deliveries/s.
cd "$(dirname "$0")/.."
export HERALD_JWT_HS256_SECRET=bench-secret-0123456789-abcdefghijklm HERALD_API_KEY=bench-api-key-0123456789
run() {
  label=$1; shift
  HERALD_MAX_CONNECTIONS_PER_USER=100 HERALD_ADDR=127.0.0.1:18080 HERALD_LOG=warn ./target/release/herald serve 2>/dev/null &
  SP=$!
  sleep 1
  echo "== $label"
  ./target/release/herald-bench fanout --url http://127.0.0.1:18080 --secret $HERALD_JWT_HS256_SECRET --api-key $HERALD_API_KEY -n 100 --duration 15 --server-pid $SP "$@" 2>&1 | grep -vE "^\s*$|connecting|publishing"
  kill $SP; wait $SP 2>/dev/null
}
for i in 1 2; do
run "thread: 1 stream, 100 members, 200 events/s" --per-user 100 --thread --rate 200
run "user streams: 100 users, 1 connection each, 20000 events/s" --per-user 1 --rate 20000
run "one user, 100 connections, 200 events/s" --per-user 100 --rate 200
done
