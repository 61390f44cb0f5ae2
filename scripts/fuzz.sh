#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) with libFuzzer's coverage instrumentation on
# the stable toolchain — the flags `cargo fuzz build --sanitizer none` passes,
# so cargo-fuzz and a nightly toolchain are not needed — and runs each target
# for FUZZ_SECONDS (default 20) from its corpus. A crash, a panic or a leak
# report fails the script; the input that did it is kept in
# fuzz/artifacts/<target>/ (replay: fuzz/target/<host triple>/release/<target> <file>).
#
#   bash scripts/fuzz.sh                 # every target, 20 s each
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh json_compact
#   FUZZ_PROFILE=dev bash scripts/fuzz.sh   # CI: the quickest build (fuzz/Cargo.toml)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

SECONDS_EACH=${FUZZ_SECONDS:-20}
PROFILE=${FUZZ_PROFILE:-release}
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
  TARGETS=(names json_compact route_payload config_toml)
fi
# Its own target dir: these flags differ from the main build's, and sharing
# one dir would make each build throw the other's artifacts away.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

# An explicit --target keeps these flags off build scripts and proc macros
# (they would not link without libFuzzer), as cargo-fuzz does.
HOST=$(rustc -vV | sed -n 's/^host: //p')
# The gateway's own lock file, so the targets build against exactly the
# versions the gateway is tested with (cargo adds only libFuzzer's crates).
cp ../Cargo.lock Cargo.lock
cargo build --profile "$PROFILE" --bins --target "$HOST"
# cargo names the dev profile's directory `debug`.
OUT_DIR=$CARGO_TARGET_DIR/$HOST/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
for target in "${TARGETS[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "fuzz: $target for ${SECONDS_EACH}s"
  log="artifacts/$target/last-run.log"
  status=0
  "$OUT_DIR/$target" -max_total_time="$SECONDS_EACH" \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 "corpus/$target" \
    >"$log" 2>&1 || status=$?
  grep -E '^(#[0-9]+ +(DONE|INITED)|stat::number_of_executed_units|==[0-9]+==|.*panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" || true
  if [[ $status -ne 0 ]]; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed (exit $status); input kept in fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
