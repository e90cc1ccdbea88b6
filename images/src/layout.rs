//! Writing an OCI image layout: [`build_layout`].
//!
//! The layout holds `oci-layout`, `index.json` and `blobs/sha256/<hex>`
//! for one single-platform (linux/amd64) image manifest, its config and
//! its one layer. Every document is compact JSON with a fixed field order
//! (maps are sorted), and `created` comes from the spec's epoch, so the
//! same spec over the same files always gives the same bytes and the same
//! manifest digest.
//!
//! The layout is written next to `out_dir` first and moved into place
//! only when complete; an existing layout at `out_dir` is replaced (no
//! stale blobs stay behind), anything else that is not empty is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ironmesh_oci::{
    Descriptor, Digest, EmptyObject, History, ImageConfig, ImageIndex, ImageManifest, Platform,
    RootFs, RunConfig,
};
use serde::Serialize;

use crate::error::ImageError;
use crate::layer::{build_layer, sha256_digest};
use crate::spec::ImageSpec;

pub const MEDIA_INDEX: &str = ironmesh_oci::media::OCI_INDEX;
pub const MEDIA_MANIFEST: &str = ironmesh_oci::media::OCI_MANIFEST;
pub const MEDIA_CONFIG: &str = ironmesh_oci::media::OCI_CONFIG;
/// The tag, as the OCI image spec defines the annotation.
pub const ANNOTATION_REF_NAME: &str = ironmesh_oci::annotations::REF_NAME;
/// The full `name:tag`, as `ctr images export` writes it and as
/// `ctr images import` and the agent read it.
pub const ANNOTATION_CONTAINERD_NAME: &str = ironmesh_oci::annotations::CONTAINERD_NAME;

pub const ARCHITECTURE: &str = "amd64";
pub const OS: &str = "linux";

/// What [`build_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// `name:tag`.
    pub reference: String,
    /// `sha256:…` of the manifest: the image's identity.
    pub manifest_digest: String,
    pub config_digest: String,
    /// `sha256:…` of each layer blob (as stored, i.e. compressed).
    pub layer_digests: Vec<String>,
    /// `sha256:…` of each uncompressed layer tar (the config's diff_ids).
    pub diff_ids: Vec<String>,
    /// Total bytes of the blobs (manifest + config + layers).
    pub size: u64,
}

/// A descriptor of `bytes` (no platform, annotations or artifact type).
fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        platform: None,
        artifact_type: None,
        annotations: BTreeMap::new(),
    }
}

/// Builds the image `spec` describes and writes it as an OCI image layout
/// at `out_dir` (created, or replaced if it holds a layout already).
pub fn build_layout(spec: &ImageSpec, out_dir: &Path) -> Result<BuiltImage, ImageError> {
    let valid = spec.validate()?;
    let layer = build_layer(spec, &valid)?;
    let layer_digest = sha256_digest(&layer.blob);
    let created = rfc3339_utc(spec.epoch);

    // Field order and the fields left out match the bytes this always
    // wrote: entrypoint and working dir always, the rest only when set.
    let config = ImageConfig {
        created: Some(created.clone()),
        architecture: ARCHITECTURE.to_string(),
        os: OS.to_string(),
        config: Some(RunConfig {
            exposed_ports: Some(
                valid
                    .ports
                    .iter()
                    .map(|p| (p.clone(), EmptyObject {}))
                    .collect::<BTreeMap<_, _>>(),
            )
            .filter(|p| !p.is_empty()),
            env: Some(spec.env.clone()).filter(|e| !e.is_empty()),
            entrypoint: Some(spec.entrypoint.clone()),
            cmd: None,
            working_dir: Some(spec.working_dir.clone()),
            user: None,
            labels: Some(spec.labels.clone()).filter(|l| !l.is_empty()),
        }),
        rootfs: RootFs {
            kind: "layers".to_string(),
            diff_ids: vec![layer.diff_id.clone()],
        },
        history: vec![History {
            created: Some(created),
            created_by: Some("ironmesh-images build_layout".to_string()),
        }],
    };
    let config_json = to_json("the image config", &config)?;
    let config_digest = sha256_digest(&config_json);

    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.to_string()),
        artifact_type: None,
        config: descriptor(MEDIA_CONFIG, &config_json),
        layers: vec![descriptor(layer.media_type, &layer.blob)],
        subject: None,
        annotations: BTreeMap::new(),
    };
    let manifest_json = to_json("the image manifest", &manifest)?;
    let manifest_digest = sha256_digest(&manifest_json);

    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_INDEX.to_string()),
        manifests: vec![Descriptor {
            annotations: BTreeMap::from([
                (ANNOTATION_CONTAINERD_NAME.to_string(), spec.reference()),
                (ANNOTATION_REF_NAME.to_string(), spec.tag.clone()),
            ]),
            platform: Some(Platform {
                architecture: ARCHITECTURE.to_string(),
                os: OS.to_string(),
                variant: None,
            }),
            ..descriptor(MEDIA_MANIFEST, &manifest_json)
        }],
        annotations: BTreeMap::new(),
    };
    let index_json = to_json("index.json", &index)?;

    let blobs: [(&str, &[u8]); 3] = [
        (&manifest_digest, &manifest_json),
        (&config_digest, &config_json),
        (&layer_digest, &layer.blob),
    ];
    write_layout(out_dir, &index_json, &blobs)?;
    let size = blobs.iter().map(|(_, b)| b.len() as u64).sum();

    Ok(BuiltImage {
        reference: spec.reference(),
        manifest_digest,
        config_digest,
        layer_digests: vec![layer_digest],
        diff_ids: vec![layer.diff_id],
        size,
    })
}

fn to_json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|source| ImageError::Json { what, source })
}

/// Writes the layout into a sibling staging directory, then moves it to
/// `out_dir`.
fn write_layout(
    out_dir: &Path,
    index_json: &[u8],
    blobs: &[(&str, &[u8])],
) -> Result<(), ImageError> {
    let Some(dir_name) = out_dir.file_name() else {
        return Err(ImageError::io(
            "use as the output directory",
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path must end in a directory name",
            ),
        ));
    };
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_replaceable(out_dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| ImageError::io("create directory", &parent, e))?;

    let sibling = |what: &str| {
        let mut name = std::ffi::OsString::from(".");
        name.push(dir_name);
        name.push(format!(".{what}-{}", std::process::id()));
        parent.join(name)
    };
    let staging = sibling("tmp");
    remove_if_present(&staging)?;
    let result = write_into(&staging, index_json, blobs).and_then(|()| {
        if out_dir.exists() {
            let old = sibling("old");
            remove_if_present(&old)?;
            std::fs::rename(out_dir, &old)
                .map_err(|e| ImageError::io("move aside the old layout", out_dir, e))?;
            std::fs::rename(&staging, out_dir)
                .map_err(|e| ImageError::io("move the new layout to", out_dir, e))?;
            std::fs::remove_dir_all(&old)
                .map_err(|e| ImageError::io("remove the old layout", &old, e))
        } else {
            std::fs::rename(&staging, out_dir)
                .map_err(|e| ImageError::io("move the new layout to", out_dir, e))
        }
    });
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// `out_dir` may be absent, an empty directory or an image layout.
fn check_replaceable(out_dir: &Path) -> Result<(), ImageError> {
    let meta = match std::fs::symlink_metadata(out_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("inspect", out_dir, e)),
    };
    if !meta.is_dir() {
        return Err(ImageError::NotALayout(out_dir.to_path_buf()));
    }
    if out_dir.join("oci-layout").is_file() {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(out_dir).map_err(|e| ImageError::io("list", out_dir, e))?;
    if entries.next().is_some() {
        return Err(ImageError::NotALayout(out_dir.to_path_buf()));
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("remove", path, e)),
    }
}

fn write_into(dir: &Path, index_json: &[u8], blobs: &[(&str, &[u8])]) -> Result<(), ImageError> {
    let blob_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blob_dir)
        .map_err(|e| ImageError::io("create directory", &blob_dir, e))?;
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).map_err(|e| ImageError::io("write", &path, e))
    };
    write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    for (digest, bytes) in blobs {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        write(blob_dir.join(hex), bytes)?;
    }
    write(dir.join("index.json"), index_json)
}

/// `1970-01-01T00:00:00Z` for 0.
pub(crate) fn rfc3339_utc(epoch: u64) -> String {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
