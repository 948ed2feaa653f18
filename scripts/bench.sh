#!/usr/bin/env bash
# Benchmarks: `scripts/bench.sh ingress [--connections 64 --seconds 15]` or
# `scripts/bench.sh process [--records 10000,100000]`. Starts Tansu on its memory engine on a free
# loopback port (and PostgreSQL/Redis when missing), then runs `helios bench ...` (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

what="${1:-}"; shift || true
case "$what" in
  ingress|process) ;;
  *) echo "usage: scripts/bench.sh ingress|process [options of 'helios bench <what>']" >&2; exit 2 ;;
esac
ensure_build_deps
ensure_tansu
[ "$what" = process ] && { ensure_postgres; ensure_redis; }
work=$(mktemp -d "${TMPDIR:-/tmp}/helios-bench.XXXXXX")
port=$(free_port)
broker_pid=$(start_tansu memory "$work/broker" "$port")
trap 'kill $broker_pid 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --release --quiet --bin helios
RUST_LOG="${RUST_LOG:-error}" ./target/release/helios bench "$what" \
  --kafka-bootstrap-servers "127.0.0.1:$port" "$@"
