#!/usr/bin/env bash
# Installs what building and testing Hearth needs on a fresh machine of the project's kind
# (Debian 12, Rust via rustup, node >= 20). Safe to run again: each step checks first and
# does nothing when its tool is already there at the right version.
#
#   clang-19          SQLite's C for wasm32 (Debian's default clang 14 cannot compile it)
#   chromium,
#   chromium-driver   the browser for wasm-bindgen-test and the playwright-core e2e tests
#   wasm32 target     std for wasm32-unknown-unknown
#   wasm-bindgen-cli  wasm-bindgen-test-runner, at exactly the wasm-bindgen version in Cargo.lock
#   playwright-core   the e2e driver, pinned in tests/e2e/package-lock.json (no browser download),
#                     with typescript (tsc for tests/types) and react, react-dom (the hooks' test)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { printf 'setup: %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------
missing=()
command -v clang-19 >/dev/null || missing+=(clang-19)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if ((${#missing[@]})); then
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  say "installing ${missing[*]}"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
else
  say "clang-19, chromium and chromium-driver are installed"
fi

# --- Rust target -----------------------------------------------------------------------
if rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "rust target wasm32-unknown-unknown is installed"
else
  rustup target add wasm32-unknown-unknown
fi

# --- wasm-bindgen-cli at the version in Cargo.lock -----------------------------------------
# `cargo pkgid` writes Cargo.lock first if it is missing, and names the locked version.
wanted="$(cargo pkgid -p wasm-bindgen 2>/dev/null | sed 's/.*[@#]//')"
if [[ -z "$wanted" ]]; then
  echo "setup: cannot read the wasm-bindgen version from Cargo.lock" >&2
  exit 1
fi
have="$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)"
if [[ "$have" == "$wanted" ]] && command -v wasm-bindgen-test-runner >/dev/null; then
  say "wasm-bindgen-cli $have is installed"
else
  say "installing wasm-bindgen-cli $wanted (had: ${have:-none})"
  # No --locked: the registry here can lag a patch behind the CLI's own lockfile and
  # then refuses it.
  cargo install wasm-bindgen-cli --version "$wanted" --force
fi

# --- playwright-core for the e2e tests --------------------------------------------------
if ! command -v node >/dev/null || (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then
  echo "setup: node >= 20 is needed for tests/e2e (playwright-core)" >&2
  exit 1
fi
e2e="$root/tests/e2e"
# playwright-core, TypeScript (tsc for tests/types) and React (for the hooks' browser
# test), each at the version pinned in tests/e2e/package-lock.json.
stale=""
for package in playwright-core typescript react react-dom; do
  wanted="$(node -p "require('$e2e/package-lock.json').packages['node_modules/$package'].version")"
  have="$(node -p "require('$e2e/node_modules/$package/package.json').version" 2>/dev/null || true)"
  [[ "$have" == "$wanted" ]] || stale+=" $package@$wanted"
done
if [[ -z "$stale" ]]; then
  say "playwright-core, typescript, react and react-dom are installed in tests/e2e"
else
  say "installing$stale in tests/e2e"
  (cd "$e2e" && npm ci --no-audit --no-fund)
fi

say "done"
