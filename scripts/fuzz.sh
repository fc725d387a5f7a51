#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (see fuzz/README.md) for a bounded time each:
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
#
# Prints each target's executions and the total; exits non-zero if any target crashed (a
# panic, a timeout of 10 s on one input, or running out of memory), with the input saved
# under fuzz/artifacts/TARGET/. Reproduce one with `RUSTC_BOOTSTRAP=1 cargo fuzz run
# TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Works on a fresh Debian machine with rustup: installs a C++ compiler (libFuzzer is C++)
# and cargo-fuzz when missing. cargo-fuzz passes -Z flags to rustc, which the stable
# toolchain takes only with RUSTC_BOOTSTRAP=1. Honours CARGO_TARGET_DIR (default
# fuzz/target).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-20}"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || {
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
}
targets=(client_frame server_frame push_len page_message worker_message schema filter text_update token)

say() { printf 'fuzz: %s\n' "$*"; }

if ! command -v c++ >/dev/null; then
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  say "installing g++ (libFuzzer is C++)"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends g++
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz 0.13.2"
  cargo install cargo-fuzz --version 0.13.2 --locked ||
    cargo install cargo-fuzz --version 0.13.2
fi

export RUSTC_BOOTSTRAP=1
target_dir="${CARGO_TARGET_DIR:-$root/fuzz/target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
say "building the targets (release, debug assertions, AddressSanitizer)"
build_started=$SECONDS
cargo fuzz build --target-dir "$target_dir"
say "built in $((SECONDS - build_started)) s"

# Each run starts from the checked-in seeds and adds what it finds to a scratch corpus, so
# fuzz/corpus keeps only the seeds. The scratch directory is also the targets' working
# directory: a schema's CREATE runs in SQLite, and an ATTACH there would make a file.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

total=0
failed=()
printf '\n%-16s %14s %10s  %s\n' target executions "per s" result
for t in "${targets[@]}"; do
  mkdir -p "$scratch/corpus/$t" "$root/fuzz/artifacts/$t"
  log="$scratch/$t.log"
  status=0
  (cd "$scratch" && "$target_dir/$triple/release/$t" \
    "$scratch/corpus/$t" "$root/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$root/fuzz/artifacts/$t/") >"$log" 2>&1 || status=$?
  # The final stats, or after a crash the last status line (#N ...).
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  [[ -n "$execs" ]] || execs="$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -1)"
  execs="${execs:-0}"
  total=$((total + execs))
  if ((status == 0)); then
    result=ok
  else
    result="FAILED (exit $status)"
    failed+=("$t")
    cp "$log" "$root/fuzz/artifacts/$t/last-run.log"
  fi
  printf '%-16s %14s %10s  %s\n' "$t" "$execs" "$((execs / seconds))" "$result"
done
printf '%-16s %14s\n' total "$total"

if ((${#failed[@]})); then
  for t in "${failed[@]}"; do
    printf '\n=== %s: tail of fuzz/artifacts/%s/last-run.log\n' "$t" "$t"
    tail -n 40 "$root/fuzz/artifacts/$t/last-run.log"
  done
  say "crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
say "no crash in ${#targets[@]} targets x ${seconds} s"
