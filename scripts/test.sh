#!/usr/bin/env bash
# Every test of the project: Rust (unit, property and integration tests against
# the real server), RFC 6455 conformance (the Autobahn|Testsuite against the
# binary), the browser client (Node tests, the Chromium end-to-end tests of the
# demo page and of the React example) and the Python SDK.
#
# What the tests need and a fresh machine may lack is installed here: Debian's
# chromium and redis-server (as root, with apt-get), the JS client's and the
# React example's npm packages (into their node_modules), the Python SDK with
# its test dependencies (into clients/python/.venv) and the Autobahn suite
# (Python 2.7, into target/autobahn); git ignores all of them. Anywhere else
# the script says exactly what to install and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install PACKAGE BINARY: install a Debian package when BINARY is missing.
apt_install() {
  local package="$1" binary="$2"
  [ -x "$binary" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing $package (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
  fi
  if [ ! -x "$binary" ]; then
    echo "scripts/test.sh: $binary not found; install it (Debian: apt-get install $package)" >&2
    exit 1
  fi
}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "scripts/test.sh: Node.js >= 20 with npm is required for the client tests (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
apt_install redis-server /usr/bin/redis-server
apt_install redis-sentinel /usr/bin/redis-sentinel   # the Sentinel failover drill
apt_install openssl /usr/bin/openssl
apt_install curl /usr/bin/curl   # the README tour test runs its curl commands
if [ -z "${CHROMIUM:-}" ]; then
  apt_install chromium /usr/bin/chromium
elif [ ! -x "$CHROMIUM" ]; then
  echo "scripts/test.sh: CHROMIUM=$CHROMIUM is not an executable" >&2
  exit 1
fi
if [ ! -d clients/js/node_modules/playwright-core ] || [ ! -x clients/js/node_modules/.bin/tsc ]; then
  (cd clients/js && npm ci --no-audit --no-fund)
fi
# The React example (useChat over HeraldChatTransport), built by its test.
if [ ! -x clients/js/examples/react-chat/node_modules/.bin/esbuild ]; then
  (cd clients/js/examples/react-chat && npm ci --no-audit --no-fund)
fi

echo "scripts/test.sh: cargo test ($(date +%T))" >&2
cargo test --workspace --locked
# The binary the JS, Python and Autobahn tests start: `cargo test` built it
# for the integration tests (a separate `cargo build` would resolve features
# without the dev-dependencies and compile the server again, a minute here).
if [ ! -x target/debug/herald ]; then
  echo "scripts/test.sh: cargo test left no target/debug/herald" >&2
  exit 1
fi

# RFC 6455 conformance (Autobahn|Testsuite, cases 1-10) against /echo.
echo "scripts/test.sh: autobahn ($(date +%T))" >&2
scripts/autobahn.sh target/debug/herald

echo "scripts/test.sh: JS ($(date +%T))" >&2
(cd clients/js && npm test)
echo "scripts/test.sh: Python ($(date +%T))" >&2

# The Python SDK (clients/python) against the same binary.
if ! command -v python3 >/dev/null; then
  echo "scripts/test.sh: python3 (>= 3.9, with venv) is required for the Python SDK tests" >&2
  exit 1
fi
venv=clients/python/.venv
if [ ! -x "$venv/bin/pytest" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e 'clients/python[test]'
fi
HERALD_BIN="$PWD/target/debug/herald" "$venv/bin/python" -m pytest -q clients/python
