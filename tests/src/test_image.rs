//! A tiny OCI image layout for runtime tests: one uncompressed layer with
//! `/bin/busybox` from busybox-static, `/bin/sh` linking to it and `/tmp`.
//! Hand-written tar rather than `ironmesh_images::build_layout`, which
//! builds entrypoint images of regular files: these tests need a symlink,
//! a `Cmd`-only config and, for the fetch tests, tars no builder would
//! write.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The name the busybox layout is imported under.
pub const IMAGE: &str = "ironmesh.test/busybox:1";

/// Appends one ustar entry (`kind` b'0' file, b'2' symlink, b'5' directory).
pub fn tar_entry(out: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
    let mut h = [0u8; 512];
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}\0", width = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h, 100, 8, mode as u64);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes `data` under `dir/blobs/sha256/` and returns its digest.
pub fn put_blob(dir: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    fs::write(
        dir.join("blobs/sha256").join(&digest["sha256:".len()..]),
        data,
    )
    .unwrap();
    digest
}

/// Writes an OCI layout with one uncompressed layer holding /bin/busybox,
/// /bin/sh -> busybox and /tmp.
pub fn busybox_layout(dir: &Path, name: &str) -> PathBuf {
    let busybox = fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: install busybox-static (scripts/install-deps.sh)");
    let mut layer = Vec::new();
    tar_entry(&mut layer, "bin/", b'5', 0o755, &[], "");
    tar_entry(&mut layer, "bin/busybox", b'0', 0o755, &busybox, "");
    tar_entry(&mut layer, "bin/sh", b'2', 0o777, &[], "busybox");
    tar_entry(&mut layer, "tmp/", b'5', 0o1777, &[], "");
    layer.extend_from_slice(&[0u8; 1024]);

    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer_digest = put_blob(dir, &layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": name}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    dir.to_path_buf()
}

/// `/bin/busybox` followed by `args`: a command line for the busybox image.
pub fn busybox(args: &[&str]) -> Vec<String> {
    std::iter::once("/bin/busybox")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}
