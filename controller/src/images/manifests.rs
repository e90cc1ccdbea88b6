//! The registry's view of the image store: manifests and indexes per
//! repository, tags, and referrers.
//!
//! A manifest's bytes are a blob like any other (content-addressed, under
//! `blobs/sha256`); what makes it part of a repository is the record
//! `/image-manifests/<repository>@<digest>` (JSON [`ManifestRecord`]). A tag
//! is the image name `/images/<repository>:<tag>` the rest of the
//! controller already resolves, so an image pushed with skopeo is the same
//! thing as one pushed with `imctl image push`. A manifest is recorded only
//! after everything it references is stored (its config and layers; an
//! index's manifests), in one store transaction with its tag.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{
    digest_hex, is_path_component, normalize_name, now_unix_ms, ImageRecord, ImageStore,
    ImageStoreError, KEY_PREFIX, MAX_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};
use crate::store::{Op, StoreError, Txn, TxnOutcome};

/// Store key prefix of manifest records.
pub const MANIFEST_PREFIX: &str = "/image-manifests/";
/// Longest repository name (the distribution limit for a whole name).
const MAX_REPOSITORY: usize = 255;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = MAX_MANIFEST;

/// One manifest (or index) of one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestRecord {
    pub repository: String,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Digest of the manifest this one refers to (`subject`), for referrers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    pub pushed_unix_ms: i64,
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) | Reference::Digest(t) => f.write_str(t),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("repository name {0:?} is not valid: lowercase path components of letters and digits joined by '.', '_', '__' or '-', separated by '/'")]
    NameInvalid(String),
    #[error("tag {0:?} is not valid: letters, digits, '_', '.' or '-', at most 128, not starting with '.' or '-'")]
    TagInvalid(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("manifest {reference} is not in repository {repository}")]
    ManifestUnknown {
        repository: String,
        reference: String,
    },
    #[error("repository {0} is not known to the registry")]
    NameUnknown(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest references blobs the registry lacks: {0}")]
    BlobUnknown(String),
    #[error("manifest is {0} bytes; at most {MAX_MANIFEST_BYTES} are accepted")]
    TooLarge(u64),
    #[error(transparent)]
    Io(#[from] ImageStoreError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the repository changed while this request ran; retry")]
    Conflict,
}

/// Checks a repository name (the distribution grammar's path).
pub fn check_repository(name: &str) -> Result<(), ManifestError> {
    if name.is_empty() || name.len() > MAX_REPOSITORY || !name.split('/').all(is_path_component) {
        return Err(ManifestError::NameInvalid(name.to_string()));
    }
    Ok(())
}

/// A tag or a digest, checked.
pub fn parse_reference(s: &str) -> Result<Reference, ManifestError> {
    if s.contains(':') {
        digest_hex(s).map_err(ManifestError::DigestInvalid)?;
        return Ok(Reference::Digest(s.to_string()));
    }
    if ironmesh_oci::name::check_tag(s).is_err() {
        return Err(ManifestError::TagInvalid(s.to_string()));
    }
    Ok(Reference::Tag(s.to_string()))
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    ironmesh_oci::Digest::of(data).into()
}

fn manifest_key(repository: &str, digest: &str) -> String {
    format!("{MANIFEST_PREFIX}{repository}@{digest}")
}

fn tag_key(repository: &str, tag: &str) -> String {
    format!("{KEY_PREFIX}{repository}:{tag}")
}

/// What a manifest refers to, from its JSON.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub media_type: String,
    /// Blobs that must be stored: an image manifest's config and layers.
    pub blobs: Vec<(String, String, u64)>,
    /// Manifests an index lists.
    pub children: Vec<(String, u64)>,
    /// The platforms an index's manifests declare (placement keeps its
    /// instances to nodes of one of them).
    pub platforms: Vec<ironmesh_oci::Platform>,
    pub subject: Option<String>,
    pub artifact_type: Option<String>,
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One descriptor of a manifest (the project's [`ironmesh_oci::Descriptor`]:
/// its digest is checked as it parses, a negative size does not parse):
/// `(digest, media type, size)`.
fn descriptor(v: &serde_json::Value, what: &str) -> Result<(String, String, u64), ManifestError> {
    let d: ironmesh_oci::Descriptor = serde_json::from_value(v.clone())
        .map_err(|e| ManifestError::ManifestInvalid(format!("{what}: {e}")))?;
    Ok((d.digest.into(), d.media_type, d.size))
}

/// Layers a registry need not hold (Windows foreign layers).
fn non_distributable(media_type: &str) -> bool {
    media_type.contains("nondistributable") || media_type.contains("foreign")
}

/// Parses a manifest or index; `content_type` is the media type the
/// client declared (the body's own `mediaType`, when present, must agree).
pub(crate) fn parse(data: &[u8], content_type: Option<&str>) -> Result<Parsed, ManifestError> {
    let v: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| ManifestError::ManifestInvalid(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ManifestError::ManifestInvalid("not a JSON object".into()))?;
    if obj.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(ManifestError::ManifestInvalid(
            "schemaVersion must be 2".into(),
        ));
    }
    let body_type = obj.get("mediaType").and_then(|m| m.as_str());
    let declared = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty() && *c != "application/json");
    if let (Some(b), Some(d)) = (body_type, declared) {
        if b != d {
            return Err(ManifestError::ManifestInvalid(format!(
                "Content-Type {d} but the manifest's mediaType is {b}"
            )));
        }
    }
    let media_type = match body_type.or(declared) {
        Some(t) => t.to_string(),
        None if obj.contains_key("manifests") => MEDIA_OCI_INDEX.to_string(),
        None => MEDIA_OCI_MANIFEST.to_string(),
    };
    let mut p = Parsed {
        media_type: media_type.clone(),
        artifact_type: obj
            .get("artifactType")
            .and_then(|a| a.as_str())
            .map(str::to_string),
        annotations: obj.get("annotations").and_then(|a| a.as_object()).cloned(),
        ..Parsed::default()
    };
    if let Some(s) = obj.get("subject") {
        p.subject = Some(descriptor(s, "subject")?.0);
    }
    match media_type.as_str() {
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => {
            let config = obj
                .get("config")
                .ok_or_else(|| ManifestError::ManifestInvalid("no config".into()))?;
            let (digest, config_type, size) = descriptor(config, "config")?;
            if p.artifact_type.is_none() {
                p.artifact_type = Some(config_type.clone());
            }
            p.blobs.push(("config".into(), digest, size));
            let layers = match obj.get("layers") {
                Some(serde_json::Value::Array(a)) => a.as_slice(),
                None => &[],
                Some(_) => {
                    return Err(ManifestError::ManifestInvalid(
                        "layers is not an array".into(),
                    ))
                }
            };
            for (i, l) in layers.iter().enumerate() {
                let what = format!("layer {i}");
                let (digest, mt, size) = descriptor(l, &what)?;
                if !non_distributable(&mt) {
                    p.blobs.push((what, digest, size));
                }
            }
        }
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => {
            let Some(serde_json::Value::Array(ms)) = obj.get("manifests") else {
                return Err(ManifestError::ManifestInvalid(
                    "an index needs a manifests array".into(),
                ));
            };
            for (i, m) in ms.iter().enumerate() {
                let d: ironmesh_oci::Descriptor = serde_json::from_value(m.clone())
                    .map_err(|e| ManifestError::ManifestInvalid(format!("manifests[{i}]: {e}")))?;
                if let Some(pl) = d.platform {
                    if !p.platforms.contains(&pl) {
                        p.platforms.push(pl);
                    }
                }
                p.children.push((d.digest.into(), d.size));
            }
        }
        other => {
            return Err(ManifestError::ManifestInvalid(format!(
                "media type {other:?} is not an OCI or Docker image manifest or index"
            )))
        }
    }
    Ok(p)
}

/// Result of a manifest push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub digest: String,
    pub subject: Option<String>,
}

impl ImageStore {
    async fn manifest_record(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, ManifestError> {
        let Some(kv) = self.store.get(&manifest_key(repository, digest)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| ManifestError::ManifestInvalid(format!("stored record: {e}")))
    }

    async fn tag_record(
        &self,
        repository: &str,
        tag: &str,
    ) -> Result<Option<ImageRecord>, ManifestError> {
        let Some(kv) = self.store.get(&tag_key(repository, tag)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| ManifestError::ManifestInvalid(format!("stored tag: {e}")))
    }

    /// Sum of the sizes of a manifest and everything it references
    /// (an index: its manifests and theirs), as `imctl image ls` shows.
    async fn total_size(&self, data: &[u8], parsed: &Parsed) -> u64 {
        let mut total = data.len() as u64 + parsed.blobs.iter().map(|b| b.2).sum::<u64>();
        for (child, size) in &parsed.children {
            total += size;
            if let Ok(Some(bytes)) = self.read_manifest_blob(child).await {
                if let Ok(p) = parse(&bytes, None) {
                    total += p.blobs.iter().map(|b| b.2).sum::<u64>();
                }
            }
        }
        total
    }

    /// The bytes of a stored manifest blob, `None` if absent.
    pub(crate) async fn read_manifest_blob(
        &self,
        digest: &str,
    ) -> Result<Option<Vec<u8>>, ImageStoreError> {
        let Ok(hex) = digest_hex(digest) else {
            return Ok(None);
        };
        let path = self.blobs.join(hex);
        match self.blob_size(&path).await? {
            None => Ok(None),
            Some(s) if s > MAX_MANIFEST => Ok(None),
            Some(_) => match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(super::io_err("read", &path)(e)),
            },
        }
    }

    /// Stores a manifest or index under `repository` at `reference`. The
    /// digest of `data` must match a digest reference; everything it
    /// references must be stored (reported all at once otherwise). The
    /// blob, the record and the tag become visible together or not at all.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &Reference,
        content_type: Option<&str>,
        data: &[u8],
    ) -> Result<Pushed, ManifestError> {
        check_repository(repository)?;
        if data.len() as u64 > MAX_MANIFEST {
            return Err(ManifestError::TooLarge(data.len() as u64));
        }
        let digest = sha256_digest(data);
        if let Reference::Digest(d) = reference {
            if *d != digest {
                return Err(ManifestError::DigestInvalid(format!(
                    "the manifest's content hashes to {digest}, not {d}"
                )));
            }
        }
        let parsed = parse(data, content_type)?;
        let tag_name = match reference {
            Reference::Tag(t) => Some(
                normalize_name(&format!("{repository}:{t}"))
                    .map_err(|_| ManifestError::NameInvalid(repository.to_string()))?,
            ),
            Reference::Digest(_) => None,
        };
        let tmp = self.write_tmp(data).await?;
        // From the check of the references to the commit, collection waits.
        let _shared = self.gc_lock.read().await;
        let mut problems = Vec::new();
        for (what, d, size) in &parsed.blobs {
            match self.stat_blob(d).await? {
                None => problems.push(format!("{d} ({what}) is missing")),
                Some(s) if s != *size => problems.push(format!(
                    "{d} ({what}) has {s} bytes, the manifest says {size}"
                )),
                Some(_) => {}
            }
        }
        for (d, _) in &parsed.children {
            if self.stat_blob(d).await?.is_none() {
                problems.push(format!("manifest {d} is missing; push it first"));
            }
        }
        if !problems.is_empty() {
            return Err(ManifestError::BlobUnknown(problems.join("; ")));
        }
        self.commit_unlocked(&tmp.path, &digest["sha256:".len()..])
            .await?;
        let now = now_unix_ms();
        let record = ManifestRecord {
            repository: repository.to_string(),
            digest: digest.clone(),
            media_type: parsed.media_type.clone(),
            size: data.len() as u64,
            artifact_type: parsed.artifact_type.clone(),
            subject: parsed.subject.clone(),
            annotations: parsed.annotations.clone(),
            pushed_unix_ms: now,
        };
        let mut ops = vec![Op::Put {
            key: manifest_key(repository, &digest),
            value: encode(&record)?,
        }];
        if let Some(name) = tag_name {
            let image = ImageRecord {
                name: name.clone(),
                manifest_digest: digest.clone(),
                size: self.total_size(data, &parsed).await,
                pushed_unix_ms: now,
                platforms: parsed.platforms.clone(),
            };
            ops.push(Op::Put {
                key: format!("{KEY_PREFIX}{name}"),
                value: encode(&image)?,
            });
        }
        match self
            .store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await?
        {
            TxnOutcome::Committed(_) => {}
            TxnOutcome::CompareFailed { .. } => return Err(ManifestError::Conflict),
        }
        tracing::info!(repository, reference = %reference, %digest, media_type = %parsed.media_type, "manifest stored");
        Ok(Pushed {
            digest,
            subject: parsed.subject,
        })
    }

    /// A manifest of `repository` by tag or digest: its record and bytes.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &Reference,
    ) -> Result<(ManifestRecord, Vec<u8>), ManifestError> {
        check_repository(repository)?;
        let unknown = || ManifestError::ManifestUnknown {
            repository: repository.to_string(),
            reference: reference.to_string(),
        };
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                self.tag_record(repository, t)
                    .await?
                    .ok_or_else(unknown)?
                    .manifest_digest
            }
        };
        let record = match self.manifest_record(repository, &digest).await? {
            Some(r) => Some(r),
            // Tagged before manifests had records: the tag vouches for it.
            None => self
                .tags_of(repository)
                .await?
                .into_iter()
                .find(|(_, d)| *d == digest)
                .map(|_| ManifestRecord {
                    repository: repository.to_string(),
                    digest: digest.clone(),
                    media_type: String::new(),
                    size: 0,
                    artifact_type: None,
                    subject: None,
                    annotations: None,
                    pushed_unix_ms: 0,
                }),
        };
        let mut record = record.ok_or_else(unknown)?;
        let data = self
            .read_manifest_blob(&digest)
            .await?
            .ok_or_else(unknown)?;
        if record.media_type.is_empty() {
            record.media_type = parse(&data, None)
                .map(|p| p.media_type)
                .unwrap_or_else(|_| MEDIA_OCI_MANIFEST.to_string());
            record.size = data.len() as u64;
        }
        Ok((record, data))
    }

    /// `(tag, digest)` of every tag of `repository`, by tag.
    async fn tags_of(&self, repository: &str) -> Result<Vec<(String, String)>, ManifestError> {
        let prefix = format!("{KEY_PREFIX}{repository}:");
        let (kvs, _) = self.store.list(&prefix).await?;
        let mut tags: Vec<(String, String)> = kvs
            .iter()
            .filter_map(|kv| {
                let tag = kv.key.strip_prefix(&prefix)?;
                let r: ImageRecord = serde_json::from_slice(&kv.value).ok()?;
                (!tag.contains('/')).then(|| (tag.to_string(), r.manifest_digest))
            })
            .collect();
        tags.sort();
        Ok(tags)
    }

    async fn manifests_of(&self, repository: &str) -> Result<Vec<ManifestRecord>, ManifestError> {
        let prefix = format!("{MANIFEST_PREFIX}{repository}@");
        let (kvs, _) = self.store.list(&prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The tags of `repository`, sorted; `NameUnknown` if it holds nothing.
    pub async fn list_tags(&self, repository: &str) -> Result<Vec<String>, ManifestError> {
        check_repository(repository)?;
        let tags = self.tags_of(repository).await?;
        if tags.is_empty() && self.manifests_of(repository).await?.is_empty() {
            return Err(ManifestError::NameUnknown(repository.to_string()));
        }
        Ok(tags.into_iter().map(|(t, _)| t).collect())
    }

    /// Every repository with a tag or a manifest, sorted.
    pub async fn repositories(&self) -> Result<Vec<String>, ManifestError> {
        let mut repos = BTreeSet::new();
        let (kvs, _) = self.store.list(KEY_PREFIX).await?;
        for kv in kvs {
            if let Some(name) = kv.key.strip_prefix(KEY_PREFIX) {
                if let Some((repo, _)) = name.rsplit_once(':') {
                    if check_repository(repo).is_ok() {
                        repos.insert(repo.to_string());
                    }
                }
            }
        }
        let (kvs, _) = self.store.list(MANIFEST_PREFIX).await?;
        for kv in kvs {
            if let Some((repo, _)) = kv
                .key
                .strip_prefix(MANIFEST_PREFIX)
                .and_then(|k| k.rsplit_once('@'))
            {
                repos.insert(repo.to_string());
            }
        }
        Ok(repos.into_iter().collect())
    }

    /// Descriptors of the manifests of `repository` whose subject is
    /// `digest`, optionally only those of `artifact_type`.
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, ManifestError> {
        check_repository(repository)?;
        digest_hex(digest).map_err(ManifestError::DigestInvalid)?;
        let mut out = BTreeMap::new();
        for r in self.manifests_of(repository).await? {
            if r.subject.as_deref() != Some(digest) {
                continue;
            }
            if artifact_type.is_some_and(|a| r.artifact_type.as_deref() != Some(a)) {
                continue;
            }
            let mut d = serde_json::json!({
                "mediaType": r.media_type,
                "digest": r.digest,
                "size": r.size,
            });
            if let Some(a) = &r.artifact_type {
                d["artifactType"] = a.clone().into();
            }
            if let Some(a) = &r.annotations {
                d["annotations"] = serde_json::Value::Object(a.clone());
            }
            out.insert(r.digest.clone(), d);
        }
        Ok(out.into_values().collect())
    }

    /// Deletes a manifest by digest (its record and every tag of the
    /// repository pointing at it) or a tag. Returns the tags removed.
    /// The blobs stay until garbage collection finds them unreferenced.
    pub async fn delete_manifest(
        &self,
        repository: &str,
        reference: &Reference,
    ) -> Result<Vec<String>, ManifestError> {
        check_repository(repository)?;
        let unknown = || ManifestError::ManifestUnknown {
            repository: repository.to_string(),
            reference: reference.to_string(),
        };
        let (mut ops, mut removed) = (Vec::new(), Vec::new());
        match reference {
            Reference::Tag(t) => {
                if self.tag_record(repository, t).await?.is_none() {
                    return Err(unknown());
                }
                ops.push(Op::Delete {
                    key: tag_key(repository, t),
                });
                removed.push(t.clone());
            }
            Reference::Digest(d) => {
                let had_record = self.manifest_record(repository, d).await?.is_some();
                for (tag, digest) in self.tags_of(repository).await? {
                    if digest == *d {
                        ops.push(Op::Delete {
                            key: tag_key(repository, &tag),
                        });
                        removed.push(tag);
                    }
                }
                if !had_record && ops.is_empty() {
                    return Err(unknown());
                }
                ops.push(Op::Delete {
                    key: manifest_key(repository, d),
                });
            }
        }
        if let TxnOutcome::CompareFailed { .. } = self
            .store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await?
        {
            return Err(ManifestError::Conflict);
        }
        tracing::info!(repository, reference = %reference, tags = ?removed, "manifest deleted");
        Ok(removed)
    }

    /// Removes the image name `name` (`repo:tag`; no tag means `:latest`).
    /// Returns the manifest digest it pointed at.
    pub async fn remove_image(&self, name: &str) -> Result<String, ManifestError> {
        let name = normalize_name(name).map_err(|_| ManifestError::NameInvalid(name.into()))?;
        let (repository, tag) = name
            .rsplit_once(':')
            .ok_or_else(|| ManifestError::NameInvalid(name.clone()))?;
        let record = self.tag_record(repository, tag).await?.ok_or_else(|| {
            ManifestError::ManifestUnknown {
                repository: repository.to_string(),
                reference: tag.to_string(),
            }
        })?;
        self.delete_manifest(repository, &Reference::Tag(tag.to_string()))
            .await?;
        Ok(record.manifest_digest)
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ManifestError> {
    serde_json::to_vec(v).map_err(|e| ManifestError::ManifestInvalid(format!("encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn fixture() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
        (dir, images)
    }

    async fn blob(images: &ImageStore, data: &[u8]) -> String {
        let d = sha256_digest(data);
        images.store_bytes(&d, data).await.unwrap();
        d
    }

    fn manifest(config: &str, clen: usize, layer: &str, llen: usize) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": clen},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": llen}],
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn manifest_needs_its_blobs_then_is_visible_by_tag_and_digest() {
        let (_d, images) = fixture();
        let config = blob(&images, b"{}").await;
        let layer = sha256_digest(b"layer");
        let m = manifest(&config, 2, &layer, 5);
        let tag = Reference::Tag("1".into());
        let e = images
            .put_manifest("a/b", &tag, Some(MEDIA_OCI_MANIFEST), &m)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ManifestError::BlobUnknown(s) if s.contains(&layer)),
            "{e}"
        );
        assert!(images.get_manifest("a/b", &tag).await.is_err());
        assert!(images.list_tags("a/b").await.is_err());

        blob(&images, b"layer").await;
        let pushed = images
            .put_manifest("a/b", &tag, Some(MEDIA_OCI_MANIFEST), &m)
            .await
            .unwrap();
        assert_eq!(pushed.digest, sha256_digest(&m));
        let (rec, data) = images.get_manifest("a/b", &tag).await.unwrap();
        assert_eq!(
            (rec.media_type.as_str(), data.as_slice()),
            (MEDIA_OCI_MANIFEST, m.as_slice())
        );
        let by_digest = Reference::Digest(pushed.digest.clone());
        assert!(images.get_manifest("a/b", &by_digest).await.is_ok());
        // Not in another repository.
        assert!(matches!(
            images.get_manifest("other", &by_digest).await,
            Err(ManifestError::ManifestUnknown { .. })
        ));
        assert_eq!(images.list_tags("a/b").await.unwrap(), ["1"]);
        assert_eq!(images.resolve("a/b:1").await, Some(pushed.digest.clone()));
        assert_eq!(images.repositories().await.unwrap(), ["a/b"]);

        // Wrong digest reference.
        let e = images
            .put_manifest("a/b", &Reference::Digest(sha256_digest(b"x")), None, &m)
            .await
            .unwrap_err();
        assert!(matches!(e, ManifestError::DigestInvalid(_)), "{e}");

        // Delete by digest takes the tag with it.
        assert_eq!(
            images.delete_manifest("a/b", &by_digest).await.unwrap(),
            ["1"]
        );
        assert_eq!(images.resolve("a/b:1").await, None);
        assert!(matches!(
            images.delete_manifest("a/b", &by_digest).await,
            Err(ManifestError::ManifestUnknown { .. })
        ));
    }

    #[tokio::test]
    async fn index_needs_its_manifests_and_referrers_are_listed() {
        let (_d, images) = fixture();
        let config = blob(&images, b"{}").await;
        let layer = blob(&images, b"l").await;
        let child = manifest(&config, 2, &layer, 1);
        let child_digest = sha256_digest(&child);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{"mediaType": MEDIA_OCI_MANIFEST, "digest": child_digest, "size": child.len(),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        }))
        .unwrap();
        let tag = Reference::Tag("multi".into());
        assert!(matches!(
            images.put_manifest("r", &tag, None, &index).await,
            Err(ManifestError::BlobUnknown(_))
        ));
        images
            .put_manifest("r", &Reference::Digest(child_digest.clone()), None, &child)
            .await
            .unwrap();
        images.put_manifest("r", &tag, None, &index).await.unwrap();
        let (rec, _) = images.get_manifest("r", &tag).await.unwrap();
        assert_eq!(rec.media_type, MEDIA_OCI_INDEX);
        // The tag record carries the index's platforms for placement.
        let kv = images.store.get("/images/r:multi").await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(
            v["platforms"],
            serde_json::json!([{"architecture": "amd64", "os": "linux"}])
        );

        let artifact = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
            "layers": [],
            "subject": {"mediaType": MEDIA_OCI_MANIFEST, "digest": child_digest, "size": child.len()},
        }))
        .unwrap();
        let pushed = images
            .put_manifest(
                "r",
                &Reference::Digest(sha256_digest(&artifact)),
                None,
                &artifact,
            )
            .await
            .unwrap();
        assert_eq!(pushed.subject.as_deref(), Some(child_digest.as_str()));
        let refs = images.referrers("r", &child_digest, None).await.unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0]["artifactType"], "application/vnd.example.sbom");
        assert!(images
            .referrers("r", &child_digest, Some("other/type"))
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn names_tags_and_bodies_are_checked() {
        assert!(check_repository("ironmesh.dev/records-server").is_ok());
        for bad in ["", "A", "a//b", "/a", "a/", "a:b", "a@b", "../x"] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
        assert!(matches!(parse_reference("v1.0"), Ok(Reference::Tag(_))));
        assert!(parse_reference(".x").is_err());
        assert!(parse_reference("sha256:00").is_err());
        assert!(parse(b"nope", None).is_err());
        assert!(parse(br#"{"schemaVersion":1}"#, None).is_err());
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1}}"#;
        assert!(parse(m, Some(MEDIA_OCI_INDEX)).is_err());
        assert!(parse(m, Some(MEDIA_OCI_MANIFEST)).is_ok());
    }
}
