//! The controller's content-addressed image store: OCI blobs by digest on
//! disk, and name → manifest references in the controller's [`Store`].
//!
//! This module owns the on-disk blob directory and the `/images/` key space
//! of the store, and the logic behind the image RPCs (the handlers in
//! `operator_api` and `node_api` authorize and delegate here). It knows
//! nothing about nodes or placement: placement asks [`ImageStore::resolve`]
//! for a name's manifest digest.
//!
//! Layout: `<root>/blobs/sha256/<64 hex>`, each blob written to a temporary
//! file in the same directory, checked against its declared digest and size
//! while it streams in, fsync'd and renamed into place, so a blob file that
//! exists is always complete and correct. A name is the key
//! `/images/<name>` whose value is JSON `{name, manifestDigest, size,
//! pushedUnixMs}`: durable and revisioned like every other object.
//!
//! Submodules: [`manifests`] keeps the registry's view (manifests and
//! indexes per repository, tags, referrers) that the OCI Distribution API
//! in `crate::registry` serves; [`gc`] removes what no image refers to.

pub mod gc;
pub mod manifests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ironmesh_proto::v1::{
    BlobChunk, BlobsMissingRequest, BlobsMissingResponse, FetchBlobRequest, ImageInfo,
    ListImagesRequest, ListImagesResponse, PushBlobResponse, TagImageRequest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Status, Streaming};

use crate::store::{Op, Store, Txn, TxnOutcome};

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

/// Size of one `BlobChunk` the store sends.
pub const FETCH_CHUNK: usize = 256 << 10;
/// Largest manifest TagImage reads into memory.
const MAX_MANIFEST: u64 = 4 << 20;
/// Most digests one BlobsMissing request may ask about.
const MAX_DIGESTS: usize = 10_000;
/// Store key prefix of image names.
const KEY_PREFIX: &str = "/images/";

const MEDIA_OCI_MANIFEST: &str = ironmesh_oci::media::OCI_MANIFEST;
const MEDIA_DOCKER_MANIFEST: &str = ironmesh_oci::media::DOCKER_MANIFEST;
const MEDIA_OCI_INDEX: &str = ironmesh_oci::media::OCI_INDEX;
const MEDIA_DOCKER_LIST: &str = ironmesh_oci::media::DOCKER_LIST;

/// Blobs under `<root>/blobs/sha256/`, names in the store.
#[derive(Clone)]
pub struct ImageStore {
    root: PathBuf,
    blobs: PathBuf,
    uploads: PathBuf,
    store: Arc<dyn Store>,
    /// Held shared by whatever checks that blobs exist and then records a
    /// reference to them, and exclusively by garbage collection, so a
    /// blob is never collected between the check and the record.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The stored value of one image name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageRecord {
    name: String,
    manifest_digest: String,
    size: u64,
    pushed_unix_ms: i64,
    /// For an index: the platforms of its manifests (read by the cache
    /// for placement). Empty for a single-platform manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    platforms: Vec<ironmesh_oci::Platform>,
}

impl From<ImageRecord> for ImageInfo {
    fn from(r: ImageRecord) -> ImageInfo {
        ImageInfo {
            name: r.name,
            manifest_digest: r.manifest_digest,
            size: r.size,
            pushed_unix_ms: r.pushed_unix_ms,
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The hex part of a `sha256:` digest, or why it is not one. Only 64
/// lowercase hex digits pass ([`ironmesh_oci::Digest`], the project's one
/// check), so a digest can never become a path trick.
pub fn digest_hex(digest: &str) -> Result<&str, String> {
    ironmesh_oci::digest_hex(digest).map_err(|e| e.to_string())
}

fn digest_arg(digest: &str) -> Result<&str, Status> {
    digest_hex(digest).map_err(Status::invalid_argument)
}

/// Checks an image reference (`[registry[:port]/]path[:tag]`, the Docker
/// distribution grammar without digests) and returns it with `:latest`
/// added when it has no tag ([`ironmesh_oci::name`], the project's one check).
pub fn normalize_name(name: &str) -> Result<String, String> {
    ironmesh_oci::name::normalize_name(name).map_err(|e| e.to_string())
}

pub(crate) use ironmesh_oci::name::is_path_component;

/// Refreshes a blob's modification time (see [`ImageStore::stat_blob`]).
async fn touch(path: &Path) {
    let path = path.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
    })
    .await;
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A temporary blob file, removed when dropped unless it was renamed.
struct TempBlob {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn internal(e: ImageStoreError) -> Status {
    tracing::error!(error = %e, "image store I/O failed");
    Status::internal(e.to_string())
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageStoreError {
    let path = path.to_path_buf();
    move |source| ImageStoreError::Io {
        action,
        path,
        source,
    }
}

fn store_err(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "image store: store call failed");
    Status::unavailable(format!("image store: {e}"))
}

impl ImageStore {
    pub fn open(root: PathBuf, store: Arc<dyn Store>) -> Result<ImageStore, ImageStoreError> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;
        // Temporary files a crash left behind are never renamed: drop them.
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Registry uploads live in memory (their hash state) and on disk
        // here; after a restart none can be finished, so none are kept.
        let uploads = root.join("uploads");
        if uploads.exists() {
            let _ = std::fs::remove_dir_all(&uploads);
        }
        std::fs::create_dir_all(&uploads).map_err(io_err("create", &uploads))?;
        Ok(ImageStore {
            root,
            blobs,
            uploads,
            store,
            gc_lock: Arc::default(),
        })
    }

    /// Directory for blobs being uploaded, on the same file system as the
    /// blobs so a finished upload is renamed, not copied.
    pub fn uploads_dir(&self) -> &Path {
        &self.uploads
    }

    /// Size of the stored blob `digest` (checked), `None` if absent. A
    /// blob found has its modification time refreshed: whoever asked is
    /// about to refer to it, and garbage collection spares recent blobs.
    pub async fn stat_blob(&self, digest: &str) -> Result<Option<u64>, ImageStoreError> {
        let Ok(hex) = digest_hex(digest) else {
            return Ok(None);
        };
        let path = self.blobs.join(hex);
        let size = self.blob_size(&path).await?;
        if size.is_some() {
            touch(&path).await;
        }
        Ok(size)
    }

    /// The stored blob `digest`, opened, with its size; `None` if absent.
    pub async fn open_blob(
        &self,
        digest: &str,
    ) -> Result<Option<(tokio::fs::File, u64)>, ImageStoreError> {
        let Ok(hex) = digest_hex(digest) else {
            return Ok(None);
        };
        let path = self.blobs.join(hex);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let len = file
            .metadata()
            .await
            .map_err(|e| io_err("stat", &path)(e))?
            .len();
        Ok(Some((file, len)))
    }

    /// Makes `tmp` (complete, its content already checked against
    /// `digest` and fsync'd by the caller) the blob `digest`: renamed into
    /// place and the directory synced. Returns false when the blob was
    /// already stored (`tmp` is then removed).
    pub async fn commit_blob_file(
        &self,
        tmp: &Path,
        digest: &str,
    ) -> Result<bool, ImageStoreError> {
        let hex = digest_hex(digest).map_err(|e| ImageStoreError::Io {
            action: "commit",
            path: tmp.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let _shared = self.gc_lock.read().await;
        self.commit_unlocked(tmp, hex).await
    }

    /// [`Self::commit_blob_file`] for a caller holding `gc_lock`.
    async fn commit_unlocked(&self, tmp: &Path, hex: &str) -> Result<bool, ImageStoreError> {
        let final_path = self.blobs.join(hex);
        if self.blob_size(&final_path).await?.is_some() {
            let _ = tokio::fs::remove_file(tmp).await;
            touch(&final_path).await;
            return Ok(false);
        }
        tokio::fs::rename(tmp, &final_path)
            .await
            .map_err(|e| io_err("rename", &final_path)(e))?;
        self.sync_blob_dir().await?;
        Ok(true)
    }

    /// Stores `data` as the blob `digest` (which the caller computed).
    #[cfg(test)]
    pub(crate) async fn store_bytes(
        &self,
        digest: &str,
        data: &[u8],
    ) -> Result<bool, ImageStoreError> {
        let tmp = self.write_tmp(data).await?;
        self.commit_blob_file(&tmp.path, digest).await
    }

    /// `data` in a temporary, fsync'd file beside the blobs (removed when
    /// dropped unless committed).
    async fn write_tmp(&self, data: &[u8]) -> Result<TempBlob, ImageStoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = TempBlob {
            path: self.blobs.join(format!(
                ".tmp-bytes-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            )),
            keep: false,
        };
        let mut file = tokio::fs::File::create(&tmp.path)
            .await
            .map_err(|e| io_err("create", &tmp.path)(e))?;
        file.write_all(data)
            .await
            .map_err(|e| io_err("write", &tmp.path)(e))?;
        file.sync_all()
            .await
            .map_err(|e| io_err("fsync", &tmp.path)(e))?;
        drop(file);
        Ok(tmp)
    }

    async fn sync_blob_dir(&self) -> Result<(), ImageStoreError> {
        let dir = self.blobs.clone();
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| ImageStoreError::Io {
                action: "fsync",
                path: self.blobs.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        synced.map_err(|e| io_err("fsync", &self.blobs)(e))
    }

    /// The directory this store keeps its blobs under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob (checked digest), whether or not it exists.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.blobs.join(digest_hex(digest)?))
    }

    /// Size of a stored blob, `None` if the store does not hold it.
    async fn blob_size(&self, path: &Path) -> Result<Option<u64>, ImageStoreError> {
        match tokio::fs::metadata(path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }

    /// The manifest digest `name` points at, if the store holds the image.
    /// A name without a tag means `:latest`.
    pub async fn resolve(&self, name: &str) -> Option<String> {
        let name = normalize_name(name).ok()?;
        match self.record(&name).await {
            Ok(r) => r.map(|r| r.manifest_digest),
            Err(status) => {
                tracing::warn!(image = %name, error = %status.message(), "cannot resolve image");
                None
            }
        }
    }

    async fn record(&self, name: &str) -> Result<Option<ImageRecord>, Status> {
        let Some(kv) = self
            .store
            .get(&format!("{KEY_PREFIX}{name}"))
            .await
            .map_err(store_err)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| Status::internal(format!("stored image {name:?} does not decode: {e}")))
    }

    pub async fn blobs_missing(
        &self,
        req: BlobsMissingRequest,
    ) -> Result<BlobsMissingResponse, Status> {
        if req.digests.len() > MAX_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "{} digests in one request; at most {MAX_DIGESTS}",
                req.digests.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for digest in req.digests {
            let path = self.blobs.join(digest_arg(&digest)?);
            if !seen.insert(digest.clone()) {
                continue;
            }
            if self.blob_size(&path).await.map_err(internal)?.is_none() {
                missing.push(digest);
            }
        }
        Ok(BlobsMissingResponse { missing })
    }

    pub async fn push_blob(
        &self,
        chunks: Streaming<BlobChunk>,
    ) -> Result<PushBlobResponse, Status> {
        self.write_blob(chunks).await
    }

    /// Stores one blob from a stream of chunks: the first names the digest
    /// and total size. Content and size are verified before the blob
    /// becomes visible; on any error nothing is left behind.
    pub async fn write_blob<S>(&self, mut chunks: S) -> Result<PushBlobResponse, Status>
    where
        S: Stream<Item = Result<BlobChunk, Status>> + Unpin + Send,
    {
        let first =
            chunks.next().await.transpose()?.ok_or_else(|| {
                Status::invalid_argument("push stream ended before its first chunk")
            })?;
        let digest = first.digest.clone();
        let expected_size = first.total_size;
        let final_path = self.blobs.join(digest_arg(&digest)?);
        if let Some(size) = self.blob_size(&final_path).await.map_err(internal)? {
            // Same digest, same content: nothing to do, and no need to read
            // the rest of the stream.
            tracing::debug!(%digest, size, "blob already stored");
            return Ok(PushBlobResponse {
                digest,
                size,
                stored: false,
            });
        }

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut tmp = TempBlob {
            path: self.blobs.join(format!(
                ".tmp-{}-{}-{}",
                &digest["sha256:".len()..],
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            )),
            keep: false,
        };
        let mut file = tokio::fs::File::create(&tmp.path)
            .await
            .map_err(|e| internal(io_err("create", &tmp.path)(e)))?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mut next = Some(first);
        while let Some(chunk) = next {
            if !chunk.digest.is_empty() && chunk.digest != digest {
                return Err(Status::invalid_argument(format!(
                    "push of blob {digest}: a later chunk names {:?}",
                    chunk.digest
                )));
            }
            got += chunk.data.len() as u64;
            if got > expected_size {
                return Err(Status::invalid_argument(format!(
                    "blob {digest}: stream is longer than the declared {expected_size} bytes"
                )));
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data)
                .await
                .map_err(|e| internal(io_err("write", &tmp.path)(e)))?;
            next = chunks.next().await.transpose()?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != expected_size || actual != digest {
            return Err(Status::invalid_argument(format!(
                "blob {digest} was not received intact: expected {expected_size} bytes \
                 hashing to {digest}, got {got} bytes hashing to {actual}"
            )));
        }
        file.flush()
            .await
            .map_err(|e| internal(io_err("write", &tmp.path)(e)))?;
        file.sync_all()
            .await
            .map_err(|e| internal(io_err("fsync", &tmp.path)(e)))?;
        drop(file);
        tokio::fs::rename(&tmp.path, &final_path)
            .await
            .map_err(|e| internal(io_err("rename", &final_path)(e)))?;
        tmp.keep = true;
        // The rename is only durable once the directory is synced.
        let dir = self.blobs.clone();
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        synced.map_err(|e| internal(io_err("fsync", &self.blobs)(e)))?;
        tracing::info!(%digest, size = got, "blob stored");
        Ok(PushBlobResponse {
            digest,
            size: got,
            stored: true,
        })
    }

    pub async fn tag_image(&self, req: TagImageRequest) -> Result<ImageInfo, Status> {
        let name = normalize_name(&req.name).map_err(Status::invalid_argument)?;
        let digest = req.manifest_digest;
        let path = self.blobs.join(digest_arg(&digest)?);
        let size = self
            .blob_size(&path)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "image {name}: manifest {digest} is not in the image store; push it first"
                ))
            })?;
        if size > MAX_MANIFEST {
            return Err(Status::invalid_argument(format!(
                "image {name}: blob {digest} is {size} bytes, too large for a manifest"
            )));
        }
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| internal(io_err("read", &path)(e)))?;
        let manifest = parse_manifest(&name, &digest, &data)?;

        // Every referenced blob must be here, with the declared size, and
        // stay until the name is recorded.
        let _shared = self.gc_lock.read().await;
        let mut problems = Vec::new();
        let mut total = size;
        let refs = std::iter::once(("config".to_string(), &manifest.config)).chain(
            manifest
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("layer {i}"), l)),
        );
        for (what, desc) in refs {
            let blob = self.blobs.join(digest_hex(&desc.digest).map_err(|e| {
                Status::invalid_argument(format!("image {name}: manifest {digest}: {what}: {e}"))
            })?);
            if desc.size < 0 {
                return Err(Status::invalid_argument(format!(
                    "image {name}: manifest {digest}: {what} has a negative size"
                )));
            }
            match self.blob_size(&blob).await.map_err(internal)? {
                None => problems.push(format!("{} ({what}) is missing", desc.digest)),
                Some(s) if s != desc.size as u64 => problems.push(format!(
                    "{} ({what}) has {s} bytes, the manifest says {}",
                    desc.digest, desc.size
                )),
                Some(s) => total += s,
            }
        }
        if !problems.is_empty() {
            return Err(Status::failed_precondition(format!(
                "image {name}: manifest {digest} references blobs the store lacks: {}",
                problems.join("; ")
            )));
        }

        let record = ImageRecord {
            name: name.clone(),
            manifest_digest: digest,
            size: total,
            pushed_unix_ms: now_unix_ms(),
            platforms: Vec::new(),
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| Status::internal(format!("encode image record: {e}")))?;
        let media_type = manifest.media_type.as_deref().unwrap_or(MEDIA_OCI_MANIFEST);
        let mut ops = vec![Op::Put {
            key: format!("{KEY_PREFIX}{name}"),
            value,
        }];
        // The registry serves it by digest in its repository too.
        ops.extend(ImageStore::record_op_for_image(
            &name,
            &record.manifest_digest,
            media_type,
            size,
        ));
        let outcome = self
            .store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await
            .map_err(store_err)?;
        if let TxnOutcome::CompareFailed { .. } = outcome {
            return Err(Status::aborted("image tag write conflicted; retry"));
        }
        Ok(record.into())
    }

    pub async fn list_images(&self, _req: ListImagesRequest) -> Result<ListImagesResponse, Status> {
        let (kvs, _) = self.store.list(KEY_PREFIX).await.map_err(store_err)?;
        let mut images = BTreeMap::new();
        for kv in kvs {
            match serde_json::from_slice::<ImageRecord>(&kv.value) {
                Ok(r) => {
                    images.insert(r.name.clone(), ImageInfo::from(r));
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping undecodable image record")
                }
            }
        }
        Ok(ListImagesResponse {
            images: images.into_values().collect(),
        })
    }

    /// Streams a blob in [`FETCH_CHUNK`] pieces from byte `req.offset`
    /// (a resumed transfer); the first carries the digest, the total size
    /// and the offset (an empty rest is one empty chunk).
    pub async fn fetch_blob(&self, req: FetchBlobRequest) -> Result<BlobStream, Status> {
        let digest = req.digest;
        let offset = req.offset;
        let path = self.blobs.join(digest_arg(&digest)?);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!(
                    "blob {digest} is not in the controller's image store"
                )))
            }
            Err(e) => return Err(internal(io_err("open", &path)(e))),
        };
        let total = file
            .metadata()
            .await
            .map_err(|e| internal(io_err("stat", &path)(e)))?
            .len();
        if offset > total {
            return Err(Status::invalid_argument(format!(
                "blob {digest} has {total} bytes; cannot resume at byte {offset}"
            )));
        }
        if offset > 0 {
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| internal(io_err("seek", &path)(e)))?;
        }
        struct State {
            file: tokio::fs::File,
            path: PathBuf,
            digest: String,
            total: u64,
            sent: u64,
            first: bool,
        }
        let state = State {
            file,
            path,
            digest,
            total,
            sent: offset,
            first: true,
        };
        let stream = futures::stream::unfold(Some(state), |state| async move {
            let mut s = state?;
            if !s.first && s.sent >= s.total {
                return None;
            }
            let want = (s.total - s.sent).min(FETCH_CHUNK as u64) as usize;
            let mut data = vec![0u8; want];
            if let Err(e) = s.file.read_exact(&mut data).await {
                let status = internal(io_err("read", &s.path)(e));
                return Some((Err(status), None));
            }
            let start = s.sent;
            s.sent += want as u64;
            let chunk = BlobChunk {
                digest: if s.first {
                    s.digest.clone()
                } else {
                    String::new()
                },
                total_size: if s.first { s.total } else { 0 },
                offset: if s.first { start } else { 0 },
                data,
            };
            s.first = false;
            Some((Ok(chunk), Some(s)))
        });
        Ok(Box::pin(stream))
    }
}

fn parse_manifest(name: &str, digest: &str, data: &[u8]) -> Result<Manifest, Status> {
    let value: serde_json::Value = serde_json::from_slice(data).map_err(|e| {
        Status::invalid_argument(format!("image {name}: manifest {digest} is not JSON: {e}"))
    })?;
    let media_type = value.get("mediaType").and_then(|v| v.as_str());
    if matches!(media_type, Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST))
        || (media_type.is_none() && value.get("manifests").is_some())
    {
        return Err(Status::invalid_argument(format!(
            "image {name}: {digest} is a multi-platform index; \
             tag a single-platform image manifest instead"
        )));
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| {
        Status::invalid_argument(format!(
            "image {name}: {digest} is not an OCI image manifest: {e}"
        ))
    })?;
    if manifest.schema_version != 2 {
        return Err(Status::invalid_argument(format!(
            "image {name}: manifest {digest} has schemaVersion {}, expected 2",
            manifest.schema_version
        )));
    }
    if let Some(mt) = &manifest.media_type {
        if mt != MEDIA_OCI_MANIFEST && mt != MEDIA_DOCKER_MANIFEST {
            return Err(Status::invalid_argument(format!(
                "image {name}: manifest {digest} has media type {mt:?}; expected \
                 {MEDIA_OCI_MANIFEST} or {MEDIA_DOCKER_MANIFEST}"
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use tonic::Code;

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    struct Fixture {
        dir: tempfile::TempDir,
        images: ImageStore,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
        Fixture { dir, images }
    }

    impl Fixture {
        /// Files in the blob directory, temporary ones included.
        fn blob_files(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("images/blobs/sha256"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }

        async fn push_as(
            &self,
            digest: &str,
            total: u64,
            data: &[u8],
            chunk: usize,
        ) -> Result<PushBlobResponse, Status> {
            let mut chunks: Vec<Result<BlobChunk, Status>> = data
                .chunks(chunk.max(1))
                .enumerate()
                .map(|(i, d)| {
                    Ok(BlobChunk {
                        digest: if i == 0 { digest.into() } else { String::new() },
                        total_size: if i == 0 { total } else { 0 },
                        offset: 0,
                        data: d.to_vec(),
                    })
                })
                .collect();
            if chunks.is_empty() {
                chunks.push(Ok(BlobChunk {
                    digest: digest.into(),
                    total_size: total,
                    offset: 0,
                    data: Vec::new(),
                }));
            }
            self.images.write_blob(futures::stream::iter(chunks)).await
        }

        async fn push(&self, data: &[u8]) -> PushBlobResponse {
            self.push_as(&sha(data), data.len() as u64, data, 7)
                .await
                .unwrap()
        }

        async fn fetch(&self, digest: &str) -> Result<(u64, Vec<u8>, usize), Status> {
            let mut stream = self
                .images
                .fetch_blob(FetchBlobRequest {
                    digest: digest.into(),
                    offset: 0,
                })
                .await?;
            let mut total = None;
            let mut data = Vec::new();
            let mut n = 0;
            while let Some(c) = stream.next().await {
                let c = c?;
                if total.is_none() {
                    assert_eq!(c.digest, digest);
                    total = Some(c.total_size);
                }
                data.extend_from_slice(&c.data);
                n += 1;
            }
            Ok((total.unwrap(), data, n))
        }
    }

    /// A manifest over a config and `layers`, with all blobs pushed unless
    /// listed in `skip`. Returns (manifest digest, missing digests).
    async fn image(f: &Fixture, layers: &[&[u8]], skip: &[usize]) -> (String, Vec<String>) {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        f.push(config).await;
        let mut missing = Vec::new();
        let mut descs = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            if skip.contains(&i) {
                missing.push(sha(l));
            } else {
                f.push(l).await;
            }
            descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(l), "size": l.len()
            }));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        f.push(&manifest).await;
        (sha(&manifest), missing)
    }

    #[tokio::test]
    async fn pushed_blob_is_stored_and_fetched_back_in_chunks() {
        let f = fixture();
        let data: Vec<u8> = (0..(FETCH_CHUNK * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let r = f.push(&data).await;
        assert!(r.stored);
        assert_eq!(r.size, data.len() as u64);
        assert_eq!(f.blob_files(), [sha(&data)["sha256:".len()..].to_string()]);
        let (total, back, chunks) = f.fetch(&sha(&data)).await.unwrap();
        assert_eq!(total, data.len() as u64);
        assert_eq!(back, data);
        assert_eq!(chunks, 3);

        let missing = f
            .images
            .blobs_missing(BlobsMissingRequest {
                digests: vec![sha(&data), sha(b"other")],
            })
            .await
            .unwrap();
        assert_eq!(missing.missing, [sha(b"other")]);
    }

    #[tokio::test]
    async fn fetch_resumes_at_an_offset() {
        let f = fixture();
        let data: Vec<u8> = (0..(FETCH_CHUNK + 1000)).map(|i| (i % 253) as u8).collect();
        f.push(&data).await;
        let fetch = |offset: u64| {
            let images = f.images.clone();
            let digest = sha(&data);
            async move {
                let mut s = images
                    .fetch_blob(FetchBlobRequest { digest, offset })
                    .await?;
                let mut chunks = Vec::new();
                while let Some(c) = s.next().await {
                    chunks.push(c?);
                }
                Ok::<_, Status>(chunks)
            }
        };
        let chunks = fetch(FETCH_CHUNK as u64 + 10).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            (chunks[0].offset, chunks[0].total_size),
            (FETCH_CHUNK as u64 + 10, data.len() as u64)
        );
        assert_eq!(chunks[0].data, &data[FETCH_CHUNK + 10..]);
        let at_end = fetch(data.len() as u64).await.unwrap();
        assert_eq!((at_end.len(), at_end[0].data.len()), (1, 0));
        let e = fetch(data.len() as u64 + 1).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn empty_blob_round_trips() {
        let f = fixture();
        assert!(f.push(b"").await.stored);
        let (total, back, chunks) = f.fetch(&sha(b"")).await.unwrap();
        assert_eq!((total, back.len(), chunks), (0, 0, 1));
    }

    #[tokio::test]
    async fn same_blob_pushed_twice_is_stored_once() {
        let f = fixture();
        assert!(f.push(b"layer").await.stored);
        let again = f.push(b"layer").await;
        assert!(!again.stored);
        assert_eq!(again.size, 5);
        assert_eq!(f.blob_files().len(), 1);
    }

    #[tokio::test]
    async fn digest_mismatch_is_rejected_and_leaves_nothing() {
        let f = fixture();
        let claimed = sha(b"what was promised");
        let e = f.push_as(&claimed, 9, b"different", 4).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(&claimed), "{}", e.message());
        assert!(e.message().contains(&sha(b"different")), "{}", e.message());
        assert!(f.blob_files().is_empty(), "{:?}", f.blob_files());
        let e = f.fetch(&claimed).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains(&claimed));
    }

    #[tokio::test]
    async fn short_and_long_streams_are_rejected() {
        let f = fixture();
        let data = b"0123456789";
        let short = f.push_as(&sha(data), 11, data, 3).await.unwrap_err();
        assert_eq!(short.code(), Code::InvalidArgument);
        assert!(
            short.message().contains("expected 11 bytes"),
            "{}",
            short.message()
        );
        assert!(
            short.message().contains("got 10 bytes"),
            "{}",
            short.message()
        );
        let long = f.push_as(&sha(data), 9, data, 3).await.unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument);
        assert!(
            long.message().contains("longer than the declared 9"),
            "{}",
            long.message()
        );
        assert!(f.blob_files().is_empty());
    }

    #[tokio::test]
    async fn bad_digests_never_become_paths() {
        let f = fixture();
        for bad in [
            "sha256:../../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(64)),
            "a".repeat(64),
            String::new(),
        ] {
            let e = f.push_as(&bad, 1, b"x", 1).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            let e = f.fetch(&bad).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            let e = f
                .images
                .blobs_missing(BlobsMissingRequest {
                    digests: vec![bad.clone()],
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        }
        assert!(f.blob_files().is_empty());
    }

    #[tokio::test]
    async fn tag_then_resolve_and_list() {
        let f = fixture();
        let (digest, _) = image(&f, &[b"layer-a", b"layer-b"], &[]).await;
        let info = f
            .images
            .tag_image(TagImageRequest {
                name: "ironmesh.dev/records-server:0.1.0".into(),
                manifest_digest: digest.clone(),
            })
            .await
            .unwrap();
        assert_eq!(info.manifest_digest, digest);
        assert!(info.size > 14, "{info:?}");
        assert!(info.pushed_unix_ms > 0);
        assert_eq!(
            f.images.resolve("ironmesh.dev/records-server:0.1.0").await,
            Some(digest.clone())
        );
        assert_eq!(
            f.images.resolve("ironmesh.dev/records-server:0.2.0").await,
            None
        );
        assert_eq!(f.images.resolve("not a name").await, None);

        // A name without a tag is :latest, both ways.
        f.images
            .tag_image(TagImageRequest {
                name: "web".into(),
                manifest_digest: digest.clone(),
            })
            .await
            .unwrap();
        assert_eq!(f.images.resolve("web:latest").await, Some(digest.clone()));
        assert_eq!(f.images.resolve("web").await, Some(digest.clone()));

        let list = f.images.list_images(ListImagesRequest {}).await.unwrap();
        let names: Vec<&str> = list.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["ironmesh.dev/records-server:0.1.0", "web:latest"]);
    }

    #[tokio::test]
    async fn tag_survives_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let digest = {
            let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
            let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
            let f = Fixture {
                dir: tempfile::tempdir().unwrap(),
                images,
            };
            let (digest, _) = image(&f, &[b"l"], &[]).await;
            f.images
                .tag_image(TagImageRequest {
                    name: "a/b:1".into(),
                    manifest_digest: digest.clone(),
                })
                .await
                .unwrap();
            digest
        };
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
        assert_eq!(images.resolve("a/b:1").await, Some(digest));
    }

    #[tokio::test]
    async fn tag_with_a_missing_layer_is_refused_naming_it() {
        let f = fixture();
        let (digest, missing) = image(&f, &[b"present", b"absent"], &[1]).await;
        let e = f
            .images
            .tag_image(TagImageRequest {
                name: "app:1".into(),
                manifest_digest: digest.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains(&missing[0]), "{}", e.message());
        assert!(e.message().contains("layer 1"), "{}", e.message());
        assert!(!e.message().contains(&sha(b"present")), "{}", e.message());
        assert_eq!(f.images.resolve("app:1").await, None);

        // Pushing the layer makes the same tag succeed.
        f.push(b"absent").await;
        f.images
            .tag_image(TagImageRequest {
                name: "app:1".into(),
                manifest_digest: digest.clone(),
            })
            .await
            .unwrap();
        assert_eq!(f.images.resolve("app:1").await, Some(digest));
    }

    #[tokio::test]
    async fn tag_of_a_missing_or_non_manifest_blob_is_refused() {
        let f = fixture();
        let absent = sha(b"never pushed");
        let e = f
            .images
            .tag_image(TagImageRequest {
                name: "app:1".into(),
                manifest_digest: absent.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains(&absent));

        f.push(b"not json").await;
        let e = f
            .images
            .tag_image(TagImageRequest {
                name: "app:1".into(),
                manifest_digest: sha(b"not json"),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);

        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        f.push(index).await;
        let e = f
            .images
            .tag_image(TagImageRequest {
                name: "app:1".into(),
                manifest_digest: sha(index),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("multi-platform index"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn bad_names_are_refused() {
        let f = fixture();
        let (digest, _) = image(&f, &[b"l"], &[]).await;
        for bad in [
            "",
            "UPPER/case:1",
            "a//b:1",
            "a:b:c",
            "-a:1",
            "a@sha256:00",
            "a:.x",
            "has space:1",
        ] {
            let e = f
                .images
                .tag_image(TagImageRequest {
                    name: bad.into(),
                    manifest_digest: digest.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
            assert!(
                e.message().contains("not a valid reference"),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn names_follow_the_reference_grammar() {
        for (ok, norm) in [
            (
                "ironmesh.dev/records-server:0.1.0",
                "ironmesh.dev/records-server:0.1.0",
            ),
            ("localhost:5000/a/b_c__d:v1", "localhost:5000/a/b_c__d:v1"),
            ("ironmesh/records-server:dev", "ironmesh/records-server:dev"),
            ("busybox", "busybox:latest"),
            (
                "Registry.Example:443/x/y",
                "Registry.Example:443/x/y:latest",
            ),
            ("a---b.c:Tag_1.2-x", "a---b.c:Tag_1.2-x"),
        ] {
            assert_eq!(normalize_name(ok).as_deref(), Ok(norm), "{ok}");
        }
        let long = format!("a:{}", "t".repeat(129));
        for bad in ["a/", "/a", "a..b", "a_-b", "host:99999/a:1", long.as_str()] {
            assert!(normalize_name(bad).is_err(), "{bad}");
        }
    }
}
