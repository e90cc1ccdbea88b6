#!/usr/bin/env bash
# Installs the OS packages Ironmesh needs to build and test on Debian 12.
# Idempotent; used by the README's commands and by CI.
set -euo pipefail
PACKAGES=(ca-certificates curl git gcc make libc6-dev pkg-config containerd runc protobuf-compiler busybox-static etcd-server libprotobuf-dev iperf3 iproute2 e2fsprogs btrfs-progs clang llvm libbpf-dev bpftool iptables nftables skopeo openssl nginx-light wrk chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Ansible rollout test (tests/tests/ansible.rs): Debian test hosts made
# with debootstrap and booted with systemd-nspawn, dpkg-scanpackages for
# their local apt mirror, and ansible-core + ansible-lint in a venv.
ANSIBLE_PACKAGES=(debootstrap systemd-container dpkg-dev openssh-client python3-venv iproute2)
missing=()
for p in "${ANSIBLE_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
ANSIBLE_VENV=${IRONMESH_ANSIBLE_VENV:-/opt/ironmesh-ansible-venv}
if [ ! -x "$ANSIBLE_VENV/bin/ansible-lint" ] || [ ! -x "$ANSIBLE_VENV/bin/ansible-playbook" ]; then
  /usr/bin/python3 -m venv "$ANSIBLE_VENV"
  "$ANSIBLE_VENV/bin/pip" install -q --disable-pip-version-check 'ansible-core>=2.15,<2.20' 'ansible-lint>=24'
fi
