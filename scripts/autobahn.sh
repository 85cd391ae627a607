#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn|Testsuite fuzzing client, cases 1-10
# (all but 12-13, which need permessage-deflate), against `herald serve` with
# the test-only echo endpoint (/echo: the same actor, lifecycle and writer as
# /ws). Prints the summary; fails on any FAILED case and on any NON-STRICT or
# UNIMPLEMENTED case not explained in docs/RELIABILITY.md ("Autobahn").
#
# The suite runs on Python 2.7 (pyenv's 2.7.18 here, or PYTHON2=/path); it is
# installed on first use into target/autobahn/site (ignored by git).
#   scripts/autobahn.sh [path/to/herald]   (default target/debug/herald)
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/debug/herald}"
out=target/autobahn
site="$out/site"

python2="${PYTHON2:-}"
if [ -z "$python2" ]; then
  # pyenv's shim answers `python2.7` even when it cannot run it: try each.
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python "$(command -v python2.7 || true)"; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
      python2="$p"; break
    fi
  done
fi
if [ -z "$python2" ]; then
  echo "scripts/autobahn.sh: Python 2.7 is needed for the Autobahn|Testsuite (pyenv install 2.7.18, or set PYTHON2=/path/to/python2.7)" >&2
  exit 1
fi
if [ ! -f "$site/.installed" ]; then
  echo "scripts/autobahn.sh: installing autobahntestsuite into $site" >&2
  rm -rf "$site"
  "$python2" -m pip install --disable-pip-version-check -q --target "$site" 'autobahntestsuite==25.10.1' 2>&1 \
    | grep -v -e DEPRECATION -e 'pip version' >&2 || true
  "$python2" -c "import site; site.addsitedir('$site'); import autobahntestsuite" 
  touch "$site/.installed"
fi

# A free loopback port for herald (the suite needs a URL before it starts).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$out/report" && mkdir -p "$out"
HERALD_ADDR="127.0.0.1:$port" HERALD_ECHO_ENDPOINT=true HERALD_LOG=error \
  HERALD_JWT_HS256_SECRET=autobahn-secret-0123456789abcdefghijkl HERALD_API_KEY=autobahn-key-0123456789 \
  "$bin" serve >"$out/herald.log" 2>&1 &
herald=$!
trap 'kill $herald 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done

cat >"$out/fuzzingclient.json" <<EOF
{
  "outdir": "report",
  "servers": [{"agent": "herald", "url": "ws://127.0.0.1:$port/echo"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
started=$(date +%s)
(cd "$out" && "$python2" -c "
import site, sys
site.addsitedir('site')
sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', 'fuzzingclient.json']
from autobahntestsuite.wstest import run
run()
") >"$out/wstest.log" 2>&1 || { tail -20 "$out/wstest.log" >&2; exit 1; }
echo "autobahn: cases 1-10 (all but compression) in $(( $(date +%s) - started )) s (report: $out/report/index.html)"

# The verdict: counts per behavior; every FAILED case, and every NON-STRICT
# or UNIMPLEMENTED one not explained in docs/RELIABILITY.md, fails the run.
python3 - "$out/report/index.json" <<'EOF'
import json, sys
from collections import Counter
report = json.load(open(sys.argv[1]))["herald"]
counts = Counter(r["behavior"] for r in report.values())
closes = Counter(r["behaviorClose"] for r in report.values())
print("autobahn: %d cases: %s" % (len(report), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
print("autobahn: close behavior: %s" % ", ".join("%s %d" % kv for kv in sorted(closes.items())))
# Non-strict outcomes that are understood (docs/RELIABILITY.md, "Autobahn").
explained = {"6.4.3", "6.4.4"}
bad = []
for case, r in sorted(report.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]):
    if r["behavior"] == "FAILED" or r["behaviorClose"] == "FAILED":
        bad.append("%s FAILED (%s / close %s)" % (case, r["behavior"], r["behaviorClose"]))
    elif r["behavior"] in ("NON-STRICT", "UNIMPLEMENTED") and case not in explained:
        bad.append("%s %s (not explained)" % (case, r["behavior"]))
for line in bad:
    print("autobahn: " + line)
sys.exit(1 if bad else 0)
EOF
