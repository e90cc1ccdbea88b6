#!/usr/bin/env bash
# Test hosts for the Ansible rollout test: Debian 12 machines that Ansible
# reaches the way it reaches real ones, over SSH on their own address.
#
#   testbed.sh up   STATE_DIR HOST...   boot one machine per HOST
#   testbed.sh down STATE_DIR           stop them and remove every trace
#
# Each host is a debootstrap'd Debian (minbase + python3, systemd,
# openssh-server) booted by systemd-nspawn --boot: systemd is its PID 1 and
# runs sshd, containerd and the Ironmesh units exactly as on a real machine.
# Each runs in a network namespace with a veth into a test bridge that has
# no uplink; the whole test supernet is `unreachable` in the root namespace,
# so nothing leaves this machine. The hosts install packages from a small
# apt repository (containerd, runc) served on the bridge, like a rack's
# local mirror.
#
# What a real host has and nspawn does not give by default, added here and
# nowhere in the roles:
#   --capability=all                 containerd/runc mount, create cgroups, netns
#   --system-call-filter=@keyring bpf   runc joins a session keyring; the
#                                    agent's datapath loads eBPF
#   cgroup v1 controllers remounted read-write at boot (nspawn mounts them
#                                    read-only); each machine gets its own
#                                    cgroup subtree so runc's cgroups stay
#                                    inside it (cgroup namespace)
#   /var/lib/containerd bind-mounted from a plain directory: the root is an
#                                    overlayfs over the cached rootfs, and
#                                    containerd's overlayfs snapshotter
#                                    cannot stack on overlayfs
#
# The base rootfs and the apt repository are cached in $IRONMESH_TESTBED_CACHE
# (default /var/cache/ironmesh-test) and built once per machine.
set -euo pipefail

CACHE=${IRONMESH_TESTBED_CACHE:-/var/cache/ironmesh-test}
ROOTFS_VERSION=1
ROOTFS=$CACHE/rootfs-bookworm-v$ROOTFS_VERSION
APT_REPO=$CACHE/apt-v$ROOTFS_VERSION
MIRROR=${IRONMESH_TESTBED_MIRROR:-}
SUPERNET=10.213.0.0/16
APT_PORT=18080

log() { echo "testbed: $*" >&2; }

# The Debian mirror this machine's apt uses (first deb.debian.org-like URI).
mirror() {
  if [ -n "$MIRROR" ]; then echo "$MIRROR"; return; fi
  local m
  m=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
    grep -oE 'https?://[^ ]+' | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

ensure_cache() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    log "building the base rootfs in $ROOTFS (once; about 90 s)"
    rm -rf "$ROOTFS.tmp"
    debootstrap --variant=minbase \
      --include=python3,python3-apt,systemd,systemd-sysv,dbus,openssh-server,iproute2 \
      bookworm "$ROOTFS.tmp" "$(mirror)" >"$CACHE/debootstrap.log" 2>&1 ||
      { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -f "$ROOTFS.tmp"/etc/ssh/ssh_host_*
    # No package lists: hosts fetch fresh ones from their mirror.
    rm -rf "$ROOTFS.tmp"/var/cache/apt/archives/*.deb "$ROOTFS.tmp"/var/lib/apt/lists/*_*
    # An old lists directory: the apt module refreshes the cache first.
    touch -d @0 "$ROOTFS.tmp"/var/lib/apt/lists
    mv "$ROOTFS.tmp" "$ROOTFS"
  fi
  if [ ! -s "$APT_REPO/Packages" ]; then
    log "building the local apt repository in $APT_REPO"
    rm -rf "$APT_REPO.tmp" && mkdir -p "$APT_REPO.tmp"
    (cd "$APT_REPO.tmp" && apt-get download -q containerd runc >/dev/null 2>&1) ||
      { apt-get update -qq && (cd "$APT_REPO.tmp" && apt-get download -q containerd runc >/dev/null); }
    (cd "$APT_REPO.tmp" && dpkg-scanpackages --multiversion . /dev/null >Packages 2>/dev/null)
    mv "$APT_REPO.tmp" "$APT_REPO"
  fi
  flock -u 9
}

cgroup_roots() {
  local d
  for d in /sys/fs/cgroup/*/; do
    d=${d%/}
    [ -f "$d/cgroup.procs" ] && echo "$d"
  done
  [ -f /sys/fs/cgroup/cgroup.procs ] && echo /sys/fs/cgroup
  return 0
}

up() {
  local state=$1; shift
  [ $# -gt 0 ] || { echo "usage: testbed.sh up STATE_DIR HOST..." >&2; exit 2; }
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  ensure_cache

  # Names and addresses unique to this run: a /24 of the supernet picked
  # from our PID, moved on while a bridge already uses it.
  local n=$(( $$ % 250 + 1 )) id
  while ip -o addr show | grep -q " 10\.213\.$n\.1/24"; do n=$(( n % 250 + 1 )); done
  id=imt$n
  local net=10.213.$n br=${id}br
  echo "$id" >"$state/id"
  echo "$net" >"$state/net"

  ip route show | grep -q "^unreachable $SUPERNET" || ip route add unreachable "$SUPERNET"
  ip link add "$br" type bridge
  ip addr add "$net.1/24" dev "$br"
  ip link set "$br" up

  # The local apt mirror, on the bridge address only.
  python3 -m http.server --bind "$net.1" --directory "$APT_REPO" "$APT_PORT" \
    >"$state/apt-mirror.log" 2>&1 &
  echo $! >"$state/apt-mirror.pid"

  ssh-keygen -q -t ed25519 -N '' -C ironmesh-testbed -f "$state/id_ed25519"
  : >"$state/known_hosts"

  local i=1 host
  for host in "$@"; do
    i=$(( i + 1 ))
    local addr=$net.$i ns=$id-$host hd=$state/hosts/$host
    mkdir -p "$hd"/{upper,work,root,containerd}
    echo "$host $addr" >>"$state/hosts.list"
    mount -t overlay overlay \
      -o "lowerdir=$ROOTFS,upperdir=$hd/upper,workdir=$hd/work" "$hd/root"
    echo "$hd/root" >>"$state/mounts"

    local r=$hd/root
    echo "$host" >"$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$host" >"$r/etc/hosts"
    : >"$r/etc/resolv.conf"
    rm -f "$r"/etc/apt/sources.list.d/*
    echo "deb [trusted=yes] http://$net.1:$APT_PORT/ ./" >"$r/etc/apt/sources.list"
    install -d -m 0700 "$r/root/.ssh"
    install -m 0600 "$state/id_ed25519.pub" "$r/root/.ssh/authorized_keys"
    ssh-keygen -q -t ed25519 -N "" -C "root@$host" -f "$r/etc/ssh/ssh_host_ed25519_key"
    echo "$addr $(cat "$r/etc/ssh/ssh_host_ed25519_key.pub")" >>"$state/known_hosts"
    cat >"$r/etc/systemd/system/testbed-cgroup-rw.service" <<'EOF'
[Unit]
Description=Test bed: cgroup v1 controllers writable, as on a real host
DefaultDependencies=no
Before=sysinit.target containerd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for d in /sys/fs/cgroup/*/; do case "$(findmnt -no FSTYPE "$d")" in cgroup) mount -o remount,bind,rw "$d";; esac; done'

[Install]
WantedBy=sysinit.target
EOF
    ln -sf ../testbed-cgroup-rw.service "$r/etc/systemd/system/sysinit.target.wants/testbed-cgroup-rw.service" 2>/dev/null ||
      { mkdir -p "$r/etc/systemd/system/sysinit.target.wants" &&
        ln -sf ../testbed-cgroup-rw.service "$r/etc/systemd/system/sysinit.target.wants/testbed-cgroup-rw.service"; }

    ip netns add "$ns"
    echo "$ns" >>"$state/netns"
    ip link add "${id}h$i" type veth peer name eth0 netns "$ns"
    ip link set "${id}h$i" master "$br" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up

    local cgs=() root
    while read -r root; do
      mkdir -p "$root/ironmesh-testbed/$id/$host"
      cgs+=("$root/ironmesh-testbed/$id/$host")
    done < <(cgroup_roots)
    # Enter our cgroups, then become systemd-nspawn (same PID).
    CGS="${cgs[*]}" setsid bash -c 'for c in $CGS; do echo $$ >"$c/cgroup.procs"; done; exec "$@"' _ \
      systemd-nspawn --boot --register=no --keep-unit --console=pipe \
      --machine="$host" --directory="$r" --network-namespace-path="/run/netns/$ns" \
      --capability=all --system-call-filter="@keyring bpf" \
      --bind="$hd/containerd:/var/lib/containerd" \
      </dev/null >"$hd/console.log" 2>&1 &
    echo $! >>"$state/pids"
    log "booting $host at $addr (pid $!)"
  done

  cat >"$state/ssh_args" <<EOF
-o UserKnownHostsFile=$state/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -i $state/id_ed25519 -o ConnectTimeout=2 -o LogLevel=ERROR
EOF
  # shellcheck disable=SC2046
  local host addr deadline=$(( SECONDS + 90 ))
  while read -r host addr; do
    until ssh $(cat "$state/ssh_args") "root@$addr" 'systemctl is-system-running --wait >/dev/null 2>&1 || true' </dev/null 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || { log "$host did not answer on SSH; console:"; tail -30 "$state/hosts/$host/console.log" >&2; exit 1; }
      sleep 0.5
    done
  done <"$state/hosts.list"
  log "hosts up: $(awk '{printf "%s=%s ", $1, $2}' "$state/hosts.list")"
}

down() {
  local state=$1
  [ -d "$state" ] || return 0
  local pid
  # Ask each machine to power off (systemd-nspawn turns SIGTERM into an
  # orderly shutdown), then make sure.
  if [ -f "$state/pids" ]; then
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$state/pids"
    for _ in $(seq 100); do
      local alive=0
      while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$state/pids"
      [ $alive = 0 ] && break
      sleep 0.1
    done
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$state/pids"
    rm -f "$state/pids"
  fi
  if [ -f "$state/apt-mirror.pid" ]; then
    kill "$(cat "$state/apt-mirror.pid")" 2>/dev/null || true
    rm -f "$state/apt-mirror.pid"
  fi
  if [ -f "$state/mounts" ]; then
    local m
    while read -r m; do
      for _ in $(seq 50); do mountpoint -q "$m" || break; umount "$m" 2>/dev/null || sleep 0.1; done
      mountpoint -q "$m" && umount -l "$m"
    done <"$state/mounts"
    rm -f "$state/mounts"
  fi
  if [ -f "$state/netns" ]; then
    local ns
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done <"$state/netns"
    rm -f "$state/netns"
  fi
  if [ -f "$state/id" ]; then
    local id root
    id=$(cat "$state/id")
    ip link del "${id}br" 2>/dev/null || true
    # Every cgroup the machines and their containers left, deepest first.
    while read -r root; do
      [ -d "$root/ironmesh-testbed/$id" ] && find "$root/ironmesh-testbed/$id" -depth -type d -exec rmdir {} + 2>/dev/null || true
      rmdir "$root/ironmesh-testbed" 2>/dev/null || true
    done < <(cgroup_roots)
    if ! ip -o link show type bridge | grep -qE ': imt[0-9]+br[:@]'; then
      ip route del unreachable "$SUPERNET" 2>/dev/null || true
    fi
    rm -f "$state/id"
  fi
  rm -rf "$state/hosts"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  cache) ensure_cache ;;
  *) echo "usage: testbed.sh up STATE_DIR HOST... | down STATE_DIR | cache" >&2; exit 2 ;;
esac
