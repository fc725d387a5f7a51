#!/usr/bin/env bash
# Runs Hearth: the sync server with its embedded SQLite store and the demo app,
# on http://127.0.0.1:8787 (data in ./hearth-data). Extra arguments go to
# `hearth serve`, e.g. `scripts/run.sh --listen 0.0.0.0:8787 --schema app.toml`.
#
# On a fresh machine it first installs what the build needs: clang-19 (SQLite's
# C for the browser's wasm) and Rust's wasm32 target. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v clang-19 >/dev/null; then
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  echo "run: installing clang-19"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends clang-19
fi
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

exec cargo run --release -- serve "$@"
