//! The production [`ImageSource`]: fetches images from the controller's
//! image store over the node's mTLS channel and imports them into
//! containerd.
//!
//! This module owns getting the blobs of one image (manifest, config,
//! layers) from the controller with `NodeService.FetchBlob`, verifying each
//! against its digest and declared size, and handing them to the runtime
//! layer. It does not talk to containerd's content store itself beyond
//! asking which layers are already there: the blobs are staged as a
//! one-image OCI layout in a private directory under the agent's state
//! dir and imported with [`Runtime::import_layout`], which writes them with
//! `Content.Write`, unpacks them with the configured snapshotter and
//! creates the image — the same, tested path as any other import. Layers
//! containerd already holds are not fetched again; the staging directory is
//! removed after each import.
//!
//! Concurrent `ensure` calls for one image name are serialised, so an image
//! is fetched once however many instances need it at the same time. The
//! layers of one image are fetched several at once; a blob whose stream
//! breaks is resumed from the bytes that arrived (`FetchBlobRequest.offset`),
//! the hash carried on, a few times before the fetch fails.
//!
//! A name that resolves to a multi-platform index (as `skopeo copy --all`
//! pushes) is fetched as the index's manifest for this host's platform
//! (`linux/<GOARCH of this CPU>`); containerd gets that manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::services::v1::InfoRequest;
use futures::{StreamExt, TryStreamExt};
use ironmesh_proto::v1::{node_service_client::NodeServiceClient, FetchBlobRequest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;
use tonic::Code;

use crate::image_source::{EnsuredImage, ImageSource, ImageSourceError};
use crate::node_identity::{endpoint, IdentityError, NodeIdentity};
use crate::runtime::{Runtime, RuntimeError};

/// Largest manifest or config accepted from the controller.
const MAX_JSON: u64 = 4 << 20;
/// How long the controller may leave a blob stream silent.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Layers fetched at once.
const PARALLEL_LAYERS: usize = 4;
/// Times one blob's transfer is resumed after its stream broke.
const MAX_RESUMES: u32 = 5;

/// What arrived of one blob so far.
struct Received {
    hasher: Sha256,
    got: u64,
    total: Option<u64>,
}

/// How a blob stream ended early.
enum Broken {
    /// The stream: resume from what arrived.
    Stream(ImageSourceError),
    /// The data or our disk: give up.
    Fatal(ImageSourceError),
}

use ironmesh_oci::annotations::CONTAINERD_NAME as ANNOTATION_CONTAINERD_NAME;
use ironmesh_oci::{media, ImageIndex, ImageManifest};

/// Images from the controller's image store; see the module docs.
pub struct ControllerImages {
    client: NodeServiceClient<Channel>,
    /// Other controllers of the cluster, asked in order when `client`
    /// does not hold a blob or cannot be reached.
    fallbacks: Vec<NodeServiceClient<Channel>>,
    /// When set, the clients to use (rebuilt when the node certificate is
    /// renewed), in place of `client` and `fallbacks`.
    shared: Option<crate::node_clients::NodeClients>,
    runtime: Runtime,
    staging: PathBuf,
    idle_timeout: Duration,
    /// One lock per image name: the second caller waits, then finds the
    /// image in containerd.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Index digest → the manifest of this platform imported for it.
    platform_of: Mutex<HashMap<String, String>>,
}

/// A staging directory, removed when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The hex of a strict `sha256:<64 lowercase hex>` digest.
fn digest_hex(digest: &str) -> Option<&str> {
    ironmesh_oci::digest_hex(digest).ok()
}

fn host_arch() -> &'static str {
    ironmesh_oci::host_architecture()
}

/// For a multi-platform index, the digest of its manifest for
/// `linux/<arch>`; `None` when `data` is not an index.
fn platform_manifest(data: &[u8], arch: &str) -> Result<Option<String>, String> {
    if !ironmesh_oci::is_index_json(data) {
        return Ok(None);
    }
    // Digests are checked as the index parses.
    let index: ImageIndex =
        serde_json::from_slice(data).map_err(|e| format!("it is not an image index: {e}"))?;
    if let Some(m) = index.for_platform("linux", arch) {
        return Ok(Some(m.digest.to_string()));
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .map(|m| {
            m.platform.as_ref().map_or_else(
                || "/".to_string(),
                |p| format!("{}/{}", p.os, p.architecture),
            )
        })
        .collect();
    Err(format!(
        "no manifest for linux/{arch}; it offers {}",
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        }
    ))
}

/// A client for the controller's node API with this node's certificate,
/// connecting on first use (so an agent can start while the controller is
/// away; a fetch then fails as unavailable and is retried).
pub fn node_client(
    controller: &str,
    id: &NodeIdentity,
    server_name: Option<&str>,
) -> Result<NodeServiceClient<Channel>, IdentityError> {
    let channel = endpoint(controller)?
        .tls_config(id.tls(server_name))
        .map_err(|e| IdentityError::Connect {
            url: controller.to_string(),
            message: e.to_string(),
        })?
        .connect_lazy();
    Ok(NodeServiceClient::new(channel))
}

impl ControllerImages {
    /// `client` must already carry the node's mTLS identity; `staging` is
    /// a directory under the agent's state dir (created when needed, and
    /// emptied of what a crash left there).
    pub fn new(
        client: NodeServiceClient<Channel>,
        runtime: Runtime,
        staging: impl Into<PathBuf>,
    ) -> ControllerImages {
        let staging = staging.into();
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        ControllerImages {
            client,
            fallbacks: Vec::new(),
            shared: None,
            runtime,
            staging,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            locks: Mutex::new(HashMap::new()),
            platform_of: Mutex::new(HashMap::new()),
        }
    }

    /// Other controllers of the cluster to ask, in order, for a blob the
    /// first one does not hold or cannot serve.
    pub fn with_fallbacks(mut self, others: Vec<NodeServiceClient<Channel>>) -> ControllerImages {
        self.fallbacks = others;
        self
    }

    /// Take the clients from `clients` at each fetch (they follow the
    /// node's renewed certificates).
    pub fn with_clients(mut self, clients: crate::node_clients::NodeClients) -> ControllerImages {
        self.shared = Some(clients);
        self
    }

    fn lock_for(&self, image: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds or waits on, so the map stays small.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(image.to_string()).or_default().clone()
    }

    /// Whether containerd has `image` pointing at `digest`, unpacked.
    async fn present(&self, image: &str, digest: &str) -> Result<bool, ImageSourceError> {
        let platform = self
            .platform_of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        match self.runtime.resolve_image(image).await {
            Ok(r)
                if r.manifest_digest == digest || platform.as_ref() == Some(&r.manifest_digest) =>
            {
                let unpacked = self
                    .runtime
                    .snapshot_exists(&r.chain_id)
                    .await
                    .map_err(|e| runtime_err(image, e))?;
                Ok(unpacked)
            }
            Ok(_) => Ok(false),
            Err(e) if e.is_not_found() => Ok(false),
            // Content gone or broken: a fresh import repairs it.
            Err(RuntimeError::Invalid { .. }) => Ok(false),
            Err(e) => Err(runtime_err(image, e)),
        }
    }

    /// Whether containerd's content store already holds a blob.
    async fn has_content(&self, image: &str, digest: &str) -> Result<bool, ImageSourceError> {
        match self
            .runtime
            .content()
            .info(self.runtime.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: format!(
                    "containerd Content.Info for blob {digest} failed: {}",
                    s.message()
                ),
            }),
        }
    }

    /// Streams one blob into `dir/blobs/sha256/<hex>`, checking digest and
    /// size; returns the bytes received.
    async fn fetch(
        &self,
        image: &str,
        dir: &Path,
        digest: &str,
        declared: Option<u64>,
        max: Option<u64>,
    ) -> Result<u64, ImageSourceError> {
        let invalid = |reason: String| ImageSourceError::Invalid {
            image: image.to_string(),
            reason,
        };
        let unavailable = |reason: String| ImageSourceError::Unavailable {
            image: image.to_string(),
            reason,
        };
        let hex = digest_hex(digest)
            .ok_or_else(|| invalid(format!("digest {digest:?} is not a sha256 digest")))?;
        let path = dir.join("blobs").join("sha256").join(hex);

        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| unavailable(format!("cannot create {}: {e}", path.display())))?;
        let mut rx = Received {
            hasher: Sha256::new(),
            got: 0,
            total: None,
        };
        let mut resumes = 0;
        loop {
            let mut stream = self.open_blob(image, digest, rx.got).await?;
            match self
                .receive(
                    image,
                    digest,
                    declared,
                    max,
                    &mut stream,
                    &mut file,
                    &path,
                    &mut rx,
                )
                .await
            {
                Ok(()) => break,
                // The stream broke (not the data, not our disk): go on from
                // the bytes that arrived.
                Err(Broken::Stream(e)) if resumes < MAX_RESUMES && rx.total.is_some() => {
                    resumes += 1;
                    tracing::info!(%image, %digest, at = rx.got, resumes, error = %e, "blob transfer broke; resuming");
                }
                Err(Broken::Stream(e) | Broken::Fatal(e)) => return Err(e),
            }
        }
        file.flush()
            .await
            .map_err(|e| unavailable(format!("cannot write {}: {e}", path.display())))?;
        let expected = rx.total.ok_or_else(|| {
            unavailable(format!(
                "blob {digest}: the controller's stream ended before the first chunk"
            ))
        })?;
        let actual = ironmesh_oci::Digest::from_sha256(&rx.hasher.finalize());
        if rx.got != expected || actual.as_str() != digest {
            return Err(invalid(format!(
                "blob {digest} arrived damaged: expected {expected} bytes hashing to {digest}, \
                 got {} bytes hashing to {actual}",
                rx.got
            )));
        }
        Ok(rx.got)
    }

    /// A `FetchBlob` stream of `digest` from byte `offset`, from the first
    /// controller that has it.
    async fn open_blob(
        &self,
        image: &str,
        digest: &str,
        offset: u64,
    ) -> Result<tonic::Streaming<ironmesh_proto::v1::BlobChunk>, ImageSourceError> {
        let unavailable = |reason: String| ImageSourceError::Unavailable {
            image: image.to_string(),
            reason,
        };
        let mut last_err = None;
        let clients: Vec<NodeServiceClient<Channel>> = match &self.shared {
            Some(s) => s.current().to_vec(),
            None => std::iter::once(&self.client)
                .chain(self.fallbacks.iter())
                .cloned()
                .collect(),
        };
        for client in &clients {
            let mut client = client.clone();
            let opened = tokio::time::timeout(
                self.idle_timeout,
                client.fetch_blob(FetchBlobRequest {
                    digest: digest.to_string(),
                    offset,
                }),
            )
            .await
            .map_err(|_| {
                unavailable(format!(
                    "the controller did not answer FetchBlob for {digest} within {:?}",
                    self.idle_timeout
                ))
            })
            .and_then(|r| r.map_err(|s| fetch_status(image, digest, s)));
            match opened {
                Ok(s) => return Ok(s.into_inner()),
                // Another controller may hold it (or be up).
                Err(
                    e @ (ImageSourceError::NotFound { .. } | ImageSourceError::Unavailable { .. }),
                ) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| unavailable("no controller to ask".into())))
    }

    /// Appends what `stream` sends to `file`, checking it against what
    /// the blob must be.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        image: &str,
        digest: &str,
        declared: Option<u64>,
        max: Option<u64>,
        stream: &mut tonic::Streaming<ironmesh_proto::v1::BlobChunk>,
        file: &mut tokio::fs::File,
        path: &Path,
        rx: &mut Received,
    ) -> Result<(), Broken> {
        let invalid = |reason: String| {
            Broken::Fatal(ImageSourceError::Invalid {
                image: image.to_string(),
                reason,
            })
        };
        let disk = |e: std::io::Error| {
            Broken::Fatal(ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: format!("cannot write {}: {e}", path.display()),
            })
        };
        let mut first = true;
        loop {
            let next = tokio::time::timeout(self.idle_timeout, stream.message())
                .await
                .map_err(|_| {
                    Broken::Stream(ImageSourceError::Unavailable {
                        image: image.to_string(),
                        reason: format!(
                            "blob {digest}: the controller sent nothing for {:?}",
                            self.idle_timeout
                        ),
                    })
                })?
                .map_err(|s| match fetch_status(image, digest, s) {
                    e @ ImageSourceError::Unavailable { .. } => Broken::Stream(e),
                    e => Broken::Fatal(e),
                })?;
            let Some(chunk) = next else { return Ok(()) };
            if first {
                first = false;
                if chunk.digest != digest {
                    return Err(invalid(format!(
                        "asked for blob {digest}, the controller sent {:?}",
                        chunk.digest
                    )));
                }
                if let Some(d) = declared.filter(|d| *d != chunk.total_size) {
                    return Err(invalid(format!(
                        "blob {digest} is {} bytes in the controller's store, \
                         its descriptor says {d}",
                        chunk.total_size
                    )));
                }
                if let Some(m) = max.filter(|m| chunk.total_size > *m) {
                    return Err(invalid(format!(
                        "blob {digest} is {} bytes, more than the {m} allowed for a manifest or config",
                        chunk.total_size
                    )));
                }
                if rx.total.is_some_and(|t| t != chunk.total_size) {
                    return Err(invalid(format!(
                        "blob {digest} changed size between two parts of one transfer"
                    )));
                }
                rx.total = Some(chunk.total_size);
                if chunk.offset != rx.got {
                    // A controller that cannot resume sends it all again.
                    if chunk.offset != 0 {
                        return Err(invalid(format!(
                            "blob {digest}: asked to resume at byte {}, the controller sent from {}",
                            rx.got, chunk.offset
                        )));
                    }
                    use tokio::io::AsyncSeekExt;
                    file.set_len(0).await.map_err(disk)?;
                    file.seek(std::io::SeekFrom::Start(0)).await.map_err(disk)?;
                    rx.hasher = Sha256::new();
                    rx.got = 0;
                }
            }
            let expected = rx.total.unwrap_or_default();
            if rx.got + chunk.data.len() as u64 > expected {
                return Err(invalid(format!(
                    "blob {digest}: the controller sent more than the announced {expected} bytes"
                )));
            }
            // Written first, then counted: a failed write leaves the
            // count at what the file holds.
            file.write_all(&chunk.data).await.map_err(disk)?;
            rx.hasher.update(&chunk.data);
            rx.got += chunk.data.len() as u64;
        }
    }

    async fn fetch_and_import(
        &self,
        image: &str,
        digest: &str,
    ) -> Result<EnsuredImage, ImageSourceError> {
        let invalid = |reason: String| ImageSourceError::Invalid {
            image: image.to_string(),
            reason,
        };
        let hex = digest_hex(digest).ok_or_else(|| {
            invalid(format!(
                "the controller resolved it to {digest:?}, which is not a sha256 digest"
            ))
        })?;
        let dir = self.staging.join(format!(
            "{}-{}",
            &hex[..16],
            crate::runtime::unique_suffix()
        ));
        let staging = Staging(dir);
        let dir = staging.0.as_path();
        tokio::fs::create_dir_all(dir.join("blobs").join("sha256"))
            .await
            .map_err(|e| ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: format!("cannot create staging dir {}: {e}", dir.display()),
            })?;

        let mut bytes = self.fetch(image, dir, digest, None, Some(MAX_JSON)).await?;
        let read = |d: &str| {
            let path = dir
                .join("blobs")
                .join("sha256")
                .join(d.trim_start_matches("sha256:"));
            std::fs::read(&path).map_err(|e| ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        let mut data = read(hex)?;
        let index_digest = digest;
        let mut digest = digest;
        let chosen = platform_manifest(&data, host_arch())
            .map_err(|e| invalid(format!("index {digest}: {e}")))?;
        if let Some(child) = &chosen {
            bytes += self.fetch(image, dir, child, None, Some(MAX_JSON)).await?;
            data = read(child)?;
            tracing::debug!(%image, index = %index_digest, manifest = %child, arch = host_arch(), "picked this platform's manifest from the index");
            digest = child.as_str();
        }
        let manifest: ImageManifest = serde_json::from_slice(&data).map_err(|e| {
            invalid(format!(
                "manifest {digest} is not a single-platform image manifest: {e}"
            ))
        })?;
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        if !media::is_image_manifest(&media_type) {
            return Err(invalid(format!(
                "manifest {digest} has media type {media_type:?}; only single-platform image \
                 manifests are supported"
            )));
        }
        // Digests and sizes were checked as the manifest parsed.
        bytes += self
            .fetch(
                image,
                dir,
                manifest.config.digest.as_str(),
                Some(manifest.config.size),
                Some(MAX_JSON),
            )
            .await?;
        let mut skipped = 0usize;
        let mut wanted = Vec::new();
        for layer in &manifest.layers {
            let size = layer.size;
            // The import skips what containerd holds, so its file is not
            // needed either.
            if self.has_content(image, layer.digest.as_str()).await? {
                skipped += 1;
                continue;
            }
            wanted.push((layer.digest.as_str(), size));
        }
        // Several layers at once: one stream rarely fills the link. (The
        // futures are made first: a closure inside the stream type trips
        // the async-trait Send check.)
        let mut fetches = Vec::with_capacity(wanted.len());
        for (d, size) in &wanted {
            fetches.push(self.fetch(image, dir, d, Some(*size), None));
        }
        let fetched: Vec<u64> = futures::stream::iter(fetches)
            .buffer_unordered(PARALLEL_LAYERS)
            .try_collect()
            .await?;
        bytes += fetched.iter().sum::<u64>();
        tracing::debug!(
            %image,
            layers = manifest.layers.len(),
            layers_present = skipped,
            config_media_type = %manifest.config.media_type,
            "image blobs staged"
        );

        let write = |name: &str, data: Vec<u8>| {
            let path = dir.join(name);
            std::fs::write(&path, data).map_err(|e| ImageSourceError::Unavailable {
                image: image.to_string(),
                reason: format!("cannot write {}: {e}", path.display()),
            })
        };
        write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest,
                "size": data.len(),
                "annotations": {ANNOTATION_CONTAINERD_NAME: image},
            }],
        });
        write("index.json", index.to_string().into_bytes())?;

        let report = self
            .runtime
            .import_layout(dir)
            .await
            .map_err(|e| runtime_err(image, e))?;
        if let Some(child) = &chosen {
            self.platform_of
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(index_digest.to_string(), child.clone());
        }
        tracing::info!(
            %image,
            %digest,
            bytes,
            blobs_written = report.blobs_written,
            layers_unpacked = report.layers_unpacked,
            "image fetched from the controller and imported"
        );
        Ok(EnsuredImage {
            fetched: true,
            bytes,
        })
    }
}

/// A controller status for one blob, as an image source error.
fn fetch_status(image: &str, digest: &str, s: tonic::Status) -> ImageSourceError {
    let reason = format!("fetching blob {digest}: {}", s.message());
    let image = image.to_string();
    match s.code() {
        Code::NotFound => ImageSourceError::NotFound { image, reason },
        Code::InvalidArgument => ImageSourceError::Invalid { image, reason },
        _ => ImageSourceError::Unavailable { image, reason },
    }
}

fn runtime_err(image: &str, e: RuntimeError) -> ImageSourceError {
    let image = image.to_string();
    let reason = e.to_string();
    match e {
        RuntimeError::Invalid { .. } => ImageSourceError::Invalid { image, reason },
        _ => ImageSourceError::Unavailable { image, reason },
    }
}

#[tonic::async_trait]
impl ImageSource for ControllerImages {
    async fn ensure(&self, image: &str, digest: &str) -> Result<EnsuredImage, ImageSourceError> {
        if digest.is_empty() {
            return Err(ImageSourceError::NotFound {
                image: image.to_string(),
                reason: format!(
                    "the controller's image store has no image named {image:?}; \
                     push it with `imctl image push`"
                ),
            });
        }
        let lock = self.lock_for(image);
        let _held = lock.lock().await;
        if self.present(image, digest).await? {
            return Ok(EnsuredImage {
                fetched: false,
                bytes: 0,
            });
        }
        let started = std::time::Instant::now();
        let result = self.fetch_and_import(image, digest).await;
        match &result {
            Ok(r) => {
                tracing::debug!(%image, bytes = r.bytes, elapsed_ms = started.elapsed().as_millis() as u64, "image ensured")
            }
            Err(e) => tracing::warn!(%image, %digest, error = %e, "image fetch failed"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_codes_map_to_source_errors() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            fetch_status("a:1", &d, tonic::Status::not_found("no")),
            ImageSourceError::NotFound { .. }
        ));
        assert!(matches!(
            fetch_status("a:1", &d, tonic::Status::invalid_argument("bad")),
            ImageSourceError::Invalid { .. }
        ));
        let e = fetch_status("a:1", &d, tonic::Status::unavailable("down"));
        assert!(matches!(e, ImageSourceError::Unavailable { .. }));
        assert!(e.to_string().contains(&d), "{e}");
    }

    #[test]
    fn an_index_yields_this_platforms_manifest() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": ironmesh_oci::media::OCI_INDEX,
            "manifests": [
                {"digest": a, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
                {"digest": b, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        }))
        .unwrap();
        assert_eq!(platform_manifest(&index, "arm64").unwrap(), Some(b));
        assert_eq!(platform_manifest(&index, "amd64").unwrap(), Some(a));
        let e = platform_manifest(&index, "s390x").unwrap_err();
        assert!(e.contains("linux/amd64, linux/arm64"), "{e}");
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{}}"#;
        assert_eq!(platform_manifest(manifest, "amd64").unwrap(), None);
        assert_eq!(std::env::consts::ARCH == "x86_64", host_arch() == "amd64");
    }

    #[test]
    fn only_strict_digests_pass() {
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(digest_hex("sha256:../x").is_none());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_none());
    }
}
