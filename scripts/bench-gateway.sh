#!/usr/bin/env bash
# The gateway benchmark, in one run, from a release build: requests/s and
# p99 latency over 16 keep-alive connections (wrk) to one backend (nginx
# answering "200 ok") directly, through nginx as a plain reverse proxy,
# and through the Ironmesh gateway checking a JWT on every request.
# Everything runs inside a network namespace the test creates; needs root,
# nginx and wrk (scripts/install-deps.sh). BENCH_SECONDS (default 10) is
# the length of each of the three runs; extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx wrk ip; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
echo "nginx: $(nginx -v 2>&1)"
nice -n 10 cargo test --release -p ironmesh-agent --test gateway "$@" -- \
  --ignored --nocapture --test-threads=1 bench
