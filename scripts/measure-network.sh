#!/usr/bin/env bash
# Measures instance networking for the note, on this machine, as root:
#  - the median time to set up one instance's network (100 setup/teardown
#    cycles of ironmesh_agent::network);
#  - iperf3 TCP throughput instance (host A) -> instance (host B) against
#    host A -> host B, both fake hosts on one bridge, in the same run, for
#    direct routing and for VXLAN.
# Fake hosts are network namespaces with no route out of the machine; all of
# them are removed when the run ends. Needs iperf3 and iproute2
# (scripts/install-deps.sh). IPERF_SECONDS (default 5) sets each run's length;
# RELEASE=1 builds optimised (the kernel dominates both figures either way).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 >/dev/null || { echo "iperf3 is missing: run scripts/install-deps.sh" >&2; exit 1; }
cargo test ${RELEASE:+--release} -p ironmesh-agent --test network -- --include-ignored --nocapture --test-threads 1 \
  teardown_and_100_cycles_leave_nothing_behind measure_cross_host_throughput 2>&1 |
  grep -E '^(instance network setup|iperf3|test result)'
