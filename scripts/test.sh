#!/usr/bin/env bash
# Runs HELIOS's whole test suite against real services, on a fresh machine too:
# installs/starts what is missing (build tools, PostgreSQL, Redis, the Tansu broker, moto,
# promtool, systemd-analyze and checkov, chromium and chromedriver),
# starts a private Tansu on a free loopback port (sqlite engine), then `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh sns`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_build_deps
ensure_postgres
ensure_redis
ensure_tansu
ensure_moto
ensure_deploy_checkers
ensure_checkov
ensure_browser

work=$(mktemp -d "${TMPDIR:-/tmp}/helios-test.XXXXXX")
port=$(free_port)
broker_pid=$(start_tansu sqlite "$work/broker" "$port")
moto_port=$(free_port)
moto_pid=$(start_moto "$moto_port" "$work/moto.log")
cleanup() {
  kill "$broker_pid" "$moto_pid" 2>/dev/null || true
  wait "$broker_pid" "$moto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
log "Tansu (sqlite) on 127.0.0.1:$port, PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379"

export HELIOS_TEST_KAFKA="127.0.0.1:$port"
export HELIOS_TEST_DATABASE_URL="${HELIOS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export HELIOS_TEST_REDIS_URL="${HELIOS_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export HELIOS_TEST_MOTO_URL="http://127.0.0.1:$moto_port"
export TANSU_BIN
export CHECKOV_BIN
export RUST_LOG="${RUST_LOG:-warn}"
# The chaos tests panic on purpose (failpoints); their backtraces would bury the message of a
# test that fails. HELIOS_TEST_BACKTRACE=1 brings them back.
export RUST_BACKTRACE="${HELIOS_TEST_BACKTRACE:-0}"

# The failpoints feature compiles the fault-injection points the chaos tests use (src/failpoint.rs).
cargo test --locked --features failpoints "$@"
