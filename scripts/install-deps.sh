#!/usr/bin/env bash
# Installs the OS packages Ironmesh needs to build and test on Debian 12.
# Idempotent; used by the README's commands and by CI.
set -euo pipefail
PACKAGES=(ca-certificates curl gcc libc6-dev pkg-config containerd runc protobuf-compiler busybox-static etcd-server libprotobuf-dev iperf3 iproute2)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
