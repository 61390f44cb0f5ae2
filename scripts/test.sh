#!/usr/bin/env bash
# The one command that installs what the tests need and runs every check:
#   bash scripts/test.sh
# On a fresh Debian machine with only the Rust toolchain it apt-installs
# curl, nodejs, npm, Debian's chromium, redis and fuse3 (only what is
# missing), installs the pinned npm packages of tests/js (npm ci;
# playwright-core drives that chromium and never downloads a browser), then
# runs rustfmt, clippy and every test of the workspace (the gateway and
# tools/powercut), then the Elixir client's tests (clients/elixir, `mix test`
# with Debian's elixir; no hex packages) against the built binary.
# CI runs it through .ci/run. CARGO_TARGET_DIR etc. are honoured.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

# --- system packages -------------------------------------------------------
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
# A Node.js that bundles npm (e.g. NodeSource's) must not get Debian's npm.
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The browser tests (tests/gateway/browser.rs) drive Debian's Chromium.
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
# The Redis backend tests (tests/gateway/redis.rs) start their own servers.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
# The power-cut filesystem (tools/powercut) mounts through FUSE: /dev/fuse and,
# when not root, the fusermount3 helper. No libfuse is linked.
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
# The fuzz targets link libFuzzer, which is C++ (built by libfuzzer-sys).
command -v g++ >/dev/null 2>&1 || missing+=(g++)
# The README test (tests/gateway/readme/) runs its nginx and Python examples.
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
python3 -c 'import requests' >/dev/null 2>&1 || missing+=(python3-requests)
# The Elixir client (clients/elixir) is tested with Debian's Elixir and OTP.
command -v mix >/dev/null 2>&1 || missing+=(elixir)

if ((${#missing[@]})); then
    step "installing system packages: ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "error: need root or sudo to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    step "system packages present: curl, node, npm, chromium, redis-server, fuse3, g++, nginx, python3-requests, elixir"
fi
echo "curl: $(curl --version | head -n1)"
echo "node: $(node --version), npm: $(npm --version)"
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"
echo "redis: $(redis-server --version)"
echo "fuse: $(fusermount3 --version 2>&1), /dev/fuse: $([[ -c /dev/fuse ]] && echo present || echo MISSING)"
echo "elixir: $(elixir --version 2>/dev/null | tr '\n' ' ')"

# --- npm packages for the third-party client and browser tests ---------------
step "npm ci (tests/js)"
(cd tests/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)

# --- Rust checks -------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# --workspace: the gateway and tools/powercut (the power-loss test filesystem).
step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test --locked --workspace --all-targets"
cargo test --locked --workspace --all-targets

# --- the Elixir client against the debug binary --------------------------------
# No deps, so no hex; MIX_HOME/HEX_HOME point inside the build dir so nothing
# depends on (or is written to) the user's ~/.mix.
step "mix test (clients/elixir against the debug binary)"
cargo build --locked --bin sse-gateway
TARGET_DIR="$(cd "${CARGO_TARGET_DIR:-$ROOT/target}" && pwd)"
(
    cd clients/elixir
    export MIX_ENV=test
    export MIX_HOME="$TARGET_DIR/mix-home" HEX_HOME="$TARGET_DIR/hex-home"
    export MIX_BUILD_ROOT="$TARGET_DIR/elixir-build"
    export SSE_GATEWAY_BIN="$TARGET_DIR/debug/sse-gateway"
    mix format --check-formatted
    mix compile --warnings-as-errors
    mix test
)

# --- the OpenAPI contract against a live gateway -------------------------------
step "schemathesis (openapi.yaml against the debug binary)"
bash scripts/schemathesis.sh

# --- the fuzz targets: built with libFuzzer's instrumentation, each run briefly --
step "fuzz targets (scripts/fuzz.sh, ${FUZZ_SECONDS:-15} s each)"
FUZZ_SECONDS=${FUZZ_SECONDS:-15} FUZZ_PROFILE=${FUZZ_PROFILE:-dev} bash scripts/fuzz.sh

step "all checks passed"
