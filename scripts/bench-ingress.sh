#!/usr/bin/env bash
# Ingress benchmark: starts Tansu on its memory engine on a free loopback port, then runs
# `helios bench ingress` (release build) against it. Extra arguments go to the bench command
# (e.g. `--connections 64 --seconds 15`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_build_deps
ensure_tansu
work=$(mktemp -d "${TMPDIR:-/tmp}/helios-bench.XXXXXX")
port=$(free_port)
broker_pid=$(start_tansu memory "$work/broker" "$port")
trap 'kill $broker_pid 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --release --quiet --bin helios
RUST_LOG="${RUST_LOG:-warn}" ./target/release/helios bench ingress \
  --kafka-bootstrap-servers "127.0.0.1:$port" "$@"
