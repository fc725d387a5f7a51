#!/usr/bin/env bash
# Browser end-to-end tests: builds the `hearth` binary (which embeds the wasm client),
# makes sure playwright-core (and TypeScript, React) are installed, type-checks the
# examples in tests/types against web/hearth.d.ts, and runs tests/e2e/e2e.mjs against the real
# server in Debian's Chromium. Its last line is "N passed, M failed"; the exit code is
# non-zero on any failure. (scripts/test.sh runs this after the wasm-bindgen tests.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
for package in playwright-core typescript react react-dom; do
  if [[ ! -d tests/e2e/node_modules/$package ]]; then
    (cd tests/e2e && npm ci --no-audit --no-fund)
    break
  fi
done
# The examples in tests/types must type-check against web/hearth.d.ts (about a second).
tests/e2e/node_modules/.bin/tsc --noEmit -p tests/types
echo "ok   tests/types type-check against web/hearth.d.ts"
cargo build --release --locked --bin hearth
HEARTH_BIN="${HEARTH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/hearth}" exec node tests/e2e/e2e.mjs
