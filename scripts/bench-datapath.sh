#!/usr/bin/env bash
# Datapath benchmarks, side by side in one run, from a release build:
#  - TCP throughput and 1-byte request RTT through an instance's veth: no
#    programs vs the eBPF datapath (10,017 rules loaded) vs the same rules
#    as a linear iptables chain (and its usual stateful form);
#  - time to change one rule at 10,000 rules: our map update vs
#    iptables-restore, iptables -R and nft -f;
#  - connection rate through a Service VIP (cgroup connect4) vs the backend
#    address vs an iptables DNAT rule.
# Everything runs inside network namespaces the tests create; iptables and
# nft only ever touch those namespaces. Needs root, bpffs, cgroup v2 and
# iperf3, iptables, nftables (scripts/install-deps.sh).
# Extra arguments go to the test harness.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in iperf3 iptables iptables-restore nft ss bpftool; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (BPF, namespaces)" >&2; exit 1; }
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "iptables: $(iptables --version)"
# One benchmark at a time: they share the machine's CPUs.
nice -n 10 cargo test --release -p ironmesh-agent --test datapath -- \
  --ignored --nocapture --test-threads=1 bench "$@"
