#!/usr/bin/env bash
# Fuzzes every decoder that reads untrusted bytes (fuzz/src/lib.rs: REST JSON, the binary
# extension splitter, gRPC ModelInfer, batch concat/split, the config parser) with libFuzzer
# and AddressSanitizer, SECONDS per target (default 60). Runs on the pinned stable toolchain:
# cargo-fuzz's nightly-only flags (-Zsanitizer) are unlocked with RUSTC_BOOTSTRAP=1. Prints
# executions per target; every crash is copied to fuzz/regressions/<target>/, where
# `cargo test -p sluice-fuzz` replays it from then on. Exits 1 if any target crashed.
# FUZZ_TARGETS="batch config" limits the run to those targets.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
targets="${FUZZ_TARGETS:-rest_json rest_binary grpc_infer batch config}"
want="0.13.2"
if ! cargo fuzz --version 2>/dev/null | grep -q "$want"; then
  echo "installing cargo-fuzz $want" >&2
  cargo install --locked --quiet cargo-fuzz --version "$want"
fi
export RUSTC_BOOTSTRAP=1
dir=fuzz/libfuzzer
# Start from the main workspace's versions (the harness is its own workspace).
[ -f "$dir/Cargo.lock" ] || cp Cargo.lock "$dir/Cargo.lock"
cargo run --quiet -p sluice-fuzz --example seeds -- "$dir/corpus"
echo "building the fuzz targets (release, debug assertions, ASan)" >&2
cargo fuzz build --fuzz-dir "$dir" 2>&1 | tail -n 3 >&2
status=0
printf '%-12s %12s %10s %8s %s\n' target executions exec/s crashes corpus >&2
for t in $targets; do
  mkdir -p "$dir/artifacts/$t" "$dir/logs"
  log="$dir/logs/$t.log"
  ok=1
  cargo fuzz run --fuzz-dir "$dir" "$t" "$dir/corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -artifact_prefix="$dir/artifacts/$t/" >"$log" 2>&1 || ok=0
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n 1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -n 1)
  crashes=0
  for f in "$dir/artifacts/$t"/crash-* "$dir/artifacts/$t"/oom-* "$dir/artifacts/$t"/timeout-*; do
    [ -e "$f" ] || continue
    crashes=$((crashes + 1))
    mkdir -p "fuzz/regressions/$t"
    cp "$f" "fuzz/regressions/$t/"
  done
  if [ "$ok" = 0 ] || [ "$crashes" -gt 0 ]; then
    status=1
    echo "$t crashed; see $log and fuzz/regressions/$t/" >&2
  fi
  printf '%-12s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes" "$(ls "$dir/corpus/$t" | wc -l)" >&2
done
exit "$status"
