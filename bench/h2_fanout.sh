#!/bin/bash
# Fan-out deliveries/s over HTTPS: HTTP/2 (streams multiplexed on a few
# connections) vs HTTP/1.1 over TLS (a connection per stream), the same load
# generator and the same load (BENCHMARKS.md "HTTPS: fan-out, HTTP/2 vs HTTP/1.1").
# A fresh gateway (`serve --dev-tls`, release, shipped config.toml) and data
# dir per run; runs alternate h2, h1, h2, h1 … for ROUNDS rounds.
#
# usage: bash bench/h2_fanout.sh   (after: cargo build --release --bin sse-gateway --example loadgen)
#   ROUNDS=3 SUBS=500 EVENTS=1000 PER_CONN=100 PUBLISHERS=8 PORT=18444
set -euo pipefail
T=${CARGO_TARGET_DIR:-target}/release
ROUNDS=${ROUNDS:-3}
SUBS=${SUBS:-500}
EVENTS=${EVENTS:-1000}
PER_CONN=${PER_CONN:-100}
PUBLISHERS=${PUBLISHERS:-8}
PORT=${PORT:-18444}
ulimit -n "$(ulimit -Hn)"
echo "inputs: subscribers=$SUBS events=$EVENTS publishers=$PUBLISHERS (TLS HTTP/1.1) h2_streams_per_connection=$PER_CONN payload_bytes=256 rounds=$ROUNDS nproc=$(nproc)"

# utime + stime of a process, in clock ticks.
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

run() {
  local mode=$1 dir pid
  dir=$(mktemp -d)
  RUST_LOG=warn "$T/sse-gateway" serve --dev-tls --data-dir "$dir/d" --listen "127.0.0.1:$PORT" \
    --config config.toml > "$dir/out" 2> "$dir/err" &
  pid=$!
  for _ in $(seq 100); do
    if [[ -f $dir/d/dev-tls/cert.pem ]] &&
      curl -sf --cacert "$dir/d/dev-tls/cert.pem" "https://127.0.0.1:$PORT/readyz" > /dev/null; then
      break
    fi
    sleep 0.1
  done
  local h2=() before after line
  [[ $mode == h2 ]] && h2=(--sub-http2 --h2-streams-per-connection "$PER_CONN")
  before=$(cpu_ticks "$pid")
  line=$("$T/examples/loadgen" --scenario fanout --label "$mode" --ca-file "$dir/d/dev-tls/cert.pem" \
    --pub-url "https://127.0.0.1:$PORT/topics/{topic}" --sub-url "https://127.0.0.1:$PORT/topics/{topic}" \
    --subscribers "$SUBS" --events "$EVENTS" --publishers "$PUBLISHERS" "${h2[@]}" | grep '^summary')
  after=$(cpu_ticks "$pid")
  # The gateway's CPU time (user + system) over the run, whole: less
  # sensitive than deliveries/s to what else the machine runs.
  local delivered=${line##* delivered=}
  delivered=${delivered%% *}
  echo "$line server_cpu_s=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }') server_cpu_us_per_delivery=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v d="$delivered" 'BEGIN { printf "%.2f", t / hz * 1e6 / d }')"
  kill "$pid"
  wait "$pid" || true
  rm -rf "$dir"
}

for round in $(seq "$ROUNDS"); do
  run h2
  run h1
done
