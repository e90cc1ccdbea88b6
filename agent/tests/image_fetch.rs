//! `ControllerImages` against a real containerd (Debian's 1.6) and an
//! in-process `NodeService` that serves `FetchBlob` from an OCI layout
//! directory, the way the controller's image store does (plain TCP: the
//! mTLS channel is the controller's and the agent identity's concern, tested
//! end to end elsewhere).
//!
//! Each test starts its own containerd with a private root, state, sockets
//! and namespace and removes all of it when it ends, also when it fails.
//! containerd and busybox-static must be installed
//! (`scripts/install-deps.sh`); without them the tests fail, they do not skip.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use ironmesh_agent::image_fetch::ControllerImages;
use ironmesh_agent::image_source::{ImageSource, ImageSourceError};
use ironmesh_proto::v1::node_service_client::NodeServiceClient;
use ironmesh_proto::v1::node_service_server::{NodeService, NodeServiceServer};
use ironmesh_proto::v1::{
    AgentMessage, BlobChunk, ControllerMessage, FetchBlobRequest, JoinRequest, JoinResponse,
    RenewCertificateRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

mod common;
use common::{sha256, tar_entry, within, Containerd};

const IMAGE: &str = "ironmesh.test/fetched:1";

// ---------------------------------------------------------------------------
// a blob server standing in for the controller's image store

#[derive(Clone, Default)]
struct BlobServer {
    dir: PathBuf,
    /// Every digest asked for, in order.
    fetched: Arc<Mutex<Vec<String>>>,
    /// Digests served with one byte changed.
    corrupt: Arc<Mutex<HashSet<String>>>,
    /// Digests whose next transfer breaks halfway (once each).
    break_once: Arc<Mutex<HashSet<String>>>,
    /// Every (digest, offset) asked for, in order.
    offsets: Arc<Mutex<Vec<(String, u64)>>>,
    /// Digests whose first request waits at `barrier` before it is
    /// answered: they are only all answered if they are asked for at once.
    gated: Arc<Mutex<HashSet<String>>>,
    barrier: Option<Arc<tokio::sync::Barrier>>,
    /// Streams open at once, and the most seen.
    open: Arc<std::sync::atomic::AtomicUsize>,
    most_open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a blob stream as open until it is dropped.
struct OpenStream {
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for BlobServer {
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn renew_certificate(
        &self,
        _: Request<RenewCertificateRequest>,
    ) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    type SyncStream = BoxStream<ControllerMessage>;

    async fn sync(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        Err(Status::unimplemented("test server"))
    }

    type FetchBlobStream = BoxStream<BlobChunk>;

    async fn fetch_blob(
        &self,
        req: Request<FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let req = req.into_inner();
        let (digest, offset) = (req.digest, req.offset);
        self.fetched.lock().unwrap().push(digest.clone());
        self.offsets.lock().unwrap().push((digest.clone(), offset));
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.open.fetch_add(1, SeqCst) + 1;
        self.most_open.fetch_max(now, SeqCst);
        let guard = OpenStream {
            open: self.open.clone(),
        };
        let gated = self.gated.lock().unwrap().remove(&digest);
        if let (true, Some(b)) = (gated, &self.barrier) {
            b.wait().await;
        }
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Status::invalid_argument(format!("bad digest {digest:?}")))?;
        let mut data = fs::read(self.dir.join("blobs/sha256").join(hex)).map_err(|_| {
            Status::not_found(format!(
                "blob {digest} is not in the controller's image store"
            ))
        })?;
        if self.corrupt.lock().unwrap().contains(&digest) {
            let last = data.len() - 1;
            data[last] ^= 0xff;
        }
        let total = data.len() as u64;
        let rest = &data[offset as usize..];
        let mut chunks: Vec<Result<BlobChunk, Status>> = rest
            .chunks(64 << 10)
            .enumerate()
            .map(|(i, c)| {
                Ok(BlobChunk {
                    digest: if i == 0 {
                        digest.clone()
                    } else {
                        String::new()
                    },
                    total_size: if i == 0 { total } else { 0 },
                    offset: if i == 0 { offset } else { 0 },
                    data: c.to_vec(),
                })
            })
            .collect();
        if self.break_once.lock().unwrap().remove(&digest) {
            chunks.truncate(chunks.len() / 2);
            chunks.push(Err(Status::unavailable("connection reset (test)")));
        }
        // The guard goes with the stream: counted open until it is done.
        let stream = futures::StreamExt::map(futures::stream::iter(chunks), move |c| {
            let _open = &guard;
            c
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn queue_lease(
        &self,
        _: Request<ironmesh_proto::v1::QueueLeaseRequest>,
    ) -> Result<Response<ironmesh_proto::v1::QueueLeaseResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn queue_ack(
        &self,
        _: Request<ironmesh_proto::v1::QueueAckRequest>,
    ) -> Result<Response<ironmesh_proto::v1::QueueAckResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn queue_push(
        &self,
        _: Request<ironmesh_proto::v1::QueuePushRequest>,
    ) -> Result<Response<ironmesh_proto::v1::QueuePushResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn issue_workload_certificate(
        &self,
        _: Request<ironmesh_proto::v1::IssueWorkloadCertificateRequest>,
    ) -> Result<Response<ironmesh_proto::v1::WorkloadCertificate>, Status> {
        Err(Status::unimplemented("test server"))
    }
}

impl BlobServer {
    fn fetched(&self) -> Vec<String> {
        self.fetched.lock().unwrap().clone()
    }
}

/// Serves `server` on a loopback port; the task ends with the test's runtime.
async fn serve(server: BlobServer) -> NodeServiceClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServiceServer::new(server))
            .serve_with_incoming(incoming),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    NodeServiceClient::new(channel)
}

// ---------------------------------------------------------------------------
// layouts

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(
        dir.join("blobs/sha256").join(&digest["sha256:".len()..]),
        data,
    )
    .unwrap();
    digest
}

/// What the controller's store holds for one image.
struct Pushed {
    manifest: String,
    config: String,
    layer: String,
    total: u64,
}

/// Puts a busybox image's blobs in `dir/blobs/sha256` (as the controller
/// stores them); `cmd` varies the config so two images can share a layer.
fn push_busybox(dir: &Path, cmd: &str) -> Pushed {
    let busybox = fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: install busybox-static (scripts/install-deps.sh)");
    let mut layer = Vec::new();
    tar_entry(&mut layer, "bin/", b'5', 0o755, &[], "");
    tar_entry(&mut layer, "bin/busybox", b'0', 0o755, &busybox, "");
    tar_entry(&mut layer, "bin/sh", b'2', 0o777, &[], "busybox");
    layer.extend_from_slice(&[0u8; 1024]);
    let layer_digest = put_blob(dir, &layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": [cmd]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    Pushed {
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
        total: (layer.len() + config.len() + manifest.len()) as u64,
    }
}

fn staging_entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn image_is_fetched_once_verified_and_resolvable_in_containerd() {
    let cd = Containerd::start("once");
    let rt = common::runtime(&cd).await;
    let server = BlobServer {
        dir: cd.path("store"),
        ..Default::default()
    };
    let pushed = push_busybox(&server.dir, "/bin/sh");
    let staging = cd.path("staging");
    let images = Arc::new(ControllerImages::new(
        serve(server.clone()).await,
        rt.clone(),
        &staging,
    ));

    // Two instances need the image at once: one fetch.
    let t = Instant::now();
    let (a, b) = within("two concurrent ensures", async {
        tokio::join!(
            images.ensure(IMAGE, &pushed.manifest),
            images.ensure(IMAGE, &pushed.manifest)
        )
    })
    .await;
    let elapsed = t.elapsed();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        [a.fetched, b.fetched].iter().filter(|f| **f).count(),
        1,
        "{a:?} {b:?}"
    );
    assert_eq!(a.bytes + b.bytes, pushed.total);
    assert_eq!(
        server.fetched(),
        [
            pushed.manifest.clone(),
            pushed.config.clone(),
            pushed.layer.clone()
        ]
    );
    println!(
        "FIGURE agent fetch + import of a {} byte busybox image over loopback: {elapsed:?}",
        pushed.total
    );

    let resolved = rt.resolve_image(IMAGE).await.unwrap();
    assert_eq!(resolved.manifest_digest, pushed.manifest);
    assert_eq!(resolved.config_digest, pushed.config);
    assert_eq!(resolved.defaults.cmd, ["/bin/sh"]);
    assert!(rt.snapshot_exists(&resolved.chain_id).await.unwrap());
    assert!(
        staging_entries(&staging).is_empty(),
        "staging left behind: {:?}",
        staging_entries(&staging)
    );

    // Later ensures find it in containerd and fetch nothing.
    let again = images.ensure(IMAGE, &pushed.manifest).await.unwrap();
    assert!(!again.fetched);
    assert_eq!(again.bytes, 0);
    assert_eq!(server.fetched().len(), 3);

    // A new image sharing the layer fetches only its manifest and config.
    let second = push_busybox(&server.dir, "/bin/busybox");
    assert_eq!(second.layer, pushed.layer);
    let r = images
        .ensure("ironmesh.test/fetched:2", &second.manifest)
        .await
        .unwrap();
    assert!(r.fetched);
    assert_eq!(
        &server.fetched()[3..],
        [second.manifest.clone(), second.config.clone()]
    );
    let resolved = rt.resolve_image("ironmesh.test/fetched:2").await.unwrap();
    assert_eq!(resolved.defaults.cmd, ["/bin/busybox"]);

    // The name moving to a new digest (a re-push) is fetched and retargeted.
    let moved = images.ensure(IMAGE, &second.manifest).await.unwrap();
    assert!(moved.fetched);
    assert_eq!(
        rt.resolve_image(IMAGE).await.unwrap().manifest_digest,
        second.manifest
    );
}

/// The project's own image format (one gzip layer, as `build-images`
/// writes it), around the static busybox so the test needs no static build
/// (`IMFETCH_TEST_BINARY=path` puts another binary in, e.g. the static
/// records-server from `build-images`).
#[tokio::test]
async fn project_image_with_a_gzip_layer_is_fetched_with_its_defaults() {
    let cd = Containerd::start("gzip");
    let rt = common::runtime(&cd).await;
    let binary = std::env::var_os("IMFETCH_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    let spec = ironmesh_images::catalog::records_server(&binary, "0.1.0");
    let layout = cd.path("layout");
    let built = ironmesh_images::build_layout(&spec, &layout).expect("build the layout");
    let server = BlobServer {
        dir: layout,
        ..Default::default()
    };
    let images = ControllerImages::new(serve(server.clone()).await, rt.clone(), cd.path("st"));

    let t = Instant::now();
    let r = within(
        "ensure",
        images.ensure(&built.reference, &built.manifest_digest),
    )
    .await
    .unwrap();
    let elapsed = t.elapsed();
    assert!(r.fetched);
    assert_eq!(r.bytes, built.size);
    println!(
        "FIGURE agent fetch + import of {} ({} bytes, gzip layer of {}): {elapsed:?}",
        built.reference,
        built.size,
        binary.display()
    );
    let resolved = rt.resolve_image(&built.reference).await.unwrap();
    assert_eq!(resolved.manifest_digest, built.manifest_digest);
    assert_eq!(resolved.defaults.entrypoint, ["/bin/records-server"]);
    assert!(resolved
        .defaults
        .env
        .contains(&"LISTEN_ADDR=0.0.0.0:8080".to_string()));
    assert!(rt.snapshot_exists(&resolved.chain_id).await.unwrap());
}

#[tokio::test]
async fn unknown_image_or_digest_is_not_found() {
    let cd = Containerd::start("notfound");
    let rt = common::runtime(&cd).await;
    let server = BlobServer {
        dir: cd.path("store"),
        ..Default::default()
    };
    let images = ControllerImages::new(serve(server.clone()).await, rt.clone(), cd.path("st"));

    let e = images.ensure("ironmesh.test/nope:1", "").await.unwrap_err();
    let ImageSourceError::NotFound { image, reason } = &e else {
        panic!("expected NotFound, got {e:?}");
    };
    assert_eq!(image, "ironmesh.test/nope:1");
    assert!(reason.contains("imctl image push"), "{reason}");
    assert!(server.fetched().is_empty());

    let ghost = sha256(b"never pushed");
    let e = images
        .ensure("ironmesh.test/nope:1", &ghost)
        .await
        .unwrap_err();
    assert!(matches!(e, ImageSourceError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains(&ghost), "{e}");

    let e = images
        .ensure("ironmesh.test/nope:1", "sha256:../../etc")
        .await
        .unwrap_err();
    assert!(matches!(e, ImageSourceError::Invalid { .. }), "{e:?}");
    assert!(rt.resolve_image("ironmesh.test/nope:1").await.is_err());
    assert!(staging_entries(&cd.path("st")).is_empty());
}

#[tokio::test]
async fn a_broken_layer_transfer_is_resumed_where_it_stopped() {
    let cd = Containerd::start("resume");
    let rt = common::runtime(&cd).await;
    let server = BlobServer {
        dir: cd.path("store"),
        ..Default::default()
    };
    let pushed = push_busybox(&server.dir, "/bin/sh");
    server
        .break_once
        .lock()
        .unwrap()
        .insert(pushed.layer.clone());
    let images = ControllerImages::new(serve(server.clone()).await, rt.clone(), cd.path("st"));
    let r = within("ensure", images.ensure(IMAGE, &pushed.manifest))
        .await
        .unwrap();
    assert!(r.fetched);
    let asked: Vec<u64> = server
        .offsets
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| *d == pushed.layer)
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0], 0);
    assert!(asked[1] > 0, "the second request resumes: {asked:?}");
    // What arrived in two parts is the whole, verified layer.
    assert_eq!(r.bytes, pushed.total);
    rt.resolve_image(IMAGE).await.unwrap();
}

/// An image of `layers` layers (one file each, uncompressed), stored as
/// the controller stores blobs; returns (manifest, layer digests, total).
fn push_layers(dir: &Path, layers: usize) -> (String, Vec<String>, u64) {
    let mut digests = Vec::new();
    let mut total = 0;
    for i in 0..layers {
        let mut layer = Vec::new();
        // Big enough to take several chunks, so a transfer can break halfway.
        let body: Vec<u8> = (0..(600u32 << 10))
            .map(|b| (b % 251) as u8 ^ i as u8)
            .collect();
        tar_entry(&mut layer, &format!("layer-{i}"), b'0', 0o644, &body, "");
        layer.extend_from_slice(&[0u8; 1024]);
        total += layer.len() as u64;
        digests.push(put_blob(dir, &layer));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/layer-0"]},
        "rootfs": {"type": "layers", "diff_ids": digests},
    }))
    .unwrap();
    let config_digest = put_blob(dir, &config);
    let layer_descs: Vec<serde_json::Value> = digests
        .iter()
        .map(|d| {
            let size = fs::metadata(dir.join("blobs/sha256").join(&d["sha256:".len()..]))
                .unwrap()
                .len();
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                               "digest": d, "size": size})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    total += (config.len() + manifest.len()) as u64;
    (put_blob(dir, &manifest), digests, total)
}

#[tokio::test]
async fn layers_are_fetched_in_parallel_and_a_broken_one_resumes() {
    let cd = Containerd::start("parallel");
    let rt = common::runtime(&cd).await;
    let store = cd.path("store");
    let (manifest, layers, total) = push_layers(&store, 4);
    // Each layer's first request is answered only once all four were
    // asked for: a one-at-a-time fetch would wait here until the deadline.
    let server = BlobServer {
        dir: store,
        gated: Arc::new(Mutex::new(layers.iter().cloned().collect())),
        barrier: Some(Arc::new(tokio::sync::Barrier::new(layers.len()))),
        ..Default::default()
    };
    server.break_once.lock().unwrap().insert(layers[2].clone());
    let images = ControllerImages::new(serve(server.clone()).await, rt.clone(), cd.path("st"));
    let r = within(
        "ensure of a four-layer image",
        images.ensure(IMAGE, &manifest),
    )
    .await
    .unwrap();
    assert!(r.fetched);
    assert_eq!(
        r.bytes, total,
        "every byte once, the resumed layer included"
    );
    assert!(
        server.most_open.load(std::sync::atomic::Ordering::SeqCst) >= layers.len(),
        "layer streams were not open at the same time"
    );
    // The broken layer was asked for twice: from 0, then from where it broke.
    let asked: Vec<u64> = server
        .offsets
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| *d == layers[2])
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked[0] == 0 && asked[1] > 0, "{asked:?}");
    // The others once each.
    for l in [&layers[0], &layers[1], &layers[3]] {
        assert_eq!(server.fetched().iter().filter(|d| *d == l).count(), 1);
    }
    // containerd holds the image, unpacked from all four layers.
    let resolved = rt.resolve_image(IMAGE).await.unwrap();
    assert_eq!(resolved.manifest_digest, manifest);
    assert!(rt.snapshot_exists(&resolved.chain_id).await.unwrap());
}

#[tokio::test]
async fn damaged_layer_is_invalid_and_nothing_is_imported() {
    let cd = Containerd::start("damaged");
    let rt = common::runtime(&cd).await;
    let server = BlobServer {
        dir: cd.path("store"),
        ..Default::default()
    };
    let pushed = push_busybox(&server.dir, "/bin/sh");
    server.corrupt.lock().unwrap().insert(pushed.layer.clone());
    let images = ControllerImages::new(serve(server.clone()).await, rt.clone(), cd.path("st"));

    let e = images.ensure(IMAGE, &pushed.manifest).await.unwrap_err();
    let ImageSourceError::Invalid { reason, .. } = &e else {
        panic!("expected Invalid, got {e:?}");
    };
    assert!(
        reason.contains(&pushed.layer) && reason.contains("damaged"),
        "{reason}"
    );
    let err = rt.resolve_image(IMAGE).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(staging_entries(&cd.path("st")).is_empty());

    // Once the store serves it intact, the same call succeeds.
    server.corrupt.lock().unwrap().clear();
    assert!(
        images
            .ensure(IMAGE, &pushed.manifest)
            .await
            .unwrap()
            .fetched
    );
}

#[tokio::test]
async fn unreachable_controller_is_unavailable() {
    let cd = Containerd::start("unreach");
    let rt = common::runtime(&cd).await;
    // A port nobody listens on (bound, then released).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let images = ControllerImages::new(NodeServiceClient::new(channel), rt, cd.path("st"));
    let e = within(
        "ensure against a closed port",
        images.ensure(IMAGE, &sha256(b"m")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ImageSourceError::Unavailable { .. }), "{e:?}");
}
