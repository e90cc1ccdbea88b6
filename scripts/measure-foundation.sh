#!/usr/bin/env bash
# Measures, with release binaries: time from starting an agent to its node
# being Ready (as imctl sees it), and controller and agent RSS after start.
# Uses a temporary data dir and loopback ports 17443/17480/17481.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
BIN=$PWD/target/release
D=$(mktemp -d)
cleanup() { for p in ${AGENT:-} ${CTL:-}; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT
"$BIN/ironmesh-controller" --data-dir "$D/c" --listen 127.0.0.1:17443 --metrics-listen 127.0.0.1:17480 >"$D/c.log" 2>&1 &
CTL=$!
for _ in $(seq 200); do [ -s "$D/c/admin.yaml" ] && break; sleep 0.05; done
export IMCTL_CONFIG=$D/c/admin.yaml
start=$(date +%s%N)
"$BIN/ironmesh-agent" --controller https://127.0.0.1:17443 --ca-cert "$D/c/pki/ca.crt" \
  --bootstrap-token-file "$D/c/bootstrap-token" --state-dir "$D/a" --node-name measure \
  --metrics-listen 127.0.0.1:17481 >"$D/a.log" 2>&1 &
AGENT=$!
deadline=$((start + 30000000000))
until "$BIN/imctl" get nodes measure 2>/dev/null | grep -q ' Ready '; do
  if [ "$(date +%s%N)" -gt "$deadline" ]; then
    echo "node not Ready within 30 s; logs:" >&2; cat "$D/c.log" "$D/a.log" >&2; exit 1
  fi
done
end=$(date +%s%N)
echo "agent start to Ready: $(( (end - start) / 1000000 )) ms"
sleep 2
echo "controller RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$CTL/status)"
echo "agent RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$AGENT/status)"
