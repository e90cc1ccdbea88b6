#!/usr/bin/env bash
# Control-plane scale bench (docs/scale.md): builds the release controller
# and simulator, then runs `ironmesh-sim bench` on the embedded store and on
# etcd and prints every figure with its target and the command that
# produced it. Everything runs on loopback; the bench starts and kills its
# own controller (and etcd).
#
#   scripts/bench-scale.sh                    # 1,000 nodes, 10,000 instances
#   scripts/bench-scale.sh 300                # 300 nodes, 3,000 instances
#   scripts/bench-scale.sh 100,300,1000       # the curve: cost per node
#   scripts/bench-scale.sh 1000 5000 -- --idle-seconds 60 --keep
#
# Arguments: [NODES [REPLICAS]] [-- more `ironmesh-sim bench` options].
# REPLICAS defaults to 10 per node. STORES="embedded" (or "etcd") runs one
# store only. The output is also written to target/bench-scale/.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1000
replicas=""
if [[ $# -gt 0 && $1 != -* ]]; then nodes=$1; shift; fi
if [[ $# -gt 0 && $1 != -* ]]; then replicas=$1; shift; fi
if [[ ${1:-} == -- ]]; then shift; fi
extra=("$@")
stores=${STORES:-embedded etcd}

echo "+ cargo build --release -p ironmesh-controller -p ironmesh-sim"
cargo build --release -p ironmesh-controller -p ironmesh-sim

mkdir -p target/bench-scale
out=target/bench-scale/$(date -u +%Y%m%dT%H%M%SZ)-${nodes//,/-}.md
status=0
for store in $stores; do
    if [[ $store == etcd ]] && ! command -v etcd >/dev/null; then
        echo "skipping --store etcd: no etcd binary (apt-get install etcd-server)" | tee -a "$out"
        continue
    fi
    cmd=(target/release/ironmesh-sim bench
        --controller-bin target/release/ironmesh-controller
        --store "$store" --nodes "$nodes")
    if [[ -n $replicas ]]; then cmd+=(--replicas "$replicas"); fi
    cmd+=("${extra[@]}")
    echo "+ ${cmd[*]}" | tee -a "$out"
    # The bench exits 2 when a figure misses its target; keep going.
    "${cmd[@]}" | tee -a "$out" || status=$?
done
echo
echo "figures written to $out"
exit "$status"
