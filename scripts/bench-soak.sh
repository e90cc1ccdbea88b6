#!/usr/bin/env bash
# Soak: 10,000 applies from 8 clients while the controller is killed with
# SIGKILL 5 times, on the embedded store and on etcd: acknowledged/lost,
# revision regressions, RSS after vs a fresh start. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
cargo bench -p ironmesh-tests --bench soak
