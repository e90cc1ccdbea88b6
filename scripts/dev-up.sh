#!/usr/bin/env bash
# Builds Ironmesh and runs a one-host cluster here: a controller with its
# embedded store and an agent, then applies the sample data product and
# shows the node. State lives in ./.ironmesh (override: IRONMESH_DEV_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
BIN=$PWD/target/release
DIR=${IRONMESH_DEV_DIR:-$PWD/.ironmesh}
mkdir -p "$DIR"
bash scripts/dev-down.sh >/dev/null 2>&1 || true

"$BIN/ironmesh-controller" --data-dir "$DIR/controller" --listen 127.0.0.1:7443 \
  --metrics-listen 127.0.0.1:7480 >"$DIR/controller.log" 2>&1 &
echo $! >"$DIR/controller.pid"
for _ in $(seq 100); do
  [ -s "$DIR/controller/admin.yaml" ] && (exec 3<>/dev/tcp/127.0.0.1/7443) 2>/dev/null && break
  sleep 0.1
done
[ -s "$DIR/controller/admin.yaml" ] || { echo "controller did not start; see $DIR/controller.log" >&2; exit 1; }

"$BIN/ironmesh-agent" --controller https://127.0.0.1:7443 \
  --ca-cert "$DIR/controller/pki/ca.crt" \
  --bootstrap-token-file "$DIR/controller/bootstrap-token" \
  --state-dir "$DIR/agent" --metrics-listen 127.0.0.1:7481 >"$DIR/agent.log" 2>&1 &
echo $! >"$DIR/agent.pid"

export IMCTL_CONFIG=$DIR/controller/admin.yaml
for _ in $(seq 300); do
  "$BIN/imctl" get nodes 2>/dev/null | grep -q ' Ready ' && break
  sleep 0.1
done
"$BIN/imctl" apply -f examples/
echo
"$BIN/imctl" get nodes -o wide
echo
echo "Controller and agent are running (logs in $DIR). Next:"
echo "  export IMCTL_CONFIG=$DIR/controller/admin.yaml PATH=$BIN:\$PATH"
echo "  imctl describe node $(sed -n 1p "$DIR/agent/node-name")"
echo "  bash scripts/dev-down.sh    # stop both"
