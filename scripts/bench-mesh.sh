#!/usr/bin/env bash
# Mesh benchmark, side by side in one run, from a release build: instance
# -> instance across two fake hosts, through the node proxies (mTLS, HTTP/2
# CONNECT) vs the plain routed path (the same hosts, mesh off):
#  - added latency of HTTP/1.1 keep-alive requests (1 KB answers) at a fixed
#    1,000 req/s, p50 / p90 / p99;
#  - the first request on a new connection;
#  - single-stream TCP throughput;
#  - CPU of the proxies (both agents) at 1,000 req/s and agent memory with
#    100 open connections.
# MESH_BENCH_SECS (default 5) per latency round, MESH_BENCH_MB (512) per
# throughput round. Needs root, bpffs and cgroup v2 (as the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (BPF, namespaces)" >&2; exit 1; }
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
cargo build --release --workspace --bins
cargo run --release -q -p ironmesh-images --bin build-images -- --out target/images
nice -n 10 cargo test --release -p ironmesh-tests --test mesh -- \
  --ignored --nocapture --test-threads=1 bench "$@"
