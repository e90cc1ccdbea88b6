#!/usr/bin/env bash
# Benchmark: controller failover time on etcd (median of 5 leader kills)
# and apply latency on etcd vs the embedded store, same run. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
cargo bench -p ironmesh-tests --bench ha
