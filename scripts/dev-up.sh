#!/usr/bin/env bash
# Builds Ironmesh and its images and runs a one-host cluster here: containerd
# (started if it is not running), a controller with its embedded store and an
# agent; pushes the images, applies the sample data product and shows it
# answering. State lives in ./.ironmesh (override: IRONMESH_DEV_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
cargo run -q --release -p ironmesh-images --bin build-images -- --out target/images
BIN=$PWD/target/release
DIR=${IRONMESH_DEV_DIR:-$PWD/.ironmesh}
mkdir -p "$DIR"
bash scripts/dev-down.sh >/dev/null 2>&1 || true

# containerd: Debian's package, started here when no service manager runs it.
CONTAINERD_LOG=$DIR/containerd.log bash scripts/ensure-containerd.sh "$DIR/containerd.pid"

"$BIN/ironmesh-controller" --data-dir "$DIR/controller" --listen 127.0.0.1:7443 \
  --registry-listen 127.0.0.1:5000 --ui-listen 127.0.0.1:7444 \
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
  --state-dir "$DIR/agent" --metrics-listen 127.0.0.1:7481 \
  --storage-pool "name=default,type=dir,path=$DIR/volumes" >"$DIR/agent.log" 2>&1 &
echo $! >"$DIR/agent.pid"

export IMCTL_CONFIG=$DIR/controller/admin.yaml
for _ in $(seq 300); do
  "$BIN/imctl" get nodes 2>/dev/null | grep -q ' Ready ' && break
  sleep 0.1
done
"$BIN/imctl" image push target/images/records-server
"$BIN/imctl" image push target/images/batch-step
"$BIN/imctl" apply -f examples/
echo
"$BIN/imctl" get nodes -o wide
echo
for _ in $(seq 300); do
  "$BIN/imctl" get workloads orders-api 2>/dev/null | grep -q ' 2/2 ' && break
  sleep 0.1
done
"$BIN/imctl" get instances
IP=$("$BIN/imctl" get instances -l ironmesh.dev/workload=orders-api -o json | grep -o '"ip": "[0-9.]*"' | head -1 | grep -o '[0-9.]*[0-9]')
echo
echo "$ curl -s http://$IP:8080/records/ord-1001"
curl -sS --max-time 5 "http://$IP:8080/records/ord-1001" || { echo "the sample service did not answer; see $DIR/agent.log" >&2; exit 1; }
echo
echo
# The sample pipeline: a producer queues 200 items, two workers drain them,
# four indexed shards write to the run volume and a last step checks them.
echo "$ imctl pipeline run orders-nightly --wait"
"$BIN/imctl" pipeline run orders-nightly --wait --timeout 5m ||
  { echo "the sample pipeline did not succeed; see imctl pipeline runs and $DIR/agent.log" >&2; exit 1; }
echo
echo "Web UI: https://127.0.0.1:7444 (the cluster CA signed its certificate: $DIR/controller/pki/ca.crt)."
echo "Sign in with a one-time URL, for the operator of IMCTL_CONFIG:"
echo "  $ imctl ui"
# A UI that could not bind (port taken) leaves the cluster running.
"$BIN/imctl" ui | sed 's/^/  /' || echo "  (the web UI is not serving; see $DIR/controller.log)"
echo
echo "Controller and agent are running (logs in $DIR). Next:"
echo "  export IMCTL_CONFIG=$DIR/controller/admin.yaml PATH=$BIN:\$PATH"
echo "  imctl describe workload orders-api; imctl logs \$(imctl get instances -o json | grep -o 'orders-api-[a-z0-9]*' | head -1)"
echo "  imctl pipeline runs; imctl pipeline status <run>; imctl pipeline logs <run> publish"
echo "  bash scripts/dev-down.sh    # stop them"
