#!/usr/bin/env bash
# Benchmark: apply→Running of 20 single-replica workloads through Ironmesh
# vs bare containerd create+start of the same image, same run. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
cargo run -q --release -p ironmesh-images --bin build-images -- --out target/images
cargo bench -p ironmesh-tests --bench workload_start
