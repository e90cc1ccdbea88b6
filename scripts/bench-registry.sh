#!/usr/bin/env bash
# Registry throughput: push and pull of a multi-layer image (default
# 5 x 100 MiB of incompressible, gzip-wrapped layers) through the controller's OCI
# registry with skopeo, against `skopeo copy` of the same image between two
# local OCI layouts in the same run. Prints each throughput and the ratios
# (target: >= 0.8x the local copy), then pushes again and checks nothing
# was uploaded.
#
#   bash scripts/bench-registry.sh [LAYERS] [MIB_PER_LAYER]
#
# Needs the binaries built (cargo build -p ironmesh-controller -p imctl
# --release, or the debug ones: BIN_DIR=target/debug) and skopeo. Runs on
# loopback only; the controller it starts is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${1:-5}
MIB=${2:-100}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
for b in ironmesh-controller imctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "no $BIN_DIR/$b: build it (or set BIN_DIR)" >&2; exit 1; }
done
command -v skopeo >/dev/null || { echo "skopeo is not installed (scripts/install-deps.sh)" >&2; exit 1; }

work=$(mktemp -d /tmp/im-bench-registry.XXXXXX)
ctl_pid=
cleanup() {
  if [ -n "$ctl_pid" ]; then kill "$ctl_pid" 2>/dev/null || true; wait "$ctl_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "building a ${LAYERS} x ${MIB} MiB image layout in $work/src ..." >&2
python3 - "$work/src" "$LAYERS" "$MIB" <<'EOF'
import gzip, hashlib, io, json, os, sys, tarfile
out, layers, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)
descs, diff_ids = [], []
for i in range(layers):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        payload = os.urandom(mib << 20)
        info = tarfile.TarInfo(f"layer{i}.bin"); info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    tar = buf.getvalue()
    # Compressed already (level 1: the payload is random), as real layers
    # are: skopeo would otherwise compress them on the way to a registry.
    data = gzip.compress(tar, compresslevel=1, mtime=0)
    d, n = put(data)
    descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
    diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
cd, cn = put(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                       "layers": descs}).encode()
md, mn = put(manifest)
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "digest": md, "size": mn, "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
EOF
bytes=$(du -sb "$work/src/blobs" | cut -f1)

grpc=127.0.0.1:$(free_port)
reg=127.0.0.1:$(free_port)
metrics=127.0.0.1:$(free_port)
"$BIN_DIR/ironmesh-controller" --listen "$grpc" --registry-listen "$reg" --metrics-listen "$metrics" \
  --data-dir "$work/ctl" --image-gc-interval 0s >"$work/controller.log" 2>&1 &
ctl_pid=$!
for _ in $(seq 1 200); do
  [ -f "$work/ctl/admin.yaml" ] && (exec 3<>"/dev/tcp/${reg%:*}/${reg#*:}") 2>/dev/null && break
  kill -0 "$ctl_pid" 2>/dev/null || { cat "$work/controller.log" >&2; exit 1; }
  sleep 0.1
done
"$BIN_DIR/imctl" --config "$work/ctl/admin.yaml" registry login "$reg" \
  --authfile "$work/auth.json" --cert-dir "$work/certs" --client-cert >/dev/null
echo '{}' >"$work/empty.json"
sk=(skopeo --insecure-policy)
tls_dest=(--dest-cert-dir "$work/certs" --dest-authfile "$work/empty.json")
tls_src=(--src-cert-dir "$work/certs" --src-authfile "$work/empty.json")

now() { date +%s.%N; }
rate() { python3 -c "import sys; b,t=float(sys.argv[1]),float(sys.argv[2]); print(f'{b/t/1e6:.1f}')" "$1" "$2"; }

sync
t0=$(now); "${sk[@]}" copy -q "oci:$work/src:bench" "oci:$work/local:bench"; t1=$(now)
local_s=$(python3 -c "print($t1-$t0)")
rm -rf "$work/local"; sync
t0=$(now); "${sk[@]}" copy -q "${tls_dest[@]}" "oci:$work/src:bench" "docker://$reg/bench/image:1"; t1=$(now)
push_s=$(python3 -c "print($t1-$t0)")
t0=$(now); "${sk[@]}" copy -q "${tls_src[@]}" "docker://$reg/bench/image:1" "oci:$work/pulled:bench"; t1=$(now)
pull_s=$(python3 -c "print($t1-$t0)")
before=$(grep -c "upload finished" "$work/controller.log" || true)
t0=$(now); "${sk[@]}" copy -q "${tls_dest[@]}" "oci:$work/src:bench" "docker://$reg/bench/image:1"; t1=$(now)
again_s=$(python3 -c "print($t1-$t0)")
after=$(grep -c "upload finished" "$work/controller.log" || true)

lr=$(rate "$bytes" "$local_s"); pr=$(rate "$bytes" "$push_s"); gr=$(rate "$bytes" "$pull_s")
echo "image: $LAYERS layers, $bytes bytes"
echo "skopeo copy oci->oci (local):  ${local_s}s  ${lr} MB/s"
echo "push through the registry:    ${push_s}s  ${pr} MB/s  ratio $(python3 -c "print(f'{$local_s/$push_s:.2f}')")"
echo "pull through the registry:    ${pull_s}s  ${gr} MB/s  ratio $(python3 -c "print(f'{$local_s/$pull_s:.2f}')")"
echo "push again: ${again_s}s, $((after - before)) blobs uploaded"
[ "$((after - before))" = 0 ] || { echo "the second push uploaded blobs" >&2; exit 1; }
