#!/usr/bin/env bash
# Stops the controller and agent started by dev-up.sh (by their PIDs).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${IRONMESH_DEV_DIR:-$PWD/.ironmesh}
for p in agent controller; do
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
