#!/usr/bin/env bash
# Shared helpers of the project's scripts: find or install and start what HELIOS's tests and
# benchmarks need (build tools, PostgreSQL, Redis, the Tansu broker). Sourced, not run.
# Each ensure_* function uses what is already running on 127.0.0.1 and installs only what is missing.

TANSU_VERSION=0.6.0
HELIOS_CACHE="${HELIOS_CACHE:-$HOME/.cache/helios}"

log() { printf '[helios] %s\n' "$*" >&2; }

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "need $* but apt-get is not available: install them yourself"; return 1
  fi
  local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if [ -z "${HELIOS_APT_UPDATED:-}" ]; then
    $SUDO apt-get update -qq >&2 || true
    HELIOS_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.1
  done
  log "$4 did not start listening on $1:$2 within $3 s"; return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ensure_build_deps() {
  local missing=()
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  command -v make >/dev/null 2>&1 || missing+=(make)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  [ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  command -v cargo >/dev/null 2>&1 || { log "cargo is required (https://rustup.rs)"; return 1; }
}

ensure_postgres() {
  if port_open 127.0.0.1 5432; then return 0; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql
  fi
  local v; v=$(ls /etc/postgresql | sort -V | tail -1)
  log "starting PostgreSQL $v"
  pg_ctlcluster --skip-systemctl-redirect "$v" main start >&2 || pg_ctlcluster "$v" main start >&2
  wait_port 127.0.0.1 5432 30 PostgreSQL
  # Trust auth on loopback for the test user, as on the CI machines.
  if ! psql -h 127.0.0.1 -U postgres -c 'select 1' >/dev/null 2>&1; then
    local hba="/etc/postgresql/$v/main/pg_hba.conf"
    sed -i 's/^\(host\s\+all\s\+all\s\+127.0.0.1\/32\s\+\).*/\1trust/' "$hba"
    sed -i 's/^\(host\s\+all\s\+all\s\+::1\/128\s\+\).*/\1trust/' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload >&2 || true
  fi
}

ensure_redis() {
  if port_open 127.0.0.1 6379; then return 0; fi
  command -v redis-server >/dev/null 2>&1 || { log "installing Redis"; apt_install redis-server; }
  log "starting Redis"
  mkdir -p "$HELIOS_CACHE"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile "$HELIOS_CACHE/redis.log" >&2
  wait_port 127.0.0.1 6379 20 Redis
}

# Installs Tansu once per machine (a ~15 min build), outside the project's target directory.
ensure_tansu() {
  if [ -n "${TANSU_BIN:-}" ] && [ -x "$TANSU_BIN" ]; then return 0; fi
  local bin
  bin=$(command -v tansu || true)
  [ -z "$bin" ] && [ -x "$HOME/.cargo/bin/tansu" ] && bin="$HOME/.cargo/bin/tansu"
  if [ -z "$bin" ]; then
    log "installing the Tansu $TANSU_VERSION broker (cargo install, ~15 min once per machine)"
    mkdir -p "$HELIOS_CACHE"
    CARGO_TARGET_DIR="$HELIOS_CACHE/tansu-target" cargo install tansu --version "$TANSU_VERSION" \
      --locked --features dynostore,libsql >&2
    rm -rf "$HELIOS_CACHE/tansu-target"
    bin="$HOME/.cargo/bin/tansu"
  fi
  export TANSU_BIN="$bin"
}

# start_tansu ENGINE DIR PORT: starts a broker (engine sqlite or memory) and waits for it.
# Prints the PID.
start_tansu() {
  local engine=$1 dir=$2 port=$3 url
  mkdir -p "$dir"
  case "$engine" in
    sqlite) url="sqlite://broker.db" ;;
    memory) url="memory://tansu/" ;;
    *) log "unknown engine $engine"; return 1 ;;
  esac
  ( cd "$dir" && exec env -u STORAGE_ENGINE -u LISTENER_URL -u ADVERTISED_LISTENER_URL \
      "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$url" --silent \
      >"$dir/broker.log" 2>&1 ) &
  local pid=$!
  wait_port 127.0.0.1 "$port" 30 "Tansu ($engine)" || { cat "$dir/broker.log" >&2; return 1; }
  echo "$pid"
}

# The checkers of deploy/: promtool (Debian's prometheus package, for `promtool check rules`) and
# systemd-analyze (for `systemd-analyze verify` of the units).
ensure_deploy_checkers() {
  local missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (promtool, systemd-analyze) to check deploy/"
    # policy-rc.d 101: packages are installed, their services are not started.
    local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    local policy=/usr/sbin/policy-rc.d had_policy=""
    [ -e "$policy" ] && had_policy=1
    [ -z "$had_policy" ] && printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy"
    apt_install --no-install-recommends "${missing[@]}"
    [ -z "$had_policy" ] && $SUDO rm -f "$policy"
  fi
  return 0
}

# checkov (PyPI) checks deploy/kubernetes/; in a virtualenv of its own, as its pinned botocore
# would otherwise replace the one moto needs. Sets CHECKOV_BIN.
CHECKOV_VERSION=3.3.30
ensure_checkov() {
  local venv="$HELIOS_CACHE/checkov-$CHECKOV_VERSION"
  CHECKOV_BIN="$venv/bin/checkov"
  if [ ! -x "$CHECKOV_BIN" ]; then
    log "installing checkov $CHECKOV_VERSION into $venv (checks deploy/kubernetes)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "checkov==$CHECKOV_VERSION" >&2
  fi
}

# A headless browser for the status page test: Debian's chromium and chromedriver.
ensure_browser() {
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    log "installing chromium and chromium-driver (status page test)"
    apt_install --no-install-recommends chromium chromium-driver
  fi
}

# The AWS API emulator for `helios publish --cloud aws` tests (PyPI's moto).
ensure_moto() {
  if ! command -v moto_server >/dev/null 2>&1; then
    log "installing moto (AWS API emulator)"
    python3 -m pip install -q 'moto[server]' >&2
  fi
}

# start_moto PORT LOGFILE: starts moto on loopback and waits for it; prints the PID.
start_moto() {
  ( exec moto_server -H 127.0.0.1 -p "$1" >"$2" 2>&1 ) &
  local pid=$!
  wait_port 127.0.0.1 "$1" 30 moto || { cat "$2" >&2; return 1; }
  echo "$pid"
}
