#!/usr/bin/env bash
# Push -> PostgreSQL freshness with an external load generator: `wrk` (16 connections, unique
# EventBridge events, each connection waiting DELAY_MS between requests; 0 = as fast as the
# acknowledgements come) against `helios run` (release build) on Tansu's memory engine, then the
# percentiles of processed_at - ingested_at of the stored rows, read from PostgreSQL.
#   bash scripts/bench-wrk.sh [--delay-ms 0] [--seconds 20] [--connections 16]
# Installs wrk (Debian package) when missing. The in-process generator is `scripts/bench.sh latency`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

delay=0 seconds=20 connections=16
while [ $# -gt 0 ]; do
  case "$1" in
    --delay-ms) delay=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    *) echo "usage: scripts/bench-wrk.sh [--delay-ms N] [--seconds N] [--connections N]" >&2; exit 2 ;;
  esac
done
ensure_build_deps
ensure_postgres
ensure_redis
ensure_tansu
command -v wrk >/dev/null 2>&1 || apt_install --no-install-recommends wrk
log "building helios (release)"
cargo build --locked --release --quiet --bin helios
helios="${CARGO_TARGET_DIR:-target}/release/helios"
psql_() { psql -qtAh 127.0.0.1 -U postgres "$@"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/helios-wrk.XXXXXX")
port=$(free_port); api=$(free_port); metrics=$(free_port)
broker_pid=$(start_tansu memory "$work/broker" "$port")
tag="wrk$(date +%s)"
export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$port" HELIOS_TOPIC_PREFIX="$tag." \
  DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}" HELIOS_DB_SCHEMA="$tag" \
  HELIOS_MIGRATE=true HELIOS_DEDUP_PREFIX="$tag:" HELIOS_DEDUP_TTL_SECS=900 \
  API_HOST=127.0.0.1 API_PORT="$api" HELIOS_METRICS_ADDR="127.0.0.1:$metrics" RUST_LOG="${RUST_LOG:-warn}"
"$helios" topology apply >/dev/null
"$helios" run >"$work/run.log" 2>&1 &
helios_pid=$!
cleanup() {
  kill "$helios_pid" "$broker_pid" 2>/dev/null || true
  wait "$helios_pid" "$broker_pid" 2>/dev/null || true
  psql_ -c "DROP SCHEMA IF EXISTS $tag CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_port 127.0.0.1 "$api" 60 "helios run"
url="http://127.0.0.1:$api"
log "warm-up (3 s)"
wrk -t2 -c"$connections" -d3s -s benches/wrk/eventbridge.lua "$url" -- "$delay" warm >/dev/null
log "wrk: $connections connections, $seconds s, ${delay} ms between a connection's requests"
wrk -t2 -c"$connections" -d"${seconds}s" -s benches/wrk/eventbridge.lua "$url" -- "$delay" run | tee "$work/wrk.txt"
sent=$(grep -oE '^ +[0-9]+ requests' "$work/wrk.txt" | grep -oE '[0-9]+')
measured="FROM $tag.events WHERE event_id LIKE 'wrk-run-%'"
for _ in $(seq 1 120); do
  stored=$(psql_ -c "SELECT count(*) $measured")
  [ "$stored" -ge "$sent" ] && break
  sleep 1
done
[ "$stored" -ge "$sent" ] || { log "only $stored of $sent answered requests stored after 120 s; the end of helios run's log:"; tail -20 "$work/run.log" >&2; }
# wrk counts the answers it read: a request still in flight at the end is stored, not counted.
echo "answered by the ingress: $sent; stored: $stored"
psql -h 127.0.0.1 -U postgres -c "SELECT count(*) AS events,
  round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS p50_ms,
  round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS p90_ms,
  round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS p99_ms,
  round(max(ms)::numeric, 1) AS max_ms
  FROM (SELECT extract(epoch FROM processed_at - ingested_at) * 1000 AS ms
        $measured) t"
