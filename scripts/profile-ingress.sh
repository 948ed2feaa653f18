#!/usr/bin/env bash
# Where the ingress's time goes: `helios ingress` (release build) on Tansu's memory engine, loaded
# by `wrk` (another process, so the profile holds the ingress only) with unique EventBridge
# events, and `perf record` of the ingress for the load's duration; then the CPU each process
# used per request (ingress, broker, wrk) from /proc, and perf's top symbols.
#   bash scripts/profile-ingress.sh [--connections 64] [--seconds 15] [--no-perf]
# Installs wrk (Debian package) when missing. The in-process comparison with a bare server is
# `scripts/bench.sh ingress`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

connections=64 seconds=15 perf=1
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) connections=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --no-perf) perf=0; shift ;;
    *) echo "usage: scripts/profile-ingress.sh [--connections N] [--seconds N] [--no-perf]" >&2; exit 2 ;;
  esac
done
ensure_build_deps
ensure_tansu
command -v wrk >/dev/null 2>&1 || apt_install --no-install-recommends wrk
[ "$perf" = 1 ] && { command -v perf >/dev/null 2>&1 || apt_install --no-install-recommends linux-perf; }
log "building helios (release)"
cargo build --locked --release --quiet --bin helios
helios="${CARGO_TARGET_DIR:-target}/release/helios"

work=$(mktemp -d "${TMPDIR:-/tmp}/helios-prof.XXXXXX")
port=$(free_port); api=$(free_port); metrics=$(free_port)
broker_pid=$(start_tansu memory "$work/broker" "$port")
export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$port" API_HOST=127.0.0.1 API_PORT="$api" \
  HELIOS_METRICS_ADDR="127.0.0.1:$metrics" RUST_LOG="${RUST_LOG:-warn}"
"$helios" topology apply >/dev/null
"$helios" ingress >"$work/ingress.log" 2>&1 &
ingress_pid=$!
cleanup() {
  kill "$ingress_pid" "$broker_pid" 2>/dev/null || true
  wait "$ingress_pid" "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_port 127.0.0.1 "$api" 60 "helios ingress"
url="http://127.0.0.1:$api"
log "warm-up (3 s)"
wrk -t2 -c"$connections" -d3s -s benches/wrk/eventbridge.lua "$url" -- 0 warm >/dev/null

# utime+stime of a process in clock ticks (USER_HZ 100).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
i0=$(ticks "$ingress_pid"); b0=$(ticks "$broker_pid"); m0=$(busy)
if [ "$perf" = 1 ]; then
  perf record -F 999 -g -p "$ingress_pid" -o "$work/perf.data" -- sleep "$seconds" 2>/dev/null &
  perf_pid=$!
fi
log "wrk: $connections connections, $seconds s"
wrk -t2 -c"$connections" -d"${seconds}s" -s benches/wrk/eventbridge.lua "$url" -- 0 run | tee "$work/wrk.txt"
i1=$(ticks "$ingress_pid"); b1=$(ticks "$broker_pid"); m1=$(busy)
[ "$perf" = 1 ] && wait "$perf_pid" || true
sent=$(grep -oE '^ +[0-9]+ requests' "$work/wrk.txt" | grep -oE '[0-9]+')
awk -v n="$sent" -v i=$((i1 - i0)) -v b=$((b1 - b0)) -v m=$((m1 - m0)) -v s="$seconds" -v c="$(nproc)" 'BEGIN {
  printf "CPU per request (us): ingress %.1f, broker %.1f, whole machine %.1f (wrk and the rest: %.1f); machine busy %.0f %%\n",
    i*1e4/n, b*1e4/n, m*1e4/n, (m-i-b)*1e4/n, 100*m/(s*100*c) }'
if [ "$perf" = 1 ]; then
  log "perf: the ingress's own symbols, by share of its samples (self)"
  perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | sed -e 's/[ -]*$//' | sed -n 1,40p
  log "perf: by shared object"
  perf report -i "$work/perf.data" --no-children --sort dso --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | sed -e 's/[ -]*$//' | sed -n 1,12p
fi
