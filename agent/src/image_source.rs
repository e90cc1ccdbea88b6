//! Where the agent gets the images its instances need.
//!
//! The supervisor asks an [`ImageSource`] to make an image present in
//! containerd before it creates a container. The production source fetches
//! blobs from the controller's image store over the mTLS channel
//! (`image_fetch`); tests may import a local OCI layout instead.

/// Why an image could not be made available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageSourceError {
    /// The controller's image store does not hold this image (or digest).
    #[error("image {image:?} not found: {reason}")]
    NotFound { image: String, reason: String },
    /// The controller or containerd could not be reached; worth retrying.
    #[error("image {image:?} unavailable: {reason}")]
    Unavailable { image: String, reason: String },
    /// The image's content is broken (digest mismatch, bad manifest...).
    #[error("image {image:?} is invalid: {reason}")]
    Invalid { image: String, reason: String },
}

/// What `ensure` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsuredImage {
    /// False when containerd already had the image at that digest.
    pub fetched: bool,
    /// Bytes transferred from the controller.
    pub bytes: u64,
}

#[tonic::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// Makes `image` available in the agent's containerd namespace,
    /// unpacked for the runtime's snapshotter. `digest` is the manifest
    /// digest the controller resolved the name to; empty when the
    /// controller does not hold the image.
    async fn ensure(&self, image: &str, digest: &str) -> Result<EnsuredImage, ImageSourceError>;
}
