#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate and the end-to-end
# tests in tests/, which start real controller, agent and imctl processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The end-to-end tests run the binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
