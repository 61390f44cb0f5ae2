#!/usr/bin/env bash
# The one command that installs what the tests need and runs every check:
#   bash scripts/test.sh
# On a fresh Debian machine with only the Rust toolchain it apt-installs
# curl, nodejs, npm and Debian's chromium (only what is missing), installs
# the pinned npm packages of tests/js (npm ci; playwright-core drives that
# chromium and never downloads a browser), then runs rustfmt, clippy and
# every test.
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
    step "system packages present: curl, node, npm, chromium, redis-server"
fi
echo "curl: $(curl --version | head -n1)"
echo "node: $(node --version), npm: $(npm --version)"
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"
echo "redis: $(redis-server --version)"

# --- npm packages for the third-party client and browser tests ---------------
step "npm ci (tests/js)"
(cd tests/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)

# --- Rust checks -------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --locked --all-targets"
cargo test --locked --all-targets

# --- the OpenAPI contract against a live gateway -------------------------------
step "schemathesis (openapi.yaml against the debug binary)"
bash scripts/schemathesis.sh

step "all checks passed"
