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
run() {
  cargo test ${RELEASE:+--release} -p ironmesh-agent --test network -- --include-ignored --nocapture \
    --test-threads 1 "$@" 2>&1 | grep -oE '(instance network setup|iperf3 |test result).*'
}
run teardown_and_100_cycles_leave_nothing_behind
# Instance MTU 1500 (the default), then underlay MTU - 50 as recommended
# for VXLAN mode (with 1500 the VXLAN path depends on PMTU discovery).
IM_MTU=1500 run measure_cross_host_throughput
IM_MTU=1450 run measure_cross_host_throughput
