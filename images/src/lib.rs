//! Ironmesh's own OCI images, built with no registry and no Docker.
//!
//! [`build_layout`] turns an [`ImageSpec`] — entrypoint, env, ports,
//! labels and files copied from the build machine — into an OCI image
//! layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`) holding
//! one linux/amd64 image with a single layer. The build is reproducible:
//! the same spec over the same files gives byte-identical blobs and the
//! same manifest digest (sorted tar entries, uid/gid 0, fixed modes,
//! mtimes and `created` from the spec's epoch, a fixed gzip header and
//! level).
//!
//! [`catalog`] has the specs of the images the project ships (the records
//! server and the batch step, binaries of this crate) and
//! [`static_build`] builds those binaries statically so the images need
//! no libc. The `build-images` binary ties both together.

pub mod catalog;
mod error;
mod layer;
mod layout;
mod spec;
pub mod static_build;

pub use error::ImageError;
pub use layer::{sha256_digest, GZIP_LEVEL, MEDIA_LAYER_TAR, MEDIA_LAYER_TAR_GZIP};
pub use layout::{
    build_layout, BuiltImage, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, ARCHITECTURE,
    MEDIA_CONFIG, MEDIA_INDEX, MEDIA_MANIFEST, OS,
};
pub use spec::{
    source_date_epoch, ImageDir, ImageFile, ImageSpec, LayerCompression, DEFAULT_DIR_MODE,
};
