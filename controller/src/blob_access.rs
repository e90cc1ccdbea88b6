//! The node authorizer for the image store: a node may fetch only the
//! blobs of images assigned to it.
//!
//! A node's images are those of the instances bound to it (resolved to
//! manifest digests the way assignments resolve them); its blobs are those
//! manifests and the config and layers they reference (for a multi-platform
//! index: every manifest it lists and theirs, as the node picks its own
//! platform). Manifests are content-addressed and immutable, so what each
//! references is read once and remembered (bounded). This module decides; `images` streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ironmesh_api::Kind;
use serde_json::Value;
use tonic::Status;

use crate::images::ImageStore;
use crate::resources::Resources;

/// Manifests whose references are remembered at once.
const MEMO_MAX: usize = 4096;
/// Largest manifest read to find its references.
const MAX_MANIFEST: u64 = 4 << 20;

#[derive(Clone)]
pub struct BlobAccess {
    resources: Resources,
    images: ImageStore,
    /// Manifest digest → digests it references.
    memo: Arc<Mutex<HashMap<String, Arc<Vec<String>>>>>,
}

impl BlobAccess {
    pub fn new(resources: Resources, images: ImageStore) -> BlobAccess {
        BlobAccess {
            resources,
            images,
            memo: Arc::default(),
        }
    }

    /// Ok if `node` may fetch `digest`, else `PERMISSION_DENIED`.
    pub async fn check(&self, node: &str, digest: &str) -> Result<(), Status> {
        let mut names: Vec<String> = self
            .resources
            .list_matching(Kind::Instance, |o| {
                o.object.pointer("/spec/node").and_then(Value::as_str) == Some(node)
            })
            .await
            .map_err(|e| Status::unavailable(format!("cannot read node {node}'s instances: {e}")))?
            .iter()
            .filter_map(|o| {
                o.object
                    .pointer("/spec/template/image")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        for name in &names {
            let Some(manifest) = self.images.resolve(name).await else {
                continue;
            };
            if manifest == digest || self.references(&manifest).await.iter().any(|d| d == digest) {
                return Ok(());
            }
        }
        tracing::warn!(
            node,
            digest,
            "blob fetch refused: not part of an image assigned to the node"
        );
        Err(Status::permission_denied(format!(
            "node {node} may not fetch blob {digest}: it belongs to no image of an instance assigned to the node"
        )))
    }

    /// The config and layer digests a manifest references (empty if it
    /// cannot be read: then only the manifest itself is allowed).
    async fn references(&self, manifest: &str) -> Arc<Vec<String>> {
        if let Some(r) = self
            .memo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(manifest)
        {
            return r.clone();
        }
        let refs = Arc::new(self.read_references(manifest).await.unwrap_or_default());
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= MEMO_MAX {
            memo.clear();
        }
        memo.insert(manifest.to_string(), refs.clone());
        refs
    }

    async fn read_references(&self, manifest: &str) -> Option<Vec<String>> {
        let data = self.read_manifest(manifest).await?;
        let children = index_manifests(&data);
        if children.is_empty() {
            return Some(manifest_references(&data));
        }
        // A multi-platform index: the node picks its platform's manifest,
        // so each one and what it references may be fetched.
        let mut refs = Vec::new();
        for child in children {
            if let Some(d) = self.read_manifest(&child).await {
                refs.extend(manifest_references(&d));
            }
            refs.push(child);
        }
        Some(refs)
    }

    async fn read_manifest(&self, digest: &str) -> Option<Vec<u8>> {
        let path = self.images.blob_path(digest).ok()?;
        let meta = tokio::fs::metadata(&path).await.ok()?;
        if meta.len() > MAX_MANIFEST {
            return None;
        }
        tokio::fs::read(&path).await.ok()
    }
}

/// The manifest digests an image index lists (empty for anything else).
pub fn index_manifests(data: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Vec::new();
    };
    v.get("manifests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("digest").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// The digests an image manifest's `config` and `layers` name.
pub fn manifest_references(data: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Vec::new();
    };
    let digest = |d: &Value| d.get("digest").and_then(Value::as_str).map(str::to_string);
    v.get("config")
        .and_then(digest)
        .into_iter()
        .chain(
            v.get("layers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(digest),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_the_config_and_layers() {
        let m = br#"{"schemaVersion":2,"config":{"digest":"sha256:c"},"layers":[{"digest":"sha256:l1"},{"digest":"sha256:l2"}]}"#;
        assert_eq!(
            manifest_references(m),
            vec!["sha256:c", "sha256:l1", "sha256:l2"]
        );
        assert!(manifest_references(b"not json").is_empty());
        let index =
            br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:a"},{"digest":"sha256:b"}]}"#;
        assert_eq!(index_manifests(index), vec!["sha256:a", "sha256:b"]);
        assert!(index_manifests(m).is_empty());
    }
}
