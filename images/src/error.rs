//! The one error type of this crate, [`ImageError`].
//!
//! Every variant names what was being done and to which path or spec
//! field, so a failed build reads as a sentence an operator can act on.

use std::io;
use std::path::PathBuf;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A field of an [`ImageSpec`](crate::ImageSpec) is not acceptable.
    #[error("image {image}: {field}: {reason}")]
    InvalidSpec {
        /// `name:tag` of the image (as given, possibly invalid itself).
        image: String,
        /// The field, e.g. `files[1].path_in_image "/../x"`.
        field: String,
        reason: String,
    },

    /// A file that should go into the image could not be read.
    #[error("image {image}: reading {} for {path_in_image}: {source}", source_path.display())]
    ReadSource {
        image: String,
        path_in_image: String,
        source_path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file system operation on the output (or on a build input) failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `"write blob"`.
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The output directory exists, is not empty and is not an OCI image
    /// layout; it is left alone rather than replaced.
    #[error("{}: exists, is not empty and is not an OCI image layout (no oci-layout file); refusing to replace it", .0.display())]
    NotALayout(PathBuf),

    /// Encoding the layer (tar or gzip) failed.
    #[error("image {image}: writing the layer: {source}")]
    Layer {
        image: String,
        #[source]
        source: io::Error,
    },

    /// Serialising a JSON document of the layout failed.
    #[error("encoding {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The static build of the image binaries failed.
    #[error("static build: {0}")]
    StaticBuild(String),

    /// A binary meant for an image is not statically linked (it names a
    /// program interpreter), so it could not run in an image with no libc.
    #[error("{}: not a static executable: {reason}", path.display())]
    NotStatic { path: PathBuf, reason: String },

    /// An environment variable that configures the build has a bad value.
    #[error("{name}={value:?}: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
}

impl ImageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
