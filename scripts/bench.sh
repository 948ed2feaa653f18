#!/usr/bin/env bash
# Benchmarks: `scripts/bench.sh process [--records 10000,100000,1000000]`,
# `scripts/bench.sh latency [--rate 5000 --fetch-wait-ms default,20]`,
# `scripts/bench.sh ingress [--connections 64 --seconds 15]` or
# `scripts/bench.sh reconcile [--records 100000,1000000]`, or
# `scripts/bench.sh dedup [--events 200000]` (one Redis and a 3+3 Redis Cluster on loopback,
# no broker). Starts Tansu on its memory engine on a free loopback port (and PostgreSQL/Redis when missing), then runs the `helios` bench target
# (benches/helios, release profile): `cargo bench --bench helios -- <what> ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

what="${1:-}"; shift || true
case "$what" in
  ingress|process|latency|reconcile|dedup) ;;
  *) echo "usage: scripts/bench.sh ingress|process|latency|reconcile|dedup [options; see --help of each]" >&2; exit 2 ;;
esac
if [ "$what" = dedup ]; then
  ensure_build_deps
  ensure_redis
  cluster_dir=$(mktemp -d "${TMPDIR:-/tmp}/helios-bench-cluster.XXXXXX")
  trap 'bash scripts/redis-cluster.sh stop "$cluster_dir"' EXIT
  cluster_url=$(bash scripts/redis-cluster.sh start "$cluster_dir" "${HELIOS_BENCH_CLUSTER_PORT:-27300}")
  RUST_LOG="${RUST_LOG:-error}" cargo bench --locked --quiet --bench helios -- dedup \
    --cluster-url "$cluster_url" "$@"
  exit 0
fi
ensure_build_deps
ensure_tansu
[ "$what" != ingress ] && { ensure_postgres; ensure_redis; }
# `process --peer`: the batched Python processor (benches/peer/processor.py) in a venv of its own.
if [ "$what" = process ] && [[ " $* " == *" --peer "* ]]; then
  venv="${CARGO_TARGET_DIR:-target}/peer-venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import confluent_kafka, redis, psycopg' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet 'confluent-kafka==2.*' 'redis==5.*' 'psycopg[binary]==3.*'
  fi
  export HELIOS_BENCH_PYTHON="$venv/bin/python"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/helios-bench.XXXXXX")
port=$(free_port)
broker_pid=$(start_tansu memory "$work/broker" "$port")
trap 'kill $broker_pid 2>/dev/null || true; rm -rf "$work"' EXIT
RUST_LOG="${RUST_LOG:-error}" cargo bench --locked --quiet --bench helios -- "$what" \
  --kafka-bootstrap-servers "127.0.0.1:$port" "$@"
