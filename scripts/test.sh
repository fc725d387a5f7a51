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

step "wasm tests in headless Chromium (SharedWorker, IndexedDB)"
cargo test --release -p hearth-worker --target wasm32-unknown-unknown

if true; then
  step "browser end-to-end tests against the real server"
  tests/e2e/run.sh
fi

step "all tests passed in $((SECONDS - started)) s"
