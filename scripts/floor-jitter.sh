#!/usr/bin/env bash
# The kernel floor with and without jitter in when each connection is written:
# builds ../shared/bench/floor.c as is and a variant (patched here, at build
# time) that writes each 10-ms batch's connections in a random order, so a
# connection's gaps are N/RATE ± 10 ms instead of exactly N/RATE — as a
# gateway's are, whose deliveries leave when its batches are processed. Runs
# the two alternated and prints one JSON line each. At 10,000 connections and
# RATE 50000 the gap sits on the receiver's 200-ms RTO (docs/BENCHMARKS.md,
# "The floor's cliff at 200 ms per connection"); off it, jitter costs nothing.
# N (10000), RATE writes/s (50000), SIZE bytes (365), DUR s (10), RUNS (3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FLOOR_C="${FLOOR_C:-$ROOT/../shared/bench/floor.c}"
OUT="${OUT:-$ROOT/target/floor-jitter}"
mkdir -p "$OUT"
gcc -O2 -o "$OUT/floor" "$FLOOR_C"
python3 - "$FLOOR_C" "$OUT/floor-jitter.c" <<'PY'
import sys
src = open(sys.argv[1]).read()
loop = """    for (long b = 0; b < batch && done < d; b++, done++) {
      if (write(fds[next], frame, size) != size) fails++;
      if (++next == n) next = 0;
    }"""
jittered = """    long base = done, m = batch < d - done ? batch : d - done;
    for (long j = 0; j < m; j++) perm[j] = j;
    for (long j = m - 1; j > 0; j--) { long r = random() % (j + 1), t = perm[j]; perm[j] = perm[r]; perm[r] = t; }
    for (long b = 0; b < m; b++, done++) {
      next = (int)((base + perm[b]) % n);
      if (write(fds[next], frame, size) != size) fails++;
    }"""
batch = "  long batch = rate / 100 > 0 ? rate / 100 : 1; /* every 10 ms */\n"
if loop not in src or batch not in src:
    sys.exit("floor.c changed: this script's patch no longer applies")
src = src.replace(loop, jittered).replace(batch, batch + "  long *perm = malloc(sizeof(long) * batch); srandom(1);\n")
open(sys.argv[2], "w").write(src)
PY
gcc -O2 -o "$OUT/floor-jitter" "$OUT/floor-jitter.c"
N=${N:-10000} RATE=${RATE:-50000} SIZE=${SIZE:-365} DUR=${DUR:-10}
for run in $(seq "${RUNS:-3}"); do
  for prog in floor floor-jitter; do
    echo "$prog $("$OUT/$prog" "$N" $((RATE * DUR)) "$SIZE" "$RATE")"
  done
done
