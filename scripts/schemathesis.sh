#!/usr/bin/env bash
# Checks the running gateway against openapi.yaml with schemathesis:
#   bash scripts/schemathesis.sh
# Installs a pinned schemathesis into a venv under the cargo target dir
# (apt-installs python3-venv if venvs cannot be made), builds and starts the
# debug binary on a free loopback port with a temp data dir and a config whose
# streams end after ~1 s (so SSE responses can be read to the end), runs
# schemathesis with every check (its positive and negative data checks and
# ignored_auth included), stops the gateway, and exits
# non-zero on any failure. Honours CARGO_TARGET_DIR.
#   SCHEMATHESIS_MAX_EXAMPLES  examples per operation and phase (default 30)
#   SCHEMATHESIS_WORKERS       concurrent workers (default 1: CPython 3.11's ast.parse
#                              is not thread-safe, and hypothesis calls it)
#   SSE_GATEWAY_BIN            a gateway binary to test instead of building the debug one
#   SCHEMATHESIS_ARGS          more `schemathesis run` options (e.g. --seed N, --report har)
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-30}"
WORKERS="${SCHEMATHESIS_WORKERS:-1}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
VENV="$TARGET/schemathesis-venv"

step() { printf '\n==> %s\n' "$*"; }

# --- schemathesis in a venv --------------------------------------------------
make_venv() { rm -rf "$VENV" && python3 -m venv "$VENV" >/dev/null 2>&1; }

if [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != *"version $SCHEMATHESIS_VERSION" ]]; then
    step "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    command -v python3 >/dev/null 2>&1 || { echo "error: python3 is needed" >&2; exit 1; }
    if ! make_venv; then
        # Debian ships venv's ensurepip separately.
        if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
            echo "error: python3 -m venv fails and there is no root/sudo to apt-get install python3-venv" >&2
            exit 1
        fi
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends python3-venv
        make_venv
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$VENV/bin/schemathesis" --version

# --- the gateway ---------------------------------------------------------------
if [[ -n "${SSE_GATEWAY_BIN:-}" ]]; then
    BINARY="$SSE_GATEWAY_BIN"
else
    step "cargo build --locked --bin sse-gateway"
    cargo build --locked --bin sse-gateway
    BINARY="$TARGET/debug/sse-gateway"
fi

WORK="$(mktemp -d)"
GATEWAY_PID=""
cleanup() {
    if [[ -n "$GATEWAY_PID" ]] && kill -0 "$GATEWAY_PID" 2>/dev/null; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$GATEWAY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$GATEWAY_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/config.toml" <<'EOF'
[server]
listen = "127.0.0.1:0"
drain_timeout_ms = 2000

[stream]
retry_ms = 500
heartbeat_ms = 250

[limits]
# Streams end after ~1 s, so schemathesis can read each response to its end.
max_stream_age_ms = 1000
EOF

step "starting $BINARY"
RUST_LOG=warn,sse_gateway=info "$BINARY" serve --config "$WORK/config.toml" \
    --data-dir "$WORK/data" 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
ADDR=""
for _ in $(seq 300); do
    ADDR="$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$WORK/gateway.log" | head -n1)"
    [[ -n "$ADDR" ]] && break
    kill -0 "$GATEWAY_PID" 2>/dev/null || { cat "$WORK/gateway.log" >&2; echo "error: gateway exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$ADDR" ]] || { cat "$WORK/gateway.log" >&2; echo "error: gateway did not start" >&2; exit 1; }
"$VENV/bin/python" - "http://$ADDR/readyz" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
            break
    except OSError:
        pass
    time.sleep(0.1)
else:
    sys.exit("error: the gateway did not become ready")
PY
echo "gateway on http://$ADDR (pid $GATEWAY_PID)"

# --- the run -------------------------------------------------------------------------
step "schemathesis run openapi.yaml (max $MAX_EXAMPLES examples, $WORKERS workers)"
started=$SECONDS
status=0
# From the temp dir: schemathesis keeps its example database in the working directory.
(
    cd "$WORK"
    # Valid idempotency keys made unique per request (why: the hooks file).
    SCHEMATHESIS_HOOKS="$ROOT/scripts/schemathesis_hooks.py" \
    "$VENV/bin/schemathesis" --no-color run "$ROOT/openapi.yaml" \
        --url "http://$ADDR" \
        --checks all \
        --phases examples,coverage,fuzzing \
        --max-examples "$MAX_EXAMPLES" \
        --workers "$WORKERS" \
        --request-timeout 10 \
        --suppress-health-check too_slow \
        ${SCHEMATHESIS_ARGS:-}
) || status=$?
echo "schemathesis took $((SECONDS - started)) s"

if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
    echo "error: the gateway died during the run" >&2
    status=1
fi
if grep -q "panicked" "$WORK/gateway.log"; then
    echo "error: the gateway panicked:" >&2
    grep -A5 "panicked" "$WORK/gateway.log" >&2
    status=1
fi
if ((status != 0)); then
    echo "--- gateway log (last 40 lines) ---" >&2
    tail -n 40 "$WORK/gateway.log" >&2
fi
exit "$status"
