//! The controller's content-addressed image store (OCI blobs by digest plus
//! name → manifest references), and the RPC handlers that push to it and
//! fetch from it.
//!
//! STUB: filled in by the image-distribution work.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use ironmesh_proto::v1::{
    BlobChunk, BlobsMissingRequest, BlobsMissingResponse, FetchBlobRequest, ImageInfo,
    ListImagesRequest, ListImagesResponse, PushBlobResponse, TagImageRequest,
};
use tonic::{Status, Streaming};

use crate::store::Store;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

/// Blobs under `<data-dir>/images/blobs/sha256/`, names in the store.
#[derive(Clone)]
pub struct ImageStore {
    #[allow(dead_code)]
    root: PathBuf,
    #[allow(dead_code)]
    store: Arc<dyn Store>,
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

impl ImageStore {
    pub fn open(root: PathBuf, store: Arc<dyn Store>) -> Result<ImageStore, ImageStoreError> {
        std::fs::create_dir_all(&root).map_err(|source| ImageStoreError::Io {
            action: "create",
            path: root.clone(),
            source,
        })?;
        Ok(ImageStore { root, store })
    }

    /// The manifest digest `name` points at, if the store holds the image.
    pub async fn resolve(&self, _name: &str) -> Option<String> {
        None
    }

    pub async fn blobs_missing(
        &self,
        _req: BlobsMissingRequest,
    ) -> Result<BlobsMissingResponse, Status> {
        Err(Status::unimplemented("image store"))
    }

    pub async fn push_blob(
        &self,
        _chunks: Streaming<BlobChunk>,
    ) -> Result<PushBlobResponse, Status> {
        Err(Status::unimplemented("image store"))
    }

    pub async fn tag_image(&self, _req: TagImageRequest) -> Result<ImageInfo, Status> {
        Err(Status::unimplemented("image store"))
    }

    pub async fn list_images(&self, _req: ListImagesRequest) -> Result<ListImagesResponse, Status> {
        Err(Status::unimplemented("image store"))
    }

    pub async fn fetch_blob(&self, _req: FetchBlobRequest) -> Result<BlobStream, Status> {
        Err(Status::unimplemented("image store"))
    }
}
