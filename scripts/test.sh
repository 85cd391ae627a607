#!/usr/bin/env bash
# Every test of the project: Rust (unit, property and integration tests against
# the real server) and the browser client (Node unit tests and the Chromium
# end-to-end test against a real `herald serve`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked
cargo build --locked -p herald --bin herald   # the binary the JS tests start

if ! command -v node >/dev/null; then
  echo "scripts/test.sh: node is required for the client tests" >&2
  exit 1
fi
chromium_bin="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium_bin" ]; then
  echo "scripts/test.sh: $chromium_bin not found (Debian: apt-get install chromium; or set CHROMIUM)" >&2
  exit 1
fi
cd clients/js
[ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund
npm test
