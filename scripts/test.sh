#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate and the end-to-end
# tests in tests/, which start real controller, agent and imctl processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The end-to-end tests run the binaries and push the project's own images,
# so build both first.
cargo build --workspace --bins
# The datapath tests and every agent pin in bpffs; mount it once here so
# parallel tests never race to mount it (a fresh host has none).
if [ "$(id -u)" = 0 ]; then
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
fi
cargo run -q -p ironmesh-images --bin build-images -- --out target/images
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
