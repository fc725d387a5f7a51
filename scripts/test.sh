#!/usr/bin/env bash
# Runs every Hearth test, after installing what they need on a fresh machine
# (scripts/setup.sh). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*"; }
started=$SECONDS

step "setup"
bash scripts/setup.sh

step "format"
cargo fmt --all --check

step "lint (native, then the browser crates for wasm32)"
cargo clippy --workspace --all-targets --release -- -D warnings
# The engine's own tests are native (their dev-dependencies do not build for
# wasm32), so only its library is linted there.
cargo clippy --target wasm32-unknown-unknown -p hearth-engine --release -- -D warnings
cargo clippy --target wasm32-unknown-unknown -p hearth-bridge -p hearth-worker -p hearth-page --all-targets --release -- -D warnings

step "the engine builds for the browser"
cargo check -p hearth-engine --target wasm32-unknown-unknown

step "native tests: engine, server, CLI, integration over real sockets, simulation"
cargo test --release --workspace

# Fuzzing builds its own (instrumented) copy of the crates, so it runs in the background
# beside the browser tests, which mostly wait on the browser, and is checked at the end.
step "fuzzing every decoder of network and page bytes, 12 s per target (in the background)"
fuzz_log="$(mktemp)"
bash scripts/fuzz.sh 12 >"$fuzz_log" 2>&1 &
fuzz_pid=$!

step "wasm tests in headless Chromium (SharedWorker, IndexedDB)"
cargo test --release -p hearth-worker --target wasm32-unknown-unknown

if true; then
  step "browser end-to-end tests against the real server"
  tests/e2e/run.sh
fi

step "fuzzing results"
if ! wait "$fuzz_pid"; then
  cat "$fuzz_log"
  echo "fuzzing found a crash (or could not run): see above" >&2
  exit 1
fi
grep -E '^(target|total|[a-z_]+ +[0-9]+ )|^fuzz: (built|no crash)' "$fuzz_log" || cat "$fuzz_log"

step "all tests passed in $((SECONDS - started)) s"
