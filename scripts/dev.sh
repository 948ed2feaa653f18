#!/usr/bin/env bash
# Runs HELIOS locally with nothing but this repository: starts a Tansu broker (installed once per
# machine) on 127.0.0.1:9092 with its data in .helios-dev/, uses (or installs and starts)
# PostgreSQL and Redis on loopback, creates the topics of topology.yaml, and runs `helios run`
# (ingress on http://127.0.0.1:8000 + processor). Ctrl-C stops everything.
# Extra arguments go to `helios run` (e.g. `scripts/dev.sh --api-port 8080`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_build_deps
ensure_postgres
ensure_redis
ensure_tansu
port="${HELIOS_DEV_KAFKA_PORT:-9092}"
dir="$PWD/.helios-dev/broker"
if port_open 127.0.0.1 "$port"; then
  log "a broker already listens on 127.0.0.1:$port: using it"
else
  broker_pid=$(start_tansu sqlite "$dir" "$port")
  trap 'kill $broker_pid 2>/dev/null || true' EXIT
  log "Tansu on 127.0.0.1:$port (data in $dir)"
fi
export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$port"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export HELIOS_DB_SCHEMA="${HELIOS_DB_SCHEMA:-helios}" HELIOS_MIGRATE="${HELIOS_MIGRATE:-true}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export API_HOST="${API_HOST:-127.0.0.1}" HELIOS_LOG_FORMAT="${HELIOS_LOG_FORMAT:-text}"
cargo build --quiet --bin helios
./target/debug/helios topology apply
log "events land in PostgreSQL: psql -h 127.0.0.1 -U postgres -c 'select * from $HELIOS_DB_SCHEMA.events'"
./target/debug/helios run "$@"
