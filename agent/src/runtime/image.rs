//! Images in containerd: importing OCI image layouts and resolving images.
//!
//! This module owns getting an image from an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) into containerd without a
//! registry and without `ctr`, and reading an imported image back for a
//! run ([`Runtime::resolve_image`]).
//!
//! An import, under one lease so that nothing half-imported is kept:
//! 1. every blob the index's manifests reference is streamed with
//!    `Content.Write` (sha256 and size checked while streaming; blobs
//!    already in the content store are skipped);
//! 2. each layer is unpacked with `Snapshots.Prepare` → `Diff.Apply` →
//!    `Snapshots.Commit(name = chainID)` (skipped when the chainID
//!    snapshot exists);
//! 3. the image is created (or updated, when its target changed) under the
//!    name in the manifest descriptor's `io.containerd.image.name` or
//!    `org.opencontainers.image.ref.name` annotation;
//! 4. the lease is deleted. What keeps the content afterwards are the
//!    garbage-collection labels this module writes: on the manifest
//!    `containerd.io/gc.ref.content.config` and
//!    `containerd.io/gc.ref.content.l.<i>`, on the config
//!    `containerd.io/gc.ref.snapshot.<snapshotter>=<chainID>`.
//!
//! Importing the same layout again writes nothing and unpacks nothing.
//! Only single-platform image manifests are supported (an index nested in
//! `index.json` is refused with a clear error).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, ApplyRequest, CreateImageRequest, GetImageRequest, Image, Info, InfoRequest,
    ReadContentRequest, UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use containerd_client::types::{Descriptor, Mount};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::oci_spec::ImageDefaults;
use super::{call_err, unique_suffix, with_lease, Runtime, RuntimeError};

/// Size of one `Content.Write` message.
const CHUNK: usize = 1 << 20;
/// Largest manifest or config read into memory.
const MAX_JSON: u64 = 4 << 20;
/// How long an import lease outlives a crashed agent.
const LEASE_TTL: Duration = Duration::from_secs(3600);

use ironmesh_oci::annotations::{
    CONTAINERD_NAME as ANNOTATION_CONTAINERD_NAME, REF_NAME as ANNOTATION_REF_NAME,
};
use ironmesh_oci::media::OCI_MANIFEST as MEDIA_OCI_MANIFEST;
use ironmesh_oci::{Digest as OciDigest, ImageConfig, ImageIndex, ImageManifest};

/// A descriptor of a layout blob: the project's one OCI type (its digest
/// is checked when it parses, so it is safe as a file name).
type Desc = ironmesh_oci::Descriptor;

/// Progress of an import, reported after every chunk written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// The blob being written.
    pub digest: String,
    pub blob_written: u64,
    pub blob_size: u64,
    /// Bytes written so far in this import.
    pub written: u64,
    /// Bytes this import has to write (blobs already present excluded).
    pub total: u64,
}

/// What an import did to an image name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageChange {
    Created,
    /// The name existed with another target.
    Updated,
    Unchanged,
}

/// One image of an imported layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    pub name: String,
    pub manifest_digest: String,
    /// chainID of the top layer: the committed snapshot a container's
    /// root filesystem is prepared from.
    pub chain_id: String,
    pub change: ImageChange,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub images: Vec<ImportedImage>,
    pub bytes_written: u64,
    pub blobs_written: usize,
    pub blobs_present: usize,
    pub layers_unpacked: usize,
    pub layers_present: usize,
}

impl ImportReport {
    /// Nothing was written, unpacked, created or updated.
    pub fn is_noop(&self) -> bool {
        self.bytes_written == 0
            && self.blobs_written == 0
            && self.layers_unpacked == 0
            && self
                .images
                .iter()
                .all(|i| i.change == ImageChange::Unchanged)
    }
}

/// An imported image, read back from containerd for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub name: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub chain_id: String,
    pub defaults: ImageDefaults,
}

/// One image of a layout, parsed and checked.
struct LayoutImage {
    name: String,
    manifest: Desc,
    config: Desc,
    layers: Vec<Desc>,
    diff_ids: Vec<String>,
    chain_ids: Vec<String>,
}

/// chainIDs of a layer stack: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// Where a blob is in a layout ([`OciDigest::hex`] is 64 hex digits, never
/// a path trick; a bad digest or a negative size does not parse).
fn blob_path(dir: &Path, desc: &Desc) -> PathBuf {
    dir.join("blobs").join("sha256").join(desc.digest.hex())
}

/// The descriptor's size as containerd's `int64`.
fn size_i64(desc: &Desc) -> i64 {
    i64::try_from(desc.size).unwrap_or(i64::MAX)
}

/// Reads a small blob from the layout and checks its size and digest.
fn read_layout_blob(dir: &Path, desc: &Desc) -> Result<Vec<u8>, RuntimeError> {
    let path = blob_path(dir, desc);
    if desc.size > MAX_JSON {
        return Err(RuntimeError::invalid(
            format!("blob {}", desc.digest),
            format!("{} bytes is too large for a manifest or config", desc.size),
        ));
    }
    let data = std::fs::read(&path).map_err(|e| RuntimeError::io("read", &path, e))?;
    check_blob(desc.digest.as_str(), desc.size, &data)?;
    Ok(data)
}

fn check_blob(digest: &str, size: u64, data: &[u8]) -> Result<(), RuntimeError> {
    if data.len() as u64 != size {
        return Err(RuntimeError::invalid(
            format!("blob {digest}"),
            format!("has {} bytes, its descriptor says {size}", data.len()),
        ));
    }
    let actual = OciDigest::of(data);
    if actual != *digest {
        return Err(RuntimeError::invalid(
            format!("blob {digest}"),
            format!("content hashes to {actual}"),
        ));
    }
    Ok(())
}

fn parse_json<T: for<'de> Deserialize<'de>>(what: &str, data: &[u8]) -> Result<T, RuntimeError> {
    serde_json::from_slice(data).map_err(|e| RuntimeError::invalid(what, e.to_string()))
}

fn image_defaults(config: &ImageConfig) -> ImageDefaults {
    let c = config.config.as_ref();
    ImageDefaults {
        entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
        cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
        env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
        working_dir: c.and_then(|c| c.working_dir.clone()),
        user: c.and_then(|c| c.user.clone()).filter(|u| !u.is_empty()),
    }
}

fn is_manifest(media_type: &str) -> bool {
    ironmesh_oci::media::is_image_manifest(media_type)
}

/// Parses and checks a layout: every manifest and config is read and
/// verified here; layers are verified while they are streamed.
fn read_layout(dir: &Path) -> Result<Vec<LayoutImage>, RuntimeError> {
    let object = format!("image layout {}", dir.display());
    let marker = dir.join("oci-layout");
    let marker_data = std::fs::read(&marker).map_err(|e| RuntimeError::io("read", &marker, e))?;
    let marker_json: serde_json::Value = parse_json(&object, &marker_data)?;
    if marker_json["imageLayoutVersion"].as_str().is_none() {
        return Err(RuntimeError::invalid(
            &object,
            "oci-layout has no imageLayoutVersion",
        ));
    }
    let index_path = dir.join("index.json");
    let index_data =
        std::fs::read(&index_path).map_err(|e| RuntimeError::io("read", &index_path, e))?;
    let index: ImageIndex = parse_json(&format!("{object}: index.json"), &index_data)?;
    if index.manifests.is_empty() {
        return Err(RuntimeError::invalid(
            &object,
            "index.json lists no manifests",
        ));
    }
    let mut images = Vec::new();
    for desc in index.manifests {
        let annotations = &desc.annotations;
        let name = annotations
            .get(ANNOTATION_CONTAINERD_NAME)
            .or_else(|| annotations.get(ANNOTATION_REF_NAME))
            .cloned()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                RuntimeError::invalid(
                    &object,
                    format!(
                        "manifest {} has no {ANNOTATION_REF_NAME} (or {ANNOTATION_CONTAINERD_NAME}) \
                         annotation to name the image",
                        desc.digest
                    ),
                )
            })?;
        if ironmesh_oci::media::is_index(&desc.media_type) {
            return Err(RuntimeError::invalid(
                format!("image {name}"),
                "is a multi-platform index; only single-platform image manifests can be imported",
            ));
        }
        let data = read_layout_blob(dir, &desc)?;
        let manifest: ImageManifest = parse_json(&format!("manifest {}", desc.digest), &data)?;
        let media_type = if desc.media_type.is_empty() {
            manifest
                .media_type
                .clone()
                .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_string())
        } else {
            desc.media_type.clone()
        };
        if !is_manifest(&media_type) {
            return Err(RuntimeError::invalid(
                format!("image {name}"),
                format!("unsupported manifest media type {media_type:?}"),
            ));
        }
        let config_data = read_layout_blob(dir, &manifest.config)?;
        let config: ImageConfig = parse_json(
            &format!("image config {}", manifest.config.digest),
            &config_data,
        )?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(RuntimeError::invalid(
                format!("image {name}"),
                format!(
                    "manifest has {} layers but the config lists {} diff_ids",
                    manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            ));
        }
        if manifest.layers.is_empty() {
            return Err(RuntimeError::invalid(
                format!("image {name}"),
                "has no layers",
            ));
        }
        let chain = chain_ids(&config.rootfs.diff_ids);
        images.push(LayoutImage {
            name,
            manifest: Desc { media_type, ..desc },
            config: manifest.config,
            layers: manifest.layers,
            diff_ids: config.rootfs.diff_ids,
            chain_ids: chain,
        });
    }
    Ok(images)
}

/// A blob to put in the content store, with the labels it must carry.
struct Blob {
    desc: Desc,
    labels: HashMap<String, String>,
}

impl Runtime {
    /// Imports an OCI image layout directory; see the module docs.
    pub async fn import_layout(&self, dir: &Path) -> Result<ImportReport, RuntimeError> {
        self.import_layout_with_progress(dir, |_| {}).await
    }

    /// [`Runtime::import_layout`], calling `progress` after every chunk.
    pub async fn import_layout_with_progress<F>(
        &self,
        dir: &Path,
        mut progress: F,
    ) -> Result<ImportReport, RuntimeError>
    where
        F: FnMut(&ImportProgress) + Send,
    {
        let layout = read_layout(dir)?;
        let snapshotter = self.config().snapshotter.clone();

        // Blobs in write order (layers, config, manifest), each once.
        let mut blobs: Vec<Blob> = Vec::new();
        let mut add = |desc: &Desc, labels: HashMap<String, String>| {
            if let Some(b) = blobs.iter_mut().find(|b| b.desc.digest == desc.digest) {
                b.labels.extend(labels);
            } else {
                blobs.push(Blob {
                    desc: desc.clone(),
                    labels,
                });
            }
        };
        for image in &layout {
            for layer in &image.layers {
                add(layer, HashMap::new());
            }
            let top = image.chain_ids.last().cloned().unwrap_or_default();
            add(
                &image.config,
                HashMap::from([(format!("containerd.io/gc.ref.snapshot.{snapshotter}"), top)]),
            );
            let mut labels = HashMap::from([(
                "containerd.io/gc.ref.content.config".to_string(),
                image.config.digest.to_string(),
            )]);
            for (i, layer) in image.layers.iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    layer.digest.to_string(),
                );
            }
            add(&image.manifest, labels);
        }

        let lease = self.create_lease("import", LEASE_TTL).await?;
        let result = self
            .import_under_lease(dir, &lease, &layout, &blobs, &mut progress)
            .await;
        let dropped = self.delete_lease(&lease).await;
        let report = result?;
        dropped?;
        Ok(report)
    }

    async fn import_under_lease<F>(
        &self,
        dir: &Path,
        lease: &str,
        layout: &[LayoutImage],
        blobs: &[Blob],
        progress: &mut F,
    ) -> Result<ImportReport, RuntimeError>
    where
        F: FnMut(&ImportProgress) + Send,
    {
        let mut report = ImportReport::default();

        // Which blobs are there already; fix their labels if needed.
        let mut missing = Vec::new();
        for blob in blobs {
            match self.content_info(blob.desc.digest.as_str()).await? {
                Some(info) => {
                    report.blobs_present += 1;
                    self.ensure_content_labels(&info, &blob.labels).await?;
                }
                None => missing.push(blob),
            }
        }
        let total: u64 = missing.iter().map(|b| b.desc.size).sum();
        for blob in missing {
            let written = self
                .write_blob(dir, lease, blob, total, &mut report.bytes_written, progress)
                .await?;
            if written {
                report.blobs_written += 1;
            } else {
                report.blobs_present += 1;
            }
        }

        for image in layout {
            let mut parent = String::new();
            for (i, layer) in image.layers.iter().enumerate() {
                let chain_id = &image.chain_ids[i];
                if self.snapshot_exists(chain_id).await? {
                    report.layers_present += 1;
                } else if self
                    .unpack_layer(lease, layer, &image.diff_ids[i], chain_id, &parent)
                    .await?
                {
                    report.layers_unpacked += 1;
                } else {
                    report.layers_present += 1;
                }
                parent = chain_id.clone();
            }
            let change = self.put_image(&image.name, &image.manifest).await?;
            report.images.push(ImportedImage {
                name: image.name.clone(),
                manifest_digest: image.manifest.digest.to_string(),
                chain_id: parent,
                change,
            });
        }
        Ok(report)
    }

    /// Bytes of every blob in the namespace's content store.
    pub async fn content_bytes(&self) -> Result<u64, RuntimeError> {
        use containerd_client::services::v1::ListContentRequest;
        let object = format!("content of namespace {}", self.namespace());
        let mut stream = self
            .content()
            .list(self.request(ListContentRequest { filters: vec![] }))
            .await
            .map_err(call_err("Content.List", object.clone()))?
            .into_inner();
        let mut total = 0u64;
        while let Some(reply) = stream
            .message()
            .await
            .map_err(call_err("Content.List", object.clone()))?
        {
            total = reply.info.iter().fold(total, |t, i| {
                t.saturating_add(u64::try_from(i.size).unwrap_or(0))
            });
        }
        Ok(total)
    }

    async fn content_info(&self, digest: &str) -> Result<Option<Info>, RuntimeError> {
        match self
            .content()
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(reply) => Ok(reply.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_err("Content.Info", format!("blob {digest}"))(status)),
        }
    }

    async fn ensure_content_labels(
        &self,
        info: &Info,
        wanted: &HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let stale: Vec<&String> = wanted
            .iter()
            .filter(|(k, v)| info.labels.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let paths = stale.iter().map(|k| format!("labels.{k}")).collect();
        let mut labels = info.labels.clone();
        labels.extend(wanted.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.content()
            .update(self.request(UpdateRequest {
                info: Some(Info {
                    digest: info.digest.clone(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(call_err("Content.Update", format!("blob {}", info.digest)))?;
        Ok(())
    }

    /// Streams one blob into the content store. Returns false when
    /// containerd already had it (a concurrent import).
    async fn write_blob<F>(
        &self,
        dir: &Path,
        lease: &str,
        blob: &Blob,
        total: u64,
        written_total: &mut u64,
        progress: &mut F,
    ) -> Result<bool, RuntimeError>
    where
        F: FnMut(&ImportProgress) + Send,
    {
        const CALL: &str = "Content.Write";
        let desc = &blob.desc;
        let object = format!("blob {}", desc.digest);
        let path = blob_path(dir, desc);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| RuntimeError::io("open", &path, e))?;
        let reference = format!("ironmesh-import-{}", desc.digest);
        let size = desc.size;

        let (tx, rx) = mpsc::channel::<WriteContentRequest>(2);
        let message = |action: WriteAction, offset: u64, data: Vec<u8>| WriteContentRequest {
            action: action as i32,
            r#ref: reference.clone(),
            total: size_i64(desc),
            expected: desc.digest.to_string(),
            offset: offset as i64,
            data,
            labels: if action == WriteAction::Commit {
                blob.labels.clone()
            } else {
                HashMap::new()
            },
        };
        // containerd reads the first message before it answers, so it must
        // be queued before the call is made.
        let closed = || RuntimeError::Protocol {
            call: CALL,
            object: object.clone(),
            reason: "containerd closed the write stream".to_string(),
        };
        tx.send(message(WriteAction::Stat, 0, Vec::new()))
            .await
            .map_err(|_| closed())?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        with_lease(&mut request, lease);
        let mut responses = match self.content().write(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(false),
            Err(s) => return Err(call_err(CALL, object.clone())(s)),
        };
        let timeout = self.config().call_timeout;
        match next_write_reply(&mut responses, timeout, object.clone()).await {
            Ok(_) => {}
            Err(e) if e.is_already_exists() => return Ok(false),
            Err(e) => return Err(e),
        }

        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut file, &mut buf)
                .await
                .map_err(|e| RuntimeError::io("read", &path, e))?;
            if n == 0 {
                break;
            }
            if offset + n as u64 > size {
                drop(tx);
                self.abort_write(&reference).await;
                return Err(RuntimeError::invalid(
                    &object,
                    format!(
                        "file {} is larger than its descriptor's {size} bytes",
                        path.display()
                    ),
                ));
            }
            hasher.update(&buf[..n]);
            tx.send(message(WriteAction::Write, offset, buf[..n].to_vec()))
                .await
                .map_err(|_| closed())?;
            let reply = next_write_reply(&mut responses, timeout, object.clone()).await?;
            offset += n as u64;
            if reply.offset as u64 != offset {
                return Err(RuntimeError::Protocol {
                    call: CALL,
                    object,
                    reason: format!(
                        "containerd is at offset {}, expected {offset}",
                        reply.offset
                    ),
                });
            }
            *written_total += n as u64;
            progress(&ImportProgress {
                digest: desc.digest.to_string(),
                blob_written: offset,
                blob_size: size,
                written: *written_total,
                total,
            });
        }
        let actual = OciDigest::from_sha256(&hasher.finalize());
        if offset != size || actual != desc.digest {
            drop(tx);
            self.abort_write(&reference).await;
            return Err(RuntimeError::invalid(
                &object,
                format!(
                    "file {} has {offset} bytes hashing to {actual}; descriptor says {size} bytes",
                    path.display()
                ),
            ));
        }
        tx.send(message(WriteAction::Commit, offset, Vec::new()))
            .await
            .map_err(|_| closed())?;
        match next_write_reply(&mut responses, timeout, object.clone()).await {
            Ok(_) => {}
            Err(e) if e.is_already_exists() => return Ok(false),
            Err(e) => return Err(e),
        }
        drop(tx);
        // Drain to the end of the stream so containerd's status is seen.
        while let Some(_extra) = responses
            .message()
            .await
            .map_err(call_err(CALL, object.clone()))?
        {}
        Ok(true)
    }

    async fn abort_write(&self, reference: &str) {
        let _ = self
            .content()
            .abort(self.request(AbortRequest {
                r#ref: reference.to_string(),
            }))
            .await;
    }

    /// Whether a snapshot with this key (or committed name) exists in the
    /// configured snapshotter.
    pub async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        match self
            .snapshots()
            .stat(self.request(StatSnapshotRequest {
                snapshotter: self.config().snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call_err("Snapshots.Stat", format!("snapshot {key}"))(s)),
        }
    }

    /// Unpacks one layer onto `parent` and commits it as `chain_id`.
    /// Returns false when another unpack committed it first.
    async fn unpack_layer(
        &self,
        lease: &str,
        layer: &Desc,
        diff_id: &str,
        chain_id: &str,
        parent: &str,
    ) -> Result<bool, RuntimeError> {
        let snapshotter = self.config().snapshotter.clone();
        let key = format!("ironmesh-unpack-{}-{chain_id}", unique_suffix());
        let mounts: Vec<Mount> = self
            .snapshots()
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.to_string(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(call_err(
                "Snapshots.Prepare",
                format!("layer {}", layer.digest),
            ))?
            .into_inner()
            .mounts;
        let result = async {
            let applied = self
                .diff()
                .apply(self.leased(
                    ApplyRequest {
                        diff: Some(Descriptor {
                            media_type: layer.media_type.clone(),
                            digest: layer.digest.to_string(),
                            size: size_i64(layer),
                            annotations: HashMap::new(),
                        }),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    lease,
                ))
                .await
                .map_err(call_err("Diff.Apply", format!("layer {}", layer.digest)))?
                .into_inner()
                .applied
                .unwrap_or_default();
            if applied.digest != diff_id {
                return Err(RuntimeError::invalid(
                    format!("layer {}", layer.digest),
                    format!(
                        "unpacks to {} but the image config says {diff_id}",
                        applied.digest
                    ),
                ));
            }
            match self
                .snapshots()
                .commit(self.leased(
                    CommitSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        name: chain_id.to_string(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
            {
                Ok(_) => Ok(true),
                Err(s) if s.code() == Code::AlreadyExists => Ok(false),
                Err(s) => Err(call_err("Snapshots.Commit", format!("snapshot {chain_id}"))(s)),
            }
        }
        .await;
        if !matches!(result, Ok(true)) {
            let _ = self
                .snapshots()
                .remove(self.request(RemoveSnapshotRequest { snapshotter, key }))
                .await;
        }
        result
    }

    /// Creates the image, or points it at `manifest` if it exists.
    async fn put_image(&self, name: &str, manifest: &Desc) -> Result<ImageChange, RuntimeError> {
        let object = format!("image {name}");
        let target = Descriptor {
            media_type: manifest.media_type.clone(),
            digest: manifest.digest.to_string(),
            size: size_i64(manifest),
            annotations: HashMap::new(),
        };
        let existing = match self.get_image(name).await {
            Ok(image) => Some(image),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        let update = |labels| Image {
            name: name.to_string(),
            labels,
            target: Some(target.clone()),
            created_at: None,
            updated_at: None,
        };
        if let Some(image) = existing {
            let same = image.target.as_ref().is_some_and(|t| {
                t.digest == target.digest
                    && t.media_type == target.media_type
                    && t.size == target.size
            });
            if same {
                return Ok(ImageChange::Unchanged);
            }
            self.images()
                .update(self.request(UpdateImageRequest {
                    image: Some(update(image.labels)),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(call_err("Images.Update", object))?;
            return Ok(ImageChange::Updated);
        }
        match self
            .images()
            .create(self.request(CreateImageRequest {
                image: Some(update(HashMap::new())),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(ImageChange::Created),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.images()
                    .update(self.request(UpdateImageRequest {
                        image: Some(update(HashMap::new())),
                        update_mask: None,
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(call_err("Images.Update", object))?;
                Ok(ImageChange::Updated)
            }
            Err(s) => Err(call_err("Images.Create", object)(s)),
        }
    }

    async fn get_image(&self, name: &str) -> Result<Image, RuntimeError> {
        let object = format!("image {name}");
        self.images()
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await
            .map_err(call_err("Images.Get", object.clone()))?
            .into_inner()
            .image
            .ok_or_else(|| RuntimeError::Protocol {
                call: "Images.Get",
                object,
                reason: "answer has no image".into(),
            })
    }

    /// Reads a whole (small) blob from the content store and checks it.
    async fn read_content(&self, desc: &Descriptor) -> Result<Vec<u8>, RuntimeError> {
        let object = format!("blob {}", desc.digest);
        if desc.size < 0 || desc.size as u64 > MAX_JSON {
            return Err(RuntimeError::invalid(
                &object,
                format!("{} bytes is not a manifest or config size", desc.size),
            ));
        }
        let mut stream = self
            .content()
            .read(self.request(ReadContentRequest {
                digest: desc.digest.clone(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(call_err("Content.Read", object.clone()))?
            .into_inner();
        let mut data = Vec::with_capacity(desc.size as usize);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(call_err("Content.Read", object.clone()))?
        {
            data.extend_from_slice(&chunk.data);
            if data.len() as u64 > MAX_JSON {
                return Err(RuntimeError::invalid(&object, "larger than its descriptor"));
            }
        }
        check_blob(
            &desc.digest,
            u64::try_from(desc.size).unwrap_or(u64::MAX),
            &data,
        )?;
        Ok(data)
    }

    /// Reads an imported image back: its manifest, config, top chainID and
    /// run defaults. An unknown name is a `NotFound` call error.
    pub async fn resolve_image(&self, name: &str) -> Result<ResolvedImage, RuntimeError> {
        let image = self.get_image(name).await?;
        let object = format!("image {name}");
        let target = image
            .target
            .ok_or_else(|| RuntimeError::invalid(&object, "has no target"))?;
        if !is_manifest(&target.media_type) {
            return Err(RuntimeError::invalid(
                &object,
                format!(
                    "target media type {:?} is not a single-platform image manifest",
                    target.media_type
                ),
            ));
        }
        let manifest: ImageManifest = parse_json(
            &format!("manifest {}", target.digest),
            &self.read_content(&target).await?,
        )?;
        let config_desc = Descriptor {
            media_type: manifest.config.media_type.clone(),
            digest: manifest.config.digest.to_string(),
            size: size_i64(&manifest.config),
            annotations: HashMap::new(),
        };
        let config: ImageConfig = parse_json(
            &format!("image config {}", config_desc.digest),
            &self.read_content(&config_desc).await?,
        )?;
        let chain_id = chain_ids(&config.rootfs.diff_ids)
            .pop()
            .ok_or_else(|| RuntimeError::invalid(&object, "has no layers"))?;
        Ok(ResolvedImage {
            name: name.to_string(),
            manifest_digest: target.digest,
            config_digest: config_desc.digest,
            chain_id,
            defaults: image_defaults(&config),
        })
    }
}

/// The next answer on a `Content.Write` stream, within `timeout`.
async fn next_write_reply(
    responses: &mut tonic::Streaming<WriteContentResponse>,
    timeout: Duration,
    object: String,
) -> Result<WriteContentResponse, RuntimeError> {
    const CALL: &str = "Content.Write";
    match tokio::time::timeout(timeout, responses.message()).await {
        Err(_) => Err(RuntimeError::Timeout {
            call: CALL,
            object,
            timeout,
        }),
        Ok(Err(s)) => Err(call_err(CALL, object)(s)),
        Ok(Ok(None)) => Err(RuntimeError::Protocol {
            call: CALL,
            object,
            reason: "stream ended before the commit was acknowledged".into(),
        }),
        Ok(Ok(Some(r))) => Ok(r),
    }
}

/// Fills `buf` unless the file ends first; returns the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(chain[1], format!("sha256:{expected}"));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn digests_are_checked_before_paths_are_built() {
        let desc =
            |d: &str| serde_json::from_value::<Desc>(serde_json::json!({"digest": d, "size": 1}));
        let good = desc(&format!("sha256:{}", "0".repeat(64))).unwrap();
        assert_eq!(
            blob_path(Path::new("/l"), &good),
            Path::new("/l/blobs/sha256").join("0".repeat(64))
        );
        assert!(desc("sha256:../../etc/passwd").is_err());
        assert!(desc(&format!("sha512:{}", "0".repeat(64))).is_err());
        assert!(desc(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn blobs_are_verified() {
        let data = b"hello";
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        assert!(check_blob(&digest, 5, data).is_ok());
        assert!(check_blob(&digest, 4, data).is_err());
        assert!(check_blob(&digest, 5, b"hellO").is_err());
    }
}
