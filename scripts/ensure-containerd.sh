#!/usr/bin/env bash
# Starts Debian's containerd when nothing answers on its socket (machines
# without a service manager, CI). Idempotent. Its PID goes to $1 if given,
# so that whoever started it can stop it.
set -euo pipefail
SOCK=/run/containerd/containerd.sock
PIDFILE=${1:-}
LOG=${CONTAINERD_LOG:-/var/log/containerd-ironmesh.log}
if ctr --address "$SOCK" version >/dev/null 2>&1; then
  exit 0
fi
containerd >"$LOG" 2>&1 &
pid=$!
[ -n "$PIDFILE" ] && echo "$pid" >"$PIDFILE"
for _ in $(seq 100); do
  ctr --address "$SOCK" version >/dev/null 2>&1 && { echo "started containerd ($pid), log $LOG"; exit 0; }
  sleep 0.1
done
echo "containerd did not start; see $LOG" >&2
exit 1
