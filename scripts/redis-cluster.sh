#!/usr/bin/env bash
# A Redis Cluster of 3 primaries and 3 replicas on loopback, for the tests and benchmarks.
#   scripts/redis-cluster.sh start DIR BASE_PORT   nodes on BASE_PORT..BASE_PORT+5 (and their
#                                                  bus ports +10000); prints the REDIS_URL
#   scripts/redis-cluster.sh stop DIR              stops every node started in DIR, removes DIR
#   scripts/redis-cluster.sh primaries DIR         "port pid" of each node that is a primary now
# Nodes fail over fast (cluster-node-timeout 1000 ms; replicas stand in whatever their lag), so a
# killed primary is replaced within a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

cmd=${1:?usage: redis-cluster.sh start DIR BASE_PORT | stop DIR | primaries DIR}
dir=${2:?DIR}

ports() { cat "$dir/ports"; }

case "$cmd" in
start)
  base=${3:?BASE_PORT}
  command -v redis-server >/dev/null 2>&1 || { log "installing Redis"; apt_install redis-server; }
  command -v redis-cli >/dev/null 2>&1 || { log "installing redis-tools"; apt_install redis-tools; }
  mkdir -p "$dir"
  : >"$dir/ports"
  for i in 0 1 2 3 4 5; do
    port=$((base + i))
    mkdir -p "$dir/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file "$dir/$port/nodes.conf" \
      --cluster-node-timeout 1000 --cluster-replica-validity-factor 0 \
      --save "" --appendonly no --dir "$dir/$port" \
      --logfile "$dir/$port/redis.log" --pidfile "$dir/$port/redis.pid" >&2
    echo "$port" >>"$dir/ports"
  done
  for port in $(ports); do wait_port 127.0.0.1 "$port" 20 "redis-server :$port"; done
  nodes=()
  for port in $(ports); do nodes+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2; exit 1
  }
  # Ready: every node sees the cluster as ok, and every replica's link to its primary is up.
  for ((t = 0; t < 300; t++)); do
    ready=1
    for port in $(ports); do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ready=0
      role=$(redis-cli -p "$port" info replication 2>/dev/null | tr -d '\r' | sed -n 's/^role://p')
      if [ "$role" = slave ]; then
        redis-cli -p "$port" info replication | tr -d '\r' | grep -q '^master_link_status:up' || ready=0
      fi
    done
    [ "$ready" = 1 ] && break
    sleep 0.1
  done
  [ "$ready" = 1 ] || { log "the Redis Cluster in $dir did not become ready"; exit 1; }
  printf 'redis://127.0.0.1:%s,redis://127.0.0.1:%s,redis://127.0.0.1:%s\n' "$base" $((base + 1)) $((base + 2))
  ;;
primaries)
  for port in $(ports); do
    role=$(redis-cli -p "$port" info replication 2>/dev/null | tr -d '\r' | sed -n 's/^role://p' || true)
    [ "$role" = master ] && echo "$port $(cat "$dir/$port/redis.pid")"
  done
  ;;
stop)
  if [ -f "$dir/ports" ]; then
    for port in $(ports); do
      pid=$(cat "$dir/$port/redis.pid" 2>/dev/null || true)
      [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: redis-cluster.sh start DIR BASE_PORT | stop DIR | primaries DIR" >&2; exit 2
  ;;
esac
