#!/usr/bin/env bash
# Benchmark: 200 tiny items through a worker step (2 workers leasing from the
# run's queue) vs a batch step with one container per item, same run.
# Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
cargo run -q --release -p ironmesh-images --bin build-images -- --out target/images
cargo bench -p ironmesh-tests --bench pipeline_items
