#!/usr/bin/env bash
# Side-by-side benchmark: sse-gateway (durable, fsynced) vs Nchan (memory store).
#
#   bash bench/compare.sh            # everything: install, build, run, table
#   ROUNDS=1 QUICK=1 bash bench/compare.sh    # smaller counts for a smoke run
#   ONLY='idle replay' bash bench/compare.sh  # some scenarios only
#
# Installs nginx + libnginx-mod-nchan from Debian when missing, builds the
# gateway and the load generator (release), starts both servers on loopback
# ports with temp dirs, runs every scenario on both alternately (ours, Nchan,
# ours, Nchan … for ROUNDS rounds; both restarted fresh every round), and prints a table of medians and ratios.
# Raw `summary` lines go to $OUT/results.txt. Only loopback is used.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
OURS_PORT=${OURS_PORT:-18080}
NCHAN_PORT=${NCHAN_PORT:-18081}
OUT=${OUT:-$(mktemp -d /tmp/sse-compare.XXXXXX)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# Workload sizes (QUICK=1 shrinks them for a smoke run).
if [[ "${QUICK:-0}" == 1 ]]; then
  PUB_EVENTS=5000 FAN_SUBS=200 FAN_EVENTS=200 LAT_SUBS=200 IDLE=1000
  REPLAY=10000 STORM=1000 BEHIND=200 LAT_SECS=2 IDLE_MAX=2000
else
  PUB_EVENTS=40000 FAN_SUBS=1000 FAN_EVENTS=1000 LAT_SUBS=1000 IDLE=10000
  REPLAY=100000 STORM=10000 BEHIND=1000 LAT_SECS=5
  # The most one process holds under the 20,000 open-files hard limit, with
  # room for the servers' own files and the client's.
  IDLE_MAX=${IDLE_MAX:-19000}
fi

ulimit -n "$(ulimit -Hn)"

need_pkgs=()
[[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx)
[[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]] || need_pkgs+=(libnginx-mod-nchan)
command -v python3 >/dev/null || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
  echo "installing ${need_pkgs[*]} from Debian"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}"
fi

cargo build --release --bin sse-gateway --example loadgen
GATEWAY=$CARGO_TARGET_DIR/release/sse-gateway
LOADGEN=$CARGO_TARGET_DIR/release/examples/loadgen

NDIR=$OUT/nchan
GDIR=$OUT/gateway
GATEWAY_PID=
mkdir -p "$NDIR"
chmod 755 "$OUT" "$NDIR"

# Starts both servers fresh (new gateway data dir, new Nchan memory store), so
# every round starts from the same state and the idle RSS figures are not
# flattered by memory that an earlier scenario freed.
start_servers() {
  # Nchan: the config is documented in bench/nchan.conf.
  sed -e "s#@DIR@#$NDIR#g" -e "s#@PORT@#$NCHAN_PORT#g" bench/nchan.conf > "$NDIR/nginx.conf"
  /usr/sbin/nginx -c "$NDIR/nginx.conf" -e "$NDIR/error.log"
  # Ours: the defaults, with the per-client limits lifted: every benchmark
  # client comes from 127.0.0.x, so per-IP caps would measure the limiter.
  rm -rf "$GDIR" && mkdir -p "$GDIR/data"
  {
    echo '[server]'
    echo "listen = \"127.0.0.1:$OURS_PORT\""
    echo '[storage]'
    echo 'backend = "sled"'
    echo "data_dir = \"$GDIR/data\""
    echo '[retention]'
    echo 'max_events_per_topic = 1000000'
    echo '[limits]'
    echo 'max_connections = 19500'
    echo 'max_connections_per_ip = 19500'
    echo 'publish_rate_per_ip = 1000000000'
    echo 'publish_rate_per_token = 1000000000'
    echo 'publish_burst = 1000000000'
  } > "$GDIR/config.toml"
  RUST_LOG=warn "$GATEWAY" serve --config "$GDIR/config.toml" >> "$OUT/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$OURS_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  for _ in $(seq 50); do [[ -s $NDIR/nginx.pid ]] && break; sleep 0.1; done
  NGINX_PIDS=$(pgrep -d, -P "$(cat "$NDIR/nginx.pid")" || true)
  NGINX_PIDS="$(cat "$NDIR/nginx.pid")${NGINX_PIDS:+,$NGINX_PIDS}"
  OURS_ARGS=(--label ours
    --pub-url "http://127.0.0.1:$OURS_PORT/topics/{topic}" --pub-body '{"data":{payload}}'
    --sub-url "http://127.0.0.1:$OURS_PORT/topics/{topic}" --from-start-id 0
    --rss-pids "$GATEWAY_PID")
  NCHAN_ARGS=(--label nchan
    --pub-url "http://127.0.0.1:$NCHAN_PORT/pub?id={topic}" --pub-body '{payload}'
    --sub-url "http://127.0.0.1:$NCHAN_PORT/sub/{topic}" --from-start-id ''
    --rss-pids "$NGINX_PIDS")
}

stop_servers() {
  if [[ -n $GATEWAY_PID ]]; then
    kill "$GATEWAY_PID" 2>/dev/null || true
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=
  fi
  if [[ -s $NDIR/nginx.pid ]]; then
    local pid
    pid=$(cat "$NDIR/nginx.pid")
    kill -QUIT "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}
trap stop_servers EXIT

# name | loadgen arguments
SCENARIOS=(
  "idle|--scenario idle --subscribers $IDLE"
  "idlemax|--scenario idle --subscribers $IDLE_MAX"
  "publish|--scenario publish --publishers 32 --events $PUB_EVENTS"
  "fanout|--scenario fanout --subscribers $FAN_SUBS --publishers 4 --events $FAN_EVENTS --timeout-s 90"
  "latency10|--scenario latency --subscribers $LAT_SUBS --rate 10 --duration-s $LAT_SECS --timeout-s 60"
  "latency1000|--scenario latency --subscribers $LAT_SUBS --rate 1000 --duration-s $LAT_SECS --timeout-s 90"
  "replay|--scenario replay --publishers 32 --events $REPLAY --timeout-s 180"
  "storm|--scenario storm --subscribers $STORM --behind $BEHIND --publishers 32 --timeout-s 120"
)

{
  echo "machine: $(nproc) cores, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "started: $(date -u +%FT%TZ) loadavg: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

RESULTS=$OUT/results.txt
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  start_servers
  fresh=1
  for entry in "${SCENARIOS[@]}"; do
    name=${entry%%|*}
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || continue
    # Memory is measured on servers that never held anything: after another
    # scenario, freed memory the allocator kept would flatter the figure (and
    # Nchan notices closed idle subscribers only when it next writes to them).
    if [[ $name == idle* && $fresh == 0 ]]; then
      stop_servers
      start_servers
    fi
    fresh=0
    read -r -a sargs <<< "${entry#*|}"
    for server in ours nchan; do
      if [[ $server == ours ]]; then extra=("${OURS_ARGS[@]}"); else extra=("${NCHAN_ARGS[@]}"); fi
      line=$("$LOADGEN" "${sargs[@]}" "${extra[@]}" --topic "r$round" 2>>"$OUT/loadgen.err" | grep '^summary' || echo "summary scenario=$name label=$server failed=1")
      echo "round=$round name=$name $line" | tee -a "$RESULTS"
      sleep 1
    done
  done
  stop_servers
done

echo "finished: $(date -u +%FT%TZ) loadavg: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
python3 bench/table.py "$RESULTS" | tee "$OUT/table.md"
echo "raw results: $RESULTS"
