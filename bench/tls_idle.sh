#!/bin/bash
# Idle memory per HTTPS stream (BENCHMARKS.md "HTTPS: idle memory per stream").
# usage: bash bench/tls_idle.sh h2|h1 STREAMS   (after: cargo build --release --bin sse-gateway --example tls_idle)
T=${CARGO_TARGET_DIR:-target}/release
B=$(mktemp -d)
RUST_LOG=warn "$T/sse-gateway" serve --dev-tls --data-dir "$B/d" --listen 127.0.0.1:18443 --config config.toml > "$B/out" 2> "$B/err" &
P=$!
sleep 2
"$T/examples/tls_idle" 127.0.0.1:18443 "$B/d/dev-tls/cert.pem" "$P" "$1" "$2"
kill "$P"; wait "$P"
rm -rf "$B"
