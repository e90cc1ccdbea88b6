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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use ironmesh_proto::v1::{
    BlobChunk, FetchBlobRequest, ImageInfo, ListImagesRequest, ListImagesResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

use crate::store::Store;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

/// Size of one `BlobChunk` the store sends.
pub const FETCH_CHUNK: usize = 256 << 10;
/// Largest manifest read into memory.
const MAX_MANIFEST: u64 = 4 << 20;
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

#[cfg(test)]
mod tests {
    use super::manifests::Reference;
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use futures::StreamExt;
    use tonic::Code;

    fn sha(data: &[u8]) -> String {
        ironmesh_oci::Digest::of(data).into()
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

        /// Stores a blob as a finished registry upload does; whether it
        /// was new.
        async fn push(&self, data: &[u8]) -> bool {
            self.images.store_bytes(&sha(data), data).await.unwrap()
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

        /// A manifest over a config and one layer, its blobs stored, put
        /// under `repository:tag`.
        async fn tagged(&self, repository: &str, tag: &str, layer: &[u8]) -> String {
            let config = br#"{"architecture":"amd64","os":"linux"}"#;
            self.push(config).await;
            self.push(layer).await;
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha(config), "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": sha(layer), "size": layer.len()}],
            }))
            .unwrap();
            self.images
                .put_manifest(repository, &Reference::Tag(tag.into()), None, &manifest)
                .await
                .unwrap()
                .digest
        }
    }

    #[tokio::test]
    async fn stored_blob_is_fetched_back_in_chunks() {
        let f = fixture();
        let data: Vec<u8> = (0..(FETCH_CHUNK * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        assert!(f.push(&data).await);
        assert!(!f.push(&data).await, "stored once");
        assert_eq!(f.blob_files(), [sha(&data)["sha256:".len()..].to_string()]);
        let (total, back, chunks) = f.fetch(&sha(&data)).await.unwrap();
        assert_eq!(total, data.len() as u64);
        assert_eq!(back, data);
        assert_eq!(chunks, 3);
        let e = f.fetch(&sha(b"absent")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains(&sha(b"absent")));
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
        assert!(f.push(b"").await);
        let (total, back, chunks) = f.fetch(&sha(b"")).await.unwrap();
        assert_eq!((total, back.len(), chunks), (0, 0, 1));
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
            let e = f.fetch(&bad).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(f.images.blob_path(&bad).is_err(), "{bad}");
        }
        assert!(f.blob_files().is_empty());
    }

    #[tokio::test]
    async fn tags_resolve_list_and_survive_reopening_the_store() {
        let f = fixture();
        let digest = f
            .tagged("ironmesh.dev/records-server", "0.1.0", b"layer-a")
            .await;
        let web = f.tagged("web", "latest", b"layer-b").await;
        assert_eq!(
            f.images.resolve("ironmesh.dev/records-server:0.1.0").await,
            Some(digest.clone())
        );
        assert_eq!(
            f.images.resolve("ironmesh.dev/records-server:0.2.0").await,
            None
        );
        assert_eq!(f.images.resolve("not a name").await, None);
        // A name without a tag is :latest.
        assert_eq!(f.images.resolve("web").await, Some(web.clone()));

        let list = f.images.list_images(ListImagesRequest {}).await.unwrap();
        let names: Vec<&str> = list.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["ironmesh.dev/records-server:0.1.0", "web:latest"]);
        assert!(list
            .images
            .iter()
            .all(|i| i.size > 14 && i.pushed_unix_ms > 0));

        // Names are in the durable store: a reopened store has them.
        let Fixture { dir, images } = f;
        drop(images);
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
        assert_eq!(
            images.resolve("ironmesh.dev/records-server:0.1.0").await,
            Some(digest)
        );
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
