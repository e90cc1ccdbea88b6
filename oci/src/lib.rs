//! The OCI model every Ironmesh crate shares: [`Digest`] (a `sha256:`
//! digest, checked once when parsed so its hex part is safe as a file
//! name), the [`media`] types, and the [`Descriptor`], [`ImageManifest`],
//! [`ImageIndex`] and [`ImageConfig`] JSON shapes of the image spec, and image [`name`]s
//! and tags.
//!
//! No I/O: the controller's store, the agent's fetch, `imctl image push`
//! and `images/` each read and write bytes themselves and use these types
//! to agree on what they mean.

pub mod name;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Media types the project reads and writes.
pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

    /// An image manifest (OCI or Docker v2).
    pub fn is_image_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }

    /// A multi-platform index (OCI index or Docker manifest list).
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST
    }
}

/// Annotations the project reads.
pub mod annotations {
    /// The full `name:tag` containerd (and `build-images`) record for an
    /// image in a layout's `index.json`.
    pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
    /// The image spec's reference name: often only a tag.
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
}

/// Why a string is not a [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("digest {0:?} is not \"sha256:\" followed by 64 lowercase hex digits")]
pub struct DigestError(pub String);

/// A `sha256:<64 lowercase hex>` digest. Only such strings parse, so
/// [`Digest::hex`] can never be a path trick.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

const PREFIX: &str = "sha256:";

impl Digest {
    /// Checks `s`.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        match s.strip_prefix(PREFIX) {
            Some(hex)
                if hex.len() == 64
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Digest(s.to_string()))
            }
            _ => Err(DigestError(s.to_string())),
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(format!(
            "{PREFIX}{}",
            hex::encode(sha2::Sha256::digest(data))
        ))
    }

    /// From a finished SHA-256 (streaming hashers).
    pub fn from_sha256(hash: &[u8]) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(hash)))
    }

    /// The 64 hex digits: the blob's file name in an OCI layout.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The hex part of `digest` if it is a valid [`Digest`].
pub fn digest_hex(digest: &str) -> Result<&str, DigestError> {
    Digest::parse(digest)?;
    Ok(&digest[PREFIX.len()..])
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Digest, DigestError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// Where a manifest in an index runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest (OCI, or Docker v2 with the same fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (or Docker manifest list), including a layout's
/// `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// The manifest for `os`/`architecture`, if the index has one.
    pub fn for_platform(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

/// An image config: the parts the project writes (`images/`) and reads
/// (the agent's run defaults and layer chain). Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// How a container of the image runs by default (`config` of an image
/// config; the field names are Docker's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    // Options throughout: Docker writes `null` for empty ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, EmptyObject>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `{}`, as the values of `ExposedPorts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

/// The layers of an image config, as uncompressed digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// One history entry of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// Whether JSON `data` is an index: by its `mediaType`, or by having
/// `manifests` and no `mediaType`.
pub fn is_index_json(data: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(mt) => media::is_index(mt),
        None => v.get("manifests").is_some(),
    }
}

/// This CPU as an OCI platform architecture (Go's GOARCH names).
pub fn host_architecture() -> &'static str {
    oci_architecture(std::env::consts::ARCH)
}

/// A CPU as Rust (and `uname -m` mostly) names it, e.g. `x86_64`, as an
/// OCI platform architecture, e.g. `amd64`. Agents report the former.
pub fn oci_architecture(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" | "i686" | "i386" => "386",
        "powerpc64" | "ppc64le" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn only_strict_sha256_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        let d = Digest::parse(&good).unwrap();
        assert_eq!((d.as_str(), d.hex()), (good.as_str(), &good[7..]));
        for bad in [
            "sha256:../../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            "a".repeat(64),
            String::new(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
            assert!(
                serde_json::from_value::<Digest>(bad.clone().into()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn docker_configs_with_nulls_parse() {
        let c: ImageConfig = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": null, "Cmd": ["/bin/sh"], "Labels": null, "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [{"created_by": "x", "empty_layer": true}],
        }))
        .unwrap();
        let run = c.config.unwrap();
        assert_eq!(run.cmd, Some(vec!["/bin/sh".to_string()]));
        assert!(run.env.is_none() && run.labels.is_none());
        assert_eq!(run.exposed_ports.map(|p| p.len()), Some(1));
    }

    #[test]
    fn manifests_and_indexes_round_trip_and_pick_a_platform() {
        let a = Digest::of(b"a");
        let index: ImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_INDEX,
            "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": a, "size": 1,
                           "platform": {"os": "linux", "architecture": "arm64"}}],
        }))
        .unwrap();
        assert_eq!(
            index.for_platform("linux", "arm64").map(|d| &d.digest),
            Some(&a)
        );
        assert!(index.for_platform("linux", "amd64").is_none());
        let bytes = serde_json::to_vec(&index).unwrap();
        assert!(is_index_json(&bytes));
        assert!(!is_index_json(br#"{"schemaVersion":2,"config":{}}"#));
        assert!(serde_json::from_value::<ImageManifest>(serde_json::json!({
            "schemaVersion": 2, "config": {"digest": "sha256:bad", "size": 1}
        }))
        .is_err());
    }
}
