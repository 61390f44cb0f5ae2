#!/usr/bin/env bash
# Soak: one gateway under steady mixed load for DURATION seconds (default 3600).
#
#   bash bench/soak.sh            # one hour
#   bash bench/soak.sh 240        # a short trial
#
# Builds the gateway and the load generator (release), starts the gateway on
# a loopback port in a temp data dir with the config below (small sled cache,
# retention on so the trimmer always works, a small live ring so slow readers
# fall back to the log, publish rate limits off), runs `loadgen --scenario
# soak` with the gateway's pid (RSS and fds sampled every 30 s), then samples
# the gateway once more after the load generator has exited (fds back to
# baseline?), stops the gateway, and keeps everything in
# bench/soak-<UTC date-time>.txt. Plot: python3 bench/plot_soak.py that-file.
# Exits non-zero when the load generator saw a gap or a duplicate.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${1:-3600}
PORT=${PORT:-18090}
RATE=${RATE:-200}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=${OUT:-bench/soak-$STAMP.txt}
WORK=$(mktemp -d /tmp/sse-soak.XXXXXX)
GATEWAY_PID=

ulimit -n "$(ulimit -Hn)"
# SKIP_BUILD=1 runs the binaries already in $CARGO_TARGET_DIR/release as they are.
[[ ${SKIP_BUILD:-0} == 1 ]] || cargo build --release --bin sse-gateway --example loadgen
GATEWAY=$CARGO_TARGET_DIR/release/sse-gateway
LOADGEN=$CARGO_TARGET_DIR/release/examples/loadgen

stop_gateway() {
  if [[ -n $GATEWAY_PID ]]; then
    kill "$GATEWAY_PID" 2>/dev/null || true
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=
  fi
  rm -rf "$WORK"
}
trap stop_gateway EXIT

# One process's RSS (KiB) and open fds, as `rss_kib=… fds=…`.
probe() {
  echo "rss_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$1/status") fds=$(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l)"
}

mkdir -p "$WORK/data"
cat > "$WORK/config.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"

[storage]
backend = "sled"
data_dir = "$WORK/data"
# Small, so sled's page cache is full within minutes and RSS can level off.
# A heap profile of this load at 16 MiB (BENCHMARKS.md "Soak: sixth hour")
# found sled's cached nodes at 5-9 MiB, moving with the working set: never
# full. At 4 MiB the working set is larger than the cache, so it stays full.
cache_capacity_bytes = 4194304

[stream]
# Small, so the slow readers fall behind it and are served from the log.
live_buffer_events = 1024

[retention]
# A few thousand per topic: the trimmer removes events every second.
max_events_per_topic = 5000
trim_interval_ms = 1000

[limits]
max_connections = 5000
max_connections_per_ip = 5000
# Off (0 = no limit): every client is on 127.0.0.x.
publish_rate_per_ip = 0
publish_rate_per_token = 0
CONF

RUST_LOG=warn "$GATEWAY" serve --config "$WORK/config.toml" > "$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 1

{
  echo "soak: duration_s=$DURATION rate=$RATE port=$PORT started=$(date -u +%FT%TZ)"
  echo "machine: nproc=$(nproc) mem_total_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo) kernel=$(uname -r) cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs | tr ' ' '_')"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src examples || echo '+dirty')"
  sed 's/^/config: /' "$WORK/config.toml"
  echo "baseline $(probe "$GATEWAY_PID") loadavg=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)"
} | tee "$OUT"

# The gateway's own view of its memory every 30 s, beside the load
# generator's RSS samples: process RSS and jemalloc's allocated / active /
# resident / retained bytes (src/process_memory.rs). When RSS moves, this
# says whether the program holds more (allocated) or the allocator keeps
# freed pages (resident - active).
memory_sampler() {
  local start=$SECONDS
  while kill -0 "$GATEWAY_PID" 2>/dev/null; do
    curl -sf "http://127.0.0.1:$PORT/metrics" |
      awk -v t=$((SECONDS - start)) '
        /^sse_gateway_(process_resident|heap_[a-z]+)_bytes / {
          name = $1; sub(/^sse_gateway_/, "", name); sub(/_bytes$/, "_kib", name)
          line = line " " name "=" int($2 / 1024)
        }
        END { if (line != "") print "memory t=" t line }' >> "$OUT" || true
    sleep 30
  done
}
memory_sampler &
SAMPLER_PID=$!

status=0
"$LOADGEN" --scenario soak --label ours --duration-s "$DURATION" --rate "$RATE" \
  --topics 6 --publishers 12 --subscribers 200 --churners 40 --slow 4 \
  --sample-s 30 --timeout-s 300 --pid "$GATEWAY_PID" --data-dir "$WORK/data" \
  --pub-url "http://127.0.0.1:$PORT/topics/{topic}" --pub-body '{"data":{payload}}' \
  --sub-url "http://127.0.0.1:$PORT/topics/{topic}" --from-start-id 0 \
  --events-url "http://127.0.0.1:$PORT/events" --topic soak \
  2> >(sed 's/^/stderr: /' >> "$OUT") | tee -a "$OUT" || status=$?

kill "$SAMPLER_PID" 2>/dev/null || true
# The load generator has exited: every client socket is closed. The gateway
# should be back to its baseline fds (give it a few seconds to notice).
sleep 5
# The gateway's own counters (lag fallbacks = slow readers served from the log).
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -v '^#' | head -100 | sed 's/^/metrics: /' >> "$OUT" || true
echo "after_exit $(probe "$GATEWAY_PID") loadavg=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,) finished=$(date -u +%FT%TZ)" | tee -a "$OUT"
grep -i -E 'warn|error' "$WORK/gateway.log" | head -20 | sed 's/^/gateway_log: /' | tee -a "$OUT" || true
echo "raw output: $OUT"
exit "$status"
