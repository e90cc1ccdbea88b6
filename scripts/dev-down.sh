#!/usr/bin/env bash
# Stops the agent, controller and (if dev-up.sh started it) containerd, by
# their PIDs. Containers keep running in containerd until their workloads are
# deleted; stopping a containerd that dev-up.sh started ends them too.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${IRONMESH_DEV_DIR:-$PWD/.ironmesh}
for p in agent controller containerd; do
  f=$DIR/$p.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $p ($pid)"
  fi
  rm -f "$f"
done
