#!/usr/bin/env bash
# A real two-node Ray cluster on one machine: a head and a worker node, each a `ray start`
# with its own CPU count. Token auth stays on (the Ray 2.60 default): `ray start --head`
# writes ~/.ray/auth_token and clients authenticate with RAY_AUTH_MODE=token.
#
#   cluster/local-cluster.sh start     # head (HEAD_CPUS) + worker (WORKER_CPUS)
#   cluster/local-cluster.sh status
#   cluster/local-cluster.sh stop      # stops both nodes; nothing is left running
#
# Then, from the repository root:
#   export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token
#   ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/smoke.yaml
set -euo pipefail

# Logical CPUs (may exceed the cores): each node needs a whole free CPU for Ray Data tasks
# next to fractional Train workers and Serve replicas.
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-2}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
# Two nodes on one machine: each dashboard agent (it runs submitted jobs) needs its own port.
HEAD_AGENT_PORT=${HEAD_AGENT_PORT:-52365}
WORKER_AGENT_PORT=${WORKER_AGENT_PORT:-52366}
STATE_DIR=${STATE_DIR:-/tmp/rbcluster}  # short: Ray's unix sockets live under it
# Its own temp dirs: a plain `ray.init()` elsewhere on this machine must not find and join
# this cluster through /tmp/ray/ray_current_cluster; and each node gets its own, as on real
# machines - two nodes unpacking a job's working_dir into one shared runtime_resources
# folder replace it under a running driver (its cwd and imports vanish).
RAY_TEMP_DIR="$STATE_DIR/ray"
export RAY_AUTH_MODE=token

# Each node is a `ray start --block` in its own session, so `stop` ends exactly this
# cluster's processes (process groups), not every Ray on the machine like `ray stop` would.
launch() {  # name, ray start args...
  local name=$1; shift
  mkdir -p "$STATE_DIR"
  setsid ray start --block "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE_DIR/$name.pid"
}

wait_for_nodes() {  # count, until 90 s; fails at once if a node process died
  local want=$1 deadline=$((SECONDS + 90)) alive
  while :; do
    for name in head worker; do
      pidfile="$STATE_DIR/$name.pid"
      if [ -e "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "cluster: the $name node exited:" >&2; tail -20 "$STATE_DIR/$name.log" >&2; exit 1
      fi
    done
    alive=$(timeout 30 "${PYTHON:-python3}" - 2>/dev/null <<PY || echo 0
import ray
ray.init(address="127.0.0.1:${GCS_PORT}", logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
    [ "${alive:-0}" -ge "$want" ] && return 0
    [ $SECONDS -lt $deadline ] || { echo "cluster: $want nodes not up after 90 s" >&2; exit 1; }
    sleep 1
  done
}

case "${1:-}" in
  start)
    # 127.0.0.1 only: this machine has no other network.
    [ ! -e "$STATE_DIR/head.pid" ] || { echo "cluster: already started ($STATE_DIR/head.pid)" >&2; exit 1; }
    launch head --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true --temp-dir="$RAY_TEMP_DIR" \
      --dashboard-agent-listen-port="$HEAD_AGENT_PORT" --resources='{"raybench_head": 1}' --disable-usage-stats
    wait_for_nodes 1
    launch worker --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
      --num-gpus=0 --dashboard-agent-listen-port="$WORKER_AGENT_PORT" --resources='{"raybench_worker": 1}' \
      --temp-dir="$STATE_DIR/ray-worker" \
      --disable-usage-stats
    wait_for_nodes 2
    echo "cluster up: 2 nodes (head $HEAD_CPUS CPU, worker $WORKER_CPUS CPU); dashboard http://127.0.0.1:$DASHBOARD_PORT"
    echo "  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token"
    ;;
  status)
    ray status --address="127.0.0.1:$GCS_PORT"
    ;;
  stop)
    # Both nodes are asked at once and given 10 s together, then whatever is left is killed.
    pgids=()
    for name in worker head; do
      pidfile="$STATE_DIR/$name.pid"
      [ -e "$pidfile" ] || continue
      pgids+=("$(cat "$pidfile")")
      rm -f "$pidfile"
    done
    for pgid in "${pgids[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
    for _ in $(seq 1 10); do
      alive=0
      for pgid in "${pgids[@]}"; do kill -0 -- "-$pgid" 2>/dev/null && alive=1; done
      [ "$alive" = 1 ] || break
      sleep 1
    done
    for pgid in "${pgids[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
    echo "cluster stopped"
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
